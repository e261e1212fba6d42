"""Plain host sockets for destinations in the host's own (site-local) networks.

`host_networks()` lists the IPv4 networks the host is directly connected to: the default set
of destinations that bypass the tunnel (shared squids, cluster file servers stay fast).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from typing import List

import trio

from .base import DialError


def host_networks(include_loopback: bool = False) -> List[ipaddress.IPv4Network]:
    """Connected IPv4 networks of the current network namespace, via netlink (pyroute2)."""
    from pyroute2 import IPRoute

    nets = []
    with IPRoute() as ipr:
        for msg in ipr.get_addr(family=socket.AF_INET):
            addr = msg.get_attr("IFA_ADDRESS") or msg.get_attr("IFA_LOCAL")
            if not addr:
                continue
            net = ipaddress.IPv4Network(f"{addr}/{msg['prefixlen']}", strict=False)
            if net.is_loopback and not include_loopback:
                continue
            if net not in nets:
                nets.append(net)
    return nets


class DirectUpstream:
    """Connect with the host's own sockets; errors carry the kernel's errno unchanged."""

    name = "direct"

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
            for family, type_, proto, _canon, addr in infos:
                sock = trio.socket.socket(family, type_, proto)
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
                return trio.SocketStream(sock)
            if last is not None:
                raise last
            raise DialError(errno.EHOSTUNREACH, f"{host}: no address")
        raise DialError(errno.ETIMEDOUT, f"{host}:{port}: no answer in {timeout:g} s")
