"""What every upstream dialer offers, and the errors it raises.

A dial either returns a connected trio stream or raises DialError whose `errno` is what the
program in the namespace (or behind the preload shim) should see from connect():

  ECONNREFUSED   the far side answered "refused" (final: failover does not retry it)
  ENETUNREACH    the far side says the network is unreachable (final)
  EHOSTUNREACH   the far side says the host is unreachable (final)
  ETIMEDOUT      no answer in time (from the far side or from us)
  ECONNABORTED   the upstream broke the handshake, or answered with a general failure
  ENETDOWN       reason "upstream-down": our helper (ssh, the proxy) is not usable right now;
                 the pool fails over on this reason only

`reason` is a short machine word (refused, netunreach, hostunreach, timeout, upstream-down,
failed), `message` a human sentence.
"""

from __future__ import annotations

import contextvars
import errno as _errno
import ipaddress
import re
import socket
import time
from typing import Protocol

import trio

REASONS = {
    _errno.ECONNREFUSED: "refused",
    _errno.ENETUNREACH: "netunreach",
    _errno.EHOSTUNREACH: "hostunreach",
    _errno.ETIMEDOUT: "timeout",
}
# Answers from the far side about the destination itself: another upstream would get the same.
FINAL_REASONS = frozenset({"refused", "netunreach", "hostunreach"})


class QuietRepeats:
    """Whether to log a helper's restart failure. Each new reason is said; one that keeps
    coming back (a login node down for hours, an expired Kerberos ticket: a restart every 30 s
    for days) is said `loud` times, then once per `every` seconds with the count of those left
    out, so a pilot's log stays readable. Numbers (ports, pids) do not make a reason new."""

    def __init__(self, loud: int = 3, every: float = 600.0, clock=None) -> None:
        self.loud, self.every = loud, every
        self._clock = clock or time.monotonic
        self._key: str | None = None
        self._count = 0
        self._hidden = 0
        self._said_at = 0.0

    def check(self, why: str) -> tuple[bool, int]:
        """(say it?, how many like it were left out since it was last said)."""
        key = re.sub(r"\d+", "N", why)
        now = self._clock()
        if key != self._key:
            self._key, self._count, self._hidden = key, 0, 0
        self._count += 1
        if self._count <= self.loud or now - self._said_at >= self.every:
            hidden, self._hidden, self._said_at = self._hidden, 0, now
            return True, hidden
        self._hidden += 1
        return False, 0

    def suffix(self, why: str) -> str | None:
        """check() for a log line: None (leave it out), else what goes after `why`."""
        say, hidden = self.check(why)
        if not say:
            return None
        return f" ({hidden} more like it not shown)" if hidden else ""

    def reset(self) -> None:
        """The helper works again: the next failure is news."""
        self._key, self._count, self._hidden = None, 0, 0


class UpstreamError(Exception):
    """An upstream could not be brought up (start()); the message is meant for the user."""


class DialError(OSError):
    """A dial failed. An OSError subclass so callers may treat it like a failed connect()."""

    def __init__(self, err: int, message: str = "", reason: str | None = None):
        self.reason = reason or REASONS.get(err, "failed")
        super().__init__(err, message or _errno.errorcode.get(err, str(err)))
        self.message = message

    @property
    def final(self) -> bool:
        """True when the far side answered: trying another upstream is pointless."""
        return self.reason in FINAL_REASONS

    def __str__(self) -> str:
        return f"{self.message or self.strerror} ({self.reason})"


def upstream_down(message: str) -> DialError:
    return DialError(_errno.ENETDOWN, message, "upstream-down")


class Upstream(Protocol):
    """Interface of ssh / socks5 / direct dialers (structural: no inheritance needed)."""

    name: str

    @property
    def healthy(self) -> bool: ...

    async def start(self) -> None:
        """Bring helpers up (bounded); raise UpstreamError with a clear message."""

    async def dial_tcp(self, host: str, port: int, *, timeout: float) -> trio.abc.Stream:
        """Connect to host:port (an IP literal, or a name the far side resolves)."""
        ...

    async def aclose(self) -> None:
        """Stop helpers; idempotent."""


