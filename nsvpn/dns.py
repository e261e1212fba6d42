"""The namespace's DNS: a sans-IO answering core, the fake-IP table, and thin trio helpers.

Policy (DESIGN.md "DNS"): ask the host's resolver first (short, bounded); where it cannot
answer, relay the query through the upstream to `--dns-server` (DNS over TCP), or hand out a
*fake IP* from 198.18.0.0/15 that the relay later CONNECTs **by name** through SOCKS5.

Core (no I/O)::

    step = answerer.handle_query(wire)       # Reply | Lookup | Forward | Relay | None (drop)
    while not isinstance(step, Reply):
        if isinstance(step, Lookup):  step = answerer.finish_lookup(step, await host_lookup(...))
        elif isinstance(step, Forward): step = answerer.finish_forward(step, await forward_udp(...))
        else:                          step = answerer.finish_relay(step, await relay_tcp(...))
    send(step.wire)

`resolve_query()` runs exactly that loop. Immediate answers: PTR for fake IPs, empty NOERROR
for AAAA when the namespace has no IPv6, FORMERR for garbage with a readable header, NOTIMP for
opcodes other than QUERY, REFUSED for classes other than IN/ANY. Responses to UDP queries are
truncated (TC) to 512 bytes or the client's EDNS size.
"""

from __future__ import annotations

import collections
import ctypes
import ipaddress
import logging
import socket
import struct
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Dict, List, Tuple, Union

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.reversename
import dns.rrset
import trio

log = logging.getLogger("nsvpn.dns")

FAKE_NETWORK = "198.18.0.0/15"
HOST_TIMEOUT = 1.5  # host resolver budget per query
# After the host resolver timed out, it is given only this much (enough for /etc/hosts and
# nscd, not for an unreachable DNS server) for HOST_SLOW_HOLD seconds: on a secluded node
# every new name would otherwise cost the full budget.
HOST_TIMEOUT_DEGRADED = 0.2
HOST_SLOW_HOLD = 30.0
FAKE_TTL = 60  # fake IPs are stable for the session, the TTL only bounds app caching
REAL_TTL = 30  # getaddrinfo gives no TTL; keep app caches short
NEGATIVE_TTL = 300.0  # a name the host could not resolve goes straight to a fake IP for this long
UDP_PLAIN_MAX = 512


def normalize_name(name: str) -> str:
    return name.rstrip(".").lower()


# -- fake IPs ------------------------------------------------------------------------------


class FakeIpTable:
    """Stable name <-> fake IP mapping for one session.

    Addresses are handed out in order from `network` (its first and last address excluded).
    The table holds at most `capacity` names (default: every address of the network, 131070
    for a /15); when full, the least recently *used* name (looked up by name or by IP) gives up
    its address. A mapping therefore only changes for a name nobody touched for longer than
    ~130 000 other names: in practice never within one session.
    """

    def __init__(self, network: str = FAKE_NETWORK, capacity: int | None = None):
        self.network = ipaddress.IPv4Network(network)
        size = self.network.num_addresses - 2
        if size < 1:
            raise ValueError(f"{network}: too small for fake IPs")
        self.capacity = min(capacity or size, size)
        self._first = int(self.network.network_address) + 1
        self._next = 0
        self._by_name: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._by_ip: Dict[int, str] = {}
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._by_name)

    def is_fake(self, ip: str) -> bool:
        try:
            return ipaddress.ip_address(ip) in self.network
        except ValueError:
            return False

    def ip_for(self, name: str) -> str:
        """The fake IP for `name`, allocated on first use."""
        key = normalize_name(name)
        if not key:
            raise ValueError("empty name")
        n = self._by_name.get(key)
        if n is not None:
            self._by_name.move_to_end(key)
            return str(ipaddress.IPv4Address(n))
        if len(self._by_name) >= self.capacity:
            old, n = self._by_name.popitem(last=False)
            del self._by_ip[n]
            self.evictions += 1
            log.info("fake-IP table full: %s gives %s to %s", old, ipaddress.IPv4Address(n), key)
        else:
            n = self._first + self._next
            self._next += 1
        self._by_name[key] = n
        self._by_ip[n] = key
        return str(ipaddress.IPv4Address(n))

    def name_for(self, ip: str) -> str | None:
        """Reverse lookup: the name behind a fake IP, None for any other address."""
        try:
            n = int(ipaddress.IPv4Address(ip))
        except ValueError:
            return None
        name = self._by_ip.get(n)
        if name is not None:
            self._by_name.move_to_end(name)
        return name

    def has_name(self, name: str) -> bool:
        return normalize_name(name) in self._by_name

    lookup_ip = name_for  # the name routing.Router expects for its fake_ip_lookup hook

    def items(self) -> List[Tuple[str, str]]:
        return [(name, str(ipaddress.IPv4Address(n))) for name, n in self._by_name.items()]


