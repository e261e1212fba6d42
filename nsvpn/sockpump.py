"""Relay stack TCP flows to plain sockets from one epoll set: no trio task per flow.

A flow whose upstream is an ordinary socket (SOCKS5 over TCP or a unix socket, ssh -D, a direct
host connection) needs no coroutine once it is dialled: every step is "a socket is readable or
writable" or "the stack has data / room / a FIN for this flow", and each step is a few
non-blocking calls. Doing them from callbacks of one epoll set instead of two pump tasks per
flow cuts the trio scheduling work per connection (task spawns, events, nursery) by more than
half, which is what short requests pay for.

Level-triggered epoll; a socket is registered only while it wants something (readable: the
stack has send room and the upstream has not ended; writable: bytes are waiting), so a hung-up
socket that we are not reading does not spin the loop.
"""

from __future__ import annotations

import select
import socket
from typing import Callable, Dict, Optional, Tuple

import trio

CHUNK = 256 * 1024
_IN, _OUT = select.EPOLLIN, select.EPOLLOUT

# (the socket, "we already sent our EOF") -> does the EOF just read mean the upstream broke?
EofCheck = Optional[Callable[[socket.socket, bool], bool]]


def detach_socket(stream: object) -> Optional[Tuple[socket.socket, bytes, EofCheck]]:
    """(socket, bytes already received, "an EOF now means broken" check) when `stream` is a
    plain socket underneath, else None. The stream must not be used afterwards."""
    raw = getattr(stream, "raw_parts", None)
    if raw is not None:
        return raw()
    if isinstance(stream, trio.SocketStream):
        tsock = stream.socket
        trio.lowlevel.notify_closing(tsock)  # trio forgets the fd; it may keep a dead entry
        family, type_, proto = tsock.family, tsock.type, tsock.proto
        fd = tsock.detach()
        # explicit family/type/proto: else the constructor asks the kernel (three syscalls)
        return socket.socket(family, type_, proto, fileno=fd), b"", None
    return None


def unwrap(inner: object, prefix: bytes = b"", eof_breaks: EofCheck = None
           ) -> Optional[Tuple[socket.socket, bytes, EofCheck]]:
    """detach_socket() for a wrapper stream around `inner`: its own already-received bytes go
    first, its own broken-EOF rule (if any) replaces the inner one."""
    parts = detach_socket(inner)
    if parts is None:
        return None
    sock, more, check = parts
    return sock, prefix + more, eof_breaks or check


class Link:
    """One flow's state between the stack and its socket."""

    __slots__ = ("owner", "flow", "conn", "sock", "fd", "eof_breaks", "prefix", "pending",
                 "connected", "app_eof", "wr_shut", "up_eof", "mask", "closed")

    def __init__(self, owner: object, flow, sock: socket.socket, prefix: bytes,
                 eof_breaks: EofCheck) -> None:
        self.owner = owner  # the relay's per-flow record, handed back in on_close
        self.flow = flow
        self.conn = flow.conn
        self.sock = sock
        self.fd = sock.fileno()
        self.eof_breaks = eof_breaks
        self.prefix = prefix
        self.pending: Optional[memoryview] = None  # app bytes the socket has not taken yet
        self.connected = False
        self.app_eof = False
        self.wr_shut = False
        self.up_eof = False
        self.mask = 0
        self.closed = False


