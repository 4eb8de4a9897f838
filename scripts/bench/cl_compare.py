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

Every method is a shipped recipe (recipes/benchmarks/cl_standard*.yaml, listed in METHODS), so
`llmcl train recipes/benchmarks/cl_standard_<method>.yaml` reproduces one row. Every run has the same samples
per step and the same steps per stage (multitask: 4x the steps of one stage in one stage), so every method trains
on the same number of samples; with replay part of them are replayed (seqft+replay: 20% from the second stage
on; I-LoRA: half of every step, from its reservoir). The CPU size (the recipes'): 10 steps x 8 samples per task at lr 2e-4 (full
fine-tuning) / 1e-3 (adapters), 30 test items per task whose prompt fits the 192-token training length, general
ability on 50 items each of local lm-eval tasks built from ../shared/data/eval (arc_easy, piqa, winogrande) for
the base model and the last stage. The base model's row is the same for every method: scored once, shared.

    python scripts/bench/cl_compare.py                 # CPU size: about 70 minutes on 2 cores
    python scripts/bench/cl_compare.py --full          # the papers' sizes: 1000 samples/task once, 512 tokens,
                                                       # whole test splits (prompts <= 504 tokens; a GPU job)
    python scripts/bench/cl_compare.py --seeds 3       # mean +- std over seeds 0, 1, 2
    python scripts/bench/cl_compare.py --methods seqft lora --model builtin:tiny --steps 2 --limit 4   # smoke

