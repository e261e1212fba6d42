"""wire.py against scapy: scapy crafts what we parse and parses (and checks) what we emit."""

from __future__ import annotations

import os
import random
import struct

import pytest
from scapy.all import ICMP, IP, TCP, UDP, Raw  # noqa: F401  (scapy layers)
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
)
from scapy.utils import checksum as scapy_checksum

from nsvpn.netstack import wire
from nsvpn.netstack.segment import ACK, FIN, PSH, RST, SYN, TcpSegment

A4 = bytes([10, 0, 2, 100])
B4 = bytes([93, 184, 216, 34])
A6 = bytes.fromhex("fd000000000000000000000000000064")
B6 = bytes.fromhex("20010db8000000000000000000000001")


def ip4(b: bytes) -> str:
    return ".".join(str(x) for x in b)


def ip6(b: bytes) -> str:
    import socket

    return socket.inet_ntop(socket.AF_INET6, b)


def parse(raw, **kw):
    drops: dict = {}
    ip = wire.parse_ip(memoryview(raw), drops, **kw)
    return ip, drops


# --------------------------------------------------------------------------------- checksums


@pytest.mark.parametrize("n", [0, 1, 2, 3, 19, 20, 1459, 1460, 4095, 4096, 4097, 4098, 8193,
                               65535, 65536])
def test_checksum_matches_scapy(n):
    rnd = random.Random(n)
    data = bytes(rnd.getrandbits(8) for _ in range(n))
    assert wire.checksum(data) == scapy_checksum(data)


def test_checksum_edge_values():
    assert wire.checksum(b"") == 0xFFFF
    assert wire.checksum(b"\xff\xff") == 0
    assert wire.checksum(b"\x00\x00") == 0xFFFF
    # A buffer with its checksum in place sums to 0xffff, so checksumming it again gives 0.
    body = os.urandom(101)
    ck = wire.checksum(body + b"\x00\x00\x00")
    fixed = body + b"\x00" + struct.pack("!H", ck)
    assert wire.checksum(fixed) == 0


# --------------------------------------------------------------------------------- parse TCP


def test_parse_ipv4_tcp_all_options():
    pkt = IP(src=ip4(A4), dst=ip4(B4), ttl=61) / TCP(
        sport=40000, dport=443, seq=123456789, ack=987654321, flags="SA", window=29200,
        options=[("MSS", 1460), ("SAckOK", b""), ("Timestamp", (11, 22)), ("NOP", None),
                 ("WScale", 7), (254, b"\x01\x02"), ("EOL", None)],
    ) / Raw(b"hello")
    ip, drops = parse(bytes(pkt))
    assert drops == {}
    assert (ip.version, ip.src, ip.dst, ip.proto, ip.ttl) == (4, A4, B4, 6, 61)
    sport, dport, seg = wire.parse_tcp(ip, drops)
    assert (sport, dport) == (40000, 443)
    assert (seg.seq, seg.ack, seg.window) == (123456789, 987654321, 29200)
    assert seg.flags == SYN | ACK
    assert (seg.mss, seg.wscale, seg.sack_perm) == (1460, 7, True)
    assert (seg.ts_val, seg.ts_ecr) == (11, 22)
    assert seg.sack_blocks is None
    assert isinstance(seg.payload, memoryview) and bytes(seg.payload) == b"hello"


def test_parse_sack_blocks():
    pkt = IP(src=ip4(A4), dst=ip4(B4)) / TCP(flags="A", options=[
        ("NOP", None), ("NOP", None), ("SAck", (100, 200, 300, 400, 500, 600))])
    ip, drops = parse(bytes(pkt))
    assert wire.parse_tcp(ip, drops)[2].sack_blocks == [(100, 200), (300, 400), (500, 600)]


