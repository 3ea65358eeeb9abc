"""A capacity limiter that hands free slots to the waiter with the lowest priority value.

The drain uses it with the commit-order position as priority, so the parts and PUTs of earlier files
always go before those of later ones: under sustained overload the oldest pending checkpoint still
finishes first (a FIFO limiter let parts of later files starve an earlier commit marker).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools

import trio


class PriorityLimiter:
    def __init__(self, slots: int):
        self.free = slots
        self._waiters: list[tuple[tuple, int, trio.Event]] = []
        self._order = itertools.count()

    @contextlib.asynccontextmanager
    async def slot(self, priority: tuple):
        await self.acquire(priority)
        try:
            yield
        finally:
            self.release()

    async def acquire(self, priority: tuple) -> None:
        if self.free > 0 and not self._waiters:
            self.free -= 1
            await trio.lowlevel.checkpoint()
            return
        entry = (priority, next(self._order), trio.Event())
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

    def statistics(self) -> dict:
        return {"free": self.free, "waiting": len(self._waiters)}
