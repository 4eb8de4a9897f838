"""A stage's training pools: its own data and the replay sources (earlier stages, named datasets).

Replay is a data concern: any method combines with it. The share of each step that is replayed, and
which replay items, are decided by llmcl.data.batching.BatchPlan from the pool sizes and weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmcl.data.batching import ListPool
from llmcl.data.formatting import EncodeStats, check_chat_template, detect_format, encode
from llmcl.data.sources import load_records
from llmcl.data.stream import iter_records, text_blocks


@dataclass
class Source:
    name: str
    pool: Any
    weight: float


def first_record(cfg: Any, seed: int) -> dict[str, Any]:
    for record in iter_records(cfg, "train", seed):
        return record
    from llmcl.errors import LlmclError

    raise LlmclError(f"data.path {cfg.path!r}: no training records")


def build_pool(cfg: Any, tokenizer: Any, seq_len: int, seed: int, cache_dir: Path) -> tuple[Any, EncodeStats]:
    """A data source as a pool of examples: packed memory-mapped blocks for text, tokenized examples otherwise."""
    fmt = detect_format(cfg, first_record(cfg, seed))
    if fmt == "text":
        blocks = text_blocks(cfg, "train", tokenizer, seq_len, seed, cache_dir)
        stats = EncodeStats(examples=len(blocks), tokens=len(blocks) * seq_len, format="text",
                            label_tokens=len(blocks) * (seq_len - 1))
        return blocks, stats
    examples, stats = encode(load_records(cfg, "train", seed), cfg, tokenizer, seq_len)
    return ListPool(examples), stats


def replay_plan(recipe: Any, index: int) -> list[tuple[str, Any, float]]:
    """(name, data config, weight) of every replay source of stage `index`; empty when it replays nothing.
    A pure function of the recipe."""
    replay = recipe.stage_replay(index)
    if replay.ratio <= 0:
        return []
    planned: list[tuple[str, Any, float]] = []
    if replay.previous_stages and index > 0 and replay.previous_weight > 0:
        share = replay.previous_weight / index
        planned += [(f"stage:{recipe.stages[k].name}", recipe.stages[k].data, share) for k in range(index)]
    planned += [(d.path, d, d.weight) for d in replay.datasets]
    return planned


def replay_sources(recipe: Any, index: int, tokenizer: Any, seq_len: int, cache_dir: Path) -> list[Source]:
    """The replay pools of stage `index` with their weights (empty when the stage replays nothing)."""
    return [Source(name, build_pool(data, tokenizer, seq_len, recipe.seed, cache_dir)[0], weight)
            for name, data, weight in replay_plan(recipe, index)]


def data_sources(recipe: Any) -> list[tuple[str, Any]]:
    """(recipe key, data config) of every stage's data and every replay dataset, each once."""
    out: list[tuple[str, Any]] = [(f"stages.{i}.data", stage.data) for i, stage in enumerate(recipe.stages)]
    for i, stage in enumerate(recipe.stages):
        prefix = f"stages.{i}.replay" if "datasets" in stage.replay else "replay"
        out += [(f"{prefix}.datasets.{j}", data) for j, data in enumerate(recipe.stage_replay(i).datasets)]
    return list(dict(out).items())  # the recipe-wide replay datasets once


def check_chat_templates(recipe: Any, tokenizer: Any) -> None:
    """Before stage 0 trains (the tokenizer of model.path loaded): every stage and replay source whose data goes
    through the chat template (chat_template: true, messages/sharegpt/alpaca data) has one to go through; one
    line naming the key otherwise. Reads nothing when the tokenizer has a chat template."""
    if getattr(tokenizer, "chat_template", None):
        return
    for key, cfg in data_sources(recipe):
        fmt = detect_format(cfg, first_record(cfg, recipe.seed), key) if cfg.format == "auto" else cfg.format
        check_chat_template(cfg, fmt, tokenizer, key, recipe.model.path)
