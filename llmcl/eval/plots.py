"""PNG figures of a run: the accuracy-matrix heatmap and the loss/lr curve with stage boundaries."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heatmap(report: Any, path: Path) -> Path:
    """R as a heatmap; colours are scaled per column (tasks differ in range), cells show the raw values."""
    import numpy as np

    plt = _pyplot()
    values = np.array([[np.nan if v is None else v for v in row] for row in report.values], dtype=float)
    colour = np.full_like(values, np.nan)
    for k, col in enumerate(report.columns):
        column = values[:, k]
        finite = column[np.isfinite(column)]
        if not finite.size:
            continue
        lo, hi = float(finite.min()), float(finite.max())
        if col.higher_is_better and lo >= 0 and hi <= 1:  # accuracies: one absolute scale
            colour[:, k] = column
        elif hi - lo > 1e-3 * max(abs(lo), abs(hi), 1e-12):  # perplexities etc.: scaled within the column
            scaled = (column - lo) / (hi - lo)
            colour[:, k] = scaled if col.higher_is_better else 1 - scaled
        else:
            colour[:, k] = 0.5
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(report.columns), 1.2 + 0.55 * len(report.rows)))
    ax.imshow(np.ma.masked_invalid(colour), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(report.columns)), [f"{c.label}\n({c.metric})" for c in report.columns], fontsize=8)
    ax.set_yticks(range(len(report.rows)), [f"after {r}" if r != "base" else "base" for r in report.rows], fontsize=8)
    for i in range(values.shape[0]):
        for k in range(values.shape[1]):
            if np.isfinite(values[i, k]):
                ax.text(k, i, f"{values[i, k]:.2f}", ha="center", va="center", fontsize=8)
    n_stage = sum(1 for c in report.columns if c.kind == "stage")
    if 0 < n_stage < len(report.columns):
        ax.axvline(n_stage - 0.5, color="black", lw=1.5)
    ax.set_title(f"{report.name} ({report.method}): accuracy matrix", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def loss_curve(run_dir: Path, stage_names: list[str], path: Path) -> Path | None:
    """Loss and lr against the global step, a dashed line at every stage boundary."""
    from llmcl.rundir.metrics import read

    records = read(run_dir)
    if not records:
        return None
    plt = _pyplot()
    steps = [r["global_step"] for r in records]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.plot(steps, [float("nan") if r["loss"] is None else r["loss"] for r in records], color="tab:blue", lw=1.2, label="loss")
    ax.set_xlabel("optimizer step (all stages)")
    ax.set_ylabel("loss", color="tab:blue")
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [r["lr"] for r in records], color="tab:orange", lw=1.0, label="lr")
    lr_ax.set_ylabel("lr", color="tab:orange")
    starts: dict[int, int] = {}
    for r in records:
        starts.setdefault(r["stage"], r["global_step"] - r["step"])
    for stage, start in sorted(starts.items()):
        ax.axvline(start + 0.5, color="grey", ls="--", lw=0.8)
        name = stage_names[stage] if stage < len(stage_names) else str(stage)
        ax.text(start + 1, 1.01, name, transform=ax.get_xaxis_transform(), fontsize=8, va="bottom")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
