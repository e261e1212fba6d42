"""Run and supervise the system `ssh -N -D <socket>` and dial through it.

* ssh listens on a unix socket in a private 0700 runtime directory (ssh creates it 0600): no TCP
  port that other users of the node could borrow. An ssh too old for `-D /path` (see
  UNIX_DYNAMIC_MIN) gets `-D 127.0.0.1:<free port>` and a one-line warning.
* The user's ssh config, agent and keys apply. `BatchMode=yes` unless stdin is a terminal;
  then ssh may prompt (it talks to /dev/tty; its stdin is /dev/null either way) and ignores
  SIGINT, so the terminal's Ctrl-C reaches nsvpn and CMD but not our tunnel.
* Readiness = the socket answers a SOCKS5 greeting, bounded (20 s by default, 120 s when ssh
  may prompt). If ssh exits first, start() raises UpstreamError with ssh's own last messages
  ("Permission denied (publickey).").
* If ssh dies after being ready it is restarted with capped exponential backoff; meanwhile
  `healthy` is False and dials fail at once with DialError(reason="upstream-down").
* ssh gets PR_SET_PDEATHSIG (SIGTERM) so it never outlives us even when we are SIGKILLed; it is
  spawned from the trio thread with subprocess.Popen because trio.lowlevel.open_process forks
  from a worker thread, whose exit would fire the death signal. aclose(): SIGTERM, SIGKILL
  after a grace period, reap, remove the socket.
* ssh -D answers a CONNECT only after the far side's connect() succeeded; on failure it closes
  the connection without a reply and logs "channel N: open failed: connect failed: Connection
  refused" on stderr. We read that line to give the dial the right errno.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import logging
import os
import random
import re
import secrets
import select
import shlex
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from typing import Deque, List, Sequence, Tuple

import trio

from ..urls import SshUpstreamUrl
from .base import (
    DialError,
    QuietRepeats,
    UpstreamError,
    open_tcp,
    open_unix,
    read_lines,
    upstream_down,
    wait_exit,
)
from .socks5 import socks5_dial, socks5_greeting_ok

log = logging.getLogger("nsvpn.upstream.ssh")

# OpenSSH parses `-D /path` as a unix listener since streamlocal forwarding arrived (6.7);
# 9.2 is verified here. Older ones get a loopback TCP port instead.
UNIX_DYNAMIC_MIN = (6, 7)
READY_TIMEOUT = 20.0
READY_TIMEOUT_INTERACTIVE = 120.0
STOP_GRACE = 2.0
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0
STABLE_AFTER = 30.0  # a run this long resets the backoff
STDERR_KEEP = 40
UNIX_PATH_MAX = 100  # sun_path is 108 bytes with the NUL; keep a margin
OPEN_FAILED_WAIT = 0.25  # how long a closed CONNECT waits for ssh's explanation on stderr
# The login node dropped us before authentication: its sshd is over MaxStartups (many pilots
# starting at once: past 10 unauthenticated connections OpenSSH drops new ones at random),
# or busy. The first start tries again, with jitter so that the pilots spread out.
FIRST_TRIES = 5
_TRANSIENT = re.compile(r"kex_exchange_identification|ssh_exchange_identification|"
                        r"banner exchange|connection reset by peer", re.IGNORECASE)

_PR_SET_PDEATHSIG = 1
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # pragma: no cover - not Linux/glibc
    _prctl = None

_OPEN_FAILED = re.compile(r"channel \d+: open failed: (.*)$")
# Phrases in ssh's "open failed" reasons (sshd's strerror text) -> errno.
_OPEN_FAILED_ERRNO = [
    ("refused", errno.ECONNREFUSED),
    ("network is unreachable", errno.ENETUNREACH),
    ("no route to host", errno.EHOSTUNREACH),
    ("host is unreachable", errno.EHOSTUNREACH),
    ("timed out", errno.ETIMEDOUT),
    ("name or service not known", errno.EHOSTUNREACH),
    ("name resolution", errno.EHOSTUNREACH),
    ("nodename nor servname", errno.EHOSTUNREACH),
    ("temporary failure in name resolution", errno.EHOSTUNREACH),
    ("administratively prohibited", errno.EACCES),
]


def open_failed_errno(reason: str) -> int:
    low = reason.lower()
    for phrase, err in _OPEN_FAILED_ERRNO:
        if phrase in low:
            return err
    return errno.ECONNABORTED


def parse_ssh_version(text: str) -> Tuple[int, int] | None:
    """`ssh -V` output ("OpenSSH_9.2p1 Debian-2+deb12u10, OpenSSL ...") -> (9, 2)."""
    m = re.search(r"OpenSSH_(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def ssh_version(ssh: str = "ssh") -> Tuple[Tuple[int, int] | None, str]:
    try:
        p = subprocess.run([ssh, "-V"], stdin=subprocess.DEVNULL, capture_output=True, timeout=5)
    except (OSError, subprocess.SubprocessError) as exc:
        raise UpstreamError(f"cannot run {ssh}: {exc}") from None
    text = (p.stderr + p.stdout).decode(errors="replace").strip()
    return parse_ssh_version(text), text


# Set in the environment of our ssh (and of `ssh -G`), so that a user's config can keep its
# own forwardings out of it: Match host login01 exec "test -z $NSVPN_SSH".
SSH_MARK = "NSVPN_SSH"


def effective_config(ssh: str, opts: Sequence[str], port: int | None,
                     dest: str) -> List[Tuple[str, str]]:
    """What ssh would use for `dest` with the user's config and `opts` (`ssh -G`), as
    (lowercase key, value) lines as our ssh sees them; [] when ssh cannot say."""
    argv = [ssh, "-G", *opts] + (["-p", str(port)] if port is not None else []) + ["--", dest]
    try:
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=5,
                           env={**os.environ, SSH_MARK: "1"})
    except (OSError, subprocess.SubprocessError):
        return []
    if p.returncode != 0:
        return []
    out = []
    for line in p.stdout.decode(errors="replace").splitlines():
        key, _, value = line.strip().partition(" ")
        out.append((key.lower(), value))
    return out


def config_forwards(config: List[Tuple[str, str]]) -> List[str]:
    """The forwardings in an effective_config() ("DynamicForward [127.0.0.1]:1080")."""
    names = {"localforward": "LocalForward", "remoteforward": "RemoteForward",
             "dynamicforward": "DynamicForward"}
    return [f"{names[k]} {v}" for k, v in config if k in names]


def cpu_has_aes(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """AES instructions (x86 AES-NI, the ARMv8 crypto extension): AES-GCM is then several
    times cheaper per byte than ChaCha20-Poly1305."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    return "aes" in value.split()
    except OSError:
        pass
    return False


