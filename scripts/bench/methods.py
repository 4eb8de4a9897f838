"""Cost of each continual-learning method relative to its base: step time, peak memory, optimizer state.

Every method trains the same packed 4 x 128-token blocks for the same steps through llmcl's own loop, each in
its own process (so the peak resident memory is that method's alone), interleaved over repeats so machine
noise hits all alike. Full-parameter methods are compared with seqft, adapter methods with lora.

    python scripts/bench/methods.py                                # SmolLM2-135M: every method
    python scripts/bench/methods.py --methods seqft hft --model builtin:tiny --steps 8 --repeats 1

Prints per method: median step seconds, peak RSS, AdamW state (8 bytes per trainable parameter), the
method's own per-stage overhead (OSFT: SVD seconds), and the ratios to the base.

    python scripts/bench/methods.py --packing                      # train.packing, every method (seqft, lora: #17)
    python scripts/bench/methods.py --packing --methods seqft lora --steps 8 --repeats 2

--packing measures instead each method's shipped benchmark recipe (recipes/benchmarks/cl_standard*.yaml: the CL
benchmark's first task, dbpedia, as prompt/completion, 8 x <=192 tokens, bf16) unpacked and packed: tokens of
real data per second (padding excluded, over the steps after the first two) and the packed/unpacked ratio,
paired within a repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BASE_OF = {"seqft": "seqft", "hft": "seqft", "osft": "seqft", "lora": "lora", "ilora": "lora", "mora": "lora"}


BENCH = REPO / "recipes" / "benchmarks"


def cl_worker(method: str, model: str, steps: int, out: Path, packing: bool) -> None:
    """One stage (the first) of the method's benchmark recipe, packed or not: real tokens/s after two steps."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from llmcl import recipe as recipe_mod
    from llmcl.data.stream import peak_rss_bytes
    from llmcl.train.loop import run
    from llmcl.train.progress import Display

    path = BENCH / ("cl_standard.yaml" if method == "seqft" else f"cl_standard_{method}.yaml")
    r = recipe_mod.load(path, [f"model.path={model}", f"train.max_steps={steps}", "eval.after_each_stage=false",
                               f"train.packing={str(packing).lower()}", "train.save_every=0"])
    run_dir = Path(tempfile.mkdtemp(dir=out))
    run(r, run_dir, only_stage=0, display=Display(enabled=False))
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    rate = (rows[-1]["tokens"] - rows[0]["tokens"]) / (rows[-1]["elapsed_s"] - rows[0]["elapsed_s"])
    print(json.dumps({"method": method, "packing": packing, "tokens_per_s": rate, "loss": rows[-1]["loss"],
                      "peak_rss": peak_rss_bytes()}))


def packing_table(args) -> None:
    results: dict[str, dict[bool, list[dict]]] = {m: {False: [], True: []} for m in args.methods}
    with tempfile.TemporaryDirectory() as d:
        for rep in range(args.repeats):
            order = args.methods[rep % len(args.methods):] + args.methods[:rep % len(args.methods)]
            for m in order:
                for packing in ((False, True) if rep % 2 == 0 else (True, False)):
                    cmd = [sys.executable, __file__, "--worker", m, "--model", args.model, "--steps", str(args.steps),
                           "--out", d, "--cl-packing", str(packing).lower()]
                    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
                    if out.returncode != 0:
                        sys.exit(f"{m} failed:\n{out.stderr[-3000:]}")
                    results[m][packing].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"  repeat {rep + 1} {m}: unpacked {results[m][False][-1]['tokens_per_s']:,.0f}, packed "
                      f"{results[m][True][-1]['tokens_per_s']:,.0f} real tokens/s", flush=True)
    print(f"\n{args.model}, the benchmark recipes' first task (dbpedia, 8 x <=192 tokens), {args.steps} steps, "
          f"{args.repeats} repeats (medians; ratios paired within a repeat)")
    print(f"{'method':8} {'unpacked tok/s':>15} {'packed tok/s':>13} {'packed/unpacked (range)':>24} "
          f"{'final loss unpacked, packed':>28}")
    for m, by in results.items():
        ratios = sorted(b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(by[False], by[True]))
        plain, packed = (statistics.median(r["tokens_per_s"] for r in by[k]) for k in (False, True))
        losses = f"{by[False][-1]['loss']:.4f}, {by[True][-1]['loss']:.4f}"
        spread = f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})"
        print(f"{m:8} {plain:15,.0f} {packed:13,.0f} {spread:>24} {losses:>28}")


