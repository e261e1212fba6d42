"""SOCKS5, direct and pool dialers against real peers: microsocks and trio servers on loopback."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from functools import partial

import pytest
import trio
from peers import free_port, need_danted, need_microsocks

from nsvpn.upstream.base import DialError, UpstreamError
from nsvpn.upstream.direct import DirectUpstream, host_networks
from nsvpn.upstream.pool import UpstreamPool
from nsvpn.upstream.socks5 import Socks5Upstream
from nsvpn.urls import parse_upstream_url


async def echo_server(nursery) -> int:
    async def handler(stream):
        async with stream:
            while True:
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    return
                if not data:
                    return
                await stream.send_all(data)

    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


async def exchange(stream, payload: bytes) -> bytes:
    got = bytearray()

    async def reader():
        while len(got) < len(payload):
            data = await stream.receive_some(65536)
            assert data, "EOF before all bytes came back"
            got.extend(data)

    async with trio.open_nursery() as n:
        n.start_soon(reader)
        await stream.send_all(payload)
    return bytes(got)


@need_microsocks
async def test_socks5_dial_echo_byte_exact(nursery, microsocks):
    port = await echo_server(nursery)
    up = Socks5Upstream("127.0.0.1", microsocks())
    await up.start()
    payload = os.urandom(3 * 1024 * 1024)
    for host in ("127.0.0.1", "localhost"):  # by address and CONNECT by name
        stream = await up.dial_tcp(host, port, timeout=5)
        async with stream:
            assert await exchange(stream, payload) == payload
    assert up.healthy


@need_microsocks
async def test_socks5_user_pass(nursery, microsocks):
    port = await echo_server(nursery)
    sport = microsocks("-u", "alice", "-P", "s3cret")
    up = Socks5Upstream.from_url(parse_upstream_url(f"socks5://alice:s3cret@127.0.0.1:{sport}"))
    await up.start()
    stream = await up.dial_tcp("127.0.0.1", port, timeout=5)
    async with stream:
        assert await exchange(stream, b"hello") == b"hello"

    bad = Socks5Upstream("127.0.0.1", sport, username="alice", password="wrong")
    with pytest.raises(UpstreamError):
        await bad.start()
    with pytest.raises(DialError) as ei:
        await bad.dial_tcp("127.0.0.1", port, timeout=5)
    assert ei.value.reason == "upstream-down" and "rejected" in str(ei.value)
    noauth = Socks5Upstream("127.0.0.1", sport)
    with pytest.raises(DialError, match="user name and password"):
        await noauth.dial_tcp("127.0.0.1", port, timeout=5)


@need_microsocks
async def test_socks5_refused_is_econnrefused_quickly(microsocks):
    up = Socks5Upstream("127.0.0.1", microsocks())
    dead = free_port()
    t0 = trio.current_time()
    with pytest.raises(DialError) as ei:
        await up.dial_tcp("127.0.0.1", dead, timeout=5)
    assert ei.value.errno == errno.ECONNREFUSED and ei.value.reason == "refused"
    assert ei.value.final
    assert trio.current_time() - t0 < 1.0
    assert up.healthy  # the proxy answered; the destination refused


async def test_socks5_proxy_down():
    up = Socks5Upstream("127.0.0.1", free_port())
    with pytest.raises(UpstreamError, match="Connection refused"):
        await up.start()
    with pytest.raises(DialError) as ei:
        await up.dial_tcp("127.0.0.1", 80, timeout=2)
    assert ei.value.reason == "upstream-down" and not up.healthy


async def test_socks5_silent_proxy_times_out(nursery):
    async def silent(stream):
        await trio.sleep_forever()

    listeners = await nursery.start(partial(trio.serve_tcp, silent, 0, host="127.0.0.1"))
    up = Socks5Upstream("127.0.0.1", listeners[0].socket.getsockname()[1])
    t0 = trio.current_time()
    with pytest.raises(DialError) as ei:
        await up.dial_tcp("127.0.0.1", 80, timeout=0.3)
    assert ei.value.reason == "upstream-down"
    assert trio.current_time() - t0 < 1.0


async def test_socks5_reply_codes_and_early_data_from_own_server(nursery):
    """A scripted SOCKS5 server built on our own server-side codec."""
    from nsvpn import socks

    async def handler(stream):
        hs = socks.ServerHandshake()
        while hs.request is None:
            hs.receive_data(await stream.receive_some(4096))
            await stream.send_all(hs.data_to_send())
        if hs.request.port == 1:
            await stream.send_all(hs.reply(socks.REP_HOST_UNREACHABLE))
        elif hs.request.port == 2:
            await stream.send_all(hs.reply(socks.REP_NETWORK_UNREACHABLE))
        elif hs.request.port == 3:
            await stream.send_all(hs.reply(socks.REP_TTL_EXPIRED))
        else:  # success, with payload in the same segment as the reply
            await stream.send_all(hs.reply(0, "10.9.8.7", 4242) + b"SSH-2.0-banner\r\n")
        await stream.aclose()

    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    up = Socks5Upstream("127.0.0.1", listeners[0].socket.getsockname()[1])
    for port, err in ((1, errno.EHOSTUNREACH), (2, errno.ENETUNREACH), (3, errno.ETIMEDOUT)):
        with pytest.raises(DialError) as ei:
            await up.dial_tcp("example.org", port, timeout=2)
        assert ei.value.errno == err
    stream = await up.dial_tcp("example.org", 22, timeout=2)
    assert await stream.receive_some(4) == b"SSH-"
    assert await stream.receive_some() == b"2.0-banner\r\n"
    await stream.aclose()


async def test_direct_dial_and_refused(nursery):
    port = await echo_server(nursery)
    d = DirectUpstream()
    stream = await d.dial_tcp("127.0.0.1", port, timeout=2)
    async with stream:
        assert await exchange(stream, b"x" * 100000) == b"x" * 100000
    with pytest.raises(DialError) as ei:
        await d.dial_tcp("127.0.0.1", free_port(), timeout=2)
    assert ei.value.errno == errno.ECONNREFUSED


def test_host_networks():
    nets = host_networks()
    assert all(not n.is_loopback for n in nets)
    with_lo = host_networks(include_loopback=True)
    assert any(str(n) == "127.0.0.0/8" for n in with_lo)
    # Cross-check with the kernel's own view (ip -j addr), where available.
    ip = shutil.which("ip")
    if ip:
        import json

        out = json.loads(
            subprocess.run([ip, "-j", "addr"], capture_output=True, check=True).stdout
        )
        import ipaddress

        expected = {
            ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False)
            for link in out
            for a in link.get("addr_info", [])
            if not a["local"].lower().startswith("fe80:")  # link-local: left out
        }
        assert set(with_lo) == expected


@need_microsocks
async def test_pool_fails_over_and_keeps_final_answers(nursery, microsocks):
    port = await echo_server(nursery)
    p1, p2 = microsocks(), microsocks()
    a, b = Socks5Upstream("127.0.0.1", p1), Socks5Upstream("127.0.0.1", p2)
    pool = UpstreamPool([a, b])
    await pool.start()
    stream = await pool.dial_tcp("127.0.0.1", port, timeout=5)
    await stream.aclose()

    # Refused is final: no failover, nobody marked down.
    with pytest.raises(DialError) as ei:
        await pool.dial_tcp("127.0.0.1", free_port(), timeout=5)
    assert ei.value.errno == errno.ECONNREFUSED
    assert not pool._down_until

    microsocks.procs[0].kill()
    microsocks.procs[0].wait()
    t0 = trio.current_time()
    stream = await pool.dial_tcp("127.0.0.1", port, timeout=5)
    async with stream:
        assert await exchange(stream, b"via b") == b"via b"
    assert trio.current_time() - t0 < 1.0
    assert not a.healthy and b.healthy
    # While a is backed off, b is first: no time lost on the dead one.
    stream = await pool.dial_tcp("127.0.0.1", port, timeout=5)
    await stream.aclose()

    microsocks.procs[1].kill()
    microsocks.procs[1].wait()
    with pytest.raises(DialError) as ei:
        await pool.dial_tcp("127.0.0.1", port, timeout=5)
    assert ei.value.reason == "upstream-down" and "no upstream usable" in str(ei.value)


async def test_pool_start_needs_one():
    pool = UpstreamPool([Socks5Upstream("127.0.0.1", free_port(), start_timeout=0.5)])
    with pytest.raises(UpstreamError):
        await pool.start()


@need_microsocks
async def test_pool_round_robin_and_from_urls(nursery, microsocks):
    port = await echo_server(nursery)
    p1, p2 = microsocks(), microsocks()
    pool = UpstreamPool.from_urls(
        [f"socks5://127.0.0.1:{p1}", f"socks5h://127.0.0.1:{p2}"], policy="round-robin"
    )
    assert [type(u).__name__ for u in pool.upstreams] == ["Socks5Upstream"] * 2
    await pool.start()
    assert [pool._order() for _ in range(3)] == [[0, 1], [1, 0], [0, 1]]
    for _ in range(4):
        stream = await pool.dial_tcp("127.0.0.1", port, timeout=5)
        async with stream:
            assert await exchange(stream, b"rr") == b"rr"
    with pytest.raises(ValueError, match="openconnect"):
        UpstreamPool.from_urls(["openconnect://vpn.example.org"])
    with pytest.raises(ValueError, match="unknown upstream policy"):
        UpstreamPool([pool.upstreams[0]], policy="random")


# ---------------------------------------------------------------- UDP ASSOCIATE (dante)

@need_danted
async def test_udp_associate_carries_datagrams_byte_exact(danted, udp_echo):
    """Datagrams of every size up to 60000 bytes go out and come back through dante, and the
    reply names the far side's address. The association ends when the proxy does."""
    echo = udp_echo
    up = Socks5Upstream("127.0.0.1", danted())
    await up.start()
    assert up.carries_udp
    assoc = await up.udp_associate("127.0.0.1", echo, timeout=5)
    try:
        for n in (1, 512, 1400, 9000, 60000):
            payload = os.urandom(n)
            assoc.send("127.0.0.1", echo, payload)
            with trio.fail_after(5):
                assert await assoc.receive() == ("127.0.0.1", echo, payload)
        danted.kill(danted.procs[0])
        with trio.fail_after(5):
            await assoc.wait_closed()
    finally:
        await assoc.aclose()


