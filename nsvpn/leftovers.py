"""The processes a preload session started, and ending them.

Every process started under the shim (and everything it starts in turn: the shim's exec hooks
put the session back into a scrubbed environment; only a static program's children escape)
carries NSVPN_CTL=<the session's control socket> in its initial environment; that
path is unique to the session, so our own processes with it in /proc/PID/environ are exactly
the session's. `exec` ends those that outlive CMD (in ns mode nothing outlives it either), and
`down` ends a shared tunnel's. own_processes() and end_all() serve ns mode's cleanup of the
namespace too.
"""

from __future__ import annotations

import os
import signal
from typing import Callable, List, Optional


def own_processes(match: Callable[[str], bool]) -> List[int]:
    """Our own live processes (this one aside) for which match(pid) is true; one that goes
    away while we look (match raising OSError) is left out."""
    me, uid = os.getpid(), os.getuid()
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) == me:
            continue
        try:
            if os.stat(f"/proc/{p}").st_uid == uid and match(p):
                out.append(int(p))
        except OSError:
            continue
    return out


def session_processes(ctl_path: Optional[str]) -> List[int]:
    """Our own live processes whose environment names this front's control socket."""
    if not ctl_path:
        return []
    marker = b"\0NSVPN_CTL=" + os.fsencode(ctl_path) + b"\0"

    def marked(p: str) -> bool:
        with open(f"/proc/{p}/environ", "rb") as f:
            return marker in b"\0" + f.read()

    return own_processes(marked)


async def end_all(find: Callable[[], List[int]], term_wait: float, kill_wait: float) -> int:
    """SIGTERM what find() lists, SIGKILL what it still lists after term_wait; returns how
    many there were at first."""
    import trio  # not for the sync callers of the finders (`nsvpn down`)

    pids = find()
    found = len(pids)
    for sig, wait in ((signal.SIGTERM, term_wait), (signal.SIGKILL, kill_wait)):
        for p in pids:
            try:
                os.kill(p, sig)
            except OSError:
                pass
        with trio.move_on_after(wait):
            while find():
                await trio.sleep(0.02)
        pids = find()
        if not pids:
            break
    return found


async def end_processes(ctl_path: str, term_wait: float = 3.0, kill_wait: float = 2.0) -> int:
    """End the session's processes (SIGKILL after term_wait); returns how many there were."""
    return await end_all(lambda: session_processes(ctl_path), term_wait, kill_wait)
