"""The checkpoint catalog: which checkpoints a bucket prefix holds, and which of them a restore can use.

Works from any machine with credentials (no mount needed): one listing of the prefix, then one HEAD
(size and digest metadata) and one GetObjectTagging (promotion) per object, and one GET per marker.

A *checkpoint* is found by its framework's marker, top-down (a checkpoint's subtree belongs to it):

| framework | found by                                   | complete when                                       |
|-----------|--------------------------------------------|-----------------------------------------------------|
| shim      | ``COMMIT`` (mount.ContinuousCheckpointer)  | every file it lists is there with its size and xxh3 |
| dcp       | ``.metadata``                              | every file its chunks name is there and long enough |
| orbax     | ``_CHECKPOINT_METADATA``, commit_success   | both markers and every item directory are there     |
| torch     | a ``*.pt``/``*.pth`` file outside those    | the object is there (renamed into place: atomic)    |

A step-named directory (``step_12``, ``12``, ``checkpoint-12``) or one with DCP data files but no
marker is listed as an incomplete checkpoint whose marker is missing; one under a temporary name
(``*.orbax-checkpoint-tmp*``, uploaded after the hold limit) is incomplete too. Every object of a checkpoint
must also have the size its ``ckptfs-size`` metadata records. The newest complete checkpoint
(highest step, then newest upload) is what `--latest-complete` prints; for a directory of shim
checkpoints that is the step ContinuousCheckpointer.restore() loads.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import posixpath
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from gateway import markers, s3ops
from gateway.config import DEFAULT_HOLD_PATTERNS
from gateway.promote import Target, get_keep, read_state
from gateway.store import METADATA_DIGEST, METADATA_SIZE

WORKERS = 16
TORCH_SUFFIXES = (".pt", ".pth")
STEP_NAME = re.compile(r"^[A-Za-z_-]*?(\d+)$")  # step_12, step-12, checkpoint-12, global_step12, 12
SHIM_DATA = ("state.pt", "rank_*.pt", "__*_*.distcp")
MAX_MARKER_BYTES = 256 << 20


@dataclasses.dataclass(frozen=True)
class Obj:
    """One object of the listing, keyed relative to the catalog's base key."""

    rel: str
    size: int
    modified: float  # seconds since the epoch
    storage_class: str


@dataclasses.dataclass
class Checkpoint:
    """One checkpoint as the catalog reports it (`as_json` is the --json form)."""

    path: str  # as shown to the user: s3://... or a mount path
    key: str  # its object key (a directory's without the trailing slash)
    kind: str  # directory | file
    framework: str  # shim | dcp | orbax | torch | unknown
    step: int | None
    complete: bool
    missing: list[str]
    durable: bool
    size_bytes: int
    files: int
    age_s: float | None
    storage_class: str
    promoted: bool
    promoted_files: int
    marker: str | None = None
    format: str | None = None  # the shim's inner format
    committed_at: float | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    local_state: str | None = None  # mount targets: the gateway's durable | pending for the path
    newest_upload: float = 0.0

    def as_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("newest_upload")
        return out


@dataclasses.dataclass
class Catalog:
    source: str
    bucket: str
    key: str
    checkpoints: list[Checkpoint]

    @property
    def latest_complete(self) -> Checkpoint | None:
        return latest_complete(self.checkpoints)

    def as_json(self) -> dict[str, Any]:
        latest = self.latest_complete
        return {"source": self.source, "bucket": self.bucket, "key": self.key,
                "latest_complete": latest.path if latest else None,
                "checkpoints": [c.as_json() for c in self.checkpoints]}


@dataclasses.dataclass
class _Candidate:
    rel: str  # directory or file, relative to the base key ("" = the base itself)
    kind: str
    framework: str
    marker: str | None  # the marker file's name inside the directory, if present
    objects: dict[str, Obj]  # rel -> object, everything that belongs to it


# ---------------------------------------------------------------- durability


