"""`nsvpn exec`: pick the mode, bring the upstream up, run CMD in its namespace, relay, exit.

Order matters: the upstream is started (and must be ready) *before* CMD exists, so a wrong ssh
key ends nsvpn with ssh's reason and CMD never runs; the namespace child is forked from trio's
main thread before the relay starts any worker thread; nothing outlives nsvpn (ssh is stopped
on every exit path, CMD has PDEATHSIG).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import signal
import socket
import sys
from typing import List, Optional

import trio

from . import config as cfg
from . import namespace, routing
from .cli import EXIT_SETUP, EXIT_UPSTREAM, EXIT_USAGE
from .nested import without_session

log = logging.getLogger("nsvpn")


def _err(msg: str) -> None:
    sys.stderr.write(f"nsvpn: {msg}\n")
    sys.stderr.flush()


def _setup_logging(verbose: int, log_file: Optional[str] = None) -> None:
    """Quiet by default (warnings only); -v info, -vv debug; --log-file instead of stderr."""
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    fmt = "%(asctime)s nsvpn %(levelname)s %(name)s: %(message)s"
    if log_file:
        logging.basicConfig(level=level, filename=log_file, format=fmt)
    else:
        logging.basicConfig(level=level, stream=sys.stderr, format=fmt)


def build_upstreams(vias: List[str], args: argparse.Namespace):
    """URLs -> upstream objects; ValueError with a user-facing message on bad input.

    An openconnect URL gives the VPN upstream itself (it is not a dialer and cannot be mixed
    with others in one failover pool); every other scheme gives an UpstreamPool.
    """
    from .upstream.pool import UpstreamPool
    from .upstream.socks5 import Socks5Upstream
    from .upstream.ssh import SshUpstream
    from .urls import OpenconnectUpstreamUrl, Socks5UpstreamUrl, SshUpstreamUrl, parse_upstream_url

    ups = []
    for i, text in enumerate(vias):
        url = parse_upstream_url(text)
        if isinstance(url, SshUpstreamUrl):
            ups.append(SshUpstream(url, ssh_opts=args.ssh_opt, index=i))
        elif isinstance(url, Socks5UpstreamUrl):
            ups.append(Socks5Upstream.from_url(url))
        elif isinstance(url, OpenconnectUpstreamUrl):
            if len(vias) != 1:
                raise ValueError(f"{url}: an openconnect upstream cannot be combined with "
                                 "other --via upstreams")
            from .upstream.openconnect import upstream_from_args

            return upstream_from_args(url, args)
        else:  # pragma: no cover - parse_upstream_url knows only these
            raise ValueError(f"{text}: unsupported upstream")
    return UpstreamPool(ups, policy=getattr(args, "upstream_policy", None) or "first")


def choose_mode(requested: str, quiet: bool) -> Optional[str]:
    """'ns' where namespaces work, else 'preload' (auto fallback, said in one line unless -q).

    None after an error message when the requested (or any) mode is unusable here.
    """
    from .probe import check_preload

    if requested != "preload":
        trials = [namespace.trial_userns()]
        if trials[0].ok:
            trials += [namespace.trial_tun(), namespace.trial_bind_mount()]
        bad = [t for t in trials if not t.ok]
        if not bad:
            return "ns"
        why = "; ".join(f"{t.name}: {t.detail}" for t in bad)
        if requested == "ns":
            _err(f"namespace mode is unusable here: {why}")
            return None
    shim = check_preload()
    if not shim.ok:
        if requested == "preload":
            _err(f"preload mode is unusable here: {shim.detail}")
        else:
            _err(f"no mode works here: namespaces: {why}; preload: {shim.detail}")
        return None
    if requested == "auto" and not quiet:
        _err(f"namespaces unusable ({bad[0].name}: {bad[0].detail.split(';')[0]}); "
             "using the LD_PRELOAD fallback (-q silences this)")
    return "preload"


def namespace_hosts(addr: str, path: str = "/etc/hosts") -> str:
    """The host's /etc/hosts plus our hostname at the namespace address.

    Programs look up their own hostname and the name of their own address (xrdcp does both);
    without this line each lookup waits for the resolver's timeout on a secluded node.
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        text = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
    if text and not text.endswith("\n"):
        text += "\n"
    host = socket.gethostname()
    names = [host] + ([host.split(".")[0]] if "." in host else [])
    return text + "# added by nsvpn: this host inside its namespace\n" + \
        f"{addr}\t{' '.join(names)}\n"


