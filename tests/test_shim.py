"""The LD_PRELOAD shim (fallback/nsvpn_preload.c) and the preload helpers around it.

Without the lab: binary checks, CMD's environment, the probe marker, inertness when not
configured. In the lab (worker netns, as the test user, through microsocks): the resolver hooks,
threads, programs that close all their fds.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from nsvpn import preload
from nsvpn.nested import without_session
from nsvpn.preload import build_env, check_binary


def _shim() -> str:
    """The installed shim: next to the imported package, else in the nsvpn venv."""
    import glob

    from labenv import venv_dir

    path = preload.shim_path()
    if path is not None:
        return path
    found = glob.glob(os.path.join(venv_dir(), "lib", "python3*", "site-packages", "nsvpn",
                                   "_preload*.so"))
    if found:
        return found[0]
    pytest.skip("the shim is not built (pip install the package)")
    raise AssertionError


@pytest.fixture(scope="module")
def fresh_shim(tmp_path_factory) -> str:
    """Compile fallback/nsvpn_preload.c exactly as setup.py does (tests run the current code)."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    out = tmp_path_factory.mktemp("shim") / "nsvpn_preload.so"
    src = os.path.join(os.path.dirname(__file__), "..", "fallback", "nsvpn_preload.c")
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-fvisibility=hidden", "-Wall", "-Wextra",
                    "-Werror", "-o", str(out), src, "-ldl"], check=True)
    return str(out)


# ------------------------------------------------------------------ check_binary


