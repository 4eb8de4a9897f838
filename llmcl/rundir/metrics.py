"""metrics.jsonl: one JSON object per logged optimizer step (written by llmcl.train.metrics, read by the report)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from llmcl.rundir.layout import METRICS


def append(run_dir: Path, record: dict[str, Any]) -> None:
    """Add one line; a value that is not finite (a skipped step's gradient norm) is null, so that every line is
    strict JSON (jq, pandas and JSON.parse refuse NaN)."""
    record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    with open(Path(run_dir) / METRICS, "ab+") as fh:
        fh.seek(0, 2)
        torn = False
        if fh.tell():  # a half-written last line (a kill, a full disk) stays on a line of its own
            fh.seek(-1, 2)
            torn = fh.read(1) != b"\n"
        fh.write((("\n" if torn else "") + json.dumps(record, allow_nan=False) + "\n").encode())


def truncate(run_dir: Path, stage: int, after_step: int) -> None:
    """Drop lines a resumed stage will write again (logged after its last checkpoint)."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return
    keep = []
    for line, rec in _records(path):
        if rec.get("stage", -1) < stage or (rec.get("stage") == stage and rec.get("step", 0) <= after_step):
            keep.append(line)
    tmp = path.with_name(METRICS + ".tmp")
    tmp.write_text("".join(k + "\n" for k in keep))
    tmp.replace(path)


def read(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    return [rec for _, rec in _records(path)]


def _records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) of every complete line. A line that is not a JSON object (the half-written last line of a
    killed process or of a full disk) is left out: a resume truncates it away."""
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append((line, rec))
    return out
