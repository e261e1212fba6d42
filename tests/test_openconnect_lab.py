"""openconnect upstream + namespace packet bridge, against the lab's real ocserv.

Everything nsvpn-side runs as the unprivileged test user in the `worker` netns through
`python -m nsvpn.bridge` (the stand-alone entry until `nsvpn exec --via openconnect://` is
wired). The first tests need no lab: argv/credential handling and the VPNFD probe fact.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import signal
import socket
import subprocess
import time
from typing import List

import labenv
import pytest

from nsvpn.upstream.openconnect import (
    OpenconnectUpstream,
    VpnSession,
    add_openconnect_args,
    failure_reason,
    login_refused,
    upstream_from_args,
)
from nsvpn.urls import parse_upstream_url
from nsvpn.vpnenv import parse_vpn_env

# Checked for staleness in the venv: this feature's modules (other modules change under
# other people's hands all the time; their own tests watch them).
MY_FILES = ["bridge.py", "oc_attach.py", "vpnenv.py", "upstream/openconnect.py"]


# ------------------------------------------------------------------------- no lab needed


def _upstream(**kw) -> OpenconnectUpstream:
    return OpenconnectUpstream(parse_upstream_url("openconnect://alice@vpn.example:8443"),
                               interactive=False, **kw)


def test_argv_has_no_password_and_keeps_options_verbatim():
    oc = _upstream(password=b"s3cret", oc_opts=["--servercert=pin-sha256:abc", "--authgroup=G"])
    oc.socket_path = "/tmp/nsvpn-x/oc 1.sock"
    argv = oc.argv()
    assert "s3cret" not in " ".join(argv)
    assert argv[:3] == ["openconnect", "--script-tun", "--script"]
    assert argv[3].startswith("exec ") and "nsvpn.oc_attach" in argv[3]
    assert "'/tmp/nsvpn-x/oc 1.sock'" in argv[3]  # quoted for openconnect's /bin/sh -c
    assert "--passwd-on-stdin" in argv and "--non-inter" in argv
    assert argv[argv.index("--user") + 1] == "alice"
    assert "--no-dtls" not in argv
    assert argv[-3:] == ["--servercert=pin-sha256:abc", "--authgroup=G", "vpn.example:8443"]
    oc = OpenconnectUpstream(parse_upstream_url("openconnect://[fd00::1]"), interactive=True)
    argv = oc.argv()
    assert argv[-1] == "[fd00::1]" and "--passwd-on-stdin" not in argv
    assert "--non-inter" not in argv  # a terminal is attached


def test_cli_options():
    p = argparse.ArgumentParser()
    add_openconnect_args(p)
    ns = p.parse_args(["--oc-opt=--servercert=pin-sha256:x", "--oc-opt=--authgroup=A",
                       "--passwd-fd", "5"])
    oc = upstream_from_args(parse_upstream_url("openconnect://u@h"), ns)
    assert oc.oc_opts == ["--servercert=pin-sha256:x", "--authgroup=A"]
    assert oc.passwd_fd == 5 and oc.passwd_file is None
    with pytest.raises(SystemExit):
        p.parse_args(["--passwd-fd", "5", "--passwd-file", "f"])


def test_failure_reason_keeps_openconnect_errors():
    lines = ["POST https://172.31.1.1/", "Connected to 172.31.1.1:443",
             "Server certificate verify failed: signer not found", "XML POST enabled",
             "Please enter your username.", "Please enter your password.", "Login failed.",
             "Password:", "***", "User input required in non-interactive mode",
             "Failed to complete authentication"]
    r = failure_reason(lines, pinned=True)
    assert r == ("Login failed. / User input required in non-interactive mode / "
                 "Failed to complete authentication")
    assert "signer not found" in failure_reason(lines, pinned=False, keep=10)
    assert failure_reason([]) == "(openconnect printed nothing)"


def test_login_refused_is_told_apart_from_network_trouble():
    assert login_refused(["POST https://x/", "Login failed.", "Failed to complete authentication"])
    assert login_refused(["Account locked"])
    assert not login_refused(["Failed to connect to 172.31.1.1:443: Connection refused",
                              "Failed to complete authentication"])
    assert not login_refused(["Received server disconnect", "Session terminated by server"])


async def test_probe_fact_on_a_real_socketpair():
    """The liveness probe: a 0-byte datagram succeeds while the peer lives, and fails with
    ECONNREFUSED once it is closed (what happens when openconnect exits); after that first
    refusal the kernel disconnects the socket and further sends fail with ENOTCONN."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setblocking(False)
    sess = VpnSession(a, parse_vpn_env({"INTERNAL_IP4_ADDRESS": "10.0.0.2"}), {}, 1, 0)
    assert sess.probe()
    assert b.recv(10) == b""  # delivered as an empty datagram, which openconnect ignores
    b.close()
    with pytest.raises(ConnectionRefusedError):
        a.send(b"")
    assert not sess.probe()  # ENOTCONN now
    sess.close()
    c, d = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    sess = VpnSession(c, sess.env, {}, 2, 0)
    d.close()
    assert not sess.probe()  # ECONNREFUSED
    sess.close()


