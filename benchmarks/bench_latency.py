"""Checkpoint publication at a real round trip: rename -> `ckptfs wait` against boto3 uploading the
same files, both through tests/support/latencyproxy.py adding --one-way-ms to each direction.

    .venv/bin/python -m benchmarks.bench_latency --shape orbax [--files 1000] [--file-size 16KiB]
    .venv/bin/python -m benchmarks.bench_latency --shape dcp [--shards 64] [--shard-size 4MiB]
    .venv/bin/python -m benchmarks.bench_latency --shape torch [--size 1GiB] [--direct]

Shapes (each a tree written under a temporary name, then renamed into place):
  orbax  step_100.orbax-checkpoint-tmp-0/ with --files files of --file-size under state/d/ plus
         _CHECKPOINT_METADATA, renamed to step_100/
  dcp    step_100.tmp/ with --shards __R_0.distcp files of --shard-size plus .metadata, renamed to step_100/
  torch  model.pt.tmp (--size bytes), renamed to model.pt
Variants, interleaved in rotating order:
  ckptfs   the tree is written through a fresh mount whose endpoint is the proxy (default drain
           delay unless --drain-delay), every file fsynced, then renamed; the clock starts at the
           rename and stops when `ckptfs wait MNT` exits 0
  boto3    the same files from a plain directory, as `aws s3 cp --recursive` does: 10 threads,
           put_object below 8 MiB, multipart above (--part-size x --concurrency for torch)
With --direct (torch only) both variants also run against moto without the proxy.
Reports medians, the ratio ckptfs / boto3, and files/s next to the proxy's round trip.
Default sizes are small enough for a few minutes on 2 cores; the issue-13 sizes are in the flags above.
"""

from __future__ import annotations

import concurrent.futures
import os
import time
import uuid
from pathlib import Path

import psutil

from benchmarks._common import (
    MiB, Mount, base_parser, block, emit, empty_bucket, fsync_dir, human, latency_proxy, log, median, moto,
    parse_size, print_table, run_main, workdir,
)

SHAPES = ("orbax", "dcp", "torch")


def tree_files(shape: str, args) -> dict[str, int]:
    """Relative path (inside the checkpoint directory, or the file itself for torch) -> size."""
    if shape == "orbax":
        files = {f"state/d/{uuid.UUID(int=i).hex}": parse_size(args.file_size) for i in range(args.files)}
        files["state/_METADATA"] = 4096
        files["_CHECKPOINT_METADATA"] = 256
        return files
    if shape == "dcp":
        files = {f"__{r}_0.distcp": parse_size(args.shard_size) for r in range(args.shards)}
        files[".metadata"] = 64 * 1024
        return files
    return {"model.pt": parse_size(args.size)}


def names(shape: str) -> tuple[str, str]:
    """(temporary name, final name) of what is renamed into place."""
    return {"orbax": ("step_100.orbax-checkpoint-tmp-0", "step_100"), "dcp": ("step_100.tmp", "step_100"),
            "torch": ("model.pt.tmp", "model.pt")}[shape]


def write_tree(root: Path, shape: str, files: dict[str, int]) -> Path:
    """Write the shape under its temporary name below `root`, every file fsynced; return that path."""
    tmp = root / names(shape)[0]
    for rel, size in files.items():
        path = tmp if shape == "torch" else tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            chunk = block(min(size, 4 * MiB))
            left = size
            while left > 0:
                left -= os.write(fd, chunk if left >= len(chunk) else chunk[:left])
            os.fsync(fd)
        finally:
            os.close(fd)
    if shape != "torch":
        fsync_dir(tmp)
    return tmp


def gateway_trial(server, endpoint: str, base: Path, shape: str, files: dict[str, int], args) -> dict:
    extra = ("--part-size", args.part_size, "--upload-concurrency", str(args.concurrency))
    if args.put_concurrency is not None:
        extra += ("--put-concurrency", str(args.put_concurrency))
    with Mount(server, base, endpoint_url=endpoint, drain_delay_s=args.drain_delay, extra=extra) as m:
        t0 = time.perf_counter()
        tmp = write_tree(m.mnt, shape, files)
        t_write = time.perf_counter() - t0
        daemon = psutil.Process(m.pid)
        before, cpu0 = m.status(), sum(daemon.cpu_times()[:2])
        t0 = time.perf_counter()
        os.rename(tmp, m.mnt / names(shape)[1])
        m.wait(timeout=args.timeout)
        s = time.perf_counter() - t0
        cpu = sum(daemon.cpu_times()[:2]) - cpu0
        st = m.status()
        assert st["uploaded_bytes_total"] >= sum(files.values()), st
        bucket = m.bucket
    passes = st["scheduler_passes_total"] - before["scheduler_passes_total"]
    pass_s = st["scheduler_pass_seconds_total"] - before["scheduler_pass_seconds_total"]
    log(f"ckptfs: daemon CPU {cpu:.2f} s after the rename, {passes} scheduler passes ({pass_s:.2f} s)")
    keys = server.boto3_client().list_objects_v2(Bucket=bucket, Prefix="bench/").get("KeyCount", 0)
    assert keys >= min(len(files), 1000), keys
    empty_bucket(server, bucket)
    return {"s": s, "write_s": t_write, "client_cpu_s": cpu, "passes": passes, "pass_s": pass_s}


