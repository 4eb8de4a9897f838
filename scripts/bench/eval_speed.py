"""Evaluation speed: one row of the CL benchmark's accuracy matrix scored by lm-eval's HFLM, by llmcl's
shared-context scoring (one packed row per context), and by that in bfloat16 (eval.dtype, what a bf16 training
run evaluates in), in one process on the same model and test items.

Every stage task of recipes/benchmarks/cl_standard.yaml both ways (generated label by exact match; loglikelihood
over the label set) at --limit items a task. Prints seconds per way of scoring and the ratios, and checks that
the scores agree (HFLM and shared-context: equal; bfloat16: reported).

    python scripts/bench/eval_speed.py                 # SmolLM2-135M, 30 items a task (about 5 minutes on 2 cores)
    python scripts/bench/eval_speed.py --limit 100

A row scores the label sets with the LM head at every position of the packed rows (before 2026-12-03), against
the default: the head only at the positions that predict a continuation's token (llmcl.models.logits_at_positions).

Also prints the seconds of rendering and writing the run's stage tasks (what a run shares among its rows).

Two more rows score the bfloat16 model with its weights frozen (requires_grad off: what a PEFT base model, a
merged adapter stage or any stage loaded for scoring has), with and without llmcl.models.contiguous_head: the
LM head's input made contiguous before PyTorch's CPU linear sees generation's last-position view.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from llmcl import recipe as recipe_mod  # noqa: E402
from llmcl.eval import harness, shared_context  # noqa: E402
from llmcl.eval.tasks import write_stage_tasks  # noqa: E402
from llmcl.models import _contiguous_input, load_base_model, load_tokenizer  # noqa: E402


def score(model, tokenizer, tasks, tasks_dir, limit, lm_class) -> tuple[float, dict, dict]:
    """Seconds, the scores by task and the seconds by kind (generation, loglikelihood) with `lm_class`."""
    original = shared_context.hflm_class
    shared_context.hflm_class = lambda: lm_class
    try:
        seconds, values = {}, {}
        for kind in ("generate", "choice"):
            names = [t for t in tasks if t.endswith("-choice") == (kind == "choice")]
            t0 = time.perf_counter()
            res = harness.evaluate(model, tokenizer, names, include_path=[str(tasks_dir)], include_defaults=False,
                                   limit=limit, batch_size=16, num_fewshot=None)
            seconds[kind] = time.perf_counter() - t0
            values.update({k: v.value for k, v in res.items()})
    finally:
        shared_context.hflm_class = original
    return sum(seconds.values()), values, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=30, help="test items per task (default 30)")
    p.add_argument("--model", default="builtin:smollm2-135m")
    p.add_argument("--float32-only", action="store_true", help="only the float32 rows (a CPU without native "
                   "bfloat16 emulates it: scripts/bench/cpu_bf16.py)")
    args = p.parse_args()
    from lm_eval.models.huggingface import HFLM

    recipe = recipe_mod.load(REPO / "recipes" / "benchmarks" / "cl_standard.yaml", [f"model.path={args.model}"])
    tokenizer = load_tokenizer(recipe.model)
    model = load_base_model(recipe.model, recipe.seed).eval()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        tasks = [t.task for t in write_stage_tasks(recipe, Path(tmp), tokenizer)]
        print(f"the stage tasks rendered and written (every test item of every stage tokenized; once a run, "
              f"before 2026-12-07 once a row): {time.perf_counter() - t0:.1f} s", flush=True)
        tasks_dir = Path(tmp) / "eval" / "tasks"
        shared = shared_context.hflm_class()
        full_logits = type("FullLogits", (shared,), {"_head_at_predictors": False})  # the LM head everywhere
        rows = {"HFLM, float32": score(model, tokenizer, tasks, tasks_dir, args.limit, HFLM),
                "shared context, float32": score(model, tokenizer, tasks, tasks_dir, args.limit, shared),
                "shared context, float32, LM head at every position": score(model, tokenizer, tasks, tasks_dir,
                                                                             args.limit, full_logits)}
        if args.float32_only:
            report(args, tasks, rows)
            return
        model.to(torch.bfloat16)
        rows["shared context, bfloat16"] = score(model, tokenizer, tasks, tasks_dir, args.limit, shared)
        model.requires_grad_(False)  # as an adapter's or a loaded stage's weights are
        rows["bfloat16, frozen weights"] = score(model, tokenizer, tasks, tasks_dir, args.limit, shared)
        head = model.get_output_embeddings()._forward_pre_hooks
        hooks = {k: h for k, h in head.items() if h is _contiguous_input}
        for k in hooks:
            del head[k]
        rows["bfloat16, frozen weights, no contiguous_head"] = score(model, tokenizer, tasks, tasks_dir,
                                                                    args.limit, shared)
        head.update(hooks)
    report(args, tasks, rows)


def report(args: argparse.Namespace, tasks: list[str], rows: dict) -> None:
    base = rows["HFLM, float32"]
    print(f"{args.model}, {len(tasks)} tasks ({len(tasks) // 2} stages both ways), {args.limit} items a task, "
          f"{torch.get_num_threads()} threads\n")
    print("| scoring | generation (s) | label-set loglikelihood (s) | row (s) | speed-up | scores equal to HFLM's |")
    print("|---|---|---|---|---|---|")
    for name, (total, values, seconds) in rows.items():
        diff = [t for t in tasks if abs(values[t] - base[1][t]) > 1e-9]
        print(f"| {name} | {seconds['generate']:.1f} | {seconds['choice']:.1f} | {total:.1f} | "
              f"{base[0] / total:.2f}x | {'yes' if not diff else 'no: ' + ', '.join(f'{t} {base[1][t]:.2f} -> {values[t]:.2f}' for t in diff)} |")


if __name__ == "__main__":
    main()
