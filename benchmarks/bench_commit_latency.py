"""Cluster commit latency (issue 11): N gateways on one prefix (--cluster) each write a shard into
one step directory; then node 0 renames the marker `.metadata` into place (the training barrier has
passed). Measured from that rename:

    own      until the slowest node's shard is durable (what a single node would wait for)
    commit   until the marker is shown and `user.ckptfs.state` of the step directory is `durable`
             on every node (what the shim's wait_durable waits for): every node answered, the
             marker is published, every node knows

    .venv/bin/python -m benchmarks.bench_commit_latency [--size 32MiB] [--repeat 3] [--nodes 2,4]

Goal: commit <= 1.1 x own + one round trip (rtt: median HEAD against the endpoint).
"""

from __future__ import annotations

import os
import threading
import time

from benchmarks._common import (
    Mount, base_parser, emit, human, log, median, moto, parse_size, print_table, run_main, workdir,
    write_checkpoint,
)

STATE = "user.ckptfs.state"
POLL_S = 0.01


def wait_state(path, state: str, timeout: float = 300) -> float:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        try:
            if os.getxattr(path, STATE).decode() == state:
                return time.perf_counter()
        except OSError:
            pass
        time.sleep(POLL_S)
    raise TimeoutError(f"{path} not {state} within {timeout}s")


def rtt_s(server, bucket: str) -> float:
    client = server.boto3_client()
    client.put_object(Bucket=bucket, Key="rtt-probe", Body=b"x")
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        client.head_object(Bucket=bucket, Key="rtt-probe")
        times.append(time.perf_counter() - t0)
    client.delete_object(Bucket=bucket, Key="rtt-probe")
    return median(times)


def trial(mounts: list[Mount], step: int, size: int) -> dict:
    dirs = [m.path(f"run/step_{step}") for m in mounts]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    writers = [threading.Thread(target=write_checkpoint, args=(d, f"shard_{i}", size)) for i, d in enumerate(dirs)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    # the barrier has passed: node 0 commits
    (dirs[0] / ".metadata.tmp").write_bytes(b"{}")
    os.rename(dirs[0] / ".metadata.tmp", dirs[0] / ".metadata")
    t0 = time.perf_counter()
    own: list[float] = [0.0] * len(mounts)
    done: list[float] = [0.0] * len(mounts)

    def watch(i: int) -> None:
        own[i] = wait_state(dirs[i] / f"shard_{i}", "durable") - t0
        done[i] = wait_state(dirs[i] / ".metadata", "durable") - t0  # shown on node i once committed
        done[i] = wait_state(dirs[i], "durable") - t0

    threads = [threading.Thread(target=watch, args=(i,)) for i in range(len(mounts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"own": max(own), "commit": max(done)}


def main(argv: list[str] | None = None) -> dict:
    ap = base_parser(__doc__, size="32MiB", repeat=3)
    ap.add_argument("--nodes", default="2,4", help="cluster sizes to measure (default 2,4)")
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    results = {}
    with moto() as server, workdir("commit") as base:
        for n in [int(x) for x in args.nodes.split(",")]:
            bucket = f"commit-{n}-{os.getpid()}"
            mounts = [Mount(server, base, bucket=bucket, prefix="c",
                            extra=("--cluster", "--node-id", f"n{i}")) for i in range(n)]
            for m in mounts:
                m.__enter__()
            try:
                rtt = rtt_s(server, bucket)
                runs = []
                for t in range(args.repeat):
                    log(f"{n} nodes, trial {t + 1}/{args.repeat}")
                    runs.append(trial(mounts, t, size))
            finally:
                for m in mounts:
                    m.__exit__(None, None, None)
            own, commit = median([r["own"] for r in runs]), median([r["commit"] for r in runs])
            results[n] = {"own_s": own, "commit_s": commit, "rtt_s": rtt, "ratio": commit / own,
                          "overhead_s": commit - own, "goal_met": commit <= 1.1 * own + rtt,
                          "trials": runs}
    rows = [[n, human(size), f"{r['own_s']:.3f}", f"{r['commit_s']:.3f}", f"{r['ratio']:.2f}",
             f"{r['overhead_s']:.3f}", f"{r['rtt_s'] * 1000:.1f}", r["goal_met"]] for n, r in results.items()]
    print_table(["nodes", "shard", "own s", "commit s", "ratio", "overhead s", "rtt ms", "<=1.1x+rtt"], rows)
    return emit({"benchmark": "commit_latency", "module": "benchmarks.bench_commit_latency", "size_bytes": size,
                 "repeat": args.repeat, "results": {str(k): v for k, v in results.items()}})


if __name__ == "__main__":
    run_main(main)
