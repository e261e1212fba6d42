"""Trio driver for a sans-IO stack's timers (the relay and the VPN stack upstream share it).

The stack exposes its next deadline; run() sleeps until then and fires on_timer(). A stack call
can make an earlier deadline (a retransmission armed by new data), so its owner calls tighten()
after every call: that moves the sleeping scope's deadline forward instead of waking per packet.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import trio


class StackTimer:
    def __init__(self, stack, after_stack: Callable[[], None]) -> None:
        self.stack = stack
        self.after_stack = after_stack  # flush what on_timer() produced
        self._scope: Optional[trio.CancelScope] = None

    def tighten(self) -> None:
        scope = self._scope
        if scope is not None:
            d = self.stack.next_deadline()
            if d is not None and d < scope.deadline:
                scope.deadline = d

    async def run(self) -> None:
        st = self.stack
        while True:
            d = st.next_deadline()
            with trio.CancelScope(deadline=d if d is not None else math.inf) as scope:
                self._scope = scope
                await trio.sleep_forever()
            self._scope = None
            now = trio.current_time()
            d = st.next_deadline()
            if d is not None and d <= now:
                st.on_timer(now)
                self.after_stack()
