"""The local front of the preload modes: where the shim's (and proxy clients') connections land.

Two doors, both only usable by the user who runs nsvpn:

* a TCP listener on 127.0.0.1 (and [::1] when the host has IPv6 loopback). Every local user
  can connect to it, so it serves a connection only when
  - the control channel *claimed* it (the shim's path, see fallback/nsvpn_preload.c): a claim
    names the connection by its source port and carries a random token that must be the first
    16 bytes on it; or
  - it speaks SOCKS5 with user/password = (``username``, per-session ``secret``) (RFC 1929):
    the path of SOCKS-aware programs that get ``ALL_PROXY=socks5h://user:secret@...``; or
  - it speaks HTTP proxy (CONNECT or one absolute-form request, see httpproxy) with those
    credentials, or from a socket of our own uid (sockdiag): programs that read
    ``http_proxy``/``https_proxy``, which carry no credentials (not every client can send
    them).
* a unix stream socket (``ctl_path``) in nsvpn's 0700 runtime directory: the control channel.
  One request line, one answer line per connection:

  ``C <a|b> <4|6> <srcport> <padding> <token-hex> <ip> <port>``
      claim. ``b`` (blocking): the answer ``R <errno>`` comes after the upstream dial (0 = ok).
      ``a`` (non-blocking): on success the front drops the padding so the program's socket
      turns writable, on failure it resets the connection and keeps the errno for ``S <id>``
      (-> ``R <errno>``, or ``P`` while still pending). With a padding length the answer is
      ``K <id>`` at once (protocol 1). With ``-`` (protocol 2, ``NSVPN_FRONT_PROTO``) nothing
      is answered: the id is the token, and a second line on the same connection gives the
      length: ``L <padding>``, or ``W <padding>`` to get ``R <errno>`` there, as a blocking
      claim does. The shim sends both lines in one write (the dial may start before the
      second, it does not need it), so a non-blocking connect() never waits for the front.
  ``C h ...``   a blocking claim (as ``b``) from a program's AF_INET socket that can take the
                upstream socket itself: with ``R 0`` comes the socket (SCM_RIGHTS) when it is a
                plain TCP/IPv4 one; the shim dup3()s it over the program's fd and the front is
                out of the data path (the kernel moves the bytes, as with proxychains).
  ``C H ...``, ``C A ...`` as ``h`` and ``a``, from a program's AF_INET6 socket (one that
                reaches IPv4 too): the upstream socket is dialled as AF_INET6 (an IPv4 proxy
                or host as a v4-mapped address), so that it can become the program's. Only
                when ``NSVPN_FRONT_HANDOFF`` is 2.
  ``G <token>`` the same for a protocol-2 non-blocking claim (``a`` or ``A``), asked when
                the program first looks at its connected socket: ``H`` with the socket while the
                relay has moved nothing yet (it stops for good), else ``N`` (the relay goes on).
                A shim that stopped waiting shuts its side first: the send fails and the relay
                goes on.
  ``F <name>``  an address for a name the host resolver could not answer -> ``A <ip>``
                (a fake IP; or the real one via ``dns_server`` over the upstream).
  ``K <name>``  the fake IP of a name already in the table -> ``A <ip>``, else ``U``
                (the shim asks first, so only a name's first lookup waits for the host resolver).
  ``N <ip>``    the name behind a fake IP -> ``H <name>`` or ``E``.
  ``V <ip>``    the host resolver's name for a real address -> ``H <name>``, or ``X again``
                (it failed or did not answer in time) / ``X nxdomain``. Bounded and with a
                memory of failures (dns.DnsService.reverse), so that a node whose DNS server
                never answers costs the shim's getnameinfo/gethostbyaddr little.
  ``P <4|6> <srcport>`` the original destination of a live connection -> ``D <ip> <port>``.
* a UDP DNS responder on 127.0.0.1 (and [::1]) for queries the shim redirects (UDP to port 53
  of an address outside the direct networks), answered by dns.DnsService.

Destinations: fake IPs are CONNECTed by name through the upstream; loopback and the direct
networks are dialled with host sockets; everything else goes through the upstream pool.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import hmac
import ipaddress
import logging
import math
import os
import resource
import secrets
import socket
import struct
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import trio

from . import httpproxy, sockdiag, socks
from .dns import DnsService, FakeIpTable, parse_server, relay_tcp
from .memtrim import TrimWhenDrained
from .sockpump import detach_socket
from .upstream.base import WANT_FAMILY, DialError
from .upstream.direct import DirectUpstream

log = logging.getLogger("nsvpn.front")

USERNAME = "nsvpn"
TOKEN_LEN = 16
CLAIM_WAIT = 10.0  # a claimed connection and its claim must meet within this time
# Accepted connections not yet claimed (or known to speak SOCKS) hold an fd each while they
# wait. Out of fds, unbounded they took every fd, so the control connections carrying the
# claims were never accepted: the session stalled until the claims timed out, over and over.
# Past this many the oldest is dropped (reset): a claim comes within milliseconds, and
# connections nobody claims (another user's, say) cannot hold up the ones that get claimed.
MAX_UNCLAIMED = 128
HANDSHAKE_TIMEOUT = 10.0
RELAY_CHUNK = 256 * 1024
VERDICTS_KEPT = 4096
CTL_LINE_MAX = 600
FRONT_PROTO = 2  # the control protocol this front speaks (see the module docstring)
# Hand upstream sockets over to the program (`C h`, `G`); NSVPN_HANDOFF=0 keeps every flow
# relayed (for A/B runs, and a way out should a program mind its socket changing under it).
HANDOFF = os.environ.get("NSVPN_HANDOFF", "1") != "0"
# The receive buffer of a connection that is not served yet, set (and so locked) on the
# listener: a non-blocking shim connect fills it with padding (see the shim) and relies on the
# window staying shut. With the kernel's autotuned default the window keeps growing for a
# while (and tuned hosts default to many MB), so readiness would leak out. Even a locked
# buffer's window still opens by a few KB after it first shut; the shim leaves 32 KB unsent to
# outlast that, and a buffer this small (the kernel doubles it) keeps the growth well below
# that: ~50 KB of padding per pending connect. Raised as soon as the upstream answered. The
# window scale it implies (none) still carries uploads at ~1 GB/s on loopback.
PADDING_RCVBUF = 4096
SERVED_RCVBUF = 4 * 1024 * 1024

Key = Tuple[int, int]  # (listener 4|6, client source port)

_SPLICE = getattr(os, "splice", None)  # Python >= 3.10 on Linux; else the copying relay
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


@dataclass
class Claim:
    id: str  # what `S` asks for: the token's hex (protocol 2) or a number
    blocking: bool
    key: Key
    padding: Optional[int]  # None until an `L`/`W` line says it (protocol 2); -1: never will
    token: bytes
    host: str
    port: int
    answer: Optional[trio.SocketStream] = None  # blocking claims: where the verdict goes
    padding_known: trio.Event = field(default_factory=trio.Event)
    handoff: bool = False  # `C h`: the verdict may carry the upstream socket
    proto2: bool = False  # a protocol-2 non-blocking claim: `G` may ask for the socket
    family: int = socket.AF_INET  # of the program's socket: what a handed-over one must be


class Offer:
    """A relayed flow whose upstream socket the program may still take over (`G`): true
    while the relay has moved nothing in either direction."""

    __slots__ = ("fd", "moved", "handed", "scope")

    def __init__(self, fd: int) -> None:
        self.fd = fd  # the upstream socket's (the relay re-wraps it, the number stays)
        self.moved = False
        self.handed = False
        self.scope: Optional[trio.CancelScope] = None


def _can_hand_over(upstream: trio.abc.Stream, claim: Claim) -> bool:
    """Can the program's socket become this upstream? Only a plain TCP socket stream of the
    same family: not one with bytes read past the SOCKS reply, nor ssh's unix socket (whose
    EOF needs ssh's word on whether it broke)."""
    if not HANDOFF or type(upstream) is not trio.SocketStream:
        return False
    sock = upstream.socket
    return sock.family == claim.family and sock.type == socket.SOCK_STREAM


