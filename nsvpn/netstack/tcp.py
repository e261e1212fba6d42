"""One TCP connection as a sans-IO state machine (RFC 9293 and friends).

Segments in (`on_segment`), segments out (`poll_output`), time passed explicitly as `now`
(monotonic seconds), timers exposed as one deadline (`next_deadline` / `on_timer`), and
application-facing events collected for `pop_events`. No sockets, no clock, no addresses.

Calling convention for the owner (stack.py / tests): after any batch of calls (`on_segment`s,
`on_timer`, `send`, `recv`, `shutdown`, `accept`, `refuse`, `abort`) call `poll_output(now)`
and transmit what it returns, then `pop_events()`. ACKs for a batch of received segments are
coalesced into one cumulative ACK by that `poll_output` (out-of-order arrivals still produce
up to three duplicate ACKs per batch so the peer's fast retransmit works). A connection that
reported 'closed' may still hold one final RST in `poll_output` (after `abort`/`refuse`) and
unread data for `recv`.

API notes beyond the agreed shape (additions only, nothing renamed):
- `recv()` returns bytes *or a bytearray* (when the whole buffer is handed over, no copy).
- 'closed' means no further segment will be processed; the final RST of `abort`/`refuse`
  is still in the next `poll_output`, and unread data stays readable with `recv`.
- `shutdown()` before the handshake completes (even before `accept`) queues the FIN behind
  the queued data; it never aborts. `send_space()` is 0 once shut down.
- A pure SYN for a connection in TIME_WAIT closes it silently ('closed'), so the owner can
  treat the next SYN as a new connection (stack.py also does this itself).
- `TcpConfig.initial_cwnd_segments` (10) and `TcpConfig.congestion_control` (True; False =
  no cwnd limit, for the local-kernel side). `cwnd` property, `stats` dict
  (retransmits, fast_retransmits, rto_expiries, tail_probes, timeouts, dup_acks,
  ooo_segments, ooo_dropped, unacceptable, challenge_acks, segments_in, segments_out) and
  `check_invariants()` (raises AssertionError; tests call it after every step).
- The payload of outgoing segments is normally a memoryview of an immutable bytes chunk of
  the send buffer: it stays valid as long as anybody holds it.

Internally every sequence number is an unbounded "absolute" Python int (the ISN plus bytes
since), so comparisons are plain `<`; 32-bit wire values are unwrapped against the nearest
reference (RCV.NXT for seq, SND.UNA for ack) and wrapped with `& 0xFFFFFFFF` on output.
The public `snd_una`, `snd_nxt`, `rcv_nxt` are the 32-bit wire values.

Design choices worth knowing:
- Receive buffer: one bytearray plus read offset; the in-order fast path is one extend.
  Out-of-order data is held as a few intervals (count-bounded) inside the advertised window.
  `recv()` may return a bytearray (the whole buffer handed over, no copy) or bytes.
- Send buffer: a list of immutable bytes chunks; outgoing payloads are memoryviews of them
  (zero copy, safe to keep because the chunks never change).
- Windows never shrink: data is accepted up to the right edge we advertised; the window field
  is rounded up to the scale unit (like Linux), so buffered data is bounded by
  rcv_buf + 2**rcv_wscale.
- Congestion control: NewReno (RFC 5681/6582), initial cwnd 10 segments, byte-counted slow
  start, limited transmit (RFC 3042), recovery left at ssthresh;
  `TcpConfig.congestion_control=False` keeps cwnd unlimited for the local-kernel side.
- Loss recovery: 3 duplicate ACKs, or SACKs covering more than 2 segments above a hole,
  start fast recovery; with SACK every duplicate ACK lets one more hole below the highest
  SACKed byte be retransmitted (a small RFC 6675-style scoreboard, bounded), without SACK
  partial ACKs retransmit SND.UNA (NewReno). A tail loss probe (RFC 8985, simplified: one
  per flight after ~2 SRTT) turns most lost tails/ACKs into an RTT instead of an RTO.
- Retransmission timeout: RFC 6298 with timestamps (every ACK that advances SND.UNA, but
  not echoes of timestamps older than the last RTO) or Karn timing; exponential backoff,
  forgotten when new data is acknowledged (as Linux does); after an RTO everything
  unacknowledged is re-sent from SND.UNA (go-back-N) and the SACK scoreboard is dropped.
- Zero-window probes carry SND.UNA-1 and no data, at least 0.5 s apart (Linux answers such
  out-of-window segments at most every 500 ms); the persist timer also overrides sender SWS
  avoidance when a small window never grows.
- SACK blocks are sent on pure ACKs while out-of-order data is held (most recent first).
  No PAWS, no urgent data, no ECN, no delayed ACK timer (one ACK per poll_output batch).
"""

from __future__ import annotations

from bisect import bisect_right
from typing import List

from .segment import ACK, FIN, PSH, RST, SYN, TcpSegment

__all__ = ["TcpConfig", "TcpConnection"]

M32 = 0xFFFFFFFF
HALF = 0x80000000
INF = 1 << 62

# Event bits; pop_events() reports them in this (meaningful) order.
EV_CONNECTED = 1
EV_DATA = 2
EV_SEND_SPACE = 4
EV_EOF = 8
EV_RESET = 16
EV_TIMEOUT = 32
EV_CLOSED = 64
_EVENT_NAMES = (
    (EV_CONNECTED, "connected"),
    (EV_DATA, "data"),
    (EV_SEND_SPACE, "send_space"),
    (EV_EOF, "eof"),
    (EV_RESET, "reset"),
    (EV_TIMEOUT, "timeout"),
    (EV_CLOSED, "closed"),
)

SYN_RECEIVED_PENDING = "SYN_RECEIVED_PENDING"
SYN_SENT = "SYN_SENT"
SYN_RECEIVED = "SYN_RECEIVED"
ESTABLISHED = "ESTABLISHED"
FIN_WAIT_1 = "FIN_WAIT_1"
FIN_WAIT_2 = "FIN_WAIT_2"
CLOSE_WAIT = "CLOSE_WAIT"
CLOSING = "CLOSING"
LAST_ACK = "LAST_ACK"
TIME_WAIT = "TIME_WAIT"
CLOSED = "CLOSED"

# States in which the peer may still send us data.
_RECEIVING = frozenset((ESTABLISHED, FIN_WAIT_1, FIN_WAIT_2))
# States in which we may still queue data to send.
_SENDING = frozenset((SYN_SENT, SYN_RECEIVED_PENDING, SYN_RECEIVED, ESTABLISHED, CLOSE_WAIT))

MAX_OOO_INTERVALS = 64  # bounds bookkeeping however the peer scatters its segments
MAX_SACK_RANGES = 32  # scoreboard bound
TLP_MIN = 0.01  # seconds, floor of the tail loss probe timeout
TLP_DELACK = 0.05  # allowance for the peer's delayed ACK when one segment is in flight
PERSIST_MIN = 0.5  # seconds between zero-window probes at least
DEFAULT_PEER_MSS = 536  # RFC 9293 default when the SYN carries no MSS option
SMALL_CHUNK = 16384  # send() merges writes into the last chunk while it is this small
CHUNK_MERGE_LIMIT = 65536


