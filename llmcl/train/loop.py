"""The training loop: every stage of a recipe, one after another, in one explicit Accelerate loop.

Read it top to bottom:
    run()            open the run dir and ledger, decide which stages to train, train them in order
    _train_stage()   1) data  2) model from the previous stage + method.prepare  3) optimizer
                     4) resume from a step checkpoint  5) the step loop  6) save the stage, mark it done

Each stage starts from the previous stage's saved checkpoint, so an uninterrupted run, a resumed run and a
`--stage N` job take the same path and give the same weights. The examples of step s are a pure function
of (seed, stage, s) and the lr is a pure function of s: a step checkpoint holds only the trainable
parameters, the optimizer, the RNG and the method state.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from llmcl import methods
from llmcl import schedules
from llmcl.data.batching import BatchPlan, collate, fetch
from llmcl.data.mixing import build_pool, replay_sources
from llmcl.errors import LlmclError
from llmcl.methods.base import StageInfo
from llmcl.models import count_parameters, load_base_model, load_stage_model, load_tokenizer
from llmcl.recipe import Recipe
from llmcl.schedules import lr_at
from llmcl.train import checkpoint as ckpt
from llmcl.train import distributed
from llmcl.train.metrics import MetricsLog
from llmcl.train.progress import Display
from llmcl.train.signals import STOPPED_FILE, StopSignals, Stopped


@dataclass
class RunResult:
    run_dir: Path
    trained: list[int] = field(default_factory=list)
    already_done: list[int] = field(default_factory=list)


def mixed_precision(precision: str) -> str:
    """Accelerate's mixed_precision for the recipe's train.precision."""
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


def run(recipe: Recipe, run_dir: Path, *, only_stage: int | None = None, display: Display | None = None,
        hooks: Any = None) -> RunResult:
    """Train every stage of `recipe` not yet done in `run_dir` (or only stage `only_stage`).

    `hooks` (optional) gets on_start(accelerator, ledger) before training and on_stage_end(i, accelerator, ledger)
    after each stage is saved: that is where evaluation plugs in, without the loop knowing about it."""
    with StopSignals() as stop:  # first thing: a SIGTERM during set-up or the base evaluation is not lost
        return _run(recipe, Path(run_dir), only_stage, display, hooks, stop)


def _run(recipe: Recipe, run_dir: Path, only_stage: int | None, display: Display | None, hooks: Any,
         stop: StopSignals) -> RunResult:
    from accelerate import Accelerator

    accelerator = Accelerator(
        mixed_precision=mixed_precision(recipe.train.precision),
        log_with=list(recipe.logging.trackers) or None,
        project_dir=str(run_dir),
        kwargs_handlers=distributed.accelerator_kwargs(recipe.distributed.timeout_minutes),
        cpu=distributed.cpu_processes(),
    )
    display = display or Display(enabled=accelerator.is_main_process)
    display.enabled = display.enabled and accelerator.is_main_process

    # 1) the ledger decides what is left to do (recipe.yaml is written before anything else)
    with accelerator.main_process_first():
        ledger = ckpt.Ledger.open(run_dir, recipe, write=accelerator.is_main_process)
    n = len(recipe.stages)
    if only_stage is not None and not 0 <= only_stage < n:
        raise LlmclError(f"--stage {only_stage}: the recipe has {n} stages (0..{n - 1})")
    done = ledger.done_stages()
    result = RunResult(run_dir, already_done=done)
    if hooks is not None:
        hooks.on_start(accelerator, ledger)
    if only_stage is not None:
        if only_stage in done:
            display.message(f"stage {only_stage} ({recipe.stages[only_stage].name}) is already done in {run_dir}; "
                            "nothing to train")
            return result
        if only_stage > 0 and only_stage - 1 not in done:
            raise LlmclError(f"--stage {only_stage}: stage {only_stage - 1} ({recipe.stages[only_stage - 1].name}) "
                             f"is not done in {run_dir}; train it first (--stage {only_stage - 1})")
        todo = [only_stage]
    else:
        todo = [i for i in range(n) if i not in done]
        if not todo:
            display.message(f"all {n} stages of {run_dir} are done; nothing to train")
            return result
    if done:
        display.message(f"{run_dir}: stages {', '.join(map(str, done))} already done")

    # what the launch cannot do is refused now, not after earlier stages have trained
    distributed.check_method(accelerator, methods.get(recipe.method.name))
    for j in range(n):
        distributed.check_stage(accelerator, recipe.stage_train(j), f"stages.{j}.train" if recipe.stages[j].train
                                else "train")

    # 2) train the stages in order
    tokenizer = load_tokenizer(recipe.model)
    metrics = MetricsLog(run_dir, accelerator, trackers=list(recipe.logging.trackers),
                         project=recipe.logging.project or recipe.name, config=recipe.to_dict())
    stopped_marker = run_dir / STOPPED_FILE
    if accelerator.is_main_process:
        stopped_marker.unlink(missing_ok=True)
    try:
        for i in todo:
            if (sig := stop.agreed(accelerator)) is not None:  # e.g. during set-up or the last stage's evaluation
                raise Stopped(f"{sig}: stopped before stage {i} ({recipe.stages[i].name}); stages "
                              f"{', '.join(map(str, ledger.done_stages())) or 'none'} are done — rerun the "
                              "same command to continue")
            _train_stage(recipe, i, run_dir, ledger, accelerator, tokenizer, metrics, display, stop)
            result.trained.append(i)
            if hooks is not None:
                hooks.on_stage_end(i, accelerator, ledger)
    except Stopped as exc:  # leave a marker a batch script can test (launchers may not pass exit status 75 on)
        if accelerator.is_main_process:
            ckpt.write_json(stopped_marker, {"reason": str(exc), "step_checkpoint": exc.step_checkpoint,
                                             "at": ckpt.now()})
        raise
    finally:
        metrics.close()
    return result


def _adamw(named: list[tuple[str, torch.nn.Parameter]], cfg: Any) -> torch.optim.Optimizer:
    """AdamW, fused where torch supports it; no weight decay on biases and norm weights (1-D tensors)."""
    if not named:
        raise LlmclError("the method left no trainable parameters")
    decay = [p for _, p in named if p.ndim >= 2]
    no_decay = [p for _, p in named if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    devices = {p.device.type for _, p in named}
    fused = devices <= {"cpu", "cuda"} and all(p.is_floating_point() for _, p in named)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, fused=fused)


def _train_stage(recipe: Recipe, i: int, run_dir: Path, ledger: ckpt.Ledger, accelerator: Any, tokenizer: Any,
                 metrics: MetricsLog, display: Display, stop: StopSignals | None = None) -> None:
    from accelerate.utils import set_seed

    stage, cfg, n = recipe.stages[i], recipe.stage_train(i), len(recipe.stages)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    name = ckpt.stage_dir_name(i, stage.name)
    set_seed(recipe.seed + i)

    # 1) data: the stage's pool, the replay pools, and a deterministic step -> items plan
    cache = run_dir / "cache"
    with accelerator.main_process_first():  # rank 0 tokenizes text corpora into the cache first
        own, stats = build_pool(stage.data, tokenizer, cfg.seq_len, recipe.seed, cache)
        replay = replay_sources(recipe, i, tokenizer, cfg.seq_len, cache)
    pools = [own] + [src.pool for src in replay]
    plan = BatchPlan(len(own), cfg.batch_size, cfg.grad_accum, world, recipe.seed, i,
                     replay_ratio=recipe.stage_replay(i).ratio, replay_sizes=[len(src.pool) for src in replay],
                     replay_weights=[src.weight for src in replay])
    if cfg.max_steps:
        total = cfg.max_steps
    elif cfg.max_tokens:
        total = max(1, math.ceil(cfg.max_tokens / (plan.global_batch * cfg.seq_len)))
    else:
        total = max(1, math.ceil(cfg.epochs * plan.steps_per_epoch()))
    prev = ledger.stage(i - 1) if i > 0 else {}
    schedule = schedules.for_stage(cfg, total, i, prev.get("final_lr"),
                                   key=f"stages.{i}.train" if stage.train else "train")
    pad_id = tokenizer.pad_token_id

    def calibration_batches() -> Iterator[dict[str, torch.Tensor]]:
        for s in range(total):
            yield collate(fetch(pools, plan.micro_items(s, 0, rank)), pad_id)

    # 2) model: the base model for stage 0, else the previous stage's checkpoint (or the pre-anneal branch
    #    an infinite schedule saved); then the method
    origin: dict[str, Any] = {"kind": "base"}
    prev_dir = None
    if i > 0:
        manifest = ledger.manifest(i - 1)
        prev_dir = run_dir / prev["checkpoint"]
        if "continue" in manifest:
            origin, prev_dir = manifest["continue"], prev_dir / "continue"
        else:
            origin = manifest
    with accelerator.main_process_first():  # rank 0 builds caches (SmolLM2 dequantization) first
        if i == 0:
            model = load_base_model(recipe.model, recipe.seed)
        else:
            model = load_stage_model(run_dir, origin, recipe.model, recipe.seed, trainable=True)
    method = methods.create(recipe.method)
    if prev_dir is not None:
        method.load_state_dict(ckpt.load_tree(prev_dir, "method_state"))
    info = StageInfo(index=i, name=stage.name, num_stages=n, max_steps=total, seed=recipe.seed + i, origin=origin,
                     batches=calibration_batches, grad_accum=cfg.grad_accum, rank=rank, world_size=world)
    model = method.prepare(model, info)
    if method.describe_stage():
        display.message(method.describe_stage())
    if recipe.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.to(device)
    trainable_params, total_params = count_parameters(model)

    # 3) optimizer over what the method trains: fresh moments, or the previous stage's (optimizer_state: keep)
    named = method.trainable_parameters(model)
    optimizer = _adamw(named, cfg)
    kept = 0
    if cfg.optimizer_state == "keep" and prev_dir is not None:
        kept = ckpt.load_optimizer_by_name(optimizer, named, prev_dir / "optimizer.pt", device)
    keep_next = i + 1 < n and recipe.stage_train(i + 1).optimizer_state == "keep"

    # 4) resume from this stage's step checkpoint, if a previous attempt left one
    start, tokens_done, wall_before = 0, 0, 0.0
    resume = ckpt.load_step(run_dir, i)
    if resume is not None:
        by_name = dict(named)
        missing = set(by_name) ^ set(resume["params"])
        if missing:
            raise LlmclError(f"the step checkpoint in {run_dir} does not match this recipe's trainable parameters "
                             f"({len(missing)} differ, e.g. {sorted(missing)[0]}); delete {run_dir / ckpt.STEP_DIR}")
        with torch.no_grad():
            for pname, tensor in resume["params"].items():
                by_name[pname].copy_(tensor)
        optimizer.load_state_dict(resume["optimizer"])
        method.load_state_dict(resume["method_state"])
        start = resume["state"]["step"]
        tokens_done, wall_before = resume["state"]["tokens"], resume["state"]["wall_seconds"]
    metrics.truncate(i, start)
    distributed.configure_stage(accelerator, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.gradient_accumulation_steps = cfg.grad_accum
    accelerator.step = 0
    if resume is not None:
        ckpt.restore_rng(resume["rng"])  # last: model init and adapters above consumed random numbers
    if accelerator.is_main_process:
        ledger.mark(i, "running", started_at=ckpt.now())
    step_offset = sum(ledger.stage(j).get("steps", 0) for j in range(i))
    branch_at = schedule.anneal_start if (schedule.kind == "infinite" and schedule.anneal and cfg.anneal_branch
                                          and i + 1 < n) else None
    display.start_stage(
        i, n, stage.name, total, start,
        f"{stats.examples} {stats.format} examples, {total} steps x {plan.global_batch} (lr {cfg.lr:g} "
        f"{schedule.kind}, {recipe.method.name}, {trainable_params:,}/{total_params:,} trainable)"
        + (f", replay {plan.replay_ratio:.0%} from {len(replay)} sources" if plan.replaying else "")
        + (f", optimizer state kept for {kept} tensors" if kept else "")
        + (f", resuming after step {start}" if start else "")
        + (f"; {stats.truncated} examples truncated to {cfg.seq_len} tokens" if stats.truncated else ""),
    )

    # 5) the step loop
    model.train()
    params = [p for _, p in named]
    t_stage = t_log = time.perf_counter()
    tokens_log = replay_log = 0
    loss_sum = torch.zeros((), device=device)
    steps_in_window = 0
    for step in range(start, total):
        if step == branch_at and not (run_dir / f"{name}.continue").exists():
            _save_branch(run_dir, name, accelerator, model, method, optimizer, named, tokenizer, info, keep_next)
        lr = lr_at(step, schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # the loss is a mean over every trained token of the step, across micro-batches and ranks
        items = plan.step_items(step)
        n_items = sum(pools[src].label_count(j) for src, j in items)
        replay_log += sum(1 for src, _ in items if src)
        for micro in range(cfg.grad_accum):
            batch = collate(fetch(pools, plan.micro_items(step, micro, rank)), pad_id)
            tokens_log += int(batch["attention_mask"].sum())
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    outputs = model(**batch, num_items_in_batch=n_items, use_cache=False)
                    loss = method.loss(model, batch, outputs)
                # accelerate divides by grad_accum and DDP averages over ranks: undo both for a token mean
                accelerator.backward(loss * (cfg.grad_accum * world))
            loss_sum += loss.detach()
        method.after_backward(model)
        grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.after_step(model)
        steps_in_window += 1

        done_steps = step + 1
        if done_steps % cfg.log_every == 0 or done_steps == total:
            window = accelerator.reduce(torch.stack([loss_sum, torch.tensor(float(tokens_log), device=device)]), "sum")
            now = time.perf_counter()
            tokens_done += int(window[1])
            record = {
                "stage": i, "stage_name": stage.name, "step": done_steps, "global_step": step_offset + done_steps,
                "loss": float(window[0]) / steps_in_window, "lr": lr,
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "tokens": tokens_done, "tokens_per_s": float(window[1]) / max(now - t_log, 1e-9),
                "replay_fraction": replay_log / (steps_in_window * plan.global_batch),
                "elapsed_s": wall_before + now - t_stage,
                **{f"{recipe.method.name}/{k}": v for k, v in method.step_metrics().items()},
            }
            metrics.log(record)
            display.update(done_steps, record["loss"], lr, record["tokens_per_s"])
            loss_sum.zero_()
            tokens_log, replay_log, steps_in_window, t_log = 0, 0, 0, now
        saved = False
        if cfg.save_every and done_steps % cfg.save_every == 0 and done_steps < total:
            t_save = time.perf_counter()
            _save_step(run_dir, i, done_steps, accelerator, model, named, optimizer, method,
                       tokens_done, wall_before + t_save - t_stage)
            t_log += time.perf_counter() - t_save  # tokens/s measures training, not checkpoint writes
            saved = True
        if stop is not None and done_steps < total and (sig := stop.agreed(accelerator)) is not None:
            # SIGTERM/SIGUSR1 (SLURM preemption or time limit): checkpoint this step and leave; a rerun resumes
            if distributed.deepspeed_plugin(accelerator) is not None:  # no step checkpoints under DeepSpeed yet
                raise Stopped(f"{sig}: stopped at step {done_steps}/{total} of stage {i} ({stage.name}); under "
                              "DeepSpeed the stage restarts from its beginning — rerun the same command",
                              step_checkpoint=False)
            if not saved:
                _save_step(run_dir, i, done_steps, accelerator, model, named, optimizer, method, tokens_done,
                           wall_before + time.perf_counter() - t_stage)
            raise Stopped(f"{sig}: stopped after step {done_steps}/{total} of stage {i} ({stage.name}) and saved "
                          f"a step checkpoint in {run_dir} — rerun the same command to resume")

    # 6) end of stage: the method's hook, the stage checkpoint (atomic), then the ledger
    unwrapped = method.end_stage(accelerator.unwrap_model(model), info)
    wall = wall_before + time.perf_counter() - t_stage
    full_state = distributed.full_state_dict(accelerator, model, named)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        def write(tmp: Path) -> None:
            manifest = _write_model(tmp, name, method, unwrapped, tokenizer, info, optimizer, named, keep_next,
                                    state_dict=full_state)
            manifest.update(stage=i, method=recipe.method.name, base_model=recipe.model.path, seed=recipe.seed)
            branch = run_dir / f"{name}.continue"
            if branch.exists():  # the pre-anneal weights the next stage continues from
                os.replace(branch, tmp / "continue")
                manifest["continue"] = json.loads((tmp / "continue" / "manifest.json").read_text())
            ckpt.write_json(tmp / "stage.json", {"index": i, "name": stage.name, "data": stats.__dict__,
                                                 "train": cfg.__dict__, "steps": total, "schedule": schedule.__dict__,
                                                 "replay": [{"source": s.name, "weight": s.weight, "size": len(s.pool)}
                                                            for s in replay]})
            ckpt.write_json(tmp / "manifest.json", manifest)

        ckpt.write_dir(run_dir / name, write)
        ledger.mark(i, "done", checkpoint=name, steps=total, examples=stats.examples, tokens=tokens_done,
                    wall_seconds=round(wall, 3), trainable_params=trainable_params, total_params=total_params,
                    final_lr=lr_at(total - 1, schedule), processes=world,
                    distributed=str(accelerator.distributed_type).split(".")[-1].lower()
                    + (f"-zero{distributed.zero_stage(accelerator)}" if distributed.zero_stage(accelerator) else ""),
                    finished_at=ckpt.now())
        ckpt.clear_step(run_dir)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        ledger.data = ckpt.Ledger.read(run_dir).data
    display.end_stage(f"stage {i + 1}/{n} {stage.name}: done in {wall:.1f}s, final loss "
                      f"{_last_loss(run_dir, i):.4f} -> {run_dir / name}")
    accelerator.free_memory(model, optimizer)
    del model, optimizer, unwrapped


def _write_model(out: Path, name: str, method: Any, model: Any, tokenizer: Any, info: StageInfo, optimizer: Any,
                 named: list, keep_optimizer: bool, prefix: str | None = None,
                 state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """The model artifact, tokenizer, method state (and optimizer state for a stage that keeps it) into `out`."""
    manifest = method.save(model, out, info, state_dict=state_dict)
    tokenizer.save_pretrained(out / manifest["path"])
    ckpt.save_tree(method.state_dict(), out, "method_state")
    if keep_optimizer:
        ckpt.save_optimizer_by_name(optimizer, named, out / "optimizer.pt")
    manifest["path"] = f"{prefix or name}/{manifest['path']}"
    return manifest


def _save_branch(run_dir: Path, name: str, accelerator: Any, model: Any, method: Any, optimizer: Any, named: list,
                 tokenizer: Any, info: StageInfo, keep_optimizer: bool) -> None:
    """Infinite schedule: save the weights just before the anneal; the next stage continues from them."""
    full_state = distributed.full_state_dict(accelerator, model, named)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        def write(tmp: Path) -> None:
            manifest = _write_model(tmp, name, method, accelerator.unwrap_model(model), tokenizer, info, optimizer,
                                    named, keep_optimizer, prefix=f"{name}/continue", state_dict=full_state)
            ckpt.write_json(tmp / "manifest.json", manifest)

        ckpt.write_dir(run_dir / f"{name}.continue", write)
    accelerator.wait_for_everyone()


def _save_step(run_dir: Path, i: int, step: int, accelerator: Any, model: Any, named: list, optimizer: Any,
               method: Any, tokens: int, wall: float) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        ckpt.save_step(run_dir, stage=i, step=step, params={n: p for n, p in named},
                       optimizer_state=optimizer.state_dict(), method_state=method.state_dict(),
                       progress={"tokens": tokens, "wall_seconds": wall})
    accelerator.wait_for_everyone()


def _last_loss(run_dir: Path, stage: int) -> float:
    from llmcl.train.metrics import read

    losses = [r["loss"] for r in read(run_dir) if r.get("stage") == stage]
    return losses[-1] if losses else float("nan")

