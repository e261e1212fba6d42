"""Per-destination upstreams (tsocks.conf `path` sections): a route's networks use its upstream,
everything else the default one. Same interface as the other upstreams."""

from __future__ import annotations

import errno
from typing import Callable, List, Sequence, Tuple

import trio

from .base import DialError, UpstreamError

Matcher = Callable[[str, int], bool]


class RoutedUpstream:
    def __init__(self, default, routes: Sequence[Tuple[Matcher, object]]):
        self.default = default
        self.routes: List[Tuple[Matcher, object]] = list(routes)
        self.name = " + ".join([default.name] + [u.name for _, u in self.routes])

    @property
    def healthy(self) -> bool:
        return self.default.healthy

    @property
    def upstreams(self) -> list:
        """Every upstream (status output walks this, like UpstreamPool.upstreams)."""
        return [self.default] + [u for _, u in self.routes]

    async def start(self) -> None:
        """All must come up: a path that is down at start is a configuration problem."""
        errors: List[str] = []

        async def one(up) -> None:
            try:
                await up.start()
            except UpstreamError as e:
                errors.append(str(e))

        async with trio.open_nursery() as n:
            for up in self.upstreams:
                n.start_soon(one, up)
        if errors:
            await self.aclose()
            raise UpstreamError("; ".join(errors))

    def pick(self, host: str, port: int):
        for match, up in self.routes:
            if match(host, port):
                return up
        return self.default

    async def dial_tcp(self, host: str, port: int, *, timeout: float) -> trio.abc.Stream:
        return await self.pick(host, port).dial_tcp(host, port, timeout=timeout)

    @property
    def carries_udp(self) -> bool:
        return any(getattr(u, "carries_udp", False) for u in self.upstreams)

    @property
    def dials_plain_tcp(self) -> bool:
        return any(getattr(u, "dials_plain_tcp", False) for u in self.upstreams)

    async def udp_associate(self, host: str, port: int, *, timeout: float):
        up = self.pick(host, port)
        if not getattr(up, "carries_udp", False):
            raise DialError(errno.EOPNOTSUPP, f"{up.name} does not relay UDP")
        return await up.udp_associate(host, port, timeout=timeout)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            for up in self.upstreams:
                await up.aclose()
