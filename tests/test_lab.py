"""The secluded-node lab itself: the worker is cut off, and every path out works as documented.

These tests use no nsvpn code: they prove the lab is a fair place to test nsvpn in.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import stat
import time

import pytest

pytestmark = pytest.mark.lab

# SOCKS5 CONNECT by name over a unix socket (curl cannot do SOCKS over AF_UNIX):
# argv = socket path, host, port, url path; prints the sha256 of the HTTP body.
SOCKS_UNIX_GET = r"""
import hashlib, socket, struct, sys
path, host, port, url = sys.argv[1], sys.argv[2].encode(), int(sys.argv[3]), sys.argv[4]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(20)
s.connect(path)
s.sendall(b"\x05\x01\x00")
assert s.recv(2) == b"\x05\x00", "no-auth method refused"
s.sendall(b"\x05\x01\x00\x03" + bytes([len(host)]) + host + struct.pack("!H", port))
rep = s.recv(4)
assert rep[:2] == b"\x05\x00", "CONNECT failed: %r" % rep
s.recv({1: 4, 4: 16}[rep[3]] + 2)  # bound address
s.sendall(b"GET " + url.encode() + b" HTTP/1.0\r\nHost: " + host + b"\r\n\r\n")
data = b""
while True:
    chunk = s.recv(1 << 16)
    if not chunk:
        break
    data += chunk
head, _, body = data.partition(b"\r\n\r\n")
assert head.startswith(b"HTTP/1.1 200"), head[:80]
print(hashlib.sha256(body).hexdigest())
"""

# openconnect --script-tun script: ping a remote address through VPNFD (proves the edge
# forwards and NATs VPN traffic), then record the result and the environment.
OC_SCRIPT = r"""
import json, os, select, socket, struct, sys, time
out, target = sys.argv[1], sys.argv[2]

def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF)
    return ~(s + (s >> 16)) & 0xFFFF

fd = int(os.environ["VPNFD"])
me = socket.inet_aton(os.environ["INTERNAL_IP4_ADDRESS"])
dst = socket.inet_aton(target)
icmp = struct.pack("!BBHHH", 8, 0, 0, os.getpid() & 0xFFFF, 1) + b"nsvpn-lab-ping"
icmp = icmp[:2] + struct.pack("!H", csum(icmp)) + icmp[4:]
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 1, 0, 64, 1, 0, me, dst)
ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
result, rtt, end = "no reply", None, time.monotonic() + 10
while result != "reply" and time.monotonic() < end:
    sent = time.monotonic()
    os.write(fd, ip + icmp)
    while time.monotonic() < sent + 1:
        if not select.select([fd], [], [], 0.2)[0]:
            continue
        pkt = os.read(fd, 65536)
        if len(pkt) >= 28 and pkt[9] == 1 and pkt[12:16] == dst and pkt[20] == 0:
            result, rtt = "reply", time.monotonic() - sent
            break
env = {k: v for k, v in os.environ.items() if k.startswith(("INTERNAL_", "CISCO_", "VPN"))}
with open(out + ".tmp", "w") as f:
    json.dump({"ping": result, "rtt": rtt, "env": env}, f)