def test_parse_timestamp_fast_path_and_no_options():
    pkt = IP(src=ip4(A4), dst=ip4(B4)) / TCP(
        flags="PA", options=[("NOP", None), ("NOP", None), ("Timestamp", (7, 9))]) / (b"x" * 99)
    ip, drops = parse(bytes(pkt))
    _, _, seg = wire.parse_tcp(ip, drops)
    assert (seg.ts_val, seg.ts_ecr, seg.mss, seg.sack_blocks) == (7, 9, None, None)
    assert seg.flags == PSH | ACK and len(seg.payload) == 99
    ip, drops = parse(bytes(IP(src=ip4(A4), dst=ip4(B4)) / TCP(flags="F")))
    _, _, seg = wire.parse_tcp(ip, drops)
    assert seg.flags == FIN and seg.ts_val is None and len(seg.payload) == 0


def test_wscale_clamped_to_14():
    pkt = IP(src=ip4(A4), dst=ip4(B4)) / TCP(flags="S", options=[("WScale", 200)])
    ip, drops = parse(bytes(pkt))
    assert wire.parse_tcp(ip, drops)[2].wscale == 14


def test_parse_ipv6_tcp_with_extension_header():
    pkt = IPv6(src=ip6(A6), dst=ip6(B6), hlim=9) / IPv6ExtHdrHopByHop() / TCP(
        sport=1, dport=2, flags="S", options=[("MSS", 1440)]) / b"abc"
    ip, drops = parse(bytes(pkt))
    assert (ip.version, ip.src, ip.dst, ip.proto, ip.ttl) == (6, A6, B6, 6, 9)
    sport, dport, seg = wire.parse_tcp(ip, drops)
    assert (sport, dport, seg.mss, bytes(seg.payload)) == (1, 2, 1440, b"abc")
    assert drops == {}


def test_ip_payload_trimmed_to_total_length():
    raw = bytes(IP(src=ip4(A4), dst=ip4(B4)) / UDP(sport=5, dport=6) / b"data") + b"\0" * 7
    ip, drops = parse(raw)
    assert wire.parse_udp(ip, drops)[2].tobytes() == b"data"


def test_ipv4_options_skipped():
    pkt = IP(src=ip4(A4), dst=ip4(B4), options=[b"\x01\x01\x01\x00"]) / UDP(sport=5, dport=6) / b"q"
    ip, drops = parse(bytes(pkt))
    assert len(ip.header) == 24
    assert wire.parse_udp(ip, drops)[2].tobytes() == b"q"


# --------------------------------------------------------------------------------- parse UDP/ICMP


@pytest.mark.parametrize("v6", [False, True])
def test_parse_udp(v6):
    lay = IPv6(src=ip6(A6), dst=ip6(B6)) if v6 else IP(src=ip4(A4), dst=ip4(B4))
    ip, drops = parse(bytes(lay / UDP(sport=5353, dport=53) / (b"z" * 333)))
    sport, dport, payload = wire.parse_udp(ip, drops)
    assert (sport, dport, payload.tobytes()) == (5353, 53, b"z" * 333)


def test_udp_zero_checksum_v4_accepted_v6_dropped():
    raw = bytearray(bytes(IP(src=ip4(A4), dst=ip4(B4)) / UDP(sport=1, dport=2) / b"abc"))
    raw[26:28] = b"\0\0"
    ip, drops = parse(bytes(raw))
    assert wire.parse_udp(ip, drops) is not None
    raw6 = bytearray(bytes(IPv6(src=ip6(A6), dst=ip6(B6)) / UDP(sport=1, dport=2) / b"abc"))
    raw6[46:48] = b"\0\0"
    ip, drops = parse(bytes(raw6))
    assert wire.parse_udp(ip, drops) is None and drops == {"udp_bad_checksum": 1}


def test_parse_icmp_echo_v4_and_v6():
    ip, drops = parse(bytes(IP(src=ip4(A4), dst=ip4(B4)) / ICMP(type=8, id=77, seq=3) / b"ping"))
    m = wire.parse_icmp(ip, drops)
    assert (m.type, m.code, m.ident, m.seq, m.body.tobytes()) == (8, 0, 77, 3, b"ping")
    ip, drops = parse(bytes(IPv6(src=ip6(A6), dst=ip6(B6)) / ICMPv6EchoRequest(id=5, seq=6,
                                                                               data=b"p6")))
    m = wire.parse_icmp(ip, drops)
    assert (m.type, m.ident, m.seq, m.body.tobytes()) == (128, 5, 6, b"p6")


