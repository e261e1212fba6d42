"""Sans-IO SOCKS5 codec (RFC 1928, with RFC 1929 user/password authentication).

No sockets here: feed received bytes in with ``receive_data()``, send whatever
``data_to_send()`` returns. Both sides accept input split at any byte boundary and never raise
anything but :class:`SocksError` on malformed or hostile input.

Client (what our upstream dialers speak)::

    hs = ClientHandshake(CMD_CONNECT, "example.org", 443, username="u", password="p")
    send(hs.data_to_send())                 # greeting
    while hs.reply is None:
        hs.receive_data(recv())             # raises SocksError / SocksReplyError
        send(hs.data_to_send())             # auth, then the request
    hs.reply.host, hs.reply.port            # bound address; hs.leftover: early payload

Server (for the local front)::

    hs = ServerHandshake(credentials=("user", "secret"))
    while hs.request is None:
        hs.receive_data(recv())             # on SocksError: flush data_to_send(), close
        send(hs.data_to_send())
    ... dial hs.request.host/port ...
    send(hs.reply(REP_SUCCEEDED, bound_host, bound_port))

Reply code <-> errno mapping (``reply_errno`` and ``errno_reply``), chosen so that the errno a
program sees from connect() is what it would have seen without the tunnel:

  0x01 general failure          -> ECONNABORTED
  0x02 not allowed by ruleset   -> EACCES      (what Linux connect() says for a firewall rule)
  0x03 network unreachable      -> ENETUNREACH
  0x04 host unreachable         -> EHOSTUNREACH
  0x05 connection refused       -> ECONNREFUSED
  0x06 TTL expired              -> ETIMEDOUT   (proxies use it for "connect timed out")
  0x07 command not supported    -> EOPNOTSUPP
  0x08 address type unsupported -> EAFNOSUPPORT
  anything else                 -> ECONNABORTED
"""

from __future__ import annotations

import errno
import hmac
import ipaddress
import struct
from typing import List, NamedTuple, Tuple

VERSION = 5

METHOD_NO_AUTH = 0x00
METHOD_USER_PASS = 0x02
METHOD_NONE_ACCEPTABLE = 0xFF

CMD_CONNECT = 0x01
CMD_BIND = 0x02
CMD_UDP_ASSOCIATE = 0x03

ATYP_IPV4 = 0x01
ATYP_DOMAIN = 0x03
ATYP_IPV6 = 0x04

REP_SUCCEEDED = 0x00
REP_GENERAL_FAILURE = 0x01
REP_NOT_ALLOWED = 0x02
REP_NETWORK_UNREACHABLE = 0x03
REP_HOST_UNREACHABLE = 0x04
REP_CONNECTION_REFUSED = 0x05
REP_TTL_EXPIRED = 0x06
REP_COMMAND_NOT_SUPPORTED = 0x07
REP_ADDRESS_TYPE_NOT_SUPPORTED = 0x08

REPLY_TEXT = {
    REP_SUCCEEDED: "succeeded",
    REP_GENERAL_FAILURE: "general SOCKS server failure",
    REP_NOT_ALLOWED: "connection not allowed by ruleset",
    REP_NETWORK_UNREACHABLE: "network unreachable",
    REP_HOST_UNREACHABLE: "host unreachable",
    REP_CONNECTION_REFUSED: "connection refused",
    REP_TTL_EXPIRED: "TTL expired",
    REP_COMMAND_NOT_SUPPORTED: "command not supported",
    REP_ADDRESS_TYPE_NOT_SUPPORTED: "address type not supported",
}

_REPLY_ERRNO = {
    REP_GENERAL_FAILURE: errno.ECONNABORTED,
    REP_NOT_ALLOWED: errno.EACCES,
    REP_NETWORK_UNREACHABLE: errno.ENETUNREACH,
    REP_HOST_UNREACHABLE: errno.EHOSTUNREACH,
    REP_CONNECTION_REFUSED: errno.ECONNREFUSED,
    REP_TTL_EXPIRED: errno.ETIMEDOUT,
    REP_COMMAND_NOT_SUPPORTED: errno.EOPNOTSUPP,
    REP_ADDRESS_TYPE_NOT_SUPPORTED: errno.EAFNOSUPPORT,
}

_ERRNO_REPLY = {
    errno.ECONNREFUSED: REP_CONNECTION_REFUSED,
    errno.ENETUNREACH: REP_NETWORK_UNREACHABLE,
    errno.EHOSTUNREACH: REP_HOST_UNREACHABLE,
    errno.EHOSTDOWN: REP_HOST_UNREACHABLE,
    errno.ETIMEDOUT: REP_TTL_EXPIRED,
    errno.EACCES: REP_NOT_ALLOWED,
    errno.EPERM: REP_NOT_ALLOWED,
    errno.EAFNOSUPPORT: REP_ADDRESS_TYPE_NOT_SUPPORTED,
}


