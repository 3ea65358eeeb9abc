"""t6 frameworks: torch.distributed.checkpoint (DCP) through mount/, one process and 2 gloo ranks."""

import os

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests._ranks import run_ranks
from mount import ContinuousCheckpointer, NoCheckpointError, read_commit


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_save_load_unchanged_in_the_directory(tmp_path):
    """Plain dcp.save/dcp.load: .metadata goes through .metadata.tmp + rename, nothing .tmp stays."""
    state = {"w": torch.randn(32, 8), "nested": {"b": torch.arange(5)}}
    dcp.save(state, checkpoint_id=str(tmp_path))
    names = sorted(os.listdir(tmp_path))
    assert ".metadata" in names and not any(n.endswith(".tmp") for n in names)
    target = {"w": torch.zeros(32, 8), "nested": {"b": torch.zeros(5, dtype=torch.long)}}
    dcp.load(target, checkpoint_id=str(tmp_path))
    assert torch.equal(target["w"], state["w"]) and torch.equal(target["nested"]["b"], state["nested"]["b"])


def test_checkpointer_dcp_round_trip_with_and_without_template(tmp_path):
    state = {"model": {"w": torch.randn(64, 16), "b": torch.zeros(16)}, "epoch": 2}
    expected = state["model"]["w"].clone()
    with ContinuousCheckpointer(tmp_path, format="dcp") as ckpt:
        assert ckpt.maybe_save(5, state, metrics={"loss": 0.5})
        ckpt.wait_local(5)
        state["model"]["w"].add_(1)  # mutations after the save do not leak into it
    marker = read_commit(str(tmp_path / "step_5"))
    assert marker["format"] == "dcp"
    assert {f["name"] for f in marker["files"]} == {".metadata", "__0_0.distcp"}

    template = {"model": {"w": torch.zeros(64, 16), "b": torch.ones(16)}, "epoch": 0}
    step, restored = ContinuousCheckpointer(tmp_path).restore(template=template)
    assert step == 5 and restored is template
    assert torch.equal(restored["model"]["w"], expected)
    assert torch.equal(restored["model"]["b"], torch.zeros(16)) and restored["epoch"] == 2

    step, loaded = ContinuousCheckpointer(tmp_path, format="dcp").restore()
    assert torch.equal(loaded["model"]["w"], expected) and loaded["epoch"] == 2


def test_dcp_corrupt_shard_is_detected(tmp_path):
    with ContinuousCheckpointer(tmp_path, format="dcp") as ckpt:
        ckpt.save(1, {"w": torch.randn(1000)})
    path = tmp_path / "step_1" / "__0_0.distcp"
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(NoCheckpointError, match="digest"):
        ContinuousCheckpointer(tmp_path).restore(step=1)


def test_two_rank_dcp_each_rank_writes_its_shard_and_rank0_commits(tmp_path):
    root = tmp_path / "ckpt"
    r0, r1 = run_ranks("dcp", root, tmp_path)
    assert r0["saved"] == r1["saved"] and len(r0["saved"]) >= 2  # the ranks agreed on every save
    assert r0["restored_step"] == r1["restored_step"] == r0["saved"][-1]
    assert r0["shard_ok"] and r1["shard_ok"] and r0["bias_ok"] and r1["bias_ok"]
    assert r0["epoch"] == r1["epoch"] == 3
    assert len(os.listdir(root)) == 2  # LatestN(2), run by rank 0
    marker = read_commit(str(root / f"step_{r0['last']}"))
    assert marker["world_size"] == 2
    owners = {f["name"]: f["rank"] for f in marker["files"]}
    assert owners == {"__0_0.distcp": 0, "__1_0.distcp": 1, ".metadata": 0}


def test_two_rank_torch_format_one_file_per_rank(tmp_path):
    root = tmp_path / "ckpt"
    r0, r1 = run_ranks("torch", root, tmp_path)
    assert r0["saved"] == r1["saved"]
    assert all(r[k] for r in (r0, r1) for k in ("rank_ok", "x_ok"))
    last = root / f"step_{r0['saved'][-1]}"
    assert sorted(os.listdir(last)) == ["COMMIT", "rank_00000.pt", "rank_00001.pt"]


def test_two_rank_failure_on_one_rank_fails_both_without_hanging(tmp_path):
    root = tmp_path / "ckpt"
    r0, r1 = run_ranks("fail", root, tmp_path, timeout=90)
    assert r0["raised"] and r1["raised"]
    assert "rank" in r0["raised"] and "No space" in r0["raised"]
    assert not (root / "step_1" / "COMMIT").exists()


def test_two_rank_failure_on_rank0_only_stops_both_at_the_same_step(tmp_path):
    r0, r1 = run_ranks("asym", tmp_path / "ckpt", tmp_path, timeout=90)
    assert "not connected" in r0["raised"]
    assert "another rank" in r1["raised"]
    assert r0["step"] == r1["step"]
