"""Whole-file xxh3-128 digests and chunked reads of cache files. Blocking: run in a thread."""

from __future__ import annotations

import base64
import contextlib
import gc
import hashlib
import mmap
import os
import zlib
from collections.abc import Iterator

import xxhash

from gateway.page_cache import drop_uploaded_range

READ_CHUNK = 8 * 1024 * 1024


def file_digest(path: str, size: int) -> str:
    """xxh3-128 hex digest of the first `size` bytes of `path`."""
    h = xxhash.xxh3_128()
    with open(path, "rb", buffering=0) as f:
        remaining = size
        while remaining > 0:
            chunk = f.read(min(READ_CHUNK, remaining))
            if not chunk:
                raise EOFError(f"{path} is shorter than {size} bytes")
            h.update(chunk)
            remaining -= len(chunk)
    return h.hexdigest()


def bytes_digest(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def read_range(path: str, offset: int, length: int) -> bytes:
    """Exactly `length` bytes at `offset` of `path` (EOFError if the file got shorter), read to
    upload: a large range leaves the page cache (gateway/page_cache.py)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, length, offset)
        drop_uploaded_range(fd, offset, len(data))
    finally:
        os.close(fd)
    if len(data) != length:
        raise EOFError(f"{path}: wanted {length} bytes at {offset}, got {len(data)}")
    return data


def crc32_b64(data: bytes | bytearray | memoryview) -> str:
    """The S3 `x-amz-checksum-crc32` value of `data`."""
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


def read_range_sums(path: str, offset: int, length: int, sha256: bool = True) -> tuple[bytes, str, str | None]:
    """`read_range` plus its CRC32 (x-amz-checksum-crc32) and, if `sha256`, its SHA-256 (the SigV4
    payload hash, needed only over plain http), all off the event loop: botocore would compute
    both on the loop, ~70 ms per 16 MiB part."""
    data = read_range(path, offset, length)
    return data, crc32_b64(data), hashlib.sha256(data).hexdigest() if sha256 else None


def read_into(path: str, offset: int, buf: memoryview) -> None:
    """Fill `buf` with the bytes at `offset` of `path`, read straight into it (EOFError if shorter),
    to upload: the range then leaves the page cache (gateway/page_cache.py)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        got = 0
        while got < len(buf):
            n = os.preadv(fd, [buf[got:]], offset + got)
            if n == 0:
                raise EOFError(f"{path}: wanted {len(buf)} bytes at {offset}, got {got}")
            got += n
        drop_uploaded_range(fd, offset, got)
    finally:
        os.close(fd)


def read_into_sums(path: str, offset: int, buf: memoryview, sha256: bool = True) -> tuple[str, str | None]:
    """`read_into`, then the CRC32 and (if `sha256`) the SHA-256 of `buf`, in a thread."""
    read_into(path, offset, buf)
    return crc32_b64(buf), hashlib.sha256(buf).hexdigest() if sha256 else None


class PartBuffers:
    """Part buffers reused across uploads, so a part costs no fresh allocation (mmap, page faults).

        with buffers.lease(length) as view:   # a memoryview of `length` bytes
            crc, sha = await trio.to_thread.run_sync(read_into_sums, path, offset, view)
            await store.upload_part(key, upload_id, number, view, crc, sha)

    A buffer is an anonymous mmap, not a bytearray: `bytearray(16 MiB)` zero-fills every page on
    the event loop with the GIL held (10-30 ms here, page faults on this VM: a third of the main
    thread's time in a DCP-shaped drain of 4 MiB files), while the kernel hands an mmap's zero pages
    out as the read in the worker thread first touches them, and gives them back when it is dropped.
    A buffer goes back to the pool only if nothing still refers to it (no memoryview of it is
    alive: an mmap with exports cannot be resized), and at most `keep` idle ones are kept.
    A failed request leaves views of its buffer in its traceback, which is a reference cycle that
    lives until the garbage collector runs; such a buffer is *held*, not dropped. A lease takes a
    held buffer once it is free again, and when `keep` buffers are already out it collects garbage
    once before allocating: without that, every failed part cost a fresh 16 MiB buffer while the
    old one waited for the collector (peak RSS 320 MiB for `keep` = 8, 27 buffers allocated).
    """

    def __init__(self, size: int, keep: int):
        self.size = size
        self.keep = keep
        self._idle: list[mmap.mmap] = []
        self._held: list[mmap.mmap] = []  # returned while still referenced
        self._leased = 0
        self.allocated = 0
        self.collections = 0

    @contextlib.contextmanager
    def lease(self, length: int) -> Iterator[memoryview]:
        if length > self.size:
            raise ValueError(f"part of {length} bytes is larger than the buffers ({self.size})")
        buf = self._take()
        self._leased += 1
        view = memoryview(buf)[:length]
        try:
            yield view
        finally:
            view.release()
            self._leased -= 1
            self._give_back(buf)

    def clear(self) -> None:
        """Drop the idle buffers, and the held ones that are free again."""
        self._idle.clear()
        self._held = [buf for buf in self._held if not _unreferenced(buf)]

    def _take(self) -> mmap.mmap:
        if not self._idle:
            self._reclaim_held()
        if not self._idle and self._held and self._leased + len(self._held) >= self.keep:
            self.collections += 1
            gc.collect()
            self._reclaim_held()
        return self._idle.pop() if self._idle else self._new()

    def _give_back(self, buf: mmap.mmap) -> None:
        if not _unreferenced(buf):
            self._held.append(buf)
        elif len(self._idle) < self.keep:
            self._idle.append(buf)

    def _reclaim_held(self) -> None:
        held, self._held = self._held, []
        for buf in held:
            self._give_back(buf)

    def _new(self) -> mmap.mmap:
        self.allocated += 1
        return mmap.mmap(-1, self.size)


def _unreferenced(buf: mmap.mmap) -> bool:
    """No memoryview of `buf` is alive (resizing, even to its own size, is refused while one is)."""
    try:
        buf.resize(len(buf))
    except BufferError:
        return False
    return True
