"""Recipes: typed dataclasses, YAML loading, dotted KEY=VALUE overrides, checks that name the YAML key.

`load(path, overrides)` returns a `Recipe` or raises `RecipeError`/`LlmclError`; it never loads a model.
The sections are in llmcl.recipe.sections, the file handling in llmcl.recipe.files.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmcl import methods
from llmcl.config import build, coerce, require, to_dict
from llmcl.errors import LlmclError, RecipeError, did_you_mean
from llmcl.methods.base import MethodConfig
from llmcl.recipe.files import apply_override, parse_override, read_yaml
from llmcl.recipe.sections import (CheckpointsConfig, DataConfig, DistributedConfig, EvalConfig, LoggingConfig,
                                   ModelConfig, ReplayConfig, ReplayDataConfig, StageConfig, TrainConfig)

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # fullmatch: no trailing newline


@dataclass
class Recipe:
    """A continual fine-tuning run: a model, a method, and stages trained one after another."""

    stages: list[StageConfig]
    """The stages, trained in order."""
    name: str | None = None
    """Run name; default = the recipe file name. The default run dir is runs/<name>."""
    description: str = ""
    """One line saying what this recipe is for (shown by `llmcl recipes`)."""
    seed: int = 0
    """Seed for model init (builtin:tiny), data order, adapters and dropout."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The starting model."""
    method: MethodConfig = field(default_factory=MethodConfig)
    """The continual-learning method: name plus the method's own options."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation settings shared by all stages."""
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    """Replay for every stage (a stage may override it under stages.N.replay)."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Extra metric trackers."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation after each stage: the accuracy matrix and general-ability tasks."""
    checkpoints: CheckpointsConfig = field(default_factory=CheckpointsConfig)
    """What the run directory keeps of the finished stages."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Launch settings for multi-process training (the launcher's own flags take precedence)."""

    def check(self, key: Any) -> None:
        require(0 <= self.seed < 2**32, key("seed"), self.seed, "an integer in [0, 2^32)")
        evaluated = self.eval.stage_tasks or bool(self.eval.tasks)
        require(self.checkpoints.keep_stages is None or self.eval.after_each_stage or not evaluated,
                key("checkpoints.keep_stages"), self.checkpoints.keep_stages,
                "null while eval.after_each_stage is false (a stage's weights are deleted once its row is scored "
                "during `llmcl train`; `llmcl eval` could not score a deleted stage later)")

    def stage_train(self, index: int) -> TrainConfig:
        """The train settings of stage `index`: the recipe's, with the stage's overrides applied."""
        return _stage_train(self.train, self.stages[index].train, index)

    def stage_replay(self, index: int) -> ReplayConfig:
        """The replay settings of stage `index`: the recipe's, with the stage's overrides applied."""
        overrides = self.stages[index].replay
        prefix = f"stages.{index}.replay"
        data = to_dict(self.replay)
        data.update(overrides)
        cfg = build(ReplayConfig, data, prefix, check=False)
        cfg.check(lambda name: f"{prefix}.{name}" if name in overrides else f"replay.{name}")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def _stage_train(base: TrainConfig, overrides: dict[str, Any], index: int) -> TrainConfig:
    prefix = f"stages.{index}.train"
    data = dataclasses.asdict(base)
    data.update(overrides)
    cfg = build(TrainConfig, data, prefix, check=False)
    cfg.check(lambda name: f"{prefix}.{name}" if name in overrides else f"train.{name}")
    return cfg


def from_dict(data: dict[str, Any], default_name: str = "run") -> Recipe:
    """Build and check a Recipe from a plain dict (the parsed YAML with overrides applied)."""
    data = copy.deepcopy(data)
    raw_method = data.pop("method", None) or {}
    if not isinstance(raw_method, dict):
        raise RecipeError("method", raw_method, "a mapping with at least `name`, e.g. {name: lora, r: 8}")
    method_name = coerce(raw_method.get("name", "seqft"), str, "method.name")
    method_cls = methods.get(method_name)
    if "stages" not in data:
        raise RecipeError("stages", message="recipe key 'stages' is required: a list of stages, each with data.path")
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages:
        raise RecipeError("stages", stages, "a non-empty list of stages")
    recipe = build(Recipe, data, "")
    recipe.method = build(method_cls.config_class, {**raw_method, "name": method_name}, "method")
    if recipe.name is None:
        recipe.name = default_name
    require(bool(_NAME_RE.fullmatch(recipe.name)), "name", recipe.name, "letters, digits, _ . - (it names the run dir)")
    _name_stages(recipe)
    _check_metric_keys(recipe)
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    replay_keys = {f.name for f in dataclasses.fields(ReplayConfig)}
    for i in range(len(recipe.stages)):
        for k in recipe.stages[i].replay:
            if k not in replay_keys:
                raise RecipeError(f"stages.{i}.replay.{k}", message=f"recipe key 'stages.{i}.replay.{k}' is unknown"
                                  + did_you_mean(k, replay_keys, f"stages.{i}.replay."))
        recipe.stage_replay(i)
        for k in recipe.stages[i].train:
            if k == "precision":
                raise RecipeError(f"stages.{i}.train.precision", message=f"recipe key 'stages.{i}.train.precision': "
                                  "precision is one setting for the whole run; set train.precision")
            if k not in train_keys:
                raise RecipeError(f"stages.{i}.train.{k}", message=f"recipe key 'stages.{i}.train.{k}' is unknown"
                                  + did_you_mean(k, train_keys, f"stages.{i}.train."))
        recipe.stage_train(i)  # type/value checks of the merged settings
    _absolute_paths(recipe)
    return recipe


