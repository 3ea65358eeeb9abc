"""gateway/retry.py: backoff on transient store errors only; and a fetch survives a 503 on its HEAD."""

from __future__ import annotations

import random

import pytest
import trio

from gateway.errors import StoreError
from gateway.retry import retrying
from tests.test_faults import TargetedProxy, error_503


class Flaky:
    """Fails with the given errors, in order, then answers "ok"."""

    def __init__(self, *errors: StoreError):
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


@pytest.mark.trio
async def test_transient_errors_are_retried_with_growing_waits():
    call = Flaky(StoreError("503", transient=True), StoreError("reset", transient=True))
    seen = []
    started = trio.current_time()
    assert await retrying("GET k", call, on_retry=lambda exc, n, delay: seen.append((str(exc), n, delay))) == "ok"
    assert call.calls == 3
    assert [(e, n) for e, n, _ in seen] == [("503", 1), ("reset", 2)]
    assert 0.1 <= seen[0][2] <= 0.2 and 0.2 <= seen[1][2] <= 0.4  # base 0.2 s, doubled, jitter in [0.5, 1]
    assert trio.current_time() - started >= seen[0][2] + seen[1][2]


@pytest.mark.trio
async def test_permanent_error_is_raised_at_once():
    call = Flaky(StoreError("403", transient=False))
    with pytest.raises(StoreError, match="403"):
        await retrying("PUT k", call)
    assert call.calls == 1


@pytest.mark.trio
async def test_last_transient_error_is_raised_after_the_attempts():
    call = Flaky(*[StoreError(f"503 #{i}", transient=True) for i in range(5)])
    with pytest.raises(StoreError, match="503 #2"):
        await retrying("GET k", call, attempts=3)
    assert call.calls == 3


@pytest.fixture
def proxy(s3_server):
    p = TargetedProxy(upstream=s3_server.endpoint_url, seed=1).start()
    try:
        yield p
    finally:
        p.stop()


def test_read_of_bucket_only_file_survives_503_on_head(make_mount, proxy):
    m = make_mount(endpoint_url=proxy.endpoint_url, start=False)
    data = random.randbytes(3 * 1024 * 1024)
    m.s3.boto3_client().put_object(Bucket=m.bucket, Key=f"{m.prefix}/restore.bin", Body=data)
    m.start()  # a fresh node: the file is known from the listing only, its read fetches it
    hit = proxy.target(lambda method, path, query: method == "HEAD" and path.endswith("/restore.bin"),
                       error_503, count=2)
    assert (m.path / "restore.bin").read_bytes() == data
    assert hit["hits"] == 2, "the HEAD of the fetch was not answered 503 twice: the test checked nothing"
    assert m.status()["fetch_retries_total"] == 2
