"""Deterministic batches: the examples of optimizer step s are a pure function of (seed, stage, s).

A global batch is batch_size x grad_accum x world_size examples, laid out micro-batch by micro-batch and
rank by rank, so one process with grad_accum=2 sees exactly the examples two processes with grad_accum=1
see together. Resuming at step s needs no data-loader state: it just asks for step s.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from llmcl.data.formatting import IGNORE, Example


@dataclass
class BatchPlan:
    n_examples: int
    batch_size: int
    grad_accum: int
    world_size: int
    seed: int
    stage: int

    def __post_init__(self) -> None:
        self._perms: dict[int, list[int]] = {}

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            order = list(range(self.n_examples))
            random.Random(f"llmcl-order:{self.seed}:{self.stage}:{epoch}").shuffle(order)
            self._perms = {epoch: order}  # steps only move forward: keep one epoch
        return self._perms[epoch]

    def step_indices(self, step: int) -> list[int]:
        """Example indices of the whole global batch of optimizer step `step` (0-based)."""
        out = []
        for pos in range(step * self.global_batch, (step + 1) * self.global_batch):
            epoch, i = divmod(pos, self.n_examples)
            out.append(self._perm(epoch)[i])
        return out

    def micro_indices(self, step: int, micro: int, rank: int) -> list[int]:
        """The examples rank `rank` trains on in micro-batch `micro` of step `step`."""
        start = (micro * self.world_size + rank) * self.batch_size
        return self.step_indices(step)[start:start + self.batch_size]

    def steps_per_epoch(self) -> float:
        return self.n_examples / self.global_batch


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


def label_tokens(examples: list[Example]) -> int:
    """Tokens that contribute to the loss (labels are shifted by one inside the model)."""
    return sum(sum(1 for x in e.labels[1:] if x != IGNORE) for e in examples)
