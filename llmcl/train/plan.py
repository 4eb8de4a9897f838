"""What every stage will do, decided before anything trains: its number of optimizer steps and its lr schedule.

`plan_stages` is a pure function of the recipe, the number of processes and (for stages that train for a
number of epochs) the size of each stage's training pool. `llmcl validate` calls it without sizes, so a
schedule that does not fit its stage is refused before any model loads; `llmcl train` calls it with every size
before the first stage trains, so a bad later stage never fails after earlier ones have trained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from llmcl.data.mixing import replay_plan
from llmcl.schedules import Schedule, for_stage, lr_at


@dataclass(frozen=True)
class StagePlan:
    index: int
    steps: int
    """Optimizer steps of the stage."""
    schedule: Schedule
    """Its learning-rate schedule (llmcl.schedules.lr_at)."""

    @property
    def final_lr(self) -> float:
        return lr_at(self.steps - 1, self.schedule)


def train_key(recipe: Any, index: int) -> str:
    """The recipe key a stage's train settings are reported under."""
    return f"stages.{index}.train" if recipe.stages[index].train else "train"


def stage_steps(recipe: Any, index: int, world: int, pool_size: int | None) -> int | None:
    """Optimizer steps of stage `index`: max_steps, else the token budget, else epochs over the pool (None when
    that needs a pool size that was not given)."""
    cfg = recipe.stage_train(index)
    global_batch = cfg.batch_size * cfg.grad_accum * world
    if cfg.max_steps:
        return cfg.max_steps
    if cfg.max_tokens:
        return max(1, math.ceil(cfg.max_tokens / (global_batch * cfg.seq_len)))
    if pool_size is None:
        return None
    ratio = recipe.stage_replay(index).ratio if replay_plan(recipe, index) else 0.0
    return max(1, math.ceil(cfg.epochs * (pool_size / (global_batch * (1 - ratio)))))


def needs_pool_size(recipe: Any, index: int) -> bool:
    cfg = recipe.stage_train(index)
    return not cfg.max_steps and not cfg.max_tokens


def plan_stages(recipe: Any, world: int = 1,
                pool_size: Callable[[int], int | None] | None = None) -> list[StagePlan | None]:
    """Every stage's plan, in order; raises LlmclError (naming the recipe keys) for a schedule that does not fit.

    `pool_size(i)` gives stage i's training pool size, needed only by stages that train for epochs; without
    it (or when it gives None) their plan is None (and a following stage that re-warms from their final lr
    starts from 0 in this plan)."""
    plans: list[StagePlan | None] = []
    previous: StagePlan | None = None
    for i in range(len(recipe.stages)):
        size = pool_size(i) if pool_size is not None and needs_pool_size(recipe, i) else None
        steps = stage_steps(recipe, i, world, size)
        if steps is None:
            plans.append(None)
            previous = None
            continue
        schedule = for_stage(recipe.stage_train(i), steps, i, previous.final_lr if previous else None,
                             key=train_key(recipe, i))
        previous = StagePlan(i, steps, schedule)
        plans.append(previous)
    return plans
