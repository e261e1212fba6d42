"""Property tests: random segment streams never raise and never break TcpConnection invariants."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from nsvpn.netstack.segment import ACK, FIN, PSH, RST, SYN, TcpSegment
from nsvpn.netstack.tcp import TcpConfig, TcpConnection

M32 = 0xFFFFFFFF
EVENTS = {"connected", "data", "send_space", "eof", "reset", "timeout", "closed"}
STREAM = bytes((i * 7 + 3 + i // 251) & 0xFF for i in range(70000))
STREAM2 = STREAM + STREAM


def stream_at(off: int, n: int) -> bytes:
    """The peer's (periodic, endless) byte stream; offset 0 follows its SYN."""
    lo = off % len(STREAM)
    return STREAM2[lo:lo + n]

offsets = st.one_of(
    st.just(0),
    st.integers(-100, 3000),
    st.integers(-3000, 70000),  # near the interesting edges
    st.integers(-(1 << 31), (1 << 31)),  # anywhere, including wrapped
)
flag_sets = st.sampled_from(
    [ACK, ACK | PSH, ACK | FIN, SYN, SYN | ACK, RST, RST | ACK, FIN, 0, ACK | SYN | FIN,
     ACK | FIN | PSH, ACK, ACK | PSH, ACK, ACK]
)

ack_offsets = st.one_of(st.just(0), st.just(0), st.integers(-3, 3000),
                        st.integers(-5000, 200000))
seg_op = st.tuples(
    st.sampled_from(["seg", "rel"]), offsets, ack_offsets, flag_sets,
    st.integers(0, 0xFFFF), st.integers(0, 9000), st.one_of(st.none(), st.integers(0, M32)),
)
rare = st.one_of(
    st.tuples(st.just("shutdown")),
    st.tuples(st.just("abort")),
    st.tuples(st.just("refuse")),
)
ops = st.lists(
    st.one_of(
        seg_op,
        seg_op,
        seg_op,
        seg_op,
        st.tuples(st.just("send"), st.integers(0, 100000)),
        st.tuples(st.just("recv"), st.integers(-1, 50000)),
        st.tuples(st.just("time"), st.floats(0, 30)),
        st.tuples(st.just("accept")),
        st.tuples(st.sampled_from(["send", "recv"]), st.integers(-1, 3000)),
        st.tuples(st.just("time"), st.floats(0, 0.5)),
    ),
    min_size=3,
    max_size=80,
)

configs = st.builds(
    TcpConfig,
    mss=st.sampled_from([536, 1460, 8960, 65480]),
    rcv_buf=st.sampled_from([1, 1000, 4096, 65536, 65536, 1 << 20, 4 << 20, 4 << 20]),
    snd_buf=st.sampled_from([1, 4096, 1 << 20]),
    window_scaling=st.booleans(),
    sack=st.booleans(),
    timestamps=st.booleans(),
    max_send_segment=st.sampled_from([None, 100, 65000]),
    max_retransmits=st.integers(1, 5),
    syn_retries=st.integers(0, 3),
    congestion_control=st.booleans(),
)

starts = st.sampled_from(["passive", "passive_established", "active", "active_established"])


def _build(kind, cfg, irs, iss, now):
    if kind.startswith("passive"):
        syn = TcpSegment(irs, 0, SYN, 65535, mss=1460, wscale=7, sack_perm=True,
                         ts_val=5, ts_ecr=0)
        c = TcpConnection.from_syn(syn, now, cfg, iss)
        if kind == "passive_established":
            c.accept(now)
            c.poll_output(now)
            c.on_segment(TcpSegment((irs + 1) & M32, (iss + 1) & M32, ACK, 1000), now)
    else:
        c = TcpConnection.connect(now, cfg, iss)
        c.poll_output(now)
        if kind == "active_established":
            c.on_segment(TcpSegment(irs, (iss + 1) & M32, SYN | ACK, 1000, mss=1200, wscale=3,
                                    ts_val=9, ts_ecr=1), now)
    return c


def _check_output(c, out):
    for s in out:
        assert 0 <= s.seq <= M32 and 0 <= s.ack <= M32
        assert 0 <= s.window <= 0xFFFF
        assert len(s.payload) <= max(c._smss, 1)
        if s.sack_blocks:
            assert len(s.sack_blocks) <= 4
            for left, right in s.sack_blocks:
                assert 0 <= left <= M32 and 0 <= right <= M32


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=starts, cfg=configs, irs=st.integers(0, M32), iss=st.integers(0, M32), script=ops,
       rare_op=st.one_of(st.none(), st.tuples(st.integers(0, 80), rare)))
