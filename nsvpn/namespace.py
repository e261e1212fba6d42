"""User+net+mount namespace for CMD, its TUN device, and the CMD process itself.

Process model (see DESIGN.md)::

    parent (host netns)                      child (fork)
    ------------------------------------     ----------------------------------------------
                                             PR_SET_PDEATHSIG(SIGKILL), getppid() check
                                             unshare(NEWUSER|NEWNET|NEWNS)     --"U"-->
    write uid_map "U U 1", setgroups "deny",
    gid_map "G G 1"                   --"M"-->
                                             mount / rprivate, sysctls, TUN (open_tun),
                                             lo up, MTU/txqueuelen/addr/routes (rtnetlink),
                                             resolv.conf (+hosts) mounted over /etc
                                      <--"K" + TUN fd (SCM_RIGHTS)--
                                             close all fds but 0,1,2,pass_fds; execvpe(CMD)
    EOF on the socket = exec succeeded;  <--"E" {stage, errno, message}-- on any failure

All messages go over one SOCK_SEQPACKET socketpair that is close-on-exec in the child, so a
successful exec shows up in the parent as EOF, exactly like subprocess's error pipe. The child
never prints a traceback: every failure before exec comes back as a `SpawnError` whose str()
names the step (exit_code 127 for "command not found", 126 for "not executable", 1 otherwise).

Public API::

    spec = NetnsSpec()                       # 10.0.2.100/24 via 10.0.2.2, DNS 10.0.2.3, MTU 65520
    child = spawn(["curl", url], spec)       # sync, ~6 ms here; from the main thread only
    child.warnings                           # non-fatal, e.g. no /etc/resolv.conf to cover
    child.tun_fd                             # non-blocking, close-on-exec, in the parent
    status = await supervise(child)          # forwards signals, waits; 128+N for signal N
    trial_userns() / trial_tun() / trial_bind_mount()  -> TrialResult(ok, detail, errno, ...)

Choices that differ from the first sketch, and why:
- Links, addresses and routes are set with a ~60-line rtnetlink client here, not pyroute2:
  importing pyroute2 costs ~150 ms, half the start-up budget of `nsvpn exec -- true`.
- resolv.conf is written into a detached tmpfs (fsopen/fsmount, no file on disk) and mounted
  with move_mount() onto /etc/resolv.conf *itself*, which works when it is a symlink, even a
  dangling one (systemd-resolved stub): the symlink's target stays untouched. Kernels before
  5.2 fall back to a bind mount of an unlinked temp file over the symlink's resolved target
  (or a tmpfs over the target's directory when the target is missing).
- IPv6 is disabled through net.ipv6.conf.default before the TUN exists, so the device never
  sends router solicitations or MLD reports; `ping` works unprivileged inside because
  net.ipv4.ping_group_range is set to the user's gid (new netns default: nobody).
- The TUN queue is sized from the largest window the relay advertises (`NetnsSpec.window`):
  tun orphans skbs, so socket back-pressure does not stop CMD from overrunning it.

Limits: descendants of CMD that CMD leaves behind are not killed by PDEATHSIG (that needs a PID
namespace and an init; their network is gone with the TUN anyway). A terminal's Ctrl-C reaches
CMD directly, so SIGINT is not forwarded while we are the terminal's foreground group. Run by
real root, CMD is uid 0 inside and keeps its capabilities there (identity map of 0).
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import ipaddress
import json
import math
import os
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import warnings
from typing import Dict, List, Sequence, Tuple

from . import tun as _tun

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18

# Same numbers on every architecture since Linux 5.2 (the unified syscall table).
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_FSOPEN = 430
SYS_FSCONFIG = 431
SYS_FSMOUNT = 432
OPEN_TREE_CLONE = 1
MOVE_MOUNT_F_EMPTY_PATH = 0x04
MOVE_MOUNT_T_EMPTY_PATH = 0x40
FSCONFIG_CMD_CREATE = 6
FSOPEN_CLOEXEC = 1
FSMOUNT_CLOEXEC = 1
MOUNT_ATTR_NOSUID = 0x02
MOUNT_ATTR_NODEV = 0x04
MOUNT_ATTR_NOEXEC = 0x08

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)

# Dispositions as nsvpn was started with, before trio/python replaced them: an "ignored"
# signal stays ignored for CMD (nohup semantics); SIGPIPE/SIGXFSZ were ignored by Python
# itself and go back to default, as subprocess does.
_INHERITED_IGNORED = frozenset(
    s for s in FORWARDED_SIGNALS if signal.getsignal(s) == signal.SIG_IGN
)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _check(ret: int, what: str) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return ret


def _unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def _mount(src: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    def b(s):
        return None if s is None else s.encode()

    _check(_libc.mount(b(src), b(target), b(fstype), ctypes.c_ulong(flags), b(data)),
           f"mount {target}")


# ----------------------------------------------------------------------------------------------
# The spec


@dataclasses.dataclass
class NetnsSpec:
    """What the namespace looks like from inside. Defaults follow slirp4netns."""

    addr: str = "10.0.2.100"
    prefixlen: int = 24
    gateway: str | None = "10.0.2.2"  # None: routes are on-link via the device (vpn mode)
    dns: List[str] = dataclasses.field(default_factory=lambda: ["10.0.2.3"])
    search: List[str] = dataclasses.field(default_factory=list)
    mtu: int = 65520
    # Largest receive window the relay advertises to CMD; sizes the TUN queue.
    window: int = 4 << 20
    txqueuelen: int | None = None  # None: computed from window and mtu
    vnet_hdr: bool = False
    ifname: str = "tun0"
    routes: List[str] = dataclasses.field(default_factory=lambda: ["0.0.0.0/0"])
    ipv6: bool = False
    addr6: str = "fd00::100"
    prefixlen6: int = 64
    gateway6: str | None = "fd00::2"
    # Text of the namespace's /etc/resolv.conf; None: generated from dns/search.
    resolv_conf: str | None = None
    manage_resolv_conf: bool = True
    # Text of the namespace's /etc/hosts; None: the host's file passes through unchanged.
    hosts: str | None = None
    allow_ping: bool = True  # net.ipv4.ping_group_range = our gid (ICMP datagram sockets)

    def resolv_conf_text(self) -> str:
        if self.resolv_conf is not None:
            return self.resolv_conf
        lines = ["# generated by nsvpn"]
        lines += [f"nameserver {ns}" for ns in self.dns]
        if self.search:
            lines.append("search " + " ".join(self.search))
        return "\n".join(lines) + "\n"

    def queue_len(self) -> int:
        if self.txqueuelen is not None:
            return self.txqueuelen
        return compute_txqueuelen(self.window, self.mtu)


def compute_txqueuelen(window: int, mtu: int) -> int:
    """Packets the TUN queue must hold so a full window never overflows it.

    A full window in MTU-sized segments, doubled for the small ACKs CMD interleaves while it
    downloads, plus slack; never below the kernel default of 1000.
    """
    return max(1000, 2 * math.ceil(window / max(mtu, 576)) + 256)


# ----------------------------------------------------------------------------------------------
# Errors and the child handle


class SpawnError(Exception):
    """Setting up the namespace or exec'ing CMD failed; str() says which step and why."""

    def __init__(self, stage: str, message: str, err: int | None = None,
                 exit_code: int = 1) -> None:
        super().__init__(message)
        self.stage = stage
        self.errno = err
        self.exit_code = exit_code


