"""Digest of every stage's saved weights for every shipped recipe, trained on builtin:tiny.

A refactor that must not change behaviour is checked by running this before and after it and comparing the
two JSON files: every tensor of every stage artifact (full model, adapter, MoRA bank, method state) is hashed.

    python scripts/dev/stage_digests.py OUT.json [--steps 3] [--only NAME ...]
Run it from the repository root (recipes read ../shared/data relative to it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def overrides_for(path: Path, steps: int) -> list[str]:
    """The shipped recipe, its model swapped for builtin:tiny, `steps` steps a stage, no evaluation."""
    raw = yaml.safe_load(path.read_text())
    stages = raw.get("stages") or []
    parent = raw.get("inherit")
    while not stages and parent:  # inherited stage lists
        praw = yaml.safe_load((path.parent / parent).read_text())
        stages, parent = praw.get("stages") or [], praw.get("inherit")
    out = ["model.path=builtin:tiny", f"train.max_steps={steps}", "train.max_tokens=null", "train.save_every=0",
           "eval.after_each_stage=false", "distributed.accelerate_config=null"]
    out += [f"stages.{i}.train.max_steps={steps}" for i, s in enumerate(stages) if "max_steps" in (s.get("train") or {})]
    text = path.read_text()
    if "infinite" in text:
        out += ["train.warmup=0", "train.cooldown=0", "train.anneal=1"]
    return out


def digest_dir(directory: Path) -> dict[str, str]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(directory.rglob("*.safetensors")):
        for name, t in sorted(load_file(str(f)).items()):
            h = hashlib.sha256(t.contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
            out[f"{f.relative_to(directory)}:{name}"] = h.hexdigest()[:16]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--only", nargs="*")
    args = ap.parse_args()
    recipes = sorted((REPO / "recipes").glob("*.yaml")) + sorted((REPO / "recipes" / "benchmarks").glob("*.yaml"))
    result = {}
    for path in recipes:
        if args.only and path.stem not in args.only:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            run = Path(tmp) / "run"
            cmd = [sys.executable, "-m", "llmcl", "train", str(path), *overrides_for(path, args.steps),
                   "--run-dir", str(run)]
            res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            if res.returncode != 0:
                result[path.stem] = {"error": res.stderr.strip().splitlines()[-1:]}
            else:
                ledger = json.loads((run / "ledger.json").read_text())
                result[path.stem] = {s["checkpoint"]: digest_dir(run / s["checkpoint"]) for s in ledger["stages"]}
        print(path.stem, "error" if "error" in result[path.stem] else "ok", flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
