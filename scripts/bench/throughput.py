"""Throughput of llmcl's training loop against the fastest bare PyTorch loop and the HF Trainer.

Same model, same token blocks in the same order, same batch, same seed, fused AdamW everywhere, measured in
one process and interleaved, rotating which goes first in each repeat, so machine noise hits all three
alike. Prints tokens/s per loop (median of the repeats, warm-up steps excluded) and the ratios llmcl/bare
and llmcl/Trainer (median of the per-repeat ratios, with their range).

    python scripts/bench/throughput.py                          # builtin:tiny and SmolLM2-135M
    python scripts/bench/throughput.py --models builtin:tiny --steps 30 --repeats 5
    python scripts/bench/throughput.py --models builtin:llama-1b --json out.json   # on a GPU (llmcl doctor)

On a GPU every loop runs there with bf16 autocast where the GPU supports it (what llmcl's precision: auto does).

    python scripts/bench/throughput.py --packing                # train.packing against one padded row per example

--packing measures instead what train.packing gives on instruction data: llmcl's loop on the standard CL
benchmark's four tasks (recipes/benchmarks/cl_standard.yaml: its prompts, seq_len 192, batch 8, bf16), seqft and
lora, packed and unpacked, as prompt/completion and through the chat template (chat_template: true), each run
the same examples in the same order, interleaved over repeats. The rate is tokens of real data per second
(every token of an example, padding excluded: what metrics.jsonl logs), over each stage's steps after its
first; the ratio packed/unpacked is paired within a repeat. The final loss of the two is printed too: packing
changes the layout, not the training.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from llmcl import recipe as recipe_mod  # noqa: E402
from llmcl.data import builtin  # noqa: E402
from llmcl.data.formatting import pack  # noqa: E402
from llmcl.models import load_base_model, load_tokenizer  # noqa: E402
from llmcl.recipe import ModelConfig  # noqa: E402
from llmcl.train.distributed import reset_accelerate  # noqa: E402

LR = 1e-4
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BF16 = DEVICE == "cuda" and torch.cuda.is_bf16_supported()


def steady_rate(step_times: list[float], tokens_per_step: int, warmup: int) -> float:
    """tokens/s over the steps after `warmup` (step_times are the end times of each step)."""
    t = step_times[warmup - 1:]
    return tokens_per_step * (len(t) - 1) / (t[-1] - t[0])


def run_llmcl(model_path: str, data: Path, args, tmp: Path, rep: int) -> float:
    from llmcl.train.distributed import make_accelerator
    from llmcl.train.loop import run
    from llmcl.train.progress import Display

    r = recipe_mod.from_dict({
        "name": "bench", "seed": 0, "model": {"path": model_path}, "method": {"name": "seqft"},
        "train": {"lr": LR, "max_steps": args.steps, "batch_size": args.batch, "seq_len": args.seq_len,
                  "warmup": 0, "schedule": "constant", "max_grad_norm": 1.0},
        "stages": [{"data": {"path": str(data), "format": "text"}}],
    })
    run_dir = tmp / f"llmcl-{model_path.replace(':', '_')}-{rep}"
    run(r, run_dir, display=Display(enabled=False), accelerator=make_accelerator(r, run_dir, fresh=True))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ends = [m["elapsed_s"] for m in metrics]
    return steady_rate(ends, args.batch * args.seq_len, args.warmup)


def _blocks(model_path: str, data: Path, args) -> torch.Tensor:
    tok = load_tokenizer(ModelConfig(path=model_path))
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    blocks = pack(texts, tok, args.seq_len)
    # the same order llmcl uses for stage 0
    from llmcl.data.batching import BatchPlan

    plan = BatchPlan(len(blocks), args.batch, 1, 1, 0, 0)
    return torch.tensor([[blocks[j].input_ids for j in plan.step_indices(s)] for s in range(args.steps)])


def n_params(model_path: str) -> int:
    """Parameters of the model (from its config, without loading weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmcl.models import llama_1b_config, resolve_path, tiny_config

    config = {"builtin:tiny": tiny_config, "builtin:llama-1b": llama_1b_config}.get(model_path)
    config = config() if config else AutoConfig.from_pretrained(resolve_path(model_path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def run_bare(model_path: str, data: Path, args) -> float:
    """The fastest plain loop: forward with labels, backward, clip, fused AdamW step."""
    batches = _blocks(model_path, data, args)
    torch.manual_seed(0)
    model = load_base_model(ModelConfig(path=model_path), 0).to(DEVICE)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=True)
    ends = []
    for x in batches.to(DEVICE):
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=BF16):
            loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss)
        ends.append(time.perf_counter())
    return steady_rate(ends, args.batch * args.seq_len, args.warmup)


