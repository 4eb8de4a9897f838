"""What a run directory promises about its files: each finished stage's files and each step checkpoint's files
are recorded (size and sha256) when they are written and checked before they are loaded; a file that cannot
be parsed is one line naming it and the way out, never a traceback.

Hashing reads each file once more, at stage boundaries and step-checkpoint saves, never per training step.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from llmcl.errors import LlmclError, environment_fault

CHUNK = 8 << 20


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": sha256(path)}


def fingerprint(directory: Path, skip: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """{relative path: {size, sha256}} of every file under `directory` except the relative paths in `skip`."""
    files = sorted(p for p in Path(directory).rglob("*") if p.is_file())
    return {rel: file_record(p) for p in files if (rel := p.relative_to(directory).as_posix()) not in skip}


def model_record(directory: Path) -> dict[str, dict[str, Any]]:
    """{file name: {size, mtime_ns, sha256}} of the files at the top of a model directory (weights, config,
    tokenizer; not subdirectories such as Llama 3's original/)."""
    files = sorted(p for p in Path(directory).iterdir() if p.is_file())
    return {p.name: {**file_record(p), "mtime_ns": p.stat().st_mtime_ns} for p in files}


def model_difference(directory: Path, recorded: dict[str, dict[str, Any]]) -> str | None:
    """How a model directory's files differ from `recorded` (model_record), or None. A file whose size and
    modification time are as recorded is not read again (a model's weights are many GB); one touched since is
    hashed, so a copy of the same bytes is the same model."""
    for name, want in recorded.items():
        path = Path(directory) / name
        if not path.is_file():
            return f"{name} is gone"
        stat = path.stat()
        if stat.st_size != want["size"]:
            return f"{name} has {stat.st_size} bytes, {want['size']} before"
        if stat.st_mtime_ns != want.get("mtime_ns") and sha256(path) != want["sha256"]:
            return f"{name} has other content (sha256 differs)"
    return None


def difference(directory: Path, recorded: dict[str, dict[str, Any]]) -> str | None:
    """How the files under `directory` differ from `recorded` (the first difference), or None. Sizes first
    (cheap), then hashes."""
    for rel, want in recorded.items():
        path = Path(directory) / rel
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{path} has {size} bytes, {want['size']} were written"
    for rel, want in recorded.items():
        if sha256(Path(directory) / rel) != want["sha256"]:
            return f"{Path(directory) / rel} is not the file that was written (sha256 differs)"
    return None


def verify(directory: Path, recorded: dict[str, dict[str, Any]] | None, way_out: str) -> None:
    """Raise a one-line LlmclError when the files under `directory` are not those recorded (no record: old
    run directories, nothing to check)."""
    if not recorded:
        return
    diff = difference(directory, recorded)
    if diff is not None:
        raise LlmclError(f"{diff}: it changed after it was saved; {way_out}")


@contextmanager
def reading(path: Path, way_out: str) -> Iterator[None]:
    """Any failure to parse `path` (JSON, YAML, Unicode, safetensors, pickle, a truncated file) becomes one line
    naming it and `way_out`; what the machine refused (permissions, I/O) stays an environment fault."""
    try:
        yield
    except LlmclError:
        raise
    except Exception as exc:  # noqa: BLE001  (any parser's error on a damaged file)
        fault = environment_fault(exc, path) if isinstance(exc, OSError) else None
        if fault is not None:
            raise fault from None
        if isinstance(exc, FileNotFoundError):
            raise LlmclError(f"{path} is missing; {way_out}") from None
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise LlmclError(f"{path} is damaged ({type(exc).__name__}: {reason}); {way_out}") from None


def read_json(path: Path, way_out: str) -> Any:
    with reading(path, way_out):
        return json.loads(Path(path).read_text(encoding="utf-8"))
