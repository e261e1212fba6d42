"""Security properties of ns mode, in the lab (issue 8). CMD is PROBE_PY (system python3) run
by the unprivileged test user under `nsvpn exec`; it tries what a hostile or careless program
inside the namespace could try and reports errnos as JSON. The test also looks from outside
(as root) at every process of the test user for secrets in argv and environment.

What protects what (checked here, not assumed):
* CMD holds no capability (CapEff 0) after exec: it cannot change addresses, routes or links
  (EPERM), cannot unmount the resolv.conf bind mount (EPERM), cannot open raw or packet
  sockets (EPERM) nor set IP_TRANSPARENT. ICMP "ping" datagram sockets work on purpose.
* Source spoofing: without CAP_NET_RAW the only way to put a foreign source address on a
  packet is IP_FREEBIND (no capability needed) + bind; the stack must refuse such flows.
* A SYN flood from CMD (parallel connects to a blackholed target) keeps the half-open table
  at its bound and nsvpn keeps serving other flows.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
import uuid
from typing import Dict, List

import labenv
import pytest

pytestmark = pytest.mark.lab

PROBE_PY = r'''
import ctypes, errno, json, os, socket, subprocess, sys, time
out = {}
def en(e):
    return errno.errorcode.get(e.errno, str(e)) if isinstance(e, OSError) else repr(e)
def sh(argv):
    r = subprocess.run(argv, capture_output=True, text=True)
    return [r.returncode, r.stderr.strip()[-200:]]
dev = [n for _i, n in socket.if_nameindex() if n != "lo"][0]
out["dev"] = dev
out["ip_addr_add"] = sh(["ip", "addr", "add", "10.0.2.201/24", "dev", dev])
out["ip_route_add"] = sh(["ip", "route", "add", "192.0.2.0/24", "dev", dev])
out["ip_route_del_default"] = sh(["ip", "route", "del", "default"])
out["ip_link_down"] = sh(["ip", "link", "set", dev, "down"])
libc = ctypes.CDLL(None, use_errno=True)
rc = libc.umount2(b"/etc/resolv.conf", 0)
out["umount"] = errno.errorcode.get(ctypes.get_errno(), "ok") if rc else "ok"
rc = libc.unshare(0x40000000)  # CLONE_NEWNET
out["unshare_net"] = "ok" if rc == 0 else errno.errorcode.get(ctypes.get_errno())
for name, args in (("raw_tcp", (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)),
                   ("raw_icmp", (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)),
                   ("packet", (socket.AF_PACKET, socket.SOCK_RAW, 0x0300)),
                   ("ping", (socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP))):
    try:
        socket.socket(*args).close()
        out[name] = "ok"
    except OSError as e:
        out[name] = en(e)
try:
    s = socket.socket()
    s.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT
    out["transparent"] = "ok"
except OSError as e:
    out["transparent"] = en(e)
out["caps"] = [l.split()[1] for l in open("/proc/self/status") if l.startswith("CapEff")][0]
# nsvpn is our parent: can we look at its fds?
pp = os.getppid()
argv0 = open("/proc/%d/cmdline" % pp, "rb").read().split(b"\0")[:2][-1]
out["parent_cmdline"] = argv0.decode(errors="replace")
try:
    out["parent_fds"] = sorted({os.readlink("/proc/%d/fd/%s" % (pp, f))
                               for f in os.listdir("/proc/%d/fd" % pp)})
except OSError as e:
    out["parent_fds"] = en(e)
# secrets: argv of every process we can see, and our own environment
secret = sys.argv[1][::-1]  # passed reversed so that our own argv does not contain it
hits = []
for pid in os.listdir("/proc"):
    if pid.isdigit():
        for what in ("cmdline", "environ"):
            try:
                if os.stat("/proc/" + pid).st_uid != os.getuid():
                    continue  # the test's own private SOCKS server runs as nobody
                if secret.encode() in open("/proc/%s/%s" % (pid, what), "rb").read():
                    argv = open("/proc/%s/cmdline" % pid, "rb").read().split(b"\0")
                    hits.append((pid, what, b" ".join(argv[:3]).decode(errors="replace")))
            except OSError:
                pass
out["secret_hits"] = hits
out["secret_in_env"] = any(secret in v for v in os.environ.values())
def conn(addr, timeout=2.0, src=None):
    s = socket.socket()
    s.settimeout(timeout)
    try:
        if src:
            s.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND: no capability needed
            s.bind((src, 0))
        s.connect(addr)
        return "connected"
    except socket.timeout:
        return "timeout"
    except OSError as e:
        return en(e)
    finally:
        s.close()
out["host_loopback"] = conn(("10.0.2.2", int(sys.argv[2])))
out["own_loopback"] = conn(("127.0.0.1", int(sys.argv[2])))
out["spoofed_src"] = conn(("172.31.1.1", 8080), 3.0, "192.0.2.77")
out["spoofed_in_subnet"] = conn(("172.31.1.1", 8080), 3.0, "10.0.2.77")
out["normal"] = conn(("172.31.1.1", 8080))
open(sys.argv[3] + ".tmp", "w").write(json.dumps(out))
os.rename(sys.argv[3] + ".tmp", sys.argv[3])
while not os.path.exists(sys.argv[3] + ".done"):
    time.sleep(0.05)
'''

FLOOD_PY = r'''
import json, os, socket, sys, time, select
n, target = int(sys.argv[1]), (sys.argv[2], int(sys.argv[3]))
socks = []
for i in range(n):
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex(target)
    socks.append(s)
open(sys.argv[4], "w").close()
while not os.path.exists(sys.argv[4] + ".done"):
    time.sleep(0.05)
'''


# A SOCKS5 server that accepts the greeting (nsvpn's start-up probe passes) and then never
# answers a CONNECT request: every flow through it stays half-open in nsvpn's stack.
TARPIT_PY = r'''
import asyncio, resource
resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
async def client(r, w):
    try:
        await r.readexactly(3)
        w.write(b"\x05\x00")
        await r.read(1 << 16)
        await asyncio.sleep(3600)
    except Exception:
        pass
async def main():
    srv = await asyncio.start_server(client, "172.31.1.1", 1182, backlog=4096)
    await asyncio.sleep(300)
asyncio.run(main())
'''


def user_processes(uid: int) -> List[int]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.stat(f"/proc/{pid}").st_uid == uid:
                    out.append(int(pid))
            except OSError:
                pass
    return out


def secret_places(uid: int, secret: bytes) -> List[str]:
    found = []
    for pid in user_processes(uid):
        for what in ("cmdline", "environ"):
            try:
                with open(f"/proc/{pid}/{what}", "rb") as f:
                    if secret in f.read():
                        with open(f"/proc/{pid}/cmdline", "rb") as g:
                            argv = g.read().split(b"\0")
                        found.append(f"{pid}/{what}: " + b" ".join(argv[:4]).decode())
            except OSError:
                pass
    return found


def run_probe(lab: labenv.Lab, tmp: str, opts: List[str], secret: str,
              timeout: float = 90, env: Dict | None = None) -> Dict:
    script = os.path.join(tmp, "probe.py")
    with open(script, "w") as f:
        f.write(PROBE_PY)
    result = os.path.join(tmp, "probe.json")
    # a listener on the host's (worker netns) loopback that CMD must not reach
    lo = lab.popen(["python3", "-c", "import socket,time\ns=socket.socket()\n"
                    "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                    "s.bind(('127.0.0.1', 47811)); s.listen(); time.sleep(300)"], user="root")
    p = lab.popen(["nsvpn", "exec", *opts, "--", "python3", script, secret[::-1], "47811",
                   result], timeout=timeout, env=env)
    with p, lo:
        lab.wait_for(lambda: os.path.exists(result) or p.poll() is not None, timeout=timeout,
                     what="probe result")
        assert os.path.exists(result), p.output()
        with open(result) as f:
            out = json.load(f)
        out["outside_hits"] = secret_places(1001, secret.encode())
        open(result + ".done", "w").close()
        out["status"] = p.wait(30)
        out["log"] = p.output()
    return out


def check_confinement(out: Dict) -> None:
    assert out["status"] == 0, out
    assert int(out["caps"], 16) == 0, out
    for k in ("ip_addr_add", "ip_route_add", "ip_route_del_default", "ip_link_down"):
        rc, err = out[k]
        assert rc != 0 and "Operation not permitted" in err, (k, out[k])
    assert out["umount"] == "EPERM", out
    for k in ("raw_tcp", "raw_icmp", "packet", "transparent"):
        assert out[k] == "EPERM", (k, out[k])
    assert out["ping"] == "ok", out  # allowed on purpose (ping_group_range)
    assert out["normal"] == "connected", out
    # host loopback is not reachable by default, the namespace's own lo has no listener
    assert out["host_loopback"] in ("ECONNREFUSED", "timeout", "ENETUNREACH",
                                    "EHOSTUNREACH"), out
    assert out["own_loopback"] == "ECONNREFUSED", out
    # a foreign source address (IP_FREEBIND, no capability) gets no flow through nsvpn
    assert out["spoofed_src"] != "connected", out
    assert out["spoofed_in_subnet"] != "connected", out


def test_socks5_password_and_confinement(nsvpn_lab: labenv.Lab, user_tmp: str):
    secret = "pw" + uuid.uuid4().hex
    port = 1181
    ms = nsvpn_lab.popen(["microsocks", "-i", "172.31.1.1", "-p", str(port), "-u", "nsu",
                          "-P", secret], netns="edge", user="nobody", cwd="/")
    with ms:
        nsvpn_lab.wait_for(lambda: nsvpn_lab.port_open("172.31.1.1", port), timeout=10,
                           what="private microsocks")
        # $NSVPN_VIA keeps the password out of argv (--via on the command line is visible
        # in nsvpn's own /proc/PID/cmdline to every local user: the user's choice)
        out = run_probe(nsvpn_lab, user_tmp, [], secret,
                        env={"NSVPN_VIA": f"socks5://nsu:{secret}@172.31.1.1:{port}"})
    print("probe:", json.dumps({k: v for k, v in out.items() if k != "log"}))
    check_confinement(out)
    # CMD finds it nowhere: not in its environment (nsvpn drops a $NSVPN_VIA with a password
    # before CMD starts), not in any argv, not in nsvpn's environ (EACCES from inside)
    assert out["secret_hits"] == [] and not out["secret_in_env"], out
    # from outside, only nsvpn's own initial environment block (0400, the user's own) has it
    assert len(out["outside_hits"]) <= 1, out["outside_hits"]
    assert all(h.split(":")[0].endswith("/environ") and "nsvpn exec" in h
               for h in out["outside_hits"]), out["outside_hits"]
    assert secret not in out["log"], out["log"]


def test_openconnect_passwd_file_not_exposed(nsvpn_lab: labenv.Lab, user_tmp: str):
    oc = nsvpn_lab.ocserv
    with open(os.path.join(nsvpn_lab.info["state_dir"], "ocserv", "pin-sha256")) as f:
        pin = f.read().strip()
    secret = oc["password"]
    out = run_probe(nsvpn_lab, user_tmp, [
        "--via", f"openconnect://{oc['user']}@{oc['host']}:{oc['port']}",
        "--passwd-file", oc["password_file"], f"--oc-opt=--servercert={pin}"], secret,
        timeout=120)
    print("probe:", json.dumps({k: v for k, v in out.items() if k != "log"}))
    assert out["status"] == 0, out
    assert int(out["caps"], 16) == 0, out
    assert out["secret_hits"] == [] and not out["secret_in_env"], out
    assert out["outside_hits"] == [], out
    assert out["raw_tcp"] == "EPERM" and out["packet"] == "EPERM", out
    assert out["umount"] == "EPERM", out


def test_parent_tun_fd_not_visible_to_cmd(nsvpn_lab: labenv.Lab, user_tmp: str):
    out = run_probe(nsvpn_lab, user_tmp, ["--via", "socks5://172.31.1.1:1080"], "unused-x")
    assert "nsvpn" in out["parent_cmdline"], out  # the probe looked at the right process
    fds = out["parent_fds"]
    assert fds == "EACCES" or fds == "EPERM" or not any("tun" in f for f in fds), fds


def _counters(log: str, pid: int, lab: labenv.Lab) -> dict:
    def dumps():
        if not os.path.exists(log):
            return []
        with open(log) as f:
            return re.findall(r"counters (\{.*\})$", f.read(), re.M)
    n = len(dumps())
    os.kill(pid, signal.SIGUSR1)
    lab.wait_for(lambda: len(dumps()) > n, timeout=10, what="counters dump")
    return json.loads(dumps()[-1])


def test_syn_flood_half_open_bounded_and_responsive(nsvpn_lab: labenv.Lab, user_tmp: str):
    """3000 parallel connects from CMD to a destination whose upstream never answers (a
    private "SOCKS server" in the edge netns that never accepts: nsvpn's dials hang, so every
    SYN stays half-open in the stack). The half-open table must stay at its bound and a
    direct flow must still be served at once."""
    flood = os.path.join(user_tmp, "flood.py")
    with open(flood, "w") as f:
        f.write(FLOOD_PY)
    ready = os.path.join(user_tmp, "ready")
    log = os.path.join(user_tmp, "nsvpn.log")
    tarpit = nsvpn_lab.popen(["python3", "-c", TARPIT_PY], netns="edge", user="root")
    # CMD ignores SIGUSR1 (nsvpn forwards it after each counters dump)
    script = (f"trap '' USR1; python3 {flood} 3000 172.31.2.2 80 {ready} & "
              f"while [ ! -e {ready} ]; do sleep 0.1; done; sleep 3; "
              "python3 -c \"import socket,time; t=time.monotonic(); "
              "s=socket.create_connection(('172.31.1.1',8080),timeout=10); "
              "s.sendall(b'GET /SHA256SUMS HTTP/1.0\\r\\n\\r\\n'); d=s.recv(100); "
              "print('ok', d[:12], round(time.monotonic()-t,2))\"; "
              f"touch {ready}.done; wait")
    with tarpit:
        time.sleep(0.5)
        p = nsvpn_lab.popen(["nsvpn", "exec", "--log-file", log, "--via",
                             "socks5://172.31.1.1:1182", "--", "sh", "-c", script],
                            timeout=120)
        with p:
            nsvpn_lab.wait_for(lambda: os.path.exists(ready) or p.poll() is not None,
                               timeout=60, what="flood started")
            assert p.poll() is None, p.output() + (open(log).read() if os.path.exists(log)
                                                   else "")
            time.sleep(2.0)
            c = _counters(log, p.pid, nsvpn_lab)
            status = p.wait(60)
            out = p.output()
    print("flood counters:", json.dumps(c["stack"]), out)
    assert status == 0, out
    assert "ok b'HTTP/1.1 200'" in out, out
    st = c["stack"]
    assert 0 < st["tcp_half_open"] <= 1024, st  # the default max_half_open
    assert st["tcp_flows"] <= 1024 + 16, st
