"""HFT, Half Fine-Tuning (Hui et al. 2024): every stage trains a freshly drawn half of the weight matrices and
freezes the other half, so roughly half of what earlier stages learned is left untouched.

Mask, drawn at the start of every stage from (seed, stage), per decoder layer and weight category:
  attention  {q, k, v, o}      train 2 of 4 in every layer
  ffn        {gate, up, down}  train 2 of 3 in a random half of the layers and 1 of 3 in the other half
  norms      {input, post-attn} train 1 of 2 (half of a layer's norms where it has more, llmcl.methods.arch)
With another `ratio` each category trains round(ratio x matrices in it) matrices, spread over the layers as
evenly as possible. `granularity: layer` trains all of a random half of the layers; `model` draws the half
from all block matrices at once (the paper's coarser ablations).

Embeddings, LM head and final norm are frozen by default (`embeddings: trained` to change that): they are
shared by every task and token, so updating them every stage is a direct path to forgetting; they are also
the largest single matrices (tied in SmolLM2: 28M of 135M parameters), so freezing them adds to HFT's
savings. Frozen parameters get requires_grad=False: no gradients, no optimizer state.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Literal

import torch

from llmcl import methods
from llmcl.config import KeyFn, require
from llmcl.methods import arch
from llmcl.methods.base import Method, MethodConfig, StageInfo, merge_stage_records

CATEGORIES = ("attention", "ffn", "norms")


@dataclass
class HFTConfig(MethodConfig):
    """Half Fine-Tuning: a new random half of the weight matrices trains in every stage."""

    name: str = "hft"
    """Always 'hft'."""
    ratio: float = 0.5
    """Fraction of the matrices of each category that train in a stage (the paper's update ratio)."""
    granularity: Literal["category", "layer", "model"] = "category"
    """category = per layer and weight category (the paper's HFT); layer = whole layers; model = all block matrices pooled."""
    embeddings: Literal["frozen", "trained"] = "frozen"
    """Token embeddings, LM head and final norm: frozen (default, see the module docs) or trained every stage."""

    def check(self, key: KeyFn) -> None:
        require(0 < self.ratio < 1, key("ratio"), self.ratio, "a fraction in (0, 1)")


def _spread(rng: random.Random, per_layer: list[list[str]], ratio: float) -> list[str]:
    """round(ratio x all) names, as evenly as possible over the layers: base per layer, +1 in random layers."""
    n_layers = len(per_layer)
    total = round(ratio * sum(len(names) for names in per_layer))
    base, extra = divmod(total, n_layers)
    plus = set(rng.sample(range(n_layers), extra))
    chosen: list[str] = []
    for i, names in enumerate(per_layer):
        chosen += rng.sample(names, min(len(names), base + (1 if i in plus else 0)))
    return chosen


@methods.register
class HFT(Method):
    config_class = HFTConfig

    def __init__(self, config: HFTConfig):
        super().__init__(config)
        self.masks: list[dict[str, Any]] = []

    def draw(self, model: torch.nn.Module, seed: int) -> dict[str, list[str]]:
        """The module names that train this stage, by category (a pure function of the model layout and seed)."""
        cfg = self.config
        mapping = arch.layer_map(model, self.name)
        per_cat = {c: [[n for n, _ in layer] for layer in arch.matrices(model, mapping, c)] for c in CATEGORIES}
        rng = random.Random(f"llmcl-hft:{seed}")
        if cfg.granularity == "category":
            chosen = {c: _spread(rng, per_cat[c], cfg.ratio) for c in CATEGORIES}
        elif cfg.granularity == "layer":
            n_layers = len(per_cat["attention"])
            layers = set(rng.sample(range(n_layers), round(cfg.ratio * n_layers)))
            chosen = {c: [n for i, names in enumerate(per_cat[c]) if i in layers for n in names] for c in CATEGORIES}
        else:  # model: all block matrices pooled, and all norms pooled
            pooled = [n for c in ("attention", "ffn") for names in per_cat[c] for n in names]
            norms = [n for names in per_cat["norms"] for n in names]
            picked = set(rng.sample(pooled, round(cfg.ratio * len(pooled))))
            chosen = {"attention": [n for names in per_cat["attention"] for n in names if n in picked],
                      "ffn": [n for names in per_cat["ffn"] for n in names if n in picked],
                      "norms": rng.sample(norms, round(cfg.ratio * len(norms)))}
        chosen["embeddings"] = [n for n, _ in arch.outside_layers(model, mapping)] if cfg.embeddings == "trained" else []
        return chosen

    def prepare(self, model: torch.nn.Module, stage: StageInfo) -> torch.nn.Module:
        chosen = self.draw(model, stage.seed)
        modules = dict(model.named_modules())
        for p in model.parameters():
            p.requires_grad_(False)
        for names in chosen.values():
            for n in names:
                for p in modules[n].parameters():
                    p.requires_grad_(True)
        self.masks = [m for m in self.masks if m["stage"] != stage.index]
        self.masks.append({"stage": stage.index, "seed": stage.seed, "trained": chosen})
        return model

    def state_dict(self) -> dict[str, Any]:
        return {"masks": self.masks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masks = merge_stage_records(state.get("masks", []), self.masks)
