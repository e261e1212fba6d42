"""Stack: demux, flow table, UDP, ICMP, timers, counters. Packets from the 'namespace' side
are crafted with scapy; what the stack emits is parsed (and checksum-checked) by scapy."""

from __future__ import annotations

import hashlib
import os
import random
import struct

import pytest
from scapy.all import ICMP, IP, TCP, UDP, IPerror, TCPerror, UDPerror
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6EchoReply, ICMPv6EchoRequest, IPv6

from nsvpn.netstack import wire
from nsvpn.netstack.stack import (
    IcmpEchoRequest,
    NewTcpFlow,
    Stack,
    StackConfig,
    TcpFlowEvent,
    UdpDatagram,
    UdpFlowClosed,
    UdpPortUnreachable,
)

APP = "10.0.2.100"
REMOTE = "10.0.2.50"
APP6 = "fd00::100"


def checked(raw: bytes):
    """Parse an emitted packet with scapy and insist every checksum in it is right."""
    p = (IP if raw[0] >> 4 == 4 else IPv6)(raw)
    q = p.copy()
    for layer in (IP, TCP, UDP, ICMP):
        if layer in q:
            del q[layer].chksum
    for layer in (ICMPv6EchoReply, ICMPv6DestUnreach):
        if layer in q:
            del q[layer].cksum
    q = (IP if raw[0] >> 4 == 4 else IPv6)(bytes(q))
    assert bytes(q) == raw, "checksum mismatch"
    return p


def syn(sport=40000, dport=5000, seq=1000, src=APP, dst=REMOTE):
    return bytes(IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, seq=seq, flags="S",
                                            window=64240, options=[("MSS", 1460),
                                                                   ("SAckOK", b""),
                                                                   ("Timestamp", (1, 0)),
                                                                   ("WScale", 7)]))


def tcp(flags, seq, ack, data=b"", sport=40000, dport=5000, window=502, src=APP, dst=REMOTE):
    return bytes(IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, seq=seq, ack=ack,
                                            flags=flags, window=window) / data)


def events_of(stack, cls):
    return [e for e in stack.pop_events() if isinstance(e, cls)]


# --------------------------------------------------------------------------------- UDP


def test_udp_delivery_reply_and_port_unreachable():
    st = Stack()
    st.input_packet(bytes(IP(src=APP, dst="10.0.2.3") / UDP(sport=33333, dport=53) / b"query"),
                    1.0)
    (ev,) = st.pop_events()
    assert isinstance(ev, UdpDatagram)
    assert (ev.src, ev.dst, ev.payload) == ((APP, 33333), ("10.0.2.3", 53), b"query")
    assert isinstance(ev.payload, bytes)
    st.send_udp(("10.0.2.3", 53), (APP, 33333), b"answer")
    (pkt,) = st.output_packets()
    p = checked(pkt)
    assert (p[IP].src, p[IP].dst, p[UDP].sport, p[UDP].dport, bytes(p[UDP].payload)) == (
        "10.0.2.3", APP, 53, 33333, b"answer")
    st.udp_unreachable(ev)
    (pkt,) = st.output_packets()
    p = checked(pkt)
    assert (p[ICMP].type, p[ICMP].code, p[IP].src, p[IP].dst) == (3, 3, "10.0.2.3", APP)
    assert (p[IPerror].src, p[IPerror].dst, p[UDPerror].sport, p[UDPerror].dport) == (
        APP, "10.0.2.3", 33333, 53)
    c = st.counters
    assert c["udp_flows"] == 1 and c["packets_in"] == 1 and c["packets_out"] == 2


def test_udp_v6_and_flow_reuse():
    st = Stack()
    for i in range(3):
        st.input_packet(bytes(IPv6(src=APP6, dst="2001:db8::1") / UDP(sport=5, dport=6)
                              / bytes([i])), float(i))
    evs = st.pop_events()
    assert [e.payload for e in evs] == [b"\0", b"\1", b"\2"]
    assert len({e.flow.id for e in evs}) == 1 and evs[0].src == (APP6, 5)
    st.send_udp(("2001:db8::1", 6), (APP6, 5), b"back")
    checked(st.output_packets()[0])


