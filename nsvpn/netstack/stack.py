"""The packet side of the userspace stack: demultiplexing, flow table, timers, counters.

Sans-IO: `input_packet()` takes what was read from the TUN, `output_packets()` returns what to
write, `pop_events()` says what the relay must act on, and time only enters as `now`
arguments. One TcpConnection (tcp.py) per TCP 4-tuple; UDP is connectionless here and only
tracked per 4-tuple for idle expiry.

Batching: input_packet() only feeds segments to connections and marks them dirty; their
output (ACKs, data, window updates) is collected once per flow in output_packets() or
pop_events(), so a read batch of N segments yields one cumulative ACK instead of N.

Addresses are kept as packed bytes internally (cheap to hash, what the headers hold) and are
shown to callers as (str ip, int port) tuples.

ICMP echo: answered for the gateway and DNS addresses; an echo request to any other address
becomes an IcmpEchoRequest event (the relay may ignore it: it cannot ping through SOCKS) and is
otherwise dropped.
"""

from __future__ import annotations

import hashlib
import heapq
import ipaddress
import itertools
import os
import socket
from collections import OrderedDict
from typing import Dict, List, Tuple

from . import wire
from .segment import ACK, RST, SYN, TcpSegment
from .tcp import CLOSED, TIME_WAIT, TcpConfig, TcpConnection

Addr = Tuple[str, int]

VNET_HDR_LEN = wire.VNET_HDR_LEN
_fast_tcp4 = wire.parse_tcp4_fast
_SKIP_VERIFY = wire.VNET_F_NEEDS_CSUM | wire.VNET_F_DATA_VALID
_MAX_IP_PAYLOAD = 65535


class StackConfig:
    """Addresses, link properties and limits. Plain attributes; pass keyword overrides."""

    def __init__(
        self,
        net: str = "10.0.2.0/24",
        gateway: str = "10.0.2.2",
        dns: str = "10.0.2.3",
        net6: str = "fd00::/64",
        gateway6: str = "fd00::2",
        dns6: str = "fd00::3",
        mtu: int = 65520,
        vnet_hdr: bool = False,
        gso: bool = True,
        tcp: TcpConfig | None = None,
        udp_idle_timeout: float = 60.0,
        accept_timeout: float = 75.0,
        max_half_open: int = 1024,
        max_tcp_flows: int = 65536,
        max_udp_flows: int = 4096,
        tun_queue_len: int = 500,
        verify_checksums: bool = True,
    ) -> None:
        self.net = net
        self.gateway = gateway
        self.dns = dns
        self.net6 = net6
        self.gateway6 = gateway6
        self.dns6 = dns6
        self.mtu = mtu
        # Packets read and written carry a virtio_net_hdr (TUN opened with IFF_VNET_HDR): the
        # kernel checks and fills in TCP/UDP checksums, and with `gso` segments larger than
        # the MTU are written for the kernel to cut (TSO), up to 64 KiB per write.
        self.vnet_hdr = vnet_hdr
        self.gso = gso
        self.tcp = tcp or TcpConfig()
        self.udp_idle_timeout = udp_idle_timeout
        # A SYN whose flow the relay neither accepts nor refuses in this time gets ICMP
        # host-unreachable, so a hung upstream dial cannot pin a half-open slot forever.
        self.accept_timeout = accept_timeout
        self.max_half_open = max_half_open
        self.max_tcp_flows = max_tcp_flows
        self.max_udp_flows = max_udp_flows
        # The TUN queue (txqueuelen) holds this many packets towards us; a receive window
        # larger than the queue can hold makes the kernel drop (tun orphans the skbs), so
        # the advertised window is capped to what fits when packets are MTU-sized.
        self.tun_queue_len = tun_queue_len
        # TCP/UDP checksums of packets from the TUN are verified unless the virtio-net header
        # says the kernel vouches for them. The kernel makes them locally, so a relay may turn
        # this off to save ~3 us per 1500-byte packet; the IPv4 header sum is always checked.
        self.verify_checksums = verify_checksums


# ------------------------------------------------------------------------------------- events


class NewTcpFlow:
    """A SYN for a new 4-tuple: accept(), refuse() or unreachable() it."""

    __slots__ = ("flow",)

    def __init__(self, flow: TcpFlow) -> None:
        self.flow = flow

    def __repr__(self) -> str:
        return f"NewTcpFlow({self.flow!r})"


