"""The method interface: the seam between the training loop and a continual-learning method.

The loop calls a method at fixed points, always in this order, and never knows which one runs:

    model = method.prepare(model, stage)          # freeze, wrap, add adapters, take SVDs
    method.load_state_dict(state)                 # the previous stage's state, then (resuming) the step's
    params = method.trainable_parameters(model)   # what the optimizer gets
    every micro-batch:  method.before_forward(batch); the loop's forward pass; loss = method.loss(StepInputs(...))
    every step:         backward; method.after_backward(model); optimizer step; method.after_step(model)
    model = method.end_stage(model, stage)        # merge, freeze experts, snapshot
    manifest = method.save(model, out_dir, stage) # the stage's model artifact (llmcl.rundir.artifacts)
    method.state_dict()                           # everything else needed to continue exactly

Each stage starts from the previous stage's saved artifact (loaded by llmcl.rundir.artifacts, which never
imports a method), so a fresh process, a `--stage N` job and an uninterrupted run take the same path.
A method that changes tensors the optimizer does not own (an EMA copy, a slow learner) returns them from
`state_dict` so that step checkpoints restore them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import torch

from llmcl.config import KeyFn, require
from llmcl.rundir import artifacts


@dataclass
class MethodConfig:
    """Fields shared by every method's config."""

    name: str = "seqft"
    """Registered method name: seqft, lora, hft, osft, ilora or mora; its own options are listed below."""


@dataclass
class AdapterConfig(MethodConfig):
    """Fields shared by the methods that add trainable modules to chosen linear layers of a frozen model."""

    r: int = 8
    """Adapter rank (mora: new rank-1 experts per adapted layer and stage)."""
    target_modules: str | list[str] = "all-linear"
    """Modules to adapt: 'all-linear' (not the LM head) or a list of module-name suffixes such as [q_proj, v_proj]."""

    def check(self, key: KeyFn) -> None:
        require(self.r > 0, key("r"), self.r, "a positive integer")

    def check_targets(self, model: torch.nn.Module) -> None:
        """Refuse, naming method.target_modules, a list with a name no linear layer of `model` (not yet adapted)
        ends with: PEFT would stop with its own error, or drop that name silently where another one matches."""
        if self.target_modules == "all-linear":
            return
        from llmcl.errors import RecipeError

        linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        missing = [t for t in self.target_modules if not any(n == t or n.endswith("." + t) for n in linear)]
        if missing or not self.target_modules:
            suffixes = ", ".join(sorted({n.split(".")[-1] for n in linear}))
            raise RecipeError("method.target_modules", self.target_modules,
                              f"'all-linear' or names of this model's linear layers ({suffixes})")


@dataclass
class LoraStyleConfig(AdapterConfig):
    """Fields of the methods built on PEFT LoRA adapters."""

    alpha: float = 16.0
    """Scaling numerator: the update is (alpha / r) * B A (alpha / sqrt(r) with rslora)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""

    def check(self, key: KeyFn) -> None:
        super().check(key)
        require(self.alpha > 0, key("alpha"), self.alpha, "a number > 0")
        require(0 <= self.dropout < 1, key("dropout"), self.dropout, "a number in [0, 1)")

    def peft_config(self, **extra: Any):
        """PEFT's LoraConfig for these fields."""
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.target_modules, task_type="CAUSAL_LM", **extra)


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
    rank: int = 0
    """This process's rank (per-rank randomness, e.g. which replay samples a rank draws)."""
    world_size: int = 1
    """Number of processes."""
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    """Sum a tensor (on the model's device) over every rank; every rank must call it at the same point. Statistics
    a method decides from (layer importance, expert counts) go through it, so every rank decides the same."""
    gather: Callable[[Any], list[Any]] = lambda obj: [obj]
    """Every rank's `obj` (any picklable value), in rank order; every rank must call it at the same point."""
    zero: int | None = None
    """The DeepSpeed ZeRO stage the stage trains under (None: no DeepSpeed). The model is sharded after
    prepare: a method that edits weights or gradients outside the optimizer goes through llmcl.shards."""


@dataclass
class StepInputs:
    """What `Method.loss` gets for one micro-batch."""

    batch: dict[str, torch.Tensor]
    """The micro-batch on the training device: input_ids, labels, attention_mask (1 = a token of an example).
    With train.packing also position_ids: a row holds several examples (see llmcl.data.batching.collate_packed),
    so rows are not examples, and the model got no attention_mask."""
    outputs: Any
    """The loop's forward pass on `batch` (through the distributed wrapper). outputs.loss is already this
    micro-batch's share of the step's mean over every trained token of every micro-batch and rank."""
    model: torch.nn.Module
    """The model without its distributed wrapper (to switch adapters, read modules)."""
    scale: int
    """The loop multiplies the returned loss by `scale` (= grad_accum x processes) before backward, undoing
    Accelerate's division by grad_accum and DDP's average over ranks. An extra term that is a mean over this
    micro-batch (a regulariser, a replay loss) is divided by `scale` to enter the step as a mean over
    micro-batches and ranks."""
    examples: list[Any]
    """The micro-batch's examples (llmcl.data.formatting.Example: input_ids, labels), in the plan's order,
    whatever the layout of `batch`."""

    def forward(self, **inputs: Any) -> Any:
        """Another forward pass of the model in this step (same parameters, same autocast; its gradients join the
        step's single backward, so it is safe under DDP)."""
        return self.model(**inputs)


def merge_stage_records(loaded: list[dict[str, Any]], current: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-stage records from a loaded state, with what prepare() recorded for the current stage on top."""
    mine = {r["stage"] for r in current}
    return sorted([r for r in loaded if r["stage"] not in mine] + list(current), key=lambda r: r["stage"])


class Method:
    """Base class: full fine-tuning behaviour. Subclasses override what they change."""

    name: ClassVar[str] = "base"
    """Set by @methods.register from config_class's `name` default."""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    zero_refused: ClassVar[dict[int, str]] = {}
    """DeepSpeed ZeRO stages the method does not work under, each with the reason (refused before training)."""

    def __init__(self, config: MethodConfig):
        self.config = config

    def prepare(self, model: torch.nn.Module, stage: StageInfo) -> torch.nn.Module:
        """Make the model this stage trains (called before load_state_dict)."""
        return model

    def trainable_parameters(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def before_forward(self, batch: dict[str, torch.Tensor]) -> None:
        """Called with each micro-batch (see StepInputs.batch) just before the loop's forward pass on it."""

    def loss(self, step: StepInputs) -> torch.Tensor:
        return step.outputs.loss

    def after_backward(self, model: torch.nn.Module) -> None:
        pass

    def after_step(self, model: torch.nn.Module) -> None:
        pass

    def end_stage(self, model: torch.nn.Module, stage: StageInfo) -> torch.nn.Module:
        return model

    def save(self, model: torch.nn.Module, out_dir: Path, stage: StageInfo,
             state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """Write the stage's model artifact into out_dir with a writer of llmcl.rundir.artifacts; return its
        manifest. `state_dict` is the consolidated full state dict when the model's parameters are sharded
        (DeepSpeed ZeRO-3); else None."""
        return artifacts.save_full(model, out_dir, state_dict)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict() returned (called after prepare; {} when there is nothing to restore)."""

    def step_metrics(self) -> dict[str, float]:
        """Method-specific numbers for metrics.jsonl (last step's values), e.g. a regulariser's size."""
        return {}

    def describe_stage(self) -> str:
        """One line about what prepare() did this stage (printed at the stage start); empty = nothing to say."""
        return ""
