"""The progress display: a live rich bar on a terminal (stage i/N, step, loss, lr, tokens/s, ETA);
one line per stage otherwise (SLURM logs, pipes); nothing on ranks other than 0."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Display:
    def __init__(self, console: Console | None = None, enabled: bool = True):
        self.console = console or Console(soft_wrap=True)
        self.enabled = enabled
        self.live = enabled and self.console.is_terminal
        self._progress: Progress | None = None
        self._task: Any = None

    def message(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False)

    def start_stage(self, index: int, total_stages: int, name: str, steps: int, start_step: int, note: str) -> None:
        label = f"stage {index + 1}/{total_stages} [bold]{name}[/bold]"
        self.message(f"{label}: {note}")
        if not self.live:
            return
        self._progress = Progress(
            TextColumn(label), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:,.0f} tok/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task(name, total=steps, completed=start_step, loss=float("nan"), lr=0.0, tps=0.0)

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step, loss=loss, lr=lr, tps=tokens_per_s)

    def end_stage(self, summary: str) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        self.message(summary)