def _exitcode(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    return 255


class NamespaceChild:
    """CMD running in its namespace, as seen from the parent."""

    def __init__(self, pid: int, pidfd: int | None, tun_fd: int, spec: NetnsSpec) -> None:
        self.pid = pid
        self.tun_fd = tun_fd
        self.spec = spec
        self._pidfd = pidfd
        self._status: int | None = None
        # Non-fatal setup problems worth telling the user (e.g. no /etc/resolv.conf).
        self.warnings: List[str] = []

    def signal(self, sig: int) -> None:
        """Send `sig` to CMD; a no-op once it has been reaped (no pid-reuse race)."""
        if self._status is not None:
            return
        try:
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, sig)
            else:
                os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def poll(self) -> int | None:
        """Exit status (128+N for signal N) if CMD has exited, else None; reaps it."""
        if self._status is None:
            try:
                pid, st = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped behind our back (SIGCHLD set to SIG_IGN)
                pid, st = self.pid, 255 << 8
            if pid:
                self._reaped(st)
        return self.exit_status()

    def wait_blocking(self) -> int:
        if self._status is None:
            try:
                _, st = os.waitpid(self.pid, 0)
            except ChildProcessError:
                st = 255 << 8
            self._reaped(st)
        return self.exit_status()  # type: ignore[return-value]

    async def wait(self) -> int:
        """Wait for CMD without blocking trio: pidfd readiness, else a 20 ms poll."""
        import trio

        while self._status is None:
            if self._pidfd is not None:
                await trio.lowlevel.wait_readable(self._pidfd)
            else:
                await trio.sleep(0.02)
            self.poll()
        return self.exit_status()  # type: ignore[return-value]

    def exit_status(self) -> int | None:
        return None if self._status is None else _exitcode(self._status)

    def _reaped(self, status: int) -> None:
        self._status = status
        if self._pidfd is not None:
            _close_watched(self._pidfd)
            self._pidfd = None

    def close(self) -> None:
        """Close the TUN fd (the netns loses its device; CMD sees its network vanish)."""
        if self.tun_fd >= 0:
            _close_watched(self.tun_fd)
            self.tun_fd = -1


def _close_watched(fd: int) -> None:
    """Close an fd trio tasks may be waiting on: they get ClosedResourceError, not a hang."""
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.notify_closing(fd)
        except RuntimeError:  # not inside trio.run
            pass
    os.close(fd)


