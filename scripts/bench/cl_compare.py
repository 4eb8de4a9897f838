"""The continual-learning comparison: every llmcl method on the standard CL benchmark, plus the multitask bound.

SmolLM2-135M-Instruct learns the four tasks of the standard benchmark (../shared/data/cl_benchmark) in each of
O-LoRA's three task orders, as the CL papers average them:

  order 1   dbpedia -> amazon -> yahoo -> agnews
  order 2   dbpedia -> amazon -> agnews -> yahoo
  order 3   yahoo -> amazon -> agnews -> dbpedia

each order with its own seed (order k: seed k - 1 + --seed-offset; the seed sets the initialisation, the training
sample and its order, and the test items scored). Each task is generation of its label scored by exact match,
with every method at the same training budget:

  seqft          full fine-tuning, nothing against forgetting (the baseline that must forget)
  seqft+replay   seqft with 20% compute-equivalent replay of the earlier stages' data
  hft            Half Fine-Tuning (half of the matrices frozen per stage)
  osft           SVD-orthogonal full fine-tuning (adaptive preserved rank)
  lora           one LoRA adapter (r=16) trained through all stages
  ilora          dual-memory interpolated LoRA with reservoir replay (half the batch current, half replay)
  mora           self-activated rank-1 experts (16 new experts per stage)
  multitask      the upper bound: one stage that mixes all four tasks (same total samples), scored on all four

Every method is a shipped recipe (recipes/benchmarks/cl_standard*.yaml, listed in METHODS), so
`llmcl train recipes/benchmarks/cl_standard_<method>.yaml` reproduces one row of order 1. Every run has the same
samples per step and the same steps per stage (multitask: 4x the steps of one stage in one stage), so every
method trains on the same number of samples; with replay part of them are replayed (seqft+replay: 20% from the
second stage on; I-LoRA: half of every step, from its reservoir). The CPU size (the recipes'): 10 steps x 8
samples per task at lr 2e-4 (full fine-tuning) / 1e-3 (adapters); 100 test items per task (one item = 0.01)
whose prompt fits the 192-token training length; general ability on 50 items each of local lm-eval tasks built
from ../shared/data/eval (arc_easy, piqa, winogrande) for the base model and the last stage. The base model's
row is the same for every method of an order: scored once, shared.

    python scripts/bench/cl_compare.py                 # the three orders, every method
    python scripts/bench/cl_compare.py --quick         # order 1 only, 30 test items a task (the recipes' size)
    python scripts/bench/cl_compare.py --jobs 2        # two runs at once (a CPU: half the cores each; GPUs: one each)
    python scripts/bench/cl_compare.py --orders 1 --seed-offset 100 --methods seqft ilora   # an ablation run
    python scripts/bench/cl_compare.py --full          # the papers' sizes: 1000 samples/task once, 512 tokens,
                                                       # whole test splits (prompts <= 504 tokens; a GPU job)
    python scripts/bench/cl_compare.py --methods seqft lora --model builtin:tiny --steps 2 --limit 4   # smoke

Each method runs as `python -m llmcl train` in its own process (its peak resident memory is its own), into
<out>/<method>-o<order>-s<seed>/; finished runs are skipped, so an interrupted comparison continues where it
stopped; with --archive DIR each finished run's light files (no weights) are also kept in DIR and taken back
from there, so a comparison spread over several sessions or machines continues from a tracked directory. Prints the table (per method: mean ± standard deviation over the orders of AA, BWT, FWT and the
general-ability delta; the difference to SeqFT paired by order with its 95% t-interval; wall time, peak RSS) and
writes <out>/summary.md (the table and every run's accuracy matrix), <out>/summary.json and <out>/heatmaps.png;
`llmcl report <out>/<run>` gives one run's full report.
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
from llmcl.eval.tasks import STAGE_PREFIX, choice_task_name, stage_task_name  # noqa: E402
from llmcl.recipe import apply_override, first_difference, parse_override, read_yaml  # noqa: E402

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


# O-LoRA's task orders (Wang et al. 2023, after Progressive Prompts), as the CL papers average them: 1-3 for the
# standard benchmark's four tasks, 4-6 for the long 15-task sequence (sources: scripts/dev/long_recipes.py)
ORDERS: dict[int, list[str]] = {
    1: ["dbpedia", "amazon", "yahoo", "agnews"],
    2: ["dbpedia", "amazon", "agnews", "yahoo"],
    3: ["yahoo", "amazon", "agnews", "dbpedia"],
    4: "mnli cb wic copa qqp boolqa rte imdb yelp amazon sst2 dbpedia agnews multirc yahoo".split(),
    5: "multirc boolqa wic mnli cb copa qqp rte imdb sst2 dbpedia agnews yelp amazon yahoo".split(),
    6: "yelp amazon mnli cb copa qqp rte imdb sst2 dbpedia agnews yahoo multirc boolqa wic".split(),
}
# benchmark -> (the recipe whose stages and sizes it runs, its orders); the methods' recipes are written against
# cl_standard.yaml, and what each changes there (method, lr, replay) is applied to the long sequence's recipe
BENCHMARKS: dict[str, tuple[str, list[int]]] = {"standard": ("cl_standard.yaml", [1, 2, 3]),
                                                 "long": ("cl_long_order4.yaml", [4, 5, 6])}


def _changes(base: dict, child: dict) -> dict:
    """What `child` sets differently from `base` (mappings compared key by key)."""
    out = {}
    for k, v in child.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            sub = _changes(base[k], v)
            if sub:
                out[k] = sub
        elif base.get(k) != v:
            out[k] = v
    return out


def _merged(base: dict, changes: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in changes.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def method_recipe(name: str, benchmark: str) -> dict:
    """A method's shipped recipe, on the benchmark's stages and sizes."""
    r = read_yaml(BENCH / METHODS[name])
    if benchmark == "standard":
        return r
    standard = read_yaml(BENCH / BENCHMARKS["standard"][0])
    changes = {k: v for k, v in _changes(standard, r).items() if k not in ("name", "description")}
    return _merged(read_yaml(BENCH / BENCHMARKS[benchmark][0]), changes)


def run_dir_of(out: Path, method: str, order: int, seed: int) -> Path:
    return out / f"{method.replace('+', '_')}-o{order}-s{seed}"


def seed_of(order: int, args: argparse.Namespace) -> int:
    """Each order has its own seed (the training sample, the data order and the test items scored change with it):
    order k runs with seed k - 1 + --seed-offset."""
    return order - 1 + args.seed_offset


def in_order(stages: list[dict], order: int) -> list[dict]:
    """The recipe's stages (named after their tasks) in O-LoRA's order `order`."""
    by_name = {st["name"]: st for st in stages}
    return [by_name[name] for name in ORDERS[order]]


def recipe_for(name: str, args: argparse.Namespace, order: int, tasks_dir: Path | None) -> dict:
    """The recipe of one method: its shipped recipe, at this comparison's size where an option changes it, its
    stages in task order `order`, with that order's seed."""
    r = method_recipe(name, getattr(args, "benchmark", "standard"))
    r["name"] = f"cl_compare_{name.replace('+', '_')}"
    r["seed"] = seed_of(order, args)
    r["stages"] = in_order(r["stages"], order)
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
    for text in getattr(args, "set", None) or []:  # an ablation: the same override on every recipe it fits
        parts, value = parse_override(text)
        if parts[0] != "method" or parts[1] in option_names(r["method"]["name"]):
            apply_override(r, parts, value)
    if name == "multitask":
        stages = r["stages"]
        r["stages"] = [{"name": "multitask", "data": copy.deepcopy(stages[-1]["data"])}]
        r["replay"] = {"ratio": 1 - 1 / len(stages), "previous_stages": False,
                       "datasets": [dict(st["data"], weight=1.0) for st in stages[:-1]]}
        train["max_steps"] = len(stages) * train["max_steps"]
        # scored on every task's test split: the stage tasks that the seqft run wrote
        ev.update(stage_tasks=False, include_path=[str(tasks_dir)],
                  tasks=stage_tasks_of(stages) + list(ev.get("tasks", [])), tasks_every_stage=True)
    return r


