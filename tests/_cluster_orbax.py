"""One JAX process of the Orbax multi-host test, on its own ckptfs mount (run as a script).

usage: _cluster_orbax.py PROCESS_ID PORT ROOTS_JSON OUT_JSON
Two processes (jax.distributed on the CPU, one device each) save one globally sharded array with a
plain Orbax CheckpointManager: the primary makes the temporary directory, every process writes
its shard into it on its own mount, the primary renames it into place. Then each restores.
"""

import json
import sys
import time

import jax
import numpy as np


def main():
    pid, port, roots, out = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    import orbax.checkpoint as ocp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()), ("x",))
    sharding = NamedSharding(mesh, PartitionSpec("x"))
    full = np.arange(2 * 4096, dtype=np.float32).reshape(2, 4096)
    local = full[pid:pid + 1]
    array = jax.make_array_from_process_local_data(sharding, local, full.shape)
    mngr = ocp.CheckpointManager(roots[pid])
    mngr.save(1, args=ocp.args.StandardSave({"w": array}))
    mngr.wait_until_finished()
    target = {"w": jax.ShapeDtypeStruct(full.shape, full.dtype, sharding=sharding)}
    restored = mngr.restore(1, args=ocp.args.StandardRestore(target))
    shard = np.asarray(restored["w"].addressable_shards[0].data)
    mngr.close()
    with open(out, "w") as f:
        json.dump({"restored_ok": bool(np.array_equal(shard, local)), "done_at": time.time()}, f)


if __name__ == "__main__":
    main()
