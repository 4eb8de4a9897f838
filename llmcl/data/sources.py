"""Read a stage's records: built-in tasks, local files (json, jsonl, csv, parquet, txt), directories, hub datasets."""

from __future__ import annotations

import contextlib
import contextvars
import csv
import json
import random
from pathlib import Path
from typing import Any, Iterator

from llmcl.data import builtin
from llmcl.errors import LlmclError, RecipeError, did_you_mean

EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet", ".txt")
SUFFIXES = "|".join(e[1:] for e in EXTENSIONS)


def is_builtin(path: str) -> bool:
    return path.startswith("builtin:")


def is_local(path: str) -> bool:
    """A filesystem path (as opposed to builtin:... or a hub id like org/name)."""
    if is_builtin(path):
        return False
    p = Path(path).expanduser()
    return p.exists() or path.startswith((".", "/", "~")) or p.suffix in EXTENSIONS or path.count("/") > 1


_UNCHECKED = contextvars.ContextVar("llmcl_data_files_unchecked", default=False)


@contextlib.contextmanager
def files_unchecked() -> Iterator[None]:
    """Inside, check_path leaves local data files alone: for reading back the recipe of a finished run whose data
    is not needed (`llmcl report`, `llmcl export` of a run archived without its data)."""
    token = _UNCHECKED.set(True)
    try:
        yield
    finally:
        _UNCHECKED.reset(token)


def check_path(path: str, key: str, local_only: bool = False) -> None:
    """Validate a data path without reading it (builtin names, file existence, extensions)."""
    if _UNCHECKED.get() and path.strip() and not is_builtin(path):
        return
    if not path.strip():
        raise RecipeError(key, path, "a local file or directory" if local_only
                          else "a built-in task (builtin:NAME), a local file or directory, or a hub dataset id")
    if is_builtin(path):
        name = path.split(":", 1)[1]
        if local_only:
            raise RecipeError(key, path, "a local file (a built-in task brings its own test split)")
        if name not in builtin.TASKS:
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
    if p.is_dir() and data_files(p) == []:
        raise RecipeError(key, message=f"recipe key '{key}': data directory {path!r} holds no data file; expected "
                          f"train.<{SUFFIXES}> (and test.<{SUFFIXES}>) in it, or a data file")


def read_file(path: Path) -> list[dict[str, Any]]:
    """All records of a local data file as dicts."""
    suffix = path.suffix
    try:
        if suffix == ".jsonl":
            return _json_lines(path, path.read_text(encoding="utf-8-sig"))
        if suffix == ".json":
            return _json_records(path, path.read_text(encoding="utf-8-sig"))
        if suffix == ".csv":
            with path.open(newline="", encoding="utf-8-sig") as fh:
                return list(csv_records(path, fh))
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        if suffix == ".txt":
            # lines as the streamed reader cuts them (universal newlines; not str.splitlines' \f, \u2028, ...)
            return [{"text": line} for line in path.read_text(encoding="utf-8-sig").split("\n") if line.strip()]
    except Exception as exc:  # noqa: BLE001
        raise unreadable(path, exc) from None
    raise LlmclError(f"data file {path}: unsupported extension {suffix!r} (use {', '.join(EXTENSIONS)})")


def json_line(path: Path, line: str, n: int) -> Any:
    """The record on line `n` of a JSON-lines file; a bad line is one line naming the file, line and column."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise LlmclError(f"cannot read data file {path}: line {n} column {exc.colno}: {exc.msg}") from None


def _json_lines(path: Path, text: str) -> list[Any]:
    return [json_line(path, line, n) for n, line in enumerate(text.split("\n"), start=1) if line.strip()]


def _json_records(path: Path, text: str) -> list[Any]:
    """A .json file: a list of records, an object holding exactly one list of records, or JSON lines."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        first = next((line for line in text.split("\n") if line.strip()), "")
        try:
            json.loads(first)
        except json.JSONDecodeError:  # not JSON lines either: one document, where the decoder stopped
            raise LlmclError(f"cannot read data file {path}: line {exc.lineno} column {exc.colno}: "
                             f"{exc.msg}") from None
        return _json_lines(path, text)  # JSON lines under a .json name
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise LlmclError(f"{path}: a JSON object must hold exactly one list of records")
        data = lists[0]
    if not isinstance(data, list):
        kind = {bool: "true or false", int: "a number", float: "a number", str: "a string"}.get(type(data), "null")
        raise LlmclError(f"{path}: holds {kind}; a .json data file must hold a list of records (or an object "
                         "holding exactly one list of records)")
    return data


