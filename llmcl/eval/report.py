"""The forgetting report: the accuracy matrix of a run, its AA/BWT/FWT/forgetting, files and tables.

collect(run_dir) reads recipe.yaml, ledger.json and eval/*.json; write() puts report/matrix.json,
report/report.md, report/matrix.png and report/loss.png into the run dir; tables() and compare() give the
rich tables for the terminal (one run, or one row per run side by side).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from llmcl.errors import LlmclError
from llmcl.eval import metrics as M
from llmcl.eval.scoring import BASE, load_run_recipe, read_row
from llmcl.rundir import EVAL, REPORT, Ledger, write_json
from llmcl.rundir.integrity import read_json


@dataclass
class Column:
    task: str
    label: str
    kind: str  # stage | stage_choice (a classification stage's label-set loglikelihood) | general
    stage: int | None
    metric: str
    higher_is_better: bool
    n: int | None = None  # items scored (the first row's count; eval.limit caps it)


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
    """How the rows were scored (SCORING keys of the row files: lm-eval version, weight dtype, item limits,
    few-shot): the distinct values over the rows, in row order; more than one = rows scored differently."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.name, "method": self.method, "model": self.model, "stages": self.stage_names,
            "rows": self.rows,
            "columns": [c.__dict__ for c in self.columns],
            "R": self.values, "stderr": self.stderrs,
            "metrics": {**self.summary, "general_delta": _mean_or_none(list(self.general_delta.values()))},
            "metrics_choice": self.summary_choice, "metrics_by_metric": self.by_metric,
            "missing_cells": [list(cell) for cell in self.missing],
            "after_stage": self.after_stage, "general_delta": self.general_delta,
            "train_seconds": round(self.train_seconds, 3), "stages_done": self.stages_done,
            "scoring": self.scoring,
            "definitions": "AA, BWT, FWT (Lopez-Paz & Ranzato 2017, base model as reference), forgetting "
                           "(Chaudhry et al. 2018) on stage-task scores, lower-is-better metrics negated; see README",
        }


# what a row file records of how it was scored: how the report says it, and what a null value means
SCORING = {"lm_eval_version": ("lm-eval {}", None), "dtype": ("weights in {}", None),
           "limit": ("stage tasks: {} (eval.limit)", "every item"),
           "tasks_limit": ("general tasks: {} (eval.tasks_limit)", "every item"),
           "num_fewshot": ("few-shot: {} (eval.num_fewshot)", "each task's default")}


def scoring_text(report: RunReport) -> str:
    """One sentence: how the rows were scored, and where rows differ."""
    kinds = {c.kind for c in report.columns}
    parts = []
    for key, (template, null) in SCORING.items():
        values = report.scoring.get(key)
        if not values or (key == "limit" and not kinds & {"stage", "stage_choice"}) \
                or (key == "tasks_limit" and "general" not in kinds):
            continue
        shown = [null if v is None else f"at most {v} items" if key.endswith("limit") else str(v) for v in values]
        parts.append(template.format(" / ".join(shown)) + (" [rows differ]" if len(shown) > 1 else ""))
    return ("Scored with " + "; ".join(parts) + ".") if parts else ""


