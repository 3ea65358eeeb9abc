"""One retry policy for requests to the bucket: exponential backoff with jitter, transient errors only.

The drain, the reader and start-up use it; botocore's own retries are off (gateway/store.py).
"""

from __future__ import annotations

import logging
import random
from typing import Awaitable, Callable, TypeVar

import trio

from gateway.errors import StoreError

log = logging.getLogger(__name__)

T = TypeVar("T")
ATTEMPTS = 8
BASE_S = 0.2
MAX_S = 30.0


def backoff_s(attempt: int, base_s: float = BASE_S, max_s: float = MAX_S) -> float:
    """The pause before retry `attempt` (1, 2, ...): doubling from `base_s`, capped, with jitter."""
    return min(max_s, base_s * 2 ** attempt) * random.uniform(0.5, 1.0)


async def retrying(what: str, call: Callable[[], Awaitable[T]], *, attempts: int = ATTEMPTS,
                   base_s: float = BASE_S, on_retry: Callable[[StoreError], None] | None = None) -> T:
    """`await call()`, retried on transient StoreErrors up to `attempts` times in all."""
    for attempt in range(1, attempts + 1):
        try:
            return await call()
        except StoreError as exc:
            if not exc.transient or attempt == attempts:
                raise
            if on_retry is not None:
                on_retry(exc)
            delay = backoff_s(attempt, base_s)
            log.info("%s failed (%s); retry %d in %.1fs", what, exc, attempt, delay)
            await trio.sleep(delay)
    raise AssertionError("unreachable")
