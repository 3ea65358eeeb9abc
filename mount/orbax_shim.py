"""JAX/Orbax on ckptfs: a regular `orbax.checkpoint.CheckpointManager`, continuous and durability-safe.

    from mount.orbax_shim import continuous_checkpoint_manager
    mngr = continuous_checkpoint_manager("/mnt/ckpt/run1", max_to_keep=3)
    for step in loop:
        mngr.save(step, args=ocp.args.StandardSave(state))   # saves only when the last one is written

Users keep Orbax's API. The shim sets `ContinuousCheckpointingPolicy` as the
save decision policy and wraps the preservation policy (the user's, or
`LatestN(max_to_keep)`) in `PreserveNewestDurable`, which never lets Orbax
delete the newest step that is durable in the bucket, nor any newer step.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Sequence

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from . import durability

log = logging.getLogger(__name__)

# Both of Orbax's atomicity modes leave this file in a finalized step directory (0.12.8).
_COMMIT_SUCCESS = "commit_success.txt"


@dataclasses.dataclass
class PreserveNewestDurable:
    """An Orbax preservation policy: `inner`'s choice, plus the newest durable step and all newer.

    Durability of a step is asked of the gateway for its finalized directory
    (`directory/<step name>`); a step whose directory is missing or not yet
    finalized is not durable. With no durable step, every step is preserved.
    """

    inner: Any  # an orbax PreservationPolicy
    directory: str
    step_name: Callable[[int], str] = str
    probe: durability.DurabilityProbe = durability.is_durable

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> Sequence[bool]:
        result = list(self.inner.should_preserve(checkpoints, context=context))
        for i in range(len(checkpoints) - 1, -1, -1):
            result[i] = True
            if self.is_durable(checkpoints[i].step):
                break
        return result

    def is_durable(self, step: int) -> bool:
        """True when the step is finalized by Orbax and durable in the bucket."""
        path = os.path.join(self.directory, self.step_name(step))
        return os.path.exists(os.path.join(path, _COMMIT_SUCCESS)) and self.probe(path)


def continuous_checkpoint_manager(
    directory: str | os.PathLike,
    *,
    max_to_keep: int | None = None,
    keep_policy: Any = None,
    min_interval_s: float = 0,
    enable_continuous_checkpointing: bool = True,
    max_num_checkpoints_to_keep: int | None = None,
    checkpoint_period: int = 1,
    probe: durability.DurabilityProbe | None = None,
    options: ocp.CheckpointManagerOptions | None = None,
    **manager_kwargs: Any,
) -> ocp.CheckpointManager:
    """An `ocp.CheckpointManager` on `directory` that saves continuously and keeps the newest durable step.

    - `max_to_keep` / `max_num_checkpoints_to_keep` (MaxText's name; give one):
      Orbax's `LatestN`, unless `keep_policy` (any Orbax preservation policy) is given.
    - `enable_continuous_checkpointing` (MaxText): True uses
      `ContinuousCheckpointingPolicy(minimum_interval_secs=min_interval_s)`;
      False falls back to `FixedIntervalPolicy(checkpoint_period)`.
    - `options`: further `CheckpointManagerOptions` (their save decision and
      preservation policies are replaced); `manager_kwargs` go to the manager
      (`item_names`, `handler_registry`, ...).
    """
    directory = os.fspath(directory)
    keep = _keep_policy(max_to_keep, max_num_checkpoints_to_keep, keep_policy)
    if enable_continuous_checkpointing:
        decide = ocm.ContinuousCheckpointingPolicy(
            minimum_interval_secs=min_interval_s or None)
    else:
        decide = ocm.FixedIntervalPolicy(checkpoint_period)
    options = options or ocp.CheckpointManagerOptions()
    name_format = options.step_name_format or ocp.step.standard_name_format(
        step_prefix=options.step_prefix, step_format_fixed_length=options.step_format_fixed_length)
    preserve = PreserveNewestDurable(keep, directory, name_format.build_name,
                                     probe or durability.is_durable)
    options = dataclasses.replace(options, save_decision_policy=decide, preservation_policy=preserve)
    return ocp.CheckpointManager(directory, options=options, **manager_kwargs)


def _keep_policy(max_to_keep: int | None, max_num: int | None, keep_policy: Any) -> Any:
    if max_to_keep is not None and max_num is not None and max_to_keep != max_num:
        raise ValueError(f"max_to_keep={max_to_keep} and max_num_checkpoints_to_keep={max_num} "
                         "disagree; give one")
    n = max_to_keep if max_to_keep is not None else max_num
    if keep_policy is not None:
        if n is not None:
            raise ValueError("give keep_policy or max_to_keep, not both "
                             "(combine them with ocm.AnyPreservationPolicy)")
        return keep_policy
    return ocm.LatestN(n=n)  # n=None keeps everything
