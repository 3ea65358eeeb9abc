"""A bucket watcher: lists a prefix continuously in a thread and keeps every snapshot it saw."""

from __future__ import annotations

import fnmatch
import threading
import time


class BucketWatcher:
    """`with BucketWatcher(client, bucket, prefix) as w:` ... then inspect `w.snapshots`."""

    def __init__(self, client, bucket: str, prefix: str, interval_s: float = 0.01, max_s: float = 300):
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix else ""
        self.interval_s = interval_s
        self.max_s = max_s
        self.snapshots: list[frozenset[str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "BucketWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_s
        while not self._stop.is_set() and time.monotonic() < deadline:
            keys = set()
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
                keys.update(item["Key"][len(self.prefix):] for item in page.get("Contents", []))
            self.snapshots.append(frozenset(keys))
            time.sleep(self.interval_s)

    def ever_seen(self) -> set[str]:
        seen: set[str] = set()
        for snap in self.snapshots:
            seen |= snap
        return seen

    def keys_matching(self, *patterns: str) -> set[str]:
        return {k for k in self.ever_seen() for p in patterns if fnmatch.fnmatchcase(k, p)}

    def marker_violations(self, marker: str, data_keys: set[str]) -> list[frozenset[str]]:
        """Snapshots in which `marker` is visible while some of `data_keys` are not."""
        return [s for s in self.snapshots if marker in s and not data_keys <= s]
