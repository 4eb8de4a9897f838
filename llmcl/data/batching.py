"""Deterministic batches: the examples of optimizer step s are a pure function of (seed, stage, s).

A global batch is batch_size x grad_accum x world_size items, laid out micro-batch by micro-batch and rank
by rank, so one process with grad_accum=2 sees exactly the items two processes with grad_accum=1 see
together. An item is (source, index): source 0 is the stage's own data, read in a seeded order epoch after
epoch; sources 1.. are replay pools (see llmcl.data.mixing). With replay ratio r, step s holds
floor(r*G*(s+1)) - floor(r*G*s) replay items, so after any number of steps the replayed share is within one
item of r (compute-equivalent replay: the stage's own data fills only the rest). Resuming at step s needs
no loader state: it just asks for step s.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from llmcl.data.formatting import IGNORE, Example

Item = tuple[int, int]


class ListPool:
    """Examples held in memory (prompt/completion, chat)."""

    def __init__(self, examples: list[Example]):
        self.examples = examples
        self._labels = [sum(1 for x in e.labels[1:] if x != IGNORE) for e in examples]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, j: int) -> Example:
        return self.examples[j]

    def label_count(self, j: int) -> int:
        return self._labels[j]

    def mean_label_count(self) -> float:
        """Trained tokens an example carries, on average."""
        return sum(self._labels) / len(self._labels)


@dataclass
class BatchPlan:
    n_examples: int
    batch_size: int
    grad_accum: int
    world_size: int
    seed: int
    stage: int
    replay_ratio: float = 0.0
    replay_sizes: Sequence[int] = ()
    """Sizes of the replay pools (sources 1, 2, ...)."""
    replay_weights: Sequence[float] = ()
    _perms: dict[int, list[int]] = field(default_factory=dict, repr=False)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    @property
    def replaying(self) -> bool:
        return self.replay_ratio > 0 and len(self.replay_sizes) > 0

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            order = list(range(self.n_examples))
            random.Random(f"llmcl-order:{self.seed}:{self.stage}:{epoch}").shuffle(order)
            self._perms = {epoch: order}  # steps only move forward: keep one epoch
        return self._perms[epoch]

    def _own(self, pos: int) -> int:
        epoch, i = divmod(pos, self.n_examples)
        return self._perm(epoch)[i]

    def replay_before(self, step: int) -> int:
        """Replay items in steps 0..step-1."""
        if not self.replaying:
            return 0
        return math.floor(self.replay_ratio * self.global_batch * step + 1e-9)

    def replay_count(self, step: int) -> int:
        return self.replay_before(step + 1) - self.replay_before(step)

    def own_consumed(self, step: int) -> int:
        """Own-data examples used by steps 0..step-1 (the stage's budget shrinks by what replay takes)."""
        return step * self.global_batch - self.replay_before(step)

    def _replay_item(self, q: int) -> Item:
        """The q-th replay item of the stage: a source by weight, then an index, both seeded (with replacement)."""
        rng = random.Random(f"llmcl-replay:{self.seed}:{self.stage}:{q}")
        source = rng.choices(range(len(self.replay_sizes)), weights=self.replay_weights)[0]
        return source + 1, rng.randrange(self.replay_sizes[source])

    def step_items(self, step: int) -> list[Item]:
        """All items of the global batch of optimizer step `step` (0-based)."""
        g = self.global_batch
        r = self.replay_count(step)
        start = self.own_consumed(step)
        own = [(0, self._own(start + k)) for k in range(g - r)]
        if not r:
            return own
        q0 = self.replay_before(step)
        replay = [self._replay_item(q0 + k) for k in range(r)]
        slots = set(random.Random(f"llmcl-slots:{self.seed}:{self.stage}:{step}").sample(range(g), r))
        own_iter, replay_iter = iter(own), iter(replay)
        return [next(replay_iter) if k in slots else next(own_iter) for k in range(g)]

    def step_indices(self, step: int) -> list[int]:
        """Own-data indices of the step (all of them when there is no replay)."""
        return [j for src, j in self.step_items(step) if src == 0]

    def micro_items(self, step: int, micro: int, rank: int) -> list[Item]:
        """The items rank `rank` trains on in micro-batch `micro` of step `step`."""
        start = (micro * self.world_size + rank) * self.batch_size
        return self.step_items(step)[start:start + self.batch_size]

    def micro_indices(self, step: int, micro: int, rank: int) -> list[int]:
        return [j for _, j in self.micro_items(step, micro, rank)]



def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding gets attention_mask 0 and label IGNORE."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_packed(examples: list[Example], pad_id: int, capacity: int | None) -> dict[str, torch.Tensor]:
    """The same examples laid out as packed rows of at most `capacity` tokens (first-fit decreasing: longest
    first, each into the first row it fits; ties in batch order), right-padded to the fullest row; capacity
    None: all of them in one row, with no padding.

    Every example keeps its tokens and labels, with its positions (`position_ids`) restarting at 0, and the
    label of its first token IGNORE (in a row of its own that label is never a target; here it would be the
    previous example's last prediction). A row's padding restarts its positions too, so it is a sequence of
    its own. The model gets no attention_mask (`model_inputs`): transformers then confines attention to each
    example from the position ids (eager builds a block-diagonal mask, flash-attention runs varlen, and sdpa
    runs per example through llmcl.layers.varlen where the stage switched it, else with the block mask).
    `attention_mask` stays in the batch for the methods: 1 for every token of an example, 0 for padding."""
    lengths = [len(e.input_ids) for e in examples]
    capacity = sum(lengths) if capacity is None else max([capacity] + lengths)
    rows: list[list[int]] = []
    fill: list[int] = []
    for k in sorted(range(len(examples)), key=lambda k: (-len(examples[k].input_ids), k)):
        n = len(examples[k].input_ids)
        row = next((r for r in range(len(rows)) if fill[r] + n <= capacity), None)
        if row is None:
            rows.append([])
            fill.append(0)
            row = len(rows) - 1
        rows[row].append(k)
        fill[row] += n
    width = max(fill)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for k in members:
            e = examples[k]
            n = len(e.input_ids)
            ids[r, at:at + n] = torch.tensor(e.input_ids)
            labels[r, at + 1:at + n] = torch.tensor(e.labels[1:])
            positions[r, at:at + n] = torch.arange(n)
            mask[r, at:at + n] = 1
            at += n
        positions[r, at:] = torch.arange(width - at)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "position_ids": positions}


