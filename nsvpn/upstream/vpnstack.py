"""Dial TCP through openconnect's VPNFD with nsvpn's userspace stack (tunsocks/ocproxy class).

No namespace, no TUN: our sans-IO stack (netstack/) runs in *active-open* mode on the VPN
address itself and exchanges raw IP packets with openconnect over VPNFD (one datagram = one
packet). `VpnStackUpstream` is an ordinary upstream (start / dial_tcp / aclose / healthy), so
the SOCKS front (front.py) and the preload mode use it like ssh or socks5 upstreams.

* WAN-facing TCP: window scaling, SACK, timestamps, receive/send buffers of several MiB
  (RCV_BUF/SND_BUF). ocproxy's lwIP keeps a fixed 64 KiB window, which caps a flow at
  64 KiB per round trip (3 MB/s at 20 ms).
* Names are resolved with the VPN's own DNS servers (INTERNAL_IP4_DNS) over the tunnel: UDP
  through the stack, dnspython to build and parse, a bounded timeout, a TTL-bounded cache, the
  pushed default domain(s) as search list for single-label names.
* Errors as DialError: RST -> ECONNREFUSED, ICMP net/host unreachable -> ENETUNREACH /
  EHOSTUNREACH (port/protocol unreachable -> ECONNREFUSED), no answer -> ETIMEDOUT, no tunnel
  -> ENETDOWN (reason upstream-down).
* Destinations the VPN does not carry (split-exclude networks, or outside a split-include
  list) are dialled with host sockets, as the host's own routing would.
* Lifecycle: each openconnect session (VPNFD generation) gets a fresh stack. When openconnect
  dies, every flow of the old session is reset at once (streams raise BrokenResourceError; the
  front then closes the client); dials wait (within their timeout) for the restarted session.
  If openconnect fails for good (the server changed our address, login refused on restart),
  dials fail with that reason and `fatal` says it.
* Inbound SYNs to our address are refused (RST); pings to our address are answered.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import random
import socket
import time
from collections import deque
from typing import Deque, Dict, List, Optional, Tuple

import trio

from ..netstack import stack as nstack
from ..netstack import wire
from ..netstack.tcp import TcpConfig
from ..stacktimer import StackTimer
from .base import DialError, UpstreamError, upstream_down
from .direct import DirectUpstream

log = logging.getLogger("nsvpn.upstream.vpnstack")

RCV_BUF = 8 << 20  # the most a flow's receive window grows to (and what sets its scale)
RCV_START = 160 << 10  # where it starts (below openconnect's DTLS receive buffer); autotune()
SND_BUF = 4 << 20
READ_BATCH = 128
BACKLOG_MAX = 8192  # packets held while openconnect's queue is full; beyond: drop (TCP recovers)
DNS_TIMEOUT = 5.0
DNS_TRY = 1.0  # first per-server wait; doubled per round
DNS_CACHE_MAX = 1024
DNS_TTL_MIN, DNS_TTL_MAX, DNS_NEG_TTL = 5.0, 300.0, 5.0

# ICMP destination-unreachable codes (v4) -> errno for a connect() in progress, like Linux.
_ICMP4_ERRNO = {0: errno.ENETUNREACH, 1: errno.EHOSTUNREACH, 2: errno.ECONNREFUSED,
                3: errno.ECONNREFUSED, 6: errno.ENETUNREACH, 7: errno.EHOSTUNREACH,
                9: errno.ENETUNREACH, 10: errno.EHOSTUNREACH, 11: errno.ENETUNREACH,
                12: errno.EHOSTUNREACH, 13: errno.EHOSTUNREACH}
_ICMP6_ERRNO = {0: errno.ENETUNREACH, 1: errno.EHOSTUNREACH, 3: errno.EHOSTUNREACH,
                4: errno.ECONNREFUSED}


class _Conn:
    """Trio-side companion of one stack flow: what the stream's tasks wait on."""

    __slots__ = ("flow", "readable", "writable", "connected", "error", "reset", "eof",
                 "orphan", "key", "rcv_max", "copied", "since", "min_rtt")

    def __init__(self, flow: nstack.TcpFlow) -> None:
        self.flow = flow
        self.readable = trio.Event()
        self.writable = trio.Event()
        self.connected = trio.Event()  # set on success *and* on failure (see error)
        self.error: Optional[DialError] = None
        self.reset = False
        self.eof = False
        self.orphan = False  # the stream was closed; data arriving now gets a RST
        self.key = (flow.dst[0], flow.dst[1], flow.src[1])
        self.rcv_max = 0
        self.copied = 0
        self.since = 0.0
        self.min_rtt = 1.0

    def fail(self, err: DialError) -> None:
        if not self.connected.is_set() and self.error is None:
            self.error = err
        self.reset = True
        self.connected.set()
        self.readable.set()
        self.writable.set()


