"""A progress bar for the commands that wait on the drain (`ckptfs wait`, `ckptfs unmount`).

Drawn with rich on stderr when stderr is a terminal; silent otherwise and with --quiet, so scripts
and logs see exactly what they saw before. The figures come from the daemon's status object:
bytes and files left, its drain rate, and the time left at that rate.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from gateway.cmd_status import human_bytes

if TYPE_CHECKING:  # rich is imported only on a terminal
    from rich.progress import Progress


def eta(bytes_left: int, rate_bps: float) -> str:
    if bytes_left <= 0:
        return "0:00:00"
    if rate_bps <= 0:
        return "-:--:--"
    seconds = int(bytes_left / rate_bps + 0.5)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def summary(files_left: int, bytes_left: int, rate_bps: float, noun: str = "file") -> str:
    """'3 files, 1.2 GiB left, 180.0 MiB/s, ETA 0:00:07'."""
    return (f"{files_left} {noun}{'' if files_left == 1 else 's'}, {human_bytes(bytes_left)} left, "
            f"{human_bytes(rate_bps)}/s, ETA {eta(bytes_left, rate_bps)}")


class DrainProgress:
    """`with DrainProgress(label, quiet) as bar: bar.update(status)`; a no-op off a terminal."""

    def __init__(self, label: str, quiet: bool = False, stream: Any = None):
        self.stream = stream or sys.stderr
        self.enabled = not quiet and _is_terminal(self.stream)
        self.label = label
        self._progress: Progress | None = None
        self._task: Any = None  # rich's TaskID once started
        self._start_uploaded: int | None = None

    def __enter__(self) -> DrainProgress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            console = Console(file=self.stream)
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                      TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                                      console=console, transient=False, refresh_per_second=5)
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=1, detail="")
        return self

    def update(self, status: dict, files_left: int | None = None, noun: str = "file") -> None:
        """Show `status` (the daemon's status object); `files_left` overrides its pending files."""
        if self._progress is None:
            return
        uploaded = int(status.get("uploaded_bytes_total") or 0)
        if self._start_uploaded is None:
            self._start_uploaded = uploaded
        done = max(0, uploaded - self._start_uploaded)
        left = int(status.get("dirty_bytes") or 0)
        files = int(status.get("pending_files") or 0) if files_left is None else files_left
        detail = summary(files, left, float(status.get("drain_rate_bps") or 0), noun)
        self._progress.update(self._task, completed=done, total=max(done + left, 1) if (done or left) else 1,
                              detail=detail)

    def finish(self) -> None:
        if self._progress is not None:
            task = self._progress.tasks[0]
            self._progress.update(self._task, completed=task.total or 1, total=task.total or 1)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()


def _is_terminal(stream: Any) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
