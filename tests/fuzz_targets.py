"""Byte-driven fuzz targets shared by tests/test_fuzz.py (hypothesis, replay of saved crashes)
and scripts/fuzz_atheris.py (coverage-guided libFuzzer runs).

Each target takes one `bytes` and raises only when nsvpn has a bug: every input a hostile peer
could send must be either handled or refused with the documented error type. The input is
read through `Bytes`, which never runs dry (zeros after the end), so a fuzzer's mutation of
any byte changes what is exercised, and a saved crash input replays deterministically.

Targets (name -> what a hostile or broken party controls):
  wire          packet parsers (IP/TCP/UDP/ICMP, quoted headers, virtio-net header)
  stack         packets from CMD in the namespace into the userspace stack (passive opens)
  tcp           a peer driving one established connection segment by segment (TCP machine)
  vpn           packets from the VPN side into the active-open stack of the vpn upstream
  socks_client  replies of a SOCKS5 server to our client handshake (split at random points)
  socks_server  requests of a local client to the SOCKS5 front (server handshake)
  socks_udp     SOCKS5 UDP datagrams and address fields
  dns           queries from CMD to the virtual DNS server
  vpnenv        openconnect's script environment (server-pushed values)
"""

from __future__ import annotations

import os
import struct
from typing import Callable, Dict, List

from nsvpn import socks, vpnenv
from nsvpn.dns import DnsAnswerer, Reply, TcpDeframer
from nsvpn.netstack import wire
from nsvpn.netstack.segment import ACK, FIN, PSH, RST, SYN, TcpSegment
from nsvpn.netstack.stack import NewTcpFlow, Stack, StackConfig

REGRESSIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuzz_regressions")