def test_random_segment_streams_keep_invariants(kind, cfg, irs, iss, script, rare_op):
    if rare_op is not None:  # abort/refuse/shutdown at most once, anywhere
        script = list(script)
        script.insert(rare_op[0], rare_op[1])
    now = 100.0
    c = _build(kind, cfg, irs, iss, now)
    events = list(c.pop_events())
    received = bytearray()
    for op in script:
        name = op[0]
        if name in ("seg", "rel"):
            _, soff, aoff, flags, window, plen, ts = op
            if name == "rel":  # relative to what the connection expects next
                if not -3000 <= soff <= 20000:
                    soff = soff % 20000
                soff += (c.rcv_nxt - irs - 1) & M32
            # payload is always the true stream at that offset, so whatever the connection
            # delivers must be a prefix of STREAM, however the segments overlap or repeat
            if flags & SYN:
                seq = irs
                payload = stream_at(0, plen)
            else:
                seq = (irs + 1 + soff) & M32
                payload = stream_at(soff, plen)
            ack = (c.snd_una + aoff) & M32
            c.on_segment(TcpSegment(seq, ack, flags, window, memoryview(payload), ts_val=ts,
                                    ts_ecr=ts), now)
        elif name == "send":
            before = c.send_space()
            took = c.send(bytes(max(0, op[1])))
            assert 0 <= took <= before
        elif name == "recv":
            got = c.recv(op[1])
            assert op[1] < 0 or len(got) <= op[1]
            received += got
        elif name == "time":
            now += op[1]
            d = c.next_deadline()
            if d is not None and d <= now:
                c.on_timer(now)
        elif name == "shutdown":
            c.shutdown(now)
        elif name == "abort":
            c.abort(now)
        elif name == "accept":
            c.accept(now)
        elif name == "refuse":
            c.refuse(now)
        c.check_invariants()
        out = c.poll_output(now)
        _check_output(c, out)
        c.check_invariants()
        events += c.pop_events()
        d = c.next_deadline()
        if name == "time":
            # every timer that was due has been handled: none is left in the past
            assert d is None or d > now
        if c.state == "CLOSED":
            assert d is None
    received += c.recv()
    event(f"final state {c.state}")
    event("why: " + ",".join(e for e in events if e in ("reset", "timeout")))
    event("received data" if received else "no data")
    event("sent data" if c.snd_una != (iss + 1) & M32 and c.snd_una != iss else "nothing acked")
    # in-order delivery of exactly the peer's stream (segments were cut from it, aligned
    # so that offset 0 is the first byte after the peer's SYN)
    assert bytes(received) == b"".join(
        stream_at(o, min(60000, len(received) - o)) for o in range(0, len(received), 60000))
    assert set(events) <= EVENTS
    if "closed" in events:
        assert events.count("closed") == 1 and events[-1] == "closed"
        assert c.state == "CLOSED"
        assert c.next_deadline() is None
    if c.state == "CLOSED":
        assert "closed" in events


@settings(max_examples=150, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=40),
    order=st.randoms(use_true_random=False),
    irs=st.integers(0, M32),
    dup=st.booleans(),
)
def test_any_arrival_order_reassembles_exactly(sizes, order, irs, dup):
    """Cut a stream into segments, deliver them shuffled (maybe twice): recv gets it all."""
    c = TcpConnection.from_syn(TcpSegment(irs, 0, SYN, 65535, wscale=7), 0.0,
                               TcpConfig(rcv_buf=1 << 20), 77)
    c.accept(0.0)
    c.poll_output(0.0)
    c.on_segment(TcpSegment((irs + 1) & M32, 78, ACK, 1000), 0.0)
    segs = []
    off = 0
    for n in sizes:
        segs.append((off, STREAM[off % 60000:off % 60000 + n]))
        off += n
    total = off
    expect = b"".join(p for _, p in segs)
    if dup:
        segs = segs + segs[: len(segs) // 2]
    order.shuffle(segs)
    for o, p in segs:
        c.on_segment(TcpSegment((irs + 1 + o) & M32, 78, ACK, 1000, p), 0.1)
        c.check_invariants()
    assert c.recv_available() == total
    assert bytes(c.recv()) == expect
    assert c.rcv_nxt == (irs + 1 + total) & M32
    acks = c.poll_output(0.1)
    assert acks[-1].ack == (irs + 1 + total) & M32


def _plausible_peer_step(rnd, c, irs, now):
    """One segment from a peer that is mostly sane (near the windows) and sometimes not."""
    r = rnd.random()
    rcv_off = (c.rcv_nxt - irs - 1) & M32
    if r < 0.6:
        soff = rcv_off + rnd.choice([0, 0, 0, rnd.randint(-2000, 0), rnd.randint(1, 30000)])
    elif r < 0.9:
        soff = rcv_off + rnd.randint(-70000, 70000)
    else:
        soff = rnd.randint(-(1 << 31), 1 << 31)
    inflight = (c._snd_max - c._snd_una)
    a = rnd.random()
    if a < 0.7:
        aoff = rnd.randint(0, max(inflight, 0))
    elif a < 0.9:
        aoff = 0
    else:
        aoff = rnd.randint(-100000, 100000)
    if rnd.random() < 0.01:
        flags = rnd.choice([RST, RST | ACK])
    else:
        flags = rnd.choice([ACK] * 30 + [ACK | PSH] * 10 + [ACK | FIN, SYN, SYN | ACK, FIN, 0])
    plen = rnd.choice([0, 0, 1, 100, 1460, rnd.randint(0, 9000)])
    window = rnd.choice([0, 1, 8, 512, 0xFFFF, rnd.randint(0, 0xFFFF)])
    ts = rnd.choice([None, rnd.getrandbits(32)])
    if flags & SYN:
        seq, payload = irs, stream_at(0, plen)
    else:
        seq, payload = (irs + 1 + soff) & M32, stream_at(soff, plen)
    ack = (c.snd_una + aoff) & M32
    c.on_segment(TcpSegment(seq, ack, flags, window, memoryview(payload), ts_val=ts,
                            ts_ecr=ts), now)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=starts, cfg=configs, irs=st.integers(0, M32), iss=st.integers(0, M32),
       seed=st.integers(0, 1 << 64))
