"""Named shared tunnels: `nsvpn up/status/down` and `nsvpn exec --name` (issue 7).

`up` forks a daemon (double fork + setsid). In namespace mode it runs the same relay as `exec`
(run._run_ns; bridge.run_vpn_ns for openconnect://) with a tiny *holder* process as CMD: the
holder keeps the user+net+mount namespace alive and dies with the daemon (PDEATHSIG from
namespace.spawn). In preload mode it runs the preload front (tunnel_preload.py) and `exec
--name` starts CMD under the shim pointed at that front. A VPN password is read by `up`
(file, fd or prompt) before the daemon exists and handed to it in memory only. Until it is
ready, the daemon's stderr is a pipe to `up`, which echoes it (errors, -v progress) and
returns when a marker line says the upstream and the namespace (or front) are up. In
namespace mode `exec --name` joins the holder's namespaces (setns user, then net, then mount:
the only order the kernel accepts for a non-root joiner), keeps the user's credentials
(identity map) and the cwd, and execs CMD.

State is node-local, never in $HOME (shared between nodes): $XDG_RUNTIME_DIR/nsvpn/tunnels/N
or /tmp/nsvpn-<uid>-<host>/tunnels/N (0700), holding state.json (pids with their start times,
so a recycled pid is not mistaken for the daemon; mode; netns inode or the front's control
socket; upstreams), front.json in preload mode (0600: the shim environment with the front's
per-session secret) and control.sock (0600; one JSON request line, one JSON reply line:
{"cmd": "status"} or {"cmd": "down"}).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import re
import select
import shutil
import signal
import socket
import sys
import time
from typing import List, Optional

from .cli import EXIT_SETUP, EXIT_UPSTREAM, EXIT_USAGE
from .nested import without_session

NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
READY = "nsvpn-up-ready"
FAILED = "nsvpn-up-failed"
PID = "nsvpn-up-pid"
UP_TIMEOUT = 120.0  # the upstream's own start is bounded; this only guards against a hang
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000

# The holder: no fds of ours, waits for SIGTERM/SIGINT (from the daemon) or PDEATHSIG. The
# daemon forwards the signals it gets to its CMD: SIGUSR1 (counter dump), SIGUSR2 and SIGHUP
# must not end the tunnel.
HOLDER = ("import os,signal\n"
          "fd=os.open('/dev/null',os.O_RDWR)\n"
          "[os.dup2(fd,i) for i in (0,1,2)]\n"
          "signal.signal(signal.SIGINT,signal.SIG_DFL)\n"
          "[signal.signal(s,signal.SIG_IGN) for s in "
          "(signal.SIGUSR1,signal.SIGUSR2,signal.SIGHUP)]\n"
          "while True: signal.pause()\n")


def _err(msg: str) -> None:
    sys.stderr.write(f"nsvpn: {msg}\n")
    sys.stderr.flush()


class TunnelError(Exception):
    """A user-facing problem with a named tunnel (exit 2)."""


# -- state ---------------------------------------------------------------------------------

def _private_dir(path: str) -> str:
    """mkdir -p with 0700, refusing a directory someone else owns or can read."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if st.st_uid != os.getuid() or not os.path.isdir(path) or os.path.islink(path):
        raise TunnelError(f"{path} is not a directory owned by you: refusing to use it")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def state_root() -> str:
    rt = os.environ.get("XDG_RUNTIME_DIR")
    if rt and os.path.isdir(rt) and os.access(rt, os.W_OK):
        base = os.path.join(_private_dir(os.path.join(rt, "nsvpn")), "tunnels")
    else:
        host = socket.gethostname().split(".")[0] or "localhost"
        base = os.path.join(_private_dir(f"/tmp/nsvpn-{os.getuid()}-{host}"), "tunnels")
    return _private_dir(base)


def check_name(name: str) -> str:
    if not NAME_RE.match(name or ""):
        raise TunnelError(f"bad tunnel name {name!r}: use letters, digits, '_', '.', '-' "
                          "(at most 64, not starting with '.' or '-')")
    return name


def tunnel_dir(name: str) -> str:
    return os.path.join(state_root(), check_name(name))


