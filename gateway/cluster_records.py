"""The records several gateways keep under PREFIX/.ckptfs/ to act as one filesystem (docs/CLUSTER.md).

Pure functions only: key names, record bodies, and the decisions taken from a listing (who must
answer a commit, who has not yet). No I/O, so the protocol's rules are unit-tested without a bucket.

    .ckptfs/nodes/<node>@<incarnation>                lease; its LastModified is the last renewal
    .ckptfs/commits/<scope>/commit.json               the commit of a scope (If-None-Match / If-Match)
    .ckptfs/commits/<scope>/<commit-id>/<node>@<inc>  a node's manifest: "my files of the scope, all durable"
    .ckptfs/pending/<scope>/<commit-id>               index of commits still waiting for answers
    .ckptfs/retired/<node>@<incarnation>              a node unmounted with everything durable
    .ckptfs/log/<ms>-<node>-<n>~<op>~<path>[~<to>]    namespace records (mkdir, rmdir, rename)
    .ckptfs/pending/<root>/fence-<id>                 a fence: stage your files under <root> and answer

`<scope>` is the scope's path with every byte outside [A-Za-z0-9._-] percent-encoded (one key
component, and a directory's encoding is a prefix of its descendants' encodings plus "%2F").
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
import urllib.parse
import uuid

from gateway.keys import PRIVATE_DIR

NODES = f"{PRIVATE_DIR}/nodes/"
COMMITS = f"{PRIVATE_DIR}/commits/"
PENDING = f"{PRIVATE_DIR}/pending/"
RETIRED = f"{PRIVATE_DIR}/retired/"
LOG = f"{PRIVATE_DIR}/log/"
NODE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
LOG_OPS = ("mkdir", "rmdir", "rename")
FENCE = "fence-"  # a pending "commit" id that is a fence (gateway/staging.py): answered, never committed
SEP = "~"


def quote_path(path: str) -> str:
    return urllib.parse.quote(path, safe="").replace("~", "%7E")


def unquote_path(text: str) -> str:
    return urllib.parse.unquote(text)


def new_incarnation() -> str:
    return uuid.uuid4().hex[:16]


def new_commit_id() -> str:
    return f"{int(time.time() * 1000):013d}-{uuid.uuid4().hex[:8]}"


# ---- leases ---------------------------------------------------------------------------------

def lease_key(node: str, incarnation: str) -> str:
    return f"{NODES}{node}@{incarnation}"


def retired_key(node: str, incarnation: str) -> str:
    return f"{RETIRED}{node}@{incarnation}"


def parse_lease_key(key: str, base: str = NODES) -> tuple[str, str] | None:
    """(node, incarnation) from a relative key under nodes/ (or retired/), or None."""
    if not key.startswith(base):
        return None
    node, sep, inc = key[len(base):].partition("@")
    return (node, inc) if sep and NODE_ID_RE.match(node) and inc else None


@dataclasses.dataclass(frozen=True)
class Lease:
    node: str
    incarnation: str
    renewed_at: float  # server time (the record's LastModified)

    @property
    def member(self) -> str:
        return f"{self.node}@{self.incarnation}"


def required_members(leases: list[Lease], me: str, cutoff: float) -> list[str]:
    """Who must answer a commit: this node, and every lease renewed at or after `cutoff`.

    `cutoff` is (the marker's close, in server time) - lease TTL: a node that wrote into the scope
    was alive at the training barrier, before the marker was closed, so its lease was renewed
    within one TTL before that. Retired nodes (clean unmount, all durable) have no lease record.
    """
    members = {me}
    members.update(lease.member for lease in leases if lease.renewed_at >= cutoff)
    return sorted(members)


# ---- commits --------------------------------------------------------------------------------

def commit_key(scope: str) -> str:
    return f"{COMMITS}{quote_path(scope)}/commit.json"


def manifest_prefix(scope: str, commit_id: str) -> str:
    return f"{COMMITS}{quote_path(scope)}/{commit_id}/"


def manifest_key(scope: str, commit_id: str, member: str) -> str:
    return manifest_prefix(scope, commit_id) + member


def pending_key(scope: str, commit_id: str) -> str:
    return f"{PENDING}{quote_path(scope)}/{commit_id}"


def parse_pending_key(key: str) -> tuple[str, str] | None:
    """(scope, commit_id) from a relative key under pending/, or None."""
    if not key.startswith(PENDING):
        return None
    quoted, sep, commit_id = key[len(PENDING):].partition("/")
    return (unquote_path(quoted), commit_id) if sep and commit_id and "/" not in commit_id else None


def scope_records_prefixes(path: str) -> list[str]:
    """Prefixes of every commit and pending record of `path` and of scopes below it."""
    q = quote_path(path)
    return [f"{COMMITS}{q}/", f"{COMMITS}{q}%2F", f"{PENDING}{q}/", f"{PENDING}{q}%2F"]


def answered_members(keys: list[str], scope: str, commit_id: str) -> set[str]:
    prefix = manifest_prefix(scope, commit_id)
    return {k[len(prefix):] for k in keys if k.startswith(prefix) and "/" not in k[len(prefix):]}


def missing_members(required: list[str], answered: set[str]) -> list[str]:
    return [m for m in required if m not in answered]


def commit_record(scope: str, marker: str, commit_id: str, owner: str, required: list[str],
                  marker_closed_at: float, state: str = "pending", **extra) -> bytes:
    body = {"scope": scope, "marker": marker, "commit_id": commit_id, "owner": owner, "required": required,
            "marker_closed_at": marker_closed_at, "announced_at": time.time(), "state": state, **extra}
    return json.dumps(body, sort_keys=True).encode()


def may_take_over(existing: dict, me: str, live_members: set[str]) -> str:
    """What a node holding a marker does about a commit record it found for its scope.

    "resume": it is this node's own (a restart with the same journal, a later marker);
    "replace": the old commit was abandoned, or its owner's lease is gone and it is finished or
               still pending (the step saved again by a new job, a holder lost before its grant):
               replace it with If-Match on its ETag (of two racers, one wins; a pending owner's
               own If-Match to "granted" then fails, so it never publishes);
    "conflict": another live node committed or is committing this scope, or was granted it and
               may have published: never publish a second marker.
    """
    state = existing.get("state")
    if existing.get("owner") == me:
        return "resume"
    owner_gone = existing.get("owner") not in live_members
    if state == "abandoned" or (owner_gone and state in ("pending", "committed")):
        return "replace"
    return "conflict"


def manifest_record(scope: str, commit_id: str, member: str, files: list[dict]) -> bytes:
    return json.dumps({"scope": scope, "commit_id": commit_id, "member": member, "files": files,
                       "answered_at": time.time()}, sort_keys=True).encode()


# ---- namespace log --------------------------------------------------------------------------

def log_key(at: float, node: str, n: int, op: str, path: str, to: str | None = None) -> str:
    parts = [f"{int(at * 1000):013d}-{node}-{n:06d}", op, quote_path(path)]
    if to is not None:
        parts.append(quote_path(to))
    return LOG + SEP.join(parts)


def log_start_after(at: float) -> str:
    """A key that sorts before every log record written at or after `at`."""
    return f"{LOG}{int(at * 1000):013d}"


@dataclasses.dataclass(frozen=True)
class LogRecord:
    key: str
    at: float
    node: str
    op: str
    path: str
    to: str | None


def parse_log_key(key: str) -> LogRecord | None:
    if not key.startswith(LOG):
        return None
    fields = key[len(LOG):].split(SEP)
    if len(fields) not in (3, 4) or fields[1] not in LOG_OPS:
        return None
    stamp, _, rest = fields[0].partition("-")
    node, _, _n = rest.rpartition("-")
    if not stamp.isdigit() or not node:
        return None
    to = unquote_path(fields[3]) if len(fields) == 4 else None
    if (fields[1] == "rename") != (to is not None):
        return None
    return LogRecord(key, int(stamp) / 1000, node, fields[1], unquote_path(fields[2]), to)
