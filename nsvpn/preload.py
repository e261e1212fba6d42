"""The preload-mode run: CMD as a normal child with nsvpn's LD_PRELOAD shim and a local front.

    status = await run_preload(argv, pool, direct_cidrs, quiet=False, dns_server=None)

The caller brings `pool` up first (and closes it afterwards), as for namespace mode. Here:
start the front (nsvpn/front.py), build CMD's environment (the shim appended to LD_PRELOAD, the
front's address and control socket, the direct networks, ALL_PROXY (SOCKS) and
http(s)_proxy for programs that use a proxy themselves), run CMD with SIGINT/SIGTERM/SIGHUP/
SIGUSR1/SIGUSR2 forwarded, return its status (128+N when it died of signal N), stop the front.

What the shim cannot help (check_binary): statically linked programs (no dynamic loader, so
nothing reads LD_PRELOAD) and setuid/setgid programs (the loader ignores LD_PRELOAD for them).
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from typing import Dict, List, Mapping, Optional, Sequence

import trio

from .cli import EXIT_SETUP
from .front import Front
from .leftovers import end_processes
from .nested import without_session

log = logging.getLogger("nsvpn.preload")

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
PT_INTERP = 3
RES_OPTIONS = "timeout:1 attempts:1"
_PR_SET_PDEATHSIG = 1

try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # pragma: no cover - not glibc
    _prctl = None


def shim_path() -> Optional[str]:
    """The shim: the installed build (nsvpn/_preload*.so next to this module), or in a
    single-file nsvpn.pyz one built or extracted at first use (nsvpn/shim.py); None when
    there is none (shim.problem() says why)."""
    from . import shim

    found = shim.locate()
    return found[0] if found else None


# -------------------------------------------------------------------------- binary checks


def _elf_has_interp(data: bytes) -> Optional[bool]:
    """True/False: dynamically/statically linked ELF; None: not an ELF file we can read."""
    if len(data) < 64 or data[:4] != b"\x7fELF":
        return None
    cls, enc = data[4], data[5]
    if cls not in (1, 2) or enc not in (1, 2):
        return None
    e = "<" if enc == 1 else ">"
    if cls == 2:
        phoff, = struct.unpack_from(e + "Q", data, 32)
        phentsize, phnum = struct.unpack_from(e + "HH", data, 54)
    else:
        phoff, = struct.unpack_from(e + "I", data, 28)
        phentsize, phnum = struct.unpack_from(e + "HH", data, 42)
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + 4 > len(data):
            return None
        p_type, = struct.unpack_from(e + "I", data, off)
        if p_type == PT_INTERP:
            return True
    return False


def _resolve(path: str, env_path: Optional[str] = None) -> Optional[str]:
    if os.sep in path:
        return path if os.path.exists(path) else None
    return shutil.which(path, path=env_path)


def check_binary(path: str, *, env_path: Optional[str] = None, _depth: int = 0) -> List[str]:
    """Reasons why the shim cannot divert `path`'s connections (empty list: none found).

    Follows one level of `#!` so that a script run by a static interpreter is reported too.
    A missing program gives no warning here: running it fails with the usual message."""
    real = _resolve(path, env_path)
    if real is None:
        return []
    warnings: List[str] = []
    try:
        st = os.stat(real)
        with open(real, "rb") as f:
            head = f.read(65536)
    except OSError:
        return []
    if st.st_mode & 0o4000:
        warnings.append(f"{real} is setuid: the dynamic loader ignores LD_PRELOAD for it, "
                        "so its connections bypass nsvpn")
    elif st.st_mode & 0o2000:
        warnings.append(f"{real} is setgid: the dynamic loader ignores LD_PRELOAD for it, "
                        "so its connections bypass nsvpn")
    if head.startswith(b"#!") and _depth == 0:
        line = head[2:].split(b"\n", 1)[0].decode(errors="replace").split()
        if line:
            interp = line[0]
            if os.path.basename(interp) == "env" and len(line) > 1:
                interp = line[1]
            warnings += check_binary(interp, env_path=env_path, _depth=1)
        return warnings
    if head[:4] == b"\x7fELF" and head[4] == 1 and sys.maxsize > 2**32:
        warnings.append(f"{real} is a 32-bit program: the 64-bit preload shim cannot be "
                        "loaded into it, so its connections bypass nsvpn")
    dyn = _elf_has_interp(head)
    if dyn is False:
        warnings.append(f"{real} is statically linked: the preload shim cannot divert its "
                        "connections; only those it makes through http_proxy/https_proxy or "
                        "ALL_PROXY get through (namespace mode takes them all)")
    return warnings


# -------------------------------------------------------------------------- environment


def _append_list(old: Optional[str], items: Sequence[str], sep: str) -> str:
    parts = [p for p in (old or "").replace(" ", sep).split(sep) if p] if old else []
    for it in items:
        if it not in parts:
            parts.append(it)
    return sep.join(parts)


def build_env(base: Mapping[str, str], shim: str, front: Front, direct_cidrs: Sequence[str],
              *, socks_env: bool = True) -> Dict[str, str]:
    env = without_session(base)  # nsvpn inside nsvpn: the outer shim is not loaded twice
    pre = env.get("LD_PRELOAD", "")
    # LD_PRELOAD accepts space or colon separators; keep what was there, ours last
    env["LD_PRELOAD"] = (pre + " " + shim).strip() if pre else shim
    env.update(front.shim_env())
    env["NSVPN_DIRECT"] = ",".join(direct_cidrs)
    # The host resolver is asked first, and compute nodes often have no working DNS: glibc's
    # default (5 s x 2 tries per server) would stall every first lookup of an outside name
    # before the shim can hand out its fake IP. A user's own setting wins.
    env.setdefault("RES_OPTIONS", RES_OPTIONS)
    if socks_env:
        env["ALL_PROXY"] = env["all_proxy"] = front.socks_url()
        # HTTP clients get the front as an HTTP proxy too: Python requests and pip fail on a
        # socks5h:// ALL_PROXY without PySocks, Go reads only HTTP(S)_PROXY. A site's own
        # proxy (a squid) stays where the job already has one.
        http = front.http_proxy_url()
        for scheme in ("http", "https"):
            if http and not (env.get(f"{scheme}_proxy") or env.get(f"{scheme.upper()}_PROXY")):
                env[f"{scheme}_proxy"] = env[f"{scheme.upper()}_PROXY"] = http
        for k in ("NO_PROXY", "no_proxy"):
            env[k] = _append_list(env.get(k), ["localhost", "127.0.0.1", "::1"], ",")
    return env


# -------------------------------------------------------------------------- the child


def _child_setup() -> None:  # runs between fork and exec
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class Child:
    def __init__(self, popen: subprocess.Popen) -> None:
        self.popen = popen
        self.pid = popen.pid
        try:
            self._pidfd: Optional[int] = os.pidfd_open(self.pid)  # type: ignore[attr-defined]
        except (AttributeError, OSError):
            self._pidfd = None
        self.status: Optional[int] = None

    def signal(self, sig: int) -> None:
        if self.status is not None:
            return
        try:
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, sig)  # type: ignore[attr-defined]
            else:
                os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def _poll(self) -> None:
        pid, st = os.waitpid(self.pid, os.WNOHANG)
        if pid:
            self.status = (128 + os.WTERMSIG(st)) if os.WIFSIGNALED(st) else os.WEXITSTATUS(st)
            self.popen.returncode = self.status  # Popen must not reap (or warn) later
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None

    async def wait(self) -> int:
        while self.status is None:
            if self._pidfd is not None:
                await trio.lowlevel.wait_readable(self._pidfd)
            else:
                await trio.sleep(0.02)
            self._poll()
        return self.status


async def _forward_signals(child: Child, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    with trio.open_signal_receiver(*FORWARDED_SIGNALS) as batches:
        task_status.started()
        async for sig in batches:
            if sig == signal.SIGINT and _terminal_signals_child(child):
                continue  # the terminal's Ctrl-C already reached CMD: don't deliver it twice
            child.signal(sig)


def _terminal_signals_child(child: Child) -> bool:
    from .namespace import _terminal_signals_child as same_rule

    return same_rule(child)


def _runtime_dir() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR")
    if not base or not os.access(base, os.W_OK | os.X_OK):
        base = None
    d = tempfile.mkdtemp(prefix="nsvpn-", dir=base)  # 0700
    if len(os.path.join(d, "ctl")) > 100:  # sun_path limit
        os.rmdir(d)
        d = tempfile.mkdtemp(prefix="nsvpn-", dir="/tmp")
    return d


def _err(msg: str) -> None:
    sys.stderr.write(f"nsvpn: {msg}\n")
    sys.stderr.flush()


async def run_preload(
    argv: List[str],
    pool,
    direct_cidrs: List[str],
    *,
    quiet: bool,
    dns_server: Optional[str],
    connect_timeout: float = 20.0,
    socks_env: bool = True,
    env: Optional[Mapping[str, str]] = None,
) -> int:
    """Run CMD under the shim; its exit status (128+N for signal N; 127/126 when it cannot be
    started, like a shell)."""
    shim = shim_path()
    if shim is None:
        from . import shim as shim_mod

        _err(shim_mod.problem())
        return 1
    base_env = dict(os.environ if env is None else env)
    if not quiet:
        for w in check_binary(argv[0], env_path=base_env.get("PATH")):
            _err("warning: " + w)
    try:
        rundir = _runtime_dir()
    except OSError as e:  # e.g. /tmp full (ENOSPC), out of inodes, read-only
        _err(f"cannot create a private directory for nsvpn's sockets "
             f"({e.filename or 'in $XDG_RUNTIME_DIR, $TMPDIR or /tmp'}): {e.strerror or e}; "
             "point XDG_RUNTIME_DIR or TMPDIR at a writable node-local directory")
        return EXIT_SETUP
    front = Front(pool, runtime_dir=rundir, direct=direct_cidrs, dns_server=dns_server,
                  connect_timeout=connect_timeout)
    try:
        async with trio.open_nursery() as n:
            await n.start(front.serve)
            child_env = build_env(base_env, shim, front, direct_cidrs, socks_env=socks_env)
            try:
                popen = subprocess.Popen(argv, env=child_env, preexec_fn=_child_setup)
            except FileNotFoundError:
                _err(f"{argv[0]}: command not found")
                n.cancel_scope.cancel()
                return 127
            except PermissionError:
                _err(f"{argv[0]}: permission denied")
                n.cancel_scope.cancel()
                return 126
            except OSError as exc:  # ENOEXEC and friends
                _err(f"{argv[0]}: {exc.strerror or exc}")
                n.cancel_scope.cancel()
                return 126
            child = Child(popen)
            await n.start(_forward_signals, child)
            status = await child.wait()
            # What CMD left running (daemons, `cmd &`) ends with it, as in ns mode, rather
            # than run on with a front that is gone.
            left = await end_processes(front.ctl_path)
            if left:
                log.info("ended %d process(es) that CMD left running", left)
            n.cancel_scope.cancel()
        return status
    finally:
        st = front.stats
        log.info("front: %d flows (%d failed, %d handed to the program), %d bytes up, "
                 "%d down, max padding %d", st.flows, st.failed, st.handed, st.bytes_up,
                 st.bytes_down, st.padding_max)
        shutil.rmtree(rundir, ignore_errors=True)
