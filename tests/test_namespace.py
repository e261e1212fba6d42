"""nsvpn.namespace and nsvpn.tun, for real: run as the unprivileged user `nsvpntest`.

Every scenario runs a small helper script as that user (root can switch users; nothing here
works or means anything as root itself), importing a world-readable copy of the package. The
only network traffic is to 10.0.2.2 inside the namespaces these tests create: it ends in the
TUN fd the helper holds and is never forwarded.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

TEST_USER = "nsvpntest"
RUNUSER = shutil.which("runuser") or "/usr/sbin/runuser"
UNSHARE = shutil.which("unshare") or "/usr/bin/unshare"
VENV_PY = "/opt/nsvpn-venv/bin/python"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG_SRC = os.path.join(REPO, "nsvpn")
if REPO not in sys.path:  # test this tree, not whatever is installed
    sys.path.insert(0, REPO)

from nsvpn.namespace import NetnsSpec, compute_txqueuelen  # noqa: E402
from nsvpn.tun import VNET_HDR_LEN, VnetHdr  # noqa: E402

# Shared with any other test that changes /dev/net/tun's mode: hold it while it is not 0666.
TUN_MODE_LOCK = "/tmp/nsvpn-tun-mode.lock"


def _why_skip() -> str | None:
    if sys.platform != "linux":
        return "Linux only"
    if os.geteuid() != 0:
        return "needs root to run helpers as the unprivileged user " + TEST_USER
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        return f"no user {TEST_USER} (the lab/CI creates it)"
    if not os.access(VENV_PY, os.X_OK):
        return f"no venv at {VENV_PY}"
    if not os.access(RUNUSER, os.X_OK):
        return "no runuser"
    return None


@pytest.fixture(scope="module")
def pkgdir():
    """A world-readable copy of the package: /work/main may be private to root."""
    why = _why_skip()
    if why:
        pytest.skip(why)
    d = tempfile.mkdtemp(prefix="nsvpn-nstest-")
    shutil.copytree(PKG_SRC, os.path.join(d, "nsvpn"),
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for root, dirs, files in os.walk(d):
        for n in dirs + [""]:
            os.chmod(os.path.join(root, n), 0o755)
        for n in files:
            os.chmod(os.path.join(root, n), 0o644)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _script(pkgdir: str, code: str) -> str:
    fd, path = tempfile.mkstemp(dir=pkgdir, suffix=".py")
    with os.fdopen(fd, "w") as f:
        f.write(textwrap.dedent(code))
    os.chmod(path, 0o644)
    return path


def _user_cmd(pkgdir: str, code: str, wrap=()) -> list:
    return [RUNUSER, "-u", TEST_USER, "--", *wrap, VENV_PY, _script(pkgdir, code)]


def _user_env(pkgdir: str) -> dict:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "PYTHONPATH": pkgdir, "HOME": "/tmp",
            "LANG": "C.UTF-8"}


def run_user(pkgdir: str, code: str, *, timeout: float = 30,
             wrap=()) -> subprocess.CompletedProcess:
    return subprocess.run(_user_cmd(pkgdir, code, wrap), env=_user_env(pkgdir), cwd=pkgdir,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


def popen_user(pkgdir: str, code: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(_user_cmd(pkgdir, code), env=_user_env(pkgdir), cwd=pkgdir,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def last_json(p: subprocess.CompletedProcess) -> dict:
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no JSON from helper; rc={p.returncode}\nstdout={p.stdout}\nstderr={p.stderr}"
    return json.loads(lines[-1])


class _Lines:
    """Line reader on a helper's stdout fd (select() on a buffered file object can miss
    lines that an earlier readline() already pulled into the buffer)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        self.fd = proc.stdout.fileno()
        self.buf = b""

    def next(self, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            r, _, _ = select.select([self.fd], [], [], max(left, 0))
            assert r, f"helper said nothing in time (so far: {self.buf!r})"
            chunk = os.read(self.fd, 4096)
            assert chunk, f"helper closed its stdout (so far: {self.buf!r})"
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode().strip()


# ----------------------------------------------------------------------------------------------


INSIDE = r"""
import os, socket, subprocess
print("UID", os.getuid(), flush=True)
cap = [l.split()[1] for l in open("/proc/self/status") if l.startswith("CapEff")][0]
print("CAPEFF", cap)
print("ROUTE4", repr(subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout))
print("LINK", repr(subprocess.run(["ip", "-o", "link", "show", "tun0"], capture_output=True,
                                  text=True).stdout))
print("RESOLV", repr(open("/etc/resolv.conf").read()))
print("V6OFF", open("/proc/sys/net/ipv6/conf/tun0/disable_ipv6").read().strip(), flush=True)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(b"nsvpn-udp-probe", ("10.0.2.2", 5353))
p = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
p.sendto(b"\x08\x00\x00\x00\x00\x01\x00\x01nsvpn-ping", ("10.0.2.2", 0))
"""


def _packets_helper(spec_args: str) -> str:
    return f"""
    import fcntl, json, os, time
    from nsvpn import namespace as ns
    inner = {INSIDE!r}
    t0 = time.perf_counter()
    child = ns.spawn(["python3", "-c", inner], ns.NetnsSpec({spec_args}))
    spawn_ms = (time.perf_counter() - t0) * 1000
    status = child.wait_blocking()
    pkts = []
    while True:
        try:
            pkts.append(os.read(child.tun_fd, 70000).hex())
        except BlockingIOError:
            break
    fl = fcntl.fcntl(child.tun_fd, fcntl.F_GETFL)
    fdfl = fcntl.fcntl(child.tun_fd, fcntl.F_GETFD)
    print(json.dumps({{"status": status, "pkts": pkts, "nonblock": bool(fl & os.O_NONBLOCK),
                      "cloexec": bool(fdfl & fcntl.FD_CLOEXEC), "spawn_ms": spawn_ms}}))
    """


def _ipv4(pkt: bytes):
    assert pkt[0] >> 4 == 4, pkt[:20].hex()
    ihl = (pkt[0] & 15) * 4
    proto = pkt[9]
    src, dst = socket.inet_ntoa(pkt[12:16]), socket.inet_ntoa(pkt[16:20])
    return proto, src, dst, pkt[ihl:]


def test_view_from_inside_and_tun_fd(pkgdir):
    p = run_user(pkgdir, _packets_helper(""))
    res = last_json(p)
    out = p.stdout
    assert res["status"] == 0, p.stderr
    uid = pwd.getpwnam(TEST_USER).pw_uid
    assert f"UID {uid}\n" in out  # identity map, not root
    assert "CAPEFF 0000000000000000" in out
    route = eval(out.split("ROUTE4 ", 1)[1].splitlines()[0])
    routes = [ln.strip() for ln in route.strip().splitlines()]
    assert routes[0] == "default via 10.0.2.2 dev tun0"
    # besides the default route only the kernel's own subnet route exists
    assert all(r.startswith("10.0.2.0/24 dev tun0 proto kernel") for r in routes[1:]), routes
    link = eval(out.split("LINK ", 1)[1].splitlines()[0])
    assert "mtu 65520" in link and "qlen 1000" in link and ",UP" in link
    assert eval(out.split("RESOLV ", 1)[1].splitlines()[0]) == \
        "# generated by nsvpn\nnameserver 10.0.2.3\n"
    assert "V6OFF 1" in out
    assert res["nonblock"] and res["cloexec"]
    assert res["spawn_ms"] < 300
    pkts = [bytes.fromhex(h) for h in res["pkts"]]
    udp = [x for x in map(_ipv4, pkts) if x[0] == 17]
    icmp = [x for x in map(_ipv4, pkts) if x[0] == 1]
    assert udp and icmp, [x.hex() for x in pkts]
    proto, src, dst, l4 = udp[0]
    assert (src, dst) == ("10.0.2.100", "10.0.2.2")
    assert struct.unpack("!H", l4[2:4])[0] == 5353 and l4[8:] == b"nsvpn-udp-probe"
    _, src, dst, l4 = icmp[0]  # ping works unprivileged: ping_group_range covers our gid
    assert (src, dst) == ("10.0.2.100", "10.0.2.2") and l4[0] == 8 and l4.endswith(b"nsvpn-ping")
    # nothing IPv6 ever left the device (no router solicitations, no MLD)
    assert all(x[0] >> 4 == 4 for x in pkts)


def test_vnet_hdr_mtu_and_queue(pkgdir):
    p = run_user(pkgdir, _packets_helper("mtu=1500, vnet_hdr=True, dns=['10.0.2.3', '10.0.2.4'],"
                                         " search=['lab']"))
    res = last_json(p)
    assert res["status"] == 0, p.stderr
    link = eval(p.stdout.split("LINK ", 1)[1].splitlines()[0])
    # 4 MiB window at MTU 1500: 2 * 2797 + 256 packets
    assert "mtu 1500" in link and "qlen 5850" in link, link
    assert eval(p.stdout.split("RESOLV ", 1)[1].splitlines()[0]) == \
        "# generated by nsvpn\nnameserver 10.0.2.3\nnameserver 10.0.2.4\nsearch lab\n"
    pkts = [bytes.fromhex(h) for h in res["pkts"]]
    assert pkts
    for pkt in pkts:
        hdr = VnetHdr.parse(pkt)
        assert hdr.gso_type == 0  # small packets are never GSO
        proto, src, dst, _ = _ipv4(pkt[VNET_HDR_LEN:])
        assert (src, dst) == ("10.0.2.100", "10.0.2.2")


def test_exit_status_propagates(pkgdir):
    p = run_user(pkgdir, """
    import json, os, trio
    from nsvpn import namespace as ns
    out = {}
    for name, argv in [("exit42", ["sh", "-c", "exit 42"]),
                       ("term", ["sh", "-c", "kill -TERM $$"]),
                       ("true", ["true"])]:
        child = ns.spawn(argv)
        out[name] = trio.run(ns.supervise, child)
        child.close()
    child = ns.spawn(["sh", "-c", "sleep 0.1; exit 5"])
    os.close(child._pidfd)
    child._pidfd = None  # as on kernels < 5.3: the polling fallback
    out["nopidfd"] = trio.run(child.wait)
    out["poll_after"] = child.poll()
    print(json.dumps(out))
    """)
    assert last_json(p) == {"exit42": 42, "term": 143, "true": 0, "nopidfd": 5,
                            "poll_after": 5}, p.stderr


def test_sigterm_to_parent_reaches_cmd(pkgdir):
    proc = popen_user(pkgdir, """
    import os, sys, trio
    from nsvpn import namespace as ns
    child = ns.spawn(["sh", "-c",
                      'trap "echo got-TERM; exit 7" TERM; echo ready; '
                      'while :; do sleep 0.05; done'])
    async def main():
        async with trio.open_nursery() as n:
            await n.start(ns.forward_signals, child)
            print("armed", os.getpid(), flush=True)
            status = await child.wait()
            n.cancel_scope.cancel()
        return status
    sys.exit(trio.run(main))
    """)
    try:
        reader = _Lines(proc)
        lines = {reader.next(), reader.next()}
        armed = [ln for ln in lines if ln.startswith("armed")][0]
        assert "ready" in lines
        os.kill(int(armed.split()[1]), signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
        out = reader.buf.decode() + out
    finally:
        proc.kill()
    assert "got-TERM" in out, err
    assert proc.returncode == 7


def test_fd_hygiene(pkgdir):
    p = run_user(pkgdir, """
    import json, os, socket
    from nsvpn import namespace as ns
    r, w = os.pipe()
    leak = os.dup(w)                      # inheritable on purpose: must still not leak
    os.set_inheritable(leak, True)
    s = socket.socket()                   # some other nsvpn socket
    passed = os.dup2(r, 57)               # what the caller asks to pass
    child = ns.spawn(["sh", "-c", "ls /proc/$$/fd"], pass_fds=(passed,))
    child.wait_blocking()
    print(json.dumps({"passed": passed, "tun": child.tun_fd, "leak": leak}))
    """)
    res = last_json(p)
    fds = sorted(int(x) for x in p.stdout.splitlines() if x.isdigit())
    assert fds == [0, 1, 2, res["passed"]], (fds, res)


def test_command_errors_come_back_clearly(pkgdir):
    p = run_user(pkgdir, """
    import json, os, tempfile
    from nsvpn import namespace as ns
    out = {}
    with tempfile.TemporaryDirectory() as d:
        os.chdir(d)
        with open("plain-file", "w") as f:
            f.write("echo should not run")
        os.chmod("plain-file", 0o644)
        for name, argv, kw in [("missing", ["nsvpn-no-such-command"], {}),
                               ("noexec", ["./plain-file"], {}),
                               ("badcwd", ["true"], {"cwd": "/nonexistent-dir"})]:
            try:
                ns.spawn(argv, **kw)
                out[name] = "spawned?!"
            except ns.SpawnError as e:
                out[name] = [e.stage, e.exit_code, str(e)]
        os.chdir("/")
    print(json.dumps(out))
    """)
    res = last_json(p)
    assert "Traceback" not in p.stderr, p.stderr
    assert res["missing"] == ["exec", 127, "nsvpn-no-such-command: command not found"]
    assert res["noexec"][:2] == ["exec", 126] and "Permission denied" in res["noexec"][2]
    assert res["badcwd"][:2] == ["chdir", 1] and "/nonexistent-dir" in res["badcwd"][2]


def test_env_and_stdio_pass_through(pkgdir):
    p = run_user(pkgdir, """
    import os
    from nsvpn import namespace as ns
    os.environ["NSVPN_TEST_VAR"] = "xyz"
    ns.spawn(["sh", "-c", 'echo "var=$NSVPN_TEST_VAR"; echo err >&2']).wait_blocking()
    ns.spawn(["sh", "-c", 'echo "var=$NSVPN_TEST_VAR"'], env={"A": "1"}).wait_blocking()
    """)
    assert p.stdout.splitlines() == ["var=xyz", "var="] and p.stderr == "err\n"


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(ln.startswith("State:") and "Z" in ln.split()[1] for ln in f)
    except FileNotFoundError:
        return True


def test_cmd_dies_with_parent(pkgdir):
    proc = popen_user(pkgdir, """
    import os
    from nsvpn import namespace as ns
    child = ns.spawn(["sleep", "30"])
    print(os.getpid(), child.pid, flush=True)
    child.wait_blocking()
    """)
    try:
        helper, cmd = map(int, _Lines(proc).next().split())
        assert not _gone(cmd)
        os.kill(helper, signal.SIGKILL)
        deadline = time.monotonic() + 1.0
        while not _gone(cmd) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _gone(cmd), "CMD outlived a SIGKILLed nsvpn"
    finally:
        proc.kill()
        proc.wait()


def test_trials_ok_and_fast(pkgdir):
    p = run_user(pkgdir, """
    import json, time
    from nsvpn import namespace as ns
    t0 = time.perf_counter()
    rs = [ns.trial_userns(), ns.trial_tun(), ns.trial_bind_mount()]
    total = (time.perf_counter() - t0) * 1000
    print(json.dumps({"total": total, "trials": [r.to_dict() for r in rs]}))
    """)
    res = last_json(p)
    for t in res["trials"]:
        assert t["ok"], t
        assert t["elapsed_ms"] < 100, t
    assert res["total"] < 300
    assert res["trials"][1]["data"]["mode"] == "0666"


def test_trial_userns_explains_max_user_namespaces(pkgdir):
    if not os.access(UNSHARE, os.X_OK):
        pytest.skip("no unshare(1)")
    # A user namespace of our own whose limit for nested ones is 0: a site without userns.
    p = run_user(pkgdir, """
    import json
    from nsvpn import namespace as ns
    r = ns.trial_userns().to_dict()
    try:
        ns.spawn(["true"])
    except ns.SpawnError as e:
        r["spawn_error"] = [e.stage, e.errno, str(e)]
    print(json.dumps(r))
    """, wrap=(UNSHARE, "-U", "-r", "sh", "-c",
               "echo 0 > /proc/sys/user/max_user_namespaces && exec \"$@\"", "sh"))
    r = last_json(p)
    assert not r["ok"]
    assert r["errname"] == "ENOSPC"
    assert "user.max_user_namespaces is 0" in r["detail"]
    assert "read: user.max_user_namespaces=0" in r["detail"]
    assert r["elapsed_ms"] < 100
    assert r["spawn_error"][:2] == ["unshare", 28]  # ENOSPC, as a message, not a traceback
    assert r["spawn_error"][2].startswith("namespace setup failed: unshare: No space left")
    assert "user.max_user_namespaces is 0" in r["spawn_error"][2]
    assert "Traceback" not in p.stderr


@contextlib.contextmanager
def _tun_mode_lock():
    fd = os.open(TUN_MODE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def test_trial_tun_reports_device_mode(pkgdir):
    proc = popen_user(pkgdir, """
    import json, sys
    from nsvpn import namespace as ns
    print("ready", flush=True)
    sys.stdin.readline()
    r = ns.trial_tun().to_dict()
    try:
        ns.spawn(["true"])
    except ns.SpawnError as e:
        r["spawn_error"] = [e.stage, str(e)]
    print(json.dumps(r), flush=True)
    """, stdin=subprocess.PIPE)
    try:
        reader = _Lines(proc)
        assert reader.next() == "ready"  # helper imported and waiting: keep 0600 short
        with _tun_mode_lock():
            orig = stat.S_IMODE(os.stat("/dev/net/tun").st_mode)
            try:
                os.chmod("/dev/net/tun", 0o600)
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
                line = reader.next()
            finally:
                os.chmod("/dev/net/tun", orig)
        r = json.loads(line)
    finally:
        proc.kill()
        proc.wait()
    assert not r["ok"]
    assert r["errname"] in ("EACCES", "EPERM")
    assert r["data"]["mode"] == "0600" and "mode 0600" in r["detail"]
    stage, msg = r["spawn_error"]
    assert stage == "tun" and "/dev/net/tun" in msg and "mode 0600" in msg, msg


RESOLV_HELPER = """
import json, os
from nsvpn import namespace as ns
out = {}
child = ns.spawn(["cat", "/etc/resolv.conf", os.environ["STUB"]])
out["status"] = child.wait_blocking()
out["warnings"] = child.warnings
out["probe"] = ns.trial_bind_mount().to_dict()

def legacy(stage):  # the pre-5.2 path, forced, in a throw-away namespace
    ns._mount(None, "/", None, ns.MS_REC | ns.MS_PRIVATE)
    how = ns.cover_file("/etc/resolv.conf", "nameserver 10.9.9.9\\n", legacy=True)
    return how, {"text": open("/etc/resolv.conf").read()}

out["legacy"] = ns._run_trial("legacy", legacy).to_dict()
print(json.dumps(out))
"""


@pytest.mark.parametrize("case", ["target", "dangling", "no-dir", "missing"])
def test_resolv_conf_symlink(pkgdir, case):
    """/etc/resolv.conf as a symlink (systemd-resolved style) or missing, in a scratch mount
    namespace (an overlay over /etc) so the host's /etc stays as it is."""
    d = tempfile.mkdtemp(prefix="nsvpn-resolv-")
    with open("/etc/resolv.conf", "rb") as f:
        host_before = f.read()
    try:
        os.chmod(d, 0o755)
        for sub in ("upper", "work", "stub"):
            os.mkdir(os.path.join(d, sub), 0o755)
        stub = os.path.join(d, "stub", "stub-resolv.conf")
        if case == "target":
            with open(stub, "w") as f:
                f.write("nameserver 127.0.0.53\n")
            os.chmod(stub, 0o644)
        if case == "no-dir":
            stub = os.path.join(d, "missing", "stub-resolv.conf")
        if case == "missing":  # an overlay whiteout hides the lower file
            os.mknod(os.path.join(d, "upper", "resolv.conf"), stat.S_IFCHR, os.makedev(0, 0))
        else:
            os.symlink(stub, os.path.join(d, "upper", "resolv.conf"))
        setup = (f"mount -t overlay overlay -o lowerdir=/etc,upperdir={d}/upper,"
                 f"workdir={d}/work /etc && exec \"$@\"")
        cmd = [UNSHARE, "-m", "--propagation", "private", "sh", "-c", setup, "sh",
               *_user_cmd(pkgdir, RESOLV_HELPER)]
        p = subprocess.run(cmd, env=dict(_user_env(pkgdir), STUB=stub), cwd=pkgdir,
                           capture_output=True, text=True, timeout=30)
        res = last_json(p)
        generated = "# generated by nsvpn\nnameserver 10.0.2.3\n"
        assert res["probe"]["ok"], res["probe"]
        if case == "missing":
            # CMD still runs; the parent is told why DNS may not work
            assert res["warnings"] == ["/etc/resolv.conf not replaced: No such file or directory"]
            assert res["status"] == 1 and "No such file" in p.stderr
            assert res["probe"]["data"]["method"] == "move_mount onto /etc/hosts"
            assert not res["legacy"]["ok"] and res["legacy"]["errname"] == "ENOENT"
        elif case == "target":
            # we covered the symlink itself; its target still reads as before
            assert res["status"] == 0 and res["warnings"] == []
            assert res["probe"]["data"]["symlink"] is True
            assert p.stdout.startswith(generated + "nameserver 127.0.0.53\n"), p.stdout
            assert res["legacy"]["ok"], res["legacy"]
            assert res["legacy"]["detail"] == f"bind mount over {stub}"
            assert res["legacy"]["data"]["text"] == "nameserver 10.9.9.9\n"
            with open(stub) as f:
                assert f.read() == "nameserver 127.0.0.53\n"  # the host's file is untouched
        else:
            assert p.stdout.startswith(generated), (p.stdout, p.stderr)
            assert res["status"] == 1  # cat: the stub itself does not exist
            if case == "dangling":
                assert res["legacy"]["ok"], res["legacy"]
                assert res["legacy"]["detail"] == f"tmpfs over {os.path.dirname(stub)}"
                assert not os.path.exists(stub)  # only inside that mount namespace
            else:
                assert not res["legacy"]["ok"]
                assert "nothing to mount over" in res["legacy"]["detail"]
        with open("/etc/resolv.conf", "rb") as f:
            assert f.read() == host_before
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_spawn_refuses_worker_thread(pkgdir):
    p = run_user(pkgdir, """
    import json, threading
    from nsvpn import namespace as ns
    out = {}
    def worker():
        try:
            ns.spawn(["true"])
        except RuntimeError as e:
            out["err"] = str(e)
    t = threading.Thread(target=worker)
    t.start()
    t.join()
    print(json.dumps(out))
    """)
    assert "main thread" in last_json(p)["err"]


def test_compute_txqueuelen():
    assert compute_txqueuelen(4 << 20, 65520) == 1000
    assert compute_txqueuelen(64 << 20, 65520) == 2 * 1025 + 256
    assert NetnsSpec(mtu=1500).queue_len() == 2 * 2797 + 256
    assert NetnsSpec(txqueuelen=77).queue_len() == 77


def test_vpn_style_spec_and_hosts(pkgdir):
    """No gateway (routes straight onto the device), a /32 address, our own /etc/hosts."""
    p = run_user(pkgdir, """
    from nsvpn import namespace as ns
    spec = ns.NetnsSpec(addr="192.168.77.5", prefixlen=24, gateway=None,
                        routes=["0.0.0.0/0", "10.1.0.0/16", "192.168.77.0/24", "10.1.0.0/16"],
                        dns=["192.168.77.1"],
                        hosts="127.0.0.1 localhost\\n10.1.2.3 gw.nsvpn\\n")
    child = ns.spawn(["sh", "-c", "ip -4 route; getent ahostsv4 gw.nsvpn | head -1; "
                                  "cat /etc/resolv.conf"], spec)
    print("status", child.wait_blocking())
    """)
    lines = [ln.strip() for ln in p.stdout.splitlines()]
    # pushed routes may repeat each other or the kernel's subnet route: replaced, not EEXIST
    assert lines[:3] == ["default dev tun0 scope link", "10.1.0.0/16 dev tun0 scope link",
                         "192.168.77.0/24 dev tun0 scope link"], lines
    assert lines[3].split()[0] == "10.1.2.3"
    assert "nameserver 192.168.77.1" in lines and lines[-1] == "status 0"


def test_ipv6_when_asked(pkgdir):
    p = run_user(pkgdir, """
    import json, os
    from nsvpn import namespace as ns
    inner = ("import socket, subprocess\\n"
             "print(subprocess.run(['ip', '-6', 'route', 'show', 'dev', 'tun0'],"
             " capture_output=True, text=True).stdout, flush=True)\\n"
             "s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\\n"
             "s.sendto(b'nsvpn-v6', ('fd00::2', 5353))\\n")
    child = ns.spawn(["python3", "-c", inner],
                     ns.NetnsSpec(ipv6=True, routes=["0.0.0.0/0", "::/0"]))
    status = child.wait_blocking()
    pkts = []
    while True:
        try:
            pkts.append(os.read(child.tun_fd, 70000).hex())
        except BlockingIOError:
            break
    print(json.dumps({"status": status, "pkts": pkts}))
    """)
    res = last_json(p)
    assert res["status"] == 0, p.stderr
    assert "default via fd00::2 metric 1024" in p.stdout, p.stdout
    udp6 = []
    for h in res["pkts"]:
        pkt = bytes.fromhex(h)
        if pkt[0] >> 4 == 6 and pkt[6] == 17:
            udp6.append(pkt)
    assert udp6, res["pkts"]
    pkt = udp6[0]
    assert socket.inet_ntop(socket.AF_INET6, pkt[8:24]) == "fd00::100"
    assert socket.inet_ntop(socket.AF_INET6, pkt[24:40]) == "fd00::2"
    assert pkt[48:] == b"nsvpn-v6"


TSO_HELPER = r"""
import json, os, select, socket, struct, time
from nsvpn import namespace as ns
from nsvpn.tun import VNET_HDR_LEN, VnetHdr, VNET_HDR_PLAIN

def csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data)//2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF

def tcp_packet(src, dst, sport, dport, seq, ack, flags, window, opts=b""):
    off = (20 + len(opts)) // 4
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, off << 4, flags, window, 0, 0) + opts
    ph = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", csum(ph + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, 6, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    return ip + tcp

N = 400000
inner = ("import socket; s = socket.create_connection(('10.0.2.2', 80), timeout=5); "
         f"s.sendall(b'x' * {N}); s.shutdown(socket.SHUT_WR); s.recv(1)")
child = ns.spawn(["python3", "-c", inner], ns.NetnsSpec(mtu=1500, vnet_hdr=True))
fd = child.tun_fd
got = 0; isn = None; my = 5000; sizes = []; gso = set(); needs_csum = set(); fin = False
deadline = time.monotonic() + 5
while time.monotonic() < deadline and not fin:
    select.select([fd], [], [], 0.2)
    while True:
        try:
            raw = os.read(fd, 70000)
        except BlockingIOError:
            break
        hdr = VnetHdr.parse(raw)
        pkt = raw[VNET_HDR_LEN:]
        if pkt[0] >> 4 != 4 or pkt[9] != 6:
            continue
        ihl = (pkt[0] & 15) * 4
        sport, dport, seq, ack, offb, flags = struct.unpack_from("!HHIIBB", pkt, ihl)
        payload = pkt[ihl + (offb >> 4) * 4:]
        if flags & 0x02:  # SYN
            isn = seq
            opts = struct.pack("!BBH", 2, 4, 1460) + b"\x01" + struct.pack("!BBB", 3, 3, 7)
            os.write(fd, VNET_HDR_PLAIN + tcp_packet("10.0.2.2", "10.0.2.100", 80, sport, my,
                                                     seq + 1, 0x12, 65535, opts))
            continue
        if payload:
            sizes.append(len(payload)); gso.add(hdr.gso_type); needs_csum.add(hdr.flags & 1)
            if seq - isn - 1 == got:
                got += len(payload)
        if flags & 0x01:
            fin = True
        a = isn + 1 + got + (1 if fin else 0)
        os.write(fd, VNET_HDR_PLAIN + tcp_packet("10.0.2.2", "10.0.2.100", 80, sport, my + 1,
                                                 a & 0xFFFFFFFF, 0x10, 65535))
child.signal(9)
print(json.dumps({"got": got, "max": max(sizes or [0]), "n": len(sizes), "gso": sorted(gso),
                  "needs_csum": sorted(needs_csum), "fin": fin}))
"""


def test_vnet_hdr_gives_tso_super_segments(pkgdir):
    """With vnet_hdr the kernel hands us 64 KiB TCP segments with partial checksums even at
    MTU 1500 (what TUNSETOFFLOAD promises), and accepts our plain-header packets back."""
    p = run_user(pkgdir, TSO_HELPER)
    r = last_json(p)
    assert r["got"] == 400000 and r["fin"], (r, p.stderr)  # our ACKs were accepted
    assert r["max"] > 1500 * 10, r
    assert 1 in r["gso"] and r["needs_csum"] == [1], r  # GSO_TCPV4, VNET_F_NEEDS_CSUM
