"""Goodput: training steps a node loss or a process restart would cost, endpoint slower than the disk (issue 10).

    .venv/bin/python -m benchmarks.bench_goodput                 # full: 60 s per strategy (issue 10's setup)
    .venv/bin/python -m benchmarks.bench_goodput --seconds 30    # short mode

Setup (defaults = issue 10's baseline): an MLP (mount.demo.build_model) whose params + Adam moments
are --state-mb 64 MiB, paced to --step-s 0.1 s per training step (the step sleeps for what its
compute leaves of 0.1 s), one torch thread. The S3 endpoint is moto on 127.0.0.1 behind
tests/support/faultproxy.FaultProxy capped at --bandwidth-mbps 16 MB/s per direction, slower than
the local disk. The same training loop runs under each strategy for --seconds (one window each,
order rotated per round with --rounds > 1):

  ckptfs   ContinuousCheckpointer(<mount>/run, save=Continuous(), keep=LatestN(3)) on a real ckptfs
           mount whose drain goes through the capped proxy; acknowledged by the local write.
  upload   upload-acknowledged continuous saving: host snapshot, then torch.save into memory and
           boto3 upload_fileobj (16 MiB parts x 8) through the same proxy; the next save starts at
           the first step after the upload returned; keeps the newest 3 objects
           (benchmarks.bench_interval.UploadCheckpointer).
  fixed    ContinuousCheckpointer(save=FixedInterval(steps=--fixed-steps), keep=LatestN(3)) on a
           ckptfs mount (asynchronous: the loop stalls only for the snapshot).

A sampler lists the bucket directly (not through the proxy) every 0.25 s after --warmup-s: the newest
step complete in the bucket (its COMMIT, published after its data, or the upload strategy's single
object) and the number of complete checkpoints and of step prefixes with any object. Reported:

  saves             checkpoints completed in the window (ckptfs/fixed: locally committed; upload: uploaded)
  P50 interval      steps between the starts of consecutive saves
  node loss         mean over the samples of current step - newest step complete in the bucket
                    (and in seconds: sample time - when that step was trained)
  restart loss      mean of current step - newest locally committed step (upload: nothing local, = node loss)
  bucket end        complete checkpoints (step prefixes with any object) when the window ends
  bucket max        the most complete checkpoints seen in one sample after the warm-up
  settled           after the window: close(durable_timeout=--settle-s) + `ckptfs wait`, then the
                    complete checkpoints in the bucket (LatestN(3) keeps 3); "-" if not settled in time

Goals (issue 10): node loss <= 1.0x upload; restart loss <= 0.25x upload's node loss; bucket <= what
the keep policy keeps plus the checkpoint in flight. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks._common import MiB, Mount, emit, log, moto, print_table, run_main, workdir
from benchmarks.bench_interval import Trainer, UploadCheckpointer, _ProxyEndpoint
from mount import Continuous, ContinuousCheckpointer, FixedInterval, LatestN
from tests.support.faultproxy import FaultProxy

MODULE = "benchmarks.bench_goodput"
STRATEGIES = ("ckptfs", "upload", "fixed")
KEEP = 3
_STEP_KEY = re.compile(r"(?:^|/)step_(\d+)/(.+)$")


class BucketSampler:
    """Every `interval_s`: the training step, the newest complete step in the bucket, the newest local step.

    `complete_name` is the object whose presence makes a step complete ("COMMIT", or "state.pt" for
    the single-object upload strategy); `local()` gives the newest locally committed step (or None).
    """

    def __init__(self, client, bucket: str, prefix: str, trainer: Trainer, complete_name: str,
                 local: Callable[[], int | None], interval_s: float = 0.25):
        self.client, self.bucket, self.prefix = client, bucket, prefix.rstrip("/") + "/"
        self.trainer, self.complete_name, self.local = trainer, complete_name, local
        self.interval_s = interval_s
        self.samples: list[dict] = []
        self.first_step = trainer.step_no
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bucket-sampler", daemon=True)

    def bucket_state(self) -> tuple[set[int], set[int]]:
        """(steps complete in the bucket, steps with any object)."""
        complete, any_obj = set(), set()
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
            for item in page.get("Contents", []):
                m = _STEP_KEY.search(item["Key"])
                if m:
                    any_obj.add(int(m.group(1)))
                    if m.group(2) == self.complete_name:
                        complete.add(int(m.group(1)))
        return complete, any_obj

    def sample(self) -> dict:
        step = self.trainer.step_no
        complete, any_obj = self.bucket_state()
        local = self.local()
        return {"t": time.monotonic(), "step": step, "bucket": max(complete, default=None),
                "local": local, "complete": len(complete), "prefixes": len(any_obj)}

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.samples.append(self.sample())
            except Exception as exc:  # a listing error must not end the window
                log(f"  sampler: {exc!r}")

    def __enter__(self) -> "BucketSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


def paced_window(trainer: Trainer, seconds: float, step_s: float,
                 maybe_save: Callable[[int, dict, float], bool]) -> dict:
    """Train for `seconds`, each step taking at least `step_s`; `maybe_save` after every step."""
    saved, stalls, step_times = [], [], {trainer.step_no: time.monotonic()}
    t_start = time.monotonic()
    while time.monotonic() - t_start < seconds:
        t0 = time.monotonic()
        loss = trainer.train_step()
        step = trainer.step_no
        step_times[step] = time.monotonic()
        s0 = time.perf_counter()
        if maybe_save(step, trainer.state(), loss):
            stalls.append(time.perf_counter() - s0)
            saved.append(step)
        left = step_s - (time.monotonic() - t0)
        if left > 0:
            time.sleep(left)
    return {"elapsed_s": time.monotonic() - t_start, "saved_steps": saved, "stalls_s": stalls,
            "last_step": trainer.step_no, "step_times": step_times}


def run_window(name: str, args, trainer: Trainer, server, proxy: FaultProxy, bucket: str, base: Path) -> dict:
    """One strategy for one window; returns its raw figures."""
    proxy.reset_stats()
    direct = server.boto3_client()  # the sampler lists moto directly, outside the capped proxy
    prefix = f"{name}-{uuid.uuid4().hex[:6]}"
    warm_until = time.monotonic() + args.warmup_s
    extra: dict[str, Any] = {}
    if name == "upload":
        ckpt = UploadCheckpointer(server.boto3_client(proxy.endpoint_url), bucket, prefix, keep=KEEP)
        sampler = BucketSampler(direct, bucket, prefix, trainer, "state.pt", ckpt.latest)
        try:
            with sampler:
                res = paced_window(trainer, args.seconds, args.step_s, ckpt.maybe_save)
                end = sampler.sample()
            committed = ckpt.committed()
        finally:
            ckpt.close()  # the upload in flight, outside the window
        extra["settled_complete"] = len(sampler.bucket_state()[0])
        extra["settle_s"] = 0.0
    else:
        save = Continuous() if name == "ckptfs" else FixedInterval(steps=args.fixed_steps)
        with Mount(_ProxyEndpoint(proxy), base, bucket=bucket, prefix=prefix) as m:
            ckpt = ContinuousCheckpointer(m.mnt / "run", save=save, keep=LatestN(KEEP))
            local = lambda: ckpt.statistics().last_local_step  # noqa: E731
            sampler = BucketSampler(direct, bucket, f"{prefix}/run", trainer, "COMMIT", local)
            try:
                with sampler:
                    res = paced_window(trainer, args.seconds, args.step_s,
                                       lambda step, state, loss: ckpt.maybe_save(step, state, {"loss": loss}))
                    end = sampler.sample()
            finally:
                t0 = time.monotonic()
                ckpt.close(durable_timeout=args.settle_s)
            st = ckpt.statistics()
            committed = st.saves_committed
            extra.update(deleted=st.deleted, superseded=st.superseded)
            left = args.settle_s - (time.monotonic() - t0)
            settled = st.last_durable_step == st.last_local_step and left > 1
            if settled:
                try:
                    m.wait(timeout=left)
                except Exception as exc:
                    log(f"  {name}: not settled: {exc}")
                    settled = False
            extra["settle_s"] = time.monotonic() - t0
            extra["settled_complete"] = len(sampler.bucket_state()[0]) if settled else None
            extra["mb_up"] = proxy.stats["bytes_up"] / 1e6
    samples = [s for s in sampler.samples if s["t"] >= warm_until]
    return {**res, **extra, "name": name, "committed": committed, "samples": samples, "end": end,
            "first_step": sampler.first_step, "load1": os.getloadavg()[0]}


def summarize(name: str, windows: list[dict]) -> dict:
    intervals, node, node_s, restart, bucket_max = [], [], [], [], 0
    for w in windows:
        st = w["saved_steps"]
        intervals += [b - a for a, b in zip(st, st[1:])]
        times = w["step_times"]
        for s in w["samples"]:
            newest_bucket = s["bucket"] if s["bucket"] is not None else w["first_step"]
            node.append(s["step"] - newest_bucket)
            node_s.append(s["t"] - times.get(newest_bucket, times[w["first_step"]]))
            local = s["local"] if name != "upload" else s["bucket"]
            restart.append(s["step"] - (local if local is not None else w["first_step"]))
            bucket_max = max(bucket_max, s["complete"])
    mean = lambda xs: statistics.fmean(xs) if xs else None  # noqa: E731
    return {
        "strategy": name,
        "saves": sum(w["committed"] for w in windows),
        "p50_interval_steps": statistics.median(intervals) if intervals else None,
        "node_loss_steps": mean(node),
        "node_loss_s": mean(node_s),
        "steps_per_s": sum(w["last_step"] - w["first_step"] for w in windows) / sum(w["elapsed_s"] for w in windows),
        "restart_loss_steps": mean(restart),
        "samples": len(node),
        "bucket_end_complete": [w["end"]["complete"] for w in windows],
        "bucket_end_prefixes": [w["end"]["prefixes"] for w in windows],
        "bucket_max_complete": bucket_max,
        "settled_complete": [w.get("settled_complete") for w in windows],
        "settle_s": [round(w.get("settle_s", 0), 1) for w in windows],
        "superseded": sum(w.get("superseded", 0) for w in windows),
        "mean_stall_s": mean([x for w in windows for x in w["stalls_s"]]),
        "steps": sum(w["last_step"] - w["first_step"] for w in windows),
        "load1": [round(w["load1"], 2) for w in windows],
    }


def _f(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60, help="training time per strategy and round (default 60)")
    ap.add_argument("--state-mb", type=int, default=64, help="params + Adam state in MiB (default 64)")
    ap.add_argument("--step-s", type=float, default=0.1, help="minimum time per training step (default 0.1)")
    ap.add_argument("--bandwidth-mbps", type=float, default=16, help="endpoint cap, MB/s per direction (default 16)")
    ap.add_argument("--warmup-s", type=float, default=10, help="no samples before this (default 10)")
    ap.add_argument("--fixed-steps", type=int, default=50, help="K of the fixed strategy (default 50)")
    ap.add_argument("--settle-s", type=float, default=60,
                    help="after each ckptfs/fixed window, wait this long for the bucket to settle (default 60)")
    ap.add_argument("--rounds", type=int, default=1, help="rounds, strategy order rotated (default 1)")
    ap.add_argument("--strategies", default=",".join(STRATEGIES), help="subset of " + ",".join(STRATEGIES))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = ap.parse_args(argv)
    names = [s for s in args.strategies.split(",") if s]
    if not names or set(names) - set(STRATEGIES):
        ap.error(f"strategies must be among {STRATEGIES}")
    torch.set_num_threads(args.threads)
    trainer = Trainer(args.state_mb, args.batch)
    log(f"state {trainer.state_bytes / MiB:.1f} MiB, {args.step_s} s/step, cap {args.bandwidth_mbps} MB/s, "
        f"{args.seconds:.0f} s per strategy x {args.rounds} round(s)")
    windows: dict[str, list[dict]] = {n: [] for n in names}
    with moto() as server, workdir("goodput") as base, FaultProxy(server.endpoint_url) as proxy:
        proxy.set_bandwidth(int(args.bandwidth_mbps * 1e6))
        bucket = server.make_bucket(f"goodput-{uuid.uuid4().hex[:8]}")
        for rnd in range(args.rounds):
            for name in names[rnd % len(names):] + names[:rnd % len(names)]:
                log(f"round {rnd + 1}: {name}")
                w = run_window(name, args, trainer, server, proxy, bucket, base)
                windows[name].append(w)
                log(f"  {len(w['saved_steps'])} saves, {w['committed']} completed, end {w['end']}, "
                    f"settled {w.get('settled_complete')} in {w.get('settle_s', 0):.1f} s")
    results = [summarize(n, windows[n]) for n in names]
    upload = next((r for r in results if r["strategy"] == "upload"), None)
    print()
    print(f"state {trainer.state_bytes / MiB:.1f} MiB, {args.step_s} s/step, endpoint capped at "
          f"{args.bandwidth_mbps:g} MB/s, {args.seconds:.0f} s per strategy, samples every 0.25 s after "
          f"{args.warmup_s:.0f} s, keep LatestN({KEEP}), fixed K = {args.fixed_steps}")
    headers = ["strategy", "steps/s", "saves", "P50 interval", "node loss", "node loss", "restart loss",
               "bucket end", "bucket max", "settled", "vs upload (node / restart)"]
    rows = [["", "", "", "(steps)", "(mean steps)", "(mean s)", "(mean steps)", "(complete/any)", "(complete)",
             "(complete)", "(steps)"]]
    for r in results:
        ratio = "-"
        if upload and upload["node_loss_steps"] and r is not upload:
            ratio = (f"{r['node_loss_steps'] / upload['node_loss_steps']:.2f}x / "
                     f"{r['restart_loss_steps'] / upload['node_loss_steps']:.2f}x")
        rows.append([r["strategy"], f"{r['steps_per_s']:.1f}", r["saves"], _f(r["p50_interval_steps"], ".0f"),
                     _f(r["node_loss_steps"]), _f(r["node_loss_s"]), _f(r["restart_loss_steps"]),
                     ", ".join(f"{c}/{p}" for c, p in zip(r["bucket_end_complete"], r["bucket_end_prefixes"])),
                     r["bucket_max_complete"], ", ".join(_f(x, "d") for x in r["settled_complete"]), ratio])
    print_table(headers, rows)
    return emit({"module": MODULE, "state_bytes": trainer.state_bytes, "step_s": args.step_s,
                 "bandwidth_bytes_per_s": int(args.bandwidth_mbps * 1e6), "seconds": args.seconds,
                 "warmup_s": args.warmup_s, "fixed_steps": args.fixed_steps, "rounds": args.rounds,
                 "results": results})


if __name__ == "__main__":
    run_main(main)
