"""Unit tier against a real moto server: at mount, objects the journal records but the bucket lacks
(a delete the drain published before a power loss rolled the unlink back) are noticed and repaired."""

from __future__ import annotations

import logging
import os
import stat

import pytest

from gateway.cache import CacheFiles
from gateway.journal import Journal
from gateway.listing import BucketListing
from gateway.namespace import ROOT_INODE, Namespace
from gateway.store import Store

pytestmark = pytest.mark.trio
FILE = stat.S_IFREG | 0o644


def published(ns: Namespace, name: bytes, *, cached: bool) -> int:
    ino = ns.create(ROOT_INODE, name, FILE, 0, 0).id
    ns.journal.execute("UPDATE inodes SET size=3, content_dirty=0, state='durable', ready_seq=1, cached=? WHERE id=?",
                       (int(cached), ino))
    ns.journal.execute("INSERT INTO objects (key, inode, size) VALUES (?, ?, 3)", (name.decode(), ino))
    return ino


async def test_objects_missing_from_the_bucket_are_uploaded_again(tmp_path, s3_server, bucket, caplog):
    s3_server.boto3_client().put_object(Bucket=bucket, Key="p/there", Body=b"abc")
    journal = Journal(tmp_path / "journal.db")
    cache = CacheFiles(tmp_path)
    ns = Namespace(journal, uid=os.getuid(), gid=os.getgid(), on_purge=cache.remove)
    there = published(ns, b"there", cached=True)
    gone = published(ns, b"gone", cached=True)
    gone_remote = published(ns, b"gone_remote", cached=False)
    async with Store(bucket, "p", endpoint_url=s3_server.endpoint_url) as store:
        with caplog.at_level(logging.WARNING, logger="gateway.listing"):
            assert await BucketListing(ns, store, 60).sync_once(reconcile=True) == 0
    assert ns.getattr(there).durable and ns.remote_key(there) == "there"
    g = ns.getattr(gone)
    assert not g.durable and g.content_dirty and g.ready_seq is not None, "a cached file must be uploaded again"
    assert ns.remote_key(gone) is None and ns.remote_key(gone_remote) is None
    assert "'gone_remote' is missing from the bucket and its file is not cached" in caplog.text
    journal.close()