os.rename(out + ".tmp", out)
time.sleep(120)  # openconnect hangs up on us when the test stops it
"""


def test_info_is_complete(lab):
    info = lab.info
    assert info["netns"] == {"worker": "nsvpn-worker", "edge": "nsvpn-edge",
                             "remote": "nsvpn-remote"}
    assert info["missing_binaries"] == []
    assert lab.servercert.startswith("pin-sha256:") and len(lab.servercert) > 50
    for name, f in lab.files.items():
        assert len(f["sha256"]) == 64, name
        assert os.path.getsize(f["path"]) == f["size"]
    with open(os.path.join(info["data_dir"], "SHA256SUMS")) as f:
        assert f.read().split()[:2] == [lab.sha256["1M.bin"], "1M.bin"]


def test_status_reports_everything_up(lab):
    r = lab.run(["scripts/lab", "status"], netns=None, user=None, cwd=_repo())
    assert r.returncode == 0, r.stdout + r.stderr
    assert "DOWN" not in r.stdout


def test_up_twice_is_harmless(lab):
    before = _daemon_pids(lab)
    r = lab.run(["scripts/lab", "up"], netns=None, user=None, cwd=_repo(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert _daemon_pids(lab) == before  # healthy daemons are left alone


def test_lab_shell_runs_as_the_test_user_in_the_worker(lab):
    r = lab.run(["scripts/lab", "shell", "worker", "--user", "--", "sh", "-c",
                 "id -un; ip -4 -o addr show veth-edge; echo $HOME"],
                netns=None, user=None, cwd=_repo(), check=True)
    name, addr, home = r.stdout.splitlines()
    assert name == lab.user and f"{lab.worker_ip}/24" in addr
    assert home == lab.info["users"]["primary"]["home"]


def test_worker_has_no_route_out(lab):
    r = lab.run(["ip", "-4", "route", "show"], check=True)
    assert "default" not in r.stdout
    assert r.stdout.split()[0] == "172.31.1.0/24" and len(r.stdout.splitlines()) == 1
    code = ("import socket\n"
            "try:\n"
            "    socket.create_connection(('172.31.2.2', 80), timeout=5)\n"
            "except OSError as e:\n"
            "    print(e.errno)\n")
    t0 = time.monotonic()
    r = lab.run(["python3", "-c", code], timeout=20)
    assert r.stdout.strip() == "101", r  # ENETUNREACH, at once, not a timeout
    assert time.monotonic() - t0 < 3
    r = lab.run(["curl", "-sS", "--max-time", "10", "http://172.31.2.2/1M.bin", "-o",
                 "/dev/null"], timeout=20)
    assert r.returncode == 7, r  # couldn't connect


def test_worker_cannot_resolve_remote_names(lab):
    t0 = time.monotonic()
    r = lab.run(["getent", "hosts", "remote.lab"], timeout=30)
    assert r.returncode == 2 and r.stdout == ""
    assert time.monotonic() - t0 < 15
    r = lab.run(["getent", "hosts", "edge.lab"], check=True)
    assert r.stdout.split()[0] == lab.edge_ip


def test_socks5_download_from_worker(lab):
    r = lab.run(["curl", "-sS", "--fail", "--socks5-hostname", "172.31.1.1:1080",
                 "http://remote.lab/1M.bin"], text=False, timeout=60)
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256(r.stdout).hexdigest() == lab.sha256["1M.bin"]


def test_socks5_100m_download_from_worker(lab):
    r = lab.run("curl -sS --fail --socks5-hostname 172.31.1.1:1080 "
                "http://remote.lab/100M.bin | sha256sum", timeout=120, check=True)
    assert r.stdout.split()[0] == lab.sha256["100M.bin"]


def test_socks5_cannot_reach_closed_port(lab):
    r = lab.run(["curl", "-sS", "--max-time", "10", "--socks5-hostname", "172.31.1.1:1080",
                 f"http://remote.lab:{lab.info['closed']['port']}/"], timeout=30)
    assert r.returncode in (7, 97), r  # refused by the far side


def test_site_local_http_from_worker(lab):
    r = lab.run(["curl", "-sS", "--fail", lab.info["http"]["edge"]["url"] + "1M.bin"],
                text=False, timeout=60)
    assert hashlib.sha256(r.stdout).hexdigest() == lab.sha256["1M.bin"]


def test_wan_relay_adds_delay(lab):
    rtt = lab.info["wan"]["rtt_ms"] / 1000
    fmt = "%{time_connect} %{time_starttransfer}"
    r = lab.run(["curl", "-sS", "--fail", "-o", "/dev/null", "-w", fmt, "http://wan.lab:8080/1M.bin"],
                check=True)
    _connect, first_byte = map(float, r.stdout.split())
    assert first_byte >= rtt * 0.9  # request and response each waited rtt/2
    r = lab.run(["curl", "-sS", "--fail", "-o", "/dev/null", "-w", fmt,
                 lab.info["http"]["edge"]["url"] + "1M.bin"], check=True)
    assert float(r.stdout.split()[1]) < rtt / 2
    r = lab.run("curl -sS --fail --socks5-hostname wan.lab:1080 http://remote.lab/100M.bin "
                "| sha256sum", timeout=120, check=True)
    assert r.stdout.split()[0] == lab.sha256["100M.bin"]
    r = lab.run(["ssh", "-o", "BatchMode=yes", "wan.lab", "true"], timeout=30)
    assert r.returncode == 0, r.stderr


def test_ssh_key_login(lab):
    r = lab.run(["ssh", "-o", "BatchMode=yes", f"{lab.user}@edge.lab", "id -un; hostname -I"],
                timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == lab.user
    assert lab.edge_ip in r.stdout  # the command ran on the edge
    r = lab.run(["ssh", "-o", "BatchMode=yes", "login.lab", "true"], timeout=30)
    assert r.returncode == 0, r.stderr


def test_ssh_wrong_key_is_refused(lab):
    r = lab.run(["ssh", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                 "-i", lab.ssh["wrong_key"], "edge.lab", "true"], timeout=30)
    assert r.returncode == 255
    assert "Permission denied" in r.stderr


def test_ssh_dynamic_forward_tcp_port(lab):
    port = random.randint(20000, 40000)
    with lab.popen(["ssh", "-N", "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes",
                    "-D", f"127.0.0.1:{port}", "edge.lab"], timeout=120) as ssh:
        lab.wait_for(lambda: ssh.poll() is not None or lab.port_open("127.0.0.1", port),
                     timeout=20, what="ssh -D")
        assert ssh.poll() is None, ssh.output()
        r = lab.run(["curl", "-sS", "--fail", "--socks5-hostname", f"127.0.0.1:{port}",
                     "http://remote.lab/1M.bin"], text=False, timeout=60)
        assert hashlib.sha256(r.stdout).hexdigest() == lab.sha256["1M.bin"], r.stderr


def test_ssh_dynamic_forward_unix_socket(lab, user_tmp):
    sock = os.path.join(user_tmp, "socks.sock")
    with lab.popen(["ssh", "-N", "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes",
                    "-D", sock, "edge.lab"], timeout=120) as ssh:
        lab.wait_for(lambda: ssh.poll() is not None or os.path.exists(sock), timeout=20,
                     what="ssh -D unix socket")
        assert ssh.poll() is None, ssh.output()
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        r = lab.run(["python3", "-c", SOCKS_UNIX_GET, sock, "www.lab", "80", "/1M.bin"],
                    timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == lab.sha256["1M.bin"]


def test_remote_dns_from_edge(lab):
    for name in ("remote.lab", "xrootd.lab", "www.lab"):
        r = lab.run(["dig", "+short", "+time=2", "+tries=1", name, "@172.31.2.2"],
                    netns="edge", check=True)
        assert r.stdout.split() == [lab.remote_ip], name
    r = lab.run(["dig", "+tcp", "+short", "+time=2", "+tries=1", "xrootd.lab",
                 "@172.31.2.2"], netns="edge", check=True)
    assert r.stdout.split() == [lab.remote_ip]
    r = lab.run(["dig", "+short", "+time=2", "+tries=1", "-x", lab.remote_ip,
                 "@172.31.2.2"], netns="edge", check=True)
    assert r.stdout.split() == ["remote.lab."]
    r = lab.run(["dig", "+time=2", "+tries=1", "nosuchname.lab", "@172.31.2.2"],
                netns="edge", check=True)
    assert "status: NXDOMAIN" in r.stdout
    r = lab.run(["getent", "hosts", "xrootd.lab"], netns="edge", check=True)
    assert r.stdout.split()[0] == lab.remote_ip  # the edge's resolv.conf points there


def test_closed_port_is_refused_at_once(lab):
    code = ("import socket\n"
            "try:\n"
            f"    socket.create_connection(({lab.remote_ip!r}, {lab.info['closed']['port']}),"
            " timeout=5)\n"
            "except OSError as e:\n"
            "    print(e.errno)\n")
    t0 = time.monotonic()
    r = lab.run(["python3", "-c", code], netns="edge", timeout=20)
    assert r.stdout.strip() == "111", r  # ECONNREFUSED
    assert time.monotonic() - t0 < 3


def test_xrdcp_from_edge(lab, user_tmp):
    dst = os.path.join(user_tmp, "1M.bin")
    r = lab.run(["xrdcp", "--nopbar", "-f", lab.info["xrootd"]["url"] + "1M.bin", dst],
                netns="edge", timeout=60)
    assert r.returncode == 0, r.stderr
    with open(dst, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == lab.sha256["1M.bin"]


def _openconnect(lab, user_tmp, oc_user, host="edge.lab"):
    script = os.path.join(user_tmp, "oc-script.py")
    with open(script, "w") as f:
        f.write(OC_SCRIPT)
    os.chmod(script, 0o755)
    result = os.path.join(user_tmp, "oc-result.json")
    argv = ["openconnect", "--non-inter", "--passwd-on-stdin", "--user", oc_user,
            f"--servercert={lab.servercert}", "--script-tun",
            "--script", f"python3 {script} {result} {lab.remote_ip}",
            f"https://{host}"]
    return argv, result


@pytest.mark.parametrize("oc_user,host", [("labuser", "edge.lab"), ("labsplit", "edge.lab"),
                                          ("labuser", "wan.lab")])
def test_openconnect_login_and_ping_through_vpn(lab, user_tmp, oc_user, host):
    argv, result = _openconnect(lab, user_tmp, oc_user, host)
    with open(lab.ocserv["password_file"]) as pw:
        oc = lab.popen(argv, stdin=pw, timeout=120)
    with oc:
        lab.wait_for(lambda: oc.poll() is not None or os.path.exists(result), timeout=40,
                     what="openconnect to run its script")
        assert os.path.exists(result), oc.output()
        with open(result) as f:
            got = json.load(f)
        env = got["env"]
        assert env["INTERNAL_IP4_ADDRESS"].startswith("10.77.0.")
        assert env["INTERNAL_IP4_DNS"].split() == lab.ocserv["dns"]
        assert "VPNFD" in env
        if oc_user == lab.ocserv["split_user"]:
            assert env.get("CISCO_SPLIT_INC") == "1"
            assert env["CISCO_SPLIT_INC_0_ADDR"] == "172.31.2.0"
            assert env["CISCO_SPLIT_INC_0_MASKLEN"] == "24"
        else:
            assert "CISCO_SPLIT_INC" not in env  # full tunnel
        assert got["ping"] == "reply", oc.output()
        assert oc.poll() is None
        # the UDP (DTLS) path works too; it may finish its handshake after the script ran
        lab.wait_for(lambda: "Established DTLS connection" in oc.output(), timeout=15,
                     what="DTLS")
        if host == "wan.lab":  # the delay relay is in the path (DTLS over UDP, or TLS)
            assert got["rtt"] >= lab.info["wan"]["rtt_ms"] / 1000 * 0.9
        else:
            assert got["rtt"] < 0.05
    assert "Configured as" in oc.output()


def test_openconnect_wrong_password_fails(lab, user_tmp):
    argv, result = _openconnect(lab, user_tmp, "labuser")
    t0 = time.monotonic()
    r = lab.run(argv, input="not-the-password\n", timeout=60)
    assert r.returncode != 0
    assert "failed" in (r.stdout + r.stderr).lower()
    assert not os.path.exists(result)
    assert time.monotonic() - t0 < 30


def test_openconnect_wrong_servercert_fails(lab, user_tmp):
    argv, result = _openconnect(lab, user_tmp, "labuser")
    argv = [a if not a.startswith("--servercert=") else
            "--servercert=pin-sha256:" + "A" * 43 + "=" for a in argv]
    r = lab.run(argv, input="labpass\n", timeout=60)
    assert r.returncode != 0
    assert not os.path.exists(result)


def _repo():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _daemon_pids(lab):
    run = os.path.join(lab.info["state_dir"], "run")
    pids = {}
    for f in sorted(os.listdir(run)):
        if f.startswith("lab-") and f.endswith(".pid"):
            with open(os.path.join(run, f)) as fh:
                pids[f] = fh.read().strip()
    return pids
