"""Namespace mode with an openconnect upstream: an IP packet bridge TUN <-> VPNFD.

CMD runs in its own user+net+mount namespace whose TUN device carries the VPN's own address,
the MTU the server pushed (INTERNAL_IP4_MTU), routes from the split-include list (a default
route when there is none) and a resolv.conf with the pushed DNS servers and default domain.
Kernel TCP/UDP/ICMP run inside the namespace, so every protocol works; nsvpn only copies
datagrams: each TUN read is one IP packet, each VPNFD datagram one IP packet, no header.

The copy loops drain up to BATCH packets per wake-up through one preallocated 64 KiB buffer
per direction (no allocation per packet), then yield to trio. Measured on the lab (2 cores):
~6 packets per wake-up on downloads, ~10 us of nsvpn CPU per packet (mostly the TUN write,
which runs the namespace's receive path); throughput equals vpnns' (openconnect/ocserv and
DTLS receive-buffer drops bound both). A dedicated VPN->TUN reader thread was tried and was no
faster. While openconnect restarts,
packets from CMD are dropped (TCP inside retransmits) and VPN->TUN resumes on the new VPNFD.
If the upstream fails for good (e.g. the server changed our address), CMD gets SIGTERM
(SIGKILL 5 s later) and nsvpn ends with the reason.

Networks kept out of the tunnel: the VPN's split-exclude list and the host's own connected
networks (a site's file servers and squids stay local and fast; the VPN gateway's own subnet is
among them). The namespace routes them to the TUN as well; the TUN reader looks at each
packet's destination and hands those packets to a userspace stack + relay (relay.py, as in
ssh mode) that re-originates TCP/UDP with host sockets, instead of writing them to VPNFD.
ICMP echo to those networks is not carried (no raw sockets without privileges).

`python -m nsvpn.bridge [OPTIONS] openconnect://user@host -- CMD...` runs this stand-alone.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import os
import resource
import signal
import sys
from typing import Dict, List, Sequence

import trio

from . import namespace
from .upstream.base import UpstreamError
from .upstream.openconnect import OpenconnectUpstream, VpnSession
from .vpnenv import VpnEnv

log = logging.getLogger("nsvpn.bridge")

BUF_SIZE = 65536
BATCH = 64  # packets per wake-up before letting other tasks run
KILL_AFTER = 5.0
EXIT_UPSTREAM = 3  # same meaning as in cli.py
EXIT_SETUP = 4


class BridgeStats:
    def __init__(self) -> None:
        self.to_vpn_pkts = 0
        self.to_vpn_bytes = 0
        self.to_tun_pkts = 0
        self.to_tun_bytes = 0
        self.dropped = 0
        self.to_direct_pkts = 0  # packets handed to the relay for excluded networks
        self.tun_waits = 0  # times a reader found nothing and went to sleep
        self.vpn_waits = 0

    def __str__(self) -> str:
        return (f"to VPN {self.to_vpn_pkts} pkts/{self.to_vpn_bytes} B, to TUN "
                f"{self.to_tun_pkts} pkts/{self.to_tun_bytes} B, dropped {self.dropped}, "
                f"direct {self.to_direct_pkts} pkts, "
                f"waits TUN {self.tun_waits} VPN {self.vpn_waits}")


def _err(msg: str) -> None:
    sys.stderr.write(f"nsvpn: {msg}\n")
    sys.stderr.flush()


def netns_spec(env: VpnEnv, *, ipv6: bool = False,
               direct_nets: Sequence[str] = ()) -> namespace.NetnsSpec:
    """The namespace as the VPN server described it, plus routes for the networks the relay
    serves (direct_nets). Routes are on-link via the TUN."""
    use6 = ipv6 and env.address6 is not None
    spec = namespace.NetnsSpec(
        addr=env.address4,
        prefixlen=env.prefixlen4,
        gateway=None,
        dns=env.nameservers(use6),
        search=list(env.default_domains),
        mtu=env.link_mtu(),
        routes=env.routes4() + [n for n in direct_nets if n not in env.routes4()]
        + (env.routes6() if use6 else []),
        ipv6=use6,
        resolv_conf=env.resolv_conf(use6),
    )
    if use6:
        spec.addr6 = env.address6 or ""
        spec.prefixlen6 = env.prefixlen6 or 128
        spec.gateway6 = None
    return spec


async def _send(sess: VpnSession, data: memoryview) -> bool:
    """One packet to openconnect; waits while its queue is full. False: session gone."""
    while True:
        try:
            sess.sock.send(data)
            return True
        except BlockingIOError:
            try:
                await trio.lowlevel.wait_writable(sess.sock)
            except (trio.ClosedResourceError, OSError):
                return False
        except OSError:
            return False


class DirectMatcher:
    """Does a packet's destination belong to the networks kept out of the tunnel? Longest
    prefix wins, as in a routing table: a split-include route more specific than a host
    network (say 10.20.0.0/16 pushed by the VPN inside a 10.0.0.0/8 LAN) keeps its traffic
    in the VPN; on a tie the directly connected network wins. IPv4 only. Cached per
    destination, so the per-packet cost is one slice and one dict lookup."""

    def __init__(self, nets: Sequence[str], vpn_routes: Sequence[str] = ()) -> None:
        self.nets = [ipaddress.ip_network(n, strict=False) for n in nets]
        self.nets4 = [(int(n.network_address), int(n.netmask), n.prefixlen) for n in self.nets
                      if n.version == 4]
        self.vpn4 = [(int(n.network_address), int(n.netmask), n.prefixlen)
                     for n in (ipaddress.ip_network(r, strict=False) for r in vpn_routes)
                     if n.version == 4]
        self._cache: Dict[bytes, bool] = {}

    def __bool__(self) -> bool:
        return bool(self.nets4)

    @staticmethod
    def _best(a: int, table) -> int:
        return max((plen for net, mask, plen in table if a & mask == net), default=-1)

    def match(self, pkt) -> bool:
        if len(pkt) < 20 or pkt[0] >> 4 != 4:
            return False
        dst = bytes(pkt[16:20])
        hit = self._cache.get(dst)
        if hit is None:
            a = int.from_bytes(dst, "big")
            d = self._best(a, self.nets4)
            hit = d >= 0 and d >= self._best(a, self.vpn4)
            if len(self._cache) > 65536:
                self._cache.clear()
            self._cache[dst] = hit
        return hit


def direct_networks(env: VpnEnv, extra: Sequence[str] = (), *, host: bool = True) -> List[str]:
    """Split-exclude networks + the host's own networks (+ extra), minus any overlapping the
    VPN's own address network (those belong to the tunnel)."""
    nets: List[str] = list(env.split_exc4) + list(extra)
    if host:
        from .upstream.direct import host_networks

        try:
            nets += [str(n) for n in host_networks()]
        except Exception as e:  # netlink refused: everything goes into the tunnel
            log.warning("cannot list the host's networks: %s", e)
    own = env.network4
    out: List[str] = []
    for n in nets:
        net = ipaddress.ip_network(n, strict=False)
        if net.version == 4 and net.overlaps(own):
            continue
        if str(net) not in out:
            out.append(str(net))
    return out