def test_icmpv6_checksum_covers_pseudo_header():
    raw = bytes(IPv6(src=ip6(A6), dst=ip6(B6)) / ICMPv6EchoRequest(id=5, seq=6))
    # Same message, other source address: the stale checksum must now fail.
    bad = raw[:8] + B6 + raw[24:]
    ip, drops = parse(bad)
    assert wire.parse_icmp(ip, drops) is None and drops == {"icmp_bad_checksum": 1}


def test_parse_unreachable_quote():
    inner = IP(src=ip4(B4), dst=ip4(A4)) / UDP(sport=53, dport=40001) / b"answer"
    pkt = IP(src=ip4(A4), dst=ip4(B4)) / ICMP(type=3, code=3) / bytes(inner)[:28]
    ip, drops = parse(bytes(pkt))
    m = wire.parse_icmp(ip, drops)
    q = wire.parse_quoted(m.body, drops)
    assert (m.type, m.code) == (3, 3)
    assert (q.version, q.src, q.dst, q.proto, q.sport, q.dport) == (4, B4, A4, 17, 53, 40001)
    inner6 = IPv6(src=ip6(B6), dst=ip6(A6)) / TCP(sport=80, dport=999)
    ip, drops = parse(bytes(IPv6(src=ip6(A6), dst=ip6(B6)) / ICMPv6DestUnreach(code=4)
                            / bytes(inner6)))
    q = wire.parse_quoted(wire.parse_icmp(ip, drops).body, drops)
    assert (q.version, q.src, q.proto, q.sport, q.dport) == (6, B6, 6, 80, 999)
    assert wire.parse_quoted(b"\x45" + b"\0" * 10, drops) is None


# --------------------------------------------------------------------------------- malformed


def _tcp4(**kw):
    return bytearray(bytes(IP(src=ip4(A4), dst=ip4(B4)) / TCP(**kw) / b"payload"))


def _mutate(raw: bytearray, off: int, val: bytes) -> bytes:
    raw[off:off + len(val)] = val
    return bytes(raw)


def _fix_ip_ck(raw: bytearray) -> bytes:
    raw[10:12] = b"\0\0"
    raw[10:12] = struct.pack("!H", wire.checksum(bytes(raw[:20])))
    return bytes(raw)


IP_CASES = [
    (b"", "empty"),
    (b"\x45" + b"\0" * 10, "ipv4_truncated"),
    (_fix_ip_ck(bytearray(_mutate(_tcp4(), 0, b"\x44"))), "ipv4_bad_ihl"),
    (_fix_ip_ck(bytearray(_mutate(_tcp4(), 2, b"\x04\x00"))), "ipv4_truncated"),
    (_fix_ip_ck(bytearray(_mutate(_tcp4(), 2, b"\x00\x10"))), "ipv4_bad_length"),
    (_mutate(_tcp4(), 10, b"\x12\x34"), "ipv4_bad_checksum"),
    (bytes(IP(src=ip4(A4), dst=ip4(B4), flags="MF") / UDP() / b"x"), "ipv4_fragment"),
    (bytes(IP(src=ip4(A4), dst=ip4(B4), frag=10) / b"xxxxxxxx"), "ipv4_fragment"),
    (b"\x75" + b"\0" * 40, "bad_ip_version"),
    (bytes(IPv6(src=ip6(A6), dst=ip6(B6)) / UDP() / b"x")[:39], "ipv6_truncated"),
    (bytes(IPv6(src=ip6(A6), dst=ip6(B6)) / UDP() / b"xyz")[:-1], "ipv6_truncated"),
    (bytes(IPv6(src=ip6(A6), dst=ip6(B6)) / IPv6ExtHdrFragment() / UDP()), "ipv6_fragment"),
    (bytes(IPv6(src=ip6(A6), dst=ip6(B6), nh=0, plen=4) / b"\x06\x00\x00\x00"), "ipv6_bad_ext"),
]


