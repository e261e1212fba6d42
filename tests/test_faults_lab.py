"""Faults in the lab (issue 8): an upstream dies mid-transfer (a private microsocks we kill,
the ssh -D nsvpn supervises), CMD exits with flows open, nsvpn is SIGKILLed, ssh would ask
for a password with no terminal. Each test checks what the application and the user see
(errors within seconds, a working new flow, exit status, no process left behind).
nsvpn runs as the unprivileged test user in the worker netns.
"""

from __future__ import annotations

import json
import os
import pty
import pwd
import select
import signal
import subprocess
import time
from typing import List

import labenv
import pytest

pytestmark = pytest.mark.lab

# CMD: download a big file slowly enough to be interrupted; report when the transfer broke
# (wall clock, the test compares with the kill time), then after CTL/again retry a small
# download until it works (or 20 s) and report that too.
TRANSFER_PY = r'''
import json, os, socket, sys, time, signal
signal.signal(signal.SIGUSR1, signal.SIG_IGN)
ctl, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
res = {}
s = socket.create_connection((host, port), timeout=30)
s.sendall(b"GET /1G.bin HTTP/1.0\r\nHost: x\r\n\r\n")
got = 0
try:
    while True:
        b = s.recv(1 << 16)
        if not b:
            res["end"] = "eof"
            break
        got += len(b)
        if got > 4 << 20 and not os.path.exists(ctl + "/flowing"):
            open(ctl + "/flowing", "w").close()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        if got > 4 << 20:
            time.sleep(0.002)  # keep it going for a while
except OSError as e:
    res["end"] = type(e).__name__
res["broke_at"] = time.time()
res["bytes"] = got
open(ctl + "/broke", "w").close()
while not os.path.exists(ctl + "/again"):
    time.sleep(0.05)
t = time.monotonic()
res["retry"] = "failed"
while time.monotonic() - t < 20:
    try:
        c = socket.create_connection((host, port), timeout=5)
        c.sendall(b"GET /SHA256SUMS HTTP/1.0\r\nHost: x\r\n\r\n")
        d = c.recv(100)
        if d.startswith(b"HTTP/1.1 200"):
            res["retry"] = "ok"
            res["retry_secs"] = round(time.monotonic() - t, 2)
            break
    except OSError:
        pass
    time.sleep(0.5)
json.dump(res, open(ctl + "/res.json.tmp", "w"))
os.rename(ctl + "/res.json.tmp", ctl + "/res.json")
'''


