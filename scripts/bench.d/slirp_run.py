#!/usr/bin/python3
"""Run CMD in a fresh user+net namespace connected by slirp4netns (the benchmark's peer).

    slirp_run.py [--mtu N] -- CMD ARGS...

Runs as the unprivileged user: `unshare --user --map-root-user --net` holds CMD back until
slirp4netns (in the caller's netns) has configured tap0 (10.0.2.100/24, gateway 10.0.2.2) and
said so on its --ready-fd; then CMD runs, and slirp4netns is stopped when CMD ends.
Exit status: CMD's. Standard library only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def main() -> int:
    args = sys.argv[1:]
    mtu = "65520"
    if args[:1] == ["--mtu"]:
        mtu, args = args[1], args[2:]
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print("usage: slirp_run.py [--mtu N] -- CMD ARGS...", file=sys.stderr)
        return 2
    go_r, go_w = os.pipe()
    ready_r, ready_w = os.pipe()
    exit_r, exit_w = os.pipe()
    # unshare execs sh in place, so child.pid is the process that owns the new namespaces
    child = subprocess.Popen(
        ["unshare", "--user", "--map-root-user", "--net", "sh", "-c",
         f'read _ <&{go_r}; exec {go_r}<&-; exec "$@"', "sh", *args],
        pass_fds=(go_r,))
    os.close(go_r)
    slirp = subprocess.Popen(
        ["slirp4netns", "--configure", f"--mtu={mtu}", "--disable-host-loopback",
         f"--ready-fd={ready_w}", f"--exit-fd={exit_r}", str(child.pid), "tap0"],
        pass_fds=(ready_w, exit_r), stdout=subprocess.DEVNULL)
    os.close(ready_w)
    os.close(exit_r)

    def stop(signum: int, _frame: object) -> None:
        for p in (child, slirp):
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    ok = os.read(ready_r, 1) == b"1"
    os.close(ready_r)
    if not ok:
        print("slirp_run: slirp4netns did not become ready", file=sys.stderr)
        child.kill()
        child.wait()
        slirp.wait()
        return 1
    os.write(go_w, b"go\n")
    os.close(go_w)
    rc = child.wait()
    os.close(exit_w)  # slirp4netns exits when the exit fd closes
    try:
        slirp.wait(5)
    except subprocess.TimeoutExpired:
        slirp.kill()
        slirp.wait()
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    sys.exit(main())
