"""metrics.jsonl (always) and Accelerate's own trackers (TensorBoard, W&B) when the recipe asks.

One JSON object per logged optimizer step: stage, stage_name, step (1-based within the stage),
global_step (across stages: the step axis of the trackers), loss, lr, grad_norm, tokens, tokens_per_s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


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
        self.path = run_dir / "metrics.jsonl"
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.trackers = bool(trackers)
        if self.trackers:
            accelerator.init_trackers(project, config=flatten(config))

    def truncate(self, stage: int, after_step: int) -> None:
        """Drop lines a resumed stage will write again (logged after its last checkpoint)."""
        if not self.main or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            if rec.get("stage", -1) < stage or (rec.get("stage") == stage and rec.get("step", 0) <= after_step):
                keep.append(line)
        tmp = self.path.with_name("metrics.jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in keep))
        tmp.replace(self.path)

    def log(self, record: dict[str, Any]) -> None:
        if self.main:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        if self.trackers:
            values = {f"train/{k}": v for k, v in record.items()
                      if isinstance(v, (int, float)) and k not in ("stage", "step", "global_step")}
            values["train/stage"] = record["stage"]
            self.accelerator.log(values, step=record["global_step"])

    def close(self) -> None:
        if self.trackers:
            self.accelerator.end_training()


def read(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