def run_trainer(model_path: str, data: Path, args, tmp: Path) -> float:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    reset_accelerate()  # the Trainer makes its own Accelerator
    batches = _blocks(model_path, data, args)
    rows = [{"input_ids": row, "labels": row} for b in batches for row in b.tolist()]
    torch.manual_seed(0)
    model = load_base_model(ModelConfig(path=model_path), 0)
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            ends.append(time.perf_counter())

    targs = TrainingArguments(
        output_dir=str(tmp / "trainer"), per_device_train_batch_size=args.batch, max_steps=args.steps,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
        logging_steps=args.steps, log_level="error",
        save_strategy="no", report_to=[], use_cpu=DEVICE == "cpu", bf16=BF16, seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=rows, callbacks=[Clock()])
    # keep our block order: no shuffling
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(rows)
    trainer.train()
    return steady_rate(ends, args.batch * args.seq_len, args.warmup)


CL_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "benchmarks" / "cl_standard.yaml"


def run_packing(method: str, chat: bool, packing: bool, args, tmp: Path, rep: int) -> tuple[float, list[float]]:
    """(real tokens/s over each stage's steps after its first, every logged step's loss) of one llmcl run on the
    CL benchmark's four tasks."""
    from llmcl.train.distributed import make_accelerator
    from llmcl.train.loop import run
    from llmcl.train.progress import Display

    r = recipe_mod.load(CL_RECIPE, [f"method.name={method}", f"train.packing={str(packing).lower()}",
                                    f"train.max_steps={args.steps}", "eval.after_each_stage=false",
                                    *(f"stages.{k}.data.chat_template=true" for k in range(4) if chat),
                                    *([f"model.path={args.models[-1]}"] if args.models else []),
                                    *(["train.lr=1e-3", "method.r=16"] if method == "lora" else []),
                                    *([f"train.precision={args.precision}"] if args.precision else [])])
    run_dir = tmp / f"pack-{method}-{chat}-{packing}-{rep}"
    run(r, run_dir, display=Display(enabled=False), accelerator=make_accelerator(r, run_dir, fresh=True))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tokens = seconds = 0.0
    for stage in sorted({m["stage"] for m in metrics}):
        rows = [m for m in metrics if m["stage"] == stage]
        tokens += rows[-1]["tokens"] - rows[0]["tokens"]
        seconds += rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]
    return tokens / seconds, [m["loss"] for m in metrics]