class _Session:
    """One VPNFD generation: a stack on the VPN address, its reader/writer/timer tasks."""

    def __init__(self, owner: VpnStackUpstream, vpn) -> None:
        self.owner = owner
        self.vpn = vpn
        self.sock: socket.socket = vpn.sock
        env = vpn.env
        self.addr = env.address4
        self.addr6 = env.address6
        cfg = nstack.StackConfig(
            # net only sets the broadcast address the stack ignores: the limited one
            net="0.0.0.0/0", gateway=env.address4, dns="",
            net6="::1/128", gateway6=env.address6 or "", dns6="",
            mtu=env.link_mtu(),
            tcp=TcpConfig(rcv_buf=owner.rcv_buf, snd_buf=owner.snd_buf),
            # VPNFD is no TUN queue: no reason to cap the window to one.
            tun_queue_len=1 << 20,
            # openconnect decrypted these; the TLS/DTLS record MAC already vouched for them.
            verify_checksums=False,
        )
        self.stack = nstack.Stack(cfg)
        self.conns: Dict[int, _Conn] = {}
        self.by_key: Dict[tuple, _Conn] = {}
        self.udp_waiters: Dict[int, Tuple[str, List[bytes], trio.Event]] = {}
        self.backlog: Deque[tuple] = deque()
        self.backlog_ev = trio.Event()
        self.dead: Optional[str] = None
        self._timer = StackTimer(self.stack, lambda: self.after_stack())
        self.write_drops = 0

    # -- plumbing -------------------------------------------------------------------------
    def after_stack(self) -> None:
        """Send what the stack produced, dispatch its events, tighten the timer."""
        st = self.stack
        while True:
            evs = st.pop_events()
            for ev in evs:
                self._dispatch(ev)  # may produce packets (a RST) and events ('closed')
            out = st.output_iovecs()
            if out and self.dead is None:
                self._send(out)
            if not evs:
                break
        self._timer.tighten()

    def _send(self, out: list) -> None:
        if self.backlog:
            self._queue(out)
            return
        sendmsg = self.sock.sendmsg
        for i, iov in enumerate(out):
            try:
                sendmsg(iov)
            except BlockingIOError:
                self._queue(out[i:])
                return
            except OSError:  # openconnect gone: the session watcher ends us
                self.write_drops += len(out) - i
                return

    def _queue(self, pkts: list) -> None:
        room = BACKLOG_MAX - len(self.backlog)
        if room < len(pkts):
            self.write_drops += len(pkts) - max(room, 0)
            pkts = pkts[:max(room, 0)]
        self.backlog.extend(pkts)
        self.backlog_ev.set()

    def _dispatch(self, ev: object) -> None:
        if isinstance(ev, nstack.TcpFlowEvent):
            c = self.conns.get(id(ev.flow))
            if c is None:
                return
            kind = ev.kind
            if kind == "data":
                if c.orphan:  # nobody will read: tell the peer like a closed socket does
                    self.stack.tcp_abort(c.flow, trio.current_time())
                c.readable.set()
            elif kind == "send_space":
                c.writable.set()
            elif kind == "connected":
                c.connected.set()
            elif kind == "eof":
                c.eof = True
                c.readable.set()
            elif kind == "reset":
                c.fail(DialError(errno.ECONNREFUSED, f"{c.key[0]}:{c.key[1]}: refused"))
            elif kind == "timeout":
                c.fail(DialError(errno.ETIMEDOUT, f"{c.key[0]}:{c.key[1]}: no answer"))
            elif kind == "closed":
                if not c.connected.is_set():
                    c.fail(DialError(errno.ECONNABORTED, f"{c.key[0]}:{c.key[1]}: aborted"))
                else:
                    c.readable.set()
                    c.writable.set()
                self._forget(c)
        elif isinstance(ev, nstack.NewTcpFlow):
            # Nothing listens on our VPN address (the front only dials out).
            self.stack.refuse(ev.flow, trio.current_time())
        elif isinstance(ev, nstack.UdpDatagram):
            port = ev.flow.dst[1]
            w = self.udp_waiters.get(port)
            if w is not None:
                if w[0] == ev.flow.src[0]:
                    w[1].append(ev.payload)
                    w[2].set()
            else:
                ep = self.owner.udp_endpoints.get(port)
                if ep is not None:
                    ep.deliver(ev.payload, ev.flow.src)
            self.stack.close_udp(ev.flow)

    def _forget(self, c: _Conn) -> None:
        self.conns.pop(id(c.flow), None)
        if self.by_key.get(c.key) is c:
            del self.by_key[c.key]

    def _icmp_error(self, mv: memoryview, now: float) -> None:
        """An ICMP unreachable about a SYN of ours fails that dial with the right errno
        (the stack itself ignores ICMP errors for TCP)."""
        drops: Dict[str, int] = {}
        ip = wire.parse_ip(mv, drops)
        if ip is None:
            return
        msg = wire.parse_icmp(ip, drops)
        if msg is None:
            return
        v4 = ip.version == 4
        if msg.type != (wire.ICMP4_UNREACH if v4 else wire.ICMP6_UNREACH):
            return
        q = wire.parse_quoted(msg.body, drops)
        if q is None or q.proto != wire.PROTO_TCP:
            return
        fam = socket.AF_INET if q.version == 4 else socket.AF_INET6
        c = self.by_key.get((socket.inet_ntop(fam, q.dst), q.dport, q.sport))
        if c is None or c.connected.is_set():
            return  # soft error for an established flow: ignored, as Linux does
        err = (_ICMP4_ERRNO if v4 else _ICMP6_ERRNO).get(msg.code)
        if err is None:
            return  # e.g. "fragmentation needed": not about reachability
        c.fail(DialError(err, f"{c.key[0]}:{c.key[1]}: ICMP unreachable (code {msg.code})"))
        self.stack.tcp_abort(c.flow, now)

    # -- tasks ----------------------------------------------------------------------------
    async def run(self) -> None:
        """Until openconnect's session is lost (or our VPNFD breaks)."""
        async with trio.open_nursery() as n:
            n.start_soon(self._reader, n.cancel_scope)
            n.start_soon(self._writer, n.cancel_scope)
            n.start_soon(self._timer.run)
            await self.vpn.lost.wait()
            n.cancel_scope.cancel()

    async def _reader(self, scope: trio.CancelScope) -> None:
        sock = self.sock
        st = self.stack
        buf = bytearray(65536)
        mv = memoryview(buf)
        recv_into = sock.recv_into
        try:
            while True:
                await trio.lowlevel.wait_readable(sock)
                now = trio.current_time()
                for _ in range(READ_BATCH):
                    try:
                        n = recv_into(buf)
                    except BlockingIOError:
                        break
                    if n < 20:
                        continue  # 0-byte datagrams carry nothing
                    v = buf[0] >> 4
                    if (v == 4 and buf[9] == 1) or (v == 6 and buf[6] == 58):
                        self._icmp_error(mv[:n], now)
                    st.input_packet(mv[:n], now)
                self.after_stack()
        except (OSError, ValueError, trio.ClosedResourceError) as e:  # ValueError: closed fd
            log.debug("VPNFD read ended: %s", e)
            scope.cancel()

    async def _writer(self, scope: trio.CancelScope) -> None:
        sock = self.sock
        backlog = self.backlog
        try:
            while True:
                if not backlog:
                    self.backlog_ev = trio.Event()
                    await self.backlog_ev.wait()
                    continue
                await trio.lowlevel.wait_writable(sock)
                while backlog:
                    try:
                        sock.sendmsg(backlog[0])
                    except BlockingIOError:
                        break
                    backlog.popleft()
        except (OSError, ValueError, trio.ClosedResourceError) as e:  # ValueError: closed fd
            log.debug("VPNFD write ended: %s", e)
            scope.cancel()

    def kill(self, why: str) -> None:
        """The session is over: every flow sees a reset, every dial in progress fails."""
        self.dead = why
        self.backlog.clear()
        for c in list(self.conns.values()):
            c.fail(upstream_down(f"{c.key[0]}:{c.key[1]}: {why}"))
        self.conns.clear()
        self.by_key.clear()
        for _, _, ev in self.udp_waiters.values():
            ev.set()

    # -- operations -----------------------------------------------------------------------
    async def connect(self, ip: str, port: int) -> VpnTcpStream:
        if self.dead is not None:
            raise upstream_down(self.dead)
        local = self.addr if ":" not in ip else self.addr6
        if local is None:
            raise DialError(errno.ENETUNREACH, f"{ip}: the VPN gave us no IPv6 address")
        flow = self.stack.open_tcp((local, 0), (ip, port), trio.current_time())
        c = _Conn(flow)
        self.conns[id(flow)] = c
        self.by_key[c.key] = c
        self.after_stack()
        try:
            await c.connected.wait()
        except BaseException:
            if self.dead is None:
                self.stack.tcp_abort(flow, trio.current_time())
                self.after_stack()
            self._forget(c)
            raise
        if c.error is not None:
            raise c.error
        if c.reset:
            raise upstream_down(f"{ip}:{port}: {self.dead or 'reset'}")
        self._start_autotune(c)
        return VpnTcpStream(self, c)

    def _start_autotune(self, c: _Conn) -> None:
        """Give the flow its own config whose receive buffer starts at RCV_START.

        The SYN was sent with the full buffer, so the window scale allows RCV_BUF; but a
        window that large from the start lets the server put megabytes in flight at a low
        RTT, and openconnect's DTLS socket (208 KiB receive buffer) overflows whenever it
        stalls on a busy node: 10-20% of the packets were lost that way in the lab with a
        fixed 8 MiB (or 1 MiB) window, ~0.1% with a window below 208 KiB. ocproxy's 64 KiB
        never overflows it but caps a 20 ms path at 3 MB/s. So, like Linux's receive-buffer
        autotuning, the window follows what the program really reads per round trip
        (autotune) and grows towards RCV_BUF only when the path's RTT needs it."""
        conn = c.flow.conn
        cfg = TcpConfig.__new__(TcpConfig)
        cfg.__dict__.update(conn.config.__dict__)
        c.rcv_max = cfg.rcv_buf
        if cfg.rcv_buf > RCV_START:
            cfg.rcv_buf = RCV_START
        conn.config = cfg
        c.since = trio.current_time()

    def autotune(self, c: _Conn, n: int) -> None:
        """The program read n bytes: twice what it reads per round trip (plus room for the
        sender's slow start) is the window it needs; only ever grown. The round trip is the
        smallest smoothed RTT seen: queueing in openconnect inflates the current one, which
        would grow the window, which deepens the queue."""
        c.copied += n
        conn = c.flow.conn
        cfg = conn.config
        if cfg.rcv_buf >= c.rcv_max:
            return
        now = trio.current_time()
        srtt = getattr(conn, "_srtt", None)
        if srtt and srtt < c.min_rtt:
            c.min_rtt = srtt
        rtt = max(c.min_rtt, 0.0002)
        elapsed = now - c.since
        if elapsed < rtt:
            return
        # reads come in bursts: normalise to bytes per round trip
        want = int(2 * c.copied * rtt / elapsed) + 16 * cfg.mss
        if want > cfg.rcv_buf:
            cfg.rcv_buf = min(c.rcv_max, want)
        c.copied = 0
        c.since = now

    async def udp_exchange(self, server: str, payload: bytes, wait: float) -> List[bytes]:
        """Send one datagram from a random port of ours to server:53, collect answers for
        up to `wait` seconds (returns at the first one)."""
        if self.dead is not None:
            return []
        while True:
            port = random.randint(20000, 60999)
            if port not in self.udp_waiters and port not in self.owner.udp_endpoints:
                break
        got: List[bytes] = []
        ev = trio.Event()
        self.udp_waiters[port] = (server, got, ev)
        try:
            local = self.addr6 if ":" in server else self.addr
            if local is None:
                return []
            self.stack.send_udp((local, port), (server, 53), payload)
            self.after_stack()
            with trio.move_on_after(wait):
                await ev.wait()
            return got
        finally:
            del self.udp_waiters[port]


