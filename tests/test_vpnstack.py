"""VpnStackUpstream over a socketpair (what VPNFD is), no lab needed.

The far side of the "tunnel" is a second instance of our stack in passive mode playing the
remote network (a TCP server, a closed port, a host that answers ICMP unreachable, one that is
silent, a DNS server). The one stand-in is `SessionSource`, which hands out VpnSessions the way
OpenconnectUpstream does after (re)starts; the real openconnect is covered by
tests/test_socks_cmd_lab.py.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import socket
from typing import List, Optional

import dns.message
import dns.rcode
import dns.rrset
import pytest
import trio

from nsvpn.netstack import stack as nstack
from nsvpn.netstack import wire
from nsvpn.upstream.base import DialError, UpstreamError
from nsvpn.upstream.openconnect import VpnSession
from nsvpn.upstream.vpnstack import RCV_BUF, RCV_START, VpnStackUpstream
from nsvpn.vpnenv import parse_vpn_env

OUR_IP = "10.10.0.5"
SERVER = "172.31.2.2"
DNS_IP = "172.31.2.53"
UNREACH = "172.31.2.99"
SILENT = "172.31.2.98"
EXCLUDED = "127.0.0.1"
DATA = bytes(range(256)) * 4096 * 4  # 4 MiB


def env_for(addr: str = OUR_IP):
    return parse_vpn_env({
        "INTERNAL_IP4_ADDRESS": addr, "INTERNAL_IP4_NETMASK": "255.255.255.0",
        "INTERNAL_IP4_MTU": "1434", "INTERNAL_IP4_DNS": DNS_IP, "CISCO_DEF_DOMAIN": "lab",
        "CISCO_SPLIT_EXC": "1", "CISCO_SPLIT_EXC_0_ADDR": "127.0.0.0",
        "CISCO_SPLIT_EXC_0_MASK": "255.0.0.0", "CISCO_SPLIT_EXC_0_MASKLEN": "8",
    })


class SessionSource:
    """Hands out VpnSessions like OpenconnectUpstream (start / wait_session / fatal)."""

    name = "openconnect://test"

    def __init__(self) -> None:
        self.session: Optional[VpnSession] = None
        self.fatal: Optional[str] = None
        self.gen = 0
        self._changed = trio.Event()
        self.closed = False

    def new_session(self, addr: str = OUR_IP) -> socket.socket:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for s in (a, b):
            s.setblocking(False)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        self.gen += 1
        self.session = VpnSession(a, env_for(addr), {}, self.gen, 0)
        self._kick()
        return b

    def lose(self) -> None:
        s = self.session
        s.lost.set()
        s.close()  # as OpenconnectUpstream does
        self._kick()

    def _kick(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def start(self) -> VpnSession:
        assert self.session is not None
        return self.session

    async def wait_session(self, after: int = 0) -> VpnSession:
        while True:
            if self.fatal:
                raise UpstreamError(self.fatal)
            if self.closed:
                raise UpstreamError("closed")
            s = self.session
            if s is not None and s.generation > after and not s.lost.is_set():
                return s
            await self._changed.wait()

    async def aclose(self) -> None:
        self.closed = True
        self._kick()


class FarSide:
    """The remote network behind the VPN server, as a passive stack on the other socket end.

    Port 80 of SERVER sends DATA then closes; port 7 echoes; other SERVER ports refuse;
    UNREACH answers ICMP host unreachable; SILENT drops everything; DNS_IP:53 answers A
    queries for remote.lab / www.lab. Every packet from us is kept in `seen`."""

    def __init__(self, sock: socket.socket, delay: float = 0.0, mtu: int = 1434) -> None:
        self.sock = sock
        self.delay = delay
        self.stack = nstack.Stack(nstack.StackConfig(
            net="172.31.2.0/24", gateway="172.31.2.1", dns="172.31.2.3", mtu=mtu,
            tun_queue_len=1 << 20))
        self.seen: List[bytes] = []
        self.received = 0
        self.dns_queries: List[str] = []
        self.flows = {}
        self.nursery: Optional[trio.Nursery] = None

    def flush(self) -> None:
        for ev in self.stack.pop_events():
            self.dispatch(ev)
        for pkt in self.stack.output_packets():
            try:
                self.sock.send(pkt)
            except (BlockingIOError, OSError):
                pass

    def dispatch(self, ev) -> None:
        now = trio.current_time()
        st = self.stack
        if isinstance(ev, nstack.NewTcpFlow):
            dst = ev.flow.dst
            if dst[0] == UNREACH:
                st.unreachable(ev.flow, now, "host")
            elif dst[0] == SERVER and dst[1] in (80, 81, 7):
                st.accept(ev.flow, now)
                self.flows[id(ev.flow)] = [ev.flow, dst[1], 0, False]
            else:
                st.refuse(ev.flow, now)
        elif isinstance(ev, nstack.TcpFlowEvent):
            f = self.flows.get(id(ev.flow))
            if f is not None:
                if ev.kind in ("connected", "send_space", "data", "eof"):
                    self.nursery.start_soon(self.serve, f)
        elif isinstance(ev, nstack.UdpDatagram):
            q = dns.message.from_wire(ev.payload)
            name = q.question[0].name.to_text().rstrip(".")
            self.dns_queries.append(name)
            r = dns.message.make_response(q)
            if name in ("remote.lab", "www.lab"):
                r.answer.append(dns.rrset.from_text(name + ".", 60, "IN", "A", SERVER))
            else:
                r.set_rcode(dns.rcode.NXDOMAIN)
            st.send_udp(ev.dst, ev.src, r.to_wire())

    async def serve(self, f) -> None:
        flow, port = f[0], f[1]
        st = self.stack
        now = trio.current_time()
        if port == 81:  # some data, then a reset
            if not f[3]:
                f[3] = True
                st.tcp_send(flow, b"partial", now)
                self.flush()
                await trio.sleep(0.05)
                st.tcp_abort(flow, trio.current_time())
        elif port == 80:
            while f[2] < len(DATA):
                n = st.tcp_send(flow, DATA[f[2]:f[2] + 256 * 1024], now)
                if not n:
                    break
                f[2] += n
            if f[2] >= len(DATA) and not f[3]:
                f[3] = True
                st.tcp_shutdown(flow, now)
        else:
            data = st.tcp_recv(flow)
            self.received += len(data)
            if data:
                st.tcp_send(flow, bytes(data), now)
            if flow.conn.state == "CLOSE_WAIT" and not f[3]:
                f[3] = True
                st.tcp_shutdown(flow, now)
        self.flush()

    async def run(self) -> None:
        async with trio.open_nursery() as n:
            self.nursery = n
            n.start_soon(self._timers)
            while True:
                try:
                    await trio.lowlevel.wait_readable(self.sock)
                except (trio.ClosedResourceError, OSError):
                    return
                now = trio.current_time()
                while True:
                    try:
                        pkt = self.sock.recv(65536)
                    except BlockingIOError:
                        break
                    except OSError:
                        n.cancel_scope.cancel()
                        return
                    self.seen.append(pkt)
                    ip = wire.parse_ip(pkt, {})
                    if ip is not None and ip.dst == socket.inet_aton(SILENT):
                        continue
                    if self.delay:
                        n.start_soon(self._later, pkt)
                        continue
                    self.stack.input_packet(pkt, now)
                self.flush()

    async def _later(self, pkt: bytes) -> None:
        """A path with a round trip of 2 x delay (applied to our packets, both ways' worth)."""
        await trio.sleep(2 * self.delay)
        self.stack.input_packet(pkt, trio.current_time())
        self.flush()

    async def _timers(self) -> None:
        while True:
            await trio.sleep(0.01)
            d = self.stack.next_deadline()
            if d is not None and d <= trio.current_time():
                self.stack.on_timer(trio.current_time())
                self.flush()


def tcp_segments(pkts: List[bytes]):
    for p in pkts:
        ip = wire.parse_ip(p, {})
        if ip is not None and ip.proto == wire.PROTO_TCP:
            r = wire.parse_tcp(ip, {}, False)
            if r is not None:
                yield r


async def _setup(nursery, **kw):
    src = SessionSource()
    far = FarSide(src.new_session())
    nursery.start_soon(far.run)
    up = VpnStackUpstream(src, **kw)
    await up.start()
    return src, far, up


async def test_download_with_window_scaling_and_big_windows():
    async with trio.open_nursery() as n:
        src, far, up = await _setup(n)
        s = await up.dial_tcp(SERVER, 80, timeout=5)
        got = bytearray()
        while True:
            d = await s.receive_some(1 << 20)
            if not d:
                break
            got += d
        await s.aclose()
        assert hashlib.sha256(got).digest() == hashlib.sha256(DATA).digest()
        segs = list(tcp_segments(far.seen))
        syn = [seg for _, _, seg in segs if seg.flags & 0x02][0]
        assert syn.wscale == 8  # room for the 8 MiB the window may grow to
        assert syn.mss == 1434 - 40
        wins = [seg.window << syn.wscale for _, _, seg in segs if not seg.flags & 0x02]
        assert max(wins) >= RCV_START, max(wins)  # beyond lwIP's 65535 from the start
        assert RCV_START <= s.conn.config.rcv_buf <= RCV_BUF
        await up.aclose()
        n.cancel_scope.cancel()


async def test_echo_and_half_close():
    async with trio.open_nursery() as n:
        src, far, up = await _setup(n)
        s = await up.dial_tcp(SERVER, 7, timeout=5)
        await s.send_all(b"hello " * 50000)
        await s.send_eof()
        got = bytearray()
        while True:
            d = await s.receive_some()
            if not d:
                break
            got += d
        assert bytes(got) == b"hello " * 50000
        await s.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await s.receive_some()
        await up.aclose()
        n.cancel_scope.cancel()


async def test_dial_errors():
    async with trio.open_nursery() as n:
        src, far, up = await _setup(n)
        with pytest.raises(DialError) as ei:
            await up.dial_tcp(SERVER, 9, timeout=5)
        assert ei.value.errno == errno.ECONNREFUSED and ei.value.final
        with pytest.raises(DialError) as ei:
            await up.dial_tcp(UNREACH, 80, timeout=5)
        assert ei.value.errno == errno.EHOSTUNREACH
        t0 = trio.current_time()
        with pytest.raises(DialError) as ei:
            await up.dial_tcp(SILENT, 80, timeout=1.5)
        assert ei.value.errno == errno.ETIMEDOUT
        assert trio.current_time() - t0 < 2.5
        # nothing is left in the stack's table from those
        await trio.sleep(0.05)
        assert up.session.stack.counters["tcp_flows"] == 0
        await up.aclose()
        n.cancel_scope.cancel()


async def test_names_resolved_by_the_vpn_dns_and_cached():
    async with trio.open_nursery() as n:
        src, far, up = await _setup(n)
        s = await up.dial_tcp("remote.lab", 7, timeout=5)
        assert s.remote == (SERVER, 7)
        await s.aclose()
        s = await up.dial_tcp("REMOTE.lab", 7, timeout=5)
        await s.aclose()
        assert far.dns_queries == ["remote.lab"]  # the second came from the cache
        assert await up.resolve("www") == SERVER  # search domain pushed by the server
        assert far.dns_queries[-2:] == ["www", "www.lab"]
        with pytest.raises(DialError) as ei:
            await up.dial_tcp("nosuch.lab", 80, timeout=5)
        assert ei.value.errno == errno.EHOSTUNREACH
        await up.aclose()
        n.cancel_scope.cancel()


async def test_split_exclude_goes_to_host_sockets():
    listener = trio.socket.socket()
    await listener.bind((EXCLUDED, 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    async with trio.open_nursery() as n:
        src, far, up = await _setup(n)
        assert not up.carries(EXCLUDED) and up.carries(SERVER)
        s = await up.dial_tcp(EXCLUDED, port, timeout=5)
        assert isinstance(s, trio.SocketStream)
        await s.aclose()
        assert not any(True for _ in tcp_segments(far.seen))
        up.direct_nets = [ipaddress.ip_network("172.31.2.0/24")]  # e.g. a host network
        assert not up.carries(SERVER) and up.carries("172.31.3.1")
        await up.aclose()
        n.cancel_scope.cancel()
    listener.close()


async def test_session_loss_resets_flows_and_restart_serves_new_dials():
    async with trio.open_nursery() as n:
        src, far, up = await _setup(n)
        s = await up.dial_tcp(SERVER, 7, timeout=5)
        await s.send_all(b"x")
        assert await s.receive_some() == b"x"
        src.lose()
        trio.lowlevel.notify_closing(far.sock)
        far.sock.close()
        with trio.fail_after(1):
            with pytest.raises(trio.BrokenResourceError):
                await s.receive_some()
        assert not up.healthy

        async def restart_later():
            await trio.sleep(0.3)
            far2 = FarSide(src.new_session())
            n.start_soon(far2.run)

        n.start_soon(restart_later)
        with trio.fail_after(3):
            s2 = await up.dial_tcp(SERVER, 7, timeout=3)  # waits for the new VPNFD
        await s2.send_all(b"again")
        assert await s2.receive_some() == b"again"
        assert up.healthy and up.sessions == 2
        await up.aclose()
        n.cancel_scope.cancel()


async def test_address_change_is_fatal():
    async with trio.open_nursery() as n:
        src, far, up = await _setup(n)
        src.lose()
        src.new_session(addr="10.10.0.77")
        with trio.fail_after(2):
            with pytest.raises(DialError) as ei:
                await up.dial_tcp(SERVER, 7, timeout=2)
        assert ei.value.reason == "upstream-down"
        assert "new address 10.10.0.77" in str(ei.value)
        assert up.fatal and not up.healthy
        await up.aclose()
        n.cancel_scope.cancel()


async def test_inbound_syn_is_refused_and_ping_answered():
    async with trio.open_nursery() as n:
        src, far, up = await _setup(n)
        our, peer = socket.inet_aton(OUR_IP), socket.inet_aton(SERVER)
        from nsvpn.netstack.segment import TcpSegment

        syn = TcpSegment(1000, 0, 0x02, 65535, mss=1400)
        head, payload = wire.build_tcp_parts(peer, our, 5555, 22, syn)
        far.sock.send(head + bytes(payload))
        far.sock.send(wire.build_icmp(peer, our, wire.ICMP4_ECHO_REQUEST, 0, 0x00010001, b"hi"))
        await trio.sleep(0.2)
        segs = [seg for sp, dp, seg in tcp_segments(far.seen) if sp == 22]
        assert segs and segs[0].flags & 0x04  # RST
        icmp = [p for p in far.seen if p[9] == 1]
        assert icmp and icmp[0][20] == wire.ICMP4_ECHO_REPLY
        await up.aclose()
        n.cancel_scope.cancel()


async def test_receive_window_grows_with_the_round_trip_time():
    """Receive-buffer autotuning: a flow whose round trip is long (here 40 ms, the far side
    delays every packet) and whose reader keeps up grows its window past RCV_START
    (ocproxy-like 160 KiB would cap it at 4 MB/s); at socketpair RTT it stays small."""
    async with trio.open_nursery() as n:
        src, far, up = await _setup(n)
        s = await up.dial_tcp(SERVER, 80, timeout=5)
        while await s.receive_some(1 << 20):
            pass
        fast = s.conn.config.rcv_buf
        await s.aclose()
        await up.aclose()
        n.cancel_scope.cancel()
    async with trio.open_nursery() as n:
        src = SessionSource()
        far = FarSide(src.new_session(), delay=0.02)
        n.start_soon(far.run)
        up = VpnStackUpstream(src)
        await up.start()
        s = await up.dial_tcp(SERVER, 80, timeout=5)
        t0 = trio.current_time()
        got = 0
        while True:
            d = await s.receive_some(1 << 20)
            if not d:
                break
            got += len(d)
        rate = got / (trio.current_time() - t0)
        slow = s.conn.config.rcv_buf
        await s.aclose()
        await up.aclose()
        n.cancel_scope.cancel()
    assert got == len(DATA)
    assert fast < 1 << 20, fast
    assert slow >= 4 * RCV_START, slow
    assert rate > RCV_START / 0.04 * 1.5, rate  # more than a fixed start window allows


# ------------------------------------------------ bridge (vpn ns mode): what stays out of the VPN


def test_bridge_direct_networks_and_matcher():
    from nsvpn.bridge import DirectMatcher, direct_networks, netns_spec

    env = parse_vpn_env({
        "INTERNAL_IP4_ADDRESS": "10.77.0.5", "INTERNAL_IP4_NETMASK": "255.255.255.0",
        "CISCO_SPLIT_EXC": "2",
        "CISCO_SPLIT_EXC_0_ADDR": "192.168.5.0", "CISCO_SPLIT_EXC_0_MASK": "255.255.255.0",
        "CISCO_SPLIT_EXC_0_MASKLEN": "24",
        "CISCO_SPLIT_EXC_1_ADDR": "10.77.0.0", "CISCO_SPLIT_EXC_1_MASK": "255.255.0.0",
        "CISCO_SPLIT_EXC_1_MASKLEN": "16",
    })
    nets = direct_networks(env, ["172.16.9.0/24", "192.168.5.0/24"], host=False)
    # the VPN's own network is never taken away from it; duplicates are dropped
    assert nets == ["192.168.5.0/24", "172.16.9.0/24"]
    spec = netns_spec(env, direct_nets=nets)
    assert spec.routes == ["0.0.0.0/0", "192.168.5.0/24", "172.16.9.0/24"]
    m = DirectMatcher(nets)
    our, far = socket.inet_aton("10.77.0.5"), socket.inet_aton("192.168.5.7")
    pkt = wire.build_udp(our, far, 1000, 53, b"x")
    assert m.match(pkt) and m.match(memoryview(pkt))
    assert not m.match(wire.build_udp(our, socket.inet_aton("192.168.6.7"), 1000, 53, b"x"))
    assert not m.match(b"\x60" + bytes(39))  # IPv6: never
    assert not DirectMatcher([])


async def test_udp_endpoint_over_the_tunnel():
    async with trio.open_nursery() as n:
        src, far, up = await _setup(n)
        ep = up.open_udp()
        q = dns.message.make_query("www.lab", "A")
        await ep.sendto(q.to_wire(), DNS_IP, 53)
        with trio.fail_after(2):
            payload, frm = await ep.recvfrom()
        assert frm == (DNS_IP, 53)
        r = dns.message.from_wire(payload)
        assert r.id == q.id and r.answer[0][0].address == SERVER
        await ep.sendto(b"x", EXCLUDED, 53)  # not carried by the VPN: dropped
        assert ep.dropped == 1
        ep.close()
        assert ep.port not in up.udp_endpoints
        await up.aclose()
        n.cancel_scope.cancel()


async def test_reset_by_the_far_side_breaks_the_stream():
    async with trio.open_nursery() as n:
        src, far, up = await _setup(n)
        s = await up.dial_tcp(SERVER, 81, timeout=5)
        got = b""
        with trio.fail_after(2):
            with pytest.raises(trio.BrokenResourceError):
                while True:
                    got += await s.receive_some()
        assert got == b"partial"  # data before the RST is still delivered
        with pytest.raises(trio.BrokenResourceError):
            await s.send_all(b"x")
        await s.aclose()
        await up.aclose()
        n.cancel_scope.cancel()


async def test_upload_segments_fit_the_vpn_mtu_whatever_mss_the_server_announces():
    """A server on a 1500-byte LAN announces MSS 1460; our packets must still fit the
    tunnel's 1434 (openconnect drops bigger ones)."""
    async with trio.open_nursery() as n:
        src = SessionSource()
        far = FarSide(src.new_session(), mtu=1500)
        n.start_soon(far.run)
        up = VpnStackUpstream(src)
        await up.start()
        s = await up.dial_tcp(SERVER, 7, timeout=5)
        data = b"u" * (3 << 20)
        with trio.fail_after(10):
            await s.send_all(data)
            got = 0
            while got < len(data):
                got += len(await s.receive_some())
        assert far.received == len(data)
        assert max(len(p) for p in far.seen) == 1434
        await s.aclose()
        await up.aclose()
        n.cancel_scope.cancel()


def test_longest_prefix_decides_between_vpn_and_direct():
    """A VPN route more specific than a host network keeps its traffic in the VPN; a host
    network more specific than the VPN's routes (or equal) is direct."""
    from nsvpn.bridge import DirectMatcher

    env = parse_vpn_env({
        "INTERNAL_IP4_ADDRESS": "10.77.0.5", "INTERNAL_IP4_NETMASK": "255.255.255.0",
        "INTERNAL_IP4_DNS": "10.99.0.53",
        "CISCO_SPLIT_INC": "1", "CISCO_SPLIT_INC_0_ADDR": "10.20.0.0",
        "CISCO_SPLIT_INC_0_MASK": "255.255.0.0", "CISCO_SPLIT_INC_0_MASKLEN": "16",
    })
    lan = ["10.0.0.0/8"]
    m = DirectMatcher(lan, env.routes4())
    our = socket.inet_aton(env.address4)

    def pkt(ip: str) -> bytes:
        return wire.build_udp(our, socket.inet_aton(ip), 1, 2, b"")

    assert not m.match(pkt("10.20.1.1"))  # /16 pushed by the VPN beats the /8 LAN
    assert not m.match(pkt("10.99.0.53"))  # the VPN's DNS server (host route)
    assert m.match(pkt("10.30.1.1"))
    up = VpnStackUpstream(SessionSource())
    up.env = env
    up.direct_nets = [ipaddress.ip_network(n) for n in lan]
    assert up.carries("10.20.1.1") and up.carries("10.99.0.53") and up.carries("10.77.0.9")
    assert not up.carries("10.30.1.1")
    assert not up.carries("192.0.2.1")  # outside the split-include list: not the VPN's
    up.direct_nets = []
    env_full = parse_vpn_env({"INTERNAL_IP4_ADDRESS": "10.77.0.5"})
    up.env = env_full
    assert up.carries("192.0.2.1")
    assert not up.carries("127.0.0.1") and not up.carries("::1")
    # a tie goes to the directly connected network
    assert DirectMatcher(["10.20.0.0/16"], ["10.20.0.0/16"]).match(pkt("10.20.1.1"))


def test_shim_direct_leaves_out_lans_with_vpn_routes_inside():
    from nsvpn.socks_cmd import shim_direct

    env = parse_vpn_env({
        "INTERNAL_IP4_ADDRESS": "10.77.0.5", "INTERNAL_IP4_NETMASK": "255.255.255.0",
        "CISCO_SPLIT_INC": "1", "CISCO_SPLIT_INC_0_ADDR": "10.20.0.0",
        "CISCO_SPLIT_INC_0_MASK": "255.255.0.0", "CISCO_SPLIT_INC_0_MASKLEN": "16",
    })
    assert shim_direct(["10.0.0.0/8", "172.31.1.0/24"], env) == ["172.31.1.0/24"]
    full = parse_vpn_env({"INTERNAL_IP4_ADDRESS": "10.77.0.5"})
    assert shim_direct(["10.0.0.0/8"], full) == ["10.0.0.0/8"]
