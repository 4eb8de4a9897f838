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
from llmcl.methods.base import LoraStyleConfig, Method, StageInfo
from llmcl.rundir import artifacts


@dataclass
class LoRAConfig(LoraStyleConfig):
    """Low-rank adapters over a frozen base model."""

    name: str = "lora"
    """Always 'lora'."""
    between_stages: Literal["continue", "merge"] = "continue"
    """continue = keep training one adapter across stages; merge = merge it into the base at each new stage and start a fresh adapter."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""


@methods.register
class Lora(Method):
    config_class = LoRAConfig

    def prepare(self, model: torch.nn.Module, stage: StageInfo) -> torch.nn.Module:
        from peft import PeftModel, get_peft_model

        cfg = self.config
        if isinstance(model, PeftModel):
            if cfg.between_stages == "continue":
                return model  # loaded trainable from the previous stage's adapter
            model = model.merge_and_unload()
        cfg.check_targets(model)
        return get_peft_model(model, cfg.peft_config(use_rslora=cfg.use_rslora))

    def save(self, model: torch.nn.Module, out_dir: Path, stage: StageInfo,
             state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        origin = stage.origin
        merged = list(origin.get("merged", [])) if origin.get("kind") == "peft" else []
        if origin.get("kind") == "peft" and self.config.between_stages == "merge":
            merged.append(origin["path"])
        return artifacts.save_peft(model, out_dir, merged, state_dict=state_dict)
