"""openconnect's --script in --script-tun mode: hand VPNFD to the nsvpn process that ran it.

openconnect runs this as `exec <python> -m nsvpn.oc_attach <socket>` (through /bin/sh -c, in a
process group of its own) once the tunnel is up, with VPNFD = its end of an
AF_UNIX/SOCK_DGRAM socketpair (one raw IP packet per datagram) and the tunnel described in the
environment (see nsvpn.vpnenv). We:

1. connect to nsvpn's private SOCK_SEQPACKET socket (in a 0700 directory; nsvpn checks our
   uid with SO_PEERCRED),
2. send one message: "A" + JSON {"pid", "env": the tunnel variables only} with VPNFD attached
   (SCM_RIGHTS), then close our copy of VPNFD: nsvpn holds the only one,
3. stay alive until openconnect's SIGHUP (sent to our group at shutdown), SIGTERM, or EOF on
   the socket (nsvpn went away). openconnect expects its script to live as long as the tunnel.

Exit codes: 0 normal end, 2 usage, 3 VPNFD missing or not a socket, 4 nsvpn not reachable.
Nothing is printed on success; failures print one line to stderr, which nsvpn reads.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from typing import List

from .vpnenv import relevant_env

TAG_ATTACH = b"A"


def _say(msg: str) -> None:
    try:
        sys.stderr.write(f"nsvpn oc_attach: {msg}\n")
        sys.stderr.flush()
    except OSError:
        pass


def _exit_on_signal(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    os._exit(0)


def vpn_fd_from_env(environ) -> int:
    """VPNFD as an int, checked to be an open AF_UNIX datagram socket."""
    text = environ.get("VPNFD", "")
    if not text.isdigit():
        raise ValueError("VPNFD is not set: run this only as openconnect's --script-tun script")
    fd = int(text)
    try:
        s = socket.socket(fileno=os.dup(fd))
    except OSError as e:
        raise ValueError(f"VPNFD={fd} is not an open socket: {e.strerror}") from None
    try:
        if s.family != socket.AF_UNIX or s.type != socket.SOCK_DGRAM:
            raise ValueError(f"VPNFD={fd} is not an AF_UNIX datagram socket")
    finally:
        s.close()
    return fd


def main(argv: List[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        _say("usage: python -m nsvpn.oc_attach SOCKET (run by openconnect --script-tun)")
        return 2
    # Installed first: openconnect may hang up at any moment after starting us.
    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_on_signal)
    try:
        fd = vpn_fd_from_env(os.environ)
    except ValueError as e:
        _say(str(e))
        return 3
    # openconnect's stdin may be the pipe that carried the password: not ours to hold.
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
    except OSError:
        pass
    msg = TAG_ATTACH + json.dumps({"pid": os.getpid(),
                                   "env": relevant_env(os.environ)}).encode()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.connect(args[0])
        socket.send_fds(sock, [msg], [fd])
    except OSError as e:
        _say(f"cannot hand the tunnel to nsvpn at {args[0]}: {e.strerror or e}")
        return 4
    os.close(fd)
    # Block until nsvpn closes its end (or a signal ends us through the handlers above).
    while True:
        try:
            data = sock.recv(4096)
        except InterruptedError:
            continue
        except OSError:
            return 0
        if not data:
            return 0


if __name__ == "__main__":
    sys.exit(main())