def worker(method: str, model: str, steps: int, out: Path, batch: int = 4, seq_len: int = 128) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from llmcl import recipe as recipe_mod
    from llmcl.data import builtin
    from llmcl.data.stream import peak_rss_bytes
    from llmcl.train.loop import run
    from llmcl.train.progress import Display

    corpus = out / "corpus.jsonl"
    if not corpus.exists():
        builtin.write_text_corpus(corpus)
    r = recipe_mod.from_dict({
        "name": f"bench-{method}", "model": {"path": model}, "method": {"name": method},
        "train": {"lr": 1e-4, "max_steps": steps, "batch_size": batch, "seq_len": seq_len, "warmup": 0,
                  "schedule": "constant"},
        "eval": {"after_each_stage": False},
        # MoRA's bank grows by r experts a stage: three stages measure the step time with 1x, 2x, 3x r experts
        "stages": [{"name": f"s{k}", "data": {"path": str(corpus), "format": "text"}}
                   for k in range(3 if method == "mora" else 1)],
    })
    run_dir = Path(tempfile.mkdtemp(dir=out))
    run(r, run_dir, display=Display(enabled=False))
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]

    def median_step(stage: int) -> float:
        ends = [m["elapsed_s"] for m in metrics if m["stage"] == stage]
        return statistics.median([b - a for a, b in zip(ends, ends[1:])][2:])  # the first steps warm up

    by_stage = [median_step(k) for k in range(len(r.stages))]
    ledger = json.loads((run_dir / "ledger.json").read_text())["stages"][0]
    state = json.loads(next(run_dir.glob("stage-00-*/method_state.json")).read_text())
    svd = sum(rec.get("svd_seconds", 0) for rec in state.get("records", []))
    print(json.dumps({"method": method, "step_s": by_stage[0], "step_s_by_stage": by_stage,
                      "peak_rss": peak_rss_bytes(), "trainable": ledger["trainable_params"],
                      "total": ledger["total_params"], "svd_s": svd}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["seqft", "hft", "osft", "lora", "ilora", "mora"])
    p.add_argument("--model", default="builtin:smollm2-135m")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--packing", action="store_true", help="each method's benchmark recipe, packed against unpacked "
                   "(real tokens/s on the CL benchmark's first task)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--cl-packing", choices=["true", "false"], help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker and args.cl_packing:
        cl_worker(args.worker, args.model, args.steps, args.out, args.cl_packing == "true")
        return
    if args.worker:
        worker(args.worker, args.model, args.steps, args.out, args.batch, args.seq_len)
        return
    if args.packing:
        packing_table(args)
        return
    results: dict[str, list[dict]] = {m: [] for m in args.methods}
    with tempfile.TemporaryDirectory() as d:
        for rep in range(args.repeats):
            order = args.methods[rep % len(args.methods):] + args.methods[:rep % len(args.methods)]
            for m in order:
                cmd = [sys.executable, __file__, "--worker", m, "--model", args.model, "--steps", str(args.steps),
                       "--out", d, "--batch", str(args.batch), "--seq-len", str(args.seq_len)]
                out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
                if out.returncode != 0:
                    sys.exit(f"{m} failed:\n{out.stderr[-3000:]}")
                results[m].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"  repeat {rep + 1} {m}: {results[m][-1]['step_s']:.3f} s/step", flush=True)
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("step_s", "peak_rss", "trainable", "svd_s")}
           for m, rs in results.items()}
    print(f"\n{args.model}, batch {args.batch} x {args.seq_len} tokens, {args.steps} steps, {args.repeats} repeats "
          "(medians)")
    print(f"{'method':8} {'base':6} {'s/step':>7} {'x base':>7} {'peak RSS':>9} {'x base':>7} {'AdamW state':>12} "
          f"{'x base':>7} {'SVD s':>6}")
    for m, v in med.items():
        b = med.get(BASE_OF.get(m, m))
        ratio = (lambda k: f"{v[k] / b[k]:7.2f}") if b else (lambda k: "      —")
        print(f"{m:8} {BASE_OF.get(m, m):6} {v['step_s']:7.3f} {ratio('step_s')} {v['peak_rss'] / 2**20:7.0f}Mi "
              f"{ratio('peak_rss')} {8 * v['trainable'] / 2**20:10.1f}Mi {ratio('trainable')} {v['svd_s']:6.1f}")
    if "mora" in results and "lora" in med:
        growth = [statistics.median(r["step_s_by_stage"][k] for r in results["mora"]) for k in range(3)]
        print("mora step time as its bank grows (r new experts a stage; x lora of rank r): "
              + ", ".join(f"{(k + 1)}r experts {g:.3f}s ({g / med['lora']['step_s']:.2f}x)"
                          for k, g in enumerate(growth)))


if __name__ == "__main__":
    main()
