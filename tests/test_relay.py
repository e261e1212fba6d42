"""relay.Relay with a datagram socketpair standing in for the TUN (no privileges, loopback only)."""

from __future__ import annotations

import os
import socket

import pytest
import trio
from peers import need_danted, need_microsocks

from nsvpn import relay as relay_mod
from nsvpn import routing
from nsvpn.netstack import wire
from nsvpn.netstack.stack import Stack, StackConfig
from nsvpn.upstream.socks5 import Socks5Upstream


async def test_udp_to_direct_networks_holds_a_bounded_number_of_host_sockets(nursery,
                                                                            monkeypatch):
    """Each app UDP 4-tuple to a direct network gets a host socket, held a minute after its
    last datagram. A job that sends from a new port every time would pile up thousands of
    fds; past UDP_FLOWS_MAX the least recently used one goes, and the newest still work."""
    scapy = pytest.importorskip("scapy.all")
    monkeypatch.setattr(relay_mod, "UDP_FLOWS_MAX", 3)
    echo = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await echo.bind(("127.0.0.1", 0))
    port = echo.getsockname()[1]

    async def serve_echo() -> None:
        while True:
            data, addr = await echo.recvfrom(65535)
            await echo.sendto(data, addr)

    nursery.start_soon(serve_echo)
    tun, app_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    tun.setblocking(False)

    async def no_dial(host, port, timeout):
        raise AssertionError("no TCP here")

    r = relay_mod.Relay(tun.fileno(), Stack(StackConfig()),
                        routing.Router(allow_host_loopback=True),  # 10.0.2.2 = host's 127.0.0.1
                        dial_upstream=no_dial, dial_direct=no_dial)
    await nursery.start(r.run)
    app = trio.socket.from_stdlib_socket(app_end)
    for i in range(8):
        sport = 40000 + i
        await app.send(wire.build_udp(socket.inet_aton("10.0.2.100"), socket.inet_aton("10.0.2.2"),
                                      sport, port, b"ping %d" % i))
        with trio.fail_after(5):
            reply = scapy.IP(await app.recv(65535))
        assert reply[scapy.UDP].dport == sport and bytes(reply[scapy.UDP].payload) == b"ping %d" % i
        await trio.sleep(0.01)  # distinct last-use times
        assert len(r.udp) <= 3
    assert sorted(k[0][1] for k in r.udp) == [40005, 40006, 40007]  # the newest three


async def _relay_with_upstream(nursery, upstream, fake_names):
    tun, app_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    tun.setblocking(False)

    async def no_dial(host, port, timeout):
        raise AssertionError("no TCP here")

    r = relay_mod.Relay(tun.fileno(), Stack(StackConfig()),
                        routing.Router(fake_ip_lookup=fake_names.get),
                        dial_upstream=no_dial, dial_direct=no_dial, udp_upstream=upstream)
    await nursery.start(r.run)
    return r, trio.socket.from_stdlib_socket(app_end), tun


@need_danted
async def test_udp_beyond_the_direct_networks_goes_through_socks5_udp_associate(
        nursery, danted, udp_echo, monkeypatch):
    """UDP to a name (a fake IP) travels in a SOCKS5 UDP association through dante; the
    replies reach the app from the fake IP it sent to, though the proxy reports the
    address it resolved. Each app 4-tuple has its own association, and past
    UDP_ASSOC_MAX the least recently used one goes."""
    scapy = pytest.importorskip("scapy.all")
    monkeypatch.setattr(relay_mod, "UDP_ASSOC_MAX", 2)
    echo = udp_echo
    up = Socks5Upstream("127.0.0.1", danted())
    await up.start()
    r, app, _tun = await _relay_with_upstream(nursery, up, {"198.18.0.5": "localhost"})
    for sport in (40000, 40001, 40002):
        await trio.sleep(0.01)  # distinct last-use times
        for n in (3, 1400, 30000):
            payload = os.urandom(n)
            await app.send(wire.build_udp(socket.inet_aton("10.0.2.100"),
                                          socket.inet_aton("198.18.0.5"), sport, echo, payload))
            with trio.fail_after(5):
                reply = scapy.IP(await app.recv(65535))
            assert reply.src == "198.18.0.5" and reply[scapy.UDP].sport == echo
            assert reply[scapy.UDP].dport == sport
            assert bytes(reply[scapy.UDP].payload) == payload
        assert len(r.udp) <= 2
    assert sorted(k[0][1] for k in r.udp) == [40001, 40002]


@need_microsocks
async def test_udp_through_a_proxy_without_udp_is_port_unreachable_at_once(nursery,
                                                                          microsocks):
    """microsocks has no UDP ASSOCIATE: the app hears ICMP port unreachable, the first
    time after asking the proxy, then without asking."""
    scapy = pytest.importorskip("scapy.all")
    up = Socks5Upstream("127.0.0.1", microsocks())
    await up.start()
    r, app, _tun = await _relay_with_upstream(nursery, up, {"198.18.0.5": "localhost"})
    for sport in (40000, 40001):
        t0 = trio.current_time()
        await app.send(wire.build_udp(socket.inet_aton("10.0.2.100"),
                                      socket.inet_aton("198.18.0.5"), sport, 9, b"hello"))
        with trio.fail_after(5):
            reply = scapy.IP(await app.recv(65535))
        assert reply[scapy.ICMP].type == 3 and reply[scapy.ICMP].code == 3
        assert trio.current_time() - t0 < 1.0
        assert not up.carries_udp
    assert not r.udp
