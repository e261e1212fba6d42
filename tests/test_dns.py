"""DNS core (sans-IO) and its thin trio helpers, against real DNS servers on 127.0.0.1.

No query here may leave loopback: host lookups only use names from /etc/hosts ("localhost"),
forwarding and relaying go to servers started by the test.
"""

from __future__ import annotations

import ipaddress
import struct
from functools import partial

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.reversename
import dns.rrset
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from nsvpn import dns as nd
from nsvpn.upstream.direct import DirectUpstream

FAKE = ipaddress.ip_network("198.18.0.0/15")


def q(name, rdtype="A", rdclass="IN", **kw) -> bytes:
    return dns.message.make_query(name, rdtype, rdclass, **kw).to_wire()


def parse(wire) -> dns.message.Message:
    return dns.message.from_wire(wire)


def addrs(msg, rdtype="A"):
    return [
        r.to_text() for rr in msg.answer if rr.rdtype == dns.rdatatype.from_text(rdtype) for r in rr
    ]


# -- fake-IP table ---------------------------------------------------------------------------


def test_fake_table_stable_and_reverse():
    t = nd.FakeIpTable()
    a = t.ip_for("xrootd.example.org")
    b = t.ip_for("cvmfs.example.org.")
    assert ipaddress.ip_address(a) in FAKE and ipaddress.ip_address(b) in FAKE
    assert a != b and a == "198.18.0.1"
    assert t.ip_for("XROOTD.example.org.") == a
    assert t.name_for(a) == "xrootd.example.org" and t.lookup_ip(b) == "cvmfs.example.org"
    assert t.name_for("10.0.2.3") is None and t.name_for("not an ip") is None
    assert t.is_fake("198.19.255.254") and not t.is_fake("198.20.0.1")
    assert len(t) == 2 and t.items()[0] == ("xrootd.example.org", a)


def test_fake_table_bounded_lru():
    t = nd.FakeIpTable(capacity=3)
    ips = {n: t.ip_for(n) for n in ("a", "b", "c")}
    t.name_for(ips["a"])  # a used recently: b is now the oldest
    d = t.ip_for("d")
    assert d == ips["b"] and t.name_for(d) == "d" and not t.has_name("b")
    assert t.ip_for("a") == ips["a"] and t.ip_for("c") == ips["c"]
    assert len(t) == 3 and t.evictions == 1
    small = nd.FakeIpTable("10.99.0.0/30")
    assert [small.ip_for(n) for n in "xy"] == ["10.99.0.1", "10.99.0.2"]
    assert small.ip_for("z") == "10.99.0.1"  # whole network used: LRU reuse


# -- immediate answers -----------------------------------------------------------------------


def test_ptr_for_fake_ip_and_unknown_fake():
    ans = nd.DnsAnswerer()
    ip = ans.fake_ips.ip_for("remote.lab")
    rev = dns.reversename.from_address(ip)
    step = ans.handle_query(q(rev, "PTR"))
    assert isinstance(step, nd.Reply)
    m = parse(step.wire)
    assert m.rcode() == dns.rcode.NOERROR and addrs(m, "PTR") == ["remote.lab."]
    other = dns.reversename.from_address("198.18.99.99")
    assert parse(ans.handle_query(q(other, "PTR")).wire).rcode() == dns.rcode.NXDOMAIN
    step = ans.handle_query(q(dns.reversename.from_address("127.0.0.1"), "PTR"))
    assert isinstance(step, nd.Lookup) and step.name == "127.0.0.1"


def test_aaaa_without_ipv6_is_clean_empty():
    step = nd.DnsAnswerer(ipv6=False).handle_query(q("www.example.org", "AAAA"))
    m = parse(step.wire)
    assert m.rcode() == dns.rcode.NOERROR and not m.answer and m.flags & dns.flags.QR
    assert m.flags & dns.flags.RA
    assert isinstance(nd.DnsAnswerer(ipv6=True).handle_query(q("x.org", "AAAA")), nd.Lookup)