async def read_lines(pipe, on_line) -> None:
    """Feed each line a helper process writes on `pipe` (its stdout/stderr file) to `on_line`,
    until EOF. The file object is closed; trio reads a dup of its fd without blocking."""
    import os

    fd = os.dup(pipe.fileno())
    pipe.close()
    buf = b""
    async with trio.lowlevel.FdStream(fd) as stream:
        while True:
            try:
                data = await stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                data = b""
            if not data:
                if buf.strip():
                    on_line(buf.decode(errors="replace"))
                return
            buf += data
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                on_line(raw.decode(errors="replace").rstrip("\r"))


async def wait_exit(popen) -> int:
    """Await a helper process's exit without a thread (a pidfd; polling on kernels < 5.3)
    and reap it; its exit status."""
    import os

    try:
        pidfd = os.pidfd_open(popen.pid)
    except (AttributeError, OSError):
        pidfd = -1
    try:
        if pidfd >= 0:
            await trio.lowlevel.wait_readable(pidfd)
        else:  # pragma: no cover - kernels before 5.3
            while popen.poll() is None:
                await trio.sleep(0.1)
    finally:
        if pidfd >= 0:
            os.close(pidfd)
    return popen.wait()


# The socket family the caller would like a flow's TCP socket to have. The preload front
# sets AF_INET6 for a program whose own socket is AF_INET6, so that the socket dialled for it
# (to a SOCKS5 proxy or a direct host) can become the program's: an IPv4 address is then
# dialled from an AF_INET6 socket, as a v4-mapped address. Read where flows' TCP sockets are
# made (tcp_socket), so the upstreams' dial signatures stay as they are.
WANT_FAMILY: contextvars.ContextVar[int] = contextvars.ContextVar(
    "nsvpn_want_family", default=socket.AF_UNSPEC)


def tcp_socket(family: int, addr: tuple) -> tuple:
    """(a trio TCP socket of `family`, the address to connect it to), honouring WANT_FAMILY
    for IPv4 destinations; an AF_INET socket when AF_INET6 cannot be had (IPv6 disabled)."""
    if family == socket.AF_INET and WANT_FAMILY.get() == socket.AF_INET6:
        try:
            sock = trio.socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        except OSError:
            pass
        else:
            try:  # net.ipv6.bindv6only=1 would make it refuse v4-mapped addresses
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            except OSError:
                sock.close()
            else:
                return sock, ("::ffff:" + addr[0], addr[1], 0, 0)
    return trio.socket.socket(family, socket.SOCK_STREAM), addr


async def open_tcp(host: str, port: int) -> trio.SocketStream:
    """trio.open_tcp_stream, minus the happy-eyeballs nursery and resolver call when `host` is
    an IP literal (every upstream proxy address we dial per flow is): cheaper per connection."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return await trio.open_tcp_stream(host, port)
    sock, addr = tcp_socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET,
                            (host, port))
    try:
        await sock.connect(addr)
    except BaseException:
        sock.close()
        raise
    keepalive(sock)
    return trio.SocketStream(sock)


def keepalive(sock) -> None:
    """SO_KEEPALIVE on a TCP socket we dial for a flow. Our stack answers the program's own
    keepalive probes locally, so they never reach the far side: without this a peer that
    vanished behind an idle connection (a long-lived HTCondor or XRootD control connection)
    would never be noticed, and NAT state on the way would not be kept fresh. The kernel's
    timings apply (tcp_keepalive_time, 2 h by default)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    except OSError:
        pass


async def open_unix(path: str) -> trio.SocketStream:
    """trio.open_unix_socket, except for a full listen backlog. A unix socket answers EAGAIN
    then (ssh -D's backlog is 128: a burst of a few hundred connects fills it), and nothing
    is in progress: trio takes it for an ongoing connect and hands back a socket that was
    never connected. Here the connect is simply tried again until the listener has room; the
    caller's dial timeout bounds the wait."""
    delay = 0.001
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                             | socket.SOCK_CLOEXEC)
        try:
            sock.connect(path)
        except BlockingIOError:
            sock.close()
            await trio.sleep(delay)
            delay = min(delay * 2, 0.05)
            continue
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(trio.socket.from_stdlib_socket(sock))