def durable_everywhere(checkpoint: Checkpoint) -> bool:
    """Whether every node's part of the checkpoint is in the bucket.

    Each node uploads its own files, so for now a checkpoint complete in the bucket is durable
    everywhere. A multi-node record protocol under PREFIX/.ckptfs/ would refine this, here only.
    """
    return checkpoint.complete


def latest_complete(checkpoints: list[Checkpoint]) -> Checkpoint | None:
    """The checkpoint a restore would use: the highest step among the complete ones, then the newest."""
    done = [c for c in checkpoints if c.complete]
    return max(done, key=lambda c: (c.step is not None, c.step or 0, c.newest_upload), default=None)


# ---------------------------------------------------------------- building the catalog


def build(target: Target, now: float | None = None) -> Catalog:
    """The catalog of everything under `target` (errors as one-line CliErrors)."""
    s3 = s3ops.client(target.endpoint_url, target.region)
    source = _show(target, target.key)
    with s3ops.s3_errors(f"listing {source}"):
        objects = list_tree(s3, target.bucket, target.key)
    candidates = find_checkpoints(objects, posixpath.basename(target.key))
    members = [o for c in candidates for o in c.objects.values()]
    with s3ops.s3_errors(f"reading object metadata under {source}"), ThreadPoolExecutor(WORKERS) as pool:
        full = {o.rel: _full_key(target.key, o.rel) for o in members}
        heads = dict(zip(full, pool.map(lambda rel: _metadata(s3, target.bucket, full[rel]), full), strict=True))
        keeps = dict(zip(full, pool.map(lambda rel: get_keep(s3, target.bucket, full[rel]), full), strict=True))
        marker_keys = [c for c in candidates if c.marker and c.kind == "directory"]
        marker_bytes = dict(zip((c.rel for c in marker_keys), pool.map(
            lambda c: _get(s3, target.bucket, _full_key(target.key, _join(c.rel, c.marker))), marker_keys),
            strict=True))
    now = time.time() if now is None else now
    checkpoints = [
        inspect(target, c, heads, keeps, marker_bytes.get(c.rel), now) for c in candidates
    ]
    checkpoints.sort(key=lambda c: (c.key.rsplit("/", 1)[0] if "/" in c.key else "", c.step is None,
                                    c.step or 0, c.key))
    return Catalog(source, target.bucket, target.key, checkpoints)


def list_tree(s3: Any, bucket: str, key: str) -> dict[str, Obj]:
    """Every object under `key` (a directory key, or "" for the bucket), keyed relative to it."""
    below = f"{key}/" if key else ""
    out = {}
    for o in s3ops.list_objects(s3, bucket, below):
        rel = o["Key"][len(below):]
        if rel and not rel.endswith("/"):
            out[rel] = Obj(rel, int(o["Size"]), o["LastModified"].timestamp(), o.get("StorageClass") or "STANDARD")
    return out


def find_checkpoints(objects: dict[str, Obj], base_name: str = "") -> list[_Candidate]:
    """Group the listing into checkpoints (see the module docstring for the rules)."""
    children = _files_by_directory(objects)
    dirs = sorted(children, key=lambda d: (d.count("/") + bool(d), d))  # top-down
    claimed: dict[str, tuple[str, str | None]] = {}  # directory -> (framework, marker)

    def owner(rel: str) -> str | None:
        """The claimed directory that is `rel` or holds it."""
        while rel not in claimed:
            if not rel:
                return None
            rel = posixpath.dirname(rel)
        return rel

    for rel in dirs:  # pass 1: directories with a marker
        framework, marker = _marker_of(children[rel])
        if framework and owner(rel) is None:
            claimed[rel] = (framework, marker)
    holding = {a for c in claimed for a in _ancestors(c)}
    for rel in dirs:  # pass 2: step-named or DCP-data directories without a marker
        names = children[rel]
        if not names or rel in holding or owner(rel) is not None:
            continue
        if any(fnmatch.fnmatch(n, "__*_*.distcp") for n in names):
            claimed[rel] = ("dcp", None)
        elif STEP_NAME.match(posixpath.basename(rel) or base_name):
            shim = any(fnmatch.fnmatch(n, p) for n in names for p in SHIM_DATA)
            claimed[rel] = ("shim" if shim else "unknown", None)
    members: dict[str, dict[str, Obj]] = {rel: {} for rel in claimed}
    files = []
    for rel, obj in sorted(objects.items()):  # pass 3: torch files renamed into place
        home = owner(posixpath.dirname(rel))
        if home is not None:
            members[home][rel] = obj
        elif rel.endswith(TORCH_SUFFIXES):
            files.append(_Candidate(rel, "file", "torch", None, {rel: obj}))
    dirs_found = [_Candidate(rel, "directory", fw, marker, members[rel]) for rel, (fw, marker) in claimed.items()]
    return dirs_found + files


