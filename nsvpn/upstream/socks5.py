"""Dial through any SOCKS5 server with our own sans-IO codec (nsvpn.socks) over trio.

The proxy is reached over TCP (host:port) or a unix socket path (what `ssh -D /path` makes).
The whole handshake is bounded by the dial timeout. Failures become DialError:

* the proxy itself cannot be reached, rejects our credentials, speaks something else or does
  not answer the greeting in time -> reason "upstream-down" (failover may try another one);
* the proxy answers the request with a failure code -> the errno from nsvpn.socks.reply_errno
  (refused, unreachable, TTL expired -> ETIMEDOUT, ...);
* the proxy closes the connection after our request without a reply (what ssh -D does when the
  far side's connect fails) -> `on_eof` decides (ssh reads its own stderr), else ECONNABORTED.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from typing import Awaitable, Callable, Tuple

import trio

from .. import socks
from ..urls import Socks5UpstreamUrl
from .base import DialError, UpstreamError, open_tcp, open_unix, upstream_down

log = logging.getLogger("nsvpn.upstream.socks5")

Connector = Callable[[], Awaitable[trio.abc.Stream]]
EofHandler = Callable[[str, int], Awaitable[DialError]]
RECV = 4096


class PrefixedStream(trio.abc.HalfCloseableStream):
    """A stream that first returns bytes which arrived together with the SOCKS reply."""

    def __init__(self, stream: trio.abc.Stream, prefix: bytes):
        self.stream = stream
        self._prefix = prefix

    async def send_all(self, data) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()  # type: ignore[attr-defined]

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            n = len(self._prefix) if max_bytes is None else max_bytes
            out, self._prefix = self._prefix[:n], self._prefix[n:]
            await trio.lowlevel.checkpoint()
            return out
        return await self.stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.stream.aclose()

    def raw_parts(self):
        """For the socket pump: the socket underneath, with our prefix in front."""
        from ..sockpump import unwrap

        return unwrap(self.stream, prefix=self._prefix)


def _oserror_errno(exc: BaseException) -> int | None:
    """trio.open_tcp_stream hides per-attempt errors behind an OSError without errno."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno:
            return exc.errno
        subs = getattr(exc, "exceptions", None)
        if subs:
            for sub in subs:
                e = _oserror_errno(sub)
                if e:
                    return e
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return None


async def socks5_dial(
    connect: Connector,
    host: str,
    port: int,
    *,
    timeout: float,
    proxy_name: str,
    username: str | None = None,
    password: str | None = None,
    on_eof: EofHandler | None = None,
) -> trio.abc.Stream:
    """CONNECT to host:port through the proxy reached by `connect()`; bounded by `timeout`.
    The request waits for the method choice: OpenSSH's -D parses a request sent along with
    the greeting only at its next wake-up (measured: 10 ms per connection), microsocks drops
    it."""
    try:
        hs = socks.ClientHandshake(socks.CMD_CONNECT, host, port, username, password)
    except socks.SocksError as exc:
        raise DialError(errno.EINVAL, f"cannot ask {proxy_name} for {host}:{port}: {exc}") from None
    stream, hs = await _handshake(connect, lambda _stream: hs, f"{host}:{port}",
                                  timeout=timeout, proxy_name=proxy_name,
                                  on_eof=None if on_eof is None else lambda: on_eof(host, port))
    return PrefixedStream(stream, hs.leftover) if hs.leftover else stream


