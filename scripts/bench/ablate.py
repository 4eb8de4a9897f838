"""The ablations of docs/deviations.md: each method's default against the reference code's choices, one at a time
and together, on the standard benchmark's order 1 with seeds the published comparison does not use.

Every variant is one `cl_compare.py` run (`--orders 1 --seed-offset 100 --methods <method> --set ...`) into
<out>/<method>-<variant>/. Finished runs are skipped, so an interrupted ablation continues where it stopped:
run it in the background and read the log. The base model's row (the same model, tasks and items for every
variant) is scored once and shared. Runs go in a first pass of every method's default and all-reference variant,
then the single changes, so that an interrupted ablation has a first answer for every method. It prints, per
method, each variant's AA and BWT (generated labels) and AA and BWT over the label sets, each as a difference to
the method's default.

    python scripts/bench/ablate.py                          # every method's ablations, 100 test items a task
    python scripts/bench/ablate.py --methods ilora --limit 30
    python scripts/bench/ablate.py --variants default reference
    nohup python scripts/bench/ablate.py > runs/ablate.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1].parent
sys.path.insert(0, str(REPO / "scripts" / "bench"))
from cl_compare import parser as cl_compare_parser, recipe_for, run_dir_of, shareable_base  # noqa: E402

cl_compare_defaults = cl_compare_parser().parse_args(["--orders", "1"])

# method -> [(variant, recipe overrides)], the first one run first (with "default", the shipped recipe): the
# reference code's choices together, or the one that matters most. Sources: docs/deviations.md
ABLATIONS: dict[str, list[tuple[str, list[str]]]] = {
    "ilora": [
        ("reference", ["method.ema=0.25", "method.replay_from_stage=1", "method.consistency_target=max",
                       "method.ce_weighting=mean"]),
        ("ema-0.25", ["method.ema=0.25"]),
        ("replay-from-stage-1", ["method.replay_from_stage=1"]),
        ("consistency-max", ["method.consistency_target=max"]),
        ("ce-mean", ["method.ce_weighting=mean"]),
        ("evaluate-fast", ["method.evaluate=fast"]),
    ],
    "mora": [
        ("signed-threshold-0.2", ["method.select=signed", "method.threshold=0.2"]),
        ("signed", ["method.select=signed"]),
    ],
    "osft": [
        ("growth-0.25", ["method.growth=0.25"]),
        ("uniform-growing", ["method.rank_rule=uniform", "method.stage_ratios=[0.25,0.5,0.75,0.9]"]),
    ],
    "hft": [
        ("embeddings-trained", ["method.embeddings=trained"]),
    ],
}
SEED_OFFSET = 100  # order 1 runs with seed 100: not a seed of the published comparison (0, 1, 2)


def schedule(methods: list[str], variants: list[str] | None) -> list[tuple[str, str, list[str]]]:
    """(method, variant, overrides) in running order: every method's default and first variant, then the rest;
    `variants` keeps only those names."""
    runs = [(m, "default", []) for m in methods]
    runs += [(m, *ABLATIONS[m][0]) for m in methods]
    runs += [(m, *v) for m in methods for v in ABLATIONS[m][1:]]
    return [r for r in runs if variants is None or r[1] in variants]


def share_base(run_dir: Path, out: Path, recipe: dict) -> None:
    """Copy the base model's row from an earlier variant scored the same way (model, dtype, tasks, items; the
    same order and seed), so that it is scored once."""
    target = run_dir / "eval" / "base.json"
    if target.exists():
        return
    for row in sorted(out.glob(f"*/*-o1-s{SEED_OFFSET}/eval/base.json")):
        if shareable_base(row, recipe):
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(row, target)
            return


def run_variant(method: str, variant: str, overrides: list[str], args: argparse.Namespace) -> dict:
    out = args.out / f"{method}-{variant}"
    compare_args = argparse.Namespace(**{**vars(cl_compare_defaults), "model": args.model, "limit": args.limit,
                                         "set": overrides})
    share_base(run_dir_of(out, method, 1, SEED_OFFSET), args.out, recipe_for(method, compare_args, 1, None))
    cmd = [sys.executable, str(REPO / "scripts" / "bench" / "cl_compare.py"), "--orders", "1", "--seed-offset",
           str(SEED_OFFSET), "--methods", method, "--out", str(out), "--limit", str(args.limit),
           "--model", args.model]
    if overrides:
        cmd += ["--set", *overrides]
    print(f"{method} {variant}: {' '.join(overrides) or 'defaults'} ...", flush=True)
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"{method} {variant} failed:\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
    return json.loads((out / "summary.json").read_text())[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(ABLATIONS), choices=list(ABLATIONS))
    p.add_argument("--limit", type=int, default=100, help="test items per task (default 100: one item = 0.01)")
    p.add_argument("--variants", nargs="+", help="only these variants (names of ABLATIONS, and 'default')")
    p.add_argument("--model", default="builtin:smollm2-135m")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "ablate")
    args = p.parse_args()
    args.out = args.out.resolve()
    results = {}
    for method, variant, overrides in schedule(args.methods, args.variants):
        results[method, variant] = run_variant(method, variant, overrides, args)
        print(f"{method} {variant}: " + " ".join(f"{k} {_fmt(results[method, variant].get(k))}"
                                                  for k in ("AA", "BWT", "AA_labels", "BWT_labels")), flush=True)
    lines = ["| method | variant | AA | BWT | AA (labels) | BWT (labels) | ΔAA | ΔBWT | ΔAA (labels) | ΔBWT (labels) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    keys = ("AA", "BWT", "AA_labels", "BWT_labels")
    for (method, variant), r in sorted(results.items(), key=lambda kv: args.methods.index(kv[0][0])):
        default = results.get((method, "default"), {})
        values = [_fmt(r.get(k), signed=k.startswith("BWT")) for k in keys]
        deltas = [_fmt(None if r.get(k) is None or default.get(k) is None else r[k] - default[k], signed=True)
                  for k in keys]
        lines.append(f"| {method} | {variant} | " + " | ".join(values + deltas) + " |")
    text = "\n".join([f"order 1, seed {SEED_OFFSET}, {args.limit} test items a task, {args.model}", ""] + lines)
    print("\n" + text)
    (args.out / "summary.md").write_text(text + "\n")


def _fmt(v: float | None, signed: bool = False) -> str:
    return "—" if v is None else (f"{v:+.3f}" if signed else f"{v:.3f}")


if __name__ == "__main__":
    main()