def _starttime(pid: int) -> Optional[int]:
    """Start time of a live (non-zombie) process, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def _alive(pid: Optional[int], start: Optional[int]) -> bool:
    return bool(pid) and _starttime(pid) is not None and _starttime(pid) == start


def read_state(d: str) -> Optional[dict]:
    try:
        with open(os.path.join(d, "state.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_state(d: str, state: dict) -> None:
    tmp = os.path.join(d, "state.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(state, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(d, "state.json"))


def tunnel_state(d: str) -> dict:
    """state.json plus "state": running / dead / starting (pid file only, daemon alive)."""
    st = read_state(d)
    if st is None:
        try:
            with open(os.path.join(d, "pid"), encoding="utf-8") as f:
                pid, start = (int(x) for x in f.read().split())
        except (OSError, ValueError):
            pid, start = 0, None
        st = {"name": os.path.basename(d), "pid": pid, "pid_start": start}
        st["state"] = "starting" if _alive(pid, start) else "dead"
        return st
    st["state"] = "running" if _alive(st.get("pid"), st.get("pid_start")) else "dead"
    return st


class _SocketPath:
    """`with _SocketPath(d, name) as path:` a path to d/name that fits sockaddr_un (108
    bytes): the plain one when short enough, else one through an O_PATH fd of d
    (/proc/self/fd/N/name), so a long $XDG_RUNTIME_DIR or tunnel name cannot break bind or
    connect."""

    def __init__(self, d: str, name: str) -> None:
        self.d, self.name, self.fd = d, name, -1

    def __enter__(self) -> str:
        path = os.path.join(self.d, self.name)
        if len(path) <= 100:
            return path
        self.fd = os.open(self.d, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        return f"/proc/self/fd/{self.fd}/{self.name}"

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)


def control(d: str, request: dict, timeout: float = 3.0) -> dict:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        with _SocketPath(d, "control.sock") as path:
            s.connect(path)
        s.sendall(json.dumps(request).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            b = s.recv(65536)
            if not b:
                break
            buf += b
    finally:
        s.close()
    return json.loads(buf.decode())


# -- up / the daemon -------------------------------------------------------------------------

def run_up(args: argparse.Namespace) -> int:
    from . import config as cfg
    from . import run
    from .upstream.openconnect import OpenconnectUpstream

    try:
        d = tunnel_dir(args.name)
        cfg.apply_to_args(args)
        pool = run.build_upstreams(args.via, args)
        direct = run.direct_networks(args)
        for c in args.direct:
            run.routing.Router(direct=[c])  # validates the CIDR
    except (TunnelError, cfg.ConfigError, ValueError) as e:
        _err(str(e))
        return EXIT_USAGE
    mode = run.choose_mode(args.mode or "auto", args.quiet)
    if mode is None:
        return EXIT_SETUP
    args.mode = mode
    if os.path.isdir(d):
        st = tunnel_state(d)
        if st["state"] != "dead":
            _err(f"tunnel {args.name} is already {st['state']} (pid {st.get('pid')}); "
                 f"`nsvpn down {args.name}` first")
            return EXIT_USAGE
        if args.verbose:
            _err(f"up: cleaning up dead tunnel {args.name}")
        _cleanup(d, st)
    if isinstance(pool, OpenconnectUpstream) and not _vpn_password(pool):
        return EXIT_UPSTREAM
    try:
        os.mkdir(d, 0o700)
    except FileExistsError:
        _err(f"tunnel {args.name} is being started by another nsvpn up")
        return EXIT_USAGE
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # intermediate: new session, fork the daemon, leave
        try:
            os.close(r)
            os.setsid()
            if os.fork() == 0:
                _daemon(args, pool, direct, d, w)
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    daemon: List[int] = []
    try:
        return _await_ready(r, args, d, daemon)
    except KeyboardInterrupt:  # Ctrl-C while waiting: no half-started tunnel stays behind
        if daemon:
            os.kill(daemon[0], signal.SIGTERM)
        raise


def _vpn_password(oc) -> bool:
    """Read the VPN password now, while `up` still has its terminal and its fds (the daemon
    has neither); the daemon gets it in memory (for openconnect's stdin and its restarts),
    never in an argv or environment. False after saying why."""
    import trio

    from .upstream.base import UpstreamError

    try:
        pw = trio.run(oc._obtain_password)
    except UpstreamError as e:
        _err(f"upstream failed: {e}")
        return False
    oc._password = pw
    oc.passwd_fd = oc.passwd_file = None
    oc.interactive = False  # no terminal in the daemon: openconnect must not prompt
    return True


def _await_ready(r: int, args: argparse.Namespace, d: str, daemon_pid: List[int]) -> int:
    """Echo the daemon's early stderr until its ready/failed marker (or EOF)."""
    buf = b""
    daemon = 0
    deadline = time.monotonic() + UP_TIMEOUT
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([r], [], [], left)[0]:
            _err(f"up: tunnel {args.name} not ready within {UP_TIMEOUT:g} s; stopping it")
            if daemon:
                os.kill(daemon, signal.SIGKILL)
            return EXIT_SETUP
        chunk = os.read(r, 65536)
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            text = line.decode(errors="replace")
            if text.startswith(PID + " "):
                daemon = int(text.split()[1])
                daemon_pid.append(daemon)
            elif text.startswith(READY):
                os.close(r)
                if args.verbose:
                    _err(f"up: tunnel {args.name} is ready (daemon pid {daemon}, "
                         f"state in {d})")
                return 0
            elif text.startswith(FAILED + " "):
                os.close(r)
                return int(text.split()[1])
            else:
                sys.stderr.write(text + "\n")
                sys.stderr.flush()
        if not chunk:
            os.close(r)
            _err(f"up: the daemon of tunnel {args.name} ended before it was ready")
            return EXIT_SETUP


def _daemon(args: argparse.Namespace, pool, direct: List[str], d: str, w: int) -> None:
    """The background process (never returns). fd 2 is the pipe to `up` until ready."""
    import functools

    import trio

    from . import run
    from .upstream.openconnect import OpenconnectUpstream

    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(w, 2)
    os.close(w)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    me = os.getpid()
    try:
        with open(os.path.join(d, "pid"), "w", encoding="utf-8") as f:
            f.write(f"{me} {_starttime(me)}\n")
    except OSError as e:  # a full /tmp: say so, `up` echoes it (else it only sees EOF)
        _err(f"tunnel {args.name}: cannot write its state in {d}: {e.strerror}")
        shutil.rmtree(d, ignore_errors=True)
        print(f"{FAILED} {EXIT_SETUP}", file=sys.stderr, flush=True)
        os._exit(EXIT_SETUP)
    print(f"{PID} {me}", file=sys.stderr, flush=True)
    code = 1
    ready_seen = []
    vpn = isinstance(pool, OpenconnectUpstream)
    try:
        run._setup_logging(args.verbose, args.log_file)
        if args.verbose:
            _err("up: waiting for the upstream: " + ", ".join(args.via))

        async def on_ready(tunnel) -> None:
            """Serve the control socket of a tunnel that is up (never returns)."""
            if args.verbose:
                _err(f"up: upstream ready; {tunnel.mode} tunnel up; starting the control "
                     "socket")

            async def serve(stream) -> None:
                await _serve_one(stream, tunnel)

            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old = os.umask(0o177)
            try:
                with _SocketPath(d, "control.sock") as path:
                    await sock.bind(path)
            finally:
                os.umask(old)
            sock.listen(16)
            state = {
                "name": args.name, "pid": me, "pid_start": _starttime(me),
                "mode": tunnel.mode, "kind": tunnel.kind,
                "upstreams": [u["name"] for u in tunnel.upstreams()],
                "started": time.time(), "log_file": args.log_file,
            }
            state.update(tunnel.state_extra())
            _write_state(d, state)
            ready_seen.append(True)
            print(READY, file=sys.stderr, flush=True)
            # From here on nobody reads the pipe: stderr goes to the log file or nowhere.
            out = os.open(args.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600) \
                if args.log_file else null
            os.dup2(out, 2)
            await trio.serve_listeners(serve, [trio.SocketListener(sock)])

        holder = [sys.executable, "-I", "-S", "-c", HOLDER]
        os.chdir("/")  # the daemon must not pin a cwd (unmounts, deleted dirs)
        if args.mode == "preload":
            from .tunnel_preload import serve_preload

            code = trio.run(serve_preload, args, pool, direct, d, on_ready,
                            lambda t: _dump(t.status()))
        elif vpn:
            from .bridge import run_vpn_ns

            async def ready_vpn(child, stats, relay) -> None:
                tunnel = _VpnNsTunnel(child, stats, relay, pool)
                async with trio.open_nursery() as n:
                    n.start_soon(on_ready, tunnel)
                    # SIGUSR1: the counters (opened after the bridge's forwarder, so this
                    # receiver gets it; the holder would only ignore it)
                    with trio.open_signal_receiver(signal.SIGUSR1) as sigs:
                        async for _ in sigs:
                            _dump(tunnel.status())

            code = trio.run(functools.partial(
                run_vpn_ns, holder, pool, quiet=not args.verbose, direct=list(args.direct),
                host_direct=not args.no_direct, ready=ready_vpn))
        else:
            async def ready_ns(child, stack, relay, pool) -> None:
                await on_ready(_NsTunnel(child, stack, relay, pool))

            code = trio.run(run._run_ns, args, holder, pool, direct, ready_ns)
    except BaseException as e:  # never a traceback in a daemon's void
        _err(f"tunnel {args.name}: {type(e).__name__}: {e}")
        code = 5
    finally:
        st = read_state(d)
        if st is None or st.get("pid") == me:  # not already replaced by a new `up`
            shutil.rmtree(d, ignore_errors=True)
        if not ready_seen:  # after the removal: `up` returns on this line
            try:
                print(f"{FAILED} {code or 1}", file=sys.stderr, flush=True)
            except OSError:
                pass
        os._exit(code)


def _dump(d: dict) -> None:
    """SIGUSR1 in preload mode: the counters as one log line, whatever the -v level."""
    import logging

    rec = logging.LogRecord("nsvpn.counters", logging.WARNING, __file__, 0, "counters %s",
                            (json.dumps(d, sort_keys=True),), None)
    for h in logging.getLogger().handlers:
        h.handle(rec)


def _upstream_list(pool) -> List[dict]:
    return [{"name": u.name, "healthy": bool(u.healthy)}
            for u in getattr(pool, "upstreams", [pool])]


class _NsTunnel:
    """Namespace mode, ssh/SOCKS5 upstreams: the userspace stack + relay (run._run_ns)."""

    mode, kind = "ns", "socks"

    def __init__(self, child, stack, relay, pool) -> None:
        self.child, self.stack, self.relay, self.pool = child, stack, relay, pool

    def upstreams(self) -> List[dict]:
        return _upstream_list(self.pool)

    def state_extra(self) -> dict:
        pid = self.child.pid
        return {"holder_pid": pid, "holder_start": _starttime(pid),
                "netns": os.stat(f"/proc/{pid}/ns/net").st_ino}

    def status(self) -> dict:
        c = self.stack.counters
        return {"stack": c, "relay": self.relay.stats(), "upstreams": self.upstreams(),
                "flows": c["tcp_flows"] + c["udp_flows"],
                "flows_total": c["tcp_flows_total"] + c["udp_flows_total"],
                "bytes_up": c["bytes_in"], "bytes_down": c["bytes_out"],
                "drops": sum(c["drops"].values())}

    def stop(self) -> None:
        self.child.signal(signal.SIGTERM)  # the holder ends -> the relay tears all down


class _VpnNsTunnel(_NsTunnel):
    """Namespace mode, openconnect: the packet bridge (bridge.py); kernel TCP in the netns,
    so nsvpn sees packets, not flows (flows are those of the direct-network relay)."""

    kind = "vpn"

    def __init__(self, child, stats, relay, oc) -> None:
        self.child, self.stats, self.relay, self.pool = child, stats, relay, oc

    def status(self) -> dict:
        s = self.stats
        d = {"bridge": dict(vars(s)), "upstreams": self.upstreams(),
             "bytes_up": s.to_vpn_bytes, "bytes_down": s.to_tun_bytes, "drops": s.dropped,
             "vpn": self.pool.session.env.summary() if self.pool.session else None}
        if self.relay is not None:
            d["relay"] = self.relay.stats()
            d["flows"] = d["relay"]["tcp_flows"] + d["relay"]["udp_flows"]
        return d


async def _serve_one(stream, tunnel) -> None:
    import trio

    buf = b""
    with trio.move_on_after(3):
        while b"\n" not in buf and len(buf) < 4096:
            b = await stream.receive_some(4096)
            if not b:
                break
            buf += b
    try:
        req = json.loads(buf.decode() or "{}")
    except ValueError:
        req = {}
    cmd = req.get("cmd") if isinstance(req, dict) else None
    if cmd == "status":
        reply = tunnel.status()
    elif cmd == "down":
        reply = {"ok": True}
    else:
        reply = {"error": f"unknown request {cmd!r}"}
    try:
        await stream.send_all(json.dumps(reply, sort_keys=True).encode() + b"\n")
    except trio.BrokenResourceError:
        pass
    await stream.aclose()
    if cmd == "down":
        tunnel.stop()


# -- exec --name -----------------------------------------------------------------------------

def _setns(fd: int, nstype: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, nstype) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _running(name: str) -> dict:
    d = tunnel_dir(name)
    if not os.path.isdir(d):
        raise TunnelError(f"no tunnel named {name} (start it with `nsvpn up --name {name} "
                          "--via URL`)")
    st = tunnel_state(d)
    ok = st["state"] == "running" and (
        st.get("mode") == "preload" or _alive(st.get("holder_pid"), st.get("holder_start")))
    if not ok:
        raise TunnelError(f"tunnel {name} is {st['state'] if st['state'] != 'running' else 'dead'}"
                          f" (`nsvpn down {name}` cleans it up)")
    return st


async def _say_when_gone(name: str, daemon_pid: Optional[int]) -> None:
    """Once the tunnel's daemon is gone, a command still running in it has no network any
    more (its connects fail at once): say so, once, so that the failures have a reason."""
    import trio

    if not daemon_pid:
        return
    try:
        fd = os.pidfd_open(daemon_pid)
    except (AttributeError, OSError):
        return
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)
    _err(f"tunnel {name} ended (its daemon, pid {daemon_pid}, is gone): the command has no "
         f"network any more; `nsvpn down {name}` cleans up")