Each method runs as `python -m llmcl train` in its own process (its peak resident memory is its own), into
<out>/<method>-s<seed>/; finished runs are skipped, so an interrupted comparison continues where it stopped.
Prints the table (AA, BWT, FWT, general-ability delta, wall time, peak RSS) and writes <out>/summary.md (the
table and every run's accuracy matrix), <out>/summary.json and <out>/heatmaps.png; `llmcl report <out>/<run>`
gives one run's full report.
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
sys.path.insert(0, str(REPO))
from llmcl import recipe as recipe_mod  # noqa: E402
from llmcl.eval.tasks import STAGE_PREFIX, stage_task_name  # noqa: E402
from llmcl.recipe import first_difference, read_yaml  # noqa: E402  (inherit: resolved as llmcl resolves it)

BENCH = REPO / "recipes" / "benchmarks"
# every method is a shipped recipe: `llmcl train recipes/benchmarks/<file>` reproduces its row of the table
METHODS: dict[str, str] = {
    "seqft": "cl_standard.yaml",
    "seqft+replay": "cl_standard_replay.yaml",
    "hft": "cl_standard_hft.yaml",
    "osft": "cl_standard_osft.yaml",
    "lora": "cl_standard_lora.yaml",
    "ilora": "cl_standard_ilora.yaml",
    "mora": "cl_standard_mora.yaml",
    "multitask": "cl_standard.yaml",  # made one stage over all four tasks below
}


def run_dir_of(out: Path, method: str, seed: int) -> Path:
    return out / f"{method.replace('+', '_')}-s{seed}"


def recipe_for(name: str, args: argparse.Namespace, seed: int, tasks_dir: Path | None) -> dict:
    """The recipe of one method: its shipped recipe, at this comparison's size where an option changes it."""
    r = read_yaml(BENCH / METHODS[name])
    r["name"] = f"cl_compare_{name.replace('+', '_')}"
    r["seed"] = seed
    r["model"] = {**r.get("model", {}), "path": args.model}
    train, ev = r["train"], r.setdefault("eval", {})
    train["save_every"] = 0  # no step checkpoints: they would be timed
    if args.steps is not None:
        train["max_steps"] = args.steps
    if args.batch is not None:  # I-LoRA's step is its batch plus a replay batch: the same samples a step
        if r["method"]["name"] == "ilora":
            train["batch_size"] = -(-args.batch // 2)
            r["method"]["replay_batch"] = args.batch - train["batch_size"]
        else:
            train["batch_size"] = args.batch
    if args.full:  # the papers' sizes: O-LoRA's 512 input tokens, 1000 samples a task (replayed ones included)
        train["seq_len"] = 512
        ev["max_prompt_tokens"] = 512 - 8
        per_step = train["batch_size"] + r["method"].get("replay_batch", 0)
        train["max_steps"] = -(-args.train_samples // per_step)
        ev["limit"] = ev["tasks_limit"] = None
    for st in r["stages"]:
        st["data"]["max_train_samples"] = args.train_samples
    if args.limit is not None:
        ev["limit"] = args.limit
    if args.general_limit is not None:
        ev["tasks_limit"] = args.general_limit
    if args.general is not None:
        ev["tasks"] = list(args.general)
    if name == "multitask":
        stages = r["stages"]
        r["stages"] = [{"name": "multitask", "data": copy.deepcopy(stages[-1]["data"])}]
        r["replay"] = {"ratio": 1 - 1 / len(stages), "previous_stages": False,
                       "datasets": [dict(st["data"], weight=1.0) for st in stages[:-1]]}
        train["max_steps"] = len(stages) * train["max_steps"]
        # scored on every task's test split: the stage tasks that the seqft run wrote
        ev.update(stage_tasks=False, include_path=[str(tasks_dir)],
                  tasks=[stage_task_name(st["name"]) for st in stages] + list(ev.get("tasks", [])),
                  tasks_every_stage=True)
    return r


def _settings_changed(run_dir: Path, recipe: dict) -> str | None:
    """The first recipe key where a finished run differs from what this invocation would run, or None."""
    stored_path = run_dir / "recipe.yaml"
    if not stored_path.exists():
        return None
    stored = yaml.safe_load(stored_path.read_text())
    wanted = recipe_mod.from_dict(copy.deepcopy(recipe)).to_dict()
    for d in (stored, wanted):
        d.pop("description", None)
    return first_difference(stored, wanted)


def _shareable_base(shared_base: Path, recipe: dict) -> bool:
    """Whether seqft's base row was scored with this run's limits and has every task this run scores."""
    if not shared_base.exists():
        return False
    row, ev = json.loads(shared_base.read_text()), recipe["eval"]
    stage_tasks = [stage_task_name(st["name"]) for st in recipe["stages"]] if ev.get("stage_tasks", True) else []
    needed = set(stage_tasks) | set(ev.get("tasks", []))
    return (row.get("limit"), row.get("tasks_limit")) == (ev.get("limit"), ev.get("tasks_limit")) and \
        needed <= set(row["tasks"])


def run_one(name: str, args: argparse.Namespace, seed: int) -> dict:
    run_dir = run_dir_of(args.out, name, seed)
    tasks_dir = run_dir_of(args.out, "seqft", seed) / "eval" / "tasks"
    recipe = recipe_for(name, args, seed, tasks_dir)
    changed = _settings_changed(run_dir, recipe)
    if changed is not None:
        sys.exit(f"{run_dir} was run with other settings (first difference at '{changed}'); use the same options, "
                 "another --out, or delete that run")
    run_dir.mkdir(parents=True, exist_ok=True)
    recipe_path = run_dir.parent / f"{run_dir.name}.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    stats_path = run_dir / "bench.json"
    if not stats_path.exists():
        own_base = run_dir / "eval" / "base.json"
        shared_base = run_dir_of(args.out, "seqft", seed) / "eval" / "base.json"
        if name != "seqft" and not own_base.exists() and _shareable_base(shared_base, recipe):
            # the base model's row is the same for every method (same model, tasks and limits): score it once
            own_base.parent.mkdir(exist_ok=True)
            shutil.copyfile(shared_base, own_base)
        scored_here = not own_base.exists()
        resumed = (run_dir / "ledger.json").exists()  # an interrupted run: its wall time covers only the rest
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
        t0 = time.perf_counter()
        with open(run_dir.parent / f"{run_dir.name}.log", "a") as log:
            proc = subprocess.Popen([sys.executable, "-m", "llmcl", "train", str(recipe_path), "--run-dir",
                                     str(run_dir)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(proc.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            sys.exit(f"{name} (seed {seed}) failed with exit {code}; see {log.name}")
        wall = time.perf_counter() - t0
        if scored_here:  # the base row was scored in this run: leave it out, so every method's wall time compares
            wall -= json.loads(own_base.read_text()).get("seconds", 0.0)
        stats = {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024, "resumed": resumed}
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
    row, base, stage = _multitask_rows(run_dir)
    general = [t for t in row if t not in stage]
    aa = statistics.mean(row[t]["value"] for t in stage)
    gd = statistics.mean(row[t]["value"] - base[t]["value"] for t in general) if general else None
    return {"AA": aa, "BWT": None, "FWT": None, "general_delta": gd}


def _multitask_rows(run_dir: Path) -> tuple[dict, dict, list[str]]:
    """The multitask run's row after its one stage, the base row, and the stage tasks among their columns."""
    row = json.loads((run_dir / "eval" / "stage-00.json").read_text())["tasks"]
    base = json.loads((run_dir / "eval" / "base.json").read_text())["tasks"]
    return row, base, [t for t in row if t.startswith(STAGE_PREFIX)]


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
                     f"{_cell(col('train_s'), 0)} | {_cell(col('wall_s'), 0)}"
                     f"{' (resumed: last part only)' if any(r.get('resumed') for r in rs) else ''} | "
                     f"{_cell(col('peak_rss_mib'), 0)} |")
    return lines


def matrices(out: Path, results: list[dict]) -> list[str]:
    """Each run's accuracy matrix (rows: base, then after each stage; columns: the four tasks) as markdown."""
    lines = []
    for r in results:
        run_dir = run_dir_of(out, r["method"], r["seed"])
        m = json.loads((run_dir / "report" / "matrix.json").read_text())
        cols = [k for k, c in enumerate(m["columns"]) if c["kind"] == "stage"]
        if r["method"] == "multitask":  # one stage: its row and the base row
            row, base, names = _multitask_rows(run_dir)
            lines += [f"**multitask** (seed {r['seed']})", "", "| after \\ task | " + " | ".join(
                n.removeprefix(STAGE_PREFIX) for n in names) + " |", "|---" * (len(names) + 1) + "|",
                "| base | " + " | ".join(f"{base[n]['value']:.2f}" for n in names) + " |",
                "| all four at once | " + " | ".join(f"{row[n]['value']:.2f}" for n in names) + " |", ""]
            continue
        lines += [f"**{r['method']}** (seed {r['seed']})", "",
                  "| after \\ task | " + " | ".join(m["columns"][k]["label"] for k in cols) + " |",
                  "|---" * (len(cols) + 1) + "|"]
        for name, values in zip(m["rows"], m["R"]):
            lines.append(f"| {name} | " + " | ".join("—" if values[k] is None else f"{values[k]:.2f}" for k in cols)
                         + " |")
        lines.append("")
    return lines


def heatmaps(out: Path, results: list[dict]) -> Path | None:
    """One figure with every sequential run's accuracy matrix (seed 0), side by side."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        return None
    runs = [r for r in results if r["seed"] == 0 and r["method"] != "multitask"]
    if not runs:
        return None
    ncol = min(4, len(runs))
    nrow = -(-len(runs) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.3 * ncol, 3.0 * nrow), squeeze=False)
    for ax in axes.flat[len(runs):]:
        ax.axis("off")
    for ax, r in zip(axes.flat, runs):
        m = json.loads((run_dir_of(out, r["method"], 0) / "report" / "matrix.json").read_text())
        cols = [k for k, c in enumerate(m["columns"]) if c["kind"] == "stage"]
        values = np.array([[np.nan if row[k] is None else row[k] for k in cols] for row in m["R"]], dtype=float)
        ax.imshow(np.ma.masked_invalid(values), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(cols)), [m["columns"][k]["label"] for k in cols], fontsize=7)
        ax.set_yticks(range(len(m["rows"])), m["rows"], fontsize=7)
        for i in range(values.shape[0]):
            for k in range(values.shape[1]):
                if np.isfinite(values[i, k]):
                    ax.text(k, i, f"{values[i, k]:.2f}", ha="center", va="center", fontsize=7)
        ax.set_title(f"{r['method']}: AA {r['AA']:.2f}, BWT {r['BWT']:+.2f}", fontsize=9)
    fig.tight_layout()
    path = out / "heatmaps.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--model", default="builtin:smollm2-135m")
    p.add_argument("--steps", type=int, help="optimizer steps per stage (default: the recipes' 10)")
    p.add_argument("--batch", type=int, help="samples per step (default: the recipes' 8)")
    p.add_argument("--train-samples", type=int, default=1000, help="training samples read per task (default 1000)")
    p.add_argument("--limit", type=int, help="test samples per task (default: the recipes' 30; --full: all)")
    p.add_argument("--general", nargs="*", help="general-ability lm-eval tasks (default: the recipes' arc_easy, "
                                                "piqa, winogrande from ../shared/data/eval)")
    p.add_argument("--general-limit", type=int, help="samples per general task (default: the recipes' 50)")
    p.add_argument("--seeds", type=int, default=1, help="run seeds 0..N-1 and report mean ± std (a seed sets the "
                                                       "initialisation, the training samples and order, and the "
                                                       "test subset scored)")
    p.add_argument("--full", action="store_true", help="the papers' sizes: 1000 samples per task (replayed ones included), "
                                                      "512 tokens, the whole test split (a GPU job)")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "cl_compare")
    args = p.parse_args()
    if args.batch is not None and args.batch < 2:
        p.error("--batch must be at least 2 (I-LoRA's step is half current, half replayed samples)")
    args.out = args.out.resolve()
    methods = list(args.methods)
    if "multitask" in methods and "seqft" not in methods:
        methods.insert(0, "seqft")  # multitask is scored on the stage tasks the seqft run writes
    methods.sort(key=lambda m: m != "seqft")
    results = []
    for seed in range(args.seeds):
        for name in methods:
            t0 = time.perf_counter()
            results.append(run_one(name, args, seed))
            r = results[-1]
            print(f"[{time.strftime('%H:%M:%S')}] {name} seed {seed}: AA {_cell([r['AA']])} BWT "
                  f"{_cell([r['BWT']], signed=True)} ({time.perf_counter() - t0:.0f}s)", flush=True)
    ref = recipe_for("seqft", args, 0, None)
    t, e = ref["train"], ref["eval"]
    size = (f"{t['max_steps']} steps x {t['batch_size']} samples per task at seq_len {t['seq_len']}"
            + (" (--full: one epoch)" if args.full else "")
            + f", {e.get('limit') or 'all'} test samples per task (prompts <= {e.get('max_prompt_tokens')} tokens), "
            f"{e.get('tasks_limit') or 'all'} per general task")
    header = [f"{args.model}, dbpedia -> amazon -> yahoo -> agnews, {size}, "
              f"general: {', '.join(e.get('tasks', [])) or 'none'}, seeds: {args.seeds}"]
    lines = header + [""] + table(results) + [
        "", "\\* `llmcl train` from start to end, the evaluation after every stage included; the base model's row is "
        "scored once (in the seqft run) and shared, and left out of every wall time."]
    print("\n" + "\n".join(lines))
    lines += ["", "Accuracy matrices (exact match; rows: the model after each stage):", ""] + matrices(args.out, results)
    figure = heatmaps(args.out, results)
    if figure:
        print(f"heatmaps: {figure}")
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    (args.out / "summary.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
