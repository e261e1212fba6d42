"""Fault (issue 8): the node's /tmp is full. nsvpn keeps sockets and state in $XDG_RUNTIME_DIR
or /tmp, and --log-file / --pcap write where the user says. Each case runs nsvpn as the test
user in the lab's worker netns, in a private mount namespace whose /tmp is a small tmpfs that
is full (no blocks left, or no inodes left, or almost no blocks); optionally XDG_RUNTIME_DIR
is a directory on it. What must hold: a clear one-line message and a non-zero exit when
something had to be written there, success when nothing had to, never a traceback or a hang.
"""

from __future__ import annotations

import os
import re
import subprocess
import time

import labenv
import pytest

pytestmark = pytest.mark.lab

# Runs as root inside `ip netns exec` (its own mount namespace) and `unshare -m`: only this
# command sees the small /tmp. $1 = how full, $2 = XDG_RUNTIME_DIR or "", then the command.
FILL_SH = r'''
set -e
how=$1; xdg=$2; shift 2
mount -t tmpfs -o size=256k,nr_inodes=64,mode=1777 nsvpn-fulltmp /tmp
mkdir -m 0700 /tmp/xdg
chown nsvpntest: /tmp/xdg
case $how in
  inodes) i=0; while touch /tmp/f$i 2>/dev/null; do i=$((i+1)); done ;;
  blocks) dd if=/dev/zero of=/tmp/fill bs=4k 2>/dev/null || true ;;
  almost) dd if=/dev/zero of=/tmp/fill bs=4k count=54 2>/dev/null ;;  # 40 KiB left
esac
set +e
env -i HOME=/home/nsvpntest USER=nsvpntest LOGNAME=nsvpntest LANG=C.UTF-8 \
    PATH="$NSVPN_BIN:/usr/local/bin:/usr/bin:/bin" ${xdg:+XDG_RUNTIME_DIR=$xdg} \
    setpriv --reuid=nsvpntest --regid=nsvpntest --init-groups -- "$@"
echo "exit=$?" >&2
'''

CURL = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "http://172.31.2.2/1M.bin"]


def run_full(lab: labenv.Lab, how: str, argv, xdg: str = "", timeout: float = 60.0):
    cmd = ["unshare", "-m", "--propagation", "private", "/bin/sh", "-c", FILL_SH, "fill",
           how, xdg, *argv]
    t = time.monotonic()
    r = lab.run(cmd, netns="worker", user=None, timeout=timeout,
                env={"NSVPN_BIN": os.path.join(lab.venv, "bin")})
    secs = time.monotonic() - t
    err = r.stderr
    assert "exit=" in err, ("the fill script failed", r.returncode, err)
    code = int(err.rsplit("exit=", 1)[1].split()[0])
    err = err.rsplit("exit=", 1)[0]
    print(how, xdg or "-", argv[:4], "->", code, f"{secs:.1f}s", repr(err.strip()[-300:]))
    # never a traceback, a logging traceback or an "internal error"
    for bad in ("Traceback", "--- Logging error", "internal error", "Exception"):
        assert bad not in err, err
    return code, r.stdout, err, secs


def nsvpn_lines(err: str):
    """nsvpn's own messages: "nsvpn: ..." lines and warning/error log records."""
    return [x for x in err.splitlines()
            if x.startswith("nsvpn") or re.search(r" nsvpn (WARNING|ERROR|CRITICAL) ", x)]


def ssh(lab: labenv.Lab) -> str:
    return f"ssh://{lab.ssh['user']}@{lab.ssh['host']}"


@pytest.mark.parametrize("how", ["blocks", "inodes"])
def test_probe_needs_no_space(nsvpn_lab: labenv.Lab, how: str):
    code, out, err, _ = run_full(nsvpn_lab, how, ["nsvpn", "probe"])
    assert code == 0 and "mode" in out, (out, err)


def test_exec_ssh_with_no_blocks_left_works(nsvpn_lab: labenv.Lab):
    # ssh's unix socket and its private directory need inodes, not blocks
    code, out, err, _ = run_full(nsvpn_lab, "blocks", ["nsvpn", "exec", "--via", ssh(nsvpn_lab),
                                                       "--", *CURL], xdg="/tmp/xdg")
    assert code == 0 and out == "200", (out, err)


@pytest.mark.parametrize("xdg", ["", "/tmp/xdg"])
def test_exec_ssh_with_no_inodes_left_says_so(nsvpn_lab: labenv.Lab, xdg: str):
    code, out, err, secs = run_full(nsvpn_lab, "inodes",
                                    ["nsvpn", "exec", "--via", ssh(nsvpn_lab), "--", *CURL],
                                    xdg=xdg)
    assert code == 3 and out == "", (out, err)  # the ssh upstream cannot start
    (line,) = nsvpn_lines(err)
    assert "No space left on device" in line and "/tmp/" in line, line
    assert "XDG_RUNTIME_DIR" in line, line  # what to do about it
    assert secs < 20, secs


def test_exec_socks5_ns_needs_no_space(nsvpn_lab: labenv.Lab):
    code, out, err, _ = run_full(nsvpn_lab, "inodes", ["nsvpn", "exec", "--via",
                                                       nsvpn_lab.socks5["url"], "--", *CURL])
    assert code == 0 and out == "200", (out, err)


