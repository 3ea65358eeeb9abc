"""What the drain knows about checkpoints: commit markers, pointer files and temporary names.

A *commit scope* is a set of files that becomes valid all at once (docs/SEMANTICS.md, "Commit scopes"):
- a directory whose commit marker appears (`.metadata`, `commit_success.txt`, `COMMIT`, ...);
- a directory renamed into place (Orbax's `*.orbax-checkpoint-tmp*` renamed to `<step>`);
- a single file renamed into place (`torch.save` to `x.tmp`, then rename).
A *pointer* file (`latest`, `latest_checkpointed_iteration.txt`) names the newest checkpoint and is
published after the scopes it follows. Patterns are fnmatch patterns matched against one path
component (the file's name, or any directory component for temporary names).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re

DEFAULT_MARKER_PATTERNS = (
    ".metadata",           # PyTorch DCP
    "commit_success.txt",  # Orbax on object stores
    "COMMIT",              # the ckptfs checkpointer (mount/checkpointer.py)
)
DEFAULT_POINTER_PATTERNS = (
    "latest",
    "latest_checkpointed_iteration.txt",  # Megatron-LM
    "latest_checkpoint*",
    "LATEST",
)
DEFAULT_HOLD_PATTERNS = (
    "*.tmp",
    "*.tmp.*",
    "*.orbax-checkpoint-tmp*",
    "*.__lock",
    "*.partial",
)


def _any_of(patterns: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns) or "(?!)")


@dataclasses.dataclass(frozen=True)
class ScopeRules:
    """The name patterns of markers, pointers and temporary (held) names."""

    markers: tuple[str, ...] = DEFAULT_MARKER_PATTERNS
    pointers: tuple[str, ...] = DEFAULT_POINTER_PATTERNS
    holds: tuple[str, ...] = DEFAULT_HOLD_PATTERNS

    def __post_init__(self) -> None:
        object.__setattr__(self, "_marker_re", _any_of(self.markers))
        object.__setattr__(self, "_pointer_re", _any_of(self.pointers))
        object.__setattr__(self, "_hold_re", _any_of(self.holds))

    def is_marker(self, path: str) -> bool:
        """Whether the last component of `path` is a commit marker's name."""
        return self._marker_re.match(path.rsplit("/", 1)[-1]) is not None  # type: ignore[attr-defined]

    def is_pointer(self, path: str) -> bool:
        return self._pointer_re.match(path.rsplit("/", 1)[-1]) is not None  # type: ignore[attr-defined]

    def is_held(self, path: str) -> bool:
        """Whether any component of `path` is a temporary name."""
        hold_re = self._hold_re  # type: ignore[attr-defined]
        return any(hold_re.match(part) for part in path.split("/"))
