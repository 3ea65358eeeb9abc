"""Restore ratio (issue 5): read a checkpoint on a fresh node through the mount, divided by boto3
`download_file` of the same object from the same endpoint; and warm-cache reads vs the plain disk.

    .venv/bin/python -m benchmarks.bench_restore [--size 1GiB] [--repeat 3]

Variants, interleaved per trial:
  ckptfs-fresh   mount the prefix on a new, empty cache dir; time open .. EOF of a sequential read in
                 1 MiB reads (mount start-up excluded: it lists the bucket once)
  boto3          boto3 download_file (TransferConfig defaults: 8 MiB parts, 10 threads) to a plain
                 file on the same disk
  ckptfs-warm    read the same file again through the same mount (now in the cache)
  plain-warm     read the boto3-downloaded file from the plain directory
Goal: median(ckptfs-fresh) / median(boto3) <= 1.15.
"""

from __future__ import annotations

import os
import time

from benchmarks._common import (
    MiB, Mount, base_parser, emit, human, log, median, moto, parse_size, print_table, run_main, workdir,
    write_checkpoint,
)

READ = 1 * MiB


def read_all(path) -> float:
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        while os.read(fd, READ):
            pass
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    args = base_parser(__doc__).parse_args(argv)
    size = parse_size(args.size)
    times: dict[str, list[float]] = {k: [] for k in ("ckptfs-fresh", "boto3", "ckptfs-warm", "plain-warm")}
    with moto() as server, workdir("restore") as base:
        with Mount(server, base, prefix="restore") as writer:
            write_checkpoint(writer.mnt, "ckpt", size)
            writer.wait(timeout=900)
            bucket = writer.bucket
        client = server.boto3_client()
        for trial in range(args.repeat):
            log(f"trial {trial + 1}/{args.repeat}")
            with Mount(server, base, bucket=bucket, prefix="restore") as fresh:
                times["ckptfs-fresh"].append(read_all(fresh.mnt / "ckpt"))
                times["ckptfs-warm"].append(read_all(fresh.mnt / "ckpt"))
            target = base / f"download-{trial}"
            t0 = time.perf_counter()
            client.download_file(bucket, "restore/ckpt", str(target))
            times["boto3"].append(time.perf_counter() - t0)
            times["plain-warm"].append(read_all(target))
            target.unlink()
    med = {k: median(v) for k, v in times.items()}
    rows = [[k, f"{med[k]:.3f}", human(size / med[k]) + "/s", " ".join(f"{t:.2f}" for t in v)]
            for k, v in times.items()]
    print_table(["variant", "median s", "throughput", "trials"], rows)
    return emit({
        "benchmark": "restore", "module": "benchmarks.bench_restore", "size_bytes": size, "repeat": args.repeat,
        "medians_s": med,
        "restore_ratio": med["ckptfs-fresh"] / med["boto3"],
        "warm_read_ratio": med["ckptfs-warm"] / med["plain-warm"],
    })


if __name__ == "__main__":
    run_main(main)
