"""`ckptfs verify`: re-read objects from the bucket and compare them with the recorded digests."""

from __future__ import annotations

import dataclasses
import os
import stat

import trio
import xxhash

from gateway.errors import StoreError
from gateway.store import METADATA_DIGEST, Store

CHUNK = 8 * 1024 * 1024


@dataclasses.dataclass
class Report:
    checked: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)


def files_under(paths: list[str]) -> list[str]:
    out: list[str] = []
    for path in paths:
        if os.path.isdir(path) and not os.path.islink(path):
            for dirpath, _, names in os.walk(path):
                out.extend(os.path.join(dirpath, n) for n in sorted(names))
        else:
            out.append(path)
    return out


def verify_paths(status: dict, mountpoint: str, paths: list[str]) -> Report:
    report = Report()
    targets = []
    for path in files_under(paths):
        if not stat.S_ISREG(os.lstat(path).st_mode):
            continue  # symlinks; FIFOs, sockets and devices are never uploaded
        state = os.getxattr(path, "user.ckptfs.state").decode()
        if state != "durable":
            report.problems.append(f"{path}: not durable yet ({state})")
            continue
        key = os.getxattr(path, "user.ckptfs.key").decode()
        try:
            recorded = os.getxattr(path, "user.ckptfs.digest").decode()
        except OSError:
            recorded = None
        targets.append((path, key, recorded))
    trio.run(_verify_objects, status, targets, report)
    return report


async def _verify_objects(status: dict, targets: list, report: Report) -> None:
    async with Store(status["bucket"], "", endpoint_url=status.get("endpoint_url")) as store:
        for path, key, recorded in targets:
            report.checked += 1
            try:
                head = await store.head_object(key)
                size = int(head["ContentLength"])
                h = xxhash.xxh3_128()
                for start in range(0, size, CHUNK):
                    h.update(await store.get_range(key, start, min(size, start + CHUNK)))
            except StoreError as exc:
                report.problems.append(f"{path}: cannot read s3://{status['bucket']}/{key}: {exc}")
                continue
            actual = h.hexdigest()
            meta = head.get("Metadata", {}).get(METADATA_DIGEST)
            if recorded is None and meta is None:
                report.problems.append(f"{path}: no digest recorded (object not written by ckptfs)")
            elif actual != (recorded or meta) or (meta and actual != meta):
                report.problems.append(f"{path}: digest mismatch: bucket {actual}, recorded {recorded or meta}")
