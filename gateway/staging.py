"""Staging: files a node writes under a temporary directory that another node made (docs/CLUSTER.md, "Staging").

Orbax's multi-host save has every host write into the primary's `*.orbax-checkpoint-tmp*`
directory, and the primary reads the other hosts' files there before it renames the directory
into place. A file under a temporary name never reaches its final key before the rename, so a
node that did not make the temporary directory uploads its closed files there to a *staged* key:

    .ckptfs/staged/<held root, quoted>/<node>@<incarnation>/<path below the root>

Staged keys are never checkpoint names (they are under `.ckptfs/`, hidden from every listing)
and never final keys. The node that made the directory adopts them (on a readdir or lookup miss
there, after a fence, gateway/cluster.py) and reads them; when it renames the directory, every
writer applies the rename record and copies its own staged objects to their final keys (a
server-side copy), then deletes them. Pure key rules plus the small journal state they need.
"""

from __future__ import annotations

import json
import logging

from gateway.cluster_records import quote_path, unquote_path
from gateway.journal import Journal
from gateway.keys import PRIVATE_DIR
from gateway.namespace import SUBTREE_CTE, Namespace
from gateway.scopes import ScopeRules

log = logging.getLogger(__name__)

STAGED = f"{PRIVATE_DIR}/staged/"
META_ROOTS = "cluster_foreign_roots"


def held_root(path: str, rules: ScopeRules) -> str | None:
    """The topmost directory of `path` (itself included) with a temporary name, or None."""
    parts = path.split("/")
    for i, part in enumerate(parts):
        if rules.is_held(part):
            return "/".join(parts[:i + 1])
    return None


def staged_key(root: str, member: str, rel: str) -> str:
    return f"{STAGED}{quote_path(root)}/{member}/{rel}"


def staged_prefix(root: str) -> str:
    return f"{STAGED}{quote_path(root)}/"


def parse_staged_key(key: str) -> tuple[str, str, str] | None:
    """(held root, member, path below the root) of a staged key, or None."""
    if not key.startswith(STAGED):
        return None
    quoted, _, rest = key[len(STAGED):].partition("/")
    member, sep, rel = rest.partition("/")
    if not quoted or not sep or "@" not in member or not rel:
        return None
    return unquote_path(quoted), member, rel


def staged_path(key: str) -> str | None:
    """The path in the mount a staged key holds the file of."""
    parsed = parse_staged_key(key)
    return None if parsed is None else f"{parsed[0]}/{parsed[2]}"


class Staging:
    """Which temporary directories another node made (their files are staged here), and the keys."""

    def __init__(self, ns: Namespace, journal: Journal, rules: ScopeRules, member: str):
        self.ns = ns
        self.journal = journal
        self.rules = rules
        self.member = member
        raw = journal.get_meta(META_ROOTS)
        self.foreign_roots: set[str] = set(json.loads(raw)) if raw else set()
        self.remote_dirs: set[int] = set()  # directories made here by other nodes' records (this run)

    def new_root(self, path: str) -> str | None:
        """The held root of `path` if this node does not have it yet (another node's record makes it)."""
        root = held_root(path, self.rules)
        return root if root is not None and self.ns.resolve(root) is None else None

    def note_made_elsewhere(self, root: str) -> None:
        """Another node made the temporary directory `root`: files written below it here are staged."""
        if root in self.foreign_roots:
            return
        self.foreign_roots = {r for r in self.foreign_roots if self.ns.resolve(r) is not None} | {root}
        self.journal.set_meta(META_ROOTS, json.dumps(sorted(self.foreign_roots)))
        log.info("%s was made by another node: files written under it here are staged", root)

    def forget(self, root: str) -> None:
        if root in self.foreign_roots:
            self.foreign_roots.discard(root)
            self.journal.set_meta(META_ROOTS, json.dumps(sorted(self.foreign_roots)))

    def stages(self, path: str) -> bool:
        """Whether `path` is under a temporary directory another node made (it is staged, not held)."""
        root = held_root(path, self.rules)
        return root is not None and root in self.foreign_roots

    def key_for(self, path: str) -> str | None:
        """The staged key of a file at `path`, or None if it is not staged."""
        root = held_root(path, self.rules)
        if root is None or root not in self.foreign_roots or path == root:
            return None
        return staged_key(root, self.member, path[len(root) + 1:])

    def owned_root(self, path: str) -> str | None:
        """The temporary directory `path` is in, if this node made it (other nodes stage files there)."""
        root = held_root(path, self.rules)
        return root if root is not None and root not in self.foreign_roots else None

    def is_foreign(self, key: str) -> bool:
        """A staged object of another node: never published, copied or deleted by this one."""
        parsed = parse_staged_key(key)
        return parsed is not None and parsed[1] != self.member

    def settle_foreign(self, path: str) -> int:
        """`path` was renamed here: entries adopted from other nodes' staged objects below it are
        theirs to publish (each node copies its own); they are not pending here."""
        ino = self.ns.resolve(path)
        if ino is None:
            return 0
        rows = self.journal.all(
            SUBTREE_CTE + "SELECT o.inode, o.key FROM sub JOIN objects o ON o.inode = sub.i "
            f"WHERE substr(o.key, 1, {len(STAGED)}) = ?", (ino, STAGED))
        settled = 0
        for inode, key in rows:
            if self.is_foreign(key):
                settled += self.ns.published_elsewhere(inode)
        return settled

    def has_stale_own(self) -> bool:
        """Whether a staged object of ours still waits for its delete (after its copy)."""
        rows = self.journal.all("SELECT key FROM objects WHERE key >= ? AND key < ? AND inode IS NULL",
                                (STAGED, STAGED[:-1] + "0"))  # the key range of STAGED (an index lookup)
        return any(not self.is_foreign(k) for (k,) in rows)