async def test_password_sources(tmp_path):
    f = tmp_path / "pw"
    f.write_bytes(b"from-file\nsecond line\n")
    assert await _upstream(passwd_file=str(f))._obtain_password() == b"from-file"
    r, w = os.pipe()
    os.write(w, b"from-fd\n")
    os.close(w)
    assert await _upstream(passwd_fd=r)._obtain_password() == b"from-fd"
    with pytest.raises(OSError):
        os.fstat(r)  # consumed and closed
    (tmp_path / "empty").write_bytes(b"\n")
    from nsvpn.upstream.base import UpstreamError
    with pytest.raises(UpstreamError, match="no password"):
        await _upstream(passwd_file=str(tmp_path / "empty"))._obtain_password()
    with pytest.raises(UpstreamError, match="cannot read"):
        await _upstream(passwd_file=str(tmp_path / "missing"))._obtain_password()
    assert await _upstream()._obtain_password() is None  # no terminal: no prompt


async def test_start_reports_a_missing_or_failing_openconnect(tmp_path):
    from nsvpn.upstream.base import UpstreamError

    oc = _upstream(openconnect=str(tmp_path / "no-such-openconnect"), sockdir=str(tmp_path))
    with pytest.raises(UpstreamError, match="cannot run .*no-such-openconnect"):
        await oc.start()
    fake = tmp_path / "fake-openconnect"
    fake.write_text("#!/bin/sh\necho 'Some progress'\necho 'Login failed.' >&2\nexit 1\n")
    fake.chmod(0o755)
    oc = _upstream(openconnect=str(fake), sockdir=str(tmp_path), password=b"pw")
    with pytest.raises(UpstreamError, match=r"exited \(status 1\): Some progress / Login failed"):
        await oc.start()
    assert not any(p.name.endswith(".sock") for p in tmp_path.iterdir())  # cleaned up


async def test_ready_timeout_is_bounded(tmp_path):
    from nsvpn.upstream.base import UpstreamError

    fake = tmp_path / "hanging-openconnect"
    fake.write_text("#!/bin/sh\necho 'POST https://x/'\nexec sleep 60\n")
    fake.chmod(0o755)
    oc = _upstream(openconnect=str(fake), sockdir=str(tmp_path), ready_timeout=1.0)
    t0 = time.monotonic()
    with pytest.raises(UpstreamError, match="within 1 s"):
        await oc.start()
    assert time.monotonic() - t0 < 6
    assert oc._proc is not None and oc._proc.popen.returncode is not None  # stopped


# ------------------------------------------------------------------------- the lab


@pytest.fixture(scope="module")
def oc_lab(lab: labenv.Lab) -> labenv.Lab:
    """The lab, with this feature's modules installed in the venv the test user runs."""
    problem = lab.nsvpn_problem() if os.environ.get("NSVPN_ALLOW_STALE") == "1" else None
    r = lab.run([os.path.join(lab.venv, "bin", "python"), "-c",
                 "import os, nsvpn; print(os.path.dirname(nsvpn.__file__))"], timeout=60)
    if r.returncode != 0:
        pytest.fail(f"the test user cannot import nsvpn: {r.stderr}", pytrace=False)
    installed = r.stdout.strip()
    src = os.path.join(labenv.REPO, "nsvpn")
    stale = [f for f in labenv.stale_files(src, installed) if f in MY_FILES]
    if stale or problem:
        pytest.fail(f"reinstall nsvpn into {lab.venv} (stale: {stale or problem})",
                    pytrace=False)
    return lab