def reply_errno(code: int) -> int:
    """The errno a client program should see for a failed SOCKS5 reply code."""
    return _REPLY_ERRNO.get(code, errno.ECONNABORTED)


def errno_reply(err: int | None) -> int:
    """The SOCKS5 reply code a server should send for a failed dial with this errno."""
    return _ERRNO_REPLY.get(err or 0, REP_GENERAL_FAILURE)


def reply_text(code: int) -> str:
    return REPLY_TEXT.get(code, f"unknown SOCKS5 reply 0x{code:02x}")


class SocksError(Exception):
    """Protocol failure. `reply_code` is what a server answers (or the client received)."""

    def __init__(self, message: str, reply_code: int = REP_GENERAL_FAILURE):
        super().__init__(message)
        self.reply_code = reply_code

    @property
    def errno(self) -> int:
        return reply_errno(self.reply_code)


class SocksAuthError(SocksError):
    """No acceptable method, or user/password rejected."""


class SocksReplyError(SocksError):
    """The server answered the request with a failure code (refused, unreachable, ...)."""


class Reply(NamedTuple):
    code: int
    host: str  # bound address (IPv4/IPv6 literal, or a name)
    port: int


class Request(NamedTuple):
    command: int
    host: str  # IP literal (IPv6 without brackets) or a domain name
    port: int
    atyp: int


class UdpDatagram(NamedTuple):
    host: str
    port: int
    payload: bytes
    frag: int = 0


# -- addresses -------------------------------------------------------------------------


def encode_address(host: str, port: int) -> bytes:
    """ATYP + address + port. IP literals get their binary form, anything else is a name."""
    if not 0 <= port <= 0xFFFF:
        raise SocksError(f"port {port!r} out of range")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None and ip.version == 4:
        return bytes((ATYP_IPV4,)) + ip.packed + struct.pack("!H", port)
    if ip is not None:
        return bytes((ATYP_IPV6,)) + ip.packed + struct.pack("!H", port)
    try:
        name = host.encode("idna")
    except UnicodeError:
        raise SocksError(f"host name {host!r} cannot be encoded") from None
    if not 0 < len(name) <= 255:
        raise SocksError("host name must be 1..255 bytes long", REP_GENERAL_FAILURE)
    return bytes((ATYP_DOMAIN, len(name))) + name + struct.pack("!H", port)


def decode_address(buf: bytes, offset: int) -> Tuple[str, int, int, int] | None:
    """Parse ATYP+address+port at `offset`: (host, port, atyp, end) or None if incomplete."""
    if len(buf) <= offset:
        return None
    atyp = buf[offset]
    if atyp == ATYP_IPV4:
        end = offset + 1 + 4 + 2
        if len(buf) < end:
            return None
        host = str(ipaddress.IPv4Address(bytes(buf[offset + 1 : offset + 5])))
    elif atyp == ATYP_IPV6:
        end = offset + 1 + 16 + 2
        if len(buf) < end:
            return None
        host = str(ipaddress.IPv6Address(bytes(buf[offset + 1 : offset + 17])))
    elif atyp == ATYP_DOMAIN:
        if len(buf) < offset + 2:
            return None
        n = buf[offset + 1]
        end = offset + 2 + n + 2
        if len(buf) < end:
            return None
        if n == 0:
            raise SocksError("empty domain name", REP_GENERAL_FAILURE)
        raw = bytes(buf[offset + 2 : offset + 2 + n])
        try:
            host = raw.decode("ascii")
        except UnicodeDecodeError:
            raise SocksError("domain name is not ASCII", REP_GENERAL_FAILURE) from None
        if any(c in host for c in "\x00/ ") or not host.isprintable():
            raise SocksError("invalid characters in domain name", REP_GENERAL_FAILURE)
    else:
        raise SocksError(f"address type 0x{atyp:02x} not supported", REP_ADDRESS_TYPE_NOT_SUPPORTED)
    (port,) = struct.unpack_from("!H", buf, end - 2)
    return host, port, atyp, end


# -- UDP ASSOCIATE datagram header -----------------------------------------------------


def encode_udp(host: str, port: int, payload: bytes, frag: int = 0) -> bytes:
    """RSV(2) FRAG(1) ATYP ADDR PORT DATA."""
    if not 0 <= frag <= 0xFF:
        raise SocksError("bad fragment number")
    return b"\x00\x00" + bytes((frag,)) + encode_address(host, port) + bytes(payload)


