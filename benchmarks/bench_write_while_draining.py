"""Write throughput through the mount while the drain uploads flat out, divided by the same write
with the drain idle.

    .venv/bin/python -m benchmarks.bench_write_while_draining [--size 1GiB] [--bg-size 1GiB] [--repeat 3]

One mount (default drain delay, part size and concurrency). Each round, in rotating order:
  idle   wait until nothing is pending (`ckptfs wait`), then write SIZE to y.tmp in 4 MiB writes,
         fsync, rename to y (the timed part), then unlink y at once (before the drain delay ends)
  busy   write a BG-SIZE file `bg` (closed, not a temporary name), wait until its parts are flowing
         (status drain_rate_bps > 0), then the same timed write as `idle`; the drain must still be
         uploading `bg` when the write finishes (checked and reported), then unlink y, wait, unlink bg
Before each timed write the page cache is written back (`os.sync()`, untimed): otherwise the busy
write's fsync also waits for the disk to write back `bg`, which was written just before (ext4's
ordered mode commits both together), and the figure measures that rather than the drain.
Goal (issue 4): median(idle time) / median(busy time) = busy throughput / idle throughput >= 0.8.

With --reference, the same pair is also measured on a plain directory on the same disk, "busy"
meaning a boto3 upload_file of a BG-SIZE file to the same moto endpoint running in another process:
how much of the slowdown is the 2-core machine (moto + uploader + writer) rather than the gateway.

With --drain-elsewhere, the pair is also measured with the drain in another process: "busy" writes
through a second mount (drain delay 1 h) while the first drains BG-SIZE. An upper bound for a
daemon whose drain runs in its own process with its own event loop.

With --fuse-reference, the same second mount is written while a boto3 upload_file of BG-SIZE runs
in another process (as for --reference): the FUSE write path under a boto3 upload, which tells the
machine's share (FUSE costs CPU a plain write does not) from the uploader's.

CKPTFS_BENCH_MOTO_DIR=/dev/shm/... keeps moto's object files in memory: a real endpoint does not
write what it receives to the node's disk.
"""

from __future__ import annotations

import os
import time

from benchmarks._common import (
    MiB, Mount, base_parser, block, emit, human, log, median, moto, parse_size, print_table, run_main,
    workdir, write_checkpoint,
)


def write_plain_file(path, size: int, chunk: int = 4 * MiB) -> None:
    import os
    buf = block(chunk)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = size
        while left > 0:
            left -= os.write(fd, buf if left >= chunk else buf[:left])
    finally:
        os.close(fd)


def wait_flowing(m: Mount, timeout: float = 60) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        st = m.status()
        if st["uploading_files"] > 0 and st["drain_rate_bps"] > 0:
            return time.monotonic() - t0
        time.sleep(0.05)
    raise RuntimeError(f"the drain did not start uploading within {timeout}s: {m.status()}")


UPLOADER = """
import sys, boto3
from botocore.config import Config
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1", aws_access_key_id="testing",
                  aws_secret_access_key="testing", config=Config(s3={"addressing_style": "path"}))
print("start", flush=True)
s3.upload_file(sys.argv[2], sys.argv[3], "ref/bg")
"""


def reference_pair(server, base, size: int, bg: int, target=None) -> dict:
    """Idle and busy writes to `target` (default: a plain directory), busy meaning during a boto3
    upload of a BG-SIZE plain file in another process."""
    import subprocess
    import sys
    d = base / "ref"
    d.mkdir(exist_ok=True)
    if not (d / "bg").exists():
        write_plain_file(d / "bg", bg)
    target = target or d
    bucket = "bench-ref"
    try:
        server.make_bucket(bucket)
    except Exception:
        pass
    out = {}
    for v in ("idle", "busy"):
        proc = None
        if v == "busy":
            proc = subprocess.Popen([sys.executable, "-c", UPLOADER, server.endpoint_url, str(d / "bg"), bucket],
                                    stdout=subprocess.PIPE, text=True)
            proc.stdout.readline()
            time.sleep(1.0)  # parts flowing
        os.sync()  # as for the mount: no writeback of earlier writes inside the timed write
        try:
            w = write_checkpoint(target, "y", size)
            (target / "y").unlink()
            out[v] = w["total"]
            if proc is not None:
                out["still_uploading"] = proc.poll() is None
        finally:
            if proc is not None:
                proc.wait(600)
    return out


def elsewhere_pair(server, base, m: Mount, size: int, bg: int) -> dict:
    """Idle and busy writes through a second mount, busy meaning that `m` (another daemon) drains."""
    out = {}
    with Mount(server, base, drain_delay_s=3600) as other:
        for v in ("idle", "busy"):
            if v == "busy":
                write_plain_file(m.mnt / "bg", bg)
                wait_flowing(m)
            os.sync()
            w = write_checkpoint(other.mnt, "y", size)
            (other.mnt / "y").unlink()
            out[v] = w["total"]
            if v == "busy":
                out["still_uploading"] = m.status()["uploading_files"] > 0
                m.wait(timeout=600)
                (m.mnt / "bg").unlink()
                m.wait(timeout=600)
    return out


