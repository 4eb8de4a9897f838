"""Read a stage's records: built-in tasks, local files (json, jsonl, csv, parquet, txt), directories, hub datasets."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any

from llmcl.data import builtin
from llmcl.errors import LlmclError, RecipeError, did_you_mean

EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet", ".txt")


def is_builtin(path: str) -> bool:
    return path.startswith("builtin:")


def is_local(path: str) -> bool:
    """A filesystem path (as opposed to builtin:... or a hub id like org/name)."""
    if is_builtin(path):
        return False
    p = Path(path).expanduser()
    return p.exists() or path.startswith((".", "/", "~")) or p.suffix in EXTENSIONS or path.count("/") > 1


def check_path(path: str, key: str, local_only: bool = False) -> None:
    """Validate a data path without reading it (builtin names, file existence, extensions)."""
    if is_builtin(path):
        name = path.split(":", 1)[1]
        if local_only or name not in builtin.TASKS:
            raise RecipeError(key, message=f"recipe key '{key}': unknown built-in task {path!r}"
                              + did_you_mean(name, builtin.TASKS))
        return
    if not is_local(path):
        if local_only:
            raise RecipeError(key, path, "an existing local file")
        return  # a hub dataset id; checked when loaded
    p = Path(path).expanduser()
    if not p.exists():
        raise RecipeError(key, message=f"recipe key '{key}': data file {path!r} does not exist")
    if p.is_file() and p.suffix not in EXTENSIONS:
        raise RecipeError(key, path, "a file ending in " + ", ".join(EXTENSIONS))


def read_file(path: Path) -> list[dict[str, Any]]:
    """All records of a local data file as dicts."""
    suffix = path.suffix
    try:
        if suffix == ".jsonl":
            return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if suffix == ".json":
            text = path.read_text(encoding="utf-8")
            try:
                data = json.loads(text)
            except json.JSONDecodeError:  # JSON lines under a .json name
                return [json.loads(line) for line in text.splitlines() if line.strip()]
            if isinstance(data, dict):
                lists = [v for v in data.values() if isinstance(v, list)]
                if len(lists) != 1:
                    raise LlmclError(f"{path}: a JSON object must hold exactly one list of records")
                data = lists[0]
            return list(data)
        if suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as fh:
                return list(csv.DictReader(fh))
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        if suffix == ".txt":
            return [{"text": line} for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except Exception as exc:  # noqa: BLE001
        raise unreadable(path, exc) from None
    raise LlmclError(f"data file {path}: unsupported extension {suffix!r} (use {', '.join(EXTENSIONS)})")


def unreadable(path: Path, exc: Exception, where: str = "") -> Exception:
    """What to raise when parsing a data file failed: one line for a damaged file (JSON, Unicode, CSV, pyarrow's
    errors on a damaged parquet file), the exception itself for anything else."""
    if isinstance(exc, LlmclError):
        return exc
    if isinstance(exc, (ValueError, csv.Error)) or type(exc).__module__.startswith("pyarrow"):
        return LlmclError(f"cannot read data file {path}{where}: {' '.join(str(exc).split())[:160]}")
    return exc


def _split_file(directory: Path, split: str) -> Path | None:
    for ext in EXTENSIONS:
        candidate = directory / f"{split}{ext}"
        if candidate.is_file():
            return candidate
    return None


def _hub(path: str, subset: str | None, split: str) -> list[dict[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(path, subset, split=split)
    except Exception as exc:  # network, missing split, unknown id: all user-facing
        raise LlmclError(f"cannot load hub dataset {path!r} split {split!r}: {str(exc).splitlines()[0]}") from None
    return list(ds)


def load_records(cfg: Any, split: str, seed: int) -> list[dict[str, Any]] | None:
    """Records of `split` ('train' or 'test') for a DataConfig; None when the stage has no such split."""
    if getattr(cfg, "holdout", None) is not None:
        return _held_out(cfg, split, seed)
    return _load(cfg, split, seed)


def _held_out(cfg: Any, split: str, seed: int) -> list[dict[str, Any]]:
    """data.holdout: a seeded share of the training records becomes the test split (and leaves training)."""
    import dataclasses

    full = _load(dataclasses.replace(cfg, holdout=None, max_train_samples=None), "train", seed) or []
    n = cfg.holdout if isinstance(cfg.holdout, int) else round(cfg.holdout * len(full))
    if not 0 < n < len(full):
        raise LlmclError(f"data.holdout={cfg.holdout!r} leaves no training or no test records ({len(full)} records)")
    order = list(range(len(full)))
    random.Random(f"llmcl-holdout:{seed}").shuffle(order)
    chosen = sorted(order[:n]) if split == "test" else sorted(order[n:])
    records = [full[i] for i in chosen]
    limit = cfg.max_train_samples if split == "train" else cfg.max_test_samples
    if limit is not None and limit < len(records):
        keep = list(range(len(records)))
        random.Random(f"llmcl-subset:{split}:{seed}").shuffle(keep)
        records = [records[i] for i in sorted(keep[:limit])]
    return records


def _load(cfg: Any, split: str, seed: int) -> list[dict[str, Any]] | None:
    split_name = cfg.train_split if split == "train" else cfg.test_split
    if split_name is None:
        return None
    limit = cfg.max_train_samples if split == "train" else cfg.max_test_samples
    path = cfg.test_path if (split == "test" and cfg.test_path) else cfg.path
    if is_builtin(path):
        name = path.split(":", 1)[1]
        if split_name not in builtin.SPLITS:
            raise LlmclError(f"built-in task {name!r} has splits {builtin.SPLITS}, not {split_name!r}")
        records = builtin.generate(name, split_name, seed)
    elif is_local(path):
        p = Path(path).expanduser()
        if p.is_dir():
            f = _split_file(p, split_name)
            if f is None:
                if split == "test":
                    return None
                raise LlmclError(f"data directory {p} has no {split_name}.<{'|'.join(e[1:] for e in EXTENSIONS)}> file")
            records = read_file(f)
        elif split == "test" and not cfg.test_path:
            return None  # a single file is the training data; name test_path for a test split
        else:
            records = read_file(p)
    else:
        records = _hub(path, cfg.subset, split_name)
    if limit is not None and limit < len(records):
        order = list(range(len(records)))
        random.Random(f"llmcl-subset:{split}:{seed}").shuffle(order)
        records = [records[i] for i in sorted(order[:limit])]
    return records


def local_files(cfg: Any) -> list[Path]:
    """The local files a data config reads (its file, or its directory's split files, and test_path)."""
    files = []
    for path in (cfg.path, cfg.test_path):
        if not path or not is_local(path):
            continue
        p = Path(path).expanduser()
        if p.is_dir():
            files += [f for split in (cfg.train_split, cfg.test_split) if split and (f := _split_file(p, split))]
        elif p.is_file():
            files.append(p)
    return files
