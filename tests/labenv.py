"""Harness for end-to-end tests in the secluded-node lab (scripts/lab).

Fixtures (tests/conftest.py), for tests marked `@pytest.mark.lab`:
  lab        a `Lab`: the facts of `scripts/lab info --json` (`.info`, plus shortcuts such as
             `.sha256[name]`, `.servercert`, `.ssh`, `.ocserv`) and `run()` / `popen()`, which
             start commands as the unprivileged test user inside a lab network namespace with
             a clean environment (no shell rc files; PATH = $NSVPN_VENV/bin first).
  nsvpn_lab  the same, after checking that the test user can run the nsvpn installed in
             $NSVPN_VENV (default /opt/nsvpn-venv) and that it matches the working tree.
  user_tmp   a scratch directory owned by the test user.
Example:
    r = nsvpn_lab.run(["nsvpn", "exec", "--via", "ssh://edge.lab", "--", "curl", "-sS",
                       "http://remote.lab/1M.bin"], text=False, timeout=60)
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from typing import Any, Dict, List, Sequence, Union

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAB_SCRIPT = os.path.join(REPO, "scripts", "lab")
DEFAULT_VENV = "/opt/nsvpn-venv"
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"

Cmd = Union[Sequence[str], str]

# background processes started through Lab.popen(); conftest stops leftovers after each test
_live: List[LabProcess] = []


class LabError(Exception):
    """The lab could not be brought up on a machine that should be able to."""


def venv_dir() -> str:
    return os.environ.get("NSVPN_VENV", DEFAULT_VENV)


def lab_info() -> Dict[str, Any]:
    r = subprocess.run([LAB_SCRIPT, "info", "--json"], capture_output=True, text=True,
                       timeout=60, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise LabError(f"scripts/lab info failed: {r.stderr.strip()}")
    return json.loads(r.stdout)


def why_unavailable() -> str | None:
    """A reason to skip lab tests on this machine, or None when the lab can run."""
    if os.geteuid() != 0:
        return "lab tests need root (scripts/lab creates network namespaces)"
    if not os.path.exists("/run") or shutil.which("ip") is None:
        return "lab tests need iproute2 (`ip netns`)"
    missing = lab_info()["missing_binaries"]
    if missing:
        return ("the lab is not installed (run `scripts/lab install` as root); missing: "
                + ", ".join(missing))
    return None


def bring_up(timeout: float = 900.0) -> Lab:
    """`scripts/lab up` (idempotent; the first run generates 1.1 GiB of test data)."""
    r = subprocess.run([LAB_SCRIPT, "up"], capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise LabError(f"scripts/lab up failed ({r.returncode}):\n{r.stderr}{r.stdout}")
    return Lab(lab_info())


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class LabProcess(subprocess.Popen):
    """A background command in the lab. Its whole process group is killed by stop(),
    by leaving a `with` block, at the end of the test, or when its timeout expires."""

    def start_watchdog(self, timeout: float | None) -> None:
        self.timed_out = False
        self._timer: threading.Timer | None = None
        if timeout is not None:
            self._timer = threading.Timer(timeout, self._expire)
            self._timer.daemon = True
            self._timer.start()

    def _expire(self) -> None:
        if self.poll() is None:
            self.timed_out = True
            _killpg(self.pid, signal.SIGKILL)

    log: Any = None

    def output(self) -> str:
        """Everything the process wrote so far (when started with the default log file)."""
        if self.log is None:
            return ""
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def signal_group(self, sig: int) -> None:
        if self.poll() is None:
            _killpg(self.pid, sig)

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM to the group, SIGKILL after `grace` seconds; returns the exit status."""
        if self._timer is not None:
            self._timer.cancel()
        if self.poll() is None:
            _killpg(self.pid, signal.SIGTERM)
            try:
                self.wait(grace)
            except subprocess.TimeoutExpired:
                _killpg(self.pid, signal.SIGKILL)
                self.wait(5)
        # leftovers of the group (e.g. a helper that ignored SIGTERM)
        _killpg(self.pid, signal.SIGKILL)
        if self in _live:
            _live.remove(self)
        return self.returncode

    def __exit__(self, *exc: object) -> None:
        self.stop()
        super().__exit__(*exc)


def stop_all() -> None:
    for p in list(_live):
        p.stop(grace=2.0)


