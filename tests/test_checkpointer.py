"""t6 frameworks: ContinuousCheckpointer with torch.save on a plain directory (no gateway).

Without the gateway xattr a locally committed checkpoint counts as durable; the
tests that need "not durable yet" inject a durability probe.
"""

import errno
import json
import logging
import os
import threading
import time

import pytest
import torch

from mount import (BestN, CheckpointError, Continuous, ContinuousCheckpointer, FixedInterval,
                   LatestN, NoCheckpointError, read_commit)
from mount.formats import TorchFormat


class GatedFormat(TorchFormat):
    """torch.save that waits for `release` before writing (so a save stays in flight)."""

    def __init__(self):
        self.started = threading.Event()
        self.release = threading.Event()

    def write(self, step_dir, state, ctx):
        self.started.set()
        assert self.release.wait(30), "test never released the writer"
        return super().write(step_dir, state, ctx)


class SlowFormat(TorchFormat):
    def __init__(self, delay):
        self.delay = delay

    def write(self, step_dir, state, ctx):
        time.sleep(self.delay)
        return super().write(step_dir, state, ctx)


class FailingFormat(TorchFormat):
    def __init__(self):
        self.fail = True

    def write(self, step_dir, state, ctx):
        if self.fail:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(step_dir, state, ctx)


def make_state(mb=4):
    n = mb * (1 << 20) // 4
    return {"model": {"w": torch.randn(n), "b": torch.zeros(7)},
            "optim": {"step": 0, "lr": 1e-3, "moments": [torch.ones(5), torch.full((3,), 2.0)]},
            "tag": "run1"}