class TcpConfig:
    """Tunables of one connection. Plain attributes; pass keyword overrides."""

    def __init__(
        self,
        mss: int = 1460,
        max_send_segment: int | None = None,
        rcv_buf: int = 4 << 20,
        snd_buf: int = 4 << 20,
        window_scaling: bool = True,
        sack: bool = True,
        timestamps: bool = True,
        rto_initial: float = 1.0,
        rto_min: float = 0.2,
        rto_max: float = 60.0,
        max_retransmits: int = 12,
        syn_retries: int = 5,
        time_wait: float = 1.0,
        initial_cwnd_segments: int = 10,
        congestion_control: bool = True,
    ) -> None:
        self.mss = mss  # advertised in our SYN; MTU - 40 (v4) / - 60 (v6)
        # Largest payload we emit; None = the peer's MSS minus our option bytes. Larger values
        # rely on the TUN's GSO to split (the peer's MSS is then ignored).
        self.max_send_segment = max_send_segment
        self.rcv_buf = rcv_buf
        self.snd_buf = snd_buf
        self.window_scaling = window_scaling
        self.sack = sack
        self.timestamps = timestamps
        self.rto_initial = rto_initial
        self.rto_min = rto_min
        self.rto_max = rto_max
        self.max_retransmits = max_retransmits
        self.syn_retries = syn_retries
        self.time_wait = time_wait
        self.initial_cwnd_segments = initial_cwnd_segments
        self.congestion_control = congestion_control


def _wscale_for(buf: int) -> int:
    """Smallest shift that lets the 16-bit window field cover `buf` (max 14, RFC 7323)."""
    shift = 0
    while shift < 14 and (0xFFFF << shift) < buf:
        shift += 1
    return shift


def _ts_clock(now: float) -> int:
    return int(now * 1000.0) & M32  # 1 ms timestamp clock


