"""The `make demo` training loop: continuous checkpointing of a small PyTorch model, with a live view.

    python -m mount.demo /mnt/ckpt/demo --seconds 60 --state-mb 256

`run_demo` trains an MLP whose parameters plus Adam state weigh about
`state_mb`, calls `maybe_save` after every step, shows step / last locally
committed step / last durable step / the gateway's dirty bytes and drain rate,
and returns a summary (the orchestration around it, moto and the mount, is the
caller's). It ends with a blocking save of the final state and returns that
state's digest, so a restore elsewhere can be checked bit for bit with
`state_digest`.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import math
import os
import statistics
import time
from typing import Any

import torch
import xxhash

from .checkpointer import ContinuousCheckpointer
from .durability import gateway_status, is_durable
from .policies import Continuous, LatestN

log = logging.getLogger(__name__)

_LAYERS = 4


def build_model(state_mb: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, int]:
    """An MLP and its Adam optimizer whose state (params + 2 moments) is about `state_mb` MiB."""
    params = state_mb * (1 << 20) // (3 * 4)
    width = max(8, int(math.sqrt(params / _LAYERS)))
    layers: list[torch.nn.Module] = []
    for i in range(_LAYERS):
        layers.append(torch.nn.Linear(width, width))
        if i < _LAYERS - 1:
            layers.append(torch.nn.GELU())
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    return model, opt, width


def state_digest(state: Any) -> str:
    """xxh3-128 over a state tree: tensor bytes, dtypes and shapes, and the other leaves' repr."""
    h = xxhash.xxh3_128()

    def walk(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]  # ndarray is a buffer; numpy stubs lack it
        elif isinstance(obj, dict):
            for k in sorted(obj, key=str):
                h.update(f"K{k!r}".encode())
                walk(obj[k])
        elif isinstance(obj, (list, tuple)):
            h.update(f"L{len(obj)}".encode())
            for v in obj:
                walk(v)
        else:
            h.update(f"V{obj!r}".encode())

    walk(state)
    return h.hexdigest()


def _state(model, opt, step: int) -> dict:
    return {"model": model.state_dict(), "optim": opt.state_dict(), "step": step}


def _sync_save_stall(state: dict, directory: str) -> float:
    """Seconds for a synchronous torch.save + fsync of `state` (what the loop would wait for).

    Written under a `.tmp` name, which the gateway never uploads, and removed.
    """
    path = os.path.join(directory, ".sync_save_probe.pt.tmp")
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    dt = time.perf_counter() - t0
    os.unlink(path)
    return dt


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return "-"  # pragma: no cover


def _view(info: dict):
    from rich.table import Table

    table = Table(title="ckptfs demo: continuous checkpointing", show_header=False)
    table.add_column(justify="left", style="bold")
    table.add_column(justify="right")
    for label, value in info.items():
        table.add_row(label, value)
    return table


class LossSampler:
    """Every 0.25 s after a warm-up: steps a node loss and a process restart would cost right now.

    A node loss restarts from the newest checkpoint durable in the bucket, a process restart
    from the newest locally committed one; with none yet, from where the phase began.
    """

    def __init__(self, first_step: int, warmup_s: float, interval_s: float = 0.25):
        self.first_step, self.interval_s = first_step, interval_s
        self.start_after = time.monotonic() + warmup_s
        self.next_at = self.start_after
        self.node: list[int] = []
        self.restart: list[int] = []

    def due(self) -> bool:
        return time.monotonic() >= self.next_at

    def add(self, step: int, durable: int | None, local: int | None) -> None:
        self.next_at = time.monotonic() + self.interval_s
        self.node.append(step - (self.first_step if durable is None else durable))
        self.restart.append(step - (self.first_step if local is None else local))

    def mean_node(self) -> float | None:
        return statistics.fmean(self.node) if self.node else None

    def mean_restart(self) -> float | None:
        return statistics.fmean(self.restart) if self.restart else None


