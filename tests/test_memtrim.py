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
