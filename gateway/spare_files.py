"""Empty data files made ahead of need, so that a create costs a rename, not an inode allocation.

An inode allocation on a fragmented ext4 can cost a millisecond of kernel CPU (measured on the
test machine: 20 us to 1.1 ms per create, depending on the block group it lands in). The FUSE
thread would pay it in every create(2). A worker thread pays it ahead instead, in batches, and
`take` hands out one file; the cache renames it to the inode's data file (about 20 us).

Spare files live in `<cache_dir>/data/spare/b<batch>/`, are never written, and are adopted again at
the next start (a crash leaves only empty files there). Each refill makes a new batch directory,
and files are taken only from finished batches: the thread holds the lock of the directory it
creates in for the whole allocation, and a rename out of that directory would wait for it. The
names are not numbers, so the stray-data scan at start-up never mistakes one for a data file.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
from pathlib import Path

import trio

log = logging.getLogger(__name__)

SPARE_TARGET = 64       # files kept ready; a refill starts below half of it
RETRY_AFTER_S = 5.0     # after a failed refill (disk full, no inodes left)


class SpareFiles:
    """A pool of empty files in `dir`, refilled in a worker thread by `run`."""

    def __init__(self, directory: Path, target: int = SPARE_TARGET):
        self.dir = Path(directory)
        self.dir.mkdir(mode=0o700, exist_ok=True)
        self.target = target
        self._ready: collections.deque[Path] = collections.deque(self._adopt())
        self._next_batch = 1 + max((_number(b.name) for b in self._batches()), default=0)
        self._wanted = trio.Event()
        self.taken = 0
        self.missed = 0
        self._failing = False

    def take(self) -> Path | None:
        """An empty file to rename into place, or None if the pool ran dry (the caller creates one)."""
        if len(self._ready) < self.target // 2:
            self._wanted.set()
        if not self._ready:
            self.missed += 1
            return None
        self.taken += 1
        return self._ready.popleft()

    def __len__(self) -> int:
        return len(self._ready)

    async def run(self) -> None:
        """Keep the pool near `target` files for the life of the mount."""
        self._wanted.set()
        while True:
            await self._wanted.wait()
            self._wanted = trio.Event()
            want = self.target - len(self._ready)
            if want <= 0:
                continue
            batch = self.dir / f"b{self._next_batch}"
            self._next_batch += 1
            made, error = await trio.to_thread.run_sync(self._make, batch, want)
            self._ready.extend(made)
            if error is None:
                self._failing = False
                continue
            if not self._failing:  # once per failing spell (a full disk would log every retry)
                log.warning("could not make spare data files (%s); creates make their own meanwhile", error)
            self._failing = True
            await trio.sleep(RETRY_AFTER_S)
            self._wanted.set()

    def _make(self, batch: Path, count: int) -> tuple[list[Path], OSError | None]:
        """In a worker thread: drop emptied batches, then create `count` empty files in a new
        batch directory; the files made, and the error that stopped it."""
        made: list[Path] = []
        try:
            for old in self._batches():
                with contextlib.suppress(OSError):  # not empty yet: files are still taken from it
                    old.rmdir()
            batch.mkdir(mode=0o700)
            for n in range(count):
                path = batch / f"s{n}"
                os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
                made.append(path)
        except OSError as exc:
            return made, exc
        return made, None

    def _batches(self) -> list[Path]:
        return [self.dir / e.name for e in os.scandir(self.dir)
                if e.name[:1] == "b" and e.name[1:].isdigit() and e.is_dir(follow_symlinks=False)]

    def _adopt(self) -> list[Path]:
        """Spare files a previous run left, oldest batch first."""
        found = []
        for batch in sorted(self._batches(), key=lambda b: _number(b.name)):
            found += sorted((batch / e.name for e in os.scandir(batch) if _is_spare(e)), key=lambda p: _number(p.name))
        return found


def _number(name: str) -> int:
    return int(name[1:])


def _is_spare(entry: os.DirEntry) -> bool:
    """A file this pool made (`s<n>`, empty); anything else there is left alone."""
    return (entry.name[:1] == "s" and entry.name[1:].isdigit() and entry.is_file(follow_symlinks=False)
            and entry.stat(follow_symlinks=False).st_size == 0)
