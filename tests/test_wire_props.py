"""Property tests: no input makes the parsers (or the stack's input path) raise, and what we
emit parses back to what we meant."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nsvpn.netstack import wire
from nsvpn.netstack.segment import TcpSegment

A4 = bytes([10, 0, 2, 100])
B4 = bytes([10, 0, 2, 2])
A6 = bytes.fromhex("fd000000000000000000000000000064")
B6 = bytes.fromhex("fd000000000000000000000000000002")

SETTINGS = settings(max_examples=400, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def parse_all(raw: bytes, verify: bool = True, vnet: bool = False) -> dict:
    """Run every parser a packet can reach; returns the drop counters."""
    drops: dict = {}
    buf = memoryview(raw)
    gso = False
    if vnet:
        res = wire.parse_vnet(buf, drops)
        if res is None:
            return drops
        vh, buf = res
        gso = vh.gso_type != 0
    ip = wire.parse_ip(buf, drops, gso=gso)
    if ip is None:
        return drops
    if ip.proto == wire.PROTO_TCP:
        res = wire.parse_tcp(ip, drops, verify)
        if res is not None:
            bytes(res[2].payload)
    elif ip.proto == wire.PROTO_UDP:
        wire.parse_udp(ip, drops, verify)
    elif ip.proto in (wire.PROTO_ICMP, wire.PROTO_ICMPV6):
        m = wire.parse_icmp(ip, drops)
        if m is not None and m.type == (3 if ip.version == 4 else 1):
            wire.parse_quoted(m.body, drops)
    return drops


def valid_packets():
    seg = st.builds(
        TcpSegment,
        st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 255),
        st.integers(0, 65535), st.binary(max_size=300),
        mss=st.none() | st.integers(0, 65535), wscale=st.none() | st.integers(0, 14),
        sack_perm=st.booleans(), ts_val=st.none() | st.integers(0, 2**32 - 1),
        ts_ecr=st.none() | st.integers(0, 2**32 - 1),
        sack_blocks=st.none() | st.lists(st.tuples(st.integers(0, 2**32 - 1),
                                                   st.integers(0, 2**32 - 1)), max_size=4),
    )
    addrs = st.sampled_from([(A4, B4), (A6, B6)])
    port = st.integers(0, 65535)
    tcp = st.builds(lambda a, sp, dp, s: wire.build_tcp(a[0], a[1], sp, dp, s), addrs, port,
                    port, seg)
    udp = st.builds(lambda a, sp, dp, p: wire.build_udp(a[0], a[1], sp, dp, p), addrs, port,
                    port, st.binary(max_size=300))
    icmp = st.builds(lambda a, t, c, r, b: wire.build_icmp(a[0], a[1], t, c, r, b), addrs,
                     st.integers(4, 255), st.integers(0, 255), st.integers(0, 2**32 - 1),
                     st.binary(max_size=100))
    unreach = st.builds(
        lambda a, why, p: wire.build_unreachable(a[1], a[0], why,
                                                 wire.build_udp(a[0], a[1], 1, 2, p)),
        addrs, st.sampled_from(sorted(wire.UNREACH_CODES)), st.binary(max_size=1000))
    return st.one_of(tcp, udp, icmp, unreach)


@SETTINGS
@given(st.binary(max_size=200), st.booleans(), st.booleans())
def test_arbitrary_bytes_never_raise(raw, verify, vnet):
    parse_all(raw, verify, vnet)


@SETTINGS
@given(st.sampled_from([4, 6]), st.binary(max_size=120))
def test_arbitrary_bytes_behind_a_plausible_version_never_raise(version, rest):
    parse_all(bytes([(version << 4) | (len(rest) % 16)]) + rest, verify=False)


@SETTINGS
@given(valid_packets(), st.data())
def test_mutated_valid_packets_never_raise(raw, data):
    assert parse_all(raw) == {}  # the unmutated packet is accepted
    mutated = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 6))):
        kind = data.draw(st.sampled_from(["flip", "truncate", "extend"]))
        if kind == "flip" and mutated:
            i = data.draw(st.integers(0, len(mutated) - 1))
            mutated[i] = data.draw(st.integers(0, 255))
        elif kind == "truncate":
            del mutated[data.draw(st.integers(0, len(mutated))):]
        else:
            mutated += data.draw(st.binary(max_size=20))
    for verify in (True, False):
        parse_all(bytes(mutated), verify)
        parse_all(bytes(wire.VNET_PLAIN) + bytes(mutated), verify, vnet=True)


@SETTINGS
@given(valid_packets())
def test_every_single_byte_corruption_is_caught_or_harmless(raw):
    """A packet with one corrupted byte is either dropped or still parses (never raises);
    flips in the checksummed part are caught by a checksum somewhere."""
    for i in range(0, len(raw), max(1, len(raw) // 16)):
        mutated = bytearray(raw)
        mutated[i] ^= 0x5A
        parse_all(bytes(mutated))


@SETTINGS
@given(st.sampled_from([(A4, B4), (A6, B6)]), st.integers(0, 65535), st.integers(0, 65535),
       st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 255),
       st.integers(0, 65535), st.binary(max_size=2000), st.booleans())
def test_tcp_roundtrip(addrs, sport, dport, seq, ack, flags, window, payload, vnet):
    seg = TcpSegment(seq, ack, flags, window, payload, ts_val=seq, ts_ecr=ack)
    raw = wire.build_tcp(addrs[0], addrs[1], sport, dport, seg, vnet=vnet)
    drops: dict = {}
    buf = memoryview(raw)
    if vnet:
        vh, buf = wire.parse_vnet(buf, drops)
        assert vh.flags == wire.VNET_F_NEEDS_CSUM
    ip = wire.parse_ip(buf, drops)
    got = wire.parse_tcp(ip, drops, verify=not vnet)
    assert drops == {}
    sp, dp, back = got
    assert (sp, dp, back.seq, back.ack, back.flags, back.window) == (sport, dport, seq, ack,
                                                                     flags, window)
    assert (back.ts_val, back.ts_ecr, bytes(back.payload)) == (seq, ack, payload)


# ------------------------------------------------------------------------- the stack's input


def _stack_packets():
    from nsvpn.netstack.segment import ACK, FIN, RST, SYN

    flags = st.sampled_from([SYN, SYN | ACK, ACK, ACK | FIN, RST, RST | ACK, 0, 0xFF])
    seg = st.builds(TcpSegment, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), flags,
                    st.integers(0, 65535), st.binary(max_size=200),
                    mss=st.none() | st.integers(0, 65535), wscale=st.none() | st.integers(0, 14),
                    ts_val=st.none() | st.integers(0, 2**32 - 1))
    tcp = st.builds(lambda sp, s: wire.build_tcp(A4, bytes([10, 0, 2, 50]), sp, 80, s),
                    st.integers(1, 4), seg)
    return st.one_of(tcp, valid_packets())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_stack_packets(), st.lists(st.tuples(st.integers(0, 400),
                                                               st.integers(0, 255)),
                                                     max_size=3),
                          st.integers(0, 400)), max_size=12),
       st.booleans(), st.sampled_from(["accept", "refuse", "unreach", "ignore"]))
def test_stack_input_never_raises(packets, vnet, policy):
    """Valid, mutated and truncated packets into a Stack, the relay answering new flows by
    `policy`, timers firing: nothing raises and the flow counters stay consistent."""
    from nsvpn.netstack.stack import NewTcpFlow, Stack, StackConfig

    stack = Stack(StackConfig(vnet_hdr=vnet, max_half_open=2, max_tcp_flows=3))
    now = 0.0
    for raw, flips, cut in packets:
        buf = bytearray(raw)
        for pos, val in flips:
            if pos < len(buf):
                buf[pos] = val
        if cut < len(buf) and cut % 3 == 0:
            del buf[cut:]
        if vnet:
            buf[0:0] = wire.vnet_header(flags=cut & 3)
        stack.input_packet(bytes(buf), now)
        for ev in stack.pop_events():
            if isinstance(ev, NewTcpFlow):
                if policy == "accept":
                    stack.accept(ev.flow, now)
                elif policy == "refuse":
                    stack.refuse(ev.flow, now)
                elif policy == "unreach":
                    stack.unreachable(ev.flow, now, "host")
        stack.output_packets()
        now += 0.5
        d = stack.next_deadline()
        if d is not None and d <= now:
            stack.on_timer(now)
    c = stack.counters
    assert 0 <= c["tcp_half_open"] <= 2 and c["tcp_flows"] <= 3
    assert c["tcp_half_open"] <= c["tcp_flows"]


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=4000, max_size=20000), st.integers(0, 7))
def test_chunked_ones_sum_equals_whole_buffer_sum(data, cut):
    data = data[cut:]
    x = int.from_bytes(data, "big") << (8 if len(data) & 1 else 0)
    assert wire.ones_sum(data) == x % 0xFFFF
    assert wire.ones_sum(memoryview(data)) == x % 0xFFFF


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_stack_packets(), st.lists(st.tuples(st.integers(0, 80),
                                                               st.integers(0, 255)),
                                                     max_size=2)), max_size=12),
       st.booleans(), st.booleans())
def test_fast_path_behaves_like_general_path(packets, vnet, verify):
    """Stack._fast (one-step IPv4/TCP parse for known flows) changes nothing observable."""
    from nsvpn.netstack.stack import NewTcpFlow, Stack, StackConfig

    def run(fast: bool):
        stack = Stack(StackConfig(vnet_hdr=vnet, verify_checksums=verify))
        stack._fast = fast
        stack._secret = b"s" * 16
        trace = []
        for i, (raw, flips) in enumerate(packets):
            buf = bytearray(raw)
            for pos, val in flips:
                if pos < len(buf):
                    buf[pos] = val
            if vnet:
                buf[0:0] = wire.VNET_PLAIN
            stack.input_packet(bytes(buf), i * 0.1)
            for ev in stack.pop_events():
                if isinstance(ev, NewTcpFlow):
                    stack.accept(ev.flow, i * 0.1)
                trace.append((type(ev).__name__, getattr(ev, "kind", None),
                              getattr(getattr(ev, "flow", None), "id", None)))
            trace.append(stack.output_packets())
            for f in stack.tcp_flows():
                trace.append(bytes(stack.tcp_recv(f, -1)))
        return trace, stack.counters

    assert run(True) == run(False)