class TcpConnection:
    """One TCP connection. Construct with `from_syn` (passive) or `connect` (active)."""

    # ------------------------------------------------------------------ construction

    def __init__(self, now: float, config: TcpConfig, isn: int) -> None:
        cfg = config
        self.config = cfg
        self.state = CLOSED
        self.stats = {
            "retransmits": 0,
            "fast_retransmits": 0,
            "timeouts": 0,
            "rto_expiries": 0,
            "tail_probes": 0,
            "dup_acks": 0,
            "ooo_segments": 0,
            "ooo_dropped": 0,
            "unacceptable": 0,
            "challenge_acks": 0,
            "segments_in": 0,
            "segments_out": 0,
        }
        self._events = 0
        self._passive = False

        # --- send side (absolute sequence numbers)
        isn &= M32
        self._iss = isn
        self._snd_una = isn
        self._snd_nxt = isn  # next seq to send (moves back on go-back-N)
        self._snd_max = isn  # highest seq ever sent + 1
        self._snd_wnd = 0
        self._snd_wl1 = 0
        self._snd_wl2 = 0
        self._max_snd_wnd = 0
        self._snd_shift = 0
        self._chunks: List[bytes | None] = []
        self._starts: List[int] = []
        self._head = 0  # first live chunk
        self._data_end = isn + 1  # abs seq after the last buffered byte (data starts at iss+1)
        self._fin_queued = False  # shutdown() called: FIN at _data_end
        self._snd_blocked = False
        self._smss = DEFAULT_PEER_MSS
        self.peer_mss = DEFAULT_PEER_MSS

        # congestion control
        self._cwnd = INF
        self._ssthresh = INF
        self._dupacks = 0
        self._in_recovery = False
        self._recover = isn
        # Loss recovery: retransmissions allowed now, where the next hole search starts, and
        # the peer's SACKed ranges above SND.UNA ([start, end] abs, sorted, merged, bounded).
        self._rexmit_budget = 0
        self._rexmit_next = isn
        self._sacked: List[list] = []

        # RTT / timers
        self._srtt: float | None = None
        self._rttvar = 0.0
        self._rto = cfg.rto_initial  # current, backed off
        self._rto_base = cfg.rto_initial  # from the RTT estimator, without backoff
        self._rto_ts: int | None = None  # timestamp clock at the last RTO expiry
        self._rto_deadline: float | None = None
        self._retries = 0
        self._rtt_seq: int | None = None  # Karn timing (no timestamps)
        self._rtt_time = 0.0
        self._persist_deadline: float | None = None
        self._persist_backoff = 0
        self._persist_fire = False
        self._probes = 0
        # Tail loss probe (RFC 8985, simplified): one probe per flight after ~2 SRTT without
        # an ACK, so a lost tail (or a lost lone ACK) costs an RTT instead of an RTO.
        self._tlp_deadline: float | None = None
        self._tlp_fire = False
        self._tlp_used = False
        self._tw_deadline: float | None = None

        # --- receive side
        self._irs = 0
        self._rcv_nxt = 0
        self._rcv_shift = 0
        self._adv_edge = 0  # right edge of the largest window we advertised
        self._last_ack_sent = 0
        self._rbuf = bytearray()
        self._roff = 0
        self._ooo: List[list] = []  # [start, end, [chunks]] sorted, disjoint, not touching
        self._ooo_bytes = 0
        self._sack_recent: int | None = None
        self._fin_seq: int | None = None  # abs seq of the peer's FIN once seen

        # --- options
        self._ts_on = False
        self._ts_recent = 0
        self._sack_on = False
        self._wscale_on = False

        # --- pending output
        self._ack_pending = False
        self._dup_to_send = 0
        self._syn_pending = False
        self._rst_out: TcpSegment | None = None
        self._rst_extra: TcpSegment | None = None  # an abort's second RST (see abort())

    @classmethod
    def from_syn(
        cls, syn: TcpSegment, now: float, config: TcpConfig, isn: int
    ) -> TcpConnection:
        """Passive open on a received SYN. Nothing is sent until accept() or refuse()."""
        if not (syn.flags & SYN) or syn.flags & (ACK | RST):
            raise ValueError("from_syn needs a segment with SYN set and ACK/RST clear")
        self = cls(now, config, isn)
        self._passive = True
        self.state = SYN_RECEIVED_PENDING
        self._take_syn_options(syn)
        self._irs = syn.seq & M32
        self._rcv_nxt = self._irs + 1
        self._adv_edge = self._rcv_nxt
        self._last_ack_sent = self._rcv_nxt
        self._snd_wnd = syn.window  # never scaled in a SYN
        self._max_snd_wnd = self._snd_wnd
        self._snd_wl1 = self._irs
        self._snd_wl2 = self._iss
        return self

    @classmethod
    def connect(cls, now: float, config: TcpConfig, isn: int) -> TcpConnection:
        """Active open; the SYN comes out of poll_output."""
        self = cls(now, config, isn)
        self.state = SYN_SENT
        self._syn_pending = True
        return self

    def _take_syn_options(self, syn: TcpSegment) -> None:
        cfg = self.config
        if syn.mss:
            self.peer_mss = max(64, syn.mss)
        if cfg.window_scaling and syn.wscale is not None:
            self._wscale_on = True
            self._snd_shift = min(syn.wscale, 14)
            self._rcv_shift = _wscale_for(cfg.rcv_buf)
        else:
            self._wscale_on = False
            self._snd_shift = 0
            self._rcv_shift = 0
        self._ts_on = bool(cfg.timestamps and syn.ts_val is not None)
        if self._ts_on:
            self._ts_recent = syn.ts_val
        self._sack_on = bool(cfg.sack and syn.sack_perm)

    def _setup_sender(self) -> None:
        """Called once the peer's SYN options are known."""
        cfg = self.config
        if cfg.max_send_segment:
            self._smss = cfg.max_send_segment
        else:
            # effective send MSS (RFC 9293 3.7.1): neither side's MTU may be exceeded; a
            # server on a 1500-byte LAN announces 1460 through a VPN that carries less
            self._smss = max(64, min(self.peer_mss, cfg.mss) - (12 if self._ts_on else 0))
        if cfg.congestion_control:
            self._cwnd = cfg.initial_cwnd_segments * self._smss
        else:
            self._cwnd = INF
        self._ssthresh = INF

    # ------------------------------------------------------------------ public properties

    @property
    def snd_una(self) -> int:
        return self._snd_una & M32

    @property
    def snd_nxt(self) -> int:
        return self._snd_nxt & M32

    @property
    def rcv_nxt(self) -> int:
        return self._rcv_nxt & M32

    @property
    def cwnd(self) -> int:
        return self._cwnd

    def pop_events(self) -> List[str]:
        ev = self._events
        if not ev:
            return []
        self._events = 0
        return [name for bit, name in _EVENT_NAMES if ev & bit]

    # ------------------------------------------------------------------ app: handshake

    def accept(self, now: float) -> None:
        """Deferred accept: the SYN-ACK goes out with the next poll_output."""
        if self.state != SYN_RECEIVED_PENDING:
            return
        self.state = SYN_RECEIVED
        self._setup_sender()
        self._syn_pending = True

    def refuse(self, now: float) -> None:
        """Answer the pending SYN with RST|ACK (the peer sees ECONNREFUSED)."""
        if self.state != SYN_RECEIVED_PENDING:
            self.abort(now)
            return
        self._rst_out = TcpSegment(0, self._rcv_nxt & M32, RST | ACK, 0)
        self._close()

    def abort(self, now: float) -> None:
        """Drop the connection; a RST goes out if the peer knows about us."""
        st = self.state
        if st == CLOSED:
            return
        if st == SYN_RECEIVED_PENDING:
            self._rst_out = TcpSegment(0, self._rcv_nxt & M32, RST | ACK, 0)
        elif st not in (SYN_SENT, TIME_WAIT):
            # Not beyond the right edge of the peer's window: a peer that shrank its window
            # (a smaller SO_RCVBUF mid-transfer) drops what we sent past it, and would drop a
            # RST sequenced there as well, waiting forever (Linux does the same clamp)
            seq = min(self._snd_max, self._snd_una + self._snd_wnd)
            self._rst_out = TcpSegment(seq & M32, self._rcv_nxt & M32, RST | ACK, 0)
            if self._snd_una != seq:
                # A peer that dropped what it could not buffer expects snd_una exactly; the
                # other RST alone would only earn a challenge ACK, which Linux rate-limits
                # (one per 500 ms per socket): an app blocked in recv() would hang. One of the
                # two is exact, the other is ignored.
                self._rst_extra = TcpSegment(self._snd_una & M32, self._rcv_nxt & M32,
                                             RST | ACK, 0)
        self._close()

    def _close(self) -> None:
        if self.state != CLOSED:
            self.state = CLOSED
            self._events |= EV_CLOSED
        self._rto_deadline = None
        self._persist_deadline = None
        self._tw_deadline = None
        self._ack_pending = False
        self._dup_to_send = 0
        self._syn_pending = False
        self._rexmit_budget = 0
        self._sacked = []
        self._tlp_deadline = None
        # Nothing can be sent any more: release the send buffer.
        self._chunks = []
        self._starts = []
        self._head = 0
        self._ooo = []
        self._ooo_bytes = 0

    # ------------------------------------------------------------------ app: data

    def _buffered(self) -> int:
        """Bytes queued and not yet acknowledged."""
        una = self._snd_una
        if una <= self._iss:
            una = self._iss + 1
        elif una > self._data_end:
            una = self._data_end
        return self._data_end - una

    def send_space(self) -> int:
        if self.state not in _SENDING or self._fin_queued:
            return 0
        return max(0, self.config.snd_buf - self._buffered())

    def send(self, data) -> int:
        """Queue up to send_space() bytes; returns how many were taken (copied)."""
        space = self.send_space()
        n = len(data)
        if n >= space:
            # Full now (or the caller had more): 'send_space' must fire when room comes back,
            # also for a caller that never offers more than send_space() (the relay).
            n = space
            self._snd_blocked = True
        if n <= 0:
            if len(data):
                self._snd_blocked = True
            return 0
        if isinstance(data, bytes) and n == len(data):
            chunk = data
        else:
            chunk = bytes(memoryview(data)[:n])
        chunks = self._chunks
        if len(chunks) > self._head:
            last = chunks[-1]
            if len(last) < SMALL_CHUNK and len(last) + n <= CHUNK_MERGE_LIMIT:
                # Merging keeps many tiny writes from making many tiny chunks; segments
                # already handed out keep the old (immutable) object alive.
                chunks[-1] = last + chunk
                self._data_end += n
                return n
        chunks.append(chunk)
        self._starts.append(self._data_end)
        self._data_end += n
        return n

    def recv_available(self) -> int:
        return len(self._rbuf) - self._roff

    def recv(self, max_bytes: int = -1) -> bytes:
        """Take in-order data (bytes or a bytearray the connection no longer holds)."""
        rbuf = self._rbuf
        off = self._roff
        avail = len(rbuf) - off
        if avail <= 0:
            return b""
        if max_bytes < 0 or max_bytes >= avail:
            if off == 0:
                out = rbuf
                self._rbuf = bytearray()
            else:
                out = rbuf[off:]
                rbuf.clear()
            self._roff = 0
        else:
            out = rbuf[off:off + max_bytes]
            off += max_bytes
            if off > (len(rbuf) >> 1):
                del rbuf[:off]
                off = 0
            self._roff = off
        self._maybe_window_update()
        return out

    def _maybe_window_update(self) -> None:
        """After the app read: announce the opened window if it grew significantly."""
        if self.state not in _RECEIVING:
            return
        cfg = self.config
        free = cfg.rcv_buf - (len(self._rbuf) - self._roff)
        growth = self._rcv_nxt + free - self._adv_edge
        if growth >= min(2 * cfg.mss, cfg.rcv_buf >> 1) or (
            self._adv_edge == self._rcv_nxt and growth >= min(cfg.mss, cfg.rcv_buf >> 1)
        ):
            self._ack_pending = True

    def shutdown(self, now: float) -> None:
        """Half-close: our FIN follows all queued data."""
        st = self.state
        if self._fin_queued or st not in _SENDING:
            return
        self._fin_queued = True
        if st == ESTABLISHED:
            self.state = FIN_WAIT_1
        elif st == CLOSE_WAIT:
            self.state = LAST_ACK
        # Before the handshake completes (an app that writes and half-closes at once), the
        # FIN waits for ESTABLISHED (RFC 9293 3.10.4): see _established.

    # ------------------------------------------------------------------ input

    def on_segment(self, seg: TcpSegment, now: float) -> None:
        """Feed one received segment (addressed to this connection)."""
        self.stats["segments_in"] += 1
        # Fast path: in-order data or a pure window-preserving ACK while ESTABLISHED with no
        # held out-of-order data. Everything unusual falls through to the full processing.
        if (
            self.state == ESTABLISHED
            and not self._ooo
            and (seg.flags & ~PSH) == ACK
            and self._fin_seq is None
        ):
            rcv_nxt = self._rcv_nxt
            if seg.seq == (rcv_nxt & M32) and seg.ack == (self._snd_una & M32) and (
                seg.window << self._snd_shift
            ) == self._snd_wnd:
                payload = seg.payload
                n = len(payload)
                if n and rcv_nxt + n <= self._adv_edge:
                    if self._ts_on and seg.ts_val is not None and rcv_nxt == self._last_ack_sent:
                        self._ts_recent = seg.ts_val
                    self._rbuf += payload
                    self._rcv_nxt = rcv_nxt + n
                    self._snd_wl1 = rcv_nxt
                    self._ack_pending = True
                    self._events |= EV_DATA
                    return
        self._on_segment_slow(seg, now)

    def _unwrap_seq(self, seq: int) -> int:
        ref = self._rcv_nxt
        return ref + (((seq - ref) + HALF) & M32) - HALF

    def _unwrap_ack(self, ack: int) -> int:
        ref = self._snd_una
        return ref + (((ack - ref) + HALF) & M32) - HALF

    def _on_segment_slow(self, seg: TcpSegment, now: float) -> None:
        st = self.state
        flags = seg.flags
        if st == CLOSED:
            return
        if st == SYN_RECEIVED_PENDING:
            if flags & RST and (seg.seq & M32) == (self._rcv_nxt & M32):
                self._events |= EV_RESET
                self._close()
            return  # retransmitted SYNs etc. wait for accept()
        if st == SYN_SENT:
            self._on_segment_syn_sent(seg, now)
            return

        if st == SYN_RECEIVED and flags & SYN:
            if (seg.seq & M32) == self._irs:
                if flags & ACK and (seg.ack & M32) == ((self._iss + 1) & M32):
                    # Simultaneous open: the peer's SYN-ACK completes our handshake.
                    self._snd_una = self._iss + 1
                    if self._snd_nxt < self._snd_una:
                        self._snd_nxt = self._snd_una
                    self._snd_wnd = seg.window << self._snd_shift
                    self._max_snd_wnd = max(self._max_snd_wnd, self._snd_wnd)
                    self._snd_wl1 = self._irs
                    self._snd_wl2 = self._snd_una
                    self._rto_deadline = None
                    self._retries = 0
                    self._syn_pending = False
                    self._ack_pending = True
                    self._established()
                elif not flags & (ACK | RST):
                    self._syn_pending = True  # peer lost our SYN-ACK: resend it
                return
        seq = self._unwrap_seq(seg.seq)
        if st == TIME_WAIT and flags & SYN and not flags & (ACK | RST):
            # A new incarnation of the same 4-tuple (RFC 6191 idea): finish now so the
            # owner drops us; the peer's SYN retransmission then finds no flow and the
            # owner makes a fresh connection with from_syn.
            self._close()
            return
        plen = len(seg.payload)
        seg_len = plen + (1 if flags & SYN else 0) + (1 if flags & FIN else 0)
        rcv_nxt = self._rcv_nxt
        edge = self._adv_edge
        if edge < rcv_nxt:
            edge = rcv_nxt

        # 1. acceptability (RFC 9293 3.10.7.4); seq == RCV.NXT always passes so that ACKs
        #    and FINs get through a zero window (their data is trimmed below).
        if seg_len == 0:
            acceptable = rcv_nxt <= seq <= edge
        else:
            acceptable = seq == rcv_nxt or (seq < edge and seq + seg_len > rcv_nxt)
        if not acceptable:
            self.stats["unacceptable"] += 1
            if not flags & RST:
                self._ack_pending = True
                if st == TIME_WAIT and flags & FIN:
                    self._tw_deadline = now + self.config.time_wait
            return

        # 2. RST (RFC 5961: exact match resets, otherwise challenge ACK)
        if flags & RST:
            if seq == rcv_nxt:
                if st not in (TIME_WAIT,):
                    self._events |= EV_RESET
                self._close()
            else:
                self._challenge_ack()
            return

        # 3. SYN in a synchronized state
        if flags & SYN:
            self._challenge_ack()
            return

        # 4. ACK field
        if not flags & ACK:
            return
        if not self._process_ack(seg, seq, now):
            return
        st = self.state
        if st == CLOSED:
            return

        # 5. timestamps: remember the peer's clock for echoing (RFC 7323 TS.Recent)
        if self._ts_on and seg.ts_val is not None and seq <= self._last_ack_sent:
            self._ts_recent = seg.ts_val

        # 6. data and FIN
        if st in _RECEIVING:
            if plen:
                self._take_data(seq, seg.payload)
            if flags & FIN:
                fin_at = seq + plen
                if fin_at <= edge and (self._fin_seq is None or self._fin_seq == fin_at):
                    if fin_at >= self._rcv_nxt:
                        self._fin_seq = fin_at
                        if self._ooo:
                            self._ooo_trim(fin_at)  # nothing exists beyond the FIN
                    self._ack_pending = True
            if self._fin_seq is not None and self._fin_seq == self._rcv_nxt:
                self._consume_fin(now)
        elif flags & FIN or plen:
            # Peer's FIN was already consumed: this is a retransmission; re-ACK it.
            self._ack_pending = True
            if st == TIME_WAIT:
                self._tw_deadline = now + self.config.time_wait

    def _challenge_ack(self) -> None:
        self.stats["challenge_acks"] += 1
        self._ack_pending = True

    def _on_segment_syn_sent(self, seg: TcpSegment, now: float) -> None:
        flags = seg.flags
        iss = self._iss
        if flags & ACK:
            ack = seg.ack & M32
            if ack != ((iss + 1) & M32):
                if not flags & RST:
                    self._rst_out = TcpSegment(ack, 0, RST, 0)
                return
            if flags & RST:
                self._events |= EV_RESET  # connection refused
                self._close()
                return
        elif flags & RST:
            return
        if not flags & SYN:
            return
        self._take_syn_options(seg)
        self._irs = seg.seq & M32
        self._rcv_nxt = self._irs + 1
        # our SYN advertised an unscaled window: accept up to its edge
        self._adv_edge = self._rcv_nxt + min(self.config.rcv_buf, 0xFFFF)
        self._last_ack_sent = self._rcv_nxt
        self._setup_sender()
        if flags & ACK:
            self._snd_una = iss + 1
            if self._snd_nxt < self._snd_una:
                self._snd_nxt = self._snd_una
            self._snd_wnd = seg.window  # never scaled in a SYN
            self._max_snd_wnd = self._snd_wnd
            self._snd_wl1 = self._irs
            self._snd_wl2 = self._snd_una
            self._rtt_sample_syn(seg, now)
            self._rto_deadline = None
            self._retries = 0
            self._syn_pending = False
            self._ack_pending = True
            self._established()
            plen = len(seg.payload)
            if plen:
                self._take_data(self._irs + 1, seg.payload)
            if seg.flags & FIN:
                self._fin_seq = self._irs + 1 + plen
                if self._fin_seq == self._rcv_nxt:
                    self._consume_fin(now)
        else:
            # Simultaneous open: answer with SYN-ACK (same ISS) and wait for its ACK.
            self.state = SYN_RECEIVED
            self._snd_wnd = seg.window
            self._max_snd_wnd = self._snd_wnd
            self._snd_wl1 = self._irs
            self._snd_wl2 = iss
            self._snd_nxt = iss  # resend the SYN, now with ACK
            self._syn_pending = True

    def _rtt_sample_syn(self, seg: TcpSegment, now: float) -> None:
        if self._retries == 0 and self._rtt_seq is not None:
            self._rtt_update(now - self._rtt_time)
        self._rtt_seq = None

    def _established(self) -> None:
        self.state = ESTABLISHED
        self._events |= EV_CONNECTED
        if self._fin_queued:
            self.state = FIN_WAIT_1

    def _process_ack(self, seg: TcpSegment, seq: int, now: float) -> bool:
        """ACK field processing; returns False if the segment must be dropped."""
        ack = self._unwrap_ack(seg.ack)
        snd_una = self._snd_una
        snd_max = self._snd_max
        st = self.state
        if st == SYN_RECEIVED:
            if snd_una < ack <= snd_max:
                self._snd_wnd = seg.window << self._snd_shift
                self._max_snd_wnd = max(self._max_snd_wnd, self._snd_wnd)
                self._snd_wl1 = seq
                self._snd_wl2 = ack
                self._syn_pending = False
                self._established()
                # fall through: the ACK may also cover data/FIN (not for a plain handshake)
            else:
                self._rst_out = TcpSegment(seg.ack & M32, 0, RST, 0)
                return False
        if ack > snd_max:
            self._ack_pending = True  # acks something we never sent
            return False
        if ack < snd_una - max(self._max_snd_wnd, 1):
            self._challenge_ack()  # RFC 5961 5.2: too old to be plausible
            return False
        self._probes = 0  # the peer is alive
        wnd = seg.window << self._snd_shift
        blocks = seg.sack_blocks if self._sack_on else None
        if ack > snd_una:
            self._ack_advance(ack, now, seg)
            if blocks and self._snd_max > self._snd_una:
                self._take_sack(blocks)
        elif ack == snd_una:
            if blocks and snd_max > snd_una:
                self._take_sack(blocks)
            if (
                not seg.payload
                and not seg.flags & (SYN | FIN)
                and (wnd == self._snd_wnd or blocks)
                and snd_max > snd_una
            ):
                self._on_dupack(now)
        # Window update (RFC 9293 SND.WL1/WL2 rule)
        if self._snd_wl1 < seq or (self._snd_wl1 == seq and self._snd_wl2 <= ack):
            if wnd != self._snd_wnd:
                self._snd_wnd = wnd
                if wnd > self._max_snd_wnd:
                    self._max_snd_wnd = wnd
                if wnd:
                    self._persist_deadline = None
                    self._persist_backoff = 0
            self._snd_wl1 = seq
            self._snd_wl2 = ack
        return True

    def _ack_advance(self, ack: int, now: float, seg: TcpSegment) -> None:
        acked = ack - self._snd_una
        cfg = self.config
        # RTT sample: timestamps when negotiated, else Karn timing of one segment. Echoes
        # from before the last RTO are not trusted: when ACKs were lost the peer keeps
        # echoing an old TS.Recent, and one such sample can inflate SRTT to tens of seconds.
        if self._ts_on and seg.ts_ecr and (
            self._rto_ts is None or ((seg.ts_ecr - self._rto_ts) & M32) < HALF
        ):
            sample = (_ts_clock(now) - seg.ts_ecr) & M32
            if sample < HALF:
                self._rtt_update(sample / 1000.0)
        elif self._rtt_seq is not None and ack >= self._rtt_seq:
            self._rtt_update(now - self._rtt_time)
            self._rtt_seq = None
        self._snd_una = ack
        if self._snd_nxt < ack:
            self._snd_nxt = ack
        self._retries = 0
        self._rto = self._rto_base  # new data acknowledged: forget the backoff (as Linux)
        self._persist_backoff = 0
        self._tlp_deadline = None
        self._tlp_used = False
        self._free_acked()

        # congestion control
        if self._in_recovery:
            if ack >= self._recover:
                # full ACK: leave fast recovery (RFC 6582)
                self._in_recovery = False
                if cfg.congestion_control:
                    # RFC 6582 option 2: deflate to ssthresh. (Option 1 leaves cwnd at one
                    # segment when the full ACK covers everything, and a lone segment waits
                    # for the peer's 40 ms delayed ACK.)
                    self._cwnd = max(self._ssthresh, 2 * self._smss)
            else:
                # partial ACK: retransmit the next hole, deflate by the amount acked
                self._rexmit_budget += 1
                if not self._sacked or self._rexmit_next < ack:
                    self._rexmit_next = ack  # NewReno: the hole is at the new SND.UNA
                if cfg.congestion_control:
                    self._cwnd = max(self._cwnd - acked + self._smss, self._smss)
        elif cfg.congestion_control:
            if self._cwnd < self._ssthresh:
                self._cwnd += acked  # slow start, byte counted (ACKs cover whole batches)
            else:
                self._cwnd += max(1, self._smss * self._smss // self._cwnd)
            if self._cwnd > cfg.snd_buf * 2 + self._smss:
                self._cwnd = cfg.snd_buf * 2 + self._smss  # no point growing further
        self._dupacks = 0
        if self._sacked:
            sk = self._sacked
            while sk and sk[0][1] <= ack:
                sk.pop(0)
            if sk and sk[0][0] < ack:
                sk[0][0] = ack

        if ack >= self._snd_max:
            self._rto_deadline = None
        else:
            self._rto_deadline = now + self._rto

        # our FIN acknowledged?
        if self._fin_queued and ack == self._data_end + 1:
            st = self.state
            if st == FIN_WAIT_1:
                self.state = FIN_WAIT_2
            elif st == CLOSING:
                self._enter_time_wait(now)
            elif st == LAST_ACK:
                self._close()
        if self._snd_blocked and self.send_space() >= max(1, cfg.snd_buf >> 2):
            self._snd_blocked = False
            self._events |= EV_SEND_SPACE

    def _free_acked(self) -> None:
        limit = self._snd_una
        chunks = self._chunks
        starts = self._starts
        head = self._head
        n = len(chunks)
        while head < n and starts[head] + len(chunks[head]) <= limit:
            chunks[head] = None
            head += 1
        if head > 32 and head * 2 > n:
            del chunks[:head]
            del starts[:head]
            head = 0
        self._head = head

    def _take_sack(self, blocks) -> None:
        """Merge the peer's SACK blocks into the scoreboard (only sane ones, bounded)."""
        una = self._snd_una
        smax = self._snd_max
        sk = self._sacked
        for left, right in blocks:
            left = una + (((left - una) + HALF) & M32) - HALF
            right = una + (((right - una) + HALF) & M32) - HALF
            if not una < left < right <= smax:
                continue  # D-SACK, stale or bogus
            i = 0
            n = len(sk)
            while i < n and sk[i][1] < left:
                i += 1
            j = i
            while j < n and sk[j][0] <= right:
                left = min(left, sk[j][0])
                right = max(right, sk[j][1])
                j += 1
            if i == j and n >= MAX_SACK_RANGES:
                continue
            sk[i:j] = [[left, right]]

    def _sacked_bytes(self) -> int:
        return sum(e - s for s, e in self._sacked)

    def _on_dupack(self, now: float) -> None:
        self.stats["dup_acks"] += 1
        self._dupacks += 1
        if self._in_recovery:
            if self.config.congestion_control:
                self._cwnd += self._smss  # inflate: each dup ACK means a segment left
            if self._sacked:
                self._rexmit_budget += 1  # ... so one more hole may be repaired
            return
        if self._snd_una < self._recover:
            return  # still inside the window of the last recovery/RTO (RFC 6582)
        # 3 duplicate ACKs, or SACKs saying more than 2 segments arrived above a hole
        if self._dupacks >= 3 or (self._sacked and self._sacked_bytes() > 2 * self._smss):
            self._enter_recovery()

    def _enter_recovery(self) -> None:
        flight = self._snd_max - self._snd_una
        self._ssthresh = max(flight // 2, 2 * self._smss)
        self._recover = self._snd_max
        self._in_recovery = True
        if self.config.congestion_control:
            self._cwnd = self._ssthresh + 3 * self._smss
        self._rexmit_budget = 1
        self._rexmit_next = self._snd_una
        self.stats["fast_retransmits"] += 1

    def _next_hole(self, start: int):
        """(seq, end) of the next range to retransmit at or after `start`, or None.

        Without SACK information only SND.UNA itself is known to be missing (NewReno);
        with it, the holes below the highest SACKed byte are.
        """
        una = self._snd_una
        if start < una:
            start = una
        sk = self._sacked
        if not sk:
            if start == una and una < self._snd_max:
                return una, self._snd_max
            return None
        pos = start
        for s, e in sk:
            if pos < s:
                return pos, s
            if pos < e:
                pos = e
        return None

    def _rtt_update(self, r: float) -> None:
        if r < 0:
            return
        if self._srtt is None:
            self._srtt = r
            self._rttvar = r / 2
        else:
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - r)
            self._srtt = 0.875 * self._srtt + 0.125 * r
        cfg = self.config
        rto = self._srtt + max(0.001, 4 * self._rttvar)
        self._rto = self._rto_base = min(max(rto, cfg.rto_min), cfg.rto_max)

    def _take_data(self, seq: int, payload) -> None:
        """Accept payload starting at abs `seq` (already known acceptable)."""
        rcv_nxt = self._rcv_nxt
        end = seq + len(payload)
        limit = self._adv_edge
        if self._fin_seq is not None and self._fin_seq < limit:
            limit = self._fin_seq  # nothing exists beyond the peer's FIN
        if end > limit:
            if limit <= seq:
                self._ack_pending = True
                return
            payload = payload[: limit - seq]
            end = limit
        if end <= rcv_nxt:
            self._ack_pending = True  # pure duplicate: ACK so the peer stops resending
            return
        if seq < rcv_nxt:
            payload = payload[rcv_nxt - seq:]
            seq = rcv_nxt
        if seq == rcv_nxt:
            self._rbuf += payload
            rcv_nxt = end
            ooo = self._ooo
            while ooo and ooo[0][0] <= rcv_nxt:
                start, iend, pieces = ooo.pop(0)
                self._ooo_bytes -= iend - start
                if iend > rcv_nxt:
                    skip = rcv_nxt - start
                    for p in pieces:
                        if skip >= len(p):
                            skip -= len(p)
                            continue
                        self._rbuf += p[skip:] if skip else p
                        skip = 0
                    rcv_nxt = iend
            self._rcv_nxt = rcv_nxt
            self._ack_pending = True
            self._dup_to_send = 0  # progress: the ACK is no longer a duplicate
            self._events |= EV_DATA
        else:
            self.stats["ooo_segments"] += 1
            self._ooo_insert(seq, end, payload)
            if self._dup_to_send < 3:
                self._dup_to_send += 1
            self._ack_pending = True

    def _ooo_insert(self, start: int, end: int, payload) -> None:
        ooo = self._ooo
        # first interval whose end reaches our start (touching counts, to merge)
        i = 0
        n = len(ooo)
        while i < n and ooo[i][1] < start:
            i += 1
        if i == n or ooo[i][0] > end:
            # disjoint from everything: a new interval
            if n >= MAX_OOO_INTERVALS:
                self.stats["ooo_dropped"] += 1
                return
            ooo.insert(i, [start, end, [bytes(payload)]])
            self._ooo_bytes += end - start
            self._sack_recent = start
            return
        iv = ooo[i]
        if iv[1] == start and (i + 1 == n or ooo[i + 1][0] > end):
            # the common case: extends one interval on the right
            iv[2].append(bytes(payload))
            iv[1] = end
            self._ooo_bytes += end - start
            self._sack_recent = start
            return
        j = i
        while j < n and ooo[j][0] <= end:
            j += 1
        new_start = min(start, ooo[i][0])
        new_end = max(end, ooo[j - 1][1])
        buf = bytearray()
        pos = new_start
        old = 0
        mv = memoryview(payload)
        for s, e, pieces in ooo[i:j]:
            if pos < s:
                buf += mv[pos - start: s - start]
            for p in pieces:
                buf += p
            pos = e
            old += e - s
        if pos < new_end:
            buf += mv[pos - start: new_end - start]
        ooo[i:j] = [[new_start, new_end, [bytes(buf)]]]
        self._ooo_bytes += (new_end - new_start) - old
        self._sack_recent = start

    def _ooo_trim(self, limit: int) -> None:
        """Forget held out-of-order bytes at or beyond `limit` (the peer's FIN)."""
        keep = []
        total = 0
        for start, end, pieces in self._ooo:
            if start >= limit:
                break
            if end > limit:
                data = b"".join(pieces)[: limit - start]
                end = limit
                pieces = [data]
            keep.append([start, end, pieces])
            total += end - start
        self._ooo = keep
        self._ooo_bytes = total

    def _consume_fin(self, now: float) -> None:
        self._rcv_nxt += 1
        self._fin_seq = None
        self._events |= EV_EOF
        self._ack_pending = True
        st = self.state
        if st == ESTABLISHED:
            self.state = CLOSE_WAIT
        elif st == FIN_WAIT_1:
            if self._snd_una == self._data_end + 1:
                self._enter_time_wait(now)
            else:
                self.state = CLOSING
        elif st == FIN_WAIT_2:
            self._enter_time_wait(now)

    def _enter_time_wait(self, now: float) -> None:
        self.state = TIME_WAIT
        self._tw_deadline = now + self.config.time_wait
        self._rto_deadline = None
        self._persist_deadline = None

    # ------------------------------------------------------------------ timers

    def next_deadline(self) -> float | None:
        best = self._rto_deadline
        for d in (self._persist_deadline, self._tw_deadline, self._tlp_deadline):
            if d is not None and (best is None or d < best):
                best = d
        return best

    def on_timer(self, now: float) -> None:
        if self.state == CLOSED:
            return
        d = self._tw_deadline
        if d is not None and now >= d:
            self._tw_deadline = None
            if self.state == TIME_WAIT:
                self._close()
                return
        d = self._rto_deadline
        if d is not None and now >= d:
            self._rto_deadline = None
            self._on_rto(now)
            if self.state == CLOSED:
                return
        d = self._tlp_deadline
        if d is not None and now >= d:
            self._tlp_deadline = None
            if self._snd_max > self._snd_una and not self._in_recovery:
                self._tlp_fire = True
                self._tlp_used = True
                self.stats["tail_probes"] += 1
        d = self._persist_deadline
        if d is not None and now >= d:
            self._persist_deadline = None
            self._probes += 1
            if self._probes > self.config.max_retransmits:
                self._timeout()
                return
            self._persist_backoff += 1
            self._persist_fire = True

    def _timeout(self) -> None:
        self.stats["timeouts"] += 1
        self._events |= EV_TIMEOUT
        self._close()

    def _on_rto(self, now: float) -> None:
        cfg = self.config
        st = self.state
        self._retries += 1
        limit = cfg.syn_retries if st in (SYN_SENT, SYN_RECEIVED) else cfg.max_retransmits
        if self._retries > limit:
            self._timeout()
            return
        self._rto = min(self._rto * 2, cfg.rto_max)
        self._rtt_seq = None  # Karn: no samples from retransmitted data
        self._rto_ts = _ts_clock(now)
        self.stats["rto_expiries"] += 1
        if st in (SYN_SENT, SYN_RECEIVED):
            self.stats["retransmits"] += 1
            self._syn_pending = True
            self._snd_nxt = self._iss
            return
        if self._snd_max <= self._snd_una:
            return
        if cfg.congestion_control:
            flight = self._snd_max - self._snd_una
            self._ssthresh = max(flight // 2, 2 * self._smss)
            self._cwnd = self._smss
        self._recover = self._snd_max
        self._in_recovery = False
        self._dupacks = 0
        self._rexmit_budget = 0
        self._tlp_deadline = None
        self._tlp_used = True  # no probe until new data is acknowledged
        self._sacked = []  # the receiver may have reneged (RFC 2018): resend everything
        self._snd_nxt = self._snd_una  # go back N

    # ------------------------------------------------------------------ output

    def _window_field(self) -> int:
        """Window to advertise now (SWS-avoiding, never shrinking); updates the edge."""
        cfg = self.config
        rcv_nxt = self._rcv_nxt
        free = cfg.rcv_buf - (len(self._rbuf) - self._roff)
        if free < 0:
            free = 0
        edge = self._adv_edge
        if edge < rcv_nxt:
            edge = rcv_nxt
        cand = rcv_nxt + free
        if cand - edge >= min(cfg.mss, cfg.rcv_buf >> 1):
            edge = cand
        shift = self._rcv_shift
        win = edge - rcv_nxt
        field = (win + (1 << shift) - 1) >> shift
        if field > 0xFFFF:
            field = 0xFFFF
        real_edge = rcv_nxt + (field << shift)
        if real_edge > self._adv_edge:
            self._adv_edge = real_edge
        return field

    def _mk(self, seq: int, flags: int, wfield: int, tsv: int, payload=b"") -> TcpSegment:
        seg = TcpSegment(seq & M32, self._rcv_nxt & M32, flags, wfield, payload)
        if self._ts_on:
            seg.ts_val = tsv
            seg.ts_ecr = self._ts_recent
        return seg

    def _syn_segment(self, now: float) -> TcpSegment:
        cfg = self.config
        free = min(cfg.rcv_buf, 0xFFFF)
        if self.state == SYN_SENT:
            seg = TcpSegment(self._iss, 0, SYN, free)
            seg.mss = cfg.mss
            if cfg.window_scaling:
                seg.wscale = _wscale_for(cfg.rcv_buf)
            seg.sack_perm = cfg.sack
            if cfg.timestamps:
                seg.ts_val = _ts_clock(now)
                seg.ts_ecr = 0
        else:
            seg = TcpSegment(self._iss, self._rcv_nxt & M32, SYN | ACK, free)
            seg.mss = cfg.mss
            if self._wscale_on:
                seg.wscale = self._rcv_shift
            seg.sack_perm = self._sack_on
            if self._ts_on:
                seg.ts_val = _ts_clock(now)
                seg.ts_ecr = self._ts_recent
        if self._rcv_nxt + free > self._adv_edge and self.state != SYN_SENT:
            self._adv_edge = self._rcv_nxt + free
        return seg

    def _slice(self, start: int, end: int):
        """Payload for abs range [start, end) of the send buffer, zero-copy when possible."""
        starts = self._starts
        chunks = self._chunks
        i = bisect_right(starts, start, self._head) - 1
        c = chunks[i]
        off = start - starts[i]
        want = end - start
        if off + want <= len(c):
            if off == 0 and want == len(c):
                return c
            return memoryview(c)[off:off + want]
        parts = [memoryview(c)[off:]]
        got = len(c) - off
        i += 1
        while got < want:
            c = chunks[i]
            need = want - got
            if need >= len(c):
                parts.append(c)
                got += len(c)
            else:
                parts.append(memoryview(c)[:need])
                got = want
            i += 1
        return b"".join(parts)

    def poll_output(self, now: float) -> List[TcpSegment]:
        """Everything to transmit now (coalesced ACK included)."""
        out: List[TcpSegment] = []
        if self._rst_out is not None:
            out.append(self._rst_out)
            self._rst_out = None
            if self._rst_extra is not None:
                out.append(self._rst_extra)
                self._rst_extra = None
        st = self.state
        if st == CLOSED or st == SYN_RECEIVED_PENDING:
            self.stats["segments_out"] += len(out)
            return out
        if self._syn_pending:
            self._syn_pending = False
            out.append(self._syn_segment(now))
            if self._snd_max < self._iss + 1:
                self._snd_max = self._iss + 1
            self._snd_nxt = self._iss + 1
            if self._retries == 0 and self._rtt_seq is None:
                self._rtt_seq = self._iss + 1
                self._rtt_time = now
            if self._rto_deadline is None:
                self._rto_deadline = now + self._rto
            self._ack_pending = False
            self.stats["segments_out"] += len(out)
            return out
        if st == SYN_SENT or st == SYN_RECEIVED:
            self.stats["segments_out"] += len(out)
            return out

        tsv = _ts_clock(now) if self._ts_on else 0
        wfield = self._window_field()
        sent_any = False
        cfg = self.config
        smss = self._smss
        data_end = self._data_end
        fin_end = data_end + 1 if self._fin_queued else data_end

        # loss recovery: retransmit holes (NewReno: SND.UNA; with SACK: below the highest
        # SACKed byte), one segment per unit of budget
        if self._rexmit_budget > 0:
            fin_sent = self._fin_queued and self._snd_max > data_end
            while self._rexmit_budget > 0:
                hole = self._next_hole(self._rexmit_next)
                if hole is None:
                    break
                una = hole[0]
                end = min(una + smss, hole[1], data_end, self._snd_max)
                flags = ACK
                if end == data_end and fin_sent:
                    flags |= FIN | PSH
                payload = self._slice(una, end) if end > una else b""
                if not payload and not flags & FIN:
                    break
                self._rexmit_budget -= 1
                out.append(self._mk(una, flags, wfield, tsv, payload))
                self.stats["retransmits"] += 1
                self._rtt_seq = None
                sent_any = True
                self._rexmit_next = end + (1 if flags & FIN else 0)
                if self._rto_deadline is None:
                    self._rto_deadline = now + self._rto
            if not self._in_recovery:
                self._rexmit_budget = 0

        # new data (and retransmissions after go-back-N), then FIN
        if st in (ESTABLISHED, CLOSE_WAIT, FIN_WAIT_1, LAST_ACK, CLOSING):
            nxt = self._snd_nxt
            wnd_end = self._snd_una + self._snd_wnd
            cwnd_end = self._snd_una + self._cwnd
            if 0 < self._dupacks < 3 and not self._in_recovery:
                cwnd_end += self._dupacks * smss  # limited transmit (RFC 3042)
            tlp = self._tlp_fire
            if tlp:
                self._tlp_fire = False
                if nxt < data_end and nxt < wnd_end:
                    cwnd_end = nxt + smss  # probe with new data (RFC 8985 7.3)
                else:
                    lo = self._snd_max - (1 if self._snd_max > data_end else 0) - smss
                    lo = max(lo, self._snd_una)
                    hi = min(self._snd_max, data_end)
                    fl = ACK
                    if self._fin_queued and self._snd_max > data_end:
                        fl |= FIN
                    if hi > lo or fl & FIN:
                        pl = self._slice(lo, hi) if hi > lo else b""
                        out.append(self._mk(lo, fl | PSH, wfield, tsv, pl))
                        self.stats["retransmits"] += 1
                        self._rtt_seq = None
                        sent_any = True
            limit = wnd_end if wnd_end < cwnd_end else cwnd_end
            force = self._persist_fire
            self._persist_fire = False
            if force and nxt < data_end and nxt >= limit and self._snd_wnd == 0:
                # zero-window probe: an old sequence number forces the peer to ACK
                out.append(self._mk(self._snd_una - 1, ACK, wfield, tsv))
                sent_any = True
                force = False
            # hot loop: the current chunk's memoryview is cached, segments built inline
            rcv32 = self._rcv_nxt & M32
            ts_on = self._ts_on
            ts_recent = self._ts_recent
            snd_max = self._snd_max
            cmv = None
            cstart = cend = 0
            while nxt < data_end:
                room = limit - nxt
                if force and room <= 0:
                    room = self._snd_una + self._snd_wnd - nxt
                if room <= 0:
                    break
                n = data_end - nxt
                if n > smss:
                    n = smss
                if n > room:
                    # SWS avoidance for new data: only full segments or the tail (a timer
                    # overrides). Retransmissions (below SND.MAX) always use what fits.
                    if (
                        room < smss
                        and room < (self._max_snd_wnd >> 1)
                        and not force
                        and nxt >= snd_max
                    ):
                        break
                    n = room
                force = False
                end = nxt + n
                flags = ACK
                if end == data_end:
                    flags |= PSH
                    if self._fin_queued:
                        flags |= FIN
                if cstart <= nxt and end <= cend:
                    payload = cmv[nxt - cstart:end - cstart]
                else:
                    i = bisect_right(self._starts, nxt, self._head) - 1
                    c = self._chunks[i]
                    cstart = self._starts[i]
                    cend = cstart + len(c)
                    cmv = memoryview(c)
                    if end <= cend:
                        payload = cmv[nxt - cstart:end - cstart]
                    else:
                        payload = self._slice(nxt, end)  # spans chunks: joined copy
                if nxt < snd_max:
                    self.stats["retransmits"] += 1
                elif self._rtt_seq is None and not ts_on:
                    self._rtt_seq = end
                    self._rtt_time = now
                s = TcpSegment(nxt & M32, rcv32, flags, wfield, payload)
                if ts_on:
                    s.ts_val = tsv
                    s.ts_ecr = ts_recent
                out.append(s)
                sent_any = True
                nxt = end + (1 if flags & FIN else 0)
            if nxt == data_end and self._fin_queued and fin_end > nxt:
                # bare FIN (no data left to piggyback it on)
                out.append(self._mk(nxt, ACK | FIN, wfield, tsv))
                sent_any = True
                nxt += 1
            self._snd_nxt = nxt
            if nxt > self._snd_max:
                self._snd_max = nxt
            if self._snd_max > self._snd_una:
                if self._rto_deadline is None:
                    self._rto_deadline = now + self._rto
                self._persist_deadline = None
                if (
                    self._tlp_deadline is None
                    and not self._tlp_used
                    and not self._in_recovery
                    and self._srtt is not None
                ):
                    pto = 2 * self._srtt
                    if self._snd_max - self._snd_una <= smss:
                        pto += TLP_DELACK  # a lone segment may wait for a delayed ACK
                    if pto < TLP_MIN:
                        pto = TLP_MIN
                    t = now + pto
                    if t < self._rto_deadline:
                        self._tlp_deadline = t
            elif nxt < data_end:
                # data waiting but nothing in flight: persist timer keeps us from stalling
                if self._persist_deadline is None:
                    # >= 0.5 s: Linux answers out-of-window pure ACKs (our probe) at most
                    # every 500 ms per socket (tcp_invalid_ratelimit)
                    base = self._rto if self._rto > PERSIST_MIN else PERSIST_MIN
                    iv = min(base * (1 << min(self._persist_backoff, 16)), cfg.rto_max)
                    self._persist_deadline = now + iv

        if sent_any:
            self._dup_to_send = 0
            self._ack_pending = False
        elif self._ack_pending or self._dup_to_send:
            k = self._dup_to_send if self._dup_to_send > 1 else 1
            for _ in range(k):
                out.append(self._mk(self._snd_max, ACK, wfield, tsv))
            self._ack_pending = False
            self._dup_to_send = 0
        if out and self._sack_on and self._ooo:
            # only on pure ACKs: on a full-sized data segment the option bytes could push
            # the packet past the MTU
            blocks = self._sack_blocks()
            for seg in out:
                if not seg.payload and not seg.flags & (RST | SYN):
                    seg.sack_blocks = blocks
        self._last_ack_sent = self._rcv_nxt
        self.stats["segments_out"] += len(out)
        return out

    def _sack_blocks(self):
        ooo = self._ooo
        limit = 3 if self._ts_on else 4
        first = None
        rec = self._sack_recent
        if rec is not None:
            for iv in ooo:
                if iv[0] <= rec < iv[1]:
                    first = iv
                    break
        blocks = []
        if first is not None:
            blocks.append((first[0] & M32, first[1] & M32))
        for iv in reversed(ooo):
            if len(blocks) >= limit:
                break
            if iv is not first:
                blocks.append((iv[0] & M32, iv[1] & M32))
        return blocks

    # ------------------------------------------------------------------ introspection

    def check_invariants(self) -> None:
        """Raise AssertionError if internal bookkeeping is inconsistent (tests use this)."""
        cfg = self.config
        assert self._snd_una <= self._snd_nxt <= self._snd_max, "SND.UNA <= SND.NXT <= max"
        if self.state != CLOSED:
            assert self._snd_max <= self._data_end + 1 + (1 if self._fin_queued else 0)
            buffered = self._buffered()
            assert 0 <= buffered <= cfg.snd_buf, "send buffer bounded"
            live = sum(len(c) for c in self._chunks[self._head:])
            assert live >= buffered
        unread = len(self._rbuf) - self._roff
        slack = 1 << self._rcv_shift
        assert 0 <= unread <= cfg.rcv_buf + slack, "receive buffer bounded"
        assert self._ooo_bytes == sum(e - s for s, e, _ in self._ooo)
        assert len(self._ooo) <= MAX_OOO_INTERVALS
        assert unread + self._ooo_bytes <= cfg.rcv_buf + slack
        prev = self._rcv_nxt
        for s, e, pieces in self._ooo:
            assert prev < s < e, "ooo intervals sorted, disjoint, beyond RCV.NXT"
            assert sum(len(p) for p in pieces) == e - s
            assert e <= self._adv_edge
            prev = e
        assert self._cwnd >= 1
