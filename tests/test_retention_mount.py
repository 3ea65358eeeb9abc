"""Retention on a real mount whose endpoint is slower than the disk (FaultProxy bandwidth cap).

Several checkpoints pile up locally while the drain uploads; a watcher lists the bucket over the
whole run. Retention must delete a superseded checkpoint before any of it reaches the bucket, follow
durability without new commits, keep what EveryNSeconds / BestN promise, and leave the bucket with
exactly the kept set once the drain settles.
"""

import logging
import os
import re
import time

import pytest
import torch

from mount import BestN, ContinuousCheckpointer, LatestN
from tests.bucket_watch import BucketWatcher
from tests.support.faultproxy import FaultProxy

STATE_ELEMS = 3 << 20  # 12 MiB of float32 per checkpoint: 3 multipart parts, about 3 s at the cap
CAP = 4_000_000
OPTIONS = ("--drain-delay", "0.2", "--part-size", "5MiB")


@pytest.fixture
def slow_mount(s3_server, make_mount):
    with FaultProxy(upstream=s3_server.endpoint_url) as proxy:
        proxy.set_bandwidth(CAP)
        yield make_mount(endpoint_url=proxy.endpoint_url, options=OPTIONS)


def state(step):
    return {"w": torch.full((STATE_ELEMS,), float(step)), "step": step}


def step_of(key):
    m = re.match(r"ckpts/step_(\d+)/", key)
    return int(m.group(1)) if m else None


def bucket_steps(keys):
    """Steps with a COMMIT in `keys` (a complete checkpoint: COMMIT is published after its data)."""
    return {step_of(k) for k in keys if k.endswith("/COMMIT")}


def local_steps(path):
    return sorted(int(n[5:]) for n in os.listdir(path) if n.startswith("step_"))


def superseded_steps(caplog):
    return {int(m.group(1)) for r in caplog.records
            if (m := re.search(r"deleting checkpoint step (\d+) \(superseded", r.getMessage()))}


def assert_markers_never_early(watcher, steps):
    for step in steps:
        data = {f"ckpts/step_{step}/state.pt"}
        assert not watcher.marker_violations(f"ckpts/step_{step}/COMMIT", data), f"step {step}: COMMIT early"
    assert not watcher.keys_matching("*.tmp", "*.tmp.*"), "a temporary name reached the bucket"


def test_a_superseded_checkpoint_never_reaches_the_bucket(slow_mount, caplog):
    m = slow_mount
    caplog.set_level(logging.INFO, logger="mount.checkpointer")
    with BucketWatcher(m.s3.boto3_client(), m.bucket, m.prefix, interval_s=0.02) as watcher:
        ckpt = ContinuousCheckpointer(m.path / "ckpts", keep=LatestN(2), durability_poll_s=0.1)
        for step in range(1, 9):  # 8 checkpoints in well under a second; the drain needs ~8 s for all
            ckpt.save(step, state(step))
        ckpt.close(durable_timeout=120)
        m.wait(timeout=120)
        time.sleep(0.2)
    superseded = superseded_steps(caplog)
    assert len(superseded) >= 3, f"expected the drain to skip ahead to the newest; superseded {superseded}"
    seen = watcher.ever_seen()
    assert not bucket_steps(seen) & superseded, "a superseded checkpoint was complete in the bucket"
    partly = {step_of(k) for k in seen} & superseded
    # The drain does not preempt: the scope it is uploading (and the one filling its gaps) may
    # finish their data before a newer checkpoint is durable; that data is deleted, never committed.
    assert len(partly) <= 2, f"data of superseded steps {sorted(partly)} reached the bucket"
    assert len(superseded - partly) >= 3, "superseded checkpoints whose upload had not started must never appear"
    assert bucket_steps(m.keys()) == {7, 8}
    assert local_steps(m.path / "ckpts") == [7, 8]
    assert_markers_never_early(watcher, range(1, 9))


def test_retention_follows_durability_and_close_leaves_the_kept_set(slow_mount):
    m = slow_mount
    ckpt = ContinuousCheckpointer(m.path / "ckpts", keep=LatestN(2), durability_poll_s=0.1)
    for step in range(1, 6):
        ckpt.save(step, state(step))
    assert local_steps(m.path / "ckpts") == [1, 2, 3, 4, 5]  # nothing durable yet: all kept
    ckpt.wait_durable(5, timeout=120)
    deadline = time.monotonic() + 10  # no commit since: the polling thread runs retention
    while local_steps(m.path / "ckpts") != [4, 5] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert local_steps(m.path / "ckpts") == [4, 5]
    ckpt.save(6, state(6))
    ckpt.close(durable_timeout=120)  # waits for 6, then the last pass deletes 4
    assert local_steps(m.path / "ckpts") == [5, 6]
    m.wait(timeout=120)
    assert bucket_steps(m.keys()) == {5, 6}
    assert {step_of(k) for k in m.keys()} == {5, 6}


def test_best_n_keeps_an_old_checkpoint_and_it_reaches_the_bucket(slow_mount):
    m = slow_mount
    losses = {1: 0.9, 2: 0.1, 3: 0.8, 4: 0.7, 5: 0.6, 6: 0.5}
    ckpt = ContinuousCheckpointer(m.path / "ckpts", keep=BestN("loss", 1) | LatestN(1),
                                  durability_poll_s=0.1)
    for step, loss in losses.items():
        ckpt.save(step, state(step), metrics={"loss": loss})
    ckpt.close(durable_timeout=120)
    m.wait(timeout=120)
    assert local_steps(m.path / "ckpts") == [2, 6]
    assert bucket_steps(m.keys()) == {2, 6}  # 2 is uploaded although 6 is newer and durable
