"""Launch lines: `llmcl train` re-launching itself through `accelerate launch` when the recipe names an
accelerate config, and the per-node launch line of the SLURM scripts.

Precedence: a launcher that already started llmcl (accelerate launch, torchrun, srun + accelerate) wins; the
recipe's `distributed.accelerate_config` is then ignored with a note. A plain `llmcl train` with that key set
becomes `accelerate launch --config_file <it> [--num_processes N] -m llmcl train ...`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

LAUNCHED_ENV = "LLMCL_LAUNCHED"


def launched() -> bool:
    """True when a launcher started this process (or llmcl re-launched itself)."""
    return any(k in os.environ for k in (LAUNCHED_ENV, "LOCAL_RANK", "ACCELERATE_MIXED_PRECISION"))


def accelerate_command(config: str, train_args: list[str], num_processes: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config]
    if num_processes:
        cmd += ["--num_processes", str(num_processes)]
    return cmd + ["-m", "llmcl", "train", *train_args]


def relaunch(recipe: Any, train_args: list[str], run_dir: Path) -> int:
    """Run `llmcl train train_args` under accelerate launch with the recipe's config; returns its exit status, or
    RESUMABLE_EXIT when the ranks stopped on a signal (they left run_dir/stopped.json: the launcher itself ends
    with its own status, 1 when a worker exited 75, 143 after a SIGTERM).

    The launch runs in a session of its own, so a terminal's Ctrl-C reaches it once, from here, and not twice
    (directly and forwarded). Signals are forwarded as the launcher (torch elastic) handles them: SIGINT as
    SIGINT (the ranks stop with a step checkpoint; a second one stops them at once), SIGTERM, SIGUSR1 and SIGHUP
    as SIGTERM (torch elastic does not handle SIGUSR1: it would die and leave its ranks training, orphaned)."""
    from llmcl.rundir import STOPPED
    from llmcl.train.signals import RESUMABLE_EXIT, SIGNALS, early_signal

    config = str(Path(recipe.distributed.accelerate_config).expanduser())
    cmd = accelerate_command(config, train_args, recipe.distributed.num_processes)
    env = dict(os.environ, **{LAUNCHED_ENV: "1"})
    marker = Path(run_dir) / STOPPED
    before = marker.stat().st_mtime_ns if marker.exists() else None
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)

    def forward(signum: int, frame: Any) -> None:
        proc.send_signal(signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)

    for sig in (*SIGNALS, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    if early_signal() is not None:
        forward(signal.Signals[early_signal()], None)
    status = proc.wait()
    stopped = marker.exists() and marker.stat().st_mtime_ns != before
    return RESUMABLE_EXIT if status != 0 and stopped else status