# -- decisions -----------------------------------------------------------------------------


@dataclass
class Reply:
    """Send `wire` back to the client."""

    wire: bytes


@dataclass
class Lookup:
    """Ask the host resolver: getaddrinfo for A/AAAA, getnameinfo for PTR (`name` is then the
    address)."""

    query: dns.message.Message = field(repr=False)
    name: str
    rdtype: int
    max_size: int = field(repr=False, default=UDP_PLAIN_MAX)


@dataclass
class Forward:
    """Other record types: forward the raw query to the host's nameservers (UDP)."""

    query: dns.message.Message = field(repr=False)
    wire: bytes = field(repr=False)
    max_size: int = field(repr=False, default=UDP_PLAIN_MAX)


@dataclass
class Relay:
    """Send the raw query as DNS over TCP through the upstream to the configured server."""

    query: dns.message.Message = field(repr=False)
    wire: bytes = field(repr=False)
    max_size: int = field(repr=False, default=UDP_PLAIN_MAX)


Step = Union[Reply, Lookup, Forward, Relay]


@dataclass
class LookupResult:
    """What the host resolver said. status: ok | nodata | nxdomain | timeout | error."""

    status: str
    addresses: List[str] = field(default_factory=list)  # A/AAAA
    names: List[str] = field(default_factory=list)  # PTR


