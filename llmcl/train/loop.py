"""The training loop: every stage of a recipe, one after another, in one explicit Accelerate loop.

Read it top to bottom:
    run()        lock the run dir, open its ledger, decide which stages to train, plan every stage (steps and
                 schedule) before the first one trains, then for each stage:
                     build_stage -> train_steps -> finish_stage      (llmcl.train.stage, llmcl.train.steps)
                 and the hooks (evaluation) after it; then the weights checkpoints.keep_stages no longer keeps
                 are deleted (llmcl.rundir.retention).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmcl import methods
from llmcl.data.mixing import build_pool, check_tokenizer
from llmcl.errors import LlmclError
from llmcl.models import load_tokenizer
from llmcl.recipe import Recipe
from llmcl.rundir import CACHE, STOPPED, Ledger, now, write_json
from llmcl.rundir import retention
from llmcl.rundir.lock import locked
from llmcl.train import distributed
from llmcl.train.metrics import MetricsLog
from llmcl.train.plan import plan_stages, train_key
from llmcl.train.progress import Display
from llmcl.train.signals import StopSignals, Stopped
from llmcl.train.stage import RunContext, build_stage, finish_stage
from llmcl.train.steps import train_steps


@dataclass
class RunResult:
    run_dir: Path
    trained: list[int] = field(default_factory=list)
    already_done: list[int] = field(default_factory=list)


def run(recipe: Recipe, run_dir: Path, *, only_stage: int | None = None, display: Display | None = None,
        hooks: Any = None, accelerator: Any = None) -> RunResult:
    """Train every stage of `recipe` not yet done in `run_dir` (or only stage `only_stage`).

    `accelerator`: the Accelerator to train with (default: llmcl.train.distributed.make_accelerator).
    `hooks` (optional) gets on_start(accelerator, ledger) before training and on_stage_end(i, accelerator, ledger)
    after each stage is saved: that is where evaluation plugs in, without the loop knowing about it; while
    its needs_weights(i), where it has one, returns True (a row still to score), checkpoints.keep_stages leaves
    stage i's weights in place."""
    with StopSignals() as stop:  # first thing (a signal since `llmcl train` started is kept): none is lost
        run_dir = Path(run_dir)
        accelerator = accelerator or distributed.make_accelerator(recipe, run_dir)
        with locked(run_dir, accelerator):  # one process at a time on a run directory
            try:
                return _run(recipe, run_dir, only_stage, display, hooks, accelerator, stop)
            except Stopped as exc:  # leave a marker a batch script can test (launchers may not pass status 75 on)
                # every rank that stopped writes it: during an evaluation a signal stops each rank where it is,
                # and rank 0 may have failed instead (its peer gone from a collective)
                rank = accelerator.process_index
                write_json(run_dir / STOPPED, {"reason": str(exc), "step_checkpoint": exc.step_checkpoint,
                                               "at": now()}, writer="" if rank == 0 else f".rank{rank}")
                raise


def _run(recipe: Recipe, run_dir: Path, only_stage: int | None, display: Display | None, hooks: Any,
         accelerator: Any, stop: StopSignals) -> RunResult:
    display = display or Display(enabled=accelerator.is_main_process)
    display.enabled = display.enabled and accelerator.is_main_process

    # 1) the ledger decides what is left to do (recipe.yaml is written before anything else)
    with accelerator.main_process_first():
        ledger = Ledger.open(run_dir, recipe, write=accelerator.is_main_process)
    if accelerator.is_main_process:
        (run_dir / STOPPED).unlink(missing_ok=True)
    _stop_point(stop, accelerator, ledger, "before anything was trained")
    n = len(recipe.stages)
    done = ledger.done_stages()
    result = RunResult(run_dir, already_done=done)
    todo = _stages_to_train(recipe, run_dir, only_stage, done, display)
    if not todo:
        if hooks is not None:
            with _evaluating(stop, ledger, "the missing rows"):
                hooks.on_start(accelerator, ledger)
        _delete_old_weights(recipe, ledger, accelerator, hooks, display)
        return result
    if done:
        display.message(f"{run_dir}: {_stages(done)} already done")

    # 2) what the launch cannot do, and every stage's steps and schedule: refused now, before the base model is
    #    evaluated and before any stage trains
    distributed.check_method(accelerator, methods.get(recipe.method.name))
    for j in range(n):
        distributed.check_stage(accelerator, recipe.stage_train(j), train_key(recipe, j))
    note = distributed.cpu_bf16_note(recipe, accelerator.device.type)
    if note:
        display.message(note)
    ctx = run_context(recipe, run_dir, accelerator, ledger, display, stop, upto=max(todo))
    try:
        if hooks is not None:
            with _evaluating(stop, ledger, "the missing rows"):
                hooks.on_start(accelerator, ledger)
        _delete_old_weights(recipe, ledger, accelerator, hooks, display)

        # 3) train the stages in order
        for i in todo:
            _stop_point(stop, accelerator, ledger, f"before stage {i} ({recipe.stages[i].name})")
            stage = build_stage(ctx, i)
            train_steps(stage)
            finish_stage(stage)
            del stage  # nothing of a finished stage stays in memory while it is evaluated and the next one loads
            result.trained.append(i)
            if hooks is not None:
                _stop_point(stop, accelerator, ledger, f"after stage {i} ({recipe.stages[i].name})")
                with _evaluating(stop, ledger, f"stage {i}'s row"):
                    hooks.on_stage_end(i, accelerator, ledger)
            _delete_old_weights(recipe, ledger, accelerator, hooks, display)
    finally:
        ctx.metrics.close()
    return result


