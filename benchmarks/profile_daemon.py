"""Run the gateway daemon under cProfile for one workload and print where its CPU time goes.

    .venv/bin/python -m benchmarks.profile_daemon metadata [--files 1000]
    .venv/bin/python -m benchmarks.profile_daemon metadata-drain [--files 1000]   (uploads run meanwhile)
    .venv/bin/python -m benchmarks.profile_daemon drain [--size 1GiB]
    .venv/bin/python -m benchmarks.profile_daemon write [--size 1GiB]
    .venv/bin/python -m benchmarks.profile_daemon dcp [--files 64] [--size 4MiB]   (bench_latency's DCP shape)

The daemon is started with `python -m cProfile -o PROF -m gateway.cli mount ... --foreground`
(the real CLI), the workload runs, the mount is unmounted (--no-drain semantics via SIGUSR2) and
the profile is printed (top functions by own time and by cumulative time). Not a benchmark: the
profiler slows the daemon down by 2-3x; use it to find *where* the time goes.
"""

from __future__ import annotations

import argparse
import os
import pstats
import subprocess
import sys
import time

from benchmarks._common import CLI_ENV, REPO, GiB, moto, parse_size, workdir, write_checkpoint
from benchmarks.bench_latency import names, tree_files, write_tree
from benchmarks.bench_metadata import create_files


def wait_durable(mnt) -> None:
    subprocess.run([sys.executable, "-m", "gateway.cli", "wait", str(mnt), "--timeout", "600"],
                   cwd=REPO, env=CLI_ENV, check=True)


def profile_dcp(mnt, shards: int, shard_size: str) -> float:
    """bench_latency's DCP shape under a temporary name, renamed; seconds from the rename to durable."""
    files = tree_files("dcp", argparse.Namespace(shards=shards, shard_size=shard_size))
    tmp = write_tree(mnt, "dcp", files)
    t0 = time.perf_counter()
    os.rename(tmp, mnt / names("dcp")[1])
    wait_durable(mnt)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workload", choices=["metadata", "metadata-drain", "drain", "write", "dcp"])
    ap.add_argument("--files", type=int, default=1000, help="metadata: files; dcp: shards (give 64)")
    ap.add_argument("--size", default="1GiB", help="drain/write: file size; dcp: shard size (give 4MiB)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default="/var/tmp/ckptfs-bench/daemon.prof")
    args = ap.parse_args(argv)
    with moto() as server, workdir("prof") as base:
        server.make_bucket("prof")
        mnt, cache = base / "mnt", base / "cache"
        mnt.mkdir()
        delay = "3600" if args.workload in ("metadata", "write") else "0.5"
        cmd = [sys.executable, "-m", "cProfile", "-o", args.out, "-m", "gateway.cli", "mount", "s3://prof/p",
               str(mnt), "--cache-dir", str(cache), "--endpoint-url", server.endpoint_url,
               "--drain-delay", delay, "--foreground"]
        proc = subprocess.Popen(cmd, cwd=REPO, env=CLI_ENV, stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while not os.path.ismount(mnt):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("mount did not come up")
                time.sleep(0.1)
            t0 = time.perf_counter()
            if args.workload.startswith("metadata"):
                (mnt / "d").mkdir()
                r = create_files(str(mnt / "d"), args.files, 4096)
                print(f"{r['files']} files in {r['s']:.1f}s")
            elif args.workload == "dcp":
                drained_s = profile_dcp(mnt, args.files, args.size)
                print(f"dcp {args.files} x {args.size}: rename -> wait {drained_s:.2f}s")
            elif args.workload == "write":
                r = write_checkpoint(mnt, "x", parse_size(args.size))
                print(f"write {r}")
            else:
                write_checkpoint(mnt, "x", parse_size(args.size))
                t0 = time.perf_counter()
                wait_durable(mnt)
                print(f"drained {parse_size(args.size) / GiB:.2f} GiB in {time.perf_counter() - t0:.1f}s")
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, 12)  # SIGUSR2: no drain at exit
                subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
                try:
                    proc.wait(120)
                except subprocess.TimeoutExpired:
                    proc.kill()
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    stats = pstats.Stats(args.out)
    stats.sort_stats("tottime").print_stats(args.top)
    stats.sort_stats("cumtime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
