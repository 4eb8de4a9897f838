"""MoRA (Lu et al. 2025): a growing bank of self-activated rank-1 experts per adapted linear layer
(the layer itself, and the exact selection rule, are in llmcl.layers.mora).

Every stage adds `r` experts per layer and trains only them; at the stage's end their activation statistics
are recorded, experts selected for fewer than `prune_below` of the tokens are pruned (logged), and the rest
are frozen into the bank unchanged. The stage saves the bank as mora/ (config + safetensors).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from llmcl import methods
from llmcl.config import KeyFn, require
from llmcl.layers import mora as mora_layers
from llmcl.methods.base import AdapterConfig, Method, StageInfo, merge_stage_records


@dataclass
class MoRAConfig(AdapterConfig):
    """Self-activated sparse mixture of rank-1 experts, growing stage by stage (r: new experts per layer and stage)."""

    name: str = "mora"
    """Always 'mora'."""
    top_k: int = 4
    """Experts active per token (over the whole bank)."""
    tau: float = 0.03
    """Softmax temperature of the gate weights."""
    threshold: float = 0.0
    """Inference only: drop selected experts whose normalised |activation| is below this (0 = keep all)."""
    scale: float = 4.0
    """Multiplier of the experts' gated output. The gate weights sum to one and tau makes them nearly one-hot,
    so each token gets about one rank-1 update per layer: with scale 1, at a LoRA learning rate, MoRA learned
    several times slower than a LoRA of the same total rank (loss 3.9 vs 2.7 after 24 steps of the built-in
    vocab stage, SmolLM2-135M, lr 1e-3); scale 4 learned as fast (2.3). Fixed for a run: the frozen experts
    were trained with it."""
    prune_below: float = 0.0
    """At a stage's end, prune its experts selected for fewer than this fraction of tokens (0 = keep all)."""
    select: Literal["absolute", "signed"] = "absolute"
    """Which experts fire: the top_k by |s| (an expert whose projection is strongly negative counts too), or by the signed s (the reference code's)."""

    def check(self, key: KeyFn) -> None:
        super().check(key)
        require(self.top_k > 0, key("top_k"), self.top_k, "a positive integer")
        require(self.tau > 0, key("tau"), self.tau, "a number > 0")
        require(0 <= self.threshold < 1, key("threshold"), self.threshold, "a number in [0, 1)")
        require(0 <= self.prune_below < 1, key("prune_below"), self.prune_below, "a fraction in [0, 1)")


@methods.register
class MoRA(Method):
    config_class = MoRAConfig

    def __init__(self, config: MoRAConfig):
        super().__init__(config)
        self.records: list[dict[str, Any]] = []
        self.layers: dict[str, mora_layers.MoRALinear] = {}
        self.stage = -1  # the stage prepare() set up
        # per layer: how often each expert was selected this stage, over every rank, then the token count
        self.selection: dict[str, torch.Tensor] = {}
        self.reduce_sum: Any = lambda t: t
        # per layer, after end_stage: which of the stage's experts join the bank (None: all). The modules are not
        # changed (under ZeRO-3 they are sharded): save() writes the bank with them.
        self.keep: dict[str, torch.Tensor | None] = {}

    def _layer_config(self) -> dict[str, Any]:
        c = self.config
        return {"top_k": c.top_k, "tau": c.tau, "threshold": c.threshold, "scale": c.scale,
                "signed": c.select == "signed"}

    def prepare(self, model: torch.nn.Module, stage: StageInfo) -> torch.nn.Module:
        c = self.config
        for p in model.parameters():
            p.requires_grad_(False)
        if not mora_layers.layers(model):  # stage 0: the layers to wrap
            c.check_targets(model)
        mora_layers.inject(model, c.target_modules, c.top_k, c.tau, c.threshold, c.scale, c.select == "signed")
        generator = torch.Generator().manual_seed(stage.seed)
        self.layers, self.stage, self.reduce_sum = mora_layers.layers(model), stage.index, stage.reduce_sum
        for name, layer in sorted(self.layers.items()):
            layer.add_experts(c.r, generator)
            layer.new_a.requires_grad_(True)
            layer.new_b.requires_grad_(True)
            layer.track = True
        self.selection = {name: torch.zeros(layer.n_experts + 1, dtype=torch.int64, device=layer.counts.device)
                          for name, layer in self.layers.items()}
        return model

    def before_forward(self, batch: dict[str, torch.Tensor]) -> None:
        """Tell the layers which tokens are real, so that padding is not counted (whatever the batch layout)."""
        for layer in self.layers.values():
            layer.token_mask = batch["attention_mask"]

    def after_step(self, model: torch.nn.Module) -> None:
        """Collect the layers' selection counts of this step from every rank (one small all-reduce): every rank
        holds the same statistics, so every rank prunes the same experts and a step checkpoint holds them all."""
        tracked = [(name, layer) for name, layer in self.layers.items() if layer.track]
        if not tracked:
            return
        step = self.reduce_sum(torch.cat([torch.cat([layer.counts, layer.tokens.view(1)]) for _, layer in tracked]))
        offset = 0
        for name, layer in tracked:
            n = layer.n_experts + 1
            self.selection[name] += step[offset:offset + n]
            offset += n
            layer.reset_stats()

    def end_stage(self, model: torch.nn.Module, stage: StageInfo) -> torch.nn.Module:
        """Record activation statistics, decide which new experts are pruned (rarely selected) and which join the
        bank unchanged; save() writes the bank."""
        pruned, kept, freq_all = 0, 0, {}
        self.keep = {}
        for name, layer in mora_layers.layers(model).items():
            counts, tokens = self.selection[name][:-1], int(self.selection[name][-1])
            freq = counts / max(tokens, 1)
            new_freq = freq[layer.n_bank:]
            keep = (new_freq >= self.config.prune_below).nonzero().flatten().cpu() if self.config.prune_below else None
            n_new = layer.n_experts - layer.n_bank
            kept_here = n_new if keep is None else len(keep)
            pruned += n_new - kept_here
            kept += kept_here
            freq_all[name] = [round(float(f), 4) for f in freq]
            self.keep[name] = keep
            layer.track = False
            layer.reset_stats()
        self.selection = {}
        for layer in self.layers.values():
            layer.token_mask = None
        self.records = [r for r in self.records if r["stage"] != stage.index]
        self.records.append({"stage": stage.index, "kept": kept, "pruned": pruned, "activation_frequency": freq_all})
        return model

    def save(self, model: torch.nn.Module, out_dir: Path, stage: StageInfo,
             state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        return mora_layers.save_artifact(model, out_dir, self._layer_config(), self.keep, state_dict)

    def state_dict(self) -> dict[str, Any]:
        if not self.selection:  # between stages (end_stage consumed the counts)
            return {"records": self.records}
        # during a stage, the selection counts so far: pruning and the activation record use them
        return {"records": self.records, "selection": {"stage": self.stage,
                                                       "counts": {n: c.clone() for n, c in self.selection.items()}}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.records = merge_stage_records(state.get("records", []), self.records)
        selection = state.get("selection", {})
        if selection.get("stage") != self.stage:  # counts of another stage (its end, or a branch before it)
            return
        for name, counts in selection["counts"].items():  # resuming this stage: the counts it had
            self.selection[name].copy_(counts)
