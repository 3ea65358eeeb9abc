"""Completion markers of the checkpoint formats, read from their bytes (no framework imports).

- the shim's ``COMMIT`` (mount/checkpointer.py): JSON with ``step``, ``time``, ``format`` and
  ``files`` = [{name, size, xxh3_128, rank}], written last;
- PyTorch DCP's ``.metadata``: a pickled ``Metadata`` whose ``storage_data`` maps every chunk to
  (relative_path, offset, length). It is read by `SafeUnpickler`, which builds inert stand-ins for
  every class the pickle names and never imports or calls anything, so a marker from a bucket
  cannot run code, and torch is not needed;
- Orbax's ``_CHECKPOINT_METADATA`` (JSON: item_handlers, commit_timestamp_nsecs, ...) and its
  ``commit_success.txt``, which both of Orbax's atomicity modes leave in a finalized step.

Each reader raises `MarkerError` with a one-line reason when the bytes are not such a marker.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
from typing import Any

SHIM_COMMIT = "COMMIT"  # mount.checkpointer.COMMIT_NAME (not imported: that pulls in torch)
DCP_METADATA = ".metadata"
ORBAX_METADATA = "_CHECKPOINT_METADATA"
ORBAX_COMMIT = "commit_success.txt"


class MarkerError(ValueError):
    """The bytes are not a readable marker of the format."""


@dataclasses.dataclass(frozen=True)
class ExpectedFile:
    """A file a marker names: its path relative to the checkpoint directory and what it must hold."""

    name: str
    size: int | None = None  # exact size, when the marker records it
    min_size: int = 0  # the file must be at least this long (DCP: the end of its last chunk)
    xxh3_128: str | None = None  # the content digest, when the marker records it


@dataclasses.dataclass(frozen=True)
class MarkerInfo:
    """What a marker says about its checkpoint."""

    expected: tuple[ExpectedFile, ...] = ()
    expected_dirs: tuple[str, ...] = ()  # directories that must hold at least one object (Orbax items)
    step: int | None = None
    time: float | None = None  # when the checkpoint was committed (seconds since the epoch)
    format: str | None = None  # the shim's inner format: torch | dcp


def read_shim_commit(data: bytes) -> MarkerInfo:
    """The shim's COMMIT marker (the same acceptance rule as mount.checkpointer.read_commit)."""
    try:
        marker = json.loads(data)
    except ValueError as exc:
        raise MarkerError(f"COMMIT is not JSON ({exc})") from None
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), list):
        raise MarkerError("COMMIT is not a ckptfs commit marker")
    try:
        expected = tuple(ExpectedFile(str(f["name"]), int(f["size"]), xxh3_128=str(f["xxh3_128"]))
                         for f in marker["files"])
        step = None if marker.get("step") is None else int(marker["step"])
        when = None if marker.get("time") is None else float(marker["time"])
    except (KeyError, TypeError, ValueError) as exc:
        raise MarkerError(f"COMMIT has a malformed entry ({exc!r})") from None
    return MarkerInfo(expected, step=step, time=when, format=str(marker.get("format", "torch")))


def read_orbax_metadata(data: bytes) -> MarkerInfo:
    """Orbax's _CHECKPOINT_METADATA: the items it names must be there (it lists no files)."""
    try:
        meta = json.loads(data)
    except ValueError as exc:
        raise MarkerError(f"_CHECKPOINT_METADATA is not JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise MarkerError("_CHECKPOINT_METADATA is not a JSON object")
    handlers = meta.get("item_handlers")
    items = tuple(sorted(handlers)) if isinstance(handlers, dict) else ()
    ns = meta.get("commit_timestamp_nsecs") or meta.get("init_timestamp_nsecs")
    return MarkerInfo(expected_dirs=items, time=ns / 1e9 if isinstance(ns, (int, float)) else None)


def read_dcp_metadata(data: bytes) -> MarkerInfo:
    """The data files DCP's .metadata refers to, each at least as long as its last chunk ends."""
    try:
        metadata = SafeUnpickler(io.BytesIO(data)).load()
    except Exception as exc:  # any malformed pickle: a marker we cannot read
        raise MarkerError(f".metadata is not a readable DCP metadata pickle ({type(exc).__name__})") from None
    storage = _field(metadata, "storage_data")
    if not isinstance(storage, dict):
        raise MarkerError(".metadata has no storage_data (not DCP's FileSystemWriter layout)")
    ends: dict[str, int] = {}
    for info in storage.values():
        path, offset, length = (_field(info, k) for k in ("relative_path", "offset", "length"))
        if not isinstance(path, str) or not isinstance(offset, int) or not isinstance(length, int):
            raise MarkerError(".metadata has a malformed storage entry")
        ends[path] = max(ends.get(path, 0), offset + length)
    return MarkerInfo(tuple(ExpectedFile(p, min_size=end) for p, end in sorted(ends.items())))


def _field(obj: Any, name: str) -> Any:
    return getattr(obj, "__dict__", {}).get(name) if not isinstance(obj, dict) else obj.get(name)


class _Inert:
    """A stand-in for any class a pickle names: keeps constructor args and state, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.__dict__["_args"] = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots dict)
            for part in state:
                if isinstance(part, dict):
                    self.__dict__.update(part)
        elif isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state

    def __call__(self, *args: Any, **kwargs: Any) -> _Inert:  # a named function being applied
        return _Inert(*args)

    def __reduce__(self):  # never written back
        raise TypeError("inert stand-in")


class SafeUnpickler(pickle.Unpickler):
    """Unpickles into plain data and `_Inert` stand-ins: no global is ever imported."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in {("builtins", "set"), ("builtins", "frozenset"), ("builtins", "list"),
                              ("builtins", "dict"), ("builtins", "tuple"), ("collections", "OrderedDict")}:
            return {"set": set, "frozenset": frozenset, "list": list, "dict": dict, "tuple": tuple,
                    "OrderedDict": dict}[name]
        return type(name, (_Inert,), {"__module__": "inert." + module})

    def persistent_load(self, pid: Any) -> Any:
        return _Inert(pid)
