"""The ssh upstream against a real sshd on 127.0.0.1 (started here with a throw-away config)."""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from functools import partial

import pytest
import trio

from nsvpn.upstream.base import DialError, UpstreamError
from nsvpn.upstream.ssh import (
    SshUpstream,
    _process_gone,
    expand_ssh_opts,
    open_failed_errno,
    parse_ssh_version,
    runtime_dir,
    supports_unix_dynamic,
)
from nsvpn.urls import parse_upstream_url

SSHD = "/usr/sbin/sshd"


def test_parse_ssh_version():
    assert parse_ssh_version("OpenSSH_9.2p1 Debian-2+deb12u10, OpenSSL 3.0.19") == (9, 2)
    assert parse_ssh_version("OpenSSH_7.4p1, OpenSSL 1.0.2k-fips  26 Jan 2017") == (7, 4)
    assert parse_ssh_version("Sun_SSH_1.1") is None
    assert supports_unix_dynamic((9, 2)) and supports_unix_dynamic((7, 4))
    assert not supports_unix_dynamic((6, 6)) and not supports_unix_dynamic(None)


def test_expand_ssh_opts():
    assert expand_ssh_opts(["ProxyJump=gw", "-i /k/id", " ", "-F /dev/null"]) == [
        "-o",
        "ProxyJump=gw",
        "-i",
        "/k/id",
        "-F",
        "/dev/null",
    ]


def test_open_failed_errno():
    assert open_failed_errno("connect failed: Connection refused") == errno.ECONNREFUSED
    assert open_failed_errno("connect failed: No route to host") == errno.EHOSTUNREACH
    assert open_failed_errno("connect failed: Network is unreachable") == errno.ENETUNREACH
    assert open_failed_errno("connect failed: Connection timed out") == errno.ETIMEDOUT
    assert open_failed_errno("administratively prohibited: open failed") == errno.EACCES
    assert open_failed_errno("something else") == errno.ECONNABORTED


def test_runtime_dir_is_private(tmp_path, monkeypatch):
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o755)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    d = runtime_dir()
    assert d == str(xdg / "nsvpn")
    os.chmod(d, 0o755)  # loosened by someone: tightened again
    assert runtime_dir() == d and stat.S_IMODE(os.stat(d).st_mode) == 0o700
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    d2 = runtime_dir()
    assert d2.startswith(f"/tmp/nsvpn-{os.getuid()}-")
    assert stat.S_IMODE(os.stat(d2).st_mode) == 0o700


needs_sshd = pytest.mark.skipif(
    not (os.path.exists(SSHD) and shutil.which("ssh") and shutil.which("ssh-keygen")),
    reason="OpenSSH server/client not installed",
)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="starting sshd needs root")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_sshd(config, port: int, log) -> subprocess.Popen:
    proc = subprocess.Popen([SSHD, "-D", "-f", str(config), "-E", str(log)])
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("sshd did not start: " + open(log).read())
            time.sleep(0.05)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    if not os.path.exists(SSHD) or os.geteuid() != 0:
        pytest.skip("needs sshd and root")
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host", "user", "stranger"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True
        )
    # sshd reads authorized keys as the logging-in user: keep them where nsvpntest can read.
    keys = tempfile.mkdtemp(prefix="nsvpn-sshd-keys-")
    os.chmod(keys, 0o755)
    shutil.copy(d / "user.pub", os.path.join(keys, "authorized_keys"))
    os.chmod(os.path.join(keys, "authorized_keys"), 0o644)
    # A user config that silences ssh (common): our LogLevel override must still see
    # "open failed" lines.
    (d / "ssh_config").write_text("Host *\n    LogLevel QUIET\n")
    port = _free_port()
    (d / "sshd_config").write_text(
        textwrap.dedent(f"""\
        Port {port}
        ListenAddress 127.0.0.1
        HostKey {d}/host
        AuthorizedKeysFile {keys}/authorized_keys
        PidFile {d}/sshd.pid
        UsePAM no
        StrictModes no
        PermitRootLogin yes
        PasswordAuthentication no
        KbdInteractiveAuthentication no
        AllowTcpForwarding yes
        LogLevel ERROR
        """)
    )
    proc = _start_sshd(d / "sshd_config", port, d / "log")
    yield {"port": port, "dir": d}
    proc.terminate()
    proc.wait(5)
    shutil.rmtree(keys, ignore_errors=True)