def make_batch(examples: list[Example], pad_id: int, packing: bool, capacity: int | None) -> dict[str, torch.Tensor]:
    """A micro-batch: packed rows of `capacity` tokens (train.packing; None: one row) or one right-padded row per
    example."""
    return collate_packed(examples, pad_id, capacity) if packing else collate(examples, pad_id)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model gets of a batch: a packed batch goes without its attention_mask (see collate_packed)."""
    if "position_ids" in batch:
        return {k: v for k, v in batch.items() if k != "attention_mask"}
    return batch


def label_tokens(examples: list[Example]) -> int:
    """Tokens that contribute to the loss (labels are shifted by one inside the model)."""
    return sum(sum(1 for x in e.labels[1:] if x != IGNORE) for e in examples)


def fetch(pools: Sequence[Any], items: list[Item]) -> list[Example]:
    return [pools[src][j] for src, j in items]


def label_positions(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model arguments that compute the LM head at the trained positions only (where the model supports it:
    llmcl.models.logits_at_labels): `logits_to_keep`, a boolean [rows, positions] mask of the positions whose next
    token is a target, and `shift_labels`, those targets in the same order. The model's loss is then the same sum
    over the same targets as with every position's logits; its `logits` are [targets, vocabulary]."""
    labels = batch["labels"]
    shifted = torch.full_like(labels, IGNORE)
    shifted[:, :-1] = labels[:, 1:]
    keep = shifted != IGNORE
    return {"logits_to_keep": keep, "shift_labels": shifted[keep]}
