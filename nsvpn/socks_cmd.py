"""`nsvpn socks --via openconnect://...`: only the SOCKS5 front, over the VPN, no namespace.

    nsvpn socks --via openconnect://user@vpn.site [--oc-opt=...] [--passwd-file F]
                [-D [ADDR:]PORT] [-L LPORT:HOST:RPORT ...]

openconnect runs with --script-tun (no root), our userspace stack dials over its VPNFD
(upstream/vpnstack.py) and front.py serves SOCKS5 on loopback. Runs until SIGINT/SIGTERM.

Who can use it:
* SOCKS5 (-D) requires user/password authentication (RFC 1929) with a random per-session
  secret. The secret is never printed: it is written, with the rest of what a client needs,
  to files in a fresh 0700 directory under $XDG_RUNTIME_DIR (else /tmp), each 0600:
    socks.url         socks5h://nsvpn:SECRET@127.0.0.1:PORT   (curl -x "$(cat ...)", ALL_PROXY)
    proxychains.conf  a proxychains4 config with the same credentials
  The directory is printed on stderr (and stdout gets `NSVPN_SOCKS_DIR=...` for scripts).
  Other local users can connect to the port but cannot authenticate.
  Commands: CONNECT (by address or by name, resolved by the VPN's DNS) and UDP ASSOCIATE
  (its relay port accepts datagrams only from one socket of our own uid, checked in
  /proc/net/udp; datagrams for networks outside the VPN are dropped).
* -L port forwards listen on 127.0.0.1 only. Unlike `ssh -L` they check the peer: a
  connection is served only when the connecting socket belongs to our own uid (looked up in
  /proc/net/tcp{,6}, as identd does); other users' connections are closed at once.
* -D and -L accept loopback addresses only: never open to other hosts.

`run_preload_vpn()` is the same upstream behind the preload shim (`nsvpn exec --mode preload
--via openconnect://...`).

Destinations: loopback, the host's own networks (unless --no-direct), --direct CIDRs and the
VPN's split-exclude list are dialled with host sockets; everything else over the VPN. Names
are resolved by the VPN's DNS servers (through the tunnel).
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import os
import signal
import socket
import struct
import sys
from typing import List, Optional, Tuple

import trio

log = logging.getLogger("nsvpn.socks")

HANDSHAKE_TIMEOUT = 10.0
RELAY_CHUNK = 256 * 1024

EXIT_USAGE, EXIT_UPSTREAM, EXIT_SETUP = 2, 3, 4


def add_socks_parser(sub) -> argparse.ArgumentParser:
    """The `socks` subcommand (cli.py calls this with its subparsers object)."""
    p = sub.add_parser("socks", help="serve a local SOCKS5 proxy through the upstream, "
                                     "without namespaces",
                       description="Serve a local authenticated SOCKS5 proxy (and -L port "
                                   "forwards) through an openconnect VPN, no root and no "
                                   "namespaces needed.")
    p.add_argument("--via", required=True, metavar="URL",
                   help="openconnect://[user@]host[:port]")
    p.add_argument("-D", dest="dynamic", default="127.0.0.1:0", metavar="[ADDR:]PORT",
                   help="SOCKS5 listen address on loopback (default 127.0.0.1, a free port)")
    p.add_argument("-L", dest="forwards", action="append", default=[],
                   metavar="LPORT:HOST:RPORT",
                   help="forward 127.0.0.1:LPORT to HOST:RPORT through the VPN "
                        "(repeatable; only our own uid may connect)")
    p.add_argument("--direct", action="append", default=[], metavar="CIDR",
                   help="also dial this network directly with host sockets (repeatable)")
    p.add_argument("--no-direct", action="store_true",
                   help="send the host's own networks through the VPN as well")
    p.add_argument("--dir", metavar="DIR",
                   help="where to write socks.url and proxychains.conf (created 0700; "
                        "default: a fresh directory in $XDG_RUNTIME_DIR or /tmp)")
    p.add_argument("--tcp-window", type=_size, default=None, metavar="BYTES",
                   help="largest receive window of a TCP flow over the VPN, e.g. 4M "
                        "(default 8M; windows start at 160K and grow with the round-trip "
                        "time, like Linux's autotuning)")
    from .upstream.openconnect import add_openconnect_args

    add_openconnect_args(p)
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p


def _size(text: str) -> int:
    mult = {"k": 1 << 10, "m": 1 << 20}.get(text[-1:].lower(), 1)
    n = int(text[:-1] if mult > 1 else text) * mult
    if not 64 << 10 <= n <= 1 << 30:
        raise argparse.ArgumentTypeError("between 64K and 1024M")
    return n


def parse_listen(spec: str) -> Tuple[str, int]:
    """[ADDR:]PORT, [v6]:PORT -> (addr, port); only loopback addresses are accepted."""
    s = spec.strip()
    if s.startswith("["):
        host, _, rest = s[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif ":" in s:
        host, _, port = s.rpartition(":")
    else:
        host, port = "127.0.0.1", s
    if host in ("", "localhost"):
        host = "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
        num = int(port)
    except ValueError:
        raise ValueError(f"{spec}: expected [ADDR:]PORT") from None
    if not ip.is_loopback:
        raise ValueError(f"{spec}: only loopback addresses (127.0.0.1, ::1) are allowed; the "
                         "proxy must never be reachable from other hosts")
    if not 0 <= num <= 65535:
        raise ValueError(f"{spec}: bad port")
    return str(ip), num


def parse_forward(spec: str) -> Tuple[int, str, int]:
    """LPORT:HOST:RPORT (HOST may be [v6]) -> (lport, host, rport)."""
    lport, sep, rest = spec.partition(":")
    host, sep2, rport = rest.rpartition(":")
    if not sep or not sep2 or not host:
        raise ValueError(f"-L {spec}: expected LPORT:HOST:RPORT")
    try:
        lp, rp = int(lport), int(rport)
    except ValueError:
        raise ValueError(f"-L {spec}: ports must be numbers") from None
    if not (0 < lp < 65536 and 0 < rp < 65536):
        raise ValueError(f"-L {spec}: bad port")
    return lp, host.strip("[]"), rp


def _proc_hex(addr: Tuple[str, int]) -> str:
    """An endpoint as /proc/net/tcp{,6} spells it (address in host byte order words)."""
    ip = ipaddress.ip_address(addr[0])
    packed = ip.packed
    words = [packed[i:i + 4][::-1].hex().upper() for i in range(0, len(packed), 4)]
    return "".join(words) + f":{addr[1]:04X}"


def peer_uid(local: Optional[Tuple[str, int]], peer: Tuple[str, int],
             proto: str = "tcp") -> Optional[int]:
    """The uid owning the socket bound to `peer` (and connected to our `local`, when given):
    loopback, same netns, as /proc/net/{tcp,udp}{,6} list them."""
    want_local = _proc_hex(peer)
    want_remote = _proc_hex(local) if local is not None else None
    # an unconnected UDP socket that sent to loopback is listed with its wildcard address
    port = want_local.rsplit(":", 1)[1]
    wild = {"00000000:" + port, "0" * 32 + ":" + port} if proto == "udp" else set()
    for path in (f"/proc/net/{proto}", f"/proc/net/{proto}6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if (parts[1] == want_local or parts[1] in wild) and (
                            want_remote is None or parts[2] == want_remote):
                        return int(parts[7])
        except OSError:
            continue
    return None


def _peer_is_us(sock) -> bool:
    try:
        local, peer = sock.getsockname()[:2], sock.getpeername()[:2]
    except OSError:
        return False
    return peer_uid(local, peer) == os.getuid()


def write_private(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def proxychains_conf(port: int, user: str, secret: str) -> str:
    return ("# written by nsvpn socks; valid while it runs\nstrict_chain\nproxy_dns\n"
            "remote_dns_subnet 224\ntcp_read_time_out 15000\ntcp_connect_time_out 10000\n"
            f"[ProxyList]\nsocks5 127.0.0.1 {port} {user} {secret}\n")


def _make_dir(path: Optional[str]) -> str:
    if path is None:
        from .preload import _runtime_dir

        return _runtime_dir()
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ValueError(f"{path}: must be a directory of ours that only we can access "
                         "(mode 0700)")
    return path


class SocksService:
    """The front on its -D port plus -L forwards, over one upstream."""

    def __init__(self, upstream, *, listen: Tuple[str, int], forwards: List[Tuple[int, str, int]],
                 direct: List[str], rundir: str) -> None:
        from .front import DropOldest, Front

        self.upstream = upstream
        self.listen = listen
        self.forwards = forwards
        self.rundir = rundir
        # Direct networks are decided by the upstream (VpnStackUpstream.carries: longest
        # prefix against the VPN's routes), not by the front's plain membership test.
        self.front = Front(upstream, runtime_dir=rundir, direct=[])
        self._unauthenticated = DropOldest()
        self.direct = direct
        self.port = 0
        self.refused_users = 0

    @property
    def url(self) -> str:
        host = self.listen[0] if ":" not in self.listen[0] else f"[{self.listen[0]}]"
        return f"socks5h://{self.front.username}:{self.front.secret}@{host}:{self.port}"

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        fam = socket.AF_INET6 if ":" in self.listen[0] else socket.AF_INET
        lsock = trio.socket.socket(fam, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await lsock.bind(self.listen)
        lsock.listen(256)
        self.port = lsock.getsockname()[1]
        fwd_socks = []
        try:
            for lport, host, rport in self.forwards:
                s = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    await s.bind(("127.0.0.1", lport))
                except OSError as e:
                    s.close()
                    raise OSError(e.errno, f"-L {lport}: cannot listen on 127.0.0.1:{lport}: "
                                  f"{e.strerror}") from None
                s.listen(64)
                fwd_socks.append((s, host, rport))
            write_private(os.path.join(self.rundir, "socks.url"), self.url + "\n")
            write_private(os.path.join(self.rundir, "proxychains.conf"),
                          proxychains_conf(self.port, self.front.username, self.front.secret))
            async with trio.open_nursery() as n:
                await n.start(self.front.serve)
                n.start_soon(self._socks_loop, lsock, n)
                for s, host, rport in fwd_socks:
                    n.start_soon(self._forward_loop, s, host, rport, n)
                task_status.started()
        finally:
            lsock.close()
            for s, _, _ in fwd_socks:
                s.close()
            for name in ("socks.url", "proxychains.conf"):
                try:
                    os.unlink(os.path.join(self.rundir, name))
                except OSError:
                    pass

    async def _socks_loop(self, lsock, nursery: trio.Nursery) -> None:
        from .front import accept_forever

        await accept_forever(lsock, "accept",
                             lambda sock, _: nursery.start_soon(self._serve_socks, sock),
                             shed=self._unauthenticated.shed)

    async def _serve_socks(self, sock) -> None:
        """RFC 1929 authentication with the front's per-session secret, then CONNECT (the
        front's dial and relay) or UDP ASSOCIATE (here: front.py has no UDP)."""
        from . import socks
        from .upstream.base import DialError

        stream = trio.SocketStream(sock)
        hs = socks.ServerHandshake(credentials=(self.front.username, self.front.secret))
        # droppable until authenticated (see front.DropOldest)
        early, authenticated = self._unauthenticated.add(sock)
        try:
            with early, trio.move_on_after(HANDSHAKE_TIMEOUT):
                while hs.request is None:
                    data = await stream.receive_some(4096)
                    if not data:
                        break
                    try:
                        hs.receive_data(data)
                    except socks.SocksError as e:
                        await stream.send_all(hs.data_to_send())
                        log.info("SOCKS client rejected: %s", e)
                        break
                    out = hs.data_to_send()
                    if out:
                        await stream.send_all(out)
            authenticated()
            req = hs.request
            if req is None:
                await stream.aclose()
                return
            if req.command == socks.CMD_UDP_ASSOCIATE:
                await self._udp_associate(stream, sock)
                return
            try:
                up = await self.front._dial(req.host, req.port)
            except DialError as e:
                log.info("connect %s port %s failed: %s", req.host, req.port, e)
                await stream.send_all(socks.ServerHandshake.reply(socks.errno_reply(e.errno)))
                await stream.aclose()
                return
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            authenticated()
            log.debug("SOCKS connection: %s", e)
            await stream.aclose()
            return
        try:
            await stream.send_all(socks.ServerHandshake.reply(socks.REP_SUCCEEDED))
            if hs.leftover:
                await up.send_all(hs.leftover)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            with trio.CancelScope(shield=True):
                await up.aclose()
            await stream.aclose()
            return
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        except OSError:
            pass
        await self._relay(stream, up)

    async def _relay(self, client: trio.SocketStream, up) -> None:
        """Copy both ways. Flows over the VPN end like a TCP connection would: when the far
        side resets or the VPN session is lost, the client gets a RST (not a clean EOF that
        a program without a length could take for a complete transfer), and when the client
        resets, the far side does. Direct (host socket) flows use the front's relay."""
        from .upstream.vpnstack import VpnTcpStream

        if not isinstance(up, VpnTcpStream):
            await self.front._relay(client, up)
            return
        broken = []

        async def pump(src, dst, cancel: trio.CancelScope) -> None:
            errors = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
            side = src
            try:
                while True:
                    side = src
                    data = await src.receive_some(RELAY_CHUNK)
                    if not data:
                        break
                    side = dst
                    await dst.send_all(data)
                side = dst
                await dst.send_eof()
            except errors:
                broken.append(side)
                cancel.cancel()

        try:
            async with trio.open_nursery() as n:
                n.start_soon(pump, client, up, n.cancel_scope)
                n.start_soon(pump, up, client, n.cancel_scope)
        finally:
            with trio.CancelScope(shield=True):
                if up in broken:  # the far side reset, or the VPN session was lost
                    try:
                        client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                 struct.pack("ii", 1, 0))
                    except OSError:
                        pass
                if client in broken:
                    up.abort()
                for st in (client, up):
                    try:
                        await st.aclose()
                    except Exception:  # closing a broken stream may complain; it is closed
                        pass

    async def _udp_associate(self, stream: trio.SocketStream, tcp_sock) -> None:
        """SOCKS5 UDP relay (RFC 1928 section 7) over the VPN for one authenticated client.
        The relay port on loopback accepts datagrams only from one client socket: the first
        that sends from the control connection's address and belongs to our uid (checked in
        /proc/net/udp, since every local user can send to a loopback port)."""
        from . import socks

        client_ip = tcp_sock.getpeername()[0]
        fam = socket.AF_INET6 if ":" in self.listen[0] else socket.AF_INET
        u = trio.socket.socket(fam, socket.SOCK_DGRAM)
        ep = None
        try:
            await u.bind((self.listen[0], 0))
            ep = self.upstream.open_udp()
            lhost, lport = u.getsockname()[:2]
            await stream.send_all(socks.ServerHandshake.reply(socks.REP_SUCCEEDED, lhost, lport))
            client: List[Tuple[str, int]] = []

            async def from_client() -> None:
                while True:
                    data, addr = await u.recvfrom(65535)
                    addr = tuple(addr[:2])
                    if not client:
                        if addr[0] != client_ip or peer_uid(None, addr, "udp") != os.getuid():
                            self.refused_users += 1
                            log.warning("UDP relay: datagram from a foreign socket dropped")
                            continue
                        client.append(addr)
                    elif addr != client[0]:
                        continue
                    try:
                        d = socks.decode_udp(data)
                    except socks.SocksError:
                        continue
                    if d.frag:
                        continue  # fragmentation is optional (RFC 1928): drop
                    with trio.move_on_after(5):
                        try:
                            await ep.sendto(d.payload, d.host, d.port)
                        except OSError as e:
                            log.debug("UDP to %s:%s: %s", d.host, d.port, e)

            async def to_client() -> None:
                while True:
                    payload, src = await ep.recvfrom()
                    if client:
                        try:
                            u._sock.sendto(socks.encode_udp(src[0], src[1], payload), client[0])
                        except OSError:
                            pass

            async def control() -> None:
                while await stream.receive_some(4096):
                    pass  # the association lives as long as this connection

            async with trio.open_nursery() as n:
                n.start_soon(from_client)
                n.start_soon(to_client)
                await control()
                n.cancel_scope.cancel()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError,
                trio.EndOfChannel) as e:
            log.debug("UDP association ended: %s", e)
        finally:
            if ep is not None:
                ep.close()
            u.close()
            await stream.aclose()

    async def _forward_loop(self, lsock, host: str, port: int, nursery: trio.Nursery) -> None:
        from .front import accept_forever

        await accept_forever(lsock, "accept",
                             lambda sock, _: nursery.start_soon(self._forward, sock, host,
                                                                port))

    async def _forward(self, sock, host: str, port: int) -> None:
        from .upstream.base import DialError

        if not _peer_is_us(sock):  # -L has no password: the socket's owner is the check
            self.refused_users += 1
            log.warning("-L %s:%s: connection from another user refused", host, port)
            sock.close()
            return
        try:
            up = await self.front._dial(host, port)
        except DialError as e:
            log.info("-L %s:%s: %s", host, port, e)
            sock.close()
            return
        await self._relay(trio.SocketStream(sock), up)


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s nsvpn %(levelname)s %(name)s: %(message)s")


