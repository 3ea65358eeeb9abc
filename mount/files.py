"""Crash-safe file writes into the mount: temp name, fsync, rename, fsync the directory.

On ckptfs an acknowledged fsync is durable on the local disk and a rename is
atomic; the gateway never uploads a `*.tmp` name, so a file appears in the
bucket only under its final name and only once complete.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any, BinaryIO

import xxhash

TMP_SUFFIX = ".tmp"
_CHUNK = 8 << 20


@dataclasses.dataclass(frozen=True)
class FileRecord:
    """One file of a checkpoint as the commit marker lists it."""

    name: str  # relative to the step directory
    size: int
    xxh3_128: str  # hex digest
    rank: int = 0  # the rank that wrote it (and verifies it on restore)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class HashingWriter:
    """A write-only file object that digests (xxh3-128) and counts what passes through."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self._h = xxhash.xxh3_128()
        self.size = 0

    def write(self, data) -> int:
        self._h.update(data)
        n = self._f.write(data)
        self.size += n
        return n

    def flush(self) -> None:
        self._f.flush()

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, fill: Callable[[HashingWriter], object], *, rank: int = 0,
                 sync_dir: bool = True) -> FileRecord:
    """Write `path` via `path.tmp` + fsync + rename; `fill` writes the content.

    Returns the file's record (size and digest of exactly what was written).
    The temp file is removed if anything fails.
    """
    tmp = path + TMP_SUFFIX
    try:
        with open(tmp, "wb") as f:
            w = HashingWriter(f)
            fill(w)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if sync_dir:
        fsync_dir(os.path.dirname(path) or ".")
    return FileRecord(os.path.basename(path), w.size, w.hexdigest(), rank)


def digest_file(path: str | os.PathLike) -> tuple[int, str]:
    """(size, xxh3-128 hex digest) of a file, read in large chunks."""
    h = xxhash.xxh3_128()
    size = 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return size, h.hexdigest()