def csv_records(path: Path, fh: Any) -> Iterator[dict[str, Any]]:
    """The rows of an open CSV file as records keyed by its header; a row with more or fewer values than the
    header is one line naming the file and the row."""
    reader = csv.DictReader(fh)
    for n, record in enumerate(reader, start=1):
        if None in record or None in record.values():  # DictReader's place for extra values / missing ones
            count = sum(v is not None for k, v in record.items() if k is not None) + len(record.get(None) or [])
            raise LlmclError(f"cannot read data file {path}: record {n} (line {reader.line_num}) has {count} "
                             f"value{'s' * (count != 1)}, the header {len(reader.fieldnames or [])}")
        yield record


def unreadable(path: Path, exc: Exception, where: str = "") -> Exception:
    """What to raise when parsing a data file failed: one line for a damaged file (JSON, Unicode, CSV, pyarrow's
    errors on a damaged parquet file), the exception itself for anything else."""
    if isinstance(exc, LlmclError):
        return exc
    if isinstance(exc, UnicodeDecodeError):  # (its position is within a chunk of a streamed read: found again here)
        line = _first_undecodable_line(path)
        return LlmclError(f"cannot read data file {path}" + (f" (line {line})" if line else "") + ": not UTF-8 text "
                          f"(byte 0x{exc.object[exc.start]:02x}); save it as UTF-8")
    if isinstance(exc, (ValueError, csv.Error)) or type(exc).__module__.startswith("pyarrow"):
        return LlmclError(f"cannot read data file {path}{where}: {' '.join(str(exc).split())[:160]}")
    return exc


def _first_undecodable_line(path: Path) -> int | None:
    try:
        with path.open("rb") as fh:
            for n, line in enumerate(fh, 1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError:
                    return n
    except OSError:
        pass
    return None


def _split_file(directory: Path, split: str) -> Path | None:
    for ext in EXTENSIONS:
        candidate = directory / f"{split}{ext}"
        if candidate.is_file():
            return candidate
    return None


def data_files(directory: Path) -> list[str] | None:
    """The names of the data files in a directory; None when it cannot be listed (left to the read to report)."""
    try:
        return sorted(f.name for f in directory.iterdir() if f.suffix in EXTENSIONS and f.is_file())
    except OSError:
        return None


def missing_split(directory: Path, split: str, split_name: str) -> LlmclError:
    """The error for a data directory without the file of a split ('train' or 'test', named `split_name`)."""
    present = ", ".join(data_files(directory) or []) or "none"
    return LlmclError(f"data directory {directory} (data.path) has no {split_name}.<{SUFFIXES}> file for "
                      f"data.{split}_split={split_name!r}; data files there: {present}")


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
        raise LlmclError(f"data.holdout={cfg.holdout!r} of data.path {cfg.path!r} leaves no training or no test "
                         f"records ({len(full)} records); expected 1 to {len(full) - 1} records or a fraction "
                         "that gives as many")
    order = list(range(len(full)))
    random.Random(f"llmcl-holdout:{seed}").shuffle(order)
    chosen = sorted(order[:n]) if split == "test" else sorted(order[n:])
    records = [full[i] for i in chosen]
    limit = split_of(cfg, split)[2]
    if limit is not None and limit < len(records):
        records = [records[i] for i in seeded_subset(len(records), limit, split, seed)]
    return records


def _load(cfg: Any, split: str, seed: int) -> list[dict[str, Any]] | None:
    path, split_name, limit = split_of(cfg, split)
    if split_name is None:
        return None
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
                raise missing_split(p, split, split_name)
            records = read_file(f)
        elif split == "test" and not cfg.test_path:
            return None  # a single file is the training data; name test_path for a test split
        else:
            records = read_file(p)
    else:
        records = _hub(path, cfg.subset, split_name)
    if limit is not None and limit < len(records):
        records = [records[i] for i in seeded_subset(len(records), limit, split, seed)]
    return records


def split_of(cfg: Any, split: str) -> tuple[str, str | None, int | None]:
    """(path, split name, record limit) of a data config's 'train' or 'test' split."""
    if split == "train":
        return cfg.path, cfg.train_split, cfg.max_train_samples
    return cfg.test_path or cfg.path, cfg.test_split, cfg.max_test_samples


def seeded_subset(n: int, limit: int, split: str, seed: int) -> list[int]:
    """The indices, in order, of the `limit` of `n` records that data.max_train_samples / max_test_samples keep
    (all of them when limit >= n): a seeded shuffle's first `limit`."""
    order = list(range(n))
    random.Random(f"llmcl-subset:{split}:{seed}").shuffle(order)
    return sorted(order[:limit])


def train_files(cfg: Any) -> list[Path]:
    """The local files a data config's training records come from (its file, or its directory's train split
    file; not test_path nor a directory's test split)."""
    if not cfg.path or not is_local(cfg.path):
        return []
    p = Path(cfg.path).expanduser()
    if p.is_dir():
        return [f] if (f := _split_file(p, cfg.train_split)) else []
    return [p] if p.is_file() else []


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