async def supervise_in_tunnel(name: str, daemon_pid: Optional[int], supervise) -> int:
    """await supervise() (CMD's exit status), saying so if the tunnel dies meanwhile."""
    import trio

    async with trio.open_nursery() as n:
        n.start_soon(_say_when_gone, name, daemon_pid)
        status = await supervise()
        n.cancel_scope.cancel()
    return status


def run_join(name: str, argv: List[str], *, quiet: bool = False,
             socks_env: bool = True) -> int:
    """Run argv in tunnel `name`; its exit status (128+N for signal N). Namespace mode: in the
    holder's namespaces. Preload mode: under the shim, pointed at the tunnel's front (quiet:
    no warning about static/setuid programs; socks_env: set the proxy variables as exec does)."""
    import trio

    from . import namespace

    try:
        st = _running(name)
    except TunnelError as e:
        _err(str(e))
        return EXIT_USAGE
    if st.get("mode") == "preload":
        from .tunnel_preload import run_join_preload

        return run_join_preload(name, tunnel_dir(name), argv, quiet=quiet,
                                socks_env=socks_env, daemon_pid=st.get("pid"))
    holder = st["holder_pid"]
    try:
        fds = [os.open(f"/proc/{holder}/ns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
               for ns in ("user", "net", "mnt")]
    except OSError as e:
        _err(f"tunnel {name}: cannot open its namespaces: {e.strerror}")
        return EXIT_SETUP
    if os.fstat(fds[1]).st_ino != st.get("netns"):
        _err(f"tunnel {name}: its holder process changed; `nsvpn down {name}`")
        return EXIT_SETUP
    cwd = os.getcwd()
    env = without_session(os.environ)  # nsvpn inside a preload session: see nested.py
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        stage = "setns"
        try:
            os.close(r)
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG, like exec's CMD
            # user first (gives the capabilities the other two need), then net, then mount.
            for fd, flag in zip(fds, (CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWNS)):
                _setns(fd, flag)
            try:
                os.chdir(cwd)
            except OSError:
                os.chdir("/")
            stage = "exec"
            os.execvpe(argv[0], argv, env)
        except OSError as e:
            code = 127 if stage == "exec" and e.errno == errno.ENOENT else \
                126 if stage == "exec" else EXIT_SETUP
            os.write(w, json.dumps({"stage": stage, "msg": e.strerror, "code": code}).encode())
        os._exit(EXIT_SETUP)
    os.close(w)
    for fd in fds:
        os.close(fd)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    if data:
        os.waitpid(pid, 0)
        info = json.loads(data.decode())
        what = f"{argv[0]}: {info['msg']}" if info["stage"] == "exec" else \
            f"joining tunnel {name} failed: {info['msg']}"
        _err(what)
        return int(info["code"])
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    child = namespace.NamespaceChild(pid, pidfd, -1, None)
    return trio.run(supervise_in_tunnel, name, st.get("pid"),
                    lambda: namespace.supervise(child))


# -- status / down ---------------------------------------------------------------------------

def _all_names() -> List[str]:
    return sorted(n for n in os.listdir(state_root()) if NAME_RE.match(n))


def collect(name: Optional[str] = None) -> List[dict]:
    out = []
    for n in ([name] if name else _all_names()):
        d = tunnel_dir(n)
        if not os.path.isdir(d):
            raise TunnelError(f"no tunnel named {n}")
        st = tunnel_state(d)
        st["name"] = n
        st.setdefault("mode", "ns")  # state written before preload tunnels existed
        if st["state"] == "running":
            try:
                live = control(d, {"cmd": "status"})
                if "error" in live:
                    st["control_error"] = live["error"]
                else:
                    st.update(live)
            except (OSError, ValueError) as e:
                st["control_error"] = str(e)
        out.append(st)
    return out


def _format(rows: List[dict]) -> str:
    if not rows:
        return "no tunnels"
    lines = [f"{'NAME':<16} {'STATE':<8} {'MODE':<11} {'PID':>7} {'FLOWS':>6} "
             f"{'BYTES UP/DOWN':>21}  UPSTREAMS"]
    for t in rows:
        ups = t.get("upstreams") or []
        up_text = ", ".join(
            (f"{u['name']} ({'up' if u['healthy'] else 'DOWN'})" if isinstance(u, dict) else u)
            for u in ups)
        flows = t.get("flows", "-")
        io = f"{t['bytes_up']}/{t['bytes_down']}" if "bytes_up" in t else "-"
        mode = t.get("mode", "ns") + ("/vpn" if t.get("kind") == "vpn" else "")
        lines.append(f"{t['name']:<16} {t['state']:<8} {mode:<11} {t.get('pid') or '-':>7} "
                     f"{flows:>6} {io:>21}  {up_text}")
    return "\n".join(lines)


def run_status(args: argparse.Namespace) -> int:
    try:
        rows = collect(args.name)
    except TunnelError as e:
        _err(str(e))
        return EXIT_USAGE
    if args.json:
        print(json.dumps({"schema": 1, "tunnels": rows}, indent=2, sort_keys=True))
    else:
        print(_format(rows))
    # a pilot's health check: `nsvpn status pilot || nsvpn up --name pilot ...`
    if args.name and any(r.get("state") != "running" for r in rows):
        return 1
    return 0


def _netns_members(inode: Optional[int]) -> List[int]:
    """Our processes in the tunnel's netns (CMDs started by exec --name, the holder)."""
    from . import namespace

    return namespace.netns_members(inode)


def _wait_gone(check, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not check():
            return True
        time.sleep(0.05)
    return not check()


def _cleanup(d: str, st: dict) -> None:
    """Kill whatever is left of the tunnel (namespace mode: the processes in its netns;
    preload mode: the processes started with its front in their environment), remove its
    state."""
    if st.get("mode") == "preload":
        from .leftovers import session_processes

        members = session_processes(st.get("ctl"))
    else:
        members = _netns_members(st.get("netns"))
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 2.0)):
        for p in members:
            try:
                os.kill(p, sig)
            except OSError:
                pass
        if _wait_gone(lambda: any(_starttime(p) is not None for p in members), wait):
            break
    fdir = st.get("front_dir")
    if fdir and fdir != d and os.path.basename(fdir).startswith("nsvpn-front-"):
        shutil.rmtree(fdir, ignore_errors=True)
    shutil.rmtree(d, ignore_errors=True)


def run_down(args: argparse.Namespace) -> int:
    try:
        d = tunnel_dir(args.name)
    except TunnelError as e:
        _err(str(e))
        return EXIT_USAGE
    if not os.path.isdir(d):
        _err(f"no tunnel named {args.name}")
        return EXIT_USAGE
    st = tunnel_state(d)
    pid, start = st.get("pid"), st.get("pid_start")
    if st["state"] != "dead":
        try:
            control(d, {"cmd": "down"})
        except (OSError, ValueError):
            os.kill(pid, signal.SIGTERM)
        if not _wait_gone(lambda: _alive(pid, start), 10.0):
            os.kill(pid, signal.SIGKILL)
            _wait_gone(lambda: _alive(pid, start), 2.0)
    elif args.verbose if hasattr(args, "verbose") else False:
        _err(f"tunnel {args.name} was dead; cleaning up")
    _cleanup(d, st)
    return 0
