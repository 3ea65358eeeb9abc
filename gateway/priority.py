"""A capacity limiter that hands free slots to the waiter with the lowest priority value.

The drain ranks waiters by the scheduler's priority (gateway/scheduler.py): the selected checkpoint's
parts and PUTs go before those of others. Priorities change as checkpoints are committed, so a waiter
gives a function, and `reprioritize()` (after each scheduler pass) re-reads them all.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
from collections.abc import Callable
from typing import Any

import trio

PriorityFn = Callable[[], tuple]


class PriorityLimiter:
    def __init__(self, slots: int):
        self.free = slots
        self._waiters: list[list] = []  # heap of [priority, order, event, priority_fn]
        self._order = itertools.count()

    @contextlib.asynccontextmanager
    async def slot(self, priority: PriorityFn):
        await self.acquire(priority)
        try:
            yield
        finally:
            self.release()

    async def acquire(self, priority: PriorityFn) -> None:
        """Take a slot. A cancellation either leaves no slot taken or passes it on: never a leak."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self.free > 0 and not self._waiters:
            self.free -= 1
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        entry: list[Any] = [priority(), next(self._order), trio.Event(), priority]
        heapq.heappush(self._waiters, entry)
        try:
            await entry[2].wait()
        except BaseException:
            if entry[2].is_set():
                self.release()  # the slot was handed to us as we were cancelled: pass it on
            else:
                self._waiters.remove(entry)
                heapq.heapify(self._waiters)
            raise

    def release(self) -> None:
        if self._waiters:
            heapq.heappop(self._waiters)[2].set()  # hand the slot over directly
        else:
            self.free += 1

    def reprioritize(self) -> None:
        for entry in self._waiters:
            entry[0] = entry[3]()
        heapq.heapify(self._waiters)

    def statistics(self) -> dict:
        return {"free": self.free, "waiting": len(self._waiters)}