def test_udp_idle_expiry_and_deadline():
    st = Stack(StackConfig(udp_idle_timeout=10.0))
    assert st.next_deadline() is None
    st.input_packet(bytes(IP(src=APP, dst="1.2.3.4") / UDP(sport=1, dport=2) / b"a"), 100.0)
    st.input_packet(bytes(IP(src=APP, dst="1.2.3.5") / UDP(sport=1, dport=2) / b"b"), 105.0)
    st.pop_events()
    assert st.next_deadline() == 110.0
    st.on_timer(109.0)
    assert st.pop_events() == []
    st.on_timer(110.0)
    (ev,) = st.pop_events()
    assert isinstance(ev, UdpFlowClosed) and ev.flow.dst == ("1.2.3.4", 2)
    assert st.next_deadline() == 115.0
    # a reply refreshes the flow
    st.send_udp(("1.2.3.5", 2), (APP, 1), b"r")
    st._now = 114.0  # what the relay's last input/timer call would have set
    st.send_udp(("1.2.3.5", 2), (APP, 1), b"r")
    assert st.next_deadline() == 124.0


def test_udp_flow_limit_evicts_oldest():
    st = Stack(StackConfig(max_udp_flows=2))
    for port in (1, 2, 3):
        st.input_packet(bytes(IP(src=APP, dst="1.2.3.4") / UDP(sport=port, dport=9)), 0.0)
    evs = st.pop_events()
    closed = [e for e in evs if isinstance(e, UdpFlowClosed)]
    assert len(closed) == 1 and closed[0].flow.src == (APP, 1)
    assert st.counters["udp_flows"] == 2 and st.drops["udp_flow_evicted"] == 1


def test_udp_multicast_and_broadcast_dropped():
    st = Stack()
    st.input_packet(bytes(IP(src=APP, dst="224.0.0.251") / UDP(sport=5353, dport=5353)), 0.0)
    st.input_packet(bytes(IP(src=APP, dst="10.0.2.255") / UDP(sport=1, dport=2)), 0.0)
    assert st.pop_events() == [] and st.drops["udp_multicast"] == 2


def test_icmp_port_unreachable_from_namespace_reported():
    st = Stack()
    st.input_packet(bytes(IP(src=APP, dst="1.2.3.4") / UDP(sport=7000, dport=53) / b"q"), 0.0)
    (dg,) = st.pop_events()
    reply = bytes(IP(src="1.2.3.4", dst=APP) / UDP(sport=53, dport=7000) / b"late answer")
    st.input_packet(bytes(IP(src=APP, dst="1.2.3.4") / ICMP(type=3, code=3) / reply), 1.0)
    (ev,) = st.pop_events()
    assert isinstance(ev, UdpPortUnreachable) and ev.flow is dg.flow


# --------------------------------------------------------------------------------- ICMP echo


@pytest.mark.parametrize("dst", ["10.0.2.2", "10.0.2.3"])
def test_echo_to_gateway_and_dns_answered(dst):
    st = Stack()
    st.input_packet(bytes(IP(src=APP, dst=dst) / ICMP(type=8, id=4242, seq=7) / b"ping!"), 0.0)
    (pkt,) = st.output_packets()
    p = checked(pkt)
    assert (p[IP].src, p[IP].dst, p[ICMP].type, p[ICMP].id, p[ICMP].seq) == (dst, APP, 0,
                                                                             4242, 7)
    assert bytes(p[ICMP].payload) == b"ping!"
    assert st.pop_events() == []


