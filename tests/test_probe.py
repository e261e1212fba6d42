"""`nsvpn probe` as an unprivileged user: normal node, no user namespaces, TUN at 0600.

The probe runs the installed console script from $NSVPN_VENV as the test user, the way a pilot
runs it. Checks with --via run inside the lab's worker netns so they reach only lab hosts.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import shutil
import stat
import subprocess
import tempfile

import pytest

VENV = os.environ.get("NSVPN_VENV", "/opt/nsvpn-venv")
NSVPN = os.path.join(VENV, "bin", "nsvpn")
USER = "nsvpntest"
RUNUSER = shutil.which("runuser") or "/usr/sbin/runuser"
TUN_MODE_LOCK = "/tmp/nsvpn-tun-mode.lock"  # shared with tests/test_namespace.py


def _skip_reason():
    if os.geteuid() != 0:
        return "needs root to run the probe as the unprivileged test user"
    try:
        pwd.getpwnam(USER)
    except KeyError:
        return f"test user {USER} missing (scripts/lab up creates it)"
    if not os.access(NSVPN, os.X_OK):
        return f"{NSVPN} not installed (scripts/test installs it)"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


def as_user(*argv, wrap=(), timeout=20, env=None):
    cmd = [RUNUSER, "-u", USER, "--", *wrap, *argv]
    e = {"PATH": f"{VENV}/bin:/usr/bin:/bin", "HOME": pwd.getpwnam(USER).pw_dir, **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e,
                          stdin=subprocess.DEVNULL, cwd="/")


def probe_json(*extra, wrap=(), env=None):
    p = as_user(NSVPN, "probe", "--json", *extra, wrap=wrap, env=env)
    assert "Traceback" not in p.stderr, p.stderr
    return p.returncode, json.loads(p.stdout)


def test_normal_node_picks_ns_mode():
    rc, r = probe_json()
    assert rc == 0
    assert r["schema"] == 1 and r["mode"] == "ns"
    for name in ("userns", "tun", "mount", "preload", "ssh", "openconnect"):
        assert r["checks"][name]["ok"], (name, r["checks"][name])
        assert isinstance(r["checks"][name]["detail"], str)
    assert r["reasons"] and r["via"] == []
    assert isinstance(r["elapsed_ms"], (int, float))


def test_human_output_is_an_aligned_table():
    p = as_user(NSVPN, "probe")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    rows = {ln.split()[0]: ln for ln in lines if ln and not ln.startswith(" ")}
    assert {"userns", "tun", "mount", "preload", "ssh", "openconnect", "mode"} <= set(rows)
    # status column starts at the same offset on every check row
    cols = {rows[k].index(" ok ") for k in ("userns", "tun", "mount", "preload")}
    assert len(cols) == 1
    assert rows["mode"].split()[1] == "ns"


UNSHARE_NO_USERNS = ("unshare", "-U", "-r", "sh", "-c",
                     'echo 0 > /proc/sys/user/max_user_namespaces && exec "$@"', "sh")


def test_without_user_namespaces_picks_preload_and_says_why():
    # A user namespace whose limit for nested namespaces is 0: a site without userns.
    rc, r = probe_json(wrap=UNSHARE_NO_USERNS)
    assert rc == 0
    assert r["mode"] == "preload"
    assert not r["checks"]["userns"]["ok"]
    assert "max_user_namespaces" in r["checks"]["userns"]["detail"]
    assert not r["checks"]["tun"]["ok"]
    assert r["checks"]["preload"]["ok"]
    assert any("max_user_namespaces" in x for x in r["reasons"])


def test_no_mode_at_all_exits_1(tmp_path):
    # No namespaces and a package copy without the built shim: nothing can work.
    site = subprocess.run([f"{VENV}/bin/python", "-c",
                           "import nsvpn, os; print(os.path.dirname(nsvpn.__file__))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    d = tempfile.mkdtemp(prefix="nsvpn-probe-")
    os.chmod(d, 0o755)
    shutil.copytree(site, os.path.join(d, "nsvpn"),
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    subprocess.run(["chmod", "-R", "a+rX", d], check=True)
    try:
        p = as_user(f"{VENV}/bin/python", "-m", "nsvpn", "probe", "--json",
                    wrap=UNSHARE_NO_USERNS, env={"PYTHONPATH": d})
        r = json.loads(p.stdout)
        assert p.returncode == 1
        assert r["mode"] == "none"
        assert not r["checks"]["preload"]["ok"]
        assert "not built" in r["checks"]["preload"]["detail"]
    finally:
        shutil.rmtree(d)


@contextlib.contextmanager
def tun_mode(mode):
    fd = os.open(TUN_MODE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    old = stat.S_IMODE(os.stat("/dev/net/tun").st_mode)
    try:
        os.chmod("/dev/net/tun", mode)
        yield
    finally:
        os.chmod("/dev/net/tun", old)
        os.close(fd)


def test_tun_at_0600_is_reported():
    with tun_mode(0o600):
        rc, r = probe_json()
    assert rc == 0
    assert r["mode"] == "preload"
    tun = r["checks"]["tun"]
    assert not tun["ok"]
    assert "0600" in tun["detail"] or "EACCES" in tun["detail"] or "ermission" in tun["detail"]
    assert r["checks"]["userns"]["ok"]
    assert any(x.startswith("ns mode unusable: tun") for x in r["reasons"])


@pytest.mark.lab
def test_via_checks_reach_only_lab_hosts(lab):
    info = lab.info
    p = lab.run(["nsvpn", "probe", "--json", "--via", f"ssh://{info['ssh']['host']}",
                 "--via", f"socks5://{info['edge']['ip']}:9",
                 "--via", "ftp://nope",
                 "--via", info["socks5"]["url"], "--via", info["socks5_udp"]["url"],
                 "--via", f"socks5://{info['http']['edge']['host']}:{info['http']['edge']['port']}"],
                timeout=30)
    r = json.loads(p.stdout)
    assert p.returncode == 0
    ok, refused, bad, microsocks, dante, http = r["via"]
    assert ok["ok"] and "reachable" in ok["detail"] and ok["udp"] is False
    assert not refused["ok"] and "refused" in refused["detail"].lower()
    assert not bad["ok"]
    # SOCKS5 proxies are asked for UDP ASSOCIATE: microsocks has none, dante has it
    assert microsocks["ok"] and microsocks["udp"] is False, microsocks
    assert "without UDP" in microsocks["detail"], microsocks
    assert dante["ok"] and dante["udp"] is True and "relays UDP" in dante["detail"], dante
    # something else on the port: reachable, but not a SOCKS5 proxy
    assert not http["ok"] and "not a SOCKS5 server" in http["detail"], http


def test_check_reports_static_and_setuid_programs():
    static = shutil.which("busybox")
    if static is None:
        pytest.skip("busybox (busybox-static) not installed")
    rc, r = probe_json("--check", "curl", "--check", static, "--check", "/usr/bin/su",
                       "--check", "no-such-program-xyz")
    assert rc == 0
    by = {c["command"]: c for c in r["commands"]}
    assert by["curl"]["preload_ok"] and by["curl"]["warnings"] == []
    assert not by[static]["preload_ok"] and "statically linked" in by[static]["detail"]
    assert not by["/usr/bin/su"]["preload_ok"] and "setuid" in by["/usr/bin/su"]["detail"]
    assert not by["no-such-program-xyz"]["ok"]


@pytest.mark.lab
def test_via_ssh_follows_the_users_ssh_config(lab, user_tmp):
    """exec reaches an ssh:// host the way the user's ssh config says (an alias with HostName,
    a ProxyJump), so the probe does too, instead of calling the alias unresolvable; and it
    names forwardings the config would add to nsvpn's ssh."""
    conf = os.path.join(user_tmp, "ssh_config")
    with open(conf, "w") as f:
        f.write(f"Host edge-alias\n    HostName {lab.info['edge']['ip']}\n"
                "    DynamicForward 127.0.0.1:1080\n"
                f"Host edge-jump\n    HostName {lab.info['edge']['ip']}\n"
                f"    ProxyJump {lab.info['ssh']['host']}\n")
    os.chmod(conf, 0o644)
    p = lab.run(["nsvpn", "probe", "--json", "--ssh-opt", f"-F {conf}",
                 "--via", "ssh://edge-alias", "--via", "ssh://edge-jump"], timeout=30)
    assert p.returncode == 0, p.stderr
    alias, jump = json.loads(p.stdout)["via"]
    assert alias["ok"] and f"{lab.info['edge']['ip']}:22 reachable" in alias["detail"], alias
    assert "DynamicForward [127.0.0.1]:1080" in alias["detail"], alias
    assert jump["ok"] and "proxyjump" in jump["detail"], jump