def _err(msg: str) -> None:
    sys.stderr.write(f"nsvpn: {msg}\n")
    sys.stderr.flush()


def run_socks(args: argparse.Namespace) -> int:
    _setup_logging(args.verbose)
    from .upstream.openconnect import upstream_from_args
    from .urls import OpenconnectUpstreamUrl, parse_upstream_url

    try:
        url = parse_upstream_url(args.via)
        if not isinstance(url, OpenconnectUpstreamUrl):
            raise ValueError(f"{args.via}: nsvpn socks needs an openconnect:// upstream "
                             "(ssh -D already is a SOCKS proxy)")
        listen = parse_listen(args.dynamic)
        forwards = [parse_forward(f) for f in args.forwards]
        for c in args.direct:
            ipaddress.ip_network(c, strict=False)
        rundir = _make_dir(args.dir)
    except ValueError as e:
        _err(str(e))
        return EXIT_USAGE
    oc = upstream_from_args(url, args)
    try:
        return trio.run(_main, args, oc, listen, forwards, rundir)
    except KeyboardInterrupt:
        return 0


async def _main(args, oc, listen, forwards, rundir) -> int:
    from .upstream.base import UpstreamError
    from .upstream.vpnstack import VpnStackUpstream

    up = VpnStackUpstream(oc, **({"rcv_buf": args.tcp_window} if args.tcp_window else {}))
    try:
        try:
            await up.start()
        except UpstreamError as e:
            _err(f"VPN login failed: {e}")
            return EXIT_UPSTREAM
        env = up.env
        direct: List[str] = [] if args.no_direct else _host_networks()
        direct += list(args.direct) + list(env.split_exc4) + list(env.split_exc6)
        up.direct_nets = [ipaddress.ip_network(c, strict=False) for c in direct]
        svc = SocksService(up, listen=listen, forwards=forwards, direct=direct, rundir=rundir)
        failed: List[str] = []
        async with trio.open_nursery() as n:
            try:
                await n.start(svc.serve)
            except OSError as e:
                _err(str(e))
                return EXIT_SETUP
            if not args.quiet:
                _err(f"VPN {oc.url.host} up: {env.summary()}")
                _err(f"SOCKS5 proxy on {listen[0]}:{svc.port}, user {svc.front.username}; the "
                     f"URL with its secret is in {rundir}/socks.url, a proxychains4 config in "
                     f"{rundir}/proxychains.conf")
                for lp, host, rp in forwards:
                    _err(f"forwarding 127.0.0.1:{lp} -> {host}:{rp} (own uid only)")
            print(f"NSVPN_SOCKS_DIR={rundir}", flush=True)

            async def watch_fatal() -> None:
                failed.append(await up.wait_fatal())
                n.cancel_scope.cancel()

            async def watch_signals() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as sigs:
                    async for _ in sigs:
                        n.cancel_scope.cancel()
                        return

            n.start_soon(watch_fatal)
            n.start_soon(watch_signals)
        if failed:
            _err(f"VPN failed: {failed[0]}")
            return EXIT_UPSTREAM
        return 0
    finally:
        with trio.CancelScope(shield=True):
            await up.aclose()
        try:
            os.rmdir(rundir) if args.dir is None else None
        except OSError as e:
            if e.errno != errno.ENOENT:
                log.debug("rmdir %s: %s", rundir, e)


