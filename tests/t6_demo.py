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
