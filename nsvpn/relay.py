"""Trio glue for namespace mode: TUN fd <-> userspace stack <-> upstream streams.

Everything protocol-shaped lives in the sans-IO cores (netstack, dns, routing); this module only
moves bytes and wakes tasks:

* one reader task drains the TUN in batches and feeds the stack; after every stack call the
  relay flushes the packets the stack produced (so ACKs are coalesced per batch) and dispatches
  its events;
* one timer task sleeps until the stack's next deadline (the deadline is tightened whenever a
  stack call produces an earlier one);
* one task per TCP flow while it dials the upstream (the app's handshake completes only when
  the upstream said yes: refused -> RST, unreachable -> ICMP); then the socket pump
  (sockpump.py) moves its bytes from callbacks of one epoll set. Backpressure is the TCP
  window: a slow upstream stops `tcp_recv`, the receive buffer fills, the window closes;
* UDP: DNS at the DNS address, host sockets for direct networks, ICMP port unreachable for the
  rest (ssh -D carries no UDP, and a quick error beats an app waiting for a timeout).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import math
import os
from typing import Awaitable, Callable, Dict, Optional, Tuple

import trio

from . import routing, sockpump
from .memtrim import TrimWhenDrained
from .netstack import stack as nstack
from .stacktimer import StackTimer
from .upstream.base import DialError

log = logging.getLogger("nsvpn.relay")

READ_BATCH = 16  # packets per wake-up: measured faster than 64 (ACKs go out sooner)
DIAL_TIMEOUT = 20.0
UDP_IDLE = 60.0
UDP_SETUP_TIMEOUT = 10.0  # s for a SOCKS5 UDP association (connect, greeting, request)
# Host sockets for UDP to direct networks (one per app 4-tuple, held UDP_IDLE after the last
# datagram): a job sending from a new port each time (one-shot queries to a site server)
# would hold thousands of fds; past this many the least recently used one goes.
UDP_FLOWS_MAX = 1024
# Of those, the ones carried by SOCKS5 UDP associations: each holds a connection to the
# proxy (and, with Dante, a share of a server process), so they are fewer.
UDP_ASSOC_MAX = 256

Dialer = Callable[[str, int, float], "trio.abc.Stream"]


class _Flow:
    """Trio-side companion of a stack TcpFlow: wake-ups for the two pumps."""

    __slots__ = ("flow", "readable", "writable", "connected", "done", "reset", "eof", "link")

    def __init__(self, flow: object) -> None:
        self.flow = flow
        self.link: Optional[sockpump.Link] = None  # set: the socket pump moves its bytes
        self.readable = trio.Event()
        self.writable = trio.Event()
        self.connected = trio.Event()
        self.done = trio.Event()  # reset / timeout / closed from the app side
        self.reset = False
        self.eof = False  # the app sent FIN (all its data is readable before it)

    def wake(self, kind: str) -> None:
        if kind == "data":
            self.readable.set()
        elif kind == "eof":
            self.eof = True
            self.readable.set()
        elif kind == "send_space":
            self.writable.set()
        elif kind == "connected":
            self.connected.set()
        elif kind in ("reset", "timeout", "closed"):
            if kind != "closed":
                self.reset = True
            self.done.set()
            self.readable.set()
            self.writable.set()
            self.connected.set()


class Relay:
    def __init__(
        self,
        tun_fd: int,
        stack: nstack.Stack,
        router: routing.Router,
        *,
        dial_upstream: Callable[..., object],
        dial_direct: Callable[..., object],
        dns_service: Optional[object] = None,
        read_tun: bool = True,
        udp_upstream: Optional[object] = None,
    ) -> None:
        self.fd = tun_fd
        # False: someone else reads the TUN and hands us our packets with feed() (the vpn
        # bridge, for the networks it keeps out of the tunnel); we still write to it.
        self.read_tun = read_tun
        self.stack = stack
        self.router = router
        self.dial_upstream = dial_upstream
        self.dial_direct = dial_direct
        self.dns = dns_service
        # has carries_udp and udp_associate() (a SOCKS5 proxy with UDP ASSOCIATE), or None
        self.udp_upstream = udp_upstream
        self.flows: Dict[int, _Flow] = {}
        self.udp: Dict[Tuple, _UdpFlowBase] = {}
        self._timer = StackTimer(stack, lambda: self._after_stack())
        self.pump = sockpump.SockPump(stack, self._after_stack, self._link_closed)
        self.trim = TrimWhenDrained(lambda: len(self.flows))
        self._nursery: Optional[trio.Nursery] = None
        self.write_errors = 0
        self._warned: Dict[int, float] = {}  # errno -> when it was last logged
        self.pcap: Optional[object] = None  # a pcap.PcapWriter; set before run()
        self._pcap_in: Optional[Callable[[bytes], None]] = None
        self._pcap_out: Optional[Callable[[tuple], None]] = None

    def _warn_local(self, what: str, e: OSError) -> None:
        """Local failures (EMFILE...) come in storms: one line per errno per 10 s."""
        now = trio.current_time()
        if now - self._warned.get(e.errno or 0, -math.inf) >= 10.0:
            self._warned[e.errno or 0] = now
            log.warning("%s: %s (further ones not shown for 10 s)", what, e)

    # -- plumbing -------------------------------------------------------------------------
    def _after_stack(self) -> None:
        """Flush packets, dispatch events, tighten the timer: after *every* stack call."""
        st = self.stack
        writev = os.writev
        fd = self.fd
        rec = self._pcap_out  # None unless --pcap: one test per packet, ~30 ns
        # Events first: the program's bytes go on to the upstream before the stack's ACK for
        # them is written (the request's latency does not include that write). Events may
        # make the socket pump touch the stack again (data, window updates): go round until
        # the stack has nothing more to say; output is always flushed after the last round.
        for _ in range(8):
            events = st.pop_events()
            for ev in events:
                self._dispatch(ev)
            for iov in st.output_iovecs():  # writev: a 64 KiB payload is not joined to its headers
                if rec is not None:
                    rec(iov)
                try:
                    writev(fd, iov)
                except OSError:  # queue full / namespace gone: TCP retransmits, UDP is lossy
                    self.write_errors += 1
            if not events:
                break
        self._timer.tighten()

    def _dispatch(self, ev: object) -> None:
        if isinstance(ev, nstack.TcpFlowEvent):
            f = self.flows.get(id(ev.flow))
            if f is not None:
                if f.link is not None:
                    self.pump.stack_event(f.link, ev.kind)
                else:
                    f.wake(ev.kind)
        elif isinstance(ev, nstack.NewTcpFlow):
            f = _Flow(ev.flow)
            self.flows[id(ev.flow)] = f
            assert self._nursery is not None
            self._nursery.start_soon(self._tcp_flow, f)
        elif isinstance(ev, nstack.UdpDatagram):
            self._udp_in(ev)

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        if self.pcap is not None:
            self._pcap_in, self._pcap_out = self.pcap.packet, self.pcap.iovec
        try:
            async with trio.open_nursery() as n:
                self._nursery = n
                n.start_soon(self._timer.run)
                n.start_soon(self.pump.run)
                n.start_soon(self.trim.run)
                if self.read_tun:
                    n.start_soon(self._tun_reader)
                task_status.started()
        finally:
            self.pump.close()

    def feed(self, pkt, now: float) -> None:
        """One packet read from the TUN by someone else; call flush() after a batch."""
        self.stack.input_packet(pkt, now)

    def flush(self) -> None:
        self._after_stack()

    async def _tun_reader(self) -> None:
        fd = self.fd
        read = os.read
        st = self.stack
        rec = self._pcap_in
        bufsize = 65536 + 64  # a 64 KiB TSO segment plus the virtio-net header
        while True:
            await trio.lowlevel.wait_readable(fd)
            now = trio.current_time()
            for _ in range(READ_BATCH):
                try:
                    pkt = read(fd, bufsize)
                except BlockingIOError:
                    break
                except OSError as e:
                    if e.errno == errno.EBADFD or e.errno == errno.EIO:
                        return  # the namespace (and its TUN) is gone
                    raise
                if rec is not None:
                    rec(pkt)
                st.input_packet(pkt, now)
            self._after_stack()
            await trio.lowlevel.checkpoint_if_cancelled()

    def stats(self) -> dict:
        """Relay-side numbers for the SIGUSR1 dump."""
        d = {"tcp_flows": len(self.flows), "udp_flows": len(self.udp),
             "tun_write_errors": self.write_errors}
        if self.pcap is not None:
            d["pcap"] = self.pcap.stats()
        return d

    # -- TCP ------------------------------------------------------------------------------
    def _link_closed(self, f: _Flow) -> None:
        f.link = None  # f and its link point at each other: free them now, not at a gc pass
        self.flows.pop(id(f.flow), None)
        self.trim.flow_ended()

    async def _dial(self, decision: routing.Decision) -> trio.abc.Stream:
        if decision.action == routing.DIRECT:
            return await self.dial_direct(decision.host, decision.port, DIAL_TIMEOUT)
        return await self.dial_upstream(decision.host, decision.port, DIAL_TIMEOUT)

    async def _tcp_flow(self, f: _Flow) -> None:
        flow = f.flow
        st = self.stack
        try:
            ip, port = flow.dst[0], flow.dst[1]
            d = self.router.decide(ip, port, "tcp")
            if d.action == routing.REFUSE:
                st.refuse(flow, trio.current_time())
                self._after_stack()
                return
            if d.action == routing.UNREACHABLE:
                st.unreachable(flow, trio.current_time(), "host")
                self._after_stack()
                return
            if d.action == routing.DNS:
                if self.dns is None:
                    st.refuse(flow, trio.current_time())
                    self._after_stack()
                    return
                st.accept(flow, trio.current_time())
                self._after_stack()
                await self.dns.serve_tcp_flow(self, f)
                return
            try:
                stream = await self._dial(d)
            except OSError as e:  # DialError, or a local failure such as EMFILE
                if isinstance(e, DialError):
                    log.debug("dial %s:%s failed: %s", d.host, d.port, e)
                else:
                    self._warn_local(f"cannot dial {d.host}:{d.port}", e)
                now = trio.current_time()
                if e.errno == errno.ECONNREFUSED:
                    st.refuse(flow, now)
                elif e.errno == errno.ENETUNREACH:
                    st.unreachable(flow, now, "net")
                elif e.errno == errno.EHOSTUNREACH:
                    st.unreachable(flow, now, "host")
                else:  # timeout, upstream down: fail fast rather than leave the SYN hanging
                    st.refuse(flow, now)
                self._after_stack()
                return
            parts = sockpump.detach_socket(stream)
            if parts is None:  # every dialer here hands back a socket (ssh, SOCKS5, direct)
                log.error("dial %s:%s returned %s, not a socket", d.host, d.port,
                          type(stream).__name__)
                await trio.aclose_forcefully(stream)
                st.refuse(flow, trio.current_time())
                self._after_stack()
                return
            # the pump carries it from here: no task, no nursery
            f.link = self.pump.attach(f, flow, *parts)
            st.accept(flow, trio.current_time())
            self._after_stack()
            if f.done.is_set() and f.link is not None:
                self.pump.drop(f.link)  # the app gave up while we dialled: no event will come
        finally:
            if f.link is None and self.flows.pop(id(flow), None) is not None:
                self.trim.flow_ended()

    # -- UDP ------------------------------------------------------------------------------
    def _udp_in(self, ev: object) -> None:
        src, dst = ev.src, ev.dst
        d = self.router.decide(dst[0], dst[1], "udp")
        if d.action == routing.DNS and self.dns is not None:
            assert self._nursery is not None
            self._nursery.start_soon(self.dns.serve_udp, self, src, dst, bytes(ev.payload))
            return
        up = self.udp_upstream
        if d.action == routing.DIRECT or (
                d.action == routing.UPSTREAM and up is not None and up.carries_udp):
            key = (src, dst)
            u = self.udp.get(key)
            if u is None:
                if len(self.udp) >= UDP_FLOWS_MAX:
                    min(self.udp.values(), key=lambda f: f.last).evict()
                try:
                    if d.action == routing.DIRECT:
                        u = _UdpFlow(self, src, dst, (d.host, d.port))
                    else:
                        if len(self.udp) >= UDP_ASSOC_MAX:
                            assocs = [f for f in self.udp.values()
                                      if isinstance(f, _UdpUpstreamFlow)]
                            if len(assocs) >= UDP_ASSOC_MAX:
                                min(assocs, key=lambda f: f.last).evict()
                        u = _UdpUpstreamFlow(self, src, dst, (d.host, d.port))
                except OSError as e:  # EMFILE: drop this datagram, keep the session
                    self._warn_local(f"no host socket for UDP to {d.host}:{d.port}", e)
                    return
                self.udp[key] = u
                assert self._nursery is not None
                self._nursery.start_soon(u.run)
            u.send(ev)
            return
        # The upstream carries no UDP (ssh -D, a proxy without UDP ASSOCIATE): tell the app
        # at once rather than let it wait for a timeout.
        self.stack.udp_unreachable(ev)
        self._after_stack()

    def send_udp(self, src, dst, payload: bytes) -> None:
        self.stack.send_udp(src, dst, payload)
        self._after_stack()


class _UdpFlowBase:
    """An app UDP 4-tuple with a task of its own, forgotten UDP_IDLE after its last datagram
    (either way) or when evicted to make room."""

    def __init__(self, relay: Relay, src, dst, target: Tuple[str, int]) -> None:
        self.relay = relay
        self.src = src
        self.dst = dst
        self.target = target  # where datagrams go: an address, or a name (upstream only)
        self.last = trio.current_time()
        self._scope = trio.CancelScope()

    def evict(self) -> None:
        """Make room: forget it now, its task ends at its next checkpoint."""
        self._forget()
        self._scope.cancel()

    def _forget(self) -> None:
        if self.relay.udp.get((self.src, self.dst)) is self:  # not a newer flow's
            del self.relay.udp[(self.src, self.dst)]

    async def _replies(self, receive: Callable[[], Awaitable[Tuple[Tuple[str, int], bytes]]]
                       ) -> None:
        """Hand what receive() returns (where from, payload) to the app until idle."""
        while True:
            with trio.move_on_at(self.last + UDP_IDLE):
                source, data = await receive()
                self.last = trio.current_time()
                self.relay.send_udp(source, self.src, data)
                continue
            if trio.current_time() >= self.last + UDP_IDLE:
                return


class _UdpFlow(_UdpFlowBase):
    """Direct networks: a host socket per app 4-tuple."""

    def __init__(self, relay: Relay, src, dst, target: Tuple[str, int]) -> None:
        super().__init__(relay, src, dst, target)
        self.sock = trio.socket.socket(
            trio.socket.AF_INET6 if ":" in target[0] else trio.socket.AF_INET,
            trio.socket.SOCK_DGRAM,
        )

    def send(self, ev) -> None:
        self.last = trio.current_time()
        try:
            self.sock._sock.sendto(ev.payload, self.target)  # non-blocking; UDP may drop
        except OSError:
            pass

    async def _receive(self) -> Tuple[Tuple[str, int], bytes]:
        return self.dst, await self.sock.recv(65535)

    async def run(self) -> None:
        try:
            with self._scope:
                await self._replies(self._receive)
        except OSError:
            return
        finally:
            self.sock.close()
            self._forget()


class _UdpUpstreamFlow(_UdpFlowBase):
    """One app UDP 4-tuple carried through the upstream by its own SOCKS5 UDP association.
    One association per 4-tuple keeps replies unambiguous: whatever comes back is the
    answer to this flow, also when the far side was named (a fake IP) and the proxy
    reports the address it resolved."""

    PENDING_MAX = 16  # datagrams kept while the association is set up

    def __init__(self, relay: Relay, src, dst, target: Tuple[str, int]) -> None:
        super().__init__(relay, src, dst, target)
        self._assoc: Optional[object] = None
        self._pending: list = []

    def send(self, ev) -> None:
        self.last = trio.current_time()
        if self._assoc is not None:
            self._assoc.send(self.target[0], self.target[1], ev.payload)
        elif len(self._pending) < self.PENDING_MAX:
            self._pending.append(ev)

    def _reply_source(self, host: str, port: int) -> Tuple[str, int]:
        """Where a reply seems to come from, for the app: the proxy's word when we asked for
        an address of the flow's family; the flow's own address when we asked for a name
        (the app only knows the fake IP)."""
        if self.target[0] == self.dst[0] and (":" in host) == (":" in self.dst[0]):
            try:
                return str(ipaddress.ip_address(host)), port
            except ValueError:
                pass
        return self.dst[0], port

    async def run(self) -> None:
        try:
            with self._scope:
                assoc = await self._associate()
                if assoc is None:
                    return
                try:
                    await self._serve(assoc)
                finally:
                    self._assoc = None
                    with trio.CancelScope(shield=True):
                        await assoc.aclose()
        except OSError:  # the proxy's relay port is gone (ICMP): the next datagram starts over
            return
        finally:
            self._forget()

    async def _associate(self) -> Optional[object]:
        """The association, with what the app sent meanwhile passed on; None (the app heard
        ICMP port unreachable) when the upstream gives none."""
        relay = self.relay
        try:
            assoc = await relay.udp_upstream.udp_associate(
                self.target[0], self.target[1], timeout=UDP_SETUP_TIMEOUT)
        except OSError as e:
            log.debug("no UDP association for %s:%s: %s", *self.target, e)
            for ev in self._pending:
                relay.stack.udp_unreachable(ev)
            self._pending.clear()
            relay._after_stack()
            return None
        self._assoc = assoc
        for ev in self._pending:
            assoc.send(self.target[0], self.target[1], ev.payload)
        self._pending.clear()
        return assoc

    async def _serve(self, assoc) -> None:
        async def receive() -> Tuple[Tuple[str, int], bytes]:
            host, port, data = await assoc.receive()
            return self._reply_source(host, port), data

        async with trio.open_nursery() as n:
            n.start_soon(self._until_closed, assoc, n.cancel_scope)
            await self._replies(receive)
            n.cancel_scope.cancel()

    @staticmethod
    async def _until_closed(assoc, scope: trio.CancelScope) -> None:
        await assoc.wait_closed()  # the proxy ended the association
        scope.cancel()
