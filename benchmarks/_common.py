"""Shared helpers for the ckptfs benchmarks: moto endpoint, real mounts through the CLI, timing.

Everything runs on 127.0.0.1 against a moto server (tests/support/s3server.py). Mounts use the real
`ckptfs` CLI (`python -m gateway.cli`), so a benchmark measures what users run. Every helper is a
context manager that cleans up (unmount, kill the daemon, stop moto, delete files) even on error.

Work dirs live under $CKPTFS_BENCH_DIR (default /var/tmp/ckptfs-bench): cache dirs and the plain
directories compared against them are on the same disk.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.support.s3server import S3Server  # noqa: E402

BENCH_ROOT = Path(os.environ.get("CKPTFS_BENCH_DIR", "/var/tmp/ckptfs-bench"))
MiB = 1 << 20
GiB = 1 << 30
CLI_ENV = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
               AWS_DEFAULT_REGION="us-east-1")
CLI = [sys.executable, "-m", "gateway.cli"]


# ---------------------------------------------------------------------------- arguments / output

def parse_size(text: str) -> int:
    """'1GiB', '512MiB', '4MiB', '4096' -> bytes (binary units only; K/M/G mean KiB/MiB/GiB)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": MiB, "G": GiB}.get(t[-1:], 1)
    return int(float(t[:-1] if t[-1:] in "KMG" else t) * mult)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def base_parser(doc: str, size: str = "1GiB", repeat: int = 3) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default=size, help=f"bytes per file (default {size}; e.g. 256MiB)")
    ap.add_argument("--repeat", type=int, default=repeat, help=f"trials per variant (default {repeat})")
    return ap


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [[str(c) for c in r] for r in [headers] + rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, r in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def emit(result: dict) -> dict:
    """Print the final JSON line (run_all parses the last line starting with '{')."""
    result.setdefault("date", datetime.datetime.now().astimezone().isoformat(timespec="seconds"))
    result.setdefault("machine", machine_note())
    result.setdefault("command", " ".join([".venv/bin/python", "-m", result.get("module", "?")] + sys.argv[1:]))
    sys.stdout.flush()
    print(json.dumps(result, sort_keys=True))
    sys.stdout.flush()
    return result


def machine_note() -> str:
    return (f"{os.cpu_count()} cores, {platform.machine()}, Linux {platform.release()}, "
            f"Python {platform.python_version()}, moto[server] S3 on 127.0.0.1, cache+plain dirs on "
            f"{BENCH_ROOT}")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- work dirs

@contextlib.contextmanager
def workdir(tag: str) -> Iterator[Path]:
    BENCH_ROOT.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"{tag}-", dir=BENCH_ROOT))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------- moto

@contextlib.contextmanager
def moto() -> Iterator[S3Server]:
    server = S3Server()
    # moto keeps object bodies in spooled temp files under its TMPDIR: put them on the bench disk.
    shutil.rmtree(server.workdir, ignore_errors=True)
    root = Path(os.environ.get("CKPTFS_BENCH_MOTO_DIR", BENCH_ROOT))
    root.mkdir(parents=True, exist_ok=True)
    server.workdir = Path(tempfile.mkdtemp(prefix="moto-", dir=root))
    server.log_path = server.workdir / "moto.log"
    try:
        server.start()
        yield server
    finally:
        server.close()


def empty_bucket(server: S3Server, bucket: str) -> None:
    s3 = server.boto3_client()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            s3.delete_object(Bucket=bucket, Key=obj["Key"])
    for up in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
        s3.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])


@contextlib.contextmanager
def latency_proxy(server: S3Server, one_way_ms: float, bandwidth: int | None = None,
                  lifetime_s: float = 3600) -> Iterator[str]:
    """tests/support/latencyproxy.py in its own process in front of `server`; yields its endpoint URL.

    A process of its own, so the benchmark's client threads (boto3) do not slow the proxy down."""
    cmd = [sys.executable, "-m", "tests.support.latencyproxy", server.endpoint_url, "--one-way-ms", str(one_way_ms),
           "--lifetime", str(lifetime_s)] + (["--bandwidth", str(bandwidth)] if bandwidth else [])
    proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------- mounts

