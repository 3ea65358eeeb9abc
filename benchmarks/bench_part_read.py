"""CPU cost of reading upload parts from a cache file: fresh `bytes` per part vs a reused buffer.

    .venv/bin/python -m benchmarks.bench_part_read [--size 256MiB] [--part-size 16MiB] [--repeat 5]

Variants (CPU seconds of this process over the whole file, medians; the file is hot in the page cache):
  read_range       gateway.digest.read_range: os.pread into a new bytes object per part (today's drain)
  read_into        gateway.digest.read_into: os.preadv into a PartBuffers buffer reused for every part
  read_range_sums  read_range + CRC32 + SHA-256 (what the drain runs per part, in a worker thread)
  read_into_sums   read_into + CRC32 + SHA-256
The daemon's malloc settings (gateway.daemon.pin_mmap_threshold) are applied first, so a fresh
16 MiB part is mmap'd and page-faulted as it is in the daemon.
"""

from __future__ import annotations

import os
import time

from benchmarks._common import MiB, base_parser, emit, human, median, parse_size, print_table, run_main, workdir
from gateway import digest
from gateway.daemon import pin_mmap_threshold


def main(argv=None) -> dict:
    ap = base_parser(__doc__, size="256MiB", repeat=5)
    ap.add_argument("--part-size", default="16MiB")
    args = ap.parse_args(argv)
    size, part = parse_size(args.size), parse_size(args.part_size)
    pin_mmap_threshold()
    offsets = range(0, size, part)
    pool = digest.PartBuffers(part, keep=8)

    def old(sums: bool) -> None:
        for off in offsets:
            (digest.read_range_sums if sums else digest.read_range)(path, off, min(part, size - off))

    def new(sums: bool) -> None:
        for off in offsets:
            with pool.lease(min(part, size - off)) as view:
                (digest.read_into_sums if sums else digest.read_into)(path, off, view)

    variants = {"read_range": lambda: old(False), "read_into": lambda: new(False),
                "read_range_sums": lambda: old(True), "read_into_sums": lambda: new(True)}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    with workdir("partread") as base:
        path = str(base / "data")
        with open(path, "wb") as f:
            chunk = os.urandom(16 * MiB)
            for _ in range(0, size, len(chunk)):
                f.write(chunk)
        for rnd in range(args.repeat):
            names = list(variants)
            for v in names[rnd % len(names):] + names[:rnd % len(names)]:
                t0 = time.process_time()
                variants[v]()
                cpu[v].append(time.process_time() - t0)
    med = {v: median(xs) for v, xs in cpu.items()}
    print(f"\nbench_part_read: {human(size)} in {human(part)} parts; {args.repeat} rounds\n")
    print_table(["variant", "CPU s (trials)", "median CPU s", "CPU s per GiB"],
                [[v, " ".join(f"{x:.3f}" for x in xs), f"{med[v]:.3f}", f"{med[v] * (1 << 30) / size:.2f}"]
                 for v, xs in cpu.items()])
    return emit({"benchmark": "bench_part_read", "module": "benchmarks.bench_part_read", "size_bytes": size,
                 "part_size_bytes": part, "repeat": args.repeat, "median_cpu_s": med,
                 "cpu_s_per_gib": {v: round(x * (1 << 30) / size, 3) for v, x in med.items()},
                 "buffers_allocated": pool.allocated})


if __name__ == "__main__":
    run_main(main)
