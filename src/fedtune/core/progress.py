"""Rich progress bars for rounds and client steps (a no-op when disabled)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class RunProgress:
    """Two bars: rounds of the run, and steps of the client (or server) now training."""

    def __init__(self, enabled: bool, console: Console | None = None) -> None:
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self._progress: Progress | None = None
        self._rounds = None
        self._steps = None
        self._in_phase = False  # a phase's spinner is showing

    @contextmanager
    def run(self, total_rounds: int, done: int = 0) -> Iterator["RunProgress"]:
        if not self.enabled:
            yield self
            return
        with Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=self.console, transient=False,
        ) as progress:
            self._progress = progress
            self._rounds = progress.add_task("rounds", total=total_rounds, completed=done, info="")
            self._steps = progress.add_task("client steps (the first turn is starting)", total=1, info="")
            try:
                yield self
            finally:
                self._progress = None

    @contextmanager
    def phase(self, label: str) -> Iterator[None]:
        """A long step outside the training bars (loading, converting, generating, drawing): a spinner with
        ``label`` while it runs, then ``label`` with its duration."""
        if not self.enabled:
            yield
            return
        start = time.perf_counter()
        if self._progress or self._in_phase:  # one live display at a time: inside the bars or a phase, just say it
            self.log(f"{label} ...")
            yield
        else:
            self._in_phase = True
            try:
                with self.console.status(label):
                    yield
            finally:
                self._in_phase = False
        self.log(f"{label}: {time.perf_counter() - start:.1f} s")

    def round_done(self, info: str = "") -> None:
        if self._progress:
            self._progress.update(self._rounds, advance=1, info=info)

    def start_steps(self, label: str, total: int) -> None:
        if self._progress:
            self._progress.reset(self._steps, total=total, description=label, info="")

    def step(self, loss: float) -> None:
        if self._progress:
            self._progress.update(self._steps, advance=1, info=f"loss {loss:.3f}")

    def log(self, text: str) -> None:
        (self._progress.console if self._progress else self.console).print(text)
