"""SeqFT: sequential full fine-tuning, the baseline every continual method is measured against."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmcl import methods
from llmcl.methods.base import Method, MethodConfig, StageInfo


@dataclass
class SeqFTConfig(MethodConfig):
    """Full fine-tuning of every parameter, stage after stage."""

    name: str = "seqft"
    """Always 'seqft'."""
    train_embeddings: bool = True
    """Train the token embeddings and LM head too (false freezes them)."""


@methods.register
class SeqFT(Method):
    config_class = SeqFTConfig

    def prepare(self, model: torch.nn.Module, stage: StageInfo) -> torch.nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        if not self.config.train_embeddings:
            for module in (model.get_input_embeddings(), model.get_output_embeddings()):
                if module is not None:
                    for p in module.parameters():
                        p.requires_grad_(False)
        return model
