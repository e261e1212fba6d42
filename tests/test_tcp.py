"""Unit tests of nsvpn.netstack.tcp: one connection driven by hand-made segments."""

from __future__ import annotations

import pytest

from nsvpn.netstack.segment import ACK, FIN, PSH, RST, SYN, TcpSegment
from nsvpn.netstack.tcp import TcpConfig, TcpConnection

M32 = 0xFFFFFFFF
IRS = 1000  # the peer's initial sequence number
ISS = 5000  # ours


def syn(seq=IRS, mss=1460, wscale=7, sack=True, ts=100, window=65535):
    return TcpSegment(seq, 0, SYN, window, mss=mss, wscale=wscale, sack_perm=sack,
                      ts_val=ts, ts_ecr=0 if ts is not None else None)


def seg(seq, ack, flags=ACK, payload=b"", window=65535, ts=None, ecr=None):
    return TcpSegment(seq & M32, ack & M32, flags, window, payload, ts_val=ts, ts_ecr=ecr)


def passive(cfg=None, irs=IRS, iss=ISS, now=0.0, **synkw):
    """An ESTABLISHED passive connection; the peer's window is 65535 << 7."""
    c = TcpConnection.from_syn(syn(seq=irs, **synkw), now, cfg or TcpConfig(), iss)
    c.accept(now)
    (sa,) = c.poll_output(now)
    assert sa.flags == SYN | ACK
    c.on_segment(seg(irs + 1, iss + 1, ts=101 if synkw.get("ts", 100) is not None else None,
                     ecr=sa.ts_val), now)
    assert c.state == "ESTABLISHED"
    assert c.pop_events() == ["connected"]
    assert c.poll_output(now) == []
    return c


def active(cfg=None, irs=IRS, iss=ISS, now=0.0, wscale=7, ts=200, mss=1460):
    c = TcpConnection.connect(now, cfg or TcpConfig(), iss)
    (s,) = c.poll_output(now)
    assert s.flags == SYN
    sa = TcpSegment(irs, (iss + 1) & M32, SYN | ACK, 65535, mss=mss, wscale=wscale,
                    sack_perm=True, ts_val=ts, ts_ecr=s.ts_val)
    c.on_segment(sa, now)
    assert c.state == "ESTABLISHED"
    assert c.pop_events() == ["connected"]
    (a,) = c.poll_output(now)
    assert a.flags == ACK and a.ack == (irs + 1) & M32 and a.seq == (iss + 1) & M32
    return c


def data_segs(out):
    return [s for s in out if s.payload]


# ----------------------------------------------------------------------------- handshake


def test_passive_open_is_deferred_until_accept():
    c = TcpConnection.from_syn(syn(), 0.0, TcpConfig(), ISS)
    assert c.state == "SYN_RECEIVED_PENDING"
    assert c.poll_output(0.0) == []
    c.on_segment(syn(), 0.5)  # the peer's SYN retransmission changes nothing
    assert c.poll_output(0.5) == []
    assert c.next_deadline() is None
    c.accept(1.0)
    (sa,) = c.poll_output(1.0)
    assert (sa.seq, sa.ack, sa.flags) == (ISS, IRS + 1, SYN | ACK)
    assert sa.mss == 1460 and sa.wscale == 7 and sa.sack_perm
    assert sa.ts_ecr == 100 and sa.ts_val is not None
    assert sa.window == 65535  # never scaled in a SYN
    assert c.state == "SYN_RECEIVED"
    c.on_segment(seg(IRS + 1, ISS + 1, ts=150, ecr=sa.ts_val), 1.01)
    assert c.state == "ESTABLISHED" and c.pop_events() == ["connected"]
    assert c.snd_una == ISS + 1 and c.snd_nxt == ISS + 1 and c.rcv_nxt == IRS + 1
    assert c.peer_mss == 1460


def test_refuse_sends_rst_ack_and_closes():
    c = TcpConnection.from_syn(syn(), 0.0, TcpConfig(), ISS)
    c.refuse(0.1)
    (r,) = c.poll_output(0.1)
    assert r.flags == RST | ACK and r.ack == IRS + 1 and r.seq == 0
    assert c.state == "CLOSED" and c.pop_events() == ["closed"]
    assert c.poll_output(0.2) == [] and c.next_deadline() is None


def test_rst_while_pending_closes():
    c = TcpConnection.from_syn(syn(), 0.0, TcpConfig(), ISS)
    c.on_segment(seg(IRS + 1, 0, RST), 0.1)
    assert c.state == "CLOSED" and c.pop_events() == ["reset", "closed"]


def test_from_syn_rejects_non_syn():
    with pytest.raises(ValueError):
        TcpConnection.from_syn(seg(1, 2, ACK), 0.0, TcpConfig(), ISS)


def test_syn_ack_retransmitted_with_backoff_then_timeout():
    cfg = TcpConfig(syn_retries=3)
    c = TcpConnection.from_syn(syn(), 0.0, cfg, ISS)
    c.accept(0.0)
    assert len(c.poll_output(0.0)) == 1
    times = []
    now = 0.0
    for _ in range(3):
        now = c.next_deadline()
        times.append(now)
        c.on_timer(now)
        (sa,) = c.poll_output(now)
        assert sa.flags == SYN | ACK and sa.seq == ISS
    assert times == [1.0, 3.0, 7.0]  # 1 s, then doubling
    c.on_timer(c.next_deadline())
    assert c.state == "CLOSED" and c.pop_events() == ["timeout", "closed"]


