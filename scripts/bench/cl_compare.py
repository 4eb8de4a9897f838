"""The continual-learning comparison: every llmcl method on the standard CL benchmark, plus the multitask bound.

SmolLM2-135M-Instruct learns dbpedia -> amazon -> yahoo -> agnews (O-LoRA's order; ../shared/data/cl_benchmark),
each task as generation of its label scored by exact match, with every method at the same training budget:

  seqft          full fine-tuning, nothing against forgetting (the baseline that must forget)
  seqft+replay   seqft with 20% compute-equivalent replay of the earlier stages' data
  hft            Half Fine-Tuning (half of the matrices frozen per stage)
  osft           SVD-orthogonal full fine-tuning (adaptive preserved rank)
  lora           one LoRA adapter (r=16) trained through all stages
  ilora          dual-memory interpolated LoRA with reservoir replay (half the batch current, half replay)
  mora           self-activated rank-1 experts (16 new experts per stage)
  multitask      the upper bound: one stage that mixes all four tasks (same total samples), scored on all four

Every run has the same samples per step and the same steps per stage (multitask: 4x the steps of one stage in
one stage), so every method sees the same number of training samples. General ability is scored on local
lm-eval tasks built from ../shared/data/eval (arc_easy, piqa, winogrande) for the base model and the last stage.

    python scripts/bench/cl_compare.py                 # CPU size (see --help for the numbers), ~90 min on 2 cores
    python scripts/bench/cl_compare.py --full          # the papers' sizes: 1000 samples/task, 1 epoch, full test
    python scripts/bench/cl_compare.py --seeds 3       # mean +- std over seeds 0, 1, 2
    python scripts/bench/cl_compare.py --methods seqft lora --model builtin:tiny --steps 2 --limit 4   # smoke

Each method runs as `python -m llmcl train` in its own process (its peak resident memory is its own), into
<out>/<method>-s<seed>/; finished runs are skipped, so an interrupted comparison continues where it stopped.
Prints the table (AA, BWT, FWT, general-ability delta, wall time, peak RSS) and writes <out>/summary.md and
<out>/summary.json; `llmcl report <out>/*` gives the per-run matrices and heatmaps.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
BASE_RECIPE = REPO / "recipes" / "benchmarks" / "cl_standard.yaml"
GENERAL = ["llmcl_arc_easy", "llmcl_piqa", "llmcl_winogrande"]
FULL_LR, ADAPTER_LR = 2e-4, 1e-3
METHODS: dict[str, dict] = {
    "seqft": {"method": {"name": "seqft"}, "train": {"lr": FULL_LR}},
    "seqft+replay": {"method": {"name": "seqft"}, "train": {"lr": FULL_LR}, "replay": {"ratio": 0.2}},
    "hft": {"method": {"name": "hft"}, "train": {"lr": FULL_LR}},
    "osft": {"method": {"name": "osft"}, "train": {"lr": FULL_LR}},
    "lora": {"method": {"name": "lora", "r": 16}, "train": {"lr": ADAPTER_LR}},
    "ilora": {"method": {"name": "ilora", "r": 16}, "train": {"lr": ADAPTER_LR}, "half_batch": True},
    "mora": {"method": {"name": "mora", "r": 16}, "train": {"lr": ADAPTER_LR}},
    "multitask": {"method": {"name": "seqft"}, "train": {"lr": FULL_LR}, "multitask": True},
}


def recipe_for(name: str, args: argparse.Namespace, seed: int, tasks_dir: Path | None) -> dict:
    """The recipe of one method: cl_standard.yaml at this comparison's size, with the method's settings."""
    spec = METHODS[name]
    base = yaml.safe_load(BASE_RECIPE.read_text())
    base.pop("inherit", None)
    r = copy.deepcopy(base)
    r["name"] = f"cl_compare_{name.replace('+', '_')}"
    r["seed"] = seed
    r["model"] = {"path": args.model}
    r["method"] = copy.deepcopy(spec["method"])
    r["train"].update(spec["train"], max_steps=args.steps, batch_size=args.batch, save_every=0)
    if args.full:  # O-LoRA's input length (512 source tokens)
        r["train"]["seq_len"] = 512
    if spec.get("half_batch"):  # I-LoRA adds an equal replay batch to each step: same samples per step
        r["train"]["batch_size"] = max(1, r["train"]["batch_size"] // 2)
        r["method"]["replay_batch"] = r["train"]["batch_size"]
    if "replay" in spec:
        r["replay"] = spec["replay"]
    for st in r["stages"]:
        st["data"]["max_train_samples"] = args.train_samples
    r["eval"] = {"limit": args.limit, "tasks": list(args.general), "tasks_limit": args.general_limit,
                 "tasks_every_stage": False, "max_new_tokens": 8,
                 "max_prompt_tokens": r["train"]["seq_len"] - 8}
    if spec.get("multitask"):
        stages = r["stages"]
        last = copy.deepcopy(stages[-1])
        r["stages"] = [{"name": "multitask", "data": last["data"]}]
        share = 1 - 1 / len(stages)
        r["replay"] = {"ratio": share, "previous_stages": False,
                       "datasets": [dict(st["data"], weight=1.0) for st in stages[:-1]]}
        r["train"]["max_steps"] = len(stages) * args.steps
        # scored on every task's test split: the stage tasks that the seqft run wrote
        r["eval"].update(stage_tasks=False, include_path=[str(tasks_dir)],
                         tasks=[f"llmcl_stage_{st['name']}" for st in stages] + list(args.general),
                         tasks_every_stage=True)
    return r


def run_one(name: str, args: argparse.Namespace, seed: int) -> dict:
    run_dir = args.out / f"{name.replace('+', '_')}-s{seed}"
    tasks_dir = args.out / f"seqft-s{seed}" / "eval" / "tasks"
    recipe = recipe_for(name, args, seed, tasks_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    recipe_path = run_dir.parent / f"{run_dir.name}.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    stats_path = run_dir / "bench.json"
    if not stats_path.exists():
        shared_base = args.out / f"seqft-s{seed}" / "eval" / "base.json"
        copied = name != "seqft" and shared_base.exists()
        if copied and not (run_dir / "eval" / "base.json").exists():
            # the base model's row is the same for every method (same model, tasks and limits): score it once
            (run_dir / "eval").mkdir(exist_ok=True)
            shutil.copyfile(shared_base, run_dir / "eval" / "base.json")
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
        t0 = time.perf_counter()
        log = open(run_dir.parent / f"{run_dir.name}.log", "a")
        proc = subprocess.Popen([sys.executable, "-m", "llmcl", "train", str(recipe_path), "--run-dir", str(run_dir)],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            sys.exit(f"{name} (seed {seed}) failed with exit {proc.returncode}; see {log.name}")
        wall = time.perf_counter() - t0
        if not copied:  # the base row was scored in this run: leave it out, so every method's wall time compares
            wall -= json.loads((run_dir / "eval" / "base.json").read_text()).get("seconds", 0.0)
        stats = {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024}
        stats_path.write_text(json.dumps(stats))
    stats = json.loads(stats_path.read_text())
    rep = subprocess.run([sys.executable, "-m", "llmcl", "report", str(run_dir)], cwd=REPO, capture_output=True,
                         text=True)
    if rep.returncode != 0:
        sys.exit(f"llmcl report {run_dir} failed: {rep.stderr.strip()}")
    matrix = json.loads((run_dir / "report" / "matrix.json").read_text())
    ledger = json.loads((run_dir / "ledger.json").read_text())
    train_s = sum(s.get("wall_seconds", 0) for s in ledger["stages"])
    out = {"method": name, "seed": seed, **stats, "train_s": train_s, **_scores(name, matrix, run_dir)}
    return out


def _scores(name: str, matrix: dict, run_dir: Path) -> dict:
    m = matrix["metrics"]
    if name != "multitask":
        return {k: m.get(k) for k in ("AA", "BWT", "FWT", "general_delta")}
    # multitask: one row after the single stage; its accuracy on each task's split, no sequence -> no BWT/FWT
    row = json.loads((run_dir / "eval" / "stage-00.json").read_text())["tasks"]
    base = json.loads((run_dir / "eval" / "base.json").read_text())["tasks"]
    stage = [t for t in row if t.startswith("llmcl_stage_")]
    general = [t for t in row if not t.startswith("llmcl_stage_")]
    aa = statistics.mean(row[t]["value"] for t in stage)
    gd = statistics.mean(row[t]["value"] - base[t]["value"] for t in general) if general else None
    return {"AA": aa, "BWT": None, "FWT": None, "general_delta": gd}


def _cell(values: list, digits: int = 3, signed: bool = False) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "—"
    fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
    if len(vals) == 1:
        return fmt.format(vals[0])
    return f"{fmt.format(statistics.mean(vals))} ± {statistics.stdev(vals):.{digits}f}"


def table(results: list[dict]) -> list[str]:
    head = "| method | AA | BWT | FWT | general Δ | train time (s) | wall incl. eval (s)* | peak RSS (MiB) |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for name in dict.fromkeys(r["method"] for r in results):
        rs = [r for r in results if r["method"] == name]
        col = lambda k: [r[k] for r in rs]  # noqa: E731
        lines.append(f"| {name} | {_cell(col('AA'))} | {_cell(col('BWT'), signed=True)} | "
                     f"{_cell(col('FWT'), signed=True)} | {_cell(col('general_delta'), signed=True)} | "
                     f"{_cell(col('train_s'), 0)} | {_cell(col('wall_s'), 0)} | {_cell(col('peak_rss_mib'), 0)} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--model", default="builtin:smollm2-135m")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per stage (CPU size; default 12)")
    p.add_argument("--batch", type=int, default=8, help="samples per step (default 8)")
    p.add_argument("--train-samples", type=int, default=1000, help="training samples read per task (default 1000)")
    p.add_argument("--limit", type=int, default=30, help="test samples per task (default 30; --full: all)")
    p.add_argument("--general", nargs="*", default=GENERAL, help="general-ability lm-eval tasks")
    p.add_argument("--general-limit", type=int, default=50, help="samples per general task (default 50)")
    p.add_argument("--seeds", type=int, default=1, help="run seeds 0..N-1 and report mean ± std")
    p.add_argument("--full", action="store_true", help="the papers' sizes: 1000 samples per task for one epoch, "
                                                      "the whole test split (a GPU job)")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "cl_compare")
    args = p.parse_args()
    args.out = args.out.resolve()
    methods = list(args.methods)
    if "multitask" in methods and "seqft" not in methods:
        methods.insert(0, "seqft")  # multitask is scored on the stage tasks the seqft run writes
    methods.sort(key=lambda m: m != "seqft")
    if args.full:  # the papers' sizes: 1000 samples per task for one epoch, whole test splits
        args.steps = -(-args.train_samples // args.batch)
        args.limit = args.general_limit = None
    results = []
    for seed in range(args.seeds):
        for name in methods:
            t0 = time.perf_counter()
            results.append(run_one(name, args, seed))
            r = results[-1]
            print(f"[{time.strftime('%H:%M:%S')}] {name} seed {seed}: AA {_cell([r['AA']])} BWT "
                  f"{_cell([r['BWT']], signed=True)} ({time.perf_counter() - t0:.0f}s)", flush=True)
    size = (f"{args.steps} steps x {args.batch} samples per task" + (" (--full: one epoch)" if args.full else "")
            + f", {args.limit or 'all'} test samples per task, {args.general_limit or 'all'} per general task")
    header = [f"{args.model}, dbpedia -> amazon -> yahoo -> agnews, {size}, "
              f"general: {', '.join(args.general) or 'none'}, seeds: {args.seeds}"]
    lines = header + [""] + table(results) + [
        "", "\\* `llmcl train` from start to end, the evaluation after every stage included; the base model's row is "
        "scored once (in the seqft run) and shared, and left out of every wall time."]
    print("\n" + "\n".join(lines))
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    (args.out / "summary.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
