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
--setup-only prints only the set-up: that, and lm-eval building the stage tasks (what every row pays), as
written and with lm-eval's default few-shot pool (the whole test split read into it: before 2026-12-07).

    python scripts/bench/eval_speed.py --setup-only
    python scripts/bench/eval_speed.py --setup-only --recipe cl_long_order4.yaml

Two more rows score the bfloat16 model with its weights frozen (requires_grad off: what a PEFT base model, a
merged adapter stage or any stage loaded for scoring has), with and without llmcl.models.contiguous_head: the
LM head's input made contiguous before PyTorch's CPU linear sees generation's last-position view.
"""

from __future__ import annotations

import argparse
import os
import statistics
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
    p.add_argument("--recipe", default="cl_standard.yaml", help="a recipe of recipes/benchmarks (--setup-only)")
    p.add_argument("--setup-only", action="store_true", help="only the set-up's seconds: the stage tasks rendered "
                   "and written, and built by lm-eval")
    args = p.parse_args()
    from lm_eval.models.huggingface import HFLM

    recipe = recipe_mod.load(REPO / "recipes" / "benchmarks" / args.recipe, [f"model.path={args.model}"])
    tokenizer = load_tokenizer(recipe.model)
    if args.setup_only:
        return setup(recipe, tokenizer)
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


def setup(recipe, tokenizer) -> None:
    """--setup-only: the stage tasks rendered and written (once a run), and built by lm-eval (every row) as written
    and with the few-shot pool lm-eval reads from the test split by default (median of 3 each)."""
    import shutil

    import yaml
    from lm_eval.tasks import TaskManager, get_task_dict

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        names = [t.task for t in write_stage_tasks(recipe, Path(tmp), tokenizer)]
        print(f"{recipe.name}: {len(names)} stage tasks rendered and written: {time.perf_counter() - t0:.1f} s")
        pooled = Path(tmp) / "pooled"
        shutil.copytree(Path(tmp) / "eval" / "tasks", pooled)
        for path in pooled.rglob("*.yaml"):  # the same tasks without the empty few-shot pool
            config = yaml.safe_load(path.read_text())
            config.pop("fewshot_config", None)
            path.write_text(yaml.safe_dump(config, sort_keys=False))
        dirs = {"as written": Path(tmp) / "eval" / "tasks", "with the test split read into the few-shot pool": pooled}
        for label, tasks_dir in dirs.items():
            seconds = []
            for _ in range(3):
                with harness.offline_and_quiet():
                    t0 = time.perf_counter()
                    get_task_dict(names, TaskManager(include_path=[str(tasks_dir)], include_defaults=False))
                    seconds.append(time.perf_counter() - t0)
            print(f"lm-eval builds them (every row), {label}: {statistics.median(seconds):.2f} s "
                  f"({min(seconds):.2f}-{max(seconds):.2f})", flush=True)
        # a whole row through llmcl's harness with builtin:tiny (the SmolLM2 tokenizer, a 3.2M-parameter random
        # Llama): the set-up is most of it; the two layouts alternate, the first call of each is not counted
        tiny = load_base_model(recipe_mod.load(REPO / "recipes" / "benchmarks" / "cl_standard.yaml",
                                               ["model.path=builtin:tiny"]).model, recipe.seed).eval()
        rows: dict[str, list[float]] = {label: [] for label in dirs}
        for k in range(8):
            label = list(dirs)[k % 2]
            t0 = time.perf_counter()
            harness.evaluate(tiny, tokenizer, names, include_path=[str(dirs[label])], include_defaults=False,
                             limit=recipe.eval.limit, batch_size=16, num_fewshot=None)
            if k >= 2:
                rows[label].append(time.perf_counter() - t0)
        for label, seconds in rows.items():
            print(f"a row scored by builtin:tiny at eval.limit {recipe.eval.limit}, {label}: "
                  f"{statistics.median(seconds):.2f} s ({min(seconds):.2f}-{max(seconds):.2f})")


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