def test_duplicate_syn_in_syn_received_resends_syn_ack():
    c = TcpConnection.from_syn(syn(), 0.0, TcpConfig(), ISS)
    c.accept(0.0)
    c.poll_output(0.0)
    c.on_segment(syn(), 0.3)
    (sa,) = c.poll_output(0.3)
    assert sa.flags == SYN | ACK and sa.seq == ISS


def test_bad_ack_in_syn_received_gets_rst():
    c = TcpConnection.from_syn(syn(), 0.0, TcpConfig(), ISS)
    c.accept(0.0)
    c.poll_output(0.0)
    c.on_segment(seg(IRS + 1, ISS + 77), 0.1)
    (r,) = c.poll_output(0.1)
    assert r.flags == RST and r.seq == ISS + 77
    assert c.state == "SYN_RECEIVED"


def test_active_open():
    c = TcpConnection.connect(0.0, TcpConfig(mss=8960, rcv_buf=1 << 20), ISS)
    assert c.state == "SYN_SENT"
    (s,) = c.poll_output(0.0)
    assert (s.seq, s.flags, s.mss, s.wscale, s.sack_perm) == (ISS, SYN, 8960, 5, True)
    assert s.ts_val is not None and s.ts_ecr == 0
    c.on_segment(TcpSegment(IRS, ISS + 1, SYN | ACK, 1000, mss=1400, wscale=2, ts_val=9,
                            ts_ecr=s.ts_val), 0.05)
    assert c.state == "ESTABLISHED" and c.pop_events() == ["connected"]
    (a,) = c.poll_output(0.05)
    assert a.flags == ACK and a.ack == IRS + 1 and a.ts_ecr == 9
    assert c.peer_mss == 1400
    # peer window from SYN-ACK is unscaled; later windows are scaled by 2
    c.send(b"x" * 5000)
    out = c.poll_output(0.06)
    assert sum(len(x.payload) for x in out) == 1000
    assert all(len(x.payload) <= 1400 - 12 for x in out)


def test_active_open_refused():
    c = TcpConnection.connect(0.0, TcpConfig(), ISS)
    c.poll_output(0.0)
    c.on_segment(seg(0, ISS + 1, RST | ACK), 0.01)
    assert c.state == "CLOSED" and c.pop_events() == ["reset", "closed"]


def test_active_open_bad_ack_gets_rst_and_rst_without_ack_ignored():
    c = TcpConnection.connect(0.0, TcpConfig(), ISS)
    c.poll_output(0.0)
    c.on_segment(seg(IRS, 12345, SYN | ACK), 0.01)
    (r,) = c.poll_output(0.01)
    assert r.flags == RST and r.seq == 12345
    c.on_segment(seg(IRS, 0, RST), 0.02)
    assert c.state == "SYN_SENT"


def test_syn_retries_exhausted():
    c = TcpConnection.connect(0.0, TcpConfig(syn_retries=2), ISS)
    c.poll_output(0.0)
    for _ in range(2):
        t = c.next_deadline()
        c.on_timer(t)
        (s,) = c.poll_output(t)
        assert s.flags == SYN and s.seq == ISS
    c.on_timer(c.next_deadline())
    assert c.pop_events() == ["timeout", "closed"]


def test_simultaneous_open():
    a = TcpConnection.connect(0.0, TcpConfig(), 100)
    b = TcpConnection.connect(0.0, TcpConfig(), 900)
    (sa,) = a.poll_output(0.0)
    (sb,) = b.poll_output(0.0)
    a.on_segment(sb, 0.01)
    b.on_segment(sa, 0.01)
    assert a.state == b.state == "SYN_RECEIVED"
    (xa,) = a.poll_output(0.01)
    (xb,) = b.poll_output(0.01)
    assert xa.flags == xb.flags == SYN | ACK and xa.seq == 100 and xb.seq == 900
    a.on_segment(xb, 0.02)
    b.on_segment(xa, 0.02)
    assert a.state == b.state == "ESTABLISHED"
    assert a.pop_events() == ["connected"] and b.pop_events() == ["connected"]
    a.send(b"hello")
    for s in a.poll_output(0.03):
        b.on_segment(s, 0.04)
    assert b.recv() == b"hello"


def test_no_window_scaling_when_peer_did_not_offer_it():
    c = passive(TcpConfig(rcv_buf=1 << 20, congestion_control=False), wscale=None)
    c.on_segment(seg(IRS + 1, ISS + 1, payload=b"a" * 100), 0.1)
    (a,) = c.poll_output(0.1)
    assert a.window == 65535  # capped, unscaled (1 MiB buffer)
    # and the peer's window is taken literally: 65535 bytes at most in flight
    c.send(b"z" * 200000)
    out = c.poll_output(0.2)
    # whole segments up to the unscaled 65535 (the 375-byte tail waits: sender SWS)
    assert sum(len(s.payload) for s in out) == 45 * 1448


