"""`ckptfs status`, `ckptfs wait` and `ckptfs verify`: read the daemon's state through the mount."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
from pathlib import Path

from gateway.errors import CliError
from gateway.file_state import is_local_only

STATUS_XATTR = "user.ckptfs.status"
STATE_XATTR = "user.ckptfs.state"
DURABLE_AFTER_XATTR = "user.ckptfs.durable_after."  # gateway/control.py answers it
WAIT_STEP_MS = 1000
DONE_STATES = ("durable", "local")  # local: FIFOs, sockets, devices are never uploaded


def register(subparsers) -> None:
    s = subparsers.add_parser("status", help="show dirty bytes, drain progress and errors")
    s.add_argument("mountpoint")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("--watch", type=float, nargs="?", const=1.0, default=None, metavar="SECONDS",
                   help="refresh every SECONDS (default 1)")
    s.set_defaults(func=status_command)

    w = subparsers.add_parser("wait", help="wait until everything written so far (or PATHs) is durable")
    w.add_argument("mountpoint")
    w.add_argument("paths", nargs="*", metavar="PATH")
    w.add_argument("--timeout", type=float, default=None, help="give up after SECONDS (exit 1)")
    w.add_argument("--quiet", "-q", action="store_true", help="no progress bar (there is none off a terminal)")
    w.set_defaults(func=wait_command)

    v = subparsers.add_parser("verify", help="re-read objects from the bucket and compare digests")
    v.add_argument("mountpoint")
    v.add_argument("paths", nargs="*", metavar="PATH")
    v.set_defaults(func=verify_command)


def read_status(mountpoint: str) -> dict:
    """The daemon's status object, or a CliError saying why there is none."""
    try:
        return json.loads(os.getxattr(mountpoint, STATUS_XATTR))
    except FileNotFoundError:
        raise CliError(f"{mountpoint} does not exist", code=2) from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise CliError(f"{mountpoint}: the ckptfs daemon is gone (run `fusermount3 -u {mountpoint}` "
                           "and mount again; pending work is replayed)", code=3) from None
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise CliError(f"{mountpoint} is not a ckptfs mount", code=2) from None
        raise CliError(f"{mountpoint}: {exc.strerror}", code=2) from None


def status_command(args: argparse.Namespace) -> int:
    while True:
        status = read_status(args.mountpoint)
        if args.json:
            print(json.dumps(status, sort_keys=True))
        else:
            if args.watch:
                sys.stdout.write("\x1b[2J\x1b[H")
            print(format_status(status))
        if not args.watch:
            return 0
        sys.stdout.flush()
        time.sleep(args.watch)


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def format_status(s: dict) -> str:
    def age(v):
        return "-" if v is None else f"{v:.1f}s"

    rows = [
        ("mount", s["mountpoint"]),
        *([("FAILSAFE", f"read-only: the journal cannot be written ({s['failsafe']})")] if s.get("failsafe") else []),
        ("bucket", f"s3://{s['bucket']}/{s['prefix']}".rstrip("/")),
        ("endpoint", s.get("endpoint_url") or "(default)"),
        ("cache dir", s["cache_dir"]),
        ("cache used", human_bytes(s["cache_used_bytes"])),
        ("dirty bytes", human_bytes(s["dirty_bytes"])),
        ("files dirty/queued/uploading", f"{s['dirty_files']}/{s['queued_files']}/{s['uploading_files']}"),
        ("files held (temporary names)", s["held_files"]),
        ("files durable", s["durable_files"]),
        ("stale objects to delete", s["stale_objects"]),
        ("oldest pending", age(s["oldest_pending_age_s"])),
        ("newest durable change", age(s["newest_durable_age_s"])),
        ("newest durable checkpoint", age(s.get("newest_durable_checkpoint_age_s"))),
        ("drain rate (10 s)", human_bytes(s["drain_rate_bps"]) + "/s"),
        ("uploaded", f"{human_bytes(s['uploaded_bytes_total'])} in {s['uploaded_files_total']} files"),
        ("retries / errors", f"{s['retries_total']} / {s['errors_total']}"),
        ("last error", s.get("last_error") or "-"),
        ("background errors", f"{s.get('background_errors_total', 0)}"
         + (f" (last: {s['last_background_error']})" if s.get("last_background_error") else "")),
    ]
    for key in ("cache_size_bytes", "evictable_bytes", "evictions_total", "backpressure_seconds_total"):
        if key in s:
            rows.append((key.replace("_", " "), s[key]))
    rows.extend(cluster_rows(s.get("cluster")))
    rows += [("marker waiting", _commit_wait(w)) for w in s.get("commit_waits", [])]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def cluster_rows(c: dict | None) -> list[tuple[str, object]]:
    """With --cluster: this node, its lease, and each commit it holds that waits for other nodes."""
    if not c:
        return []
    lease = "lapsed" if c.get("lease_lapsed") else f"renewed {c.get('lease_age_s')}s ago"
    rows: list[tuple[str, object]] = [("cluster node", f"{c['node']}@{c['incarnation']} (lease {lease})")]
    for commit in c.get("commits", []):
        waits = [f"{w['node']}{' (lost)' if w.get('lost') else ''}"
                 + (f": {', '.join(w['pending_files'][:3])}" if w.get("pending_files") else "")
                 for w in commit.get("waiting_for", [])]
        detail = commit.get("error") or ("waiting for " + "; ".join(waits) if waits else commit["state"])
        rows.append((f"commit {commit['scope']}", detail))
    if c.get("answering"):
        rows.append(("answering commits of", ", ".join(c["answering"][:5])))
    return rows


