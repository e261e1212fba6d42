"""Import a tsocks.conf (tsocks 1.8 syntax) so sites move over with the file they have.

What it maps to (sans-IO: text in, records out):
  server / server_port / server_type / default_user / default_pass  -> the default upstream,
      socks5://[user:pass@]server:port (server_type 4 is refused: SOCKS4 is not supported)
  local = NET/MASK                                                  -> a direct network
  path { reaches = NET[:PORT[-PORT]]/MASK ...; server = ...; ... }  -> a route: those
      destinations go through that path's server instead of the default one
Masks may be dotted (tsocks' form) or a prefix length. Unknown keys are errors, not ignored:
a typo would silently send traffic the wrong way.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import List, Optional, Tuple
from urllib.parse import quote

Network = ipaddress.IPv4Network


class TsocksConfError(ValueError):
    """Shown to the user as is: names the file and the line."""


@dataclass
class Reach:
    net: Network
    ports: Optional[Tuple[int, int]] = None  # inclusive range; None = all ports

    def matches(self, ip: str, port: int) -> bool:
        try:
            a = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if a.version != 4 or a not in self.net:
            return False
        return self.ports is None or self.ports[0] <= port <= self.ports[1]


@dataclass
class Server:
    host: Optional[str] = None
    port: int = 1080
    type: int = 5
    user: Optional[str] = None
    password: Optional[str] = field(default=None, repr=False)

    def url(self) -> str:
        auth = ""
        if self.user is not None:
            auth = quote(self.user, safe="")
            if self.password is not None:
                auth += ":" + quote(self.password, safe="")
            auth += "@"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"socks5://{auth}{host}:{self.port}"


@dataclass
class Path:
    reaches: List[Reach]
    server: Server


@dataclass
class TsocksConf:
    default: Optional[Server]
    local: List[Network]
    paths: List[Path]

    def default_url(self) -> Optional[str]:
        return self.default.url() if self.default is not None else None


def _network(text: str, where: str) -> Tuple[Network, Optional[Tuple[int, int]]]:
    try:
        addr, mask = text.split("/", 1)
    except ValueError:
        raise TsocksConfError(f"{where}: expected ADDRESS/MASK, got {text!r}") from None
    ports = None
    if ":" in addr:
        addr, prange = addr.split(":", 1)
        lo, _, hi = prange.partition("-")
        try:
            ports = (int(lo), int(hi or lo))
        except ValueError:
            raise TsocksConfError(f"{where}: bad port range {prange!r}") from None
        if not (0 < ports[0] <= ports[1] < 65536):
            raise TsocksConfError(f"{where}: bad port range {prange!r}")
    try:
        net = ipaddress.IPv4Network(f"{addr.strip()}/{mask.strip()}", strict=False)
    except ValueError as e:
        raise TsocksConfError(f"{where}: {e}") from None
    return net, ports


def _server_key(srv: Server, key: str, value: str, where: str) -> bool:
    if key == "server":
        srv.host = value
    elif key == "server_port":
        try:
            srv.port = int(value)
        except ValueError:
            raise TsocksConfError(f"{where}: server_port must be a number") from None
        if not 0 < srv.port < 65536:
            raise TsocksConfError(f"{where}: server_port out of range")
    elif key == "server_type":
        if value not in ("4", "5"):
            raise TsocksConfError(f"{where}: server_type must be 4 or 5")
        srv.type = int(value)
    elif key == "default_user":
        srv.user = value
    elif key == "default_pass":
        srv.password = value
    else:
        return False
    return True


def _check_server(srv: Server, where: str) -> None:
    if not srv.host:
        raise TsocksConfError(f"{where}: no server given")
    if srv.type == 4:
        raise TsocksConfError(f"{where}: server_type = 4 (SOCKS4) is not supported; nsvpn "
                              "speaks SOCKS5 only")


def parse_tsocks_conf(text: str, name: str = "tsocks.conf") -> TsocksConf:
    default = Server()
    local: List[Network] = []
    paths: List[Path] = []
    cur: Optional[Tuple[List[Reach], Server, int]] = None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        where = f"{name}:{n}"
        if not line:
            continue
        if line.replace(" ", "") == "path{":
            if cur is not None:
                raise TsocksConfError(f"{where}: path sections cannot nest")
            cur = ([], Server(), n)
            continue
        if line == "}":
            if cur is None:
                raise TsocksConfError(f"{where}: '}}' without a path section")
            reaches, srv, start = cur
            if not reaches:
                raise TsocksConfError(f"{name}:{start}: path section without 'reaches'")
            _check_server(srv, f"{name}:{start} (path)")
            paths.append(Path(reaches, srv))
            cur = None
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not value:
            raise TsocksConfError(f"{where}: expected 'key = value', got {raw.strip()!r}")
        if cur is not None:
            if key == "reaches":
                net, ports = _network(value, where)
                cur[0].append(Reach(net, ports))
            elif not _server_key(cur[1], key, value, where):
                raise TsocksConfError(f"{where}: unknown key {key!r} in a path section")
        elif key == "local":
            net, ports = _network(value, where)
            if ports is not None:
                raise TsocksConfError(f"{where}: 'local' takes no port")
            local.append(net)
        elif not _server_key(default, key, value, where):
            raise TsocksConfError(f"{where}: unknown key {key!r}")
    if cur is not None:
        raise TsocksConfError(f"{name}:{cur[2]}: path section is not closed")
    if default.host is None:
        return TsocksConf(None, local, paths)
    _check_server(default, f"{name} (default server)")
    return TsocksConf(default, local, paths)
