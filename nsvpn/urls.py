"""Parse `--via` upstream URLs into typed records.

Accepted forms:
  ssh://[user@]host[:port]
  socks5://[user:pass@]host[:port]     (socks5h:// too; port defaults to 1080)
  openconnect://[user@]host[:port]

Hosts may be names, IPv4 literals or bracketed IPv6 literals. User and password are
percent-decoded. A password never appears in repr() or str() of a record: URLs end up in logs,
status output and error messages.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Tuple, Union
from urllib.parse import quote, unquote

_LABEL = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")
SOCKS5_DEFAULT_PORT = 1080


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _userinfo(user: str | None, with_password: bool) -> str:
    if user is None:
        return ""
    return quote(user, safe="") + (":***" if with_password else "") + "@"


@dataclass(frozen=True)
class SshUpstreamUrl:
    host: str
    port: int | None = None  # None: let ssh (and the user's ssh config) decide
    user: str | None = None
    scheme: str = "ssh"

    def ssh_destination(self) -> str:
        """The destination argument for ssh(1): [user@]host (the port goes to -p)."""
        return (self.user + "@" if self.user else "") + self.host

    def __str__(self) -> str:
        port = f":{self.port}" if self.port is not None else ""
        return f"ssh://{_userinfo(self.user, False)}{_host_for_url(self.host)}{port}"


@dataclass(frozen=True)
class Socks5UpstreamUrl:
    host: str
    port: int = SOCKS5_DEFAULT_PORT
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    remote_dns: bool = False  # socks5h: names always go to the proxy unresolved
    scheme: str = "socks5"

    def __str__(self) -> str:
        userinfo = _userinfo(self.user, self.password is not None)
        return f"{self.scheme}://{userinfo}{_host_for_url(self.host)}:{self.port}"


@dataclass(frozen=True)
class OpenconnectUpstreamUrl:
    host: str
    port: int | None = None
    user: str | None = None
    scheme: str = "openconnect"

    def __str__(self) -> str:
        port = f":{self.port}" if self.port is not None else ""
        return f"openconnect://{_userinfo(self.user, False)}{_host_for_url(self.host)}{port}"


UpstreamUrl = Union[SshUpstreamUrl, Socks5UpstreamUrl, OpenconnectUpstreamUrl]
SCHEMES = ("ssh", "socks5", "socks5h", "openconnect")


def _split_hostport(text: str, url: str) -> Tuple[str, int | None]:
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{url}: unterminated '[' in IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise ValueError(f"{url}: {host!r} is not an IPv6 address") from None
        if rest and not rest.startswith(":"):
            raise ValueError(f"{url}: unexpected {rest!r} after the IPv6 address")
        port_text = rest[1:] if rest else None
    else:
        if text.count(":") > 1:
            raise ValueError(f"{url}: IPv6 addresses must be written in brackets, e.g. [::1]")
        host, sep, port_text = text.partition(":")
        if not sep:
            port_text = None
        if not host:
            raise ValueError(f"{url}: missing host")
        labels = host.rstrip(".").split(".")
        if not all(_LABEL.match(label) for label in labels):
            raise ValueError(f"{url}: {host!r} is not a valid host name")
    port = None
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"{url}: bad port {port_text!r} (expected 1..65535)")
        port = int(port_text)
    return host, port


def _scrub(url: str) -> str:
    """The URL with any password replaced, for error messages."""
    return re.sub(r"(://[^/@:]*):[^/@]*@", r"\1:***@", url)


def parse_upstream_url(url: str) -> UpstreamUrl:
    """Parse one `--via` value; raises ValueError with a message naming the problem."""
    shown = _scrub(url)
    scheme, sep, rest = url.partition("://")
    if not sep:
        expected = ", ".join(s + "://" for s in SCHEMES)
        raise ValueError(
            f"{shown}: not an upstream URL (expected one of {expected}, "
            "e.g. ssh://login.example.org)"
        )
    scheme = scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(
            "{}: unknown scheme {!r} (expected one of {})".format(shown, scheme, ", ".join(SCHEMES))
        )
    if rest.endswith("/"):
        rest = rest[:-1]
    if any(c in rest for c in "/?#"):
        raise ValueError(f"{shown}: upstream URLs take no path, query or fragment")
    if any(c.isspace() for c in rest):
        raise ValueError(f"{shown}: whitespace in URL")
    userinfo, at, hostport = rest.rpartition("@")
    user: str | None = None
    password: str | None = None
    if at:
        u, colon, p = userinfo.partition(":")
        user = unquote(u)
        if not user:
            raise ValueError(f"{shown}: empty user name before '@'")
        if colon:
            password = unquote(p)
    if not hostport:
        raise ValueError(f"{shown}: missing host")
    host, port = _split_hostport(hostport, shown)

    if scheme == "ssh":
        if password is not None:
            raise ValueError(
                f"{shown}: passwords are not accepted in ssh:// URLs (use keys, an agent, or let "
                "ssh ask on the terminal)"
            )
        return SshUpstreamUrl(host=host, port=port, user=user)
    if scheme == "openconnect":
        if password is not None:
            raise ValueError(
                f"{shown}: passwords are not accepted in openconnect:// URLs "
                "(openconnect asks for them itself)"
            )
        return OpenconnectUpstreamUrl(host=host, port=port, user=user)
    if password is None and user is not None:
        raise ValueError(f"{shown}: SOCKS5 user name given without a password (user:pass@)")
    if user is not None and (len(user.encode()) > 255 or len(password.encode()) > 255):
        raise ValueError(f"{shown}: SOCKS5 user name and password are limited to 255 bytes")
    return Socks5UpstreamUrl(
        host=host,
        port=port if port is not None else SOCKS5_DEFAULT_PORT,
        user=user,
        password=password,
        remote_dns=scheme == "socks5h",
        scheme=scheme,
    )