def test_echo_v6_to_gateway_answered():
    st = Stack()
    st.input_packet(bytes(IPv6(src=APP6, dst="fd00::2") / ICMPv6EchoRequest(id=1, seq=2,
                                                                            data=b"six")), 0.0)
    (pkt,) = st.output_packets()
    p = checked(pkt)
    assert p[ICMPv6EchoReply].data == b"six" and p[IPv6].src == "fd00::2"


def test_echo_elsewhere_becomes_event_and_no_reply():
    st = Stack()
    st.input_packet(bytes(IP(src=APP, dst="8.8.8.8") / ICMP(type=8, id=1, seq=1) / b"x"), 0.0)
    assert st.output_packets() == []
    (ev,) = st.pop_events()
    assert isinstance(ev, IcmpEchoRequest) and (ev.src, ev.dst, ev.ident) == (APP, "8.8.8.8", 1)


# --------------------------------------------------------------------------------- TCP passive


def test_syn_deferred_accept_handshake_data_and_coalesced_ack():
    st = Stack(StackConfig(mtu=1500))
    st.input_packet(syn(seq=1000), 0.0)
    (ev,) = st.pop_events()
    assert isinstance(ev, NewTcpFlow)
    flow = ev.flow
    assert (flow.src, flow.dst) == ((APP, 40000), (REMOTE, 5000))
    assert st.output_packets() == []  # nothing until the relay decides
    st.input_packet(syn(seq=1000), 0.5)  # retransmitted SYN: same flow, no new event
    assert events_of(st, NewTcpFlow) == [] and st.counters["tcp_flows"] == 1
    st.accept(flow, 1.0)
    pkts = st.output_packets()
    assert len(pkts) == 1
    p = checked(pkts[0])
    assert (p[IP].src, p[IP].dst, p[TCP].sport, p[TCP].dport) == (REMOTE, APP, 5000, 40000)
    assert p[TCP].flags == "SA" and p[TCP].ack == 1001
    opts = dict(o for o in p[TCP].options if isinstance(o[0], str))
    assert opts["MSS"] == 1460 and "WScale" in opts and "SAckOK" in opts
    iss = p[TCP].seq
    st.input_packet(tcp("A", 1001, iss + 1), 1.1)
    assert [e.kind for e in st.pop_events()] == ["connected"]
    assert st.counters["tcp_half_open"] == 0
    # ten segments in one batch -> one cumulative ACK
    chunks = [os.urandom(1000) for _ in range(10)]
    seq = 1001
    for c in chunks:
        st.input_packet(tcp("PA", seq, iss + 1, c), 1.2)
        seq += len(c)
    kinds = [e.kind for e in st.pop_events()]
    assert kinds == ["data"]
    acks = [checked(x) for x in st.output_packets()]
    assert len(acks) <= 2 and acks[-1][TCP].ack == seq
    assert st.tcp_recv(flow, -1) == b"".join(chunks)
    # stack -> app data
    assert st.tcp_send(flow, b"hello app", 1.3) == 9
    (out,) = st.output_packets()
    p = checked(out)
    assert bytes(p[TCP].payload) == b"hello app" and p[TCP].seq == iss + 1
    # app closes; we close; flow goes away after TIME_WAIT / LAST_ACK
    st.input_packet(tcp("FA", seq, iss + 10), 1.4)
    assert "eof" in [e.kind for e in st.pop_events()]
    st.tcp_shutdown(flow, 1.5)
    fin = [checked(x) for x in st.output_packets()]
    assert any("F" in str(x[TCP].flags) for x in fin)
    st.input_packet(tcp("A", seq + 1, iss + 11), 1.6)
    assert "closed" in [e.kind for e in st.pop_events()]
    assert st.counters["tcp_flows"] == 0


