"""One rank of the 2-process gloo tests (run as a script), and `run_ranks` that launches them.

usage: _ranks.py MODE RANK WORLD PORT DIR OUT_JSON
MODE "dcp":   continuous DCP saves of a row-sharded DTensor, then restore into a template.
MODE "torch": continuous torch.save saves of per-rank state, then restore.
MODE "fail":  rank 1's writer fails; both ranks must raise CheckpointError (and not hang).
MODE "asym":  only rank 0's retention fails; both ranks must raise at the same step.
"""

import datetime
import json
import os
import socket
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mount import CheckpointError, ContinuousCheckpointer, LatestN  # noqa: E402
from mount.formats import TorchFormat  # noqa: E402


class FailingFormat(TorchFormat):
    def write(self, step_dir, state, ctx):
        raise OSError(28, "No space left on device")


def run_dcp(root, rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    full = torch.arange(64.0).reshape(16, 4)
    state = {"model": {"w": distribute_tensor(full.clone(), mesh, [Shard(0)]),
                       "bias": torch.ones(4)}, "epoch": 3}
    saved = []
    with ContinuousCheckpointer(root, format="dcp", keep=LatestN(2)) as ckpt:
        for step in range(1, 40):
            state["model"]["w"].to_local().add_(1.0)  # the "training step"
            if ckpt.maybe_save(step, state, metrics={"loss": 1.0 / step}):
                saved.append(step)
            time.sleep(0.005)
        last = ckpt.wait_local()
        template = {"model": {"w": distribute_tensor(torch.zeros(16, 4), mesh, [Shard(0)]),
                              "bias": torch.zeros(4)}, "epoch": -1}
        step, restored = ckpt.restore(template=template)
    rows = 16 // world
    expected = full[rank * rows:(rank + 1) * rows] + step
    return {"saved": saved, "last": last, "restored_step": step,
            "shard_ok": torch.equal(restored["model"]["w"].to_local(), expected),
            "bias_ok": torch.equal(restored["model"]["bias"], torch.ones(4)),
            "epoch": restored["epoch"]}


def run_torch(root, rank, world):
    state = {"rank": rank, "x": torch.full((10,), float(rank))}
    saved = []
    with ContinuousCheckpointer(root, format="torch") as ckpt:
        for step in range(1, 20):
            state["x"].add_(1.0)
            if ckpt.maybe_save(step, state):
                saved.append(step)
            time.sleep(0.005)
        ckpt.wait_local()
        step, restored = ckpt.restore()
    return {"saved": saved, "restored_step": step, "rank_ok": restored["rank"] == rank,
            "x_ok": torch.equal(restored["x"], torch.full((10,), float(rank + step)))}


def run_fail(root, rank, world):
    fmt = FailingFormat() if rank == 1 else "torch"
    ckpt = ContinuousCheckpointer(root, format=fmt)
    ckpt.maybe_save(1, {"x": torch.ones(3)})
    try:
        ckpt.wait_local()
        raised = None
    except CheckpointError as exc:
        raised = str(exc)
    ckpt.close()
    return {"raised": raised}


def run_asym(root, rank, world):
    """Only rank 0 fails (its retention pass probes a dead gateway): all ranks must stop together."""
    def gone(path):
        raise OSError(107, "Transport endpoint is not connected")

    ckpt = ContinuousCheckpointer(root, probe=gone if rank == 0 else None)
    raised, step = None, None
    for step in range(1, 500):
        try:
            ckpt.maybe_save(step, {"x": torch.ones(3)})
        except CheckpointError as exc:
            raised = str(exc)
            break
        time.sleep(0.01)
    ckpt.close()
    return {"raised": raised, "step": step}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(mode, root, tmp_path, world=2, timeout=120):
    """Run this script in MODE as `world` gloo processes; return each rank's JSON result."""
    from tests.support.ranks import run_processes

    port = _free_port()
    outs = [tmp_path / f"{mode}_rank{rank}.json" for rank in range(world)]
    argvs = [[mode, str(rank), str(world), str(port), str(root), str(out)] for rank, out in enumerate(outs)]
    return run_processes(__file__, argvs, outs, timeout)


def main():
    mode, rank, world, port, root, out = sys.argv[1:7]
    rank, world = int(rank), int(world)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            init_method=f"tcp://127.0.0.1:{port}",
                            timeout=datetime.timedelta(seconds=60))
    try:
        result = {"dcp": run_dcp, "torch": run_torch, "fail": run_fail,
                  "asym": run_asym}[mode](root, rank, world)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