def test_syn_without_mss_uses_default():
    c = passive(mss=None, ts=None)
    assert c.peer_mss == 536
    c.send(b"q" * 2000)
    assert [len(s.payload) for s in c.poll_output(0.1)] == [536, 536, 536, 392]


def test_max_send_segment_exceeds_peer_mss():
    c = passive(TcpConfig(max_send_segment=65000))
    c.send(b"q" * 200000)
    sizes = [len(s.payload) for s in c.poll_output(0.1)]
    assert sizes[:3] == [65000, 65000, 65000]


# ----------------------------------------------------------------------------- receiving


def test_in_order_data_one_coalesced_ack_and_copied_payload():
    c = passive()
    buf = bytearray(b"0123456789" * 100)
    for i in range(5):
        # the caller reuses its packet buffer: pass views and scribble afterwards
        c.on_segment(seg(IRS + 1 + 200 * i, ISS + 1, ACK | PSH,
                         memoryview(buf)[200 * i:200 * (i + 1)], ts=200 + i), 0.1)
    expect = bytes(buf)
    buf[:] = b"#" * len(buf)
    out = c.poll_output(0.1)
    assert len(out) == 1
    (a,) = out
    assert a.ack == IRS + 1 + 1000 and a.flags == ACK
    assert a.ts_ecr == 200  # TS.Recent from the first segment of the batch (RFC 7323)
    assert c.pop_events() == ["data"]
    assert c.recv_available() == 1000
    assert c.recv(10) == expect[:10]
    assert bytes(c.recv()) == expect[10:]
    assert c.recv() == b""


def test_out_of_order_reassembly_with_dup_acks_and_sack():
    c = passive()
    d = bytes(range(256)) * 20  # 5120 bytes
    chunks = [(i, d[i:i + 1024]) for i in range(0, 5120, 1024)]
    c.on_segment(seg(IRS + 1 + 2048, ISS + 1, payload=chunks[2][1]), 0.1)
    c.on_segment(seg(IRS + 1 + 4096, ISS + 1, payload=chunks[4][1]), 0.1)
    c.on_segment(seg(IRS + 1 + 3072, ISS + 1, payload=chunks[3][1]), 0.1)
    out = c.poll_output(0.1)
    assert len(out) == 3  # immediate duplicate ACKs so the sender can fast-retransmit
    assert all(a.ack == IRS + 1 for a in out)
    assert out[0].sack_blocks == [(IRS + 1 + 2048, IRS + 1 + 5120)]
    assert c.stats["ooo_segments"] == 3
    assert c.recv_available() == 0 and c.pop_events() == []
    # overlapping retransmission covering a hole and part of held data
    c.on_segment(seg(IRS + 1 + 1024, ISS + 1, payload=d[1024:3000]), 0.2)
    assert c.poll_output(0.2)[0].ack == IRS + 1  # still missing the first KiB
    c.on_segment(seg(IRS + 1, ISS + 1, payload=d[:1500]), 0.3)
    (a,) = c.poll_output(0.3)
    assert a.ack == IRS + 1 + 5120 and not a.sack_blocks
    assert c.pop_events() == ["data"]
    assert bytes(c.recv()) == d
    c.check_invariants()


def test_duplicates_and_overlaps_are_trimmed():
    c = passive()
    c.on_segment(seg(IRS + 1, ISS + 1, payload=b"abcdef"), 0.1)
    c.on_segment(seg(IRS + 1, ISS + 1, payload=b"abcdef"), 0.1)  # duplicate
    c.on_segment(seg(IRS + 4, ISS + 1, payload=b"defghi"), 0.1)  # overlap
    c.on_segment(seg(IRS + 2, ISS + 1, payload=b"b"), 0.1)  # old
    assert bytes(c.recv()) == b"abcdefghi"
    (a,) = c.poll_output(0.1)
    assert a.ack == IRS + 10


def test_receive_window_accounting_zero_window_and_update():
    cfg = TcpConfig(rcv_buf=8192, mss=1024)
    c = passive(cfg)
    c.on_segment(seg(IRS + 1, ISS + 1, payload=b"x" * 3000), 0.1)
    (a,) = c.poll_output(0.1)
    assert a.window << 0 == 8192 - 3000  # 8 KiB buffer: shift 0
    c.on_segment(seg(IRS + 3001, ISS + 1, payload=b"y" * 5192), 0.2)
    (a,) = c.poll_output(0.2)
    assert a.window == 0 and a.ack == IRS + 8193
    # beyond the window: dropped, ACKed; a zero-window probe (seq=RCV.NXT, 1 byte) too
    c.on_segment(seg(IRS + 8193, ISS + 1, payload=b"z"), 0.3)
    (a,) = c.poll_output(0.3)
    assert a.window == 0 and a.ack == IRS + 8193
    assert c.recv_available() == 8192
    # reading a little is not worth a window update (SWS avoidance) ...
    c.recv(100)
    assert c.poll_output(0.4) == []
    # ... reading a lot is
    c.recv(4000)
    (u,) = c.poll_output(0.5)
    assert u.flags == ACK and u.window == 4100
    c.check_invariants()


