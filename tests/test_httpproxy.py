"""The sans-IO HTTP proxy request core (nsvpn.httpproxy) and the sock_diag owner lookup."""

from __future__ import annotations

import base64
import os
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nsvpn import httpproxy, sockdiag
from nsvpn.httpproxy import HttpProxyError, head_end, parse_request

CREDS = ("nsvpn", "s3cret")


def _auth(user="nsvpn", pw="s3cret") -> bytes:
    return b"Proxy-Authorization: Basic " + base64.b64encode(f"{user}:{pw}".encode())


def test_connect_with_credentials():
    head = b"CONNECT example.org:443 HTTP/1.1\r\nHost: example.org:443\r\n" + _auth() + b"\r\n\r\n"
    req = parse_request(head, CREDS)
    assert (req.method, req.host, req.port, req.tunnel, req.head) == (
        "CONNECT", "example.org", 443, True, b"")
    assert req.authorized


@pytest.mark.parametrize("auth, ok", [
    (b"", False),
    (_auth(pw="wrong"), False),
    (_auth(user="other"), False),
    (b"Proxy-Authorization: Basic !!notbase64", False),
    (b"Proxy-Authorization: Bearer abc", False),
    (b"proxy-authorization:   basic " + base64.b64encode(b"nsvpn:s3cret"), True),
])
def test_credentials_are_checked(auth, ok):
    head = b"CONNECT h:1 HTTP/1.1\r\n" + (auth + b"\r\n" if auth else b"") + b"\r\n"
    assert parse_request(head, CREDS).authorized is ok


def test_connect_ipv6_literal():
    req = parse_request(b"CONNECT [2001:db8::1]:1094 HTTP/1.1\r\n\r\n", CREDS)
    assert (req.host, req.port) == ("2001:db8::1", 1094)


def test_absolute_form_is_rewritten_for_the_origin():
    head = (b"GET http://remote.lab:8080/a/b?x=1 HTTP/1.1\r\n"
            b"Host: wrong.example\r\n"
            b"User-Agent: t\r\n"
            + _auth() + b"\r\n"
            b"Proxy-Connection: keep-alive\r\n"
            b"Connection: keep-alive, X-Hop\r\n"
            b"X-Hop: 1\r\n"
            b"Keep-Alive: 300\r\n"
            b"Accept: */*\r\n\r\n")
    req = parse_request(head, CREDS)
    assert (req.host, req.port, req.tunnel) == ("remote.lab", 8080, False)
    assert req.head == (b"GET /a/b?x=1 HTTP/1.1\r\nHost: remote.lab:8080\r\nUser-Agent: t\r\n"
                        b"Accept: */*\r\nConnection: close\r\n\r\n")


def test_absolute_form_defaults_and_http10():
    req = parse_request(b"PROPFIND http://h HTTP/1.0\r\n\r\n", CREDS)
    assert (req.host, req.port) == ("h", 80)
    assert req.head == b"PROPFIND / HTTP/1.0\r\nHost: h\r\nConnection: close\r\n\r\n"
    req = parse_request(b"GET http://h?q HTTP/1.1\n\n", CREDS)  # bare LF lines
    assert req.head.startswith(b"GET /?q HTTP/1.1\r\n")


def test_upgrade_keeps_its_connection_header():
    req = parse_request(b"GET http://h/ws HTTP/1.1\r\nConnection: Upgrade\r\n"
                        b"Upgrade: websocket\r\n\r\n", CREDS)
    assert req.head.endswith(b"Upgrade: websocket\r\nConnection: upgrade\r\n\r\n")


@pytest.mark.parametrize("head, status", [
    (b"GET /index.html HTTP/1.1\r\n\r\n", 400),  # origin-form: not a proxy request
    (b"GET https://h/ HTTP/1.1\r\n\r\n", 400),
    (b"GET http://u:p@h/ HTTP/1.1\r\n\r\n", 400),
    (b"CONNECT h HTTP/1.1\r\n\r\n", 400),  # no port
    (b"CONNECT h:99999 HTTP/1.1\r\n\r\n", 400),
    (b"CONNECT [::1 HTTP/1.1\r\n\r\n", 400),
    (b"GET http://h/ HTTP/2.0\r\n\r\n", 400),
    (b"GET http://h/\r\n\r\n", 400),
    (b"GET http://h/ HTTP/1.1\r\nno colon\r\n\r\n", 400),
    (b"GET http://h/ HTTP/1.1\r\nX: a\r\n folded\r\n\r\n", 400),
    (b"\r\n\r\n", 400),
])
def test_bad_requests(head, status):
    with pytest.raises(HttpProxyError) as e:
        parse_request(head, CREDS)
    assert e.value.status == status
    assert e.value.response().startswith(b"HTTP/1.1 %d " % status)


def test_head_end_and_limits():
    assert head_end(b"CONNECT h:1 HTTP/1.1\r\n") is None
    assert head_end(b"CONNECT h:1 HTTP/1.1\r\n\r\nbody") == len(b"CONNECT h:1 HTTP/1.1\r\n\r\n")
    assert head_end(b"GET http://h/ HTTP/1.0\n\nrest") == len(b"GET http://h/ HTTP/1.0\n\n")
    with pytest.raises(HttpProxyError) as e:
        head_end(b"GET http://h/ HTTP/1.1\r\nX: " + b"a" * httpproxy.MAX_HEAD)
    assert e.value.status == 431


def test_responses():
    assert httpproxy.response(200) == b"HTTP/1.1 200 Connection established\r\n\r\n"
    r = HttpProxyError(407, "credentials required").response()
    assert b'Proxy-Authenticate: Basic realm="nsvpn"' in r and r.endswith(b"required\n")
    assert httpproxy.dial_failure(110, "x").startswith(b"HTTP/1.1 504 ")
    assert httpproxy.dial_failure(111, "x").startswith(b"HTTP/1.1 502 ")


@given(st.binary(max_size=400))
def test_hostile_heads_raise_only_httpproxyerror(data):
    try:
        end = head_end(data)
        parse_request(data[:end] if end else data + b"\r\n\r\n", CREDS)
    except HttpProxyError:
        pass


# ------------------------------------------------------------------- sock_diag owner lookup

@pytest.mark.parametrize("family, host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_owner_of_a_loopback_connection(family, host):
    try:
        lst = socket.socket(family)
        lst.bind((host, 0))
    except OSError:
        pytest.skip(f"no {host} here")
    with lst:
        lst.listen(1)
        with socket.create_connection(lst.getsockname()[:2]) as c:
            acc, _ = lst.accept()
            with acc:
                assert sockdiag.tcp_socket_uid(family, c.getsockname(), c.getpeername()) \
                    == os.getuid()
                assert sockdiag.peer_is_ours(acc)
                assert not sockdiag.peer_is_ours(acc, uid=os.getuid() + 1)
    assert sockdiag.tcp_socket_uid(socket.AF_INET, ("127.0.0.1", 1), ("127.0.0.1", 2)) is None
    assert sockdiag.works()