def _pin(lab: labenv.Lab) -> str:
    # read at use: the lab regenerates its certificate when it is rebuilt
    with open(os.path.join(lab.info["state_dir"], "ocserv", "pin-sha256")) as f:
        return f.read().strip()


def _bridge_argv(lab: labenv.Lab, script: str, *, user: str | None = None,
                 passwd: List[str] | None = None, extra: List[str] | None = None) -> List[str]:
    oc = lab.ocserv
    py = os.path.join(lab.venv, "bin", "python")
    url = f"openconnect://{user or oc['user']}@{oc['host']}:{oc['port']}"
    pw = passwd if passwd is not None else ["--passwd-file", oc["password_file"]]
    return [py, "-m", "nsvpn.bridge", *pw, f"--oc-opt=--servercert={_pin(lab)}",
            *(extra or []), url, "--", "/bin/sh", "-c", script]


def _leftovers(lab: labenv.Lab, pid: int) -> str:
    """openconnect or helper processes of the nsvpn run with this pid (their argv names
    the private socket oc-<pid>-...)."""
    r = subprocess.run(["pgrep", "-a", "-f", f"nsvpn.*/oc-{pid}-"], capture_output=True,
                       text=True)
    return r.stdout.strip()


def _run_bridge(lab: labenv.Lab, script: str, *, timeout: float = 180, **kw):
    """Run the bridge to completion as the test user; (returncode, output, pid)."""
    p = lab.popen(_bridge_argv(lab, script, **kw), timeout=timeout)
    try:
        p.wait(timeout + 5)
    except subprocess.TimeoutExpired:
        p.stop()
    out = p.output()
    time.sleep(0.3)  # openconnect exits with nsvpn; the helper right after its SIGHUP
    left = _leftovers(lab, p.pid)
    assert not left, f"left running after nsvpn exited:\n{left}\n{out}"
    return p.returncode, out, p.pid


def _marker(out: str, name: str) -> str:
    m = re.search(rf"^{name}=(.*)$", out, re.M)
    assert m, f"no {name}= in output:\n{out}"
    return m.group(1).strip()


DNS_QUERY = (
    "import dns.message, dns.query; "
    "q = dns.message.make_query('remote.lab', 'A'); "
    "r = dns.query.udp(q, '172.31.2.2', timeout=3); "
    "print('DNSUDP=' + ' '.join(rr.to_text() for a in r.answer for rr in a))"
)


EDGE_CONNECT = (
    "import errno, socket; s = socket.socket(); s.settimeout(3); "
    "r = s.connect_ex(('{}', 8080)); print('EDGE=' + errno.errorcode.get(r, str(r)))"
)


@pytest.mark.lab
def test_bridge_full_tunnel(oc_lab, user_tmp):
    lab = oc_lab
    remote = lab.remote_ip
    script = f"""
echo ROUTES=$(ip -4 route | tr '\\n' ';')
echo MTU=$(ip -o link show tun0 | sed 's/.* mtu \\([0-9]*\\) .*/\\1/')
echo RESOLV=$(grep -v '^#' /etc/resolv.conf | tr '\\n' ';')
echo LEAK=$(env | grep -c {lab.ocserv['password']})
ping -c1 -W3 {remote} >/dev/null && echo PING=ok || echo PING=fail
echo GETENT=$(getent hosts remote.lab)
python -c "{DNS_QUERY}"
echo SPEED=$(curl -sS -o /dev/null -w '%{{speed_download}}' http://{remote}/100M.bin)
echo SHA100=$(curl -sS http://{remote}/100M.bin | sha256sum | cut -d' ' -f1)
echo SHADNS=$(curl -sS http://remote.lab/1M.bin | sha256sum | cut -d' ' -f1)
xrdcp --nopbar -f {lab.info['xrootd']['url']}1M.bin {user_tmp}/x.bin 2>&1
echo SHAXRD=$(sha256sum {user_tmp}/x.bin | cut -d' ' -f1)
exit 7
"""
    rc, out, _ = _run_bridge(lab, script)
    assert rc == 7, out  # CMD's own status comes back
    routes = _marker(out, "ROUTES")
    assert routes.startswith("default dev tun0"), routes
    assert _marker(out, "MTU") == "1434"  # INTERNAL_IP4_MTU from ocserv
    assert _marker(out, "RESOLV") == "nameserver 172.31.2.2;search lab;"
    assert _marker(out, "LEAK") == "0"  # the password is not in CMD's environment
    assert _marker(out, "PING") == "ok"
    assert _marker(out, "GETENT").startswith(remote)
    assert _marker(out, "DNSUDP") == remote
    assert _marker(out, "SHA100") == lab.sha256["100M.bin"]
    assert _marker(out, "SHADNS") == lab.sha256["1M.bin"]
    assert _marker(out, "SHAXRD") == lab.sha256["1M.bin"]
    speed = float(_marker(out, "SPEED"))
    print(f"\nbridge throughput, 100 MiB over ocserv: {speed / 1e6:.1f} MB/s")
    assert speed > 2e6