async def forward_signals(child: NamespaceChild, signals: Sequence[int] = FORWARDED_SIGNALS,
                          *, task_status=None) -> None:
    """Trio task: forward the signals nsvpn receives to CMD until cancelled.

    With `await nursery.start(forward_signals, child)` the caller resumes once the signal
    handlers are in place (main thread only, as for any trio signal receiver).
    """
    import trio

    with trio.open_signal_receiver(*signals) as batches:
        if task_status is not None:
            task_status.started()
        async for sig in batches:
            if sig == signal.SIGINT and _terminal_signals_child(child):
                continue  # the terminal's Ctrl-C already reached CMD: don't deliver it twice
            child.signal(sig)


def _terminal_signals_child(child: NamespaceChild) -> bool:
    """True when CMD shares our process group and that group is a terminal's foreground.

    Then the tty driver sends SIGINT to CMD itself. The price: in that situation a `kill -INT`
    from elsewhere is not forwarded (SIGTERM still is).
    """
    try:
        if os.getpgid(child.pid) != os.getpgrp():
            return False
    except OSError:
        return False
    for fd in (0, 1, 2):
        try:
            if os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp():
                return True
        except OSError:
            continue
    return False


async def supervise(child: NamespaceChild) -> int:
    """Forward signals to CMD until it exits; return its exit status (128+N for signal N)."""
    import trio

    async with trio.open_nursery() as n:
        await n.start(forward_signals, child)
        status = await child.wait()
        n.cancel_scope.cancel()
    return status


def netns_inode(pid: int) -> int | None:
    """The inode of `pid`'s network namespace (its identity), None when it is gone."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def netns_members(inode: int | None) -> List[int]:
    """Our own live processes in the network namespace `inode` (zombies have no namespace)."""
    if not inode:
        return []
    from .leftovers import own_processes

    return own_processes(lambda p: os.stat(f"/proc/{p}/ns/net").st_ino == inode)


async def end_leftovers(inode: int | None, grace: float = 1.0) -> int:
    """SIGTERM what CMD left running in its namespace, SIGKILL it after `grace` seconds.

    Without a PID namespace, CMD's background children would outlive nsvpn (with no network:
    the TUN is gone). Returns how many processes were found.
    """
    from .leftovers import end_all

    return await end_all(lambda: netns_members(inode), grace, 1.0)


# ----------------------------------------------------------------------------------------------
# rtnetlink: just the four requests we need


NLMSG_ERROR = 2
RTM_NEWLINK = 16
RTM_NEWADDR = 20
RTM_NEWROUTE = 24
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
IFF_UP = 0x1
IFLA_MTU = 4
IFLA_TXQLEN = 13
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_F_NODAD = 0x02
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RTN_UNICAST = 1
RTNH_F_ONLINK = 4
_NLHDR = struct.Struct("=IHHII")


def _rta(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + bytes(-n % 4)


class _Rtnl:
    """A NETLINK_ROUTE socket in the netns current at creation (create it after unshare)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                  socket.NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def request(self, kind: int, flags: int, body: bytes, what: str) -> None:
        self.seq += 1
        self.sock.send(_NLHDR.pack(_NLHDR.size + len(body), kind,
                                   NLM_F_REQUEST | NLM_F_ACK | flags, self.seq, 0) + body)
        while True:
            data = self.sock.recv(65536)
            off = 0
            while off + _NLHDR.size <= len(data):
                length, mtype, _, seq, _ = _NLHDR.unpack_from(data, off)
                if mtype == NLMSG_ERROR and seq == self.seq:
                    err = -struct.unpack_from("=i", data, off + _NLHDR.size)[0]
                    if err:
                        raise OSError(err, f"{what}: {os.strerror(err)}")
                    return
                off += (length + 3) & ~3

    def link_set(self, index: int, *, up: bool, mtu: int | None = None,
                 txqlen: int | None = None) -> None:
        body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, IFF_UP if up else 0, IFF_UP)
        if mtu is not None:
            body += _rta(IFLA_MTU, struct.pack("=I", mtu))
        if txqlen is not None:
            body += _rta(IFLA_TXQLEN, struct.pack("=I", txqlen))
        self.request(RTM_NEWLINK, 0, body, f"set link {index}")

    def addr_add(self, index: int, addr: str, prefixlen: int) -> None:
        ip = ipaddress.ip_address(addr)
        fam = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        flags = IFA_F_NODAD if ip.version == 6 else 0  # no 1 s of "tentative" address
        body = struct.pack("=BBBBI", fam, prefixlen, flags, RT_SCOPE_UNIVERSE, index)
        body += _rta(IFA_LOCAL, ip.packed) + _rta(IFA_ADDRESS, ip.packed)
        self.request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body, f"add address {addr}")

    def route_add(self, index: int, dest: str, gateway: str | None,
                  onlink: bool = False) -> None:
        net = ipaddress.ip_network(dest, strict=False)
        fam = socket.AF_INET if net.version == 4 else socket.AF_INET6
        scope = RT_SCOPE_UNIVERSE if gateway else RT_SCOPE_LINK
        body = struct.pack("=BBBBBBBBI", fam, net.prefixlen, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT,
                           scope, RTN_UNICAST, RTNH_F_ONLINK if onlink else 0)
        if net.prefixlen:
            body += _rta(RTA_DST, net.network_address.packed)
        body += _rta(RTA_OIF, struct.pack("=I", index))
        if gateway:
            body += _rta(RTA_GATEWAY, ipaddress.ip_address(gateway).packed)
        via = f" via {gateway}" if gateway else ""
        # REPLACE: a pushed route may repeat the kernel's own subnet route, or another one
        self.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, body, f"add route {dest}{via}")