def test_errors():
    ans = nd.DnsAnswerer()
    good = bytearray(q("example.org"))
    qid = good[:2]
    garbage = bytes(good[:12]) + b"\xff\xff\xff"
    m = ans.handle_query(garbage).wire
    assert m[:2] == qid and m[3] & 0x0F == dns.rcode.FORMERR and m[2] & 0x80
    assert ans.handle_query(b"\x01\x02\x03") is None  # not even a header
    resp = bytearray(good)
    resp[2] |= 0x80
    assert ans.handle_query(bytes(resp)) is None  # responses are never answered
    notify = dns.message.make_query("example.org", "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    assert parse(ans.handle_query(notify.to_wire()).wire).rcode() == dns.rcode.NOTIMP
    chaos = ans.handle_query(q("version.bind", "TXT", "CH"))
    assert parse(chaos.wire).rcode() == dns.rcode.REFUSED
    two = dns.message.make_query("a.org", "A")
    two.question.append(
        dns.rrset.RRset(dns.name.from_text("b.org"), dns.rdataclass.IN, dns.rdatatype.A)
    )
    assert parse(ans.handle_query(two.to_wire()).wire).rcode() == dns.rcode.FORMERR


def test_numeric_name_answers_itself():
    m = parse(nd.DnsAnswerer().handle_query(q("10.1.2.3")).wire)
    assert addrs(m) == ["10.1.2.3"]


# -- host lookup results, fake fallback, relay -----------------------------------------------


def test_host_answer_then_fake_fallback():
    now = [0.0]
    ans = nd.DnsAnswerer(clock=lambda: now[0])
    step = ans.handle_query(q("squid.site"))
    assert isinstance(step, nd.Lookup) and step.name == "squid.site"
    m = parse(ans.finish_lookup(step, nd.LookupResult("ok", ["10.1.1.1", "10.1.1.2"])).wire)
    assert addrs(m) == ["10.1.1.1", "10.1.1.2"]

    step = ans.handle_query(q("remote.lab"))
    reply = ans.finish_lookup(step, nd.LookupResult("nxdomain"))
    fake = addrs(parse(reply.wire))[0]
    assert ipaddress.ip_address(fake) in FAKE
    assert ans.fake_ips.name_for(fake) == "remote.lab"
    # Again: answered at once, same address, no host lookup.
    again = ans.handle_query(q("Remote.Lab."))
    assert isinstance(again, nd.Reply) and addrs(parse(again.wire))[0].lower() == fake

    # Host resolver timed out: negative-cached for a while, so the next query is immediate.
    step = ans.handle_query(q("slow.example"))
    first = addrs(parse(ans.finish_lookup(step, nd.LookupResult("timeout")).wire))
    assert isinstance(ans.handle_query(q("slow.example")), nd.Reply)
    assert addrs(parse(ans.handle_query(q("slow.example")).wire)) == first


def test_an_outer_fake_ip_answer_is_not_taken_for_a_real_one():
    """nsvpn inside nsvpn: the host resolver is the outer relay's, and it answers names it
    cannot resolve with its own 198.18/15 fake IPs. Those mean nothing to this relay (its
    router would call them unknown fake IPs): the name gets our own fake IP instead, and a
    fake address beside real ones is dropped."""
    ans = nd.DnsAnswerer()
    step = ans.handle_query(q("remote.lab"))
    reply = ans.finish_lookup(step, nd.LookupResult("ok", ["198.18.0.1"]))
    ours = addrs(parse(reply.wire))
    assert len(ours) == 1 and ans.fake_ips.name_for(ours[0]) == "remote.lab"
    step = ans.handle_query(q("mixed.lab"))
    reply = ans.finish_lookup(step, nd.LookupResult("ok", ["198.18.0.7", "10.1.1.1"]))
    assert addrs(parse(reply.wire)) == ["10.1.1.1"]
    # without fake IPs of our own, the host's answer is passed on as it is
    plain = nd.DnsAnswerer(use_fake_ips=False)
    step = plain.handle_query(q("remote.lab"))
    reply = plain.finish_lookup(step, nd.LookupResult("ok", ["198.18.0.1"]))
    assert addrs(parse(reply.wire)) == ["198.18.0.1"]


def test_no_fake_ips_gives_real_rcodes():
    ans = nd.DnsAnswerer(use_fake_ips=False)
    step = ans.handle_query(q("nope.example"))
    assert parse(ans.finish_lookup(step, nd.LookupResult("nxdomain")).wire).rcode() == 3
    step = ans.handle_query(q("slow.example"))
    assert parse(ans.finish_lookup(step, nd.LookupResult("timeout")).wire).rcode() == 2


def test_relay_decision_and_results():
    ans = nd.DnsAnswerer(relay=True)
    wire = q("only-remote.lab")
    step = ans.finish_lookup(ans.handle_query(wire), nd.LookupResult("timeout"))
    assert isinstance(step, nd.Relay) and step.wire[2:] == wire[2:]
    server_reply = dns.message.make_response(dns.message.from_wire(wire))
    server_reply.answer.append(dns.rrset.from_text("only-remote.lab.", 5, "IN", "A", "172.16.9.9"))
    out = ans.finish_relay(step, server_reply.to_wire())
    assert addrs(parse(out.wire)) == ["172.16.9.9"]
    # A broken or mismatched relay answer: fall back to a fake IP.
    bad = bytearray(server_reply.to_wire())
    bad[0] ^= 0xFF
    fake = addrs(parse(ans.finish_relay(step, bytes(bad)).wire))[0]
    assert ipaddress.ip_address(fake) in FAKE


def test_udp_truncation():
    ans = nd.DnsAnswerer()
    wire = q("many.example", use_edns=False)
    step = ans.handle_query(wire)
    many = [f"10.0.{i // 250}.{i % 250 + 1}" for i in range(100)]
    out = ans.finish_lookup(step, nd.LookupResult("ok", many)).wire
    assert len(out) <= 512 and parse(out).flags & dns.flags.TC
    step = ans.handle_query(wire, tcp=True)
    out = ans.finish_lookup(step, nd.LookupResult("ok", many)).wire
    assert len(addrs(parse(out))) == 100


def test_tcp_framing_any_split():
    msgs = [q("a.example"), q("b.example", "MX"), b""]
    stream = b"".join(nd.tcp_frame(m) for m in msgs)
    for step in (1, 2, 3, 5, len(stream)):
        d = nd.TcpDeframer()
        got = []
        for i in range(0, len(stream), step):
            got += d.feed(stream[i : i + step])
        assert got == msgs and d.pending == 0
    with pytest.raises(ValueError):
        nd.tcp_frame(b"x" * 70000)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_raise(data):
    step = nd.DnsAnswerer().handle_query(data)
    assert step is None or isinstance(step, (nd.Reply, nd.Lookup, nd.Forward))


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=12, max_size=80), st.integers(0, 11))
def test_mutated_queries_never_raise(tail, cut):
    base = q("fuzz.example", "A")
    step = nd.DnsAnswerer().handle_query(base[:cut] + tail)
    assert step is None or isinstance(step, (nd.Reply, nd.Lookup, nd.Forward))