def _mean_or_none(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def collect(run_dir: Path) -> RunReport:
    run_dir = Path(run_dir)
    recipe = load_run_recipe(run_dir, data_files=False)
    ledger = Ledger.read(run_dir)
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
    for key in SCORING:  # rows written before a key was recorded say nothing of it
        for _, _, row in rows:
            if key in row and row[key] not in report.scoring.setdefault(key, []):
                report.scoring[key].append(row[key])
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
    if not recipe.eval.metric or not (Path(run_dir) / EVAL).is_dir():
        return
    for path in sorted((Path(run_dir) / EVAL).glob("*.json")):
        if path.stem != BASE and not (path.stem.startswith("stage-") and path.stem[6:].isdigit()):
            continue  # not a row file
        row = read_row(Path(run_dir), BASE if path.stem == BASE else int(path.stem[6:]))
        for task, cell in (row or {}).get("tasks", {}).items():
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


# -- files ------------------------------------------------------------------------------------------

def _fmt(v: float | None, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _n(column: Column) -> str:
    """The column's item count as its header shows it (a score over 30 items is not one over 3,000)."""
    return "" if column.n is None else f", n={column.n}"


def _signed(v: float | None) -> str:
    return "—" if v is None else f"{v:+.3f}"


def markdown(report: RunReport) -> str:
    cols = report.columns
    lines = [f"# Forgetting report: {report.name}", "",
             f"method `{report.method}`, model `{report.model}`, {report.stages_done}/{len(report.stage_names)} "
             f"stages done, training {report.train_seconds:.0f}s", "", *([scoring_text(report), ""]
                                                                          if report.scoring else []),
             "Accuracy matrix R (row = model after that stage, column = task; metric under the name):", "",
             "| after \\ task | " + " | ".join(f"{c.label} ({c.metric}{_n(c)})" for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for label, vals in zip(report.rows, report.values):
        lines.append(f"| {label} | " + " | ".join(_fmt(v) for v in vals) + " |")
    general = _signed(_mean_or_none(list(report.general_delta.values())))
    if report.by_metric:
        lines += ["", "The stage tasks are scored in different units: AA, BWT, FWT and forgetting over the stages of "
                  "each metric.", "", "| metric | AA | BWT | FWT | forgetting | general delta |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {metric} | {_fmt(s.get('AA'))} | {_signed(s.get('BWT'))} | {_signed(s.get('FWT'))} | "
                  f"{_fmt(s.get('forgetting'))} | {general} |" for metric, s in report.by_metric.items()]
        lines.append("")
    else:
        s = report.summary
        lines += ["", "| AA | BWT | FWT | forgetting | general delta |", "|---|---|---|---|---|",
                  f"| {_fmt(s.get('AA'))} | {_signed(s.get('BWT'))} | {_signed(s.get('FWT'))} | "
                  f"{_fmt(s.get('forgetting'))} | {general} |", ""]
    if report.missing:
        lines += [f"**Incomplete:** {incomplete_text(report)}", ""]
    if report.summary_choice:
        c = report.summary_choice
        lines += ["The same test items scored by loglikelihood over each stage's label set (the `acc` columns): "
                  "a task forgotten here is forgotten; one lost only above answers in other labels.", "",
                  "| AA | BWT | FWT | forgetting |", "|---|---|---|---|",
                  f"| {_fmt(c.get('AA'))} | {_signed(c.get('BWT'))} | {_signed(c.get('FWT'))} | "
                  f"{_fmt(c.get('forgetting'))} |", ""]
    if report.after_stage:
        lines += ["After each stage:", "", "| stage | AA | BWT | FWT | forgetting |", "|---|---|---|---|---|"]
        lines += [f"| {a['name']}{' (' + a['metric'] + ')' if 'metric' in a else ''} | {_fmt(a['AA'])} | "
                  f"{_signed(a['BWT'])} | {_signed(a['FWT'])} | {_fmt(a['forgetting'])} |" for a in report.after_stage]
        lines.append("")
    if report.general_delta:
        lines += ["General ability, change from the base model (negative = lost):", "",
                  "| task | delta |", "|---|---|"]
        lines += [f"| {t.removeprefix('llmcl_')} | {_signed(d)} |" for t, d in report.general_delta.items()]
        lines.append("")
    lines += ["AA = mean of the last row over the stage tasks; BWT = mean of (last row − diagonal); FWT = mean of "
              "(score before a stage − base score); forgetting = mean of (best earlier score − last score). "
              "Lower-is-better metrics enter negated. Definitions: README, 'Forgetting, measured'.", ""]
    return "\n".join(lines)


def incomplete_text(report: RunReport) -> str:
    """One sentence naming the cells the summary lacks and the command that scores them."""
    cells = ", ".join(f"{task} after {row}" for row, task in report.missing[:6])
    more = f" and {len(report.missing) - 6} more" if len(report.missing) > 6 else ""
    return (f"{len(report.missing)} cells the summary reads have no score ({cells}{more}); the numbers above are "
            f"over the cells that have one. `llmcl eval {report.run_dir} --stage N` scores a stage's row.")


def write(report: RunReport) -> list[Path]:
    out = report.run_dir / REPORT
    out.mkdir(exist_ok=True)
    write_json(out / "matrix.json", report.to_dict())
    (out / "report.md").write_text(markdown(report))
    from llmcl.eval import plots

    paths = [out / "matrix.json", out / "report.md"]
    paths.append(plots.heatmap(report, out / "matrix.png"))
    loss = plots.loss_curve(report.run_dir, report.stage_names, out / "loss.png")
    if loss is not None:
        paths.append(loss)
    return paths


# -- terminal tables --------------------------------------------------------------------------------

def tables(report: RunReport) -> list[Any]:
    from rich.table import Table

    from rich.markup import escape

    matrix = Table(title=f"{report.name}: accuracy matrix ({report.method})", title_justify="left",
                   caption=escape(scoring_text(report)) or None, caption_justify="left")
    matrix.add_column("after \\ task")
    for c in report.columns:
        matrix.add_column(f"{c.label}\n[dim]{c.metric}{_n(c)}[/dim]", justify="right")
    for label, vals in zip(report.rows, report.values):
        matrix.add_row(label, *[_fmt(v) for v in vals])
    summary = Table(box=None)
    for name in (["metric"] if report.by_metric else []) + ["AA", "BWT", "FWT", "forgetting", "general delta"]:
        summary.add_column(name, justify="right")
    general = _signed(_mean_or_none(list(report.general_delta.values())))
    for metric, s in (report.by_metric or {"": report.summary}).items():
        summary.add_row(*([metric] if report.by_metric else []), _fmt(s.get("AA")), _signed(s.get("BWT")),
                        _signed(s.get("FWT")), _fmt(s.get("forgetting")), general)
    out = [matrix, summary]
    if report.summary_choice:
        c = report.summary_choice
        choice = Table(box=None, title="label-set loglikelihood (acc columns)", title_justify="left")
        for name in ("AA", "BWT", "FWT", "forgetting"):
            choice.add_column(name, justify="right")
        choice.add_row(_fmt(c.get("AA")), _signed(c.get("BWT")), _signed(c.get("FWT")), _fmt(c.get("forgetting")))
        out.append(choice)
    if report.missing:
        out.append(f"[yellow]incomplete:[/yellow] {incomplete_text(report)}")
    return out


def compare(reports: list[RunReport]) -> tuple[Any, str]:
    """One row per run: the table a user pastes into a paper (rich table, markdown)."""
    from rich.table import Table

    head = ["run", "method", "AA", "BWT", "FWT", "forgetting", "general delta", "train time"]
    table = Table(title="comparison", title_justify="left")
    for h in head:
        table.add_column(h, justify="left" if h in ("run", "method") else "right")
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    names = [r.name for r in reports]
    for r in reports:
        run = r.name + (f" [{r.run_dir.name}]" if names.count(r.name) > 1 else "")  # runs of one recipe: their dirs
        for metric, s in (r.by_metric or {"": r.summary}).items():  # a run in several units: a row per metric
            name = run + (f" ({metric})" if metric else "") + (" (incomplete)" if r.missing else "")
            cells = [name, r.method, _fmt(s.get("AA")), _signed(s.get("BWT")), _signed(s.get("FWT")),
                     _fmt(s.get("forgetting")), _signed(_mean_or_none(list(r.general_delta.values()))),
                     f"{r.train_seconds:.0f}s"]
            table.add_row(*cells)
            md.append("| " + " | ".join(cells) + " |")
    # numbers scored on other items or in another precision are not comparable as they stand (a key a run's rows
    # did not record, written before it was, is not compared)
    differ = [k for k in SCORING if all(k in r.scoring for r in reports)
              and len({repr(r.scoring[k]) for r in reports}) > 1]
    if differ:
        note = (f"The runs were scored differently ({', '.join(differ)}): "
                + " ".join(f"{r.name} [{r.run_dir.name}]: {scoring_text(r)}" for r in reports))
        from rich.markup import escape

        table.caption, table.caption_justify = escape(note), "left"
        md += ["", note]
    return table, "\n".join(md) + "\n"


def run_report(run_dirs: list[Path]) -> list[RunReport]:
    """Collect and write the report of every run dir (the `llmcl report` command)."""
    reports = [collect(Path(d)) for d in run_dirs]
    for r in reports:
        write(r)
    return reports


def current_row_text(report: RunReport) -> str:
    """One line for the training log: the last row and AA/BWT so far."""
    label, vals = report.rows[-1], report.values[-1]
    cells = ", ".join(f"{c.label} {_fmt(v)}" for c, v in zip(report.columns, vals))
    summaries = report.by_metric or {"": report.summary}  # stage tasks in several units: AA and BWT per metric
    return f"eval after {label}: {cells} | " + "; ".join(
        f"{metric + ' ' if metric else ''}AA {_fmt(s.get('AA'))}, BWT {_signed(s.get('BWT'))}"
        for metric, s in summaries.items())


def read_matrix(run_dir: Path) -> dict[str, Any]:
    return read_json(Path(run_dir) / REPORT / "matrix.json", f"write it again: llmcl report {run_dir}")
