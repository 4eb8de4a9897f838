"""A stage's training pools: its own data and the replay sources (earlier stages, named datasets).

Replay is a data concern: any method combines with it. The share of each step that is replayed, and
which replay items, are decided by llmcl.data.batching.BatchPlan from the pool sizes and weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from llmcl.data.batching import ListPool
from llmcl.data.formatting import EncodeStats, bos_of, check_chat_template, detect_format, encode
from llmcl.data.sources import load_records
from llmcl.data.stream import iter_records, text_blocks


@dataclass
class Source:
    name: str
    pool: Any
    weight: float


def first_record(cfg: Any, seed: int, key: str = "data") -> dict[str, Any]:
    for record in iter_records(cfg, "train", seed):
        return record
    from llmcl.errors import LlmclError

    raise LlmclError(f"{key}.path {cfg.path!r}: no training records")


def build_pool(cfg: Any, tokenizer: Any, seq_len: int, seed: int, cache_dir: Path,
               key: str = "data") -> tuple[Any, EncodeStats]:
    """A data source as a pool of examples: packed memory-mapped blocks for text, tokenized examples otherwise
    (`key`: its recipe key, e.g. stages.2.data, for the messages)."""
    fmt = detect_format(cfg, first_record(cfg, seed, key), key)
    if fmt == "text":
        blocks = text_blocks(cfg, "train", tokenizer, seq_len, seed, cache_dir, key)
        stats = EncodeStats(examples=len(blocks), tokens=len(blocks) * seq_len, format="text",
                            label_tokens=len(blocks) * (seq_len - 1))
        return blocks, stats
    examples, stats = encode(load_records(cfg, "train", seed), cfg, tokenizer, seq_len, key)
    return ListPool(examples), stats


class Planned(NamedTuple):
    """One replay source of a stage."""

    name: str  # in the stage's line and the metrics: stage:<name> or the dataset's path
    key: str  # its recipe key, for the messages: stages.K.data, replay.datasets.J or stages.I.replay.datasets.J
    data: Any  # its data config
    weight: float  # its share of the replayed part of a step, relative to the other sources


def replay_plan(recipe: Any, index: int) -> list[Planned]:
    """Every replay source of stage `index`; empty when it replays nothing. A pure function of the recipe."""
    replay = recipe.stage_replay(index)
    if replay.ratio <= 0:
        return []
    planned: list[Planned] = []
    if replay.previous_stages and index > 0 and replay.previous_weight > 0:
        share = replay.previous_weight / index
        planned += [Planned(f"stage:{recipe.stages[k].name}", f"stages.{k}.data", recipe.stages[k].data, share)
                    for k in range(index)]
    key = replay_key(recipe, index, "datasets")
    planned += [Planned(d.path, f"{key}.{j}", d, d.weight) for j, d in enumerate(replay.datasets)]
    return planned


def replay_key(recipe: Any, index: int, name: str) -> str:
    """The recipe key of stage `index`'s replay setting `name` (ratio, datasets): its own, or the recipe-wide one."""
    return f"stages.{index}.replay.{name}" if name in recipe.stages[index].replay else f"replay.{name}"


def replay_sources(recipe: Any, index: int, tokenizer: Any, seq_len: int, cache_dir: Path) -> list[Source]:
    """The replay pools of stage `index` with their weights (empty when the stage replays nothing)."""
    return [Source(p.name, build_pool(p.data, tokenizer, seq_len, recipe.seed, cache_dir, p.key)[0], p.weight)
            for p in replay_plan(recipe, index)]


def replay_token_note(own: Any, replay: list[Source], ratio: float, key: str) -> str | None:
    """A note when replay's share of a step's trained tokens, which the loss averages over, is far from its share
    of the step's examples (`key`: replay.ratio or a stage's): a replayed example carrying more than twice or
    less than half the trained tokens of the stage's own (a text corpus replayed into instruction data)."""
    weight = sum(src.weight for src in replay)
    if ratio <= 0 or not replay or weight <= 0:
        return None
    mine = own.mean_label_count()
    theirs = sum(src.weight * src.pool.mean_label_count() for src in replay) / weight
    if 0.5 <= theirs / mine <= 2:
        return None
    share = ratio * theirs / (ratio * theirs + (1 - ratio) * mine)
    return (f"note: {key}={ratio:g} replays {ratio:.0%} of each step's examples, but a replayed example carries "
            f"{theirs:.0f} trained tokens against {mine:.0f} of this stage's own: about {share:.0%} of the trained "
            "tokens, which the loss averages over, are replayed")


def data_sources(recipe: Any) -> list[tuple[str, Any]]:
    """(recipe key, data config) of every stage's data and every replay dataset, each once."""
    out: list[tuple[str, Any]] = [(f"stages.{i}.data", stage.data) for i, stage in enumerate(recipe.stages)]
    for i in range(len(recipe.stages)):
        key = replay_key(recipe, i, "datasets")
        out += [(f"{key}.{j}", data) for j, data in enumerate(recipe.stage_replay(i).datasets)]
    return list(dict(out).items())  # the recipe-wide replay datasets once


def check_tokenizer(recipe: Any, tokenizer: Any) -> None:
    """Before stage 0 trains (the tokenizer of model.path loaded), what the data needs of it, one line naming the
    key otherwise: every stage and replay source whose data goes through the chat template (chat_template: true,
    messages/sharegpt/alpaca data) has one to go through; text with data.add_bos has a BOS to begin with. Reads
    a record only of sources whose format that decides."""
    for key, cfg in data_sources(recipe):
        if getattr(tokenizer, "chat_template", None) and not (cfg.add_bos and tokenizer.bos_token_id is None):
            continue
        fmt = detect_format(cfg, first_record(cfg, recipe.seed, key), key) if cfg.format == "auto" else cfg.format
        check_chat_template(cfg, fmt, tokenizer, key, recipe.model.path)
        if fmt == "text":
            bos_of(cfg, tokenizer, key)
