"""Run and supervise the system `openconnect --script-tun`; hand its VPNFD to nsvpn.

    openconnect --script-tun --script 'exec <python> -m nsvpn.oc_attach <sock>'
                [--user U] [--passwd-on-stdin] [--non-inter] [OC_OPTS...] host[:port]

* openconnect runs in the host netns, as the user, in its own session (no terminal signals),
  with PR_SET_PDEATHSIG(SIGTERM): it never outlives nsvpn, even a SIGKILLed one. DTLS stays on.
* The password (from --passwd-file, --passwd-fd, or a getpass prompt when a terminal is
  attached) is written to openconnect's stdin with --passwd-on-stdin: never in argv, never in
  any environment. It is kept in memory for restarts.
* Facts checked against openconnect 9.01 / ocserv 1.1.6: the script is run through /bin/sh -c
  in its own process group, once, with no `reason`; VPNFD is an AF_UNIX SOCK_DGRAM socketpair
  end, one raw IPv4/IPv6 packet per datagram (the server also sends IPv6 link-local packets
  there); at exit openconnect SIGHUPs the script's group. A 0-byte datagram written to VPNFD
  is accepted and ignored while openconnect lives (pings keep flowing between probes) and
  fails with ECONNREFUSED once it is gone (ENOTCONN on later sends): `VpnSession.probe()`.
  openconnect's own reconnects (network blips, SIGUSR2) keep the script and VPNFD: only a gap
  in packets, kernel TCP in the namespace carries on.
* Readiness = the helper (nsvpn.oc_attach) delivered VPNFD over our private unix socket
  (0700 directory, SO_PEERCRED uid check), bounded by `ready_timeout`. If openconnect exits
  first, start() raises UpstreamError with openconnect's own lines ("Login failed. / Failed
  to complete authentication").
* After that, openconnect's exit or a failed probe ends the session: `session_lost` fires,
  openconnect is restarted with capped exponential backoff and a new VpnSession (new VPNFD)
  is published. If the server hands out a different IPv4 address, a namespace configured with
  the old one cannot follow: the upstream fails for good (`fatal`), with a message saying so.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import dataclasses
import errno
import getpass
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
from typing import Deque, Dict, List, Sequence

import trio

from ..urls import OpenconnectUpstreamUrl
from ..vpnenv import VpnEnv, VpnEnvError, parse_vpn_env
from .base import QuietRepeats, UpstreamError, read_lines, wait_exit
from .ssh import runtime_dir, unique_tag

log = logging.getLogger("nsvpn.upstream.openconnect")

READY_TIMEOUT = 30.0
READY_TIMEOUT_INTERACTIVE = 120.0
STOP_GRACE = 3.0
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0
STABLE_AFTER = 30.0  # a session this long resets the backoff
PROBE_INTERVAL = 2.0
OUTPUT_KEEP = 60

_PR_SET_PDEATHSIG = 1
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # pragma: no cover - not Linux/glibc
    _prctl = None

# openconnect's progress chatter: left out of the reasons we show for a failure.
_NOISE = re.compile(
    r"^(POST|GET) https?://|^Please enter your|^Password:|^Username:|^\*+$|^Connected to |"
    r"^SSL negotiation|^XML POST enabled|^Got CONNECT response|^CSTP connected|"
    r"^Established DTLS|^Configured as|^Send BYE|^Attempting to connect|^Got HTTP response|"
    r"^Set up DTLS|^DTLS handshake|^Requested (DTLS|CSTP)|^Opened tun|^Continuing in background"
)
_PIN_NOISE = re.compile(r"^Server certificate verify failed: signer not found")


def add_openconnect_args(parser: argparse.ArgumentParser) -> None:
    """Options for `--via openconnect://...` (cli.py adds them to exec/socks parsers)."""
    g = parser.add_argument_group("openconnect upstream")
    g.add_argument("--oc-opt", action="append", default=[], metavar="OPT",
                   help="pass OPT to openconnect verbatim, one argument each (repeatable; write "
                        "--oc-opt=OPT since OPT starts with a dash), "
                        "e.g. --oc-opt=--servercert=pin-sha256:... --oc-opt=--authgroup=G")
    pw = g.add_mutually_exclusive_group()
    pw.add_argument("--passwd-file", metavar="FILE",
                    help="read the VPN password from the first line of FILE")
    pw.add_argument("--passwd-fd", type=int, metavar="N",
                    help="read the VPN password from file descriptor N (first line)")
    g.add_argument("--oc-ready-timeout", type=float, default=None, metavar="SECONDS",
                   help=f"how long the login may take (default {READY_TIMEOUT:g} s, "
                        f"{READY_TIMEOUT_INTERACTIVE:g} s with a terminal prompt)")
    g.add_argument("--openconnect", default="openconnect", metavar="PATH",
                   help="the openconnect program (default: from PATH)")


def upstream_from_args(url: OpenconnectUpstreamUrl, args: argparse.Namespace
                       ) -> OpenconnectUpstream:
    """An OpenconnectUpstream configured from the options add_openconnect_args() defined."""
    return OpenconnectUpstream(
        url,
        oc_opts=getattr(args, "oc_opt", None) or [],
        passwd_file=getattr(args, "passwd_file", None),
        passwd_fd=getattr(args, "passwd_fd", None),
        ready_timeout=getattr(args, "oc_ready_timeout", None),
        openconnect=find_openconnect(getattr(args, "openconnect", None) or "openconnect"),
    )


def find_openconnect(name: str) -> str:
    """Debian installs openconnect in /usr/sbin, which is not in a normal user's PATH."""
    if os.sep in name:
        return name
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin") or name


