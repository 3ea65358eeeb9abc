"""P50 checkpoint interval in training steps, with the S3 endpoint throttled (issue 6, second bullet).

    .venv/bin/python -m benchmarks.bench_interval [--seconds 40] [--state-mb 96] [--bandwidth-mbps 25]

One run trains a small MLP (mount.demo.build_model: params + Adam moments of about --state-mb MiB) on
the CPU (one torch thread by default) and gives each strategy the same wall-clock time, --seconds,
split into --rounds windows (default 2) with the order rotated every round, so that a busy spell of
the shared machine does not land on one strategy only:

  none      no checkpointing: the training speed without saves (reference row).
  upload    continuous, acknowledged by the upload: a background thread `torch.save`s the host
            snapshot into a BytesIO and uploads it with boto3 `upload_fileobj` (16 MiB parts, 8 in
            parallel, like the gateway) through the throttled endpoint; the next save starts at the
            first step after that upload returned. Snapshot as in ckptfs (mount.snapshot.Snapshotter:
            reused host buffers). Keeps the newest 3 objects.
  ckptfs    continuous, acknowledged by the local write: ContinuousCheckpointer(<mount>/run,
            save=Continuous(), keep=LatestN(3)) on a real ckptfs mount (`python -m gateway.cli mount`)
            whose drain goes through the same throttled endpoint.
  fixed     fixed interval: ContinuousCheckpointer(<mount>/run, save=FixedInterval(steps=K),
            keep=LatestN(3)) on a ckptfs mount: a save every K steps, asynchronous (the loop stalls
            only for the snapshot; the write into the mount runs in the background).

The S3 endpoint is moto on 127.0.0.1 behind tests/support/faultproxy.FaultProxy with
`set_bandwidth(--bandwidth-mbps * 10**6)` bytes/s per direction, shared by all connections. Every
window of ckptfs / fixed gets a fresh mount, unmounted with --no-drain when the window ends, and the
upload strategy's save in flight is awaited after its window: no strategy's uploads eat into the
bandwidth of the next window.

Reported per strategy (windows pooled): steps/s, checkpoints committed (ckptfs, fixed: locally
committed; upload: upload returned) and started, the P50 (P10-P90) interval in steps between the
starts of consecutive saves and the P50 in seconds, the mean stall per save (the `maybe_save` call
that started a save: host snapshot + hand-off) and the total stall, the bytes that went up through
the proxy, and at each window's end how far the newest checkpoint durable in the bucket was behind
the training (steps, and seconds since that save started; gateway xattr for ckptfs / fixed, last
finished upload for upload). Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import queue
import statistics
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks._common import MiB, Mount, emit, log, moto, print_table, run_main, workdir
from mount import Continuous, ContinuousCheckpointer, FixedInterval, LatestN, durability  # noqa: E402
from mount.demo import build_model, tensors_of  # noqa: E402
from mount.snapshot import Snapshotter  # noqa: E402
from tests.support.faultproxy import FaultProxy  # noqa: E402

MODULE = "benchmarks.bench_interval"
STRATEGIES = ("none", "upload", "ckptfs", "ckptfs-bounded", "fixed")


# ---------------------------------------------------------------------------- the training loop

class Trainer:
    """The MLP, its Adam optimizer and one training step (batch of random inputs, a fixed teacher)."""

    def __init__(self, state_mb: int, batch: int):
        torch.manual_seed(0)
        self.model, self.opt, self.width = build_model(state_mb)
        self.teacher = torch.randn(self.width, self.width) / math.sqrt(self.width)
        self.batch = batch
        self.step_no = 0
        self.train_step()  # Adam's moments exist from here on: the state has its full size
        self.state_bytes = sum(t.numel() * t.element_size() for t in tensors_of(self.state()))

    def train_step(self) -> float:
        x = torch.randn(self.batch, self.width)
        loss = torch.nn.functional.mse_loss(self.model(x), torch.tanh(x @ self.teacher))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.step_no += 1
        return loss.item()

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optim": self.opt.state_dict(), "step": self.step_no}


def train_window(trainer: Trainer, seconds: float,
                 maybe_save: Callable[[int, dict, float], bool] | None) -> dict:
    """Train for `seconds`; after every step call `maybe_save(step, state, loss)` (True: a save started).

    Returns steps, elapsed seconds, the steps at which saves started and the stall of each such call.
    """
    saved, stalls, times = [], [], []
    steps, t_start = 0, time.monotonic()
    while time.monotonic() - t_start < seconds:
        loss = trainer.train_step()
        steps += 1
        if maybe_save is not None:
            step = trainer.step_no
            t0 = time.perf_counter()
            if maybe_save(step, trainer.state(), loss):
                stalls.append(time.perf_counter() - t0)
                saved.append(step)
                times.append(time.monotonic() - t_start)
    return {"steps": steps, "elapsed_s": time.monotonic() - t_start, "saved_steps": saved,
            "saved_at_s": times, "stalls_s": stalls, "t_start": t_start, "last_step": trainer.step_no}


# ---------------------------------------------------------------------------- strategy: upload

class UploadCheckpointer:
    """Continuous saving acknowledged by the upload: snapshot, then torch.save + upload_fileobj in a thread.

    The next save starts at the first step after the previous upload returned; retention keeps the
    newest `keep` objects (delete_object of older ones, after each upload).
    """

    def __init__(self, s3, bucket: str, prefix: str, *, part_size: int = 16 * MiB, concurrency: int = 8,
                 keep: int = 3):
        from boto3.s3.transfer import TransferConfig

        self.s3, self.bucket, self.prefix, self.keep = s3, bucket, prefix, keep
        self.transfer = TransferConfig(multipart_threshold=part_size, multipart_chunksize=part_size,
                                       max_concurrency=concurrency, use_threads=True)
        self.snapshotter = Snapshotter()
        self.busy = False
        self.error: BaseException | None = None
        self.uploaded: list[int] = []
        self.upload_s: list[float] = []
        self.first_done_s: float | None = None  # time.monotonic() when the first upload returned
        self.lock = threading.Lock()
        self.jobs: queue.Queue = queue.Queue(maxsize=1)
        self.thread = threading.Thread(target=self._run, name="upload-ckpt", daemon=True)
        self.thread.start()

    def key(self, step: int) -> str:
        return f"{self.prefix}/step_{step}/state.pt"

    def maybe_save(self, step: int, state: dict, loss: float) -> bool:
        with self.lock:
            if self.error is not None:
                raise RuntimeError(f"upload failed: {self.error!r}") from self.error
            if self.busy:
                return False
            self.busy = True
        snap = self.snapshotter.snapshot(state)
        self.jobs.put((step, snap))
        return True

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            step, snap = job
            try:
                t0 = time.perf_counter()
                buf = io.BytesIO()
                torch.save(snap, buf)
                buf.seek(0)
                self.s3.upload_fileobj(buf, self.bucket, self.key(step), Config=self.transfer)
                dt = time.perf_counter() - t0
                del buf
                with self.lock:
                    self.uploaded.append(step)
                    self.upload_s.append(dt)
                    if self.first_done_s is None:
                        self.first_done_s = time.monotonic()
                for old in self.uploaded[:-self.keep]:
                    self.s3.delete_object(Bucket=self.bucket, Key=self.key(old))
                del self.uploaded[:-self.keep]
            except BaseException as exc:  # surfaced by the next maybe_save / close
                with self.lock:
                    self.error = exc
            finally:
                with self.lock:
                    self.busy = False

    def committed(self) -> int:
        with self.lock:
            return len(self.upload_s)

    def latest(self) -> int | None:
        with self.lock:
            return self.uploaded[-1] if self.uploaded else None

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()
        if self.error is not None:
            raise RuntimeError(f"upload failed: {self.error!r}") from self.error


# ---------------------------------------------------------------------------- the strategies

class _ProxyEndpoint:
    """What benchmarks._common.Mount needs of an S3 server, with the daemon pointed at the proxy."""

    def __init__(self, proxy: FaultProxy):
        self.endpoint_url = proxy.endpoint_url

    def make_bucket(self, name: str) -> str:
        return name  # created on the server directly, once per run


class DurableSampler:
    """Polls a checkpoint directory on a ckptfs mount: the newest step the gateway reports durable.

    Reads the `user.ckptfs.state` xattr of the step directories, newest first, every `interval_s`.
    """

    def __init__(self, directory: Path, t_start: float, interval_s: float = 0.5):
        self.directory, self.t_start, self.interval_s = directory, t_start, interval_s
        self.samples: list[tuple[float, int | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="durable-sampler", daemon=True)

    def newest_durable(self) -> int | None:
        try:
            names = os.listdir(self.directory)
        except OSError:
            return None
        steps = sorted((int(n[5:]) for n in names if n.startswith("step_") and n[5:].isdigit()), reverse=True)
        for step in steps:
            with contextlib.suppress(OSError):
                if durability.read_state(self.directory / f"step_{step}") == "durable":
                    return step
        return None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.samples.append((time.monotonic() - self.t_start, self.newest_durable()))

    def first_durable_s(self) -> float | None:
        return next((t for t, s in self.samples if s is not None), None)

    def __enter__(self) -> "DurableSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


def run_window(name: str, seconds: float, args, trainer: Trainer, server, proxy: FaultProxy, bucket: str,
               base: Path) -> dict:
    """One strategy for one window of `seconds`; returns the raw figures of that window."""
    proxy.reset_stats()
    extra: dict[str, Any] = {}
    durable = first_durable_s = None
    if name == "none":
        res = train_window(trainer, seconds, None)
        committed = 0
    elif name == "upload":
        ckpt = UploadCheckpointer(server.boto3_client(proxy.endpoint_url), bucket, f"upload-{uuid.uuid4().hex[:6]}")
        try:
            res = train_window(trainer, seconds, ckpt.maybe_save)
            committed, durable = ckpt.committed(), ckpt.latest()
            extra["bytes_up"] = proxy.stats["bytes_up"]
            extra["upload_s"] = list(ckpt.upload_s)
            first_durable_s = ckpt.first_done_s - res["t_start"] if ckpt.first_done_s else None
        finally:
            t0 = time.monotonic()
            ckpt.close()  # the upload in flight, outside the window
            log(f"  upload: waited {time.monotonic() - t0:.1f} s for the upload in flight")
    else:
        save = {"ckptfs-bounded": Continuous(max_not_durable=1),
                "ckptfs": Continuous()}.get(name) or FixedInterval(steps=args.fixed_steps)
        with Mount(_ProxyEndpoint(proxy), base, bucket=bucket, prefix=f"{name}-{uuid.uuid4().hex[:6]}") as m:
            run_dir = m.mnt / "run"
            ckpt = ContinuousCheckpointer(run_dir, save=save, keep=LatestN(3))
            try:
                with DurableSampler(run_dir, time.monotonic()) as sampler:
                    res = train_window(trainer, seconds,
                                       lambda step, state, loss: ckpt.maybe_save(step, state, {"loss": loss}))
                    extra["bytes_up"] = proxy.stats["bytes_up"]
                    durable = sampler.newest_durable()
                sampler_start = sampler.t_start
                first = sampler.first_durable_s()
                first_durable_s = None if first is None else first + sampler_start - res["t_start"]
                status = m.status()
                extra["dirty_bytes_end"] = status.get("dirty_bytes")
                extra["checkpoint_dirs_end"] = len([n for n in os.listdir(run_dir) if n.startswith("step_")])
                extra["cache_bytes_end"] = status.get("cache_used_bytes", status.get("cache_bytes"))
            finally:
                ckpt.close()  # waits for the local write in flight (not for the drain)
            st = ckpt.statistics()
            committed = st.saves_committed
            extra["last_local_write_s"] = st.last_write_s
    end_s = res["elapsed_s"]
    durable_lag_s = None
    if durable is not None and durable in res["saved_steps"]:
        durable_lag_s = end_s - res["saved_at_s"][res["saved_steps"].index(durable)]
    return {**res, **extra, "committed": committed, "durable": durable, "durable_lag_s": durable_lag_s,
            "first_durable_s": first_durable_s, "load1": os.getloadavg()[0]}


def summarize(name: str, windows: list[dict]) -> dict:
    """Pool one strategy's windows: intervals and stalls within each window, counts summed."""
    intervals, intervals_s, stalls = [], [], []
    for w in windows:
        st, ts = w["saved_steps"], w["saved_at_s"]
        intervals += [b - a for a, b in zip(st, st[1:])]
        intervals_s += [b - a for a, b in zip(ts, ts[1:])]
        stalls += w["stalls_s"]
    steps = sum(w["steps"] for w in windows)
    elapsed = sum(w["elapsed_s"] for w in windows)
    q = statistics.quantiles(intervals, n=10, method="inclusive") if len(intervals) >= 2 else None
    med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
    return {
        "strategy": name,
        "windows": len(windows),
        "steps": steps,
        "elapsed_s": round(elapsed, 2),
        "steps_per_s": steps / elapsed,
        "saves_started": sum(len(w["saved_steps"]) for w in windows),
        "checkpoints": sum(w["committed"] for w in windows),
        "intervals": len(intervals),
        "p50_interval_steps": med(intervals),
        "p10_interval_steps": q[0] if q else None,
        "p90_interval_steps": q[-1] if q else None,
        "p50_interval_s": med(intervals_s),
        "mean_stall_s": statistics.fmean(stalls) if stalls else None,
        "p50_stall_s": med(stalls),
        "total_stall_s": sum(stalls),
        "stall_fraction": sum(stalls) / elapsed,
        "mb_up": sum(w.get("bytes_up", 0) for w in windows) / 1e6,
        "durable_lag_steps_end": [None if w["durable"] is None else w["last_step"] - w["durable"] for w in windows],
        "durable_lag_s_end": [w["durable_lag_s"] for w in windows],
        "first_durable_s": [w["first_durable_s"] for w in windows],
        "dirty_bytes_end": [w.get("dirty_bytes_end") for w in windows],
        "checkpoint_dirs_end": [w.get("checkpoint_dirs_end") for w in windows],
        "mean_upload_s": statistics.fmean(u) if (u := [x for w in windows for x in w.get("upload_s", [])]) else None,
        "load1": [round(w["load1"], 2) for w in windows],
        "saved_steps": [w["saved_steps"] for w in windows],
    }