def make_direct_relay(tun_fd: int, env: VpnEnv, nets: Sequence[str]):
    """The userspace stack + relay that serves the excluded networks with host sockets."""
    from . import routing
    from .netstack.stack import Stack, StackConfig
    from .relay import Relay
    from .upstream.base import DialError
    from .upstream.direct import DirectUpstream

    cfg = StackConfig(net="0.0.0.0/0", gateway="", dns="", gateway6="", dns6="",
                      mtu=env.link_mtu())
    router = routing.Router(namespace_net=f"{env.address4}/32", gateway="", dns="",
                            direct=nets)
    direct = DirectUpstream()

    async def dial_direct(host: str, port: int, timeout: float):
        return await direct.dial_tcp(host, port, timeout=timeout)

    async def dial_upstream(host: str, port: int, timeout: float):
        # only excluded destinations are fed to this relay
        raise DialError(errno.ENETUNREACH, f"{host}: not an excluded network")

    return Relay(tun_fd, Stack(cfg), router, dial_upstream=dial_upstream,
                 dial_direct=dial_direct, read_tun=False)


async def tun_to_vpn(tun_fd: int, oc: OpenconnectUpstream, stats: BridgeStats,
                     direct=None, matcher: DirectMatcher | None = None) -> None:
    buf = bytearray(BUF_SIZE)
    mv = memoryview(buf)
    readv = os.readv
    fed = False
    while True:
        for _ in range(BATCH):
            try:
                n = readv(tun_fd, [buf])
            except BlockingIOError:
                stats.tun_waits += 1
                if fed:
                    direct.flush()
                    fed = False
                await trio.lowlevel.wait_readable(tun_fd)
                break
            if matcher and matcher.match(mv[:n]):
                direct.feed(mv[:n], trio.current_time())
                fed = True
                stats.to_direct_pkts += 1
                continue
            sess = oc.session
            if sess is None or sess.lost.is_set() or not await _send(sess, mv[:n]):
                stats.dropped += 1
                continue
            stats.to_vpn_pkts += 1
            stats.to_vpn_bytes += n
        else:
            if fed:
                direct.flush()
                fed = False
            await trio.lowlevel.checkpoint()