def packing_table(args) -> None:
    print(f"train.packing on {CL_RECIPE.name}'s four tasks: {args.steps} steps a task, batch 8 x <=192 tokens, "
          f"{args.repeats} interleaved repeats, precision {args.precision or 'as the recipe'}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as d:
        for method in args.pack_methods:
            for chat in (False, True):
                rates: dict[bool, list[float]] = {False: [], True: []}
                losses: dict[bool, list[float]] = {}
                for rep in range(args.repeats):
                    for packing in ((False, True) if rep % 2 == 0 else (True, False)):
                        gc.collect()
                        rate, losses[packing] = run_packing(method, chat, packing, args, Path(d), rep)
                        rates[packing].append(rate)
                    print(f"  {method} {'chat' if chat else 'prompt/completion'} repeat {rep + 1}: unpacked "
                          f"{rates[False][-1]:,.0f}, packed {rates[True][-1]:,.0f} tokens/s", flush=True)
                ratios = sorted(a / b for a, b in zip(rates[True], rates[False]))
                results.append((method, chat, statistics.median(rates[False]), statistics.median(rates[True]),
                                ratios, losses))
    print()
    # the loss curves: every step's loss side by side (same examples each step), the largest relative gap, and the
    # final loss as the mean over the last stage's steps (one step's loss is one batch)
    print(f"{'method':7} {'data':18} {'unpacked tok/s':>15} {'packed tok/s':>13} {'packed/unpacked (range)':>24} "
          f"{'last stage mean loss unpacked, packed':>38} {'gap':>7} {'largest step gap':>17}")
    for method, chat, plain, packed, ratios, losses in results:
        a, b = losses[False], losses[True]
        tail = max(1, args.steps)
        mean_a, mean_b = statistics.fmean(a[-tail:]), statistics.fmean(b[-tail:])
        worst = max(abs(y - x) / abs(x) for x, y in zip(a, b))
        print(f"{method:7} {'chat template' if chat else 'prompt/completion':18} {plain:15,.0f} {packed:13,.0f} "
              f"{f'{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})':>24} "
              f"{f'{mean_a:.4f}, {mean_b:.4f}':>38} {abs(mean_b - mean_a) / mean_a:7.2%} {worst:17.2%}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["builtin:tiny", "builtin:smollm2-135m"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3, help="steps excluded from the rate")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=None, help="also write the table as JSON (used by llmcl doctor)")
    p.add_argument("--packing", action="store_true", help="packed against unpacked on the CL benchmark's data "
                   "(--steps a task; --models: the last one, default the recipe's SmolLM2)")
    p.add_argument("--pack-methods", nargs="+", default=["seqft", "lora"], help="with --packing: the methods")
    p.add_argument("--precision", default=None, help="with --packing: train.precision (default: the recipe's "
                   "bf16 mixed precision; fp32: where the two curves must agree)")
    args = p.parse_args()
    if args.packing:
        if "--steps" not in sys.argv:
            args.steps = 4
        if "--models" not in sys.argv:
            args.models = []
        packing_table(args)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch} x {args.seq_len} "
          f"tokens, {args.steps} steps ({args.warmup} warm-up), {args.repeats} interleaved repeats", flush=True)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        data = builtin.write_text_corpus(tmp / "corpus.jsonl")  # every loop packs it into the same blocks
        rows = []
        for model_path in args.models:
            rates: dict[str, list[float]] = {"llmcl": [], "bare": [], "trainer": []}
            runners = {
                "llmcl": lambda rep: run_llmcl(model_path, data, args, tmp, rep),
                "bare": lambda rep: run_bare(model_path, data, args),
                "trainer": lambda rep: run_trainer(model_path, data, args, tmp),
            }
            order = list(runners)
            for rep in range(args.repeats):
                for name in order[rep % 3:] + order[:rep % 3]:  # rotate who goes first
                    gc.collect()
                    rates[name].append(runners[name](rep))
                print(f"  {model_path} repeat {rep + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in rates.items()),
                      flush=True)
            med = {k: statistics.median(v) for k, v in rates.items()}
            # ratios within a repeat share the machine's state at that moment: their median is the figure
            paired = {other: sorted(a / b for a, b in zip(rates["llmcl"], rates[other])) for other in ("bare", "trainer")}
            rows.append((model_path, med, paired))
            del runners
            gc.collect()
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
        print()
        print(f"{'model':24} {'llmcl tok/s':>12} {'bare tok/s':>12} {'Trainer tok/s':>14} "
              f"{'llmcl/bare (range)':>22} {'llmcl/Trainer (range)':>24}")
        for model_path, med, paired in rows:
            cells = [f"{statistics.median(r):.3f} ({r[0]:.2f}-{r[-1]:.2f})" for r in (paired["bare"], paired["trainer"])]
            print(f"{model_path:24} {med['llmcl']:12,.0f} {med['bare']:12,.0f} {med['trainer']:14,.0f} "
                  f"{cells[0]:>22} {cells[1]:>24}")
        if args.json:
            args.json.write_text(json.dumps([
                {"model": m, **med, "params": n_params(m), "llmcl_over_bare": statistics.median(paired["bare"]),
                 "llmcl_over_trainer": statistics.median(paired["trainer"])} for m, med, paired in rows], indent=1))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