def assert_state_equal(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_state_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_state_equal(x, y)
    else:
        assert a == b


def test_round_trip_layout_and_commit_marker(tmp_path):
    state = make_state()
    with ContinuousCheckpointer(tmp_path) as ckpt:
        assert ckpt.maybe_save(7, state, metrics={"loss": torch.tensor(0.25)})
        assert ckpt.wait_local(7) == 7
        assert ckpt.is_durable(7)  # no gateway: locally committed is durable
        assert ckpt.wait_durable(7, timeout=5) == 7
    assert sorted(os.listdir(tmp_path / "step_7")) == ["COMMIT", "state.pt"]
    marker = read_commit(str(tmp_path / "step_7"))
    assert marker["step"] == 7 and marker["metrics"] == {"loss": 0.25}
    assert marker["files"][0]["name"] == "state.pt"
    assert marker["files"][0]["size"] == os.path.getsize(tmp_path / "step_7" / "state.pt")
    step, restored = ContinuousCheckpointer(tmp_path).restore()
    assert step == 7
    assert_state_equal(state, restored)


def test_continuous_skips_while_a_save_is_in_flight(tmp_path):
    fmt = GatedFormat()
    state = make_state(1)
    with ContinuousCheckpointer(tmp_path, save=Continuous(), format=fmt) as ckpt:
        assert ckpt.maybe_save(0, state)
        assert fmt.started.wait(10)
        assert not any(ckpt.maybe_save(s, state) for s in range(1, 20))
        assert ckpt.statistics().in_flight_step == 0
        fmt.release.set()
        ckpt.wait_local(0)
        ckpt.wait_local()
        assert ckpt.maybe_save(20, state)
        ckpt.wait_local(20)
    assert ckpt.steps() == [0, 20]


def test_min_interval_is_respected(tmp_path):
    with ContinuousCheckpointer(tmp_path, save=Continuous(min_interval_s=3600)) as ckpt:
        assert ckpt.maybe_save(0, make_state(1))
        ckpt.wait_local()
        assert not ckpt.maybe_save(1, make_state(1))


def test_fixed_interval_steps(tmp_path):
    with ContinuousCheckpointer(tmp_path, save=FixedInterval(steps=5)) as ckpt:
        for step in range(23):
            ckpt.maybe_save(step, {"x": torch.tensor(step)})
            ckpt.wait_local()
    assert ckpt.steps() == [0, 5, 10, 15, 20]


def test_maybe_save_stalls_only_for_the_snapshot(tmp_path):
    """With a writer that takes 1.5 s, maybe_save returns in a fraction of that."""
    state = make_state(64)
    delay = 1.5
    with ContinuousCheckpointer(tmp_path, format=SlowFormat(delay)) as ckpt:
        t0 = time.perf_counter()
        assert ckpt.maybe_save(0, state)
        stall = time.perf_counter() - t0
        t0 = time.perf_counter()
        assert not ckpt.maybe_save(1, state)  # busy: returns at once
        skip = time.perf_counter() - t0
        t0 = time.perf_counter()
        ckpt.wait_local(0)
        waited = time.perf_counter() - t0
    assert stall < delay / 3, f"maybe_save stalled {stall:.3f}s"
    assert skip < 0.05
    assert waited > delay / 2  # the write really was slow and happened in the background
    assert ckpt.statistics().last_stall_s == pytest.approx(stall, abs=0.05)


def test_no_torn_snapshot_when_the_loop_mutates_state_at_once(tmp_path):
    fmt = GatedFormat()
    state = make_state(8)
    expected = {"w": state["model"]["w"].clone(), "m": state["optim"]["moments"][0].clone()}
    with ContinuousCheckpointer(tmp_path, format=fmt) as ckpt:
        assert ckpt.maybe_save(3, state)
        # the training loop goes on before anything is written
        state["model"]["w"].mul_(-1).add_(5)
        state["optim"]["moments"][0].zero_()
        state["optim"]["step"] = 99
        state["optim"]["moments"].append(torch.ones(1))
        fmt.release.set()
        ckpt.wait_local(3)
        _, restored = ckpt.restore(3)
    assert torch.equal(restored["model"]["w"], expected["w"])
    assert torch.equal(restored["optim"]["moments"][0], expected["m"])
    assert restored["optim"]["step"] == 0 and len(restored["optim"]["moments"]) == 2


def test_snapshot_buffers_are_reused_and_tied_tensors_stay_tied(tmp_path):
    w = torch.randn(100)
    state = {"a": w, "b": w}
    with ContinuousCheckpointer(tmp_path) as ckpt:
        ckpt.maybe_save(0, state)
        ckpt.wait_local()
        snap1 = ckpt._snapshotter._buffers[("a",)]
        ckpt.maybe_save(1, state)
        ckpt.wait_local()
        assert ckpt._snapshotter._buffers[("a",)] is snap1
    _, restored = ckpt.restore()
    assert restored["a"].data_ptr() == restored["b"].data_ptr()


def test_retention_latest_n(tmp_path):
    with ContinuousCheckpointer(tmp_path, keep=LatestN(2)) as ckpt:
        for step in range(6):
            ckpt.maybe_save(step, {"x": torch.tensor(step)})
            ckpt.wait_local()
    assert sorted(os.listdir(tmp_path)) == ["step_4", "step_5"]


def test_retention_best_n_or_latest(tmp_path):
    losses = [0.9, 0.2, 0.8, 0.1, 0.7, 0.6]
    with ContinuousCheckpointer(tmp_path, keep=BestN("loss", 2) | LatestN(1)) as ckpt:
        for step, loss in enumerate(losses):
            ckpt.maybe_save(step, {"x": torch.tensor(step)}, metrics={"loss": loss})
            ckpt.wait_local()
    assert ckpt.steps() == [1, 3, 5]


def test_retention_never_deletes_the_newest_durable_or_newer(tmp_path):
    durable = {0, 1, 2}
    probe = lambda path: int(os.path.basename(path).split("_")[1]) in durable  # noqa: E731
    unbounded = Continuous(max_not_durable=None)  # let saves run ahead of the (fake) bucket
    with ContinuousCheckpointer(tmp_path, save=unbounded, keep=LatestN(1), probe=probe) as ckpt:
        for step in range(7):
            ckpt.maybe_save(step, {"x": torch.tensor(step)})
            ckpt.wait_local()
        assert ckpt.steps() == [2, 3, 4, 5, 6]  # 2 is the newest durable one
        assert ckpt.latest_durable_step() == 2
        assert not ckpt.is_durable(6)
        durable.update(range(7))  # the drain caught up
        ckpt.maybe_save(7, {"x": torch.tensor(7)})
        ckpt.wait_local()
    assert ckpt.steps() == [6, 7]  # 7 is not durable yet: 6 is the newest durable one


def test_retention_removes_incomplete_dirs_older_than_the_newest_durable(tmp_path):
    (tmp_path / "step_1").mkdir()
    (tmp_path / "step_1" / "state.pt.tmp").write_bytes(b"partial")
    with ContinuousCheckpointer(tmp_path) as ckpt:
        ckpt.maybe_save(2, {"x": torch.tensor(2)})
    assert sorted(os.listdir(tmp_path)) == ["step_2"]


def test_wait_durable_polls_the_probe_and_times_out(tmp_path):
    durable = threading.Event()
    with ContinuousCheckpointer(tmp_path, probe=lambda p: durable.is_set()) as ckpt:
        ckpt.maybe_save(1, {"x": torch.tensor(1)})
        with pytest.raises(TimeoutError):
            ckpt.wait_durable(1, timeout=0.3)
        assert ckpt.is_durable(1) is False
        threading.Timer(0.2, durable.set).start()
        assert ckpt.wait_durable(1, timeout=10) == 1
        with pytest.raises(NoCheckpointError):
            ckpt.wait_local(2)  # never saved


def test_continuous_bounds_the_upload_backlog(tmp_path):
    """With the endpoint behind, at most `max_not_durable` committed checkpoints wait for the bucket."""
    durable_steps: set[int] = set()

    def probe(path):
        return int(os.path.basename(path).split("_")[1]) in durable_steps

    with ContinuousCheckpointer(tmp_path, save=Continuous(max_not_durable=1), keep=LatestN(10),
                                probe=probe) as ckpt:
        assert ckpt.maybe_save(1, {"x": torch.tensor(1)})
        ckpt.wait_local()
        assert ckpt.maybe_save(2, {"x": torch.tensor(2)})  # one behind: allowed
        ckpt.wait_local()
        assert not ckpt.maybe_save(3, {"x": torch.tensor(3)}), "two behind: must wait for the drain"
        durable_steps.add(1)
        assert ckpt.maybe_save(4, {"x": torch.tensor(4)})
        ckpt.wait_local()
    with ContinuousCheckpointer(tmp_path / "unbounded", save=Continuous(max_not_durable=None),
                                probe=lambda p: False) as ckpt:
        for step in range(1, 4):
            assert ckpt.maybe_save(step, {"x": torch.tensor(step)})
            ckpt.wait_local()


def test_probe_errors_are_not_swallowed(tmp_path):
    def gone(path):
        raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")
    with ContinuousCheckpointer(tmp_path, probe=gone) as ckpt:
        assert ckpt.maybe_save(1, {"x": torch.tensor(1)})  # retention probes and fails
        with pytest.raises(CheckpointError, match="not connected"):
            ckpt.wait_local()
        with pytest.raises(OSError):
            ckpt.is_durable(1)


def test_restore_falls_back_over_a_missing_commit_and_a_corrupt_file(tmp_path, caplog):
    with ContinuousCheckpointer(tmp_path) as ckpt:
        for step in (1, 2, 3):
            ckpt.maybe_save(step, {"x": torch.full((1000,), float(step))})
            ckpt.wait_local()
    os.unlink(tmp_path / "step_3" / "COMMIT")
    data = tmp_path / "step_2" / "state.pt"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="mount.checkpointer"):
        step, state = ContinuousCheckpointer(tmp_path).restore()
    assert step == 1 and torch.equal(state["x"], torch.full((1000,), 1.0))
    text = caplog.text
    assert "step 3" in text and "no commit marker" in text
    assert "step 2" in text and "digest mismatch" in text
    ckpt = ContinuousCheckpointer(tmp_path)
    with pytest.raises(NoCheckpointError, match="digest mismatch"):
        ckpt.restore(step=2)
    with pytest.raises(NoCheckpointError, match="commit marker"):
        ckpt.restore(step=3)
    with pytest.raises(NoCheckpointError, match="no such checkpoint"):
        ckpt.restore(step=42)


