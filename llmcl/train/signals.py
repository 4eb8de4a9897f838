"""Stop cleanly on SIGTERM or SIGUSR1: SLURM's preemption and its warning before the time limit.

The handler only records the signal. The training loop looks at it between optimizer steps (every rank the
same step: the flag is all-reduced), saves a step checkpoint and raises `Stopped`; the CLI then exits with
RESUMABLE_EXIT so a batch script can tell "stopped, resumable" from success (0) and errors (2, 1); every rank
that stopped also writes run_dir/stopped.json, because a launcher between the batch script and llmcl may not pass
75 on (`llmcl train` re-launching itself turns the launcher's status back into 75 when it finds the marker).
A signal that arrives during a save lets the save finish: no checkpoint is ever half written by us.

Evaluation is the exception: a row can take minutes, longer than SLURM's grace between SIGTERM and SIGKILL, and
it writes nothing a rerun needs (a finished stage's missing row is scored when the run restarts). So while the
loop is inside `StopSignals.at_once`, a signal stops the scoring where it is, on the rank that got it (SLURM
signals every task; under a launcher the other ranks end with it).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

RESUMABLE_EXIT = 75  # EX_TEMPFAIL: the work is not done, rerun the same command to continue
INTERRUPTED_EXIT = 130  # 128 + SIGINT: a Ctrl-C that stopped the command where it was
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Stopped(Exception):
    """Training stopped on a signal after saving what a rerun needs to resume (a step checkpoint, or the
    stage boundary: `step_checkpoint` says which)."""

    def __init__(self, message: str, *, step_checkpoint: bool = True):
        super().__init__(message)
        self.step_checkpoint = step_checkpoint


_early: str | None = None  # a signal that arrived before training started (see defer_from_start)


def _record_early(signum: int, frame: Any) -> None:
    global _early
    _early = signal.Signals(signum).name


def defer_from_start() -> None:
    """Called first thing by `llmcl train`: a SIGTERM/SIGUSR1 that arrives while Python imports torch or the
    recipe is checked is recorded, not fatal; the training loop then stops at once, leaving stopped.json."""
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, _record_early)


def stop_deferring() -> None:
    """After `llmcl train` is done with the run: SIGTERM/SIGUSR1 end the process again."""
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            if signal.getsignal(sig) is _record_early:
                signal.signal(sig, signal.SIG_DFL)


def early_signal() -> str | None:
    """The signal `defer_from_start` recorded, if any."""
    return _early


class _Interrupt(BaseException):
    """Raised by the handler inside `StopSignals.at_once`; a BaseException, so that no `except Exception` of the
    code being interrupted (lm-eval's, ours) takes it for an error of its own."""


class StopSignals:
    """Context manager: while inside, SIGTERM/SIGUSR1 set `requested` (the signal's name) instead of killing.

    Ctrl-C (SIGINT) does the same while training: the run stops at the next step with a step checkpoint, as
    after SIGTERM. A second Ctrl-C raises KeyboardInterrupt where the code is, for a user who will not wait
    (what is being written is written atomically; the CLI exits INTERRUPTED_EXIT)."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}
        self._at_once = False

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.requested == "SIGINT":
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        if self._at_once:
            self._at_once = False  # one interrupt: a second signal while it unwinds only records itself
            raise _Interrupt

    @contextmanager
    def at_once(self, message: Callable[[str], str]) -> Iterator[None]:
        """While inside, a signal stops the work now: `Stopped(message(signal name))` is raised where the code is
        (from the signal handler, at the next Python bytecode), not at the next stop point. For work that
        writes nothing a rerun needs, or writes it atomically."""
        self._at_once = True
        try:
            yield
        except _Interrupt:
            raise Stopped(message(self.requested or "a signal"), step_checkpoint=False) from None
        finally:
            self._at_once = False

    def __enter__(self) -> StopSignals:
        self.requested = _early
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in (*SIGNALS, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def agreed(self, accelerator: Any) -> str | None:
        """The signal name if any rank got one (all ranks call this at the same point), else None."""
        import torch

        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=accelerator.device)
        if float(accelerator.reduce(flag, "max")) > 0:
            return self.requested or "a signal on another rank"
        return None
