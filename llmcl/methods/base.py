"""The method interface: the seam between the training loop and a continual-learning method.

The loop calls a method at fixed points and never knows which one runs:

    model = method.prepare(model, stage)          # freeze, wrap, add adapters, take SVDs
    params = method.trainable_parameters(model)   # what the optimizer gets
    loop:  loss = method.loss(model, batch, outputs)
           backward; method.after_backward(model); optimizer step; method.after_step(model)
    model = method.end_stage(model, stage)        # merge, freeze experts, snapshot
    manifest = method.save(model, out_dir)        # the stage's model artifact (full weights or adapter)
    method.state_dict() / load_state_dict()       # everything else needed to resume exactly

Each stage starts from the previous stage's saved artifact (loaded by `llmcl.models.load_stage_model`,
which reads the manifest and never imports a method), so a fresh process, a `--stage N` job and an
uninterrupted run all take the same path. A method that changes tensors the optimizer does not own
(an EMA copy, a slow learner) must return them from `state_dict` so step checkpoints restore them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import torch


@dataclass
class MethodConfig:
    """Fields shared by every method's config."""

    name: str = "seqft"
    """Registered method name: seqft, lora, hft, osft, ilora or mora; its own options are listed below."""


@dataclass
class StageInfo:
    """What a method may know about the stage it is preparing for."""

    index: int
    """0-based stage index."""
    name: str
    """Stage name from the recipe."""
    num_stages: int
    """Number of stages in the recipe."""
    max_steps: int
    """Optimizer steps this stage will take."""
    seed: int
    """Seed for this stage (recipe seed + stage index)."""
    origin: dict[str, Any] = dataclasses.field(default_factory=lambda: {"kind": "base"})
    """Manifest of the model this stage starts from: {"kind": "base"} or the previous stage's manifest."""
    batches: Callable[[], Iterator[dict[str, torch.Tensor]]] | None = None
    """Calibration batches of the stage's training data, in training order (for SVDs, statistics)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (a method's extra loss terms are divided by it)."""
    rank: int = 0
    """This process's rank (per-rank randomness, e.g. replay buffers)."""
    world_size: int = 1
    """Number of processes."""


class Method:
    """Base class: full fine-tuning behaviour. Subclasses override what they change."""

    name: ClassVar[str] = "base"
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    adapter: ClassVar[bool] = False
    """True when the trained parameters are an adapter over a frozen base (saved as a PEFT adapter)."""
    zero_stages: ClassVar[tuple[int, ...]] = (1, 2, 3)
    """DeepSpeed ZeRO stages the method works under; others are refused before training with a clear message."""
    zero_note: ClassVar[str] = ""
    """Why some ZeRO stages are not supported (shown in the refusal)."""

    def __init__(self, config: MethodConfig):
        self.config = config

    # -- the interface -------------------------------------------------------------------------
    def prepare(self, model: torch.nn.Module, stage: StageInfo) -> torch.nn.Module:
        return model

    def trainable_parameters(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], outputs: Any) -> torch.Tensor:
        return outputs.loss

    def after_backward(self, model: torch.nn.Module) -> None:
        pass

    def after_step(self, model: torch.nn.Module) -> None:
        pass

    def end_stage(self, model: torch.nn.Module, stage: StageInfo) -> torch.nn.Module:
        return model

    def save(self, model: torch.nn.Module, out_dir: Path, stage: StageInfo,
             state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """Write the stage's model artifact into out_dir; return its manifest (see llmcl.models).

        "path" is relative to out_dir; "merged" entries are relative to the run directory. `state_dict` is the
        consolidated full state dict when the model's parameters are sharded (DeepSpeed ZeRO-3); else None."""
        model.save_pretrained(out_dir / "model", state_dict=state_dict, safe_serialization=True)
        return {"kind": "full", "path": "model"}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def step_metrics(self) -> dict[str, float]:
        """Method-specific numbers for metrics.jsonl (last step's values), e.g. a regulariser's size."""
        return {}

    def describe_stage(self) -> str:
        """One line about what prepare() did this stage (printed at the stage start); empty = nothing to say."""
        return ""

    # -- helpers -------------------------------------------------------------------------------
    def describe(self) -> str:
        fields = {f.name: getattr(self.config, f.name) for f in dataclasses.fields(self.config)}
        return ", ".join(f"{k}={v}" for k, v in fields.items())
