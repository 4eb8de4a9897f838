"""The step loop of one stage: every optimizer step from where the stage starts (or resumes) to its end.

The examples of step s are a pure function of (seed, stage, s) and the lr is a pure function of s, so a step
checkpoint holds only the trainable parameters, the optimizer, the RNG and the method state.

The loss of a step is the mean over every trained token of the step, across micro-batches and ranks: the model
gets the step's token count (num_items_in_batch), and the loss is multiplied by `scale` = grad_accum x
processes before backward, undoing Accelerate's division by grad_accum and DDP's average over ranks. That is
the one place the scaling happens; `StepInputs.scale` tells a method's extra loss terms about it. The logged
`loss` is that cross-entropy of the step's own batch for every method, so loss curves compare across methods;
a method that adds terms (I-LoRA: replay cross-entropy and consistency) also logs what it backpropagates as
`objective`, and its terms through `step_metrics`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from llmcl.data.batching import fetch, label_positions, make_batch, model_inputs
from llmcl.errors import LlmclError
from llmcl.methods.base import Method, StepInputs
from llmcl.rundir import artifacts
from llmcl.rundir.steps import rng_state, save_step, save_step_sharded
from llmcl.schedules import lr_at
from llmcl.train import distributed
from llmcl.train.signals import Stopped
from llmcl.train.stage import StageContext, save_model


def train_steps(ctx: StageContext) -> None:
    """Run the stage's optimizer steps; a stop signal saves a step checkpoint and raises Stopped."""
    run, cfg, method, optimizer, model = ctx.run, ctx.cfg, ctx.method, ctx.optimizer, ctx.model
    accelerator, total = run.accelerator, ctx.plan.steps
    device, rank = accelerator.device, accelerator.process_index
    scale = cfg.grad_accum * accelerator.num_processes
    unwrapped = accelerator.unwrap_model(model)
    params = [p for _, p in ctx.named]
    window = _Window(device, objective=type(method).loss is not Method.loss)
    t_stage = time.perf_counter()
    model.train()
    for step in range(ctx.start, total):
        if step == ctx.branch_at and not artifacts.has_branch(run.run_dir, ctx.index, ctx.name):
            save_model(ctx, unwrapped, branch=True)
        lr = lr_at(step, ctx.plan.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        items = ctx.batches.step_items(step)
        n_items = sum(ctx.pools[src].label_count(j) for src, j in items)  # trained tokens of the whole step
        window.replayed += sum(1 for src, _ in items if src)
        window.seen += 1
        step_loss = torch.zeros((), device=device)
        step_objective = torch.zeros((), device=device) if window.objective is not None else None
        for micro in range(cfg.grad_accum):
            examples = fetch(ctx.pools, ctx.batches.micro_items(step, micro, rank))
            batch = make_batch(examples, run.tokenizer.pad_token_id, cfg.packing, ctx.row_tokens)
            window.tokens += int(batch["attention_mask"].sum())  # the examples' tokens, never padding
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    outputs, loss = forward_loss(model, unwrapped, method, batch, examples, n_items, scale,
                                                 at_labels=ctx.logits_at_labels)
                distributed.backward(accelerator, loss * scale)
            step_loss += outputs.loss.detach()  # the step's own cross-entropy: comparable across methods
            if step_objective is not None:
                step_objective += loss.detach()
        method.after_backward(model)
        grad_norm, taken = distributed.step(accelerator, optimizer, params, cfg.max_grad_norm,
                                            take=lambda norm: _finite_or_skip(ctx, norm, step))
        optimizer.zero_grad(set_to_none=True)
        if taken:
            method.after_step(model)
            window.loss += step_loss
            if step_objective is not None:
                window.objective += step_objective
            window.steps += 1

        done = step + 1
        ctx.wall_seconds = ctx.wall_before + time.perf_counter() - t_stage
        if done % cfg.log_every == 0 or done == total:
            _log(ctx, window, done, lr, grad_norm)
        saved = False
        if cfg.save_every and done % cfg.save_every == 0 and done < total:
            t_save = time.perf_counter()
            _save_step(ctx, done)
            window.t_log += time.perf_counter() - t_save  # tokens/s measures training, not checkpoint writes
            saved = True
        if run.stop is not None and done < total and (sig := run.stop.agreed(accelerator)) is not None:
            _stop(ctx, sig, done, saved)  # SIGTERM/SIGUSR1 (preemption, time limit): checkpoint and leave
    ctx.wall_seconds = ctx.wall_before + time.perf_counter() - t_stage


def forward_loss(model: Any, unwrapped: Any, method: Method, batch: dict[str, torch.Tensor], examples: list[Any],
                 n_items: int, scale: int, at_labels: bool = False) -> tuple[Any, torch.Tensor]:
    """One micro-batch: the forward pass (the model's loss is this micro-batch's share of the step's token mean,
    from `n_items`, the step's trained tokens) and the method's loss on it. `at_labels`: the LM head runs at the
    trained positions only (llmcl.models.logits_at_labels; the same loss and gradients)."""
    method.before_forward(batch)
    outputs = model(**model_inputs(batch), **(label_positions(batch) if at_labels else {}), num_items_in_batch=n_items,
                    use_cache=False)
    return outputs, method.loss(StepInputs(batch, outputs, unwrapped, scale, examples))


class Diverged(LlmclError):
    """A non-finite loss or gradient norm with train.on_nonfinite=stop: the stage stops and is not done."""


def _finite_or_skip(ctx: StageContext, grad_norm: Any, step: int) -> bool:
    """Whether to take optimizer step `step` (0-based): yes when the gradient norm is finite; else skip it
    (on_nonfinite=skip, counted) or stop the stage. One scalar read per step (every rank reads the same)."""
    if grad_norm is None or ctx.run.accelerator.mixed_precision == "fp16":
        return True  # fp16: the loss scaler skips overflow steps itself and lowers its scale
    if math.isfinite(float(grad_norm)):
        return True
    if ctx.cfg.on_nonfinite == "skip":
        ctx.skipped += 1
        return False
    raise _diverged(ctx, f"gradient norm {float(grad_norm)}", step + 1)


def _diverged(ctx: StageContext, what: str, done: int) -> Diverged:
    key = f"stages.{ctx.index}.train" if "on_nonfinite" in ctx.run.recipe.stages[ctx.index].train else "train"
    return Diverged(f"stage {ctx.index} ({ctx.name}): non-finite {what} at step {done}; the stage is not marked done "
                    f"and its last step checkpoint (if any) is kept; lower train.lr (in a new --run-dir), check "
                    f"the data, or set {key}.on_nonfinite=skip")


@dataclass
class _Window:
    """What happened since the last metrics line."""

    device: Any
    objective: Any = False
    """The method's own loss (what it backpropagates), when it adds terms to the cross-entropy; else None."""
    loss: torch.Tensor = field(init=False)
    tokens: int = 0
    replayed: int = 0
    steps: int = 0
    """Optimizer steps taken (skipped ones not counted)."""
    seen: int = 0
    t_log: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.objective = torch.zeros((), device=self.device) if self.objective else None


def _log(ctx: StageContext, w: _Window, done: int, lr: float, grad_norm: Any) -> None:
    run = ctx.run
    parts = [w.loss, torch.tensor(float(w.tokens), device=w.device)] + ([w.objective] if w.objective is not None else [])
    totals = run.accelerator.reduce(torch.stack(parts), "sum")
    now = time.perf_counter()
    ctx.tokens_done += int(totals[1])
    loss = float(totals[0]) / w.steps if w.steps else None  # None: every step of the window was skipped
    objective = float(totals[2]) / w.steps if w.steps and w.objective is not None else None
    for what, value in (("loss", loss), ("objective", objective)):
        if value is not None and not math.isfinite(value):  # a backend that hides the gradient norm (DeepSpeed)
            raise _diverged(ctx, f"{what} {value}", done)
    record = {
        "stage": ctx.index, "stage_name": ctx.name, "step": done,
        "global_step": run.ledger.steps_before(ctx.index) + done,
        "loss": loss, **({"objective": objective} if w.objective is not None else {}), "lr": lr, "grad_norm": None if grad_norm is None else float(grad_norm),
        "tokens": ctx.tokens_done, "tokens_per_s": float(totals[1]) / max(now - w.t_log, 1e-9),
        "replay_fraction": w.replayed / (w.seen * ctx.batches.global_batch),
        "elapsed_s": ctx.wall_seconds,
        **({"skipped_steps": ctx.skipped} if ctx.cfg.on_nonfinite == "skip" else {}),
        **{f"{run.recipe.method.name}/{k}": v for k, v in ctx.method.step_metrics().items()},
    }
    run.metrics.log(record)
    run.display.update(done, float("nan") if loss is None else loss, lr, record["tokens_per_s"])
    w.loss.zero_()
    if w.objective is not None:
        w.objective.zero_()
    w.tokens, w.replayed, w.steps, w.seen, w.t_log = 0, 0, 0, 0, now


def _save_step(ctx: StageContext, done: int) -> None:
    accelerator = ctx.run.accelerator
    progress = {"tokens": ctx.tokens_done, "wall_seconds": ctx.wall_seconds, "skipped_steps": ctx.skipped,
                "data_files": ctx.data_files}
    rng = distributed.gather_rng(accelerator, rng_state(accelerator.process_index))  # every rank's
    if distributed.deepspeed_plugin(accelerator) is not None:  # sharded: every rank writes its own shard
        save_step_sharded(ctx.run.run_dir, stage=ctx.index, step=done, save_shards=distributed.shard_saver(ctx.model),
                          main=accelerator.is_main_process, barrier=accelerator.wait_for_everyone,
                          method_state=ctx.method.state_dict, progress=progress, rng=rng)
        return
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_step(ctx.run.run_dir, stage=ctx.index, step=done, params={n: p for n, p in ctx.named},
                  optimizer_state=ctx.optimizer.state_dict(), method_state=ctx.method.state_dict(), progress=progress,
                  rng=rng)
    accelerator.wait_for_everyone()


def _stop(ctx: StageContext, sig: str, done: int, saved: bool) -> None:
    where = f"step {done}/{ctx.plan.steps} of stage {ctx.index} ({ctx.name})"
    if not saved:
        _save_step(ctx, done)
    raise Stopped(f"{sig}: stopped after {where} and saved a step checkpoint in {ctx.run.run_dir} — rerun the same "
                  "command to resume")