class Lab:
    """Facts about the running lab and ways to run commands in it.

    Attributes mirror `scripts/lab info --json` (kept whole in `.info`)."""

    def __init__(self, info: Dict[str, Any]) -> None:
        self.info = info
        self.netns: Dict[str, str] = info["netns"]
        self.worker_ip: str = info["worker"]["ip"]
        self.edge_ip: str = info["edge"]["ip"]
        self.remote_ip: str = info["remote"]["ip"]
        self.user: str = info["users"]["primary"]["name"]
        self.user2: str = info["users"]["secondary"]["name"]
        self.ssh: Dict[str, Any] = info["ssh"]
        self.socks5: Dict[str, Any] = info["socks5"]
        self.ocserv: Dict[str, Any] = info["ocserv"]
        self.servercert: str = info["ocserv"]["servercert"]
        self.files: Dict[str, Dict[str, Any]] = info["files"]
        self.sha256: Dict[str, str] = {n: f["sha256"] for n, f in info["files"].items()}
        self.venv: str = venv_dir()
        self.nsvpn: str = os.path.join(self.venv, "bin", "nsvpn")
        self._nsvpn_problem: str | None = None
        self._nsvpn_checked = False

    # ------------------------------------------------------------ environment

    def env_for(self, user: str | None, extra: Dict[str, str | None] | None = None
                ) -> Dict[str, str]:
        """A clean environment for `user` (None = root); extra values of None are removed."""
        pw = pwd.getpwnam(user or "root")
        env = {
            "HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name,
            "SHELL": pw.pw_shell or "/bin/sh", "LANG": "C.UTF-8",
            "PATH": os.path.join(self.venv, "bin") + ":" + SYSTEM_PATH,
        }
        for k, v in (extra or {}).items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        return env

    def argv(self, cmd: Cmd, *, netns: str | None = "worker",
             user: str | None = "nsvpntest") -> List[str]:
        """The full command line: `ip netns exec <ns> setpriv ... CMD`.
        netns: 'worker', 'edge', 'remote' or None (host); user: a name, or None/'root'."""
        args = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        prefix: List[str] = []
        if netns is not None:
            prefix += ["ip", "netns", "exec", self.netns.get(netns, netns)]
        if user not in (None, "root"):
            pw = pwd.getpwnam(user)
            prefix += ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}",
                       "--init-groups", "--"]
        return prefix + args

    def _cwd(self, user: str | None, cwd: str | None) -> str:
        # the home directory, not the repository: `python -c` must not import ./nsvpn
        return cwd or pwd.getpwnam(user or "root").pw_dir

    # ------------------------------------------------------------ running commands

    def run(self, cmd: Cmd, *, netns: str | None = "worker",
            user: str | None = "nsvpntest", timeout: float = 60.0,
            env: Dict[str, str | None] | None = None,
            input: Union[str, bytes] | None = None, check: bool = False,
            text: bool = True, cwd: str | None = None) -> subprocess.CompletedProcess:
        """Run cmd to completion (list = argv, str = /bin/sh -c) and capture its output.
        On timeout the whole process group is killed and TimeoutExpired is raised."""
        argv = self.argv(cmd, netns=netns, user=user)
        p = subprocess.Popen(argv, stdin=subprocess.PIPE if input is not None
                             else subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=self.env_for(user, env),
                             cwd=self._cwd(user, cwd), text=text, start_new_session=True)
        try:
            out, err = p.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            raise subprocess.TimeoutExpired(argv, timeout, out, err) from None
        finally:
            _killpg(p.pid, signal.SIGKILL)  # nothing of it may outlive the call
        r = subprocess.CompletedProcess(argv, p.returncode, out, err)
        if check and r.returncode != 0:
            raise subprocess.CalledProcessError(r.returncode, argv, out, err)
        return r

    def popen(self, cmd: Cmd, *, netns: str | None = "worker",
              user: str | None = "nsvpntest", timeout: float | None = 300.0,
              env: Dict[str, str | None] | None = None, stdin: Any = subprocess.DEVNULL,
              stdout: Any = None, stderr: Any = None, text: bool = True,
              cwd: str | None = None) -> LabProcess:
        """Start cmd in the background in its own process group. It is killed after
        `timeout` seconds, by .stop(), or at the end of the test at the latest.
        By default stdout+stderr go to a temporary file (read it with .output()), so a
        chatty process can never block on a full pipe; pass subprocess.PIPE to get pipes."""
        argv = self.argv(cmd, netns=netns, user=user)
        log = None
        if stdout is None and stderr is None:
            log = tempfile.TemporaryFile()
            stdout, stderr = log, subprocess.STDOUT
        p = LabProcess(argv, stdin=stdin, stdout=stdout, stderr=stderr,
                       env=self.env_for(user, env), cwd=self._cwd(user, cwd), text=text,
                       start_new_session=True)
        p.log = log
        p.start_watchdog(timeout)
        _live.append(p)
        return p

    def wait_for(self, predicate: Any, timeout: float = 10.0, interval: float = 0.05,
                 what: str = "condition") -> Any:
        """Poll predicate() until it returns a true value (which is returned)."""
        end = time.monotonic() + timeout
        while True:
            v = predicate()
            if v:
                return v
            if time.monotonic() > end:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(interval)

    def port_open(self, host: str, port: int, *, netns: str | None = "worker",
                  user: str | None = "nsvpntest") -> bool:
        """Can `user` in `netns` connect to host:port (1 s bound)?"""
        code = ("import socket,sys\n"
                f"s=socket.create_connection(({host!r},{port}),timeout=1)\n")
        return self.run(["python3", "-c", code], netns=netns, user=user,
                        timeout=10).returncode == 0

    def user_tmpdir(self, user: str | None = "nsvpntest") -> str:
        """A fresh 0700 directory in /tmp owned by user (pytest's tmp_path is root's)."""
        d = tempfile.mkdtemp(prefix="nsvpn-test-", dir="/tmp")
        pw = pwd.getpwnam(user or "root")
        os.chown(d, pw.pw_uid, pw.pw_gid)
        return d

    # ------------------------------------------------------------ the nsvpn under test

    def nsvpn_problem(self, user: str | None = None) -> str | None:
        """Why the test user cannot run the nsvpn in NSVPN_VENV, or None when it can."""
        if self._nsvpn_checked and user is None:
            return self._nsvpn_problem
        who = user or self.user
        problem = self._check_nsvpn(who)
        if user is None:
            self._nsvpn_checked, self._nsvpn_problem = True, problem
        return problem

    def _check_nsvpn(self, user: str) -> str | None:
        py = os.path.join(self.venv, "bin", "python")
        fix = (f"install it with `{py} -m pip install --no-deps {REPO}` and make "
               f"{self.venv} readable by {user}")
        if not os.path.exists(py):
            return f"NSVPN_VENV={self.venv} has no bin/python: {fix}"
        code = "import os, nsvpn; print(os.path.dirname(os.path.abspath(nsvpn.__file__)))"
        r = self.run([py, "-c", code], netns="worker", user=user, timeout=60)
        if r.returncode != 0:
            return f"{user} cannot import nsvpn from {self.venv}: {r.stderr.strip()}; {fix}"
        installed = r.stdout.strip()
        if not os.access(self.nsvpn, os.X_OK):
            return f"{self.nsvpn} is missing: {fix}"
        stale = stale_files(os.path.join(REPO, "nsvpn"), installed)
        if stale and os.environ.get("NSVPN_ALLOW_STALE") != "1":
            return (f"the nsvpn installed in {self.venv} differs from the working tree "
                    f"({', '.join(stale[:5])}{' ...' if len(stale) > 5 else ''}): "
                    f"reinstall with `{py} -m pip install -q --no-deps {REPO}` "
                    "(or set NSVPN_ALLOW_STALE=1)")
        return None


def stale_files(src: str, installed: str) -> List[str]:
    """Source files whose installed copy differs or is missing (empty when same dir)."""
    if os.path.realpath(src) == os.path.realpath(installed):
        return []
    out = []
    for root, _dirs, files in os.walk(src):
        for f in files:
            if not f.endswith(".py"):
                continue
            a = os.path.join(root, f)
            b = os.path.join(installed, os.path.relpath(a, src))
            try:
                with open(a, "rb") as fa, open(b, "rb") as fb:
                    if fa.read() == fb.read():
                        continue
            except OSError:
                pass
            out.append(os.path.relpath(a, src))
    return sorted(out)
