"""Command line: argument parsing, subcommands and exit codes. No logic lives here.

Exit codes: `exec` returns the command's status (128+N when it died of signal N); nsvpn's own
failures use 2 for usage/configuration errors and 3-5 for run-time failures (see EXIT_*), which
are chosen outside the 126/127/128+N range the shell uses for the command itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from . import __version__

EXIT_USAGE = 2  # bad arguments or configuration
EXIT_UPSTREAM = 3  # the upstream could not be brought up
EXIT_SETUP = 4  # namespace / TUN / shim setup failed
EXIT_INTERNAL = 5  # a bug: reported in one line, never a traceback unless NSVPN_DEBUG=1


def _add_exec_settings(p: argparse.ArgumentParser) -> None:
    """exec's options that are also config file keys (`config show` takes them too)."""
    p.add_argument("--allow-host-loopback", action="store_true",
                   help="make the host's 127.0.0.1 reachable from CMD as 10.0.2.2")
    from .upstream.openconnect import add_openconnect_args

    add_openconnect_args(p)
    p.add_argument("--tsocks-conf", metavar="FILE",
                   help="import a tsocks.conf: its server is the upstream unless --via is "
                        "given, its local = networks are direct, its path sections route "
                        "their networks through their own SOCKS5 server")
    p.add_argument("--no-proxy-env", action="store_true",
                   help="preload mode: do not point ALL_PROXY, http_proxy and https_proxy "
                        "at nsvpn's front for CMD")


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nsvpn",
        description="Run commands with outbound connectivity through one reachable host.",
    )
    p.add_argument("--version", action="version", version=f"nsvpn {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    pr = sub.add_parser("probe", help="report what works on this node and which mode exec uses")
    pr.add_argument("--json", action="store_true", help="machine-readable output (schema 1)")
    pr.add_argument("--via", action="append", default=[], metavar="URL",
                    help="also check that this upstream's host:port can be reached")
    pr.add_argument("--ssh-opt", action="append", default=[], metavar="OPT",
                    help="ssh options for the --via ssh:// checks, as for exec (-F FILE, "
                         "Key=Value)")
    pr.add_argument("--check", action="append", default=[], metavar="CMD",
                    help="report whether preload mode can divert CMD's connections "
                         "(static and setuid programs cannot be helped)")

    ex = sub.add_parser("exec", help="run CMD with connectivity through the upstream")
    from .config import add_config_args

    add_config_args(ex)
    ex.add_argument("--log-file", metavar="FILE",
                    help="write nsvpn's log (timestamped; -v/-vv for more) to FILE, not stderr")
    ex.add_argument("--pcap", metavar="FILE",
                    help="ns mode (socks/ssh upstreams): write the namespace's packets to FILE "
                         "in pcap format")
    ex.add_argument("--pcap-max", metavar="MB", type=float, default=100.0,
                    help="stop writing the pcap file at this size (default 100 MB)")
    _add_exec_settings(ex)
    ex.add_argument("-q", "--quiet", action="store_true", help="no notices on stderr")
    ex.add_argument("-v", "--verbose", action="count", default=0)
    ex.add_argument("--name", metavar="N",
                    help="run CMD in the shared tunnel N started by `nsvpn up` (no --via)")
    ex.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    up = sub.add_parser("up", help="start a named shared tunnel in the background (ns or "
                                   "preload mode, any upstream); returns once it is ready")
    up.add_argument("--name", required=True, metavar="N", help="the tunnel's name")
    add_config_args(up)
    from .upstream.openconnect import add_openconnect_args

    add_openconnect_args(up)  # an openconnect tunnel logs in without a terminal too
    up.add_argument("--log-file", metavar="FILE", help="the daemon's log (default: none)")
    up.add_argument("--allow-host-loopback", action="store_true",
                    help="make the host's 127.0.0.1 reachable as 10.0.2.2")
    up.add_argument("-q", "--quiet", action="store_true", help="no notices on stderr")
    up.add_argument("-v", "--verbose", action="count", default=0,
                    help="say what `up` waits for; the daemon logs at this level")
    st = sub.add_parser("status", help="list named tunnels, their upstreams, flows and bytes")
    st.add_argument("name", nargs="?", metavar="N")
    st.add_argument("--name", dest="name_opt", metavar="N", help="the same as N")
    st.add_argument("--json", action="store_true", help="machine-readable output (schema 1)")
    dn = sub.add_parser("down", help="stop a named tunnel and everything running in it")
    dn.add_argument("name", nargs="?", metavar="N")
    dn.add_argument("--name", dest="name_opt", metavar="N", help="the same as N")
    dn.add_argument("-v", "--verbose", action="count", default=0)
    cf = sub.add_parser("config", help="configuration file tools")
    cfs = cf.add_subparsers(dest="config_command", metavar="ACTION")
    show = cfs.add_parser("show", help="the effective configuration for exec, with the source "
                                       "of each value")
    add_config_args(show)
    _add_exec_settings(show)  # so that an exec command line can be checked as it is
    show.add_argument("--json", action="store_true", help="machine-readable output (schema 1)")
    from .socks_cmd import add_socks_parser

    add_socks_parser(sub)
    return p


def _probe(args: argparse.Namespace) -> int:
    from .probe import format_table, run_probe

    caps = run_probe(args.via, args.check, args.ssh_opt)
    if args.json:
        print(json.dumps(caps.to_json_dict(), indent=2, sort_keys=True))
    else:
        print(format_table(caps))
    return 0 if caps.mode != "none" else 1


def _exec(args: argparse.Namespace) -> int:
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print("nsvpn exec: no command given (usage: nsvpn exec [--via URL] -- CMD [ARGS...])",
              file=sys.stderr)
        return EXIT_USAGE
    if args.name:
        if args.via:
            print("nsvpn exec: --name joins a tunnel started by `nsvpn up`; give --via there",
                  file=sys.stderr)
            return EXIT_USAGE
        from .tunnels import run_join

        return run_join(args.name, argv, quiet=args.quiet, socks_env=not args.no_proxy_env)
    from .run import run_exec

    return run_exec(args, argv)


def _config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .config import ConfigError, effective, format_show

    if args.config_command != "show":
        parser.error("usage: nsvpn config show [--config FILE] [--profile NAME] [--json]")
    try:
        d = effective(args).to_json_dict()
    except ConfigError as e:
        print(f"nsvpn: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(d, indent=2, sort_keys=True) if args.json else format_show(d))
    return 0


def _os_errors(e: BaseException) -> List[OSError]:
    """The OSErrors an exception is made of (through trio's exception groups), or [] when
    anything else is among them."""
    if isinstance(e, OSError):
        return [e]
    subs = getattr(e, "exceptions", None)
    if not subs:
        return []
    out: List[OSError] = []
    for sub in subs:
        leaves = _os_errors(sub)
        if not leaves:
            return []
        out += leaves
    return out


def main(argv: Optional[List[str]] = None) -> int:
    from . import logerrors

    logerrors.install()
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if getattr(args, "name_opt", None) is not None:  # `up` takes --name N: so do these
        if args.name is not None and args.name != args.name_opt:
            parser.error(f"two tunnel names: {args.name} and --name {args.name_opt}")
        args.name = args.name_opt
    if args.command == "down" and args.name is None:
        parser.error("which tunnel? nsvpn down N (`nsvpn status` lists them)")
    try:
        if args.command == "probe":
            return _probe(args)
        if args.command == "exec":
            return _exec(args)
        if args.command == "config":
            return _config(args, parser)
        if args.command in ("up", "status", "down"):
            from . import tunnels

            return {"up": tunnels.run_up, "status": tunnels.run_status,
                    "down": tunnels.run_down}[args.command](args)
        if args.command == "socks":
            from .socks_cmd import run_socks

            return run_socks(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # one line for users; the traceback only when asked for
        if os.environ.get("NSVPN_DEBUG"):
            raise
        oserrs = _os_errors(e)
        if oserrs:
            # The node said no (a full /tmp, no permission, no file descriptors left) somewhere
            # without its own message: say what and where, in one line.
            o = oserrs[0]
            what = f"{o.strerror or o}" + (f": {o.filename!r}" if o.filename else "")
            print(f"nsvpn: {what} (NSVPN_DEBUG=1 shows where)", file=sys.stderr)
            return EXIT_SETUP
        print(f"nsvpn: internal error: {type(e).__name__}: {e} (NSVPN_DEBUG=1 shows details)",
              file=sys.stderr)
        return EXIT_INTERNAL
    parser.error(f"unknown command {args.command}")
    return EXIT_USAGE


def entry() -> None:
    code = main()
    # By now CMD has exited and every helper is stopped and reaped; interpreter teardown
    # (module and trio thread-cache cleanup) would add 0.1-0.25 s to every `nsvpn exec`.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    entry()
