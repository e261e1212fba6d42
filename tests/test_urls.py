from __future__ import annotations

import pytest

from nsvpn.urls import (
    OpenconnectUpstreamUrl,
    Socks5UpstreamUrl,
    SshUpstreamUrl,
    parse_upstream_url,
)


def test_ssh_forms():
    assert parse_upstream_url("ssh://login") == SshUpstreamUrl("login")
    u = parse_upstream_url("ssh://alice@login.example.org:2222")
    assert u == SshUpstreamUrl("login.example.org", 2222, "alice")
    assert u.ssh_destination() == "alice@login.example.org"
    assert str(u) == "ssh://alice@login.example.org:2222"
    assert parse_upstream_url("SSH://[::1]:22/") == SshUpstreamUrl("::1", 22)
    assert str(parse_upstream_url("ssh://[fe80::1]")) == "ssh://[fe80::1]"


def test_socks5_forms():
    u = parse_upstream_url("socks5://bob:s%40cret@127.0.0.1:1081")
    assert isinstance(u, Socks5UpstreamUrl)
    assert (u.host, u.port, u.user, u.password, u.remote_dns) == (
        "127.0.0.1",
        1081,
        "bob",
        "s@cret",
        False,
    )
    h = parse_upstream_url("socks5h://proxy")
    assert h.port == 1080 and h.remote_dns and h.user is None


def test_password_never_shown():
    u = parse_upstream_url("socks5://bob:hunter2@proxy:1080")
    assert "hunter2" not in repr(u) and "hunter2" not in str(u)
    assert str(u) == "socks5://bob:***@proxy:1080"
    with pytest.raises(ValueError) as ei:
        parse_upstream_url("ssh://bob:hunter2@login")
    assert "hunter2" not in str(ei.value) and "password" in str(ei.value)


def test_openconnect():
    assert parse_upstream_url("openconnect://me@vpn.example.org") == OpenconnectUpstreamUrl(
        "vpn.example.org", None, "me"
    )


@pytest.mark.parametrize(
    "url, words",
    [
        ("http://proxy:3128", "unknown scheme"),
        ("login.example.org", "not an upstream URL"),
        ("ssh://", "missing host"),
        ("ssh://alice@", "missing host"),
        ("ssh://:22", "missing host"),
        ("ssh://host:0", "bad port"),
        ("ssh://host:65536", "bad port"),
        ("ssh://host:ssh", "bad port"),
        ("socks5://host:", "bad port"),
        ("ssh://::1", "brackets"),
        ("ssh://[::1", "unterminated"),
        ("ssh://[zz]:1", "not an IPv6"),
        ("ssh://host/path", "no path"),
        ("ssh://ho st", "whitespace"),
        ("ssh://bad_host!", "not a valid host"),
        ("socks5://user@proxy:1080", "without a password"),
        ("openconnect://u:p@vpn", "password"),
        ("ssh://@host", "empty user"),
    ],
)
def test_bad_urls(url, words):
    with pytest.raises(ValueError) as ei:
        parse_upstream_url(url)
    assert words in str(ei.value)