def option_names(method: str) -> set[str]:
    """The recipe keys under `method:` that a method takes."""
    import dataclasses

    from llmcl import methods

    return {f.name for f in dataclasses.fields(methods.get(method).config_class)}


def stage_tasks_of(stages: list[dict]) -> list[str]:
    """The lm-eval tasks llmcl writes for these stages: each stage's, then the label-set view of those with
    data.choices (llmcl.eval.tasks)."""
    return [stage_task_name(st["name"]) for st in stages] + \
        [choice_task_name(st["name"]) for st in stages if st["data"].get("choices")]


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


def shareable_base(shared_base: Path, recipe: dict) -> bool:
    """Whether a base row was scored the way this run would score it: the same model in the same dtype, the same
    limits, every task this run scores."""
    from llmcl.eval.scoring import eval_dtype

    if not shared_base.exists():
        return False
    row, ev = json.loads(shared_base.read_text()), recipe["eval"]
    stage_tasks = stage_tasks_of(recipe["stages"]) if ev.get("stage_tasks", True) else []
    needed = set(stage_tasks) | set(ev.get("tasks", []))
    dtype = str(eval_dtype(recipe_mod.from_dict(copy.deepcopy(recipe)))).removeprefix("torch.")
    return (row.get("limit"), row.get("tasks_limit"), row.get("model"), row.get("dtype")) == \
        (ev.get("limit"), ev.get("tasks_limit"), recipe["model"]["path"], dtype) and needed <= set(row["tasks"])


