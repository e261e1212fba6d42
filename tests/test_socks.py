from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nsvpn import socks
from nsvpn.socks import (
    CMD_CONNECT,
    CMD_UDP_ASSOCIATE,
    ClientHandshake,
    ServerHandshake,
    SocksAuthError,
    SocksError,
    SocksReplyError,
)


def pump(client: ClientHandshake, server: ServerHandshake, chunk: int = 1 << 20) -> None:
    """Run a client against a server in memory, delivering bytes `chunk` at a time."""
    for _ in range(1000):
        c2s = client.data_to_send()
        for i in range(0, len(c2s), chunk):
            server.receive_data(c2s[i : i + chunk])
        s2c = server.data_to_send()
        for i in range(0, len(s2c), chunk):
            client.receive_data(s2c[i : i + chunk])
        if server.request is not None and not c2s and not s2c:
            return
    raise AssertionError("no progress")


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1 << 20])
@pytest.mark.parametrize(
    "host, atyp",
    [
        ("192.0.2.7", socks.ATYP_IPV4),
        ("2001:db8::5", socks.ATYP_IPV6),
        ("xrootd.example.org", socks.ATYP_DOMAIN),
    ],
)
def test_client_server_roundtrip(chunk, host, atyp):
    c = ClientHandshake(CMD_CONNECT, host, 1094, "user", "pw")
    s = ServerHandshake(credentials=("user", "pw"))
    pump(c, s, chunk)
    assert s.request == socks.Request(CMD_CONNECT, host, 1094, atyp)
    assert s.username == "user"
    reply = s.reply(socks.REP_SUCCEEDED, "10.1.2.3", 40000) + b"early payload"
    for i in range(0, len(reply), chunk):
        c.receive_data(reply[i : i + chunk])
    assert c.reply == socks.Reply(0, "10.1.2.3", 40000)
    assert c.leftover == b"early payload"


def test_no_auth_and_udp_associate():
    c = ClientHandshake(CMD_UDP_ASSOCIATE, "0.0.0.0", 0)
    s = ServerHandshake()
    assert c.data_to_send() == b"\x05\x01\x00"
    s.receive_data(b"\x05\x01\x00")
    c.receive_data(s.data_to_send())
    s.receive_data(c.data_to_send())
    assert s.request.command == CMD_UDP_ASSOCIATE
    c.receive_data(s.reply(0, "::1", 5353))
    assert c.reply == socks.Reply(0, "::1", 5353)


def test_exact_client_bytes():
    c = ClientHandshake(CMD_CONNECT, "example.org", 80, "u", "p")
    assert c.data_to_send() == b"\x05\x01\x02"
    c.receive_data(b"\x05\x02")
    assert c.data_to_send() == b"\x01\x01u\x01p"
    c.receive_data(b"\x01\x00")
    assert c.data_to_send() == b"\x05\x01\x00\x03\x0bexample.org\x00\x50"


@pytest.mark.parametrize(
    "code, err",
    [
        (0x05, errno.ECONNREFUSED),
        (0x03, errno.ENETUNREACH),
        (0x04, errno.EHOSTUNREACH),
        (0x06, errno.ETIMEDOUT),
        (0x01, errno.ECONNABORTED),
        (0x02, errno.EACCES),
        (0x7F, errno.ECONNABORTED),
    ],
)
def test_failure_reply_maps_errno(code, err):
    c = ClientHandshake(CMD_CONNECT, "127.0.0.1", 9)
    c.receive_data(b"\x05\x00")
    with pytest.raises(SocksReplyError) as ei:
        # Truncated failure replies (no address) are still decisive.
        c.receive_data(bytes((5, code, 0, 1)))
    assert ei.value.reply_code == code and ei.value.errno == err
    assert socks.reply_errno(code) == err


def test_errno_reply_inverse():
    for err in (errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ETIMEDOUT):
        assert socks.reply_errno(socks.errno_reply(err)) == err
    assert socks.errno_reply(None) == socks.REP_GENERAL_FAILURE


def test_client_auth_failures():
    c = ClientHandshake(CMD_CONNECT, "h", 1)
    with pytest.raises(SocksAuthError, match="user name and password"):
        c.receive_data(b"\x05\xff")
    c = ClientHandshake(CMD_CONNECT, "h", 1, "u", "bad")
    c.receive_data(b"\x05\x02")
    with pytest.raises(SocksAuthError, match="rejected"):
        c.receive_data(b"\x01\x01")
    c = ClientHandshake(CMD_CONNECT, "h", 1)
    with pytest.raises(SocksAuthError, match="unoffered"):
        c.receive_data(b"\x05\x02")  # we offered no-auth only
    with pytest.raises(SocksError, match="already failed"):
        c.receive_data(b"")
    with pytest.raises(SocksError, match="not a SOCKS5 server"):
        ClientHandshake(CMD_CONNECT, "h", 1).receive_data(b"HTTP/1.1 400")


