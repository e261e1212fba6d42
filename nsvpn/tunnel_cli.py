"""`python -m nsvpn.tunnel_cli ARGS...`: the nsvpn command line with the named-tunnel options
cli.py does not wire yet (a stand-alone entry, like `python -m nsvpn.bridge` was):

* `up` also takes the openconnect options (--passwd-file, --passwd-fd, --oc-opt, ...), so
  `up --via openconnect://...` can log in without a terminal;
* `exec --name N` honours -q (no static/setuid warning in preload mode) and --no-proxy-env.

Everything else is handed to cli.main unchanged. Once cli.py calls add_up_args() on its `up`
parser and passes quiet/socks_env to tunnels.run_join, this module is no longer needed.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional


def add_up_args(up: argparse.ArgumentParser) -> None:
    """What `nsvpn up` needs beyond add_config_args: the openconnect login options."""
    from .upstream.openconnect import add_openconnect_args

    add_openconnect_args(up)


def _subparser(p: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for a in p._actions:  # argparse keeps subparsers here; there is no public accessor
        if isinstance(a, argparse._SubParsersAction):
            return a.choices[name]
    raise KeyError(name)


def main(argv: Optional[List[str]] = None) -> int:
    from . import cli, tunnels

    argv = list(sys.argv[1:] if argv is None else argv)
    p = cli._build_parser()
    add_up_args(_subparser(p, "up"))
    args = p.parse_args(argv)
    try:
        if args.command == "up":
            return tunnels.run_up(args)
        if args.command == "exec" and args.name and not args.via:
            cmd = list(args.argv)
            if cmd[:1] == ["--"]:
                cmd = cmd[1:]
            if cmd:
                return tunnels.run_join(args.name, cmd, quiet=args.quiet,
                                        socks_env=not args.no_proxy_env)
    except KeyboardInterrupt:
        return 130
    return cli.main(argv)


if __name__ == "__main__":
    code = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
