"""Progress display of a batch run on stderr."""

from __future__ import annotations

from typing import Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class ProgressReporter(Protocol):
    """What the runner reports progress to."""

    def start(self, total: int | None) -> None: ...

    def advance(self, *, failed: bool = False, skipped: bool = False) -> None: ...

    def stop(self) -> None: ...


class NoProgress:
    """A reporter that shows nothing."""

    def start(self, total: int | None) -> None:
        pass

    def advance(self, *, failed: bool = False, skipped: bool = False) -> None:
        pass

    def stop(self) -> None:
        pass


class _RateColumn(ProgressColumn):
    """Records per second, from rich's moving estimate of the task speed."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text("- rec/s", style="progress.data.speed")
        return Text(f"{speed:.2f} rec/s", style="progress.data.speed")


class RichProgress:
    """A progress bar on stderr: done / total, rate, ETA, failures and skips.

    Without a total (input too large to count first) the bar has no end and no
    ETA. When stderr is not a terminal, rich draws the bar only once, at the end.
    """

    def __init__(self, console: Console | None = None):
        self._console = console or Console(stderr=True)
        self._progress = Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            _RateColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("failed {task.fields[failed]}, skipped {task.fields[skipped]}"),
            console=self._console,
            transient=False,
        )
        self._task_id = self._progress.add_task(
            "batch", total=None, failed=0, skipped=0, start=False
        )
        self._failed = 0
        self._skipped = 0

    def start(self, total: int | None) -> None:
        self._progress.update(self._task_id, total=total)
        self._progress.start_task(self._task_id)
        self._progress.start()

    def advance(self, *, failed: bool = False, skipped: bool = False) -> None:
        self._failed += failed
        self._skipped += skipped
        self._progress.update(
            self._task_id, advance=1, failed=self._failed, skipped=self._skipped
        )

    def stop(self) -> None:
        self._progress.stop()
