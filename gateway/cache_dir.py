"""The cache directory's safety: made private, and refused when other users could have written it.

Apart from gateway/cache.py so that the CLI checks a cache dir without importing the daemon's I/O
stack (every `ckptfs` command start pays for what it imports).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

PRIVATE_DIR_MODE = 0o700


class UnsafeCacheDir(Exception):
    """The cache dir is writable by other users: its journal and data cannot be trusted."""


def secure_cache_dir(path: Path) -> str | None:
    """Create the cache dir 0700, or check an existing one; returns a warning if it was tightened.

    It holds every file name, size, digest, the bucket and the prefix (and the data files). Group-
    or world-writable: refused (UnsafeCacheDir), since another user could have replaced the journal
    or a data file. Only readable by others (0755, as versions before 0.2 made it): tightened to
    0700, with a warning.
    """
    path = Path(path)
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o022:
        raise UnsafeCacheDir(f"cache dir {path} is writable by other users (mode {mode:04o}): another user "
                             f"could replace its journal or data; check its contents, then `chmod 700 {path}`")
    if mode & 0o077:
        os.chmod(path, PRIVATE_DIR_MODE)
        return f"cache dir {path} was readable by other users (mode {mode:04o}); tightened to 0700"
    return None
