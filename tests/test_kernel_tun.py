"""The stack against the real Linux kernel through a TUN in a scratch netns (needs root).

Bulk transfers (sha256 byte-exact, both directions, MTU 65520 and 1500, with and without
virtio-net framing) use 128 MiB per transfer by default and 1 GiB with NSVPN_LONG=1.
Smaller tests check what the kernel makes of our ICMP/RST answers: ping to the gateway,
UDP round trips, ECONNREFUSED, EHOSTUNREACH/ENETUNREACH.
"""

from __future__ import annotations

import importlib.util
import os
import select
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates a netns and a TUN"),
]

_spec = importlib.util.spec_from_file_location(
    "bench_netstack", os.path.join(os.path.dirname(__file__), "..", "scripts",
                                   "bench_netstack.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

from nsvpn.netstack.stack import (  # noqa: E402
    NewTcpFlow,
    Stack,
    TcpFlowEvent,
    UdpDatagram,
)

NETNS = "nsvpn-ktest"
LONG = os.environ.get("NSVPN_LONG") == "1"
SIZE = (1 << 30) if LONG else (128 << 20)


@pytest.mark.parametrize("mtu", [65520, 1500])
@pytest.mark.parametrize("vnet", [False, True], ids=["plain", "vnet"])
@pytest.mark.parametrize("direction", ["up", "down"])
def test_bulk_byte_exact(mtu, vnet, direction):
    with bench.KernelLink(NETNS, mtu=mtu, vnet=vnet) as link:
        r = bench.transfer(link, direction, SIZE, do_hash=True, seed=mtu + vnet)
    _mode, count, digest, _secs = r.client_line.split()
    assert int(count) == SIZE and r.nbytes == SIZE
    assert digest == r.sha256
    assert not r.counters["drops"].get("tcp_bad_checksum")
    print(f"\n{direction} mtu={mtu} vnet={vnet}: {r.mbps:.0f} MB/s, "
          f"{r.us_per_segment:.1f} us/segment")


@pytest.mark.parametrize("mtu", [65520, 1500])
@pytest.mark.parametrize("vnet", [False, True], ids=["plain", "vnet"])
@pytest.mark.parametrize("direction", ["up", "down"])
def test_bulk_byte_exact_ipv6(mtu, vnet, direction):
    size = SIZE // 4
    with bench.KernelLink(NETNS, mtu=mtu, vnet=vnet) as link:
        r = bench.transfer(link, direction, size, do_hash=True, seed=7,
                           remote=bench.REMOTE_ADDR6)
    _mode, count, digest, _secs = r.client_line.split()
    assert int(count) == size and r.nbytes == size and digest == r.sha256


# ----------------------------------------------------------------------------- small exchanges


def netns_python(code: str) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", NETNS, sys.executable, "-c",
                             textwrap.dedent(code)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(link, stack: Stack, proc: subprocess.Popen, on_event, timeout: float = 20.0,
        on_tick=None) -> str:
    """Move packets between the TUN and `stack` until `proc` exits; returns its stdout."""
    fd = link.fd
    end = time.monotonic() + timeout
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while proc.poll() is None:
        now = time.monotonic()
        assert now < end, f"timed out; counters {stack.counters}"
        while True:
            try:
                pkt = os.read(fd, 70000)
            except BlockingIOError:
                break
            stack.input_packet(pkt, now)
        for ev in stack.pop_events():
            on_event(stack, ev, now)
        if on_tick is not None:
            on_tick(stack, now)
        d = stack.next_deadline()
        if d is not None and d <= now:
            stack.on_timer(now)
        for pkt in stack.output_packets():
            os.write(fd, pkt)
        poller.poll(20)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    return out


@pytest.mark.parametrize("vnet", [False, True], ids=["plain", "vnet"])
def test_ping_gateway_and_dns(vnet):
    with bench.KernelLink(NETNS, mtu=1500, vnet=vnet) as link:
        stack = Stack(link.stack_config())
        proc = subprocess.Popen(["ip", "netns", "exec", NETNS, "sh", "-c",
                                 "ping -n -c 2 -i 0.2 -W 2 10.0.2.2 && "
                                 "ping -n -c 2 -i 0.2 -W 2 -s 1400 10.0.2.3"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out = run(link, stack, proc, lambda *a: None)
    assert out.count("bytes from 10.0.2.2") == 2 and out.count("bytes from 10.0.2.3") == 2


def test_ping6_gateway():
    with bench.KernelLink(NETNS, mtu=1500, vnet=True) as link:
        stack = Stack(link.stack_config())
        proc = subprocess.Popen(["ip", "netns", "exec", NETNS, "ping", "-6", "-n", "-c", "2",
                                 "-i", "0.2", "-W", "2", "-s", "1000", "fd00::2"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out = run(link, stack, proc, lambda *a: None)
    assert out.count("bytes from fd00::2") == 2


@pytest.mark.parametrize("vnet", [False, True], ids=["plain", "vnet"])
def test_udp_round_trip_and_port_unreachable(vnet):
    code = """
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(5)
        s.connect(("10.0.2.3", 53))
        s.send(b"hello stack")
        print(s.recv(100).decode())
        s.send(b"refuse me")
        try:
            s.recv(100)
            print("no error")
        except ConnectionRefusedError:
            print("refused")
    """

    def on_event(stack, ev, now):
        if isinstance(ev, UdpDatagram):
            if ev.payload == b"hello stack":
                stack.send_udp(ev.dst, ev.src, b"reply:" + ev.payload)
            else:
                stack.udp_unreachable(ev)

    with bench.KernelLink(NETNS, mtu=1500, vnet=vnet) as link:
        out = run(link, Stack(link.stack_config()), netns_python(code), on_event)
    assert out.split() == ["reply:hello", "stack", "refused"]


@pytest.mark.parametrize("vnet", [False, True], ids=["plain", "vnet"])
@pytest.mark.parametrize("host", ["10.0.2.50", "fd00::50"])
def test_connect_errors_seen_by_the_kernel(vnet, host):
    """refuse -> ECONNREFUSED; unreachable -> EHOSTUNREACH / ENETUNREACH / (v6 admin) EACCES;
    accept -> data."""
    code = f"""
        import errno, socket
        for port in (1, 2, 3, 5, 4):
            s = socket.socket(socket.AF_INET6 if ":" in {host!r} else socket.AF_INET)
            s.settimeout(5)
            try:
                s.connect(({host!r}, port))
                s.sendall(b"x" * 10)
                print(port, "ok", s.recv(10).decode())
            except OSError as e:
                print(port, errno.errorcode.get(e.errno, e.errno))
            s.close()
    """
    actions = {1: "refuse", 2: "host", 3: "net", 4: "accept", 5: "admin"}

    def on_event(stack, ev, now):
        if isinstance(ev, NewTcpFlow):
            what = actions[ev.flow.dst[1]]
            if what == "refuse":
                stack.refuse(ev.flow, now)
            elif what == "accept":
                stack.accept(ev.flow, now)
            else:
                stack.unreachable(ev.flow, now, what)
        elif isinstance(ev, TcpFlowEvent) and ev.kind == "data":
            if stack.tcp_recv(ev.flow, -1):
                stack.tcp_send(ev.flow, b"pong", now)
                stack.tcp_shutdown(ev.flow, now)

    with bench.KernelLink(NETNS, mtu=1500, vnet=vnet) as link:
        out = run(link, Stack(link.stack_config()), netns_python(code), on_event)
    admin = "EHOSTUNREACH" if "." in host else "EACCES"
    assert out.splitlines() == ["1 ECONNREFUSED", "2 EHOSTUNREACH", "3 ENETUNREACH",
                                f"5 {admin}", "4 ok pong"]


def test_rst_for_unknown_connection_seen_by_the_kernel():
    """A flow the stack forgot answers the kernel's next segment with RST: ECONNRESET."""
    code = """
        import errno, socket, time
        s = socket.socket()
        s.settimeout(5)
        s.connect(("10.0.2.50", 7))
        time.sleep(0.3)
        try:
            s.sendall(b"are you there?")
            time.sleep(0.3)
            s.recv(10)
            print("no error")
        except OSError as e:
            print(errno.errorcode.get(e.errno, e.errno))
    """
    state = {}

    def on_event(stack, ev, now):
        if isinstance(ev, NewTcpFlow):
            stack.accept(ev.flow, now)
        elif isinstance(ev, TcpFlowEvent) and ev.kind == "connected" and not state:
            # Forget the flow without telling the peer.
            state["forgot"] = True
            stack._remove(ev.flow)

    with bench.KernelLink(NETNS, mtu=1500, vnet=False) as link:
        stack = Stack(link.stack_config())
        out = run(link, stack, netns_python(code), on_event)
    assert out.strip() == "ECONNRESET"
    assert stack.counters["rst_out"] >= 1


@pytest.mark.parametrize("vnet", [False, True], ids=["plain", "vnet"])
def test_many_concurrent_echo_flows(vnet):
    """16 kernel connections at once through the stack, which echoes every byte back."""
    code = """
        import hashlib, os, socket, threading
        results = []
        def one(i):
            data = os.urandom(2 << 20)
            s = socket.create_connection(("10.0.2.50", 6000 + i), timeout=20)
            got = bytearray()
            def reader():
                while True:
                    b = s.recv(1 << 16)
                    if not b:
                        break
                    got.extend(b)
            t = threading.Thread(target=reader)
            t.start()
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            t.join()
            results.append(bytes(got) == data)
        ts = [threading.Thread(target=one, args=(i,)) for i in range(16)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        print(sum(results))
    """
    pending: dict = {}

    def on_event(stack, ev, now):
        if isinstance(ev, NewTcpFlow):
            stack.accept(ev.flow, now)
            pending[ev.flow.id] = b""
        elif isinstance(ev, TcpFlowEvent) and ev.flow.id in pending:
            f = ev.flow
            buf = pending[f.id] + stack.tcp_recv(f, -1)
            buf = buf[stack.tcp_send(f, buf, now):]
            pending[f.id] = buf
            if ev.kind == "eof" or f.conn.state == "CLOSE_WAIT":
                if not buf:
                    stack.tcp_shutdown(f, now)

    def on_tick(stack, now):  # keep echoing what did not fit the send buffer yet
        for f in stack.tcp_flows():
            buf = pending.get(f.id)
            if buf:
                buf = buf[stack.tcp_send(f, buf, now):]
                pending[f.id] = buf
                if not buf and f.conn.state == "CLOSE_WAIT":
                    stack.tcp_shutdown(f, now)

    with bench.KernelLink(NETNS, mtu=1500, vnet=vnet) as link:
        stack = Stack(link.stack_config())
        out = run(link, stack, netns_python(code), on_event, timeout=60.0, on_tick=on_tick)
    assert out.strip() == "16"
    assert stack.counters["tcp_flows_total"] == 16
