"""`ckptfs mount` and `ckptfs unmount`.

Without --foreground, `mount` starts the daemon in its own session and returns once the mount is
ready (exit 0) or the daemon failed (its one-line reason, exit 1). The daemon reports over a pipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from gateway import config as configuration
from gateway.cache_dir import UnsafeCacheDir, secure_cache_dir
from gateway.errors import CliError

READY = b"READY\n"


def register(subparsers) -> None:
    p = subparsers.add_parser("mount", help="mount a bucket prefix (returns when the mount is ready)")
    p.add_argument("source", metavar="s3://BUCKET[/PREFIX]")
    p.add_argument("mountpoint")
    p.add_argument("--cache-dir", help="local NVMe directory for data and journal (required)")
    p.add_argument("--endpoint-url", help="S3 endpoint, e.g. http://127.0.0.1:9000")
    p.add_argument("--region")
    p.add_argument("--foreground", action="store_true", default=None, help="stay in the foreground")
    p.add_argument("--allow-other", action="store_true", default=None, help="let other users use the mount")
    p.add_argument("--config", help="TOML config file (default /etc/ckptfs/ckptfs.toml)")
    p.add_argument("--drain-delay", dest="drain_delay_s", type=float,
                   help="seconds a closed file stays quiet before upload")
    p.add_argument("--drain-timeout", dest="drain_timeout_s", type=float, help="seconds to drain on unmount/SIGTERM")
    p.add_argument("--no-drain", action="store_true", default=None, help="exit at unmount without draining")
    p.add_argument("--part-size", dest="part_size_bytes", help="multipart part size, e.g. 16MiB")
    p.add_argument("--upload-concurrency", type=int, help="parts uploaded in parallel")
    p.add_argument("--hold-pattern", dest="hold_patterns", action="append", help="temporary-name pattern (repeatable)")
    p.add_argument("--hold-limit", dest="hold_limit_s", type=float,
                   help="seconds before a held file is uploaded anyway")
    p.add_argument("--marker-pattern", dest="marker_patterns", action="append",
                   help="commit-marker name pattern (repeatable; replaces the defaults)")
    p.add_argument("--pointer-pattern", dest="pointer_patterns", action="append",
                   help="pointer-file name pattern (repeatable; replaces the defaults)")
    p.add_argument("--put-concurrency", dest="put_concurrency", type=int,
                   help="single-request uploads, copies and deletes in flight")
    p.add_argument("--cache-size", help="cache size: bytes (64GiB) or percent of the cache disk (90%%)")
    p.add_argument("--metadata-ttl", dest="metadata_ttl_s", type=float, help="seconds between listings of the bucket")
    p.add_argument("--backpressure-timeout", dest="backpressure_timeout_s", type=float,
                   help="seconds a writer waits for cache room before ENOSPC")
    p.add_argument("--cluster", action="store_true", default=None,
                   help="several nodes mount this prefix: leases, cluster commits, shared namespace")
    p.add_argument("--node-id", help="this node's id in the cluster (default: kept in the cache dir)")
    p.add_argument("--lease-interval", dest="lease_interval_s", type=float, help="seconds between lease renewals")
    p.add_argument("--cluster-poll", dest="cluster_poll_s", type=float,
                   help="seconds between looks at other nodes' records while active")
    p.add_argument("--remote-lookup-timeout", dest="remote_lookup_timeout_s", type=float,
                   help="seconds a lookup that missed may wait for the bucket")
    p.add_argument("--metrics-addr", help="serve Prometheus metrics on HOST:PORT")
    p.add_argument("--log-level")
    p.add_argument("--log-file")
    p.set_defaults(func=mount_command)

    u = subparsers.add_parser("unmount", help="unmount; the daemon drains pending uploads before it exits")
    u.add_argument("mountpoint")
    u.add_argument("--no-drain", action="store_true", help="exit without draining (pending work stays journaled)")
    u.add_argument("--timeout", type=float, default=None, help="seconds to wait for the daemon to exit")
    u.add_argument("--quiet", "-q", action="store_true", help="no progress bar (there is none off a terminal)")
    u.set_defaults(func=unmount_command)


FLAG_FIELDS = ("cache_dir", "endpoint_url", "region", "foreground", "allow_other", "drain_delay_s",
               "drain_timeout_s", "no_drain", "part_size_bytes", "upload_concurrency", "put_concurrency",
               "hold_patterns", "marker_patterns", "pointer_patterns", "hold_limit_s", "cache_size", "metadata_ttl_s",
               "backpressure_timeout_s", "metrics_addr", "log_level", "log_file",
               "cluster", "node_id", "lease_interval_s", "cluster_poll_s", "remote_lookup_timeout_s")


def build_config(args: argparse.Namespace) -> configuration.Config:
    bucket, prefix = configuration.parse_s3_url(args.source)
    flags = {name: getattr(args, name, None) for name in FLAG_FIELDS}
    flags.update(bucket=bucket, prefix=prefix, mountpoint=str(Path(args.mountpoint).absolute()))
    config = configuration.resolve(flags, args.config)
    if not config.cache_dir:
        raise CliError("--cache-dir is required (a directory on local NVMe)", code=2)
    return dataclasses.replace(config, cache_dir=str(Path(config.cache_dir).absolute()))


def check_mountpoint(path: str) -> None:
    p = Path(path)
    if not p.exists():
        raise CliError(f"mount point {path} does not exist", code=2)
    if not p.is_dir():
        raise CliError(f"mount point {path} is not a directory", code=2)
    if os.path.ismount(path):
        raise CliError(f"mount point {path} is already a mount point (already mounted?)", code=2)
    if any(p.iterdir()):
        raise CliError(f"mount point {path} is not empty", code=2)


def check_cache_dir(path: str) -> None:
    p = Path(path)
    try:
        warning = secure_cache_dir(p)
    except UnsafeCacheDir as exc:
        raise CliError(str(exc), code=2) from None
    except OSError as exc:
        raise CliError(f"cache dir {path} cannot be created: {exc.strerror}", code=2) from None
    if not p.is_dir() or not os.access(p, os.W_OK | os.X_OK):
        raise CliError(f"cache dir {path} is not a writable directory", code=2)
    if warning:
        print(f"ckptfs: warning: {warning}", file=sys.stderr)


def mount_command(args: argparse.Namespace) -> int:
    config = build_config(args)
    check_mountpoint(config.mountpoint)
    check_cache_dir(config.cache_dir)
    if config.foreground:
        return run_foreground(config)
    return start_background(config)


def run_foreground(config: configuration.Config, ready_fd: int | None = None) -> int:
    from gateway import daemon  # imports pyfuse3: only where a mount really starts

    def on_ready() -> None:
        if ready_fd is not None:
            os.write(ready_fd, READY)
            os.close(ready_fd)

    try:
        daemon.run(config, on_ready)
    except CliError as exc:
        if ready_fd is not None:
            os.write(ready_fd, f"ERROR {exc}\n".encode())
        raise
    return 0


def start_background(config: configuration.Config, timeout_s: float = 120) -> int:
    log_file = config.log_file or str(Path(config.cache_dir) / "ckptfs.log")
    config = dataclasses.replace(config, log_file=log_file)
    read_fd, write_fd = os.pipe()
    cmd = [sys.executable, "-m", "gateway.cmd_mount", "--daemon", json.dumps(dataclasses.asdict(config)),
           str(write_fd)]
    log_fd = open_private_log(log_file)
    proc = subprocess.Popen(cmd, pass_fds=(write_fd,), start_new_session=True, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=log_fd)
    os.close(log_fd)
    os.close(write_fd)
    message = _read_ready(read_fd, proc, timeout_s)
    if message == READY:
        return 0
    if proc.poll() is None:
        proc.kill()
    reason = message.decode(errors="replace").strip().removeprefix("ERROR ")
    raise CliError(reason or f"the daemon exited before the mount was ready (see {config.log_file})")


def open_private_log(path: str) -> int:
    """The daemon's log, appended to, 0600: it names files, the bucket and the prefix."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)
    return fd


