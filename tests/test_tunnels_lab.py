"""Named shared tunnels in the lab (issue 7): `nsvpn up/exec --name/status/down`.

Everything runs as the test user in the `worker` netns (no route out): a byte-exact download
proves the traffic went through the tunnel; process checks look at the daemon's own children
and the tunnel's netns, so other users of the lab (benchmarks) do not disturb them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from typing import List, Optional

import labenv
import pytest

pytestmark = pytest.mark.lab

FETCH = "curl -sS --fail --max-time 60 http://remote.lab/1M.bin | sha256sum"


def _name() -> str:
    return "t" + uuid.uuid4().hex[:8]


def _stat(pid: int) -> Optional[List[str]]:
    """/proc/PID/stat fields after the comm (None when gone or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].decode().split()
    return None if fields[0] in ("Z", "X") else fields


def _alive(pid: int) -> bool:
    return _stat(pid) is not None


def _children(ppid: int, comm: str) -> List[int]:
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        st = _stat(int(p))
        try:
            with open(f"/proc/{p}/comm") as f:
                c = f.read().strip()
        except OSError:
            continue
        if st is not None and int(st[1]) == ppid and c == comm:
            out.append(int(p))
    return out


def _in_netns(inode: int) -> List[int]:
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if os.stat(f"/proc/{p}/ns/net").st_ino == inode and _alive(int(p)):
                    out.append(int(p))
            except OSError:
                pass
    return out


def status(lab: labenv.Lab, name: Optional[str] = None):
    r = lab.run(["nsvpn", "status", "--json"] + ([name] if name else []), timeout=30)
    return r, (json.loads(r.stdout) if r.returncode in (0, 1) else None)  # 1: dead


def up(lab: labenv.Lab, name: str, via: str, *extra: str):
    r = lab.run(["nsvpn", "up", "--name", name, "--via", via, *extra], timeout=90)
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr}"
    _, st = status(lab, name)
    (t,) = st["tunnels"]
    assert t["state"] == "running", t
    return t


def down(lab: labenv.Lab, name: str):
    return lab.run(["nsvpn", "down", name], timeout=60)


def tidy(lab: labenv.Lab, name: str) -> None:
    """End of a test: `nsvpn down`, and if that could not run (say the venv was being
    reinstalled by someone else), kill the daemon and remove its state by hand, so no
    tunnel outlives its test."""
    down(lab, name)
    d = state_dir(name)
    try:
        with open(os.path.join(d, "state.json")) as f:
            pid, start = (lambda s: (s["pid"], s["pid_start"]))(json.load(f))
        st = _stat(pid)
        if st is not None and int(st[19]) == start:
            os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError, KeyError):
        pass
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def ssh_via(nsvpn_lab: labenv.Lab) -> str:
    s = nsvpn_lab.ssh
    return f"ssh://{s['user']}@{s['host']}"


