"""Stall per save versus a plain host copy of the same state (issue 6; goal: ratio <= 1.2).

    .venv/bin/python benchmarks/bench_stall.py --mb 512 --repeats 7 [--dir /mnt/ckpt/bench] [--device cuda]

One run measures, interleaved in rotating order, with the background writer idle:
  - clone:  `{k: v.clone()}` of the state on the host (on CUDA: `.to("cpu")`), the baseline;
  - copy:   `copy_` into preallocated host buffers (on CUDA: pinned, non_blocking, one sync);
  - stall:  `ContinuousCheckpointer.maybe_save` (snapshot + hand-off to the writer).
The first save allocates the reused buffers; it is reported apart ("cold") and the
ratio uses the medians of the later ones. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mount import ContinuousCheckpointer, LatestN  # noqa: E402


def make_state(mb: int, n_tensors: int, device: str) -> dict:
    """A state of about `mb` MiB: `n_tensors` float32 tensors plus a few small Python leaves."""
    per = (mb << 20) // 4 // n_tensors
    return {"model": {f"layer{i}": torch.randn(per, device=device) for i in range(n_tensors)},
            "optim": {"step": 1, "lr": 3e-4}}


def tensors(state: dict) -> list[torch.Tensor]:
    return list(state["model"].values())


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_clone(state: dict, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    copies = [t.to("cpu", copy=True) for t in tensors(state)]
    sync(device)
    dt = time.perf_counter() - t0
    del copies
    return dt


def time_copy(state: dict, bufs: list[torch.Tensor], device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    for b, t in zip(bufs, tensors(state)):
        b.copy_(t, non_blocking=t.is_cuda)
    sync(device)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=512, help="state size in MiB (default 512)")
    ap.add_argument("--tensors", type=int, default=32, help="number of tensors (default 32)")
    ap.add_argument("--repeats", type=int, default=7, help="measurements per method (>= 5)")
    ap.add_argument("--dir", default=None, help="checkpoint directory (default: a temp dir)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--format", default="torch", choices=["torch", "dcp"])
    args = ap.parse_args(argv)
    if args.repeats < 5:
        ap.error("--repeats must be >= 5")

    state = make_state(args.mb, args.tensors, args.device)
    pin = args.device.startswith("cuda")
    bufs = [torch.empty(t.shape, dtype=t.dtype, pin_memory=pin) for t in tensors(state)]
    root = args.dir or tempfile.mkdtemp(prefix="bench_stall_")
    clones, copies, stalls = [], [], []
    with ContinuousCheckpointer(root, keep=LatestN(1), format=args.format) as ckpt:
        def time_save(i: int) -> float:
            sync(args.device)
            t0 = time.perf_counter()
            assert ckpt.maybe_save(i, state), "the writer should be idle here"
            dt = time.perf_counter() - t0
            ckpt.wait_local()  # the next measurement starts with the writer idle
            return dt

        runs = [lambda i: clones.append(time_clone(state, args.device)),
                lambda i: copies.append(time_copy(state, bufs, args.device)),
                lambda i: stalls.append(time_save(i))]
        stalls.append(time_save(0))  # warm-up: allocates the reused snapshot buffers
        clones.append(time_clone(state, args.device))
        copies.append(time_copy(state, bufs, args.device))
        for i in range(1, args.repeats + 1):  # rotate the order so no method always goes first
            for k in range(3):
                runs[(i + k) % 3](i)
        write_s = ckpt.statistics().last_write_s
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)

    med = {name: statistics.median(xs[1:]) for name, xs in
           (("clone", clones), ("copy", copies), ("stall", stalls))}
    result = {
        "bench": "stall", "device": args.device, "state_mib": args.mb, "tensors": args.tensors,
        "repeats": args.repeats, "format": args.format,
        "clone_median_s": med["clone"], "copy_median_s": med["copy"], "stall_median_s": med["stall"],
        "stall_cold_s": stalls[0], "write_s": write_s,
        "stall_over_clone": med["stall"] / med["clone"],
        "stall_over_copy": med["stall"] / med["copy"],
        "goal": 1.2,
    }
    print(f"state {args.mb} MiB in {args.tensors} tensors on {args.device}, "
          f"median of {args.repeats} (after one warm-up)")
    print(f"{'method':<36}{'median s':>10}{'GiB/s':>8}")
    gib = args.mb / 1024
    for label, key in (("host copy: clone() (baseline)", "clone"),
                       ("host copy: copy_ into reused buffers", "copy"),
                       ("maybe_save stall", "stall")):
        print(f"{label:<36}{med[key]:>10.4f}{gib / med[key]:>8.1f}")
    print(f"{'maybe_save stall, first (cold)':<36}{stalls[0]:>10.4f}")
    print(f"{'background write (not a stall)':<36}{write_s:>10.4f}")
    print(f"stall / clone = {result['stall_over_clone']:.3f}  (goal <= 1.2);  "
          f"stall / copy_ = {result['stall_over_copy']:.3f}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