def children(pid: int) -> List[int]:
    out: List[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def descendants(pid: int) -> List[int]:
    out, todo = [], [pid]
    while todo:
        for c in children(todo.pop()):
            out.append(c)
            todo.append(c)
    return out


def ssh_url(lab: labenv.Lab) -> str:
    return f"ssh://{lab.ssh['user']}@{lab.ssh['host']}"


def _transfer(lab: labenv.Lab, tmp: str, opts: List[str], kill, restart, what: str) -> dict:
    script = os.path.join(tmp, "t.py")
    with open(script, "w") as f:
        f.write(TRANSFER_PY)
    p = lab.popen(["nsvpn", "exec", *opts, "--", "python3", script, tmp, "172.31.2.2", "80"],
                  timeout=120)
    with p:
        lab.wait_for(lambda: os.path.exists(tmp + "/flowing") or p.poll() is not None,
                     timeout=60, what="transfer flowing")
        assert p.poll() is None, p.output()
        killed_at = time.time()
        kill(p)
        lab.wait_for(lambda: os.path.exists(tmp + "/broke") or p.poll() is not None,
                     timeout=30, what="the app to see the break")
        restart()
        open(tmp + "/again", "w").close()
        lab.wait_for(lambda: os.path.exists(tmp + "/res.json") or p.poll() is not None,
                     timeout=60, what="retry result")
        assert os.path.exists(tmp + "/res.json"), p.output()
        with open(tmp + "/res.json") as f:
            res = json.load(f)
        status = p.wait(30)
    res["detect_secs"] = round(res["broke_at"] - killed_at, 2)
    print(what, json.dumps(res))
    assert status == 0, p.output()
    assert res["bytes"] < 1 << 30, res  # it really was cut short
    assert res["detect_secs"] < 5.0, res
    assert res["retry"] == "ok", (res, p.output())
    return res


def test_private_socks_killed_mid_transfer_then_restarted(nsvpn_lab: labenv.Lab,
                                                          user_tmp: str):
    port = 1183
    argv = ["microsocks", "-i", "172.31.1.1", "-p", str(port)]
    box = {"ms": nsvpn_lab.popen(argv, netns="edge", user="nobody", cwd="/")}
    nsvpn_lab.wait_for(lambda: nsvpn_lab.port_open("172.31.1.1", port), timeout=10,
                       what="private microsocks")

    def kill(_p):
        box["ms"].signal_group(signal.SIGKILL)
        box["ms"].wait(5)

    def restart():
        time.sleep(0.5)
        box["ms"] = nsvpn_lab.popen(argv, netns="edge", user="nobody", cwd="/")
        nsvpn_lab.wait_for(lambda: nsvpn_lab.port_open("172.31.1.1", port), timeout=10,
                           what="microsocks back")

    try:
        _transfer(nsvpn_lab, user_tmp, ["--via", f"socks5://172.31.1.1:{port}"], kill,
                  restart, "socks5 killed:")
    finally:
        box["ms"].stop()


@pytest.mark.parametrize("mode", ["ns", "preload"])
def test_ssh_killed_mid_transfer_is_restarted(nsvpn_lab: labenv.Lab, user_tmp: str, mode: str):
    """ns: the relay resets the app's flow; preload: the front resets the program's loopback
    connection (it relays with splice, where a dead ssh shows as a plain EOF)."""
    seen = {}

    def kill(p):
        sshs = [c for c in descendants(p.pid) if comm(c) == "ssh"]
        assert sshs, "no ssh child of nsvpn"
        seen["old"] = sshs
        for c in sshs:
            os.kill(c, signal.SIGKILL)

    def restart():
        pass  # nsvpn's job

    res = _transfer(nsvpn_lab, user_tmp, ["--mode", mode, "-q", "--via", ssh_url(nsvpn_lab)],
                    kill, restart, f"{mode}, ssh killed:")
    assert seen["old"]
    # A reset, not a clean EOF: a length-unaware app must not take a cut file as complete.
    assert res["end"] == "ConnectionResetError", res


HOLD_PY = r'''
import os, socket, sys
conns = [socket.create_connection(("172.31.2.2", 80), timeout=10) for _ in range(50)]
for c in conns[:25]:
    c.sendall(b"GET /1G.bin HTTP/1.0\r\n\r\n")  # transfers in flight, unread
open(sys.argv[1], "w").write(str(os.getpid()))
if sys.argv[2] == "exit":
    os._exit(42)
import time
time.sleep(300)
'''


def _hold(lab: labenv.Lab, tmp: str, how: str):
    script = os.path.join(tmp, "hold.py")
    with open(script, "w") as f:
        f.write(HOLD_PY)
    ready = os.path.join(tmp, "cmdpid")
    p = lab.popen(["nsvpn", "exec", "--via", ssh_url(lab), "--", "python3", script, ready,
                   how], timeout=90)
    return p, ready


def test_cmd_exits_with_flows_open(nsvpn_lab: labenv.Lab, user_tmp: str):
    p, ready = _hold(nsvpn_lab, user_tmp, "exit")
    with p:
        procs: dict = {}

        def watch():
            procs.update((x, comm(x)) for x in descendants(p.pid))
            return os.path.exists(ready) or p.poll() is not None
        nsvpn_lab.wait_for(watch, timeout=60, what="CMD holding flows")
        t = time.monotonic()
        status = p.wait(10)
        secs = time.monotonic() - t
    print("cmd exit: status", status, "secs", round(secs, 2), "helpers", procs)
    assert status == 42, p.output()
    assert secs < 3.0, secs
    assert "ssh" in procs.values(), procs  # the helpers were seen
    time.sleep(0.5)
    left = [x for x in procs if alive(x)]
    assert left == [], [(x, comm(x)) for x in left]


def test_nsvpn_sigkilled_takes_cmd_and_ssh_along(nsvpn_lab: labenv.Lab, user_tmp: str):
    p, ready = _hold(nsvpn_lab, user_tmp, "hold")
    with p:
        nsvpn_lab.wait_for(lambda: os.path.exists(ready) and os.path.getsize(ready) > 0
                           or p.poll() is not None, timeout=60, what="CMD holding flows")
        assert p.poll() is None, p.output()
        procs = descendants(p.pid)
        with open(ready) as f:
            cmd_pid = int(f.read())
        assert cmd_pid in procs and any(comm(x) == "ssh" for x in procs), procs
        os.kill(p.pid, signal.SIGKILL)
        t = time.monotonic()
        try:
            nsvpn_lab.wait_for(lambda: not any(alive(x) for x in procs), timeout=2.0,
                               what="CMD and ssh to go")
        finally:
            left = [(x, comm(x)) for x in procs if alive(x)]
            for x, _ in left:
                try:
                    os.kill(x, signal.SIGKILL)
                except OSError:
                    pass
        secs = time.monotonic() - t
    print("nsvpn SIGKILL: all gone in", round(secs, 2), "s")
    assert left == []


# The lab's sshd offers publickey only (no password prompt can be provoked without changing
# it): a rejected key is where ssh would fall back to asking, and an unknown host key with
# StrictHostKeyChecking=ask is a real interactive prompt. Neither may hang without a tty.
@pytest.mark.parametrize("case", ["wrong-key", "hostkey-prompt"])
def test_ssh_would_prompt_without_a_terminal(nsvpn_lab: labenv.Lab, user_tmp: str, case: str):
    marker = os.path.join(user_tmp, "ran")
    if case == "wrong-key":
        opts = ["--ssh-opt", f"IdentityFile={nsvpn_lab.ssh['wrong_key']}",
                "--ssh-opt", "IdentitiesOnly=yes"]
        want = "Permission denied"
    else:
        opts = ["--ssh-opt", "UserKnownHostsFile=/dev/null",
                "--ssh-opt", "StrictHostKeyChecking=ask"]
        want = "Host key verification failed"
    t = time.monotonic()
    r = nsvpn_lab.run(["nsvpn", "exec", "--via", ssh_url(nsvpn_lab), *opts, "--",
                       "touch", marker], timeout=60)
    secs = time.monotonic() - t
    print("ssh", case, r.returncode, round(secs, 2), r.stderr.strip()[-300:])
    assert r.returncode != 0 and not os.path.exists(marker), r.stderr
    assert secs < 30, secs
    assert want in r.stderr and "nsvpn: upstream failed" in r.stderr, r.stderr


# A second sshd in the edge namespace that accepts no key and offers passwords (the lab's own
# sshd is publickey-only): the upstream a user with an expired key or a password-only login
# node has. Without a terminal ssh must not wait for a password nobody can type.
PW_PORT = 2222


@pytest.fixture
def password_sshd(nsvpn_lab: labenv.Lab, tmp_path):
    state = "/var/lib/nsvpn-lab"
    conf = tmp_path / "sshd_config"
    conf.write_text(f"""ListenAddress {nsvpn_lab.ssh['ip']}:{PW_PORT}
HostKey {state}/ssh/ssh_host_ed25519_key
PidFile {tmp_path}/sshd.pid
AuthorizedKeysFile none
PubkeyAuthentication yes
PasswordAuthentication yes
KbdInteractiveAuthentication yes
UsePAM no
PermitRootLogin no
AllowUsers {nsvpn_lab.ssh['user']}
AllowTcpForwarding yes
LogLevel VERBOSE
MaxAuthTries 6
""")
    p = nsvpn_lab.popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(conf)], netns="edge",
                        user=None, cwd="/")
    nsvpn_lab.wait_for(lambda: nsvpn_lab.port_open(nsvpn_lab.ssh["ip"], PW_PORT) or
                       p.poll() is not None, timeout=10, what="password sshd")
    assert p.poll() is None, p.output()
    yield p
    p.stop()


