"""Checks beyond the recipe's types that still load no model: data records fit their format, trackers exist,
every stage's schedule fits its steps."""

from __future__ import annotations

import importlib.util
import os

from llmcl.data.formatting import check_record
from llmcl.data.sources import peek
from llmcl.errors import LlmclError, RecipeError
from llmcl.recipe import Recipe

_TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}


def check(recipe: Recipe) -> None:
    """Raise LlmclError/RecipeError naming the recipe key of the first problem found."""
    for tracker in recipe.logging.trackers:
        if not any(importlib.util.find_spec(m) for m in _TRACKER_PACKAGES[tracker]):
            raise RecipeError("logging.trackers", message=f"recipe key 'logging.trackers': {tracker} is not installed "
                              f"(pip install {_TRACKER_PACKAGES[tracker][0]})")
    for i, stage in enumerate(recipe.stages):
        record = peek(stage.data, recipe.seed)
        if record is None:
            continue
        if not isinstance(record, dict):
            raise LlmclError(f"recipe key 'stages.{i}.data.path': records must be objects with named fields, "
                             f"got {type(record).__name__}")
        fmt = check_record(stage.data, record, f"stages.{i}.data")
        if stage.data.choices is not None:
            _check_choices(stage, i, fmt, recipe.seed)
    from llmcl.eval.tasks import check_task_names

    check_task_names(recipe)
    from llmcl.train.plan import plan_stages

    plan_stages(recipe, world=int(os.environ.get("WORLD_SIZE") or recipe.distributed.num_processes or 1))


def _check_choices(stage, index: int, fmt: str, seed: int) -> None:
    """Every test answer must be one of data.choices (else scoring would fail after training)."""
    from llmcl.data.formatting import render
    from llmcl.data.sources import load_records

    key = f"stages.{index}.data.choices"
    if fmt != "prompt_completion":
        raise RecipeError(key, message=f"recipe key '{key}': choices need prompt/completion data (format is {fmt})")
    choices = {c.strip() for c in stage.data.choices}
    for record in load_records(stage.data, "test", seed) or []:
        answer = render(stage.data, record)[1].strip()
        if answer not in choices:
            raise RecipeError(key, message=f"recipe key '{key}': test answer {answer!r} is not one of {sorted(choices)}")