@pytest.mark.parametrize("raw,reason", IP_CASES)
def test_bad_ip_dropped_by_reason(raw, reason):
    ip, drops = parse(raw)
    assert ip is None and drops == {reason: 1}


TCP_CASES = [
    (_mutate(_tcp4(), 32, b"\x40"), "tcp_bad_offset"),
    (_mutate(_tcp4(), 32, b"\xf0"), "tcp_truncated"),
    (_mutate(_tcp4(), 36, b"\xde\xad"), "tcp_bad_checksum"),
    (bytes(IP(src=ip4(A4), dst=ip4(B4), proto=6) / (b"\x00" * 12)), "tcp_truncated"),
    # option length running past the header
    (bytes(IP(src=ip4(A4), dst=ip4(B4)) / TCP(options=[(254, b"ab")]))[:-4]
     + b"\x02\x09\x00\x00", "tcp_bad_option"),
    # option length byte missing at the very end
    (bytes(IP(src=ip4(A4), dst=ip4(B4)) / TCP(options=[("NOP", None)] * 3 + [(2, b"")]))[:-1]
     + b"\x02", "tcp_bad_option"),
    # MSS with the wrong length, option length < 2
    (bytes(IP(src=ip4(A4), dst=ip4(B4)) / TCP(options=[(2, b"\x05\xb4\x00\x00")])),
     "tcp_bad_option"),
    (bytes(IP(src=ip4(A4), dst=ip4(B4)) / TCP()), None),
]


def _recksum_tcp(raw: bytes) -> bytes:
    """Re-checksum the TCP part so the only fault left is the one we planted."""
    p = IP(raw)
    if TCP in p:
        data = bytearray(raw[20:])
        data[16:18] = b"\0\0"
        ps = wire.pseudo_sum(raw[12:16], raw[16:20], 6, len(data))
        data[16:18] = struct.pack("!H", wire.checksum(bytes(data), ps))
        return raw[:20] + bytes(data)
    return raw


@pytest.mark.parametrize("raw,reason", TCP_CASES)
def test_bad_tcp_dropped_by_reason(raw, reason):
    if reason not in ("tcp_bad_checksum",):
        raw = _recksum_tcp(raw) if len(raw) >= 40 else raw
    ip, drops = parse(raw)
    assert ip is not None
    res = wire.parse_tcp(ip, drops)
    if reason is None:
        assert res is not None and drops == {}
    else:
        assert res is None and drops == {reason: 1}


def test_bad_checksum_ignored_when_not_verifying():
    raw = _mutate(_tcp4(), 36, b"\xde\xad")
    ip, drops = parse(raw)
    assert wire.parse_tcp(ip, drops, verify=False) is not None


@pytest.mark.parametrize("raw,reason", [
    (bytes(IP(src=ip4(A4), dst=ip4(B4), proto=17) / b"\0\0\0"), "udp_truncated"),
    (bytes(IP(src=ip4(A4), dst=ip4(B4)) / UDP(len=100) / b"abc"), "udp_bad_length"),
    (bytes(IP(src=ip4(A4), dst=ip4(B4)) / UDP(len=4) / b"abc"), "udp_bad_length"),
    (bytes(IP(src=ip4(A4), dst=ip4(B4)) / UDP(chksum=0x1234) / b"abc"), "udp_bad_checksum"),
])
def test_bad_udp_dropped(raw, reason):
    ip, drops = parse(raw)
    assert wire.parse_udp(ip, drops) is None and drops == {reason: 1}


@pytest.mark.parametrize("raw,reason", [
    (bytes(IP(src=ip4(A4), dst=ip4(B4), proto=1) / b"\x08\0\0"), "icmp_truncated"),
    (bytes(IP(src=ip4(A4), dst=ip4(B4)) / ICMP(chksum=1)), "icmp_bad_checksum"),
    (bytes(IPv6(src=ip6(A6), dst=ip6(B6)) / ICMPv6EchoRequest(cksum=7)), "icmp_bad_checksum"),
])
def test_bad_icmp_dropped(raw, reason):
    ip, drops = parse(raw)
    assert wire.parse_icmp(ip, drops) is None and drops == {reason: 1}


