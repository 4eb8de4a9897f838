"""Recipe files: YAML reading with `inherit`, and dotted KEY=VALUE overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from llmcl.errors import LlmclError, RecipeError


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=3e-5' -> (['train', 'lr'], 3e-05). Values are YAML scalars."""
    if "=" not in text:
        raise LlmclError(f"override {text!r} must look like KEY=VALUE, e.g. train.lr=3e-5")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise LlmclError(f"override {text!r}: empty key part in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_override(data: dict[str, Any], parts: list[str], value: Any) -> None:
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        here = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(here, message=f"recipe key '{here}': no such list index "
                                  f"(the list has {len(node)} entries, 0..{len(node) - 1})")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            parent = ".".join(parts[:i])
            raise RecipeError(parent, message=f"recipe key '{parent}' holds a value, not a mapping; cannot set '{here}'")


def _merge(parent: Any, child: Any) -> Any:
    """Child values win; mappings merge key by key; lists and scalars are replaced whole."""
    if isinstance(parent, dict) and isinstance(child, dict):
        out = dict(parent)
        for k, v in child.items():
            out[k] = _merge(parent.get(k), v) if k in parent else v
        return out
    return child


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe file as a dict; `inherit: other.yaml` (relative to this file) merges this one over another."""
    p = Path(path)
    if not p.is_file():
        raise LlmclError(f"recipe file '{path}' not found")
    data = _read_one(p)
    parent = data.pop("inherit", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise RecipeError("inherit", parent, "the path of another recipe file")
    parent_path = (p.parent / parent).resolve()
    if parent_path in _seen or parent_path == p.resolve():
        raise LlmclError(f"recipe file '{path}': 'inherit' forms a cycle through {parent_path}")
    if not parent_path.is_file():
        raise RecipeError("inherit", parent, f"an existing recipe file (looked for {parent_path})")
    base = read_yaml(parent_path, _seen + (p.resolve(),))
    base.pop("name", None)  # a child is its own run unless it names itself
    base.pop("description", None)
    child_method, base_method = data.get("method"), base.get("method")
    if isinstance(child_method, dict) and isinstance(base_method, dict) and \
            child_method.get("name", base_method.get("name")) != base_method.get("name"):
        base.pop("method")  # another method: its options do not carry over
    return _merge(base, data)


def _read_one(p: Path) -> dict[str, Any]:
    path = str(p)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise LlmclError(f"recipe file '{path}' is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise LlmclError(f"recipe file '{path}' is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise LlmclError(f"recipe file '{path}' must hold a mapping of keys (model, method, train, stages, ...)")
    return data
