"""Run nsvpn's command line with a memory probe beside it (a test harness, never shipped).

    python memprobe.py exec --via URL ... -- CMD      (NSVPN_MEMPROBE_CTL=DIR)

A daemon thread watches DIR for request files `mem-NAME.req` and answers each with
`mem-NAME.json`: nsvpn's RSS, Python's allocated block count (sys.getallocatedblocks: a leak
of Python objects shows here), the number of gc-tracked objects, and glibc's heap figures
(mallinfo2: bytes in the main and thread heaps, how much of that is free, mmapped chunks).
Python's small-object allocator's arenas (sys._debugmallocstats) are reported too.
A request named `cycles*` collects with gc.DEBUG_SAVEALL and reports what types (and which
frames and exceptions) were only reachable through reference cycles; `trim*` runs
gc.collect() and glibc's malloc_trim(0) and measures again, to tell memory nsvpn still holds
from free heap memory glibc has not given back.
The thread only reads and calls libc; it never forks (nsvpn forks from its main thread).
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import gc
import json
import os
import re
import sys
import threading
import time
import types


class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
_libc.mallinfo2.restype = Mallinfo2
_libc.malloc_trim.argtypes = [ctypes.c_size_t]


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def pymalloc_stats() -> dict:
    """Arenas of Python's small-object allocator (sys._debugmallocstats writes to fd 2)."""
    import tempfile

    with tempfile.TemporaryFile() as f:
        saved = os.dup(2)
        try:
            os.dup2(f.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        text = f.read().decode(errors="replace")
    out = {}
    for key, pat in (("arenas", r"# arenas allocated current\s*=\s*([\d,]+)"),
                     ("arenas_peak", r"# arenas highwater mark\s*=\s*([\d,]+)"),
                     ("used_kib", r"# bytes in allocated blocks\s*=\s*([\d,]+)"),
                     ("free_kib", r"# bytes in available blocks\s*=\s*([\d,]+)"),
                     ("empty_pools_kib", r"# bytes in \d+ unused pools\s*=\s*([\d,]+)")):
        m = re.search(pat, text)
        if m:
            v = int(m.group(1).replace(",", ""))
            out[key] = v // 1024 if key.endswith("_kib") else v
    return out


def snapshot() -> dict:
    mi = _libc.mallinfo2()
    return {"rss_kib": rss_kib(), "py_blocks": sys.getallocatedblocks(),
            "gc_objects": len(gc.get_objects()), "threads": threading.active_count(),
            "heap_kib": mi.arena // 1024, "heap_used_kib": mi.uordblks // 1024,
            "heap_free_kib": mi.fordblks // 1024, "mmap_kib": mi.hblkhd // 1024,
            "pymalloc": pymalloc_stats()}


def _samples(garbage: list) -> list:
    """A few frames and exceptions among the garbage: where the cycles are made."""
    out = []
    for o in garbage:
        if isinstance(o, types.FrameType):
            out.append(f"frame {o.f_code.co_filename.rsplit('/', 2)[-1]}:{o.f_code.co_name}")
        elif isinstance(o, BaseException):
            out.append(f"exception {type(o).__qualname__}: {str(o)[:80]}")
    return collections.Counter(out).most_common(20)


def answer(ctl: str, name: str) -> None:
    out = {"before": snapshot()}
    if name.startswith("cycles"):
        # What is waiting for the cyclic collector: collect with DEBUG_SAVEALL, count types.
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            out["collected"] = gc.collect()
            kinds = collections.Counter(type(o).__qualname__ for o in gc.garbage)
            out["cycle_types"] = kinds.most_common(30)
            out["cycle_samples"] = _samples(gc.garbage)
        finally:
            gc.garbage.clear()
            gc.set_debug(0)
        out["after_gc"] = snapshot()
    if name.startswith("trim"):
        t = time.monotonic()
        gc.collect()
        out["after_gc"] = snapshot()
        out["gc_secs"] = round(time.monotonic() - t, 4)
        t = time.monotonic()
        out["trim_returned"] = _libc.malloc_trim(0)
        out["trim_secs"] = round(time.monotonic() - t, 4)
        out["after_trim"] = snapshot()
    tmp = os.path.join(ctl, f"mem-{name}.json.tmp")
    with open(tmp, "w") as f:
        json.dump(out, f)
    os.rename(tmp, os.path.join(ctl, f"mem-{name}.json"))


def watch(ctl: str) -> None:
    while True:
        try:
            names = sorted(f[4:-4] for f in os.listdir(ctl)
                           if f.startswith("mem-") and f.endswith(".req"))
        except OSError:
            return
        for name in names:
            os.unlink(os.path.join(ctl, f"mem-{name}.req"))
            answer(ctl, name)
        time.sleep(0.2)


def trim_when_drained(every: float = 5.0, low: int = 8, burst: int = 1000) -> None:
    """NSVPN_MEMPROBE_PATCH=trim: measure the proposed relay change that hands free memory
    back to the kernel once a burst of flows has ended: every `every` seconds, if at least
    `burst` flows closed since the last time and at most `low` are open, gc.collect() (its
    free-list clearing lets pymalloc release arenas) and malloc_trim(0). The time both take
    goes to CTL/mem-trims.log."""
    from nsvpn import relay

    relays: list = []
    closed = [0]
    orig_init, orig_closed = relay.Relay.__init__, relay.Relay._link_closed

    def __init__(self, *a, **kw):
        orig_init(self, *a, **kw)
        relays.append(self)

    def _link_closed(self, f):
        orig_closed(self, f)
        closed[0] += 1

    relay.Relay.__init__ = __init__
    relay.Relay._link_closed = _link_closed

    def loop() -> None:
        while True:
            time.sleep(every)
            if relays and closed[0] >= burst and len(relays[0].flows) <= low:
                closed[0] = 0
                t = time.monotonic()
                gc.collect()
                t2 = time.monotonic()
                _libc.malloc_trim(0)
                with open(os.path.join(ctl, "mem-trims.log"), "a") as f:
                    f.write(f"gc {t2 - t:.4f} s, malloc_trim {time.monotonic() - t2:.4f} s\n")
    ctl = os.environ["NSVPN_MEMPROBE_CTL"]
    threading.Thread(target=loop, daemon=True, name="memprobe-trim").start()


def main() -> None:
    ctl = os.environ["NSVPN_MEMPROBE_CTL"]
    if "trim" in os.environ.get("NSVPN_MEMPROBE_PATCH", "").split(","):
        trim_when_drained()
    threading.Thread(target=watch, args=(ctl,), daemon=True, name="memprobe").start()
    sys.argv = ["nsvpn", *sys.argv[1:]]
    from nsvpn.cli import entry

    entry()


if __name__ == "__main__":
    main()
