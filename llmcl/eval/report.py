"""The forgetting report of a run: its accuracy matrix and AA/BWT/FWT/forgetting, as numbers.

collect(run_dir) reads recipe.yaml, ledger.json and eval/*.json into a RunReport; llmcl.eval.render shows it
(report files, terminal tables, the comparison of runs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from llmcl.errors import LlmclError
from llmcl.eval import metrics as M
from llmcl.eval.scoring import BASE, load_run_recipe, read_row, recorded_scoring, written_rows
from llmcl.rundir import Ledger


@dataclass
class Column:
    task: str
    label: str
    kind: str  # stage | stage_choice (a classification stage's label-set loglikelihood) | general
    stage: int | None
    metric: str
    higher_is_better: bool
    n: int | None = None  # items scored (the first row's count; eval.limit caps it)
    ns: list[int] = field(default_factory=list)  # every row's count, each once: more than one = rows differ
    items: list[str] = field(default_factory=list)  # every row's test items (their hash), each once: likewise


@dataclass
class RunReport:
    run_dir: Path
    name: str
    method: str
    model: str
    stage_names: list[str]
    rows: list[str] = field(default_factory=list)  # "base" and the names of evaluated stages, in order
    row_stage: list[int | None] = field(default_factory=list)
    columns: list[Column] = field(default_factory=list)
    values: list[list[Optional[float]]] = field(default_factory=list)  # rows x columns, raw metric values
    stderrs: list[list[Optional[float]]] = field(default_factory=list)
    summary: dict[str, float | None] = field(default_factory=dict)
    summary_choice: dict[str, float | None] = field(default_factory=dict)
    """AA, BWT, FWT, forgetting over the label-set views (stages with data.choices); empty without them."""
    by_metric: dict[str, dict[str, float | None]] = field(default_factory=dict)
    """AA, BWT, FWT, forgetting per metric of the stage tasks, when they are scored with more than one (a text
    stage's bits per byte beside exact matches): scores in different units are not averaged together, and
    `summary` is then empty of values."""
    after_stage: list[dict[str, Any]] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)
    """(row, column) of the cells AA and BWT read that have no score (a row not written, a task not scored):
    the summary is over the cells that are there, and says so."""
    seen_stages: str = "all"
    general_delta: dict[str, float | None] = field(default_factory=dict)
    train_seconds: float = 0.0
    stages_done: int = 0
    scoring: dict[str, list[Any]] = field(default_factory=dict)
    """How the cells were scored (SCORING keys: lm-eval version, weight dtype, item limits, few-shot, prompt cap,
    tokens generated): the distinct values over the cells, in row order; more than one = cells scored differently."""

    @property
    def general_mean(self) -> float | None:
        """The mean change of the general tasks from the base model (None without them)."""
        return _mean_or_none(list(self.general_delta.values()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.name, "method": self.method, "model": self.model, "stages": self.stage_names,
            "rows": self.rows,
            "columns": [c.__dict__ for c in self.columns],
            "R": self.values, "stderr": self.stderrs,
            "metrics": {**self.summary, "general_delta": self.general_mean},
            "metrics_choice": self.summary_choice, "metrics_by_metric": self.by_metric,
            "missing_cells": [list(cell) for cell in self.missing],
            "after_stage": self.after_stage, "general_delta": self.general_delta,
            "train_seconds": round(self.train_seconds, 3), "stages_done": self.stages_done,
            "scoring": self.scoring,
            "definitions": "AA, BWT, FWT (Lopez-Paz & Ranzato 2017, base model as reference), forgetting "
                           "(Chaudhry et al. 2018) on stage-task scores, lower-is-better metrics negated; see README",
        }


# how the report says how a cell was scored (scoring.SCORING_KEYS, in that order): a value, the sentence it goes in,
# and what null means
SCORING = {"lm_eval_version": ("{}", "lm-eval {}", None), "dtype": ("{}", "weights in {}", None),
           "limit": ("at most {} items", "stage tasks: {} (eval.limit)", "every item"),
           "tasks_limit": ("at most {} items", "general tasks: {} (eval.tasks_limit)", "every item"),
           "num_fewshot": ("{}", "few-shot: {} (eval.num_fewshot)", "each task's default"),
           "max_prompt_tokens": ("at most {} tokens", "stage prompts: {} (eval.max_prompt_tokens)", "any length"),
           "max_new_tokens": ("{}", "tokens generated: {} (eval.max_new_tokens)", None)}


def _mean_or_none(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def collect(run_dir: Path) -> RunReport:
    run_dir = Path(run_dir)
    recipe = load_run_recipe(run_dir, data_files=False)
    ledger = Ledger.read(run_dir, recipe)
    done = ledger.recorded_done()  # rows are results: a stage's weights may be gone (deleted, archived without)
    report = RunReport(run_dir, recipe.name or run_dir.name, recipe.method.name, recipe.model.path,
                       [s.name for s in recipe.stages], stages_done=len(done), seen_stages=recipe.eval.seen_stages,
                       train_seconds=sum(float(ledger.stage(i).get("wall_seconds") or 0) for i in done))
    rows: list[tuple[str, int | None, dict]] = []
    base = read_row(run_dir, BASE)
    if base:
        rows.append((BASE, None, base))
    for i in done:
        row = read_row(run_dir, i)
        if row:
            rows.append((recipe.stages[i].name, i, row))
    if not rows:
        raise LlmclError(f"{run_dir}: no evaluation results yet (eval/*.json); run `llmcl eval {run_dir}`")
    # columns: stage tasks in stage order, then general tasks in the recipe's order
    seen: dict[str, Column] = {}
    for _, _, row in rows:
        row["tasks"] = {task: _shown(task, r, recipe.eval.metric.get(task), run_dir) for task, r in row["tasks"].items()}
    for _, _, row in rows:
        for task, r in row["tasks"].items():
            if task not in seen:
                label = {"stage": r["stage_name"], "stage_choice": f"{r['stage_name']} (labels)"}.get(
                    r["kind"], task.removeprefix("llmcl_"))
                seen[task] = Column(task, label, r["kind"], r["stage"], r["metric"], r["higher_is_better"], r.get("n"))
    stage_cols = sorted((c for c in seen.values() if c.kind == "stage"), key=lambda c: c.stage)
    choice_cols = sorted((c for c in seen.values() if c.kind == "stage_choice"), key=lambda c: c.stage)
    general_cols = [c for c in seen.values() if c.kind == "general"]
    report.columns = stage_cols + choice_cols + general_cols
    for _, _, row in rows:
        for task, cell in row["tasks"].items():
            for key, value in recorded_scoring(task, cell, row).items():
                if key in SCORING and value not in report.scoring.setdefault(key, []):
                    report.scoring[key].append(value)
            if task in seen and cell.get("n") is not None and cell["n"] not in seen[task].ns:
                seen[task].ns.append(cell["n"])
            items = recorded_scoring(task, cell, row).get("items")
            if task in seen and items is not None and items not in seen[task].items:
                seen[task].items.append(items)
    for label, stage, row in rows:
        report.rows.append(label)
        report.row_stage.append(stage)
        # a cell scored with another metric than its column's (a row from before a task changed) is missing:
        # `llmcl eval RUN_DIR --stage N` scores it again
        same = [row["tasks"].get(c.task, {}) if row["tasks"].get(c.task, {}).get("metric") == c.metric else {}
                for c in report.columns]
        report.values.append([cell.get("value") for cell in same])
        report.stderrs.append([cell.get("stderr") for cell in same])
    _compute_metrics(report)
    return report


def check_metric_choice(run_dir: Path, recipe: Any) -> None:
    """eval.metric against the rows written so far (the base row scores every task): a metric a task does not
    report is refused before a stage trains, not in the report after it."""
    if not recipe.eval.metric:
        return
    for row in written_rows(Path(run_dir)):
        for task, cell in (read_row(Path(run_dir), row) or {}).get("tasks", {}).items():
            _shown(task, cell, recipe.eval.metric.get(task), Path(run_dir))


def _shown(task: str, cell: dict[str, Any], metric: str | None, run_dir: Path) -> dict[str, Any]:
    """A row's cell as the report shows it: with eval.metric's choice for the task as its metric and value."""
    if metric is None or metric == cell.get("metric"):
        return cell
    metrics = cell.get("metrics") or {}
    if metric not in metrics:
        first = metric.split(",")[0]  # lm-eval's acc_norm,none: the task's first filter is named without it
        hint = f"; the first filter's is named without the filter: {first}" if "," in metric and first in metrics else ""
        raise LlmclError(f"recipe key 'eval.metric.{task}': {metric!r} is not a metric {task} reports in "
                         f"{run_dir} (it reports {', '.join(sorted(metrics)) or 'none'}{hint})")
    higher = (cell.get("higher_is_better_by_metric") or {}).get(metric, metric.split(",")[0] not in M.LOWER_IS_BETTER)
    return {**cell, "metric": metric, "value": metrics[metric], "stderr": (cell.get("stderrs") or {}).get(metric),
            "higher_is_better": higher}


def _compute_metrics(report: RunReport) -> None:
    groups = _summaries(report, "stage")
    report.after_stage = [a for after, _ in groups.values() for a in after]
    if len(groups) == 1:
        report.summary = next(iter(groups.values()))[1]
    else:  # scores in different units: one summary per metric, none over all of them
        report.summary = {"AA": None, "BWT": None, "FWT": None, "forgetting": None}
        report.by_metric = {metric: summary for metric, (_, summary) in groups.items()}
    if any(c.kind == "stage_choice" for c in report.columns):
        report.summary_choice = next(iter(_summaries(report, "stage_choice").values()))[1]
    report.missing = _missing_cells(report)
    by_stage = {s: k for k, s in enumerate(report.row_stage) if s is not None}
    if report.row_stage and report.row_stage[0] is None and by_stage:
        last = by_stage[max(by_stage)]
        for k, c in enumerate(report.columns):
            if c.kind == "general":
                now, before = (M.oriented(report.values[r][k], c.higher_is_better) for r in (last, 0))
                report.general_delta[c.task] = None if now is None or before is None else now - before


def _summaries(report: RunReport, kind: str) -> dict[str, tuple[list[dict[str, Any]], dict[str, float | None]]]:
    """{metric: (after each evaluated stage, at the last one)}: AA, BWT, FWT, forgetting over the columns of `kind`
    scored with that metric (one entry when they share one; none without such columns: an empty summary)."""
    T = len(report.stage_names)
    by_stage = {s: k for k, s in enumerate(report.row_stage) if s is not None}
    groups: dict[str, dict[int, int]] = {}  # metric -> {stage: column}
    for k, c in enumerate(report.columns):
        if c.kind == kind:
            groups.setdefault(c.metric, {})[c.stage] = k
    empty = {"AA": None, "BWT": None, "FWT": None, "forgetting": None}
    out: dict[str, tuple[list[dict[str, Any]], dict[str, float | None]]] = {}
    for metric, stage_col in (groups or {"": {}}).items():
        def score(row_index: int, stage: int) -> float | None:
            k = stage_col.get(stage)
            return None if k is None else M.oriented(report.values[row_index][k], report.columns[k].higher_is_better)

        # A[i][j]: a stage whose row is missing is a row of missing cells, not the end of the matrix
        A: M.Matrix = [[score(by_stage[i], j) for j in range(T)] if i in by_stage else [None] * T for i in range(T)]
        base = [score(0, j) for j in range(T)] if report.row_stage and report.row_stage[0] is None else None
        after = [{"stage": k, "name": report.stage_names[k], **({"metric": metric} if len(groups) > 1 else {}),
                  **M.summary(A, base, k)} for k in sorted(by_stage)]
        summary = {key: after[-1][key] for key in empty} if after else dict(empty)
        out[metric] = (after, summary)
    return out


def _missing_cells(report: RunReport) -> list[tuple[str, str]]:
    """The stage-task cells AA and BWT read, up to the last evaluated stage, that hold no score: the diagonal,
    and the last row (every row's lower triangle with eval.seen_stages: all)."""
    by_stage = {s: k for k, s in enumerate(report.row_stage) if s is not None}
    if not by_stage:
        return []
    last = max(by_stage)
    cols = {c.stage: k for k, c in enumerate(report.columns) if c.kind == "stage"}
    wanted = [(i, j) for i in range(last + 1) for j in range(i + 1)
              if i == j or i == last or report.seen_stages == "all"]
    return [(report.stage_names[i], report.columns[cols[j]].label) for i, j in wanted
            if j in cols and (i not in by_stage or report.values[by_stage[i]][cols[j]] is None)]
