"""A checkpoint-like writer for crash tests, run as its own process.

Loop: write `f<i>.tmp` with random bytes, fsync, rename to `f<i>`, fsync the directory; now and then
unlink an older file and fsync the directory. Each step is logged to a file outside the mount only
after the mount acknowledged it, with an `intent` line before it, so the checker knows which
operation may have been in flight when the daemon died.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main(root: str, log_path: str, seed: int, max_size: int) -> None:
    rng = random.Random(seed)
    log = open(log_path, "a", buffering=1)
    live: list[str] = []
    i = 0
    while True:
        name = f"f{i:05d}"
        data = rng.randbytes(rng.randint(0, max_size))
        log.write(f"intent create {name}\n")
        tmp = os.path.join(root, name + ".tmp")
        fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view[: 1 << 20]):]
        os.fsync(fd)
        os.close(fd)
        os.rename(tmp, os.path.join(root, name))
        fsync_dir(root)
        log.write(f"done create {name} {hashlib.sha256(data).hexdigest()}\n")
        os.fsync(log.fileno())
        live.append(name)
        if len(live) > 5 and rng.random() < 0.3:
            victim = live.pop(rng.randrange(len(live) - 1))
            log.write(f"intent unlink {victim}\n")
            os.unlink(os.path.join(root, victim))
            fsync_dir(root)
            log.write(f"done unlink {victim}\n")
            os.fsync(log.fileno())
        i += 1


def expected_state(log_path: str) -> tuple[dict[str, str], set[str]]:
    """(files that must exist -> sha256, names whose state is uncertain because they were in flight)."""
    must: dict[str, str] = {}
    uncertain: set[str] = set()
    with open(log_path) as f:
        lines = [line.split() for line in f if line.endswith("\n")]
    for parts in lines:
        phase, op, name = parts[:3]
        if phase == "intent":
            uncertain.add(name)
        elif op == "create":
            must[name] = parts[3]
            uncertain.discard(name)
        else:
            must.pop(name, None)
            uncertain.discard(name)
    return must, uncertain


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