def test_refuse_sends_rst():
    st = Stack()
    st.input_packet(syn(seq=77), 0.0)
    (ev,) = st.pop_events()
    st.refuse(ev.flow, 0.1)
    (pkt,) = st.output_packets()
    p = checked(pkt)
    assert p[TCP].flags == "RA" and p[TCP].ack == 78 and p[TCP].dport == 40000
    st.pop_events()
    assert st.counters["tcp_flows"] == 0 and st.counters["tcp_half_open"] == 0


@pytest.mark.parametrize("code,icmp_code", [("host", 1), ("net", 0), ("port", 3),
                                            ("admin", 13)])
def test_unreachable_quotes_syn(code, icmp_code):
    st = Stack()
    raw = syn(seq=555)
    st.input_packet(raw, 0.0)
    (ev,) = st.pop_events()
    st.unreachable(ev.flow, 0.2, code)
    (pkt,) = st.output_packets()
    p = checked(pkt)
    assert (p[ICMP].type, p[ICMP].code, p[IP].dst) == (3, icmp_code, APP)
    assert bytes(p[ICMP].payload) == raw
    assert (p[TCPerror].seq, p[TCPerror].sport) == (555, 40000)
    assert st.counters["tcp_flows"] == 0 and st.counters["tcp_half_open"] == 0
    assert [e.kind for e in st.pop_events()] == ["closed"]
    st.input_packet(raw, 1.0)  # the app retries: a fresh flow
    assert len(events_of(st, NewTcpFlow)) == 1


def test_unreachable_v6_quotes_syn():
    st = Stack()
    raw = bytes(IPv6(src=APP6, dst="2001:db8::5") / TCP(sport=1, dport=2, flags="S", seq=9))
    st.input_packet(raw, 0.0)
    (ev,) = st.pop_events()
    assert ev.flow.dst == ("2001:db8::5", 2)
    st.unreachable(ev.flow, 0.0, "net")
    p = checked(st.output_packets()[0])
    assert p[ICMPv6DestUnreach].code == 0 and bytes(p[ICMPv6DestUnreach].payload) == raw


def test_rst_for_unknown_flows():
    st = Stack()
    st.input_packet(tcp("A", 10, 999), 0.0)
    p = checked(st.output_packets()[0])
    assert p[TCP].flags == "R" and p[TCP].seq == 999 and (p[TCP].sport, p[TCP].dport) == (
        5000, 40000)
    st.input_packet(tcp("F", 10, 0, b"abc"), 0.0)  # no ACK: RST|ACK acking seq+len+FIN
    p = checked(st.output_packets()[0])
    assert p[TCP].flags == "RA" and p[TCP].ack == 14 and p[TCP].seq == 0
    st.input_packet(tcp("R", 10, 0), 0.0)  # never answer a RST
    assert st.output_packets() == []
    assert st.counters["rst_out"] == 2 and st.drops["tcp_rst_no_flow"] == 1
    assert st.pop_events() == []


def test_half_open_limit():
    st = Stack(StackConfig(max_half_open=3))
    for port in range(1, 5):
        st.input_packet(syn(sport=port), 0.0)
    flows = [e.flow for e in events_of(st, NewTcpFlow)]
    assert len(flows) == 3 and st.drops["tcp_syn_half_open_limit"] == 1
    assert st.counters["tcp_half_open"] == 3
    # completing one handshake frees a slot
    st.accept(flows[0], 0.1)
    p = checked(st.output_packets()[0])
    st.input_packet(tcp("A", 1001, p[TCP].seq + 1, sport=1), 0.2)
    st.pop_events()
    assert st.counters["tcp_half_open"] == 2
    st.input_packet(syn(sport=9), 0.3)
    assert len(events_of(st, NewTcpFlow)) == 1


def test_flow_limit():
    st = Stack(StackConfig(max_tcp_flows=2))
    for port in range(1, 4):
        st.input_packet(syn(sport=port), 0.0)
    assert len(events_of(st, NewTcpFlow)) == 2 and st.drops["tcp_syn_flow_limit"] == 1