@dataclass
class FrontStats:
    flows: int = 0
    active: int = 0
    failed: int = 0
    bytes_up: int = 0  # program -> far side
    bytes_down: int = 0
    padding_max: int = 0  # largest readiness padding a non-blocking shim connect needed
    handed: int = 0  # flows whose upstream socket went to the program (bytes not counted)
    by_reason: Dict[str, int] = field(default_factory=dict)


async def accept_forever(listener, what: str, start,
                         shed: Optional[Callable[[], None]] = None) -> None:
    """Accept on a trio socket until cancelled; start(sock, addr) takes each connection.
    A failed accept (EMFILE and friends) is logged and retried after a pause, never spun on;
    when it was for want of fds, `shed()` frees what it can first."""
    quiet_until = -math.inf
    spare = _spare_fd()
    while True:
        try:
            sock, addr = await listener.accept()
        except OSError as exc:
            now = trio.current_time()
            if now >= quiet_until:  # out of fds comes in storms: one line per 10 s
                log.warning("%s failed: %s (further ones not shown for 10 s)", what, exc)
                quiet_until = now + 10.0
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                if shed is not None:
                    shed()
                if spare < 0:
                    spare = _spare_fd()  # lost to a race last time: any fd freed since will do
                if spare >= 0:
                    # Out of fds: the waiting connection would hang its program until it
                    # timed out (15 s per connect in the shim). Free the spare fd, take the
                    # connection and reset it, so that the program fails fast, then hold a
                    # spare again.
                    os.close(spare)
                    try:
                        with trio.move_on_after(0.1):
                            sock, _ = await listener.accept()
                            _linger_close(sock)
                    except OSError:
                        pass
                    spare = _spare_fd()
            await trio.sleep(0.01)
            continue
        start(sock, addr)


class DropOldest:
    """Connections that hold an fd before they proved anything (not yet claimed, still in
    their handshake), oldest first. Past `limit` the oldest is dropped (its cancel scope
    cancelled): idle or stalling connections, another local user's say, cannot pile up.

    Our own user's connections may go past the limit while fds are plentiful: a program that
    opens hundreds of proxy connections at once (curl -Z, aiohttp, Go) sends its greetings
    only after its connects, and must not see them reset. When fds run short (`scarce()`, or
    an accept failing for want of fds: `shed()`), the oldest go whoever they are: the claims
    that unblock the shim's connects need fds to get in."""

    def __init__(self, limit: int = MAX_UNCLAIMED,
                 ours: Optional[Callable[[object], bool]] = None,
                 scarce: Optional[Callable[[], bool]] = None) -> None:
        self.limit = limit
        self.ours = ours if ours is not None else sockdiag.peer_is_ours
        self.scarce = scarce if scarce is not None else fds_scarce
        # key -> [cancel scope, socket, ours (None: not looked up yet)]
        self._entries: collections.OrderedDict[object, list] = collections.OrderedDict()

    def add(self, sock: object = None) -> Tuple[trio.CancelScope, Callable[[], None]]:
        """(the scope to run the connection's early phase in, release())."""
        me, scope = object(), trio.CancelScope()
        self._entries[me] = [scope, sock, None]
        if len(self._entries) > self.limit:
            if self.scarce():
                self.shed()
            else:
                self._drop_strangers(len(self._entries) - self.limit)
        return scope, lambda: self._entries.pop(me, None)

    def shed(self) -> None:
        """Down to the limit, oldest first, ours too."""
        while len(self._entries) > self.limit:
            self._entries.popitem(last=False)[1][0].cancel()

    def _drop_strangers(self, n: int) -> None:
        victims = []
        for key, entry in self._entries.items():
            if len(victims) >= n:
                break
            if entry[2] is None:  # looked up once, only once the limit is passed
                entry[2] = entry[1] is not None and self.ours(entry[1])
            if not entry[2]:
                victims.append(key)
        for key in victims:
            self._entries.pop(key)[0].cancel()


