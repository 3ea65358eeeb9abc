"""`ckptfs promote PATH...` and `ckptfs promote --list TARGET`: keep checkpoints past the lifecycle.

Promotion sets the object tag ``ckptfs-keep=true`` on every object of a checkpoint (one file or a
directory tree). The drain uploads objects tagged ``ckptfs-keep=false``, and the expiry rule of
`ckptfs lifecycle apply` only matches that tag, so promoted objects are never expired or
transitioned. Other tags on the objects are preserved.

PATH is either ``s3://BUCKET/KEY`` or a path inside a ckptfs mount; for the latter the bucket,
prefix and endpoint come from the mount root's ``user.ckptfs.status`` xattr, and every file must
already be in the bucket (otherwise run ``ckptfs wait`` first).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from gateway import s3ops
from gateway.errors import CliError

log = logging.getLogger(__name__)

STATUS_XATTR = "user.ckptfs.status"
STATE_XATTR = "user.ckptfs.state"  # 'durable' on a file, or on a directory whose whole tree is
WORKERS = 16


@dataclasses.dataclass(frozen=True)
class Target:
    bucket: str
    key: str  # object key of the path; "" = whole bucket
    endpoint_url: str | None
    region: str | None = None
    local: str | None = None  # the path in a mount, when given as one
    mountpoint: str | None = None
    prefix: str = ""  # the mount's prefix (mount targets only)

    def show(self, key: str) -> str:
        """How to print `key` to the user: a mount path or an s3:// URL."""
        if self.mountpoint is None:
            return f"s3://{self.bucket}/{key}"
        rel = key[len(self.prefix) + 1 :] if self.prefix else key
        return os.path.join(self.mountpoint, rel)


def read_status(root: str) -> dict[str, Any] | None:
    """The mount root's status xattr as a dict, or None if `root` is not a ckptfs mount."""
    try:
        return json.loads(os.getxattr(root, STATUS_XATTR))
    except (OSError, ValueError):
        return None


def read_state(path: str) -> str | None:
    """The gateway's per-path state xattr (None where the file system does not provide it)."""
    try:
        return os.getxattr(path, STATE_XATTR).decode()
    except OSError:
        return None


def find_mount(path: str) -> tuple[str, dict[str, Any]]:
    """(mount root, status) of the ckptfs mount containing `path`; CliError if none."""
    probe = os.path.abspath(path)
    while True:
        if os.path.ismount(probe):
            status = read_status(probe)
            if status is None:
                raise CliError(f"{path}: not inside a ckptfs mount (mount {probe} has no {STATUS_XATTR})", code=2)
            return probe, status
        parent = os.path.dirname(probe)
        if parent == probe:
            raise CliError(f"{path}: not inside a ckptfs mount", code=2)
        probe = parent


def resolve_target(path: str, endpoint_url: str | None, region: str | None) -> Target:
    """Turn an s3:// URL or a mount path into a Target."""
    if path.startswith("s3://"):
        bucket, key = s3ops.split_url(path)
        return Target(bucket, key, endpoint_url, region)
    if not os.path.lexists(path):
        raise CliError(f"{path}: no such file or directory", code=2)
    root, status = find_mount(path)
    try:
        bucket, prefix = status["bucket"], status.get("prefix", "").strip("/")
    except (KeyError, TypeError):
        raise CliError(f"{root}: malformed {STATUS_XATTR} (no bucket)", code=2) from None
    rel = os.path.relpath(os.path.abspath(path), root)
    rel = "" if rel == "." else rel
    if rel.split("/")[0] == s3ops.PRIVATE_DIR:
        raise CliError(f"{path}: gateway-private path", code=2)
    key = "/".join(p for p in (prefix, rel) if p)
    return Target(bucket, key, endpoint_url or status.get("endpoint_url"), region, os.path.abspath(path),
                  status.get("mountpoint") or root, prefix)


def objects_of(s3: Any, target: Target) -> dict[str, int]:
    """{key: size} of the checkpoint at `target`: the object at its key and everything below it."""
    from botocore.exceptions import ClientError

    found = {}
    if target.key:
        try:
            found[target.key] = s3.head_object(Bucket=target.bucket, Key=target.key)["ContentLength"]
        except ClientError as exc:
            if s3ops.error_code(exc) not in ("404", "NoSuchKey", "NotFound"):
                raise
    below = f"{target.key}/" if target.key else ""
    found.update((o["Key"], o["Size"]) for o in s3ops.list_objects(s3, target.bucket, below))
    return found


def local_files(target: Target) -> dict[str, int]:
    """{key: size} of the regular files under a mount target."""
    assert target.local is not None
    if not os.path.isdir(target.local):
        return {target.key: os.stat(target.local).st_size} if os.path.isfile(target.local) else {}
    files = {}
    for dirpath, dirnames, filenames in os.walk(target.local):
        dirnames[:] = [d for d in dirnames if d != s3ops.PRIVATE_DIR]
        for name in filenames:
            full = os.path.join(dirpath, name)
            if os.path.isfile(full) and not os.path.islink(full):
                rel = os.path.relpath(full, target.local)
                files["/".join(p for p in (target.key, rel) if p)] = os.stat(full).st_size
    return files


def get_keep(s3: Any, bucket: str, key: str) -> str | None:
    tags = s3.get_object_tagging(Bucket=bucket, Key=key)["TagSet"]
    return next((t["Value"] for t in tags if t["Key"] == s3ops.KEEP_TAG), None)


