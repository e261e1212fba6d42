"""Who owns the other end of a local TCP connection: one sock_diag (inet_diag) netlink lookup.

The front's TCP listener is on loopback, where every local user can reach it. For HTTP proxy
clients (which may not send credentials) the kernel's socket table decides instead: the
connecting socket must belong to our uid, as `ss -e` would show. No privileges needed.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Optional, Tuple

_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_NOCOOKIE = 0xFFFFFFFF
_NETLINK_SOCK_DIAG = 4
_UID_OFFSET = 16 + 4 + 48 + 12  # nlmsghdr, family/state/timer/retrans, sockid, 3 x u32


def _addr(family: int, ip: str) -> bytes:
    raw = socket.inet_pton(family, ip)
    return raw + bytes(16 - len(raw))


def tcp_socket_uid(family: int, local: Tuple, remote: Tuple) -> Optional[int]:
    """The uid owning the TCP socket whose own address is `local` and peer is `remote`
    ((ip, port, ...) tuples as getsockname() gives them); None when there is no such socket
    or the kernel will not say."""
    req = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF)
    req += struct.pack("!HH", local[1], remote[1])
    req += _addr(family, local[0]) + _addr(family, remote[0])
    req += struct.pack("=III", 0, _NOCOOKIE, _NOCOOKIE)
    msg = struct.pack("=IHHII", 16 + len(req), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0) + req
    try:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                          _NETLINK_SOCK_DIAG)
    except OSError:
        return None
    try:
        s.settimeout(1.0)
        s.send(msg)
        data = s.recv(8192)
    except OSError:
        return None
    finally:
        s.close()
    if len(data) < 16:
        return None
    _length, kind = struct.unpack_from("=IH", data, 0)
    if kind == _NLMSG_ERROR or kind != _SOCK_DIAG_BY_FAMILY or len(data) < _UID_OFFSET + 4:
        return None
    return struct.unpack_from("=I", data, _UID_OFFSET)[0]


def peer_is_ours(sock: socket.socket, uid: Optional[int] = None) -> bool:
    """Does the other end of this accepted loopback connection belong to our uid?"""
    try:
        ours, theirs = sock.getsockname(), sock.getpeername()
    except OSError:
        return False
    owner = tcp_socket_uid(sock.family, theirs, ours)
    return owner is not None and owner == (os.getuid() if uid is None else uid)


def works() -> bool:
    """Can this node tell us who owns a loopback connection (a seccomp filter or an old kernel
    may refuse sock_diag)? Tried on a connection of our own."""
    try:
        lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    except OSError:
        return False
    try:
        lst.bind(("127.0.0.1", 0))
        lst.listen(1)
        with socket.create_connection(lst.getsockname(), timeout=1.0):
            acc, _ = lst.accept()
            with acc:
                return peer_is_ours(acc)
    except OSError:
        return False
    finally:
        lst.close()