class TcpFlowEvent:
    """A connection event: 'connected', 'data', 'send_space', 'eof', 'reset', 'timeout',
    'closed' (after 'closed' the flow is gone from the table)."""

    __slots__ = ("flow", "kind")

    def __init__(self, flow: TcpFlow, kind: str) -> None:
        self.flow = flow
        self.kind = kind

    def __repr__(self) -> str:
        return f"TcpFlowEvent({self.flow!r}, {self.kind!r})"


class UdpDatagram:
    """A datagram from the namespace. `payload` is a copy (bytes)."""

    __slots__ = ("flow", "payload")

    def __init__(self, flow: UdpFlow, payload: bytes) -> None:
        self.flow = flow
        self.payload = payload

    @property
    def src(self) -> Addr:
        return self.flow.src

    @property
    def dst(self) -> Addr:
        return self.flow.dst

    def __repr__(self) -> str:
        return f"UdpDatagram({self.flow.src} -> {self.flow.dst}, {len(self.payload)} B)"


class UdpFlowClosed:
    """A UDP flow idle for udp_idle_timeout (or evicted at the flow limit): close its socket."""

    __slots__ = ("flow",)

    def __init__(self, flow: UdpFlow) -> None:
        self.flow = flow


class UdpPortUnreachable:
    """The namespace answered a datagram we delivered with ICMP port unreachable."""

    __slots__ = ("flow",)

    def __init__(self, flow: UdpFlow) -> None:
        self.flow = flow


class IcmpEchoRequest:
    """A ping to an address other than the gateway/DNS (not answered by the stack)."""

    __slots__ = ("src", "dst", "ident", "seq", "payload")

    def __init__(self, src: str, dst: str, ident: int, seq: int, payload: bytes) -> None:
        self.src = src
        self.dst = dst
        self.ident = ident
        self.seq = seq
        self.payload = payload


# ------------------------------------------------------------------------------------- flows


class TcpFlow:
    """One TCP connection through the stack.

    `src` is the initiating endpoint and `dst` the one it dialled: for flows opened by the
    namespace (SYN in), src is the app's address and dst where it connects; for open_tcp()
    flows, src is our local endpoint and dst the remote one.
    """

    __slots__ = ("id", "src", "dst", "conn", "key", "out_src", "out_dst", "out_sport",
                 "out_dport", "syn_quote", "established", "pending", "accept_deadline",
                 "heap_deadline", "removed", "dirty")

    def __init__(self, fid: int, src: Addr, dst: Addr, key: tuple) -> None:
        self.id = fid
        self.src = src
        self.dst = dst
        self.key = key  # (remote addr, remote port, local addr, local port) as packets arrive
        self.out_src = key[2]
        self.out_sport = key[3]
        self.out_dst = key[0]
        self.out_dport = key[1]
        self.conn: TcpConnection = None  # type: ignore[assignment]
        self.syn_quote = b""
        self.established = False
        self.pending = False
        self.accept_deadline: float | None = None
        self.heap_deadline: float | None = None
        self.removed = False
        self.dirty = False

    def __repr__(self) -> str:
        state = self.conn.state if self.conn is not None else "?"
        return f"TcpFlow#{self.id}({self.src[0]}:{self.src[1]} -> {self.dst[0]}:{self.dst[1]} " \
               f"{state})"


class UdpFlow:
    """A UDP 4-tuple seen from the namespace: src is the app's endpoint, dst the remote."""

    __slots__ = ("id", "src", "dst", "key", "last")

    def __init__(self, fid: int, src: Addr, dst: Addr, key: tuple, now: float) -> None:
        self.id = fid
        self.src = src
        self.dst = dst
        self.key = key
        self.last = now

    def __repr__(self) -> str:
        return f"UdpFlow#{self.id}({self.src} -> {self.dst})"


# ------------------------------------------------------------------------------------- helpers

_ntop_cache: Dict[bytes, str] = {}
_pton_cache: Dict[str, bytes] = {}


def _ntop(b: bytes) -> str:
    s = _ntop_cache.get(b)
    if s is None:
        s = socket.inet_ntop(socket.AF_INET if len(b) == 4 else socket.AF_INET6, b)
        if len(_ntop_cache) < 65536:
            _ntop_cache[b] = s
    return s


def _pton(s: str) -> bytes:
    b = _pton_cache.get(s)
    if b is None:
        b = ipaddress.ip_address(s).packed
        if len(_pton_cache) < 65536:
            _pton_cache[s] = b
    return b