# -- trio helpers with real peers --------------------------------------------------------------


def zone_answer(wire: bytes) -> bytes:
    """A tiny authoritative server's logic for the test zone."""
    query = dns.message.from_wire(wire)
    r = dns.message.make_response(query)
    question = query.question[0]
    name = question.name.to_text()
    if name == "mail.test." and question.rdtype == dns.rdatatype.MX:
        r.answer.append(dns.rrset.from_text(name, 60, "IN", "MX", "10 mx.mail.test."))
    elif name == "only-remote.lab." and question.rdtype == dns.rdatatype.A:
        r.answer.append(dns.rrset.from_text(name, 60, "IN", "A", "172.16.5.5"))
    else:
        r.set_rcode(dns.rcode.NXDOMAIN)
    return r.to_wire()


async def udp_dns_server(task_status=trio.TASK_STATUS_IGNORED):
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    task_status.started(sock.getsockname()[1])
    with sock:
        while True:
            data, peer = await sock.recvfrom(65535)
            await sock.sendto(zone_answer(data), peer)


async def tcp_dns_server(nursery) -> int:
    async def handler(stream):
        d = nd.TcpDeframer()
        async with stream:
            while True:
                data = await stream.receive_some(4096)
                if not data:
                    return
                for msg in d.feed(data):
                    await stream.send_all(nd.tcp_frame(zone_answer(msg)))

    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


async def test_host_lookup_localhost():
    r = await nd.host_lookup("localhost", dns.rdatatype.A)
    assert r.status == "ok" and "127.0.0.1" in r.addresses
    r = await nd.host_lookup("127.0.0.1", dns.rdatatype.PTR)
    assert r.status == "ok" and r.names
    out = await nd.resolve_query(nd.DnsAnswerer(), q("localhost"), forward_servers=[])
    assert addrs(parse(out)) == ["127.0.0.1"]


async def test_forward_other_types_to_host_nameserver(nursery):
    port = await nursery.start(udp_dns_server)
    ans = nd.DnsAnswerer()
    out = await nd.resolve_query(ans, q("mail.test", "MX"), forward_servers=[("127.0.0.1", port)])
    assert addrs(parse(out), "MX") == ["10 mx.mail.test."]
    # No host nameserver answers: SERVFAIL quickly (a closed port refuses at once).
    dead = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()
    with trio.fail_after(3):
        out = await nd.resolve_query(
            ans, q("mail.test", "MX"), forward_servers=[("127.0.0.1", dead_port)]
        )
    assert parse(out).rcode() == dns.rcode.SERVFAIL


