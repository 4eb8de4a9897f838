"""MoRA layers: a frozen linear layer plus a growing bank of rank-1 experts, self-activated, no router
(Lu et al. 2025, "Little By Little: Continual Learning via Self-Activated Sparse Mixture-of-Rank Adaptive
Learning"). Model code shared by the `mora` method and the artifact loader (which never imports a method).

For an input x and experts (a_i, b_i), i = 1..n (the frozen bank, then the stage's new experts):
  z_i = a_i . x                      every expert's activation
  s_i = z_i / ||z||_2                relevance: activations normalised over the experts
  S   = the top_k experts by |s_i|   an expert counts whether it fires positively or negatively; z_i keeps its
                                     sign, so b_i is added with the sign of the input's projection
                                     (signed=True: the top_k by s_i itself, the reference code's rule, which
                                     never prefers a negative projection)
  w   = softmax(|s_S| / tau) on S, 0 elsewhere        (tau: temperature, default 0.03; signed: s_S)
  with an inference threshold delta > 0 (eval mode only), experts of S with |s_i| < delta are dropped from the
  softmax; if none is left the layer adds nothing
  y   = W x + scale * sum_i w_i z_i b_i

A new stage adds r experts (a Kaiming-uniform, b zero) and trains only them; freezing moves them into the bank
as they are (no rescaling), so freezing never changes an output. Adding experts does: they join the top-k
competition over the whole bank at once (their b is zero, but they take gate weight), which is how MoRA lets a
new stage route some tokens to new experts without a router.

The "mora" artifact kind (what `save_artifact` writes, the registered loader reads): mora_config.json {targets, top_k, tau, threshold, scale, signed} and
mora_model.safetensors {"<module>.bank_a": n x in, "<module>.bank_b": out x n}.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llmcl import shards
from llmcl.rundir import artifacts


class MoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, top_k: int, tau: float, threshold: float = 0.0, scale: float = 1.0,
                 signed: bool = False):
        super().__init__()
        self.base = base
        self.top_k, self.tau, self.threshold, self.scale, self.signed = top_k, tau, threshold, scale, signed
        dtype, device = base.weight.dtype, base.weight.device
        # the frozen bank is a buffer, not a parameter: never trained, and DeepSpeed ZeRO-3 neither shards it nor
        # chokes on it while it is empty (stage 0). DeepSpeed's bf16/fp16 casts parameters, not buffers: the
        # forward casts the bank to the activations' dtype
        self.register_buffer("bank_a", torch.empty(0, base.in_features, dtype=dtype, device=device))
        self.register_buffer("bank_b", torch.empty(base.out_features, 0, dtype=dtype, device=device))
        self.new_a = nn.Parameter(torch.empty(0, base.in_features, dtype=dtype, device=device))
        self.new_b = nn.Parameter(torch.empty(base.out_features, 0, dtype=dtype, device=device))
        self.track = False
        # selections per expert while track is on, since the method last collected them, and the tokens they were
        # counted over (on the device); `token_mask` (batch x seq, 1 = a real token) leaves padding uncounted
        self.counts = torch.zeros(0, dtype=torch.int64, device=device)
        self.tokens = torch.zeros((), dtype=torch.int64, device=device)
        self.token_mask: torch.Tensor | None = None

    @property
    def n_bank(self) -> int:
        return self.bank_a.shape[0]

    @property
    def n_experts(self) -> int:
        return self.bank_a.shape[0] + shards.shape(self.new_a)[0]

    def add_experts(self, r: int, generator: torch.Generator) -> None:
        """r new trainable experts: a Kaiming-uniform (as LoRA's A), b zero."""
        fan_in = self.base.in_features
        bound = math.sqrt(6 / ((1 + 5) * fan_in))  # kaiming_uniform_ with a=sqrt(5)
        a = (torch.rand(r, fan_in, generator=generator) * 2 - 1) * bound
        w = self.base.weight
        self.new_a = nn.Parameter(torch.cat([self.new_a.data, a.to(w.dtype).to(w.device)]))
        self.new_b = nn.Parameter(torch.cat([self.new_b.data, torch.zeros(w.shape[0], r, dtype=w.dtype, device=w.device)], 1))
        self.reset_stats()

    def freeze(self, keep: torch.Tensor | None = None) -> None:
        """Move the new experts (those in `keep`, default all) into the frozen bank, unchanged."""
        a, b = self.new_a.data, self.new_b.data
        if keep is not None:
            a, b = a[keep], b[:, keep]
        self.bank_a = torch.cat([self.bank_a, a])
        self.bank_b = torch.cat([self.bank_b, b], 1)
        self.new_a = nn.Parameter(self.new_a.data[:0])
        self.new_b = nn.Parameter(self.new_b.data[:, :0])

    def reset_stats(self) -> None:
        self.counts = torch.zeros(self.n_experts, dtype=torch.int64, device=self.base.weight.device)
        self.tokens = torch.zeros((), dtype=torch.int64, device=self.base.weight.device)

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, w): every expert's activation and its gate weight (zero outside the selected experts)."""
        z = torch.cat([nn.functional.linear(x, self.bank_a.to(x.dtype)), nn.functional.linear(x, self.new_a)], dim=-1)
        s = z / (z.norm(dim=-1, keepdim=True) + 1e-12)
        k = min(self.top_k, z.shape[-1])
        top, idx = (s if self.signed else s.abs()).topk(k, dim=-1)
        logits = top / self.tau
        if self.threshold > 0 and not self.training:
            logits = logits.masked_fill(top < self.threshold, float("-inf"))
        w_top = torch.softmax(logits.float(), dim=-1).nan_to_num(0.0).to(z.dtype)  # all dropped -> 0
        w = torch.zeros_like(z).scatter(-1, idx, w_top)
        if self.track:
            with torch.no_grad():
                per_token = idx.reshape(-1, k)  # counted on the device: no host sync in the forward pass
                mask = self.token_mask
                real = (mask.reshape(-1, 1).to(torch.int64) if mask is not None and mask.numel() == per_token.shape[0]
                        else torch.ones_like(per_token[:, :1]))
                self.counts.index_add_(0, per_token.reshape(-1), real.expand_as(per_token).reshape(-1))
                self.tokens += real.sum()
        return z, w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.n_experts == 0:
            return y
        z, w = self.gates(x)
        h = w * z
        n = self.n_bank
        delta = nn.functional.linear(h[..., :n], self.bank_b.to(h.dtype)) + nn.functional.linear(h[..., n:], self.new_b)
        return y + self.scale * delta