def test_large_window_is_scaled():
    c = passive(TcpConfig(rcv_buf=16 << 20))
    c.on_segment(seg(IRS + 1, ISS + 1, payload=b"x" * 10), 0.1)
    (a,) = c.poll_output(0.1)
    # 16 MiB needs shift 9: the field times 512 covers the free space (rounded up)
    assert 0 <= (a.window << 9) - ((16 << 20) - 10) < 512


def test_peer_flooding_cannot_grow_buffers():
    cfg = TcpConfig(rcv_buf=4096, mss=1000)
    c = passive(cfg)
    for i in range(200):
        c.on_segment(seg(IRS + 1 + 1000 * i, ISS + 1, payload=b"f" * 1000), 0.1)
        c.on_segment(seg(IRS + 1 + 1000 * i + 5000, ISS + 1, payload=b"g" * 1000), 0.1)
    c.poll_output(0.1)
    c.check_invariants()
    assert c.recv_available() <= 4096


def test_ooo_interval_count_is_bounded():
    c = passive()
    for i in range(500):
        c.on_segment(seg(IRS + 1 + 10 + 20 * i, ISS + 1, payload=b"s"), 0.1)
    assert c.stats["ooo_dropped"] > 0
    c.check_invariants()


# ----------------------------------------------------------------------------- sending


def test_send_respects_peer_window_and_buffer_bound():
    c = passive(TcpConfig(snd_buf=10000))
    assert c.send_space() == 10000
    assert c.send(b"a" * 15000) == 10000
    assert c.send_space() == 0 and c.send(b"b") == 0
    c.on_segment(seg(IRS + 1, ISS + 1, window=3), 0.1)  # 3 << 7 = 384 bytes of window
    # sender SWS avoidance: a window far below one segment is not used at once ...
    assert c.poll_output(0.1) == []
    # ... but the persist timer overrides it
    t = c.next_deadline()
    c.on_timer(t)
    out = c.poll_output(t)
    assert sum(len(s.payload) for s in out) == 384
    c.on_segment(seg(IRS + 1, ISS + 1 + 384, window=400), 0.2)
    out = c.poll_output(0.2)
    assert sum(len(s.payload) for s in out) == 10000 - 384
    assert c.pop_events() == []  # only a quarter of the buffer freed so far? (384 < 2500)
    c.on_segment(seg(IRS + 1, ISS + 1 + 10000, window=400), 0.3)
    assert c.pop_events() == ["send_space"]
    assert c.send_space() == 10000


def test_initial_cwnd_is_ten_segments_and_grows():
    c = passive(TcpConfig(snd_buf=1 << 20))
    c.on_segment(seg(IRS + 1, ISS + 1, window=0xFFFF), 0.0)
    c.send(b"d" * 200000)
    out = c.poll_output(0.01)
    assert len(out) == 10 and all(len(s.payload) == 1448 for s in out)
    c.on_segment(seg(IRS + 1, out[-1].seq + len(out[-1].payload), window=0xFFFF), 0.02)
    assert len(c.poll_output(0.02)) == 20  # slow start


def test_retransmission_timeout_backoff_and_give_up():
    cfg = TcpConfig(max_retransmits=4, rto_initial=1.0)
    c = passive(cfg)
    c.send(b"r" * 3000)
    out = c.poll_output(0.0)
    assert len(data_segs(out)) == 3
    # first a tail loss probe: the last 1448 bytes again, well before the RTO
    t = c.next_deadline()
    assert t < 0.1
    c.on_timer(t)
    (probe,) = c.poll_output(t)
    assert probe.seq == ISS + 1 + 3000 - 1448 and len(probe.payload) == 1448
    assert c.stats["tail_probes"] == 1
    deadlines = []
    for _ in range(4):
        t = c.next_deadline()
        deadlines.append(t)
        c.on_timer(t)
        out = c.poll_output(t)
        assert out and out[0].seq == ISS + 1 and len(out[0].payload) == 1448  # cwnd 1 SMSS
        assert len(out) == 1
    # RTT was measured on the handshake (~0 s) -> RTO at rto_min, then doubling
    gaps = [b - a for a, b in zip([0.0] + deadlines, deadlines)]
    assert gaps[0] == pytest.approx(0.2)  # RTT ~0 measured on the handshake: RTO = rto_min
    assert gaps[1] == pytest.approx(2 * gaps[0]) and gaps[2] == pytest.approx(2 * gaps[1])
    assert c.stats["retransmits"] == 5
    c.on_timer(c.next_deadline())
    assert c.state == "CLOSED" and c.pop_events() == ["timeout", "closed"]


def test_rto_retransmit_then_ack_resumes_and_go_back_n():
    c = passive()
    c.send(b"k" * 5000)
    c.poll_output(0.0)
    c.on_timer(c.next_deadline())  # tail loss probe
    assert len(c.poll_output(0.01)) == 1
    t = c.next_deadline()
    assert t == pytest.approx(0.2)
    c.on_timer(t)
    (r,) = c.poll_output(t)
    assert r.seq == ISS + 1
    # the peer had everything but the first segment: the cumulative ACK covers all
    c.on_segment(seg(IRS + 1, ISS + 1 + 5000), t + 0.01)
    assert c.snd_una == c.snd_nxt == ISS + 5001
    assert c.next_deadline() is None
    c.check_invariants()


