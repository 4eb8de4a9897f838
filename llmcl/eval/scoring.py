"""Score one row of the accuracy matrix: the base model or a finished stage's checkpoint, on every task.

Writes run_dir/eval/base.json or run_dir/eval/stage-NN.json:
  {"row": "stage-01", "stage": 1, "stage_name": ..., "checkpoint": ..., "lm_eval_version": ..., "limit": ...,
   "seconds": ..., "tasks": {task: {kind: stage|general, stage: j|null, metric, value, stderr, n, version,
                                    higher_is_better, metrics, scoring: {how this cell was scored}}}}
(the row-level lm_eval_version, limit, tasks_limit, dtype, num_fewshot: the settings of the call that wrote it
last; the report reads each cell's `scoring`, and a cell's without one, from before cells had it, its row's)
The checkpoint is loaded from its manifest (no method code), so what is scored is exactly what was saved.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import yaml

from llmcl.errors import LlmclError, RecipeError, did_you_mean
from llmcl.rundir.integrity import read_json, reading
from llmcl.eval import harness
from llmcl.eval.tasks import (STAGE_PREFIX, StageTask, data_dir, include_paths, known_tasks, needs_harness_index,
                              write_stage_tasks)
from llmcl.recipe import Recipe, from_dict
from llmcl.rundir import EVAL, RECIPE, Ledger, artifacts, now, write_json

BASE = "base"


def row_name(row: str | int) -> str:
    return BASE if row == BASE else f"stage-{int(row):02d}"


def row_file(run_dir: Path, row: str | int) -> Path:
    return run_dir / EVAL / f"{row_name(row)}.json"


def written_rows(run_dir: Path) -> list[str | int]:
    """The rows with a row file in run_dir/eval: "base" first, then stage indices in order."""
    names = {path.stem for path in (run_dir / EVAL).glob("*.json")} if (run_dir / EVAL).is_dir() else set()
    stages = sorted(int(n[6:]) for n in names if n.startswith("stage-") and n[6:].isdigit())
    return ([BASE] if BASE in names else []) + [s for s in stages if row_name(s) in names]


def read_row(run_dir: Path, row: str | int) -> dict[str, Any] | None:
    path = row_file(run_dir, row)
    if not path.exists():
        return None
    way_out = f"delete it and score the row again: llmcl eval {run_dir} --stage {row}"
    data = read_json(path, way_out)
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict):
        raise LlmclError(f"{path} is damaged (no 'tasks'); {way_out}")
    for task, cell in data["tasks"].items():
        metrics = cell.get("metrics") or {} if isinstance(cell, dict) else None
        values = [cell.get("value"), *metrics.values()] if isinstance(metrics, dict) else ["?"]
        if not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values):
            raise LlmclError(f"{path} is damaged (task {task!r} holds a score that is not a number); {way_out}")
    return data


def row_scored(run_dir: Path, row: str | int) -> bool:
    """Whether the row has a readable row file (a damaged one is to be scored again, from the weights)."""
    try:
        return read_row(run_dir, row) is not None
    except LlmclError:
        return False


def load_run_recipe(run_dir: Path, *, data_files: bool = True) -> Recipe:
    """The recipe a run was trained with (its recipe.yaml); `data_files=False` when the caller reads no data (a
    report, an export), so that a run kept without its data files still loads."""
    path = run_dir / RECIPE
    if not path.exists():
        raise LlmclError(f"{run_dir} is not an llmcl run directory (no {RECIPE})")
    with reading(path, "restore it from a backup; it is the recipe the run was trained with"):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a recipe mapping")
    from llmcl.data.sources import files_unchecked

    try:
        with contextlib.nullcontext() if data_files else files_unchecked():
            return from_dict(data)
    except RecipeError as exc:  # the run's own recipe, not one given on the command line: say which file
        raise RecipeError(exc.key, message=f"{path}: {exc}") from None


def _load_model(run_dir: Path, recipe: Recipe, row: str | int, device: Any = None):
    import torch

    if row == BASE:
        model = artifacts.load_base(run_dir, recipe.model, recipe.seed)
    else:
        ledger = Ledger.read(run_dir, recipe)
        if not ledger.is_done(int(row)):
            raise LlmclError(f"stage {row} of {run_dir} is not done; nothing to evaluate")
        model = artifacts.load(run_dir, ledger.manifest(int(row)), recipe.model, recipe.seed, trainable=False)
        if hasattr(model, "merge_and_unload"):  # a PEFT model: score the merged weights
            model = model.merge_and_unload()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return cast(model.to(device), eval_dtype(recipe)).eval()


def cast(model: Any, dtype: Any) -> Any:
    """`model` in `dtype` as transformers loads it in that dtype: parameters and saved buffers cast, computed ones
    (RoPE's inverse frequencies: non-persistent buffers) kept in their precision."""
    kept = [(m, name, b) for m in model.modules() for name, b in m._buffers.items()
            if b is not None and b.is_floating_point() and name in m._non_persistent_buffers_set]
    model.to(dtype)
    for m, name, b in kept:
        m._buffers[name] = b
    return model


def eval_dtype(recipe: Recipe) -> Any:
    """The dtype a stage is evaluated in: eval.dtype, where auto = the half precision that train.precision trains
    in (bf16/fp16 mixed precision), else model.dtype."""
    import torch

    from llmcl.models import torch_dtype
    from llmcl.train.distributed import mixed_precision

    if recipe.eval.dtype != "auto":
        return torch_dtype(recipe.eval.dtype)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision(recipe.train.precision))
    return half or torch_dtype(recipe.model.dtype)


