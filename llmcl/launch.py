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


def relaunch(recipe: Any, train_args: list[str]) -> int:
    """Run `llmcl train train_args` under accelerate launch with the recipe's config; returns its exit status."""
    from pathlib import Path

    config = str(Path(recipe.distributed.accelerate_config).expanduser())
    cmd = accelerate_command(config, train_args, recipe.distributed.num_processes)
    env = dict(os.environ, **{LAUNCHED_ENV: "1"})
    from llmcl.train.signals import SIGNALS, early_signal

    proc = subprocess.Popen(cmd, env=env)
    for sig in SIGNALS:  # SIGTERM/SIGUSR1 reach the launch (and through it every rank), which saves and stops
        signal.signal(sig, lambda signum, frame: proc.send_signal(signum))
    if early_signal() is not None:
        proc.send_signal(signal.Signals[early_signal()])
    return proc.wait()