def faster_ciphers(effective: List[Tuple[str, str]], builtin: List[Tuple[str, str]],
                   aes: bool) -> str | None:
    """A Ciphers= value for nsvpn's own ssh, or None to leave ssh's choice alone. OpenSSH
    prefers chacha20-poly1305, which is right without AES instructions; with them AES-GCM
    moves ~1.5x the bytes per CPU second (measured: 350 -> 530 MB/s for one ssh session), and
    a node's cores are shared with the job. Only when neither the user nor the admin set
    Ciphers (the effective list is ssh's built-in one): then the same ciphers, the AES-GCM
    ones first."""
    mine, default = dict(effective).get("ciphers"), dict(builtin).get("ciphers")
    if not aes or not mine or mine != default:
        return None
    names = mine.split(",")
    gcm = [c for c in names if c.startswith("aes") and c.endswith("-gcm@openssh.com")]
    if not gcm or names[:len(gcm)] == gcm:
        return None
    return ",".join(gcm + [c for c in names if c not in gcm])


# ForkAfterAuthentication (OpenSSH 8.7) forks ssh into the background like -f; older clients
# reject the option name, so it is given only to clients that know it.
FORK_OPTION_MIN = (8, 7)


def supports_unix_dynamic(version: Tuple[int, int] | None) -> bool:
    # Unknown (non-OpenSSH) clients: assume the oldest behaviour.
    return version is not None and version >= UNIX_DYNAMIC_MIN


