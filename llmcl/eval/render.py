"""How a forgetting report is shown: report/report.md and the other report files, the rich tables of the
terminal (one run, or several side by side), and the training log's line after a stage.

The numbers are report.collect's (llmcl.eval.report); nothing here computes a score.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmcl.eval.report import SCORING, Column, RunReport, collect
from llmcl.rundir import REPORT, write_json
from llmcl.rundir.integrity import read_json


def scoring_text(report: RunReport) -> str:
    """One sentence: how the rows' cells were scored, and where cells differ."""
    parts = []
    for key, (value, template, null) in SCORING.items():
        values = report.scoring.get(key)
        if not values:
            continue
        shown = [null if v is None else value.format(v) for v in values]
        parts.append(template.format(" / ".join(shown)) + (" [cells differ]" if len(shown) > 1 else ""))
    return ("Scored with " + "; ".join(parts) + ".") if parts else ""


# -- cells ----------------------------------------------------------------------------------------

def _fmt(v: float | None, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _n(column: Column) -> str:
    """The column's item count as its header shows it (a score over 30 items is not one over 3,000)."""
    if len(column.ns) > 1:  # rows scored on different items (eval.limit or eval.max_prompt_tokens changed)
        return f", n={'/'.join(map(str, column.ns))} [rows differ]"
    if len(column.items) > 1:  # as many items, other ones (the stage's test data edited between the rows)
        return f", n={column.n} [items differ]"
    return "" if column.n is None else f", n={column.n}"


def _signed(v: float | None) -> str:
    return "—" if v is None else f"{v:+.3f}"


# -- files ----------------------------------------------------------------------------------------

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
    general = _signed(report.general_mean)
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
    from rich.markup import escape
    from rich.table import Table

    matrix = Table(title=f"{report.name}: accuracy matrix ({report.method})", title_justify="left",
                   caption=escape(scoring_text(report)) or None, caption_justify="left")
    matrix.add_column("after \\ task")
    for c in report.columns:
        matrix.add_column(f"{escape(c.label)}\n[dim]{escape(c.metric + _n(c))}[/dim]", justify="right")
    for label, vals in zip(report.rows, report.values):
        matrix.add_row(label, *[_fmt(v) for v in vals])
    summary = Table(box=None)
    for name in (["metric"] if report.by_metric else []) + ["AA", "BWT", "FWT", "forgetting", "general delta"]:
        summary.add_column(name, justify="right")
    general = _signed(report.general_mean)
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
                     _fmt(s.get("forgetting")), _signed(r.general_mean),
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