def _tcp_config_for(base: TcpConfig, mss: int, max_send_segment: int | None,
                    rcv_cap: int | None) -> TcpConfig:
    cfg = TcpConfig.__new__(TcpConfig)
    cfg.__dict__.update(base.__dict__)
    cfg.mss = mss
    if max_send_segment is not None:
        cfg.max_send_segment = max_send_segment
    if rcv_cap is not None and cfg.rcv_buf > rcv_cap:
        cfg.rcv_buf = rcv_cap
    return cfg


# ------------------------------------------------------------------------------------- stack


class Stack:
    def __init__(self, config: StackConfig | None = None) -> None:
        cfg = self.config = config or StackConfig()
        self._vnet = cfg.vnet_hdr
        self._verify = cfg.verify_checksums
        self._fast = True  # tests switch the hot path off to compare it with the general one
        self._gso_mtu = cfg.mtu if (cfg.vnet_hdr and cfg.gso) else 0
        self._local = {_pton(a) for a in (cfg.gateway, cfg.dns, cfg.gateway6, cfg.dns6) if a}
        net = ipaddress.ip_network(cfg.net, strict=False)
        self._bcast = net.broadcast_address.packed
        self._tcp_cfg = {4: self._make_tcp_config(4), 6: self._make_tcp_config(6)}
        self._tcp: Dict[tuple, TcpFlow] = {}
        self._udp: OrderedDict = OrderedDict()  # key -> UdpFlow, least recently used first
        self._heap: List[tuple] = []
        self._heap_seq = itertools.count()
        self._ids = itertools.count(1)
        self._dirty: List[TcpFlow] = []
        self._out: List[bytes] = []
        self._events: list = []
        self._now = 0.0
        self._secret = os.urandom(16)
        self.drops: Dict[str, int] = {}
        self.packets_in = self.bytes_in = self.packets_out = self.bytes_out = 0
        self.half_open = 0
        self.rst_out = 0
        self.icmp_out = 0
        self.tcp_flows_total = 0
        self.udp_flows_total = 0

    def _make_tcp_config(self, version: int) -> TcpConfig:
        cfg = self.config
        hdrs = 40 if version == 4 else 60
        mss = cfg.mtu - hdrs
        mss_out = None
        if self._gso_mtu:
            # Segments up to 64 KiB, a whole number of wire segments (timestamps assumed).
            per = mss - 12
            mss_out = max(per, ((_MAX_IP_PAYLOAD - hdrs - 40) // per) * per)
        # Packets towards us are MTU-sized unless the kernel may send us TSO super-packets.
        per_pkt = _MAX_IP_PAYLOAD if cfg.vnet_hdr else mss
        rcv_cap = max(64 << 10, (cfg.tun_queue_len * per_pkt * 3) // 4)
        return _tcp_config_for(cfg.tcp, mss, mss_out, rcv_cap)

    # --------------------------------------------------------------------------- input

    def input_packet(self, pkt, now: float) -> None:
        """Process one packet read from the TUN (with its virtio_net_hdr if configured).
        Nothing keeps a reference to `pkt` afterwards: the caller may reuse its buffer."""
        self._now = now
        drops = self.drops
        mv = pkt if isinstance(pkt, memoryview) else memoryview(pkt)
        self.packets_in += 1
        self.bytes_in += len(mv)
        verify = self._verify
        gso = False
        if self._vnet:
            if len(mv) < VNET_HDR_LEN:
                drops["vnet_truncated"] = drops.get("vnet_truncated", 0) + 1
                return
            flags = mv[0]
            gso = mv[1] != 0
            if flags & _SKIP_VERIFY:
                verify = False
            mv = mv[VNET_HDR_LEN:]
        if self._fast and len(mv) >= 40 and mv[0] == 0x45:
            # Hot path: a segment for an existing flow. Anything else (new flows, faults,
            # other protocols) takes the general path below, which counts drops.
            res = _fast_tcp4(mv, verify, gso)
            if res is not None:
                seg = res[4]
                flow = self._tcp.get(res[:4])
                if flow is not None and not seg.flags & SYN:
                    flow.conn.on_segment(seg, now)
                    if not flow.dirty:
                        flow.dirty = True
                        self._dirty.append(flow)
                    return
        ip = wire.parse_ip(mv, drops, gso)
        if ip is None:
            return
        proto = ip.proto
        if proto == wire.PROTO_TCP:
            res = wire.parse_tcp(ip, drops, verify)
            if res is not None:
                self._input_tcp(ip, res[0], res[1], res[2], now)
        elif proto == wire.PROTO_UDP:
            res = wire.parse_udp(ip, drops, verify)
            if res is not None:
                self._input_udp(ip, res[0], res[1], res[2], now)
        elif proto == wire.PROTO_ICMP or proto == wire.PROTO_ICMPV6:
            msg = wire.parse_icmp(ip, drops)
            if msg is not None:
                self._input_icmp(ip, msg, now)
        else:
            drops["unknown_protocol"] = drops.get("unknown_protocol", 0) + 1

    def _drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1

    def _input_tcp(self, ip: wire.IpPacket, sport: int, dport: int, seg: TcpSegment,
                   now: float) -> None:
        key = (ip.src, sport, ip.dst, dport)
        flow = self._tcp.get(key)
        flags = seg.flags
        if flow is not None:
            if flags & SYN and not flags & (ACK | RST) and flow.conn.state == TIME_WAIT:
                # The app reuses the port while we linger in TIME_WAIT: start afresh.
                self._remove(flow)
            else:
                flow.conn.on_segment(seg, now)
                if not flow.dirty:
                    flow.dirty = True
                    self._dirty.append(flow)
                return
        if flags & (SYN | ACK | RST) == SYN:
            self._new_passive(ip, sport, dport, seg, key, now)
            return
        # RFC 9293 3.10.7.1: anything but a RST to a closed port is answered with a RST.
        rst = wire.build_rst_for(ip, sport, dport, seg, vnet=self._vnet)
        if rst is None:
            self._drop("tcp_rst_no_flow")
        else:
            self._drop("tcp_no_flow")
            self.rst_out += 1
            self._out.append(rst)

    def _new_passive(self, ip: wire.IpPacket, sport: int, dport: int, seg: TcpSegment,
                     key: tuple, now: float) -> None:
        cfg = self.config
        if (ip.dst[0] >= 224) if len(ip.dst) == 4 else (ip.dst[0] == 0xFF):
            self._drop("tcp_syn_multicast")
            return
        if self.half_open >= cfg.max_half_open and not self._evict_pending(now):
            self._drop("tcp_syn_half_open_limit")
            return
        if len(self._tcp) >= cfg.max_tcp_flows and not self._evict_time_wait():
            self._drop("tcp_syn_flow_limit")
            return
        flow = TcpFlow(next(self._ids), (_ntop(ip.src), sport), (_ntop(ip.dst), dport), key)
        flow.conn = TcpConnection.from_syn(seg, now, self._tcp_cfg[ip.version],
                                           self._isn(key, now))
        flow.syn_quote = wire.syn_quote(ip)
        flow.pending = True
        flow.accept_deadline = now + cfg.accept_timeout
        self._tcp[key] = flow
        self.half_open += 1
        self.tcp_flows_total += 1
        self._schedule(flow)
        self._events.append(NewTcpFlow(flow))

    def _evict_pending(self, now: float) -> bool:
        """A full half-open table gives up its oldest SYN still waiting for the upstream.
        Dropping the new SYN instead let one burst (a scan, a flood of connects to a dead
        destination) freeze every later connection for the whole accept timeout. A SYN
        younger than a second keeps its place: the new one is dropped and its retry (the
        kernel resends after 1 s) finds the slot."""
        born = now - 1.0 + self.config.accept_timeout
        for flow in self._tcp.values():  # insertion order: the oldest first
            if flow.pending:
                if flow.accept_deadline is None or flow.accept_deadline > born:
                    return False
                self._drop("tcp_syn_evicted")
                self._events.append(TcpFlowEvent(flow, "timeout"))
                self.unreachable(flow, now, "timeout")
                return True
        return False

    def _isn(self, key: tuple, now: float) -> int:
        # RFC 6528: a keyed hash of the 4-tuple plus a 4 us clock.
        h = hashlib.blake2b(digest_size=4, key=self._secret)
        h.update(key[0] + key[1].to_bytes(2, "big") + key[2] + key[3].to_bytes(2, "big"))
        return (int.from_bytes(h.digest(), "big") + int(now * 250000)) & 0xFFFFFFFF

    def _evict_time_wait(self) -> bool:
        for flow in self._tcp.values():
            if flow.conn.state == TIME_WAIT:
                self._remove(flow)
                return True
        return False

    def _input_udp(self, ip: wire.IpPacket, sport: int, dport: int, payload, now: float) -> None:
        dst = ip.dst
        if (dst[0] >= 224 or dst == self._bcast) if len(dst) == 4 else dst[0] == 0xFF:
            self._drop("udp_multicast")
            return
        key = (ip.src, sport, dst, dport)
        udp = self._udp
        flow = udp.get(key)
        if flow is None:
            if len(udp) >= self.config.max_udp_flows:
                _, old = udp.popitem(last=False)
                self._events.append(UdpFlowClosed(old))
                self._drop("udp_flow_evicted")
            flow = UdpFlow(next(self._ids), (_ntop(ip.src), sport), (_ntop(dst), dport), key, now)
            udp[key] = flow
            self.udp_flows_total += 1
        else:
            flow.last = now
            udp.move_to_end(key)
        self._events.append(UdpDatagram(flow, bytes(payload)))

    def _input_icmp(self, ip: wire.IpPacket, msg: wire.IcmpMessage, now: float) -> None:
        v4 = ip.version == 4
        mtype = msg.type
        if mtype == (wire.ICMP4_ECHO_REQUEST if v4 else wire.ICMP6_ECHO_REQUEST):
            if ip.dst in self._local:
                reply = wire.ICMP4_ECHO_REPLY if v4 else wire.ICMP6_ECHO_REPLY
                self._emit(wire.build_icmp(ip.dst, ip.src, reply, 0, msg.rest, bytes(msg.body),
                                           vnet=self._vnet))
                self.icmp_out += 1
            else:
                self._drop("icmp_echo_not_local")
                self._events.append(IcmpEchoRequest(_ntop(ip.src), _ntop(ip.dst), msg.ident,
                                                    msg.seq, bytes(msg.body)))
            return
        if mtype == (wire.ICMP4_UNREACH if v4 else wire.ICMP6_UNREACH):
            q = wire.parse_quoted(msg.body, self.drops)
            if q is None:
                return
            if q.proto == wire.PROTO_UDP:
                # The quoted datagram went from the remote (src) to the app (dst).
                flow = self._udp.get((q.dst, q.dport, q.src, q.sport))
                if flow is not None:
                    self._events.append(UdpPortUnreachable(flow))
                    return
            self._drop("icmp_unreach_ignored")
            return
        self._drop("icmp_ignored")

    # --------------------------------------------------------------------------- output

    def _emit(self, pkt: bytes) -> None:
        self._out.append(pkt)

    def _flush(self) -> None:
        dirty = self._dirty
        if not dirty:
            return
        self._dirty = []
        for flow in dirty:
            flow.dirty = False
            if not flow.removed:
                self._flush_flow(flow)

    def _flush_flow(self, flow: TcpFlow) -> None:
        conn = flow.conn
        segs = conn.poll_output(self._now)
        if segs:
            src, dst, sport, dport = flow.out_src, flow.out_dst, flow.out_sport, flow.out_dport
            vnet, gso_mtu, out = self._vnet, self._gso_mtu, self._out
            if gso_mtu:
                # Wire segments must also respect the MSS the peer announced.
                peer_mtu = conn.peer_mss + (40 if len(src) == 4 else 60)
                if peer_mtu < gso_mtu:
                    gso_mtu = peer_mtu
            build = wire.build_tcp_parts
            for seg in segs:
                head, payload = build(src, dst, sport, dport, seg, vnet=vnet, gso_mtu=gso_mtu)
                # Large payloads stay apart for a gathering write (output_iovecs()).
                out.append((head, payload) if len(payload) > 2048 else
                           (head + payload if payload else head))
        evs = conn.pop_events()
        if evs:
            events = self._events
            for kind in evs:
                if kind == "connected" and not flow.established:
                    flow.established = True
                    self.half_open -= 1
                events.append(TcpFlowEvent(flow, kind))
        if conn.state == CLOSED:
            self._remove(flow)
        else:
            self._schedule(flow)

    def output_packets(self) -> List[bytes]:
        """Packets to write to the TUN. Call after each input batch and after any call that
        can produce output (accept/refuse/tcp_*/send_udp/on_timer)."""
        out = self._take_output()
        return [p if type(p) is bytes else p[0] + p[1] for p in out]

    def output_iovecs(self) -> List[tuple]:
        """Like output_packets(), but each packet as a tuple of buffers for os.writev(): a
        large TCP payload is not copied once more to join it to its headers."""
        out = self._take_output()
        return [(p,) if type(p) is bytes else p for p in out]

    def _take_output(self) -> list:
        self._flush()
        out = self._out
        if out:
            self._out = []
            self.packets_out += len(out)
            n = 0
            for p in out:
                n += len(p) if type(p) is bytes else len(p[0]) + len(p[1])
            self.bytes_out += n
        return out

    def pop_events(self) -> list:
        self._flush()
        ev = self._events
        self._events = []
        return ev

    # --------------------------------------------------------------------------- TCP API

    def _touch(self, flow: TcpFlow) -> None:
        if not flow.dirty and not flow.removed:
            flow.dirty = True
            self._dirty.append(flow)

    def accept(self, flow: TcpFlow, now: float) -> None:
        """The upstream connected: send the SYN-ACK."""
        self._now = now
        if flow.removed or not flow.pending:
            return
        flow.pending = False
        flow.accept_deadline = None
        flow.conn.accept(now)
        self._touch(flow)

    def refuse(self, flow: TcpFlow, now: float) -> None:
        """Answer the SYN with a RST (the app sees ECONNREFUSED)."""
        self._now = now
        if flow.removed:
            return
        flow.conn.refuse(now)
        self._touch(flow)

    def unreachable(self, flow: TcpFlow, now: float, code: str = "host") -> None:
        """Answer the SYN with ICMP destination unreachable ('net', 'host', 'port', 'admin',
        'timeout') quoting it, and forget the flow."""
        self._now = now
        if flow.removed:
            return
        if flow.syn_quote:
            src = _pton(flow.dst[0])
            self._emit(wire.build_unreachable(src, flow.out_dst, code, flow.syn_quote,
                                              vnet=self._vnet))
            self.icmp_out += 1
        self._remove(flow)

    def tcp_send(self, flow: TcpFlow, data, now: float) -> int:
        self._now = now
        if flow.removed:
            return 0
        n = flow.conn.send(data)
        if n:
            self._touch(flow)
        return n

    def tcp_send_space(self, flow: TcpFlow) -> int:
        return 0 if flow.removed else flow.conn.send_space()

    def tcp_recv(self, flow: TcpFlow, max_bytes: int = -1) -> bytes:
        if flow.removed:
            return b""
        data = flow.conn.recv(max_bytes)
        if data:
            self._touch(flow)  # the window may have opened: a window update may be due
        return data

    def tcp_shutdown(self, flow: TcpFlow, now: float) -> None:
        self._now = now
        if not flow.removed:
            flow.conn.shutdown(now)
            self._touch(flow)

    def tcp_abort(self, flow: TcpFlow, now: float) -> None:
        self._now = now
        if not flow.removed:
            flow.conn.abort(now)
            self._touch(flow)

    def open_tcp(self, local: Addr, remote: Addr, now: float) -> TcpFlow:
        """Active open from `local` to `remote` (port 0 in `local` picks a free one)."""
        self._now = now
        laddr, raddr = _pton(local[0]), _pton(remote[0])
        lport = local[1]
        if lport == 0:
            base = int.from_bytes(os.urandom(2), "big")
            for i in range(28232):
                lport = 32768 + (base + i) % 28232
                if (raddr, remote[1], laddr, lport) not in self._tcp:
                    break
            else:
                raise OSError("no free local port")
        key = (raddr, remote[1], laddr, lport)
        if key in self._tcp:
            raise OSError(f"4-tuple {local} -> {remote} in use")
        if len(self._tcp) >= self.config.max_tcp_flows and not self._evict_time_wait():
            raise OSError("TCP flow table full")
        flow = TcpFlow(next(self._ids), (local[0], lport), remote, key)
        flow.conn = TcpConnection.connect(now, self._tcp_cfg[4 if len(laddr) == 4 else 6],
                                          self._isn(key, now))
        self._tcp[key] = flow
        self.half_open += 1
        self.tcp_flows_total += 1
        self._touch(flow)
        return flow

    def _remove(self, flow: TcpFlow) -> None:
        if flow.removed:
            return
        flow.removed = True
        if flow.conn.state != CLOSED:
            # Gone without the connection reaching CLOSED itself (unreachable, accept
            # timeout, TIME_WAIT cut short): still give the relay its 'closed'.
            self._events.append(TcpFlowEvent(flow, "closed"))
        if self._tcp.get(flow.key) is flow:
            del self._tcp[flow.key]
        if not flow.established:
            self.half_open -= 1

    # --------------------------------------------------------------------------- UDP API

    def send_udp(self, src: Addr, dst: Addr, payload) -> None:
        """A datagram towards the namespace: `src` is the remote endpoint, `dst` the app's."""
        s, d = _pton(src[0]), _pton(dst[0])
        flow = self._udp.get((d, dst[1], s, src[1]))
        if flow is not None:
            flow.last = self._now
            self._udp.move_to_end(flow.key)
        self._emit(wire.build_udp(s, d, src[1], dst[1], payload, vnet=self._vnet))

    def udp_unreachable(self, dgram: UdpDatagram) -> None:
        """ICMP port unreachable for a datagram from the namespace (the app sees
        ECONNREFUSED on a connected socket)."""
        flow = dgram.flow
        app, remote = flow.key[0], flow.key[2]
        # Rebuild the datagram as the app sent it: the quote must match its socket.
        original = wire.build_udp(app, remote, flow.src[1], flow.dst[1], dgram.payload)
        self._emit(wire.build_unreachable(remote, app, "port", original, vnet=self._vnet))
        self.icmp_out += 1

    def close_udp(self, flow: UdpFlow) -> None:
        """Forget a UDP flow now (the relay closed its socket)."""
        if self._udp.get(flow.key) is flow:
            del self._udp[flow.key]

    # --------------------------------------------------------------------------- timers

    def _schedule(self, flow: TcpFlow) -> None:
        d = flow.conn.next_deadline()
        ad = flow.accept_deadline
        if ad is not None and (d is None or ad < d):
            d = ad
        if d is not None and (flow.heap_deadline is None or d < flow.heap_deadline):
            flow.heap_deadline = d
            heapq.heappush(self._heap, (d, next(self._heap_seq), flow))

    def next_deadline(self) -> float | None:
        """Earliest time on_timer() has work to do (None: nothing scheduled)."""
        heap = self._heap
        while heap and (heap[0][2].removed or heap[0][0] != heap[0][2].heap_deadline):
            heapq.heappop(heap)  # stale: superseded by an earlier entry or flow gone
        best = heap[0][0] if heap else None
        if self._udp:
            first = next(iter(self._udp.values()))
            d = first.last + self.config.udp_idle_timeout
            if best is None or d < best:
                best = d
        return best

    def on_timer(self, now: float) -> None:
        self._now = now
        heap = self._heap
        while heap and heap[0][0] <= now:
            d, _, flow = heapq.heappop(heap)
            if flow.removed or d != flow.heap_deadline:
                continue
            flow.heap_deadline = None
            if flow.pending and flow.accept_deadline is not None and now >= flow.accept_deadline:
                self._events.append(TcpFlowEvent(flow, "timeout"))
                self.unreachable(flow, now, "timeout")
                continue
            cd = flow.conn.next_deadline()
            if cd is not None and cd <= now:
                flow.conn.on_timer(now)
            self._touch(flow)
        # _touch()ed flows are flushed (and rescheduled) by output_packets()/pop_events();
        # flush here so next_deadline() is right even if the caller asks it first.
        self._flush()
        limit = now - self.config.udp_idle_timeout
        udp = self._udp
        while udp:
            flow = next(iter(udp.values()))
            if flow.last > limit:
                break
            udp.popitem(last=False)
            self._events.append(UdpFlowClosed(flow))

    # --------------------------------------------------------------------------- status

    @property
    def counters(self) -> dict:
        return {
            "packets_in": self.packets_in,
            "bytes_in": self.bytes_in,
            "packets_out": self.packets_out,
            "bytes_out": self.bytes_out,
            "tcp_flows": len(self._tcp),
            "tcp_half_open": self.half_open,
            "tcp_flows_total": self.tcp_flows_total,
            "udp_flows": len(self._udp),
            "udp_flows_total": self.udp_flows_total,
            "rst_out": self.rst_out,
            "icmp_out": self.icmp_out,
            "drops": dict(self.drops),
        }

    def tcp_flows(self) -> List[TcpFlow]:
        return list(self._tcp.values())

    def udp_flows(self) -> List[UdpFlow]:
        return list(self._udp.values())
