#!/usr/bin/env python3
"""Throughput of the userspace stack against the real Linux kernel through a TUN.

Set-up (needs root): a scratch netns `nsvpn-bench` (or the name given) holding a TUN with
10.0.2.100/24 and a default route via 10.0.2.2; the TUN fd is opened inside the netns by a
forked child (setns) and passed back over a socketpair (SCM_RIGHTS). This process runs a plain
poll() loop moving packets between the fd and a Stack, and plays the upstream app; a kernel
TCP client in the netns (`ip netns exec ... python3 -c`) connects to 10.0.2.50:5000 and either
sends N bytes (kernel -> stack, "up") or receives them (stack -> kernel, "down").

    python3 scripts/bench_netstack.py [--size MiB] [--mtu 65520 --mtu 1500] [--vnet both]

Reports MB/s per direction and the relay's CPU microseconds per TCP segment (process time of
this process divided by segments in + out). The tests (tests/test_kernel_tun.py) reuse
`KernelLink` and `transfer` from here with sha256 checks switched on.
"""

from __future__ import annotations

import argparse
import array
import fcntl
import hashlib
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nsvpn.netstack.stack import NewTcpFlow, Stack, StackConfig, TcpFlowEvent  # noqa: E402

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
CLONE_NEWNET = 0x40000000

APP_ADDR = "10.0.2.100"
REMOTE_ADDR = "10.0.2.50"
APP_ADDR6 = "fd00::100"
REMOTE_ADDR6 = "fd00::50"
REMOTE_PORT = 5000
PATTERN_LEN = (4 << 20) + 13  # odd length: a misplaced block shows up in the hash

# The kernel-side client. argv: mode(send|recv) nbytes hash(0|1) seed host
CLIENT = r"""
import hashlib, os, random, socket, sys, time
mode, n, do_hash, seed = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
host = sys.argv[5]
pat = random.Random(seed).randbytes(PATTERN_LEN)
s = socket.create_connection((host, REMOTE_PORT), timeout=60)
s.settimeout(120)
h = hashlib.sha256()
t0 = time.monotonic()
done = 0
if mode == "send":
    mv = memoryview(pat * 2)
    off = 0
    while done < n:
        k = min(n - done, 1 << 20)
        chunk = mv[off:off + k]
        s.sendall(chunk)
        if do_hash:
            h.update(chunk)
        done += k
        off = (off + k) % len(pat)
    s.shutdown(socket.SHUT_WR)
    while s.recv(65536):
        pass
else:
    buf = bytearray(1 << 20)
    while True:
        k = s.recv_into(buf)
        if not k:
            break
        if do_hash:
            h.update(memoryview(buf)[:k])
        done += k
dt = time.monotonic() - t0
print(mode, done, h.hexdigest(), f"{dt:.6f}", flush=True)
""".replace("PATTERN_LEN", str(PATTERN_LEN)).replace("REMOTE_PORT", str(REMOTE_PORT))


def pattern_stream(seed: int):
    """The byte stream the client sends/expects: a random block repeated."""
    import random

    return random.Random(seed).randbytes(PATTERN_LEN)


