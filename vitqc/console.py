"""Where vitqc prints, all of it: results on stdout (``out``), progress bars, warnings and errors on stderr
(``err``), so stdout stays machine-readable. Under ``torchrun`` only rank 0 prints progress and results; every
rank prints its own errors."""
from __future__ import annotations

import contextlib
from typing import Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

from vitqc.distributed import is_main, rank_prefix

__all__ = ["out", "err", "warn", "error", "progress_bar", "Bar"]

out = Console(soft_wrap=True, quiet=not is_main())  # one line per item, whatever the terminal width
err = Console(stderr=True)


def warn(message: str) -> None:
    """One warning line on stderr (rank 0 only)."""
    if is_main():
        err.print(Text.assemble(("warning: ", "yellow"), message), soft_wrap=True, highlight=False)


def error(message: str) -> None:
    """One error line on stderr (``rank N:`` first under torchrun with more than one process)."""
    err.print(Text.assemble(("error: ", "bold red"), rank_prefix() + message), soft_wrap=True, highlight=False)


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
    """A rich progress bar on stderr (nothing when ``quiet`` or on a rank other than 0)."""
    if quiet or not is_main():
        yield Bar()
        return
    columns = [TextColumn("[bold blue]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TaskProgressColumn(), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*columns, console=err) as progress:
        task = progress.add_task(description, total=total, completed=completed, info="", rate="")
        yield Bar(progress, task, unit)
