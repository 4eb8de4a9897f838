"""Run lm-eval in-process on a loaded model, offline, without disturbing the training RNG."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import sys
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import torch
import tqdm

from llmcl.errors import LlmclError
from llmcl.eval.metrics import LOWER_IS_BETTER, PRIMARY



@dataclass
class TaskResult:
    task: str
    metric: str
    value: float
    stderr: float | None
    n: int
    version: Any
    higher_is_better: bool
    metrics: dict[str, float]
    stderrs: dict[str, float] | None = None
    """The standard error of every metric that has one (eval.metric may show another metric than `metric`)."""
    higher_is_better_by_metric: dict[str, bool] | None = None
    """Whether higher is better, for every metric (lm-eval's word where it gives one)."""
    processes: int = 1
    """How many processes lm-eval split the requests over (data-parallel evaluation)."""
    num_fewshot: int | None = None
    """How many examples lm-eval put before each item (its "n-shot"): a task whose own YAML fixes 0 keeps 0
    whatever eval.num_fewshot asked."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """lm-eval reseeds python/numpy/torch; put every generator back as it was."""
    import numpy as np

    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def _silent_tqdm(*args: Any, **kwargs: Any):
    kwargs["disable"] = True
    return tqdm.tqdm(*args, **kwargs)


@contextlib.contextmanager
def offline_and_quiet() -> Iterator[None]:
    """Nothing reaches the network during evaluation unless the user explicitly set HF_HUB_OFFLINE=0 (which
    HF_DATASETS_OFFLINE follows unless it is set itself); no
    progress bars from datasets/lm-eval (tqdm) and no `git` probe of the working directory by lm-eval."""
    from unittest import mock

    import datasets

    defaults = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    old = {k: os.environ.get(k) for k in defaults}
    for k, v in defaults.items():
        os.environ.setdefault(k, v)
    bars = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    lm_eval_logger = logging.getLogger("lm_eval")
    level = lm_eval_logger.level
    lm_eval_logger.setLevel(logging.ERROR)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(mock.patch("lm_eval.loggers.utils.get_git_commit_hash", lambda: None))
            stack.enter_context(mock.patch("lm_eval.evaluator.get_git_commit_hash", lambda: None))
            for name, module in list(sys.modules.items()):  # lm-eval passes disable= itself: force it
                if name.startswith("lm_eval") and getattr(module, "tqdm", None) is tqdm.tqdm:
                    stack.enter_context(mock.patch.object(module, "tqdm", _silent_tqdm))
            yield
    finally:
        lm_eval_logger.setLevel(level)
        if bars:
            datasets.enable_progress_bars()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _parse(task: str, results: dict[str, Any]) -> TaskResult:
    raw = results["results"][task]
    metrics: dict[str, float] = {}
    stderrs: dict[str, float] = {}
    for key, value in raw.items():
        if "," not in key or not isinstance(value, (int, float)):
            continue
        name, filter_name = key.split(",", 1)
        # a task with several filters (gsm8k: strict-match, flexible-extract) reports each metric once per
        # filter: the first, the task's own default, is the metric's value; the others keep their filter's name
        into, name = (stderrs, name[: -len("_stderr")]) if name.endswith("_stderr") else (metrics, name)
        into[name if name not in into else f"{name},{filter_name}"] = float(value)
    primary = next((m for m in PRIMARY if m in metrics), next(iter(metrics), None))
    if primary is None:
        raise LlmclError(f"lm-eval returned no metric for task {task!r}")
    n = results.get("n-samples", {}).get(task, {})
    said = results.get("higher_is_better", {}).get(task, {})
    higher = {m: bool(said[m.split(",")[0]]) if said.get(m.split(",")[0]) is not None
              else m.split(",")[0] not in LOWER_IS_BETTER for m in metrics}
    stderr = stderrs.get(primary)
    return TaskResult(
        task=task, metric=primary, value=metrics[primary],
        stderr=stderr if stderr is not None and stderr == stderr else None,  # N/A -> None
        n=int(n.get("effective", n.get("original", 0)) if isinstance(n, dict) else 0),
        version=results.get("versions", {}).get(task),
        higher_is_better=higher[primary],
        metrics=metrics,
        stderrs={k: v for k, v in stderrs.items() if v == v},  # N/A (nan) left out
        higher_is_better_by_metric=higher,
        num_fewshot=results.get("n-shot", {}).get(task),
    )


class ScoredAsTrained:
    """A mixin for lm-eval's HFLM: text is tokenized for scoring as llmcl tokenized it for training.

    - A document scored by loglikelihood_rolling (perplexity, bits per byte) is its tokens alone after HFLM's
      prefix token. HFLM encodes it with the tokenizer's special tokens, so a tokenizer that adds a BOS (Llama,
      Mistral, Gemma) had that BOS predicted after the prefix BOS: a log p(BOS | BOS) term in every document's
      score (EleutherAI/lm-evaluation-harness#3333) that training never teaches.
    - A stage task's (context, continuation) pair (a label set's loglikelihood) is the prompt's tokens, then the
      answer's, each tokenized alone as training tokenizes a prompt and its completion. HFLM tokenizes them
      joined after moving the prompt's trailing spaces into the answer: a prompt "Sentiment: " and an answer
      "positive" were scored as " positive" after "Sentiment:", tokens training never showed the model there.
      General tasks keep HFLM's way (their published numbers use it: a convention, where the first is a fault,
      fixed for every task).
    - A stage task's prompt, for generation and for a label set alike, gets the special tokens training gave it
      (formatting.prompt_ids): none where the chat template rendered it (`rendered`: HFLM added the tokenizer's
      BOS to a template that renders none, Zephyr's, TinyLlama-Chat's), and never a trailing EOS (a tokenizer
      with add_eos_token)."""

    _rolling = False
    _stage_pairs: frozenset = frozenset()
    _prompts: dict[str, bool] = {}  # a stage task's prompts of the requests at hand -> rendered by a chat template
    rendered: frozenset[str] = frozenset()  # the stage tasks whose prompts the chat template rendered

    def loglikelihood_rolling(self, requests: Any, disable_tqdm: bool = False) -> Any:
        self._rolling = True
        try:
            return super().loglikelihood_rolling(requests, disable_tqdm)  # type: ignore[misc]
        finally:
            self._rolling = False

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        if self._rolling and add_special_tokens is None:
            add_special_tokens = False
        return super().tok_encode(string, add_special_tokens=add_special_tokens,  # type: ignore[misc]
                                  left_truncate_len=left_truncate_len, **kwargs)

    def _stage_prompts(self, requests: Any) -> dict[str, bool]:
        from llmcl.eval.tasks import STAGE_PREFIX

        return {r.args[0]: r.task_name in self.rendered for r in requests
                if (r.task_name or "").startswith(STAGE_PREFIX)}

    def loglikelihood(self, requests: Any, disable_tqdm: bool = False) -> Any:
        from llmcl.eval.tasks import STAGE_PREFIX

        self._stage_pairs = frozenset(r.args for r in requests if (r.task_name or "").startswith(STAGE_PREFIX))
        self._prompts = self._stage_prompts(requests)
        try:
            return super().loglikelihood(requests, disable_tqdm)  # type: ignore[misc]
        finally:
            self._stage_pairs, self._prompts = frozenset(), {}

    def generate_until(self, requests: Any, disable_tqdm: bool = False) -> Any:
        self._prompts = self._stage_prompts(requests)
        try:
            return super().generate_until(requests, disable_tqdm)  # type: ignore[misc]
        finally:
            self._prompts = {}

    def _prompt_ids(self, context: str) -> list[int]:
        from llmcl.data.formatting import prompt_ids

        return prompt_ids(self.tokenizer, context, self._prompts.get(context, False))  # type: ignore[attr-defined]

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if (context, continuation) in self._stage_pairs:
            return self._prompt_ids(context), self.tok_encode(continuation, add_special_tokens=False)
        return super()._encode_pair(context, continuation)  # type: ignore[misc]

    def tok_batch_encode(self, strings: list[str], padding_side: str = "left", left_truncate_len: int | None = None,
                         truncation: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Generation's prompts, left-padded: a stage task's as training tokenized it (the others as HFLM does)."""
        if not any(s in self._prompts for s in strings) or padding_side != "left":
            return super().tok_batch_encode(strings, padding_side, left_truncate_len, truncation)  # type: ignore[misc]
        rows = [self._prompt_ids(s) if s in self._prompts
                else super(ScoredAsTrained, self).tok_batch_encode([s])[0][0].tolist() for s in strings]
        if left_truncate_len:
            rows = [r[-left_truncate_len:] for r in rows]
        width = max(map(len, rows))
        pad = self.tokenizer.pad_token_id  # type: ignore[attr-defined]
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        return ids, mask