def test_server_rejections_queue_replies():
    s = ServerHandshake(credentials=("u", "secret"))
    with pytest.raises(SocksAuthError):
        s.receive_data(b"\x05\x01\x00")  # offers only no-auth
    assert s.data_to_send() == b"\x05\xff"

    s = ServerHandshake(credentials=("u", "secret"))
    s.receive_data(b"\x05\x01\x02")
    assert s.data_to_send() == b"\x05\x02"
    with pytest.raises(SocksAuthError):
        s.receive_data(b"\x01\x01u\x05wrong")
    assert s.data_to_send() == b"\x01\x01"

    s = ServerHandshake()
    s.receive_data(b"\x05\x01\x00")
    s.data_to_send()
    with pytest.raises(SocksError) as ei:
        s.receive_data(b"\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x50")  # BIND
    assert ei.value.reply_code == socks.REP_COMMAND_NOT_SUPPORTED
    assert s.data_to_send()[:2] == b"\x05\x07"

    s = ServerHandshake()
    s.receive_data(b"\x05\x01\x00")
    s.data_to_send()
    with pytest.raises(SocksError) as ei:
        s.receive_data(b"\x05\x01\x00\x09xxxx")
    assert ei.value.reply_code == socks.REP_ADDRESS_TYPE_NOT_SUPPORTED
    assert s.data_to_send()[:2] == b"\x05\x08"


def test_server_pipelined_payload():
    s = ServerHandshake()
    s.receive_data(b"\x05\x01\x00" + b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50GET /")
    assert s.request.host == "127.0.0.1" and s.request.port == 80
    assert s.leftover == b"GET /"
    s.receive_data(b" HTTP/1.0")
    assert s.leftover == b"GET / HTTP/1.0"


def test_udp_header_roundtrip():
    for host in ("10.0.2.3", "fd00::1", "dns.example"):
        dgram = socks.encode_udp(host, 53, b"\x12\x34query")
        assert socks.decode_udp(dgram) == socks.UdpDatagram(host, 53, b"\x12\x34query", 0)
    assert socks.encode_udp("1.2.3.4", 53, b"x")[:4] == b"\x00\x00\x00\x01"
    for bad in (
        b"",
        b"\x00\x00\x00",
        b"\x01\x00\x00\x01" + bytes(6),
        b"\x00\x00\x00\x01\x01\x02",
        b"\x00\x00\x00\x05" + bytes(8),
    ):
        with pytest.raises(SocksError):
            socks.decode_udp(bad)


def test_encode_address_limits():
    with pytest.raises(SocksError):
        socks.encode_address("a" * 256, 80)
    with pytest.raises(SocksError):
        socks.encode_address("example.org", 70000)
    with pytest.raises(SocksError):
        ClientHandshake(0x09, "h", 1)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=6), st.booleans())
def test_server_arbitrary_bytes_only_socks_errors(chunks, with_auth):
    s = ServerHandshake(credentials=("u", "p") if with_auth else None)
    try:
        for c in chunks:
            s.receive_data(c)
            s.data_to_send()
    except SocksError:
        pass


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.binary(max_size=40), max_size=6),
    st.booleans(),
    st.sampled_from(["1.2.3.4", "::1", "name.example"]),
)
def test_client_arbitrary_bytes_only_socks_errors(chunks, with_auth, host):
    c = ClientHandshake(CMD_CONNECT, host, 80, *(("u", "p") if with_auth else ()))
    try:
        for chunk in chunks:
            c.receive_data(chunk)
            c.data_to_send()
    except SocksError:
        pass


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_udp_arbitrary_bytes_only_socks_errors(data):
    try:
        socks.decode_udp(data)
    except SocksError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=30))
def test_server_domain_bytes(name):
    req = b"\x05\x01\x00\x03" + bytes((len(name),)) + name + b"\x00\x01"
    s = ServerHandshake()
    s.receive_data(b"\x05\x01\x00")
    try:
        s.receive_data(req)
    except SocksError:
        return
    assert s.request is not None and s.request.port == 1