@pytest.mark.lab
def test_split_include_user_gets_only_its_routes(oc_lab):
    lab = oc_lab
    script = f"""
echo ROUTES=$(ip -4 route | tr '\\n' ';')
echo SHA=$(curl -sS http://{lab.remote_ip}/1M.bin | sha256sum | cut -d' ' -f1)
python -c "{EDGE_CONNECT.format('172.31.3.1')}"
"""
    rc, out, _ = _run_bridge(lab, script, user=lab.ocserv["split_user"])
    assert rc == 0, out
    routes = _marker(out, "ROUTES")
    assert "default" not in routes, routes
    assert "172.31.2.0/24 dev tun0" in routes, routes
    assert _marker(out, "SHA") == lab.sha256["1M.bin"]
    # neither in the split list nor a host network (the edge's own subnet is one, served
    # by the relay since the excluded-networks change): no route in the namespace
    assert _marker(out, "EDGE") == "ENETUNREACH"


@pytest.mark.lab
def test_wrong_password_fails_fast_with_openconnect_reason(oc_lab, user_tmp):
    lab = oc_lab
    pwfile = os.path.join(user_tmp, "wrong")
    with open(pwfile, "w") as f:
        f.write("not-the-password\n")
    os.chown(pwfile, *_ids(lab))
    marker = os.path.join(user_tmp, "cmd-ran")
    t0 = time.monotonic()
    rc, out, _ = _run_bridge(lab, f"touch {marker}", passwd=["--passwd-file", pwfile],
                             timeout=60)
    elapsed = time.monotonic() - t0
    assert rc == 3, out
    assert "Login failed" in out, out
    assert "not-the-password" not in out
    assert elapsed < 15, f"took {elapsed:.1f} s"
    assert not os.path.exists(marker)  # CMD never ran


def _ids(lab: labenv.Lab):
    u = lab.info["users"]["primary"]
    return u["uid"], u["gid"]


@pytest.mark.lab
def test_passwd_fd_and_no_password_in_argv_or_environment(oc_lab):
    """--passwd-fd works, and while the tunnel is up the password is in no argv and no
    environment of nsvpn's processes (openconnect, the helper, CMD)."""
    lab = oc_lab
    secret = lab.ocserv["password"]
    py = os.path.join(lab.venv, "bin", "python")
    argv = _bridge_argv(lab, "echo UP; sleep 4", passwd=["--passwd-fd", "5"])
    shell = "exec 5< " + lab.ocserv["password_file"] + "; exec " + " ".join(
        "'" + a.replace("'", "'\\''") + "'" for a in argv)
    assert argv[0] == py
    p = lab.popen(["/bin/sh", "-c", shell], timeout=60)
    try:
        lab.wait_for(lambda: "UP" in p.output(), timeout=20, what="the tunnel")
        pids = subprocess.run(["pgrep", "-f", f"/oc-{p.pid}-"], capture_output=True,
                              text=True).stdout.split()
        assert len(pids) >= 2, pids  # openconnect and the helper
        for pid in pids + [str(p.pid)]:
            for what in ("cmdline", "environ"):
                with open(f"/proc/{pid}/{what}", "rb") as f:
                    assert secret.encode() not in f.read(), f"password in {what} of {pid}"
        assert p.wait(20) == 0, p.output()
    finally:
        p.stop()
    time.sleep(0.3)
    assert not _leftovers(lab, p.pid)


