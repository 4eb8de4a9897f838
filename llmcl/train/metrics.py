"""metrics.jsonl (always, through llmcl.rundir.metrics) and Accelerate's own trackers (TensorBoard, W&B) when the recipe asks.

One JSON object per logged optimizer step: stage, stage_name, step (1-based within the stage),
global_step (across stages: the step axis of the trackers), loss, lr, grad_norm, tokens, tokens_per_s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmcl.rundir import metrics as metrics_file


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested recipe dict -> {'train.lr': 1e-4, ...} with scalar values (what trackers accept as config)."""
    out: dict[str, Any] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(tree, list):
        if all(not isinstance(v, (dict, list)) for v in tree):
            out[prefix] = str(tree)
        else:
            for i, v in enumerate(tree):
                out.update(flatten(v, f"{prefix}.{i}"))
    else:
        out[prefix] = tree if isinstance(tree, (int, float, str, bool)) else str(tree)
    return out


class MetricsLog:
    def __init__(self, run_dir: Path, accelerator: Any, *, trackers: list[str], project: str, config: dict[str, Any]):
        self.run_dir = run_dir
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.trackers = bool(trackers)
        if self.trackers:
            accelerator.init_trackers(project, config=flatten(config))

    def truncate(self, stage: int, after_step: int) -> None:
        """Drop lines a resumed stage will write again (logged after its last checkpoint)."""
        if self.main:
            metrics_file.truncate(self.run_dir, stage, after_step)

    def log(self, record: dict[str, Any]) -> None:
        if self.main:
            metrics_file.append(self.run_dir, record)
        if self.trackers:
            values = {f"train/{k}": v for k, v in record.items()
                      if isinstance(v, (int, float)) and k not in ("stage", "step", "global_step")}
            values["train/stage"] = record["stage"]
            self.accelerator.log(values, step=record["global_step"])

    def close(self) -> None:
        if self.trackers:
            self.accelerator.end_training()

