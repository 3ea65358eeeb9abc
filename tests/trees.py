"""What the bucket must hold for a local tree: the test side of "bucket equals namespace"."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

LOCAL_ONLY_TYPES = (stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK)


def local_tree(root: Path) -> dict[str, str | None]:
    """Relative key -> sha256 of the content (files) or None (empty directory markers `dir/`).

    Every name of a hard-linked file is a key. FIFOs, sockets and devices are never keys, and a
    directory holding only such nodes is not empty, so it has no marker (docs/SEMANTICS.md).
    """
    tree: dict[str, str | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for name in filenames:
            if stat.S_IFMT(os.lstat(os.path.join(dirpath, name)).st_mode) in LOCAL_ONLY_TYPES:
                continue
            key = os.path.normpath(os.path.join(rel, name))
            tree[key] = hashlib.sha256(Path(dirpath, name).read_bytes()).hexdigest()
        if not dirnames and not filenames and rel != ".":
            tree[rel + "/"] = None
    return tree