def main(argv=None) -> dict:
    ap = base_parser(__doc__)
    ap.add_argument("--bg-size", default="1GiB", help="size of the file being drained (default 1GiB)")
    ap.add_argument("--reference", action="store_true",
                    help="also measure a plain-dir write idle vs during a boto3 upload (machine contention)")
    ap.add_argument("--drain-elsewhere", action="store_true",
                    help="also measure the write through a second mount while the first one drains")
    ap.add_argument("--fuse-reference", action="store_true",
                    help="also measure the write through a second mount during a boto3 upload")
    args = ap.parse_args(argv)
    size, bg = parse_size(args.size), parse_size(args.bg_size)
    res: dict[str, list[dict]] = {"idle": [], "busy": []}
    with moto() as server, workdir("wwd") as base, Mount(server, base) as m:
        for rnd in range(args.repeat):
            for v in (("idle", "busy") if rnd % 2 == 0 else ("busy", "idle")):
                m.wait(timeout=600)
                r: dict = {}
                if v == "busy":
                    write_plain_file(m.mnt / "bg", bg)
                    r["ramp_s"] = wait_flowing(m)
                os.sync()  # bg's writeback is not the drain's cost (see the docstring)
                w = write_checkpoint(m.mnt, "y", size)
                (m.mnt / "y").unlink()
                r.update(s=w["total"])
                if v == "busy":
                    st = m.status()
                    r["still_uploading"] = st["uploading_files"] > 0
                    r["drain_rate_bps"] = st["drain_rate_bps"]
                    m.wait(timeout=600)
                    (m.mnt / "bg").unlink()
                res[v].append(r)
                log(f"round {rnd + 1} {v}: {r['s']:.2f}s ({size / r['s'] / MiB:.0f} MiB/s)"
                    + (f", drain rate at end {r['drain_rate_bps'] / MiB:.0f} MiB/s, still uploading: "
                       f"{r['still_uploading']}" if v == "busy" else ""))
        m.wait(timeout=600)
        elsewhere = []
        if args.drain_elsewhere:
            for rnd in range(args.repeat):
                elsewhere.append(elsewhere_pair(server, base, m, size, bg))
                log(f"drain elsewhere round {rnd + 1}: idle {elsewhere[-1]['idle']:.2f}s, while another daemon "
                    f"drains {elsewhere[-1]['busy']:.2f}s (still uploading: {elsewhere[-1]['still_uploading']})")
        fuse_ref = []
        if args.fuse_reference:
            with Mount(server, base, drain_delay_s=3600) as other:
                for rnd in range(args.repeat):
                    fuse_ref.append(reference_pair(server, base, size, bg, target=other.mnt))
                    r = fuse_ref[-1]
                    log(f"fuse reference round {rnd + 1}: second mount idle {r['idle']:.2f}s, during a boto3 "
                        f"upload {r['busy']:.2f}s (upload still running: {r['still_uploading']})")
        ref = []
        if args.reference:
            for rnd in range(args.repeat):
                ref.append(reference_pair(server, base, size, bg))
                log(f"reference round {rnd + 1}: plain idle {ref[-1]['idle']:.2f}s, plain during boto3 upload "
                    f"{ref[-1]['busy']:.2f}s (upload still running: {ref[-1]['still_uploading']})")
    med = {v: median([r["s"] for r in rs]) for v, rs in res.items()}
    ratio = med["idle"] / med["busy"]
    rows = [[v, " ".join(f"{r['s']:.2f}" for r in rs), f"{med[v]:.2f}", f"{size / med[v] / MiB:.0f}"]
            for v, rs in res.items()]
    print(f"\nbench_write_while_draining: write {human(size)} while draining {human(bg)}; {args.repeat} rounds\n")
    print_table(["drain", "trials (s)", "median s", "MiB/s"], rows)
    overlapped = all(r["still_uploading"] for r in res["busy"])
    print(f"throughput busy / idle = {ratio:.3f}  (goal >= 0.8); drain still uploading at the end of every "
          f"busy write: {overlapped}")
    extra = {}
    if ref:
        ref_ratio = median([r["idle"] for r in ref]) / median([r["busy"] for r in ref])
        print(f"reference, plain dir: throughput during a boto3 upload / idle = {ref_ratio:.3f} "
              f"(idle {median([r['idle'] for r in ref]):.2f}s, busy {median([r['busy'] for r in ref]):.2f}s)")
        extra = {"reference_plain_ratio": round(ref_ratio, 3),
                 "reference_trials_s": [{k: (round(x, 3) if isinstance(x, float) else x) for k, x in r.items()}
                                        for r in ref]}
    if fuse_ref:
        fuse_ratio = median([r["idle"] for r in fuse_ref]) / median([r["busy"] for r in fuse_ref])
        print(f"reference, second mount: throughput during a boto3 upload / idle = {fuse_ratio:.3f}")
        extra["reference_fuse_ratio"] = round(fuse_ratio, 3)
    if elsewhere:
        other = median([r["idle"] for r in elsewhere]) / median([r["busy"] for r in elsewhere])
        print(f"drain in another process: throughput busy / idle = {other:.3f}")
        extra["drain_elsewhere_ratio"] = round(other, 3)
    return emit({**extra, "benchmark": "bench_write_while_draining", "module": "benchmarks.bench_write_while_draining",
                 "size_bytes": size, "bg_size_bytes": bg, "repeat": args.repeat, "median_s": med,
                 "throughput_ratio_busy_vs_idle": round(ratio, 3), "busy_fully_overlapped": overlapped,
                 "drain_rate_at_end_bps": [r["drain_rate_bps"] for r in res["busy"]],
                 "trials_s": {v: [round(r["s"], 3) for r in rs] for v, rs in res.items()}})


if __name__ == "__main__":
    run_main(main)
