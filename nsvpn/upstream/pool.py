"""Failover across several upstreams (`--via A --via B ...`).

A dial goes to the first usable upstream (policy "first", the default) or to the next one in
turn ("round-robin"). When an upstream fails with reason "upstream-down" (its ssh is
restarting, the proxy does not answer, ...) it is skipped for a backoff period (2 s doubling up
to 30 s, reset by a success) and the dial moves on to the next one. Answers about the
destination itself (refused, unreachable, timeout) are final: another upstream reaching the
same destination would get the same answer, and retrying would only multiply the wait.
"""

from __future__ import annotations

import errno
import logging
from typing import Any, Awaitable, Callable, Dict, List, Sequence

import trio

from .base import DialError, Upstream, UpstreamError, upstream_down

log = logging.getLogger("nsvpn.upstream.pool")

BACKOFF_FIRST = 2.0
BACKOFF_MAX = 30.0


class UpstreamPool:
    def __init__(
        self, upstreams: Sequence[Upstream], policy: str = "first", name: str | None = None
    ):
        if not upstreams:
            raise ValueError("an upstream pool needs at least one upstream")
        if policy not in ("first", "round-robin"):
            raise ValueError(f"unknown upstream policy {policy!r}")
        self.upstreams: List[Upstream] = list(upstreams)
        self.policy = policy
        self.name = name or " | ".join(u.name for u in self.upstreams)
        self._down_until: Dict[int, float] = {}
        self._backoff: Dict[int, float] = {}
        self._next = 0
        self.start_errors: Dict[str, str] = {}

    @classmethod
    def from_urls(
        cls, urls: Sequence[str], *, ssh_opts: Sequence[str] = (), policy: str = "first", **ssh_kw
    ) -> UpstreamPool:
        """One pool for `--via` URLs (ssh:// and socks5://; openconnect is bridged elsewhere)."""
        from ..urls import OpenconnectUpstreamUrl, Socks5UpstreamUrl, parse_upstream_url
        from .socks5 import Socks5Upstream
        from .ssh import SshUpstream

        ups: List[Upstream] = []
        for i, text in enumerate(urls):
            url = parse_upstream_url(text)
            if isinstance(url, Socks5UpstreamUrl):
                ups.append(Socks5Upstream.from_url(url))
            elif isinstance(url, OpenconnectUpstreamUrl):
                raise ValueError(f"{url}: openconnect upstreams are not SOCKS dialers")
            else:
                ups.append(SshUpstream(url, ssh_opts=ssh_opts, index=i, **ssh_kw))
        return cls(ups, policy=policy)

    @property
    def healthy(self) -> bool:
        return any(u.healthy for u in self.upstreams)

    async def start(self) -> None:
        """Start all upstreams concurrently; fine as long as one of them comes up."""
        errors: Dict[int, str] = {}

        async def one(i: int, up: Upstream) -> None:
            try:
                await up.start()
            except UpstreamError as exc:
                errors[i] = str(exc)

        async with trio.open_nursery() as n:
            for i, up in enumerate(self.upstreams):
                n.start_soon(one, i, up)
        self.start_errors = {self.upstreams[i].name: e for i, e in errors.items()}
        if len(errors) == len(self.upstreams):
            raise UpstreamError("; ".join(errors[i] for i in sorted(errors)))
        for i, e in errors.items():
            log.warning("upstream %s failed to start: %s", self.upstreams[i].name, e)
            self._mark_down(i)

    def _mark_down(self, i: int) -> None:
        b = self._backoff.get(i, BACKOFF_FIRST / 2) * 2
        b = min(b, BACKOFF_MAX)
        self._backoff[i] = b
        self._down_until[i] = trio.current_time() + b

    def _order(self) -> List[int]:
        n = len(self.upstreams)
        start = 0
        if self.policy == "round-robin":
            start = self._next
            self._next = (self._next + 1) % n
        idx = [(start + k) % n for k in range(n)]
        now = trio.current_time()
        usable = [i for i in idx if self.upstreams[i].healthy and self._down_until.get(i, 0) <= now]
        # The rest last: a dial through a "down" upstream is a fast failure, and it may be back.
        return usable + [i for i in idx if i not in usable]

    async def dial_tcp(self, host: str, port: int, *, timeout: float) -> trio.abc.Stream:
        return await self._first_usable(
            lambda up, left: up.dial_tcp(host, port, timeout=left), timeout)

    @property
    def carries_udp(self) -> bool:
        return any(getattr(u, "carries_udp", False) for u in self.upstreams)

    @property
    def dials_plain_tcp(self) -> bool:
        return any(getattr(u, "dials_plain_tcp", False) for u in self.upstreams)

    async def udp_associate(self, host: str, port: int, *, timeout: float):
        """A UDP association from the first usable upstream that relays UDP (ssh -D does
        not); failover as for dial_tcp."""
        return await self._first_usable(
            lambda up, left: up.udp_associate(host, port, timeout=left), timeout, udp=True)

    async def _first_usable(self, attempt: Callable[[Any, float], Awaitable[Any]],
                            timeout: float, *, udp: bool = False) -> Any:
        """attempt(upstream, time left) on each upstream in turn until one is not down.
        udp: only upstreams that relay UDP; one that turns out not to is skipped."""
        deadline = trio.current_time() + timeout
        failures: List[str] = []
        timed_out = False
        for i in self._order():
            up = self.upstreams[i]
            if udp and not getattr(up, "carries_udp", False):
                continue
            left = deadline - trio.current_time()
            if left <= 0:
                timed_out = True
                break
            try:
                result = await attempt(up, left)
            except DialError as exc:
                if exc.reason != "upstream-down":
                    if udp and exc.errno == errno.EOPNOTSUPP:
                        continue  # this one has no UDP after all: the next may
                    raise
                failures.append(f"{up.name}: {exc.message or exc}")
                self._mark_down(i)
                continue
            self._down_until.pop(i, None)
            self._backoff.pop(i, None)
            return result
        if udp and not failures and not timed_out:
            raise DialError(errno.EOPNOTSUPP, "no upstream relays UDP")
        raise upstream_down(f"no upstream usable{' for UDP' if udp else ''}: "
                            + "; ".join(failures or ["timed out"]))

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            for up in self.upstreams:
                try:
                    await up.aclose()
                except Exception:  # one broken upstream must not keep the others running
                    log.exception("closing %s", up.name)
