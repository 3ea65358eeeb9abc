"""Write 1 GiB in 4 MiB writes to x.tmp, fsync, rename to x: through ckptfs vs a plain directory.

    .venv/bin/python -m benchmarks.bench_write [--size 1GiB] [--repeat 3] [--chunk 4MiB]

Variants, interleaved in rotating order in every round (one fresh mount per mount trial):
  plain        a plain directory on the same disk as the cache dir
  mount        ckptfs with --drain-delay 3600 (drain idle; unmounted with --no-drain): pure FUSE path
  mount+drain  ckptfs with the default drain delay: x is uploaded right after the rename; the upload
               is waited for *outside* the timed window before the next trial
Goal (issue 3): median(mount) / median(plain) <= 1.10.

A discarded warm-up trial of each variant (--warmup, 256 MiB) runs first.
Diagnostics per mount trial: FUSE write requests seen by the daemon (fuse_ops_total.write, so the
mean request size), daemon CPU seconds over the trial (and of its main thread, which serves FUSE) (≈ wall time means the single Python thread
that serves FUSE is the limit), and the split of the time into write() calls / fsync / rename.
"""

from __future__ import annotations

import os

from benchmarks._common import (
    MiB, Mount, base_parser, cpu_seconds, emit, human, log, main_thread_cpu_seconds, median, moto, parse_size,
    print_table,
    run_main, workdir, write_checkpoint,
)

VARIANTS = ("plain", "mount", "mount+drain")


def one_trial(variant: str, server, base, size: int, chunk: int, n: int) -> dict:
    os.sync()  # earlier trials' dirty pages do not leak into this one
    if variant == "plain":
        d = base / f"plain-{n}"
        d.mkdir()
        try:
            r = write_checkpoint(d, "x", size, chunk)
        finally:
            (d / "x").unlink(missing_ok=True)
            d.rmdir()
        return r
    delay = 3600 if variant == "mount" else None
    with Mount(server, base, drain_delay_s=delay) as m:
        before_ops = m.status().get("fuse_ops_total", {})
        cpu0, main0 = cpu_seconds(m.pid), main_thread_cpu_seconds(m.pid)
        r = write_checkpoint(m.mnt, "x", size, chunk)
        r["daemon_cpu"] = cpu_seconds(m.pid) - cpu0
        r["fuse_thread_cpu"] = main_thread_cpu_seconds(m.pid) - main0
        ops = m.status().get("fuse_ops_total", {})
        writes = ops.get("write", 0) - before_ops.get("write", 0)
        r["fuse_writes"] = writes
        r["mean_request"] = size / writes if writes else 0
        if variant == "mount+drain":
            r["drain_after_rename"] = m.wait(timeout=600)
    return r


def main(argv=None) -> dict:
    ap = base_parser(__doc__)
    ap.add_argument("--chunk", default="4MiB", help="size of each write() (default 4MiB)")
    ap.add_argument("--warmup", default="256MiB", help="discarded warm-up trial of each variant first (0 = none)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    args = ap.parse_args(argv)
    size, chunk = parse_size(args.size), parse_size(args.chunk)
    variants = [v for v in args.variants.split(",") if v]
    results: dict[str, list[dict]] = {v: [] for v in variants}
    with moto() as server, workdir("write") as base:
        if parse_size(args.warmup):
            for v in variants:  # first touches of page-cache memory in a fresh VM are slow: not counted
                one_trial(v, server, base, parse_size(args.warmup), chunk, -1)
        for rnd in range(args.repeat):
            order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]
            for v in order:
                r = one_trial(v, server, base, size, chunk, rnd)
                results[v].append(r)
                log(f"round {rnd + 1} {v}: {r['total']:.2f}s ({size / r['total'] / MiB:.0f} MiB/s)"
                    + (f", {r['fuse_writes']} FUSE writes, daemon CPU {r['daemon_cpu']:.2f}s"
                       f" ({r['fuse_thread_cpu']:.2f}s on the FUSE thread)"
                       if "fuse_writes" in r else ""))
    med = {v: median([r["total"] for r in rs]) for v, rs in results.items()}
    rows = []
    for v, rs in results.items():
        rows.append([v, " ".join(f"{r['total']:.2f}" for r in rs), f"{med[v]:.2f}",
                     f"{size / med[v] / MiB:.0f}",
                     f"{median([r['write'] for r in rs]):.2f}/{median([r['fsync'] for r in rs]):.2f}",
                     f"{median([r['daemon_cpu'] for r in rs]):.2f}/{median([r['fuse_thread_cpu'] for r in rs]):.2f}"
                     if "daemon_cpu" in rs[0] else "-",
                     human(median([r['mean_request'] for r in rs])) if "mean_request" in rs[0] else "-"])
    print(f"\nbench_write: {human(size)} in {human(chunk)} writes, fsync, rename; {args.repeat} rounds\n")
    print_table(["variant", "trials (s)", "median s", "MiB/s", "write/fsync s", "daemon/FUSE-thread CPU s",
                 "FUSE write req"], rows)
    out = {"benchmark": "bench_write", "module": "benchmarks.bench_write", "size_bytes": size,
           "chunk_bytes": chunk, "repeat": args.repeat, "median_s": med,
           "trials_s": {v: [round(r["total"], 3) for r in rs] for v, rs in results.items()}}
    if "plain" in med:
        for v in variants:
            if v != "plain":
                out[f"ratio_{v.replace('+', '_')}_vs_plain"] = round(med[v] / med["plain"], 3)
                print(f"ratio {v} / plain = {med[v] / med['plain']:.3f}  (goal <= 1.10)")
    for v in variants:
        if v != "plain":
            rs = results[v]
            out[f"{v}_mean_fuse_write_bytes"] = round(median([r["mean_request"] for r in rs]))
            out[f"{v}_daemon_cpu_s"] = round(median([r["daemon_cpu"] for r in rs]), 3)
            out[f"{v}_fuse_thread_cpu_s"] = round(median([r["fuse_thread_cpu"] for r in rs]), 3)
            out[f"{v}_write_fsync_s"] = [round(median([r["write"] for r in rs]), 3),
                                         round(median([r["fsync"] for r in rs]), 3)]
    if "mount+drain" in results:
        out["drain_after_rename_s"] = round(median([r["drain_after_rename"] for r in results["mount+drain"]]), 3)
    return emit(out)


if __name__ == "__main__":
    run_main(main)