async def test_relay_over_tcp_through_a_dialer(nursery):
    port = await tcp_dns_server(nursery)
    direct = DirectUpstream()

    async def dial(host, p, timeout):
        return await direct.dial_tcp(host, p, timeout=timeout)

    async def relay(wire):
        return await nd.relay_tcp(dial, ("127.0.0.1", port), wire)

    async def host_says_no(name, rdtype):
        return nd.LookupResult("nxdomain")

    ans = nd.DnsAnswerer(relay=True)
    out = await nd.resolve_query(
        ans, q("only-remote.lab"), lookup=host_says_no, relay=relay, forward_servers=[]
    )
    assert addrs(parse(out)) == ["172.16.5.5"]
    # The relay target answers NXDOMAIN for unknown names: passed through as is.
    out = await nd.resolve_query(
        ans, q("nowhere.lab"), lookup=host_says_no, relay=relay, forward_servers=[]
    )
    assert parse(out).rcode() == dns.rcode.NXDOMAIN
    # Query arriving over TCP framing, answered in full size.
    wire = q("only-remote.lab")
    frames = nd.TcpDeframer().feed(nd.tcp_frame(wire))
    assert frames == [wire]
    assert struct.unpack("!H", nd.tcp_frame(out)[:2])[0] == len(out)


# -- DnsService inside the real relay and userspace stack ----------------------------------


def test_parse_server():
    assert nd.parse_server("10.1.1.1") == ("10.1.1.1", 53)
    assert nd.parse_server("10.1.1.1:5353") == ("10.1.1.1", 5353)
    assert nd.parse_server("[fd00::53]:54") == ("fd00::53", 54)
    assert nd.parse_server("fd00::53") == ("fd00::53", 53)
    for bad in ("dns.example", "10.1.1.1:x", "10.1.1.1:0", "[fd00::1]x"):
        with pytest.raises(ValueError):
            nd.parse_server(bad)


async def _nxdomain(name, rdtype):
    """A host resolver that knows no names (the secluded node)."""
    await trio.lowlevel.checkpoint()
    return nd.LookupResult("nxdomain")