def _files_by_directory(objects: dict[str, Obj]) -> dict[str, list[str]]:
    """Every directory of the listing ("" = the base) -> the names of the files directly in it."""
    children: dict[str, list[str]] = {}
    for rel in objects:
        parent, name = posixpath.split(rel)
        children.setdefault(parent, []).append(name)
        for above in _ancestors(parent):
            children.setdefault(above, [])
    return children


def _ancestors(rel: str):
    while rel:
        rel = posixpath.dirname(rel)
        yield rel


def _marker_of(names: list[str]) -> tuple[str | None, str | None]:
    if markers.SHIM_COMMIT in names:
        return "shim", markers.SHIM_COMMIT
    if markers.DCP_METADATA in names:
        return "dcp", markers.DCP_METADATA
    if markers.ORBAX_COMMIT in names or markers.ORBAX_METADATA in names:
        return "orbax", markers.ORBAX_METADATA if markers.ORBAX_METADATA in names else markers.ORBAX_COMMIT
    return None, None


# ---------------------------------------------------------------- one checkpoint


MISSING_MARKER = {"shim": markers.SHIM_COMMIT, "dcp": markers.DCP_METADATA, "orbax": markers.ORBAX_COMMIT}


def inspect(target: Target, cand: _Candidate, heads: dict[str, dict], keeps: dict[str, str | None],
            marker_data: bytes | None, now: float) -> Checkpoint:
    """Check one candidate against its marker and the objects' metadata."""
    missing: list[str] = []
    notes: list[str] = []
    info = markers.MarkerInfo()
    if cand.kind == "directory":
        info = _read_marker(cand, marker_data, missing, notes)
        _check_expected(cand, info, heads, missing)
    temporary = [p for p in cand.rel.split("/") if any(fnmatch.fnmatch(p, t) for t in DEFAULT_HOLD_PATTERNS)]
    if temporary:  # uploaded after the hold limit, never renamed into place
        missing.append(f"{temporary[0]}: a temporary name (the save was never renamed into place)")
    for rel, obj in sorted(cand.objects.items()):
        recorded = heads[rel].get(METADATA_SIZE)
        if recorded is not None and recorded.isdigit() and int(recorded) != obj.size:
            missing.append(f"{_inner(cand, rel)}: {obj.size} bytes in the bucket, {recorded} uploaded")
    key = _full_key(target.key, cand.rel)
    objs = list(cand.objects.values())
    newest = max((o.modified for o in objs), default=0.0)
    kept = sum(1 for rel in cand.objects if keeps.get(rel) == "true")
    name = posixpath.basename(cand.rel) or posixpath.basename(target.key)
    step = info.step if info.step is not None else _step_of(name, cand.kind)
    cp = Checkpoint(
        path=_show(target, key), key=key, kind=cand.kind, framework=cand.framework, step=step,
        complete=not missing, missing=missing, durable=False, size_bytes=sum(o.size for o in objs),
        files=len(objs), age_s=round(now - newest, 1) if objs else None,
        storage_class="+".join(sorted({o.storage_class for o in objs})) or "-",
        promoted=bool(objs) and kept == len(objs), promoted_files=kept, marker=cand.marker,
        format=info.format, committed_at=info.time, notes=notes, newest_upload=newest)
    cp.durable = durable_everywhere(cp)
    if target.mountpoint is not None:
        cp.local_state = read_state(cp.path)
    return cp