def test_restore_checks_sizes_and_empty_directory(tmp_path):
    with ContinuousCheckpointer(tmp_path) as ckpt:
        with pytest.raises(NoCheckpointError):
            ckpt.restore()
        ckpt.save(1, {"x": torch.ones(10)})
    with open(tmp_path / "step_1" / "state.pt", "ab") as f:
        f.write(b"junk")
    with pytest.raises(NoCheckpointError, match="bytes"):
        ContinuousCheckpointer(tmp_path).restore(step=1, verify=False)


def test_worker_error_is_raised_on_the_next_call_then_saving_resumes(tmp_path):
    fmt = FailingFormat()
    ckpt = ContinuousCheckpointer(tmp_path, format=fmt)
    assert ckpt.maybe_save(1, {"x": torch.ones(3)})
    with pytest.raises(CheckpointError, match="step 1") as info:
        ckpt.wait_local(1)
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    assert ckpt.statistics().saves_failed == 1
    assert "COMMIT" not in os.listdir(tmp_path / "step_1")
    # the error was delivered once; the next save works again
    fmt.fail = False
    assert ckpt.maybe_save(2, {"x": torch.ones(3)})
    ckpt.close()
    assert ckpt.steps() == [2]


def test_worker_error_is_raised_by_maybe_save(tmp_path):
    ckpt = ContinuousCheckpointer(tmp_path, format=FailingFormat())
    ckpt.maybe_save(1, {"x": torch.ones(3)})
    deadline = time.monotonic() + 10
    with pytest.raises(CheckpointError):
        while time.monotonic() < deadline:
            ckpt.maybe_save(2, {"x": torch.ones(3)})
            time.sleep(0.01)
    ckpt.close()