def read_password_line(data: bytes, what: str) -> bytes:
    """The first line of `data` (without its line end); UpstreamError when empty."""
    line = data.split(b"\n", 1)[0].rstrip(b"\r")
    if not line:
        raise UpstreamError(f"{what} holds no password (its first line is empty)")
    return line


_AUTH_REFUSED = re.compile(r"Login failed|authentication failed|Invalid (username|password)|"
                           r"Account (is )?(locked|disabled|expired)|Password expired", re.I)


def login_refused(lines: Sequence[str]) -> bool:
    """Did the server refuse our credentials (as opposed to a network or server problem)?"""
    return any(_AUTH_REFUSED.search(ln) for ln in lines)


def failure_reason(lines: Sequence[str], *, pinned: bool = False, keep: int = 4) -> str:
    """What openconnect said that explains a failure, newest last."""
    out = [ln for ln in lines if ln.strip() and not _NOISE.search(ln)
           and not (pinned and _PIN_NOISE.search(ln))]
    return " / ".join(out[-keep:]) if out else "(openconnect printed nothing)"


@dataclasses.dataclass
class VpnSession:
    """One tunnel as delivered by the helper: VPNFD plus its environment."""

    sock: socket.socket  # non-blocking; the only copy of VPNFD on our side
    env: VpnEnv
    raw_env: Dict[str, str]
    generation: int
    helper_pid: int
    lost: trio.Event = dataclasses.field(default_factory=trio.Event)

    @property
    def fd(self) -> int:
        return self.sock.fileno()

    def probe(self) -> bool:
        """0-byte datagram: ignored by a live openconnect, ECONNREFUSED once it is gone."""
        try:
            self.sock.send(b"")
        except BlockingIOError:
            return True  # its queue is full: it is alive, just busy
        except OSError as e:
            if e.errno in (errno.ECONNREFUSED, errno.ENOTCONN, errno.EPIPE, errno.EBADF):
                return False
            raise
        return True

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()


class _OcProcess:
    def __init__(self, popen: subprocess.Popen):
        self.popen = popen
        self.exited = trio.Event()
        self.returncode: int | None = None

    async def watch(self) -> None:
        self.returncode = await wait_exit(self.popen)
        self.exited.set()

    def signal(self, sig: int) -> None:
        if self.popen.returncode is None:
            try:
                self.popen.send_signal(sig)
            except ProcessLookupError:
                pass


def _preexec(parent: int):
    def fn() -> None:  # between fork and exec
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return fn


