"""The TCP segment record shared by wire.py (parse/emit) and tcp.py (the state machine).

This is the contract between the two: wire.py turns packets into TcpSegment objects and
TcpSegment objects (plus addresses) into packets; tcp.py consumes and produces them and never
sees IP addresses, checksums or byte layouts. A plain __slots__ class: one is made per packet
on the hot path, so no dataclass machinery and no validation here.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20
ECE = 0x40
CWR = 0x80

Payload = Union[bytes, bytearray, memoryview]


class TcpSegment:
    """One TCP segment, addresses excluded.

    `window` is the raw 16-bit header field (the receiver of the segment applies the peer's
    window scale). Options are None when absent. `sack_blocks` holds (left, right) sequence
    pairs. `payload` may be a memoryview into the received packet: consumers that keep it past
    the current batch must copy it.
    """

    __slots__ = (
        "seq",
        "ack",
        "flags",
        "window",
        "payload",
        "mss",
        "wscale",
        "sack_perm",
        "ts_val",
        "ts_ecr",
        "sack_blocks",
    )

    def __init__(
        self,
        seq: int,
        ack: int,
        flags: int,
        window: int,
        payload: Payload = b"",
        *,
        mss: Optional[int] = None,
        wscale: Optional[int] = None,
        sack_perm: bool = False,
        ts_val: Optional[int] = None,
        ts_ecr: Optional[int] = None,
        sack_blocks: Optional[Sequence[Tuple[int, int]]] = None,
    ) -> None:
        self.seq = seq
        self.ack = ack
        self.flags = flags
        self.window = window
        self.payload = payload
        self.mss = mss
        self.wscale = wscale
        self.sack_perm = sack_perm
        self.ts_val = ts_val
        self.ts_ecr = ts_ecr
        self.sack_blocks = sack_blocks

    def seg_len(self) -> int:
        """Sequence space the segment occupies (payload + SYN + FIN)."""
        return len(self.payload) + (1 if self.flags & SYN else 0) + (1 if self.flags & FIN else 0)

    def __repr__(self) -> str:  # for test failure messages only
        names = [n for bit, n in ((SYN, "S"), (ACK, "A"), (FIN, "F"), (RST, "R"), (PSH, "P"))
                 if self.flags & bit]
        return (f"TcpSegment({''.join(names)} seq={self.seq} ack={self.ack} win={self.window} "
                f"len={len(self.payload)})")