async def test_service_relays_through_a_socks_upstream(nursery):
    """--dns-server reached as DNS over TCP *through* an upstream (our SOCKS5 dialer and
    microsocks), for names the host cannot resolve."""
    import os
    import shutil
    import socket
    import subprocess

    from nsvpn.upstream.socks5 import Socks5Upstream

    if not os.path.exists(shutil.which("microsocks") or "/usr/bin/microsocks"):
        pytest.skip("microsocks is not installed")
    dns_port = await tcp_dns_server(nursery)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        sport = s.getsockname()[1]
    proxy = subprocess.Popen(
        ["microsocks", "-i", "127.0.0.1", "-p", str(sport)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        up = Socks5Upstream("127.0.0.1", sport)
        with trio.fail_after(5):
            while True:
                try:
                    await up.start()
                    break
                except Exception:
                    await trio.sleep(0.05)
        svc = nd.DnsService(
            upstream=up, dns_server=f"127.0.0.1:{dns_port}", lookup=_nxdomain, forward_servers=[]
        )
        out = await svc.answer(q("only-remote.lab"))
        assert addrs(parse(out)) == ["172.16.5.5"]
        # The relay target is down: names still work, with fake IPs.
        proxy.kill()
        proxy.wait()
        out = await svc.answer(q("elsewhere.lab"))
        assert ipaddress.ip_address(addrs(parse(out))[0]) in FAKE
    finally:
        proxy.kill()
        proxy.wait()


async def test_service_in_relay_udp_and_tcp(nursery):
    """Queries from an app stack through a datagram socketpair standing in for the TUN, into
    relay.Relay + Stack + DnsService: UDP, and DNS over TCP (two queries on one connection)."""
    import socket

    from scapy.all import DNS, IP, UDP

    from nsvpn import routing
    from nsvpn.netstack import wire
    from nsvpn.netstack.stack import Stack, StackConfig

    Relay = pytest.importorskip("nsvpn.relay", reason="nsvpn.relay not in this tree").Relay

    tun, app_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    tun.setblocking(False)
    fakes = nd.FakeIpTable()
    svc = nd.DnsService(fakes, lookup=_nxdomain, forward_servers=[])
    router = routing.Router(fake_ip_lookup=fakes.name_for)

    async def no_dial(host, port, timeout):
        raise AssertionError("DNS must not dial")

    relay = Relay(
        tun.fileno(),
        Stack(StackConfig()),
        router,
        dial_upstream=no_dial,
        dial_direct=no_dial,
        dns_service=svc,
    )
    await nursery.start(relay.run)
    app_sock = trio.socket.from_stdlib_socket(app_end)

    # UDP
    app, dns_ip = "10.0.2.100", "10.0.2.3"
    pkt = wire.build_udp(
        socket.inet_aton(app), socket.inet_aton(dns_ip), 40000, 53, q("cern.example")
    )
    await app_sock.send(pkt)
    with trio.fail_after(5):
        reply = IP(await app_sock.recv(65535))
    assert reply[UDP].sport == 53 and reply[UDP].dport == 40000
    answer = parse(bytes(reply[UDP].payload))
    fake = addrs(answer)[0]
    assert fakes.name_for(fake) == "cern.example"
    assert DNS in reply

    # TCP: an active-open app stack on the other end of the socketpair
    client = Stack(StackConfig())
    flow = client.open_tcp((app, 0), (dns_ip, 53), trio.current_time())

    async def app_io():
        for p in client.output_packets():
            await app_sock.send(p)
        with trio.move_on_after(0.05):
            while True:
                client.input_packet(await app_sock.recv(65535), trio.current_time())
                for p in client.output_packets():
                    await app_sock.send(p)

    with trio.fail_after(5):
        while "connected" not in [getattr(e, "kind", None) for e in client.pop_events()]:
            await app_io()
        queries = nd.tcp_frame(q("cern.example")) + nd.tcp_frame(
            q(dns.reversename.from_address(fake), "PTR")
        )
        client.tcp_send(flow, queries, trio.current_time())
        deframer = nd.TcpDeframer()
        msgs = []
        while len(msgs) < 2:
            await app_io()
            msgs += deframer.feed(client.tcp_recv(flow, -1))
    assert addrs(parse(msgs[0])) == [fake]  # stable across UDP and TCP
    assert addrs(parse(msgs[1]), "PTR") == ["cern.example."]
    nursery.cancel_scope.cancel()


def test_ptr_for_the_namespace_subnet_is_answered_locally():
    ans = nd.DnsAnswerer(local_net="10.0.2.0/24", local_names={"10.0.2.100": "node17"})
    own = ans.handle_query(q(dns.reversename.from_address("10.0.2.100"), "PTR"))
    assert isinstance(own, nd.Reply)
    m = parse(own.wire)
    assert [r.to_text() for rr in m.answer for r in rr] == ["node17."]
    other = ans.handle_query(q(dns.reversename.from_address("10.0.2.77"), "PTR"))
    assert isinstance(other, nd.Reply)
    assert parse(other.wire).rcode() == dns.rcode.NXDOMAIN
    # outside the subnet the host resolver is still asked
    assert isinstance(ans.handle_query(q(dns.reversename.from_address("172.31.2.2"), "PTR")),
                      nd.Lookup)


def test_reverse_lookup_uses_the_host_resolver():
    """/etc/hosts names 127.0.0.1 (and ::1) on every system the tests run on."""
    assert nd.reverse_lookup("127.0.0.1").status == "ok"
    assert nd.reverse_lookup("127.0.0.1").names
    assert nd.reverse_lookup("not an address").status == "nxdomain"


async def test_reverse_lookup_failures_are_remembered():
    """An address the resolver could not name (timeout, error) fails again at once, through
    `reverse` (the preload front's `V`) and PTR queries alike; other answers are not kept."""
    calls = []

    async def lookup(name, rdtype):
        calls.append(name)
        return nd.LookupResult("timeout" if name == "192.0.2.1" else "ok",
                               names=["host.example"] if name != "192.0.2.1" else [])

    svc = nd.DnsService(lookup=lookup, forward_servers=[])
    assert (await svc.reverse("192.0.2.1")).status == "timeout"
    assert (await svc.reverse("192.0.2.1")).status == "timeout"
    query = dns.message.make_query(dns.reversename.from_address("192.0.2.1"), "PTR")
    reply = dns.message.from_wire(await svc.answer(query.to_wire()))
    assert reply.rcode() == dns.rcode.SERVFAIL
    assert calls == ["192.0.2.1"]
    assert (await svc.reverse("192.0.2.7")).names == ["host.example"]
    assert (await svc.reverse("192.0.2.7")).names == ["host.example"]
    assert calls == ["192.0.2.1", "192.0.2.7", "192.0.2.7"]