def _commit_wait(wait: dict) -> str:
    """One marker held back: by files of its own scope here, or by other nodes (docs/CLUSTER.md)."""
    if "waiting_for_local_files" in wait:
        return f"{wait['marker']}: {wait['waiting_for_local_files']} local files first (e.g. {wait['example']})"
    return f"{wait['marker']}: other nodes {json.dumps(wait.get('waiting_for_nodes', {}), sort_keys=True)}"


def path_state(path: str) -> str:
    try:
        if is_local_only(os.stat(path).st_mode):
            return "local"  # FIFOs, sockets, devices: never uploaded (and the kernel hides their user.* xattrs)
        return os.getxattr(path, STATE_XATTR).decode()
    except FileNotFoundError:
        raise CliError(f"{path} does not exist", code=2) from None
    except OSError as exc:
        raise CliError(f"{path}: {exc.strerror} (is it inside a ckptfs mount?)", code=2) from None


def wait_command(args: argparse.Namespace) -> int:
    from gateway.progress import DrainProgress

    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    start = read_status(args.mountpoint)
    with DrainProgress("wait", quiet=args.quiet) as bar:
        if args.paths:
            _wait_paths(args, bar, deadline)
        else:
            _wait_generation(args.mountpoint, start["generation"], bar, deadline)
        bar.finish()
    return 0


def _wait_generation(mountpoint: str, target: int, bar, deadline: float | None) -> None:
    """Until every change up to namespace generation `target` is in the bucket: blocks in the
    daemon (DURABLE_AFTER_XATTR) a second at a time; polls a daemon that predates it."""
    while True:
        durable = durable_after(mountpoint, target, _step_ms(deadline))
        if durable is None:
            time.sleep(0.1)
        timed_out = deadline is not None and time.monotonic() >= deadline
        status = None
        if bar.enabled or durable is None or (durable < target and timed_out):
            status = read_status(mountpoint)
            bar.update(status)
            durable = status["durable_through_generation"]
        if durable >= target:
            return
        if timed_out:
            assert status is not None
            raise CliError(f"timed out; still pending: {status['pending_files']} files "
                           f"({human_bytes(status['dirty_bytes'])}) not yet durable"
                           + (f"; last error: {status['last_error']}" if status.get("last_error") else ""), code=1)


def _step_ms(deadline: float | None) -> int:
    """How long one blocking wait may last: a second, or what is left before the deadline."""
    if deadline is None:
        return WAIT_STEP_MS
    return max(0, min(WAIT_STEP_MS, int((deadline - time.monotonic()) * 1000)))


def durable_after(mountpoint: str, gen: int, wait_ms: int) -> int | None:
    """The generation durable once `gen` is, or after `wait_ms`; None from an older daemon."""
    try:
        return int(os.getxattr(mountpoint, f"{DURABLE_AFTER_XATTR}{gen}.{wait_ms}"))
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            return None
        read_status(mountpoint)  # the CliError that says what is wrong with the mount
        raise CliError(f"{mountpoint}: {exc.strerror}", code=2) from None


def _wait_paths(args: argparse.Namespace, bar, deadline: float | None) -> None:
    while True:
        pending = [p for p in args.paths if path_state(_in_mount(args.mountpoint, p)) not in DONE_STATES]
        if bar.enabled:
            bar.update(read_status(args.mountpoint), len(pending), "path")
        if not pending:
            return
        if deadline is not None and time.monotonic() >= deadline:
            raise CliError("timed out; still pending: " + ", ".join(pending[:20]), code=1)
        time.sleep(0.1)


def _in_mount(mountpoint: str, path: str) -> str:
    p = Path(path)
    return str(p if p.is_absolute() else Path(mountpoint) / p)


def verify_command(args: argparse.Namespace) -> int:
    from gateway.verify import verify_paths

    status = read_status(args.mountpoint)
    paths = [_in_mount(args.mountpoint, p) for p in args.paths] or [args.mountpoint]
    report = verify_paths(status, args.mountpoint, paths)
    for line in report.problems:
        print(line)
    print(f"verified {report.checked} objects: {len(report.problems)} problems")
    return 1 if report.problems else 0