def run_demo(ckpt_root: str, *, seconds: float = 60, state_mb: int = 256, live: bool = True,
             batch: int = 32, keep: Any = None, sync_probes: int = 2,
             wait_durable_s: float = 0.0, baseline: Any = None, baseline_seconds: float = 0.0,
             warmup_s: float = 5.0) -> dict:
    """Train for about `seconds` with continuous checkpointing into `ckpt_root`; return a summary.

    Summary keys: checkpoints_saved, steps, p50_interval_steps, mean_stall_s,
    sync_torch_save_stall_s (same state, same run), last_local_step,
    last_durable_step, final_step and final_state_digest (the final state is
    saved with a blocking save at the end), all_durable (only if
    `wait_durable_s` > 0: whether the final step became durable in that time; the
    checkpointer's close then waits as long for it, so that retention leaves what
    `keep` keeps), node_loss_steps and restart_loss_steps (means of the steps a node
    loss / a process restart would have cost, sampled every 0.25 s after `warmup_s`, at most a
    third of the phase),
    drain_after_training_s (with `wait_durable_s`: until the whole directory was durable).

    `baseline`, if given, is an upload-acknowledged saver (`maybe_save(step, state, loss)`,
    `latest()`, `close()`, e.g. benchmarks.bench_interval.UploadCheckpointer): after the
    checkpoint directory is durable, training goes on for `baseline_seconds` saving only
    through it, and baseline_node_loss_steps is measured the same way.
    """
    from rich.console import Console
    from rich.live import Live

    torch.manual_seed(0)
    model, opt, width = build_model(state_mb)
    teacher = torch.randn(width, width) / math.sqrt(width)

    def train_step() -> float:
        x = torch.randn(batch, width)
        loss = torch.nn.functional.mse_loss(model(x), torch.tanh(x @ teacher))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    step = 0
    loss = train_step()  # Adam's moments exist from here on: the state has its full size
    state_bytes = sum(t.numel() * t.element_size() for t in tensors_of(_state(model, opt, 0)))
    ckpt = ContinuousCheckpointer(ckpt_root, save=Continuous(), keep=keep or LatestN(3))
    saved_steps: list[int] = []
    stalls: list[float] = []
    durable_step = None
    view = {"last": 0.0}
    losses = LossSampler(0, min(warmup_s, seconds / 3))

    def info() -> dict:
        st = ckpt.statistics()
        status = gateway_status(ckpt_root) or {}
        rate = status.get("drain_rate_bps")
        return {
            "step": str(step), "loss": f"{loss:.5f}",
            "checkpoints started": str(st.saves_started),
            "last locally committed step": str(st.last_local_step),
            "last durable step": str(durable_step),
            "superseded (never uploaded)": str(st.superseded),
            "mean stall per save": f"{1e3 * st.mean_stall_s:.1f} ms" if st.mean_stall_s else "-",
            "dirty bytes": _fmt_bytes(status.get("dirty_bytes")),
            "drain rate": _fmt_bytes(rate) + "/s" if rate is not None else "-",
        }

    console = Console()
    live_ctx = Live(_view(info()), console=console, refresh_per_second=4) if live \
        else contextlib.nullcontext()
    t_start = time.monotonic()
    with live_ctx as lv:
        while time.monotonic() - t_start < seconds:
            step += 1
            loss = train_step()
            t0 = time.perf_counter()
            if ckpt.maybe_save(step, _state(model, opt, step), metrics={"loss": loss}):
                stalls.append(time.perf_counter() - t0)
                saved_steps.append(step)
            if losses.due():
                durable_step = ckpt.latest_durable_step()
                losses.add(step, durable_step, ckpt.statistics().last_local_step)
            if time.monotonic() - view["last"] > 0.25:
                view["last"] = time.monotonic()
                durable_step = ckpt.latest_durable_step()
                if lv is not None:
                    lv.update(_view(info()))
        elapsed = time.monotonic() - t_start
        ckpt.wait_local()
        state = _state(model, opt, step)
        if saved_steps[-1:] != [step]:
            ckpt.save(step, state, metrics={"loss": loss})
        final_digest = state_digest(state)
        sync_stalls = [_sync_save_stall(state, ckpt.directory) for _ in range(sync_probes)]
        all_durable = drain_s = None
        t_end = time.monotonic()
        if wait_durable_s > 0:
            try:
                ckpt.wait_durable(step, timeout=wait_durable_s)
                all_durable = True
            except TimeoutError:
                all_durable = False
        durable_step = ckpt.latest_durable_step()
        if lv is not None:
            lv.update(_view(info()))
    ckpt.close(durable_timeout=wait_durable_s)
    if wait_durable_s > 0 and _wait_dir_durable(ckpt_root, max(1.0, wait_durable_s - (time.monotonic() - t_end))):
        drain_s = time.monotonic() - t_end

    st = ckpt.statistics()
    intervals = [b - a for a, b in itertools.pairwise(saved_steps)]
    summary = {
        "checkpoints_saved": st.saves_committed,
        "steps": step,
        "seconds": round(elapsed, 2),
        "state_bytes": state_bytes,
        "p50_interval_steps": statistics.median(intervals) if intervals else None,
        "mean_stall_s": statistics.fmean(stalls) if stalls else None,
        "sync_torch_save_stall_s": statistics.median(sync_stalls) if sync_stalls else None,
        "last_local_step": st.last_local_step,
        "last_durable_step": durable_step,
        "final_step": step,
        "final_state_digest": final_digest,
        "all_durable": all_durable,
        "superseded": st.superseded,
        "node_loss_steps": losses.mean_node(),
        "restart_loss_steps": losses.mean_restart(),
        "drain_after_training_s": None if drain_s is None else round(drain_s, 2),
    }
    if baseline is not None and baseline_seconds > 0:
        summary.update(_run_baseline(baseline, baseline_seconds, warmup_s, step, train_step,
                                     lambda s: _state(model, opt, s), console if live else None))
    log.info("demo summary: %s", summary)
    return summary