class VpnUdpEndpoint:
    """A UDP port of ours on the VPN address (for SOCKS5 UDP ASSOCIATE): datagrams to any
    destination the VPN carries; it lives across openconnect restarts. Datagrams to
    networks the VPN does not carry are dropped (counted in `dropped`)."""

    QUEUE = 256

    def __init__(self, owner: VpnStackUpstream, port: int) -> None:
        self.owner = owner
        self.port = port
        self._tx, self._rx = trio.open_memory_channel(self.QUEUE)
        self.dropped = 0
        self.closed = False

    def deliver(self, payload: bytes, src: Tuple[str, int]) -> None:
        try:
            self._tx.send_nowait((payload, src))
        except trio.WouldBlock:  # the reader is behind: UDP may drop
            self.dropped += 1

    async def sendto(self, payload: bytes, host: str, port: int) -> None:
        """Send one datagram (a name is resolved with the VPN's DNS); waits through an
        openconnect restart, so bound it with a timeout."""
        try:
            ip = str(ipaddress.ip_address(host.strip("[]")))
        except ValueError:
            ip = await self.owner.resolve(host)
        if self.owner.direct_outside and not self.owner.carries(ip):
            self.dropped += 1
            return
        sess = await self.owner._live_session()
        local = sess.addr6 if ":" in ip else sess.addr
        if local is None:
            self.dropped += 1
            return
        sess.stack.send_udp((local, self.port), (ip, port), payload)
        sess.after_stack()

    async def recvfrom(self) -> Tuple[bytes, Tuple[str, int]]:
        return await self._rx.receive()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.owner.udp_endpoints.get(self.port) is self:
                del self.owner.udp_endpoints[self.port]
            self._tx.close()


