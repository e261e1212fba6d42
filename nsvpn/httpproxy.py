"""Sans-IO HTTP proxy requests (RFC 9110/9112), as the local front serves them.

Preload mode exports ``http_proxy``/``https_proxy`` pointing at the front, because the SOCKS
URL in ``ALL_PROXY`` alone broke Python requests and pip without PySocks ("Missing dependencies
for SOCKS support"), while every HTTP client speaks to an HTTP proxy, static Go programs too.

Two request forms:

* ``CONNECT host:port`` (https and anything else): after the dial, ``200`` and a byte pipe.
* absolute-form (``GET http://host[:port]/path``): the request is sent on with its target in
  origin-form, the proxy's own headers dropped and ``Connection: close``, so the connection
  carries exactly one request to one origin and then is a byte pipe too: bodies, chunked
  uploads, WebDAV methods and the response pass through untouched.

No sockets here: ``head_end()`` finds the end of the request head in what arrived,
``parse_request()`` checks and rewrites it, ``response()`` builds the front's own answers.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hmac
from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

MAX_HEAD = 32 * 1024
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
# hop-by-hop headers that concern the client <-> proxy connection only (RFC 9110 7.6.1)
# (and Host, which a proxy sets from the URL: RFC 9112 3.2.2)
_HOP = frozenset((b"proxy-authorization", b"proxy-connection", b"connection", b"keep-alive",
                  b"te", b"trailer", b"proxy-authenticate", b"host"))
REASONS = {200: "Connection established", 400: "Bad Request", 407: "Proxy Authentication Required",
           405: "Method Not Allowed", 431: "Request Header Fields Too Large",
           502: "Bad Gateway", 504: "Gateway Timeout"}


class HttpProxyError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    def response(self) -> bytes:
        extra = [("Proxy-Authenticate", 'Basic realm="nsvpn"')] if self.status == 407 else []
        return response(self.status, f"nsvpn: {self}\n", extra)


@dataclass
class ProxyRequest:
    method: str
    host: str
    port: int
    tunnel: bool  # CONNECT: answer 200, then pipe
    head: bytes  # absolute-form: the head to send to the origin (b"" for CONNECT)
    authorized: bool  # carried valid proxy credentials


def head_end(buf: bytes) -> Optional[int]:
    """Index just past the blank line that ends the head, or None while it is incomplete.
    Raises HttpProxyError once the head is too long to be a sane request."""
    i = buf.find(b"\r\n\r\n")
    if i >= 0 and i + 4 <= MAX_HEAD:
        return i + 4
    j = buf.find(b"\n\n")  # bare-LF lines (RFC 9112 2.2 lets a recipient accept them)
    if j >= 0 and j + 2 <= MAX_HEAD and (i < 0 or j < i):
        return j + 2
    if len(buf) > MAX_HEAD:
        raise HttpProxyError(431, "request head too long")
    return None


def response(status: int, body: str = "", extra: Iterable[Tuple[str, str]] = ()) -> bytes:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}"]
    lines += [f"{k}: {v}" for k, v in extra]
    if status != 200:
        data = body.encode("utf-8", "replace")
        lines += ["Content-Type: text/plain; charset=utf-8", f"Content-Length: {len(data)}",
                  "Connection: close"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + data
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def dial_failure(err: Optional[int], message: str) -> bytes:
    """The answer when the destination could not be reached: 504 for a timeout, else 502."""
    status = 504 if err == errno.ETIMEDOUT else 502
    return response(status, f"nsvpn: {message}\n")


def _split_hostport(authority: str, default_port: Optional[int]) -> Tuple[str, int]:
    if authority.startswith("["):  # [v6]:port
        end = authority.find("]")
        if end < 0:
            raise HttpProxyError(400, f"bad address {authority!r}")
        host, rest = authority[1:end], authority[end + 1:]
        if rest and not rest.startswith(":"):
            raise HttpProxyError(400, f"bad address {authority!r}")
        port_text = rest[1:] if rest else ""
    else:
        host, sep, port_text = authority.rpartition(":")
        if not sep:
            host, port_text = authority, ""
    if not port_text:
        if default_port is None:
            raise HttpProxyError(400, f"CONNECT needs host:port, got {authority!r}")
        return _check_host(host, authority), default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise HttpProxyError(400, f"bad port in {authority!r}")
    return _check_host(host, authority), int(port_text)


def _check_host(host: str, authority: str) -> str:
    if not host or any(c in host for c in " /@\\\t") or len(host) > 255:
        raise HttpProxyError(400, f"bad host in {authority!r}")
    return host


def _authorized(headers: List[Tuple[bytes, bytes]], credentials: Tuple[str, str]) -> bool:
    want = f"{credentials[0]}:{credentials[1]}".encode()
    for name, value in headers:
        if name != b"proxy-authorization":
            continue
        scheme, _, token = value.strip().partition(b" ")
        if scheme.lower() != b"basic":
            continue
        try:
            got = base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            continue
        if hmac.compare_digest(got, want):
            return True
    return False


def parse_request(head: bytes, credentials: Tuple[str, str]) -> ProxyRequest:
    """Check and rewrite one request head (as found by head_end). Credentials are checked
    (`authorized`) but not required here: the front also trusts connections of its own user."""
    lines = head.replace(b"\r\n", b"\n").split(b"\n")
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise HttpProxyError(400, "empty request")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[0] or not set(parts[0]) <= _TOKEN:
        raise HttpProxyError(400, "malformed request line")
    method_b, target_b, version_b = parts
    if version_b not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise HttpProxyError(400, f"unsupported version {version_b.decode('latin-1')!r}")
    headers: List[Tuple[bytes, bytes]] = []
    raw: List[bytes] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or not set(name) <= _TOKEN:  # also refuses obs-fold
            raise HttpProxyError(400, "malformed header line")
        headers.append((name.lower(), value.strip()))
        raw.append(line)
    method = method_b.decode("ascii")
    target = target_b.decode("latin-1")
    authorized = _authorized(headers, credentials)
    if method == "CONNECT":
        host, port = _split_hostport(target, None)
        return ProxyRequest(method, host, port, True, b"", authorized)
    if not target.lower().startswith("http://"):
        if target.lower().startswith("https://"):
            raise HttpProxyError(400, "https:// goes through CONNECT")
        raise HttpProxyError(400, "this is a proxy: the request needs an http:// URL")
    rest = target[7:]
    slash = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, path = rest[:slash], rest[slash:] or "/"
    if path.startswith("?"):
        path = "/" + path
    if "@" in authority:
        raise HttpProxyError(400, "user info in the URL is not forwarded")
    host, port = _split_hostport(authority, 80)
    # hop-by-hop: the proxy headers, and whatever the client's Connection header names
    # (except an Upgrade, which the origin must see to switch protocols)
    named = set()
    upgrade = False
    for name, value in headers:
        if name in (b"connection", b"proxy-connection"):
            for tok in value.lower().split(b","):
                tok = tok.strip()
                if tok == b"upgrade":
                    upgrade = True
                elif tok:
                    named.add(tok)
    out = [b"%s %s %s" % (method_b, path.encode("latin-1"), version_b),
           b"Host: " + authority.encode("latin-1")]
    for (name, _value), line in zip(headers, raw):
        if name not in _HOP and name not in named:
            out.append(line)
    out.append(b"Connection: upgrade" if upgrade else b"Connection: close")
    return ProxyRequest(method, host, port, False, b"\r\n".join(out) + b"\r\n\r\n", authorized)
