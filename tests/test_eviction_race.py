"""Unit tier against a real moto server: a file fetched for open/truncate is not evicted before the
handler uses it (FUSE handlers called directly, no mount).

The race: the fetch finishes, and before the handler resumes another request needs room and evicts
the file. It is made deterministic by running one eviction right after `ensure_local` returns.
"""

from __future__ import annotations

import os
import random
import types

import pytest
import trio

from gateway.cache import CacheFiles
from gateway.fs import Operations
from gateway.journal import Journal
from gateway.listing import BucketListing
from gateway.namespace import ROOT_INODE, Namespace
from gateway.reader import Reader
from gateway.space import SpaceGuard
from gateway.store import Store

pytestmark = pytest.mark.trio
DATA = random.randbytes(256 * 1024)


class RacingEviction:
    """ensure_local, then an eviction of everything evictable, as a concurrent writer would cause."""

    def __init__(self, reader: Reader, space: SpaceGuard):
        self.inner = reader.ensure_local
        self.space = space
        self.evictions_seen = 0

    async def __call__(self, ino: int, *, whole: bool = False) -> None:
        await self.inner(ino, whole=whole)
        before = self.space.evictions
        self.space.evict(0)
        self.evictions_seen += self.space.evictions - before


@pytest.fixture
async def gateway(tmp_path, s3_server, bucket, nursery):
    s3_server.boto3_client().put_object(Bucket=bucket, Key="p/f", Body=DATA)
    journal = Journal(tmp_path / "journal.db")
    cache = CacheFiles(tmp_path)
    ns = Namespace(journal, uid=os.getuid(), gid=os.getgid(), on_purge=cache.remove)
    async with Store(bucket, "p", endpoint_url=s3_server.endpoint_url) as store:
        await BucketListing(ns, store, 60).sync_once()  # `f` is known from the bucket only
        space = SpaceGuard(ns, cache, drain=None, limit_bytes=1 << 30, high=0.9, low=0.75, timeout_s=1)
        reader = Reader(ns, cache, store, nursery, space)
        space.reader = reader
        race = RacingEviction(reader, space)
        reader.ensure_local = race
        ops = Operations(ns, cache, control=None, reader=reader, space=space)
        yield ops, ns.child_id(ROOT_INODE, b"f"), race
    journal.close()


async def test_file_fetched_by_open_is_not_evicted_before_the_handle(gateway):
    ops, ino, race = gateway
    info = await ops.open(ino, os.O_RDWR, None)
    await ops.write(info.fh, 0, b"Z")
    assert await ops.read(info.fh, 0, len(DATA)) == b"Z" + DATA[1:], "the write went to an evicted file"
    await ops.release(info.fh)


async def test_file_fetched_by_truncate_is_not_evicted_before_the_truncate(gateway):
    ops, ino, race = gateway
    attr = types.SimpleNamespace(st_size=1000)
    fields = types.SimpleNamespace(update_size=True, update_mode=False, update_uid=False, update_gid=False,
                                   update_atime=False, update_mtime=False)
    await ops.setattr(ino, attr, fields, None, None)
    info = await ops.open(ino, os.O_RDONLY, None)
    assert await ops.read(info.fh, 0, len(DATA)) == DATA[:1000]
    await ops.release(info.fh)


async def test_the_race_is_real_once_the_file_is_closed(gateway):
    """Without a pin (nothing open, nothing awaiting), the same eviction does happen."""
    ops, ino, race = gateway
    info = await ops.open(ino, os.O_RDONLY, None)
    assert await ops.read(info.fh, 0, len(DATA)) == DATA
    await ops.release(info.fh)
    race.space.evict(0)
    assert race.space.evictions == 1