# ----------------------------------------------------------------------------------------------
# Covering a file in /etc inside our mount namespace


def _fs_syscall(nr: int, *args) -> int:
    return _libc.syscall(ctypes.c_long(nr), *args)


def _detached_tmpfs() -> int:
    """A tmpfs mounted nowhere (fsopen/fsmount); returns its mount fd (close-on-exec)."""
    fsfd = _check(_fs_syscall(SYS_FSOPEN, b"tmpfs", ctypes.c_uint(FSOPEN_CLOEXEC)), "fsopen")
    try:
        _check(_fs_syscall(SYS_FSCONFIG, ctypes.c_int(fsfd), ctypes.c_uint(FSCONFIG_CMD_CREATE),
                           None, None, ctypes.c_int(0)), "fsconfig")
        attrs = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC
        return _check(_fs_syscall(SYS_FSMOUNT, ctypes.c_int(fsfd), ctypes.c_uint(FSMOUNT_CLOEXEC),
                                  ctypes.c_uint(attrs)), "fsmount")
    finally:
        os.close(fsfd)


def _cover_with_move_mount(target: str, text: str, name: str) -> None:
    mnt = _detached_tmpfs()
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644, dir_fd=mnt)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
        tree = _check(_fs_syscall(SYS_OPEN_TREE, ctypes.c_int(mnt), name.encode(),
                                  ctypes.c_uint(OPEN_TREE_CLONE | os.O_CLOEXEC)), "open_tree")
        try:
            # O_PATH|O_NOFOLLOW: the mount lands on the path itself, even a dangling symlink.
            dst = os.open(target, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                flags = ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH)
                _check(_fs_syscall(SYS_MOVE_MOUNT, ctypes.c_int(tree), b"", ctypes.c_int(dst),
                                   b"", flags), f"move_mount onto {target}")
            finally:
                os.close(dst)
        finally:
            os.close(tree)
    finally:
        os.close(mnt)


def _cover_with_bind(target: str, text: str) -> str:
    """Pre-5.2 kernels: mount(2) follows symlinks, so cover the resolved target."""
    real = os.path.realpath(target)
    if not os.path.exists(real):
        # Dangling symlink (e.g. systemd-resolved not running): put a tmpfs over the target's
        # directory, in this mount namespace only, and create the file there.
        parent = os.path.dirname(real)
        if not os.path.isdir(parent):
            raise FileNotFoundError(errno.ENOENT, f"{target} -> {real}: neither the file nor "
                                                  "its directory exists, nothing to mount over")
        _mount("tmpfs", parent, "tmpfs", 0, "mode=0755")
        with open(real, "w") as f:
            f.write(text)
        return f"tmpfs over {parent}"
    fd, tmp = tempfile.mkstemp(prefix="nsvpn-", suffix="-" + os.path.basename(target))
    try:
        os.write(fd, text.encode())
        os.fchmod(fd, 0o644)
        _mount(tmp, real, None, MS_BIND)
    finally:
        os.close(fd)
        os.unlink(tmp)  # the bind mount keeps the inode; nothing stays on disk
    return f"bind mount over {real}"


def cover_file(target: str, text: str, *, legacy: bool = False) -> str:
    """Make `target` read as `text` in the current (private) mount namespace.

    Needs CAP_SYS_ADMIN in the mount namespace's user namespace. Returns how it was done.
    """
    if not os.path.lexists(target):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), target)
    if not legacy:
        try:
            _cover_with_move_mount(target, text, os.path.basename(target))
            return "move_mount onto " + target
        except OSError as e:
            if e.errno not in (errno.ENOSYS, errno.EINVAL, errno.EPERM):
                raise
            # ENOSYS: kernel < 5.2; EPERM/EINVAL: seccomp or an LSM refusing the new API
    return _cover_with_bind(target, text)


# ----------------------------------------------------------------------------------------------
# Child side


class _Stage:
    """Names the step the child is in, for error messages."""

    name = "fork"


def _send_msg(sock: socket.socket, tag: bytes, payload: dict | None = None,
              fds: Sequence[int] = ()) -> None:
    data = tag + (json.dumps(payload).encode() if payload is not None else b"")
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def _child_fail(sock: socket.socket, stage: str, exc: BaseException, code: int = 1) -> None:
    if isinstance(exc, OSError):
        err: int | None = exc.errno
        text = exc.strerror or str(exc)
        if exc.filename:
            text = f"{exc.filename}: {text}"
    else:
        err, text = None, f"{type(exc).__name__}: {exc}"
    try:
        _send_msg(sock, b"E", {"stage": stage, "errno": err, "msg": text, "code": code})
    except OSError:
        pass
    os._exit(code)


