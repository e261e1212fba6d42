#!/usr/bin/python3
"""A TCP + UDP relay that adds a fixed delay: the lab's "WAN" in front of the edge services.

This kernel has no sch_netem, so `scripts/lab` runs this relay in the edge namespace on the
WAN address (wan.lab): each listed port, TCP and UDP, is forwarded to the same port on the
edge's address, and every chunk of bytes / every datagram waits rtt/2 in each direction.
Since the delay is constant, per-direction FIFO queues are already sorted by deadline:
one select() loop, no timer per packet. Standard library only.

usage: wan_delay.py --listen IP --to IP --rtt-ms MS --tcp PORT[,PORT...] --udp PORT[,...]
"""

from __future__ import annotations

import argparse
import collections
import errno
import selectors
import socket
import sys
import time

CHUNK = 256 * 1024
MAX_QUEUED = 32 << 20  # per TCP direction: stop reading beyond this (back-pressure)
UDP_IDLE = 300.0  # seconds before a UDP flow's upstream socket is dropped
EOF = b""


class TcpDir:
    """One direction of a relayed TCP connection: src -> (delay) -> dst."""

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self.src, self.dst = src, dst
        self.queue: collections.deque = collections.deque()  # (deadline, bytes or EOF)
        self.queued = 0
        self.partial = b""  # head chunk that did not fit into dst's send buffer
        self.read_done = False
        self.closed = False


