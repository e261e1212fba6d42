"""relay.Relay with a datagram socketpair standing in for the TUN (no privileges, loopback only)."""

from __future__ import annotations

import socket

import pytest
import trio

from nsvpn import relay as relay_mod
from nsvpn import routing
from nsvpn.netstack import wire
from nsvpn.netstack.stack import Stack, StackConfig


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