def make_upstream(sshd, key="user", config=None, **kw) -> SshUpstream:
    url = parse_upstream_url(f"ssh://root@127.0.0.1:{sshd['port']}")
    opts = [
        f"-F {config or sshd['dir'] / 'ssh_config'}",
        f"-i {sshd['dir']}/{key}",
        "IdentitiesOnly=yes",
        "IdentityAgent=none",
        "StrictHostKeyChecking=no",
        "UserKnownHostsFile=/dev/null",
    ]
    return SshUpstream(url, ssh_opts=opts, interactive=False, **kw)


async def echo_server(nursery) -> int:
    async def handler(stream):
        async with stream:
            try:
                while True:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    await stream.send_all(data)
            except trio.BrokenResourceError:
                return

    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


async def roundtrip(up, port, payload, host="127.0.0.1") -> bytes:
    stream = await up.dial_tcp(host, port, timeout=10)
    got = bytearray()
    async with stream:
        async with trio.open_nursery() as n:

            async def reader():
                while len(got) < len(payload):
                    data = await stream.receive_some(65536)
                    assert data
                    got.extend(data)

            n.start_soon(reader)
            await stream.send_all(payload)
    return bytes(got)


@needs_sshd
@needs_root
async def test_ssh_ready_dial_refused_and_stop(sshd, nursery, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    port = await echo_server(nursery)
    up = make_upstream(sshd)
    t0 = trio.current_time()
    await up.start()
    startup = trio.current_time() - t0
    try:
        assert up.healthy
        path = up.socket_path
        assert path and os.path.dirname(path) == str(tmp_path / "nsvpn")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        payload = os.urandom(4 * 1024 * 1024)
        assert await roundtrip(up, port, payload) == payload
        assert await roundtrip(up, port, b"by name", host="localhost") == b"by name"

        dead = _free_port()
        t1 = trio.current_time()
        with pytest.raises(DialError) as ei:
            await up.dial_tcp("127.0.0.1", dead, timeout=10)
        assert ei.value.errno == errno.ECONNREFUSED, ei.value
        assert trio.current_time() - t1 < 1.0
        # Many refusals at once still each get the right answer.
        results = []

        async def refused():
            try:
                await up.dial_tcp("127.0.0.1", dead, timeout=10)
            except DialError as e:
                results.append(e.errno)

        async with trio.open_nursery() as n:
            for _ in range(20):
                n.start_soon(refused)
        assert results == [errno.ECONNREFUSED] * 20
    finally:
        pid = up.pid
        await up.aclose()
    assert not os.path.exists(path)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    print(f"ssh upstream ready in {startup * 1000:.0f} ms")


@needs_sshd
@needs_root
async def test_ssh_wrong_key_reports_ssh_message(sshd, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    up = make_upstream(sshd, key="stranger")
    t0 = trio.current_time()
    with pytest.raises(UpstreamError) as ei:
        await up.start()
    assert "Permission denied" in str(ei.value)
    assert "exited with status 255" in str(ei.value)
    assert trio.current_time() - t0 < 10
    assert not os.listdir(tmp_path / "nsvpn")  # no socket left behind


@needs_sshd
@needs_root
async def test_ssh_restarts_after_being_killed(sshd, nursery, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    port = await echo_server(nursery)
    up = make_upstream(sshd)
    await up.start()
    try:
        first = up.pid
        os.kill(first, signal.SIGKILL)
        with trio.fail_after(5):
            while up.healthy:
                await trio.sleep(0.01)
        t0 = trio.current_time()
        with pytest.raises(DialError) as ei:
            await up.dial_tcp("127.0.0.1", port, timeout=10)
        assert ei.value.reason == "upstream-down"
        assert trio.current_time() - t0 < 0.1  # fails fast, no hang
        with trio.fail_after(15):
            while not up.healthy:
                await trio.sleep(0.05)
        assert up.pid != first and up.restarts == 1
        assert await roundtrip(up, port, b"again") == b"again"
    finally:
        await up.aclose()


@needs_sshd
@needs_root
async def test_ssh_tcp_fallback(sshd, nursery, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    port = await echo_server(nursery)
    up = make_upstream(sshd, force_tcp=True)
    await up.start()
    try:
        assert up.socket_path is None and up.tcp_port
        assert await roundtrip(up, port, b"tcp") == b"tcp"
    finally:
        await up.aclose()


@needs_sshd
@needs_root
async def test_ssh_long_runtime_dir_falls_back_to_tmp(sshd, nursery, tmp_path, monkeypatch):
    """sun_path holds 108 bytes: a long $XDG_RUNTIME_DIR must not break the unix socket."""
    deep = tmp_path / ("x" * 60) / ("y" * 60)
    deep.mkdir(parents=True)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(deep))
    port = await echo_server(nursery)
    up = make_upstream(sshd)
    await up.start()
    try:
        assert up.socket_path.startswith(f"/tmp/nsvpn-{os.getuid()}-")
        assert await roundtrip(up, port, b"short path") == b"short path"
    finally:
        await up.aclose()
    assert os.environ["XDG_RUNTIME_DIR"] == str(deep)


@needs_sshd
@needs_root
async def test_ssh_readiness_is_bounded(sshd, nursery, tmp_path, monkeypatch):
    """A server that accepts TCP but never speaks: start() gives up in time, ssh is gone."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))

    async def silent(stream):
        await trio.sleep_forever()

    listeners = await nursery.start(partial(trio.serve_tcp, silent, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    up = SshUpstream(
        parse_upstream_url(f"ssh://root@127.0.0.1:{port}"),
        ssh_opts=["-F /dev/null", "ConnectTimeout=30"],
        interactive=False,
        ready_timeout=1.0,
    )
    t0 = trio.current_time()
    with pytest.raises(UpstreamError, match="not ready after 1 s"):
        await up.start()
    assert trio.current_time() - t0 < 4
    with pytest.raises(ProcessLookupError):
        os.kill(up.pid, 0)


@needs_sshd
@needs_root
async def test_ssh_interactive_ignores_terminal_sigint(sshd, nursery, tmp_path, monkeypatch):
    """With a terminal, ssh shares our process group (to prompt) but Ctrl-C must not kill it."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    port = await echo_server(nursery)
    up = make_upstream(sshd)
    up.interactive = True
    await up.start()
    try:
        assert os.getpgid(up.pid) == os.getpgid(0)
        os.kill(up.pid, signal.SIGINT)
        await trio.sleep(0.3)
        assert up.healthy and up.restarts == 0
        assert await roundtrip(up, port, b"still here") == b"still here"
    finally:
        await up.aclose()


CHILD = """
import sys, trio
from nsvpn.upstream.ssh import SshUpstream
from nsvpn.urls import parse_upstream_url

async def main():
    up = SshUpstream(parse_upstream_url(sys.argv[1]), ssh_opts=sys.argv[2:], interactive=False)
    await up.start()
    print(up.pid, flush=True)
    await trio.sleep_forever()

trio.run(main)
"""


@needs_sshd
@needs_root
def test_ssh_dies_with_a_killed_nsvpn(sshd, tmp_path):
    """PR_SET_PDEATHSIG: even SIGKILL of our process takes ssh down with it."""
    d = sshd["dir"]
    env = dict(
        os.environ,
        XDG_RUNTIME_DIR=str(tmp_path),
        PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CHILD,
            f"ssh://root@127.0.0.1:{sshd['port']}",
            "-F /dev/null",
            f"-i {d}/user",
            "IdentitiesOnly=yes",
            "StrictHostKeyChecking=no",
            "UserKnownHostsFile=/dev/null",
        ],
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        line = child.stdout.readline()
        ssh_pid = int(line)
        time.sleep(12)  # longer than trio's idle worker-thread lifetime (10 s)
        os.kill(ssh_pid, 0)  # still alive while we are
        child.kill()
        child.wait()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.kill(ssh_pid, 0)
            except ProcessLookupError:
                break
            # ssh is not our child: it is reparented, and reaped by init
            time.sleep(0.05)
        else:
            pytest.fail("ssh survived the death of its nsvpn")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


UNPRIV_CHILD = """
import json, os, stat, sys, trio
from nsvpn.upstream.ssh import SshUpstream
from nsvpn.urls import parse_upstream_url

async def main():
    url, echo_port, opts = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    up = SshUpstream(parse_upstream_url(url), ssh_opts=opts, interactive=False)
    await up.start()
    path = up.socket_path
    info = {"path": path, "sock_mode": stat.S_IMODE(os.stat(path).st_mode),
            "dir_mode": stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode),
            "dir_uid": os.stat(os.path.dirname(path)).st_uid}
    stream = await up.dial_tcp("127.0.0.1", echo_port, timeout=10)
    payload = os.urandom(1 << 20)
    got = bytearray()
    async with stream:
        await stream.send_all(payload)
        while len(got) < len(payload):
            got += await stream.receive_some(65536)
    info["echo_ok"] = bytes(got) == payload
    await up.aclose()
    info["removed"] = not os.path.exists(path)
    print(json.dumps(info), flush=True)

trio.run(main)
"""


@needs_sshd
@needs_root
async def test_ssh_upstream_as_unprivileged_user(sshd, nursery):
    """The real situation: an ordinary user, no XDG_RUNTIME_DIR, a private dir under /tmp."""
    import json
    import pwd

    try:
        pw = pwd.getpwnam("nsvpntest")
    except KeyError:
        pytest.skip("user nsvpntest does not exist")
    port = await echo_server(nursery)
    home = tempfile.mkdtemp(prefix="nsvpn-sshtest-")
    try:
        key = os.path.join(home, "id")
        shutil.copy(sshd["dir"] / "user", key)
        for p in (home, key):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        os.chmod(key, 0o600)
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": home,
            "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        }
        argv = [
            shutil.which("runuser") or "/usr/sbin/runuser",
            "-u",
            "nsvpntest",
            "--",
            sys.executable,
            "-c",
            UNPRIV_CHILD,
            f"ssh://nsvpntest@127.0.0.1:{sshd['port']}",
            str(port),
            "-F /dev/null",
            f"-i {key}",
            "IdentitiesOnly=yes",
            "StrictHostKeyChecking=no",
            "UserKnownHostsFile=/dev/null",
        ]
        with trio.fail_after(30):
            res = await trio.run_process(
                argv, env=env, capture_stdout=True, capture_stderr=True, check=False
            )
        assert res.returncode == 0, res.stderr.decode()
        info = json.loads(res.stdout)
        assert info["path"].startswith(f"/tmp/nsvpn-{pw.pw_uid}-")
        assert (info["sock_mode"], info["dir_mode"]) == (0o600, 0o700)
        assert info["dir_uid"] == pw.pw_uid
        assert info["echo_ok"] and info["removed"]
    finally:
        shutil.rmtree(home, ignore_errors=True)


PROMPT_CHILD = """
import sys, trio
from nsvpn.upstream.ssh import SshUpstream
from nsvpn.urls import parse_upstream_url

async def main():
    up = SshUpstream(parse_upstream_url(sys.argv[1]), ssh_opts=sys.argv[2:])
    print("interactive", up.interactive, flush=True)
    await up.start()
    print("READY", flush=True)
    await up.aclose()

trio.run(main)
"""


@needs_sshd
@needs_root
def test_ssh_can_prompt_on_the_terminal(sshd, tmp_path):
    """With a terminal, ssh may ask (here: the host-key question) and the user's answer works."""
    import pty

    d = sshd["dir"]
    known = tmp_path / "known_hosts"
    env = dict(
        os.environ,
        XDG_RUNTIME_DIR=str(tmp_path),
        PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    argv = [
        sys.executable, "-c", PROMPT_CHILD, f"ssh://root@127.0.0.1:{sshd['port']}",
        "-F /dev/null", f"-i {d}/user", "IdentitiesOnly=yes", "StrictHostKeyChecking=ask",
        f"UserKnownHostsFile={known}",
    ]  # fmt: skip
    pid, fd = pty.fork()
    if pid == 0:  # child: a session with the pty as controlling terminal
        os.execve(argv[0], argv, env)
    out = b""
    answered = False
    deadline = time.monotonic() + 20
    try:
        while b"READY" not in out and time.monotonic() < deadline:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            out += chunk
            if not answered and b"continue connecting" in out:
                os.write(fd, b"yes\n")
                answered = True
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert b"interactive True" in out
    assert answered, out.decode(errors="replace")
    assert b"READY" in out, out.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0
    assert "127.0.0.1" in known.read_text()


def test_process_gone_sees_a_zombie_and_leaves_it_to_the_watcher():
    """Checked at every flow's end: a running helper is not gone, a dead one is gone before
    anyone reaped it, and the check does not reap it (the watcher still gets its status)."""
    p = subprocess.Popen(["sleep", "30"])
    try:
        assert not _process_gone(p.pid)
        p.kill()
        deadline = time.monotonic() + 10
        while not _process_gone(p.pid):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert _process_gone(p.pid)  # asking twice does not reap it either
    finally:
        p.kill()
        assert p.wait(timeout=10) == -signal.SIGKILL
    assert _process_gone(p.pid)


@needs_sshd
@needs_root
async def test_first_start_tries_again_when_dropped_before_authentication(
        sshd, nursery, tmp_path, monkeypatch):
    """Many pilots starting at once overrun the login node's MaxStartups, and its sshd drops
    new connections before authentication (kex_exchange_identification: Connection closed).
    The first start tries again (with jitter) instead of failing the pilot; a lasting refusal
    (a wrong key) still fails at once (test_ssh_wrong_key_reports_ssh_message)."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    port = _free_port()
    conf = (sshd["dir"] / "sshd_config").read_text()
    conf = re.sub(r"(?m)^Port \d+$", f"Port {port}", conf)
    conf = re.sub(r"(?m)^PidFile .*$", f"PidFile {tmp_path}/crowded.pid", conf)
    (tmp_path / "crowded_config").write_text(conf + "MaxStartups 1\n")
    proc = _start_sshd(tmp_path / "crowded_config", port, tmp_path / "crowded.log")
    try:
        await trio.sleep(0.2)  # sshd has counted that probe out again
        blocker = socket.create_connection(("127.0.0.1", port))  # the one pre-auth slot

        async def release() -> None:
            await trio.sleep(1.5)
            blocker.close()

        up = make_upstream({"port": port, "dir": sshd["dir"]})
        nursery.start_soon(release)
        t0 = trio.current_time()
        await up.start()
        try:
            assert up.first_retries >= 1
            assert trio.current_time() - t0 >= 1.0
            assert up.healthy
        finally:
            await up.aclose()
    finally:
        proc.terminate()
        proc.wait(5)


def _upstream_with_config(sshd, config: str, tmp_path, **kw) -> SshUpstream:
    conf = tmp_path / "user_ssh_config"
    conf.write_text(config)
    return make_upstream(sshd, config=conf, **kw)


@needs_sshd
@needs_root
async def test_forwardings_in_the_users_config_do_not_stop_ours(
        sshd, nursery, tmp_path, monkeypatch, capfd):
    """A DynamicForward/LocalForward in ~/.ssh/config comes with every ssh to that host, ours
    too. Under ExitOnForwardFailure one busy port (the user's interactive session, or a
    second nsvpn on the node) ended our ssh: only one nsvpn per node could run. Now ours
    runs, and the user is told once, with the way to keep them out of it."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    with busy:
        up = _upstream_with_config(
            sshd, f"Host *\n    LogLevel QUIET\n    DynamicForward 127.0.0.1:{port}\n", tmp_path)
        await up.start()
        try:
            assert up.config_forwards == [f"DynamicForward [127.0.0.1]:{port}"]
            assert up.healthy
            echo = await echo_server(nursery)
            assert await roundtrip(up, echo, b"x" * 100000) == b"x" * 100000
        finally:
            await up.aclose()
    err = capfd.readouterr().err
    assert err.count("your ssh config adds forwardings") == 1, err
    assert 'exec "test -z $NSVPN_SSH"' in err, err

    # the way out the warning names: the forwarding stays out of nsvpn's ssh
    up = _upstream_with_config(
        sshd, "Match host 127.0.0.1 exec \"test -z $NSVPN_SSH\"\n"
              f"    DynamicForward 127.0.0.1:{port}\nHost *\n    LogLevel QUIET\n", tmp_path)
    await up.start()
    try:
        assert up.config_forwards == [] and up.healthy
    finally:
        await up.aclose()
    assert "forwardings" not in capfd.readouterr().err


@needs_sshd
@needs_root
async def test_own_forward_failing_is_still_seen_at_once_beside_config_forwards(
        sshd, tmp_path, monkeypatch):
    """Without ExitOnForwardFailure (the user's forwardings) ssh keeps running when our -D
    cannot listen; its complaint on stderr ends the start at once, not after 20 s."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    socks = tmp_path / "socks"
    monkeypatch.setattr("nsvpn.upstream.ssh.unique_tag", lambda: "fixed")
    (socks / "ssh-fixed-0.sock").mkdir(parents=True)  # where our -D will listen
    up = _upstream_with_config(
        sshd, f"Host *\n    LogLevel QUIET\n    LocalForward 127.0.0.1:{_free_port()} "
              "127.0.0.1:9\n", tmp_path, sockdir=str(socks))
    t0 = trio.current_time()
    with pytest.raises(UpstreamError) as ei:
        await up.start()
    assert up.config_forwards and "could not open nsvpn's forwarding" in str(ei.value)
    assert trio.current_time() - t0 < 10


@needs_sshd
@needs_root
async def test_two_sessions_with_one_pid_keep_their_own_sockets(sshd, nursery, tmp_path,
                                                                monkeypatch):
    """Two nsvpn in different PID namespaces (containers, batch jobs) that share /tmp can have
    the same pid: a socket named by pid alone was taken over (unlinked and bound again) by
    the second ssh, and the first session's dials went to the wrong tunnel or failed. Two
    upstreams of one process, both with index 0, stand in for them here."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    a, b = make_upstream(sshd), make_upstream(sshd)
    await a.start()
    try:
        await b.start()
        try:
            assert a.socket_path != b.socket_path
            echo = await echo_server(nursery)
            for up in (a, b):
                assert await roundtrip(up, echo, b"y" * 1000) == b"y" * 1000
        finally:
            await b.aclose()
        assert os.path.exists(a.socket_path)  # b's cleanup left a's socket alone
        assert await roundtrip(a, echo, b"z" * 1000) == b"z" * 1000
    finally:
        await a.aclose()


DEFAULT_CIPHERS = ("chacha20-poly1305@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr,"
                   "aes128-gcm@openssh.com,aes256-gcm@openssh.com")


def test_own_ssh_puts_aes_gcm_first_only_when_nothing_chose_ciphers():
    from nsvpn.upstream.ssh import faster_ciphers

    builtin = [("ciphers", DEFAULT_CIPHERS)]
    assert faster_ciphers(builtin, builtin, True) == (
        "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,"
        "aes128-ctr,aes192-ctr,aes256-ctr")
    assert faster_ciphers(builtin, builtin, False) is None  # no AES instructions
    # a user's or an admin's choice (RHEL's crypto policies) stays as it is
    policy = [("ciphers", "aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,aes256-ctr")]
    assert faster_ciphers(policy, builtin, True) is None
    assert faster_ciphers([("ciphers", "chacha20-poly1305@openssh.com")], builtin, True) is None
    assert faster_ciphers([], builtin, True) is None  # ssh -G said nothing


def test_cpu_has_aes_reads_x86_and_arm_cpuinfo(tmp_path):
    from nsvpn.upstream.ssh import cpu_has_aes

    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu sse2 aes avx2\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd aes pmull sha1\n")
    old = tmp_path / "old"
    old.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 vaesx\n")
    assert cpu_has_aes(str(x86)) and cpu_has_aes(str(arm))
    assert not cpu_has_aes(str(old)) and not cpu_has_aes(str(tmp_path / "missing"))