class VpnTcpStream(trio.abc.HalfCloseableStream):
    """One TCP connection of the userspace stack, as a trio stream."""

    def __init__(self, sess: _Session, c: _Conn) -> None:
        self._s = sess
        self._c = c
        self._closed = False
        self._eof_sent = False
        self.local = c.flow.src
        self.remote = c.flow.dst

    @property
    def conn(self):
        """The TcpConnection (for tests and stats)."""
        return self._c.flow.conn

    def _check(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        if self._c.reset:
            raise trio.BrokenResourceError(self._s.dead or "connection reset")

    async def send_all(self, data) -> None:
        c, s = self._c, self._s
        if self._eof_sent:
            self._check()
            raise trio.ClosedResourceError("send_eof() was called")
        mv = memoryview(data).cast("B") if not isinstance(data, memoryview) else data
        off, n = 0, len(mv)
        await trio.lowlevel.checkpoint_if_cancelled()
        while off < n:
            self._check()
            space = s.stack.tcp_send_space(c.flow)
            if space <= 0:
                c.writable = trio.Event()
                if s.stack.tcp_send_space(c.flow) <= 0 and not c.reset:
                    await c.writable.wait()
                continue
            off += s.stack.tcp_send(c.flow, bytes(mv[off:off + space]), trio.current_time())
            s.after_stack()
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        c, s = self._c, self._s
        while not c.reset and s.stack.tcp_send_space(c.flow) <= 0:
            c.writable = trio.Event()
            await c.writable.wait()

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        if self._eof_sent or self._c.reset:
            return
        self._eof_sent = True
        self._s.stack.tcp_shutdown(self._c.flow, trio.current_time())
        self._s.after_stack()

    async def receive_some(self, max_bytes: Optional[int] = None) -> bytes:
        c, s = self._c, self._s
        limit = 256 * 1024 if max_bytes is None else max_bytes
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            if self._closed:
                raise trio.ClosedResourceError("stream closed")
            conn = c.flow.conn
            if conn.recv_available():
                data = s.stack.tcp_recv(c.flow, limit)
                s.autotune(c, len(data))
                s.after_stack()  # the window opened: an update may be due
                await trio.lowlevel.cancel_shielded_checkpoint()
                return data
            if c.reset:
                raise trio.BrokenResourceError(s.dead or "connection reset by peer")
            if c.eof:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return b""
            c.readable = trio.Event()
            if conn.recv_available() or c.eof or c.reset:
                continue
            await c.readable.wait()

    def abort(self) -> None:
        """Reset the connection (RST to the far side), like close() with SO_LINGER 0."""
        c, s = self._c, self._s
        if not c.reset and s.dead is None:
            s.stack.tcp_abort(c.flow, trio.current_time())
            s.after_stack()
        c.reset = True

    async def aclose(self) -> None:
        """Like close() on a socket: FIN when everything sent was read, RST when unread data
        is left (or the peer sends more later)."""
        if not self._closed:
            self._closed = True
            c, s = self._c, self._s
            conn = c.flow.conn
            log.debug("flow %s:%s closed: receive buffer %d KiB, srtt %.1f ms, stats %s",
                      c.key[0], c.key[1], conn.config.rcv_buf >> 10,
                      1000 * (getattr(conn, "_srtt", None) or 0), getattr(conn, "stats", ""))
            if not c.reset and s.dead is None:
                now = trio.current_time()
                if c.flow.conn.recv_available():
                    s.stack.tcp_abort(c.flow, now)
                else:
                    c.orphan = True
                    if not self._eof_sent:
                        s.stack.tcp_shutdown(c.flow, now)
                s.after_stack()
        await trio.lowlevel.checkpoint()


class VpnStackUpstream:
    """An upstream dialling through openconnect (an OpenconnectUpstream) with our stack."""

    def __init__(self, oc, *, rcv_buf: int = RCV_BUF, snd_buf: int = SND_BUF,
                 dns_timeout: float = DNS_TIMEOUT, direct_outside: bool = True,
                 name: Optional[str] = None) -> None:
        self.oc = oc
        self.name = name or f"{oc.name} (userspace stack)"
        self.rcv_buf = rcv_buf
        self.snd_buf = snd_buf
        self.dns_timeout = dns_timeout
        self.direct_outside = direct_outside
        self.direct = DirectUpstream()
        # Networks the caller keeps out of the tunnel (e.g. the host's own): a *name* that
        # resolves into one is dialled with a host socket too, as an IP literal would be.
        self.direct_nets: list = []  # of ipaddress networks
        self.fatal: Optional[str] = None
        self.session: Optional[_Session] = None
        self.address: Optional[str] = None
        self.env = None
        self.sessions = 0
        self._changed = trio.Event()
        self._scope: Optional[trio.CancelScope] = None
        self._started = False
        self._closing = False
        self._dns_cache: Dict[str, Tuple[float, List[str]]] = {}
        self.udp_endpoints: Dict[int, VpnUdpEndpoint] = {}

    # -- upstream interface ---------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        s = self.session
        return self.fatal is None and s is not None and s.dead is None and \
            not s.vpn.lost.is_set()

    async def start(self) -> None:
        """Log in (if not yet) and wait for the first session; UpstreamError on failure."""
        if self._started:
            raise RuntimeError("already started")
        self._started = True
        if self.oc.session is None:
            await self.oc.start()
        self._scope = trio.CancelScope()
        trio.lowlevel.spawn_system_task(self._supervise, name=f"nsvpn vpnstack {self.oc.name}")
        while self.session is None:
            if self.fatal is not None:
                raise UpstreamError(self.fatal)
            await self._wait_change()

    async def wait_fatal(self) -> str:
        """Returns the reason once the upstream has failed for good."""
        while self.fatal is None:
            await self._wait_change()
        return self.fatal

    async def aclose(self) -> None:
        self._closing = True
        if self._scope is not None:
            self._scope.cancel()
        s = self.session
        if s is not None:
            s.kill("nsvpn is stopping")
        await self.oc.aclose()

    async def dial_tcp(self, host: str, port: int, *, timeout: float) -> VpnTcpStream:
        with trio.move_on_after(timeout):
            sess = await self._live_session()
            try:
                ip = str(ipaddress.ip_address(host.strip("[]")))
            except ValueError:
                ip = await self.resolve(host)
                sess = await self._live_session()
            if self.direct_outside and not self.carries(ip):
                log.debug("%s is outside the VPN's networks: host socket", ip)
                return await self.direct.dial_tcp(ip, port, timeout=timeout)
            return await sess.connect(ip, port)
        raise DialError(errno.ETIMEDOUT, f"{host}:{port}: no answer in {timeout:g} s")

    def open_udp(self) -> VpnUdpEndpoint:
        """A new UDP endpoint on the VPN address (close() it when done)."""
        busy = self.session.udp_waiters if self.session is not None else {}
        while True:
            port = random.randint(20000, 60999)
            if port not in self.udp_endpoints and port not in busy:
                break
        ep = VpnUdpEndpoint(self, port)
        self.udp_endpoints[port] = ep
        return ep

    def carries(self, ip: str) -> bool:
        """Does the VPN route this address (split-include / split-exclude)?"""
        env = self.env
        a = ipaddress.ip_address(ip)
        if a.is_loopback:  # e.g. a name the VPN's DNS maps to 127.0.0.1: never the tunnel
            return False
        # longest prefix wins, as in a routing table; a tie goes to the direct network
        direct = max((n.prefixlen for n in self.direct_nets
                      if n.version == a.version and a in n), default=-1)
        if env is None:
            return direct < 0
        inc, exc = (env.split_inc4, env.split_exc4) if a.version == 4 else \
            (env.split_inc6, env.split_exc6)
        nets = [ipaddress.ip_network(n, strict=False) for n in exc]
        direct = max([direct] + [n.prefixlen for n in nets if a in n])
        if a.version == 4:
            routes = [ipaddress.ip_network(r) for r in env.routes4()]
            routes.append(env.network4)
        else:
            routes = [ipaddress.ip_network(r) for r in env.routes6()]
        vpn = max((n.prefixlen for n in routes if a in n), default=-1)
        return vpn >= 0 and vpn > direct

    # -- names ----------------------------------------------------------------------------
    async def resolve(self, name: str) -> str:
        """The first IPv4 address of `name` from the VPN's DNS servers (cached)."""
        ips = await self.resolve_all(name)
        if not ips:
            raise DialError(errno.EHOSTUNREACH, f"cannot resolve {name} with the VPN's DNS",
                            "hostunreach")
        return ips[0]

    async def resolve_all(self, name: str) -> List[str]:
        import dns.exception
        import dns.flags
        import dns.message
        import dns.rcode
        import dns.rdatatype

        key = name.lower().rstrip(".")
        hit = self._dns_cache.get(key)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        env = self.env
        servers = list(env.dns4) if env is not None else []
        if not servers:
            raise DialError(errno.EHOSTUNREACH, f"cannot resolve {name}: the VPN pushed no "
                            "DNS server", "hostunreach")
        candidates = [key]
        if "." not in key and not name.endswith("."):
            candidates += [f"{key}.{d}" for d in (env.default_domains or [])]
        deadline = trio.current_time() + self.dns_timeout
        answered = False
        for qname in candidates:
            wait = DNS_TRY
            while trio.current_time() < deadline:
                sess = await self._live_session()
                q = dns.message.make_query(qname, dns.rdatatype.A)
                q.flags |= dns.flags.RD
                result = None
                for server in servers:
                    left = deadline - trio.current_time()
                    if left <= 0:
                        break
                    for wire_msg in await sess.udp_exchange(server, q.to_wire(),
                                                            min(wait, left)):
                        try:
                            r = dns.message.from_wire(wire_msg)
                        except dns.exception.DNSException:
                            continue
                        if r.id != q.id or not q.is_response(r):
                            continue
                        result = r
                        break
                    if result is not None:
                        break
                if result is None:
                    wait *= 2
                    continue
                answered = True
                if result.rcode() != dns.rcode.NOERROR:
                    break  # NXDOMAIN/SERVFAIL: next candidate
                ips: List[str] = []
                ttl = DNS_TTL_MAX
                for rrset in result.answer:
                    if rrset.rdtype == dns.rdatatype.A:
                        ttl = min(ttl, rrset.ttl)
                        ips += [rd.address for rd in rrset]
                if ips:
                    self._cache(key, ips, max(DNS_TTL_MIN, ttl))
                    return ips
                break
        if answered:
            self._cache(key, [], DNS_NEG_TTL)
            return []
        raise DialError(errno.ETIMEDOUT, f"cannot resolve {name}: the VPN's DNS servers "
                        f"({' '.join(servers)}) did not answer in {self.dns_timeout:g} s")

    def _cache(self, key: str, ips: List[str], ttl: float) -> None:
        if len(self._dns_cache) >= DNS_CACHE_MAX:
            self._dns_cache.pop(next(iter(self._dns_cache)))
        self._dns_cache[key] = (time.monotonic() + ttl, ips)

    # -- sessions -------------------------------------------------------------------------
    async def _wait_change(self) -> None:
        await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _live_session(self) -> _Session:
        """The current session; waits through a restart (the caller's deadline bounds it)."""
        while True:
            if self.fatal is not None:
                raise upstream_down(self.fatal)
            if self._closing:
                raise upstream_down(f"{self.name}: closed")
            s = self.session
            if s is not None and s.dead is None and not s.vpn.lost.is_set():
                return s
            await self._wait_change()

    async def _supervise(self) -> None:
        assert self._scope is not None
        with self._scope:
            try:
                await self._follow_sessions()
            except Exception as e:  # a system task must never raise
                log.exception("vpnstack supervisor failed")
                self.fatal = f"{self.name}: internal error: {e}"
            finally:
                s = self.session
                if s is not None:
                    s.kill(self.fatal or "the VPN upstream stopped")
                self._notify()

    async def _follow_sessions(self) -> None:
        from .base import UpstreamError as _UE

        gen = 0
        while True:
            try:
                vpn = await self.oc.wait_session(gen)
            except _UE as e:
                if not self._closing:
                    self.fatal = str(e)
                return
            gen = vpn.generation
            if self.address is None:
                self.address = vpn.env.address4
            elif vpn.env.address4 != self.address:
                self.fatal = (f"{self.oc.name}: the VPN server gave a new address "
                              f"{vpn.env.address4} (was {self.address}) on reconnect")
                return
            self.env = vpn.env
            sess = _Session(self, vpn)
            self.session = sess
            self.sessions += 1
            log.info("vpnstack: session %d on %s (MTU %d)", gen, sess.addr,
                     vpn.env.link_mtu())
            self._notify()
            try:
                await sess.run()
            finally:
                flows = len(sess.conns)
                sess.kill(f"VPN session {gen} lost (openconnect restarting)")
                self.session = None
                self._notify()
            log.info("vpnstack: session %d ended; %d flows reset", gen, flows)