# what --archive keeps of a finished run: everything the report and this summary read, no weights (a few
# hundred kB a run); the stage test tasks (eval/tasks) are written again from the recipe where needed
ARCHIVED = ("recipe.yaml", "ledger.json", "bench.json", "metrics.jsonl", "eval/*.json", "report/matrix.json",
            "report/report.md")
OUT = "<cl_compare --out>"  # where an archived recipe named the --out directory


def archive_run(run_dir: Path, archive: Path) -> None:
    """Copy a finished run's light files (ARCHIVED, its recipe and log) to archive/<run name>, replacing any
    earlier copy in one rename."""
    dest = archive / run_dir.name
    tmp = archive / f".{run_dir.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    copies = [(f, tmp / f.relative_to(run_dir)) for pattern in ARCHIVED for f in run_dir.glob(pattern)]
    copies += [(f, tmp / f"run{suffix}") for suffix in (".yaml", ".log")
               if (f := run_dir.parent / f"{run_dir.name}{suffix}").exists()]
    for f, to in copies:
        to.parent.mkdir(parents=True, exist_ok=True)
        if f.suffix == ".yaml":  # recipes name the other runs of --out (multitask: seqft's stage tasks)
            to.write_text(f.read_text().replace(str(run_dir.parent), OUT))
        else:
            shutil.copyfile(f, to)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def restore_run(run_dir: Path, archive: Path) -> bool:
    """Bring an archived finished run back into `run_dir` (where it is not finished): True if it did."""
    src = archive / run_dir.name
    if (run_dir / "bench.json").exists() or not (src / "bench.json").exists():
        return False
    for f in src.rglob("*"):
        if f.is_file():
            to = run_dir.parent / f"{run_dir.name}{f.suffix}" if f.stem == "run" and f.parent == src \
                else run_dir / f.relative_to(src)
            to.parent.mkdir(parents=True, exist_ok=True)
            if f.suffix == ".yaml":
                to.write_text(f.read_text().replace(OUT, str(run_dir.parent)))
            else:
                shutil.copyfile(f, to)
    return True


def ensure_stage_tasks(run_dir: Path) -> None:
    """The stage test tasks of a finished run (multitask scores on seqft's): written again from its recipe when
    the run came back from an archive without them."""
    if (run_dir / "eval" / "tasks").exists():
        return
    from llmcl.eval.scoring import load_run_recipe
    from llmcl.eval.tasks import write_stage_tasks
    from llmcl.models import load_tokenizer

    recipe = load_run_recipe(run_dir)
    write_stage_tasks(recipe, run_dir, load_tokenizer(recipe.model))


