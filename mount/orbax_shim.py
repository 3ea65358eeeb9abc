"""JAX/Orbax on ckptfs: a regular `orbax.checkpoint.CheckpointManager`, continuous and durability-safe.

    from mount.orbax_shim import continuous_checkpoint_manager
    mngr = continuous_checkpoint_manager("/mnt/ckpt/run1", max_to_keep=3)
    for step in loop:
        mngr.save(step, args=ocp.args.StandardSave(state))   # saves only when the last one is written

Users keep Orbax's API. The shim sets `ContinuousCheckpointingPolicy` as the
save decision policy and wraps the preservation policy (the user's, or
`LatestN(max_to_keep)`) in `PreserveNewestDurable`, which decides with the
same rule as the torch checkpointer (`mount.policies.plan_retention`): never the
newest step that is durable in the bucket, nor any newer step; a step older than
that which the user's policy drops goes, durable or not (a superseded step is
deleted before the drain uploads it).

The manager is a `ContinuousCheckpointManager` (an `ocp.CheckpointManager`):
besides Orbax's own pass at each save it runs retention when the newest durable
step advances (checked from `save`, at most every `durability_poll_s`, while no
save is in flight; single-process only) and at `close()`, and it deletes a
step's `commit_success.txt` before the rest, so the bucket loses the marker first.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from . import durability
from .policies import CheckpointInfo, RetentionPlan, plan_retention

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
    durable_seen: set[int] = dataclasses.field(default_factory=set, repr=False)

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> Sequence[bool]:
        doomed = set(self.plan(checkpoints, context=context).delete)
        return [c.step not in doomed for c in checkpoints]

    def plan(self, checkpoints: Sequence[Any], *, context: Any = None) -> RetentionPlan:
        """The retention decision over Orbax's checkpoints (`policies.plan_retention`)."""
        inner = self.inner.should_preserve(checkpoints, context=context)
        kept = {c.step for c, keep in zip(checkpoints, inner, strict=True) if keep}
        self.durable_seen &= {c.step for c in checkpoints}
        infos = sorted((CheckpointInfo(c.step, 0.0) for c in checkpoints), key=lambda i: i.step)
        return plan_retention(infos, lambda _: kept, self.is_durable)

    def is_durable(self, step: int) -> bool:
        """True when the step is finalized by Orbax and durable in the bucket (durable stays durable)."""
        if step in self.durable_seen:
            return True
        path = os.path.join(self.directory, self.step_name(step))
        durable = os.path.exists(os.path.join(path, _COMMIT_SUCCESS)) and self.probe(path)
        if durable:
            self.durable_seen.add(step)
        return durable


class MarkerFirstDeleter:
    """Wraps Orbax's step deleter: `commit_success.txt` is unlinked (and the directory fsynced) first.

    The gateway deletes bucket objects in the order of the unlinks, so no reader of the bucket
    sees a marker whose data is gone.
    """

    def __init__(self, inner: Any, directory: str, step_name: Callable[[int], str]):
        self.inner, self.directory, self.step_name = inner, directory, step_name

    def _unlink_marker(self, step: int) -> None:
        step_dir = os.path.join(self.directory, self.step_name(step))
        try:
            os.unlink(os.path.join(step_dir, _COMMIT_SUCCESS))
        except FileNotFoundError:
            return
        fd = os.open(step_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def delete(self, step: int) -> None:
        self._unlink_marker(step)
        self.inner.delete(step)

    def delete_steps(self, steps: Sequence[int]) -> None:
        for step in steps:
            self._unlink_marker(step)
        self.inner.delete_steps(steps)

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class ContinuousCheckpointManager(ocp.CheckpointManager):
    """An `ocp.CheckpointManager` whose retention also follows durability and runs at close.

    Relies on Orbax 0.12.8 internals in two places: `_checkpoint_deleter` (wrapped in
    `MarkerFirstDeleter`) and `_checkpoints` (the steps Orbax tracks).
    """

    def __init__(self, directory: str, *, options: ocp.CheckpointManagerOptions,
                 durability_poll_s: float = 0.5, **kwargs: Any):
        super().__init__(directory, options=options, **kwargs)
        self._preserve: PreserveNewestDurable = options.preservation_policy
        self._checkpoint_deleter: MarkerFirstDeleter = MarkerFirstDeleter(
            self._checkpoint_deleter, self._preserve.directory, self._preserve.step_name)
        self._poll_s = durability_poll_s
        self._next_poll = 0.0
        self._newest_durable: int | None = None

    def save(self, step: int, *args: Any, **kwargs: Any) -> bool:
        self._retain_if_durability_advanced()
        return super().save(step, *args, **kwargs)

    def retain(self) -> RetentionPlan:
        """Delete now what the preservation policy drops (call with no save in flight)."""
        plan = self._preserve.plan(list(self._checkpoints))
        for step in plan.delete:
            log.info("retention: deleting step %d%s", step,
                     " (superseded before it was durable)" if step in plan.superseded else "")
            self.delete(step)
        self._newest_durable = plan.newest_durable
        return plan

    def _retain_if_durability_advanced(self) -> None:
        now = time.monotonic()
        if now < self._next_poll or jax.process_count() > 1:
            return  # several processes would need to agree on durability first
        self._next_poll = now + self._poll_s
        if self.is_saving_in_progress():
            return  # Orbax's finalize deletes in the background: never both at once
        for step in sorted((c.step for c in self._checkpoints), reverse=True):
            if self._newest_durable is not None and step <= self._newest_durable:
                return
            if self._preserve.is_durable(step):
                self.retain()
                return

    def close(self, durable_timeout: float = 0.0) -> None:
        """Wait for the save in flight, run a last retention pass, close.

        With `durable_timeout` > 0, first wait up to that long for the newest step to become
        durable, so that the bucket ends with what the preservation policy keeps.
        """
        self.wait_until_finished()
        if jax.process_count() == 1:
            deadline = time.monotonic() + durable_timeout
            latest = self.latest_step()
            while (latest is not None and not self._preserve.is_durable(latest)
                   and time.monotonic() < deadline):
                time.sleep(min(self._poll_s, max(0.0, deadline - time.monotonic())))
                self._retain_if_durability_advanced()
            try:
                self.retain()
            except Exception as exc:  # loses nothing: a later pass deletes it
                log.error("retention at close failed: %r", exc)
        super().close()


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
    durability_poll_s: float = 0.5,
    **manager_kwargs: Any,
) -> ContinuousCheckpointManager:
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
    return ContinuousCheckpointManager(directory, options=options, durability_poll_s=durability_poll_s,
                                       **manager_kwargs)


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