def _raised_in(exc: BaseException, path_end: str) -> bool:
    """Whether a frame of `exc`'s traceback is in a file whose path ends with `path_end`."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.replace(os.sep, "/").endswith(path_end):
            return True
        tb = tb.tb_next
    return False


def evaluate(model: Any, tokenizer: Any, tasks: list[str], *, include_path: list[str], include_defaults: bool,
             limit: int | None, batch_size: int | str, num_fewshot: int | None,
             metadata: dict[str, Any] | None = None, accelerator: Any = None,
             rendered: frozenset[str] = frozenset()) -> dict[str, TaskResult]:
    """Score `model` on lm-eval `tasks`; returns task -> TaskResult. `rendered`: the stage tasks whose prompts
    went through the chat template (tokenized without the tokenizer's special tokens, as trained).

    With an `accelerator` of several processes (all of them calling this at once), lm-eval shards the requests
    by rank and gathers the per-sample metrics on rank 0, which gets the results; the other ranks get {}."""
    import lm_eval
    import lm_eval.evaluator  # noqa: F401  (the modules whose progress bars are silenced)
    from lm_eval.tasks import TaskManager

    from llmcl.eval.shared_context import hflm_class

    if not tasks:
        return {}
    lm_class = type("LlmclHFLM", (ScoredAsTrained, hflm_class()), {})  # imported before the progress bars of
    # lm-eval's modules are silenced
    was_training = model.training
    model.eval()
    try:
        with offline_and_quiet(), preserved_rng(), torch.no_grad():
            manager = TaskManager(include_path=include_path, include_defaults=include_defaults,
                                  metadata=metadata or {})
            lm = lm_class(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, softmax_dtype="float32",
                      max_length=getattr(model.config, "max_position_embeddings", None))
            lm.rendered = rendered
            if accelerator is not None and accelerator.num_processes > 1:  # data-parallel: lm-eval shards by rank
                lm._rank, lm._world_size = accelerator.process_index, accelerator.num_processes
                lm.accelerator, lm._device = accelerator, accelerator.device
            try:
                results = lm_eval.simple_evaluate(
                    model=lm, tasks=list(tasks), task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                    log_samples=False, bootstrap_iters=1000, verbosity="ERROR",
                )
            except (AssertionError, ValueError) as exc:  # lm-eval's few-shot sampler: an assert, or random.sample's
                if not num_fewshot or not _raised_in(exc, "lm_eval/api/samplers.py"):
                    raise
                raise LlmclError(f"recipe key 'eval.num_fewshot': {num_fewshot} examples asked, but a task has fewer "
                                 f"to draw them from ({exc}); a stage task draws them from its own test split, and one "
                                 "written by a run without eval.num_fewshot has none: lower eval.num_fewshot, or score "
                                 "those stages in their own run with it set") from exc
    finally:
        model.train(was_training)
    if results is None:
        if accelerator is not None and not accelerator.is_main_process:
            return {}  # rank 0 has the gathered results
        raise LlmclError("lm-eval returned no results")
    parsed = {t: _parse(t, results) for t in tasks}
    for r in parsed.values():
        r.processes = lm.world_size
    return parsed


@functools.cache  # asked for every cell a row records
def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")
