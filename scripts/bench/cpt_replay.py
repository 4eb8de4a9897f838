"""Replay in continual pre-training: how much does replay reduce forgetting, and what does it cost the new domain?

Two text domains (stage 1: WikiText-2, stage 2: Amazon reviews) on SmolLM2-135M with llmcl's cosine
re-warming/re-decaying schedule. Stage 1 is trained once; stage 2 is trained from it with replay of stage 1's
data at each ratio (0%, 5%, 25% by default), compute-equivalent (every step has the same number of tokens).
Held-out perplexity is scored with lm-eval (rolling loglikelihood) after each stage. Prints one table:

  replay | wiki ppl after stage 1 | wiki ppl after stage 2 | forgetting (ratio) | reviews ppl after stage 2

The direction Ibrahim et al. (2024) report: more replay -> less forgetting of stage 1, slightly worse stage 2.

    python scripts/bench/cpt_replay.py                     # 40 steps of 4 x 256 tokens per stage (~25 min CPU)
    python scripts/bench/cpt_replay.py --steps 10 --model builtin:tiny --ratios 0 0.5   # a quick smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import yaml  # noqa: E402

from llmcl import recipe as recipe_mod  # noqa: E402
from llmcl.eval.hooks import EvalHooks  # noqa: E402
from llmcl.train.distributed import make_accelerator  # noqa: E402
from llmcl.train.loop import run  # noqa: E402
from llmcl.train.progress import Display  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def base_recipe(args) -> dict:
    data = yaml.safe_load((REPO / "recipes" / "cpt_rewarm_replay.yaml").read_text())
    data["name"] = "cpt_replay_bench"
    data["model"]["path"] = args.model
    data["train"].pop("max_tokens", None)
    data["train"].update(max_steps=args.steps, save_every=0)
    data["replay"] = {"ratio": 0.0}
    data["eval"] = {"limit": args.eval_docs}
    return data


def train(data: dict, run_dir: Path, stage: int) -> None:
    r = recipe_mod.from_dict(data)
    display = Display()
    run(r, run_dir, only_stage=stage, display=display, hooks=EvalHooks(r, run_dir, display),
        accelerator=make_accelerator(r, run_dir, fresh=True))


def perplexities(run_dir: Path, row: str) -> dict[str, dict[str, float]]:
    tasks = json.loads((run_dir / "eval" / f"{row}.json").read_text())["tasks"]
    return {t["stage_name"]: t["metrics"] for t in tasks.values() if t["kind"] == "stage"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.05, 0.25])
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per stage (4 x 256 tokens each)")
    p.add_argument("--eval-docs", type=int, default=40, help="held-out documents per domain")
    p.add_argument("--model", default="builtin:smollm2-135m")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench-cpt-replay")
    args = p.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    os.chdir(REPO)  # the recipe's ../shared/data paths are relative to the repository
    data = base_recipe(args)
    base_dir = args.out / "stage1"
    train(data, base_dir, 0)
    rows = []
    for ratio in args.ratios:
        variant = copy.deepcopy(data)
        variant["stages"][1]["replay"] = {"ratio": ratio}
        run_dir = args.out / f"replay-{ratio:g}"
        if not run_dir.exists():
            shutil.copytree(base_dir, run_dir)
            resolved = recipe_mod.from_dict(variant)
            (run_dir / "recipe.yaml").write_text(recipe_mod.dump(resolved))  # same stage 1, this stage-2 replay
        train(variant, run_dir, 1)
        after1, after2 = perplexities(run_dir, "stage-00"), perplexities(run_dir, "stage-01")
        rows.append((ratio, after1, after2))
    base = perplexities(base_dir, "base")
    print()
    print(f"base model: wiki word ppl {base['wiki']['word_perplexity']:.2f}, "
          f"reviews word ppl {base['reviews']['word_perplexity']:.2f} ({args.model}, {args.steps} steps/stage)")
    print(f"{'replay':>7} {'wiki ppl after 1':>17} {'wiki ppl after 2':>17} {'forgetting x':>13} "
          f"{'reviews ppl after 2':>20} {'wiki bpb after 2':>17}")
    for ratio, a1, a2 in rows:
        w1, w2 = a1["wiki"]["word_perplexity"], a2["wiki"]["word_perplexity"]
        print(f"{ratio:>7.0%} {w1:>17.2f} {w2:>17.2f} {w2 / w1:>13.3f} {a2['reviews']['word_perplexity']:>20.2f} "
              f"{a2['wiki']['bits_per_byte']:>17.4f}")


if __name__ == "__main__":
    main()