def pw_url(lab: labenv.Lab) -> str:
    return f"ssh://{lab.ssh['user']}@{lab.ssh['host']}:{PW_PORT}"


# the lab's known_hosts names the host key as edge.lab (port 22)
PW_OPTS = ["--ssh-opt", "HostKeyAlias=edge.lab"]


def test_ssh_password_prompt_without_a_terminal(nsvpn_lab: labenv.Lab, user_tmp: str,
                                                password_sshd):
    marker = os.path.join(user_tmp, "ran")
    t = time.monotonic()
    r = nsvpn_lab.run(["nsvpn", "exec", "--via", pw_url(nsvpn_lab), *PW_OPTS, "--", "touch",
                       marker], timeout=60)  # stdin /dev/null, own session: no tty at all
    secs = time.monotonic() - t
    print("ssh password, no tty:", r.returncode, round(secs, 2), r.stderr.strip()[-300:])
    assert r.returncode == 3 and not os.path.exists(marker), r.stderr
    assert secs < 10, secs
    assert "Permission denied" in r.stderr and "password" in r.stderr, r.stderr
    assert "nsvpn: upstream failed" in r.stderr, r.stderr
    # the server saw a publickey attempt and no password attempt
    log = password_sshd.output()
    assert "Failed password" not in log, log


