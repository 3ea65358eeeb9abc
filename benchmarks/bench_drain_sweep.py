"""Drain time of one file for part sizes x upload concurrencies, to choose the defaults.

    .venv/bin/python -m benchmarks.bench_drain_sweep [--size 1GiB] [--repeat 1] [--parts 8,16,32] [--concurrency 4,8,16]

For every (part size, concurrency): a fresh mount with --part-size/--upload-concurrency, write
x.tmp, fsync, rename to x, time from the rename to `ckptfs wait` returning (as bench_drain). The
combinations run in a rotating order per round; one boto3 upload_file (TransferConfig defaults) per
round is the reference. Reports the median per combination and the fastest one.
"""

from __future__ import annotations

import itertools
import os

from benchmarks._common import (
    MiB, base_parser, emit, human, log, median, moto, parse_size, print_table, run_main, workdir,
    write_checkpoint,
)
from benchmarks.bench_drain import boto3_trial, gateway_trial


def main(argv=None) -> dict:
    ap = base_parser(__doc__, repeat=1)
    ap.add_argument("--parts", default="8,16,32", help="part sizes in MiB (default 8,16,32)")
    ap.add_argument("--concurrency", default="4,8,16", help="upload concurrencies (default 4,8,16)")
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    combos = list(itertools.product([int(p) for p in args.parts.split(",")],
                                    [int(c) for c in args.concurrency.split(",")]))
    results: dict[str, list[float]] = {f"{p}MiB x {c}": [] for p, c in combos}
    results["boto3-default"] = []
    with moto() as server, workdir("sweep") as base:
        bucket = server.make_bucket("bench-boto3")
        src_dir = base / "plain"
        src_dir.mkdir()
        write_checkpoint(src_dir, "x", size)
        for rnd in range(args.repeat):
            shift = rnd * 3 % len(combos)
            for p, c in combos[shift:] + combos[:shift]:
                os.sync()
                r = gateway_trial(server, base, size, p * MiB, c, None)
                results[f"{p}MiB x {c}"].append(r["s"])
                log(f"round {rnd + 1} part {p} MiB x {c}: {r['s']:.2f}s ({size / r['s'] / MiB:.0f} MiB/s)")
            r = boto3_trial(server, src_dir / "x", size, bucket, None, None)
            results["boto3-default"].append(r["s"])
            log(f"round {rnd + 1} boto3-default: {r['s']:.2f}s")
    med = {k: median(v) for k, v in results.items()}
    rows = [[k, " ".join(f"{x:.2f}" for x in v), f"{med[k]:.2f}", f"{size / med[k] / MiB:.0f}",
             f"{med[k] / med['boto3-default']:.2f}"] for k, v in results.items()]
    print(f"\nbench_drain_sweep: {human(size)}, {args.repeat} rounds\n")
    print_table(["part x concurrency", "trials (s)", "median s", "MiB/s", "/ boto3-default"], rows)
    best = min((k for k in med if k != "boto3-default"), key=med.get)
    print(f"fastest: {best} ({med[best]:.2f}s); current default 16MiB x 8: {med.get('16MiB x 8', float('nan')):.2f}s")
    return emit({"benchmark": "bench_drain_sweep", "module": "benchmarks.bench_drain_sweep", "size_bytes": size,
                 "repeat": args.repeat, "median_s": med, "best": best,
                 "trials_s": {k: [round(x, 3) for x in v] for k, v in results.items()}})


if __name__ == "__main__":
    run_main(main)