def boto3_trial(server, endpoint: str, src: Path, shape: str, files: dict[str, int], bucket: str, args) -> dict:
    """Upload like `aws s3 cp --recursive`: one transfer per file on 10 threads (TransferConfig)."""
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config

    big = shape == "torch"
    cfg = (TransferConfig(multipart_chunksize=parse_size(args.part_size), max_concurrency=args.concurrency)
           if big else TransferConfig(max_concurrency=1, use_threads=False))
    s3 = server.boto3_client(endpoint, config=Config(max_pool_connections=max(10, args.concurrency) + 2))
    final = names(shape)[1]

    def put(rel: str) -> None:
        local = src if big else src / rel
        key = f"bench/{final}" if big else f"bench/{final}/{rel}"
        s3.upload_file(str(local), bucket, key, Config=cfg)

    s3.head_bucket(Bucket=bucket)  # the connection pool's first connection, as a long-lived CLI has
    cpu0 = time.process_time()  # this process: boto3's threads (the proxy and moto are others)
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(1 if big else 10) as pool:
        list(pool.map(put, files))
    s = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    empty_bucket(server, bucket)
    return {"s": s, "client_cpu_s": cpu}


def main(argv=None) -> dict:
    ap = base_parser(__doc__, size="256MiB", repeat=3)
    ap.add_argument("--shape", choices=SHAPES, default="orbax")
    ap.add_argument("--files", type=int, default=300, help="orbax: files of --file-size (default 300; issue: 1000)")
    ap.add_argument("--file-size", default="16KiB")
    ap.add_argument("--shards", type=int, default=64, help="dcp: shard files (default 64)")
    ap.add_argument("--shard-size", default="1MiB", help="dcp: bytes per shard (default 1MiB; issue: 4MiB)")
    ap.add_argument("--one-way-ms", type=float, default=10.0, help="latency the proxy adds each way (default 10)")
    ap.add_argument("--bandwidth", type=parse_size, default=None, help="proxy bandwidth cap per direction, bytes/s")
    ap.add_argument("--part-size", default="16MiB", help="gateway --part-size and boto3 multipart chunk (torch)")
    ap.add_argument("--concurrency", type=int, default=8, help="gateway --upload-concurrency, boto3 threads (torch)")
    ap.add_argument("--put-concurrency", type=int, default=None,
                    help="gateway --put-concurrency (default: its default)")
    ap.add_argument("--drain-delay", type=float, default=None, help="gateway --drain-delay (default: its default)")
    ap.add_argument("--direct", action="store_true", help="also run both variants without the proxy")
    ap.add_argument("--timeout", type=float, default=900.0, help="ckptfs wait timeout per trial")
    args = ap.parse_args(argv)
    shape = args.shape
    files = tree_files(shape, args)
    total = sum(files.values())
    paths = ["proxy", "direct"] if args.direct else ["proxy"]
    variants = [f"{v}/{p}" for p in paths for v in ("ckptfs", "boto3")]
    results: dict[str, list[dict]] = {v: [] for v in variants}
    with moto() as server, workdir(f"latency-{shape}") as base, \
            latency_proxy(server, args.one_way_ms, args.bandwidth) as proxied:
        endpoints = {"proxy": proxied, "direct": server.endpoint_url}
        bucket = server.make_bucket("bench-boto3")
        plain = base / "plain"
        plain.mkdir()
        src = write_tree(plain, shape, files)
        for rnd in range(args.repeat):
            order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]
            for v in order:
                kind, path = v.split("/")
                os.sync()
                if kind == "ckptfs":
                    r = gateway_trial(server, endpoints[path], base, shape, files, args)
                else:
                    r = boto3_trial(server, endpoints[path], src, shape, files, bucket, args)
                results[v].append(r)
                log(f"round {rnd + 1} {v}: {r['s']:.2f}s ({len(files) / r['s']:.0f} files/s, "
                    f"{total / r['s'] / MiB:.1f} MiB/s)")
    rtt_ms = 2 * args.one_way_ms
    med = {v: median([r["s"] for r in rs]) for v, rs in results.items()}
    rows = [[v, " ".join(f"{r['s']:.2f}" for r in rs), f"{med[v]:.2f}", f"{len(files) / med[v]:.1f}",
             f"{len(files) / med[v] * rtt_ms / 1000:.2f}" if v.endswith("proxy") else "-",
             f"{total / med[v] / MiB:.1f}", f"{median([r['client_cpu_s'] for r in rs]):.2f}"]
            for v, rs in results.items()]
    print(f"\nbench_latency {shape}: {len(files)} files, {human(total)}; proxy RTT {rtt_ms:g} ms"
          f"{f', {human(args.bandwidth)}/s' if args.bandwidth else ''}; {args.repeat} rounds\n")
    print_table(["variant", "trials (s)", "median s", "files/s", "files per RTT", "MiB/s", "client CPU s"], rows)
    out = {"benchmark": "bench_latency", "module": "benchmarks.bench_latency", "shape": shape,
           "files": len(files), "bytes": total, "rtt_ms": rtt_ms, "bandwidth": args.bandwidth,
           "repeat": args.repeat, "median_s": {v: round(x, 3) for v, x in med.items()},
           "files_per_s": {v: round(len(files) / x, 1) for v, x in med.items()},
           "trials_s": {v: [round(r["s"], 3) for r in rs] for v, rs in results.items()},
           # CPU of the uploading side: the daemon after the rename, or the process running boto3
           "client_cpu_s": {v: round(median([r["client_cpu_s"] for r in rs]), 2) for v, rs in results.items()},
           "scheduler_passes": {v: [r["passes"] for r in rs] for v, rs in results.items() if v.startswith("ckptfs")}}
    for p in paths:
        ratio = med[f"ckptfs/{p}"] / med[f"boto3/{p}"]
        out[f"ratio_{p}"] = round(ratio, 3)
        print(f"ratio ckptfs / boto3 ({p}) = {ratio:.2f}")
    return emit(out)


if __name__ == "__main__":
    run_main(main)
