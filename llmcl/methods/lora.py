"""LoRA through PEFT, with a choice of what happens between stages:

  continue  every stage keeps training the same adapter over the frozen base model;
  merge     at the start of every stage after the first, the previous adapter is merged into the base
            weights and a fresh adapter is trained (sequential LoRA merging).

Each stage saves a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) that PEFT users
can load with PeftModel.from_pretrained; the manifest lists the adapters merged below it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from llmcl import methods
from llmcl.config import KeyFn, require
from llmcl.methods.base import Method, MethodConfig, StageInfo


@dataclass
class LoraMethodConfig(MethodConfig):
    """Low-rank adapters over a frozen base model."""

    name: str = "lora"
    """Always 'lora'."""
    r: int = 8
    """Adapter rank."""
    alpha: float = 16.0
    """Scaling numerator: the update is (alpha / r) * B A (alpha / sqrt(r) with rslora)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: str | list[str] = "all-linear"
    """Modules to adapt: 'all-linear' or a list of module-name suffixes such as [q_proj, v_proj]."""
    between_stages: Literal["continue", "merge"] = "continue"
    """continue = keep training one adapter across stages; merge = merge it into the base at each new stage and start a fresh adapter."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""

    def check(self, key: KeyFn) -> None:
        require(self.r > 0, key("r"), self.r, "a positive integer")
        require(self.alpha > 0, key("alpha"), self.alpha, "a number > 0")
        require(0 <= self.dropout < 1, key("dropout"), self.dropout, "a number in [0, 1)")


@methods.register
class Lora(Method):
    name = "lora"
    config_class = LoraMethodConfig
    adapter = True

    def prepare(self, model: torch.nn.Module, stage: StageInfo) -> torch.nn.Module:
        from peft import LoraConfig, PeftModel, get_peft_model

        cfg = self.config
        if isinstance(model, PeftModel):
            if cfg.between_stages == "continue":
                return model  # loaded trainable from the previous stage's adapter
            model = model.merge_and_unload()
        peft_config = LoraConfig(
            r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
            use_rslora=cfg.use_rslora, task_type="CAUSAL_LM",
        )
        return get_peft_model(model, peft_config)

    def save(self, model: torch.nn.Module, out_dir: Path, stage: StageInfo,
             state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        model.save_pretrained(out_dir / "adapter", state_dict=state_dict, safe_serialization=True)
        origin = stage.origin
        merged = list(origin.get("merged", [])) if origin.get("kind") == "peft" else []
        if origin.get("kind") == "peft" and self.config.between_stages == "merge":
            merged.append(origin["path"])
        return {"kind": "peft", "path": "adapter", "merged": merged}