def _targets(model: nn.Module, target_modules: str | list[str]) -> list[str]:
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name.split(".")[-1] in ("lm_head", "embed_out", "score"):
            continue
        if target_modules == "all-linear" or any(name == t or name.endswith("." + t) for t in target_modules):
            names.append(name)
    return names


def inject(model: nn.Module, target_modules: str | list[str], top_k: int, tau: float, threshold: float,
           scale: float, signed: bool = False) -> list[str]:
    """Wrap the target linear layers (in place); returns their names. Already-wrapped layers are kept."""
    wrapped = [n for n, m in model.named_modules() if isinstance(m, MoRALinear)]
    if wrapped:
        for n in wrapped:
            m = model.get_submodule(n)
            m.top_k, m.tau, m.threshold, m.scale, m.signed = top_k, tau, threshold, scale, signed
        return wrapped
    names = _targets(model, target_modules)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, MoRALinear(getattr(parent, child), top_k, tau, threshold, scale, signed))
    return names


def layers(model: nn.Module) -> dict[str, MoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MoRALinear)}


def save_artifact(model: nn.Module, out_dir: Path, config: dict[str, Any], keep: dict[str, torch.Tensor] | None = None,
                  state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Write every layer's experts into out_dir/mora as its bank: the frozen bank, then the stage's new experts
    (those in `keep[layer]` where given: the survivors of pruning; all of them mid-stage, for the pre-anneal
    branch of an infinite schedule). The values come from `state_dict` when given (the full weights gathered
    from a sharded model), else from the modules. Returns the manifest."""
    directory = out_dir / "mora"
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, m in layers(model).items():
        get = (lambda k: state_dict[f"{name}.{k}"]) if state_dict is not None else (lambda k: getattr(m, k))
        new_a, new_b = get("new_a"), get("new_b")
        if keep is not None and keep.get(name) is not None:
            new_a, new_b = new_a[keep[name]], new_b[:, keep[name]]
        tensors[f"{name}.bank_a"] = torch.cat([get("bank_a"), new_a]).detach().cpu().contiguous()
        tensors[f"{name}.bank_b"] = torch.cat([get("bank_b"), new_b], 1).detach().cpu().contiguous()
    save_file(tensors, str(directory / "mora_model.safetensors"))
    (directory / "mora_config.json").write_text(json.dumps({**config, "targets": sorted(layers(model))}, indent=2))
    return {"kind": "mora", "path": "mora", "merged": []}


def load_into(model: nn.Module, directory: Path) -> nn.Module:
    """Wrap `model` as saved in `directory` and load its expert bank."""
    cfg = json.loads((directory / "mora_config.json").read_text())
    inject(model, cfg["targets"], cfg["top_k"], cfg["tau"], cfg.get("threshold", 0.0), cfg.get("scale", 1.0),
           cfg.get("signed", False))
    tensors = load_file(str(directory / "mora_model.safetensors"))
    for name, m in layers(model).items():
        w = m.base.weight
        m.bank_a = tensors[f"{name}.bank_a"].to(w.dtype).to(w.device)
        m.bank_b = tensors[f"{name}.bank_b"].to(w.dtype).to(w.device)
    return model


@artifacts.loader("mora")
def _load_artifact(run_dir: Path, manifest: dict[str, Any], model_cfg: Any, seed: int, trainable: bool) -> nn.Module:
    return load_into(artifacts.load_base(run_dir, model_cfg, seed), run_dir / manifest["path"])
