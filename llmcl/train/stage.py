"""One stage of a run, in three steps around one `StageContext`:

    build_stage(run, i)   1) data and the step plan  2) the model the stage starts from + method.prepare and
                          its state  3) the optimizer  4) resume from a step checkpoint  5) distributed wrappers
    train_steps(ctx)      the optimizer steps (llmcl.train.steps)
    finish_stage(ctx)     method.end_stage, the stage directory (atomic), then the ledger

Each stage starts from the previous stage's saved checkpoint, so an uninterrupted run, a resumed run and a
`--stage N` job take the same path and give the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from llmcl import methods
from llmcl.data.batching import BatchPlan, collate, fetch
from llmcl.data.mixing import build_pool, replay_key, replay_plan, replay_sources, replay_token_note
from llmcl.data.sources import local_files, train_files
from llmcl.errors import LlmclError
from llmcl.layers import varlen
from llmcl.methods.base import Method, StageInfo
from llmcl.models import count_parameters, load_base_model, logits_at_labels, positions_note, why_not_packable
from llmcl.recipe import Recipe
from llmcl.rundir import CACHE, Ledger, artifacts, load_tree, now
from llmcl.rundir.integrity import file_record
from llmcl.rundir.layout import METHOD_STATE, OPTIMIZER, STEP_DIR, stage_dir_name
from llmcl.rundir.metrics import read as read_metrics
from llmcl.rundir.steps import clear_step, load_optimizer_by_name, load_step, restore_rng, save_optimizer_by_name
from llmcl.train import distributed
from llmcl.train.metrics import MetricsLog
from llmcl.train.plan import StagePlan
from llmcl.train.progress import Display
from llmcl.train.signals import StopSignals


@dataclass
class RunContext:
    """What every stage of a run shares."""

    recipe: Recipe
    run_dir: Path
    ledger: Ledger
    accelerator: Any
    tokenizer: Any
    metrics: MetricsLog
    display: Display
    plans: list[StagePlan]
    stop: StopSignals | None = None


@dataclass
class StageContext:
    """One stage from build to finish."""

    run: RunContext
    index: int
    plan: StagePlan
    cfg: Any
    """The stage's train settings (TrainConfig)."""
    pools: list[Any]
    """The stage's own pool, then the replay pools."""
    batches: BatchPlan
    stats: Any
    replay: list[Any]
    method: Method
    info: StageInfo
    model: Any
    """The model as the accelerator wrapped it."""
    optimizer: Any
    named: list[tuple[str, torch.nn.Parameter]]
    keep_next: bool
    """The next stage keeps this stage's optimizer state (saved with the stage)."""
    parameters: tuple[int, int]
    """(trainable, total) parameter counts."""
    data_files: dict[str, Any] = field(default_factory=dict)
    """Size and sha256 of every local file the stage reads (its data, its replay sources)."""
    start: int = 0
    tokens_done: int = 0
    wall_before: float = 0.0
    wall_seconds: float = field(default=0.0)
    skipped: int = 0
    """Optimizer steps skipped for a non-finite gradient norm (train.on_nonfinite=skip)."""
    row_tokens: int | None = None
    """train.packing's row capacity: None = a micro-batch is one row (attention runs per example), else seq_len."""
    logits_at_labels: bool = False
    """The LM head runs at the trained positions only (llmcl.models.logits_at_labels): same loss, less work."""
    frozen: dict[str, Any] = field(default_factory=dict)
    """Under DeepSpeed in half precision, the frozen weights as the stage began (distributed.frozen_weights)."""

    @property
    def name(self) -> str:
        return self.run.recipe.stages[self.index].name

    @property
    def branch_at(self) -> int | None:
        """Infinite schedule with an anneal and a next stage: the step before which the pre-anneal branch is saved."""
        s, cfg = self.plan.schedule, self.cfg
        if s.kind == "infinite" and s.anneal and cfg.anneal_branch and self.index + 1 < len(self.run.recipe.stages):
            return s.anneal_start
        return None


def adamw(named: list[tuple[str, torch.nn.Parameter]], cfg: Any, what: str) -> torch.optim.Optimizer:
    """AdamW, fused where torch supports it; no weight decay on biases and norm weights (1-D tensors). `what`
    (the method and stage) names who left nothing to train."""
    if not named:
        raise LlmclError(f"{what} left no parameter to train; check the recipe's method options "
                         "(method.target_modules, method.ratio, ...)")
    decay = [p for _, p in named if p.ndim >= 2]
    no_decay = [p for _, p in named if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    devices = {p.device.type for _, p in named}
    fused = devices <= {"cpu", "cuda"} and all(p.is_floating_point() for _, p in named)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, fused=fused)