def test_long_plausible_streams_keep_invariants(kind, cfg, irs, iss, seed):
    rnd = random.Random(seed)
    now = 50.0
    c = _build(kind, cfg, irs, iss, now)
    events = list(c.pop_events())
    received = bytearray()
    closed_at = None
    last_una, last_rcv = c._snd_una, c._rcv_nxt
    for step in range(300):
        r = rnd.random()
        if r < 0.7:
            _plausible_peer_step(rnd, c, irs, now)
        elif r < 0.8:
            c.send(bytes(rnd.choice([1, 100, 5000, 100000])))
        elif r < 0.9:
            received += c.recv(rnd.choice([-1, 1, 1000, 100000]))
        elif r < 0.98:
            now += rnd.choice([0.001, 0.1, 1.0, 5.0])
            d = c.next_deadline()
            if d is not None and d <= now:
                c.on_timer(now)
                c.poll_output(now)
                d = c.next_deadline()
                assert d is None or d > now, "a due timer was left in the past"
        elif r < 0.995:
            c.accept(now)
        elif r < 0.998:
            c.shutdown(now)
        else:
            c.abort(now)
        out = c.poll_output(now)
        _check_output(c, out)
        c.check_invariants()
        # cumulative pointers only move forward
        assert c._snd_una >= last_una and c._rcv_nxt >= last_rcv
        last_una, last_rcv = c._snd_una, c._rcv_nxt
        events += c.pop_events()
        if c.state == "CLOSED" and closed_at is None:
            closed_at = step
    received += c.recv()
    event(f"final state {c.state}")
    event("received data" if received else "no data")
    event("closed after {} steps, {}".format(
        "-" if closed_at is None else closed_at // 50 * 50,
        ",".join(e for e in events if e in ("reset", "timeout"))))
    assert bytes(received) == b"".join(
        stream_at(o, min(60000, len(received) - o)) for o in range(0, len(received), 60000))
    assert set(events) <= EVENTS
    if "closed" in events:
        assert events.count("closed") == 1 and events[-1] == "closed"
    assert (c.state == "CLOSED") == ("closed" in events)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 1 << 32),
    drop=st.sampled_from([0.0, 0.02, 0.1, 0.25]),
    dup=st.sampled_from([0.0, 0.05]),
    reorder=st.sampled_from([0.0, 0.1, 0.3]),
    a_bytes=st.integers(0, 300_000),
    b_bytes=st.integers(0, 300_000),
    opts=st.fixed_dictionaries({
        "timestamps": st.booleans(), "sack": st.booleans(), "window_scaling": st.booleans(),
        "rcv_buf": st.sampled_from([2000, 30_000, 1 << 20]),
        "snd_buf": st.sampled_from([3000, 1 << 20]),
        "mss": st.sampled_from([536, 1460, 9000]),
        "congestion_control": st.booleans(),
    }),
    slow_reader=st.booleans(),
)
def test_pair_always_completes_byte_exact(seed, drop, dup, reorder, a_bytes, b_bytes, opts,
                                          slow_reader):
    """Liveness and safety together: whatever the faults and settings, both byte streams
    arrive exactly and both ends reach CLOSED (no deadlock, no stuck window)."""
    from test_tcp_pair import Faults, assert_transfer_ok, both_closed, make_transfer

    faults = Faults(drop=drop, dup=dup, reorder=reorder, delay=0.003, jitter=0.002)
    # TIME_WAIT longer than the largest RTO: with the default 1 s a heavily backed-off
    # retransmission can legitimately meet a finished peer (and its stack's RST)
    p = make_transfer(seed % 1000, faults, a_bytes, b_bytes,
                      read_rate_b=200_000 if slow_reader else None, time_wait=120.0, **opts)
    p.run(lambda: both_closed(p), max_time=3000.0)
    assert both_closed(p), (p.a.state, p.b and p.b.state, p.now)
    assert_transfer_ok(p, a_bytes, b_bytes)
