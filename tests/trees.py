"""What the bucket must hold for a local tree: the test side of "bucket equals namespace"."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def local_tree(root: Path) -> dict[str, str | None]:
    """Relative key -> sha256 of the content (files) or None (empty directory markers `dir/`)."""
    tree: dict[str, str | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for name in filenames:
            key = os.path.normpath(os.path.join(rel, name))
            tree[key] = hashlib.sha256(Path(dirpath, name).read_bytes()).hexdigest()
        if not dirnames and not filenames and rel != ".":
            tree[rel + "/"] = None
    return tree