def _reset_signals() -> None:
    """Default dispositions for CMD (and no Python handler running in the child)."""
    try:
        signal.set_wakeup_fd(-1)
    except (ValueError, OSError):
        pass
    for s in FORWARDED_SIGNALS:
        signal.signal(s, signal.SIG_IGN if s in _INHERITED_IGNORED else signal.SIG_DFL)
    for name in ("SIGPIPE", "SIGXFSZ"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)


def _child_prologue(sock: socket.socket, parent_pid: int, stage: _Stage) -> None:
    """Right after fork: die with the parent, then unshare and wait for our maps."""
    stage.name = "prctl"
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
    _reset_signals()
    stage.name = "unshare"
    _unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWNS)
    sock.send(b"U")
    stage.name = "id maps"
    reply = sock.recv(4096)
    if reply != b"M":
        os._exit(1)  # the parent reports its own failure


def _write_sysctl(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _setup_network(spec: NetnsSpec, stage: _Stage) -> int:
    """In the fresh netns: sysctls, TUN, links, addresses, routes. Returns the TUN fd."""
    stage.name = "sysctl"
    if not spec.ipv6:
        try:  # before the TUN exists, so it never emits router solicitations / MLD
            _write_sysctl("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1")
        except FileNotFoundError:
            pass  # kernel without IPv6
    if spec.allow_ping:
        gid = os.getegid()
        try:
            _write_sysctl("/proc/sys/net/ipv4/ping_group_range", f"{gid} {gid}")
        except OSError:
            pass  # ping is a convenience; never fail the session for it
    stage.name = "tun"
    fd = _tun.open_tun(spec.ifname, vnet_hdr=spec.vnet_hdr)
    stage.name = "netlink"
    nl = _Rtnl()
    try:
        nl.link_set(1, up=True)  # lo is always ifindex 1 in a new netns
        index = socket.if_nametoindex(spec.ifname)
        nl.link_set(index, up=True, mtu=spec.mtu, txqlen=spec.queue_len())
        nl.addr_add(index, spec.addr, spec.prefixlen)
        net4 = ipaddress.ip_network(f"{spec.addr}/{spec.prefixlen}", strict=False)
        net6 = None
        if spec.ipv6:
            nl.addr_add(index, spec.addr6, spec.prefixlen6)
            net6 = ipaddress.ip_network(f"{spec.addr6}/{spec.prefixlen6}", strict=False)
        for r in spec.routes:
            dest = ipaddress.ip_network(r, strict=False)
            if dest.version == 6 and not spec.ipv6:
                continue
            gw = spec.gateway if dest.version == 4 else spec.gateway6
            net = net4 if dest.version == 4 else net6
            onlink = bool(gw) and net is not None and ipaddress.ip_address(gw) not in net
            nl.route_add(index, str(dest), gw, onlink=onlink)
    finally:
        nl.close()
    return fd


def _setup_mounts(spec: NetnsSpec, stage: _Stage) -> List[str]:
    """Private mount tree, then our files over /etc. Returns warnings for the parent."""
    stage.name = "mount"
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    warnings_: List[str] = []
    files = []
    if spec.manage_resolv_conf:
        files.append(("/etc/resolv.conf", spec.resolv_conf_text()))
    if spec.hosts is not None:
        files.append(("/etc/hosts", spec.hosts))
    for target, text in files:
        stage.name = os.path.basename(target)
        try:
            cover_file(target, text)
        except FileNotFoundError as e:
            # Nothing there to mount over: CMD still runs, without our file.
            warnings_.append(f"{target} not replaced: {e.strerror}")
    return warnings_


def _close_fds_except(keep: Sequence[int]) -> None:
    lo = 3
    for fd in sorted(set(f for f in keep if f >= 3)):
        if fd > lo:
            os.closerange(lo, fd)
        lo = fd + 1
    # One close_range() on 3.10+; fds above a lowered RLIMIT_NOFILE are close-on-exec anyway.
    os.closerange(lo, max(os.sysconf("SC_OPEN_MAX"), lo + 1))


def _child_main(sock: socket.socket, parent_pid: int, argv: List[str], spec: NetnsSpec,
                env: Dict[str, str] | None, cwd: str | None,
                pass_fds: Sequence[int]) -> None:
    stage = _Stage()
    try:
        _child_prologue(sock, parent_pid, stage)
        tun_fd = _setup_network(spec, stage)
        notes = _setup_mounts(spec, stage)
        stage.name = "send tun fd"
        _send_msg(sock, b"K", {"warnings": notes}, fds=[tun_fd])
        os.close(tun_fd)
        stage.name = "chdir"
        if cwd is not None:
            os.chdir(cwd)
        stage.name = "fds"
        for fd in pass_fds:
            os.set_inheritable(fd, True)
        _close_fds_except(list(pass_fds) + [sock.fileno()])
    except BaseException as e:  # noqa: B036 - the child must never unwind into the caller
        _child_fail(sock, stage.name, e)
    _exec(sock, argv, env)


def _exec(sock: socket.socket, argv: List[str], env: Dict[str, str] | None) -> None:
    """execvpe with shell semantics: 127 when nothing is found, 126 when found but refused.

    os.execvpe reports EACCES for a PATH directory we cannot search (e.g. /root/bin left in
    PATH by su), which shells treat as "not found"; and like execvp(3) we run a file without
    a #! line with /bin/sh.
    """
    name = argv[0]
    environ = os.environ if env is None else env
    if "/" in name:
        candidates = [name]
    else:
        dirs = environ.get("PATH", os.defpath).split(":")
        candidates = [os.path.join(d or ".", name) for d in dirs]
    refused: OSError | None = None
    for path in candidates:
        try:
            os.execve(path, argv, environ)
        except OSError as e:
            err = e
        if err.errno == errno.ENOEXEC:
            try:
                os.execve("/bin/sh", ["/bin/sh", path] + argv[1:], environ)
            except OSError as e2:
                err = e2
        if err.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            continue
        if err.errno == errno.EACCES and "/" not in name and not os.path.isfile(path):
            continue  # an unsearchable directory in PATH, not our command
        if os.path.isdir(path):
            err = OSError(errno.EISDIR, os.strerror(errno.EISDIR))
        refused = refused or err
    if refused is not None:
        _child_fail(sock, "exec", OSError(refused.errno, f"{name}: {refused.strerror}"), 126)
    what = "No such file or directory" if "/" in name else "command not found"
    _child_fail(sock, "exec", OSError(errno.ENOENT, f"{name}: {what}"), 127)


# ----------------------------------------------------------------------------------------------
# Parent side


def _write_proc(path: str, data: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data.encode())  # one write() per file: the kernel accepts only one
    finally:
        os.close(fd)


def _write_id_maps(pid: int) -> None:
    uid, gid = os.geteuid(), os.getegid()
    _write_proc(f"/proc/{pid}/uid_map", f"{uid} {uid} 1\n")
    try:
        _write_proc(f"/proc/{pid}/setgroups", "deny")
    except FileNotFoundError:
        pass  # kernels before 3.19 have no setgroups file
    _write_proc(f"/proc/{pid}/gid_map", f"{gid} {gid} 1\n")


def _require_main_thread(what: str) -> None:
    # PR_SET_PDEATHSIG fires when the forking *thread* exits, and fork from a thread is
    # unsafe in Python: refuse instead of failing mysteriously later.
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(f"{what} must be called from the main thread")


def _fork() -> int:
    for stream in (sys.stdout, sys.stderr):  # or the child could flush a copy at exit
        if stream is not None:
            stream.flush()
    with warnings.catch_warnings():  # 3.12+ warns about fork with threads; our child execs
        warnings.simplefilter("ignore", DeprecationWarning)
        return os.fork()


def _kill_and_reap(pid: int) -> int:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _, st = os.waitpid(pid, 0)
    return st


def _recv(sock: socket.socket, with_fd: bool = False) -> Tuple[bytes, List[int]]:
    if not with_fd:
        return sock.recv(65536), []
    # recvmsg, not socket.recv_fds: the latter drops its flags argument before 3.12.
    fdsize = struct.calcsize("i")
    data, anc, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(4 * fdsize), socket.MSG_CMSG_CLOEXEC)
    fds: List[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            n = len(payload) // fdsize
            fds += struct.unpack(f"{n}i", payload[: n * fdsize])
    return data, fds


def _stage_msg(stage: str, msg: str) -> str:
    return msg if msg.startswith(stage) else f"{stage}: {msg}"


class _ChildReport(Exception):
    """The child sent an error report (or vanished); becomes a SpawnError once reaped."""

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self.data = data

    def spawn_error(self, status: int) -> SpawnError:
        if self.data[:1] == b"E":
            info = json.loads(self.data[1:].decode())
            stage, msg, err = info.get("stage", "?"), info.get("msg", "?"), info.get("errno")
            if stage == "exec":
                return SpawnError(stage, msg, err, info.get("code", 1))
            text = f"namespace setup failed: {_stage_msg(stage, msg)}"
            if stage in ("unshare", "mount", "netlink") and err in (errno.EPERM, errno.ENOSPC):
                text += f" ({_explain_userns(stage, err, _userns_facts())})"
            return SpawnError(stage, text, err, info.get("code", 1))
        return SpawnError("child", "namespace child exited unexpectedly "
                                   f"(status {_exitcode(status)})")


def spawn(argv: Sequence[str], spec: NetnsSpec | None = None, *,
          env: Dict[str, str] | None = None, cwd: str | None = None,
          pass_fds: Sequence[int] = (), timeout: float = 10.0) -> NamespaceChild:
    """Run `argv` in a new user+net+mount namespace; return once it is exec'd.

    Raises SpawnError (child reaped) on any failure before CMD runs. Main thread only.
    stdin/stdout/stderr and the environment pass through; no other fd does except pass_fds.
    """
    if not argv:
        raise ValueError("empty command")
    spec = spec or NetnsSpec()
    argv = [os.fsdecode(a) for a in argv]
    _require_main_thread("spawn()")
    psock, csock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    parent_pid = os.getpid()
    pid = _fork()
    if pid == 0:
        psock.close()
        _child_main(csock, parent_pid, argv, spec, env, cwd, pass_fds)
        os._exit(1)  # not reached
    csock.close()
    pidfd: int | None = None
    tun_fd = -1
    try:
        if hasattr(os, "pidfd_open"):
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:  # kernel < 5.3
                pidfd = None
        psock.settimeout(timeout)
        data, _ = _recv(psock)
        if data != b"U":
            raise _ChildReport(data)
        try:
            _write_id_maps(pid)
        except OSError as e:
            raise SpawnError("id maps", "writing uid/gid maps for the namespace failed: "
                                        f"{e.strerror}", e.errno) from None
        psock.send(b"M")
        data, fds = _recv(psock, with_fd=True)
        if data[:1] != b"K" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise _ChildReport(data)
        tun_fd = fds[0]
        notes = list(json.loads(data[1:].decode()).get("warnings", []))
        os.set_blocking(tun_fd, False)
        # Exec'ing CMD from a slow shared filesystem may take long; the kernel bounds it.
        psock.settimeout(None)
        data, _ = _recv(psock)  # EOF: the exec closed the child's end
        if data:
            raise _ChildReport(data)
    except BaseException as e:
        if tun_fd >= 0:
            os.close(tun_fd)
        status = _kill_and_reap(pid)
        if pidfd is not None:
            os.close(pidfd)
        if isinstance(e, _ChildReport):
            raise e.spawn_error(status) from None
        if isinstance(e, socket.timeout):
            raise SpawnError("timeout", f"namespace setup did not finish within {timeout} s",
                             errno.ETIMEDOUT) from None
        raise
    finally:
        psock.close()
    child = NamespaceChild(pid, pidfd, tun_fd, spec)
    child.warnings = notes
    return child


# ----------------------------------------------------------------------------------------------
# Probe trials


@dataclasses.dataclass
class TrialResult:
    name: str
    ok: bool
    detail: str
    errno: int | None = None
    errname: str | None = None
    elapsed_ms: float = 0.0
    data: Dict[str, object] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> Dict[str, object]:
        return dataclasses.asdict(self)


def _read_sysctl(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


_USERNS_SYSCTLS = {
    "user.max_user_namespaces": "/proc/sys/user/max_user_namespaces",
    "user.max_net_namespaces": "/proc/sys/user/max_net_namespaces",
    "user.max_mnt_namespaces": "/proc/sys/user/max_mnt_namespaces",
    "kernel.unprivileged_userns_clone": "/proc/sys/kernel/unprivileged_userns_clone",
    "kernel.apparmor_restrict_unprivileged_userns":
        "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",
}


def _userns_facts() -> Dict[str, object]:
    facts: Dict[str, object] = {k: _read_sysctl(p) for k, p in _USERNS_SYSCTLS.items()}
    seccomp = None
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Seccomp:"):
                    seccomp = line.split()[1]
    except OSError:
        pass
    facts["seccomp"] = {"0": "off", "1": "strict", "2": "filter"}.get(seccomp or "", seccomp)
    uid_map = _read_sysctl("/proc/self/uid_map")
    facts["nested_userns"] = bool(uid_map) and uid_map.split() != ["0", "0", "4294967295"]
    facts["container"] = any(os.path.exists(p) for p in ("/.dockerenv", "/run/.containerenv"))
    return facts


def _sysctl_summary(facts: Dict[str, object]) -> str:
    return ", ".join(f"{k}={'absent' if facts.get(k) is None else facts[k]}"
                     for k in _USERNS_SYSCTLS)


def _explain_userns(stage: str, err: int | None, facts: Dict[str, object]) -> str:
    def zero(key: str) -> bool:
        return facts.get(key) == "0"

    if stage == "unshare":
        if err == errno.ENOSPC:
            for key in ("user.max_user_namespaces", "user.max_net_namespaces",
                        "user.max_mnt_namespaces"):
                if zero(key):
                    return f"{key} is 0: this node (or the user namespace we run in) " \
                           "allows no new namespaces"
            return "a user.max_*_namespaces limit is exhausted"
        if err == errno.EPERM:
            if zero("kernel.unprivileged_userns_clone"):
                return "kernel.unprivileged_userns_clone is 0: unprivileged user " \
                       "namespaces are disabled"
            if facts.get("seccomp") == "filter":
                return "unshare(CLONE_NEWUSER) refused, probably by a seccomp filter " \
                       "(container runtime or batch system sandbox)"
            if facts.get("container") or facts.get("nested_userns"):
                return "unshare(CLONE_NEWUSER) refused inside a container"
            return "unshare(CLONE_NEWUSER) refused (chroot, LSM or kernel policy)"
        if err == errno.EUSERS:
            return "too deeply nested user namespaces (32 levels)"
        if err == errno.EINVAL:
            return "unshare(CLONE_NEWUSER) not supported by this kernel"
    if stage == "id maps":
        return "the kernel refused the identity uid/gid map"
    if stage in ("mount", "netlink") and err == errno.EPERM:
        if facts.get("kernel.apparmor_restrict_unprivileged_userns") == "1":
            return "kernel.apparmor_restrict_unprivileged_userns is 1: AppArmor strips " \
                   "capabilities from unprivileged user namespaces"
        return "no capabilities inside the new user namespace (an LSM policy?)"
    return f"failed at {stage}"


def _run_trial(name: str, work, timeout: float = 2.0) -> TrialResult:
    """Fork; the child unshares, gets identity maps, runs work() -> (detail, data); report."""
    t0 = time.perf_counter()
    psock, csock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    parent_pid = os.getpid()
    pid = _fork()
    if pid == 0:
        psock.close()
        stage = _Stage()
        try:
            _child_prologue(csock, parent_pid, stage)
            detail, data = work(stage)
            _send_msg(csock, b"R", {"detail": detail, "data": data})
        except BaseException as e:  # noqa: B036
            _child_fail(csock, stage.name, e)
        os._exit(0)
    csock.close()
    result: Dict[str, object] = {"stage": "child", "errno": None, "msg": "trial child died"}
    try:
        psock.settimeout(timeout)
        data = psock.recv(65536)
        if data == b"U":
            try:
                _write_id_maps(pid)
            except OSError as e:
                result = {"stage": "id maps", "errno": e.errno, "msg": e.strerror}
                data = b""
            else:
                psock.send(b"M")
                data = psock.recv(65536)
        if data[:1] == b"R":
            result = json.loads(data[1:].decode())
            result["ok"] = True
        elif data[:1] == b"E":
            result = json.loads(data[1:].decode())
    except socket.timeout:
        result = {"stage": "timeout", "errno": None, "msg": f"no answer within {timeout} s"}
    finally:
        psock.close()
        _kill_and_reap(pid)
    ms = (time.perf_counter() - t0) * 1000
    if result.get("ok"):
        return TrialResult(name, True, str(result["detail"]), elapsed_ms=ms,
                           data=dict(result.get("data") or {}))
    err = result.get("errno")
    return TrialResult(name, False, _stage_msg(str(result.get("stage")), str(result.get("msg"))),
                       errno=err if isinstance(err, int) else None,
                       errname=errno.errorcode.get(err) if isinstance(err, int) else None,
                       elapsed_ms=ms, data={"stage": result.get("stage")})


def _work_userns(stage: _Stage):
    stage.name = "mount"
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # needs CAP_SYS_ADMIN in the new userns
    stage.name = "netlink"
    nl = _Rtnl()
    try:
        nl.link_set(1, up=True)  # needs CAP_NET_ADMIN in the new netns
    finally:
        nl.close()
    return (f"user+net+mount namespaces with identity map (uid {os.getuid()}, "
            f"gid {os.getgid()})", {"uid": os.getuid(), "gid": os.getgid()})


def trial_userns() -> TrialResult:
    """Unshare user+net+mount, identity-map, use CAP_SYS_ADMIN and CAP_NET_ADMIN inside."""
    _require_main_thread("trial_userns()")
    r = _run_trial("userns", _work_userns)
    facts = _userns_facts()
    r.data.update(facts)
    if not r.ok:
        why = _explain_userns(str(r.data.get("stage")), r.errno, facts)
        r.detail = f"{why} ({r.detail}; read: {_sysctl_summary(facts)})"
    return r


def _work_tun(stage: _Stage):
    stage.name = "tun"
    data: Dict[str, object] = {"mode": _tun.device_mode(), "vnet_hdr": True}
    # One device only: tearing a TUN device down costs 20-40 ms of RCU grace periods.
    try:
        _tun.open_tun("tun0", vnet_hdr=True)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.ENOENT):
            raise
        _tun.open_tun("tun0")  # offloads are optional: the relay works without them
        data["vnet_hdr"] = False
    # The fd stays open: it dies with this child, while the parent reports.
    return f"created a TUN device in a new netns ({_tun.TUN_PATH} mode {data['mode']})", data


def trial_tun() -> TrialResult:
    """Inside a fresh userns+netns: open /dev/net/tun and TUNSETIFF."""
    _require_main_thread("trial_tun()")
    r = _run_trial("tun", _work_tun)
    r.data["mode"] = _tun.device_mode()
    if not r.ok and r.data.get("stage") != "tun":
        r.detail = f"user namespace unusable: {r.detail}"
    return r


def _work_bind(stage: _Stage):
    stage.name = "mount"
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    stage.name = "resolv.conf"
    # Any file in /etc proves the mechanism; resolv.conf is the one we need, when it exists.
    candidates = ("/etc/resolv.conf", "/etc/hosts", "/etc/passwd")
    target = next((p for p in candidates if os.path.lexists(p)), candidates[0])
    text = "# nsvpn probe\nnameserver 10.0.2.3\n"
    is_link = os.path.islink(target)
    how = cover_file(target, text)
    with open(target) as f:
        if f.read() != text:
            raise OSError(errno.EIO, "the covered file does not read back")
    return (f"{how} works" + (" (it is a symlink)" if is_link else ""),
            {"method": how, "symlink": is_link})


def trial_bind_mount() -> TrialResult:
    """In a fresh userns+mountns: cover /etc/resolv.conf (symlink or not) with our file."""
    _require_main_thread("trial_bind_mount()")
    return _run_trial("mount", _work_bind)