def test_exec_preload_with_full_runtime_dir_says_so(nsvpn_lab: labenv.Lab):
    # the SOCKS front's control socket directory goes in XDG_RUNTIME_DIR
    code, out, err, _ = run_full(nsvpn_lab, "inodes",
                                 ["nsvpn", "exec", "--mode", "preload", "--via",
                                  nsvpn_lab.socks5["url"], "--", *CURL], xdg="/tmp/xdg")
    assert code == 4 and out == "", (out, err)
    (line,) = nsvpn_lines(err)
    assert "No space left on device" in line and "/tmp/xdg" in line, line


def test_preload_falls_back_when_only_tmp_is_full(nsvpn_lab: labenv.Lab):
    # no XDG_RUNTIME_DIR: the standard temporary-directory search skips a full /tmp
    code, out, err, _ = run_full(nsvpn_lab, "inodes",
                                 ["nsvpn", "exec", "--mode", "preload", "--via",
                                  nsvpn_lab.socks5["url"], "--", *CURL])
    assert code == 0 and out == "200", (out, err)


@pytest.mark.parametrize("how", ["blocks", "inodes"])
def test_pcap_on_a_full_disk_is_refused_before_cmd_runs(nsvpn_lab: labenv.Lab, how: str):
    code, out, err, _ = run_full(nsvpn_lab, how,
                                 ["nsvpn", "exec", "--via", nsvpn_lab.socks5["url"], "--pcap",
                                  "/tmp/x.pcap", "--", *CURL])
    assert code == 2 and out == "", (out, err)
    (line,) = nsvpn_lines(err)
    assert "cannot write the pcap file" in line and "No space left" in line, line


def test_pcap_filling_the_disk_mid_run_stops_the_capture_not_the_run(nsvpn_lab: labenv.Lab):
    code, out, err, _ = run_full(nsvpn_lab, "almost",
                                 ["nsvpn", "exec", "--via", nsvpn_lab.socks5["url"], "--pcap",
                                  "/tmp/x.pcap", "--", *CURL])
    assert code == 0 and out == "200", (out, err)
    (line,) = nsvpn_lines(err)
    assert "pcap /tmp/x.pcap: cannot write (No space left on device)" in line, line


def test_log_file_on_a_full_disk_warns_once_and_the_run_goes_on(nsvpn_lab: labenv.Lab):
    code, out, err, _ = run_full(nsvpn_lab, "blocks",
                                 ["nsvpn", "exec", "-vv", "--log-file", "/tmp/x.log", "--via",
                                  nsvpn_lab.socks5["url"], "--", *CURL])
    assert code == 0 and out == "200", (out, err)
    (line,) = nsvpn_lines(err)
    assert line == ("nsvpn: warning: cannot write the log (/tmp/x.log: No space left on "
                    "device); log lines are lost"), line


def test_log_file_that_cannot_be_created_is_refused(nsvpn_lab: labenv.Lab):
    code, out, err, _ = run_full(nsvpn_lab, "inodes",
                                 ["nsvpn", "exec", "--log-file", "/tmp/x.log", "--via",
                                  nsvpn_lab.socks5["url"], "--", *CURL])
    assert code == 2 and out == "", (out, err)
    (line,) = nsvpn_lines(err)
    assert "cannot open the log file" in line and "No space left" in line, line


@pytest.mark.parametrize("how", ["blocks", "inodes"])
def test_up_with_a_full_runtime_dir_fails_fast(nsvpn_lab: labenv.Lab, how: str):
    # `nsvpn up` keeps its state in $XDG_RUNTIME_DIR/nsvpn/tunnels/NAME; then `down` cleans up
    argv = ["sh", "-c", 'nsvpn up --name full --via "$0"; c=$?; nsvpn down full >/dev/null '
            '2>&1; exit $c', nsvpn_lab.socks5["url"]]
    code, out, err, secs = run_full(nsvpn_lab, how, argv, xdg="/tmp/xdg")
    assert code != 0, (out, err)
    (line,) = nsvpn_lines(err)
    assert "No space left on device" in line, line  # the reason, not just "it ended"
    assert secs < 30, secs


def test_fill_script_really_fills(nsvpn_lab: labenv.Lab):
    """The premise: in each mode, the test user cannot write a 8 KiB file (or any file)."""
    for how, probe in (("blocks", "head -c 8192 /dev/zero > /tmp/xdg/t"),
                       ("inodes", "touch /tmp/xdg/t"),
                       ("almost", "head -c 65536 /dev/zero > /tmp/xdg/t")):
        code, _out, err, _ = run_full(nsvpn_lab, how, ["sh", "-c", probe])
        assert code != 0 and "No space left" in err, (how, err)
    code, _out, _err, _ = run_full(nsvpn_lab, "almost", ["sh", "-c",
                                                         "head -c 8192 /dev/zero > /tmp/t"])
    assert code == 0


def test_no_hang_is_possible_here(nsvpn_lab: labenv.Lab):
    """run_full's own bound: a command that would hang is killed and reported as such."""
    with pytest.raises(subprocess.TimeoutExpired):
        run_full(nsvpn_lab, "blocks", ["sleep", "30"], timeout=3)