def test_rtt_estimate_from_timestamps():
    c = passive(TcpConfig(rto_min=0.01))
    c.send(b"t" * 1000)
    (d,) = c.poll_output(10.0)
    c.on_segment(seg(IRS + 1, ISS + 1001, ts=500, ecr=d.ts_val), 10.05)
    # first sample was the handshake (0 s); RFC 6298 smoothing moves 1/8 towards 0.05
    assert c._srtt == pytest.approx(0.05 / 8, abs=0.0005)
    for i in range(40):
        c.send(b"u")
        (d,) = c.poll_output(10.1 + i)
        c.on_segment(seg(IRS + 1, ISS + 1002 + i, ts=501 + i, ecr=d.ts_val), 10.15 + i)
    assert c._srtt == pytest.approx(0.05, abs=0.002)
    assert 0.05 < c._rto < 0.1


def test_fast_retransmit_on_three_dup_acks():
    c = passive(TcpConfig(snd_buf=1 << 20))
    c.send(b"f" * 14480)
    out = c.poll_output(0.0)
    assert len(out) == 10
    cwnd0 = c.cwnd
    for i in range(3):
        c.on_segment(seg(IRS + 1, ISS + 1), 0.01 + i * 0.001)  # duplicate ACKs
    out = c.poll_output(0.02)
    assert out[0].seq == ISS + 1 and len(out[0].payload) == 1448
    assert c.stats["fast_retransmits"] == 1 and c.stats["dup_acks"] == 3
    assert c.cwnd < cwnd0 + 3 * 1448
    # a partial ACK retransmits the next hole at once (NewReno)
    c.on_segment(seg(IRS + 1, ISS + 1 + 2896), 0.03)
    out = c.poll_output(0.03)
    assert out[0].seq == ISS + 1 + 2896
    # a full ACK ends recovery
    c.on_segment(seg(IRS + 1, ISS + 1 + 14480), 0.04)
    assert not c._in_recovery and c.cwnd <= c._ssthresh


def test_zero_window_persist_probe():
    c = passive()
    c.on_segment(seg(IRS + 1, ISS + 1, window=0), 0.0)
    c.send(b"p" * 100)
    assert c.poll_output(0.0) == []
    t1 = c.next_deadline()
    assert t1 is not None
    c.on_timer(t1)
    (probe,) = c.poll_output(t1)
    assert probe.seq == ISS and not probe.payload  # old seq: the peer must answer
    c.on_segment(seg(IRS + 1, ISS + 1, window=0), t1 + 0.01)
    assert c.poll_output(t1 + 0.01) == []
    t2 = c.next_deadline()
    assert t2 - t1 > t1 - 0.0  # backoff
    c.on_timer(t2)
    c.poll_output(t2)
    # the window opens: data flows at once
    c.on_segment(seg(IRS + 1, ISS + 1, window=10), t2 + 0.01)
    (d,) = c.poll_output(t2 + 0.01)
    assert d.payload == b"p" * 100


def test_persist_timeout_when_peer_is_gone():
    c = passive(TcpConfig(max_retransmits=3))
    c.on_segment(seg(IRS + 1, ISS + 1, window=0), 0.0)
    c.send(b"p")
    c.poll_output(0.0)
    for _ in range(10):
        t = c.next_deadline()
        if t is None:
            break
        c.on_timer(t)
        c.poll_output(t)
    assert c.pop_events() == ["timeout", "closed"]


# ----------------------------------------------------------------------------- closing


def test_active_close_fin_wait_time_wait_expiry():
    c = passive(TcpConfig(time_wait=1.0))
    c.send(b"bye")
    c.shutdown(0.0)
    assert c.state == "FIN_WAIT_1" and c.send_space() == 0
    (d,) = c.poll_output(0.0)
    assert d.flags & FIN and d.payload == b"bye"
    c.on_segment(seg(IRS + 1, ISS + 5), 0.1)
    assert c.state == "FIN_WAIT_2"
    c.on_segment(seg(IRS + 1, ISS + 5, ACK | FIN, b"end"), 0.2)
    assert c.state == "TIME_WAIT"
    assert c.pop_events() == ["data", "eof"]
    (a,) = c.poll_output(0.2)
    assert a.ack == IRS + 5
    # a retransmitted FIN is re-ACKed and restarts TIME_WAIT
    c.on_segment(seg(IRS + 1, ISS + 5, ACK | FIN, b"end"), 0.9)
    (a,) = c.poll_output(0.9)
    assert a.ack == IRS + 5
    assert c.next_deadline() == pytest.approx(1.9)
    c.on_timer(1.9)
    assert c.state == "CLOSED" and c.pop_events() == ["closed"]
    assert bytes(c.recv()) == b"end"