def _scored_here(stage: int, row: int, recipe: Recipe) -> bool:
    """Whether row `row` (a stage's) scores stage `stage`'s task: eval.unseen_stages: next keeps only the next
    stage ahead (all that FWT reads), eval.seen_stages: current only the stage just trained behind (BWT reads the
    diagonal and the last row, which scores every stage)."""
    if stage > row:
        return recipe.eval.unseen_stages == "all" or stage == row + 1
    if stage < row:
        return recipe.eval.seen_stages == "all" or row == len(recipe.stages) - 1
    return True


def row_tasks(recipe: Recipe, row: str | int, stage_tasks: list[StageTask]) -> list[str]:
    """The tasks row `row` scores when none are named: the stage tasks it reads (eval.seen_stages,
    eval.unseen_stages) and eval.tasks (only on the base and last rows with eval.tasks_every_stage: false). Empty
    for a row with nothing to score: a stage in the middle when only general tasks at the ends are asked for."""
    general = [t for t in recipe.eval.tasks if t not in {s.task for s in stage_tasks}]
    if not recipe.eval.tasks_every_stage and row != BASE and int(row) != len(recipe.stages) - 1:
        general = []  # general ability only for the base model and the last stage
    stage = [t.task for t in stage_tasks if row == BASE or _scored_here(t.stage, int(row), recipe)]
    return stage + general


# how a cell was scored, as a row file records it (each cell its own; before cells did, the row)
SCORING_KEYS = ("lm_eval_version", "dtype", "limit", "tasks_limit", "num_fewshot", "max_prompt_tokens",
                "max_new_tokens")


def tasks_limit(e: Any) -> int | None:
    """The item limit of the general tasks (eval.tasks_limit; 'same' = eval.limit)."""
    return e.limit if e.tasks_limit == "same" else e.tasks_limit


