"""Metadata rate: create + 4 KiB write + close of 10,000 files, through ckptfs vs a plain directory.

    .venv/bin/python -m benchmarks.bench_metadata [--files 10000] [--file-size 4KiB] [--repeat 3]

Variants, interleaved in rotating order (one fresh mount per mount trial, unmounted --no-drain):
  plain        a plain directory on the same disk as the cache dir
  mount        ckptfs with --drain-delay 3600: the drain scheduler runs but uploads nothing
  mount+drain  ckptfs with the default drain delay: files are uploaded while later ones are created
  floor        benchmarks/floor_fs.py: a pyfuse3 + trio passthrough with ckptfs's mount options and
               kernel caching and nothing else (no journal, drain or digest), over a plain directory
               on the same disk: what any filesystem on this FUSE stack can reach here
Reports files/s of each and the ratio mount time / plain time (= plain rate / mount rate), plus the
rate in each tenth of the run (it falls as files pile up pending when the cost is per pending file).
A trial stops after --trial-budget seconds (default 120) and reports the rate over the files it
created, marked truncated (the full-run ratio is then at least the one shown).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

from benchmarks._common import (
    Mount, base_parser, cpu_seconds, emit, log, main_thread_cpu_seconds, median, moto, parse_size, print_table,
    run_main, workdir, block,
)

VARIANTS = ("plain", "mount", "mount+drain", "floor")


def create_files(directory, count: int, size: int, budget_s: float = float("inf")) -> dict:
    """Create `count` files (or as many as fit in `budget_s`); rates per tenth of `count`."""
    data = block(size)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    step = max(1, count // 10)
    marks = []
    t0 = time.perf_counter()
    done = 0
    for i in range(count):
        fd = os.open(os.path.join(directory, f"f{i:06d}"), flags, 0o644)
        os.write(fd, data)
        os.close(fd)
        done = i + 1
        if done % step == 0:
            marks.append(time.perf_counter() - t0)
            if marks[-1] > budget_s:
                break
    s = time.perf_counter() - t0
    rates = [step / (b - a) for a, b in zip([0.0] + marks, marks)]
    return {"s": s, "files": done, "rate": done / s, "truncated": done < count, "chunk_rates": rates}


def one_trial(variant: str, server, base, count: int, size: int, n: int, budget: float) -> dict:
    os.sync()
    if variant == "plain":
        d = base / f"plain-{n}"
        d.mkdir()
        try:
            return create_files(str(d), count, size)
        finally:
            import shutil
            shutil.rmtree(d, ignore_errors=True)
    if variant == "floor":
        return floor_trial(base, count, size, n, budget)
    delay = 3600 if variant == "mount" else None
    with Mount(server, base, drain_delay_s=delay) as m:
        d = m.mnt / "d"
        d.mkdir()
        cpu0, main0 = cpu_seconds(m.pid), main_thread_cpu_seconds(m.pid)
        r = create_files(str(d), count, size, budget)
        r["daemon_cpu"] = cpu_seconds(m.pid) - cpu0
        r["fuse_thread_cpu"] = main_thread_cpu_seconds(m.pid) - main0
        st = m.status()
        r["uploaded_files_during"] = st["uploaded_files_total"]
    return r


def floor_trial(base, count: int, size: int, n: int, budget: float) -> dict:
    with floor_mount(base / f"floor-backing-{n}", base / f"floor-mnt-{n}") as pid:
        cpu0, main0 = cpu_seconds(pid), main_thread_cpu_seconds(pid)
        r = create_files(str(base / f"floor-mnt-{n}"), count, size, budget)
        r["daemon_cpu"] = cpu_seconds(pid) - cpu0
        r["fuse_thread_cpu"] = main_thread_cpu_seconds(pid) - main0
    return r


@contextlib.contextmanager
def floor_mount(backing, mountpoint):
    """Run benchmarks.floor_fs on `mountpoint` until the block ends; yield its pid."""
    backing.mkdir()
    mountpoint.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.floor_fs", str(backing), str(mountpoint)])
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mountpoint):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"benchmarks.floor_fs did not mount {mountpoint} (exit {proc.poll()})")
            time.sleep(0.05)
        yield proc.pid
    finally:
        subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv=None) -> dict:
    ap = base_parser(__doc__)
    ap.add_argument("--files", type=int, default=10000, help="files per trial (default 10000)")
    ap.add_argument("--file-size", default="4KiB", help="bytes written to each file (default 4KiB)")
    ap.add_argument("--trial-budget", type=float, default=120.0,
                    help="stop a trial after this many seconds and report the rate over the files created "
                         "so far (marked truncated; default 120)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args(argv)
    size = parse_size(args.file_size)
    variants = [v for v in args.variants.split(",") if v]
    results: dict[str, list[dict]] = {v: [] for v in variants}
    with moto() as server, workdir("meta") as base:
        for rnd in range(args.repeat):
            order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]
            for v in order:
                r = one_trial(v, server, base, args.files, size, rnd, args.trial_budget)
                results[v].append(r)
                log(f"round {rnd + 1} {v}: {r['files']} files in {r['s']:.2f}s ({r['rate']:.0f} files/s"
                    f"{', TRUNCATED' if r['truncated'] else ''}; per tenth: "
                    f"{' '.join(f'{x:.0f}' for x in r['chunk_rates'])})"
                    + (f", daemon CPU {r['daemon_cpu']:.2f}s" if "daemon_cpu" in r else "")
                    + (f", uploaded {r['uploaded_files_during']}" if "uploaded_files_during" in r else ""))
    rate = {v: median([r["rate"] for r in rs]) for v, rs in results.items()}
    truncated = {v: any(r["truncated"] for r in rs) for v, rs in results.items()}
    rows = [[v, " ".join(f"{r['rate']:.0f}" for r in rs), f"{rate[v]:.0f}" + (" (truncated)" if truncated[v] else ""),
             " ".join(f"{x:.0f}" for x in rs[0]["chunk_rates"]),
             f"{median([r['daemon_cpu'] / r['files'] * 1000 for r in rs]):.2f}/"
             f"{median([r['fuse_thread_cpu'] / r['files'] * 1000 for r in rs]):.2f}" if "daemon_cpu" in rs[0] else "-"]
            for v, rs in results.items()]
    print(f"\nbench_metadata: {args.files} x (create + {size} B write + close); {args.repeat} rounds; "
          f"trial budget {args.trial_budget:.0f}s\n")
    print_table(["variant", "trials (files/s)", "median files/s", "files/s per tenth (1st trial)",
                 "daemon/FUSE-thread CPU ms/file"], rows)
    out = {"benchmark": "bench_metadata", "module": "benchmarks.bench_metadata", "files": args.files,
           "file_size_bytes": size, "repeat": args.repeat, "trial_budget_s": args.trial_budget,
           "files_per_s": {v: round(x, 1) for v, x in rate.items()}, "truncated": truncated,
           "files_done": {v: [r["files"] for r in rs] for v, rs in results.items()},
           "chunk_rates_first_trial": {v: [round(x) for x in rs[0]["chunk_rates"]] for v, rs in results.items()},
           "fuse_thread_cpu_ms_per_file": {v: round(median([r["fuse_thread_cpu"] / r["files"] * 1000 for r in rs]), 3)
                                           for v, rs in results.items() if "fuse_thread_cpu" in rs[0]}}
    if "plain" in rate:
        for v in variants:
            if v != "plain":
                out[f"ratio_{v.replace('+', '_')}_vs_plain"] = round(rate["plain"] / rate[v], 2)
                print(f"ratio {v} / plain (time per file) = {rate['plain'] / rate[v]:.2f}"
                      + ("  (lower bound: truncated)" if truncated[v] else ""))
    return emit(out)


if __name__ == "__main__":
    run_main(main)
