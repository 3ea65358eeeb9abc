"""Domain errors. Each carries the errno that the FUSE edge (gateway/fs.py) answers with.

Lower layers raise these; only fs.py turns them into ``pyfuse3.FUSEError``.
"""

from __future__ import annotations

import errno


class FsError(Exception):
    """A filesystem request failed with a POSIX errno."""

    def __init__(self, errno_: int, message: str = ""):
        super().__init__(message or errno.errorcode.get(errno_, str(errno_)))
        self.errno = errno_


class CliError(Exception):
    """A command failed for a reason the user can fix; printed as one line, exit code `code`."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


class StoreError(Exception):
    """An object-store request failed. `transient` says whether retrying can help."""

    def __init__(self, message: str, *, transient: bool, code: str = ""):
        super().__init__(message)
        self.transient = transient
        self.code = code


class NoSuchKey(StoreError):
    def __init__(self, key: str):
        super().__init__(f"no such key: {key}", transient=False, code="NoSuchKey")
        self.key = key


class JournalError(Exception):
    """The journal cannot be written (disk full, I/O error): the mount is failsafe (read-only)."""


class ConfigError(Exception):
    """A configuration value is missing or malformed; the message names the key."""