def test_unwritable_directory_error_surfaces(tmp_path):
    # the checkpoint directory turns into a file: makedirs fails in the worker (we run as root,
    # so chmod would not stop us)
    target = tmp_path / "run"
    ckpt = ContinuousCheckpointer(target)
    os.rmdir(target)
    target.write_text("not a directory")
    ckpt.maybe_save(1, {"x": torch.ones(3)})
    with pytest.raises(CheckpointError) as info:
        ckpt.close()
    assert isinstance(info.value.__cause__, OSError)


def test_context_manager_waits_for_the_save_in_flight(tmp_path):
    with ContinuousCheckpointer(tmp_path, format=SlowFormat(0.5)) as ckpt:
        ckpt.maybe_save(4, make_state(1))
    assert (tmp_path / "step_4" / "COMMIT").exists()


def test_context_manager_does_not_mask_the_loop_exception(tmp_path):
    with pytest.raises(KeyError):
        with ContinuousCheckpointer(tmp_path, format=FailingFormat()) as ckpt:
            ckpt.maybe_save(1, {"x": torch.ones(1)})
            raise KeyError("training failed")


def test_restart_continues_after_the_last_checkpoint(tmp_path):
    with ContinuousCheckpointer(tmp_path) as ckpt:
        ckpt.save(10, {"x": torch.ones(1)})
    ckpt = ContinuousCheckpointer(tmp_path)
    step, _ = ckpt.restore()
    assert step == 10
    assert not ckpt.maybe_save(10, {"x": torch.ones(1)})  # not newer than what is there
    assert ckpt.maybe_save(11, {"x": torch.ones(1)})
    ckpt.close()
    assert ckpt.steps() == [10, 11]
    with ContinuousCheckpointer(tmp_path) as ckpt2, pytest.raises(ValueError):
        ckpt2.save(5, {"x": torch.ones(1)})


def test_a_crashed_partial_save_of_the_same_step_is_replaced(tmp_path):
    (tmp_path / "step_3").mkdir()
    (tmp_path / "step_3" / "state.pt").write_bytes(b"torn")
    with ContinuousCheckpointer(tmp_path) as ckpt:
        assert ckpt.maybe_save(3, {"x": torch.ones(2)})
    step, state = ContinuousCheckpointer(tmp_path).restore()
    assert step == 3 and torch.equal(state["x"], torch.ones(2))


def test_metrics_must_be_json(tmp_path):
    with ContinuousCheckpointer(tmp_path) as ckpt:
        with pytest.raises(TypeError):
            ckpt.maybe_save(1, {"x": torch.ones(1)}, metrics={"obj": object()})
        assert ckpt.statistics().saves_started == 0
        assert ckpt.maybe_save(1, {"x": torch.ones(1)}, metrics={"n": 3, "tag": "a"})
    assert json.loads((tmp_path / "step_1" / "COMMIT").read_text())["metrics"] == {"n": 3, "tag": "a"}


def test_a_commit_marker_that_fails_to_read_is_skipped_never_deleted_nor_fatal(tmp_path, monkeypatch):
    """On another node, the marker of a step rank 0's retention is deleting can answer EIO for a
    moment: the scan skips that step (it is neither a checkpoint nor a leftover to remove) and the
    save goes on."""
    from mount import checkpointer as module

    with ContinuousCheckpointer(tmp_path, keep=LatestN(1)) as ckpt:
        ckpt.save(1, make_state())
        real = module.read_commit

        def flaky(step_dir: str) -> dict:
            if step_dir.endswith("step_1"):
                raise OSError(errno.EIO, "Input/output error")
            return real(step_dir)

        monkeypatch.setattr(module, "read_commit", flaky)
        ckpt._infos.clear()  # as on a node that has not read the marker yet
        ckpt.save(2, make_state())
        ckpt.wait_local(2)
        infos, partial = ckpt._scan()
        assert [i.step for i in infos] == [2] and partial == []
        assert (tmp_path / "step_1" / "COMMIT").exists(), "an unreadable marker must not make its step a leftover"