def direct_networks(args: argparse.Namespace) -> List[str]:
    nets: List[str] = []
    if not args.no_direct:
        from .upstream.direct import host_networks

        nets += [str(n) for n in host_networks()]
    nets += list(args.direct)
    return nets


def run_exec(args: argparse.Namespace, argv: List[str]) -> int:
    try:
        _setup_logging(args.verbose, getattr(args, "log_file", None))
    except OSError as e:
        _err(f"cannot open the log file: {e}")
        return EXIT_USAGE
    try:
        # CLI > NSVPN_* > profile > file > default, onto args; tsocks_conf may come from
        # any of them, so it is read after (its server already counts as a `via` there)
        eff = cfg.apply_to_args(args)
        tconf = _load_tsocks_conf(args)
        for key, s in eff.values.items():
            log.debug("config %s = %r (%s)", key, s.value, s.source)
        pool = build_upstreams(args.via, args)
        if tconf is not None:
            args.direct = list(args.direct) + [str(n) for n in tconf.local]
            pool = _with_tsocks_paths(pool, tconf)
        # CMD (and all it starts) inherits our environment: a socks5://user:pass@ given in
        # $NSVPN_VIA must not reach it. The upstreams are built, nothing reads it again.
        if re.search(r"://[^/@\s]*:[^/@\s]*@", os.environ.get("NSVPN_VIA", "")):
            del os.environ["NSVPN_VIA"]
        direct = direct_networks(args)
        for c in args.direct:
            routing.Router(direct=[c])  # validates the CIDR
    except cfg.ConfigError as e:
        _err(str(e))
        return EXIT_USAGE
    except ValueError as e:
        _err(str(e))
        return EXIT_USAGE
    mode = choose_mode(args.mode, args.quiet)
    if mode is None:
        return EXIT_SETUP
    from .upstream.openconnect import OpenconnectUpstream

    if getattr(args, "pcap", None) and (mode != "ns" or isinstance(pool, OpenconnectUpstream)):
        _err("--pcap works in namespace mode with ssh:// or socks5:// upstreams only")
        return EXIT_USAGE
    quiet = args.quiet or args.verbose == 0  # pilot logs are precious
    if isinstance(pool, OpenconnectUpstream):
        if mode == "preload":
            from .socks_cmd import run_preload_vpn

            return trio.run(functools.partial(run_preload_vpn, argv, pool,
                                              direct=list(args.direct),
                                              host_direct=not args.no_direct, quiet=quiet))
        from .bridge import run_vpn_ns

        return trio.run(functools.partial(run_vpn_ns, argv, pool, quiet=quiet,
                                          direct=list(args.direct),
                                          host_direct=not args.no_direct))
    if mode == "preload":
        return trio.run(_run_preload, args, argv, pool, direct)
    return trio.run(_run_ns, args, argv, pool, direct)


def _load_tsocks_conf(args: argparse.Namespace):
    """--tsocks-conf FILE: its server is the upstream unless --via names one."""
    path = getattr(args, "tsocks_conf", None)
    if not path:
        return None
    from .tsocks_conf import parse_tsocks_conf

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    conf = parse_tsocks_conf(text, path)
    if not args.via and conf.default is not None:
        args.via = [conf.default_url()]
    return conf


def _with_tsocks_paths(pool, conf):
    """tsocks.conf `path` sections: their destinations use their own SOCKS5 server."""
    if not conf.paths:
        return pool
    from .upstream.routed import RoutedUpstream
    from .upstream.socks5 import Socks5Upstream
    from .urls import parse_upstream_url

    routes = []
    for p in conf.paths:
        up = Socks5Upstream.from_url(parse_upstream_url(p.server.url()))
        routes.append((lambda host, port, rs=p.reaches: any(r.matches(host, port) for r in rs),
                       up))
    return RoutedUpstream(pool, routes)