def test_accept_timeout_sends_unreachable():
    st = Stack(StackConfig(accept_timeout=5.0))
    st.input_packet(syn(), 0.0)
    st.pop_events()
    assert st.next_deadline() == 5.0
    st.on_timer(4.9)
    assert st.output_packets() == []
    st.on_timer(5.0)
    p = checked(st.output_packets()[0])
    assert (p[ICMP].type, p[ICMP].code) == (3, 1)
    evs = st.pop_events()
    assert [(type(e), e.kind) for e in evs] == [(TcpFlowEvent, "timeout"),
                                                (TcpFlowEvent, "closed")]
    assert st.counters["tcp_flows"] == 0 and st.next_deadline() is None


def test_syn_ack_retransmitted_by_timer():
    st = Stack()
    st.input_packet(syn(), 0.0)
    (ev,) = st.pop_events()
    st.accept(ev.flow, 0.0)
    first = checked(st.output_packets()[0])
    d = st.next_deadline()
    assert d is not None and 0 < d <= 3.0
    st.on_timer(d)
    again = [checked(x) for x in st.output_packets()]
    assert again and again[0][TCP].flags == "SA" and again[0][TCP].seq == first[TCP].seq


# --------------------------------------------------------------------------------- malformed


def test_malformed_counted_not_raised():
    st = Stack()
    bad = bytearray(syn())
    bad[36:38] = b"\xde\xad"  # TCP checksum
    for pkt in (b"", b"\x45", bytes(bad), b"\x60" + b"\0" * 10, bytes(syn())[:30]):
        st.input_packet(pkt, 0.0)
    assert st.pop_events() == [] and st.output_packets() == []
    d = st.counters["drops"]
    assert d["tcp_bad_checksum"] == 1 and d["empty"] == 1
    assert sum(d.values()) == 5 and st.counters["packets_in"] == 5


def test_unknown_protocol_counted():
    st = Stack()
    st.input_packet(bytes(IP(src=APP, dst=REMOTE, proto=47) / b"gre?"), 0.0)
    assert st.drops == {"unknown_protocol": 1}


# --------------------------------------------------------------------------------- vnet framing


def test_vnet_framing_in_and_out():
    st = Stack(StackConfig(vnet_hdr=True, mtu=1500))
    bad = bytearray(syn())
    bad[36:38] = b"\0\0"  # as the kernel leaves it under NEEDS_CSUM: not verified
    st.input_packet(wire.vnet_header(flags=wire.VNET_F_NEEDS_CSUM, csum_start=20,
                                     csum_offset=16) + bytes(bad), 0.0)
    (ev,) = st.pop_events()
    st.accept(ev.flow, 0.0)
    (pkt,) = st.output_packets()
    vh = struct.unpack("=BBHHHH", pkt[:10])
    assert vh[0] == wire.VNET_F_NEEDS_CSUM and vh[4:] == (20, 16)
    # Without the flags the checksum is verified.
    st.input_packet(wire.VNET_PLAIN + bytes(bad), 0.0)
    assert st.drops["tcp_bad_checksum"] == 1
    # ICMP replies carry a plain header
    st.input_packet(wire.VNET_PLAIN + bytes(IP(src=APP, dst="10.0.2.2") / ICMP()), 0.0)
    (pkt,) = st.output_packets()
    assert pkt[:10] == wire.VNET_PLAIN
    checked(pkt[10:])


def test_vnet_gso_large_segments():
    st = Stack(StackConfig(vnet_hdr=True, mtu=1500))
    st.input_packet(wire.VNET_PLAIN + syn(), 0.0)
    (ev,) = st.pop_events()
    st.accept(ev.flow, 0.0)
    sa = IP(st.output_packets()[0][10:])
    st.input_packet(wire.VNET_PLAIN + tcp("A", 1001, sa[TCP].seq + 1, window=65535), 0.1)
    st.pop_events()
    assert st.tcp_send(ev.flow, b"z" * 60000, 0.2) == 60000
    pkts = st.output_packets()
    sizes = []
    for pkt in pkts:
        vh = struct.unpack("=BBHHHH", pkt[:10])
        p = IP(pkt[10:])
        sizes.append(len(p[TCP].payload))
        if len(pkt) - 10 > 1500:
            assert vh[1] == wire.VNET_GSO_TCPV4 and vh[3] + vh[2] <= 1500
    assert max(sizes) > 1460  # the kernel does the cutting