def decode_udp(datagram: bytes) -> UdpDatagram:
    if len(datagram) < 4:
        raise SocksError("short SOCKS5 UDP datagram")
    if datagram[0] != 0 or datagram[1] != 0:
        raise SocksError("bad reserved bytes in SOCKS5 UDP datagram")
    parsed = decode_address(datagram, 3)
    if parsed is None:
        raise SocksError("truncated address in SOCKS5 UDP datagram")
    host, port, _atyp, end = parsed
    return UdpDatagram(host, port, bytes(datagram[end:]), datagram[2])


# -- client ----------------------------------------------------------------------------

_C_METHOD, _C_AUTH, _C_REPLY, _C_DONE, _C_FAILED = range(5)


class ClientHandshake:
    """Client side of one SOCKS5 handshake (greeting, optional auth, one request)."""

    def __init__(
        self,
        command: int,
        host: str,
        port: int,
        username: str | None = None,
        password: str | None = None,
    ):
        if command not in (CMD_CONNECT, CMD_BIND, CMD_UDP_ASSOCIATE):
            raise SocksError(f"unknown command {command!r}", REP_COMMAND_NOT_SUPPORTED)
        self._request = (
            bytes((VERSION, command, 0)) + encode_address(host, port)  # validates early
        )
        self._auth: bytes | None = None
        if username is not None:
            u, p = username.encode(), (password or "").encode()
            if not 0 < len(u) <= 255 or len(p) > 255:
                raise SocksError("user name and password must be 1..255 bytes")
            self._auth = bytes((1, len(u))) + u + bytes((len(p),)) + p
        methods = [METHOD_USER_PASS] if self._auth is not None else [METHOD_NO_AUTH]
        self._out = bytearray(bytes((VERSION, len(methods))) + bytes(methods))
        self._in = bytearray()
        self._state = _C_METHOD
        self.reply: Reply | None = None
        self.leftover = b""  # bytes after the reply: the first payload from the far side

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def awaiting_reply(self) -> bool:
        """Greeting (and auth) done, the request is queued or sent: the next thing the
        server says is its answer about the destination."""
        return self._state == _C_REPLY

    def _fail(self, exc: SocksError) -> SocksError:
        self._state = _C_FAILED
        return exc

    def receive_data(self, data: bytes) -> None:
        if self._state == _C_FAILED:
            raise SocksError("handshake already failed")
        if self._state == _C_DONE:
            self.leftover += bytes(data)
            return
        self._in += data
        while True:
            if self._state == _C_METHOD:
                if len(self._in) < 2:
                    return
                ver, method = self._in[0], self._in[1]
                del self._in[:2]
                if ver != VERSION:
                    raise self._fail(SocksError(f"not a SOCKS5 server (version byte {ver})"))
                if method == METHOD_NO_AUTH:
                    self._out += self._request
                    self._state = _C_REPLY
                elif method == METHOD_USER_PASS and self._auth is not None:
                    self._out += self._auth
                    self._state = _C_AUTH
                elif method == METHOD_NONE_ACCEPTABLE:
                    raise self._fail(
                        SocksAuthError(
                            "SOCKS5 server accepts none of our authentication methods"
                            + (" (it wants a user name and password)" if not self._auth else "")
                        )
                    )
                else:
                    raise self._fail(
                        SocksAuthError(f"SOCKS5 server chose unoffered method 0x{method:02x}")
                    )
            elif self._state == _C_AUTH:
                if len(self._in) < 2:
                    return
                ver, status = self._in[0], self._in[1]
                del self._in[:2]
                if ver != 1:
                    raise self._fail(SocksError(f"bad user/password auth reply version {ver}"))
                if status != 0:
                    raise self._fail(
                        SocksAuthError("SOCKS5 server rejected our user name/password")
                    )
                self._out += self._request
                self._state = _C_REPLY
            elif self._state == _C_REPLY:
                if len(self._in) < 4:
                    return
                ver, rep, _rsv = self._in[0], self._in[1], self._in[2]
                if ver != VERSION:
                    raise self._fail(SocksError(f"bad SOCKS5 reply version {ver}"))
                if rep != REP_SUCCEEDED:
                    # Some servers send a short failure reply; do not wait for the address.
                    raise self._fail(SocksReplyError(reply_text(rep), rep))
                try:
                    parsed = decode_address(self._in, 3)
                except SocksError as exc:
                    raise self._fail(SocksError(f"bad bound address in reply: {exc}")) from None
                if parsed is None:
                    return
                host, port, _atyp, end = parsed
                self.reply = Reply(rep, host, port)
                self.leftover = bytes(self._in[end:])
                self._in.clear()
                self._state = _C_DONE
                return
            else:  # pragma: no cover - states are exhaustive
                return


