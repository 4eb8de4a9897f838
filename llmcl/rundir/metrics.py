"""metrics.jsonl: one JSON object per logged optimizer step (written by llmcl.train.metrics, read by the report)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmcl.rundir.layout import METRICS


def append(run_dir: Path, record: dict[str, Any]) -> None:
    with open(Path(run_dir) / METRICS, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def truncate(run_dir: Path, stage: int, after_step: int) -> None:
    """Drop lines a resumed stage will write again (logged after its last checkpoint)."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec.get("stage", -1) < stage or (rec.get("stage") == stage and rec.get("step", 0) <= after_step):
            keep.append(line)
    tmp = path.with_name(METRICS + ".tmp")
    tmp.write_text("".join(k + "\n" for k in keep))
    tmp.replace(path)


def read(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
