from __future__ import annotations

from nsvpn.memtrim import TrimWhenDrained


def test_trims_only_after_a_burst_and_when_quiet():
    active = [50]
    t = TrimWhenDrained(lambda: active[0], burst=3, low=2)
    for _ in range(3):
        t.flow_ended()
    assert not t.maybe_trim()  # busy: never while traffic flows
    active[0] = 2
    assert t.maybe_trim() and t.trims == 1
    assert not t.maybe_trim()  # the count starts again: no trim without a new burst
    t.flow_ended()
    assert not t.maybe_trim()


def test_no_trim_while_flows_keep_ending_one_at_a_time():
    """Sequential requests keep one flow open at a time: busy all the same."""
    t = TrimWhenDrained(lambda: 1, burst=3, low=2)
    for _ in range(3):
        for _ in range(10):
            t.flow_ended()
        assert not t.maybe_trim()
    assert t.maybe_trim() and t.trims == 1  # an interval without new flows: quiet now


MMAPPED_PY = r"""
import ctypes, socket, sys
sys.path.insert(0, sys.argv[2])
from nsvpn.memtrim import tune_malloc

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks",
                                               "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
tuned = sys.argv[1] == "tuned" and tune_malloc()
a, b = socket.socketpair()
keep = []
before = libc.mallinfo2().hblkhd
for _ in range(8):  # the relay's reads: recv(256 KiB) that returns less
    a.send(b"x" * 1000)
    keep.append(b.recv(256 * 1024))
print(tuned, libc.mallinfo2().hblkhd - before)
"""


def test_tune_malloc_keeps_socket_sized_buffers_off_mmap():
    """With glibc's defaults every 256 KiB socket read is its own mmap (fresh zeroed pages,
    then mremap and munmap); tuned, the buffers come from the heap."""
    import ctypes
    import os
    import subprocess
    import sys

    import pytest

    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("not glibc >= 2.33")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = {}
    for how in ("default", "tuned"):
        r = subprocess.run([sys.executable, "-c", MMAPPED_PY, how, root], capture_output=True,
                           text=True, check=True)
        out[how] = r.stdout.split()
    assert int(out["default"][1]) >= 8 * 4096, out  # each read left a mapping behind
    assert out["tuned"] == ["True", "0"]