@pytest.mark.lab
def test_openconnect_killed_is_restarted_and_traffic_resumes(oc_lab, user_tmp):
    """openconnect SIGKILLed mid-transfer: nsvpn restarts it (same address from ocserv), a
    new transfer works, and the kernel TCP flow in flight survives the gap."""
    lab = oc_lab
    url = f"http://{lab.remote_ip}/1M.bin"
    big = f"http://{lab.remote_ip}/100M.bin"
    script = f"""
echo SHA1=$(curl -sS {url} | sha256sum | cut -d' ' -f1)
(curl -sS --limit-rate 15M {big} | sha256sum > {user_tmp}/bg.sha) &
sleep 1
echo KILLME
sleep 1
for i in $(seq 1 40); do
  out=$(curl -sS -m 2 {url} 2>/dev/null | sha256sum | cut -d' ' -f1)
  [ "$out" = "{lab.sha256['1M.bin']}" ] && break
  sleep 0.5
done
echo SHA2=$out
wait
echo SHABG=$(cut -d' ' -f1 {user_tmp}/bg.sha)
"""
    p = lab.popen(_bridge_argv(lab, script, extra=["-v"]), timeout=90)
    try:
        lab.wait_for(lambda: "KILLME" in p.output(), timeout=30, what="first transfer")
        r = subprocess.run(["pgrep", "-f", f"^[^ ]*openconnect --script-tun .*/oc-{p.pid}-"],
                           capture_output=True, text=True)
        oc_pids = r.stdout.split()
        assert len(oc_pids) == 1, (oc_pids, p.output())
        os.kill(int(oc_pids[0]), signal.SIGKILL)
        assert p.wait(60) == 0, p.output()
    finally:
        p.stop()
    out = p.output()
    assert _marker(out, "SHA1") == lab.sha256["1M.bin"]
    assert _marker(out, "SHA2") == lab.sha256["1M.bin"], out
    assert _marker(out, "SHABG") == lab.sha256["100M.bin"], out
    assert "restarting in" in out
    assert "generation 2" in out  # a second VPNFD was delivered and used
    time.sleep(0.3)
    assert not _leftovers(lab, p.pid)


@pytest.mark.lab
def test_sigterm_to_nsvpn_stops_everything(oc_lab):
    lab = oc_lab
    p = lab.popen(_bridge_argv(lab, "echo UP; sleep 60"), timeout=60)
    try:
        lab.wait_for(lambda: "UP" in p.output(), timeout=20, what="the tunnel")
        assert _leftovers(lab, p.pid)  # openconnect + helper while up
        os.kill(p.pid, signal.SIGTERM)
        rc = p.wait(15)
    finally:
        p.stop()
    assert rc == 128 + signal.SIGTERM, p.output()  # CMD got the SIGTERM and died of it
    time.sleep(0.3)
    assert not _leftovers(lab, p.pid)


@pytest.mark.lab
def test_new_address_after_reconnect_ends_the_session(oc_lab):
    """openconnect is killed; before nsvpn's restart logs in again (1 s backoff) another
    client of the same user takes the address: the namespace cannot follow a new one, so
    nsvpn ends CMD and exits with a clear message."""
    lab = oc_lab
    p = lab.popen(_bridge_argv(lab, "echo UP; sleep 30; echo CMD-END", extra=["-v"]),
                  timeout=60)
    try:
        lab.wait_for(lambda: "UP" in p.output(), timeout=20, what="the tunnel")
        addr = re.search(r"address (\d+\.\d+\.\d+\.\d+)/", p.output()).group(1)
        r = subprocess.run(["pgrep", "-f", f"^[^ ]*openconnect --script-tun .*/oc-{p.pid}-"],
                           capture_output=True, text=True)
        os.kill(int(r.stdout.split()[0]), signal.SIGKILL)
        oc = lab.ocserv
        intruder = lab.popen(
            f"exec openconnect --script-tun --script 'echo GOT=$INTERNAL_IP4_ADDRESS; "
            f"exec sleep 60' --user {oc['user']} --passwd-on-stdin --non-inter "
            f"--servercert={_pin(lab)} {oc['host']} < {oc['password_file']}", timeout=60)
        rc = p.wait(30)
        got = _marker(intruder.output(), "GOT")
    finally:
        p.stop()
    out = p.output()
    assert got == addr, "ocserv gave the intruder another address; the test premise failed"
    assert rc == 3, out
    assert f"instead of {addr}" in out and "cannot change its address" in out, out
    assert "CMD-END" not in out
    intruder.stop()
    time.sleep(0.3)
    assert not _leftovers(lab, p.pid)


