"""I-LoRA (Ren et al. 2024, "Analyzing and Reducing Catastrophic Forgetting in Parameter Efficient Tuning"):
two LoRA learners over one frozen base model.

  fast learner  PEFT adapter "fast", trained by the optimizer
  slow learner  PEFT adapter "default", follows the fast one by interpolation after every optimizer step:
                theta_slow <- lam_k * theta_slow + (1 - lam_k) * theta_fast,  lam_k = min(lam, 1 - 1/(k+1))
                (k counts optimizer steps over the whole run, so the warm-up happens once)
  replay        a reservoir buffer over every training sample seen so far (all stages, every rank: one
                reservoir, the same on every rank; `buffer_size`), saved with the method state; each step also trains on a replay batch as large as the current one
  loss          the mean of the cross-entropy on the current and on the replay samples (`ce_weighting: sum` adds
                them) + consistency x the mean squared difference between the fast learner's hidden states on the
                replay samples and the elementwise max of the fast and the slow learner's (`consistency_target:
                slow`: the slow learner's alone), over all layers, padding masked out (the slow pass runs without
                gradient); replay starts at the second stage (`replay_from_stage`). These defaults, and lambda
                0.25, are the reference code's, chosen by the ablation in docs/deviations.md

The slow learner is what each stage saves and evaluates (`evaluate: fast` to change that); both learners and
the buffer go into the method state, so the next stage, and an interrupted one, continue exactly.
Bugs of the reference code avoided here, each covered by a test: the slow adapter really is updated, padding
is masked (attention mask and loss), and the method runs past the first task.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from llmcl import methods, shards
from llmcl.config import KeyFn, require
from llmcl.data.batching import collate, label_positions
from llmcl.data.formatting import Example
from llmcl.methods.base import LoraStyleConfig, Method, StageInfo, StepInputs
from llmcl.models import logits_at_labels
from llmcl.rundir import artifacts

SLOW, FAST = "default", "fast"


@dataclass
class ILoRAConfig(LoraStyleConfig):
    """Interpolation-based dual LoRA with experience replay (r, alpha, dropout, target_modules: both learners)."""

    name: str = "ilora"
    """Always 'ilora'."""
    ema: float = 0.25
    """lambda: how much of the slow learner is kept at each interpolation (after the warm-up); the reference
    code's 0.25 (docs/deviations.md: +0.058 AA over 0.99 on the standard benchmark)."""
    buffer_size: int = 500
    """Reservoir size: samples kept for replay, over all stages."""
    replay_batch: int | None = None
    """Replay samples per micro-batch (default: as many as the current micro-batch)."""
    consistency: float = 1.0
    """gamma: weight of the hidden-state consistency loss."""
    evaluate: Literal["slow", "fast"] = "slow"
    """Which learner a stage saves and evaluates."""
    replay_from_stage: int = 1
    """The first stage (0-based) whose steps replay; earlier stages only fill the reservoir (1, from the second task, as the reference code; 0 replays within the first task too)."""
    consistency_target: Literal["slow", "max"] = "max"
    """What the fast learner's hidden states are pulled toward: the elementwise max of the slow and the fast ones (the reference code's: only a fast state below the slow one is penalised), or the slow learner's ('slow': a symmetric MSE)."""
    ce_weighting: Literal["sum", "mean"] = "mean"
    """How the current and the replay cross-entropy combine: their mean (the reference code's), or their sum."""

    def check(self, key: KeyFn) -> None:
        super().check(key)
        require(0 <= self.ema < 1, key("ema"), self.ema, "a number in [0, 1)")
        require(self.buffer_size > 0, key("buffer_size"), self.buffer_size, "a positive integer")
        require(self.replay_batch is None or self.replay_batch > 0, key("replay_batch"), self.replay_batch,
                "a positive integer or null")
        require(self.consistency >= 0, key("consistency"), self.consistency, "a number >= 0")
        require(self.replay_from_stage >= 0, key("replay_from_stage"), self.replay_from_stage, "a stage index >= 0")