def _set_nofile(limits) -> None:
    import resource

    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)
    except (ValueError, OSError):
        pass


def _raise_nofile():
    """Soft RLIMIT_NOFILE up to the hard limit: the relay holds a socket per flow and ssh an
    fd per channel, so a user's usual soft 1024 would refuse flows past ~1000. Returns the
    user's limits (for CMD), None when nothing changed."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return None
    _set_nofile((want, hard))
    return (soft, hard)


async def _start_pool(pool) -> bool:
    """Bring the upstreams up (bounded); False after saying why on stderr."""
    from .upstream.base import UpstreamError

    try:
        await pool.start()
    except UpstreamError as e:
        _err(f"upstream failed: {e}")
        await pool.aclose()
        return False
    return True


async def _run_preload(args: argparse.Namespace, argv: List[str], pool,
                       direct: List[str]) -> int:
    from .preload import run_preload

    if not await _start_pool(pool):
        return EXIT_UPSTREAM
    try:
        # Warns about static/setuid CMDs (they would not be tunnelled) unless -q.
        return await run_preload(argv, pool, direct, quiet=args.quiet,
                                 dns_server=args.dns_server,
                                 socks_env=not getattr(args, "no_proxy_env", False))
    finally:
        with trio.CancelScope(shield=True):
            await pool.aclose()


def _open_pcap(args: argparse.Namespace):
    """--pcap FILE -> PcapWriter (OSError propagates: checked before CMD exists)."""
    if not getattr(args, "pcap", None):
        return None
    from .netstack.stack import VNET_HDR_LEN
    from .pcap import PcapWriter

    return PcapWriter(args.pcap, int(args.pcap_max * 1e6), strip=VNET_HDR_LEN)


def _dump_counters(stack, relay, pool) -> None:
    """SIGUSR1: one JSON line with the stack, relay and upstream numbers, to the log (or
    stderr when there is no --log-file), whatever the -v level."""
    import json

    ups = [{"name": u.name, "healthy": bool(u.healthy)}
           for u in getattr(pool, "upstreams", [pool])]
    d = {"stack": stack.counters, "relay": relay.stats(), "upstreams": ups}
    if relay.pcap is not None:
        try:
            relay.pcap._f and relay.pcap._f.flush()
        except OSError:
            pass
    root = logging.getLogger()
    rec = logging.LogRecord("nsvpn.counters", logging.WARNING, __file__, 0,
                            "counters %s", (json.dumps(d, sort_keys=True),), None)
    for h in root.handlers:  # bypass the level: the user asked for it
        h.handle(rec)
    if not root.handlers:
        _err("counters " + json.dumps(d, sort_keys=True))


async def _supervise(child, dump) -> int:
    """namespace.supervise, plus SIGUSR1 -> dump() *and* still forwarded to CMD.

    The forwarder gets every other signal; our own SIGUSR1 receiver dumps first, then passes
    the signal on, so CMD sees exactly what it would without nsvpn (issue 4).
    """
    others = tuple(s for s in namespace.FORWARDED_SIGNALS if s != signal.SIGUSR1)

    async def usr1(task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGUSR1) as batches:
            task_status.started()
            async for _ in batches:
                try:
                    dump()
                except Exception as e:  # a dump must never end the session
                    log.warning("counter dump failed: %s", e, exc_info=log.isEnabledFor(10))
                child.signal(signal.SIGUSR1)

    async with trio.open_nursery() as n:
        await n.start(namespace.forward_signals, child, others)
        await n.start(usr1)
        status = await child.wait()
        n.cancel_scope.cancel()
    return status


async def _run_ns(args: argparse.Namespace, argv: List[str], pool, direct: List[str],
                  ready=None) -> int:
    """ready(child, stack, relay, pool): an async task started next to the relay once CMD
    runs (named tunnels: the holder is CMD; ready serves the control socket)."""
    from .dns import DnsService, FakeIpTable
    from .memtrim import tune_malloc
    from .netstack.stack import Stack, StackConfig
    from .relay import Relay
    from .upstream.direct import DirectUpstream

    # The stack's socket reads are 256 KiB: keep them off mmap (measured +30 % on a bulk
    # download). Not in the VPN modes, whose packets are small (no gain measured there).
    if not os.environ.get("NSVPN_MALLOC_DEFAULTS"):  # =1: glibc's defaults, for A/B runs
        tune_malloc()
    pcap = None
    user_nofile = _raise_nofile()
    if not await _start_pool(pool):
        return EXIT_UPSTREAM
    try:
        stack_cfg = StackConfig(vnet_hdr=True)
        # The TUN queue must hold a full advertised window (tun orphans skbs: no backpressure).
        # IPv6 too, so that IPv6 literals (an XRootD redirect, `curl http://[...]/`) go
        # through the upstream; names keep IPv4 (empty AAAA answers), the far side picks.
        spec = namespace.NetnsSpec(mtu=stack_cfg.mtu, vnet_hdr=True,
                                   window=stack_cfg.tcp.rcv_buf, ipv6=True,
                                   routes=["0.0.0.0/0", "::/0"])  # fd00::100/64 via fd00::2
        stack_cfg.tun_queue_len = spec.queue_len()
        spec.hosts = namespace_hosts(spec.addr)
        fakes = FakeIpTable()
        router = routing.Router(direct=direct, allow_host_loopback=args.allow_host_loopback,
                                fake_ip_lookup=fakes.name_for,
                                namespace_net6=stack_cfg.net6, gateway6=stack_cfg.gateway6,
                                dns6=stack_cfg.dns6)
        # Everything that can fail is built before CMD exists.
        direct_up = DirectUpstream()
        stack = Stack(stack_cfg)
        try:
            pcap = _open_pcap(args)
        except OSError as e:
            _err(f"cannot write the pcap file: {e}")
            return EXIT_USAGE
        dns = DnsService(fakes, upstream=pool, dns_server=args.dns_server,
                         local_net=f"{spec.addr}/{spec.prefixlen}",
                         local_names={spec.addr: socket.gethostname()})
        if user_nofile:  # CMD gets the user's own limits (select() users need <= 1024)
            _set_nofile(user_nofile)
        try:
            child = namespace.spawn(argv, spec, env=without_session(os.environ))
        except namespace.SpawnError as e:
            _err(str(e))
            code = getattr(e, "exit_code", None)
            return code if code in (126, 127) else EXIT_SETUP
        finally:
            if user_nofile:
                _raise_nofile()

        async def dial_upstream(host: str, port: int, timeout: float):
            return await pool.dial_tcp(host, port, timeout=timeout)

        async def dial_direct(host: str, port: int, timeout: float):
            return await direct_up.dial_tcp(host, port, timeout=timeout)

        ns_inode = namespace.netns_inode(child.pid)
        relay = Relay(child.tun_fd, stack, router, dial_upstream=dial_upstream,
                      dial_direct=dial_direct, dns_service=dns,
                      udp_upstream=pool if hasattr(pool, "carries_udp") else None)
        relay.pcap = pcap
        try:
            async with trio.open_nursery() as n:
                await n.start(relay.run)
                if ready is not None:
                    n.start_soon(ready, child, stack, relay, pool)
                status = await _supervise(child, lambda: _dump_counters(stack, relay, pool))
                # Nothing keeps running after nsvpn: end what CMD left in its namespace.
                left = await namespace.end_leftovers(ns_inode)
                if left:
                    log.info("ended %d process(es) CMD left running in its namespace", left)
                n.cancel_scope.cancel()
        except BaseException:
            child.signal(signal.SIGKILL)  # never leave CMD running without its relay
            raise
        finally:
            child.close()
        return status
    finally:
        if pcap is not None:
            pcap.close()
        with trio.CancelScope(shield=True):
            await pool.aclose()