def _name_stages(recipe: Recipe) -> None:
    from llmcl.eval.tasks import stage_task_name

    seen: dict[str, int] = {}
    tasks: dict[str, int] = {}  # lm-eval task name -> stage: names differing only in - . _ would share one
    for i, stage in enumerate(recipe.stages):
        if stage.name is None:
            base = _default_stage_name(stage.data.path)
            name, n = base, 2
            while name in seen:
                name, n = f"{base}-{n}", n + 1
            stage.name = name
        require(bool(_NAME_RE.fullmatch(stage.name)), f"stages.{i}.name", stage.name, "letters, digits, _ . - only")
        if stage.name in seen:
            raise RecipeError(f"stages.{i}.name", message=f"recipe key 'stages.{i}.name': {stage.name!r} is already "
                              f"the name of stage {seen[stage.name]}; stage names must be unique")
        seen[stage.name] = i
        task = stage_task_name(stage.name)
        if task in tasks:
            other = recipe.stages[tasks[task]].name
            raise RecipeError(f"stages.{i}.name", message=f"recipe key 'stages.{i}.name': {stage.name!r} and stage "
                              f"{tasks[task]}'s {other!r} would be scored as one lm-eval task ({task}: '-' and '.' "
                              "become '_'); rename one")
        tasks[task] = i


def _check_metric_keys(recipe: Recipe) -> None:
    """eval.metric names tasks the run scores: one of eval.tasks or a stage's task (named after the stage)."""
    from llmcl.eval.tasks import choice_task_name, stage_task_name

    views = [f(s.name) for s in recipe.stages for f in (stage_task_name, choice_task_name)]
    for task, metric in recipe.eval.metric.items():
        if task not in recipe.eval.tasks and task not in views:
            raise RecipeError(f"eval.metric.{task}", message=f"recipe key 'eval.metric.{task}': {task!r} is not a "
                              "task of this run (one of eval.tasks, or a stage's task llmcl_stage_<name>)"
                              + did_you_mean(task, [*recipe.eval.tasks, *views], "eval.metric."))
        require(bool(metric), f"eval.metric.{task}", metric, "the name of a metric the task reports, e.g. acc_norm")


def _default_stage_name(path: str) -> str:
    if path.startswith("builtin:"):
        name = path.split(":", 1)[1]
    else:
        p = Path(path)
        name = p.stem if p.suffix else p.name
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "stage"
    return name


def _absolute_paths(recipe: Recipe) -> None:
    """Local data paths are relative to the working directory; store them absolute in the resolved recipe. So is
    a model directory (a relative one stored as given read as a hub id, or another directory, from elsewhere)."""
    from llmcl.data.sources import is_local

    model = Path(recipe.model.path).expanduser()
    if not recipe.model.path.startswith("builtin:") and model.is_dir():  # (what transformers loads, too)
        recipe.model.path = str(model.resolve())

    sources = [stage.data for stage in recipe.stages] + list(recipe.replay.datasets)
    for data in sources:
        for attr in ("path", "test_path"):
            value = getattr(data, attr)
            if value and is_local(value):
                setattr(data, attr, str(Path(value).expanduser().resolve()))
    recipe.eval.include_path = [str(Path(p).expanduser().resolve()) for p in recipe.eval.include_path]
    if recipe.eval.data_dir:
        recipe.eval.data_dir = str(Path(recipe.eval.data_dir).expanduser().resolve())


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe file, apply KEY=VALUE overrides, build and check it. Never loads a model."""
    data = read_yaml(path)
    for text in overrides:
        parts, value = parse_override(text)
        apply_override(data, parts, value)
    return from_dict(data, default_name=Path(path).stem)


def dump(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True)


def with_defaults(recipe_dict: dict[str, Any]) -> dict[str, Any]:
    """A stored recipe as this llmcl resolves it: keys added since it was written take their defaults (a recipe
    that no longer resolves is returned as it is, for the comparison to name where it differs)."""
    from llmcl.data.sources import files_unchecked

    try:
        with files_unchecked():  # the data files are checked apart (the ledger's records), and may be gone
            return from_dict(copy.deepcopy(recipe_dict)).to_dict()
    except LlmclError:
        return recipe_dict


def comparable(recipe_dict: dict[str, Any]) -> dict[str, Any]:
    """The parts of a resolved recipe that decide the trained weights (logging, eval, checkpoints,
    train.on_nonfinite and distributed.timeout_minutes may change freely)."""
    out = {k: v for k, v in recipe_dict.items() if k not in ("logging", "eval", "checkpoints", "description")}
    out = copy.deepcopy(out)
    if isinstance(out.get("distributed"), dict):
        out["distributed"].pop("timeout_minutes", None)  # how long ranks wait for each other
    for train in [out.get("train") or {}] + [(s or {}).get("train") or {} for s in out.get("stages") or []]:
        if isinstance(train, dict):
            train.pop("on_nonfinite", None)  # how to react to a divergence: may change before a resume
    return out


def first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    """Dotted key of the first place where two plain trees differ, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            d = first_difference(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
            if d is not None:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return prefix
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, f"{prefix}.{i}")
            if d is not None:
                return d
        return None
    return None if a == b else prefix


__all__ = ["DataConfig", "DistributedConfig", "EvalConfig", "LoggingConfig", "MethodConfig", "ModelConfig", "Recipe",
           "ReplayConfig", "ReplayDataConfig", "StageConfig", "TrainConfig", "apply_override", "comparable", "dump",
           "first_difference", "from_dict", "load", "parse_override", "read_yaml"]