class Relay:
    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.sel = selectors.DefaultSelector()
        self.dirs: list[TcpDir] = []
        self.udp_out: collections.deque = collections.deque()  # (deadline, sock, data, addr)
        self.udp_flows: dict = {}  # (listener, client addr) -> [upstream socket, last use]

    # ---------------------------------------------------------------- setup

    def listen_tcp(self, ip: str, port: int, to: tuple[str, int]) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((ip, port))
        s.listen(512)
        s.setblocking(False)
        self.sel.register(s, selectors.EVENT_READ, ("accept", to))

    def listen_udp(self, ip: str, port: int, to: tuple[str, int]) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        s.bind((ip, port))
        s.setblocking(False)
        self.sel.register(s, selectors.EVENT_READ, ("udp-in", to))

    # ---------------------------------------------------------------- events

    def accept(self, lsock: socket.socket, to: tuple[str, int]) -> None:
        try:
            client, _ = lsock.accept()
        except BlockingIOError:
            return
        try:
            upstream = socket.create_connection(to, timeout=5)
        except OSError:
            client.close()
            return
        pair = []
        for s in (client, upstream):
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        a, b = TcpDir(client, upstream), TcpDir(upstream, client)
        pair = [a, b]
        self.dirs += pair
        # one registration per socket: data = (its reading direction, its writing direction)
        self.sel.register(client, selectors.EVENT_READ, ("tcp", a, b))
        self.sel.register(upstream, selectors.EVENT_READ, ("tcp", b, a))

    def tcp_read(self, d: TcpDir, now: float) -> None:
        try:
            data = d.src.recv(CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = EOF
        d.queue.append((now + self.delay, data))
        d.queued += len(data)
        if not data:
            d.read_done = True

    def tcp_flush(self, d: TcpDir, now: float) -> None:
        while not d.closed and (d.partial or (d.queue and d.queue[0][0] <= now)):
            if not d.partial:
                _, data = d.queue.popleft()
                d.queued -= len(data)
                if data is EOF or not data:
                    try:
                        d.dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    d.closed = True
                    break
                d.partial = data
            try:
                n = d.dst.send(d.partial)
            except BlockingIOError:
                return
            except OSError:
                d.closed = True
                d.read_done = True
                break
            d.partial = d.partial[n:]
            if d.partial:
                return

    def udp_in(self, lsock: socket.socket, to: tuple[str, int], now: float) -> None:
        for _ in range(256):  # drain a batch
            try:
                data, addr = lsock.recvfrom(65535)
            except BlockingIOError:
                return
            key = (lsock, addr)
            flow = self.udp_flows.get(key)
            if flow is None:
                up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                up.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
                up.connect(to)
                up.setblocking(False)
                flow = self.udp_flows[key] = [up, now]
                self.sel.register(up, selectors.EVENT_READ, ("udp-back", lsock, addr))
            flow[1] = now
            self.udp_out.append((now + self.delay, flow[0], data, None))

    def udp_back(self, up: socket.socket, lsock: socket.socket, addr: tuple, now: float) -> None:
        for _ in range(256):
            try:
                data = up.recv(65535)
            except BlockingIOError:
                return
            except OSError:
                return
            self.udp_flows[(lsock, addr)][1] = now
            self.udp_out.append((now + self.delay, lsock, data, addr))

    def udp_flush(self, now: float) -> None:
        q = self.udp_out
        while q and q[0][0] <= now:
            _, sock, data, addr = q.popleft()
            try:
                if addr is None:
                    sock.send(data)
                else:
                    sock.sendto(data, addr)
            except OSError as e:  # a full buffer or a dead peer: a lost datagram, like a WAN
                if e.errno not in (errno.EAGAIN, errno.ECONNREFUSED, errno.ENOBUFS):
                    raise

    # ---------------------------------------------------------------- loop

    def update_interest(self) -> None:
        """Read from a socket only while its queue has room; watch writability when blocked."""
        want: dict = {}
        for d in self.dirs:
            if d.src.fileno() >= 0 and not d.read_done and d.queued < MAX_QUEUED:
                want[d.src] = want.get(d.src, 0) | selectors.EVENT_READ
            if d.partial and not d.closed and d.dst.fileno() >= 0:
                want[d.dst] = want.get(d.dst, 0) | selectors.EVENT_WRITE
        for key in list(self.sel.get_map().values()):
            if key.data[0] != "tcp":
                continue
            ev = want.get(key.fileobj, 0)
            if ev == 0:
                self.sel.unregister(key.fileobj)
            elif ev != key.events:
                self.sel.modify(key.fileobj, ev, key.data)
        for sock, ev in want.items():
            if sock not in self.sel.get_map():
                d = next(x for x in self.dirs if x.src is sock)
                o = next(x for x in self.dirs if x.dst is sock)
                self.sel.register(sock, ev, ("tcp", d, o))

    def reap(self, now: float) -> None:
        done = [d for d in self.dirs if d.closed]
        for d in done:
            other = next((x for x in self.dirs if x.src is d.dst and x.dst is d.src), None)
            if other is not None and not other.closed:
                continue
            for s in (d.src, d.dst):
                if s.fileno() >= 0:
                    if s in self.sel.get_map():
                        self.sel.unregister(s)
                    s.close()
        self.dirs = [d for d in self.dirs if d.src.fileno() >= 0 and d.dst.fileno() >= 0]
        for key, (up, last) in list(self.udp_flows.items()):
            if now - last > UDP_IDLE:
                self.sel.unregister(up)
                up.close()
                del self.udp_flows[key]

    def run(self) -> None:
        last_reap = time.monotonic()
        while True:
            now = time.monotonic()
            deadlines = [d.queue[0][0] for d in self.dirs if d.queue and not d.partial]
            if self.udp_out:
                deadlines.append(self.udp_out[0][0])
            timeout = max(0.0, min(deadlines) - now) if deadlines else 1.0
            for key, mask in self.sel.select(timeout):
                now = time.monotonic()
                kind = key.data[0]
                if kind == "accept":
                    self.accept(key.fileobj, key.data[1])
                elif kind == "udp-in":
                    self.udp_in(key.fileobj, key.data[1], now)
                elif kind == "udp-back":
                    self.udp_back(key.fileobj, key.data[1], key.data[2], now)
                elif kind == "tcp":
                    if mask & selectors.EVENT_READ:
                        self.tcp_read(key.data[1], now)
                    if mask & selectors.EVENT_WRITE:
                        self.tcp_flush(key.data[2], now)
            now = time.monotonic()
            self.udp_flush(now)
            for d in self.dirs:
                self.tcp_flush(d, now)
            if now - last_reap > 1.0 or any(d.closed for d in self.dirs):
                self.reap(now)
                last_reap = now
            self.update_interest()


def ports(text: str) -> list[int]:
    return [int(p) for p in text.split(",") if p]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", required=True)
    p.add_argument("--to", required=True)
    p.add_argument("--rtt-ms", type=float, required=True)
    p.add_argument("--tcp", type=ports, default=[])
    p.add_argument("--udp", type=ports, default=[])
    a = p.parse_args()
    relay = Relay(a.rtt_ms / 2000.0)
    for port in a.tcp:
        relay.listen_tcp(a.listen, port, (a.to, port))
    for port in a.udp:
        relay.listen_udp(a.listen, port, (a.to, port))
    print(f"wan_delay: {a.listen} -> {a.to}, rtt {a.rtt_ms} ms, tcp {a.tcp}, udp {a.udp}",
          flush=True)
    try:
        relay.run()
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
