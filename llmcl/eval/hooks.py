"""Evaluation during `llmcl train`: the base row before the first stage and one row after every stage.

Under DDP every rank scores its share of the requests (lm-eval shards them by rank) and rank 0 writes the row;
under DeepSpeed, or with one process, rank 0 scores while the others wait at a barrier. Rows that a crashed or
interrupted run left unscored are scored when the run is restarted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmcl.eval import render, report as report_mod
from llmcl.eval.scoring import BASE, prepare_stage_tasks, row_file, row_scored, row_tasks, score_row


class EvalHooks:
    def __init__(self, recipe: Any, run_dir: Path, display: Any):
        self.recipe, self.run_dir, self.display = recipe, Path(run_dir), display
        self._tokenizer = None
        self._stage_tasks = None

    @property
    def enabled(self) -> bool:
        e = self.recipe.eval
        return e.after_each_stage and (e.stage_tasks or bool(e.tasks))

    def _tok(self):
        if self._tokenizer is None:
            from llmcl.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.recipe.model)
        return self._tokenizer

    def _score(self, row: str | int, accelerator: Any) -> None:
        """Every rank scores its share (data-parallel), or rank 0 scores alone."""
        from accelerate.utils import DistributedType

        parallel = accelerator.num_processes > 1 and accelerator.distributed_type != DistributedType.DEEPSPEED
        if not parallel and not accelerator.is_main_process:
            return
        if not row_tasks(self.recipe, row, self._prepared(accelerator if parallel else None)):
            return  # a stage in the middle when only general tasks at the ends are asked for: no row
        label = "the base model" if row == BASE else f"stage {row} ({self.recipe.stages[int(row)].name})"
        self.display.message(f"evaluating {label} with lm-eval"
                             + (f" on {accelerator.num_processes} processes" if parallel else "") + " ...")
        score_row(self.run_dir, row, recipe=self.recipe, tokenizer=self._tok(),
                  accelerator=accelerator if parallel else None, stage_tasks=self._stage_tasks)

    def _prepared(self, accelerator: Any) -> list[Any]:
        """The run's stage tasks, the same for every row: rendered and written once (by every rank of a
        data-parallel evaluation, `accelerator`; else by the one process calling)."""
        if self._stage_tasks is None:
            self._stage_tasks = prepare_stage_tasks(self.run_dir, self.recipe, self._tok(), accelerator)
            for note in (t.note for t in self._stage_tasks if t.note):
                self.display.message(note)
        return self._stage_tasks

    def needs_weights(self, index: int) -> bool:
        """Whether finished stage `index` still has a row to be scored, so that its weights must stay
        (checkpoints.keep_stages). Called by rank 0 alone."""
        if not self.enabled or row_scored(self.run_dir, index):  # a damaged row is to be scored again: weights stay
            return False
        return bool(row_tasks(self.recipe, index, self._prepared(None)))

    def check_metric_choice(self) -> None:
        """eval.metric against the rows written so far (`llmcl train` calls this before it writes the recipe's
        keys into the run directory, and again once the base row is scored)."""
        if self.enabled:
            report_mod.check_metric_choice(self.run_dir, self.recipe)

    def on_start(self, accelerator: Any, ledger: Any) -> None:
        """Score the base model and any finished stage whose row is missing, or cannot be read (a damaged row
        file is scored again, from the weights that keep_stages keeps for it)."""
        if not self.enabled:
            return
        accelerator.wait_for_everyone()  # every rank sees the same missing rows
        missing = [r for r in [BASE, *ledger.done_stages()] if not row_scored(self.run_dir, r)
                   and (r == BASE or not ledger.deleted(r))]  # a stage whose weights were deleted cannot be scored
        accelerator.wait_for_everyone()
        for row in missing:
            if accelerator.is_main_process and row_file(self.run_dir, row).exists():
                self.display.message(f"note: {row_file(self.run_dir, row)} cannot be read: its row is scored again")
            self._score(row, accelerator)
        if accelerator.is_main_process:
            self.check_metric_choice()  # the base row was just scored: before a stage trains
        if accelerator.is_main_process and missing and ledger.done_stages():
            self._show(accelerator, ledger)
        accelerator.wait_for_everyone()

    def on_stage_end(self, index: int, accelerator: Any, ledger: Any) -> None:
        if not self.enabled:
            return
        self._score(index, accelerator)
        if accelerator.is_main_process:
            self._show(accelerator, ledger)
        accelerator.wait_for_everyone()

    def _show(self, accelerator: Any, ledger: Any) -> None:
        rep = report_mod.collect(self.run_dir)
        self.display.message(render.current_row_text(rep))
        last = rep.row_stage[-1]
        if last is None or not accelerator.trackers:
            return
        step = ledger.steps_before(last + 1)
        values = {f"eval/{c.label}": v for c, v in zip(rep.columns, rep.values[-1]) if v is not None}
        values.update({f"cl/{k}": v for k, v in rep.summary.items() if v is not None})
        values.update({f"cl/{metric}/{k}": v for metric, s in rep.by_metric.items() for k, v in s.items()
                       if v is not None})  # stage tasks in several units: a summary per metric
        accelerator.log(values, step=step)
