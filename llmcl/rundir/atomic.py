"""Atomic writes: JSON files and whole directories appear complete or not at all; tensor trees without pickle."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from llmcl.errors import environment_fault


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def write_json(path: Path, data: Any, writer: str = "") -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n", writer)


def write_text(path: Path, text: str, writer: str = "") -> None:
    """`path` holds `text` whole, or keeps what it held; a refused write names `path` (EnvironmentFault).
    `writer` tells apart processes that may write the same file at once (each its own temporary file)."""
    tmp = path.with_name(path.name + ".tmp" + writer)
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    except Exception as exc:
        _give_up(exc, tmp, path)
    os.replace(tmp, path)


def _give_up(exc: Exception, tmp: Path, final: Path) -> None:
    """A write of `final` failed: remove its temporary copy (the old `final` is untouched) and re-raise, as a
    one-line EnvironmentFault when the machine refused it."""
    if tmp.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)
    fault = environment_fault(exc, final)
    if fault is not None:
        raise fault from None
    raise exc


def write_dir(final: Path, write: Callable[[Path], None]) -> None:
    """Fill a temporary directory with `write`, then swap it in for `final`."""
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        _as_umask_allows(tmp)
    except Exception as exc:
        _give_up(exc, tmp, final)
    swap_in(tmp, final)


def _as_umask_allows(directory: Path) -> None:
    """Every file under `directory` readable as the user's umask allows: libraries write some through 0600
    temporary files (transformers' safetensors weights), which another user or a group could not load."""
    mask = os.umask(0)
    os.umask(mask)
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~mask)


def swap_in(tmp: Path, final: Path) -> None:
    """Replace `final` by the complete directory `tmp` (an old `final` survives as .old until the swap is done)."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(final: Path) -> Path | None:
    """The directory after an interrupted `write_dir` (the old copy if the swap was cut short)."""
    old = final.with_name(final.name + ".old")
    if not final.exists() and old.exists():
        os.replace(old, final)
    shutil.rmtree(final.with_name(final.name + ".tmp"), ignore_errors=True)
    return final if final.exists() else None


def remove_dir(final: Path) -> None:
    """`final` and whatever an interrupted `write_dir` left beside it."""
    for suffix in ("", ".tmp", ".old"):
        shutil.rmtree(final.with_name(final.name + suffix), ignore_errors=True)


def save_tree(tree: dict[str, Any], directory: Path, stem: str) -> None:
    """Split a nested dict into tensors (<stem>.safetensors) and everything else (<stem>.json)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[path] = node.detach().contiguous().cpu()
            return {"__tensor__": path}
        if isinstance(node, dict):
            return {str(k): walk(v, f"{path}/{k}") for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(node)]
        return node

    skeleton = walk(tree, "")
    write_json(directory / f"{stem}.json", skeleton)
    if tensors:
        save_file(tensors, str(directory / f"{stem}.safetensors"))


def load_tree(directory: Path, stem: str) -> dict[str, Any]:
    """What `save_tree` wrote ({} when there is nothing)."""
    meta = directory / f"{stem}.json"
    if not meta.exists():
        return {}
    skeleton = json.loads(meta.read_text())
    st = directory / f"{stem}.safetensors"
    tensors = load_file(str(st)) if st.exists() else {}

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if set(node) == {"__tensor__"}:
                return tensors[node["__tensor__"]]
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(skeleton)