def _ip(netns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", netns, *args], check=True)


def _recv_fd(sock: socket.socket) -> int:
    fds = array.array("i")
    _msg, anc, _flags, _addr = sock.recvmsg(1, socket.CMSG_LEN(fds.itemsize))
    for level, typ, data in anc:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            fds.frombytes(data[: fds.itemsize])
            return fds[0]
    raise RuntimeError("no fd received")


def open_tun_in_netns(netns: str, name: str, vnet: bool) -> int:
    """Open a TUN inside `netns` from a forked child (setns + TUNSETIFF) and receive its fd."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    pid = os.fork()
    if pid == 0:  # child: only syscalls, then _exit
        code = 1
        try:
            parent.close()
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            nsfd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
            if libc.setns(nsfd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if vnet else 0)
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
            if vnet:
                fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
            child.sendmsg([b"F"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                    array.array("i", [fd]).tobytes())])
            code = 0
        except BaseException as exc:  # report and leave without running parent cleanup
            try:
                os.write(2, f"tun child: {exc!r}\n".encode())
            except OSError:
                pass
        os._exit(code)
    child.close()
    try:
        fd = _recv_fd(parent)
    finally:
        parent.close()
        _, status = os.waitpid(pid, 0)
    if status != 0:
        os.close(fd)
        raise RuntimeError("TUN child failed")
    return fd


class KernelLink:
    """A scratch netns with a TUN whose fd we hold. Use as a context manager."""

    def __init__(self, netns: str = "nsvpn-bench", mtu: int = 65520, vnet: bool = False,
                 txqueuelen: int = 1000) -> None:
        assert netns.startswith("nsvpn-")
        self.netns = netns
        self.mtu = mtu
        self.vnet = vnet
        self.txqueuelen = txqueuelen
        self.dev = "nsvpn0"
        self.fd = -1

    def __enter__(self) -> KernelLink:
        subprocess.run(["ip", "netns", "del", self.netns], stderr=subprocess.DEVNULL)
        subprocess.run(["ip", "netns", "add", self.netns], check=True)
        try:
            self.fd = open_tun_in_netns(self.netns, self.dev, self.vnet)
            os.set_blocking(self.fd, False)
            _ip(self.netns, "link", "set", "lo", "up")
            _ip(self.netns, "link", "set", self.dev, "mtu", str(self.mtu), "txqueuelen",
                str(self.txqueuelen), "up")
            _ip(self.netns, "addr", "add", f"{APP_ADDR}/24", "dev", self.dev)
            _ip(self.netns, "route", "add", "default", "via", "10.0.2.2")
            _ip(self.netns, "-6", "addr", "add", f"{APP_ADDR6}/64", "dev", self.dev, "nodad")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        subprocess.run(["ip", "netns", "del", self.netns], stderr=subprocess.DEVNULL)

    def stack_config(self, **kw) -> StackConfig:
        return StackConfig(mtu=self.mtu, vnet_hdr=self.vnet, tun_queue_len=self.txqueuelen,
                           **kw)

    def client(self, mode: str, nbytes: int, do_hash: bool, seed: int,
               host: str = REMOTE_ADDR) -> subprocess.Popen:
        return subprocess.Popen(
            ["ip", "netns", "exec", self.netns, sys.executable, "-c", CLIENT, mode,
             str(nbytes), "1" if do_hash else "0", str(seed), host],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True)


class Result:
    def __init__(self) -> None:
        self.nbytes = 0
        self.seconds = 0.0
        self.cpu = 0.0
        self.segments = 0
        self.sha256 = ""
        self.client_line = ""
        self.counters: dict = {}

    @property
    def mbps(self) -> float:
        return self.nbytes / self.seconds / 1e6 if self.seconds else 0.0

    @property
    def us_per_segment(self) -> float:
        return self.cpu / self.segments * 1e6 if self.segments else 0.0


def transfer(link: KernelLink, direction: str, nbytes: int, *, do_hash: bool = True,
             seed: int = 1, timeout: float = 600.0, batch: int = 16,
             stack_config=None, remote: str = REMOTE_ADDR) -> Result:
    """Move `nbytes` through the stack: 'up' = kernel client sends, 'down' = stack sends.
    Returns a Result; raises on timeout or a client failure."""
    stack = Stack(stack_config or link.stack_config())
    fd = link.fd
    res = Result()
    h = hashlib.sha256()
    proc = link.client("send" if direction == "up" else "recv", nbytes, do_hash, seed, remote)
    pat = memoryview(pattern_stream(seed) * 2) if direction == "down" else None
    plen = PATTERN_LEN
    sent = 0
    off = 0
    received = 0
    flow = None
    eof = False
    shut = False
    bufsize = 65535 + 64
    buf = bytearray(bufsize)
    bmv = memoryview(buf)
    readv = os.readv
    writev = os.writev
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    t_start = time.monotonic()
    t0 = None
    t_end = None
    cpu0 = time.process_time()
    end_by = t_start + timeout
    try:
        while True:
            now = time.monotonic()
            if now > end_by:
                raise TimeoutError(f"transfer {direction} stalled at {received or sent} bytes; "
                                   f"counters {stack.counters}")
            n_in = 0
            while n_in < batch:
                try:
                    k = readv(fd, (buf,))
                except BlockingIOError:
                    break
                stack.input_packet(bmv[:k], now)
                n_in += 1
            for ev in stack.pop_events():
                if isinstance(ev, NewTcpFlow):
                    if flow is None and ev.flow.dst == (remote, REMOTE_PORT):
                        flow = ev.flow
                        stack.accept(flow, now)
                        t0 = time.monotonic()
                    else:
                        stack.refuse(ev.flow, now)
                elif isinstance(ev, TcpFlowEvent) and ev.flow is flow:
                    if ev.kind == "eof":
                        eof = True
                    elif ev.kind in ("reset", "timeout"):
                        raise RuntimeError(f"connection {ev.kind}; counters {stack.counters}")
            if flow is not None:
                if direction == "up":
                    data = stack.tcp_recv(flow, -1)
                    if data:
                        received += len(data)
                        if do_hash:
                            h.update(data)
                    if eof and not shut:
                        stack.tcp_shutdown(flow, now)
                        shut = True
                else:
                    while sent < nbytes:
                        k = stack.tcp_send(flow, pat[off:off + min(nbytes - sent, 1 << 20)],
                                           now)
                        if not k:
                            break
                        if do_hash:
                            h.update(pat[off:off + k])
                        sent += k
                        off = (off + k) % plen
                    if sent >= nbytes and not shut:
                        stack.tcp_shutdown(flow, now)
                        shut = True
                    if eof:
                        stack.tcp_recv(flow, -1)
            d = stack.next_deadline()
            if d is not None and d <= now:
                stack.on_timer(now)
            for iov in stack.output_iovecs():
                writev(fd, iov)
            if t_end is None and flow is not None and (
                    flow.removed or (eof if direction == "up" else
                                     flow.conn.state in ("FIN_WAIT_2", "TIME_WAIT", "CLOSED"))):
                t_end = time.monotonic()  # all data delivered (and acked, downwards)
                res.cpu = time.process_time() - cpu0
            # Lingering in TIME_WAIT is not part of the transfer.
            if flow is not None and (flow.removed or flow.conn.state == "TIME_WAIT") \
                    and proc.poll() is not None:
                break
            if proc.poll() is not None and flow is None:
                break
            if n_in == 0:
                wait = 0.05
                d = stack.next_deadline()
                if d is not None:
                    wait = max(0.0, min(wait, d - time.monotonic()))
                poller.poll(wait * 1000)
        if t_end is None:
            t_end = time.monotonic()
            res.cpu = time.process_time() - cpu0
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"client failed ({proc.returncode}): {err.strip()}")
    res.client_line = out.strip()
    res.nbytes = received if direction == "up" else sent
    res.seconds = t_end - (t0 or t_start)
    res.sha256 = h.hexdigest() if do_hash else ""
    res.counters = stack.counters
    res.segments = res.counters["packets_in"] + res.counters["packets_out"]
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1024, help="MiB per direction (default 1024)")
    ap.add_argument("--mtu", type=int, action="append", help="repeatable; default 65520, 1500")
    ap.add_argument("--vnet", choices=["on", "off", "both"], default="both")
    ap.add_argument("--direction", choices=["up", "down", "both"], default="both")
    ap.add_argument("--hash", action="store_true", help="also sha256-check (costs CPU)")
    ap.add_argument("--netns", default="nsvpn-bench")
    ap.add_argument("--batch", type=int, default=16, help="packets read per batch")
    ap.add_argument("--no-verify", action="store_true",
                    help="StackConfig(verify_checksums=False) for the plain framing")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (creates a network namespace and a TUN)", file=sys.stderr)
        return 2
    mtus = args.mtu or [65520, 1500]
    vnets = {"on": [True], "off": [False], "both": [False, True]}[args.vnet]
    dirs = ["up", "down"] if args.direction == "both" else [args.direction]
    nbytes = args.size << 20
    print(f"{'mtu':>6} {'vnet':>5} {'dir':>5} {'MB/s':>8} {'us/seg':>7} {'segs':>8}  check")
    for mtu in mtus:
        for vnet in vnets:
            with KernelLink(args.netns, mtu=mtu, vnet=vnet) as link:
                for d in [d for d in dirs for _ in range(args.repeat)]:
                    cfg = link.stack_config(verify_checksums=not args.no_verify)
                    r = transfer(link, d, nbytes, do_hash=args.hash, batch=args.batch,
                                 stack_config=cfg)
                    check = ""
                    if args.hash:
                        fields = r.client_line.split()
                        check = "sha256 ok" if fields[2] == r.sha256 else "SHA256 MISMATCH"
                    print(f"{mtu:>6} {str(vnet):>5} {d:>5} {r.mbps:>8.0f} "
                          f"{r.us_per_segment:>7.1f} {r.segments:>8}  {check}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