# -- server ----------------------------------------------------------------------------

_S_GREETING, _S_AUTH, _S_REQUEST, _S_DONE, _S_FAILED = range(5)


class ServerHandshake:
    """Server side of one SOCKS5 handshake.

    With `credentials` set, only user/password authentication is accepted and checked in
    constant time; without, only "no authentication". Requests with commands outside
    `commands` get a "command not supported" reply. On any SocksError the matching failure
    reply (if the protocol has one at that point) is already queued in data_to_send().
    """

    def __init__(
        self,
        credentials: Tuple[str, str] | None = None,
        commands: Tuple[int, ...] = (CMD_CONNECT, CMD_UDP_ASSOCIATE),
    ):
        self._credentials = (
            (credentials[0].encode(), credentials[1].encode()) if credentials else None
        )
        self._commands = commands
        self._in = bytearray()
        self._out = bytearray()
        self._state = _S_GREETING
        self.username: str | None = None
        self.request: Request | None = None
        self.leftover = b""  # bytes after the request (pipelined payload)

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def _fail(self, exc: SocksError, reply: bool = False) -> SocksError:
        if reply:
            self._out += self.reply(exc.reply_code)
        self._state = _S_FAILED
        return exc

    def receive_data(self, data: bytes) -> None:
        if self._state == _S_FAILED:
            raise SocksError("handshake already failed")
        if self._state == _S_DONE:
            self.leftover += bytes(data)
            return
        self._in += data
        while True:
            if self._state == _S_GREETING:
                if len(self._in) < 2:
                    return
                ver, n = self._in[0], self._in[1]
                if ver != VERSION:
                    raise self._fail(SocksError(f"not a SOCKS5 client (version byte {ver})"))
                if len(self._in) < 2 + n:
                    return
                methods = bytes(self._in[2 : 2 + n])
                del self._in[: 2 + n]
                wanted = METHOD_USER_PASS if self._credentials else METHOD_NO_AUTH
                if wanted not in methods:
                    self._out += bytes((VERSION, METHOD_NONE_ACCEPTABLE))
                    raise self._fail(SocksAuthError("client offers no acceptable auth method"))
                self._out += bytes((VERSION, wanted))
                self._state = _S_AUTH if self._credentials else _S_REQUEST
            elif self._state == _S_AUTH:
                if len(self._in) < 2:
                    return
                ver, ulen = self._in[0], self._in[1]
                if ver != 1:
                    self._out += b"\x01\x01"
                    raise self._fail(SocksAuthError(f"bad user/password version {ver}"))
                if len(self._in) < 2 + ulen + 1:
                    return
                plen = self._in[2 + ulen]
                end = 3 + ulen + plen
                if len(self._in) < end:
                    return
                user = bytes(self._in[2 : 2 + ulen])
                pw = bytes(self._in[3 + ulen : end])
                del self._in[:end]
                assert self._credentials is not None
                # Evaluate both comparisons: no early exit that leaks which part was wrong.
                ok_user = hmac.compare_digest(user, self._credentials[0])
                ok_pw = hmac.compare_digest(pw, self._credentials[1])
                if not (ok_user and ok_pw):
                    self._out += b"\x01\x01"
                    raise self._fail(SocksAuthError("bad SOCKS5 user name or password"))
                self._out += b"\x01\x00"
                self.username = user.decode("utf-8", "replace")
                self._state = _S_REQUEST
            elif self._state == _S_REQUEST:
                if len(self._in) < 4:
                    return
                ver, cmd, _rsv = self._in[0], self._in[1], self._in[2]
                if ver != VERSION:
                    raise self._fail(SocksError(f"bad request version {ver}"), reply=True)
                try:
                    parsed = decode_address(self._in, 3)
                except SocksError as exc:
                    raise self._fail(exc, reply=True) from None
                if parsed is None:
                    return
                host, port, atyp, end = parsed
                if cmd not in self._commands:
                    raise self._fail(
                        SocksError(f"command 0x{cmd:02x} not supported", REP_COMMAND_NOT_SUPPORTED),
                        reply=True,
                    )
                self.request = Request(cmd, host, port, atyp)
                self.leftover = bytes(self._in[end:])
                self._in.clear()
                self._state = _S_DONE
                return
            else:  # pragma: no cover
                return

    @staticmethod
    def reply(code: int, host: str = "0.0.0.0", port: int = 0) -> bytes:
        """The reply to a request: success with the bound address, or a failure code."""
        return bytes((VERSION, code, 0)) + encode_address(host, port)


def build_greeting(methods: List[int]) -> bytes:
    """A raw client greeting (tests and special clients)."""
    return bytes((VERSION, len(methods))) + bytes(methods)
