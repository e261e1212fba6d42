"""Named tunnels in preload mode: the daemon keeps the front, `exec --name` points CMDs at it.

Daemon side (`serve_preload`): bring the upstream up (an ssh/SOCKS5 pool, or openconnect with
the userspace stack as in `exec --mode preload --via openconnect://`), start the front
(front.py) with its control socket in a 0700 directory, and write front.json (0600) next to
state.json: the shim's environment and the SOCKS URL, which holds the per-session secret. The
secret is never put in an argv; only the user can read the file. The front runs until the
tunnel is told to stop; then every TCP connection it holds is *reset* (SO_LINGER 0 before the
close), so a CMD mid-transfer sees ECONNRESET, not a clean but short EOF.

Exec side (`run_join_preload`): CMD runs as a child of `nsvpn exec --name` with the shim in
LD_PRELOAD and the tunnel's NSVPN_* variables (the same environment `exec --mode preload`
builds), signals forwarded, PDEATHSIG, same warnings for static/setuid programs.

Tracking CMDs for `down`: there is no namespace to enumerate, but every process started this
way (and everything it starts, unless a static program scrubs the environment) carries
NSVPN_CTL=<this tunnel's control socket> in its initial environment;
`leftovers.session_processes()` finds our own processes by that marker in /proc/PID/environ.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from typing import Callable, Dict, List, Optional

import trio

from .leftovers import session_processes

log = logging.getLogger("nsvpn.tunnel")

FRONT_FILE = "front.json"
SUN_PATH_MAX = 100  # sockaddr_un.sun_path is 108 bytes; keep a margin


def _err(msg: str) -> None:
    sys.stderr.write(f"nsvpn: {msg}\n")
    sys.stderr.flush()


def front_dir(state_dir: str) -> str:
    """Where the front's control socket lives: the tunnel's own 0700 state directory, or a
    fresh 0700 directory in /tmp when that path is too long for a unix socket."""
    if len(os.path.join(state_dir, "ctl")) <= SUN_PATH_MAX:
        return state_dir
    return tempfile.mkdtemp(prefix="nsvpn-front-", dir="/tmp")


def write_private(path: str, text: str) -> None:
    """Create `path` 0600 (never readable by others, not even briefly), atomically."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def abort_tcp_connections() -> int:
    """Set SO_LINGER {1, 0} on every TCP socket this process holds, so that closing them (by
    trio, or by the kernel at exit) sends RST. Returns how many sockets were marked."""
    n = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            s = socket.socket(fileno=os.dup(int(name)))
        except (OSError, ValueError):
            continue  # not a socket (or already closed)
        try:
            if s.family in (socket.AF_INET, socket.AF_INET6) and s.type == socket.SOCK_STREAM:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                n += 1
        except OSError:
            pass
        finally:
            s.close()
    return n


# -- the daemon --------------------------------------------------------------------------------

class PreloadTunnel:
    """What the control socket needs from a running preload tunnel."""

    mode = "preload"

    def __init__(self, front, upstream, kind: str, fdir: str) -> None:
        self.front = front
        self.upstream = upstream
        self.kind = kind  # "socks" or "vpn"
        self.fdir = fdir
        self.stopped = trio.Event()

    def state_extra(self) -> Dict[str, object]:
        return {"ctl": self.front.ctl_path, "front_dir": self.fdir,
                "front_port4": self.front.port4, "front_port6": self.front.port6}

    def upstreams(self) -> List[dict]:
        return [{"name": u.name, "healthy": bool(u.healthy)}
                for u in getattr(self.upstream, "upstreams", [self.upstream])]

    def status(self) -> dict:
        st = dataclasses.asdict(self.front.stats)
        return {"front": st, "flows": st["active"], "flows_total": st["flows"],
                "bytes_up": st["bytes_up"], "bytes_down": st["bytes_down"],
                "failed": st["failed"], "upstreams": self.upstreams(),
                "processes": len(session_processes(self.front.ctl_path))}

    def stop(self) -> None:
        self.stopped.set()


async def _start_vpn(oc, args):
    """openconnect + the userspace stack, direct networks as socks_cmd.run_preload_vpn."""
    import ipaddress

    from .socks_cmd import _host_networks, shim_direct
    from .upstream.base import UpstreamError
    from .upstream.vpnstack import VpnStackUpstream

    up = VpnStackUpstream(oc)
    try:
        await up.start()
    except UpstreamError as e:
        _err(f"VPN login failed: {e}")
        with trio.CancelScope(shield=True):
            await up.aclose()
        return None, []
    env = up.env
    nets: List[str] = (_host_networks() if not args.no_direct else []) + list(args.direct)
    nets += list(env.split_exc4) + list(env.split_exc6)
    up.direct_nets = [ipaddress.ip_network(c, strict=False) for c in nets]
    if args.verbose:
        _err(f"VPN {oc.url.host} up: {env.summary()}")
    return up, shim_direct(nets, env)