class Bytes:
    """Sequential reader over the input; past the end it yields zeros / empty strings."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def left(self) -> int:
        return max(0, len(self.data) - self.pos)

    def u8(self) -> int:
        if self.pos >= len(self.data):
            self.pos += 1
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def u16(self) -> int:
        return (self.u8() << 8) | self.u8()

    def u32(self) -> int:
        return (self.u16() << 16) | self.u16()

    def take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def blob(self, limit: int) -> bytes:
        """A length byte (mod limit+1), then that many bytes."""
        return self.take(self.u8() % (limit + 1))

    def rest(self) -> bytes:
        out = self.data[self.pos:]
        self.pos = len(self.data)
        return out


def _fix_ip4_checksum(pkt: bytearray, off: int = 0) -> None:
    """Recompute an IPv4 header checksum so a mutation gets past the first check."""
    if len(pkt) >= off + 20 and pkt[off] >> 4 == 4:
        hl = (pkt[off] & 0x0F) * 4
        if 20 <= hl <= len(pkt) - off:
            pkt[off + 10:off + 12] = b"\0\0"
            pkt[off + 10:off + 12] = struct.pack("!H", wire.checksum(pkt[off:off + hl]))


def _packets(b: Bytes, fix: bool, hdr: int = 0) -> List[bytes]:
    """Up to 8 packets, each a 16-bit length and that many bytes (checksums fixed if asked)."""
    out = []
    while b.left() and len(out) < 8:
        p = bytearray(b.take(b.u16() % 1600))
        if fix:
            _fix_ip4_checksum(p, hdr)
        out.append(bytes(p))
    return out


# ------------------------------------------------------------------------------ targets

def t_wire(data: bytes) -> None:
    b = Bytes(data)
    flags = b.u8()
    drops: Dict[str, int] = {}
    buf = bytearray(b.rest())
    if flags & 1:
        _fix_ip4_checksum(buf)
    mv = memoryview(bytes(buf))
    if flags & 4:
        parsed = wire.parse_vnet(mv, drops)
        if parsed is None:
            return
        mv = parsed[1]
    ip = wire.parse_ip(mv, drops, bool(flags & 2))
    if ip is None:
        assert drops, "a refused packet counts a drop reason"
        return
    assert len(ip.payload) <= len(mv) and ip.version in (4, 6)
    verify = bool(flags & 8)
    if ip.proto == wire.PROTO_TCP:
        r = wire.parse_tcp(ip, drops, verify)
        if r is not None:
            assert 0 <= r[0] <= 65535 and 0 <= r[1] <= 65535
            wire.tcp_options(r[2])
        if ip.version == 4:
            wire.parse_tcp4_fast(mv, verify, bool(flags & 2))
    elif ip.proto == wire.PROTO_UDP:
        r = wire.parse_udp(ip, drops, verify)
        if r is not None:
            assert len(r[2]) <= len(ip.payload)
    elif ip.proto in (wire.PROTO_ICMP, wire.PROTO_ICMPV6):
        m = wire.parse_icmp(ip, drops)
        if m is not None:
            wire.parse_quoted(m.body, drops)


def _run_stack(st: Stack, packets: List[bytes], now: float, hdr: int, accept: bool) -> None:
    for i, p in enumerate(packets):
        st.input_packet(p, now + i * 0.01)
        for ev in st.pop_events():
            if isinstance(ev, NewTcpFlow) and accept:
                st.accept(ev.flow, now)
        for out in st.output_packets():
            assert wire.parse_ip(memoryview(out)[hdr:], {}, True) is not None, out.hex()
    st.on_timer(now + 300.0)
    st.pop_events()
    st.output_packets()
    c = st.counters
    assert 0 <= c["tcp_half_open"] <= st.config.max_half_open


def t_stack(data: bytes) -> None:
    b = Bytes(data)
    flags = b.u8()
    vnet = bool(flags & 4)
    hdr = wire.VNET_HDR_LEN if vnet else 0
    st = Stack(StackConfig(vnet_hdr=vnet, verify_checksums=bool(flags & 2),
                           max_half_open=1 + (flags >> 4)))
    _run_stack(st, _packets(b, bool(flags & 1), hdr), 1.0, hdr, bool(flags & 8))


APP4, REMOTE4 = bytes([10, 0, 2, 100]), bytes([172, 31, 2, 2])
APP6 = bytes.fromhex("fd000000000000000000000000000100")
REMOTE6 = bytes.fromhex("20010db8000000000000000000000001")


def _segment(b: Bytes, base_seq: int, base_ack: int) -> TcpSegment:
    """A well-formed segment whose fields the input picks near the live sequence numbers."""
    kind = b.u8()
    flags = b.u8() if kind & 0x80 else (ACK | (b.u8() & (FIN | PSH | RST | SYN)))
    seq = (base_seq + (b.u16() - 0x8000 if kind & 1 else b.u8())) & 0xFFFFFFFF
    ack = (base_ack + (b.u16() - 0x8000 if kind & 2 else b.u8() - 4)) & 0xFFFFFFFF
    seg = TcpSegment(seq, ack, flags, b.u16(), b.blob(200) * (1 + (kind >> 4 & 3)))
    if kind & 4:
        seg.ts_val, seg.ts_ecr = b.u32(), b.u32()
    if kind & 8:
        n = b.u8() % 4
        seg.sack_blocks = [((base_ack + b.u16()) & 0xFFFFFFFF,
                            (base_ack + b.u16()) & 0xFFFFFFFF) for _ in range(n)] or None
    if flags & SYN and kind & 0x40:
        seg.mss, seg.wscale, seg.sack_perm = b.u16(), b.u8() % 20, True
    return seg


def _drive_peer(st: Stack, flow, b: Bytes, src: bytes, dst: bytes, sport: int, dport: int,
                now: float, raw: bool) -> None:
    """Up to 40 steps: a segment from the peer, an app action, a timer, or a raw packet."""
    for _step in range(40):
        if not b.left():
            break
        now += (b.u8() % 16) * 0.05
        op = b.u8() % 8
        conn = flow.conn
        if op <= 3:
            seg = _segment(b, conn.rcv_nxt, conn.snd_nxt)
            st.input_packet(wire.build_tcp(src, dst, sport, dport, seg), now)
        elif op == 4:
            st.tcp_send(flow, b.blob(255) * (1 + b.u8() % 64), now)
        elif op == 5:
            st.tcp_recv(flow, b.u16() or -1)
        elif op == 6:
            (st.tcp_shutdown if b.u8() & 1 else st.tcp_abort)(flow, now)
        elif raw:
            p = bytearray(b.blob(200))
            _fix_ip4_checksum(p)
            st.input_packet(bytes(p), now)
        else:
            st.on_timer(now + b.u8())
        st.pop_events()
        for out in st.output_packets():
            assert wire.parse_ip(memoryview(out), {}, True) is not None, out.hex()
    st.on_timer(now + 1000.0)
    st.pop_events()
    st.output_packets()


def t_tcp(data: bytes) -> None:
    """Namespace side: the app's kernel TCP opened a connection we accepted; from there
    on the input is the app (segments) and the upstream side (send/recv/shutdown)."""
    b = Bytes(data)
    v6 = b.u8() & 1
    src, dst = (APP6, REMOTE6) if v6 else (APP4, REMOTE4)
    st = Stack(StackConfig(verify_checksums=False))
    syn = TcpSegment(1000, 0, SYN, 65535, mss=1400, wscale=7, sack_perm=True, ts_val=1,
                     ts_ecr=0)
    st.input_packet(wire.build_tcp(src, dst, 40000, 80, syn), 1.0)
    (ev,) = st.pop_events()
    st.accept(ev.flow, 1.0)
    (synack,) = st.output_packets()
    ip = wire.parse_ip(memoryview(synack), {}, False)
    seg = wire.parse_tcp(ip, {}, True)[2]
    st.input_packet(wire.build_tcp(src, dst, 40000, 80,
                                   TcpSegment(1001, seg.seq + 1, ACK, 512, ts_val=2,
                                              ts_ecr=seg.ts_val)), 1.0)
    st.pop_events()
    _drive_peer(st, ev.flow, b, src, dst, 40000, 80, 1.0, True)


def t_vpn(data: bytes) -> None:
    """VPN side (preload/vpn mode): our active open over VPNFD; the input is the far end
    (and whatever else arrives on VPNFD), checksums not verified as in vpnstack."""
    b = Bytes(data)
    mode = b.u8()
    me, peer = (APP6, REMOTE6) if mode & 1 else (APP4, REMOTE4)
    st = Stack(StackConfig(net="0.0.0.0/0", gateway=".".join(map(str, APP4)), dns="",
                           net6="::1/128", gateway6="fd00::100", dns6="", mtu=1400,
                           tun_queue_len=1 << 20, verify_checksums=False))
    local = (wire_ntop(me), 0)
    flow = st.open_tcp(local, (wire_ntop(peer), 443), 1.0)
    st.output_packets()
    if mode & 2:  # the raw stream only: whatever VPNFD delivers
        _run_stack(st, _packets(b, True), 1.0, 0, False)
        return
    _drive_peer(st, flow, b, peer, me, 443, flow.src[1], 1.0, bool(mode & 4))


def wire_ntop(a: bytes) -> str:
    import ipaddress

    return str(ipaddress.ip_address(a))


def t_socks_client(data: bytes) -> None:
    b = Bytes(data)
    mode = b.u8()
    auth = bool(mode & 1)
    host = ("example.org", "10.0.0.1", "fd00::1", "h" * 63 + ".example")[mode >> 1 & 3]
    hs = socks.ClientHandshake((socks.CMD_CONNECT, socks.CMD_UDP_ASSOCIATE)[mode >> 3 & 1],
                               host, 443, username="u" if auth else None,
                               password="p" if auth else None)
    hs.data_to_send()
    reply = b.rest()
    cuts = sorted(set(x for x in reply[:4]))
    pos = 0
    for c in cuts + [len(reply)]:
        chunk, pos = reply[pos:c], max(pos, c)
        try:
            hs.receive_data(chunk)
        except socks.SocksError as e:
            assert isinstance(e.errno, int)
            return
        hs.data_to_send()
    if hs.reply is not None:
        assert isinstance(hs.reply.code, int)


def t_socks_server(data: bytes) -> None:
    b = Bytes(data)
    mode = b.u8()
    creds = ("u", "p") if mode & 1 else None
    hs = socks.ServerHandshake(credentials=creds)
    req = b.rest()
    pos = 0
    for c in sorted(set(req[:3])) + [len(req)]:
        chunk, pos = req[pos:c], max(pos, c)
        try:
            hs.receive_data(chunk)
        except socks.SocksError:
            hs.data_to_send()
            return
        hs.data_to_send()
    if hs.request is not None:
        r = hs.request
        assert 0 <= r.port <= 65535 and isinstance(r.host, str)
        if creds is not None:
            assert hs.username == "u"


def t_socks_udp(data: bytes) -> None:
    try:
        d = socks.decode_udp(data)
    except socks.SocksError:
        pass
    else:
        assert 0 <= d.port <= 65535
    for off in range(0, min(len(data), 4)):
        try:
            r = socks.decode_address(data, off)
        except socks.SocksError as e:
            assert e.reply_code in (socks.REP_GENERAL_FAILURE,
                                    socks.REP_ADDRESS_TYPE_NOT_SUPPORTED)
            continue
        if r is not None:
            _host, port, _atyp, end = r
            assert 0 <= port <= 65535 and off < end <= len(data)


_ANSWERER: List[DnsAnswerer] = []


def t_dns(data: bytes) -> None:
    b = Bytes(data)
    mode = b.u8()
    # A long-lived answerer, as in a session (its fake-IP table fills up across queries),
    # and now and then a fresh one.
    if not _ANSWERER or mode & 0x80:
        _ANSWERER[:] = [DnsAnswerer(local_net="10.0.2.0/24",
                                    local_names={"10.0.2.100": "node"})]
    a = _ANSWERER[0]
    q = b.rest()
    if mode & 2:
        d = TcpDeframer()
        msgs = []
        for i in range(0, len(q), 7):
            msgs += d.feed(q[i:i + 7])
        queries = msgs
    else:
        queries = [q]
    for query in queries:
        step = a.handle_query(query, tcp=bool(mode & 1))
        if isinstance(step, Reply):
            assert len(step.wire) >= 12 and step.wire[:2] == query[:2]


VPN_KEYS = ["INTERNAL_IP4_ADDRESS", "INTERNAL_IP4_NETMASK", "INTERNAL_IP4_NETADDR",
            "INTERNAL_IP4_DNS", "INTERNAL_IP4_MTU", "INTERNAL_IP6_ADDRESS",
            "INTERNAL_IP6_NETMASK", "INTERNAL_IP6_DNS", "CISCO_DEF_DOMAIN",
            "CISCO_SPLIT_INC", "CISCO_SPLIT_INC_0_ADDR", "CISCO_SPLIT_INC_0_MASK",
            "CISCO_SPLIT_INC_0_MASKLEN", "CISCO_SPLIT_EXC", "CISCO_SPLIT_EXC_0_ADDR",
            "CISCO_SPLIT_EXC_0_MASKLEN", "CISCO_IPV6_SPLIT_INC", "CISCO_IPV6_SPLIT_INC_0_ADDR",
            "CISCO_IPV6_SPLIT_INC_0_MASKLEN", "TUNDEV", "VPNGATEWAY", "CISCO_SPLIT_DNS"]


def t_vpnenv(data: bytes) -> None:
    b = Bytes(data)
    env = {}
    if b.u8() & 1:
        env = {"INTERNAL_IP4_ADDRESS": "10.77.0.5", "INTERNAL_IP4_MTU": "1434"}
    while b.left():
        key = VPN_KEYS[b.u8() % len(VPN_KEYS)]
        env[key] = b.blob(40).decode("utf-8", "replace")
    try:
        v = vpnenv.parse_vpn_env(env)
    except vpnenv.VpnEnvError:
        return
    v.routes4()
    v.routes6()
    v.resolv_conf()
    v.summary()
    assert 0 < v.link_mtu() <= 65535


TARGETS: Dict[str, Callable[[bytes], None]] = {
    "wire": t_wire, "stack": t_stack, "tcp": t_tcp, "vpn": t_vpn,
    "socks_client": t_socks_client, "socks_server": t_socks_server,
    "socks_udp": t_socks_udp, "dns": t_dns, "vpnenv": t_vpnenv,
}


# ------------------------------------------------------------------------------ seeds

def _len_prefixed(pkts: List[bytes]) -> bytes:
    return b"".join(struct.pack("!H", len(p)) + p for p in pkts)


def seeds(name: str) -> List[bytes]:
    """Well-formed starting inputs for a target (a corpus for coverage-guided fuzzing)."""
    tcp = TcpSegment(1000, 0, SYN, 65535, mss=1460, wscale=7, sack_perm=True, ts_val=1,
                     ts_ecr=0)
    syn4 = wire.build_tcp(APP4, REMOTE4, 40000, 80, tcp)
    syn6 = wire.build_tcp(APP6, REMOTE6, 40000, 80, tcp)
    data4 = wire.build_tcp(APP4, REMOTE4, 40000, 80, TcpSegment(1001, 5, ACK | PSH, 512,
                                                                b"GET / HTTP/1.0\r\n\r\n"))
    udp4 = wire.build_udp(APP4, bytes([10, 0, 2, 3]), 3333, 53, b"\x12\x34\x01\x00" + b"\0" * 8)
    ping = wire.build_icmp(APP4, bytes([10, 0, 2, 2]), 8, 0, 0x70001, b"ping")
    unreach = wire.build_unreachable(REMOTE4, APP4, "port", syn4)
    if name == "wire":
        return [bytes([f]) + p for f in (0, 8) for p in (syn4, syn6, data4, udp4, ping, unreach)]
    if name == "stack":
        return [bytes([f]) + _len_prefixed(ps) for f in (2, 8, 10)
                for ps in ([syn4], [syn4, data4], [udp4, ping], [syn6], [unreach])]
    if name in ("tcp", "vpn"):
        # op 0 = a segment: delay, op, kind, flags, seq, ack, window, payload
        seg = bytes([0, 0, 0, 0, 0, 4, 0xFF, 0xFF, 5]) + b"hello"
        fin = bytes([0, 0, 0, FIN, 0, 4, 0xFF, 0xFF, 0])
        # a SYN-ACK with options: kind 0x40, flags SYN(|ACK), seq, ack, window, no payload,
        # mss, wscale
        synack = bytes([0, 0, 0x40, SYN, 0, 4, 0xFF, 0xFF, 0, 0x05, 0x78, 7])
        out = [bytes([m]) + seg * k + fin for m in (0, 1, 4) for k in (1, 3)]
        if name == "vpn":
            out += [bytes([m]) + synack + seg * 2 + fin for m in (0, 1, 4)]
        return out + [b"\x02" + _len_prefixed([unreach])]
    if name == "socks_client":
        return [bytes([m]) + r for m, r in (
            (0, b"\x05\x00\x05\x00\x00\x01\x7f\x00\x00\x01\x00\x50"),
            (1, b"\x05\x02\x01\x00\x05\x00\x00\x03\x03abc\x00\x50"),
            (0, b"\x05\x00\x05\x05\x00\x04" + b"\0" * 16 + b"\x00\x50"))]
    if name == "socks_server":
        return [bytes([m]) + r for m, r in (
            (0, b"\x05\x01\x00\x05\x01\x00\x01\x0a\x00\x00\x01\x01\xbb"),
            (1, b"\x05\x01\x02\x01\x01u\x01p\x05\x01\x00\x03\x0bexample.org\x00\x50"),
            (0, b"\x05\x01\x00\x05\x03\x00\x04" + b"\0" * 15 + b"\x01\x00\x35"))]
    if name == "socks_udp":
        return [b"\0\0\0\x01\x0a\0\0\x01\0\x35payload", b"\0\0\0\x03\x03abc\0\x50x"]
    if name == "dns":
        import dns.message
        import dns.rdatatype

        out = []
        for qn, rdt in (("remote.lab", "A"), ("x.example", "AAAA"),
                        ("100.2.0.10.in-addr.arpa", "PTR"), ("a.b", "MX"), ("node", "A")):
            w = dns.message.make_query(qn, dns.rdatatype.from_text(rdt), use_edns=True).to_wire()
            out += [b"\0" + w, b"\x03" + struct.pack("!H", len(w)) + w]
        return out
    if name == "vpnenv":
        return [b"\x01", b"\x00\x00\x0910.77.0.5\x04\x041434\x09\x0910.0.2.0"]
    return [b""]


def regression_inputs() -> List[tuple]:
    """(target, file) for every saved crash input in tests/fuzz_regressions/<target>/."""
    out = []
    if os.path.isdir(REGRESSIONS):
        for t in sorted(os.listdir(REGRESSIONS)):
            d = os.path.join(REGRESSIONS, t)
            if t in TARGETS and os.path.isdir(d):
                out += [(t, os.path.join(d, f)) for f in sorted(os.listdir(d))]
    return out