class DnsAnswerer:
    """Sans-IO DNS answering policy. One per session; holds the fake-IP table."""

    def __init__(
        self,
        fake_ips: FakeIpTable | None = None,
        *,
        ipv6: bool = False,
        use_fake_ips: bool = True,
        relay: bool = False,
        clock: Callable[[], float] = lambda: 0.0,
        local_net: str | None = None,
        local_names: Dict[str, str] | None = None,
    ):
        self.fake_ips = fake_ips if fake_ips is not None else FakeIpTable()
        # The namespace's own subnet: nobody outside knows it, so PTR queries for it are
        # answered here at once (the app's own address -> our hostname) instead of waiting
        # for the host resolver's timeout (xrdcp asks for its own address at start).
        self.local_net = ipaddress.ip_network(local_net, strict=False) if local_net else None
        self.local_names = dict(local_names or {})
        self.ipv6 = ipv6
        self.use_fake_ips = use_fake_ips
        self.relay = relay  # a --dns-server is reachable through the upstream
        self.clock = clock
        self._host_failed: Dict[Tuple[str, int], float] = {}
        self.stats = collections.Counter()

    # -- helpers --------------------------------------------------------------------------
    def _response(self, query: dns.message.Message, rcode: int = dns.rcode.NOERROR):
        r = dns.message.make_response(query, recursion_available=True)
        r.set_rcode(rcode)
        return r

    def _wire(self, response: dns.message.Message, max_size: int) -> bytes:
        self.stats[dns.rcode.to_text(response.rcode())] += 1
        try:
            return response.to_wire(max_size=max_size, prefer_truncation=True)
        except dns.exception.TooBig:
            response.answer.clear()
            response.authority.clear()
            response.additional.clear()
            response.flags |= dns.flags.TC
            return response.to_wire()

    def _reply(self, query, rcode, max_size) -> Reply:
        return Reply(self._wire(self._response(query, rcode), max_size))

    @staticmethod
    def _header_error(wire: bytes, rcode: int) -> bytes | None:
        """An error reply built from the raw header only (the message did not parse)."""
        if len(wire) < 12:
            return None
        qid, flags = struct.unpack_from("!HH", wire)
        if flags & 0x8000:  # a response: never answer those
            return None
        flags = 0x8000 | (flags & 0x7800) | (flags & 0x0100) | 0x0080 | rcode
        return struct.pack("!HHHHHH", qid, flags, 0, 0, 0, 0)

    def _fake_or(self, lk: Union[Lookup, Forward, Relay], rcode: int) -> Step:
        q = lk.query.question[0]
        r = self._response(lk.query)
        if q.rdtype in (dns.rdatatype.A, dns.rdatatype.ANY) and self.use_fake_ips:
            ip = self.fake_ips.ip_for(q.name.to_text(omit_final_dot=True))
            r.answer.append(dns.rrset.from_text(q.name, FAKE_TTL, "IN", "A", ip))
            self.stats["fake"] += 1
            return Reply(self._wire(r, lk.max_size))
        if q.rdtype == dns.rdatatype.AAAA and self.use_fake_ips:
            # The name gets an IPv4 fake; an empty AAAA answer makes apps use it.
            return Reply(self._wire(r, lk.max_size))
        r.set_rcode(rcode)
        return Reply(self._wire(r, lk.max_size))

    # -- entry points ---------------------------------------------------------------------
    def handle_query(self, wire: bytes, *, tcp: bool = False) -> Step | None:
        """First decision for a query; None means "drop it" (a response, or not DNS)."""
        try:
            query = dns.message.from_wire(wire)
        except Exception:  # dnspython raises many types for hostile input
            self.stats["FORMERR"] += 1
            out = self._header_error(wire, dns.rcode.FORMERR)
            return Reply(out) if out is not None else None
        if query.flags & dns.flags.QR:
            return None
        max_size = 65535 if tcp else max(UDP_PLAIN_MAX, query.payload if query.edns >= 0 else 0)
        if query.opcode() != dns.opcode.QUERY:
            return self._reply(query, dns.rcode.NOTIMP, max_size)
        if len(query.question) != 1:
            return self._reply(query, dns.rcode.FORMERR, max_size)
        q = query.question[0]
        if q.rdclass not in (dns.rdataclass.IN, dns.rdataclass.ANY):
            return self._reply(query, dns.rcode.REFUSED, max_size)
        name = q.name.to_text(omit_final_dot=True)
        rdtype = q.rdtype
        if rdtype == dns.rdatatype.PTR:
            try:
                ip = dns.reversename.to_address(q.name)
            except Exception:
                ip = None
            if ip is None:
                return self._reply(query, dns.rcode.NXDOMAIN, max_size)
            fake = self.fake_ips.name_for(ip)
            if fake is not None:
                r = self._response(query)
                r.answer.append(dns.rrset.from_text(q.name, FAKE_TTL, "IN", "PTR", fake + "."))
                return Reply(self._wire(r, max_size))
            if self.fake_ips.is_fake(ip):
                return self._reply(query, dns.rcode.NXDOMAIN, max_size)
            if self.local_net is not None and _in_net(ip, self.local_net):
                local = self.local_names.get(ip)
                if local is None:
                    return self._reply(query, dns.rcode.NXDOMAIN, max_size)
                r = self._response(query)
                r.answer.append(dns.rrset.from_text(q.name, REAL_TTL, "IN", "PTR", local + "."))
                return Reply(self._wire(r, max_size))
            return Lookup(query, ip, rdtype, max_size)
        if rdtype == dns.rdatatype.AAAA and not self.ipv6:
            return self._reply(query, dns.rcode.NOERROR, max_size)
        if rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.ANY):
            key = (normalize_name(name), rdtype)
            until = self._host_failed.get(key)
            if until is not None and until > self.clock():
                return self._after_host_failure(query, wire, max_size)
            if self.use_fake_ips and self.fake_ips.has_name(name):
                # Once faked, always faked: the mapping stays stable for the session.
                return self._fake_or(Lookup(query, name, rdtype, max_size), dns.rcode.SERVFAIL)
            if _is_address(name):
                # "1.2.3.4" as a name: answer it as itself, like glibc does.
                r = self._response(query)
                ip = ipaddress.ip_address(name)
                t = "A" if ip.version == 4 else "AAAA"
                if (t == "A") == (rdtype != dns.rdatatype.AAAA):
                    r.answer.append(dns.rrset.from_text(q.name, REAL_TTL, "IN", t, name))
                return Reply(self._wire(r, max_size))
            return Lookup(query, name, rdtype, max_size)
        return Forward(query, bytes(wire), max_size)

    def _after_host_failure(self, query, wire, max_size) -> Step:
        if self.relay:
            return Relay(query, bytes(wire), max_size)
        return self._fake_or(Lookup(query, "", 0, max_size), dns.rcode.SERVFAIL)

    def finish_lookup(self, lk: Lookup, result: LookupResult) -> Step:
        q = lk.query.question[0]
        if self.use_fake_ips and result.status == "ok" and result.addresses:
            real = [a for a in result.addresses if not self.fake_ips.is_fake(a)]
            if not real:
                # Another fake-IP layer answered (an outer nsvpn around this one): its
                # 198.18/15 addresses mean nothing to our router, so the host did not
                # really resolve the name; ours go by name through our upstream.
                result = LookupResult("nxdomain")
            elif len(real) < len(result.addresses):
                result = LookupResult("ok", real)
        if result.status == "ok" and (result.addresses or result.names):
            r = self._response(lk.query)
            if lk.rdtype == dns.rdatatype.PTR:
                for n in result.names:
                    r.answer.append(
                        dns.rrset.from_text(q.name, REAL_TTL, "IN", "PTR", n.rstrip(".") + ".")
                    )
            else:
                want_v6 = lk.rdtype == dns.rdatatype.AAAA
                for a in result.addresses:
                    v6 = ":" in a
                    if v6 == want_v6 or lk.rdtype == dns.rdatatype.ANY:
                        t = "AAAA" if v6 else "A"
                        if not (v6 and not self.ipv6):
                            r.answer.append(dns.rrset.from_text(q.name, REAL_TTL, "IN", t, a))
            self.stats["host"] += 1
            return Reply(self._wire(r, lk.max_size))
        if lk.rdtype == dns.rdatatype.PTR:
            if result.status in ("nxdomain", "nodata", "ok"):
                return self._reply(lk.query, dns.rcode.NXDOMAIN, lk.max_size)
            return self._reply(lk.query, dns.rcode.SERVFAIL, lk.max_size)
        if result.status == "nodata" and lk.rdtype == dns.rdatatype.AAAA:
            return self._reply(lk.query, dns.rcode.NOERROR, lk.max_size)
        # The host cannot resolve it (or not in time): remember, then relay or fake.
        key = (normalize_name(lk.name), lk.rdtype)
        self._host_failed[key] = self.clock() + NEGATIVE_TTL
        if len(self._host_failed) > 10000:
            now = self.clock()
            self._host_failed = {k: v for k, v in self._host_failed.items() if v > now}
        wire = lk.query.to_wire()
        if self.relay:
            return Relay(lk.query, wire, lk.max_size)
        rcode = dns.rcode.NXDOMAIN if result.status == "nxdomain" else dns.rcode.SERVFAIL
        return self._fake_or(lk, rcode)

    def finish_forward(self, fw: Forward, response: bytes | None) -> Step:
        out = self._checked_response(fw.query, response, fw.max_size)
        if out is not None:
            return Reply(out)
        if self.relay:
            return Relay(fw.query, fw.wire, fw.max_size)
        return self._reply(fw.query, dns.rcode.SERVFAIL, fw.max_size)

    def finish_relay(self, rl: Relay, response: bytes | None) -> Reply:
        out = self._checked_response(rl.query, response, rl.max_size)
        if out is not None:
            return Reply(out)
        step = self._fake_or(rl, dns.rcode.SERVFAIL)
        assert isinstance(step, Reply)
        return step

    def _checked_response(self, query, response: bytes | None, max_size: int):
        """A server's answer, if it is one for this query, re-encoded to fit the client."""
        if not response:
            return None
        try:
            r = dns.message.from_wire(response)
        except Exception:
            return None
        if r.id != query.id or not (r.flags & dns.flags.QR) or r.question != query.question:
            return None
        if r.rcode() in (dns.rcode.SERVFAIL, dns.rcode.REFUSED):
            return None
        return self._wire(r, max_size)


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


