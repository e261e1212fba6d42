"""Where a flow from the namespace goes: the decision only, no I/O (tested without privileges).

Order of the rules, first match wins:
1. the gateway address: the host's loopback when --allow-host-loopback, else refused
   (the IPv6 gateway: refused);
2. the DNS address: our own DNS service (TCP and UDP port 53), anything else there refused
   (the IPv6 DNS address: refused; resolv.conf names only the IPv4 one);
3. other addresses in the namespace's own subnets: unreachable (nothing lives there);
4. a fake IP handed out by our DNS: through the upstream, CONNECT by *name*;
5. direct networks (the host's connected networks, --direct CIDRs): host sockets;
6. everything else: through the upstream, by address.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Union

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

UPSTREAM = "upstream"
DIRECT = "direct"
DNS = "dns"
REFUSE = "refuse"  # RST / ICMP port unreachable: the app sees ECONNREFUSED at once
UNREACHABLE = "unreachable"  # ICMP host unreachable: EHOSTUNREACH at once


@dataclass(frozen=True)
class Decision:
    action: str
    host: str = ""  # what to dial: an IP literal, or a DNS name for fake IPs
    port: int = 0


class Router:
    def __init__(
        self,
        *,
        namespace_net: str = "10.0.2.0/24",
        gateway: str = "10.0.2.2",
        dns: str = "10.0.2.3",
        direct: Iterable[str] = (),
        allow_host_loopback: bool = False,
        fake_ip_lookup: Optional[Callable[[str], Optional[str]]] = None,
        namespace_net6: Optional[str] = None,
        gateway6: str = "",
        dns6: str = "",
    ) -> None:
        self.namespace_net = ipaddress.ip_network(namespace_net)
        self.namespace_net6 = ipaddress.ip_network(namespace_net6) if namespace_net6 else None
        self.refused6 = {ipaddress.ip_address(a) for a in (gateway6, dns6) if a}
        self.gateway = gateway
        self.dns = dns
        self.direct: List[IPNetwork] = [ipaddress.ip_network(c, strict=False) for c in direct]
        self.allow_host_loopback = allow_host_loopback
        self.fake_ip_lookup = fake_ip_lookup

    def is_direct(self, ip: str) -> bool:
        a = ipaddress.ip_address(ip)
        return any(a in n for n in self.direct)

    def decide(self, ip: str, port: int, proto: str = "tcp") -> Decision:
        if ip == self.gateway:
            if self.allow_host_loopback:
                return Decision(DIRECT, "127.0.0.1", port)
            return Decision(REFUSE)
        if ip == self.dns:
            return Decision(DNS, ip, port) if port == 53 else Decision(REFUSE)
        a = ipaddress.ip_address(ip)
        if a in self.refused6:
            return Decision(REFUSE)
        for net in (self.namespace_net, self.namespace_net6):
            if net is not None and a.version == net.version and a in net:
                return Decision(UNREACHABLE)
        if self.fake_ip_lookup is not None:
            name = self.fake_ip_lookup(ip)
            if name is not None:
                return Decision(UPSTREAM, name, port)
        if a.is_multicast or a.is_unspecified or ip == "255.255.255.255":
            return Decision(UNREACHABLE)
        if self.is_direct(ip):
            return Decision(DIRECT, ip, port)
        if a.is_loopback:  # the namespace's own lo never routes here; be safe anyway
            return Decision(UNREACHABLE)
        return Decision(UPSTREAM, ip, port)