def test_check_binary_static_and_dynamic(tmp_path):
    assert check_binary("/bin/true") == []
    assert check_binary("true") == []  # found on PATH
    assert check_binary("/no/such/program") == []
    if os.path.exists("/bin/busybox") and shutil.which("file") and b"statically linked" in \
            subprocess.run(
                ["file", "/bin/busybox"], capture_output=True).stdout:
        assert any("statically linked" in w for w in check_binary("/bin/busybox"))
    src = tmp_path / "s.c"
    src.write_text("int main(void){return 0;}\n")
    exe = tmp_path / "static"
    r = subprocess.run(["cc", "-static", "-o", str(exe), str(src)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("no static libc to build a static test binary")
    warnings = check_binary(str(exe))
    assert len(warnings) == 1 and "statically linked" in warnings[0]
    # a static-pie binary has no PT_INTERP either
    pie = tmp_path / "static-pie"
    if subprocess.run(["cc", "-static-pie", "-o", str(pie), str(src)]).returncode == 0:
        assert any("statically linked" in w for w in check_binary(str(pie)))
    dyn = tmp_path / "dyn"
    subprocess.run(["cc", "-o", str(dyn), str(src)], check=True)
    assert check_binary(str(dyn)) == []
    script = tmp_path / "script"
    script.write_text(f"#!{exe}\n")
    script.chmod(0o755)
    assert any("statically linked" in w for w in check_binary(str(script)))
    script.write_text("#!/usr/bin/env sh\necho hi\n")
    assert check_binary(str(script)) == []


def test_check_binary_32bit_and_garbage(tmp_path):
    elf32 = tmp_path / "elf32"
    elf32.write_bytes(b"\x7fELF\x01\x01\x01" + bytes(57))  # ELFCLASS32, no program headers
    warnings = check_binary(str(elf32))
    assert any("32-bit" in w for w in warnings) and any("statically" in w for w in warnings)
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x7fELF\x09" + bytes(100))
    assert check_binary(str(junk)) == []
    text = tmp_path / "text"
    text.write_text("not a program\n")
    assert check_binary(str(text)) == []


def test_check_binary_setuid_setgid(tmp_path):
    exe = tmp_path / "su"
    shutil.copy("/bin/true", exe)
    exe.chmod(0o4755)
    assert any("setuid" in w for w in check_binary(str(exe)))
    exe.chmod(0o2755)
    assert any("setgid" in w for w in check_binary(str(exe)))
    exe.chmod(0o755)
    assert check_binary(str(exe)) == []


# ------------------------------------------------------------------ environment


class _FrontStub:
    """Only the two accessors build_env reads (a data holder, not a stand-in for behaviour)."""

    def shim_env(self):
        return {"NSVPN_CTL": "/run/x/ctl", "NSVPN_FRONT_PORT4": "4000", "NSVPN_FRONT_PORT6": "0"}

    def socks_url(self):
        return "socks5h://nsvpn:s3cret@127.0.0.1:4000"

    def http_proxy_url(self):
        return "http://127.0.0.1:4000"


def test_build_env():
    base = {"PATH": "/bin", "LD_PRELOAD": "/opt/other.so", "NO_PROXY": "cvmfs.example",
            "NSVPN_DIRECT": "stale", "HOME": "/h"}
    env = build_env(base, "/x/_preload.so", _FrontStub(), ["10.0.0.0/8", "fd00::/8"])
    assert env["LD_PRELOAD"] == "/opt/other.so /x/_preload.so"
    assert env["NSVPN_DIRECT"] == "10.0.0.0/8,fd00::/8"
    assert env["NSVPN_CTL"] == "/run/x/ctl" and env["NSVPN_FRONT_PORT4"] == "4000"
    assert env["ALL_PROXY"] == env["all_proxy"] == "socks5h://nsvpn:s3cret@127.0.0.1:4000"
    assert env["NO_PROXY"] == "cvmfs.example,localhost,127.0.0.1,::1"
    assert env["no_proxy"] == "localhost,127.0.0.1,::1"
    for k in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        assert env[k] == "http://127.0.0.1:4000"
    assert env["PATH"] == "/bin" and env["HOME"] == "/h"
    # a site's own HTTP proxy (either spelling) stays, for that scheme only
    env = build_env({"HTTP_PROXY": "http://squid.site:3128"}, "/s.so", _FrontStub(), [])
    assert env["HTTP_PROXY"] == "http://squid.site:3128" and "http_proxy" not in env
    assert env["https_proxy"] == env["HTTPS_PROXY"] == "http://127.0.0.1:4000"
    assert env["RES_OPTIONS"] == "timeout:1 attempts:1"
    assert build_env({"RES_OPTIONS": "rotate"}, "/s.so", _FrontStub(), [])["RES_OPTIONS"] == \
        "rotate"
    env = build_env({}, "/x/_preload.so", _FrontStub(), [], socks_env=False)
    assert env["LD_PRELOAD"] == "/x/_preload.so" and "ALL_PROXY" not in env
    assert "http_proxy" not in env and "HTTPS_PROXY" not in env


def test_without_session_strips_only_an_outer_session(fresh_shim, tmp_path):
    """nsvpn inside nsvpn: our shim (found by its marker, whatever its name), the session's
    NSVPN_* and the proxy variables that point at its front go; everything else stays."""
    other = tmp_path / "other.so"
    other.write_bytes(b"\x7fELF not ours")
    outer = {"PATH": "/bin", "LD_PRELOAD": f"{other}:{fresh_shim}", "NSVPN_CTL": "/r/ctl",
             "NSVPN_FRONT_PORT4": "4000", "NSVPN_DNS_PORT4": "4001", "NSVPN_DIRECT": "",
             "NSVPN_FRONT_PROTO": "2", "NSVPN_FRONT_HANDOFF": "1",
             "ALL_PROXY": "socks5h://nsvpn:s3cret@127.0.0.1:4000",
             "all_proxy": "socks5h://me@proxy.site:1080", "HOME": "/h",
             "http_proxy": "http://127.0.0.1:4000", "HTTPS_PROXY": "http://nsvpn:x@127.0.0.1:4000",
             "HTTP_PROXY": "http://squid.site:3128"}
    env = without_session(outer)
    # NSVPN_CTL stays, empty: "no session here" to the outer shim's exec hooks
    assert env == {"PATH": "/bin", "LD_PRELOAD": str(other), "NSVPN_CTL": "",
                   "all_proxy": "socks5h://me@proxy.site:1080", "HOME": "/h",
                   "HTTP_PROXY": "http://squid.site:3128"}
    assert without_session({"LD_PRELOAD": fresh_shim, "NSVPN_FRONT_PORT4": "4000"}) == \
        {"NSVPN_CTL": ""}
    plain = {"PATH": "/bin", "LD_PRELOAD": f"{other}:/nonexistent.so", "ALL_PROXY": "x"}
    assert without_session(plain) == plain
    # under a new shim the outer one is not loaded a second time
    env = build_env(outer, "/x/_preload.so", _FrontStub(), [])
    assert env["LD_PRELOAD"] == f"{other} /x/_preload.so"
    assert env["ALL_PROXY"] == env["all_proxy"] == "socks5h://nsvpn:s3cret@127.0.0.1:4000"


# ------------------------------------------------------------------ the library itself


def test_probe_marker(fresh_shim):
    r, w = os.pipe()
    try:
        env = {"PATH": "/usr/bin:/bin", "LD_PRELOAD": fresh_shim, "NSVPN_PROBE_FD": str(w)}
        subprocess.run(["/bin/true"], env=env, pass_fds=(w,), check=True)
        os.close(w)
        w = -1
        assert os.read(r, 100).startswith(b"nsvpn-shim ")
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_installed_shim_is_current(fresh_shim):
    """The installed nsvpn/_preload*.so exports the same hooks as a fresh build."""
    def hooks(path):
        out = subprocess.run(["nm", "-D", "--defined-only", path], capture_output=True,
                             text=True, check=True).stdout
        return sorted(line.split()[-1] for line in out.splitlines() if " T " in line)
    assert hooks(_shim()) == hooks(fresh_shim)
    assert {"connect", "getaddrinfo", "getpeername", "getsockopt", "gethostbyname_r",
            "getnameinfo", "sendto"} <= set(hooks(fresh_shim))


def test_inert_without_configuration(fresh_shim):
    """Loaded but not configured (no front): loopback TCP and lookups work as without it."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    code = ("import socket, sys\n"
            "s = socket.create_connection(('127.0.0.1', int(sys.argv[1])))\n"
            "s.sendall(b'hi'); print(s.getpeername()[1]); print(socket.getaddrinfo("
            "'localhost', 80, socket.AF_INET)[0][4][0])\n")
    with srv:
        p = subprocess.Popen([sys.executable, "-c", code, str(port)],
                             env={"LD_PRELOAD": fresh_shim, "PATH": "/usr/bin:/bin"},
                             stdout=subprocess.PIPE, text=True)
        conn, _ = srv.accept()
        with conn:
            assert conn.recv(2) == b"hi"
        out = p.communicate(timeout=20)[0].split()
    assert p.returncode == 0
    assert out == [str(port), "127.0.0.1"]


def test_own_connection_to_the_front_needs_no_control_request(fresh_shim, tmp_path):
    """A program that speaks SOCKS to the front itself (curl with ALL_PROXY) connects to the
    front's port: its getpeername() is the front's real address, answered without a control
    request (that round trip cost ~40% of a short request's time)."""
    front = socket.socket()
    front.bind(("127.0.0.1", 0))
    front.listen(4)
    port = front.getsockname()[1]
    ctl_path = str(tmp_path / "ctl")
    ctl = socket.socket(socket.AF_UNIX)
    ctl.bind(ctl_path)
    ctl.listen(4)
    ctl.settimeout(0.5)
    code = ("import socket, sys\n"
            "for blocking in (True, False):\n"
            "    s = socket.socket()\n"
            "    s.setblocking(blocking)\n"
            "    s.connect_ex(('127.0.0.1', int(sys.argv[1])))\n"
            "    s.setblocking(True)\n"
            "    print(*s.getpeername())\n")
    env = {"LD_PRELOAD": fresh_shim, "PATH": "/usr/bin:/bin", "NSVPN_CTL": ctl_path,
           "NSVPN_FRONT_PORT4": str(port)}
    with front, ctl:
        out = subprocess.run([sys.executable, "-c", code, str(port)], env=env,
                             capture_output=True, text=True, timeout=30)
        asked = []
        try:
            while True:
                c, _ = ctl.accept()
                with c:
                    c.settimeout(0.5)
                    asked.append(c.recv(100))
        except socket.timeout:
            pass
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == [f"127.0.0.1 {port}"] * 2
    assert asked == []


# ------------------------------------------------------------------ in the lab

RESOLVER_CHECKS = r"""
import json, socket, sys
out = {}
gai = socket.getaddrinfo("remote.lab", 80, socket.AF_INET, socket.SOCK_STREAM)
out["fake"] = gai[0][4][0]
out["again"] = socket.getaddrinfo("REMOTE.lab.", 80, socket.AF_INET)[0][4][0]
out["canon"] = socket.getaddrinfo("remote.lab", 80, socket.AF_INET, 0, 0,
                                  socket.AI_CANONNAME)[0][3]
out["v6mapped"] = socket.getaddrinfo("remote.lab", 80, socket.AF_INET6, socket.SOCK_STREAM, 0,
                                     socket.AI_V4MAPPED)[0][4][0]
try:
    socket.getaddrinfo("remote.lab", 80, socket.AF_INET6, socket.SOCK_STREAM)
    out["v6only"] = "answered"
except socket.gaierror:
    out["v6only"] = "gaierror"
try:
    socket.getaddrinfo("remote.lab", 80, 0, 0, 0, socket.AI_NUMERICHOST)
    out["numerichost"] = "answered"
except socket.gaierror:
    out["numerichost"] = "gaierror"
out["numeric"] = socket.getaddrinfo("10.9.8.7", 80, socket.AF_INET)[0][4][0]
out["edge"] = socket.getaddrinfo("edge.lab", 80, socket.AF_INET)[0][4][0]  # host resolver
out["ghbn_ex"] = socket.gethostbyname_ex("www.lab")
out["ghba"] = socket.gethostbyaddr(out["fake"])[0]
out["gni"] = socket.getnameinfo((out["fake"], 80), 0)
out["gni_numeric"] = socket.getnameinfo((out["fake"], 80), socket.NI_NUMERICHOST)[0]
print(json.dumps(out))
"""

THREADS_AND_CLOSERANGE = r"""
import hashlib, os, socket, sys, threading
want = sys.argv[1]
os.closerange(3, 65536)  # what daemons and some MPI launchers do
results = []
def get():
    s = socket.create_connection(("remote.lab", 80))  # blocking connect, from a thread
    s.sendall(b"GET /1M.bin HTTP/1.0\r\nHost: remote.lab\r\n\r\n")
    data = b""
    while True:
        c = s.recv(1 << 16)
        if not c:
            break
        data += c
    results.append(hashlib.sha256(data.partition(b"\r\n\r\n")[2]).hexdigest() == want)
ts = [threading.Thread(target=get) for _ in range(16)]
[t.start() for t in ts]
[t.join() for t in ts]
print(sum(results), len(results))
"""


@pytest.fixture
def under_shim(nsvpn_lab, user_tmp):
    """Run a python snippet under run_preload in the worker netns (microsocks upstream)."""
    from test_preload_lab import DRIVER

    lab = nsvpn_lab
    driver = os.path.join(user_tmp, "driver.py")
    with open(driver, "w") as f:
        f.write(DRIVER)
    os.chmod(driver, 0o644)

    def run(code, *args, timeout=90):
        cfg = {"via": lab.socks5["url"], "direct": [lab.info["worker"]["net"]]}
        py = os.path.join(lab.venv, "bin", "python")
        return lab.run([py, driver, json.dumps(cfg), "--", "python3", "-c", code, *args],
                       timeout=timeout)

    return run


@pytest.mark.lab
def test_resolver_hooks(nsvpn_lab, under_shim):
    r = under_shim(RESOLVER_CHECKS + "\nimport subprocess\n"
                   "print(subprocess.run(['getent', 'hosts', 'remote.lab'], "
                   "capture_output=True, text=True).stdout.split()[0])\n")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    out = json.loads(lines[0])
    fake = out["fake"]
    assert fake.startswith("198.18.")
    assert out["again"] == fake  # stable, case and trailing dot normalized
    assert out["canon"] == "remote.lab"
    assert out["v6mapped"] == "::ffff:" + fake
    assert out["v6only"] == "gaierror"  # fake IPs are IPv4: no AAAA-only answer
    assert out["numerichost"] == "gaierror"  # AI_NUMERICHOST is never faked
    assert out["numeric"] == "10.9.8.7"
    assert out["edge"] == nsvpn_lab.edge_ip  # the host resolver answers first
    name, aliases, addrs = out["ghbn_ex"]
    assert name == "www.lab" and len(addrs) == 1 and addrs[0].startswith("198.18.")
    assert out["ghba"] == "remote.lab"
    assert out["gni"] == ["remote.lab", "http"]
    assert out["gni_numeric"] == fake
    assert lines[1] == fake  # another process (fork+exec) sees the same table


@pytest.mark.lab
def test_threads_and_closerange(nsvpn_lab, under_shim):
    r = under_shim(THREADS_AND_CLOSERANGE, nsvpn_lab.sha256["1M.bin"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["16", "16"]


@pytest.fixture
def big_rmem_ns(nsvpn_lab, user_tmp):
    """A scratch netns of our own whose TCP default receive buffer is 8 MiB (as on hosts tuned
    for WAN transfers): loopback, a veth pair with 10.9.9.1/24, microsocks on 127.0.0.1:1080
    and an HTTP server on 10.9.9.1:8000, all run as the test user."""
    if shutil.which("microsocks") is None:
        pytest.skip("microsocks is not installed")
    ns = f"nsvpn-shimtest-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for cmd in (["link", "set", "lo", "up"],
                    ["link", "add", "st0", "type", "veth", "peer", "name", "st1"],
                    ["addr", "add", "10.9.9.1/24", "dev", "st0"],
                    ["link", "set", "st0", "up"], ["link", "set", "st1", "up"]):
            subprocess.run(["ip", "-n", ns] + cmd, check=True)
        subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w",
                        "net.ipv4.tcp_rmem=4096 8388608 33554432"], check=True)
        with open(os.path.join(user_tmp, "f.bin"), "wb") as f:
            f.write(os.urandom(1 << 20))
        os.chmod(os.path.join(user_tmp, "f.bin"), 0o644)
        socks = nsvpn_lab.popen(["microsocks", "-i", "127.0.0.1", "-p", "1080"], netns=ns)
        web = nsvpn_lab.popen(["python3", "-m", "http.server", "-b", "10.9.9.1", "-d", user_tmp,
                               "8000"], netns=ns)
        nsvpn_lab.wait_for(lambda: nsvpn_lab.port_open("10.9.9.1", 8000, netns=ns) and
                           nsvpn_lab.port_open("127.0.0.1", 1080, netns=ns),
                           timeout=20, what="servers in the scratch netns")
        yield ns
        socks.stop()
        web.stop()
    finally:
        subprocess.run(["ip", "netns", "del", ns])


@pytest.mark.lab
def test_readiness_gate_with_large_default_rcvbuf(nsvpn_lab, user_tmp, big_rmem_ns):
    """With an 8 MiB default receive buffer the front's window would keep opening while the
    shim pads it; the listener's locked buffer keeps it shut: the program's socket turns
    writable only after the (1 s slow) upstream dial, and a refusal still says ECONNREFUSED."""
    from test_preload_lab import DRIVER, EPOLL_CLIENT

    exe = os.path.join(user_tmp, "epoll_client")
    with open(exe + ".c", "w") as f:
        f.write(EPOLL_CLIENT)
    subprocess.run(["cc", "-O2", "-o", exe, exe + ".c"], check=True)
    driver = os.path.join(user_tmp, "driver.py")
    with open(driver, "w") as f:
        f.write(DRIVER)
    cfg = {"via": "socks5://127.0.0.1:1080", "direct": [], "delay": 1.0}
    py = os.path.join(nsvpn_lab.venv, "bin", "python")
    r = nsvpn_lab.run([py, driver, json.dumps(cfg), "--", "/bin/sh", "-c",
                       f"{exe} 10.9.9.1 8000 /f.bin; {exe} 10.9.9.1 8001"],
                      netns=big_rmem_ns, timeout=60)
    blocks = ["addr " + b for b in r.stdout.split("addr ")[1:]]
    assert len(blocks) == 2, r
    ok, refused = ({k: v for k, _, v in (ln.partition(" ") for ln in b.splitlines())}
                   for b in blocks)
    assert float(ok["connect"].split()[2]) < 0.3, r
    n, err, when = ok["ready"].split()
    assert (n, err) == ("1", "0") and float(when) >= 0.9, r
    assert int(ok["bytes"]) > 1 << 20, r
    n, err, when = refused["ready"].split()
    assert err == "111" and float(when) >= 0.9, r
