"""Rich progress bars for every loop over data (to stderr, so stdout stays machine-readable)."""
from __future__ import annotations

import contextlib
from typing import Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from vitqc.distributed import is_main

console = Console(stderr=True)


class Bar:
    """Handle to one bar: ``advance(n)`` and ``update(loss=...)`` for live fields after the bar."""

    def __init__(self, progress: Progress | None = None, task: int | None = None, unit: str = "it") -> None:
        self._progress, self._task, self._unit = progress, task, unit

    def advance(self, n: float = 1) -> None:
        if self._progress is None:
            return
        self._progress.advance(self._task, n)
        speed = self._progress.tasks[self._task].speed
        if speed:  # None until rich has two samples
            self._progress.update(self._task, rate=f"{speed:,.1f} {self._unit}/s")

    def update(self, **fields: object) -> None:
        if self._progress is None:
            return
        text = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
        self._progress.update(self._task, info=text)


@contextlib.contextmanager
def progress_bar(description: str, total: float | None, unit: str = "it", quiet: bool = False,
                 completed: float = 0) -> Iterator[Bar]:
    if quiet or not is_main():  # under torchrun one console: rank 0's
        yield Bar()
        return
    columns = [TextColumn("[bold blue]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TaskProgressColumn(), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(description, total=total, completed=completed, info="", rate="")
        yield Bar(progress, task, unit)