def _wait_dir_durable(path: str, timeout: float) -> bool:
    """Whether everything under `path` became durable within `timeout` s (the gateway's directory state)."""
    deadline = time.monotonic() + timeout
    while not is_durable(path):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def _run_baseline(baseline: Any, seconds: float, warmup_s: float, step: int, train_step, state_of,
                  console) -> dict:
    """Go on training for `seconds`, saving only through the upload-acknowledged `baseline`."""
    if console is not None:
        console.print(f"[bold]for comparison: {seconds:.0f} s of upload-acknowledged saving "
                      "(snapshot, torch.save, boto3 upload; the next save after the upload)")
    losses = LossSampler(step, min(warmup_s, seconds / 3))
    saves = 0
    t_start = time.monotonic()
    try:
        while time.monotonic() - t_start < seconds:
            step += 1
            loss = train_step()
            saves += bool(baseline.maybe_save(step, state_of(step), loss))
            if losses.due():
                newest = baseline.latest()
                losses.add(step, newest, newest)
    finally:
        baseline.close()
    return {"baseline_seconds": seconds, "baseline_saves": saves,
            "baseline_node_loss_steps": losses.mean_node()}


def tensors_of(obj: Any):
    """Every tensor in a nested state of dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_of(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors_of(v)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="ckptfs continuous checkpointing demo")
    ap.add_argument("ckpt_root")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--state-mb", type=int, default=256)
    ap.add_argument("--no-live", action="store_true")
    ap.add_argument("--wait-durable", type=float, default=0.0, metavar="S")
    args = ap.parse_args(argv)
    summary = run_demo(args.ckpt_root, seconds=args.seconds, state_mb=args.state_mb,
                       live=not args.no_live, wait_durable_s=args.wait_durable)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
