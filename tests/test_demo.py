"""t6 frameworks: the demo loop (mount/demo.py) on a plain directory, short and small."""

import pytest

from mount import ContinuousCheckpointer
from mount.demo import build_model, run_demo, state_digest


@pytest.mark.parametrize("live", [False, True])
def test_demo_summary_and_bit_for_bit_restore(tmp_path, live):
    summary = run_demo(str(tmp_path), seconds=3, state_mb=8, live=live, sync_probes=1,
                       wait_durable_s=5)
    assert summary["checkpoints_saved"] >= 2
    assert summary["p50_interval_steps"] >= 1
    assert summary["mean_stall_s"] > 0 and summary["sync_torch_save_stall_s"] > 0
    assert summary["last_durable_step"] == summary["final_step"] == summary["last_local_step"]
    assert summary["all_durable"] is True
    assert abs(summary["state_bytes"] - 8 * 2**20) < 0.05 * 8 * 2**20
    step, state = ContinuousCheckpointer(tmp_path).restore()
    assert step == summary["final_step"]
    assert state_digest(state) == summary["final_state_digest"]


def test_state_digest_sees_every_bit():
    model, opt, _ = build_model(1)
    sd = model.state_dict()
    before = state_digest(sd)
    next(iter(sd.values())).view(-1)[0].add_(1e-7)
    assert state_digest(sd) != before


def test_make_demo_bucket_holds_what_latest_3_keeps(tmp_path):
    """`make demo` end to end, short: the bucket ends with the 3 checkpoints LatestN(3) keeps."""
    import json

    from scripts.demo import main

    out = tmp_path / "summary.json"
    rc = main(["--seconds", "15", "--compare-seconds", "5", "--state-mb", "16", "--no-live",
               "--json", str(out)])
    s = json.loads(out.read_text())
    assert s["checkpoints_saved"] > 3, "retention must have had something to drop"
    assert s["local_steps"] == s["bucket_steps"] and len(s["bucket_steps"]) == 3, s
    assert s["bucket_steps"][-1] == s["final_step"] == s["restored_step_on_fresh_node"]
    assert s["restored_bit_for_bit"]
    assert s["node_loss_steps"] is not None and s["restart_loss_steps"] is not None
    assert s["baseline_saves"] >= 1 and s["baseline_node_loss_steps"] is not None
    assert rc == 0