# -- DNS over TCP framing ------------------------------------------------------------------


def _in_net(ip: str, net) -> bool:
    try:
        return ipaddress.ip_address(ip) in net
    except ValueError:
        return False


def tcp_frame(message: bytes) -> bytes:
    """Prefix a DNS message with its 2-byte length (RFC 1035 4.2.2)."""
    if len(message) > 0xFFFF:
        raise ValueError("DNS message longer than 65535 bytes")
    return struct.pack("!H", len(message)) + message


class TcpDeframer:
    """Split a DNS-over-TCP byte stream into messages; partial input is kept."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> List[bytes]:
        self._buf += data
        out = []
        while len(self._buf) >= 2:
            (n,) = struct.unpack_from("!H", self._buf)
            if len(self._buf) < 2 + n:
                break
            out.append(bytes(self._buf[2 : 2 + n]))
            del self._buf[: 2 + n]
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)


# -- thin trio helpers ---------------------------------------------------------------------


_getnameinfo = None


def _libc_getnameinfo():
    """libc's getnameinfo through ctypes, which lets go of the GIL while it runs: CPython's
    socket.getnameinfo holds it for the whole lookup (3.11 here), so a reverse lookup the
    host's DNS server never answers froze every flow of the session for the resolver's
    timeout (measured: 1 s per PTR query in the lab, up to 10 s with glibc's defaults).
    None where ctypes or the symbol is missing."""
    global _getnameinfo
    if _getnameinfo is None:
        try:
            fn = ctypes.CDLL(None).getnameinfo  # the interpreter's own libc: no ldconfig run
        except (AttributeError, OSError):
            fn = False
        else:
            fn.argtypes = [ctypes.c_char_p, ctypes.c_uint32, ctypes.c_char_p, ctypes.c_uint32,
                           ctypes.c_char_p, ctypes.c_uint32, ctypes.c_int]
            fn.restype = ctypes.c_int
        _getnameinfo = fn
    return _getnameinfo or None


def reverse_lookup(ip: str) -> LookupResult:
    """The host resolver's name for `ip` (/etc/hosts, nscd, DNS, ... as nsswitch.conf says).
    Blocking; meant for a worker thread (see _libc_getnameinfo)."""
    fn = _libc_getnameinfo()
    if fn is None:
        try:
            host, _ = socket.getnameinfo((ip, 0), socket.NI_NAMEREQD)
        except socket.gaierror as exc:
            return LookupResult("nxdomain" if exc.errno == socket.EAI_NONAME else "error")
        except OSError:
            return LookupResult("error")
        return LookupResult("ok", names=[host])
    try:
        packed = socket.inet_pton(socket.AF_INET, ip)
        sa = struct.pack("=H", socket.AF_INET) + bytes(2) + packed + bytes(8)
    except OSError:
        try:
            packed = socket.inet_pton(socket.AF_INET6, ip)
        except OSError:
            return LookupResult("nxdomain")
        sa = struct.pack("=H", socket.AF_INET6) + bytes(6) + packed + bytes(4)
    host = ctypes.create_string_buffer(1025)  # NI_MAXHOST
    rc = fn(sa, len(sa), host, len(host), None, 0, socket.NI_NAMEREQD)
    if rc == 0:
        return LookupResult("ok", names=[host.value.decode("utf-8", "replace")])
    return LookupResult("nxdomain" if rc == socket.EAI_NONAME else "error")


async def host_lookup(name: str, rdtype: int, timeout: float = HOST_TIMEOUT) -> LookupResult:
    """Ask the host's resolver (getaddrinfo/getnameinfo: /etc/hosts, nscd, DNS...), bounded.

    trio runs these in abandonable threads, so a hung resolver costs `timeout`, not more.
    """
    with trio.move_on_after(timeout):
        try:
            if rdtype == dns.rdatatype.PTR:
                return await trio.to_thread.run_sync(reverse_lookup, name,
                                                     abandon_on_cancel=True)
            family = {dns.rdatatype.A: socket.AF_INET, dns.rdatatype.AAAA: socket.AF_INET6}.get(
                rdtype, socket.AF_UNSPEC
            )
            infos = await trio.socket.getaddrinfo(name, None, family, socket.SOCK_STREAM)
        except socket.gaierror as exc:
            if exc.errno == socket.EAI_NONAME:
                return LookupResult("nxdomain")
            if exc.errno in (
                getattr(socket, "EAI_NODATA", -5),
                getattr(socket, "EAI_ADDRFAMILY", -9),
            ):
                return LookupResult("nodata")
            return LookupResult("error")
        except OSError:
            return LookupResult("error")
        addrs: List[str] = []
        for info in infos:
            a = info[4][0].split("%", 1)[0]
            if a not in addrs:
                addrs.append(a)
        return LookupResult("ok" if addrs else "nodata", addresses=addrs)
    return LookupResult("timeout")


def host_nameservers(path: str = "/etc/resolv.conf") -> List[str]:
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver" and _is_address(parts[1].split("%")[0]):
            out.append(parts[1])
    return out


async def forward_udp(
    wire: bytes, servers: List[Tuple[str, int]], timeout: float = HOST_TIMEOUT
) -> bytes | None:
    """Send a raw query to the servers in turn (UDP) and return the first matching reply."""
    if len(wire) < 2 or not servers:
        return None
    per = timeout / len(servers)
    for host, port in servers:
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        with trio.socket.socket(fam, socket.SOCK_DGRAM) as sock:
            try:
                await sock.connect((host, port))
                await sock.send(wire)
                with trio.move_on_after(per):
                    while True:
                        data = await sock.recv(65535)
                        if data[:2] == wire[:2]:
                            return data
            except OSError:
                continue
    return None


async def query_over_stream(
    stream: trio.abc.Stream, wire: bytes, timeout: float = 5.0
) -> bytes | None:
    """One DNS-over-TCP exchange on an open stream (e.g. dialled through the upstream)."""
    deframer = TcpDeframer()
    with trio.move_on_after(timeout):
        await stream.send_all(tcp_frame(wire))
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return None
            for msg in deframer.feed(data):
                if msg[:2] == wire[:2]:
                    return msg
    return None


Dialer = Callable[[str, int, float], Awaitable[trio.abc.Stream]]


async def relay_tcp(
    dial: Dialer, server: Tuple[str, int], wire: bytes, timeout: float = 5.0
) -> bytes | None:
    """Relay one query to `server` over a TCP connection made with `dial` (the upstream)."""
    try:
        with trio.move_on_after(timeout):
            stream = await dial(server[0], server[1], timeout)
            async with stream:
                return await query_over_stream(stream, wire, timeout)
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        log.debug("DNS relay to %s:%s failed: %s", server[0], server[1], exc)
    return None


async def resolve_query(
    answerer: DnsAnswerer,
    wire: bytes,
    *,
    tcp: bool = False,
    lookup: Callable[[str, int], Awaitable[LookupResult]] = host_lookup,
    forward_servers: List[Tuple[str, int]] | None = None,
    relay: Callable[[bytes], Awaitable[bytes | None]] | None = None,
) -> bytes | None:
    """Run the answerer's decisions with real I/O; the bytes to send back, or None (drop)."""
    step = answerer.handle_query(wire, tcp=tcp)
    if forward_servers is None:
        forward_servers = [(ns, 53) for ns in host_nameservers()]
    while step is not None and not isinstance(step, Reply):
        if isinstance(step, Lookup):
            step = answerer.finish_lookup(step, await lookup(step.name, step.rdtype))
        elif isinstance(step, Forward):
            step = answerer.finish_forward(step, await forward_udp(step.wire, forward_servers))
        else:
            got = await relay(step.wire) if relay is not None else None
            step = answerer.finish_relay(step, got)
    return step.wire if step is not None else None


# -- the relay's DNS service ---------------------------------------------------------------


def parse_server(text: str) -> Tuple[str, int]:
    """`--dns-server` value: IP, IP:PORT, [IPv6] or [IPv6]:PORT -> (ip, port)."""
    text = text.strip()
    host, port = text, 53
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise ValueError(f"--dns-server {text}: bad port")
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, p = text.split(":")
        if not p.isdigit():
            raise ValueError(f"--dns-server {text}: bad port")
        port = int(p)
    if not _is_address(host):
        raise ValueError(f"--dns-server {text}: not an IP address")
    if not 0 < port < 65536:
        raise ValueError(f"--dns-server {text}: bad port")
    return host, port


class DnsService:
    """Answers DNS sent to the namespace's DNS address, for relay.Relay.

    `upstream` (anything with dial_tcp) carries DNS-over-TCP to `dns_server` when one is given.
    UDP queries run concurrently up to `max_inflight`; beyond that they are dropped (clients
    retry) rather than queued without bound.
    """

    def __init__(
        self,
        fake_ips: FakeIpTable | None = None,
        *,
        upstream=None,
        dns_server: str | None = None,
        ipv6: bool = False,
        use_fake_ips: bool = True,
        lookup: Callable[[str, int], Awaitable[LookupResult]] = host_lookup,
        forward_servers: List[Tuple[str, int]] | None = None,
        max_inflight: int = 256,
        relay_timeout: float = 5.0,
        local_net: str | None = None,
        local_names: Dict[str, str] | None = None,
    ):
        self.server = parse_server(dns_server) if dns_server else None
        if self.server is not None and upstream is None:
            raise ValueError("--dns-server needs an upstream to reach it")
        self.upstream = upstream
        self.answerer = DnsAnswerer(
            fake_ips,
            ipv6=ipv6,
            use_fake_ips=use_fake_ips,
            relay=self.server is not None,
            clock=trio.current_time,
            local_net=local_net,
            local_names=local_names,
        )
        self.fake_ips = self.answerer.fake_ips
        self.lookup = lookup
        self.forward_servers = (
            forward_servers
            if forward_servers is not None
            else [(ns, 53) for ns in host_nameservers()]
        )
        self.relay_timeout = relay_timeout
        self._limiter = trio.CapacityLimiter(max_inflight)
        self._host_slow_until = 0.0
        # addresses whose reverse lookup timed out or failed: (until, status), oldest first
        self._ptr_failed: Dict[str, Tuple[float, str]] = {}
        self.dropped = 0

    async def _relay(self, wire: bytes) -> bytes | None:
        assert self.server is not None and self.upstream is not None
        up = self.upstream

        async def dial(host: str, port: int, timeout: float) -> trio.abc.Stream:
            return await up.dial_tcp(host, port, timeout=timeout)

        return await relay_tcp(dial, self.server, wire, self.relay_timeout)

    async def answer(self, wire: bytes, *, tcp: bool = False) -> bytes | None:
        return await resolve_query(
            self.answerer,
            wire,
            tcp=tcp,
            lookup=self._lookup,
            forward_servers=self.forward_servers,
            relay=self._relay if self.server is not None else None,
        )

    async def reverse(self, ip: str) -> LookupResult:
        """The host resolver's name for `ip` under this service's budget and memory of
        failures (the preload front's `V`, for the shim's getnameinfo/gethostbyaddr)."""
        return await self._lookup(ip, dns.rdatatype.PTR)

    async def _lookup(self, name: str, rdtype: int) -> LookupResult:
        now = trio.current_time()
        if rdtype == dns.rdatatype.PTR:
            # Tools look up their peer's name on every run (xrdcp, HTCondor, GSI): an address
            # the resolver failed on fails again at once for NEGATIVE_TTL, as A/AAAA do.
            failed = self._ptr_failed.get(name)
            if failed is not None and failed[0] > now:
                return LookupResult(failed[1])
            r = await self._host_lookup(name, rdtype, now)
            if r.status in ("timeout", "error"):
                self._ptr_failed.pop(name, None)
                self._ptr_failed[name] = (trio.current_time() + NEGATIVE_TTL, r.status)
                while len(self._ptr_failed) > 10000:
                    del self._ptr_failed[next(iter(self._ptr_failed))]
            return r
        return await self._host_lookup(name, rdtype, now)

    async def _host_lookup(self, name: str, rdtype: int, now: float) -> LookupResult:
        if self.lookup is not host_lookup:  # an injected resolver (tests) keeps its own budget
            return await self.lookup(name, rdtype)
        slow = now < self._host_slow_until
        r = await host_lookup(name, rdtype, HOST_TIMEOUT_DEGRADED if slow else HOST_TIMEOUT)
        # A timeout, or a slow "try again" (glibc gave up on an unreachable server first).
        if r.status == "timeout" or (
            r.status == "error" and trio.current_time() - now > HOST_TIMEOUT_DEGRADED
        ):
            self._host_slow_until = trio.current_time() + HOST_SLOW_HOLD
        elif r.status in ("ok", "nxdomain", "nodata") and not slow:
            self._host_slow_until = 0.0
        return r

    async def serve_udp(self, relay, src, dst, payload: bytes) -> None:
        """One datagram from the app at `src` to our DNS address `dst`."""
        try:
            self._limiter.acquire_nowait()
        except trio.WouldBlock:
            self.dropped += 1
            return
        try:
            out = await self.answer(payload)
        finally:
            self._limiter.release()
        if out is not None:
            relay.send_udp(dst, src, out)

    async def serve_tcp_flow(self, relay, f) -> None:
        """DNS over TCP on an accepted stack flow (`f` is the relay's per-flow companion)."""
        st = relay.stack
        flow = f.flow
        conn = flow.conn
        await f.connected.wait()
        deframer = TcpDeframer()
        while not f.reset:
            if conn.recv_available():
                data = st.tcp_recv(flow, 65536)
                relay._after_stack()
                for msg in deframer.feed(data):
                    out = await self.answer(msg, tcp=True)
                    if out is not None and not await self._tcp_send(relay, f, tcp_frame(out)):
                        return
                continue
            if f.eof:
                break
            f.readable = trio.Event()
            if conn.recv_available() or f.eof or f.reset:
                continue
            await f.readable.wait()
        if not f.reset:
            st.tcp_shutdown(flow, trio.current_time())
            relay._after_stack()
            with trio.move_on_after(10):
                await f.done.wait()

    @staticmethod
    async def _tcp_send(relay, f, data: bytes) -> bool:
        st = relay.stack
        conn = f.flow.conn
        view = memoryview(data)
        while view:
            if f.reset:
                return False
            if conn.send_space() <= 0:
                f.writable = trio.Event()
                if conn.send_space() <= 0 and not f.reset:
                    await f.writable.wait()
                continue
            n = st.tcp_send(f.flow, bytes(view[: conn.send_space()]), trio.current_time())
            relay._after_stack()
            view = view[n:]
        return True
