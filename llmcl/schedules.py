"""Learning-rate schedules: pure functions of the optimizer step within a stage.

Every stage re-warms and re-decays (the schedule restarts at step 0 of each stage).
"""

from __future__ import annotations

import math


def warmup_steps(warmup: int | float, total: int) -> int:
    """An integer is a number of steps; a float is a fraction of the stage's steps."""
    steps = warmup if isinstance(warmup, int) else round(warmup * total)
    return max(0, min(int(steps), total))


def lr_at(step: int, total: int, *, max_lr: float, min_lr: float, warmup: int, schedule: str = "cosine") -> float:
    """Learning rate for optimizer step `step` (0-based) of a stage of `total` steps."""
    # 1) linear warmup: step 0 already gets a non-zero lr, step warmup-1 reaches max_lr
    if step < warmup:
        return max_lr * (step + 1) / warmup
    if schedule == "constant":
        return max_lr
    # 2) decay from max_lr at the first step after warmup to min_lr at the last step of the stage
    span = total - 1 - warmup
    progress = 0.0 if span <= 0 else min(1.0, (step - warmup) / span)
    if schedule == "linear":
        return max_lr + (min_lr - max_lr) * progress
    if schedule == "cosine":
        return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}")