def _read_marker(cand: _Candidate, data: bytes | None, missing: list[str], notes: list[str]) -> markers.MarkerInfo:
    if cand.marker is None:
        missing.append(f"{MISSING_MARKER.get(cand.framework, 'marker')} (no completion marker)")
        return markers.MarkerInfo()
    names = {r.rsplit("/", 1)[-1] for r in cand.objects if posixpath.dirname(r) == cand.rel}
    if cand.framework == "orbax":
        for needed in (markers.ORBAX_COMMIT, markers.ORBAX_METADATA):
            if needed not in names:
                missing.append(f"{needed} (Orbax did not finalize this step)")
        if cand.marker == markers.ORBAX_COMMIT:
            return markers.MarkerInfo()  # no _CHECKPOINT_METADATA to read
    reader = {"shim": markers.read_shim_commit, "dcp": markers.read_dcp_metadata,
              "orbax": markers.read_orbax_metadata}[cand.framework]
    try:
        if data is None or len(data) > MAX_MARKER_BYTES:
            raise markers.MarkerError(f"{cand.marker} could not be read")
        return reader(data)
    except markers.MarkerError as exc:
        if cand.framework == "dcp":  # the file list is DCP's detail; its presence is the commit
            notes.append(f"file list not checked: {exc}")
        else:
            missing.append(f"{cand.marker}: {exc}")
        return markers.MarkerInfo()


def _check_expected(cand: _Candidate, info: markers.MarkerInfo, heads: dict[str, dict],
                    missing: list[str]) -> None:
    for exp in info.expected:
        rel = _join(cand.rel, exp.name)
        obj = cand.objects.get(rel)
        if obj is None:
            missing.append(f"{exp.name}: missing")
        elif exp.size is not None and obj.size != exp.size:
            missing.append(f"{exp.name}: {obj.size} bytes, {cand.marker} says {exp.size}")
        elif obj.size < exp.min_size:
            missing.append(f"{exp.name}: {obj.size} bytes, {cand.marker} needs {exp.min_size}")
        elif exp.xxh3_128 is not None:
            digest = heads[rel].get(METADATA_DIGEST)
            if digest is None:
                missing.append(f"{exp.name}: no ckptfs digest on the object to compare")
            elif digest != exp.xxh3_128:
                missing.append(f"{exp.name}: digest differs from {cand.marker}")
    for item in info.expected_dirs:
        below = _join(cand.rel, item) + "/"
        if not any(r.startswith(below) for r in cand.objects):
            missing.append(f"{item}/: missing (named by {cand.marker})")


# ---------------------------------------------------------------- helpers


def _metadata(s3: Any, bucket: str, key: str) -> dict[str, str]:
    from botocore.exceptions import ClientError

    try:
        return s3.head_object(Bucket=bucket, Key=key).get("Metadata", {})
    except ClientError as exc:
        if s3ops.error_code(exc) in ("404", "NoSuchKey", "NotFound"):
            return {}  # deleted since the listing
        raise


def _get(s3: Any, bucket: str, key: str) -> bytes | None:
    from botocore.exceptions import ClientError

    try:
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read(MAX_MARKER_BYTES + 1)
    except ClientError as exc:
        if s3ops.error_code(exc) in ("404", "NoSuchKey", "NotFound"):
            return None
        raise


def _show(target: Target, key: str) -> str:
    return target.show(key).rstrip("/") or "/"


def _step_of(name: str, kind: str) -> int | None:
    if kind == "file":
        m = re.search(r"(\d+)$", posixpath.splitext(name)[0])
    else:
        m = STEP_NAME.match(name)
    return int(m.group(1)) if m else None


def _join(a: str, b: str) -> str:
    return f"{a}/{b}" if a else b


def _full_key(base: str, rel: str) -> str:
    return "/".join(p for p in (base, rel) if p)


def _inner(cand: _Candidate, rel: str) -> str:
    return rel[len(cand.rel) + 1:] if cand.rel and cand.kind == "directory" else rel
