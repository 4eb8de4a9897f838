"""The recipe key reference, generated from the config dataclasses' field docstrings (README's tables)."""

from __future__ import annotations

import dataclasses
import typing

from llmcl import methods, recipe
from llmcl.config import _describe, field_docs

SECTIONS = [
    ("", recipe.Recipe),
    ("model.", recipe.ModelConfig),
    ("method.", recipe.MethodConfig),
    ("train.", recipe.TrainConfig),
    ("stages.N.", recipe.StageConfig),
    ("stages.N.data.", recipe.DataConfig),
    ("replay.", recipe.ReplayConfig),
    ("replay.datasets.N.weight", None),
    ("logging.", recipe.LoggingConfig),
    ("eval.", recipe.EvalConfig),
    ("checkpoints.", recipe.CheckpointsConfig),
    ("distributed.", recipe.DistributedConfig),
]


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default).replace("'", "")
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
        return "(section)" if dataclasses.is_dataclass(value) else repr(value).replace("'", "")
    return "required"


def table(prefix: str, cls: type) -> list[str]:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]) or f.name in ("stages", "method"):
            kind = "section"
        else:
            kind = _describe(hints[f.name])
        doc = docs.get(f.name, "").replace("|", "\\|")
        rows.append(f"| `{prefix}{f.name}` | {kind} | `{_default(f)}` | {doc} |")
    return rows


def method_tables() -> str:
    parts = []
    for name, mcls in sorted(methods.REGISTRY.items()):
        rows = [r for r in table("method.", mcls.config_class) if not r.startswith("| `method.name`")]
        parts.append(f"`method.name: {name}`\n\n| key | type | default | meaning |\n|---|---|---|---|\n" + "\n".join(rows))
    return "\n\n".join(parts)


def compat_table() -> str:
    """README's table of the methods under each distributed configuration, from each method's `zero_refused`:
    tests/test_distributed.py runs every method under DDP and under every ZeRO stage it does not refuse (with and
    without CPU offload), and checks every refusal."""
    rows = ["| method | DDP | ZeRO-2 | ZeRO-3 | CPU offload |", "|---|---|---|---|---|"]
    for name, cls in sorted(methods.REGISTRY.items()):
        zero = {k: "yes" if k not in cls.zero_refused else f"refused: {cls.zero_refused[k]}" for k in (2, 3)}
        if zero[3] == zero[2] != "yes":
            zero[3] = "refused (as ZeRO-2)"
        stages = [f"ZeRO-{k}" for k in (2, 3) if k not in cls.zero_refused]
        offload = f"yes ({', '.join(stages)})" if stages else "no"
        rows.append(f"| `{name}` | yes | {zero[2]} | {zero[3]} | {offload} |")
    return "\n".join(rows) + "\n"


def render() -> str:
    out = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for prefix, cls in SECTIONS:
        if cls is None:  # a replay dataset is a stages.N.data source plus a weight
            out.append(f"| `{prefix}` | a number | `1.0` | "
                       f"{field_docs(recipe.ReplayDataConfig)['weight']} Every other key as in stages.N.data. |")
            continue
        out += table(prefix, cls)
    return "\n".join(out) + "\n\n" + method_tables() + "\n"


if __name__ == "__main__":
    print(render(), end="")