def fds_scarce() -> bool:
    """More than half of our fd limit in use. (Each relayed flow needs up to six; the rest
    must stay free for the claims and control requests that move things on.)"""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return False
    try:
        used = len(os.listdir("/proc/self/fd"))
    except OSError:  # out of fds already, or no /proc: assume the worst
        return True
    return used * 2 > soft


def _spare_fd() -> int:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1


def _reset_on_close(sock) -> None:
    """SO_LINGER {1, 0}: closing sends RST, so the program sees an error, not an orderly EOF."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


def _linger_close(sock: trio.socket.SocketType) -> None:
    """Close with RST."""
    _reset_on_close(sock)
    sock.close()


async def _close_pair(client: trio.abc.Stream, upstream: trio.abc.Stream, reset: bool) -> None:
    """End a relayed connection; `reset`: the upstream broke, so the program's socket gets a
    RST (its read fails) instead of an orderly EOF."""
    with trio.CancelScope(shield=True):
        if reset and isinstance(client, trio.SocketStream):
            _reset_on_close(client.socket)
        for s in (client, upstream):
            try:
                await s.aclose()
            except Exception:  # closing a broken stream may complain; it is closed
                pass


def _send_socket_now(stream: trio.SocketStream, line: bytes, fd: int) -> None:
    """`line` with a duplicate of socket `fd` (SCM_RIGHTS) on a unix stream connection,
    without a checkpoint: sent whole or not at all (a few bytes on an idle control
    connection never wait for room), OSError else."""
    fds = struct.pack("i", fd)
    raw = stream.socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fileno=os.dup(raw.fileno())) as s:
        if s.sendmsg([line], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)],
                     socket.MSG_DONTWAIT) != len(line):
            raise OSError(errno.EIO, "short send")


async def _read_line(stream: trio.SocketStream, buf: bytes) -> bytes:
    """`buf` plus what arrives until it holds a newline (or CTL_LINE_MAX bytes, or EOF)."""
    while b"\n" not in buf and len(buf) < CTL_LINE_MAX:
        data = await stream.receive_some(CTL_LINE_MAX)
        if not data:
            break
        buf += data
    return buf


def _set_rcvbuf(sock, size: int) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    except OSError:  # padding stays bounded by the shim's own limit
        pass


def _udp_port_is_ours(port: int, uid: Optional[int] = None) -> bool:
    """Is the local UDP port `port` (a datagram's source on loopback) bound only by sockets
    of `uid` (default: ours)? From /proc/net/udp{,6}: the uid column of each socket."""
    uid = os.getuid() if uid is None else uid
    owners = set()
    for path in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(path) as f:
                next(f, None)
                for line in f:
                    parts = line.split()
                    if len(parts) > 7 and int(parts[1].rsplit(":", 1)[1], 16) == port:
                        owners.add(int(parts[7]))
        except (OSError, ValueError, IndexError):
            continue
    return owners == {uid}


class _UdpReplies:
    """What DnsService.serve_udp needs to answer: send_udp(ours, theirs, payload)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send_udp(self, src, dst, payload: bytes) -> None:
        try:
            self.sock.sendto(payload, dst)
        except OSError:  # a full buffer or a vanished client: DNS clients retry
            pass


class Front:
    def __init__(
        self,
        pool,
        *,
        runtime_dir: str,
        direct: Sequence[str] = (),
        fakes: Optional[FakeIpTable] = None,
        dns_server: Optional[str] = None,
        connect_timeout: float = 20.0,
        secret: Optional[str] = None,
    ) -> None:
        self.pool = pool
        self.direct_up = DirectUpstream()
        self.direct = [ipaddress.ip_network(c, strict=False) for c in direct]
        self.fakes = fakes if fakes is not None else FakeIpTable()
        self.dns_server = parse_server(dns_server) if dns_server else None
        self.dns = DnsService(self.fakes, upstream=pool, dns_server=dns_server)
        self.connect_timeout = connect_timeout
        self.username = USERNAME
        self.secret = secret or secrets.token_urlsafe(24)
        self.ctl_path = os.path.join(runtime_dir, "ctl")
        self.port4 = 0
        self.port6 = 0
        self.dns_port4 = 0
        self.dns_port6 = 0
        self.stats = FrontStats()
        self.trim = TrimWhenDrained(lambda: self.stats.active)
        self._next_id = 1
        self._claims: Dict[Key, Claim] = {}
        # accepted connections waiting for their claim, oldest first (see MAX_UNCLAIMED)
        self._unclaimed = DropOldest()
        self._claim_events: Dict[Key, trio.Event] = {}
        self._pending: Dict[str, Claim] = {}
        self._verdicts: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._peers: Dict[Key, Tuple[str, int]] = {}
        self._offers: Dict[str, Offer] = {}
        self._nursery: Optional[trio.Nursery] = None
        self._sockdiag: Optional[bool] = None

    # ------------------------------------------------------------------ public

    def socks_url(self) -> str:
        return f"socks5h://{self.username}:{self.secret}@127.0.0.1:{self.port4}"

    def http_proxy_url(self) -> str:
        """Without credentials where the front can tell its user's connections (sockdiag):
        some HTTP clients cannot send proxy credentials at all."""
        if self._sockdiag is None:
            self._sockdiag = sockdiag.works()
        who = "" if self._sockdiag else f"{self.username}:{self.secret}@"
        return f"http://{who}127.0.0.1:{self.port4}"

    def shim_env(self) -> Dict[str, str]:
        return {
            "NSVPN_CTL": self.ctl_path,
            "NSVPN_FRONT_PORT4": str(self.port4),
            "NSVPN_FRONT_PORT6": str(self.port6),
            "NSVPN_DNS_PORT4": str(self.dns_port4),
            "NSVPN_DNS_PORT6": str(self.dns_port6),
            "NSVPN_FRONT_PROTO": str(FRONT_PROTO),
            # whether asking for upstream sockets can ever succeed: not through ssh's unix
            # socket or a userspace stack (it would cost each connection a round trip)
            # (2: AF_INET6 program sockets too, see `C A`/`C H`)
            "NSVPN_FRONT_HANDOFF": "2" if HANDOFF and getattr(self.pool, "dials_plain_tcp",
                                                               False) else "0",
        }

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Listen (TCP on loopback + the unix control socket) until cancelled."""
        listeners: List[Tuple[trio.socket.SocketType, int]] = []
        l4 = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        _set_rcvbuf(l4, PADDING_RCVBUF)
        await l4.bind(("127.0.0.1", 0))
        l4.listen(512)
        self.port4 = l4.getsockname()[1]
        listeners.append((l4, 4))
        l6 = None
        try:  # hosts without IPv6 loopback: IPv6-only sockets then cannot be proxied
            l6 = trio.socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            l6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            _set_rcvbuf(l6, PADDING_RCVBUF)
            await l6.bind(("::1", 0))
            l6.listen(512)
            self.port6 = l6.getsockname()[1]
            listeners.append((l6, 6))
        except OSError:
            self.port6 = 0
            if l6 is not None:
                l6.close()
        udp: List[socket.socket] = []
        for fam, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            try:
                u = socket.socket(fam, socket.SOCK_DGRAM)
            except OSError:
                continue
            try:
                if fam == socket.AF_INET6:
                    u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                u.bind((host, 0))
                u.setblocking(False)
            except OSError:
                u.close()
                continue
            udp.append(u)
            if fam == socket.AF_INET:
                self.dns_port4 = u.getsockname()[1]
            else:
                self.dns_port6 = u.getsockname()[1]
        ctl = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            await ctl.bind(self.ctl_path)
        finally:
            os.umask(old)
        ctl.listen(512)
        try:
            async with trio.open_nursery() as n:
                self._nursery = n
                for sock, tag in listeners:
                    n.start_soon(self._accept_loop, sock, tag, n)
                n.start_soon(self._ctl_loop, ctl, n)
                n.start_soon(self.trim.run)
                for u in udp:
                    n.start_soon(self._dns_loop, u, n)
                task_status.started()
        finally:
            for sock, _ in listeners:
                sock.close()
            for u in udp:
                u.close()
            ctl.close()
            try:
                os.unlink(self.ctl_path)
            except OSError:
                pass

    # ------------------------------------------------------------------ routing

    def _route(self, host: str) -> Tuple[str, str]:
        """("upstream"|"direct", what to dial) for a requested host (IP literal or name)."""
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return "upstream", host
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if self.fakes.is_fake(str(ip)):
            name = self.fakes.name_for(str(ip))
            if name is None:
                raise DialError(errno.EHOSTUNREACH, f"{ip}: unknown fake IP (stale cache?)")
            return "upstream", name
        if ip.is_loopback or any(ip in net for net in self.direct):
            return "direct", str(ip)
        return "upstream", str(ip)

    async def _dial(self, host: str, port: int) -> trio.abc.Stream:
        how, target = self._route(host)
        up = self.direct_up if how == "direct" else self.pool
        with trio.move_on_after(self.connect_timeout + 1.0):
            try:
                return await up.dial_tcp(target, port, timeout=self.connect_timeout)
            except DialError:
                raise
            except OSError as exc:
                raise DialError(exc.errno or errno.ECONNABORTED, str(exc)) from None
        raise DialError(errno.ETIMEDOUT, f"{target}:{port}: no answer in time")

    def _count_failure(self, exc: DialError) -> None:
        self.stats.failed += 1
        self.stats.by_reason[exc.reason] = self.stats.by_reason.get(exc.reason, 0) + 1

    # ------------------------------------------------------------------ TCP side

    async def _accept_loop(self, listener, tag: int, nursery: trio.Nursery) -> None:
        await accept_forever(listener, "front accept",
                             lambda sock, addr: nursery.start_soon(self._handle_tcp, sock,
                                                                   (tag, addr[1])),
                             shed=self._unclaimed.shed)

    async def _peek(self, sock, n: int, deadline: float) -> bytes:
        """The first n bytes without consuming them (they stay in the kernel's buffer, so a
        non-blocking client's receive window stays full)."""
        while True:
            with trio.move_on_at(deadline):
                data = await sock.recv(n, socket.MSG_PEEK)
                if len(data) >= n or not data:
                    return data
                await trio.sleep(0.002)  # readable but short: more is on its way
                continue
            return b""

    async def _handle_tcp(self, sock, key: Key) -> None:
        deadline = trio.current_time() + CLAIM_WAIT
        # released once claimed or authenticated: no longer droppable
        waiting, release = self._unclaimed.add(sock)

        try:
            with waiting:
                first = await self._peek(sock, 1, deadline)
                if first == b"\x00":
                    await self._serve_claimed(sock, key, deadline, release)
                    return
                # Stays droppable until it authenticated: connections that stall in their
                # handshake (another user's, say) must not pile up past MAX_UNCLAIMED either.
                if first == bytes((socks.VERSION,)):
                    await self._serve_socks(sock, release)
                    return
                if first.isalpha():  # an HTTP request line: a program that read http_proxy
                    await self._serve_http(sock, release)
                    return
            if waiting.cancelled_caught:
                log.debug("front connection %s dropped: too many unclaimed", key)
                _linger_close(sock)
                return
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("front connection %s: %s", key, exc)
        finally:
            release()
        sock.close()

    async def _wait_claim(self, key: Key, token: bytes, deadline: float) -> Optional[Claim]:
        """The claim for this connection: same source port *and* the token it carries (a
        stale claim for a reused port, or someone else's guess, never matches)."""
        while True:
            claim = self._claims.get(key)
            if claim is not None and hmac.compare_digest(claim.token, token):
                del self._claims[key]
                return claim
            ev = self._claim_events[key] = trio.Event()
            try:
                with trio.move_on_at(deadline) as scope:
                    await ev.wait()
            finally:  # also when dropped (MAX_UNCLAIMED)
                if self._claim_events.get(key) is ev:
                    del self._claim_events[key]
            if scope.cancelled_caught:
                return None

    async def _serve_claimed(self, sock, key: Key, deadline: float,
                             claimed: Callable[[], None]) -> None:
        token = await self._peek(sock, TOKEN_LEN, deadline)
        claim = await self._wait_claim(key, token, deadline) if len(token) == TOKEN_LEN else None
        claimed()
        if claim is None:
            log.info("front: unclaimed connection from port %s dropped", key[1])
            _linger_close(sock)
            return
        self._peers[key] = (claim.host, claim.port)
        self.stats.flows += 1
        offer: Optional[Offer] = None
        try:
            family = WANT_FAMILY.set(claim.family)
            try:
                upstream = await self._dial(claim.host, claim.port)
            except DialError as exc:
                self._count_failure(exc)
                log.info("connect %s port %s failed: %s", claim.host, claim.port, exc)
                await self._answer(claim, exc.errno or errno.ECONNABORTED)
                _linger_close(sock)
                return
            finally:
                WANT_FAMILY.reset(family)
            if claim.padding is None:  # its `L`/`W` line is on its way (protocol 2)
                with trio.move_on_at(deadline):
                    await claim.padding_known.wait()
            if claim.padding is None or claim.padding < 0:  # the shim gave up half-way
                await upstream.aclose()
                await self._answer(claim, errno.ECONNABORTED)
                _linger_close(sock)
                return
            if claim.handoff and claim.answer is not None and _can_hand_over(upstream, claim):
                answer, claim.answer = claim.answer, None
                await self._hand_over(answer, upstream, sock)
                return
            if (claim.proto2 and not claim.blocking and _SPLICE is not None
                    and _can_hand_over(upstream, claim)):
                # protocol 2: the program may ask for the socket (`G`) as soon as its own turns
                # writable, which can be before the padding is all read here. Only for the
                # splice relay, which knows about offers.
                offer = self._offers[claim.id] = Offer(upstream.socket.fileno())
            await self._answer(claim, 0)
            self.stats.padding_max = max(self.stats.padding_max, claim.padding)
            _set_rcvbuf(sock, SERVED_RCVBUF)  # open the window wide: the padding drains at once
            left = claim.padding
            try:
                while left > 0:
                    data = await sock.recv(min(left, RELAY_CHUNK))
                    if not data:
                        break
                    left -= len(data)
            except OSError:
                pass
            if offer is not None and offer.handed:  # taken before the relay began
                await upstream.aclose()
                _reset_on_close(sock)
                sock.close()
                return
            if left > 0:  # the program went away before its connection stood
                await upstream.aclose()
                sock.close()
                return
            await self._relay(trio.SocketStream(sock), upstream, offer)
        finally:
            self._peers.pop(key, None)
            if offer is not None:
                self._offers.pop(claim.id, None)

    async def _hand_over(self, answer: trio.SocketStream, upstream: trio.SocketStream,
                         client) -> None:
        """`R 0` with the upstream socket on the control connection, then let go of both
        ends: a plain close of our copy, and a reset for the program's old socket, so that a
        program that did not get the new one (out of fds) sees an error, never an empty EOF."""
        with trio.CancelScope(shield=True):
            try:
                _send_socket_now(answer, b"R 0\n", upstream.socket.fileno())
                self.stats.handed += 1
            except OSError as exc:  # the shim gave up waiting: it reports the failure
                log.debug("handing a socket over failed: %s", exc)
            finally:
                await upstream.aclose()
                _reset_on_close(client)
                client.close()
                await answer.aclose()

    async def _expire_claim(self, claim: Claim) -> None:
        """A claim whose connection never shows up (the program died in between)."""
        await trio.sleep(CLAIM_WAIT)
        if self._claims.get(claim.key) is claim:
            del self._claims[claim.key]
            await self._answer(claim, errno.ECONNABORTED)

    async def _answer(self, claim: Claim, err: int) -> None:
        self._pending.pop(claim.id, None)
        if claim.answer is not None:
            answer, claim.answer = claim.answer, None
            try:
                await answer.send_all(f"R {err}\n".encode())
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            await answer.aclose()
        if claim.blocking and claim.padding is not None:
            return
        # non-blocking, or a protocol-2 claim whose `W` may still come
        self._verdicts[claim.id] = err
        while len(self._verdicts) > VERDICTS_KEPT:
            self._verdicts.popitem(last=False)

    async def _serve_socks(self, sock, authenticated: Callable[[], None]) -> None:
        stream = trio.SocketStream(sock)
        hs = socks.ServerHandshake(
            credentials=(self.username, self.secret), commands=(socks.CMD_CONNECT,)
        )
        with trio.move_on_after(HANDSHAKE_TIMEOUT) as scope:
            while hs.request is None:
                data = await stream.receive_some(4096)
                if not data:
                    await stream.aclose()
                    return
                try:
                    hs.receive_data(data)
                except socks.SocksError as exc:
                    out = hs.data_to_send()
                    if out:
                        await stream.send_all(out)
                    log.info("front: SOCKS client rejected: %s", exc)
                    await stream.aclose()
                    return
                out = hs.data_to_send()
                if out:
                    await stream.send_all(out)
        if scope.cancelled_caught or hs.request is None:
            await stream.aclose()
            return
        authenticated()
        await self._dial_and_relay(
            stream, hs.request.host, hs.request.port,
            ok=socks.ServerHandshake.reply(socks.REP_SUCCEEDED),
            failed=lambda exc: socks.ServerHandshake.reply(socks.errno_reply(exc.errno)),
            first_up=hs.leftover)

    async def _serve_http(self, sock, authenticated: Callable[[], None]) -> None:
        """An HTTP proxy client (http_proxy/https_proxy): CONNECT, or one absolute-form
        request (see nsvpn.httpproxy). Served when it carries our credentials or, since
        HTTP clients may send none, when its socket belongs to our uid (sockdiag)."""
        stream = trio.SocketStream(sock)
        buf = b""
        try:
            with trio.move_on_after(HANDSHAKE_TIMEOUT):
                while True:
                    end = httpproxy.head_end(buf)
                    if end is not None:
                        break
                    data = await stream.receive_some(4096)
                    if not data:
                        break
                    buf += data
            if end is None:
                await stream.aclose()
                return
            req = httpproxy.parse_request(buf[:end], (self.username, self.secret))
            if not req.authorized and not sockdiag.peer_is_ours(sock):
                raise httpproxy.HttpProxyError(407, "credentials required")
            authenticated()
        except httpproxy.HttpProxyError as exc:
            log.info("front: HTTP proxy client rejected: %s", exc)
            with trio.move_on_after(1.0):
                await stream.send_all(exc.response())
            await stream.aclose()
            return
        await self._dial_and_relay(
            stream, req.host, req.port,
            ok=httpproxy.response(200) if req.tunnel else b"",
            failed=lambda exc: httpproxy.dial_failure(exc.errno, str(exc.message or exc)),
            first_up=req.head + buf[end:])

    async def _dial_and_relay(self, stream: trio.SocketStream, host: str, port: int, *,
                              ok: bytes, failed: Callable[[DialError], bytes],
                              first_up: bytes) -> None:
        """A proxy client asked for host:port: dial it, answer `ok` (or `failed(error)` and
        close), send on what the client already sent past its request, then relay."""
        self.stats.flows += 1
        try:
            upstream = await self._dial(host, port)
        except DialError as exc:
            self._count_failure(exc)
            await stream.send_all(failed(exc))
            await stream.aclose()
            return
        try:
            if ok:
                await stream.send_all(ok)
            _set_rcvbuf(stream.socket, SERVED_RCVBUF)
            if first_up:
                await upstream.send_all(first_up)
                self.stats.bytes_up += len(first_up)
        except BaseException:
            with trio.CancelScope(shield=True):
                await upstream.aclose()
            raise
        await self._relay(stream, upstream)

    async def _relay(self, client: trio.abc.Stream, upstream: trio.abc.Stream,
                     offer: Optional[Offer] = None) -> None:
        """Relay until both sides ended. `offer`: the program may still take the upstream
        socket over (`G`) until the first byte moved."""
        if _SPLICE is not None and isinstance(client, trio.SocketStream):
            # a socket underneath (TCP proxy, ssh's channel socket, a direct connection):
            # unwrap it so the kernel moves the bytes
            parts = detach_socket(upstream)
            if parts is not None:
                sock, prefix, eof_breaks = parts
                up = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
                if prefix:
                    try:
                        await client.send_all(prefix)
                    except (trio.BrokenResourceError, OSError):
                        await _close_pair(client, up, False)
                        return
                    self.stats.bytes_down += len(prefix)
                await self._relay_spliced(client, up, eof_breaks, offer)
                return
        await self._relay_copy(client, upstream)

    async def _relay_spliced(self, client: trio.SocketStream, upstream: trio.SocketStream,
                             eof_breaks: Optional[Callable[..., bool]] = None,
                             offer: Optional[Offer] = None) -> None:
        """Socket -> pipe -> socket with splice(2): the bytes never enter Python (several
        times less CPU than copying, which matters on a busy 2-core node). `eof_breaks`:
        tells whether an EOF from the upstream means it broke (ssh died). `offer`: once it
        is handed over, neither pump touches a socket again (a pump woken just before must
        not read what is now the program's)."""
        self.stats.active += 1

        broken = [False]  # the upstream failed: the program must see a reset, not an EOF
        up_shut = [False]  # we sent the upstream our EOF

        async def pump(src, dst, up: bool, cancel: trio.CancelScope) -> None:
            r = w = -1  # the pipe, made when the first bytes come (idle flows hold no pipe)
            copying = False  # no pipe to be had (out of fds): bytes go through Python
            try:
                while True:
                    if r < 0 and not copying:
                        await trio.lowlevel.wait_readable(src)
                        if offer is not None and offer.handed:
                            return
                        try:
                            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
                        except OSError:  # EMFILE/ENFILE: this flow still works, slower
                            copying = True
                        else:
                            try:
                                fcntl.fcntl(w, _F_SETPIPE_SZ, RELAY_CHUNK)
                            except OSError:
                                pass
                    try:
                        if copying:
                            data = os.read(src.fileno(), RELAY_CHUNK)
                            n = len(data)
                        else:
                            n = _SPLICE(src.fileno(), w, RELAY_CHUNK, flags=_SPLICE_FLAGS)
                    except BlockingIOError:
                        await trio.lowlevel.wait_readable(src)
                        if offer is not None and offer.handed:
                            return
                        continue
                    except OSError:
                        broken[0] = broken[0] or not up  # reading the upstream failed
                        raise
                    if offer is not None:
                        offer.moved = True  # bytes or an EOF went through: ours for good
                    if n == 0:
                        if not up and eof_breaks is not None and eof_breaks(src, up_shut[0]):
                            broken[0] = True
                            cancel.cancel()
                            return
                        break
                    if up:
                        self.stats.bytes_up += n
                    else:
                        self.stats.bytes_down += n
                    view = memoryview(data) if copying else None
                    while n:
                        try:
                            if view is not None:
                                k = os.write(dst.fileno(), view)
                                view = view[k:]
                                n -= k
                            else:
                                n -= _SPLICE(r, dst.fileno(), n, flags=_SPLICE_FLAGS)
                        except BlockingIOError:
                            await trio.lowlevel.wait_writable(dst)
                        except OSError:
                            broken[0] = broken[0] or up  # writing to the upstream failed
                            raise
                try:
                    dst.shutdown(socket.SHUT_WR)
                    up_shut[0] = up_shut[0] or up
                except OSError:
                    cancel.cancel()
            except OSError:
                cancel.cancel()
            finally:
                if r >= 0:
                    os.close(r)
                    os.close(w)

        try:
            async with trio.open_nursery() as n:
                if offer is not None:
                    offer.scope = n.cancel_scope
                n.start_soon(pump, client.socket, upstream.socket, True, n.cancel_scope)
                n.start_soon(pump, upstream.socket, client.socket, False, n.cancel_scope)
        finally:
            self.stats.active -= 1
            self.trim.flow_ended()
            if offer is not None and offer.handed:
                # the program owns the upstream socket now: the front only drops its copies
                # (a plain close, no shutdown), and resets the program's old socket
                _reset_on_close(client.socket)
            await _close_pair(client, upstream, broken[0])

    async def _relay_copy(self, client: trio.abc.Stream, upstream: trio.abc.Stream) -> None:
        self.stats.active += 1

        broken = [False]

        async def pump(src, dst, up: bool, cancel: trio.CancelScope) -> None:
            try:
                while True:
                    try:
                        data = await src.receive_some(RELAY_CHUNK)
                    except (trio.BrokenResourceError, OSError):
                        # upstream gone (ssh died, the VPN went down): the program gets a
                        # reset, so a cut-short transfer never looks complete
                        broken[0] = broken[0] or not up
                        raise
                    if not data:
                        break
                    try:
                        await dst.send_all(data)
                    except (trio.BrokenResourceError, OSError):
                        broken[0] = broken[0] or up
                        raise
                    if up:
                        self.stats.bytes_up += len(data)
                    else:
                        self.stats.bytes_down += len(data)
                try:
                    await dst.send_eof()
                except (AttributeError, trio.BrokenResourceError, trio.ClosedResourceError,
                        OSError):
                    cancel.cancel()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                cancel.cancel()

        try:
            async with trio.open_nursery() as n:
                n.start_soon(pump, client, upstream, True, n.cancel_scope)
                n.start_soon(pump, upstream, client, False, n.cancel_scope)
        finally:
            self.stats.active -= 1
            self.trim.flow_ended()
            await _close_pair(client, upstream, broken[0])

    # ------------------------------------------------------------------ DNS over UDP

    async def _dns_loop(self, sock: socket.socket, nursery: trio.Nursery) -> None:
        """Queries the shim redirected here (UDP to port 53 of a tunnelled address: dig,
        c-ares, Go's resolver): answered like the namespace's DNS (host resolver first, then
        a fake IP or --dns-server), from the same fake-IP table the resolver hooks use."""
        replies = _UdpReplies(sock)
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                data, src = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                continue
            if not _udp_port_is_ours(src[1]):
                # UDP carries no credentials: other users' queries would use our tunnel
                # (and fill our fake-IP table), so the kernel's socket table decides
                self.stats.by_reason["dns-foreign"] = self.stats.by_reason.get(
                    "dns-foreign", 0) + 1
                continue
            nursery.start_soon(self.dns.serve_udp, replies, src, None, data)

    # ------------------------------------------------------------------ control channel

    async def _ctl_loop(self, listener, nursery: trio.Nursery) -> None:
        # out of fds for a control request: unclaimed connections hold them (see DropOldest)
        await accept_forever(listener, "front control accept",
                             lambda sock, _: nursery.start_soon(self._handle_ctl,
                                                                trio.SocketStream(sock)),
                             shed=self._unclaimed.shed)

    async def _handle_ctl(self, stream: trio.SocketStream) -> None:
        keep = False
        try:
            buf = b""
            with trio.move_on_after(HANDSHAKE_TIMEOUT):
                buf = await _read_line(stream, buf)
            first, _, buf = buf.partition(b"\n")
            line = first.decode("ascii", "replace").split()
            if not line:
                return
            answer, keep = await self._ctl_request(line, stream)
            if answer is not None:
                await stream.send_all(answer.encode() + b"\n")
            if isinstance(keep, Claim):  # protocol 2: the padding's length comes next
                claim, keep = keep, False
                try:
                    with trio.move_on_after(HANDSHAKE_TIMEOUT):
                        buf = await _read_line(stream, buf)
                finally:  # also when cancelled: the dial must not wait for it
                    # only a whole line: a cut one could name a shorter padding
                    line2 = buf.partition(b"\n")[0] if b"\n" in buf else b""
                    keep = self._padding_line(claim, line2, stream)
                if keep and claim.id in self._verdicts:  # `W` after the dial failed
                    await self._answer(claim, self._verdicts[claim.id])
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ValueError) as exc:
            log.debug("front control request failed: %s", exc)
        finally:
            if not keep:
                await stream.aclose()

    def _padding_line(self, claim: Claim, line: bytes, stream: trio.SocketStream) -> bool:
        """`L <padding>` or `W <padding>` (then the verdict goes to `stream`: True is
        returned, keep it open). Anything else, or nothing, abandons the claim."""
        words = line.split()
        pad = -1
        if len(words) == 2 and words[0] in (b"L", b"W") and words[1].isdigit():
            pad = int(words[1])
        claim.padding = pad
        claim.padding_known.set()
        if pad >= 0 and words[0] == b"W":
            claim.blocking = True
            claim.answer = stream
            return True
        return False

    async def _ctl_request(self, words: List[str], stream
                           ) -> Tuple[Optional[str], Union[bool, Claim]]:
        """(answer line or None, keep the connection: True, or a protocol-2 claim whose
        padding line follows on it)."""
        op = words[0]
        if op == "C" and len(words) == 8:
            mode, listener, lport, pad, tok, host, port = words[1:]
            token = bytes.fromhex(tok)
            if mode not in ("a", "b", "h", "A", "H") or len(token) != TOKEN_LEN:
                return "E", False
            later = mode in ("a", "A") and pad == "-"  # protocol 2: see the module docstring
            key = (int(listener), int(lport))
            claim = Claim(tok.lower() if later else str(self._next_id), mode not in ("a", "A"),
                          key, None if later else int(pad), token, host, int(port),
                          handoff=mode in ("h", "H"), proto2=later,
                          family=socket.AF_INET6 if mode in ("A", "H") else socket.AF_INET)
            self._next_id += 1
            log.debug("claim %s (%s) from port %s: %s port %s, padding %s", claim.id, mode,
                      lport, host, port, pad)
            if claim.blocking:
                claim.answer = stream
            else:
                self._pending[claim.id] = claim
            old = self._claims.get(key)
            if old is not None and self._nursery is not None:
                self._nursery.start_soon(self._answer, old, errno.ECONNABORTED)
            self._claims[key] = claim
            ev = self._claim_events.get(key)
            if ev is not None:
                ev.set()
            if self._nursery is not None:
                self._nursery.start_soon(self._expire_claim, claim)
            if claim.blocking:
                return None, True
            if later:
                return None, claim
            return f"K {claim.id}", False
        if op == "G" and len(words) == 2:
            offer = self._offers.get(words[1].lower())
            if offer is None or offer.moved or offer.handed:
                return "N", False
            try:  # no await from the check to the send: a pump cannot move a byte between
                _send_socket_now(stream, b"H\n", offer.fd)
            except OSError as exc:  # the shim stopped waiting (it shut its side): relay on
                log.debug("handing a socket over failed: %s", exc)
                return None, False
            offer.handed = True  # from here on the relay's pumps keep their hands off
            self.stats.handed += 1
            if offer.scope is not None:  # else the relay never starts (see _serve_claimed)
                offer.scope.cancel()
            return None, False
        if op == "S" and len(words) == 2:
            cid = words[1].lower()
            if cid in self._verdicts:
                return f"R {self._verdicts[cid]}", False
            return ("P" if cid in self._pending else "R 0"), False
        if op == "F" and len(words) == 2:
            ip = await self._address_for(words[1])
            return (f"A {ip}" if ip else "E"), False
        if op == "V" and len(words) == 2:
            try:
                ip = str(ipaddress.ip_address(words[1]))
            except ValueError:
                return "E", False
            if self.fakes.is_fake(ip):  # one the table does not know (`N` said so)
                return "X nxdomain", False
            r = await self.dns.reverse(ip)
            if r.status == "ok" and r.names:
                return f"H {r.names[0].rstrip('.')}", False
            return ("X again" if r.status in ("timeout", "error") else "X nxdomain"), False
        if op == "K" and len(words) == 2:
            # a name the host resolver already failed on gets its fake IP without a retry
            known = self.fakes.has_name(words[1])
            return (f"A {self.fakes.ip_for(words[1])}" if known else "U"), False
        if op == "N" and len(words) == 2:
            name = self.fakes.name_for(words[1])
            return (f"H {name}" if name else "E"), False
        if op == "P" and len(words) == 3:
            peer = self._peers.get((int(words[1]), int(words[2])))
            return (f"D {peer[0]} {peer[1]}" if peer else "E"), False
        return "E", False

    async def _address_for(self, name: str) -> Optional[str]:
        if self.dns_server is not None:
            ip = await self._ask_dns_server(name)
            if ip is not None:
                return ip
        try:
            return self.fakes.ip_for(name)
        except ValueError:
            return None

    async def _ask_dns_server(self, name: str) -> Optional[str]:
        import dns.message
        import dns.rdatatype

        assert self.dns_server is not None
        try:
            query = dns.message.make_query(name, dns.rdatatype.A)
        except Exception:  # dnspython raises several kinds for bad names
            return None

        async def dial(host: str, port: int, timeout: float) -> trio.abc.Stream:
            return await self._dial(host, port)

        wire = await relay_tcp(dial, self.dns_server, query.to_wire())
        if wire is None:
            return None
        try:
            msg = dns.message.from_wire(wire)
        except Exception:
            return None
        for rrset in msg.answer:
            if rrset.rdtype == dns.rdatatype.A:
                for rd in rrset:
                    return rd.address
        return None