async def _vpn_session_to_tun(sess: VpnSession, tun_fd: int, stats: BridgeStats) -> None:
    buf = bytearray(BUF_SIZE)
    mv = memoryview(buf)
    recv_into = sess.sock.recv_into
    write = os.write
    while True:
        for _ in range(BATCH):
            try:
                n = recv_into(buf)
            except BlockingIOError:
                stats.vpn_waits += 1
                await trio.lowlevel.wait_readable(sess.sock)
                break
            if n == 0:
                continue  # a 0-byte datagram carries no packet
            try:
                write(tun_fd, mv[:n])
            except BlockingIOError:
                stats.dropped += 1
                continue
            except OSError as e:  # e.g. EINVAL for a malformed packet: drop it, keep going
                log.debug("TUN write: %s", e)
                stats.dropped += 1
                continue
            stats.to_tun_pkts += 1
            stats.to_tun_bytes += n
        else:
            await trio.lowlevel.checkpoint()


async def vpn_to_tun(tun_fd: int, oc: OpenconnectUpstream, stats: BridgeStats) -> None:
    """Follow openconnect's sessions (a restart brings a new VPNFD) until it fails for good."""
    gen = 0
    while True:
        try:
            sess = await oc.wait_session(gen)
        except UpstreamError:
            return
        gen = sess.generation
        try:
            await _vpn_session_to_tun(sess, tun_fd, stats)
        except (trio.ClosedResourceError, OSError) as e:
            log.debug("VPNFD generation %d ended: %s", gen, e)


async def bridge(child: namespace.NamespaceChild, oc: OpenconnectUpstream,
                 stats: BridgeStats | None = None, direct_nets: Sequence[str] = (),
                 ready=None) -> int:
    """Copy packets until CMD exits; CMD's status (or EXIT_UPSTREAM if the VPN failed).

    ready(child, stats, relay): an async task started next to the copy loops (named tunnels:
    CMD is a holder process and ready serves the control socket; relay may be None)."""
    stats = stats or BridgeStats()
    failed: List[str] = []

    async def watch_fatal() -> None:
        msg = await oc.wait_fatal()
        failed.append(msg)
        _err(msg)
        child.signal(signal.SIGTERM)
        await trio.sleep(KILL_AFTER)
        child.signal(signal.SIGKILL)

    ns_inode = namespace.netns_inode(child.pid)
    async with trio.open_nursery() as n:
        await n.start(namespace.forward_signals, child)
        assert oc.session is not None or not direct_nets
        vpn_routes = oc.session.env.routes4() if oc.session is not None else []
        matcher = DirectMatcher(direct_nets, vpn_routes)
        relay = None
        if matcher:
            relay = make_direct_relay(child.tun_fd, oc.session.env, direct_nets)
            await n.start(relay.run)
        n.start_soon(tun_to_vpn, child.tun_fd, oc, stats, relay, matcher)
        n.start_soon(vpn_to_tun, child.tun_fd, oc, stats)
        n.start_soon(watch_fatal)
        if ready is not None:
            n.start_soon(ready, child, stats, relay)
        status = await child.wait()
        await namespace.end_leftovers(ns_inode)  # nothing keeps running after nsvpn
        n.cancel_scope.cancel()
    child.close()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    log.info("bridge: %s; nsvpn CPU %.2f s user %.2f s sys", stats, ru.ru_utime, ru.ru_stime)
    if failed:  # CMD was ended by us, its status would only say "SIGTERM"
        return EXIT_UPSTREAM
    return status


