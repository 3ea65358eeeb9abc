"""Drain ratio: time from the final rename of a 1 GiB file to `ckptfs wait` returning, divided by a
boto3 multipart `upload_file` of the same bytes to the same moto endpoint.

    .venv/bin/python -m benchmarks.bench_drain [--size 1GiB] [--repeat 3] [--part-size 16MiB] [--concurrency 8]

Variants, interleaved in rotating order:
  ckptfs          write x.tmp through a fresh mount (default drain delay unless --drain-delay), fsync,
                  rename to x; the clock starts after the rename and stops when `ckptfs wait MNT`
                  (the real CLI, a subprocess) exits 0. Includes the drain delay and the digest pass.
  boto3-default   boto3 upload_file, TransferConfig() defaults (8 MiB parts, 10 threads)
  boto3-matched   boto3 upload_file, TransferConfig(multipart_chunksize=PART, max_concurrency=CONC)
                  with the same part size / concurrency as the mount
The boto3 source file is a copy of the same bytes in a plain directory on the same disk (hot in the
page cache, as the gateway's cache file is). The bucket is emptied after every trial.
Goal (issue 4): median(ckptfs) / median(boto3) <= 1.10.
"""

from __future__ import annotations

import os
import re
import time

from benchmarks._common import (
    MiB, Mount, base_parser, emit, empty_bucket, human, log, median, moto, parse_size, print_table,
    run_main, workdir, write_checkpoint,
)

VARIANTS = ("ckptfs", "boto3-default", "boto3-matched")


def gateway_trial(server, base, size: int, part: int, conc: int, delay: float | None) -> dict:
    with Mount(server, base, drain_delay_s=delay, part_size=str(part), concurrency=conc) as m:
        w = write_checkpoint(m.mnt, "x", size)
        t0 = time.perf_counter()
        m.wait(timeout=900)
        s = time.perf_counter() - t0
        st = m.status()
        assert st["uploaded_bytes_total"] >= size, st
        bucket = m.bucket
        parts_s, complete_s = upload_split(m.cache / "ckptfs.log")
    empty_bucket(server, bucket)
    return {"s": s, "write_s": w["total"], "parts_s": parts_s, "complete_s": complete_s}


def upload_split(log_path) -> tuple[float | None, float | None]:
    """(parts, CompleteMultipartUpload) seconds of the last upload, from the daemon's log line."""
    found = None
    for line in open(log_path, errors="replace"):
        m = re.search(r"parts ([0-9.]+)s, complete ([0-9.]+)s", line)
        if m:
            found = (float(m.group(1)), float(m.group(2)))
    return found or (None, None)


def boto3_trial(server, src, size: int, bucket: str, part: int | None, conc: int | None) -> dict:
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config

    cfg = TransferConfig() if part is None else TransferConfig(multipart_chunksize=part, max_concurrency=conc)
    pool = max(10, cfg.max_request_concurrency + 2)
    s3 = server.boto3_client(config=Config(max_pool_connections=pool))
    marks: dict[str, float] = {}

    def complete_starts(**_) -> None:  # a handler that returns a value would replace the params
        marks.setdefault("complete", time.perf_counter())

    s3.meta.events.register("provide-client-params.s3.CompleteMultipartUpload", complete_starts)
    t0 = time.perf_counter()
    s3.upload_file(str(src), bucket, "bench/x", Config=cfg)
    s = time.perf_counter() - t0
    parts_s = marks["complete"] - t0 if "complete" in marks else None
    head = s3.head_object(Bucket=bucket, Key="bench/x")
    assert head["ContentLength"] == size, head
    empty_bucket(server, bucket)
    return {"s": s, "part": cfg.multipart_chunksize, "conc": cfg.max_request_concurrency, "parts_s": parts_s,
            "complete_s": None if parts_s is None else s - parts_s}


def main(argv=None) -> dict:
    ap = base_parser(__doc__)
    ap.add_argument("--part-size", default="16MiB", help="gateway --part-size and boto3-matched chunk size")
    ap.add_argument("--concurrency", type=int, default=8, help="gateway --upload-concurrency and boto3-matched threads")
    ap.add_argument("--drain-delay", type=float, default=None, help="gateway --drain-delay (default: its default)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args(argv)
    size, part, conc = parse_size(args.size), parse_size(args.part_size), args.concurrency
    variants = [v for v in args.variants.split(",") if v]
    results: dict[str, list[dict]] = {v: [] for v in variants}
    import boto3
    with moto() as server, workdir("drain") as base:
        bucket = server.make_bucket("bench-boto3")
        src_dir = base / "plain"
        src_dir.mkdir()
        write_checkpoint(src_dir, "x", size)
        src = src_dir / "x"
        for rnd in range(args.repeat):
            order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]
            for v in order:
                os.sync()
                if v == "ckptfs":
                    r = gateway_trial(server, base, size, part, conc, args.drain_delay)
                elif v == "boto3-default":
                    r = boto3_trial(server, src, size, bucket, None, None)
                else:
                    r = boto3_trial(server, src, size, bucket, part, conc)
                results[v].append(r)
                log(f"round {rnd + 1} {v}: {r['s']:.2f}s ({size / r['s'] / MiB:.0f} MiB/s)")
    med = {v: median([r["s"] for r in rs]) for v, rs in results.items()}
    split = {v: {k: _median_of(rs, k) for k in ("parts_s", "complete_s")} for v, rs in results.items()}
    rows = [[v, " ".join(f"{r['s']:.2f}" for r in rs), f"{med[v]:.2f}", f"{size / med[v] / MiB:.0f}",
             _fmt(split[v]["parts_s"]), _fmt(split[v]["complete_s"])] for v, rs in results.items()]
    print(f"\nbench_drain: {human(size)}; gateway part {human(part)} x {conc}; boto3 {boto3.__version__}; "
          f"{args.repeat} rounds\n")
    print_table(["variant", "trials (s)", "median s", "MiB/s", "parts s", "complete s"], rows)
    out = {"benchmark": "bench_drain", "module": "benchmarks.bench_drain", "size_bytes": size,
           "part_size_bytes": part, "concurrency": conc, "drain_delay_s": args.drain_delay,
           "boto3_version": boto3.__version__, "repeat": args.repeat, "median_s": med,
           "trials_s": {v: [round(r["s"], 3) for r in rs] for v, rs in results.items()},
           # the server's CompleteMultipartUpload, apart: moto's costs 4-25 s per GiB on this VM
           "median_split_s": split}
    if "ckptfs" in med:
        for v in variants:
            if v != "ckptfs":
                out[f"ratio_vs_{v.replace('-', '_')}"] = round(med["ckptfs"] / med[v], 3)
                print(f"drain ratio ckptfs / {v} = {med['ckptfs'] / med[v]:.3f}  (goal <= 1.10)")
    return emit(out)


def _median_of(trials: list[dict], key: str) -> float | None:
    values = [r[key] for r in trials if r.get(key) is not None]
    return round(median(values), 2) if values else None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    run_main(main)