def recorded_scoring(name: str, cell: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """How the cell of task `name` was scored: its own record, or for a cell written before cells had one, the
    keys of its row that apply to it (a row written before a key was recorded says nothing of it)."""
    if isinstance(cell.get("scoring"), dict):
        return cell["scoring"]
    other = "tasks_limit" if name.startswith(STAGE_PREFIX) else "limit"
    return {k: row[k] for k in SCORING_KEYS if k in row and k != other}


def cell_scoring(recipe: Recipe, name: str, task: StageTask | None, shots: int | None = None) -> dict[str, Any]:
    """How the cell of task `name` (`task`: this run's stage task, else None) was scored, as the report compares
    cells (report.SCORING's keys): a row's cells may be scored at different times (`llmcl eval --tasks`, eval
    keys changed between stages), so each records its own. `shots`: the examples lm-eval says it put before each
    item, recorded where eval.num_fewshot asked for some (a task whose YAML fixes 0 keeps 0; without
    eval.num_fewshot the record says "each task's default", as the report words it)."""
    e = recipe.eval
    asked = 0 if task is not None and task.zero_shot else e.num_fewshot
    out: dict[str, Any] = {"lm_eval_version": harness.lm_eval_version(),
                           "dtype": str(eval_dtype(recipe)).removeprefix("torch."),
                           "num_fewshot": shots if asked is not None and shots is not None else asked}
    if not name.startswith(STAGE_PREFIX):
        return {**out, "tasks_limit": tasks_limit(e)}
    out["limit"] = e.limit
    if task is not None:
        out["items"] = task.items  # (a setting of no sentence: the report compares it within a column)
    kind = task.kind if task is not None else None
    if kind in ("generate", "choice"):  # (another run's stage task, kind None, was written by it, with its keys)
        out["max_prompt_tokens"] = e.max_prompt_tokens
    if kind == "generate":
        out["max_new_tokens"] = e.max_new_tokens
    return out


def prepare_stage_tasks(run_dir: Path, recipe: Recipe, tokenizer: Any, accelerator: Any = None) -> list[StageTask]:
    """The run's stage tasks, written to run_dir/eval/tasks (by rank 0 while the other ranks of a data-parallel
    evaluation wait; every rank calls this then). What a run's rows share: a caller that scores several rows of one
    run in one process prepares them once (rendering and tokenizing every stage's test split is seconds a row)."""
    if not recipe.eval.stage_tasks:
        return []
    parallel = accelerator is not None and accelerator.num_processes > 1
    if parallel:
        accelerator.wait_for_everyone()  # rank 0 writes the task files, the others only read them
    tasks = write_stage_tasks(recipe, Path(run_dir), tokenizer, write=not parallel or accelerator.is_main_process)
    if parallel:
        accelerator.wait_for_everyone()
    return tasks


def score_row(run_dir: Path, row: str | int, *, recipe: Recipe | None = None, tokenizer: Any = None,
              only: list[str] | None = None, accelerator: Any = None,
              stage_tasks: list[StageTask] | None = None) -> dict[str, Any] | None:
    """Evaluate one row on the stage tasks and eval.tasks (or only the tasks/stage names in `only`).

    With an `accelerator` of several processes, every rank calls this: each scores its share of the requests on
    its own device, rank 0 gathers them, writes the row and returns it (the others return None). `stage_tasks`:
    what prepare_stage_tasks returned for this run and recipe (None: prepared here)."""
    from llmcl.models import load_tokenizer

    run_dir = Path(run_dir)
    recipe = recipe or load_run_recipe(run_dir)
    tokenizer = tokenizer or load_tokenizer(recipe.model)
    parallel = accelerator is not None and accelerator.num_processes > 1
    main = not parallel or accelerator.is_main_process
    if stage_tasks is None:
        stage_tasks = prepare_stage_tasks(run_dir, recipe, tokenizer, accelerator)
    by_name = {t.task: t for t in stage_tasks}
    names = row_tasks(recipe, row, stage_tasks)
    if only:
        names = [t.task for t in stage_tasks] + [t for t in recipe.eval.tasks if t not in by_name]
        aliases: dict[str, list[str]] = {}
        for t in stage_tasks:  # a stage's name stands for its every view
            aliases.setdefault(t.stage_name, []).append(t.task)
        wanted = [task for n in only for task in aliases.get(n, [n])]
        unknown = [n for n in wanted if n not in names and not n.startswith(STAGE_PREFIX)]
        if unknown:
            known = known_tasks(recipe, unknown, run_dir)
            for n in unknown:
                if n not in known:
                    raise LlmclError(f"--tasks {n!r}: not a stage of {run_dir} ({', '.join(aliases) or 'none'}) nor a "
                                     "known lm-eval task" + did_you_mean(n, [*aliases, *known]))
        names = [n for n in wanted if n in names] + [n for n in unknown]
    if not names:
        raise LlmclError(f"{run_dir}: nothing to evaluate (no stage has test data and eval.tasks is empty)")
    model = _load_model(run_dir, recipe, row, accelerator.device if parallel else None)
    dd = data_dir(recipe)
    t0 = time.perf_counter()
    e = recipe.eval
    general_limit = tasks_limit(e)
    groups: dict[int | None, list[str]] = {}  # lm-eval takes one limit per call
    for name in names:  # stage tasks (this run's, or another run's by name) get eval.limit, the rest tasks_limit
        groups.setdefault(e.limit if name.startswith(STAGE_PREFIX) else general_limit, []).append(name)
    results = {}
    for limit, group in groups.items():
        results.update(harness.evaluate(
            model, tokenizer, group, include_path=include_paths(recipe, run_dir),
            include_defaults=needs_harness_index(group), limit=limit, batch_size=e.batch_size,
            num_fewshot=e.num_fewshot, metadata={"llmcl_eval_data": dd} if dd else None,
            accelerator=accelerator if parallel else None,
            rendered=frozenset(t.task for t in stage_tasks if t.rendered),
        ))
    seconds = time.perf_counter() - t0
    del model
    if not main:
        return None
    payload = read_row(run_dir, row) if only else None
    payload = payload or {"tasks": {}}
    for name, cell in payload["tasks"].items():  # a cell written before cells kept their own record: its row's,
        cell["scoring"] = recorded_scoring(name, cell, payload)  # before the row's keys become this call's
    ledger_entry = None if row == BASE else Ledger.read(run_dir).stage(int(row))
    payload.update({
        "row": row_name(row), "stage": None if row == BASE else int(row),
        "stage_name": None if row == BASE else recipe.stages[int(row)].name,
        "checkpoint": None if row == BASE else ledger_entry["checkpoint"],
        "lm_eval_version": harness.lm_eval_version(), "limit": e.limit, "tasks_limit": general_limit,
        "model": recipe.model.path, "dtype": str(eval_dtype(recipe)).removeprefix("torch."),
        "num_fewshot": e.num_fewshot,
        "created_at": now(),
        "seconds": round(seconds, 3),
    })
    for name, result in results.items():
        task = by_name.get(name)
        cell = result.to_dict()
        shots = cell.pop("num_fewshot")  # (the cell's scoring records it)
        payload["tasks"][name] = {"kind": task.view if task else "general",
                                  "stage": task.stage if task else None,
                                  "stage_name": task.stage_name if task else None, **cell,
                                  "scoring": cell_scoring(recipe, name, task, shots)}
    path = row_file(run_dir, row)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, payload)
    return payload