async def run_vpn_ns(argv: Sequence[str], oc: OpenconnectUpstream, *, quiet: bool = False,
                     ipv6: bool = False, env: Dict[str, str] | None = None,
                     cwd: str | None = None, direct: Sequence[str] = (),
                     host_direct: bool = True, ready=None) -> int:
    """Bring openconnect up, run CMD in a namespace bridged to the VPN, return CMD's status.

    Failures before CMD runs are reported on stderr: EXIT_UPSTREAM (3) when the VPN cannot be
    brought up (with openconnect's own reason), EXIT_SETUP (4) or 126/127 when the namespace
    or the exec fails. openconnect is always stopped before this returns."""
    try:
        try:
            sess = oc.session if oc.session is not None else await oc.start()
        except UpstreamError as e:
            _err(f"VPN login failed: {e}")
            return EXIT_UPSTREAM
        direct_nets = direct_networks(sess.env, direct, host=host_direct)
        spec = netns_spec(sess.env, ipv6=ipv6, direct_nets=direct_nets)
        try:
            child = namespace.spawn(list(argv), spec, env=env, cwd=cwd)
        except namespace.SpawnError as e:
            _err(str(e))
            return e.exit_code if e.exit_code in (126, 127) else EXIT_SETUP
        if not quiet:
            _err(f"VPN {oc.url.host} up: {sess.env.summary()}")
        if not quiet and direct_nets:
            _err("not through the VPN (host sockets): " + ", ".join(direct_nets))
        return await bridge(child, oc, direct_nets=direct_nets, ready=ready)
    finally:
        await oc.aclose()


def main(args: Sequence[str] | None = None) -> int:
    """Stand-alone entry until cli.py wires `--via openconnect://`: see the module doc."""
    from .upstream.openconnect import add_openconnect_args, upstream_from_args
    from .urls import OpenconnectUpstreamUrl, parse_upstream_url

    p = argparse.ArgumentParser(prog="python -m nsvpn.bridge",
                                description="run CMD in a namespace bridged to openconnect")
    p.add_argument("url", help="openconnect://[user@]host[:port]")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("--ipv6", action="store_true", help="also IPv6, when the server pushes it")
    p.add_argument("--direct", action="append", default=[], metavar="CIDR",
                   help="also keep this network out of the tunnel (host sockets)")
    p.add_argument("--no-direct", action="store_true",
                   help="the host's own networks go into the tunnel too")
    add_openconnect_args(p)
    ns = p.parse_args(args)
    cmd = ns.cmd[1:] if ns.cmd[:1] == ["--"] else ns.cmd
    if not cmd:
        p.error("no command given")
    level = logging.WARNING if ns.verbose <= 0 else logging.INFO if ns.verbose == 1 \
        else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s nsvpn %(levelname)s %(name)s: %(message)s")
    try:
        url = parse_upstream_url(ns.url)
    except ValueError as e:
        p.error(str(e))
    if not isinstance(url, OpenconnectUpstreamUrl):
        p.error(f"{ns.url}: not an openconnect:// URL")
    oc = upstream_from_args(url, ns)
    try:
        return trio.run(lambda: run_vpn_ns(cmd, oc, quiet=ns.quiet, ipv6=ns.ipv6,
                                           direct=ns.direct, host_direct=not ns.no_direct))
    except KeyboardInterrupt:  # Ctrl-C before CMD ran (at the prompt, during the login)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
