"""Hand free memory back to the kernel after a burst of connections has ended.

A pilot's relay lives for days. After thousands of short flows, Python's objects are freed, but
the memory stays with the process: pymalloc keeps arenas that a few survivors pin, and glibc
keeps the freed heap. Measured at 50,000 flows (tests/test_memory_lab.py, tests/memprobe.py): RSS
32 -> 208 MiB and staying there; gc.collect() (its free-list clearing lets pymalloc release
arenas) and malloc_trim(0) bring it to ~50 MiB, for ~20 ms of work. So, once things are quiet
again (a burst ended, few flows open), do exactly that; never while traffic is busy.
"""

from __future__ import annotations

import ctypes
import gc
import logging
from typing import Callable, Optional

import trio

log = logging.getLogger("nsvpn.memtrim")


def _find_malloc_trim() -> Optional[Callable[[int], int]]:
    try:
        fn = ctypes.CDLL(None).malloc_trim  # glibc only; musl has none and needs none
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_malloc_trim = _find_malloc_trim()


class TrimWhenDrained:
    """Count ended flows; every `every` seconds, when at least `burst` ended since the last
    trim, at most `low` are open (`active()`) and at most `low` ended since the previous
    check (one request after another keeps few flows open, but it is busy all the same),
    collect and trim."""

    def __init__(self, active: Callable[[], int], *, every: float = 5.0, low: int = 8,
                 burst: int = 1000) -> None:
        self.active = active
        self.every, self.low, self.burst = every, low, burst
        self.ended = 0
        self._ended_at_check = 0
        self.trims = 0

    def flow_ended(self) -> None:
        self.ended += 1

    def maybe_trim(self) -> bool:
        recent, self._ended_at_check = self.ended - self._ended_at_check, self.ended
        if self.ended < self.burst or self.active() > self.low or recent > self.low:
            return False
        self.ended = self._ended_at_check = 0
        gc.collect()
        if _malloc_trim is not None:
            _malloc_trim(0)
        self.trims += 1
        log.debug("returned free memory to the kernel after a burst of flows")
        return True

    async def run(self) -> None:
        while True:
            await trio.sleep(self.every)
            self.maybe_trim()