def test_passive_close_close_wait_last_ack():
    c = passive()
    c.on_segment(seg(IRS + 1, ISS + 1, ACK | FIN, b"last"), 0.1)
    assert c.state == "CLOSE_WAIT" and c.pop_events() == ["data", "eof"]
    (a,) = c.poll_output(0.1)
    assert a.ack == IRS + 6
    # half-closed: we can still send
    c.send(b"reply")
    (d,) = c.poll_output(0.2)
    assert d.payload == b"reply" and not d.flags & FIN
    c.shutdown(0.3)
    assert c.state == "LAST_ACK"
    (f,) = c.poll_output(0.3)
    assert f.flags & FIN and f.seq == ISS + 6
    c.on_segment(seg(IRS + 6, ISS + 7), 0.4)
    assert c.state == "CLOSED" and c.pop_events() == ["closed"]


def test_simultaneous_close_closing_state():
    c = passive()
    c.shutdown(0.0)
    (f,) = c.poll_output(0.0)
    assert f.flags == ACK | FIN
    c.on_segment(seg(IRS + 1, ISS + 1, ACK | FIN), 0.1)  # peer's FIN, ours not yet acked
    assert c.state == "CLOSING"
    c.poll_output(0.1)
    c.on_segment(seg(IRS + 2, ISS + 2), 0.2)
    assert c.state == "TIME_WAIT"


def test_out_of_order_fin_waits_for_data():
    c = passive()
    c.on_segment(seg(IRS + 6, ISS + 1, ACK | FIN, b"world"), 0.1)
    assert c.state == "ESTABLISHED" and c.pop_events() == []
    c.on_segment(seg(IRS + 1, ISS + 1, ACK, b"hello"), 0.2)
    assert c.state == "CLOSE_WAIT" and c.pop_events() == ["data", "eof"]
    assert bytes(c.recv()) == b"helloworld"
    (a,) = c.poll_output(0.2)
    assert a.ack == IRS + 12


def test_fin_lost_is_retransmitted():
    c = passive()
    c.shutdown(0.0)
    c.poll_output(0.0)
    t = c.next_deadline()
    c.on_timer(t)
    (f,) = c.poll_output(t)
    assert f.flags & FIN and f.seq == ISS + 1


# ----------------------------------------------------------------------------- RST and RFC 5961


def test_rst_exact_sequence_resets():
    c = passive()
    c.on_segment(seg(IRS + 1, 0, RST), 0.1)
    assert c.state == "CLOSED" and c.pop_events() == ["reset", "closed"]


def test_rst_in_window_but_not_exact_gets_challenge_ack():
    c = passive()
    c.on_segment(seg(IRS + 500, 0, RST), 0.1)
    assert c.state == "ESTABLISHED"
    (a,) = c.poll_output(0.1)
    assert a.flags == ACK and a.ack == IRS + 1
    assert c.stats["challenge_acks"] == 1


def test_rst_out_of_window_ignored():
    c = passive()
    c.on_segment(seg(IRS - 5000, 0, RST), 0.1)
    c.on_segment(seg(IRS + 100_000_000, 0, RST), 0.1)
    assert c.state == "ESTABLISHED" and c.poll_output(0.1) == []


def test_syn_on_established_gets_challenge_ack():
    c = passive()
    c.on_segment(seg(IRS + 1, 0, SYN), 0.1)
    assert c.state == "ESTABLISHED"
    (a,) = c.poll_output(0.1)
    assert a.flags == ACK and a.ack == IRS + 1


def test_ack_of_unsent_data_is_answered_and_dropped():
    c = passive()
    c.on_segment(seg(IRS + 1, ISS + 9999, payload=b"zz"), 0.1)
    assert c.recv_available() == 0
    (a,) = c.poll_output(0.1)
    assert a.ack == IRS + 1 and c.snd_una == ISS + 1


def test_abort_sends_rst():
    c = passive()
    c.send(b"abc")
    c.poll_output(0.0)
    c.abort(0.1)
    assert c.state == "CLOSED" and c.pop_events() == ["closed"]
    r, r2 = c.poll_output(0.1)
    assert r.flags & RST and r.seq == ISS + 4
    assert r2.flags & RST and r2.seq == ISS + 1  # data unacknowledged: snd_una as well
    c = passive()
    c.abort(0.1)
    (r,) = c.poll_output(0.1)  # all acknowledged: one RST is exact
    assert r.flags & RST and r.seq == ISS + 1
    assert c.next_deadline() is None


def test_abort_rst_stays_inside_a_shrunken_peer_window():
    """The peer shrank its window below what we already sent (it drops that data): a RST at
    snd_max would be outside its window and dropped too, leaving it waiting for ever."""
    c = passive(ts=None)
    c.send(bytes(20000))
    sent = sum(len(x.payload) for x in data_segs(c.poll_output(0.0)))
    assert sent > 2024  # (the initial congestion window's worth)
    c.on_segment(seg(IRS + 1, ISS + 1 + 1000, window=8), 0.1)  # 8 << 7 = 1024 bytes
    c.abort(0.2)
    rsts = [x.seq for x in c.poll_output(0.2) if x.flags & RST]
    # the window edge, and snd_una for a peer that dropped all it had not acknowledged
    assert rsts == [ISS + 1 + 1000 + 1024, ISS + 1 + 1000]