# --------------------------------------------------------------------------------- emit


def _scapy_ok(raw: bytes, layer):
    """scapy re-computes the checksum of `layer`; it must equal what we wrote."""
    p = (IP if raw[0] >> 4 == 4 else IPv6)(raw)
    got = p[layer].chksum if hasattr(p[layer], "chksum") else p[layer].cksum
    q = p.copy()
    if hasattr(q[layer], "chksum"):
        del q[layer].chksum
    else:
        del q[layer].cksum
    if IP in q:
        del q[IP].chksum
    q2 = (IP if raw[0] >> 4 == 4 else IPv6)(bytes(q))
    want = q2[layer].chksum if hasattr(q2[layer], "chksum") else q2[layer].cksum
    assert got == want
    if IP in p:
        assert p[IP].chksum == q2[IP].chksum
    return p


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("plen", [0, 1, 1460, 9001])
def test_build_tcp_parsed_by_scapy(v6, plen):
    src, dst = (A6, B6) if v6 else (A4, B4)
    payload = os.urandom(plen)
    seg = TcpSegment(0xFFFFFFF0, 42, SYN | ACK, 65535, payload, mss=1460, wscale=9,
                     sack_perm=True, ts_val=5, ts_ecr=6, sack_blocks=[(1, 2), (3, 4)])
    raw = wire.build_tcp(src, dst, 80, 50000, seg)
    p = _scapy_ok(raw, TCP)
    t = p[TCP]
    assert (t.sport, t.dport, t.seq, t.ack, t.window, int(t.flags)) == (80, 50000, 0xFFFFFFF0,
                                                                         42, 65535, SYN | ACK)
    opts = dict((k, v) for k, v in t.options if isinstance(k, str))
    assert opts["MSS"] == 1460 and opts["WScale"] == 9 and opts["Timestamp"] == (5, 6)
    assert "SAckOK" in opts and opts["SAck"] == (1, 2)  # room for one block beside the rest
    assert bytes(t.payload) == payload
    # and our own parser agrees
    ip, drops = parse(raw)
    _, _, back = wire.parse_tcp(ip, drops)
    assert (back.mss, back.wscale, back.sack_perm, back.ts_val, back.sack_blocks) == (
        1460, 9, True, 5, [(1, 2)])


def test_build_tcp_sack_blocks_limited_to_option_space():
    seg = TcpSegment(1, 2, ACK, 100, ts_val=1, ts_ecr=2,
                     sack_blocks=[(i, i + 1) for i in range(0, 10, 2)])
    raw = wire.build_tcp(A4, B4, 1, 2, seg)
    ip, drops = parse(raw)
    back = wire.parse_tcp(ip, drops)[2]
    assert len(back.sack_blocks) == 3 and (raw[32] >> 4) * 4 <= 60


@pytest.mark.parametrize("v6", [False, True])
def test_build_udp_and_rst_parsed_by_scapy(v6):
    src, dst = (A6, B6) if v6 else (A4, B4)
    raw = wire.build_udp(src, dst, 53, 33333, b"dns answer!")
    p = _scapy_ok(raw, UDP)
    assert (p[UDP].sport, p[UDP].dport, bytes(p[UDP].payload)) == (53, 33333, b"dns answer!")
    # RST for an unknown ACK segment: seq = their ack
    ip, drops = parse(wire.build_tcp(dst, src, 1000, 80, TcpSegment(5, 777, ACK, 10, b"xy")))
    sport, dport, seg = wire.parse_tcp(ip, drops)
    rst = wire.build_rst_for(ip, sport, dport, seg)
    p = _scapy_ok(rst, TCP)
    assert int(p[TCP].flags) == RST and p[TCP].seq == 777 and (p[TCP].sport, p[TCP].dport) == (
        80, 1000)
    # RST for a SYN: ack = seq + 1, RST|ACK
    ip, drops = parse(wire.build_tcp(dst, src, 1000, 80, TcpSegment(0xFFFFFFFF, 0, SYN, 10)))
    rst = wire.build_rst_for(ip, *wire.parse_tcp(ip, drops))
    p = _scapy_ok(rst, TCP)
    assert int(p[TCP].flags) == RST | ACK and p[TCP].ack == 0 and p[TCP].seq == 0
    ip, drops = parse(wire.build_tcp(dst, src, 1000, 80, TcpSegment(1, 0, RST, 0)))
    assert wire.build_rst_for(ip, *wire.parse_tcp(ip, drops)) is None