def test_two_execs_share_one_ssh_and_down_ends_them(nsvpn_lab: labenv.Lab, ssh_via: str):
    lab, name = nsvpn_lab, _name()
    r = lab.run(["nsvpn", "up", "-v", "--name", name, "--via", ssh_via], timeout=90)
    assert r.returncode == 0, r.stderr
    assert "waiting for the upstream" in r.stderr and "ready" in r.stderr, r.stderr
    try:
        _, st = status(lab, name)
        (t,) = st["tunnels"]
        daemon, holder = t["pid"], t["holder_pid"]
        assert t["state"] == "running" and _alive(daemon) and _alive(holder), t
        assert [u["healthy"] for u in t["upstreams"]] == [True]
        ssh_before = _children(daemon, "ssh")
        assert len(ssh_before) == 1, ssh_before
        procs = [lab.popen(["nsvpn", "exec", "--name", name, "--", "sh", "-c",
                            f"{FETCH}; {FETCH}"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=120) for _ in range(2)]
        outs = [p.communicate(timeout=120) for p in procs]
        want = lab.sha256["1M.bin"]
        for p, (out, err) in zip(procs, outs):
            assert p.returncode == 0, err
            assert out.split()[::2] == [want, want], (out, err)
        # one ssh for all four downloads: the same process as before
        assert _children(daemon, "ssh") == ssh_before, (ssh_before, status(lab, name)[1])
        _, st = status(lab, name)
        (t,) = st["tunnels"]
        assert t["stack"]["tcp_flows_total"] >= 4, t
        assert t["stack"]["bytes_out"] >= 4 * 1024 * 1024, t
        r = lab.run(["nsvpn", "status"], timeout=30)
        assert name in r.stdout and "running" in r.stdout, r.stdout

        # a CMD still running in the tunnel ends with `down`, and nothing is left
        sleeper = lab.popen(["nsvpn", "exec", "--name", name, "--", "sleep", "60"])
        lab.wait_for(lambda: len(_in_netns(t["netns"])) >= 2, timeout=10)
        t0 = time.monotonic()
        r = down(lab, name)
        assert r.returncode == 0, r.stderr
        sleeper.wait(timeout=10)
        assert time.monotonic() - t0 < 10, r.stderr
        assert not _alive(daemon) and not _alive(holder), (_stat(daemon), _stat(holder))
        assert not any(_alive(p) for p in ssh_before), [_stat(p) for p in ssh_before]
        assert _in_netns(t["netns"]) == []
        r, _ = status(lab, name)
        assert r.returncode == 2 and f"no tunnel named {name}" in r.stderr, r.stderr
    finally:
        tidy(lab, name)


def test_killed_daemon_is_dead_and_down_cleans_it(nsvpn_lab: labenv.Lab):
    lab, name = nsvpn_lab, _name()
    t = up(lab, name, lab.socks5["url"])
    try:
        sleeper = lab.popen(["nsvpn", "exec", "--name", name, "--", "sleep", "60"])
        lab.wait_for(lambda: len(_in_netns(t["netns"])) >= 2, timeout=10)
        os.kill(t["pid"], signal.SIGKILL)
        lab.wait_for(lambda: not _alive(t["holder_pid"]), timeout=5)  # PDEATHSIG
        # the command running in it is told why its network is gone
        lab.wait_for(lambda: "has no network any more" in sleeper.output(), timeout=10)
        r, st = status(lab)
        assert r.returncode == 0, r.stderr  # the listing itself is fine
        (mine,) = [x for x in st["tunnels"] if x["name"] == name]
        assert mine["state"] == "dead", mine
        r, st = status(lab, name)  # asked by name: a health check fails
        assert r.returncode == 1 and st["tunnels"][0]["state"] == "dead", r.stderr
        r = lab.run(["nsvpn", "exec", "--name", name, "--", "true"], timeout=30)
        assert r.returncode == 2 and "dead" in r.stderr, r.stderr
        assert _in_netns(t["netns"]), "the sleeper keeps the netns until down"
        r = down(lab, name)
        assert r.returncode == 0, r.stderr
        sleeper.wait(timeout=10)
        assert _in_netns(t["netns"]) == []
        r, _ = status(lab, name)
        assert r.returncode == 2
        # the name is free again: up works, and so does a download through it
        up(lab, name, lab.socks5["url"])
        r = lab.run(["nsvpn", "exec", "--name", name, "--", "sh", "-c", FETCH], timeout=60)
        assert r.returncode == 0 and r.stdout.split()[0] == lab.sha256["1M.bin"], r.stderr
    finally:
        tidy(lab, name)


def test_up_twice_and_up_after_kill(nsvpn_lab: labenv.Lab):
    lab, name = nsvpn_lab, _name()
    t = up(lab, name, lab.socks5["url"])
    try:
        r = lab.run(["nsvpn", "up", "--name", name, "--via", lab.socks5["url"]], timeout=60)
        assert r.returncode == 2 and "already running" in r.stderr, r.stderr
        os.kill(t["pid"], signal.SIGKILL)
        lab.wait_for(lambda: not _alive(t["pid"]), timeout=5)
        t2 = up(lab, name, lab.socks5["url"])  # cleans the dead one and starts anew
        assert t2["pid"] != t["pid"]
        r = lab.run(["nsvpn", "exec", "--name", name, "--", "sh", "-c", "exit 7"], timeout=30)
        assert r.returncode == 7, r.stderr
        r = lab.run(["nsvpn", "exec", "--name", name, "--", "sh", "-c", "kill -TERM $$"],
                    timeout=30)
        assert r.returncode == 128 + signal.SIGTERM, r.stderr
        r = lab.run(["nsvpn", "exec", "--name", name, "--", "no-such-command-xyz"],
                    timeout=30)
        assert r.returncode == 127 and "no-such-command-xyz" in r.stderr, r.stderr
    finally:
        tidy(lab, name)


def test_exec_name_missing_and_bad_upstream(nsvpn_lab: labenv.Lab):
    lab, name = nsvpn_lab, _name()
    r = lab.run(["nsvpn", "exec", "--name", name, "--", "true"], timeout=30)
    assert r.returncode == 2 and f"no tunnel named {name}" in r.stderr, r.stderr
    r = lab.run(["nsvpn", "down", name], timeout=30)
    assert r.returncode == 2 and f"no tunnel named {name}" in r.stderr, r.stderr
    # a refused upstream: up fails with the upstream's reason and leaves no state behind
    r = lab.run(["nsvpn", "up", "--name", name, "--via", "socks5://127.0.0.1:9"], timeout=60)
    assert r.returncode == 3, r.stderr
    assert "upstream" in r.stderr, r.stderr
    r, _ = status(lab, name)
    assert r.returncode == 2, r.stderr


def test_sigusr1_dumps_counters_to_log_file_and_keeps_running(nsvpn_lab: labenv.Lab,
                                                              user_tmp: str):
    lab, name = nsvpn_lab, _name()
    logf = os.path.join(user_tmp, "tunnel.log")
    t = up(lab, name, lab.socks5["url"], "--log-file", logf)
    try:
        r = lab.run(["nsvpn", "exec", "--name", name, "--", "sh", "-c", FETCH], timeout=60)
        assert r.returncode == 0 and r.stdout.split()[0] == lab.sha256["1M.bin"], r.stderr
        os.kill(t["pid"], signal.SIGUSR1)
        lab.wait_for(lambda: os.path.exists(logf) and "counters" in open(logf).read(),
                     timeout=5)
        line = [x for x in open(logf).read().splitlines() if "counters" in x][-1]
        d = json.loads(line.split("counters ", 1)[1])
        assert d["stack"]["bytes_out"] >= 1024 * 1024, d
        time.sleep(0.3)
        _, st = status(lab, name)
        assert st["tunnels"][0]["state"] == "running" and _alive(t["holder_pid"])
        r = lab.run(["nsvpn", "exec", "--name", name, "--via", "socks5://x:1", "--", "true"],
                    timeout=30)
        assert r.returncode == 2 and "--name joins" in r.stderr, r.stderr
    finally:
        tidy(lab, name)


def test_exec_name_forwards_signals_and_keeps_cwd(nsvpn_lab: labenv.Lab, user_tmp: str):
    lab, name = nsvpn_lab, _name()
    up(lab, name, lab.socks5["url"])
    try:
        r = lab.run(["nsvpn", "exec", "--name", name, "--", "sh", "-c",
                     "pwd; id -u; ip -o -4 addr show scope global"], cwd=user_tmp, timeout=30)
        lines = r.stdout.splitlines()
        assert r.returncode == 0 and lines[0] == user_tmp, r
        assert lines[1] == str(labenv.pwd.getpwnam("nsvpntest").pw_uid)
        assert "10.0.2.100/24" in lines[2], r.stdout
        trap = os.path.join(user_tmp, "got-term")
        p = lab.popen(["nsvpn", "exec", "--name", name, "--", "sh", "-c",
                       f"trap 'echo term > {trap}; exit 9' TERM; sleep 30 & wait"])
        time.sleep(1.0)  # the trap is set
        os.kill(p.pid, signal.SIGTERM)  # to nsvpn only (ip netns exec and setpriv exec it)
        assert p.wait(timeout=10) == 9
        assert open(trap).read().strip() == "term"
    finally:
        tidy(lab, name)


# -- preload tunnels and openconnect tunnels --------------------------------------------------

SLOW_READER = """
import signal, socket, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only the front's reset may end this read
out = sys.argv[1]
s = socket.create_connection(("remote.lab", 80), timeout=30)
s.sendall(b"GET /100M.bin HTTP/1.1\\r\\nHost: remote.lab\\r\\n\\r\\n")
n = 0
try:
    while True:
        b = s.recv(65536)
        if not b:
            res = "EOF"
            break
        n += len(b)
        if n > 1 << 20:
            open(out + ".started", "w").close()
        time.sleep(0.01)
except OSError as e:
    res = type(e).__name__
open(out, "w").write(res)
"""


def state_dir(name: str) -> str:
    """Where nsvpn keeps tunnel `name` of the test user (no XDG_RUNTIME_DIR in the lab)."""
    host = socket.gethostname().split(".")[0]
    uid = labenv.pwd.getpwnam("nsvpntest").pw_uid
    return f"/tmp/nsvpn-{uid}-{host}/tunnels/{name}"


def _descendants(pid: int) -> List[int]:
    kids: dict = {}
    for p in os.listdir("/proc"):
        st = _stat(int(p)) if p.isdigit() else None
        if st is not None:
            kids.setdefault(int(st[1]), []).append(int(p))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def _with_env(var: bytes) -> List[int]:
    """Live processes whose initial environment contains the entry `var` (b"K=V")."""
    out = []
    for p in os.listdir("/proc"):
        try:
            with open(f"/proc/{p}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except (OSError, ValueError):
            continue
        if var in env and _alive(int(p)):
            out.append(int(p))
    return out


def _argv_env_holding(secret: bytes, pids: List[int]) -> List[str]:
    hits = []
    for p in pids:
        for what in ("cmdline", "environ"):
            try:
                with open(f"/proc/{p}/{what}", "rb") as f:
                    if secret in f.read():
                        hits.append(f"{p}/{what}")
            except OSError:
                pass
    return hits


def _all_pids() -> List[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def test_preload_tunnel_shared_by_two_execs_and_down_resets(nsvpn_lab: labenv.Lab,
                                                             ssh_via: str, user_tmp: str):
    lab, name = nsvpn_lab, _name()
    r = lab.run(["nsvpn", "up", "-v", "--name", name, "--mode", "preload", "--via", ssh_via],
                timeout=90)
    assert r.returncode == 0, r.stderr
    assert "preload tunnel up" in r.stderr, r.stderr
    try:
        _, st = status(lab, name)
        (t,) = st["tunnels"]
        daemon = t["pid"]
        assert t["state"] == "running" and t["mode"] == "preload" and t["kind"] == "socks", t
        assert "holder_pid" not in t and [u["healthy"] for u in t["upstreams"]] == [True], t
        d = state_dir(name)
        assert os.stat(d).st_mode & 0o777 == 0o700
        assert os.stat(os.path.join(d, "front.json")).st_mode & 0o777 == 0o600
        with open(os.path.join(d, "front.json")) as f:
            front = json.load(f)
        secret = front["socks_url"].split("://", 1)[1].split("@")[0].split(":")[1].encode()
        assert len(secret) >= 16
        ssh_before = _children(daemon, "ssh")
        assert len(ssh_before) == 1, ssh_before

        procs = [lab.popen(["nsvpn", "exec", "--name", name, "--", "sh", "-c",
                            f"{FETCH}; {FETCH}"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=120) for _ in range(2)]
        outs = [p.communicate(timeout=120) for p in procs]
        want = lab.sha256["1M.bin"]
        for p, (out, err) in zip(procs, outs):
            assert p.returncode == 0, err
            assert out.split()[::2] == [want, want], (out, err)
        assert _children(daemon, "ssh") == ssh_before  # one ssh carried all four
        _, st = status(lab, name)
        (t,) = st["tunnels"]
        assert t["flows_total"] >= 4 and t["bytes_down"] >= 4 * 1024 * 1024, t
        assert t["front"]["failed"] == 0, t
        r = lab.run(["nsvpn", "status"], timeout=30)
        line = [x for x in r.stdout.splitlines() if x.startswith(name)][0]
        assert "running" in line and "preload" in line, r.stdout
        # CMD gets the tunnel's HTTP proxy door, as under `exec --mode preload`
        r = lab.run(["nsvpn", "exec", "--name", name, "--", "sh", "-c",
                     "echo $http_proxy $HTTPS_PROXY"], timeout=60)
        assert r.stdout.split() == [front["http_proxy_url"]] * 2, (r.stdout, front)
        assert front["http_proxy_url"].startswith("http://127.0.0.1:"), front

        # the same warning as `exec --mode preload` for a program the shim cannot divert
        r = lab.run(["nsvpn", "exec", "--name", name, "--", "/bin/busybox", "true"],
                    timeout=30)
        assert r.returncode == 0 and "statically linked" in r.stderr, r.stderr
        r = lab.run(["nsvpn", "exec", "--name", name, "--", "no-such-command-xyz"],
                    timeout=30)
        assert r.returncode == 127 and "no-such-command-xyz" in r.stderr, r.stderr

        # down: a transfer in flight is reset, CMDs end, the state goes
        marker = f"NSVPN_CTL={t['ctl']}".encode()
        sleeper = lab.popen(["nsvpn", "exec", "--name", name, "--", "sleep", "60"])
        res = os.path.join(user_tmp, "reader")
        reader = lab.popen(["nsvpn", "exec", "--name", name, "--", "python3", "-c",
                            SLOW_READER, res])
        lab.wait_for(lambda: os.path.exists(res + ".started"), timeout=20,
                     what="the slow reader's transfer")
        cmds = lab.wait_for(lambda: len(_with_env(marker)) >= 2 and _with_env(marker),
                            timeout=10)
        assert not _argv_env_holding(secret, [p for p in _all_pids() if p not in cmds])
        _, st = status(lab, name)
        assert st["tunnels"][0]["flows"] >= 1 and st["tunnels"][0]["processes"] >= 2, st
        t0 = time.monotonic()
        r = down(lab, name)
        assert r.returncode == 0, r.stderr
        assert sleeper.wait(timeout=10) == 128 + signal.SIGTERM
        reader.wait(timeout=10)
        assert time.monotonic() - t0 < 10
        with open(res) as f:
            assert f.read() == "ConnectionResetError"
        assert not _alive(daemon) and not any(_alive(p) for p in ssh_before)
        assert _with_env(marker) == []
        assert not os.path.exists(d)
        r = lab.run(["nsvpn", "exec", "--name", name, "--", "true"], timeout=30)
        assert r.returncode == 2 and f"no tunnel named {name}" in r.stderr, r.stderr
    finally:
        tidy(lab, name)


def test_preload_tunnel_killed_daemon_is_cleaned_up_by_next_up(nsvpn_lab: labenv.Lab):
    lab, name = nsvpn_lab, _name()
    via = lab.socks5["url"]
    t = up(lab, name, via, "--mode", "preload")
    try:
        r = lab.run(["nsvpn", "up", "--name", name, "--mode", "preload", "--via", via],
                    timeout=60)
        assert r.returncode == 2 and "already running" in r.stderr, r.stderr
        marker = f"NSVPN_CTL={t['ctl']}".encode()
        sleeper = lab.popen(["nsvpn", "exec", "--name", name, "--", "sleep", "60"])
        lab.wait_for(lambda: _with_env(marker), timeout=10)
        os.kill(t["pid"], signal.SIGKILL)
        lab.wait_for(lambda: not _alive(t["pid"]), timeout=5)
        lab.wait_for(lambda: "has no network any more" in sleeper.output(), timeout=10)
        r, st = status(lab, name)
        assert r.returncode == 1 and st["tunnels"][0]["state"] == "dead", st
        r = lab.run(["nsvpn", "exec", "--name", name, "--", "true"], timeout=30)
        assert r.returncode == 2 and "dead" in r.stderr, r.stderr
        # the next up finds the dead one, ends what it left and starts anew
        r = lab.run(["nsvpn", "up", "-v", "--name", name, "--mode", "preload", "--via", via],
                    timeout=60)
        assert r.returncode == 0 and "cleaning up dead tunnel" in r.stderr, r.stderr
        assert sleeper.wait(timeout=10) == 128 + signal.SIGTERM
        _, st = status(lab, name)
        (t2,) = st["tunnels"]
        assert t2["state"] == "running" and t2["pid"] != t["pid"], t2
        r = lab.run(["nsvpn", "exec", "--name", name, "--", "sh", "-c", FETCH], timeout=60)
        assert r.returncode == 0 and r.stdout.split()[0] == lab.sha256["1M.bin"], r.stderr
        r = lab.run(["nsvpn", "exec", "--name", name, "--", "sh", "-c", "exit 7"], timeout=30)
        assert r.returncode == 7, r.stderr
    finally:
        tidy(lab, name)


def test_bad_names(nsvpn_lab: labenv.Lab):
    lab = nsvpn_lab
    for bad in ("../x", ".hidden", "-x", "a/b", "x" * 65, ""):
        r = lab.run(["nsvpn", "up", f"--name={bad}", "--via", lab.socks5["url"]], timeout=30)
        assert r.returncode == 2 and "bad tunnel name" in r.stderr, (bad, r.stderr)
        if bad:  # (an empty --name is no --name for exec)
            r = lab.run(["nsvpn", "exec", f"--name={bad}", "--", "true"], timeout=30)
            assert r.returncode == 2 and "bad tunnel name" in r.stderr, (bad, r.stderr)
        r = lab.run(["nsvpn", "down", "--", bad], timeout=30)
        assert r.returncode == 2 and "bad tunnel name" in r.stderr, (bad, r.stderr)


def _pin(lab: labenv.Lab) -> str:
    with open(os.path.join(lab.info["state_dir"], "ocserv", "pin-sha256")) as f:
        return f.read().strip()


def oc_up(lab: labenv.Lab, name: str, *extra: str, passwd_file: Optional[str] = None):
    """`up --via openconnect://` through the entry that has the openconnect options."""
    oc = lab.ocserv
    return lab.run(["nsvpn", "up", "-v", "--name", name,
                    "--via", f"openconnect://{oc['user']}@{oc['host']}:{oc['port']}",
                    "--passwd-file", passwd_file or oc["password_file"],
                    f"--oc-opt=--servercert={_pin(lab)}", *extra], timeout=90)


@pytest.mark.parametrize("mode", ["ns", "preload"])
def test_openconnect_tunnel(nsvpn_lab: labenv.Lab, mode: str, user_tmp: str):
    lab, name = nsvpn_lab, _name()
    logf = os.path.join(user_tmp, "tunnel.log")
    r = oc_up(lab, name, "--mode", mode, "--log-file", logf)
    assert r.returncode == 0, r.stderr
    assert "VPN 172.31.1.1 up" in r.stderr, r.stderr
    password = lab.ocserv["password"].encode()
    try:
        _, st = status(lab, name)
        (t,) = st["tunnels"]
        daemon = t["pid"]
        assert t["state"] == "running" and t["mode"] == mode and t["kind"] == "vpn", t
        assert [u["healthy"] for u in t["upstreams"]] == [True], t
        oc_before = _children(daemon, "openconnect")
        assert len(oc_before) == 1, oc_before
        procs = [lab.popen(["nsvpn", "exec", "--name", name, "--", "sh", "-c", FETCH],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
                 for _ in range(2)]
        outs = [p.communicate(timeout=120) for p in procs]
        for p, (out, err) in zip(procs, outs):
            assert p.returncode == 0 and out.split()[0] == lab.sha256["1M.bin"], (out, err)
        _, st = status(lab, name)
        (t,) = st["tunnels"]
        assert t["bytes_down"] >= 2 * 1024 * 1024, t
        assert _children(daemon, "openconnect") == oc_before  # one VPN login for both
        os.kill(daemon, signal.SIGUSR1)
        lab.wait_for(lambda: "counters" in open(logf).read(), timeout=5)
        line = [x for x in open(logf).read().splitlines() if "counters" in x][-1]
        d = json.loads(line.split("counters ", 1)[1])
        assert d["bytes_down"] >= 2 * 1024 * 1024, d
        r = lab.run(["nsvpn", "status"], timeout=30)
        assert f"{mode}/vpn" in r.stdout, r.stdout

        sleeper = lab.popen(["nsvpn", "exec", "--name", name, "--", "sleep", "60"])
        if mode == "ns":
            lab.wait_for(lambda: len(_in_netns(t["netns"])) >= 2, timeout=10)
            cmds = _in_netns(t["netns"])
        else:
            marker = f"NSVPN_CTL={t['ctl']}".encode()
            cmds = lab.wait_for(lambda: _with_env(marker), timeout=10)
        # the password is in no argv and no environment: not the daemon's, not
        # openconnect's, not the CMDs'
        mine = _descendants(daemon) + cmds + [sleeper.pid]
        assert not _argv_env_holding(password, mine), _argv_env_holding(password, mine)
        r = down(lab, name)
        assert r.returncode == 0, r.stderr
        assert sleeper.wait(timeout=10) == 128 + signal.SIGTERM
        assert not _alive(daemon) and not any(_alive(p) for p in oc_before)
        assert not os.path.exists(state_dir(name))
        r = lab.run(["nsvpn", "exec", "--name", name, "--", "true"], timeout=30)
        assert r.returncode == 2 and f"no tunnel named {name}" in r.stderr, r.stderr
    finally:
        tidy(lab, name)


def test_openconnect_tunnel_wrong_password_leaves_nothing(nsvpn_lab: labenv.Lab,
                                                          user_tmp: str):
    lab, name = nsvpn_lab, _name()
    bad = os.path.join(user_tmp, "wrong")
    with open(bad, "w") as f:
        f.write("not-the-password\n")
    os.chown(bad, labenv.pwd.getpwnam("nsvpntest").pw_uid, -1)
    r = oc_up(lab, name, passwd_file=bad)
    assert r.returncode == 3 and "Login failed" in r.stderr, r.stderr
    r, _ = status(lab, name)
    assert r.returncode == 2 and not os.path.exists(state_dir(name)), r.stderr
    r = oc_up(lab, name, passwd_file=os.path.join(user_tmp, "missing"))
    assert r.returncode == 3 and "cannot read --passwd-file" in r.stderr, r.stderr
    assert not os.path.exists(state_dir(name))


def test_preload_tunnel_bad_upstream_and_counter_dump(nsvpn_lab: labenv.Lab, user_tmp: str):
    lab, name = nsvpn_lab, _name()
    r = lab.run(["nsvpn", "up", "--name", name, "--mode", "preload", "--via",
                 "socks5://127.0.0.1:9"], timeout=60)
    assert r.returncode == 3 and "upstream" in r.stderr, r.stderr
    assert not os.path.exists(state_dir(name))
    logf = os.path.join(user_tmp, "tunnel.log")
    t = up(lab, name, lab.socks5["url"], "--mode", "preload", "--log-file", logf)
    try:
        r = lab.run(["nsvpn", "exec", "--name", name, "--", "sh", "-c", FETCH], timeout=60)
        assert r.returncode == 0 and r.stdout.split()[0] == lab.sha256["1M.bin"], r.stderr
        os.kill(t["pid"], signal.SIGUSR1)
        lab.wait_for(lambda: os.path.exists(logf) and "counters" in open(logf).read(),
                     timeout=5)
        line = [x for x in open(logf).read().splitlines() if "counters" in x][-1]
        d = json.loads(line.split("counters ", 1)[1])
        assert d["bytes_down"] >= 1024 * 1024 and d["flows_total"] == 1, d
        time.sleep(0.3)
        _, st = status(lab, name)
        assert st["tunnels"][0]["state"] == "running", st
    finally:
        tidy(lab, name)


def test_openconnect_up_prompts_for_the_password_on_a_terminal(nsvpn_lab: labenv.Lab):
    """No --passwd-file: `up` asks on its terminal (the daemon has none), the daemon logs in
    with the answer."""
    import fcntl
    import select
    import termios

    lab, name = nsvpn_lab, _name()
    oc = lab.ocserv
    master, slave = os.openpty()
    pw = labenv.pwd.getpwnam("nsvpntest")
    os.fchown(slave, pw.pw_uid, pw.pw_gid)

    def ctty() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    argv = lab.argv(["nsvpn", "up", "--name", name, "--via",
                     f"openconnect://{oc['user']}@{oc['host']}:{oc['port']}",
                     f"--oc-opt=--servercert={_pin(lab)}"])
    p = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, preexec_fn=ctty,
                         env=lab.env_for(lab.user), cwd=pw.pw_dir)
    os.close(slave)
    seen, sent = b"", False
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and p.poll() is None:
            if select.select([master], [], [], 0.2)[0]:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: every slave fd closed
                    break
                seen += chunk
            if not sent and b"VPN password for labuser@" in seen:
                time.sleep(0.2)  # getpass turns echo off right after printing the prompt
                os.write(master, oc["password"].encode() + b"\n")
                sent = True
        rc = p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(master)
    try:
        text = seen.decode(errors="replace")
        assert sent and rc == 0, text
        assert oc["password"] not in text  # not echoed
        r = lab.run(["nsvpn", "exec", "--name", name, "--", "sh", "-c", FETCH], timeout=60)
        assert r.returncode == 0 and r.stdout.split()[0] == lab.sha256["1M.bin"], r.stderr
    finally:
        tidy(lab, name)


@pytest.mark.parametrize("mode", ["ns", "preload"])
def test_tunnel_with_a_long_runtime_dir(nsvpn_lab: labenv.Lab, user_tmp: str, mode: str):
    """$XDG_RUNTIME_DIR/nsvpn/tunnels/N/... longer than a unix socket path may be: the
    control socket is bound and reached through /proc/self/fd, the front's socket goes to a
    private directory in /tmp, removed by down."""
    lab, name = nsvpn_lab, "x" * 60
    rt = os.path.join(user_tmp, "r" * 40)
    os.mkdir(rt, 0o700)
    os.chown(rt, labenv.pwd.getpwnam("nsvpntest").pw_uid, -1)
    env = {"XDG_RUNTIME_DIR": rt}
    r = lab.run(["nsvpn", "up", "--name", name, "--mode", mode, "--via",
                 lab.socks5["url"]], env=env, timeout=60)
    try:
        assert r.returncode == 0, r.stderr
        r = lab.run(["nsvpn", "status", "--json", name], env=env, timeout=30)
        (t,) = json.loads(r.stdout)["tunnels"]
        assert t["state"] == "running" and "control_error" not in t, t
        if mode == "preload":
            assert t["ctl"].startswith("/tmp/nsvpn-front-") and len(t["ctl"]) <= 100, t
            assert os.stat(t["front_dir"]).st_mode & 0o777 == 0o700
        r = lab.run(["nsvpn", "exec", "--name", name, "--", "sh", "-c", FETCH], env=env,
                    timeout=60)
        assert r.returncode == 0 and r.stdout.split()[0] == lab.sha256["1M.bin"], r.stderr
        r = lab.run(["nsvpn", "down", name], env=env, timeout=60)
        assert r.returncode == 0, r.stderr
        assert mode == "ns" or not os.path.exists(t["front_dir"])
        assert not os.path.exists(os.path.join(rt, "nsvpn", "tunnels", name))
    finally:
        lab.run(["nsvpn", "down", name], env=env, timeout=60)


# Runs argv[1:] with unshare(2) failing with EPERM (a seccomp filter, inherited by everything
# it starts): a node where user namespaces are off, as far as nsvpn can tell.
NO_UNSHARE = """
import ctypes, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
ins = [(0x20, 0, 0, 0),                 # load seccomp_data.nr
       (0x15, 0, 1, 272),               # == __NR_unshare (x86_64)?
       (0x06, 0, 0, 0x00050000 | 1),    # return ERRNO(EPERM)
       (0x06, 0, 0, 0x7fff0000)]        # allow
buf = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in ins))
prog = struct.pack("HxxxxxxQ", len(ins), ctypes.addressof(buf))
pbuf = ctypes.create_string_buffer(prog)
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong,
                       ctypes.c_ulong]
assert libc.prctl(38, 1, None, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.addressof(pbuf), 0, 0) == 0, ctypes.get_errno()
os.execvp(sys.argv[1], sys.argv[1:])
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the seccomp filter is x86_64's")
def test_auto_mode_falls_back_to_a_preload_tunnel(nsvpn_lab: labenv.Lab):
    lab, name = nsvpn_lab, _name()
    r = lab.run(["python3", "-c", NO_UNSHARE, "unshare", "-Ur", "true"], timeout=30)
    assert r.returncode != 0 and "Operation not permitted" in r.stderr, r.stderr
    r = lab.run(["python3", "-c", NO_UNSHARE, "nsvpn", "up", "--name", name, "--via",
                 lab.socks5["url"]], timeout=60)
    try:
        assert r.returncode == 0, r.stderr
        assert "using the LD_PRELOAD fallback" in r.stderr, r.stderr
        _, st = status(lab, name)
        assert st["tunnels"][0]["mode"] == "preload", st
        r = lab.run(["nsvpn", "exec", "--name", name, "--", "sh", "-c", FETCH], timeout=60)
        assert r.returncode == 0 and r.stdout.split()[0] == lab.sha256["1M.bin"], r.stderr
    finally:
        tidy(lab, name)