def unique_tag() -> str:
    """For names in the shared runtime directory: the pid, and random bytes, since pids repeat
    across PID namespaces (containers, batch jobs) that share one /tmp."""
    return f"{os.getpid()}-{secrets.token_hex(3)}"


def runtime_dir() -> str:
    """Node-local private directory for sockets: $XDG_RUNTIME_DIR/nsvpn, else
    /tmp/nsvpn-<uid>-<host>; created 0700, and refused unless it is ours and private.
    A full or read-only /tmp is an UpstreamError that says where and what to do."""
    try:
        return _runtime_dir()
    except OSError as e:
        where = f" {e.filename}" if e.filename else ""
        raise UpstreamError(
            f"cannot make nsvpn's private socket directory{where}: {e.strerror}; "
            "point XDG_RUNTIME_DIR at a writable node-local directory") from None


def _runtime_dir() -> str:
    uid = os.getuid()
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base) and os.stat(base).st_uid == uid:
        path = os.path.join(base, "nsvpn")
    else:
        host = socket.gethostname().split(".")[0][:32] or "localhost"
        path = f"/tmp/nsvpn-{uid}-{host}"
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
        # Squatted by someone else (or, inside a user namespace, a uid that maps elsewhere):
        # a fresh private directory is as good, and nobody can block us that way.
        log.debug("%s is not ours (uid %d); using a fresh private directory", path, st.st_uid)
        return tempfile.mkdtemp(prefix=f"nsvpn-{uid}-", dir="/tmp")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def _preexec(parent: int, ignore_sigint: bool):
    def fn() -> None:  # runs in the child between fork and exec
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # we died before prctl took effect
            os._exit(1)
        if ignore_sigint:
            signal.signal(signal.SIGINT, signal.SIG_IGN)

    return fn


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expand_ssh_opts(opts: Sequence[str]) -> List[str]:
    """`--ssh-opt` values: "Key=Value" (or "Key Value") become `-o Key=Value`; values starting
    with "-" are raw ssh arguments, split like a shell would ("-i ~/.ssh/id_hpc")."""
    out: List[str] = []
    for opt in opts:
        opt = opt.strip()
        if not opt:
            continue
        if opt.startswith("-"):
            out += [os.path.expanduser(a) for a in shlex.split(opt)]
        else:
            out += ["-o", opt]
    return out


def _process_gone(pid: int) -> bool:
    """Exited (a zombie not yet reaped counts) without reaping it: the watcher does that.
    One waitid() call: this runs at every flow's end (reading /proc/PID/stat took ten)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # reaped already
        return True
    except OSError:
        return False


def _peer_closed(sock) -> bool:
    """The other end of a unix stream socket is closed outright (not just shut for writing)."""
    p = select.poll()
    p.register(sock.fileno(), select.POLLIN)
    return any(ev & select.POLLHUP for _fd, ev in p.poll(0))


class _SshChannelStream(trio.abc.HalfCloseableStream):
    """A flow through ssh -D. When ssh dies, its channels end in a plain EOF, which would let
    an app take a cut-short transfer for a complete one: an EOF while ssh is gone is turned
    into a broken stream, so the relay resets the app's connection instead."""

    def __init__(self, stream: trio.abc.Stream, proc: _SshProcess | None):
        self.stream = stream
        self._proc = proc
        self._eof_sent = False

    def _ssh_gone(self) -> bool:
        p = self._proc
        return p is None or p.exited.is_set() or _process_gone(p.popen.pid)

    def eof_is_break(self, sock: socket.socket, eof_sent: bool) -> bool:
        """Does an EOF on this channel's socket mean ssh broke it? ssh ends a channel by
        half-closing the socket first (shutdown), and closes it outright before we sent our
        EOF only when it dies (or aborts the channel); the kernel says so at once with POLLHUP
        on our end. Waiting for ssh to show up as exited would race: a killed process closes
        its sockets before it becomes a zombie."""
        if self._ssh_gone():
            return True
        return not eof_sent and _peer_closed(sock)

    async def send_all(self, data) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        self._eof_sent = True
        await self.stream.send_eof()  # type: ignore[attr-defined]

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self.stream.receive_some(max_bytes)
        if not data:
            sock = getattr(self.stream, "socket", None)
            if self._ssh_gone() if sock is None else self.eof_is_break(sock, self._eof_sent):
                raise trio.BrokenResourceError("ssh exited: the channel ended without a close")
        return data

    async def aclose(self) -> None:
        await self.stream.aclose()

    def raw_parts(self):
        """For the socket pump: the channel's socket, and our broken-EOF rule."""
        from ..sockpump import unwrap

        return unwrap(self.stream, eof_breaks=self.eof_is_break)


