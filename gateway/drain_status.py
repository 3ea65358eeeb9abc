"""What the drain shows: counters, and the view of pending work that status and `ckptfs wait` read."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from gateway.file_state import DIRTY, HELD, PENDING_SQL, UPLOADING
from gateway.namespace import INODE_COLUMNS, ROOT_INODE, Attr

if TYPE_CHECKING:
    from gateway.drain import Drain


@dataclasses.dataclass
class DrainCounters:
    uploaded_bytes: int = 0
    uploaded_files: int = 0
    copied_files: int = 0
    digest_passes: int = 0    # uploads whose digest needed a re-read of the file
    scheduler_passes: int = 0
    scheduler_pass_s: float = 0.0  # loop time the passes took
    deleted_objects: int = 0
    retries: int = 0
    errors: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    newest_durable_change_at: float | None = None
    newest_durable_scope_at: float | None = None


@dataclasses.dataclass
class PendingView:
    """What is pending now, for status and `wait`."""

    dirty_files: int = 0
    dirty_bytes: int = 0
    queued_files: int = 0
    uploading_files: int = 0
    held_files: int = 0
    stale_objects: int = 0
    oldest_pending_at: float | None = None
    # every change up to this namespace generation is in the bucket, old names' deletes included
    durable_through_gen: int = 0


def pending_view(drain: Drain) -> PendingView:
    ns = drain.ns
    view = PendingView(durable_through_gen=ns.gen)
    for row in drain.journal.all(f"SELECT {INODE_COLUMNS} FROM inodes WHERE {PENDING_SQL} AND nlink>0"):
        attr = Attr(*row)
        if attr.id == ROOT_INODE or drain.lineage_of(attr) is None:
            continue
        _count(view, attr, drain.state_of(attr), ns)
    memo: dict[str, int | None] = {}
    for key, gen in drain.book.stale(1 << 30):
        if not drain.book.wanted(key, memo):
            view.stale_objects += 1
            view.durable_through_gen = min(view.durable_through_gen, gen - 1)
    return view


def _count(view: PendingView, attr: Attr, kind: str, ns) -> None:
    if kind == HELD:
        view.held_files += int(not attr.is_dir)
        return
    view.durable_through_gen = min(view.durable_through_gen, attr.changed_gen - 1)
    if attr.is_dir:
        return
    size = ns.getattr(attr.id).size if kind == DIRTY else attr.size
    view.dirty_bytes += size
    if kind == DIRTY:
        view.dirty_files += 1
    elif kind == UPLOADING:
        view.uploading_files += 1
    else:
        view.queued_files += 1
    if view.oldest_pending_at is None or attr.changed_at < view.oldest_pending_at:
        view.oldest_pending_at = attr.changed_at
