"""Live progress of a run: a Rich bar on a terminal, plain log lines elsewhere."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .metrics import Event


class RunProgress:
    """Counts peer-rounds as events arrive; a context manager around the run."""

    def __init__(self, total: int, *, quiet: bool = False, console: Console | None = None) -> None:
        self.total = total
        self.quiet = quiet
        self.console = console or Console(stderr=True)
        self.done = 0
        self.pulls = 0
        self.failures = 0
        self.val: dict[int, float] = {}
        self.t0 = time.perf_counter()
        self._last_log = 0.0
        self._progress: Progress | None = None
        self._task: Any = None

    def __enter__(self) -> "RunProgress":
        if not self.quiet and self.console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]peer-rounds"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=self.console,
            )
            self._progress.start()
            self._task = self._progress.add_task("run", total=self.total, info="")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()

    def info(self) -> str:
        el = max(time.perf_counter() - self.t0, 1e-9)
        val = sum(self.val.values()) / len(self.val) if self.val else float("nan")
        return f"val acc {val:.3f}  pulls/s {self.pulls / el:.1f}  failed pulls {self.failures}"

    def __call__(self, event: Event) -> None:
        self.done += 1
        self.pulls += len(event.ok)
        self.failures += len(event.failed)
        if event.val_acc is not None:
            self.val[event.peer] = event.val_acc
        if self._progress is not None:
            self._progress.update(self._task, completed=self.done, info=self.info())
        elif not self.quiet:
            now = time.perf_counter()
            if now - self._last_log >= 5.0 or self.done == self.total:
                self._last_log = now
                print(f"[zmqgossip] {self.done}/{self.total} peer-rounds  {self.info()}", file=sys.stderr, flush=True)