def test_build_icmp_echo_reply_v4_v6():
    raw = wire.build_icmp(A4, B4, wire.ICMP4_ECHO_REPLY, 0, (9 << 16) | 10, b"data")
    p = _scapy_ok(raw, ICMP)
    assert (p[ICMP].type, p[ICMP].id, p[ICMP].seq, bytes(p[ICMP].payload)) == (0, 9, 10, b"data")
    raw = wire.build_icmp(A6, B6, wire.ICMP6_ECHO_REPLY, 0, (9 << 16) | 10, b"data6")
    p = _scapy_ok(raw, ICMPv6EchoReply)
    assert (p[ICMPv6EchoReply].id, p[ICMPv6EchoReply].data) == (9, b"data6")


@pytest.mark.parametrize("reason,code4,code6", [("net", 0, 0), ("host", 1, 3), ("port", 3, 4),
                                                ("admin", 13, 1)])
def test_build_unreachable_quotes_original(reason, code4, code6):
    syn = wire.build_tcp(A4, B4, 40000, 5000, TcpSegment(123, 0, SYN, 64240, mss=1460))
    ip, drops = parse(syn)
    quote = wire.syn_quote(ip)
    assert quote == syn  # a bare SYN is all header
    raw = wire.build_unreachable(B4, A4, reason, quote)
    p = _scapy_ok(raw, ICMP)
    assert (p[ICMP].type, p[ICMP].code) == (3, code4)
    assert bytes(p[ICMP].payload) == syn
    syn6 = wire.build_tcp(A6, B6, 40000, 5000, TcpSegment(123, 0, SYN, 64240, mss=1440))
    ip, drops = parse(syn6)
    raw = wire.build_unreachable(B6, A6, reason, wire.syn_quote(ip))
    p = _scapy_ok(raw, ICMPv6DestUnreach)
    assert p[ICMPv6DestUnreach].code == code6
    ip, drops = parse(raw)
    q = wire.parse_quoted(wire.parse_icmp(ip, drops).body, drops)
    assert (q.src, q.dst, q.sport, q.dport) == (A6, B6, 40000, 5000)


def test_unreachable_quote_truncated_to_minimum_mtu():
    big = wire.build_udp(A4, B4, 1, 2, b"x" * 2000)
    raw = wire.build_unreachable(B4, A4, "port", big)
    assert len(raw) == 576


# --------------------------------------------------------------------------------- vnet


def _finish_partial(pkt: bytes, start: int, off: int) -> bytes:
    """Do what the kernel does for NEEDS_CSUM: sum from csum_start, store at +csum_offset."""
    ck = wire.checksum(pkt[start:])
    return pkt[:start + off] + struct.pack("!H", ck) + pkt[start + off + 2:]


@pytest.mark.parametrize("v6", [False, True])
def test_vnet_tcp_partial_checksum_completes_correctly(v6):
    src, dst = (A6, B6) if v6 else (A4, B4)
    seg = TcpSegment(1, 2, ACK | PSH, 500, os.urandom(3001), ts_val=1, ts_ecr=2)
    raw = wire.build_tcp(src, dst, 80, 50000, seg, vnet=True)
    drops: dict = {}
    vh, pkt = wire.parse_vnet(raw, drops)
    ihl = 40 if v6 else 20
    assert (vh.flags, vh.gso_type, vh.csum_start, vh.csum_offset) == (1, 0, ihl, 16)
    assert vh.hdr_len == ihl + 32
    done = _finish_partial(bytes(pkt), vh.csum_start, vh.csum_offset)
    _scapy_ok(done, TCP)
    assert done == wire.build_tcp(src, dst, 80, 50000, seg)


