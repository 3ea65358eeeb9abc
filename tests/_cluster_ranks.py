"""One rank of the several-node tests, each rank on its own ckptfs mount (run as a script).

usage: _cluster_ranks.py MODE RANK WORLD PORT ROOTS_JSON OUT_JSON
ROOTS_JSON: a JSON list, the directory of each rank (on that rank's own mount).
MODE "dcp":  one dcp.save of a row-sharded tensor; rank r's shard is SIZES[r] bytes.
MODE "shim": ContinuousCheckpointer (torch or DCP format) saving several steps with LatestN(2),
             then wait_durable and restore.
"""

import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHARD_BYTES = {0: 1 << 20, 1: 6 << 20}


def run_dcp(roots, rank, world):
    import torch.distributed.checkpoint as dcp

    numel = SHARD_BYTES.get(rank, 1 << 20) // 4
    state = {f"w{rank}": torch.full((numel,), float(rank + 1))}
    dcp.save(state, checkpoint_id=os.path.join(roots[rank], "step_1"))
    return {"written": sorted(os.listdir(os.path.join(roots[rank], "step_1")))}


def run_shim(roots, rank, world, fmt):
    from mount import ContinuousCheckpointer, LatestN

    x = torch.full((50_000,), float(rank))
    state = {"rank": rank, "x": x} if fmt == "torch" else {f"x{rank}": x}
    saved = []
    with ContinuousCheckpointer(roots[rank], format=fmt, keep=LatestN(2)) as ckpt:
        for step in range(1, 5):
            x.add_(1.0)
            ckpt.save(step, state)
            saved.append(step)
        ckpt.wait_durable(saved[-1], timeout=90)
        durable_at = time.time()
        dist.barrier()
        ckpt.retain()  # rank 0, for the whole cluster
        result = {"saved": saved, "durable_at": durable_at}
        if fmt == "torch":
            step, restored = ckpt.restore()
            result.update(restored_step=step, restored_rank=restored["rank"],
                          restored_ok=torch.equal(restored["x"], torch.full((50_000,), float(rank + step))))
    return result


def main():
    mode, rank, world, port, roots, out = sys.argv[1:7]
    rank, world, roots = int(rank), int(world), json.loads(roots)
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}",
                            timeout=datetime.timedelta(seconds=120))
    try:
        if mode == "dcp":
            result = run_dcp(roots, rank, world)
        else:
            result = run_shim(roots, rank, world, mode.split("-", 1)[1])
        dist.barrier()
    finally:
        dist.destroy_process_group()
    result["done_at"] = time.time()
    with open(out, "w") as f:
        json.dump(result, f)


def run_ranks(mode, roots, tmp_path, timeout=180):
    """Run this script in MODE as len(roots) gloo processes; return each rank's JSON result."""
    from tests.support.ranks import run_processes
    from tests.support.s3server import free_port

    port = free_port()
    outs = [tmp_path / f"{mode}_rank{rank}.json" for rank in range(len(roots))]
    argvs = [[mode, str(rank), str(len(roots)), str(port), json.dumps([str(r) for r in roots]), str(out)]
             for rank, out in enumerate(outs)]
    return run_processes(__file__, argvs, outs, timeout)


if __name__ == "__main__":
    main()