def run_one(name: str, args: argparse.Namespace, order: int, slot_env: dict[str, str] | None = None) -> dict:
    """Train and score one method in one order (or take it back from --out / --archive); its summary row.
    `slot_env`: the environment of its share of the machine when several runs go at once (--jobs)."""
    seed = seed_of(order, args)
    run_dir = run_dir_of(args.out, name, order, seed)
    if args.archive is not None and restore_run(run_dir, args.archive):
        print(f"{run_dir.name}: restored from {args.archive}", flush=True)
    tasks_dir = run_dir_of(args.out, "seqft", order, seed) / "eval" / "tasks"
    if name == "multitask":  # its recipe (checked even when the run is finished) names seqft's stage tasks
        ensure_stage_tasks(tasks_dir.parent.parent)
    recipe = recipe_for(name, args, order, tasks_dir)
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
        shared_base = run_dir_of(args.out, "seqft", order, seed) / "eval" / "base.json"
        if name != "seqft" and not own_base.exists() and shareable_base(shared_base, recipe):
            # the base model's row is the same for every method (same model, tasks and limits): score it once
            own_base.parent.mkdir(exist_ok=True)
            shutil.copyfile(shared_base, own_base)
        scored_here = not own_base.exists()
        resumed = (run_dir / "ledger.json").exists()  # an interrupted run: its wall time covers only the rest
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
                   **(slot_env or {}))
        t0 = time.perf_counter()
        with open(run_dir.parent / f"{run_dir.name}.log", "a") as log:
            proc = subprocess.Popen([sys.executable, "-m", "llmcl", "train", str(recipe_path), "--run-dir",
                                     str(run_dir)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(proc.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            sys.exit(f"{name} (order {order}, seed {seed}) failed with exit {code}; see {log.name}")
        wall = time.perf_counter() - t0
        if scored_here:  # the base row was scored in this run: leave it out, so every method's wall time compares
            wall -= json.loads(own_base.read_text()).get("seconds", 0.0)
        stats = {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024, "resumed": resumed,
                 "jobs": getattr(args, "jobs", 1)}
        stats_path.write_text(json.dumps(stats))
    stats = json.loads(stats_path.read_text())
    if any(run_dir.glob("stage-*")):  # a run that came back from --archive has no weights: its report stands
        rep = subprocess.run([sys.executable, "-m", "llmcl", "report", str(run_dir)], cwd=REPO, capture_output=True,
                             text=True)
        if rep.returncode != 0:
            sys.exit(f"llmcl report {run_dir} failed: {rep.stderr.strip()}")
    matrix = json.loads((run_dir / "report" / "matrix.json").read_text())
    ledger = json.loads((run_dir / "ledger.json").read_text())
    train_s = sum(s.get("wall_seconds", 0) for s in ledger["stages"])
    out = {"method": name, "order": order, "seed": seed, **stats, "train_s": train_s, **_scores(name, matrix, run_dir)}
    if args.archive is not None:
        archive_run(run_dir, args.archive)
    return out


def _scores(name: str, matrix: dict, run_dir: Path) -> dict:
    """AA, BWT, FWT, general delta of the accuracy matrix (generated labels, exact match), and AA/BWT of the
    label-set view (loglikelihood over each task's labels) as AA_labels, BWT_labels."""
    m, c = matrix["metrics"], matrix.get("metrics_choice") or {}
    if name != "multitask":
        return {**{k: m.get(k) for k in ("AA", "BWT", "FWT", "general_delta")},
                "AA_labels": c.get("AA"), "BWT_labels": c.get("BWT")}
    # multitask: one row after the single stage; its accuracy on each task's split, no sequence -> no BWT/FWT
    row, base, stage = _multitask_rows(run_dir)
    views = [t for t in stage if t.endswith("-choice")]
    generated = [t for t in stage if t not in views]
    general = [t for t in row if t not in stage]
    aa = statistics.mean(row[t]["value"] for t in generated)
    gd = statistics.mean(row[t]["value"] - base[t]["value"] for t in general) if general else None
    aa_labels = statistics.mean(row[t]["value"] for t in views) if views else None
    return {"AA": aa, "BWT": None, "FWT": None, "general_delta": gd, "AA_labels": aa_labels, "BWT_labels": None}


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


# two-sided 95% Student-t quantiles by degrees of freedom (the interval of a mean over a few runs)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def paired_difference(values: list[float | None], reference: list[float | None]) -> tuple[float, float] | None:
    """Mean of the per-run differences (run k of a method minus run k of the reference: the same order and
    seed) and the half-width of its 95% t-interval; None with fewer than two pairs."""
    diffs = [v - r for v, r in zip(values, reference) if v is not None and r is not None]
    if len(diffs) < 2:
        return None
    return statistics.mean(diffs), _T95.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / len(diffs) ** 0.5


def _diff_cell(d: tuple[float, float] | None) -> str:
    return "—" if d is None else f"{d[0]:+.3f} [{d[0] - d[1]:+.3f}, {d[0] + d[1]:+.3f}]"


def table(results: list[dict]) -> list[str]:
    """Mean ± standard deviation over the runs (orders) of each method, and each method's difference to SeqFT
    (paired by run) with its 95% interval."""
    head = ("| method | runs | AA | BWT | FWT | general Δ | AA − SeqFT (95% CI) | BWT − SeqFT (95% CI) | "
            "AA (labels) | BWT (labels) | train time (s) | wall incl. eval (s)* | peak RSS (MiB) |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    runs_of = lambda name: sorted((r for r in results if r["method"] == name), key=lambda r: r["order"])  # noqa: E731
    seq = {r["order"]: r for r in runs_of("seqft")}
    for name in dict.fromkeys(r["method"] for r in results):
        rs = runs_of(name)
        col = lambda k: [r.get(k) for r in rs]  # noqa: E731
        ref = lambda k: [seq[r["order"]][k] if r["order"] in seq else None for r in rs]  # noqa: E731
        diffs = ["—", "—"] if name == "seqft" else [_diff_cell(paired_difference(col(k), ref(k))) for k in ("AA", "BWT")]
        lines.append(f"| {name} | {len(rs)} | {_cell(col('AA'))} | {_cell(col('BWT'), signed=True)} | "
                     f"{_cell(col('FWT'), signed=True)} | {_cell(col('general_delta'), signed=True)} | "
                     f"{diffs[0]} | {diffs[1]} | {_cell(col('AA_labels'))} | {_cell(col('BWT_labels'), signed=True)} | "
                     f"{_cell(col('train_s'), 0)} | {_cell(col('wall_s'), 0)}"
                     f"{' (resumed: last part only)' if any(r.get('resumed') for r in rs) else ''} | "
                     f"{_cell(col('peak_rss_mib'), 0)} |")
    return lines


def matrices(out: Path, results: list[dict]) -> list[str]:
    """Each run's accuracy matrix (rows: base, then after each stage; columns: the four tasks) as markdown."""
    lines = []
    for r in results:
        run_dir = run_dir_of(out, r["method"], r["order"], r["seed"])
        m = json.loads((run_dir / "report" / "matrix.json").read_text())
        cols = [k for k, c in enumerate(m["columns"]) if c["kind"] in ("stage", "stage_choice")]
        if r["method"] == "multitask":  # one stage: its row and the base row
            row, base, names = _multitask_rows(run_dir)
            lines += [f"**multitask** (order {r['order']}, seed {r['seed']})", "", "| after \\ task | " + " | ".join(
                _column_label(n) for n in names) + " |", "|---" * (len(names) + 1) + "|",
                "| base | " + " | ".join(f"{base[n]['value']:.2f}" for n in names) + " |",
                "| all four at once | " + " | ".join(f"{row[n]['value']:.2f}" for n in names) + " |", ""]
            continue
        lines += [f"**{r['method']}** (order {r['order']}: {' -> '.join(ORDERS[r['order']])}, seed {r['seed']})", "",
                  "| after \\ task | " + " | ".join(m["columns"][k]["label"] for k in cols) + " |",
                  "|---" * (len(cols) + 1) + "|"]
        for name, values in zip(m["rows"], m["R"]):
            lines.append(f"| {name} | " + " | ".join("—" if values[k] is None else f"{values[k]:.2f}" for k in cols)
                         + " |")
        lines.append("")
    return lines


def _column_label(task: str) -> str:
    """'llmcl_stage_yahoo' -> 'yahoo', 'llmcl_stage_yahoo-choice' -> 'yahoo (labels)' (as llmcl report labels them)."""
    name = task.removeprefix(STAGE_PREFIX)
    return f"{name.removesuffix('-choice')} (labels)" if name.endswith("-choice") else name


def heatmaps(out: Path, results: list[dict]) -> Path | None:
    """One figure with every sequential run's accuracy matrix (the first order run), side by side."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        return None
    first = min((r["order"] for r in results), default=None)
    runs = [r for r in results if r["order"] == first and r["method"] != "multitask"]
    if not runs:
        return None
    ncol = min(4, len(runs))
    nrow = -(-len(runs) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.3 * ncol, 3.0 * nrow), squeeze=False)
    for ax in axes.flat[len(runs):]:
        ax.axis("off")
    for ax, r in zip(axes.flat, runs):
        m = json.loads((run_dir_of(out, r["method"], r["order"], r["seed"]) / "report" / "matrix.json").read_text())
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


def slot_envs(jobs: int) -> list[dict[str, str]]:
    """The environment of each of `jobs` runs that go at once: on a machine with GPUs, one GPU each (round robin
    over the visible ones); on a CPU, an equal share of the cores as torch's threads."""
    import torch

    if jobs == 1:
        return [{}]
    gpus = torch.cuda.device_count()
    if gpus:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(gpus)))).split(",")
        return [{"CUDA_VISIBLE_DEVICES": visible[i % len(visible)]} for i in range(jobs)]
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    return [{"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads} for _ in range(jobs)]


POLL_SECONDS = 5.0  # how often run_all looks for an order's base row while no run ends


def run_all(args: argparse.Namespace, methods: list[str]) -> list[dict]:
    """Every (order, method) run, up to --jobs at once, in the table's order. An order's seqft run goes first:
    it writes the stage test tasks and scores the base row that the order's other runs share; they start once
    that row is written (the first thing the run does), not when the seqft run ends."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    todo = [(order, name) for order in args.orders for name in methods]
    free = slot_envs(args.jobs)
    done: dict[tuple[int, str], dict] = {}
    running: dict = {}

    def ready(order: int, name: str) -> bool:
        if name == "seqft" or "seqft" not in methods or (order, "seqft") in done:
            return True
        seqft = run_dir_of(args.out, "seqft", order, seed_of(order, args))
        return any(k == (order, "seqft") for k, _, _ in running.values()) and (seqft / "eval" / "base.json").exists()

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        while todo or running:
            for key in [k for k in todo if ready(*k)][:len(free)]:
                todo.remove(key)
                env = free.pop()
                running[pool.submit(run_one, key[1], args, key[0], env)] = (key, env, time.perf_counter())
            finished, _ = wait(running, timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)  # or look for base rows
            for f in finished:
                (order, name), env, t0 = running.pop(f)
                free.append(env)
                r = done[(order, name)] = f.result()  # a failed run stops the comparison (after the others end)
                print(f"[{time.strftime('%H:%M:%S')}] {name} order {order} (seed {r['seed']}): AA {_cell([r['AA']])} "
                      f"BWT {_cell([r['BWT']], signed=True)} ({time.perf_counter() - t0:.0f}s)", flush=True)
    return [done[(order, name)] for order in args.orders for name in methods]


def resolve_size(args: argparse.Namespace) -> None:
    """The orders and test items a comparison runs where the command line leaves them open: the standard
    benchmark's three orders at 100 items a task (one item = 0.01); --quick order 1 at the recipes' 30; the long
    sequence at its recipe's 30 (15 tasks: AA averages 450 items, and its evaluation triangle of 134 cells a run
    is what a long run's time is at 100)."""
    allowed = BENCHMARKS[args.benchmark][1]
    args.orders = args.orders or allowed
    if args.quick:
        args.orders = [allowed[0]]
        args.limit = args.limit or 30
    elif args.limit is None and not args.full and args.benchmark == "standard":
        args.limit = 100


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--model", default="builtin:smollm2-135m")
    p.add_argument("--steps", type=int, help="optimizer steps per stage (default: the recipes' 10)")
    p.add_argument("--batch", type=int, help="samples per step (default: the recipes' 8)")
    p.add_argument("--train-samples", type=int, default=1000, help="training samples read per task (default 1000)")
    p.add_argument("--limit", type=int, default=None, help="test samples per task (default 100: one item = 0.01; "
                                                            "--quick and --benchmark long: the recipes' 30; --full: all)")
    p.add_argument("--general", nargs="*", help="general-ability lm-eval tasks (default: the recipes' arc_easy, "
                                                "piqa, winogrande from ../shared/data/eval)")
    p.add_argument("--general-limit", type=int, help="samples per general task (default: the recipes' 50)")
    p.add_argument("--benchmark", choices=list(BENCHMARKS), default="standard",
                   help="standard: the four tasks (orders 1-3); long: the 15-task sequence (orders 4-6, "
                        "recipes/benchmarks/cl_long_order*.yaml; a GPU job at its full size)")
    p.add_argument("--orders", type=int, nargs="+", choices=list(ORDERS),
                   help="O-LoRA's task orders to run, each with its own seed (default: the benchmark's three, as the "
                        "papers average them)")
    p.add_argument("--seed-offset", type=int, default=0, help="order k runs with seed k - 1 + this (e.g. 100 for "
                                                              "ablations on seeds the published runs do not use)")
    p.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="recipe overrides for an ablation, applied to every "
                   "method's recipe (method.* keys only to the methods that take them), e.g. method.ema=0.25; use "
                   "another --out")
    p.add_argument("--quick", action="store_true", help="order 1 only, 30 test items per task (about 36 minutes "
                                                       "on 2 cores with native bf16; under 30 with --jobs 2)")
    p.add_argument("--full", action="store_true", help="the papers' sizes: 1000 samples per task (replayed ones included), "
                                                      "512 tokens, the whole test split (a GPU job)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (default 1): on a CPU each gets an equal share "
                   "of the cores as threads, on a GPU node one GPU each; an order's seqft run goes first (its base "
                   "row and test tasks are shared). Wall times then include the sharing")
    p.add_argument("--out", type=Path, help="where the runs go (default: runs/cl_compare, runs/cl_compare_long)")
    p.add_argument("--archive", type=Path, help="also keep every finished run's light files (recipe, ledger, "
                   "evaluation rows, report, log; no weights) and the summary here, and take finished runs back "
                   "from here: a comparison continues on another machine or clone (e.g. docs/results/cl_compare)")
    return p


def main() -> None:
    p = parser()
    args = p.parse_args()
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    if args.batch is not None and args.batch < 2:
        p.error("--batch must be at least 2 (I-LoRA's step is half current, half replayed samples)")
    args.out = (args.out or REPO / "runs" / ("cl_compare" if args.benchmark == "standard" else "cl_compare_long")).resolve()
    if args.archive is not None:
        args.archive = args.archive.resolve()
        args.archive.mkdir(parents=True, exist_ok=True)
    methods = list(args.methods)
    if "multitask" in methods and "seqft" not in methods:
        methods.insert(0, "seqft")  # multitask is scored on the stage tasks the seqft run writes
    methods.sort(key=lambda m: m != "seqft")
    allowed = BENCHMARKS[args.benchmark][1]
    if any(k not in allowed for k in args.orders or allowed):
        p.error(f"--orders: the {args.benchmark} benchmark has orders {allowed}")
    resolve_size(args)
    results = run_all(args, methods)
    ref = recipe_for("seqft", args, args.orders[0], None)
    t, e = ref["train"], ref["eval"]
    size = (f"{t['max_steps']} steps x {t['batch_size']} samples per task at seq_len {t['seq_len']}"
            + (" (--full: one epoch)" if args.full else "")
            + f", {e.get('limit') or 'all'} test samples per task (prompts <= {e.get('max_prompt_tokens')} tokens), "
            f"{e.get('tasks_limit') or 'all'} per general task")
    orders = "; ".join(f"order {k}: {' -> '.join(ORDERS[k])} (seed {seed_of(k, args)})" for k in args.orders)
    header = [f"{args.model}, {size}, general: {', '.join(e.get('tasks', [])) or 'none'}; {orders}"
              + (f"; overrides: {' '.join(args.set)}" if args.set else "")]
    lines = header + [""] + table(results) + [
        "", "\\* `llmcl train` from start to end, the evaluation after every stage included; the base model's row is "
        "scored once (in the seqft run) and shared, and left out of every wall time."
        + ("".join(f" {sum(r.get('jobs', 1) == j for r in results)} runs went {j} at a time (--jobs {j}): their wall "
                   "times include sharing the machine." for j in sorted({r.get("jobs", 1) for r in results} - {1})))]
    print("\n" + "\n".join(lines))
    lines += ["", "Accuracy matrices (rows: the model after each stage; columns: each task's generated label by exact match, "
              "then '(labels)': loglikelihood over its label set):", ""] + matrices(args.out, results)
    figure = heatmaps(args.out, results)
    if figure:
        print(f"heatmaps: {figure}")
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    (args.out / "summary.json").write_text(json.dumps(results, indent=1))
    if args.archive is not None:
        for f in ("summary.md", "summary.json"):
            shutil.copyfile(args.out / f, args.archive / f)


if __name__ == "__main__":
    main()
