"""When to save (save policies) and what to keep (retention policies).

Save policies answer one question per training step: start a save now? They see
whether the previous save is still being written and when the last one started.

Retention policies see the committed checkpoints, oldest first, and name the
steps they keep. `a | b` keeps what either keeps; any callable taking the list
of `CheckpointInfo` and returning the steps to keep is a policy too. The
checkpointer adds the safety rule on top (`protected_steps`): the newest durable
checkpoint and everything newer are never deleted, whatever the policies say.
`plan_retention` is the whole decision of one pass, a pure function of the
checkpoints, the policy and the durable flags: what the policy drops below the
newest durable checkpoint is deleted, durable or not, so that a superseded
checkpoint is deleted locally before the drain uploads it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint as the retention policies see it."""

    step: int
    time: float  # seconds since the epoch, when the save started
    metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------- save policies


class SavePolicy:
    """Decides whether `maybe_save` starts a save at this step."""

    def should_save(self, step: int, now: float, last_step: int | None,
                    last_time: float | None, busy: bool) -> bool:
        """True to start a save now; `busy` means a save is still being written."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Continuous(SavePolicy):
    """Save as soon as the previous save is locally committed.

    `min_interval_s` puts a floor on the time between the starts of two saves.
    `max_not_durable` bounds how far the bucket may fall behind: a save starts only while at most
    that many committed checkpoints are not yet durable. None (the default) saves as often as the
    local disk allows; when the endpoint is slower than the local disk the drain then uploads every
    checkpoint in order and the newest durable one ages (docs/PERFORMANCE.md, "Checkpoint
    interval"). 1 keeps one checkpoint uploading while the next is written: the bucket stays as
    fresh as an upload-acknowledged save would keep it. On a plain directory every committed
    checkpoint counts as durable, so the bound never applies.
    """

    min_interval_s: float = 0.0
    max_not_durable: int | None = None

    def should_save(self, step, now, last_step, last_time, busy):
        if busy:
            return False
        return last_time is None or now - last_time >= self.min_interval_s


@dataclasses.dataclass(frozen=True)
class FixedInterval(SavePolicy):
    """Save every `steps` steps and/or every `seconds` seconds (either one due is enough).

    A save that falls due while the previous one is still being written is not
    dropped and does not stall the loop: it starts at the first step after the
    previous save is committed.
    """

    steps: int | None = None
    seconds: float | None = None

    def __post_init__(self):
        if self.steps is None and self.seconds is None:
            raise ValueError("FixedInterval needs steps= or seconds=")
        if self.steps is not None and self.steps <= 0:
            raise ValueError("FixedInterval(steps=) must be positive")

    def should_save(self, step, now, last_step, last_time, busy):
        if busy:
            return False
        if last_step is None:
            return True
        if self.steps is not None and step // self.steps > last_step // self.steps:
            return True
        return self.seconds is not None and now - last_time >= self.seconds


# ----------------------------------------------------------- retention policies


class KeepPolicy:
    """Names the committed checkpoints to keep; combine with `|`."""

    def keep(self, infos: Sequence[CheckpointInfo]) -> set[int]:
        """The steps to keep among `infos` (sorted oldest first)."""
        raise NotImplementedError

    def __call__(self, infos: Sequence[CheckpointInfo]) -> set[int]:
        return self.keep(infos)

    def pins(self, infos: Sequence[CheckpointInfo]) -> set[int]:
        """The kept steps that stay kept however many newer checkpoints come (one an hour, the
        best N): the gateway uploads these even while newer ones keep coming (user.ckptfs.keep).
        What only `LatestN` keeps is dropped soon anyway, so it waits until nothing newer is pending."""
        return self.keep(infos)

    def __or__(self, other) -> AnyOf:
        return AnyOf(self, other)

    def __ror__(self, other) -> AnyOf:
        return AnyOf(other, self)


KeepFn = Callable[[Sequence[CheckpointInfo]], Iterable[int]]


class AnyOf(KeepPolicy):
    """Keeps a checkpoint if any of its policies keeps it."""

    def __init__(self, *policies: KeepPolicy | KeepFn):
        flat: list = []
        for p in policies:
            if not callable(p):
                raise TypeError(f"a retention policy must be callable, got {p!r}")
            flat.extend(p.policies if isinstance(p, AnyOf) else [p])
        self.policies: tuple[KeepPolicy | KeepFn, ...] = tuple(flat)

    def keep(self, infos):
        kept: set[int] = set()
        for p in self.policies:
            kept |= set(p(infos))
        return kept

    def pins(self, infos):
        return set().union(*(pins_of(p, infos) for p in self.policies))

    def __repr__(self):
        return " | ".join(map(repr, self.policies))


@dataclasses.dataclass(frozen=True)
class KeepAll(KeepPolicy):
    """Keeps everything (the default)."""

    def keep(self, infos):
        return {i.step for i in infos}


@dataclasses.dataclass(frozen=True)
class LatestN(KeepPolicy):
    """Keeps the newest `n` checkpoints."""

    n: int

    def keep(self, infos):
        return {i.step for i in infos[max(0, len(infos) - self.n):]} if self.n > 0 else set()

    def pins(self, infos):
        return set()


def _first_per_window(infos: Sequence[CheckpointInfo], key: Callable[[CheckpointInfo], float],
                      width: float) -> set[int]:
    """The oldest checkpoint in each window [k*width, (k+1)*width) of `key`.

    Stable across passes: the oldest of a window stays the oldest, so what one
    pass keeps the next pass keeps too.
    """
    kept: dict[int, int] = {}
    for info in infos:
        kept.setdefault(math.floor(key(info) / width), info.step)
    return set(kept.values())


@dataclasses.dataclass(frozen=True)
class EveryNSeconds(KeepPolicy):
    """Keeps one checkpoint per `seconds` of wall time (the first of each window)."""

    seconds: float

    def keep(self, infos):
        return _first_per_window(infos, lambda i: i.time, self.seconds)


@dataclasses.dataclass(frozen=True)
class EveryNSteps(KeepPolicy):
    """Keeps one checkpoint per `n` steps (the first at or after each multiple of n)."""

    n: int

    def keep(self, infos):
        return _first_per_window(infos, lambda i: i.step, self.n)


@dataclasses.dataclass(frozen=True)
class BestN(KeepPolicy):
    """Keeps the `n` checkpoints with the best `metric` (mode "min" or "max").

    Checkpoints saved without that metric are not kept by this policy.
    """

    metric: str
    n: int
    mode: str = "min"

    def __post_init__(self):
        if self.mode not in ("min", "max"):
            raise ValueError(f"BestN mode must be 'min' or 'max', not {self.mode!r}")

    def keep(self, infos):
        scored = [i for i in infos if self.metric in i.metrics
                  and not math.isnan(float(i.metrics[self.metric]))]
        scored.sort(key=lambda i: float(i.metrics[self.metric]), reverse=self.mode == "max")
        return {i.step for i in scored[: self.n]}


def newest_durable_step(infos: Sequence[CheckpointInfo], durable: Callable[[int], bool]) -> int | None:
    """The newest durable step of `infos`; `durable` is asked newest first, down to the first yes."""
    return next((i.step for i in reversed(infos) if durable(i.step)), None)


def protected_steps(infos: Sequence[CheckpointInfo], durable: Callable[[int], bool]) -> set[int]:
    """The steps retention must never delete: the newest durable one and all newer.

    With no durable checkpoint at all, everything is protected.
    """
    newest = newest_durable_step(infos, durable)
    return {i.step for i in infos if newest is None or i.step >= newest}


@dataclasses.dataclass(frozen=True)
class RetentionPlan:
    """What one retention pass does (`plan_retention`); every tuple is oldest first.

    `delete` are the committed checkpoints to delete: durable ones leave the bucket,
    `superseded` ones (not yet durable) are deleted before they ever reach it (the gateway
    cancels their uploads). `incomplete` are step directories without a commit marker that
    are older than the newest durable checkpoint. `owed` are the kept checkpoints not yet
    durable: the drain still uploads them, also those older than a durable one.
    """

    newest_durable: int | None
    delete: tuple[int, ...] = ()
    superseded: tuple[int, ...] = ()
    incomplete: tuple[int, ...] = ()
    owed: tuple[int, ...] = ()


def pins_of(keep: KeepPolicy | KeepFn, infos: Sequence[CheckpointInfo]) -> set[int]:
    """`keep.pins(infos)`; a plain callable pins what it keeps."""
    return keep.pins(infos) if isinstance(keep, KeepPolicy) else set(keep(infos))


def plan_retention(infos: Sequence[CheckpointInfo], keep: KeepPolicy | KeepFn,
                   durable: Callable[[int], bool], incomplete: Iterable[int] = ()) -> RetentionPlan:
    """Decide one retention pass over the committed checkpoints `infos` (oldest first).

    The rule: delete what `keep` drops, except the newest durable checkpoint and anything
    newer (`protected_steps`). A checkpoint older than the newest durable one that `keep`
    drops goes whether or not it is durable yet, so a superseded checkpoint is never
    uploaded; one that `keep` keeps stays and is uploaded. `durable(step)` answers for a
    committed step; it is asked newest first down to the first durable step, then for the
    steps to delete. `incomplete` are the steps of directories without a commit marker.
    """
    newest = newest_durable_step(infos, durable)
    kept = set(keep(infos)) | {i.step for i in infos if newest is None or i.step >= newest}
    delete = tuple(i.step for i in infos if i.step not in kept)
    superseded = tuple(s for s in delete if not durable(s))
    owed = tuple(i.step for i in infos if i.step in kept and not durable(i.step))
    stale = tuple(sorted(s for s in incomplete if newest is not None and s < newest))
    return RetentionPlan(newest, delete, superseded, stale, owed)


def steps_to_delete(infos: Sequence[CheckpointInfo], keep: KeepPolicy | KeepFn,
                    durable: Callable[[int], bool]) -> list[int]:
    """The steps of `infos` that neither `keep` nor the safety rule keeps, oldest first."""
    return list(plan_retention(infos, keep, durable).delete)
