"""The preload front on loopback: SOCKS5 door, control channel, claimed connections.

The upstream is a real dialer (DirectUpstream in an UpstreamPool) and the far side a real
echo server on 127.0.0.1; fake IPs make the front dial *by name* through the pool.
"""

from __future__ import annotations

import errno
import os
import socket

import pytest
import trio

from nsvpn import socks
from nsvpn.front import Front
from nsvpn.upstream.direct import DirectUpstream
from nsvpn.upstream.pool import UpstreamPool


async def _echo_server(task_status=trio.TASK_STATUS_IGNORED):
    async def echo(stream):
        try:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    break
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(echo, listeners)


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
async def env(nursery, tmp_path):
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    front = Front(UpstreamPool([DirectUpstream()]), runtime_dir=str(d), connect_timeout=3.0)
    await nursery.start(front.serve)
    port = await nursery.start(_echo_server)
    return front, port


async def ctl(front: Front, line: str) -> str:
    s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with s:
        await s.connect(front.ctl_path)
        await s.send(line.encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = await s.recv(1024)
            if not chunk:
                break
            data += chunk
    return data.decode().strip()


async def _open(front: Front):
    s = trio.socket.socket()
    await s.connect(("127.0.0.1", front.port4))
    return s, s.getsockname()[1]


async def _recv_exactly(s, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = await s.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def _token() -> bytes:
    return b"\x00" + os.urandom(15)


async def _socks_connect(front, host, port, user="nsvpn", password=None):
    stream = await trio.open_tcp_stream("127.0.0.1", front.port4)
    hs = socks.ClientHandshake(socks.CMD_CONNECT, host, port, username=user,
                               password=front.secret if password is None else password)
    await stream.send_all(hs.data_to_send())
    while hs.reply is None:
        data = await stream.receive_some(4096)
        if not data:
            raise socks.SocksError("closed")
        hs.receive_data(data)
        out = hs.data_to_send()
        if out:
            await stream.send_all(out)
    return stream


async def test_socks_door_with_secret_relays(env):
    front, port = env
    stream = await _socks_connect(front, "127.0.0.1", port)
    payload = os.urandom(1 << 20)
    got = bytearray()
    async with stream:
        async with trio.open_nursery() as n:
            n.start_soon(stream.send_all, payload)
            while len(got) < len(payload):
                got += await stream.receive_some(65536)
    assert bytes(got) == payload
    assert front.stats.flows == 1
    with trio.fail_after(2):
        while front.stats.bytes_up < len(payload) or front.stats.active:
            await trio.sleep(0.01)
    assert front.stats.bytes_down == len(payload)


async def test_socks_door_rejects_wrong_secret_and_no_auth(env):
    front, port = env
    with pytest.raises(socks.SocksAuthError):
        await _socks_connect(front, "127.0.0.1", port, password="guess")
    stream = await trio.open_tcp_stream("127.0.0.1", front.port4)
    async with stream:
        await stream.send_all(socks.build_greeting([socks.METHOD_NO_AUTH]))
        assert await stream.receive_some(16) == b"\x05\xff"


async def test_socks_refused_reply(env):
    front, _ = env
    with pytest.raises(socks.SocksReplyError) as ei:
        await _socks_connect(front, "127.0.0.1", _closed_port())
    assert ei.value.reply_code == socks.REP_CONNECTION_REFUSED


async def test_fake_ip_and_reverse(env):
    front, _ = env
    a = await ctl(front, "F only-far-side.example")
    assert a.startswith("A 198.18.")
    assert await ctl(front, "F ONLY-far-side.example.") == a  # stable, normalized
    ip = a.split()[1]
    assert await ctl(front, "K only-far-side.example") == a  # known: no host lookup again
    assert await ctl(front, "K never-asked.example") == "U"
    assert await ctl(front, "F never-asked.example") != a
    assert await ctl(front, f"N {ip}") == "H only-far-side.example"
    assert await ctl(front, "N 10.1.2.3") == "E"
    assert await ctl(front, "bogus") == "E"


async def test_blocking_claim_success_and_peer(env):
    front, port = env
    s, lport = await _open(front)
    with s:
        tok = _token()
        await s.send(tok)
        assert await ctl(front, f"C b 4 {lport} 16 {tok.hex()} 127.0.0.1 {port}") == "R 0"
        assert await ctl(front, f"P 4 {lport}") == f"D 127.0.0.1 {port}"
        await s.send(b"hello")
        assert await _recv_exactly(s, 5) == b"hello"
    assert await ctl(front, "P 4 1") == "E"


async def test_blocking_claim_refused(env):
    front, _ = env
    s, lport = await _open(front)
    with s:
        tok = _token()
        await s.send(tok)
        closed = _closed_port()
        assert await ctl(front, f"C b 4 {lport} 16 {tok.hex()} 127.0.0.1 {closed}") == \
            f"R {errno.ECONNREFUSED}"
        with pytest.raises(ConnectionResetError):
            while await s.recv(10):
                pass


async def test_claim_with_wrong_token_is_not_served(env, monkeypatch):
    import nsvpn.front as front_mod

    monkeypatch.setattr(front_mod, "CLAIM_WAIT", 0.5)
    front, port = env
    s, lport = await _open(front)
    with s:
        await s.send(_token())
        other = _token()
        with trio.fail_after(3):
            assert await ctl(front, f"C b 4 {lport} 16 {other.hex()} 127.0.0.1 {port}") == \
                f"R {errno.ECONNABORTED}"
    assert front.stats.flows == 0


async def test_stale_claim_for_a_reused_port_is_skipped(env):
    """A leftover claim for the same source port (other token) does not capture the new
    connection; the right claim, arriving later, does."""
    front, port = env
    s, lport = await _open(front)
    with s:
        stale = _token()
        async with trio.open_nursery() as n:
            async def stale_claim():
                r = await ctl(front, f"C b 4 {lport} 16 {stale.hex()} 127.0.0.1 {port}")
                assert r == f"R {errno.ECONNABORTED}"  # replaced by the right one
            n.start_soon(stale_claim)
            await trio.sleep(0.05)
            tok = _token()
            await s.send(tok)
            await trio.sleep(0.05)
            assert await ctl(front, f"C b 4 {lport} 16 {tok.hex()} 127.0.0.1 {port}") == "R 0"
        await s.send(b"ok")
        assert await _recv_exactly(s, 2) == b"ok"


async def test_async_claim_failure_verdict(env):
    front, _ = env
    s, lport = await _open(front)
    with s:
        tok = _token()
        await s.send(tok)
        r = await ctl(front, f"C a 4 {lport} 16 {tok.hex()} 127.0.0.1 {_closed_port()}")
        cid = r.split()[1]
        with pytest.raises(ConnectionResetError):
            while await s.recv(10):
                pass
        assert await ctl(front, f"S {cid}") == f"R {errno.ECONNREFUSED}"


async def _ctl_send_only(front: Front, data: bytes):
    """A control connection that sends `data` and is returned open (no answer awaited)."""
    s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await s.connect(front.ctl_path)
    await s.send(data)
    return s


@pytest.mark.parametrize("proto", [1, 2])
async def test_async_claim_drops_padding_then_relays(env, proto):
    """Protocol 1 answers the claim (`K <id>`); protocol 2 (what the front advertises) sends
    the claim and its padding line in one write and gets no answer (the shim's connect()
    does not wait), the token being the id for `S`."""
    front, port = env
    assert front.shim_env()["NSVPN_FRONT_PROTO"] == "2"
    s, lport = await _open(front)
    with s:
        tok = _token()
        pad = tok + bytes(50000 - 16)
        await s.send(pad)
        await s.send(b"app-data")
        if proto == 1:
            r = await ctl(front, f"C a 4 {lport} {len(pad)} {tok.hex()} 127.0.0.1 {port}")
            assert r.startswith("K ")
            cid = r.split()[1]
        else:
            c = await _ctl_send_only(
                front, f"C a 4 {lport} - {tok.hex()} 127.0.0.1 {port}\nL {len(pad)}\n".encode())
            with c:
                with trio.fail_after(5):
                    assert await c.recv(100) == b""  # closed without an answer
            cid = tok.hex()
        assert await _recv_exactly(s, 8) == b"app-data"  # the padding never reached the echo
        assert await ctl(front, f"S {cid}") == "R 0"


async def test_protocol2_padding_line_may_come_later(env):
    """The claim first, its padding length afterwards on the same connection: the dial does
    not wait for it, the padding drop does."""
    front, port = env
    s, lport = await _open(front)
    with s:
        tok = _token()
        c = await _ctl_send_only(front, f"C a 4 {lport} - {tok.hex()} 127.0.0.1 {port}\n".encode())
        with c:
            pad = tok + bytes(30000)
            await s.send(pad)
            await trio.sleep(0.2)
            assert await ctl(front, f"S {tok.hex()}") == "P"  # dialled, waits for the length
            await s.send(b"late")
            await c.send(f"L {len(pad)}\n".encode())
            assert await _recv_exactly(s, 4) == b"late"


async def test_protocol2_wait_line_gets_the_verdict_there(env):
    """`W <padding>`: the shim could not gate readiness and waits like a blocking connect;
    the verdict comes on that connection, also when the dial failed before the line came."""
    front, port = env
    for dst_port, want in ((port, 0), (_closed_port(), errno.ECONNREFUSED)):
        s, lport = await _open(front)
        with s:
            tok = _token()
            await s.send(tok)
            c = await _ctl_send_only(front,
                                     f"C a 4 {lport} - {tok.hex()} 127.0.0.1 {dst_port}\n".encode())
            with c:
                await trio.sleep(0.2)  # the refused dial is over before the line comes
                await c.send(b"W 16\n")
                with trio.fail_after(5):
                    assert await _recv_exactly(c, 100) == f"R {want}\n".encode()
            if want == 0:
                await s.send(b"blocking")
                assert await _recv_exactly(s, 8) == b"blocking"


@pytest.mark.parametrize("second", [b"", b"L 1", b"X 16\n"])
async def test_protocol2_claim_without_a_whole_padding_line_is_aborted(env, second):
    """The shim went away after its claim (no line, a cut one, garbage): the connection is
    reset rather than relayed with padding the front could not drop, and `S` says why."""
    front, port = env
    s, lport = await _open(front)
    with s:
        tok = _token()
        await s.send(tok + bytes(1000))
        c = await _ctl_send_only(front, f"C a 4 {lport} - {tok.hex()} 127.0.0.1 {port}\n".encode()
                                 + second)
        c.close()
        with trio.fail_after(5):
            with pytest.raises(ConnectionResetError):
                while await s.recv(10):
                    pass
        assert await ctl(front, f"S {tok.hex()}") == f"R {errno.ECONNABORTED}"


async def _recv_with_fd(s, n: int = 100):
    """One answer on a control connection and the socket that came with it (or None)."""
    with trio.fail_after(5):
        data, anc, _flags, _addr = await s.recvmsg(n, socket.CMSG_SPACE(4))
    fd = None
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fd = int.from_bytes(payload[:4], "little")
    # the echo server runs in this trio loop: the socket must not block it
    return data, (trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
                  if fd is not None else None)


async def _expect_reset(s) -> None:
    with trio.fail_after(5):
        with pytest.raises(ConnectionResetError):
            while await s.recv(10):
                pass


@pytest.mark.parametrize("handoff,mode", [(True, "h"), (True, "H"), (False, "h")])
async def test_blocking_claim_hands_the_upstream_socket_over(env, monkeypatch, handoff, mode):
    """`C h`: with `R 0` comes the upstream socket itself (the program's fd becomes it, the
    front is out of the data path); the front's end of the program's old socket is reset.
    `C H` (a program's AF_INET6 socket): the same, with an AF_INET6 socket dialled v4-mapped.
    With handing over off (NSVPN_HANDOFF=0), `R 0` alone, and the flow is relayed."""
    import nsvpn.front as front_mod

    monkeypatch.setattr(front_mod, "HANDOFF", handoff)
    front, port = env
    s, lport = await _open(front)
    with s:
        tok = _token()
        await s.send(tok)
        c = await _ctl_send_only(
            front, f"C {mode} 4 {lport} 16 {tok.hex()} 127.0.0.1 {port}\n".encode())
        with c:
            data, up = await _recv_with_fd(c)
        assert data == b"R 0\n" and (up is not None) == handoff
        if handoff:
            with up:
                assert up.getpeername()[:2] == (
                    ("127.0.0.1", port) if mode == "h" else ("::ffff:127.0.0.1", port))
                await up.send(b"handed")
                assert await _recv_exactly(up, 6) == b"handed"
            await _expect_reset(s)
        else:
            await s.send(b"relayed")
            assert await _recv_exactly(s, 7) == b"relayed"
    assert front.stats.handed == int(handoff) and front.stats.bytes_up == 7 * (not handoff)


def test_shim_is_told_whether_asking_for_sockets_can_succeed(tmp_path, monkeypatch):
    """NSVPN_FRONT_HANDOFF=2 (AF_INET and AF_INET6 program sockets) only for an upstream that
    dials plain TCP sockets (a SOCKS5 proxy over TCP, direct): through ssh's unix socket every
    `G` would be a round trip in vain."""
    import nsvpn.front as front_mod
    from nsvpn.upstream.socks5 import Socks5Upstream

    def flag(*ups) -> str:
        return Front(UpstreamPool(list(ups)), runtime_dir=str(tmp_path)).shim_env()[
            "NSVPN_FRONT_HANDOFF"]

    unix = Socks5Upstream(path=str(tmp_path / "ssh-D.sock"))
    tcp = Socks5Upstream(host="127.0.0.1", port=1080)
    assert (flag(unix), flag(tcp), flag(unix, tcp), flag(DirectUpstream())) == ("0", "2", "2", "2")
    monkeypatch.setattr(front_mod, "HANDOFF", False)
    assert flag(tcp) == "0"


async def _protocol2_claim(front, port, pad_len: int = 20000, mode: str = "a"):
    """A protocol-2 claim whose padding the front has drained: (program socket, token)."""
    s, lport = await _open(front)
    tok = _token()
    pad = tok + bytes(pad_len - 16)
    await s.send(pad)
    c = await _ctl_send_only(
        front, f"C {mode} 4 {lport} - {tok.hex()} 127.0.0.1 {port}\nL {len(pad)}\n".encode())
    c.close()
    with trio.fail_after(5):
        while await ctl(front, f"S {tok.hex()}") == "P":
            await trio.sleep(0.01)
    return s, tok


async def _ask_g(front, tok: bytes, shut_first: bool = False):
    c = await _ctl_send_only(front, b"")
    with c:
        if shut_first:  # a shim that stopped waiting: the front's answer must fail
            c.shutdown(socket.SHUT_RD)
        await c.send(f"G {tok.hex()}\n".encode())
        if shut_first:
            await trio.sleep(0.2)
            return None
        return await _recv_with_fd(c)


@pytest.mark.parametrize("mode", ["a", "A"])
async def test_protocol2_upstream_is_handed_over_before_anything_moved(env, mode):
    """`C a`, then `G`: the upstream socket; `C A` (a program's AF_INET6 socket): an AF_INET6
    one, dialled v4-mapped, so that the program's socket keeps its family."""
    front, port = env
    s, tok = await _protocol2_claim(front, port, mode=mode)
    with s:
        await trio.sleep(0.1)  # the relay is waiting on both sides
        data, up = await _ask_g(front, tok)
        assert data == b"H\n" and up is not None
        assert up.family == (socket.AF_INET if mode == "a" else socket.AF_INET6)
        with up:
            await up.send(b"mine now")
            assert await _recv_exactly(up, 8) == b"mine now"
        await _expect_reset(s)
    assert front.stats.handed == 1


@pytest.mark.parametrize("why", ["moved", "shim-gone", "unknown"])
async def test_protocol2_upstream_stays_relayed(env, why):
    """`N`: after a byte went through the relay (it is the front's flow for good), or for a
    token nobody claimed; and a shim that stopped waiting (shut its side) gets nothing: the
    socket is not lost in between, the relay goes on."""
    front, port = env
    s, tok = await _protocol2_claim(front, port)
    with s:
        if why == "moved":
            await s.send(b"first")
            assert await _recv_exactly(s, 5) == b"first"
        answer = await _ask_g(front, tok if why != "unknown" else _token(), why == "shim-gone")
        assert answer == (None if why == "shim-gone" else (b"N\n", None))
        await s.send(b"still relayed")
        assert await _recv_exactly(s, 13) == b"still relayed"
    assert front.stats.handed == 0


async def test_claim_to_fake_ip_dials_by_name(env):
    """A fake IP is CONNECTed by name through the pool (here: a dialer that resolves
    'localhost' itself)."""
    front, port = env
    ip = (await ctl(front, "F localhost")).split()[1]
    s, lport = await _open(front)
    with s:
        tok = _token()
        await s.send(tok)
        assert await ctl(front, f"C b 4 {lport} 16 {tok.hex()} {ip} {port}") == "R 0"
        assert await ctl(front, f"P 4 {lport}") == f"D {ip} {port}"
        await s.send(b"by-name")
        assert await _recv_exactly(s, 7) == b"by-name"


async def test_unknown_fake_ip_is_unreachable(env):
    front, port = env
    s, lport = await _open(front)
    with s:
        tok = _token()
        await s.send(tok)
        assert await ctl(front, f"C b 4 {lport} 16 {tok.hex()} 198.19.255.1 {port}") == \
            f"R {errno.EHOSTUNREACH}"


async def test_reverse_lookup_of_a_real_address(env):
    """`V`: the host resolver's name for a real address (the shim's getnameinfo and
    gethostbyaddr ask this); a fake IP the table does not know has none; garbage is an
    error."""
    front, _ = env
    assert (await ctl(front, "V 127.0.0.1")).startswith("H localhost")
    assert await ctl(front, "V 198.19.255.1") == "X nxdomain"
    assert await ctl(front, "V not-an-address") == "E"


async def test_unclaimed_shim_connection_is_dropped(env, monkeypatch):
    import nsvpn.front as front_mod

    monkeypatch.setattr(front_mod, "CLAIM_WAIT", 0.3)
    front, _ = env
    s, _lport = await _open(front)
    with s:
        await s.send(_token())
        with trio.fail_after(3):
            try:
                assert await s.recv(10) == b""
            except ConnectionResetError:
                pass
    assert front.stats.flows == 0


async def test_ctl_socket_is_private(env):
    front, _ = env
    assert os.stat(front.ctl_path).st_mode & 0o077 == 0


@pytest.mark.parametrize("relay", ["splice", "copy"])
async def test_relay_half_close_and_counts(env, monkeypatch, relay):
    """Client sends, half-closes, and still receives everything back, then EOF: through the
    splice relay and the copying one (used when a stream is not a plain socket)."""
    import nsvpn.front as front_mod

    if relay == "copy":
        monkeypatch.setattr(front_mod, "_SPLICE", None)
    elif front_mod._SPLICE is None:
        pytest.skip("no os.splice on this Python")
    front, port = env
    stream = await _socks_connect(front, "127.0.0.1", port)
    payload = os.urandom(3 << 20)
    got = bytearray()
    async with stream:
        async def send():
            await stream.send_all(payload)
            await stream.send_eof()

        async with trio.open_nursery() as n:
            n.start_soon(send)
            while True:
                data = await stream.receive_some(1 << 16)
                if not data:
                    break
                got += data
    assert bytes(got) == payload
    with trio.fail_after(2):
        while front.stats.active:
            await trio.sleep(0.01)
    assert front.stats.bytes_up == front.stats.bytes_down == len(payload)


def test_udp_port_ownership():
    from nsvpn.front import _udp_port_is_ours

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    try:
        assert _udp_port_is_ours(port)
        assert not _udp_port_is_ours(port, uid=os.getuid() + 4242)
    finally:
        s.close()
    assert not _udp_port_is_ours(port)  # nobody's: not ours either


# ------------------------------------------------------------------ the HTTP proxy door

async def _http_exchange(front, request: bytes, until_close: bool = False) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", front.port4)
    async with stream:
        await stream.send_all(request)
        if until_close:
            await stream.send_eof()
        out = b""
        with trio.fail_after(5):
            while b"\r\n\r\n" not in out or until_close:
                data = await stream.receive_some(65536)
                if not data:
                    break
                out += data
        return out


async def test_http_connect_from_our_own_user_needs_no_credentials(env):
    front, port = env
    stream = await trio.open_tcp_stream("127.0.0.1", front.port4)
    async with stream:
        await stream.send_all(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: x\r\n\r\nearly" % port)
        got = b""
        with trio.fail_after(5):
            while not got.endswith(b"early"):
                got += await stream.receive_some(4096)
        assert got == b"HTTP/1.1 200 Connection established\r\n\r\nearly"
        payload = os.urandom(1 << 20)
        await stream.send_all(payload)
        back = b""
        with trio.fail_after(5):
            while len(back) < len(payload):
                back += await stream.receive_some(1 << 16)
        assert back == payload
    assert front.stats.flows == 1


async def test_http_absolute_form_reaches_the_origin_rewritten(env):
    """The echo server plays the origin: what it echoes is what the origin received."""
    front, port = env
    got = await _http_exchange(front, b"POST http://127.0.0.1:%d/up?x=1 HTTP/1.1\r\n"
                                      b"Host: 127.0.0.1:%d\r\nProxy-Connection: keep-alive\r\n"
                                      b"Content-Length: 5\r\n\r\nhello" % (port, port),
                               until_close=True)
    assert got == (b"POST /up?x=1 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: 5\r\n"
                   b"Connection: close\r\n\r\nhello" % port)


async def test_http_dial_failures_and_bad_requests(env):
    front, _port = env
    got = await _http_exchange(front, b"CONNECT 127.0.0.1:%d HTTP/1.1\r\n\r\n" % _closed_port())
    assert got.startswith(b"HTTP/1.1 502 Bad Gateway\r\n") and b"Connection: close" in got
    got = await _http_exchange(front, b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 400 ")
    assert front.stats.failed == 1


async def test_http_door_refuses_other_users_without_credentials(env):
    """Another local user reaches the port, but not the upstream: 407 unless it has the
    session's credentials (which only our own programs get)."""
    import subprocess
    import sys

    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another user")
    front, port = env
    import base64

    good = base64.b64encode(f"nsvpn:{front.secret}".encode()).decode()
    script = (
        "import socket,sys\n"
        "def ask(extra):\n"
        f"    s = socket.create_connection(('127.0.0.1', {front.port4}))\n"
        f"    s.sendall(b'CONNECT 127.0.0.1:{port} HTTP/1.1\\r\\n' + extra + b'\\r\\n')\n"
        "    return s.recv(100).split(b'\\r\\n')[0].decode()\n"
        "print(ask(b''))\n"
        "print(ask(b'Proxy-Authorization: Basic " + good + "\\r\\n'))\n")
    out = await trio.to_thread.run_sync(lambda: subprocess.run(
        [sys.executable, "-c", script], user=65534, capture_output=True, text=True,
        timeout=20))
    assert out.stdout.splitlines() == ["HTTP/1.1 407 Proxy Authentication Required",
                                       "HTTP/1.1 200 Connection established"], out.stderr


HOLD_AS_ANOTHER_USER = r"""
import socket, sys, time
port, first, n, limit = int(sys.argv[1]), bytes.fromhex(sys.argv[2]), 300, int(sys.argv[3])
held = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(first)
    s.setblocking(False)
    held.append(s)
def still_open():
    k = 0
    for s in held:
        try:
            if s.recv(1) == b"":
                continue
        except BlockingIOError:
            k += 1
        except OSError:
            continue
    return k
deadline = time.monotonic() + 10
while still_open() > limit and time.monotonic() < deadline:
    time.sleep(0.05)
print(still_open(), flush=True)
sys.stdin.read()  # hold them until the test is done
"""


@pytest.mark.parametrize("first", [b"", b"\x05\x01", b"CONNECT 127.0.0.1:"])
async def test_another_users_stalled_connections_are_dropped_past_the_bound(env, first):
    """Connections of another local user that stay idle or stall in their SOCKS or HTTP
    handshake remain droppable until they authenticate: 300 of them leave at most
    MAX_UNCLAIMED holding an fd, and the door still serves."""
    import subprocess
    import sys

    from nsvpn.front import MAX_UNCLAIMED

    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another user")
    front, port = env
    proc = subprocess.Popen([sys.executable, "-c", HOLD_AS_ANOTHER_USER, str(front.port4),
                             first.hex(), str(MAX_UNCLAIMED)], user=65534,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = await trio.to_thread.run_sync(proc.stdout.readline)
        assert int(line) <= MAX_UNCLAIMED
        stream = await _socks_connect(front, "127.0.0.1", port)
        async with stream:
            await stream.send_all(b"ping")
            assert await stream.receive_some(4) == b"ping"
    finally:
        proc.kill()
        proc.wait()


async def test_a_burst_of_our_own_connections_is_not_dropped(env):
    """A program of ours that opens hundreds of proxy connections before it sends its first
    greeting (curl -Z, an asyncio client) must not see them reset by the bound."""
    front, port = env
    held = []
    try:
        for _ in range(300):
            s = socket.create_connection(("127.0.0.1", front.port4))
            s.setblocking(False)
            held.append(s)
        await trio.sleep(1.0)
        reset = 0
        for s in held:
            try:
                s.recv(1)
            except BlockingIOError:
                continue
            except OSError:
                pass
            reset += 1
        assert reset == 0
        # and they still work: each one a SOCKS client now
        s = held[0]
        s.send(b"\x05\x01\x02")
        with trio.fail_after(5):
            while True:
                try:
                    assert s.recv(2) == b"\x05\x02"
                    break
                except BlockingIOError:
                    await trio.sleep(0.01)
    finally:
        for s in held:
            s.close()


async def test_drop_oldest_cancels_only_past_the_limit():
    from nsvpn.front import DropOldest

    scarce = [False]
    d = DropOldest(limit=2, ours=lambda sock: sock == "ours", scarce=lambda: scarce[0])
    a, release_a = d.add()
    b, _ = d.add()
    release_a()  # authenticated: no longer counted, never dropped
    c, _ = d.add()
    assert not (a.cancel_called or b.cancel_called or c.cancel_called)
    e, _ = d.add()
    assert b.cancel_called and not (a.cancel_called or c.cancel_called or e.cancel_called)
    # ours may go past the limit while fds are plentiful; strangers are dropped oldest first
    f, _ = d.add("ours")
    g, _ = d.add("ours")
    assert c.cancel_called and e.cancel_called
    assert not (f.cancel_called or g.cancel_called)
    h, _ = d.add()
    assert h.cancel_called and not (f.cancel_called or g.cancel_called)
    # short of fds: the oldest go, ours too
    scarce[0] = True
    i, _ = d.add("ours")
    assert f.cancel_called and not (g.cancel_called or i.cancel_called)
    j, _ = d.add("ours")
    d.shed()
    assert g.cancel_called and not (i.cancel_called or j.cancel_called)