class SockPump:
    def __init__(self, stack, after_stack: Callable[[], None],
                 on_close: Callable[[object], None]) -> None:
        self.stack = stack
        self.after_stack = after_stack  # flush the stack's output and dispatch its events
        self.on_close = on_close
        self.ep = select.epoll()
        self.links: Dict[int, Link] = {}

    def close(self) -> None:
        for link in list(self.links.values()):
            self._close(link)
        self.ep.close()

    # -- wiring ---------------------------------------------------------------------------
    def attach(self, owner: object, flow, sock: socket.socket, prefix: bytes = b"",
               eof_breaks: EofCheck = None) -> Link:
        sock.setblocking(False)
        link = Link(owner, flow, sock, prefix, eof_breaks)
        self.links[link.fd] = link
        return link

    def _want(self, link: Link) -> None:
        if link.closed:
            return
        mask = 0
        if link.connected and not link.up_eof and link.conn.send_space() > 0:
            mask |= _IN
        if link.pending is not None:
            mask |= _OUT
        if mask == link.mask:
            return
        if not mask:
            self.ep.unregister(link.fd)
        elif not link.mask:
            self.ep.register(link.fd, mask)
        else:
            self.ep.modify(link.fd, mask)
        link.mask = mask

    def drop(self, link: Link) -> None:
        """Forget a link whose flow is already gone (no event will come for it)."""
        self._close(link)

    def _close(self, link: Link) -> None:
        if link.closed:
            return
        link.closed = True
        if link.mask:
            self.ep.unregister(link.fd)
            link.mask = 0
        self.links.pop(link.fd, None)
        link.sock.close()
        owner, link.owner = link.owner, None
        self.on_close(owner)

    def _abort(self, link: Link) -> None:
        """The upstream broke: the app gets a reset, never a clean end."""
        self.stack.tcp_abort(link.flow, trio.current_time())
        self._close(link)

    # -- the stack said something about a flow ---------------------------------------------
    def stack_event(self, link: Link, kind: str) -> None:
        if link.closed:
            return
        if kind == "data":
            self._to_upstream(link)
        elif kind == "eof":
            link.app_eof = True
            self._to_upstream(link)
        elif kind == "send_space":
            self._want(link)
        elif kind == "connected":
            link.connected = True
            if link.prefix:
                self.stack.tcp_send(link.flow, link.prefix, trio.current_time())
                link.prefix = b""
            self._want(link)
        elif kind in ("reset", "timeout", "closed"):
            self._close(link)

    def _to_upstream(self, link: Link) -> None:
        """Move the app's bytes into the socket until it is full, then wait for EPOLLOUT;
        what stays in the stack's receive buffer closes the app's window (backpressure)."""
        st, flow, sock = self.stack, link.flow, link.sock
        while True:
            if link.pending is not None:
                try:
                    n = sock.send(link.pending)
                except BlockingIOError:
                    n = 0
                except OSError:  # the upstream socket broke
                    self._abort(link)
                    return
                if n < len(link.pending):
                    link.pending = link.pending[n:]
                    break
                link.pending = None
            if not link.conn.recv_available():
                break
            data = st.tcp_recv(flow, CHUNK)
            if not data:
                break
            link.pending = memoryview(data)
        if link.pending is None and link.app_eof and not link.wr_shut \
                and not link.conn.recv_available():
            link.wr_shut = True
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        self._want(link)

    def _from_upstream(self, link: Link) -> None:
        space = link.conn.send_space()
        if space <= 0:
            self._want(link)  # stop reading until the stack says send_space
            return
        try:
            data = link.sock.recv(min(space, CHUNK))
        except BlockingIOError:
            return
        except OSError:  # the upstream socket broke
            self._abort(link)
            return
        now = trio.current_time()
        if data:
            self.stack.tcp_send(link.flow, data, now)
            if len(data) == space:
                self._want(link)
            return
        if link.eof_breaks is not None and link.eof_breaks(link.sock, link.wr_shut):
            self._abort(link)
            return
        link.up_eof = True
        self.stack.tcp_shutdown(link.flow, now)
        self._want(link)

    # -- the loop -------------------------------------------------------------------------
    async def run(self) -> None:
        ep = self.ep
        links = self.links
        while True:
            await trio.lowlevel.wait_readable(ep.fileno())
            try:
                ready = ep.poll(0, 256)
            except InterruptedError:
                continue
            for fd, ev in ready:
                link = links.get(fd)
                if link is None:
                    continue
                if ev & _OUT or (ev & (select.EPOLLERR | select.EPOLLHUP) and not ev & _IN):
                    self._to_upstream(link)
                if ev & (_IN | select.EPOLLERR | select.EPOLLHUP) and not link.closed \
                        and link.mask & _IN:
                    self._from_upstream(link)
            self.after_stack()