def cli(*args: str, timeout: float = 120, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(CLI + list(args), cwd=REPO, env=dict(CLI_ENV, **(env or {})), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ckptfs {' '.join(args)} -> {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return proc


class Mount:
    """A real ckptfs mount started by `ckptfs mount`; use as a context manager."""

    def __init__(self, server: S3Server, base: Path, *, bucket: str | None = None, prefix: str = "bench",
                 drain_delay_s: float | None = None, part_size: str | None = None,
                 concurrency: int | None = None, extra: tuple[str, ...] = (), env: dict | None = None,
                 endpoint_url: str | None = None):
        self.server = server
        self.env = env or {}  # extra environment of the daemon (e.g. MALLOC_* tunables)
        self.bucket = bucket or f"bench-{uuid.uuid4().hex[:8]}"
        self.prefix = prefix
        tag = uuid.uuid4().hex[:6]
        self.mnt = base / f"mnt-{tag}"
        self.cache = base / f"cache-{tag}"
        self.args = ["--cache-dir", str(self.cache), "--endpoint-url", endpoint_url or server.endpoint_url]
        if drain_delay_s is not None:
            self.args += ["--drain-delay", str(drain_delay_s)]
        if part_size is not None:
            self.args += ["--part-size", part_size]
        if concurrency is not None:
            self.args += ["--upload-concurrency", str(concurrency)]
        self.args += list(extra)
        self.pid: int | None = None
        self.no_drain_on_exit = True

    def __enter__(self) -> "Mount":
        self.mnt.mkdir(parents=True)
        try:
            self.server.make_bucket(self.bucket)
        except Exception as exc:  # already exists is fine
            if "BucketAlready" not in str(exc):
                raise
        cli("mount", f"s3://{self.bucket}/{self.prefix}", str(self.mnt), *self.args, env=self.env)
        self.pid = int(self.status()["pid"])
        return self

    def status(self) -> dict:
        return json.loads(os.getxattr(self.mnt, "user.ckptfs.status"))

    def wait(self, timeout: float = 600) -> float:
        """Run `ckptfs wait MNT`; return its wall time."""
        t0 = time.perf_counter()
        cli("wait", str(self.mnt), "--timeout", str(timeout), timeout=timeout + 30)
        return time.perf_counter() - t0

    def path(self, name: str) -> Path:
        return self.mnt / name

    def unmount(self, no_drain: bool = True) -> None:
        if not os.path.ismount(self.mnt):
            return
        args = ["unmount", str(self.mnt), "--timeout", "60"] + (["--no-drain"] if no_drain else [])
        try:
            cli(*args, timeout=90)
        except Exception as exc:
            log(f"unmount failed ({exc}); forcing")
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)

    def __exit__(self, *exc) -> None:
        try:
            self.unmount(no_drain=self.no_drain_on_exit)
        finally:
            if self.pid is not None and _is_our_daemon(self.pid, self.cache):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
            if os.path.ismount(self.mnt):
                subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)
            shutil.rmtree(self.cache, ignore_errors=True)
            with contextlib.suppress(OSError):
                self.mnt.rmdir()


def _is_our_daemon(pid: int, cache: Path) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return False
    return b"gateway.cmd_mount" in cmd and str(cache).encode() in cmd


# ---------------------------------------------------------------------------- workloads

_BLOCKS: dict[int, bytes] = {}


def block(n: int) -> bytes:
    """A random buffer of n bytes, made once per size."""
    if n not in _BLOCKS:
        _BLOCKS[n] = os.urandom(n)
    return _BLOCKS[n]


def write_checkpoint(directory: Path, name: str, size: int, chunk: int = 4 * MiB) -> dict:
    """Write `size` bytes in `chunk` writes to NAME.tmp, fsync, rename to NAME.

    Returns seconds: total, write (open..last write), fsync, rename."""
    buf = block(chunk)
    tmp, final = directory / f"{name}.tmp", directory / name
    t0 = time.perf_counter()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = size
        while left > 0:
            n = os.write(fd, buf if left >= chunk else buf[:left])
            left -= n
        t1 = time.perf_counter()
        os.fsync(fd)
        t2 = time.perf_counter()
    finally:
        os.close(fd)
    os.rename(tmp, final)
    t3 = time.perf_counter()
    return {"total": t3 - t0, "write": t1 - t0, "fsync": t2 - t1, "rename": t3 - t2}


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RssSampler:
    """Samples RSS (and CPU times) of a pid in a thread."""

    def __init__(self, pid: int, interval_s: float = 0.05):
        import psutil
        self.proc = psutil.Process(pid)
        self.interval_s = interval_s
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), self.proc.memory_info().rss))
            except Exception:
                return
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def peak(self, since: float | None = None) -> int:
        vals = [r for t, r in self.samples if since is None or t >= since]
        return max(vals, default=0)


def cpu_seconds(pid: int) -> float:
    import psutil
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def main_thread_cpu_seconds(pid: int) -> float:
    """CPU seconds of the process's main thread: the one that serves FUSE requests in the daemon."""
    import psutil
    for t in psutil.Process(pid).threads():
        if t.id == pid:
            return t.user_time + t.system_time
    return float("nan")


def run_main(main: Callable[[list[str] | None], dict]) -> None:
    try:
        main(None)
    except KeyboardInterrupt:
        sys.exit(130)