def shim_direct(nets: List[str], env) -> List[str]:
    """The direct networks that contain no more specific VPN route."""
    vpn = [ipaddress.ip_network(r) for r in env.routes4() + env.routes6()]
    out = []
    for c in nets:
        n = ipaddress.ip_network(c, strict=False)
        if not any(r.version == n.version and r.prefixlen > n.prefixlen and r.overlaps(n)
                   for r in vpn):
            out.append(c)
    return out


def _host_networks() -> List[str]:
    from .upstream.direct import host_networks

    try:
        return [str(n) for n in host_networks()]
    except Exception as e:  # netlink refused: the VPN carries everything
        log.warning("cannot list the host's networks: %s", e)
        return []


async def run_preload_vpn(argv: List[str], oc, *, direct: List[str] = (),
                          host_direct: bool = True, quiet: bool = False) -> int:
    """`nsvpn exec --mode preload --via openconnect://...`: CMD under the preload shim, its
    connections dialled over the VPN by the userspace stack (run.py's preload branch calls
    this with its OpenconnectUpstream). Returns CMD's status, or EXIT_UPSTREAM when the
    VPN does not come up."""
    from .preload import run_preload
    from .upstream.base import UpstreamError
    from .upstream.vpnstack import VpnStackUpstream

    up = VpnStackUpstream(oc)
    try:
        try:
            await up.start()
        except UpstreamError as e:
            _err(f"VPN login failed: {e}")
            return EXIT_UPSTREAM
        env = up.env
        nets: List[str] = (_host_networks() if host_direct else []) + list(direct)
        nets += list(env.split_exc4) + list(env.split_exc6)
        up.direct_nets = [ipaddress.ip_network(c, strict=False) for c in nets]
        if not quiet:
            _err(f"VPN {oc.url.host} up: {env.summary()}")
        # The shim leaves connections to its direct networks alone (plain membership), so
        # it only gets those no VPN route cuts into; the upstream decides for the rest.
        return await run_preload(list(argv), up, shim_direct(nets, env), quiet=quiet,
                                 dns_server=None)
    finally:
        with trio.CancelScope(shield=True):
            await up.aclose()