def test_vnet_tcp_gso_header():
    seg = TcpSegment(1, 2, ACK, 500, b"y" * 20000)
    raw = wire.build_tcp(A4, B4, 80, 50000, seg, vnet=True, gso_mtu=1500)
    vh, pkt = wire.parse_vnet(raw, {})
    assert (vh.gso_type, vh.gso_size, vh.hdr_len) == (wire.VNET_GSO_TCPV4, 1460, 40)
    seg.ts_val, seg.ts_ecr = 1, 2
    raw = wire.build_tcp(A6, B6, 80, 50000, seg, vnet=True, gso_mtu=1500)
    vh, _ = wire.parse_vnet(raw, {})
    assert (vh.gso_type, vh.gso_size, vh.hdr_len) == (wire.VNET_GSO_TCPV6, 1428, 72)
    # packets that fit the MTU are not marked GSO
    raw = wire.build_tcp(A4, B4, 80, 50000, TcpSegment(1, 2, ACK, 5, b"z" * 1460), vnet=True,
                         gso_mtu=1500)
    assert wire.parse_vnet(raw, {})[0].gso_type == 0


@pytest.mark.parametrize("v6", [False, True])
def test_vnet_udp_partial_and_icmp_plain(v6):
    src, dst = (A6, B6) if v6 else (A4, B4)
    raw = wire.build_udp(src, dst, 53, 4000, b"abcde", vnet=True)
    vh, pkt = wire.parse_vnet(raw, {})
    assert (vh.flags, vh.csum_offset) == (1, 6)
    _scapy_ok(_finish_partial(bytes(pkt), vh.csum_start, vh.csum_offset), UDP)
    raw = wire.build_icmp(src, dst, 0 if not v6 else 129, 0, 0, b"e", vnet=True)
    vh, pkt = wire.parse_vnet(raw, {})
    assert vh.flags == 0 and bytes(pkt) == wire.build_icmp(src, dst, 0 if not v6 else 129, 0,
                                                           0, b"e")


def test_vnet_truncated():
    drops: dict = {}
    assert wire.parse_vnet(b"\0" * 9, drops) is None and drops == {"vnet_truncated": 1}


def test_gso_zero_length_fields_taken_from_buffer():
    raw = bytearray(wire.build_tcp(A4, B4, 1, 2, TcpSegment(1, 2, ACK, 5, b"q" * 100)))
    raw[2:4] = b"\0\0"
    ip, drops = parse(_fix_ip_ck(raw), gso=True)
    assert ip is not None and len(ip.payload) == 120
    ip, drops = parse(_fix_ip_ck(raw))
    assert ip is None


def test_fast_tcp4_agrees_with_general_parse_and_declines_faults():
    raw = bytes(IP(src=ip4(A4), dst=ip4(B4)) / TCP(
        sport=1234, dport=80, seq=7, ack=9, flags="PA", window=1000,
        options=[("NOP", None), ("NOP", None), ("Timestamp", (5, 6))]) / b"data")
    src, sport, dst, dport, seg = wire.parse_tcp4_fast(memoryview(raw), True)
    assert (src, sport, dst, dport) == (A4, 1234, B4, 80)
    assert (seg.seq, seg.ack, seg.flags, seg.window, seg.ts_val, seg.ts_ecr) == (
        7, 9, PSH | ACK, 1000, 5, 6)
    assert bytes(seg.payload) == b"data"
    bad_ck = bytearray(raw)
    bad_ck[36] ^= 1
    assert wire.parse_tcp4_fast(memoryview(bytes(bad_ck)), True) is None
    assert wire.parse_tcp4_fast(memoryview(bytes(bad_ck)), False) is not None
    for fault in (raw[:-1], raw[:39], bytes(IP(src=ip4(A4), dst=ip4(B4), flags="MF") / TCP()),
                  bytes(IP(src=ip4(A4), dst=ip4(B4), options=[b"\x01" * 4]) / TCP()),
                  bytes(IP(src=ip4(A4), dst=ip4(B4)) / UDP() / (b"x" * 20))):
        assert wire.parse_tcp4_fast(memoryview(fault), True) is None
