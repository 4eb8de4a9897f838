"""Typed config machinery: build dataclasses from YAML dicts with errors that name the key.

Config classes are plain dataclasses whose fields each carry an attribute docstring (the string literal
right after the field). `field_docs` reads them, so the docs in the source are also the help text.
A class may define `check(self, key)` where `key(field_name)` gives the full YAML key for messages.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import textwrap
import types
import typing
from typing import Any, Callable, Literal, Union

from llmcl.errors import RecipeError, did_you_mean

KeyFn = Callable[[str], str]


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its attribute docstring, for `cls` and its dataclass bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        parts = [_describe(a) for a in args if a is not type(None)]
        text = " or ".join(parts)
        return text + " or null" if type(None) in args else text
    if origin is list:
        if not args:
            return "a list"
        inner = _describe(args[0])
        for article in ("a ", "an "):
            if inner.startswith(article):
                inner = inner[len(article):] + "s"
        return f"a list of {inner}"
    if origin is dict:
        if not args or args[1] is Any:
            return "a mapping"
        k, v = (_describe(a).removeprefix("a ").removeprefix("an ") for a in args)
        return f"a mapping {{{k}: {v}}}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` and return it converted; RecipeError names `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        # try the alternatives in order; int before float keeps `warmup: 10` an int
        for alt in args:
            if alt is type(None):
                continue
            try:
                return coerce(value, alt, key)
            except RecipeError:
                continue
        raise RecipeError(key, value, _describe(tp))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(key, value, "true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise RecipeError(key, value, "an integer")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads `1e-4` as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and math.isfinite(number):
            return number
        raise RecipeError(key, value, "a finite number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise RecipeError(key, value, "a string")
    if origin is Literal:
        if value in args:
            return value
        hint = did_you_mean(str(value), [str(a) for a in args]) if isinstance(value, str) else ""
        raise RecipeError(key, value, "one of " + ", ".join(repr(a) for a in args) + hint)
    if origin is list:
        if not isinstance(value, list):
            if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                value = [value]  # `logging.trackers=tensorboard` on the command line
            else:
                raise RecipeError(key, value, _describe(tp))
        return [coerce(v, args[0], f"{key}.{i}") for i, v in enumerate(value)] if args else list(value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise RecipeError(key, value, _describe(tp))
        if not args:
            return dict(value)
        for k in value:  # a YAML key may be a number, a list, null...
            coerce(k, args[0], f"{key} (the key {k!r})")
        return {k: coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    raise TypeError(f"unsupported annotation {tp!r} at {key}")  # a bug in a config class, not user input


def build(cls: type, data: Any, prefix: str, *, check: bool = True) -> Any:
    """Build dataclass `cls` from mapping `data`; unknown keys get a did-you-mean, values are type-checked."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(prefix or "<root>", data, "a mapping")
    key: KeyFn = (lambda name: f"{prefix}.{name}") if prefix else (lambda name: name)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name in data:
        if name not in fields:
            raise RecipeError(
                key(str(name)),
                message=f"recipe key '{key(str(name))}' is unknown"
                + did_you_mean(str(name), fields, f"{prefix}." if prefix else ""),
            )
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = coerce(data[name], hints[name], key(name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            doc = field_docs(cls).get(name, "")
            raise RecipeError(
                key(name), message=f"recipe key '{key(name)}' is required" + (f": {doc}" if doc else "")
            )
    obj = cls(**kwargs)
    if check and hasattr(obj, "check"):
        obj.check(key)
    return obj


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain dict/list tree (YAML/JSON ready)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def require(ok: bool, key: str, value: Any, expected: str) -> None:
    """Raise a RecipeError for `key` unless `ok`."""
    if not ok:
        raise RecipeError(key, value, expected)