@pytest.mark.lab
def test_interactive_password_prompt_on_a_terminal(oc_lab):
    """No --passwd-file/--passwd-fd and a terminal: nsvpn prompts (getpass on /dev/tty) and
    feeds the answer to openconnect's stdin; the typed password is not echoed."""
    import fcntl
    import select
    import termios

    lab = oc_lab
    master, slave = os.openpty()
    os.fchown(slave, *_ids(lab))

    def ctty() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    argv = lab.argv(_bridge_argv(lab, "echo RESULT=$((6*7))", passwd=[]))
    p = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, preexec_fn=ctty,
                         env=lab.env_for(lab.user), cwd=lab.info["users"]["primary"]["home"])
    os.close(slave)
    seen = b""
    sent = False
    deadline = time.monotonic() + 40
    try:
        while time.monotonic() < deadline and b"RESULT=" not in seen:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: every slave fd closed
                    break
                if not chunk:
                    break
                seen += chunk
            if not sent and b"VPN password for labuser@" in seen:
                time.sleep(0.2)  # getpass turns echo off right after printing the prompt
                os.write(master, lab.ocserv["password"].encode() + b"\n")
                sent = True
        rc = p.wait(20)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(master)
    text = seen.decode(errors="replace")
    assert sent, text
    assert rc == 0, text
    assert "RESULT=42" in text
    assert lab.ocserv["password"] not in text  # not echoed
    time.sleep(0.3)
    assert not _leftovers(lab, p.pid)


@pytest.mark.lab
def test_sigkill_of_nsvpn_leaves_nothing_behind(oc_lab):
    """nsvpn SIGKILLed: openconnect gets its PDEATHSIG (SIGTERM), SIGHUPs the helper, which
    also sees EOF on nsvpn's socket; CMD gets its own PDEATHSIG."""
    lab = oc_lab
    p = lab.popen(_bridge_argv(lab, "echo UP; exec sleep 60"), timeout=60)
    try:
        lab.wait_for(lambda: "UP" in p.output(), timeout=20, what="the tunnel")
        assert _leftovers(lab, p.pid)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        lab.wait_for(lambda: not _leftovers(lab, p.pid), timeout=5,
                     what="openconnect and the helper to exit")
    finally:
        p.stop()


PROBE_SCRIPT = r'''
import os, signal, socket, struct, sys, time, trio
from nsvpn.upstream.openconnect import OpenconnectUpstream
from nsvpn.urls import parse_upstream_url

def csum(b):
    b += bytes(len(b) % 2)
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    t = (t >> 16) + (t & 0xFFFF)
    return ~(t + (t >> 16)) & 0xFFFF

def echo_request(src, dst, seq):
    icmp = struct.pack("!BBHHH", 8, 0, 0, 4242, seq) + b"nsvpn-probe-test"
    icmp = icmp[:2] + struct.pack("!H", csum(icmp)) + icmp[4:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), seq, 0, 64, 1, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    return ip[:10] + struct.pack("!H", csum(ip)) + ip[12:] + icmp

def echo_reply_seen(sock, seq, timeout=3.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            d = sock.recv(65536)
        except BlockingIOError:
            time.sleep(0.01)
            continue
        if d[:1] == b"\x45" and d[9] == 1 and d[20] == 0 and d[26:28] == struct.pack("!H", seq):
            return True
    return False

async def main():
    url, pwfile, pin, remote = sys.argv[1:5]
    oc = OpenconnectUpstream(parse_upstream_url(url), passwd_file=pwfile,
                             oc_opts=["--servercert=" + pin], probe_interval=3600)
    sess = await oc.start()
    vpn = socket.socket(fileno=os.dup(sess.fd))  # our own copy, outside the supervisor's
    vpn.setblocking(False)
    src = sess.env.address4
    print("DGRAM", vpn.type == socket.SOCK_DGRAM and vpn.family == socket.AF_UNIX)
    vpn.send(b"")
    vpn.send(echo_request(src, remote, 1))
    print("ALIVE_PROBE_OK_AND_PING", echo_reply_seen(vpn, 1))
    vpn.send(b"")
    vpn.send(echo_request(src, remote, 2))
    print("STILL_WORKS_AFTER_PROBES", echo_reply_seen(vpn, 2))
    os.kill(oc.pid, signal.SIGKILL)
    await trio.sleep(0.3)
    try:
        vpn.send(b"")
        print("DEAD_PROBE", "accepted")
    except OSError as e:
        print("DEAD_PROBE", os.strerror(e.errno))
    await oc.aclose()

trio.run(main)
'''