def test_abort_in_syn_sent_is_silent():
    c = TcpConnection.connect(0.0, TcpConfig(), ISS)
    c.poll_output(0.0)
    c.abort(0.1)
    assert c.poll_output(0.1) == [] and c.pop_events() == ["closed"]


def test_unacceptable_segment_is_acked_not_processed():
    c = passive()
    c.on_segment(seg(IRS - 100, ISS + 1, payload=b"old"), 0.1)
    (a,) = c.poll_output(0.1)
    assert a.ack == IRS + 1 and c.recv_available() == 0
    assert c.stats["unacceptable"] == 1


# ----------------------------------------------------------------------------- wraparound


@pytest.mark.parametrize("irs,iss", [(M32 - 500, M32 - 700), (M32, M32), (0x7FFFFFF0, 0)])
def test_sequence_wraparound_both_directions(irs, iss):
    c = passive(irs=irs, iss=iss)
    data = bytes(range(256)) * 8  # 2048 bytes crosses 2**32
    # receive across the wrap, partly out of order
    c.on_segment(seg(irs + 1 + 1024, iss + 1, payload=data[1024:]), 0.1)
    c.on_segment(seg(irs + 1, iss + 1, payload=data[:1024]), 0.1)
    assert bytes(c.recv()) == data
    out = c.poll_output(0.1)
    assert out[-1].ack == (irs + 1 + 2048) & M32
    # send across the wrap and get it acknowledged with 32-bit wrapped numbers
    c.send(data)
    out = data_segs(c.poll_output(0.2))
    assert out[0].seq == (iss + 1) & M32
    assert all(0 <= s.seq <= M32 and 0 <= s.ack <= M32 for s in out)
    c.on_segment(seg(irs + 2049, iss + 1 + 2048), 0.3)
    assert c.snd_una == (iss + 1 + 2048) & M32 == c.snd_nxt
    assert c.next_deadline() is None
    c.check_invariants()


def test_timestamps_echo_and_option_absence():
    c = passive()
    c.on_segment(seg(IRS + 1, ISS + 1, payload=b"a", ts=777), 1.0)
    (a,) = c.poll_output(1.0)
    assert a.ts_ecr == 777 and a.ts_val == 1000
    c2 = passive(ts=None)
    c2.on_segment(seg(IRS + 1, ISS + 1, payload=b"a"), 1.0)
    (a,) = c2.poll_output(1.0)
    assert a.ts_val is None and a.ts_ecr is None


def test_new_syn_in_time_wait_finishes_the_old_connection():
    c = passive()
    c.shutdown(0.0)
    c.poll_output(0.0)
    c.on_segment(seg(IRS + 1, ISS + 2, ACK | FIN), 0.1)
    assert c.state == "TIME_WAIT"
    c.pop_events()
    c.on_segment(syn(seq=IRS + 100000), 0.2)
    assert c.state == "CLOSED" and c.pop_events() == ["closed"]
    assert c.poll_output(0.2) == []


def test_sack_blocks_only_on_pure_acks():
    c = passive()
    c.on_segment(seg(IRS + 1 + 500, ISS + 1, payload=b"x" * 100), 0.1)
    c.send(b"y" * 10)
    out = c.poll_output(0.1)
    assert out and all(not s.sack_blocks for s in out if s.payload)


def test_tail_loss_probe_sends_new_data_if_allowed_and_once_per_flight():
    c = passive(TcpConfig(snd_buf=1 << 20, initial_cwnd_segments=2))
    c.send(b"n" * 10000)
    out = c.poll_output(0.0)
    assert len(out) == 2  # cwnd-limited
    t = c.next_deadline()
    c.on_timer(t)
    (probe,) = c.poll_output(t)
    assert probe.seq == ISS + 1 + 2 * 1448  # new data, beyond cwnd by one segment
    # no second probe for this flight: the next deadline is the RTO
    assert c.next_deadline() == pytest.approx(0.2)
    # an ACK re-arms the probe for the next flight
    c.on_segment(seg(IRS + 1, ISS + 1 + 1448), t + 0.001)
    c.poll_output(t + 0.001)
    assert c.next_deadline() < 0.1


def test_shutdown_before_handshake_sends_data_and_fin_after_it():
    c = TcpConnection.connect(0.0, TcpConfig(), ISS)
    c.poll_output(0.0)
    assert c.send(b"GET / HTTP/1.0\r\n\r\n") == 18
    c.shutdown(0.0)
    assert c.state == "SYN_SENT" and c.send_space() == 0
    c.on_segment(TcpSegment(IRS, ISS + 1, SYN | ACK, 65535, mss=1460), 0.01)
    assert c.state == "FIN_WAIT_1" and c.pop_events() == ["connected"]
    (d,) = c.poll_output(0.01)
    assert d.payload == b"GET / HTTP/1.0\r\n\r\n" and d.flags & FIN
    # passive side: shutdown while the accept is still pending
    p = TcpConnection.from_syn(syn(), 0.0, TcpConfig(), ISS)
    p.send(b"hi")
    p.shutdown(0.0)
    p.accept(0.0)
    p.poll_output(0.0)
    p.on_segment(seg(IRS + 1, ISS + 1), 0.01)
    assert p.state == "FIN_WAIT_1"
    (d,) = p.poll_output(0.01)
    assert d.payload == b"hi" and d.flags & FIN


