"""Checkpoint formats: how one rank's snapshot becomes files in a step directory.

- `TorchFormat` ("torch"): `torch.save` of the whole state tree, one file per
  rank (`state.pt` alone, `rank_00001.pt` with several ranks), written with
  temp + fsync + rename and digested while it is written.
- `DcpFormat` ("dcp"): `torch.distributed.checkpoint.save` into the step
  directory. DCP fsyncs its data files and writes `.metadata` as
  `.metadata.tmp` + fsync + rename, which the gateway holds until the rename;
  each rank then digests the files it wrote.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import warnings
from typing import Any

import torch
import torch.distributed as dist

from .files import FileRecord, digest_file, fsync_dir, write_atomic


@dataclasses.dataclass(frozen=True)
class RankContext:
    """Who is writing: this rank, the world size and the process group to use."""

    rank: int = 0
    world_size: int = 1
    group: Any = None  # a torch.distributed ProcessGroup for DCP's collectives, or None


class Format:
    """Writes one rank's snapshot into a step directory and reads it back."""

    name = ""

    def write(self, step_dir: str, state: Any, ctx: RankContext) -> list[FileRecord]:
        """Write this rank's part; return the records of the files it wrote, all fsync'ed."""
        raise NotImplementedError

    def read(self, step_dir: str, commit: dict, ctx: RankContext, *, template: Any = None,
             map_location: Any = "cpu", weights_only: bool = True) -> Any:
        """Load this rank's state from a committed step directory."""
        raise NotImplementedError


class TorchFormat(Format):
    name = "torch"

    @staticmethod
    def file_name(rank: int, world_size: int) -> str:
        return "state.pt" if world_size == 1 else f"rank_{rank:05d}.pt"

    def write(self, step_dir, state, ctx):
        path = os.path.join(step_dir, self.file_name(ctx.rank, ctx.world_size))
        return [write_atomic(path, lambda f: torch.save(state, f), rank=ctx.rank)]  # type: ignore[arg-type]  # torch.save needs only write()

    def read(self, step_dir, commit, ctx, *, template=None, map_location="cpu", weights_only=True):
        saved_world = int(commit.get("world_size", 1))
        if saved_world != ctx.world_size:
            raise ValueError(f"{step_dir} was saved by {saved_world} ranks, this job has "
                             f"{ctx.world_size}; the torch format cannot reshard (use format='dcp')")
        path = os.path.join(step_dir, self.file_name(ctx.rank, ctx.world_size))
        return torch.load(path, map_location=map_location, weights_only=weights_only)


class DcpFormat(Format):
    name = "dcp"

    def __init__(self):
        # In one process DCP warns on every call that it assumes one process, which is
        # what we asked for (no_dist=True); keep that one message out of the user's log.
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable "
                                "or uninitialized, assuming the intent", category=UserWarning)

    def write(self, step_dir, state, ctx):
        import torch.distributed.checkpoint as dcp

        dcp.save(state, checkpoint_id=step_dir, process_group=ctx.group,
                 no_dist=not dist.is_initialized())
        fsync_dir(step_dir)  # DCP renames .metadata.tmp without syncing the directory
        return [self._record(step_dir, name, ctx.rank) for name in self._own_files(step_dir, ctx.rank)]

    @staticmethod
    def _own_files(step_dir: str, rank: int) -> list[str]:
        """The files DCP's FileSystemWriter wrote for `rank` (rank 0 also owns `.metadata`)."""
        names = sorted(fnmatch.filter(os.listdir(step_dir), f"__{rank}_*.distcp"))
        if rank == 0:
            names.append(".metadata")
        return names

    @staticmethod
    def _record(step_dir: str, name: str, rank: int) -> FileRecord:
        size, digest = digest_file(os.path.join(step_dir, name))
        return FileRecord(name, size, digest, rank)

    def read(self, step_dir, commit, ctx, *, template=None, map_location="cpu", weights_only=True):
        import torch.distributed.checkpoint as dcp

        if template is not None:
            dcp.load(template, checkpoint_id=step_dir, process_group=ctx.group,
                     no_dist=not dist.is_initialized())
            return template
        # No template: every rank loads the whole checkpoint by itself, without collectives
        # (what DCP's own dcp_to_torch_save does).
        from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

        state: dict = {}
        _load_state_dict(state, storage_reader=dcp.FileSystemReader(step_dir),
                         planner=_EmptyStateDictLoadPlanner(), no_dist=True)
        return state


FORMATS: dict[str, type[Format]] = {"torch": TorchFormat, "dcp": DcpFormat}


def get_format(fmt: str | Format) -> Format:
    """A Format instance from its name or itself."""
    if isinstance(fmt, Format):
        return fmt
    try:
        return FORMATS[fmt]()
    except KeyError:
        raise ValueError(f"unknown checkpoint format {fmt!r}; choose from {sorted(FORMATS)}") from None
