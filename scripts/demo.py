"""`make demo`: the main job on an embedded S3 endpoint, end to end.

1. start a local S3 endpoint (moto) on 127.0.0.1 and a bucket;
2. `ckptfs mount` it at a temporary mount point;
3. train a small PyTorch model with continuous checkpointing into the mount (LatestN(3)), with a
   live view (mount.demo.run_demo), until the last checkpoint is durable; then, for comparison, go on
   training for --compare-seconds with upload-acknowledged saving (snapshot, torch.save, boto3 upload,
   the next save after the upload) to the same endpoint; both phases together take --seconds;
4. `ckptfs wait` until everything is durable, and show what the bucket holds (LatestN(3) worth);
5. mount the same prefix on a fresh, empty cache dir (a new node) and restore the newest checkpoint,
   verified bit for bit against the state the training loop had;
6. unmount and stop the endpoint, whatever happened.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("AWS_ACCESS_KEY_ID", "demo")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "demo-secret")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

BUCKET = "ckptfs-demo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_s3(workdir: Path):
    port = free_port()
    log = open(workdir / "s3.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        import boto3

        client = boto3.client("s3", endpoint_url=url)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.create_bucket(Bucket=BUCKET)
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit(f"the local S3 endpoint did not start (see {workdir / 's3.log'})")
                time.sleep(0.2)
        yield url, client
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def ckptfs(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "gateway.cli", *args], check=True)


@contextlib.contextmanager
def mounted(url: str, endpoint: str, mountpoint: Path, cache_dir: Path):
    mountpoint.mkdir(parents=True, exist_ok=True)
    ckptfs("mount", url, str(mountpoint), "--cache-dir", str(cache_dir), "--endpoint-url", endpoint)
    try:
        yield mountpoint
    finally:
        if os.path.ismount(mountpoint):
            subprocess.run([sys.executable, "-m", "gateway.cli", "unmount", str(mountpoint)])


def bucket_summary(client, prefix: str) -> tuple[int, int, list[str]]:
    keys, total = [], 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for item in page.get("Contents", []):
            keys.append(item["Key"])
            total += item["Size"]
    return len(keys), total, sorted(keys)


def checkpoint_steps(keys: list[str]) -> list[int]:
    """Steps whose COMMIT is in the bucket (published after its data: a complete checkpoint)."""
    return sorted(int(k.split("/")[-2][len("step_"):]) for k in keys
                  if k.endswith("/COMMIT") and k.split("/")[-2].startswith("step_"))


def delete_prefix(client, prefix: str) -> None:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for item in page.get("Contents", []):
            client.delete_object(Bucket=BUCKET, Key=item["Key"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60, help="training time, both phases (default 60)")
    ap.add_argument("--compare-seconds", type=float, default=20,
                    help="of those, upload-acknowledged saving for comparison (default 20; 0: none)")
    ap.add_argument("--state-mb", type=int, default=256)
    ap.add_argument("--no-live", action="store_true")
    ap.add_argument("--json", metavar="PATH", help="also write the summary as JSON to PATH")
    args = ap.parse_args(argv)

    from benchmarks.bench_interval import UploadCheckpointer
    from mount import ContinuousCheckpointer
    from mount.demo import run_demo, state_digest

    workdir = Path(tempfile.mkdtemp(prefix="ckptfs-demo-"))
    print(f"ckptfs demo: working in {workdir}")
    compare_s = max(0.0, min(args.compare_seconds, args.seconds / 2))
    try:
        with local_s3(workdir) as (endpoint, client):
            url = f"s3://{BUCKET}/run1"
            with mounted(url, endpoint, workdir / "mnt", workdir / "cache") as mnt:
                baseline = UploadCheckpointer(client, BUCKET, "upload-ack") if compare_s else None
                summary = run_demo(str(mnt / "ckpts"), seconds=args.seconds - compare_s,
                                   state_mb=args.state_mb, live=not args.no_live, wait_durable_s=600,
                                   baseline=baseline, baseline_seconds=compare_s)
                ckptfs("wait", str(mnt), "--timeout", "600")
                status = json.loads(os.getxattr(mnt, "user.ckptfs.status"))
                with ContinuousCheckpointer(str(mnt / "ckpts")) as reader:
                    local_steps = reader.steps()
            delete_prefix(client, "upload-ack/")
            count, total, keys = bucket_summary(client, "run1/")
            summary["bucket_steps"] = checkpoint_steps(keys)
            print(f"\nbucket s3://{BUCKET}/run1: {count} objects, {total / 2**20:.1f} MiB, "
                  f"checkpoints of steps {summary['bucket_steps']}")
            for key in keys[:12]:
                print(f"  {key}")
            if len(keys) > 12:
                print(f"  ... and {len(keys) - 12} more")
            with mounted(url, endpoint, workdir / "fresh-mnt", workdir / "fresh-cache") as fresh:
                restored_step, state = ContinuousCheckpointer(str(fresh / "ckpts")).restore()
                identical = state_digest(state) == summary["final_state_digest"]
            summary.update(restored_step_on_fresh_node=restored_step, restored_bit_for_bit=identical,
                           uploaded_bytes=status["uploaded_bytes_total"], local_steps=local_steps,
                           bucket_bytes=total)
            print_summary(summary)
            if args.json:
                Path(args.json).write_text(json.dumps(summary, indent=1))
            ok_bucket = summary["bucket_steps"] == local_steps[-3:] and len(local_steps) == 3
            if not ok_bucket:
                print(f"the bucket holds steps {summary['bucket_steps']}, the node {local_steps}: "
                      "expected the same 3 (LatestN(3))")
            return 0 if identical and restored_step == summary["final_step"] and ok_bucket else 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def print_summary(s: dict) -> None:
    stall_ms = 1e3 * (s["mean_stall_s"] or 0)
    sync_ms = 1e3 * (s["sync_torch_save_stall_s"] or 0)
    lines = [
        ("training", f"{s['steps']} steps in {s['seconds']} s, state {s['state_bytes'] / 2**20:.0f} MiB"),
        ("checkpoints saved", f"{s['checkpoints_saved']} ({s['superseded']} superseded before upload, "
                              "deleted locally, never uploaded)"),
        ("P50 checkpoint interval", f"{s['p50_interval_steps']} steps"),
        ("mean stall per save", f"{stall_ms:.1f} ms (synchronous torch.save of the same state: {sync_ms:.0f} ms)"),
        ("process restart costs", f"{_steps(s['restart_loss_steps'])} on average (newest local checkpoint)"),
        ("node loss costs", f"{_steps(s['node_loss_steps'])} on average (newest checkpoint in the bucket)"),
    ]
    if s.get("baseline_node_loss_steps") is not None:
        lines.append(("  upload-acknowledged", f"{_steps(s['baseline_node_loss_steps'])} on average "
                      f"({s['baseline_saves']} saves in the {s['baseline_seconds']:.0f} s after, "
                      "same model, same endpoint)"))
    lines += [
        ("drain after training", f"{s['drain_after_training_s']} s until everything was durable"),
        ("bucket at the end", f"{len(s['bucket_steps'])} checkpoints ({s['bucket_bytes'] / 2**20:.0f} MiB), "
                              f"steps {s['bucket_steps']} (LatestN(3))"),
        ("restore on a fresh node", f"step {s['restored_step_on_fresh_node']}, "
                                    f"{'bit for bit identical' if s['restored_bit_for_bit'] else 'MISMATCH'}"),
    ]
    print("\nckptfs demo summary")
    for label, value in lines:
        print(f"  {label:<26} {value}")


def _steps(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f} steps" if v >= 10 else f"{v:.1f} steps"


if __name__ == "__main__":
    sys.exit(main())