def sack_seg(ack, blocks, window=65535):
    s = seg(IRS + 1, ack, window=window)
    s.sack_blocks = [(a & M32, b & M32) for a, b in blocks]
    return s


def test_limited_transmit_sends_new_data_on_first_dup_acks():
    c = passive(TcpConfig(snd_buf=1 << 20, initial_cwnd_segments=4, sack=False), sack=False)
    c.send(b"L" * 20 * 1448)
    assert len(c.poll_output(0.0)) == 4
    c.on_segment(seg(IRS + 1, ISS + 1), 0.01)  # first duplicate ACK
    (n1,) = c.poll_output(0.01)
    assert n1.seq == ISS + 1 + 4 * 1448  # one new segment beyond cwnd (RFC 3042)
    c.on_segment(seg(IRS + 1, ISS + 1), 0.011)
    (n2,) = c.poll_output(0.011)
    assert n2.seq == ISS + 1 + 5 * 1448
    c.on_segment(seg(IRS + 1, ISS + 1), 0.012)  # third: fast retransmit
    out = c.poll_output(0.012)
    assert out[0].seq == ISS + 1 and c.stats["fast_retransmits"] == 1


def test_sack_recovery_repairs_several_holes_in_one_round_trip():
    c = passive(TcpConfig(snd_buf=1 << 20, initial_cwnd_segments=20))
    mss = 1448
    c.send(b"S" * 20 * mss)
    assert len(c.poll_output(0.0)) == 20
    base = ISS + 1
    # segments 0-1 and 6-7 lost; the peer SACKs what arrived, one dup ACK per segment
    got = []
    for k in list(range(2, 6)) + list(range(8, 20)):
        got.append(k)
        blocks = []
        if any(x < 6 for x in got):
            blocks.append((base + 2 * mss, base + (max(x for x in got if x < 6) + 1) * mss))
        if any(x >= 8 for x in got):
            blocks.append((base + 8 * mss, base + (max(got) + 1) * mss))
        c.on_segment(sack_seg(base, blocks[::-1]), 0.01)
    out = c.poll_output(0.01)
    rexmit = sorted((s.seq - base) // mss for s in out if s.seq - base < 20 * mss)
    assert rexmit == [0, 1, 6, 7]  # all four holes, nothing the peer already has
    assert c.stats["fast_retransmits"] == 1
    c.on_segment(seg(IRS + 1, base + 20 * mss), 0.02)
    assert c.snd_una == (base + 20 * mss) & M32 and not c._sacked
    c.check_invariants()


def test_fin_discards_held_data_beyond_it():
    """A (broken) peer sending data past its FIN cannot leave state behind RCV.NXT."""
    c = passive()
    c.on_segment(seg(IRS + 1 + 10, ISS + 1, payload=b"z" * 50), 0.1)
    c.on_segment(seg(IRS + 1, ISS + 1, ACK | FIN), 0.2)
    assert c.state == "CLOSE_WAIT" and c.pop_events() == ["eof"]
    assert not c._ooo and c.recv_available() == 0
    c.check_invariants()
    c2 = passive()
    c2.on_segment(seg(IRS + 1 + 10, ISS + 1, payload=b"z" * 50), 0.1)
    c2.on_segment(seg(IRS + 1 + 5, ISS + 1, ACK | FIN), 0.2)  # FIN out of order
    c2.on_segment(seg(IRS + 1, ISS + 1, payload=b"hello"), 0.3)
    assert bytes(c2.recv()) == b"hello" and c2.state == "CLOSE_WAIT"
    c2.check_invariants()


def test_backoff_forgotten_on_new_ack_and_stale_echo_ignored():
    c = passive(TcpConfig(rto_min=0.2))
    c.send(b"b" * 4000)
    (d0, *_) = c.poll_output(1.0)
    t = 1.0
    for _ in range(4):  # the tail probe, then three RTOs
        t = c.next_deadline()
        c.on_timer(t)
        c.poll_output(t)
    assert c._rto == pytest.approx(1.6)  # 0.2 doubled three times
    srtt = c._srtt
    # the ACK finally arrives, echoing the timestamp of the very first transmission: a
    # 2+ second "RTT" that only reflects the losses; it must not poison SRTT
    c.on_segment(seg(IRS + 1, ISS + 1 + 1448, ts=900, ecr=d0.ts_val), t + 0.01)
    assert c._srtt == srtt
    assert c._rto == pytest.approx(0.2)  # backoff forgotten: new data was acknowledged


def test_exact_fill_of_the_send_buffer_still_reports_send_space():
    c = passive(TcpConfig(snd_buf=4000))
    assert c.send(b"e" * c.send_space()) == 4000  # a relay never offers more than fits
    c.poll_output(0.0)
    c.on_segment(seg(IRS + 1, ISS + 1 + 4000), 0.1)
    assert c.pop_events() == ["send_space"]
