"""Property fuzzing of every sans-IO core that reads bytes a hostile or broken peer controls:
the userspace stack (packets from CMD), both sides of the SOCKS5 codec (an upstream server,
a local client of the front), the DNS answerer (queries from CMD) and openconnect's script
environment (vpnenv). No privileges, bounded example counts (well under a minute).

The property is always "no exception escapes except the documented error type, and whatever
comes out is well formed": a crash here is a crash of the relay for every flow of the session.
The FUZZ_EXAMPLES environment variable scales the counts (scripts/soak runs it long).
"""

from __future__ import annotations

import os
import struct

import dns.message
import dns.rdatatype
import fuzz_targets
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.all import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6

from nsvpn import socks, vpnenv
from nsvpn.dns import DnsAnswerer, Reply, TcpDeframer
from nsvpn.netstack import wire
from nsvpn.netstack.stack import NewTcpFlow, Stack, StackConfig

SCALE = float(os.environ.get("FUZZ_EXAMPLES", "1"))


def fuzz(n: int):
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


APP, REMOTE = "10.0.2.100", "10.0.2.50"

SEEDS = [
    bytes(IP(src=APP, dst=REMOTE) / TCP(sport=40000, dport=80, seq=1000, flags="S",
                                        options=[("MSS", 1460), ("SAckOK", b""),
                                                 ("Timestamp", (1, 0)), ("WScale", 7)])),
    bytes(IP(src=APP, dst=REMOTE) / TCP(sport=40000, dport=80, seq=1001, ack=5, flags="PA")
          / b"GET / HTTP/1.0\r\n\r\n"),
    bytes(IP(src=APP, dst=REMOTE) / TCP(sport=40000, dport=80, seq=1001, ack=5, flags="FA")),
    bytes(IP(src=APP, dst=REMOTE) / TCP(sport=40000, dport=80, seq=1001, flags="R")),
    bytes(IP(src=APP, dst="10.0.2.3") / UDP(sport=3333, dport=53) / b"\x12\x34\x01\x00"),
    bytes(IP(src=APP, dst=REMOTE) / UDP(sport=3333, dport=443) / (b"q" * 40)),
    bytes(IP(src=APP, dst="10.0.2.2") / ICMP(type=8, id=7, seq=1) / b"ping"),
    bytes(IP(src=APP, dst=REMOTE, flags="MF", frag=0) / UDP(sport=1, dport=2) / b"frag"),
    bytes(IPv6(src="fd00::100", dst="2001:db8::1") / TCP(sport=5, dport=6, flags="S")),
    bytes(IPv6(src="fd00::100", dst="fd00::2") / ICMPv6EchoRequest(id=1, seq=2) / b"x"),
    bytes(IPv6(src="fd00::100", dst="2001:db8::1") / UDP(sport=5, dport=6) / b"u"),
]


