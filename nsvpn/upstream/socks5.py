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
import logging
from typing import Awaitable, Callable

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
                                raise await on_eof(host, port)
                            raise DialError(
                                errno.ECONNABORTED,
                                f"{proxy_name} closed the connection to {host}:{port} "
                                "without a reply",
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
                raise DialError(exc.errno, f"{proxy_name} -> {host}:{port}: {exc}") from None
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
                errno.ETIMEDOUT, f"{proxy_name}: no answer for {host}:{port} in {timeout:g} s"
            )
        ok = True
        assert stream is not None
        return PrefixedStream(stream, hs.leftover) if hs.leftover else stream
    finally:
        if not ok and stream is not None:
            await trio.aclose_forcefully(stream)


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

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
