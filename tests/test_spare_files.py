"""Unit tier for the spare data files (gateway/spare_files.py) and their use by CacheFiles.create_empty."""

from __future__ import annotations

import os

import pytest
import trio

from gateway import spare_files
from gateway.cache import CacheFiles
from gateway.spare_files import SpareFiles


async def filled(spares: SpareFiles) -> None:
    with trio.fail_after(10):
        while len(spares) < spares.target:
            await trio.sleep(0.01)


@pytest.mark.trio
async def test_pool_fills_in_a_worker_thread_and_hands_out_empty_files(tmp_path):
    spares = SpareFiles(tmp_path / "spare", target=8)
    assert spares.take() is None and spares.missed == 1
    async with trio.open_nursery() as nursery:
        nursery.start_soon(spares.run)
        await filled(spares)
        taken = [spares.take() for _ in range(8)]
        assert all(p is not None and p.stat().st_size == 0 for p in taken)
        assert len(set(taken)) == 8
        await filled(spares)  # refilled after it fell below half
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_files_are_taken_only_from_finished_batches(tmp_path):
    spares = SpareFiles(tmp_path / "spare", target=4)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(spares.run)
        await filled(spares)
        first = [spares.take() for _ in range(4)]  # the last take finds it below half: a refill
        for n, path in enumerate(first):  # what the cache does with them
            path.rename(tmp_path / f"data{n}")
        await filled(spares)
        second = [spares.take() for _ in range(4)]
        await filled(spares)
        nursery.cancel_scope.cancel()
    assert {p.parent.name for p in first} == {"b1"} and {p.parent.name for p in second} == {"b2"}
    assert not (tmp_path / "spare" / "b1").exists(), "an emptied batch is removed by the next refill"


def test_spares_left_by_a_previous_run_are_adopted_and_strangers_left_alone(tmp_path):
    batch = tmp_path / "spare" / "b3"
    batch.mkdir(parents=True)
    for name in ("s0", "s1"):
        (batch / name).touch()
    (batch / "s2").write_bytes(b"not empty")  # never made by the pool: never handed out
    (batch / "notes").touch()
    spares = SpareFiles(tmp_path / "spare", target=4)
    assert len(spares) == 2
    assert {spares.take().name, spares.take().name} == {"s0", "s1"}
    assert spares.take() is None


@pytest.mark.trio
async def test_create_empty_renames_a_spare_over_a_stale_data_file(tmp_path):
    cache = CacheFiles(tmp_path)
    stale = cache.path(42)
    stale.write_bytes(b"x" * 10000)  # a crash left the data file of a number given out again
    used = cache.used_bytes
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cache.spares.run)
        await filled(cache.spares)
        nursery.cancel_scope.cancel()
    cache.create_empty(42)
    assert stale.stat().st_size == 0
    assert cache.used_bytes < used and cache.spares.taken == 1
    fd = cache.acquire(42)
    assert os.fstat(fd).st_size == 0
    cache.release(42)


def test_create_empty_without_spares_makes_the_file_itself(tmp_path):
    cache = CacheFiles(tmp_path)
    cache.path(7).write_bytes(b"stale")
    cache.create_empty(7)
    assert cache.path(7).stat().st_size == 0 and cache.spares.missed == 1


@pytest.mark.trio
async def test_a_failed_refill_is_logged_once_and_retried(tmp_path, caplog, monkeypatch):
    # A real clock, with a short retry: the refill runs in a worker thread, which trio's autojump
    # clock counts as idle, so under load the poll below ran its virtual 10 s out while the thread
    # was still making the batch.
    monkeypatch.setattr(spare_files, "RETRY_AFTER_S", 0.05)
    spares = SpareFiles(tmp_path / "spare", target=4)
    (tmp_path / "spare" / "b1").write_bytes(b"")  # the first batch directory cannot be made
    async with trio.open_nursery() as nursery:
        nursery.start_soon(spares.run)
        await filled(spares)  # the retry makes batch b2
        nursery.cancel_scope.cancel()
    warnings = [r for r in caplog.records if "spare data files" in r.getMessage()]
    assert len(warnings) == 1 and {p.parent.name for p in [spares.take()]} == {"b2"}
