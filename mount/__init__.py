"""ckptfs on the training node: continuous checkpointing into a ckptfs mount.

    from mount import ContinuousCheckpointer, Continuous, LatestN, EveryNSeconds
    ckpt = ContinuousCheckpointer("/mnt/ckpt/run1", save=Continuous(),
                                  keep=LatestN(3) | EveryNSeconds(3600))
    for step in loop:
        ckpt.maybe_save(step, state, metrics={"loss": loss})
    step, state = ckpt.restore()

The Orbax shim lives in `mount.orbax_shim` (imported on demand: it needs jax).
"""

from .checkpointer import (CheckpointError, ContinuousCheckpointer, NoCheckpointError,
                           Statistics, read_commit)
from .durability import gateway_status, is_durable
from .policies import (AnyOf, BestN, CheckpointInfo, Continuous, EveryNSeconds, EveryNSteps,
                       FixedInterval, KeepAll, KeepPolicy, LatestN, SavePolicy)

__all__ = [
    "AnyOf", "BestN", "CheckpointError", "CheckpointInfo", "Continuous", "ContinuousCheckpointer",
    "EveryNSeconds", "EveryNSteps", "FixedInterval", "KeepAll", "KeepPolicy", "LatestN",
    "NoCheckpointError", "SavePolicy", "Statistics", "gateway_status", "is_durable", "read_commit",
]
