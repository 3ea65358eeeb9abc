"""One retry policy for requests to the bucket: exponential backoff with jitter, transient errors only.

`await retrying("HEAD key", lambda: store.head_object(key))` calls again after a transient
`StoreError` (5xx, throttling, a reset connection), waiting `base_s * 2**(n-1)` (capped at MAX_S)
times a random factor in [0.5, 1]; a permanent error, or the last attempt's error, is raised as
itself. `on_retry(exc, attempt, delay_s)` is called before each wait (counters, log lines). The
drain, the reader and start-up use it; botocore's own retries are off (gateway/store.py).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from gateway.errors import StoreError

log = logging.getLogger(__name__)

T = TypeVar("T")
ATTEMPTS = 8
BASE_S = 0.2
MAX_S = 30.0
OnRetry = Callable[[StoreError, int, float], None]


def backoff_s(attempt: int, base_s: float = BASE_S, max_s: float = MAX_S) -> float:
    """The wait after failed attempt number `attempt` (1-based), with jitter."""
    return min(max_s, base_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


async def retrying(what: str, call: Callable[[], Awaitable[T]], attempts: int = ATTEMPTS, *,
                   base_s: float = BASE_S, on_retry: OnRetry | None = None) -> T:
    """`await call()`, retried on transient StoreError up to `attempts` calls in all."""
    for attempt in range(1, attempts + 1):
        try:
            return await call()
        except StoreError as exc:
            if not exc.transient or attempt >= attempts:
                raise
            delay = backoff_s(attempt, base_s)
            if on_retry is not None:
                on_retry(exc, attempt, delay)
            log.info("%s failed (%s); retry %d in %.1fs", what, exc, attempt, delay)
            await trio.sleep(delay)
    raise AssertionError("unreachable: attempts must be at least 1")