def _with_pty(lab: labenv.Lab, argv: List[str], answer, limit: float):
    """Run argv as the test user in the worker netns on a fresh pty as its controlling
    terminal. answer(text so far) -> bytes to type or None. -> (status, transcript, secs)"""
    master, slave = pty.openpty()
    pw = pwd.getpwnam(lab.user)
    os.chown(os.ttyname(slave), pw.pw_uid, -1)  # the user's own terminal, as after a login

    def ctty():
        import fcntl
        import termios

        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    t = time.monotonic()
    p = subprocess.Popen(lab.argv(argv), stdin=slave, stdout=slave, stderr=slave,
                         env=lab.env_for(lab.user), cwd=pw.pw_dir, start_new_session=True,
                         preexec_fn=ctty)
    os.close(slave)
    buf = b""
    try:
        while time.monotonic() - t < limit:
            r, _, _ = select.select([master], [], [], 0.2)
            if r:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: every process let go of the terminal
                    chunk = b""
                if not chunk and p.poll() is not None:
                    break
                buf += chunk
                reply = answer(buf)
                if reply:
                    os.write(master, reply)
            elif p.poll() is not None:
                break
        status = p.poll()
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)
        os.close(master)
    return status, buf.decode(errors="replace"), time.monotonic() - t


def test_ssh_password_prompt_with_a_terminal_wrong_answers(nsvpn_lab: labenv.Lab,
                                                          user_tmp: str, password_sshd):
    """With a terminal ssh may ask (that is how a password login works); wrong answers end
    nsvpn with ssh's reason, and CMD never runs."""
    marker = os.path.join(user_tmp, "ran")
    answered = [0]

    def answer(text: bytes):
        if text.count(b"password:") > answered[0]:
            answered[0] += 1
            return b"not-the-password\n"
        return None

    status, out, secs = _with_pty(nsvpn_lab, ["nsvpn", "exec", "--via", pw_url(nsvpn_lab),
                                              *PW_OPTS, "--", "touch", marker], answer, 60)
    print("ssh password, tty, wrong answers:", status, round(secs, 2), answered[0],
          out.strip()[-300:])
    assert answered[0] >= 1, out  # it did prompt, on the terminal
    assert status == 3 and not os.path.exists(marker), (status, out)
    assert "Permission denied" in out and "nsvpn: upstream failed" in out, out


@pytest.mark.skipif(not os.environ.get("NSVPN_SLOW_FAULTS"),
                    reason="waits out the 120 s interactive ready timeout (scripts/soak runs "
                           "it: NSVPN_SLOW_FAULTS=1)")
def test_ssh_password_prompt_with_a_terminal_unanswered(nsvpn_lab: labenv.Lab,
                                                        user_tmp: str, password_sshd):
    """Nobody types: nsvpn gives up after its interactive ready timeout, says why."""
    marker = os.path.join(user_tmp, "ran")
    status, out, secs = _with_pty(nsvpn_lab, ["nsvpn", "exec", "--via", pw_url(nsvpn_lab),
                                              *PW_OPTS, "--", "touch", marker],
                                  lambda _t: None, 200)
    print("ssh password, tty, unanswered:", status, round(secs, 2), out.strip()[-300:])
    assert "password:" in out, out
    assert status == 3 and not os.path.exists(marker), (status, out)
    assert 110 < secs < 150, secs
    assert "not ready after 120 s" in out, out
