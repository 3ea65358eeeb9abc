"""Gateway daemon RSS while draining 4 GiB (8 files of 512 MiB), sampled every 50 ms with psutil.

    .venv/bin/python -m benchmarks.bench_rss [--size 512MiB] [--files 8] [--repeat 1] [--part-size 16MiB] [--concurrency 8]

One fresh mount per trial (default drain delay). The files are written one after the other through
the mount (4 MiB writes, closed; each starts draining right after its close while later ones are
written), then `ckptfs wait` until all is durable. The sampler watches the daemon pid from
`ckptfs status --json` from before the first write until `wait` returns.
Goal (issue 4): peak RSS <= 256 MiB.
"""

from __future__ import annotations

import time

from benchmarks._common import (
    MiB, Mount, RssSampler, base_parser, emit, empty_bucket, human, log, median, moto, parse_size,
    print_table, run_main, workdir,
)
from benchmarks.bench_write_while_draining import write_plain_file


def main(argv=None) -> dict:
    ap = base_parser(__doc__, size="512MiB", repeat=1)
    ap.add_argument("--files", type=int, default=8, help="files to drain (default 8)")
    ap.add_argument("--part-size", default=None, help="gateway --part-size (default: its default)")
    ap.add_argument("--concurrency", type=int, default=None, help="gateway --upload-concurrency")
    ap.add_argument("--daemon-env", action="append", default=[], metavar="NAME=VALUE",
                    help="extra environment for the daemon, e.g. MALLOC_MMAP_THRESHOLD_=1048576 (repeatable)")
    args = ap.parse_args(argv)
    denv = dict(e.split("=", 1) for e in args.daemon_env)
    size = parse_size(args.size)
    total = size * args.files
    trials = []
    with moto() as server, workdir("rss") as base:
        for rnd in range(args.repeat):
            with Mount(server, base, part_size=args.part_size, concurrency=args.concurrency, env=denv) as m:
                with RssSampler(m.pid) as sampler:
                    time.sleep(0.3)
                    baseline = sampler.peak()
                    t0 = time.monotonic()
                    for i in range(args.files):
                        write_plain_file(m.mnt / f"shard-{i:02d}.bin", size)
                    t_written = time.monotonic()
                    m.wait(timeout=900)
                    t_done = time.monotonic()
                    st = m.status()
                bucket = m.bucket
            assert st["uploaded_bytes_total"] >= total, st
            empty_bucket(server, bucket)
            r = {"baseline": baseline, "peak": sampler.peak(), "peak_after_writes": sampler.peak(t_written),
                 "write_s": t_written - t0, "drain_s": t_done - t0, "samples": len(sampler.samples)}
            trials.append(r)
            log(f"trial {rnd + 1}: baseline {human(baseline)}, peak {human(r['peak'])}, "
                f"written in {r['write_s']:.1f}s, all durable after {r['drain_s']:.1f}s "
                f"({total / r['drain_s'] / MiB:.0f} MiB/s)")
    peak = max(r["peak"] for r in trials)
    rows = [[i + 1, human(r["baseline"]), human(r["peak"]), human(r["peak_after_writes"]),
             f"{r['write_s']:.1f}", f"{r['drain_s']:.1f}", r["samples"]] for i, r in enumerate(trials)]
    print(f"\nbench_rss: {args.files} x {human(size)} = {human(total)} drained; part size "
          f"{args.part_size or 'default'}, concurrency {args.concurrency or 'default'}"
          f"{'; daemon env ' + ' '.join(args.daemon_env) if args.daemon_env else ''}\n")
    print_table(["trial", "RSS at start", "peak RSS", "peak RSS (drain only)", "writes done s",
                 "all durable s", "samples"], rows)
    print(f"peak RSS {human(peak)}  (goal <= 256 MiB)")
    return emit({"benchmark": "bench_rss", "module": "benchmarks.bench_rss", "file_size_bytes": size,
                 "files": args.files, "total_bytes": total, "repeat": args.repeat,
                 "part_size": args.part_size, "concurrency": args.concurrency, "daemon_env": denv,
                 "peak_rss_bytes": peak, "peak_rss_mib": round(peak / MiB, 1),
                 "median_peak_rss_mib": round(median([r["peak"] for r in trials]) / MiB, 1),
                 "baseline_rss_mib": round(trials[0]["baseline"] / MiB, 1),
                 "drain_s": [round(r["drain_s"], 1) for r in trials]})


if __name__ == "__main__":
    run_main(main)
