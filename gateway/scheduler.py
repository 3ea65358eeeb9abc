"""The drain's scheduler: a pure function from pending journal rows to what to send next.

Rules (docs/SEMANTICS.md, "Commit scopes"):
1. Only markers and pointers wait. A commit marker starts once every file of its scope (its
   directory's subtree) that became ready before it is durable, and the commit gate (other nodes)
   agrees. A pointer starts once every file under its directory that became ready before it is
   durable. Everything else starts as soon as it is due. With several nodes (`gate_renames`), a
   directory renamed into place has a *closing file* that waits like a marker (`_gate_renamed_dirs`).
   A file under a temporary name (held) or still being written is part of no rename scope: it is
   not part of what the rename committed, and it must not keep the scope selected (rule 2) while
   every other committed scope waits for it, up to the hold limit or for as long as it stays open.
2. Bandwidth goes to committed scopes, newest first and without preemption: the drain *selects*
   the newest committed scope and keeps it selected until nothing of it is pending; then it selects
   the newest one at that moment. A selected scope of which no job runs and nothing can start (its
   rest waits on a writer, a retry's backoff, or other nodes) is not kept: the newest scope that
   can move is selected instead, so one stuck file or lost node does not stall every checkpoint.
   No second scope is started alongside: under continuous checkpointing the newest scope changes
   every few seconds, and parts started for a scope that is superseded before it is selected were
   measured to halve the selected one's speed (the gaps are filled by files outside committed
   scopes). A committed scope older than the newest durable
   one is selected only once no newer one is pending, or, if it is *pinned* (`pinned`: a keep
   policy keeps it for good, e.g. one checkpoint an hour), alternating with newer ones
   (`prefer_old`), so it is uploaded even while newer ones keep coming. Either way only after
   retention had time to delete what it drops (`old_ok`: roots superseded long enough).
3. Limiter priority (lower goes first): the selected scope; then files outside any committed scope
   in the order they became ready; then committed scopes not selected (jobs of those are not
   started, but a job started before its scope was committed keeps running).
4. Stale keys are deleted markers and pointers first: a key below a directory whose stale marker
   or pointer is not yet deleted waits.

Nothing here touches the journal, the clock or the network; tests/test_scheduler.py drives it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence, Set

from gateway.scopes import ScopeRules

Priority = tuple[int, int, int]


@dataclasses.dataclass(frozen=True, slots=True)
class Row:
    """One pending inode, as the drain sees it this pass."""

    ino: int
    path: str                      # relative to the mount root
    ancestors: tuple[int, ...]     # directory inodes from the parent up to the root
    ready_seq: int | None = None   # place in the commit order; None while it is being written
    is_dir: bool = False
    held: bool = False             # under a temporary name, within the hold limit
    startable: bool = False        # due (closed, quiet, not backing off) and no job running
    running: bool = False          # a job is publishing it now


@dataclasses.dataclass(frozen=True, slots=True)
class Scope:
    root: int             # directory (or single file) inode
    path: str
    committed_seq: int
    by_marker: bool       # a marker commits it (else a rename into place)
    marker: int | None = None  # the newest pending marker's inode (marker scopes)


@dataclasses.dataclass
class Plan:
    start: list[int]                      # inodes to start now, highest priority first
    priority: dict[int, Priority]         # every pending inode's current limiter priority
    selected: int | None                  # the selected scope's root (give it back next pass)
    prefer_old: bool                      # give back next pass: alternate older and newer picks
    waiting: dict[int, list[int]]         # marker/pointer -> pending inodes it waits for
    gated: dict[int, str]                 # marker -> scope it waits on other nodes for
    scopes: dict[int, Scope]              # committed scopes with pending files


def plan(rows: Sequence[Row], rename_scopes: Mapping[int, int], rules: ScopeRules, *,
         selected: int | None = None, newest_durable_seq: int | None = None, old_ok: Set[int] = frozenset(),
         started: bool = True, pinned: Set[int] = frozenset(), prefer_old: bool = False, room: int = 1 << 30,
         gate: Callable[[str, str], bool] = lambda scope, marker: True, gate_renames: bool = False) -> Plan:
    """What to start now. `rename_scopes`: root inode -> committed seq (journal table `scopes`);
    `selected`, `prefer_old` come from the last pass's plan (`started`: a job of the selected scope
    was started, so it keeps its rank), `newest_durable_seq` and `old_ok` from
    the drain's record of finished scopes; `room` is how many jobs may start. `gate_renames`
    (several nodes): a directory renamed into place is gated too, through its closing file (rule 1)."""
    scopes = _committed_scopes(rows, rename_scopes, rules)
    scope_of = {r.ino: _scope_of(r, scopes) for r in rows}
    waiting, gated = _gates(rows, rules, gate)
    if gate_renames:
        _gate_renamed_dirs(rows, scopes, scope_of, gate, waiting, gated)
    ready = {r.ino for r in rows if r.startable and r.ino not in waiting and r.ino not in gated}
    active = {r.ino for r in rows if r.running} | ready
    moving = {scope_of[ino] for ino in active}
    moving |= {scope_of[w] for w, deps in waiting.items() if active.intersection(deps)}
    moving.discard(None)

    # nothing of it sent yet (a newer commit may still win), or nothing of it can move (it waits on
    # a writer, a retry, another node): the newest scope that can move is selected instead
    if selected not in moving or not started:
        pick = (_pick({root: s for root, s in scopes.items() if root in moving}, newest_durable_seq, old_ok,
                      pinned, prefer_old)
                or _pick(scopes, newest_durable_seq, old_ok, pinned, prefer_old))
        if pick is not None and pick != selected:
            prefer_old = not _is_old(scopes[pick], newest_durable_seq)
        selected = pick
    rank = {selected: 0} if selected is not None else {}
    priority = {r.ino: _priority(r, scope_of[r.ino], rank, scopes) for r in rows}
    _inherit(priority, waiting)
    start = sorted((ino for ino in ready if priority[ino][0] < 2), key=priority.__getitem__)
    return Plan(start=start[:room], priority=priority, selected=selected, prefer_old=prefer_old,
                waiting=waiting, gated=gated, scopes=scopes)


def _committed_scopes(rows: Sequence[Row], rename_scopes: Mapping[int, int], rules: ScopeRules) -> dict[int, Scope]:
    """Scopes with pending files: directories of pending markers, and pending rename scopes."""
    scopes: dict[int, Scope] = {}
    for r in rows:
        if r.ready_seq is None or r.held or r.is_dir or not r.ancestors or not rules.is_marker(r.path):
            continue
        root = r.ancestors[0]
        if root in scopes and scopes[root].committed_seq >= r.ready_seq:
            continue
        scopes[root] = Scope(root, r.path.rpartition("/")[0], r.ready_seq, by_marker=True, marker=r.ino)
    marker_dirs = set(scopes)
    for r in rows:
        if marker_dirs.intersection(r.ancestors):
            continue  # renames inside a checkpoint directory are part of that checkpoint
        if r.held or (r.ready_seq is None and not r.is_dir):
            continue  # waits on its writer or its hold limit: it must not keep its scope selected
        for depth, ino in enumerate((r.ino, *r.ancestors)):
            if ino in rename_scopes and ino not in scopes:
                path = "/".join(r.path.split("/")[:len(r.path.split("/")) - depth])
                if not rules.is_held(path):
                    scopes[ino] = Scope(ino, path, rename_scopes[ino], by_marker=False)
    return scopes


def _scope_of(r: Row, scopes: Mapping[int, Scope]) -> int | None:
    """The scope a row belongs to: the nearest marker scope above it, else the nearest rename scope
    (itself included). A marker scope is the checkpoint directory itself, so it wins over the rename
    of a single file inside it (DCP's `.metadata.tmp`, the shim's `state.pt.tmp`)."""
    for ino in r.ancestors:
        if ino in scopes and scopes[ino].by_marker:
            return ino
    for ino in (r.ino, *r.ancestors):
        if ino in scopes:
            return ino
    return None


def _gates(rows: Sequence[Row], rules: ScopeRules,
           gate: Callable[[str, str], bool]) -> tuple[dict[int, list[int]], dict[int, str]]:
    """Markers and pointers that cannot start yet: what they wait for locally, or the gate."""
    waiters = [r for r in rows if r.ready_seq is not None and not r.is_dir and r.ancestors
               and (rules.is_marker(r.path) or rules.is_pointer(r.path))]
    if not waiters:
        return {}, {}
    below: dict[int, list[Row]] = {w.ancestors[0]: [] for w in waiters}
    for r in rows:
        if r.is_dir or r.held or r.ready_seq is None:
            continue
        for ino in r.ancestors:
            if ino in below:
                below[ino].append(r)
    waiting: dict[int, list[int]] = {}
    gated: dict[int, str] = {}
    for w in waiters:
        assert w.ready_seq is not None
        pointer = not rules.is_marker(w.path)
        deps = [r.ino for r in below[w.ancestors[0]] if r.ino != w.ino and (r.ready_seq or 0) < w.ready_seq
                and not (pointer and rules.is_pointer(r.path))]
        if deps:
            waiting[w.ino] = deps
        elif not pointer and not w.held:
            scope = w.path.rpartition("/")[0]
            if not gate(scope, w.path):
                gated[w.ino] = scope
    return waiting, gated


def _gate_renamed_dirs(rows: Sequence[Row], scopes: Mapping[int, Scope], scope_of: Mapping[int, int | None],
                       gate: Callable[[str, str], bool], waiting: dict[int, list[int]], gated: dict[int, str]) -> None:
    """A directory renamed into place, across nodes: its *closing file* (the newest pending file of
    the scope in commit order) acts as its marker. It starts once every other pending file of the
    scope is durable and the gate (every other node's files of the scope are durable) agrees."""
    members: dict[int, list[Row]] = {}
    for r in rows:
        root = scope_of.get(r.ino)
        if root is not None and not scopes[root].by_marker and root != r.ino and not r.is_dir \
                and r.ready_seq is not None and not r.held:
            members.setdefault(root, []).append(r)
    for root, files in members.items():
        closer = max(files, key=lambda r: (r.ready_seq, r.ino))
        deps = [r.ino for r in files if r.ino != closer.ino]
        if deps:
            waiting[closer.ino] = deps
        elif not gate(scopes[root].path, closer.path):
            gated[closer.ino] = scopes[root].path


def _is_old(scope: Scope, newest_durable_seq: int | None) -> bool:
    return newest_durable_seq is not None and scope.committed_seq < newest_durable_seq


def _pick(scopes: Mapping[int, Scope], newest_durable_seq: int | None, old_ok: Set[int], pinned: Set[int],
          prefer_old: bool) -> int | None:
    """The scope to select: the newest committed one; alternating with it, the oldest pinned one
    older than the newest durable scope; other older ones only when nothing newer is pending."""
    newer = [s for s in scopes.values() if not _is_old(s, newest_durable_seq)]
    older = [s for s in scopes.values() if _is_old(s, newest_durable_seq) and s.root in old_ok]
    kept = [s for s in older if s.root in pinned]
    if kept and (prefer_old or not newer):
        return min(kept, key=lambda s: s.committed_seq).root
    if newer:
        return max(newer, key=lambda s: s.committed_seq).root
    if older:
        return max(older, key=lambda s: s.committed_seq).root
    return None


def _priority(r: Row, scope: int | None, rank: Mapping[int, int], scopes: Mapping[int, Scope]) -> Priority:
    seq = r.ready_seq or 0
    if scope is not None and scope in rank:
        return (0, rank[scope], seq)
    if scope is None:
        return (1, seq, 0)
    return (2, -scopes[scope].committed_seq, seq)


def _inherit(priority: dict[int, Priority], waiting: Mapping[int, list[int]]) -> None:
    """What a marker waits for goes at least as early as the marker: no marker of a chosen scope can
    wait on files of a scope that is not chosen (a nested checkpoint directory, say)."""
    for marker, deps in waiting.items():
        for ino in deps:
            if priority[marker] < priority[ino]:
                priority[ino] = priority[marker]


def plan_deletes(stale: Iterable[str], rules: ScopeRules) -> list[str]:
    """Stale keys that may be deleted now: markers and pointers before what they commit."""
    stale = list(stale)
    first = {key.rpartition("/")[0] for key in stale
             if not key.endswith("/") and (rules.is_marker(key) or rules.is_pointer(key))}
    if not first:
        return stale
    out = []
    for key in stale:
        if not key.endswith("/") and (rules.is_marker(key) or rules.is_pointer(key)):
            out.append(key)
        elif not any(_under(key, d) for d in first):
            out.append(key)
    return out


def _under(key: str, directory: str) -> bool:
    return key.startswith(directory + "/") if directory else True