def _delete_old_weights(recipe: Recipe, ledger: Ledger, accelerator: Any, hooks: Any, display: Display) -> None:
    """checkpoints.keep_stages: rank 0 deletes the weights of the finished stages before the last N whose rows are
    scored (`hooks.needs_weights`), and the other ranks read the ledger it wrote."""
    keep = recipe.checkpoints.keep_stages
    if keep is None:
        return
    accelerator.wait_for_everyone()  # every rank's evaluation of the row is over
    if accelerator.is_main_process:
        needed = getattr(hooks, "needs_weights", None) or (lambda i: False)
        deleted = retention.delete_old_weights(ledger, keep, needed)
        if deleted:
            display.message(f"deleted the weights of stage{'s' * (len(deleted) > 1)} "
                            f"{', '.join(map(str, deleted))} (checkpoints.keep_stages: {keep}); their rows stay")
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        ledger.data = Ledger.read(ledger.run_dir).data


def _stages(indices: list[int]) -> str:
    """'stage 0 is', 'stages 0, 1 are', 'no stage is' (then 'done')."""
    if not indices:
        return "no stage is"
    return f"stage {indices[0]} is" if len(indices) == 1 else f"stages {', '.join(map(str, indices))} are"


def _evaluating(stop: StopSignals, ledger: Ledger, rows: str) -> Any:
    """Around the evaluation hooks: a signal stops the scoring at once (StopSignals.at_once), naming `rows` as
    what the rerun will score."""
    def message(sig: str) -> str:
        return (f"{sig}: stopped while evaluating; {_stages(ledger.done_stages())} done and {rows} will be scored "
                "— rerun the same command to continue")
    return stop.at_once(message)


def _stop_point(stop: StopSignals, accelerator: Any, ledger: Ledger, where: str) -> None:
    """Between stages (and before the first): leave now if any rank got SIGTERM/SIGUSR1 (set-up, evaluation)."""
    if (sig := stop.agreed(accelerator)) is not None:
        raise Stopped(f"{sig}: stopped {where}; {_stages(ledger.done_stages())} done — rerun the same command to "
                      "continue", step_checkpoint=False)


def run_context(recipe: Recipe, run_dir: Path, accelerator: Any, ledger: Ledger, display: Display,
                stop: StopSignals | None = None, upto: int | None = None) -> RunContext:
    """What the stages of a run share: the tokenizer, every stage's plan, the metrics log. Stages after `upto`
    (a `--stage N` job) are planned only where that needs no data."""
    tokenizer = load_tokenizer(recipe.model)
    check_tokenizer(recipe, tokenizer)  # chat data needs its template, data.add_bos its BOS: refused before stage 0

    def pool_size(j: int) -> int | None:  # only stages that train for epochs need it
        if upto is not None and j > upto:
            return None
        with accelerator.main_process_first():
            return len(build_pool(recipe.stages[j].data, tokenizer, recipe.stage_train(j).seq_len, recipe.seed,
                                  run_dir / CACHE, f"stages.{j}.data")[0])

    plans = plan_stages(recipe, accelerator.num_processes, pool_size)
    metrics = MetricsLog(run_dir, accelerator, trackers=list(recipe.logging.trackers),
                         project=recipe.logging.project or recipe.name, config=recipe.to_dict())
    return RunContext(recipe, run_dir, ledger, accelerator, tokenizer, metrics, display, plans, stop)


def _stages_to_train(recipe: Recipe, run_dir: Path, only_stage: int | None, done: list[int],
                     display: Display) -> list[int]:
    n = len(recipe.stages)
    if only_stage is None:
        todo = [i for i in range(n) if i not in done]
        if not todo:
            display.message(f"all {n} stages of {run_dir} are done; nothing to train")
        return todo
    if not 0 <= only_stage < n:
        raise LlmclError(f"--stage {only_stage}: the recipe has {n} stages (0..{n - 1})")
    if only_stage in done:
        display.message(f"stage {only_stage} ({recipe.stages[only_stage].name}) is already done in {run_dir}; "
                        "nothing to train")
        return []
    if only_stage > 0 and only_stage - 1 not in done:
        raise LlmclError(f"--stage {only_stage}: stage {only_stage - 1} ({recipe.stages[only_stage - 1].name}) "
                         f"is not done in {run_dir}; train it first (--stage {only_stage - 1})")
    return [only_stage]