# ---------------------------------------------------------------------------- main

def _fmt(v, spec: str = "", none: str = "-") -> str:
    return none if v is None else format(v, spec)


def _lag(r: dict) -> str:
    if r["strategy"] == "none":
        return "-"
    parts = []
    for steps, secs in zip(r["durable_lag_steps_end"], r["durable_lag_s_end"]):
        parts.append("none yet" if steps is None else
                     f"{steps} st / {secs:.0f} s" if secs is not None else f"{steps} st")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=40, help="wall time per strategy, all rounds (default 40)")
    ap.add_argument("--state-mb", type=int, default=96, help="params + Adam state in MiB (default 96)")
    ap.add_argument("--bandwidth-mbps", type=float, default=25,
                    help="S3 endpoint throttle, MB/s (10^6 bytes/s) per direction (default 25)")
    ap.add_argument("--fixed-steps", type=int, default=100, help="K of the fixed-interval strategy (default 100)")
    ap.add_argument("--batch", type=int, default=32, help="training batch size (default 32)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: two would oversubscribe the 2 cores shared "
                         "with the save thread, the FUSE daemon, the proxy and moto)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="split each strategy's time into this many windows, strategies rotated each round "
                         "(default 2), so that a busy spell of the machine does not land on one strategy")
    ap.add_argument("--strategies", default=",".join(STRATEGIES),
                    help=f"comma-separated subset of {','.join(STRATEGIES)}")
    args = ap.parse_args(argv)
    names = [s for s in args.strategies.split(",") if s]
    bad = set(names) - set(STRATEGIES)
    if bad or not names:
        ap.error(f"unknown strategies {sorted(bad)}")
    torch.set_num_threads(args.threads)

    trainer = Trainer(args.state_mb, args.batch)
    log(f"model: width {trainer.width}, state {trainer.state_bytes / MiB:.1f} MiB, torch threads "
        f"{torch.get_num_threads()}, {args.rounds} round(s) of {args.seconds / args.rounds:.0f} s per strategy")
    window_s = args.seconds / args.rounds
    windows: dict[str, list[dict]] = {n: [] for n in names}
    load_start = os.getloadavg()
    with moto() as server, workdir("interval") as base, FaultProxy(server.endpoint_url) as proxy:
        proxy.set_bandwidth(int(args.bandwidth_mbps * 1e6))
        bucket = server.make_bucket(f"interval-{uuid.uuid4().hex[:8]}")
        for rnd in range(args.rounds):
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            for name in order:
                log(f"round {rnd + 1}/{args.rounds}: {name}, {window_s:.0f} s")
                w = run_window(name, window_s, args, trainer, server, proxy, bucket, base)
                windows[name].append(w)
                log(f"  {w['steps']} steps, {w['committed']} checkpoints, saves at steps {w['saved_steps'][:12]}"
                    f"{' ...' if len(w['saved_steps']) > 12 else ''}")
    load_end = os.getloadavg()
    results = [summarize(n, windows[n]) for n in names]

    print()
    print(f"state {trainer.state_bytes / MiB:.1f} MiB (MLP width {trainer.width} + Adam), batch {args.batch}, "
          f"torch threads {args.threads}; {args.seconds:.0f} s per strategy in {args.rounds} window(s); "
          f"S3 endpoint throttled to {args.bandwidth_mbps:g} MB/s; fixed K = {args.fixed_steps}")
    headers = ["strategy", "steps/s", "checkpoints", "P50 interval", "P10-P90", "P50 interval",
               "mean stall/save", "stall total", "MB up", "durable lag at window end"]
    sub = ["", "", "(started)", "(steps)", "(steps)", "(s)", "", "(% of time)", "", "(steps / s, per window)"]
    rows = [sub]
    for r in results:
        rows.append([
            r["strategy"], f"{r['steps_per_s']:.1f}", f"{r['checkpoints']} ({r['saves_started']})",
            _fmt(r["p50_interval_steps"], ".0f"),
            "-" if r["p10_interval_steps"] is None else f"{r['p10_interval_steps']:.0f}-{r['p90_interval_steps']:.0f}",
            _fmt(r["p50_interval_s"], ".2f"),
            "-" if r["mean_stall_s"] is None else f"{1e3 * r['mean_stall_s']:.0f} ms",
            f"{r['total_stall_s']:.1f} s ({100 * r['stall_fraction']:.1f}%)",
            f"{r['mb_up']:.0f}", _lag(r),
        ])
    print_table(headers, rows)
    return emit({
        "module": MODULE,
        "state_bytes": trainer.state_bytes,
        "width": trainer.width,
        "batch": args.batch,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "bandwidth_bytes_per_s": int(args.bandwidth_mbps * 1e6),
        "fixed_steps": args.fixed_steps,
        "torch_threads": args.threads,
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "results": results,
    })


if __name__ == "__main__":
    run_main(main)
