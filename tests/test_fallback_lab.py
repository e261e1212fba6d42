"""`nsvpn exec` on a node without user namespaces: the automatic fallback to preload mode.

The site is simulated the way the issue asks: nsvpn runs inside a user namespace whose
user.max_user_namespaces is 0, so it can create no namespace of its own (uid 0 there is still
the unprivileged test user outside).
"""

from __future__ import annotations

import subprocess

import labenv
import pytest

pytestmark = pytest.mark.lab

NO_USERNS = ["unshare", "-U", "-r", "sh", "-c",
             'echo 0 > /proc/sys/user/max_user_namespaces && exec "$@"', "sh"]


def explain(r: subprocess.CompletedProcess) -> str:
    return f"exit {r.returncode}\nstdout: {r.stdout[-2000:]!r}\nstderr: {r.stderr[-3000:]!r}"


def run_no_userns(lab: labenv.Lab, args, timeout=90):
    return lab.run([*NO_USERNS, "nsvpn", *args], timeout=timeout)


def test_exec_falls_back_to_preload_and_says_so_once(nsvpn_lab):
    f = nsvpn_lab.info["files"]["100M.bin"]
    r = run_no_userns(nsvpn_lab, [
        "exec", "--via", nsvpn_lab.socks5["url"], "--",
        "sh", "-c", "curl -sS http://remote.lab/100M.bin | sha256sum; "
                    "echo preload=${LD_PRELOAD:+yes}"])
    assert r.returncode == 0, explain(r)
    assert r.stdout.split()[0] == f["sha256"], explain(r)
    assert "preload=yes" in r.stdout
    notices = [ln for ln in r.stderr.splitlines() if "LD_PRELOAD fallback" in ln]
    assert len(notices) == 1 and "max_user_namespaces" in notices[0], explain(r)


def test_quiet_fallback_prints_nothing(nsvpn_lab):
    r = run_no_userns(nsvpn_lab, ["exec", "-q", "--via", nsvpn_lab.socks5["url"], "--",
                                  "curl", "-sS", "-o", "/dev/null", "http://remote.lab/1M.bin"])
    assert r.returncode == 0, explain(r)
    assert r.stderr == "", explain(r)


def test_ssh_upstream_in_preload_mode(nsvpn_lab):
    # uid 0 inside the simulated site makes ssh look in /root: name the user's files.
    s = nsvpn_lab.ssh
    home = nsvpn_lab.info["users"]["primary"]["home"]
    r = run_no_userns(nsvpn_lab, [
        "exec", "-q", "--via", f"ssh://{s['user']}@{s['host']}",
        "--ssh-opt", f"UserKnownHostsFile={s['known_hosts']}",
        "--ssh-opt", f"IdentityFile={home}/.ssh/id_ed25519", "--",
        "sh", "-c", "xrdcp -f -s root://xrootd.lab//data/1M.bin /tmp/fb.bin && "
                    "sha256sum /tmp/fb.bin; rm -f /tmp/fb.bin"])
    assert r.returncode == 0, explain(r)
    assert r.stdout.split()[0] == nsvpn_lab.info["files"]["1M.bin"]["sha256"], explain(r)


def test_forced_ns_mode_fails_with_the_probe_reason(nsvpn_lab):
    r = run_no_userns(nsvpn_lab, ["exec", "--mode", "ns", "--via", nsvpn_lab.socks5["url"],
                                  "--", "sh", "-c", "echo RAN"])
    assert r.returncode == 4, explain(r)
    assert "RAN" not in r.stdout
    assert "max_user_namespaces" in r.stderr and "Traceback" not in r.stderr, explain(r)


def test_static_binary_gets_the_warning(nsvpn_lab):
    r = run_no_userns(nsvpn_lab, ["exec", "--via", nsvpn_lab.socks5["url"], "--",
                                  "busybox", "true"])
    assert r.returncode == 0, explain(r)
    assert "statically linked" in r.stderr, explain(r)