async def _handshake(
    connect: Connector,
    handshake_for: Callable[[trio.abc.Stream], socks.ClientHandshake],
    what: str,
    *,
    timeout: float,
    proxy_name: str,
    on_eof: Callable[[], Awaitable[DialError]] | None = None,
) -> Tuple[trio.abc.Stream, socks.ClientHandshake]:
    """Connect to the proxy and run `handshake_for(stream)` to its reply; bounded by
    `timeout`. Every failure is a DialError (see the module's docstring)."""
    stream: trio.abc.Stream | None = None
    request_sent = False
    ok = False
    try:
        with trio.move_on_after(timeout) as scope:
            try:
                stream = await connect()
            except OSError as exc:
                err = _oserror_errno(exc)
                why = errno.errorcode.get(err or 0, str(exc)) if err else str(exc)
                raise upstream_down(f"cannot reach SOCKS5 proxy {proxy_name}: {why}") from None
            try:
                hs = handshake_for(stream)
                while hs.reply is None:
                    out = hs.data_to_send()
                    if out:
                        if hs.awaiting_reply:  # the request is in `out`
                            request_sent = True
                        await stream.send_all(out)
                    data = await stream.receive_some(RECV)
                    if not data:
                        if request_sent:
                            if on_eof is not None:
                                raise await on_eof()
                            raise DialError(
                                errno.ECONNABORTED,
                                f"{proxy_name} closed the connection to {what} without a reply",
                            )
                        raise upstream_down(
                            f"{proxy_name} closed the connection during the SOCKS5 greeting"
                        )
                    hs.receive_data(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                if isinstance(exc, DialError):
                    raise
                if request_sent:
                    raise DialError(
                        errno.ECONNABORTED, f"{proxy_name}: connection broke: {exc}"
                    ) from None
                raise upstream_down(f"{proxy_name}: connection broke: {exc}") from None
            except socks.SocksReplyError as exc:
                raise DialError(exc.errno, f"{proxy_name} -> {what}: {exc}") from None
            except socks.SocksAuthError as exc:
                raise upstream_down(f"{proxy_name}: {exc}") from None
            except socks.SocksError as exc:
                raise upstream_down(f"{proxy_name}: SOCKS5 protocol error: {exc}") from None
        if scope.cancelled_caught:
            if not request_sent:
                raise upstream_down(
                    f"{proxy_name} did not complete the SOCKS5 greeting in {timeout:g} s"
                )
            raise DialError(
                errno.ETIMEDOUT, f"{proxy_name}: no answer for {what} in {timeout:g} s"
            )
        ok = True
        assert stream is not None
        return stream, hs
    finally:
        if not ok and stream is not None:
            await trio.aclose_forcefully(stream)


class UdpAssociation:
    """One SOCKS5 UDP ASSOCIATE: a UDP socket of ours connected to the proxy's relay port
    (so only the relay's datagrams reach it), alive as long as the proxy keeps the control
    connection open."""

    def __init__(self, control: trio.abc.Stream, sock: socket.socket, proxy_name: str) -> None:
        self.control = control
        self.sock = sock
        self.proxy_name = proxy_name

    def send(self, host: str, port: int, payload: bytes) -> None:
        """Non-blocking; a full queue or an error drops the datagram, as UDP may."""
        try:
            self.sock.send(socks.encode_udp(host, port, payload))
        except (OSError, socks.SocksError):
            pass

    async def receive(self) -> Tuple[str, int, bytes]:
        """The next datagram from the far side: (its host, its port, payload). Fragments
        (which no common proxy sends) and malformed headers are dropped, as RFC 1928
        allows. Raises OSError when the relay port is gone (ICMP unreachable)."""
        while True:
            await trio.lowlevel.wait_readable(self.sock)
            try:
                data = self.sock.recv(65535)
            except BlockingIOError:
                continue
            try:
                dg = socks.decode_udp(data)
            except socks.SocksError:
                continue
            if dg.frag == 0:
                return dg.host, dg.port, dg.payload

    async def wait_closed(self) -> None:
        """Returns when the proxy ends the association (closes the control connection)."""
        while True:
            try:
                if not await self.control.receive_some(RECV):
                    return
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return

    async def aclose(self) -> None:
        self.sock.close()
        await trio.aclose_forcefully(self.control)


async def socks5_udp_associate(
    connect: Connector,
    *,
    timeout: float,
    proxy_name: str,
    username: str | None = None,
    password: str | None = None,
) -> UdpAssociation:
    """UDP ASSOCIATE with the proxy reached by `connect()` (over TCP). The request names the
    exact address our datagrams will come from, so the proxy relays only ours. A proxy
    without UDP answers "command not supported": DialError EOPNOTSUPP."""
    udp: list = []

    def handshake_for(stream: trio.abc.Stream) -> socks.ClientHandshake:
        tsock = getattr(stream, "socket", None)
        if tsock is None or tsock.family not in (socket.AF_INET, socket.AF_INET6):
            raise DialError(errno.EOPNOTSUPP, f"{proxy_name} is not reached over TCP: no UDP")
        local = tsock.getsockname()
        u = socket.socket(tsock.family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
                          | socket.SOCK_CLOEXEC)
        udp.append(u)
        u.bind((local[0], 0))
        return socks.ClientHandshake(socks.CMD_UDP_ASSOCIATE, local[0], u.getsockname()[1],
                                     username, password)

    try:
        stream, hs = await _handshake(connect, handshake_for, "UDP ASSOCIATE", timeout=timeout,
                                      proxy_name=proxy_name)
    except BaseException:
        for u in udp:
            u.close()
        raise
    sock = udp[0]
    try:
        assert hs.reply is not None
        host = hs.reply.host
        try:
            usable = not ipaddress.ip_address(host).is_unspecified
        except ValueError:
            usable = False  # a name: resolving it here would block the relay
        if not usable:  # "the same address as the control connection" (common practice)
            host = stream.socket.getpeername()[0]  # type: ignore[attr-defined]
        sock.connect((host, hs.reply.port))
    except OSError as exc:
        sock.close()
        await trio.aclose_forcefully(stream)
        raise DialError(errno.ECONNABORTED,
                        f"{proxy_name}: cannot use its UDP relay address: {exc}") from None
    return UdpAssociation(stream, sock, proxy_name)


def _why_connect_failed(e: OSError) -> str:
    """trio's "all attempts to connect failed" hides the errno in its cause: dig it out."""
    cause = e.__cause__
    for x in getattr(cause, "exceptions", None) or ([cause] if cause is not None else []):
        if isinstance(x, OSError) and x.strerror:
            return x.strerror
    return e.strerror or str(e)


async def socks5_greeting_problem(
    connect: Connector, timeout: float, username: str | None = None, password: str | None = None
) -> str | None:
    """None when something SOCKS5-speaking answers (and accepts our credentials) at
    `connect()`; otherwise what went wrong, for the user."""
    hs = socks.ClientHandshake(socks.CMD_CONNECT, "0.0.0.0", 0, username, password)
    with trio.move_on_after(timeout):
        try:
            stream = await connect()
        except OSError as e:
            return _why_connect_failed(e)
        async with stream:
            try:
                await stream.send_all(hs.data_to_send())
                while True:
                    data = await stream.receive_some(RECV)
                    if not data:
                        return "the server closed the connection during the SOCKS5 greeting"
                    hs.receive_data(data)
                    out = hs.data_to_send()
                    if hs.awaiting_reply:
                        return None  # method (and auth) accepted; no request sent
                    if out:
                        await stream.send_all(out)
            except socks.SocksError as e:
                return f"SOCKS5 greeting failed: {e}"
            except (trio.BrokenResourceError, OSError) as e:
                return f"connection lost during the SOCKS5 greeting: {e}"
    return f"no SOCKS5 answer within {timeout:g} s"


async def socks5_greeting_ok(
    connect: Connector, timeout: float, username: str | None = None, password: str | None = None
) -> bool:
    """Does something SOCKS5-speaking answer (and accept our credentials) at `connect()`?"""
    return await socks5_greeting_problem(connect, timeout, username, password) is None


class Socks5Upstream:
    """Any SOCKS5 server: `socks5://[user:pass@]host:port`, or a unix socket path."""

    def __init__(
        self,
        host: str | None = None,
        port: int = 1080,
        *,
        path: str | None = None,
        username: str | None = None,
        password: str | None = None,
        name: str | None = None,
        start_timeout: float = 5.0,
    ):
        if (host is None) == (path is None):
            raise ValueError("give either host/port or a unix socket path")
        self.host, self.port, self.path = host, port, path
        self.username, self.password = username, password
        self.name = name or (f"socks5://{host}:{port}" if path is None else f"socks5:{path}")
        self.start_timeout = start_timeout
        self._healthy = True
        # UDP ASSOCIATE needs a proxy reached over TCP; False once it said "not supported"
        self.carries_udp = path is None
        # its flows are plain TCP sockets (the preload front may hand them to the program)
        self.dials_plain_tcp = path is None

    @classmethod
    def from_url(cls, url: Socks5UpstreamUrl, **kw) -> Socks5Upstream:
        return cls(
            url.host, url.port, username=url.user, password=url.password, name=str(url), **kw
        )

    @property
    def healthy(self) -> bool:
        return self._healthy

    async def _connect(self) -> trio.abc.Stream:
        if self.path is not None:
            return await open_unix(self.path)
        assert self.host is not None
        return await open_tcp(self.host, self.port)

    async def start(self) -> None:
        why = await socks5_greeting_problem(
            self._connect, self.start_timeout, self.username, self.password
        )
        if why is not None:
            self._healthy = False
            raise UpstreamError(f"{self.name}: {why}")
        self._healthy = True

    async def dial_tcp(self, host: str, port: int, *, timeout: float) -> trio.abc.Stream:
        try:
            stream = await socks5_dial(
                self._connect,
                host,
                port,
                timeout=timeout,
                proxy_name=self.name,
                username=self.username,
                password=self.password,
            )
        except DialError as exc:
            if exc.reason == "upstream-down":
                self._healthy = False
            raise
        self._healthy = True
        return stream

    async def udp_associate(self, host: str, port: int, *, timeout: float) -> UdpAssociation:
        """A UDP association (for datagrams to host:port; any destination works on it). A
        proxy that answers "command not supported" is not asked again."""
        if not self.carries_udp:
            raise DialError(errno.EOPNOTSUPP, f"{self.name} does not relay UDP")
        try:
            assoc = await socks5_udp_associate(
                self._connect, timeout=timeout, proxy_name=self.name,
                username=self.username, password=self.password)
        except DialError as exc:
            if exc.errno == errno.EOPNOTSUPP:
                self.carries_udp = False
                log.info("%s does not relay UDP: UDP beyond the direct networks gets "
                         "ICMP port unreachable", self.name)
            elif exc.reason == "upstream-down":
                self._healthy = False
            raise
        self._healthy = True
        return assoc

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
