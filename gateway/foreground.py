"""FUSE requests go first: while an application writes, the drain's requests start more slowly.

The drain and the FUSE handlers share one trio thread, and an S3 request costs that thread about
3-6 ms of CPU in aiobotocore and httpx. Thirty-two small uploads in flight left a create(2) one turn
in thirty-three (1,000 small files: 0.07x a plain directory's rate while they uploaded). Writes are
what the training loop waits for, and the drain is asynchronous by design; so while writes and
other changes arrive (one within BUSY_WINDOW_S), single-request uploads (PUTs) start at most one
per SPACING_S. When the application pauses, the drain runs at full speed again at once. Status
counts the time drain requests waited (`drain_yielded_seconds_total`).

Multipart parts are not held back. Limiting the parts in flight while a 1 GiB file was written
gave 0.20 (2 of 8 parts) and 0.27 (1 of 8) of the idle write speed against 0.18 unlimited, within
this machine's noise; 0.38 with no new part at all, which would stop a drain for as long as an
application writes (PERFORMANCE.md, "Writing while a file drains").
"""

from __future__ import annotations

import math

import trio

BUSY_WINDOW_S = 0.05  # FUSE counts as busy this long after its last mutating request or read
SPACING_S = 0.02      # while busy, drain requests start at most this often


class Foreground:
    def __init__(self, busy_window_s: float = BUSY_WINDOW_S, spacing_s: float = SPACING_S):
        self.busy_window_s = busy_window_s
        self.spacing_s = spacing_s
        self.last_request = -math.inf
        self.yielded_s = 0.0
        self._next_start = -math.inf

    def note_request(self) -> None:
        """A FUSE request that an application waits on (called by the FUSE layer)."""
        self.last_request = trio.current_time()

    def busy(self) -> bool:
        return trio.current_time() - self.last_request < self.busy_window_s

    async def turn(self) -> None:
        """Before a drain request: return at once when FUSE is idle; while it is busy, when this
        request's start (SPACING_S after the previous one) comes, or FUSE goes idle."""
        now = trio.current_time()
        if not self.busy():
            return
        start = max(now, self._next_start)
        self._next_start = start + self.spacing_s
        began = now
        while now < start and self.busy():
            await trio.sleep(min(start - now, self.busy_window_s))
            now = trio.current_time()
        self.yielded_s += now - began