@need_microsocks
@need_danted
async def test_udp_associate_skips_proxies_without_udp(microsocks, danted, udp_echo):
    """microsocks answers "command not supported": it is not asked again, and a pool takes
    UDP to the next proxy that has it while TCP stays with the first."""
    echo = udp_echo
    plain = Socks5Upstream("127.0.0.1", microsocks())
    with pytest.raises(DialError) as ei:
        await plain.udp_associate("127.0.0.1", echo, timeout=5)
    assert ei.value.errno == errno.EOPNOTSUPP and not plain.carries_udp
    assert plain.healthy  # a proxy without UDP is still a good proxy

    first = Socks5Upstream("127.0.0.1", microsocks())
    pool = UpstreamPool([first, Socks5Upstream("127.0.0.1", danted())])
    await pool.start()
    assert pool.carries_udp
    assoc = await pool.udp_associate("127.0.0.1", echo, timeout=5)
    try:
        assoc.send("127.0.0.1", echo, b"ping")
        with trio.fail_after(5):
            assert (await assoc.receive())[2] == b"ping"
    finally:
        await assoc.aclose()
    assert not first.carries_udp and not pool._down_until
    only_plain = UpstreamPool([plain])
    assert not only_plain.carries_udp
    with pytest.raises(DialError) as ei:
        await only_plain.udp_associate("127.0.0.1", echo, timeout=5)
    assert ei.value.errno == errno.EOPNOTSUPP