# --------------------------------------------------------------------------------- back to back


def pump(a: Stack, b: Stack, now: float, rnd=None) -> int:
    moved = 0
    for _ in range(10000):
        pa, pb = a.output_packets(), b.output_packets()
        if not pa and not pb:
            return moved
        for p in pa:
            b.input_packet(p, now)
        for p in pb:
            a.input_packet(p, now)
        moved += len(pa) + len(pb)
    raise AssertionError("no quiescence")


def test_active_open_against_passive_stack_bulk_both_ways():
    """open_tcp() on one stack against a passive stack: 2 MiB each way, byte-exact."""
    server = Stack(StackConfig(mtu=65520))
    client = Stack(StackConfig(mtu=65520))
    flow_c = client.open_tcp((APP, 0), (REMOTE, 8080), 0.0)
    assert flow_c.src[0] == APP and flow_c.src[1] >= 32768
    pump(client, server, 0.0)
    (new,) = server.pop_events()
    assert isinstance(new, NewTcpFlow) and new.flow.src == flow_c.src
    flow_s = new.flow
    server.accept(flow_s, 0.0)
    pump(client, server, 0.0)
    assert "connected" in [e.kind for e in client.pop_events()]
    assert "connected" in [e.kind for e in server.pop_events()]
    rnd = random.Random(3)
    up = rnd.randbytes(2 << 20)
    down = rnd.randbytes(2 << 20)
    sent_up = sent_down = 0
    got_up, got_down = bytearray(), bytearray()
    now = 0.0
    while len(got_up) < len(up) or len(got_down) < len(down):
        now += 0.001
        sent_up += client.tcp_send(flow_c, up[sent_up:sent_up + 300000], now)
        sent_down += server.tcp_send(flow_s, down[sent_down:sent_down + 300000], now)
        pump(client, server, now)
        got_up += server.tcp_recv(flow_s, -1)
        got_down += client.tcp_recv(flow_c, -1)
        client.pop_events()
        server.pop_events()
        assert now < 30
    assert hashlib.sha256(got_up).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(got_down).digest() == hashlib.sha256(down).digest()
    client.tcp_shutdown(flow_c, now)
    server.tcp_shutdown(flow_s, now)
    pump(client, server, now)
    for _ in range(50):
        now += 0.5
        for s in (client, server):
            if s.next_deadline() is not None and s.next_deadline() <= now:
                s.on_timer(now)
        pump(client, server, now)
    assert client.counters["tcp_flows"] == 0 and server.counters["tcp_flows"] == 0
    assert client.drops == {} and server.drops == {}


def test_checksum_verification_can_be_turned_off():
    bad = bytearray(syn())
    bad[36:38] = b"\xde\xad"
    st = Stack(StackConfig(verify_checksums=False))
    st.input_packet(bytes(bad), 0.0)
    assert len(events_of(st, NewTcpFlow)) == 1
    bad_ip = bytearray(syn(sport=2))
    bad_ip[10:12] = b"\xde\xad"  # the IPv4 header sum is still checked
    st.input_packet(bytes(bad_ip), 0.0)
    assert st.drops == {"ipv4_bad_checksum": 1}


