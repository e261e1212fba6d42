"""`--pcap FILE`: the namespace's packets in classic pcap format, for Wireshark/tcpdump.

Link type LINKTYPE_RAW (101): each record is a bare IPv4/IPv6 packet. The TUN carries a
virtio-net header in front of every packet (IFF_VNET_HDR); it is stripped. Segmentation-offload
super-packets (up to 64 KiB, checksums possibly partial) are written as they are: Wireshark
dissects them and only flags the checksum. The file is bounded: once the next record would pass
`max_bytes`, writing stops for good, with one log line, and the run goes on; so it does when
the disk is full.
"""

from __future__ import annotations

import logging
import struct
import time
from typing import BinaryIO, Iterable, Optional

log = logging.getLogger("nsvpn.pcap")

LINKTYPE_RAW = 101
SNAPLEN = 262144
_GLOBAL = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, SNAPLEN, LINKTYPE_RAW)
_REC = struct.Struct("<IIII")


class PcapWriter:
    """Append-only pcap writer with a size cap. Not thread-safe (the relay is one trio task
    tree in one thread)."""

    def __init__(self, path: str, max_bytes: int, strip: int = 0,
                 clock=time.time) -> None:
        self.path = path
        self.max_bytes = max(int(max_bytes), len(_GLOBAL))
        self.strip = strip  # virtio-net header length in front of each packet
        self.clock = clock
        self.packets = 0
        self.full = False
        self.error: Optional[str] = None  # why writing stopped early (a full disk)
        self._f: Optional[BinaryIO] = open(path, "wb")  # noqa: SIM115 - lives for the run
        try:
            # Written through now: a full disk is refused before CMD runs, not found later.
            self._f.write(_GLOBAL)
            self._f.flush()
        except OSError:
            f, self._f = self._f, None
            try:
                f.close()
            except OSError:
                pass  # the same error again, from the close-time flush
            raise
        self.size = len(_GLOBAL)

    def packet(self, data) -> None:
        """One packet as read from / written to the TUN (bytes-like, with the vnet header)."""
        f = self._f
        if f is None:
            return
        mv = memoryview(data)[self.strip:]
        n = len(mv)
        if self.size + _REC.size + n > self.max_bytes:
            self._stop()
            return
        t = self.clock()
        sec = int(t)
        try:
            f.write(_REC.pack(sec, int((t - sec) * 1e6), n, n))
            f.write(mv)
        except OSError as e:
            # A full disk (or quota) must not end the relay: the capture stops, the run goes on.
            self._fail(e)
            return
        self.size += _REC.size + n
        self.packets += 1

    def iovec(self, parts: Iterable) -> None:
        """One packet given as the writev() parts the relay sends."""
        self.packet(b"".join(parts))

    def _stop(self) -> None:
        self.full = True
        log.warning("pcap %s reached its size limit (%d bytes, %d packets): no more packets "
                    "are written to it", self.path, self.size, self.packets)
        self.close()

    def _fail(self, e: OSError) -> None:
        self.error = e.strerror or str(e)
        log.warning("pcap %s: cannot write (%s) after %d packets: no more packets are "
                    "written to it", self.path, self.error, self.packets)
        self.close()

    def close(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            try:
                f.close()
            except OSError as e:  # the last buffered records did not make it
                if self.error is None:
                    self._fail(e)

    def stats(self) -> dict:
        d = {"file": self.path, "packets": self.packets, "bytes": self.size, "full": self.full}
        if self.error is not None:
            d["error"] = self.error
        return d
