"""Learning-rate schedules: pure functions of the optimizer step within a stage.

Every schedule is a `Schedule` (what the stage's settings resolve to) and `lr_at(step, schedule)`.
Phases are written so that consecutive phases meet: the last step of one phase and the first step of the
next never jump by more than one step's worth of the slope.

  cosine / linear      1) linear warmup from start_lr (0, or the previous stage's final lr: re-warming)
                          to max_lr   2) cosine/linear re-decay to min_lr at the stage's last step
  constant             1) optional warmup   2) max_lr
  wsd                  warmup-stable-decay (as in transformers' get_wsd_schedule): 1) warmup
                          2) max_lr   3) decay to min_lr over the last `decay` steps (linear, cosine or 1-sqrt)
  infinite             Ibrahim et al. 2024, sec. 7.2. First stage: 1) warmup  2) cooldown from max_lr to
                          const_lr (cosine, or inverse-sqrt with timescale alpha)  3) const_lr for as long as
                          data keeps coming  4) optional anneal to min_lr (exponential or linear) over the last
                          `anneal` steps. Later stages: 3) and 4) only: no re-warming.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from llmcl.errors import LlmclError


def to_steps(amount: int | float, total: int) -> int:
    """An integer is a number of steps; a float is a fraction of the stage's steps; at most the stage's steps."""
    return max(0, min(_steps(amount, total), total))


def _steps(amount: int | float, total: int) -> int:
    return int(amount if isinstance(amount, int) else round(amount * total))


def _too_long(cfg: Any, names: list[str], total: int, key: str) -> LlmclError:
    """The phases `names` of a stage's schedule add up to more steps than it has: each as the recipe gives it."""
    steps = {n: _steps(getattr(cfg, n), total) for n in names}
    return LlmclError("recipe keys " + " + ".join(f"'{key}.{n}' ({steps[n]})" for n in names)
                      + f" = {sum(steps.values())} steps, more than the stage's {total} steps")


warmup_steps = to_steps


@dataclass(frozen=True)
class Schedule:
    kind: str
    total: int
    max_lr: float
    min_lr: float
    warmup: int = 0
    start_lr: float = 0.0
    decay: int = 0  # wsd: length of the final decay
    decay_shape: str = "linear"  # wsd: linear | cosine | sqrt
    const_lr: float = 0.0  # infinite
    cooldown: int = 0  # infinite: steps from the end of warmup to const_lr
    cooldown_shape: str = "cosine"  # cosine | inv_sqrt
    alpha: float = 10.0  # inv_sqrt timescale: larger = faster initial drop
    anneal: int = 0  # infinite: final anneal length (0 = none)
    anneal_shape: str = "exp"  # exp | linear
    continuing: bool = False  # infinite, later stage: no warmup, no cooldown

    @property
    def anneal_start(self) -> int:
        """First step of the infinite schedule's anneal (== total when there is none)."""
        return self.total - self.anneal if self.kind == "infinite" else self.total


def _warmup(step: int, s: Schedule) -> float:
    return s.start_lr + (s.max_lr - s.start_lr) * (step + 1) / s.warmup


def _decay(progress: float, top: float, bottom: float, shape: str) -> float:
    """From top (progress 0) to bottom (progress 1)."""
    if shape == "cosine":
        return bottom + 0.5 * (top - bottom) * (1.0 + math.cos(math.pi * progress))
    if shape == "sqrt":  # 1 - sqrt decay (WSD literature)
        return bottom + (top - bottom) * (1.0 - math.sqrt(progress))
    if shape == "linear":
        return top + (bottom - top) * progress
    raise ValueError(f"unknown decay shape {shape!r}")


def _progress(step: int, start: int, end: int) -> float:
    """0 at step `start`, 1 at step `end` (inclusive ends); 0 for an empty span."""
    span = end - start
    return 0.0 if span <= 0 else min(1.0, max(0.0, (step - start) / span))


def lr_at(step: int, s: Schedule) -> float:
    """Learning rate of optimizer step `step` (0-based) of a stage following schedule `s`."""
    last = s.total - 1
    if s.kind == "infinite":
        return _infinite(step, s)
    # 1) warmup: step 0 already gets a non-zero lr, step warmup-1 reaches max_lr
    if step < s.warmup:
        return _warmup(step, s)
    if s.kind == "constant":
        return s.max_lr
    if s.kind == "wsd":
        decay_start = s.total - s.decay
        if step < decay_start:  # 2) stable
            return s.max_lr
        return _decay(_progress(step, decay_start - 1, last), s.max_lr, s.min_lr, s.decay_shape)  # 3) decay
    # 2) cosine / linear re-decay from max_lr (first step after warmup) to min_lr (last step)
    return _decay(_progress(step, s.warmup, last), s.max_lr, s.min_lr, "cosine" if s.kind == "cosine" else "linear")


def _infinite(step: int, s: Schedule) -> float:
    if not s.continuing:
        # 1) warmup
        if step < s.warmup:
            return _warmup(step, s)
        # 2) cooldown from max_lr (end of warmup) to const_lr (step warmup + cooldown)
        cd_end = s.warmup + s.cooldown
        if step < cd_end:
            x = _progress(step, s.warmup - 1, cd_end)
            if s.cooldown_shape == "cosine":
                return _decay(x, s.max_lr, s.const_lr, "cosine")
            h = lambda v: 1.0 / math.sqrt(1.0 + s.alpha * v) - 1.0  # noqa: E731  (h(0) = 0, h decreasing)
            return s.max_lr + (s.const_lr - s.max_lr) * h(x) / h(1.0)
    # 3) constant
    anneal_start = s.anneal_start
    if step < anneal_start:
        return s.const_lr
    # 4) anneal from const_lr to min_lr, reached at the last step
    x = _progress(step, anneal_start - 1, s.total - 1)
    if s.anneal_shape == "exp":
        return s.const_lr * (s.min_lr / s.const_lr) ** x
    return _decay(x, s.const_lr, s.min_lr, "linear")


def for_stage(cfg, total: int, stage_index: int, previous_final_lr: float | None = None,
              key: str = "train") -> Schedule:
    """Resolve a stage's train settings (recipe TrainConfig) into its Schedule."""
    start = previous_final_lr if (cfg.warmup_start == "previous" and previous_final_lr is not None) else 0.0
    common = dict(kind=cfg.schedule, total=total, max_lr=cfg.lr, min_lr=cfg.lr * cfg.min_lr_ratio, start_lr=start)
    if cfg.schedule == "infinite":
        continuing = stage_index > 0
        warm = 0 if continuing else to_steps(cfg.warmup, total)
        cool = 0 if continuing else to_steps(cfg.cooldown, total)
        anneal = to_steps(cfg.anneal, total)
        if warm + cool + anneal > total:
            raise _too_long(cfg, ["anneal"] if continuing else ["warmup", "cooldown", "anneal"], total, key)
        return Schedule(**common, warmup=warm, const_lr=cfg.lr * cfg.const_lr_ratio, cooldown=cool,
                        cooldown_shape=cfg.cooldown_shape, alpha=cfg.inv_sqrt_alpha, anneal=anneal,
                        anneal_shape=cfg.anneal_shape, continuing=continuing)
    warm = to_steps(cfg.warmup, total)
    if cfg.schedule == "wsd":
        decay = to_steps(cfg.decay, total)
        if warm + decay > total:
            raise _too_long(cfg, ["warmup", "decay"], total, key)
        return Schedule(**common, warmup=warm, decay=decay, decay_shape=cfg.decay_shape)
    return Schedule(**common, warmup=warm)