@pytest.mark.lab
def test_vpnfd_facts_with_the_real_openconnect(oc_lab):
    """The facts the supervision relies on, checked against openconnect itself: VPNFD is
    an AF_UNIX datagram socket carrying raw IP packets; a 0-byte datagram is ignored while
    openconnect lives; after its death the same probe fails with ECONNREFUSED."""
    lab = oc_lab
    oc = lab.ocserv
    py = os.path.join(lab.venv, "bin", "python")
    r = lab.run([py, "-c", PROBE_SCRIPT, f"openconnect://{oc['user']}@{oc['host']}",
                 oc["password_file"], _pin(lab), lab.remote_ip], timeout=60)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "DGRAM True" in out, out
    assert "ALIVE_PROBE_OK_AND_PING True" in out, out
    assert "STILL_WORKS_AFTER_PROBES True" in out, out
    assert f"DEAD_PROBE {os.strerror(errno.ECONNREFUSED)}" in out, out


@pytest.mark.lab
def test_internal_reconnect_keeps_the_same_vpnfd(oc_lab):
    """openconnect's own reconnect (SIGUSR2 forces one) does not rerun the script: the same
    VPNFD carries on and a transfer in flight completes across the gap."""
    lab = oc_lab
    script = (f"echo UP; echo SHA=$(curl -sS --limit-rate 20M http://{lab.remote_ip}/100M.bin"
              " | sha256sum | cut -d' ' -f1)")
    p = lab.popen(_bridge_argv(lab, script, extra=["-v"]), timeout=90)
    try:
        lab.wait_for(lambda: "UP" in p.output(), timeout=20, what="the tunnel")
        time.sleep(1)
        r = subprocess.run(["pgrep", "-f", f"^[^ ]*openconnect --script-tun .*/oc-{p.pid}-"],
                           capture_output=True, text=True)
        os.kill(int(r.stdout.split()[0]), signal.SIGUSR2)
        assert p.wait(60) == 0, p.output()
    finally:
        p.stop()
    out = p.output()
    assert "User requested reconnect" in out, out
    assert _marker(out, "SHA") == lab.sha256["100M.bin"]
    assert "generation 2" not in out and "restarting in" not in out, out


@pytest.mark.lab
def test_server_disconnect_is_followed_by_a_new_login(oc_lab):
    """ocserv's admin ends our session (occtl disconnect, by its id only: other sessions of
    the same lab user stay up): openconnect exits, nsvpn logs in again, same address,
    CMD's traffic carries on."""
    lab = oc_lab
    script = (f"echo UP; sleep 5; echo SHA=$(curl -sS -m 20 http://{lab.remote_ip}/1M.bin"
              " | sha256sum | cut -d' ' -f1)")
    p = lab.popen(_bridge_argv(lab, script, extra=["-v"]), timeout=90)
    occtl = ["occtl", "-s", os.path.join(lab.info["state_dir"], "run", "occtl.sock")]
    try:
        lab.wait_for(lambda: "UP" in p.output(), timeout=20, what="the tunnel")
        addr = re.search(r"address (\d+\.\d+\.\d+\.\d+)/", p.output()).group(1)
        r = lab.run(occtl + ["--json", "show", "users"], netns="edge", user=None)
        ids = [str(u["ID"]) for u in json.loads(r.stdout) if u.get("IPv4") == addr]
        assert len(ids) == 1, r.stdout
        r = lab.run(occtl + ["disconnect", "id", ids[0]], netns="edge", user=None)
        assert r.returncode == 0, r.stderr
        assert p.wait(60) == 0, p.output()
    finally:
        p.stop()
    out = p.output()
    assert "Session terminated by server" in out and "restarting in" in out, out
    assert "generation 2" in out
    assert _marker(out, "SHA") == lab.sha256["1M.bin"]