def test_output_iovecs_match_output_packets():
    def run(method):
        st = Stack(StackConfig(mtu=65520))
        st._secret = b"k" * 16  # same ISN in both runs
        st.input_packet(bytes(IP(src=APP, dst=REMOTE) / TCP(
            sport=40000, dport=5000, seq=1000, flags="S",
            options=[("MSS", 65000), ("WScale", 7)])), 0.0)
        (ev,) = st.pop_events()
        st.accept(ev.flow, 0.0)
        sa = IP(st.output_packets()[0])
        st.input_packet(tcp("A", 1001, sa[TCP].seq + 1, window=65535), 0.0)
        st.pop_events()
        st.tcp_send(ev.flow, bytes(range(256)) * 400, 0.0)
        st.input_packet(tcp("A", 5, 0), 0.0)  # plus a RST for an unknown flow
        return getattr(st, method)()

    iovs = run("output_iovecs")
    pkts = run("output_packets")
    assert [b"".join(v) for v in iovs] == pkts
    assert any(len(v) == 2 for v in iovs) and all(1 <= len(v) <= 2 for v in iovs)
    for p in pkts:
        checked(p)


def test_vnet_gso_respects_peer_mss():
    st = Stack(StackConfig(vnet_hdr=True, mtu=65520))
    st.input_packet(wire.VNET_PLAIN + bytes(IP(src=APP, dst=REMOTE) / TCP(
        sport=1, dport=2, seq=0, flags="S", options=[("MSS", 1000), ("WScale", 7)])), 0.0)
    (ev,) = st.pop_events()
    st.accept(ev.flow, 0.0)
    sa = IP(st.output_packets()[0][10:])
    st.input_packet(wire.VNET_PLAIN + tcp("A", 1, sa[TCP].seq + 1, sport=1, dport=2,
                                          window=65535), 0.0)
    st.pop_events()
    st.tcp_send(ev.flow, b"q" * 30000, 0.0)
    big = [p for p in st.output_packets() if len(p) > 1100]
    assert big
    for pkt in big:
        vh = struct.unpack("=BBHHHH", pkt[:10])
        assert vh[1] == wire.VNET_GSO_TCPV4 and vh[3] == 1000


def test_time_wait_expires_and_port_reuse_replaces_it():
    def establish(st, now):
        st.input_packet(syn(seq=1000), now)
        (ev,) = events_of(st, NewTcpFlow)
        st.accept(ev.flow, now)
        sa = checked(st.output_packets()[0])
        st.input_packet(tcp("A", 1001, sa[TCP].seq + 1), now)
        st.pop_events()
        return ev.flow, sa[TCP].seq + 1

    st = Stack()
    flow, snd = establish(st, 0.0)
    st.tcp_shutdown(flow, 0.1)  # we close first, so we end in TIME_WAIT
    st.output_packets()
    st.input_packet(tcp("FA", 1001, snd + 1), 0.2)
    st.output_packets()
    st.pop_events()
    assert flow.conn.state == "TIME_WAIT" and st.counters["tcp_flows"] == 1
    # the timer retires it
    kinds = []
    for _ in range(5):
        d = st.next_deadline()
        assert d is not None and d < 0.2 + 5
        st.on_timer(d)
        kinds += [e.kind for e in st.pop_events()]
        if "closed" in kinds:
            break
    assert kinds == ["closed"] and st.counters["tcp_flows"] == 0 and flow.removed
    # again, but this time the app reuses the port while we linger
    flow, snd = establish(st, 10.0)
    st.tcp_shutdown(flow, 10.1)
    st.output_packets()
    st.input_packet(tcp("FA", 1001, snd + 1), 10.2)
    st.output_packets()
    st.pop_events()
    assert flow.conn.state == "TIME_WAIT"
    st.input_packet(syn(seq=99999), 10.3)
    evs = st.pop_events()
    assert [type(e) for e in evs] == [TcpFlowEvent, NewTcpFlow]
    assert evs[0].flow is flow and evs[0].kind == "closed" and evs[1].flow is not flow


# --------------------------------------------------------------------------------- lossy link