def _read_ready(fd: int, proc: subprocess.Popen, timeout_s: float) -> bytes:
    deadline = time.monotonic() + timeout_s
    chunks = b""
    os.set_blocking(fd, False)
    try:
        while time.monotonic() < deadline:
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                data = None
            if data:
                chunks += data
                if chunks.endswith(b"\n"):
                    return chunks
            elif data == b"" or proc.poll() is not None:
                return chunks
            time.sleep(0.02)
        return b"ERROR the daemon did not become ready within %d s" % timeout_s
    finally:
        os.close(fd)


def unmount_command(args: argparse.Namespace) -> int:
    from gateway.cmd_status import read_status
    from gateway.progress import DrainProgress

    mountpoint = str(Path(args.mountpoint).absolute())
    status = read_status(mountpoint)
    pid = int(status["pid"])
    if args.no_drain:
        os.kill(pid, 12)  # SIGUSR2: exit without draining
    result = subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True, text=True)
    if result.returncode != 0:
        raise CliError(f"cannot unmount {mountpoint}: {result.stderr.strip()}")
    timeout = args.timeout if args.timeout is not None else float(status.get("drain_timeout_s") or 600) + 30
    deadline = time.monotonic() + timeout
    with DrainProgress("unmount: draining", quiet=args.quiet or args.no_drain) as bar:
        while time.monotonic() < deadline:
            if not _alive(pid):
                bar.finish()
                return 0
            if bar.enabled:
                status = _drain_status(status, pid)
                bar.update(status)
            time.sleep(0.1)
    raise CliError(f"daemon {pid} still draining after {timeout:.0f}s; it keeps going in the background")


def _drain_status(last: dict, pid: int) -> dict:
    """The status the daemon `pid` publishes in its cache dir while it drains (else `last`)."""
    from gateway.control import DRAIN_STATUS_FILE

    try:
        with open(Path(last["cache_dir"]) / DRAIN_STATUS_FILE, "rb") as f:
            status = json.loads(f.read())
    except (OSError, ValueError, KeyError):
        return last
    return status if isinstance(status, dict) and status.get("pid") == pid else last


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours (tests start daemons directly) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except OSError:
        return False


def _daemon_main(argv: list[str]) -> int:
    """Entry point of the background daemon (see start_background)."""
    values = json.loads(argv[0])
    for key in configuration.LIST_OPTIONS:
        values[key] = tuple(values[key])
    config = configuration.Config(**values)
    ready_fd = int(argv[1])
    try:
        return run_foreground(config, ready_fd)
    except CliError as exc:
        print(f"ckptfs daemon: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--daemon":
        sys.exit(_daemon_main(sys.argv[2:]))
    sys.exit(2)
