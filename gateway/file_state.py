"""A file's drain state: one journal column (`inodes.state`), changed only by gateway/namespace.py.

    DIRTY      being written: changed and not closed since; no place in the commit order
    QUEUED     closed, or renamed into place: `ready_seq` is its place in the commit order; waiting
               for the drain (delay, slot, its scope, or a temporary name's hold)
    UPLOADING  a drain job is publishing it
    DURABLE    the bucket holds this content under each of its names; also an inode with nothing
               to publish (unlinked, or a FIFO, socket or device)

Residency (`cached`: the data file holds the whole content) is a separate bit: a durable file may
be evicted, a renamed file waits to be copied without being local. `content_dirty` is not a state
either: it says how the drain publishes a pending file (upload the cache file, or copy the object
it already has). `held` is what a queued file under a temporary name shows as (a naming rule, not
stored).

Legal transitions (`LEGAL`); any other is a bug and raises `IllegalTransition`:
    DIRTY     -> QUEUED (last close; restart), DURABLE (unlinked)
    QUEUED    -> DIRTY (written), QUEUED (renamed again), UPLOADING (a job starts), DURABLE (unlinked)
    UPLOADING -> DIRTY (written), QUEUED (renamed, job ended without publishing, restart), DURABLE (published)
    DURABLE   -> DIRTY (rewritten), QUEUED (renamed, or its object is missing from the bucket)
and every state but UPLOADING to itself (more writes, another rename, another unlink). The drain
never uploads a file being written (DIRTY -> UPLOADING) nor one with nothing to publish, and one
file has at most one job (UPLOADING -> UPLOADING).
"""

from __future__ import annotations

import enum
import stat


class FileState(enum.StrEnum):
    DIRTY = "dirty"
    QUEUED = "queued"
    UPLOADING = "uploading"
    DURABLE = "durable"


DIRTY, QUEUED, UPLOADING, DURABLE = FileState.DIRTY, FileState.QUEUED, FileState.UPLOADING, FileState.DURABLE

LEGAL: dict[FileState, frozenset[FileState]] = {
    DIRTY: frozenset({DIRTY, QUEUED, DURABLE}),
    QUEUED: frozenset({DIRTY, QUEUED, UPLOADING, DURABLE}),
    UPLOADING: frozenset({DIRTY, QUEUED, DURABLE}),
    DURABLE: frozenset({DIRTY, QUEUED, DURABLE}),
}

HELD = "held"  # what `user.ckptfs.state` shows for a queued file under a temporary name the drain holds back
PENDING_SQL = "state <> 'durable'"  # matches the partial index inodes_pending
# The column's constraints: a known state; a place in the commit order exactly while queued or uploading.
COLUMN_SQL = ("state TEXT NOT NULL DEFAULT 'dirty' CHECK (state IN ('dirty', 'queued', 'uploading', 'durable') "
              "AND (state = 'durable' OR (state = 'dirty') = (ready_seq IS NULL)))")
# The state of a row of a schema-1 or schema-2 journal, from its flags.
FROM_FLAGS_SQL = "CASE WHEN durable = 1 THEN 'durable' WHEN ready_seq IS NULL THEN 'dirty' ELSE 'queued' END"


class IllegalTransition(RuntimeError):
    """A bug: a state change the state machine does not allow."""


def check(ino: int, old: FileState, new: FileState) -> None:
    if new not in LEGAL[old]:
        raise IllegalTransition(f"inode {ino}: {old} -> {new} is not a legal file state transition")


LOCAL_ONLY_TYPES = (stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK)


def is_local_only(mode: int) -> bool:
    """FIFOs, sockets and device nodes: kept in the namespace, never published."""
    return stat.S_IFMT(mode) in LOCAL_ONLY_TYPES
