"""Helpers every upstream shares (upstream/base.py)."""

from nsvpn.upstream.base import QuietRepeats


def test_quiet_repeats_says_news_and_then_rarely():
    """A helper that fails the same way for hours (a restart every 30 s) fills a pilot's log
    with one line per 10 minutes after the first three; a new reason is said at once."""
    now = [0.0]
    q = QuietRepeats(loud=3, every=600.0, clock=lambda: now[0])
    said = []
    for i in range(40):  # 20 minutes of failures every 30 s, the port changing each time
        now[0] = i * 30.0
        say, hidden = q.check(f"ssh exited with status 255: Connection refused port {i}")
        if say:
            said.append((now[0], hidden))
    assert said == [(0.0, 0), (30.0, 0), (60.0, 0), (660.0, 19)]
    assert q.check("Permission denied (gssapi-with-mic)") == (True, 0)  # news
    q.reset()  # it worked again: the old reason is news next time
    assert q.check("Permission denied (gssapi-with-mic)") == (True, 0)