class _SshProcess:
    """One ssh run: the Popen, a pidfd to await its exit, and its stderr reader."""

    def __init__(self, popen: subprocess.Popen):
        self.popen = popen
        self.exited = trio.Event()
        self.returncode: int | None = None

    async def watch(self) -> None:
        self.returncode = await wait_exit(self.popen)
        self.exited.set()


class SshUpstream:
    def __init__(
        self,
        url: SshUpstreamUrl,
        *,
        ssh_opts: Sequence[str] = (),
        ssh: str = "ssh",
        index: int = 0,
        sockdir: str | None = None,
        interactive: bool | None = None,
        ready_timeout: float | None = None,
        backoff_max: float = BACKOFF_MAX,
        force_tcp: bool = False,
    ):
        self.url = url
        self.name = str(url)
        self.ssh = ssh
        self.ssh_opts = list(ssh_opts)
        self.index = index
        self.sockdir = sockdir
        if interactive is None:
            interactive = os.isatty(0)
        self.interactive = interactive
        self.ready_timeout = ready_timeout or (
            READY_TIMEOUT_INTERACTIVE if interactive else READY_TIMEOUT
        )
        self.backoff_max = backoff_max
        self.force_tcp = force_tcp
        self.socket_path: str | None = None
        self.tcp_port: int | None = None
        self.version: Tuple[int, int] | None = None
        self.restarts = 0
        self.last_error = ""
        self._stderr: Deque[str] = collections.deque(maxlen=STDERR_KEEP)
        self.first_retries = 0  # dropped before authentication at the first start
        self.config_forwards: List[str] = []  # the user's own, from `ssh -G`
        self.ciphers: str | None = None  # our order of ssh's own cipher list (start())
        self._quiet = QuietRepeats()  # restart failures that repeat for hours
        self._open_failures: Deque[Tuple[float, str]] = collections.deque(maxlen=256)
        self._stderr_event = trio.Event()
        self._proc: _SshProcess | None = None
        self._ready = False
        self._closing = False
        self._warned_control = False
        self._scope: trio.CancelScope | None = None
        self._done = trio.Event()
        self._first: trio.Event | None = None
        self._first_error: str | None = None

    # -- public interface ---------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self._ready and self._proc is not None and not self._proc.exited.is_set()

    @property
    def pid(self) -> int | None:
        return self._proc.popen.pid if self._proc is not None else None

    def stderr_tail(self, n: int = 5) -> List[str]:
        return list(self._stderr)[-n:]

    async def start(self) -> None:
        """Start ssh and wait until its SOCKS socket answers; UpstreamError on failure."""
        if self._first is not None:
            raise RuntimeError("already started")
        self.version, vtext = ssh_version(self.ssh)
        if self.force_tcp or not supports_unix_dynamic(self.version):
            if not self.force_tcp:
                sys.stderr.write(
                    f"nsvpn: warning: {vtext.split(',')[0] or self.ssh} cannot listen on a unix "
                    "socket for -D; using a 127.0.0.1 TCP port (other local users could use "
                    "this tunnel)\n"
                )
            self.force_tcp = True
        else:
            d = self.sockdir or runtime_dir()
            name = f"ssh-{unique_tag()}-{self.index}.sock"
            if len(os.path.join(d, name).encode()) > UNIX_PATH_MAX:
                # A long $XDG_RUNTIME_DIR: the /tmp fallback is short and just as private.
                saved = os.environ.pop("XDG_RUNTIME_DIR", None)
                try:
                    d = runtime_dir()
                finally:
                    if saved is not None:
                        os.environ["XDG_RUNTIME_DIR"] = saved
            self.socket_path = os.path.join(d, name)
        conf = effective_config(self.ssh, expand_ssh_opts(self.ssh_opts), self.url.port,
                                self.url.ssh_destination())
        self.config_forwards = config_forwards(conf)
        if conf and cpu_has_aes():  # ssh's built-in defaults: no user or system config
            self.ciphers = faster_ciphers(
                conf, effective_config(self.ssh, ["-F", "/dev/null"], None, "localhost"), True)
        if self.config_forwards:
            # They come with every ssh to this host, ours too: one busy port (the user's own
            # session, a second nsvpn on this node) would end ours under ExitOnForwardFailure.
            sys.stderr.write(
                f"nsvpn: warning: your ssh config adds forwardings for {self.url.host} "
                f"({', '.join(self.config_forwards)}); nsvpn's ssh opens them too while it "
                "runs (other local users can use TCP ones). To keep them out of it: Match host "
                f"{self.url.host} exec \"test -z ${SSH_MARK}\"\n")
        self._first = trio.Event()
        trio.lowlevel.spawn_system_task(self._supervise, name=f"nsvpn ssh {self.name}")
        await self._first.wait()
        if self._first_error is not None:
            await self.aclose()
            raise UpstreamError(self._first_error)

    async def dial_tcp(self, host: str, port: int, *, timeout: float) -> trio.abc.Stream:
        if not self.healthy:
            why = f" (last: {self.last_error})" if self.last_error else ""
            raise upstream_down(f"{self.name}: ssh is not connected, restarting{why}")
        stream = await socks5_dial(
            self._connect,
            host,
            port,
            timeout=timeout,
            proxy_name=f"ssh {self.url.host}",
            on_eof=self._explain_eof,
        )
        return _SshChannelStream(stream, self._proc)

    async def aclose(self) -> None:
        self._closing = True
        self._ready = False
        with trio.CancelScope(shield=True):
            await self._stop_process()
            if self._scope is not None:
                self._scope.cancel()
                await self._done.wait()
            self._remove_socket()

    # -- dialing --------------------------------------------------------------------------
    async def _connect(self) -> trio.abc.Stream:
        if self.socket_path is not None:
            return await open_unix(self.socket_path)
        assert self.tcp_port is not None
        return await open_tcp("127.0.0.1", self.tcp_port)

    async def _explain_eof(self, host: str, port: int) -> DialError:
        """ssh closed our CONNECT without a reply: find its "open failed" line.

        Lines are not matched to dials (ssh names only its channel numbers); with several
        failures at once each dial takes the oldest unclaimed line, so at worst two
        simultaneous failures swap their reasons.
        """

        def claim() -> DialError | None:
            now = trio.current_time()
            while self._open_failures:
                t, reason = self._open_failures.popleft()
                if now - t < 5.0:
                    return DialError(
                        open_failed_errno(reason), f"{host}:{port} via {self.url.host}: {reason}"
                    )
            return None

        with trio.move_on_after(OPEN_FAILED_WAIT):
            while True:
                found = claim()
                if found is not None:
                    return found
                if self._proc is None or self._proc.exited.is_set():
                    break
                await self._stderr_event.wait()
        found = claim()
        if found is not None:
            return found
        if not self.healthy:
            return upstream_down(f"{self.name}: ssh went away during the dial")
        return DialError(
            errno.ECONNABORTED, f"{host}:{port} via {self.url.host}: ssh closed the connection"
        )

    # -- supervision ----------------------------------------------------------------------
    def _argv(self) -> List[str]:
        if self.socket_path is not None:
            listen = self.socket_path
        else:
            self.tcp_port = _free_loopback_port()
            listen = f"127.0.0.1:{self.tcp_port}"
        # Never a connection-sharing master or client, whatever ~/.ssh/config or --ssh-opt
        # say (ssh takes the first value given, so these go first). With ControlPersist the
        # master forks into the background: nsvpn would watch an ssh that exited with 0
        # and leave the master (and our -D socket) running after it ends; as a client of
        # someone else's master, the -D request fails or outlives us in that master. The
        # same goes for forking after authentication.
        argv = [self.ssh, "-N", "-D", listen, "-o", "ControlMaster=no", "-o", "ControlPath=none"]
        if self.version is not None and self.version >= FORK_OPTION_MIN:
            argv += ["-o", "ForkAfterAuthentication=no"]  # -f as a config option: the same
        # User options next: for ssh the first value obtained wins, so theirs override ours.
        user_opts = expand_ssh_opts(self.ssh_opts)
        if any(o.lower().startswith("control") for o in user_opts) and not self._warned_control:
            self._warned_control = True
            log.warning("ssh connection sharing (Control* options) is not used for nsvpn's own "
                        "ssh; to share a master, run your own `ssh -D` through it and use "
                        "--via socks5://")
        if not any("loglevel" in o.lower() for o in user_opts):
            # The "open failed" lines that explain refused dials are INFO messages; many
            # users' ssh configs say LogLevel ERROR or QUIET. An explicit --ssh-opt wins.
            argv += ["-o", "LogLevel=INFO"]
        argv += user_opts
        argv += [
            "-o",
            # With forwardings of the user's own (see start()) a busy port must not end our
            # ssh; our own -D failing is then seen on stderr (_wait_ready).
            f"ExitOnForwardFailure={'no' if self.config_forwards else 'yes'}",
            "-o",
            "ServerAliveInterval=15",
            "-o",
            "ServerAliveCountMax=3",
            "-o",
            "StreamLocalBindUnlink=yes",
            "-o",
            f"ConnectTimeout={max(1, int(self.ready_timeout))}",
        ]
        if not self.interactive:
            argv += ["-o", "BatchMode=yes"]
        if self.ciphers:  # after the user's options: a Ciphers of theirs comes first, and wins
            argv += ["-o", f"Ciphers={self.ciphers}"]
        if self.url.port is not None:
            argv += ["-p", str(self.url.port)]
        argv += ["--", self.url.ssh_destination()]
        return argv

    def _spawn(self) -> _SshProcess:
        self._remove_socket()
        self._stderr.clear()  # what the last one said was reported when it ended
        argv = self._argv()
        log.debug("starting %s", " ".join(shlex.quote(a) for a in argv))
        popen = subprocess.Popen(  # noqa: S603 - argv built above, no shell
            argv,
            # Prompts go to /dev/tty, never through stdin: CMD keeps the terminal's input.
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            close_fds=True,
            # Batch: own session, so no terminal signal reaches it. Interactive: it must keep
            # the controlling terminal to prompt; it ignores SIGINT instead.
            start_new_session=not self.interactive,
            preexec_fn=_preexec(os.getpid(), self.interactive),
            env={**os.environ, SSH_MARK: "1"},
        )
        return _SshProcess(popen)

    async def _read_stderr(self, proc: _SshProcess) -> None:
        assert proc.popen.stderr is not None
        await read_lines(proc.popen.stderr, self._stderr_line)

    def _stderr_line(self, line: str) -> None:
        if not line.strip():
            return
        m = _OPEN_FAILED.search(line)
        if m:
            self._open_failures.append((trio.current_time(), m.group(1)))
            log.debug("ssh %s: %s", self.url.host, line)
        elif line.startswith("debug"):
            log.debug("ssh %s: %s", self.url.host, line)
        else:
            self._stderr.append(line)
            log.info("ssh %s: %s", self.url.host, line)
        # Wake every waiting dial; later waiters wait for the next line.
        event, self._stderr_event = self._stderr_event, trio.Event()
        event.set()

    def _own_forward_failed(self) -> bool:
        """ssh said it cannot listen where our -D goes (seen only without
        ExitOnForwardFailure, which would have ended it)."""
        mine = self.socket_path or f":{self.tcp_port}"  # "bind [127.0.0.1]:PORT: ..."
        return any(mine in line and ("bind" in line or "listen" in line)
                   for line in self._stderr)

    def _say_failure(self, text: str) -> None:
        more = self._quiet.suffix(text)
        if more is not None:
            log.warning("%s: %s%s", self.name, text, more)

    def _messages(self) -> str:
        tail = [line for line in self._stderr if not line.startswith("Warning: Permanently")]
        return " / ".join(tail[-4:]) if tail else "(ssh printed nothing)"

    async def _wait_ready(self, proc: _SshProcess) -> str | None:
        """None when ready, else the reason it is not."""
        deadline = trio.current_time() + self.ready_timeout
        while trio.current_time() < deadline:
            if proc.exited.is_set():
                await trio.sleep(0.05)  # let the stderr reader drain the last lines
                return (
                    f"ssh to {self.url.ssh_destination()} exited with status "
                    f"{proc.returncode}: {self._messages()}"
                )
            present = self.socket_path is None or os.path.exists(self.socket_path)
            if present and await socks5_greeting_ok(self._connect, 1.0):
                return None
            if self.config_forwards and self._own_forward_failed():
                return (f"ssh to {self.url.ssh_destination()} could not open nsvpn's "
                        f"forwarding: {self._messages()}")
            with trio.move_on_after(0.05):
                await proc.exited.wait()
        why = self._messages()
        if self.interactive and not self._stderr:
            # its prompts go to the terminal, not to our pipe: say what it most likely did
            why = ("ssh printed nothing here; it may have been waiting for an answer at the "
                   "terminal (password, passphrase or host key)")
        return (f"ssh to {self.url.ssh_destination()} not ready after "
                f"{self.ready_timeout:g} s: {why}")

    async def _supervise(self) -> None:
        assert self._first is not None
        backoff = BACKOFF_FIRST
        first_try = 1
        try:
            with trio.CancelScope() as scope:
                self._scope = scope
                async with trio.open_nursery() as nursery:
                    while not self._closing:
                        proc = self._spawn()
                        self._proc = proc
                        nursery.start_soon(proc.watch)
                        nursery.start_soon(self._read_stderr, proc)
                        why = await self._wait_ready(proc)
                        if why is not None:
                            self.last_error = why
                            await self._stop_process()
                            if not self._first.is_set():
                                if first_try < FIRST_TRIES and proc.exited.is_set() \
                                        and _TRANSIENT.search(why):
                                    delay = random.uniform(0.5, 1.5) * 2 ** (first_try - 1)
                                    first_try += 1
                                    self.first_retries += 1
                                    log.info("%s: %s; trying again in %.1f s", self.name, why,
                                             delay)
                                    await trio.sleep(delay)
                                    continue
                                self._first_error = why
                                self._first.set()
                                break
                            self._say_failure(f"{why}; retrying in {backoff:g} s")
                        else:
                            self._ready = True
                            started = trio.current_time()
                            if not self._first.is_set():
                                self._first.set()
                            else:
                                log.warning("%s: ssh is back", self.name)
                            self._quiet.reset()
                            await proc.exited.wait()
                            self._ready = False
                            if self._closing:
                                break
                            await trio.sleep(0.05)  # stderr reader: collect the last words
                            self.last_error = (
                                f"ssh exited with status {proc.returncode}: {self._messages()}"
                            )
                            self._say_failure(f"{self.last_error}; restarting in {backoff:g} s")
                            if trio.current_time() - started > STABLE_AFTER:
                                backoff = BACKOFF_FIRST
                        await trio.sleep(backoff)
                        backoff = min(backoff * 2, self.backoff_max)
                        self.restarts += 1
                    nursery.cancel_scope.cancel()
        except Exception as exc:  # a system task must not crash the run
            log.exception("ssh supervisor for %s failed", self.name)
            if not self._first.is_set():
                self._first_error = f"ssh supervisor failed: {exc}"
        finally:
            self._ready = False
            if not self._first.is_set():
                self._first_error = self._first_error or "ssh upstream closed while starting"
                self._first.set()
            with trio.CancelScope(shield=True):
                await self._stop_process()
            self._done.set()

    async def _stop_process(self) -> None:
        proc = self._proc
        if proc is None:
            return
        p = proc.popen
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            with trio.move_on_after(STOP_GRACE):
                while p.poll() is None:
                    await trio.sleep(0.02)
            if p.poll() is None:
                try:
                    p.kill()
                except ProcessLookupError:
                    pass
                p.wait()
        if p.stderr is not None and not p.stderr.closed:
            p.stderr.close()

    def _remove_socket(self) -> None:
        if self.socket_path is not None:
            try:
                os.unlink(self.socket_path)
            except OSError:  # gone already; anything else there makes ssh's bind say why
                pass