def _lossy_run(seed: int, nflows: int, size: int, loss: float, dup: float, jitter: float):
    """Client stack (active opens) <-> server stack (passive) over a simulated link that
    drops, duplicates, delays and reorders packets; virtual time, seeded."""
    import heapq

    rnd = random.Random(seed)
    client = Stack(StackConfig(mtu=1500))
    server = Stack(StackConfig(mtu=1500))
    peer = {id(client): server, id(server): client}
    wire_q: list = []
    tie = [0]
    now = 0.0

    def transmit(src):
        for p in src.output_packets():
            if rnd.random() < loss:
                continue
            for _ in range(2 if rnd.random() < dup else 1):
                tie[0] += 1
                heapq.heappush(wire_q, (now + 0.002 + rnd.random() * jitter, tie[0], p,
                                        peer[id(src)]))

    up = {}
    down = {}
    got = {}
    sent = {}
    flows_c = []
    for i in range(nflows):
        f = client.open_tcp(("10.0.2.100", 0), ("10.0.2.50", 1000 + i), now)
        flows_c.append(f)
        up[f.src[1]] = rnd.randbytes(size)
        down[f.src[1]] = rnd.randbytes(size)
    server_flows = {}
    closed = set()
    while now < 300.0:
        for st_ in (client, server):
            for ev in st_.pop_events():
                if isinstance(ev, NewTcpFlow):
                    server.accept(ev.flow, now)
                    server_flows[ev.flow.src[1]] = ev.flow
                elif isinstance(ev, TcpFlowEvent):
                    if ev.kind == "closed":
                        closed.add((id(st_), ev.flow.id))
                    assert ev.kind not in ("reset", "timeout"), ev
        for st_, flows, data in ((client, flows_c, up),
                                 (server, list(server_flows.values()), down)):
            for f in flows:
                port = f.src[1]
                k = (id(st_), port)
                off = sent.get(k, 0)
                if off < size and f.conn.state in ("ESTABLISHED", "CLOSE_WAIT"):
                    off += st_.tcp_send(f, data[port][off:off + 65536], now)
                    sent[k] = off
                    if off == size:
                        st_.tcp_shutdown(f, now)
                chunk = st_.tcp_recv(f, -1)
                if chunk:
                    got.setdefault(k, bytearray()).extend(chunk)
        for st_ in (client, server):
            d = st_.next_deadline()
            if d is not None and d <= now:
                st_.on_timer(now)
            transmit(st_)
        if len(closed) == 2 * nflows:
            break
        # advance virtual time to the next thing that happens
        nxt = [now + 0.05]
        if wire_q:
            nxt.append(wire_q[0][0])
        for st_ in (client, server):
            d = st_.next_deadline()
            if d is not None:
                nxt.append(d)
        now = max(now, min(nxt))
        while wire_q and wire_q[0][0] <= now:
            _, _, p, dst = heapq.heappop(wire_q)
            dst.input_packet(p, now)
    return client, server, up, down, got, flows_c, server_flows, closed, now


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_many_flows_over_a_lossy_reordering_link(seed):
    nflows, size = 8, 200_000
    client, server, up, down, got, flows_c, server_flows, closed, now = _lossy_run(
        seed, nflows, size, loss=0.03, dup=0.02, jitter=0.01)
    assert len(closed) == 2 * nflows, f"stuck at t={now}: {client.counters} {server.counters}"
    for f in flows_c:
        port = f.src[1]
        assert bytes(got[(id(server), port)]) == up[port]
        assert bytes(got[(id(client), port)]) == down[port]
    for st_ in (client, server):
        c = st_.counters
        assert c["tcp_flows"] == 0 and c["tcp_half_open"] == 0
        # duplicates that arrive after close draw RSTs; nothing else may be dropped
        assert set(c["drops"]) <= {"tcp_no_flow", "tcp_rst_no_flow"}
    assert client.next_deadline() is None and server.next_deadline() is None