def set_keep(s3: Any, bucket: str, key: str, value: str) -> bool:
    """Set ckptfs-keep=`value` on one object, keeping its other tags; False if already set."""
    tags = s3.get_object_tagging(Bucket=bucket, Key=key)["TagSet"]
    if {"Key": s3ops.KEEP_TAG, "Value": value} in tags:
        return False
    tags = [t for t in tags if t["Key"] != s3ops.KEEP_TAG] + [{"Key": s3ops.KEEP_TAG, "Value": value}]
    s3.put_object_tagging(Bucket=bucket, Key=key, Tagging={"TagSet": tags})
    return True


def promote(target: Target, keep: bool = True) -> tuple[int, int]:
    """Tag every object of `target`; returns (objects changed, objects total)."""
    s3 = s3ops.client(target.endpoint_url, target.region)
    with s3ops.s3_errors(f"listing s3://{target.bucket}/{target.key}"):
        objects = objects_of(s3, target)
    if target.local is not None:
        state = read_state(target.local)
        if state not in (None, "durable"):
            raise CliError(f"{target.local} is {state}, not durable yet; run "
                           f"`ckptfs wait {target.mountpoint} {target.local}` and retry", code=4)
        local = local_files(target)
        pending = sorted(k for k, size in local.items() if objects.get(k) != size)
        if pending:
            raise CliError(
                f"{len(pending)} file(s) not in the bucket yet (first: {target.show(pending[0])}); "
                f"run `ckptfs wait {target.mountpoint} {target.local}` and retry", code=4)
    if not objects:
        raise CliError(f"no objects at s3://{target.bucket}/{target.key}", code=1)
    value = "true" if keep else "false"
    with s3ops.s3_errors("tagging"), ThreadPoolExecutor(WORKERS) as pool:
        changed = sum(pool.map(lambda k: set_keep(s3, target.bucket, k, value), sorted(objects)))
    return changed, len(objects)


def promoted(target: Target) -> tuple[dict[str, int], set[str]]:
    """({key: size} of all objects of `target`, the set of promoted keys among them)."""
    s3 = s3ops.client(target.endpoint_url, target.region)
    with s3ops.s3_errors(f"listing s3://{target.bucket}/{target.key}"):
        objects = objects_of(s3, target)
        with ThreadPoolExecutor(WORKERS) as pool:
            keeps = dict(zip(objects, pool.map(lambda k: get_keep(s3, target.bucket, k), objects), strict=True))
    return objects, {k for k, keep in keeps.items() if keep == "true"}


def compact(objects: dict[str, int], kept: set[str]) -> list[tuple[str, int, int]]:
    """The fewest (path, count, bytes) entries covering exactly `kept`: a directory whose objects
    are all kept is one entry ('dir/'), otherwise its kept files and subdirectories are listed."""
    out: list[tuple[str, int, int]] = []

    def walk(prefix: str, keys: list[str]) -> None:
        if prefix and all(k in kept for k in keys):
            out.append((prefix, len(keys), sum(objects[k] for k in keys)))
            return
        groups: dict[str, list[str]] = {}
        for key in keys:
            head, sep, _ = key[len(prefix) :].partition("/")
            if sep:
                groups.setdefault(f"{prefix}{head}/", []).append(key)
            elif key in kept:
                out.append((key, 1, objects[key]))
        for sub in groups:
            walk(sub, groups[sub])

    walk("", sorted(objects))
    return sorted(out)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def cmd_promote(args: argparse.Namespace) -> int:
    endpoint, region = s3ops.endpoint_from(args)
    if args.list:
        if len(args.paths) != 1:
            raise CliError("--list takes exactly one s3://BUCKET[/PREFIX] or mount path", code=2)
        target = resolve_target(args.paths[0], endpoint, region)
        everything, kept = promoted(target)
        if args.json:
            rows = [{"key": k, "path": target.show(k), "size": everything[k]} for k in sorted(kept)]
            print(json.dumps(rows, indent=2))
            return 0
        for path, count, size in compact(everything, kept):
            print(f"{target.show(path)}\t{count} object(s)\t{_size(size)}")
        if not kept:
            print(f"no promoted objects under {target.show(target.key)}")
        return 0
    if not args.paths:
        raise CliError("give at least one PATH (a mount path or s3://BUCKET/KEY)", code=2)
    for path in args.paths:
        target = resolve_target(path, endpoint, region)
        changed, total = promote(target, keep=not args.undo)
        verb = "unpromoted" if args.undo else "promoted"
        print(f"{verb} {target.show(target.key)}: {total} object(s), {changed} newly tagged")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "promote",
        help="exempt a checkpoint from lifecycle expiry (tags its objects ckptfs-keep=true)",
        description="Tag every object of a checkpoint (file or directory) with ckptfs-keep=true, so the "
        "rules of `ckptfs lifecycle apply` never expire it. PATH is a mount path or s3://BUCKET/KEY.",
    )
    parser.add_argument("paths", nargs="*", metavar="PATH")
    parser.add_argument("--list", action="store_true", help="list promoted objects under the one PATH given")
    parser.add_argument("--undo", action="store_true", help="set ckptfs-keep=false again (expirable)")
    parser.add_argument("--json", action="store_true", help="with --list: print JSON")
    s3ops.add_endpoint_args(parser)
    parser.set_defaults(func=cmd_promote)
