"""ContinuousCheckpointer retention triggers on a plain directory, with an injected durability probe.

Retention runs after a local commit, when the newest durable step advances (the checkpointer's
polling thread), and at close(); the real-mount counterparts are in test_retention_mount.py.
"""

import os
import threading
import time

import torch

from mount import ContinuousCheckpointer, EveryNSeconds, LatestN


class FakeBucket:
    """A durability probe: the steps in `durable` count as uploaded; counts the probes."""

    def __init__(self):
        self.durable: set[int] = set()
        self.asked = 0

    def __call__(self, path):
        self.asked += 1
        return int(os.path.basename(path).split("_")[1]) in self.durable


def dirs(path):
    return sorted(int(n.split("_")[1]) for n in os.listdir(path) if n.startswith("step_"))


def wait_for(cond, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def save_steps(ckpt, steps):
    for step in steps:
        assert ckpt.maybe_save(step, {"x": torch.tensor(step)})
        ckpt.wait_local()


def test_retention_follows_durability_without_a_new_commit(tmp_path):
    bucket = FakeBucket()
    with ContinuousCheckpointer(tmp_path, keep=LatestN(2), probe=bucket, durability_poll_s=0.05) as ckpt:
        save_steps(ckpt, range(1, 7))
        assert dirs(tmp_path) == [1, 2, 3, 4, 5, 6]  # nothing durable: nothing may go
        bucket.durable.add(6)  # the drain uploaded the newest first
        assert wait_for(lambda: dirs(tmp_path) == [5, 6]), dirs(tmp_path)
        st = ckpt.statistics()
        assert st.deleted == 4 and st.superseded == 4 and st.last_durable_step == 6


def test_polling_stops_when_nothing_is_pending(tmp_path):
    bucket = FakeBucket()
    with ContinuousCheckpointer(tmp_path, keep=LatestN(2), probe=bucket, durability_poll_s=0.02) as ckpt:
        save_steps(ckpt, [1, 2])
        bucket.durable.update({1, 2})
        assert wait_for(lambda: ckpt.statistics().last_durable_step == 2)
        asked = bucket.asked
        time.sleep(0.3)
        assert bucket.asked == asked  # no probe while every committed checkpoint is durable


def test_close_waits_for_the_newest_and_leaves_exactly_the_kept_set(tmp_path):
    bucket = FakeBucket()
    ckpt = ContinuousCheckpointer(tmp_path, keep=LatestN(2), probe=bucket, durability_poll_s=0.05)
    save_steps(ckpt, [1, 2])
    bucket.durable.update({1, 2})
    save_steps(ckpt, [3, 4, 5])
    assert dirs(tmp_path) == [2, 3, 4, 5]  # 2 is the newest durable one
    threading.Timer(0.3, lambda: bucket.durable.update({4, 5})).start()
    ckpt.close(durable_timeout=10)
    assert dirs(tmp_path) == [4, 5]


def test_close_without_waiting_keeps_the_newest_durable(tmp_path):
    bucket = FakeBucket()
    ckpt = ContinuousCheckpointer(tmp_path, keep=LatestN(1), probe=bucket, durability_poll_s=10)
    save_steps(ckpt, [1, 2, 3])
    bucket.durable.update({1, 2})  # no poll within the test: only close() sees it
    ckpt.close()
    assert dirs(tmp_path) == [2, 3]


def test_a_checkpointer_that_only_restores_never_deletes(tmp_path):
    with ContinuousCheckpointer(tmp_path) as ckpt:
        save_steps(ckpt, [1, 2, 3])
    bucket = FakeBucket()
    bucket.durable.update({1, 2, 3})
    reader = ContinuousCheckpointer(tmp_path, keep=LatestN(1), probe=bucket, durability_poll_s=0.02)
    assert reader.restore(1)[0] == 1
    time.sleep(0.2)
    reader.close()
    assert dirs(tmp_path) == [1, 2, 3]


def test_every_n_seconds_keeps_an_old_pending_checkpoint(tmp_path):
    bucket = FakeBucket()
    with ContinuousCheckpointer(tmp_path, keep=EveryNSeconds(3600) | LatestN(1), probe=bucket,
                                durability_poll_s=0.05) as ckpt:
        save_steps(ckpt, range(1, 5))
        bucket.durable.add(4)
        assert wait_for(lambda: dirs(tmp_path) == [1, 4]), dirs(tmp_path)  # 1: first of its hour
