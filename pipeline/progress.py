"""Progress bars: the run's one bar (rows written, counted from the Parquet files as they land), and
a bar over a long loop of the driver's own.

Ray Data 2.60 draws no overall bar with its tqdm display once its per-operator bars are off, and its
rich display cannot see the terminal while the run filters Ray's native lines out of standard error
(both checked in a pseudo-terminal). The written files are also what a resume counts on, so the bar
shows exactly the rows a rerun would not run again.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from rich import progress
from rich.console import Console

from pipeline.outputs import RunOutput

POLL_SECONDS = 0.5
Item = TypeVar("Item")


def tracked(items: Iterable[Item], total: int, label: str, show: bool) -> Iterable[Item]:
    """``items``, under a transient bar of how many of ``total`` are done when ``show`` and standard error is
    a terminal (off a terminal a bar would only add lines to a log)."""
    if not show or not sys.stderr.isatty():
        return items
    return progress.track(items, description=label, total=total, transient=True, console=Console(file=sys.stderr))


class WrittenRows:
    """While inside, a bar of the rows written to ``output`` since ``before``, out of ``total``.

    It looks on entry, before the run sends file descriptor 2 through a filter, whether that is a
    terminal; off a terminal it does nothing (a stopped ``rich`` bar would still write a blank line to
    a log).
    """

    def __init__(self, output: RunOutput, before: set[Path], total: int, label: str) -> None:
        self.output, self.before, self.total, self.label = output, before, total, label
        self.counted: dict[Path, int] = {}
        self.stopping = threading.Event()

    def __enter__(self) -> WrittenRows:
        self.bar = None
        if not sys.stderr.isatty():
            return self
        console = Console(file=sys.stderr, force_terminal=True)
        columns = (
            progress.TextColumn("{task.description}"),
            progress.BarColumn(),
            progress.MofNCompleteColumn(),
            progress.TextColumn("rows"),
            progress.TimeElapsedColumn(),
            progress.TimeRemainingColumn(),
        )
        self.bar = progress.Progress(*columns, console=console, transient=True)
        self.task = self.bar.add_task(self.label, total=self.total)
        self.bar.start()
        self.thread = threading.Thread(target=self._poll, name="written-rows", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None):
        if self.bar is None:
            return
        self.stopping.set()
        self.thread.join(timeout=5)
        self.bar.update(self.task, completed=self.written())  # the last file may land between two polls
        self.bar.stop()

    def written(self) -> int:
        """Rows in the complete files written since ``before`` (a file is renamed into place whole)."""
        for path in set(self.output.files()) - self.before - set(self.counted):
            try:
                self.counted[path] = RunOutput.rows_in(path)
            except (OSError, ValueError):  # removed or replaced since listed: counted next time
                continue
        return sum(self.counted.values())

    def _poll(self) -> None:
        while not self.stopping.wait(POLL_SECONDS):
            self.bar.update(self.task, completed=self.written())