def masked_hidden_mse(fast: tuple[torch.Tensor, ...], slow: tuple[torch.Tensor, ...], mask: torch.Tensor,
                      target: str = "slow") -> torch.Tensor:
    """Mean over layers of the mean squared difference per hidden unit between the fast states and their target
    (the slow states, or with target='max' the elementwise max of both), over non-padding tokens only."""
    m = mask.unsqueeze(-1).to(fast[0].dtype)
    denom = m.sum() * fast[0].shape[-1]
    goal = (lambda f, s: s.detach()) if target == "slow" else (lambda f, s: torch.maximum(f, s).detach())
    per_layer = [(((f - goal(f, s)) ** 2) * m).sum() / denom for f, s in zip(fast, slow)]
    return torch.stack(per_layer).mean()


@methods.register
class ILora(Method):
    config_class = ILoRAConfig

    def __init__(self, config: ILoRAConfig):
        super().__init__(config)
        self.steps = 0  # optimizer steps over the whole run (for lam_k)
        self.seen = 0  # samples offered to the reservoir
        self.buffer: list[Example] = []
        self.fast: dict[str, torch.nn.Parameter] = {}
        self.slow: dict[str, torch.nn.Parameter] = {}
        self.at_labels = False  # set by prepare: whether the model computes logits at chosen positions only
        # fp32 values of both learners, the same on every rank: the slow learner is interpolated here (a bf16 slow
        # adapter could not follow at 1 - lam = 0.01 per step) and written into its adapter; the fast learner's
        # are the optimizer's master weights as of the last step (read by state_dict, without a collective)
        self.values: dict[str, torch.Tensor] = {}
        self.rank, self.seed, self.stage_index = 0, 0, 0
        self.gather: Any = lambda obj: [obj]
        self._metrics: dict[str, torch.Tensor] = {}  # read when a metrics line is written, not every step

    # -- set-up ---------------------------------------------------------------------------------------
    def prepare(self, model: torch.nn.Module, stage: StageInfo) -> torch.nn.Module:
        from peft import PeftModel, get_peft_model

        lora = self.config.peft_config()
        if not isinstance(model, PeftModel):
            self.config.check_targets(model)
            model = get_peft_model(model, lora, adapter_name=SLOW)
        if FAST not in model.peft_config:
            model.add_adapter(FAST, lora)
            # where the base model is (PEFT leaves a second adapter on the CPU when the base is on `meta`)
            model.to(next(p for n, p in model.named_parameters() if f".{FAST}." not in n).device)
        model.set_adapter(FAST)
        params = dict(model.named_parameters())
        self.fast = {n: p for n, p in params.items() if f".{FAST}." in n}
        self.slow = {n.replace(f".{FAST}.", f".{SLOW}."): params[n.replace(f".{FAST}.", f".{SLOW}.")]
                     for n in self.fast}
        if stage.index == 0:  # both learners start from the same initialisation (later: load_state_dict)
            with torch.no_grad():
                for n, p in self.fast.items():
                    self.slow[n.replace(f".{FAST}.", f".{SLOW}.")].copy_(p)
        for p in self.slow.values():
            p.requires_grad_(False)
        self.values = {n: p.detach().float().clone() for n, p in {**self.fast, **self.slow}.items()}
        self.at_labels = logits_at_labels(model)  # the replay passes' LM head at their targets only (same loss)
        self.rank, self.seed, self.gather, self.stage_index = stage.rank, stage.seed, stage.gather, stage.index
        return model

    def trainable_parameters(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        return list(self.fast.items())

    # -- replay ---------------------------------------------------------------------------------------
    def _offer(self, examples: list[Example]) -> None:
        """Reservoir sampling over every sample seen, by every rank (one reservoir, the same on every rank):
        the n-th sample replaces a random slot with chance size/(n+1)."""
        size = self.config.buffer_size
        mine = [(list(e.input_ids), list(e.labels)) for e in examples]
        for example in (Example(*e) for rows in self.gather(mine) for e in rows):  # rank 0's rows first
            if len(self.buffer) < size:
                self.buffer.append(example)
            else:
                j = random.Random(f"llmcl-ilora-reservoir:{self.seed}:0:{self.seen}").randrange(self.seen + 1)
                if j < size:
                    self.buffer[j] = example
            self.seen += 1

    def _replay_batch(self, size: int, device: torch.device) -> dict[str, torch.Tensor] | None:
        if not self.buffer:
            return None
        rng = random.Random(f"llmcl-ilora-replay:{self.seed}:{self.rank}:{self.seen}")
        picks = [self.buffer[rng.randrange(len(self.buffer))] for _ in range(size)]
        return {k: v.to(device) for k, v in collate(picks, pad_id=0).items()}

    # -- the loss -------------------------------------------------------------------------------------
    def loss(self, step: StepInputs) -> torch.Tensor:
        batch, c = step.batch, self.config
        replay = None
        if self.stage_index >= c.replay_from_stage:
            replay = self._replay_batch(c.replay_batch or len(step.examples), batch["input_ids"].device)
        self._offer(step.examples)
        if replay is None:
            return step.outputs.loss
        fast_out = step.forward(**replay, **(label_positions(replay) if self.at_labels else {}),
                                output_hidden_states=True, use_cache=False)
        with torch.no_grad():
            step.model.set_adapter(SLOW, inference_mode=True)
            try:
                slow_out = step.forward(input_ids=replay["input_ids"], attention_mask=replay["attention_mask"],
                                        output_hidden_states=True, use_cache=False,
                                        **({"logits_to_keep": 1} if self.at_labels else {}))  # hidden states only
            finally:
                step.model.set_adapter(FAST)
                for p in self.slow.values():
                    p.requires_grad_(False)
        consistency = masked_hidden_mse(fast_out.hidden_states, slow_out.hidden_states, replay["attention_mask"],
                                        c.consistency_target)
        self._metrics = {"consistency": consistency.detach(), "replay_ce": fast_out.loss.detach()}
        # the replay terms are means over this micro-batch's replay samples: StepInputs.scale makes them a mean
        # over the step's micro-batches and ranks, like outputs.loss
        w = 0.5 if c.ce_weighting == "mean" else 1.0
        return w * step.outputs.loss + (w * fast_out.loss + c.consistency * consistency) / step.scale

    def step_metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in self._metrics.items()}

    # -- the slow learner ---------------------------------------------------------------------------------
    def lam(self, k: int) -> float:
        return min(self.config.ema, 1.0 - 1.0 / (k + 1))

    def after_step(self, model: torch.nn.Module) -> None:
        lam = self.lam(self.steps)
        with torch.no_grad():
            for n, fast in self.fast.items():
                self.values[n] = value = shards.full_fp32(fast)  # collective under DeepSpeed
                slow = n.replace(f".{FAST}.", f".{SLOW}.")
                self.values[slow].mul_(lam).add_(value.to(self.values[slow].device), alpha=1.0 - lam)
            self._write_slow()
        self.steps += 1

    def _write_slow(self) -> None:
        """The slow learner's adapter := its fp32 values (ZeRO-3: gathered, written, partitioned again)."""
        with torch.no_grad(), shards.writable(list(self.slow.values())):
            for n, p in self.slow.items():
                p.data.copy_(self.values[n].to(p.device, p.dtype).view_as(p.data))

    # -- saving -------------------------------------------------------------------------------------------
    def save(self, model: torch.nn.Module, out_dir: Path, stage: StageInfo,
             state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        # from the learners' fp32 values: the same on every rank, whole under ZeRO-3, not rounded to bf16
        return artifacts.save_peft(model, out_dir, [], adapter=SLOW if self.config.evaluate == "slow" else FAST,
                                   state_dict=self.values)

    def state_dict(self) -> dict[str, Any]:
        flat_ids = [t for e in self.buffer for t in e.input_ids]
        flat_labels = [t for e in self.buffer for t in e.labels]
        return {
            "steps": self.steps, "seen": self.seen,
            "learners": {n: v.clone() for n, v in self.values.items()},
            "buffer": {"ids": torch.tensor(flat_ids, dtype=torch.int64),
                       "labels": torch.tensor(flat_labels, dtype=torch.int64),
                       "lengths": torch.tensor([len(e.input_ids) for e in self.buffer], dtype=torch.int64)},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.steps, self.seen = int(state["steps"]), int(state["seen"])
        buf = state["buffer"]
        ids, labels, lengths = buf["ids"].tolist(), buf["labels"].tolist(), buf["lengths"].tolist()
        self.buffer, pos = [], 0
        for n in lengths:
            self.buffer.append(Example(ids[pos:pos + n], labels[pos:pos + n]))
            pos += n
        with torch.no_grad():  # the learners as the previous stage (or the step checkpoint) left them
            for n, p in {**self.fast, **self.slow}.items():
                p.copy_(state["learners"][n])
                self.values[n] = state["learners"][n].to(p.device, torch.float32, copy=True)

