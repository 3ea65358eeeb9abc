"""Whole-file xxh3-128 digests and chunked reads of cache files. Blocking: run in a thread."""

from __future__ import annotations

import base64
import hashlib
import os
import zlib

import xxhash

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
    """Exactly `length` bytes at `offset` of `path` (EOFError if the file got shorter)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, length, offset)
    finally:
        os.close(fd)
    if len(data) != length:
        raise EOFError(f"{path}: wanted {length} bytes at {offset}, got {len(data)}")
    return data


def crc32_b64(data: bytes) -> str:
    """The S3 `x-amz-checksum-crc32` value of `data`."""
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


def read_range_sums(path: str, offset: int, length: int) -> tuple[bytes, str, str]:
    """`read_range` plus its CRC32 (x-amz-checksum-crc32) and SHA-256 (the SigV4 payload hash), all
    off the event loop: botocore would compute both on the loop, ~70 ms per 16 MiB part."""
    data = read_range(path, offset, length)
    return data, crc32_b64(data), hashlib.sha256(data).hexdigest()