@st.composite
def mutated(draw, seeds=SEEDS):
    pkt = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "extend", "splice"]))
        if op == "flip" and pkt:
            i = draw(st.integers(0, len(pkt) - 1))
            pkt[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and pkt:
            i = draw(st.integers(0, len(pkt) - 1))
            pkt[i] = draw(st.integers(0, 255))
        elif op == "truncate":
            del pkt[draw(st.integers(0, len(pkt))):]
        elif op == "extend":
            pkt += draw(st.binary(max_size=64))
        elif op == "splice" and pkt:
            i = draw(st.integers(0, len(pkt)))
            pkt[i:i] = draw(st.binary(min_size=1, max_size=16))
    return bytes(pkt)


def _drive(stack: Stack, packets, now: float, hdr: int = 0) -> None:
    for i, p in enumerate(packets):
        stack.input_packet(p, now + i * 0.01)
        for ev in stack.pop_events():
            if isinstance(ev, NewTcpFlow):
                stack.accept(ev.flow, now)  # the far side answered: exercise data paths too
        for out in stack.output_packets():
            # everything the stack emits parses as IP with our own parser
            assert wire.parse_ip(memoryview(out)[hdr:], {}, False) is not None, out.hex()
    stack.on_timer(now + 300.0)
    stack.pop_events()
    stack.output_packets()


@fuzz(600)
@given(st.lists(mutated(), min_size=1, max_size=6))
def test_stack_survives_mutated_packets(packets):
    _drive(Stack(), packets, 1.0)


@fuzz(300)
@given(st.lists(mutated(), min_size=1, max_size=6))
def test_stack_with_established_flow_survives_mutated_packets(packets):
    # a connection exists, so mutations that keep the 4-tuple hit the TCP state machine
    st_ = Stack()
    _drive(st_, SEEDS[:2], 1.0)
    _drive(st_, packets, 2.0)
    c = st_.counters
    assert c["tcp_flows"] <= 1 + len(packets) and c["tcp_half_open"] >= 0


@fuzz(200)
@given(st.binary(max_size=200))
def test_stack_survives_random_bytes_with_vnet_header(data):
    st_ = Stack(StackConfig(vnet_hdr=True))
    _drive(st_, [data, b"\0" * 10 + SEEDS[0]], 1.0, hdr=10)


# ------------------------------------------------------------------------ SOCKS5 codec

GOOD_SERVER_REPLIES = [
    b"\x05\x00" + b"\x05\x00\x00\x01\x7f\x00\x00\x01\x00\x50",
    b"\x05\x02" + b"\x01\x00" + b"\x05\x00\x00\x03\x03abc\x00\x50",
    b"\x05\x00" + b"\x05\x05\x00\x04" + b"\0" * 16 + b"\x00\x50",
]
GOOD_CLIENT_REQUESTS = [
    b"\x05\x01\x00" + b"\x05\x01\x00\x01\x0a\x00\x00\x01\x01\xbb",
    b"\x05\x01\x02" + b"\x01\x01u\x01p" + b"\x05\x01\x00\x03\x0bexample.org\x00\x50",
    b"\x05\x01\x00" + b"\x05\x03\x00\x04" + b"\0" * 15 + b"\x01\x00\x35",
]


def _mutate_bytes(draw, seeds):
    return draw(mutated(seeds))


def _chunks(data: bytes, cuts):
    pos, out = 0, []
    for c in sorted(set(cuts)):
        if pos < c <= len(data):
            out.append(data[pos:c])
            pos = c
    out.append(data[pos:])
    return out


@fuzz(500)
@given(st.data())
def test_socks_client_handshake(data):
    auth = data.draw(st.booleans())
    hs = socks.ClientHandshake(socks.CMD_CONNECT, "example.org", 443,
                               username="u" if auth else None, password="p" if auth else None)
    hs.data_to_send()
    reply = data.draw(st.one_of(mutated(GOOD_SERVER_REPLIES), st.binary(max_size=40)))
    for chunk in _chunks(reply, data.draw(st.lists(st.integers(0, 40), max_size=4))):
        try:
            hs.receive_data(chunk)
        except socks.SocksError as e:
            assert isinstance(e.errno, int)
            break
        hs.data_to_send()
    if hs.reply is not None:
        assert isinstance(hs.reply.code, int)


@fuzz(500)
@given(st.data())
def test_socks_server_handshake(data):
    creds = ("u", "p") if data.draw(st.booleans()) else None
    hs = socks.ServerHandshake(credentials=creds)
    req = data.draw(st.one_of(mutated(GOOD_CLIENT_REQUESTS), st.binary(max_size=40)))
    for chunk in _chunks(req, data.draw(st.lists(st.integers(0, 40), max_size=4))):
        try:
            hs.receive_data(chunk)
        except socks.SocksError:
            hs.data_to_send()
            break
        hs.data_to_send()
    if hs.request is not None:
        r = hs.request
        assert 0 <= r.port <= 65535 and isinstance(r.host, str)
        if creds is not None:
            assert hs.username == "u"  # a request only after the right password


def _dns_seeds():
    out = []
    for name, rdt in (("remote.lab", "A"), ("x.example", "AAAA"), ("2.2.31.172.in-addr.arpa",
                                                                    "PTR"), ("a.b", "MX")):
        q = dns.message.make_query(name, dns.rdatatype.from_text(rdt), use_edns=True)
        out.append(q.to_wire())
    return out


DNS_SEEDS = _dns_seeds()


@fuzz(500)
@given(st.one_of(mutated(DNS_SEEDS), st.binary(max_size=64)), st.booleans())
def test_dns_answerer_never_raises(query, tcp):
    a = DnsAnswerer(local_net="10.0.2.0/24", local_names={"10.0.2.100": "node"})
    step = a.handle_query(query, tcp=tcp)
    if step is None:
        return
    if isinstance(step, Reply):
        # an immediate answer carries the query's id (a FORMERR for garbage too)
        assert len(step.wire) >= 12 and step.wire[:2] == query[:2]


@fuzz(200)
@given(st.lists(st.binary(max_size=20), max_size=8))
def test_dns_tcp_deframer(chunks):
    d = TcpDeframer()
    got = []
    for c in chunks:
        got += d.feed(c)
    stream = b"".join(chunks)
    total = 0
    for m in got:
        assert stream[total:total + 2] == struct.pack("!H", len(m))
        total += 2 + len(m)
    assert d.pending == len(stream) - total


# ------------------------------------------------------------------------ vpnenv

VPN_KEYS = ["INTERNAL_IP4_ADDRESS", "INTERNAL_IP4_NETMASK", "INTERNAL_IP4_NETADDR",
            "INTERNAL_IP4_DNS", "INTERNAL_IP4_MTU", "INTERNAL_IP6_ADDRESS",
            "INTERNAL_IP6_NETMASK", "INTERNAL_IP6_DNS", "CISCO_DEF_DOMAIN",
            "CISCO_SPLIT_INC", "CISCO_SPLIT_INC_0_ADDR", "CISCO_SPLIT_INC_0_MASK",
            "CISCO_SPLIT_INC_0_MASKLEN", "CISCO_SPLIT_EXC", "CISCO_SPLIT_EXC_0_ADDR",
            "CISCO_SPLIT_EXC_0_MASKLEN", "CISCO_IPV6_SPLIT_INC", "CISCO_IPV6_SPLIT_INC_0_ADDR",
            "CISCO_IPV6_SPLIT_INC_0_MASKLEN", "TUNDEV", "VPNGATEWAY", "CISCO_SPLIT_DNS"]
VALUES = st.one_of(
    st.sampled_from(["10.77.0.5", "255.255.255.0", "24", "1", "0", "-1", "99999", "1434",
                     "172.31.2.0", "fd00::5/64", "fd00::5", "::", "", " ", "lab a.b",
                     "10.77.0.5 10.77.0.6", "255.0.255.0", "300.1.1.1", "abc", "2"]),
    st.text(max_size=12))


@fuzz(600)
@given(st.dictionaries(st.sampled_from(VPN_KEYS), VALUES, max_size=10), st.booleans())
def test_vpnenv_parse_raises_only_vpnenverror(env, with_base):
    if with_base:
        env = {"INTERNAL_IP4_ADDRESS": "10.77.0.5", "INTERNAL_IP4_MTU": "1434", **env}
    try:
        v = vpnenv.parse_vpn_env(env)
    except vpnenv.VpnEnvError:
        return
    # a parsed environment renders everything the namespace setup asks of it
    v.routes4()
    v.routes6()
    v.resolv_conf()
    v.summary()
    assert 0 < v.link_mtu() <= 65535


# ------------------------------------------------------------------------ regressions

@fuzz(100)
@given(st.integers(1, 8), st.integers(0, 20), st.floats(1.0, 70.0))
def test_half_open_flood_does_not_lock_out_later_syns(limit, extra, later):
    """Regression (test_security_lab SYN flood): with the half-open table full of SYNs whose
    upstream never answers, a SYN arriving a second or more later used to be dropped until
    the accept timeout (75 s); now the oldest waiting SYN gives way (ICMP to the app)."""
    stack = Stack(StackConfig(max_half_open=limit))
    for port in range(1, limit + extra + 1):
        stack.input_packet(bytes(IP(src=APP, dst=REMOTE) / TCP(sport=port, dport=80,
                                                              flags="S")), 0.0)
    stack.pop_events()
    stack.output_packets()
    assert stack.counters["tcp_half_open"] == limit
    stack.input_packet(bytes(IP(src=APP, dst=REMOTE) / TCP(sport=60000, dport=80, flags="S")),
                       later)
    new = [e for e in stack.pop_events() if isinstance(e, NewTcpFlow)]
    assert [e.flow.src[1] for e in new] == [60000]
    (icmp,) = stack.output_packets()  # the evicted SYN's app hears about it
    assert IP(icmp)[ICMP].type == 3
    assert stack.counters["tcp_half_open"] == limit


def test_vpnenv_superscript_mtu_is_not_a_number():
    """Regression (scripts/soak fuzz): INTERNAL_IP4_MTU='²' passed isdigit() and int() raised
    ValueError out of parse_vpn_env."""
    try:
        v = vpnenv.parse_vpn_env({"INTERNAL_IP4_ADDRESS": "10.77.0.5", "INTERNAL_IP4_MTU": "²"})
    except vpnenv.VpnEnvError:
        return
    assert 0 < v.link_mtu() <= 65535


# ------------------------------------------------------------------------ byte targets
# The targets of tests/fuzz_targets.py (also run by scripts/fuzz_atheris.py, coverage-guided):
# the wire parsers alone, a peer driving one TCP connection segment by segment (both the
# namespace side and the VPN side's active open), and the codecs above through one byte input.

TARGET_INPUTS = {name: st.one_of(mutated(fuzz_targets.seeds(name)), st.binary(max_size=300))
                 for name in fuzz_targets.TARGETS}


@pytest.mark.parametrize("target", sorted(fuzz_targets.TARGETS))
@fuzz(300)
@given(data=st.data())
def test_byte_target(target, data):
    fuzz_targets.TARGETS[target](data.draw(TARGET_INPUTS[target]))


@pytest.mark.parametrize("target,path", fuzz_targets.regression_inputs() or [
    pytest.param(None, None, marks=pytest.mark.skip(reason="no saved crash inputs"))])
def test_saved_crash_input(target, path):
    """Every input a long fuzz run (scripts/soak) found crashing, replayed: it must not
    crash any more. The file name says where it came from."""
    with open(path, "rb") as f:
        fuzz_targets.TARGETS[target](f.read())


def test_seeds_run_clean():
    for name, fn in fuzz_targets.TARGETS.items():
        for s in fuzz_targets.seeds(name):
            fn(s)
