"""Plain host sockets for destinations in the host's own (site-local) networks.

`host_networks()` lists the networks the host is directly connected to: the default set of
destinations that bypass the tunnel (shared squids, cluster file servers stay fast).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from typing import List, Union

import trio

from .base import DialError, keepalive, tcp_socket

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def host_networks(include_loopback: bool = False) -> List[IPNetwork]:
    """Connected IPv4 and IPv6 networks of the current network namespace, via netlink.
    IPv6 link-local networks are left out: every link has fe80::/64, and an address in it
    means nothing without its interface."""
    nets: List[IPNetwork] = []
    for addr, prefixlen in _addresses():
        net = ipaddress.ip_network(f"{addr}/{prefixlen}", strict=False)
        if net.is_loopback and not include_loopback:
            continue
        if net.version == 6 and net.is_link_local:
            continue
        if net not in nets:
            nets.append(net)
    return nets


_NLMSG_ERROR, _NLMSG_DONE, _RTM_NEWADDR, _RTM_GETADDR = 2, 3, 20, 22
_NLM_F_REQUEST_DUMP = 0x301
_IFA_ADDRESS, _IFA_LOCAL = 1, 2


def _addresses() -> List[tuple]:
    """(address, prefixlen) of every IPv4 and IPv6 address: one RTM_GETADDR dump on a raw
    netlink socket. (pyroute2 did this before, but importing it costs ~100-150 ms of every
    start-up.)"""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
    try:
        s.bind((0, 0))
        s.send(struct.pack("=IHHII", 24, _RTM_GETADDR, _NLM_F_REQUEST_DUMP, 1, 0)
               + struct.pack("=BBBBI", socket.AF_UNSPEC, 0, 0, 0, 0))
        out = []
        while True:
            data = s.recv(1 << 16)
            off = 0
            while off + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, off)
                if length < 16 or kind == _NLMSG_DONE:
                    return out
                if kind == _NLMSG_ERROR:
                    err = -struct.unpack_from("=i", data, off + 16)[0]
                    if err:
                        raise OSError(err, f"netlink address dump: {os.strerror(err)}")
                    return out
                if kind == _RTM_NEWADDR and length >= 24:
                    family, prefixlen = struct.unpack_from("=BB", data, off + 16)
                    attrs = {}
                    a = off + 24
                    while a + 4 <= off + length:
                        alen, atype = struct.unpack_from("=HH", data, a)
                        if alen < 4:
                            break
                        attrs[atype] = data[a + 4:a + alen]
                        a += (alen + 3) & ~3
                    raw = attrs.get(_IFA_ADDRESS) or attrs.get(_IFA_LOCAL)
                    if family == socket.AF_INET and raw and len(raw) == 4:
                        out.append((socket.inet_ntoa(raw), prefixlen))
                    elif family == socket.AF_INET6 and raw and len(raw) == 16:
                        out.append((socket.inet_ntop(socket.AF_INET6, raw), prefixlen))
                off += (length + 3) & ~3
    finally:
        s.close()


class DirectUpstream:
    """Connect with the host's own sockets; errors carry the kernel's errno unchanged."""

    name = "direct"
    dials_plain_tcp = True  # see Socks5Upstream

    def __init__(self, name: str = "direct"):
        self.name = name

    @property
    def healthy(self) -> bool:
        return True

    async def start(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()

    async def dial_tcp(self, host: str, port: int, *, timeout: float) -> trio.abc.Stream:
        last: DialError | None = None
        with trio.move_on_after(timeout):
            try:
                infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except socket.gaierror as exc:
                raise DialError(
                    errno.EHOSTUNREACH, f"cannot resolve {host}: {exc.strerror}", "hostunreach"
                ) from None
            for family, _type, _proto, _canon, addr in infos:
                sock, addr = tcp_socket(family, addr)
                try:
                    await sock.connect(addr)
                except OSError as exc:
                    sock.close()
                    err = exc.errno or errno.ECONNABORTED
                    last = DialError(err, f"{host}:{port}: {exc.strerror or exc}")
                    continue
                except BaseException:
                    sock.close()
                    raise
                keepalive(sock)
                return trio.SocketStream(sock)
            if last is not None:
                raise last
            raise DialError(errno.EHOSTUNREACH, f"{host}: no address")
        raise DialError(errno.ETIMEDOUT, f"{host}:{port}: no answer in {timeout:g} s")