class OpenconnectUpstream:
    def __init__(
        self,
        url: OpenconnectUpstreamUrl,
        *,
        oc_opts: Sequence[str] = (),
        passwd_file: str | None = None,
        passwd_fd: int | None = None,
        password: bytes | None = None,
        interactive: bool | None = None,
        openconnect: str = "openconnect",
        ready_timeout: float | None = None,
        backoff_first: float = BACKOFF_FIRST,
        backoff_max: float = BACKOFF_MAX,
        probe_interval: float = PROBE_INTERVAL,
        sockdir: str | None = None,
        python: str | None = None,
    ):
        self.url = url
        self.name = str(url)
        self.oc_opts = list(oc_opts)
        self.passwd_file = passwd_file
        self.passwd_fd = passwd_fd
        self._password = password
        if interactive is None:
            interactive = sys.stdin is not None and sys.stdin.isatty()
        self.interactive = interactive
        self.openconnect = openconnect
        prompt_possible = interactive and password is None and passwd_file is None \
            and passwd_fd is None
        self.ready_timeout = ready_timeout or (
            READY_TIMEOUT_INTERACTIVE if prompt_possible else READY_TIMEOUT)
        self.backoff_first = backoff_first
        self.backoff_max = backoff_max
        self._quiet = QuietRepeats()  # restart failures that repeat for hours
        self.probe_interval = probe_interval
        self.sockdir = sockdir
        self.python = python or sys.executable
        self.restarts = 0
        self.fatal: str | None = None
        self.session: VpnSession | None = None
        self.first_env: VpnEnv | None = None
        self._output: Deque[str] = collections.deque(maxlen=OUTPUT_KEEP)
        self._proc: _OcProcess | None = None
        self._listener: socket.socket | None = None
        self._helper_conn: socket.socket | None = None
        self.socket_path: str | None = None
        self._generation = 0
        self._end_cause: str | None = None
        self._changed = trio.Event()
        self._closing = False
        self._scope: trio.CancelScope | None = None
        self._done = trio.Event()
        self._first: trio.Event | None = None
        self._first_error: str | None = None

    # -- public interface ---------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        s = self.session
        return s is not None and not s.lost.is_set() and self.fatal is None

    @property
    def pid(self) -> int | None:
        return self._proc.popen.pid if self._proc is not None else None

    def output_tail(self, n: int = 10) -> List[str]:
        return list(self._output)[-n:]

    async def start(self) -> VpnSession:
        """Log in and wait for the tunnel; UpstreamError with openconnect's reason on failure."""
        if self._first is not None:
            raise RuntimeError("already started")
        if self._password is None:
            self._password = await self._obtain_password()
        if self._password is not None and not self.url.user:
            raise UpstreamError(
                f"{self.name}: a password is given but no user name "
                "(use openconnect://USER@host)")
        self._open_listener()
        self._first = trio.Event()
        trio.lowlevel.spawn_system_task(self._supervise, name=f"nsvpn openconnect {self.name}")
        await self._first.wait()
        if self._first_error is not None:
            await self.aclose()
            raise UpstreamError(self._first_error)
        assert self.session is not None
        return self.session

    async def wait_session(self, after_generation: int = 0) -> VpnSession:
        """The current session once its generation is newer than `after_generation`.

        Raises UpstreamError when the upstream failed for good or is closing."""
        while True:
            if self.fatal is not None:
                raise UpstreamError(self.fatal)
            if self._closing:
                raise UpstreamError(f"{self.name}: closed")
            s = self.session
            if s is not None and s.generation > after_generation and not s.lost.is_set():
                return s
            await self._changed.wait()

    async def wait_fatal(self) -> str:
        """Returns the message once the upstream has failed for good."""
        while self.fatal is None:
            await self._changed.wait()
        return self.fatal

    async def aclose(self) -> None:
        """Stop openconnect (SIGTERM, SIGKILL after a grace period) and the helper; idempotent."""
        self._closing = True
        with trio.CancelScope(shield=True):
            await self._stop_process()
            if self._scope is not None:
                self._scope.cancel()
                await self._done.wait()
            self._end_session()
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            if self.socket_path is not None:
                try:
                    os.unlink(self.socket_path)
                except FileNotFoundError:
                    pass
            self._notify()

    # -- credentials ----------------------------------------------------------------------
    async def _obtain_password(self) -> bytes | None:
        # Blocking reads, before anything else runs: a worker thread would keep a Ctrl-C
        # waiting until the user pressed Enter.
        if self.passwd_file is not None:
            path = os.path.expanduser(self.passwd_file)
            try:
                with open(path, "rb") as f:
                    data = f.read(65536)
            except OSError as e:
                raise UpstreamError(f"cannot read --passwd-file {path}: {e.strerror}") from None
            return read_password_line(data, f"--passwd-file {path}")
        if self.passwd_fd is not None:
            fd = self.passwd_fd
            chunks = []
            try:
                while True:
                    b = os.read(fd, 65536)
                    if not b:
                        break
                    chunks.append(b)
                    if b"\n" in b:
                        break
            except OSError as e:
                raise UpstreamError(f"cannot read --passwd-fd {fd}: {e.strerror}") from None
            finally:
                try:
                    os.close(fd)
                except OSError:
                    pass
            return read_password_line(b"".join(chunks), f"--passwd-fd {fd}")
        if self.interactive and self.url.user:
            prompt = f"VPN password for {self.url.user}@{self.url.host}: "
            try:  # in trio's thread on purpose: Ctrl-C must interrupt the prompt
                pw = getpass.getpass(prompt)
            except (EOFError, OSError):
                raise UpstreamError("no VPN password entered") from None
            return pw.encode()
        return None  # certificate-only logins, or openconnect fails with its own reason

    # -- the rendezvous socket ------------------------------------------------------------
    def _open_listener(self) -> None:
        d = self.sockdir or runtime_dir()
        self.socket_path = os.path.join(d, f"oc-{unique_tag()}.sock")
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        s.bind(self.socket_path)
        s.listen(4)
        s.setblocking(False)
        self._listener = s

    async def _accept_helper(self) -> VpnSession | None:
        """Wait for oc_attach's message; the session it carries (None: fatal error)."""
        assert self._listener is not None
        while self.fatal is None:
            await trio.lowlevel.wait_readable(self._listener)
            try:
                conn, _ = self._listener.accept()
            except BlockingIOError:
                continue
            conn.setblocking(False)
            uid = struct.unpack("3i", conn.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[1]
            if uid != os.getuid():
                log.warning("refused a helper connection from uid %d", uid)
                conn.close()
                continue
            with trio.move_on_after(10):
                while True:
                    await trio.lowlevel.wait_readable(conn)
                    try:
                        data, fds, _, _ = socket.recv_fds(conn, 65536, 4,
                                                          socket.MSG_CMSG_CLOEXEC)
                    except BlockingIOError:
                        continue
                    break
                sess = self._session_from(data, fds)
                if sess is not None:
                    if self._helper_conn is not None:
                        self._helper_conn.close()
                    self._helper_conn = conn
                    return sess
            conn.close()
        return None

    def _session_from(self, data: bytes, fds: List[int]) -> VpnSession | None:
        vpn_sock = None
        try:
            if data[:1] != b"A" or len(fds) != 1:
                raise ValueError("unexpected message")
            info = json.loads(data[1:].decode())
            vpn_sock = socket.socket(fileno=fds.pop())
            if vpn_sock.family != socket.AF_UNIX or vpn_sock.type != socket.SOCK_DGRAM:
                raise ValueError("VPNFD is not an AF_UNIX datagram socket")
            raw = {str(k): str(v) for k, v in dict(info.get("env") or {}).items()}
            env = parse_vpn_env(raw)
        except VpnEnvError as e:
            if vpn_sock is not None:
                vpn_sock.close()
            self._set_fatal(f"{self.name}: {e}")
            return None
        except (ValueError, OSError) as e:
            log.warning("bad message from the attach helper: %s", e)
            if vpn_sock is not None:
                vpn_sock.close()
            return None
        finally:
            for fd in fds:
                os.close(fd)
        vpn_sock.setblocking(False)
        self._generation += 1
        return VpnSession(vpn_sock, env, raw, self._generation, int(info.get("pid") or 0))

    # -- supervision ----------------------------------------------------------------------
    def script_command(self) -> str:
        """The --script value: run by openconnect through /bin/sh -c."""
        return "exec " + " ".join(shlex.quote(a) for a in (
            self.python, "-m", "nsvpn.oc_attach", self.socket_path or ""))

    def server_arg(self) -> str:
        host = f"[{self.url.host}]" if ":" in self.url.host else self.url.host
        return host + (f":{self.url.port}" if self.url.port is not None else "")

    def argv(self) -> List[str]:
        argv = [self.openconnect, "--script-tun", "--script", self.script_command()]
        if self.url.user:
            argv += ["--user", self.url.user]
        if self._password is not None:
            argv.append("--passwd-on-stdin")
        if not self.interactive:
            argv.append("--non-inter")
        argv += self.oc_opts
        argv.append(self.server_arg())
        return argv

    def _pinned(self) -> bool:
        return any(o.startswith("--servercert") for o in self.oc_opts)

    def _spawn(self) -> _OcProcess:
        argv = self.argv()
        log.debug("starting %s", " ".join(shlex.quote(a) for a in argv))
        env = dict(os.environ)
        env.pop("VPNFD", None)
        # `python -m nsvpn.oc_attach` must find this very nsvpn, also when it is not
        # installed (the single-file pyz, a source tree): openconnect's environment only
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (os.path.dirname(here), env.get("PYTHONPATH")) if p)
        try:
            popen = subprocess.Popen(  # noqa: S603 - argv built above, no shell
                argv,
                stdin=subprocess.PIPE if self._password is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,  # one stream keeps openconnect's lines in order
                close_fds=True,
                cwd=os.path.dirname(self.socket_path or "") or None,  # `-m` puts cwd on sys.path
                env=env,
                start_new_session=True,  # no terminal signals; its own process group
                preexec_fn=_preexec(os.getpid()),
            )
        except OSError as e:
            raise UpstreamError(f"cannot run {self.openconnect}: {e.strerror}") from None
        if self._password is not None:
            assert popen.stdin is not None
            try:  # a few bytes: fits the pipe buffer, never blocks
                popen.stdin.write(self._password + b"\n")
                popen.stdin.close()
            except OSError:
                pass  # it died already; its output says why
        return _OcProcess(popen)

    async def _read_output(self, proc: _OcProcess) -> None:
        assert proc.popen.stdout is not None
        await read_lines(proc.popen.stdout, self._line)

    def _line(self, line: str) -> None:
        if not line.strip():
            return
        self._output.append(line)
        log.info("openconnect: %s", line)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _set_fatal(self, msg: str) -> None:
        if self.fatal is None:
            self.fatal = msg
            log.error("%s", msg)
        self._notify()

    def _end_session(self) -> None:
        s = self.session
        if s is not None and not s.lost.is_set():
            s.lost.set()
            s.close()
        if self._helper_conn is not None:
            self._helper_conn.close()  # the helper sees EOF and exits
            self._helper_conn = None

    async def _stop_process(self) -> None:
        proc = self._proc
        if proc is None or proc.popen.returncode is not None:
            return
        proc.signal(signal.SIGTERM)  # openconnect says BYE and SIGHUPs the helper's group
        with trio.move_on_after(STOP_GRACE):
            while proc.popen.poll() is None:
                await trio.sleep(0.02)
        if proc.popen.poll() is None:
            proc.signal(signal.SIGKILL)
            await trio.to_thread.run_sync(proc.popen.wait)

    async def _run_once(self) -> str | None:
        """One openconnect run: None after a session that ended, else why it never came up."""
        self._output.clear()
        self._end_cause = None
        proc = self._spawn()
        self._proc = proc
        result: str | None = None
        async with trio.open_nursery() as n:
            n.start_soon(proc.watch)
            n.start_soon(self._read_output, proc)
            sess: VpnSession | None = None
            with trio.move_on_after(self.ready_timeout) as ready_scope:
                async with trio.open_nursery() as race:
                    async def accept() -> None:
                        nonlocal sess
                        sess = await self._accept_helper()
                        race.cancel_scope.cancel()

                    async def exited() -> None:
                        await proc.exited.wait()
                        await trio.sleep(0.1)  # the helper may still be handing over
                        race.cancel_scope.cancel()

                    race.start_soon(accept)
                    race.start_soon(exited)
            if sess is None:
                if self.fatal is None:
                    if ready_scope.cancelled_caught:
                        result = (f"openconnect did not bring the tunnel up within "
                                  f"{self.ready_timeout:g} s: " + self._reason())
                    else:
                        await self._drain(proc)
                        result = (f"openconnect exited ({self._status(proc)}): "
                                  + self._reason())
                else:
                    result = self.fatal
                await self._stop_process()
                n.cancel_scope.cancel()  # a stray holder of its stdout must not keep us here
                return result
            if self.first_env is not None and sess.env.address4 != self.first_env.address4:
                sess.close()
                self._set_fatal(
                    f"{self.name}: after reconnecting, the VPN server assigned "
                    f"{sess.env.address4} instead of {self.first_env.address4}; the "
                    "namespace cannot change its address, so the session ends here")
                await self._stop_process()
                n.cancel_scope.cancel()
                return self.fatal
            if self.first_env is None:
                self.first_env = sess.env
            self.session = sess
            log.info("tunnel up (generation %d): %s", sess.generation, sess.env.summary())
            self._quiet.reset()
            self._notify()
            if self._first is not None and not self._first.is_set():
                self._first.set()
            # Alive while openconnect runs and VPNFD answers the 0-byte probe.
            while not proc.exited.is_set():
                with trio.move_on_after(self.probe_interval):
                    await proc.exited.wait()
                if not proc.exited.is_set() and not sess.lost.is_set() and not sess.probe():
                    log.warning("VPNFD refused the probe: openconnect's end is gone")
                    self._end_cause = "its VPNFD refused the 0-byte probe"
                    break
            self._end_session()
            self._notify()
            await self._stop_process()
            await self._drain(proc)
            n.cancel_scope.cancel()
        return None

    async def _drain(self, proc: _OcProcess) -> None:
        with trio.move_on_after(0.5):
            await proc.exited.wait()
            await trio.sleep(0.05)

    def _status(self, proc: _OcProcess) -> str:
        rc = proc.popen.returncode
        if rc is None:
            return "still running"
        return f"killed by signal {-rc}" if rc < 0 else f"status {rc}"

    def _ended_message(self) -> str:
        proc = self._proc
        status = self._end_cause or (self._status(proc) if proc is not None else "?")
        return f"openconnect ended ({status}): {self._reason()}"

    def _reason(self) -> str:
        return failure_reason(list(self._output), pinned=self._pinned())

    async def _supervise(self) -> None:
        backoff = self.backoff_first
        try:
            with trio.CancelScope() as scope:
                self._scope = scope
                while not self._closing and self.fatal is None:
                    t0 = trio.current_time()
                    try:
                        err = await self._run_once()
                    except UpstreamError as e:
                        err = str(e)
                    if self._first is not None and not self._first.is_set():
                        self._first_error = err or "openconnect ended during start-up"
                        self._first.set()
                        return
                    if self._closing or self.fatal is not None:
                        return
                    if err and login_refused(self._output):
                        # Trying the same password again and again can lock the account.
                        self._set_fatal(f"{self.name}: the server refused the login when "
                                        f"reconnecting: {err}")
                        return
                    if trio.current_time() - t0 > STABLE_AFTER:
                        backoff = self.backoff_first
                    msg = err or self._ended_message()
                    more = self._quiet.suffix(msg)
                    if more is not None:
                        sys.stderr.write(f"nsvpn: {self.name}: {msg}; restarting in "
                                         f"{backoff:g} s{more}\n")
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, self.backoff_max)
                    self.restarts += 1
        except Exception as e:  # a system task must never raise
            log.exception("openconnect supervisor crashed")
            self._set_fatal(f"{self.name}: supervisor error: {type(e).__name__}: {e}")
            if self._first is not None and not self._first.is_set():
                self._first_error = self.fatal
                self._first.set()
        finally:
            self._end_session()
            self._notify()
            self._done.set()