def build_stage(run: RunContext, i: int) -> StageContext:
    from accelerate.utils import set_seed

    recipe, accelerator, tokenizer = run.recipe, run.accelerator, run.tokenizer
    stage, cfg, plan = recipe.stages[i], recipe.stage_train(i), run.plans[i]
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    set_seed(recipe.seed + i)
    if torch.device(device).type == "cuda":  # the ledger records the stage's peak GPU memory
        torch.cuda.reset_peak_memory_stats(device)

    # 1) data: the stage's pool, the replay pools, and a deterministic step -> items plan
    cache = run.run_dir / CACHE
    with accelerator.main_process_first():  # rank 0 tokenizes text corpora into the cache first
        own, stats = build_pool(stage.data, tokenizer, cfg.seq_len, recipe.seed, cache, f"stages.{i}.data")
        replay = replay_sources(recipe, i, tokenizer, cfg.seq_len, cache)
    pools = [own] + [src.pool for src in replay]
    ratio_key = replay_key(recipe, i, "ratio")
    if (note := replay_token_note(own, replay, recipe.stage_replay(i).ratio, ratio_key)) is not None:
        run.display.message(note)
    batches = BatchPlan(len(own), cfg.batch_size, cfg.grad_accum, world, recipe.seed, i,
                        replay_ratio=recipe.stage_replay(i).ratio, replay_sizes=[len(src.pool) for src in replay],
                        replay_weights=[src.weight for src in replay])

    def calibration_batches() -> Iterator[dict[str, torch.Tensor]]:
        for s in range(plan.steps):
            yield collate(fetch(pools, batches.micro_items(s, 0, rank)), tokenizer.pad_token_id)

    # 2) model: the base model for stage 0, else what the previous stage saved (or the pre-anneal branch of an
    #    infinite schedule), on the training device; then the method, prepared there (its bases, masks and
    #    banks are made on the parameters' device, its SVDs run there) and given the state the previous stage left
    origin, prev_dir = artifacts.stage_origin(run.ledger, i)
    with accelerator.main_process_first():  # rank 0 builds caches (SmolLM2 dequantization) first
        if prev_dir is None:
            model = load_base_model(recipe.model, recipe.seed)
            # recorded once it loads, while nothing trained from it is kept (no step checkpoint of stage 0)
            fresh = not (run.run_dir / STEP_DIR).exists()
            if not fresh or accelerator.is_main_process:
                artifacts.check_base(run.ledger, recipe.model.path, record=fresh)
        else:
            model = artifacts.load(run.run_dir, origin, recipe.model, recipe.seed, trainable=True)
    model.to(device)
    method = methods.create(recipe.method)
    info = StageInfo(index=i, name=stage.name, num_stages=len(recipe.stages), max_steps=plan.steps,
                     seed=recipe.seed + i, origin=origin, batches=calibration_batches, rank=rank, world_size=world,
                     zero=distributed.zero_stage(accelerator), **distributed.collectives(accelerator))
    model = method.prepare(model, info)
    row_tokens = _row_tokens(run, model, cfg, i)
    at_labels = stats.format != "text" and logits_at_labels(model)  # text trains every position: nothing to skip
    if prev_dir is not None:
        method.load_state_dict(load_tree(prev_dir, METHOD_STATE))
    if method.describe_stage():
        run.display.message(method.describe_stage())
    if recipe.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    parameters = count_parameters(model)

    # 3) optimizer over what the method trains: fresh moments, or the previous stage's (optimizer_state: keep)
    named = method.trainable_parameters(model)
    optimizer = adamw(named, cfg, f"method {recipe.method.name!r} in stage {i}")
    kept = 0
    if cfg.optimizer_state == "keep" and prev_dir is not None:
        kept = load_optimizer_by_name(optimizer, named, prev_dir / OPTIMIZER, device)
    keep_next = i + 1 < len(recipe.stages) and recipe.stage_train(i + 1).optimizer_state == "keep"

    # 4) resume from this stage's step checkpoint, if a previous attempt left one (and read the same data)
    resume = load_step(run.run_dir, i, plan.steps)
    sources = [stage.data] + [p.data for p in replay_plan(recipe, i)]
    data_files = data_fingerprint(sources)
    if resume is not None:
        _same_data(run.run_dir, resume["state"].get("data_files"), data_files)
    _same_as_trained(run, i, data_files, sources)
    if resume is not None and "deepspeed" in resume:  # the shards are loaded into the engine below
        method.load_state_dict(resume["method_state"])
    elif resume is not None:
        _restore(run.run_dir, resume, named, optimizer, method)
    start = resume["state"]["step"] if resume else 0
    run.metrics.truncate(i, start)

    # 5) the distributed wrappers, then the RNG as the step checkpoint left it (model init above consumed some)
    distributed.configure_stage(accelerator, cfg)
    frozen = distributed.frozen_weights(accelerator, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.gradient_accumulation_steps = cfg.grad_accum
    accelerator.step = 0
    if resume is not None:
        if "deepspeed" in resume:
            distributed.load_shards(model, resume["deepspeed"])
        restore_rng(resume["rng"], rank)
    if accelerator.is_main_process:
        run.ledger.mark(i, "running", started_at=now())
    ctx = StageContext(run, i, plan, cfg, pools, batches, stats, replay, method, info, model, optimizer, named,
                       keep_next, parameters, data_files=data_files, start=start,
                       tokens_done=resume["state"]["tokens"] if resume else 0,
                       wall_before=resume["state"]["wall_seconds"] if resume else 0.0,
                       skipped=resume["state"].get("skipped_steps", 0) if resume else 0, row_tokens=row_tokens,
                       logits_at_labels=at_labels, frozen=frozen)
    run.display.start_stage(i, len(recipe.stages), stage.name, plan.steps, start, _stage_note(ctx, kept))
    return ctx


def _row_tokens(run: RunContext, model: Any, cfg: Any, i: int) -> int:
    """The stage's row capacity (train.packing: the model's packed row, refused where it cannot pack), with a
    note when train.seq_len reaches past the positions the model was trained at."""
    stage = run.recipe.stages[i]
    if (note := positions_note(model, cfg.seq_len, f"stages.{i}.train.seq_len" if "seq_len" in stage.train
                               else "train.seq_len")) is not None:
        run.display.message(note)
    if not cfg.packing:
        return cfg.seq_len
    if (why := why_not_packable(model)) is not None:
        key = f"stages.{i}.train" if "packing" in stage.train else "train"
        raise LlmclError(f"{key}.packing: true needs a model whose positions come from position_ids, "
                         f"and {why}; set it to false")
    return varlen.row_capacity(model, cfg.seq_len)


def data_fingerprint(sources: list[Any]) -> dict[str, Any]:
    """{path: {size, sha256}} of the local files behind these data configs."""
    return {str(p): file_record(p) for p in sorted({p for cfg in sources for p in local_files(cfg)})}


def _same_data(run_dir: Path, saved: dict[str, Any] | None, now_files: dict[str, Any]) -> None:
    """A resume reads the data the step checkpoint was trained on, or refuses in one line."""
    if saved is None:
        return  # a step checkpoint from before data files were recorded
    for path in sorted(set(saved) | set(now_files)):
        before, after = saved.get(path), now_files.get(path)
        if before == after:
            continue
        raise LlmclError(f"data file {path} changed since the step checkpoint was saved "
                         f"({_how_changed(before, after)}); put the original "
                         f"back to resume, or delete {run_dir / STEP_DIR} to restart the stage on the new data")


def _how_changed(before: dict[str, Any] | None, after: dict[str, Any] | None) -> str:
    return ("is new" if before is None else "is gone" if after is None
            else f"has {after['size']} bytes, {before['size']} before" if after["size"] != before["size"]
            else "has the same size but other content")


def _same_as_trained(run: RunContext, i: int, now_files: dict[str, Any], sources: list[Any]) -> None:
    """A file stage `i` trains on (`sources`: its data and replay's) that a finished stage trained on is what that
    stage read, or stage `i` is refused in one line: a run trained one stage per job, with the data edited
    between jobs, is not the run one job would train. (Test files may change: the report marks the rows.)"""
    trained_now = {str(p) for cfg in sources for p in train_files(cfg)}
    for j in range(i):
        if not run.ledger.is_done(j):
            continue
        for path, before in (run.ledger.stage(j).get("data_files") or {}).items():
            if path in trained_now and path in now_files and now_files[path] != before:
                raise LlmclError(f"data file {path} changed since stage {j} ({run.recipe.stages[j].name}) trained on "
                                 f"it ({_how_changed(before, now_files[path])}), and stage {i} reads it again; put "
                                 "the original back, or train the run again in a new run directory (--run-dir)")


def _restore(run_dir: Path, resume: dict[str, Any], named: list, optimizer: Any, method: Method) -> None:
    by_name = dict(named)
    differ = set(by_name) ^ set(resume["params"])
    if differ:
        raise LlmclError(f"the step checkpoint in {run_dir} does not match this recipe's trainable parameters "
                         f"({len(differ)} differ, e.g. {sorted(differ)[0]}); delete {run_dir / STEP_DIR}")
    with torch.no_grad():
        for pname, tensor in resume["params"].items():
            by_name[pname].copy_(tensor)
    optimizer.load_state_dict(resume["optimizer"])
    method.load_state_dict(resume["method_state"])


def _stage_note(ctx: StageContext, kept: int) -> str:
    cfg, recipe, b = ctx.cfg, ctx.run.recipe, ctx.batches
    trainable, total = ctx.parameters
    return (f"{ctx.stats.examples} {ctx.stats.format} examples, {ctx.plan.steps} step{'s' * (ctx.plan.steps != 1)} x {b.global_batch} (lr "
            f"{cfg.lr:g} {ctx.plan.schedule.kind}, {recipe.method.name}, {trainable:,}/{total:,} trainable)"
            + (f", replay {b.replay_ratio:.0%} from {len(ctx.replay)} sources" if b.replaying else "")
            + (f", optimizer state kept for {kept} tensors" if kept else "")
            + (f", resuming after step {ctx.start}" if ctx.start else "")
            + (f"; {ctx.stats.truncated} examples truncated to {cfg.seq_len} tokens" if ctx.stats.truncated else "")
            + (f"; {ctx.stats.dropped} records left out: no trained token within their first {cfg.seq_len} tokens "
               "(train.seq_len)" if ctx.stats.dropped else ""))


def save_model(ctx: StageContext, model: torch.nn.Module, *, branch: bool = False) -> None:
    """The stage directory with `model` (the unwrapped model), or with `branch` the infinite schedule's
    pre-anneal branch; written by rank 0, every rank takes part in gathering sharded weights."""
    run, accelerator, method = ctx.run, ctx.run.accelerator, ctx.method
    full_state = distributed.full_state_dict(accelerator, ctx.model, ctx.named, ctx.frozen)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        recipe, cfg, i = run.recipe, ctx.cfg, ctx.index
        artifacts.write_stage(
            run.run_dir, i, ctx.name, branch=branch, tokenizer=run.tokenizer, method_state=method.state_dict(),
            artifact=lambda out: method.save(model, out, ctx.info, state_dict=full_state),
            save_optimizer=(lambda path: save_optimizer_by_name(ctx.optimizer, ctx.named, path))
            if ctx.keep_next else None,
            manifest_extra={"stage": i, "method": recipe.method.name, "base_model": recipe.model.path,
                            "seed": recipe.seed},
            stage_info={"index": i, "name": ctx.name, "data": ctx.stats.__dict__, "train": cfg.__dict__,
                        "steps": ctx.plan.steps, "schedule": ctx.plan.schedule.__dict__,
                        "replay": [{"source": s.name, "weight": s.weight, "size": len(s.pool)} for s in ctx.replay]})
    accelerator.wait_for_everyone()


def _peak_gpu_memory(device: Any) -> dict[str, int]:
    if torch.device(device).type != "cuda":
        return {}
    return {"peak_gpu_mib": round(torch.cuda.max_memory_allocated(device) / 2**20)}


def finish_stage(ctx: StageContext) -> None:
    """end_stage, the stage directory, then the ledger marks the stage done (the single source for resume)."""
    run, accelerator, i = ctx.run, ctx.run.accelerator, ctx.index
    save_model(ctx, ctx.method.end_stage(accelerator.unwrap_model(ctx.model), ctx.info))
    if accelerator.is_main_process:
        trainable, total = ctx.parameters
        run.ledger.mark(i, "done", checkpoint=stage_dir_name(i, ctx.name), steps=ctx.plan.steps,
                        examples=ctx.stats.examples, tokens=ctx.tokens_done, wall_seconds=round(ctx.wall_seconds, 3),
                        trainable_params=trainable, total_params=total, final_lr=ctx.plan.final_lr,
                        processes=accelerator.num_processes, distributed=distributed.describe(accelerator),
                        data_files=ctx.data_files, **({"skipped_steps": ctx.skipped} if ctx.skipped else {}),
                        **_peak_gpu_memory(accelerator.device), finished_at=now())
        clear_step(run.run_dir)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        run.ledger.data = Ledger.read(run.run_dir).data
    losses = [r["loss"] for r in read_metrics(run.run_dir) if r.get("stage") == i and r.get("loss") is not None]
    run.display.end_stage(f"stage {i + 1}/{len(run.recipe.stages)} {ctx.name}: done in {ctx.wall_seconds:.1f}s, "
                          f"final loss {losses[-1] if losses else float('nan'):.4f} -> "
                          f"{run.run_dir / stage_dir_name(i, ctx.name)}")
    accelerator.free_memory(ctx.model, ctx.optimizer)
    ctx.model = ctx.optimizer = None