async def serve_preload(args, upstream, direct: List[str], state_dir: str,
                        ready: Callable, counters: Callable) -> int:
    """The body of a preload tunnel's daemon. `upstream` is an UpstreamPool or an
    OpenconnectUpstream; ready(handle) serves the control socket (started once the front
    listens); counters(handle) dumps the numbers on SIGUSR1. Returns the exit status."""
    from .cli import EXIT_UPSTREAM
    from .front import Front
    from .run import _raise_nofile, _start_pool
    from .upstream.openconnect import OpenconnectUpstream

    # A front shared by many jobs holds two sockets per flow (and ssh an fd per channel);
    # none of the CMDs is our child, so nothing else sees the raised soft limit.
    _raise_nofile()
    oc = upstream if isinstance(upstream, OpenconnectUpstream) else None
    if oc is not None:
        up, direct = await _start_vpn(oc, args)
        if up is None:
            return EXIT_UPSTREAM
    else:
        up = upstream
        if not await _start_pool(up):
            return EXIT_UPSTREAM
    fdir = front_dir(state_dir)
    code = 0
    try:
        front = Front(up, runtime_dir=fdir, direct=direct,
                      dns_server=None if oc is not None else args.dns_server)
        tunnel = PreloadTunnel(front, up, "vpn" if oc is not None else "socks", fdir)
        async with trio.open_nursery() as n:
            await n.start(front.serve)
            write_private(os.path.join(state_dir, FRONT_FILE), json.dumps({
                "shim_env": front.shim_env(), "socks_url": front.socks_url(),
                "http_proxy_url": front.http_proxy_url(),
                "direct": list(direct)}))

            async def watch_signals() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                                               signal.SIGUSR1) as sigs:
                    async for s in sigs:
                        if s == signal.SIGUSR1:
                            counters(tunnel)
                        else:
                            tunnel.stop()

            async def watch_fatal() -> None:
                nonlocal code
                msg = await oc.wait_fatal()
                log.warning("tunnel ends: %s", msg)
                code = EXIT_UPSTREAM
                tunnel.stop()

            n.start_soon(watch_signals)
            if oc is not None:
                n.start_soon(watch_fatal)
            n.start_soon(ready, tunnel)
            await tunnel.stopped.wait()
            marked = abort_tcp_connections()
            log.info("front stops: %d TCP connection(s) reset", marked)
            n.cancel_scope.cancel()
        st = front.stats
        log.info("front: %d flows (%d failed, %d handed to the program), %d bytes up, %d down",
                 st.flows, st.failed, st.handed, st.bytes_up, st.bytes_down)
        return code
    finally:
        with trio.CancelScope(shield=True):
            await up.aclose()
        if fdir != state_dir:
            import shutil

            shutil.rmtree(fdir, ignore_errors=True)


# -- exec --name --------------------------------------------------------------------------------

class _SavedFront:
    """What preload.build_env asks a Front for, from front.json."""

    def __init__(self, info: dict) -> None:
        self.info = info

    def shim_env(self) -> Dict[str, str]:
        return dict(self.info["shim_env"])

    def socks_url(self) -> str:
        return self.info["socks_url"]

    def http_proxy_url(self) -> str:
        return self.info.get("http_proxy_url", "")  # "" from a tunnel started before it


def read_front(state_dir: str) -> Optional[dict]:
    try:
        with open(os.path.join(state_dir, FRONT_FILE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


async def _run_child(argv: List[str], env: Dict[str, str]) -> int:
    from . import preload

    try:
        popen = subprocess.Popen(argv, env=env, preexec_fn=preload._child_setup)
    except FileNotFoundError:
        _err(f"{argv[0]}: command not found")
        return 127
    except PermissionError:
        _err(f"{argv[0]}: permission denied")
        return 126
    except OSError as exc:  # ENOEXEC and friends
        _err(f"{argv[0]}: {exc.strerror or exc}")
        return 126
    child = preload.Child(popen)
    async with trio.open_nursery() as n:
        await n.start(preload._forward_signals, child)
        status = await child.wait()
        n.cancel_scope.cancel()
    return status


def run_join_preload(name: str, state_dir: str, argv: List[str], *, quiet: bool = False,
                     socks_env: bool = True, daemon_pid: Optional[int] = None) -> int:
    """CMD under the shim, its connections through tunnel `name`'s front."""
    from . import preload
    from .cli import EXIT_SETUP

    shim = preload.shim_path()
    if shim is None:
        _err("the preload shim (nsvpn/_preload*.so) is not built: reinstall nsvpn with a C "
             "compiler available")
        return EXIT_SETUP
    info = read_front(state_dir)
    if info is None:
        _err(f"tunnel {name}: its front is not ready (`nsvpn status {name}`)")
        return EXIT_SETUP
    base = dict(os.environ)
    if not quiet:
        for w in preload.check_binary(argv[0], env_path=base.get("PATH")):
            _err("warning: " + w)
    env = preload.build_env(base, shim, _SavedFront(info), info.get("direct", []),
                            socks_env=socks_env)
    from .tunnels import supervise_in_tunnel

    return trio.run(supervise_in_tunnel, name, daemon_pid, lambda: _run_child(argv, env))
