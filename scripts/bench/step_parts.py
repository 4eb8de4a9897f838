"""Where a training step's time goes on instruction data: forward, backward and optimizer, unpacked and packed
(train.packing), with the LM head over every position or at the trained positions only (what llmcl's loop does
where the model supports it: llmcl.models.logits_at_labels).

SmolLM2-135M (the CL benchmark recipe's model and precision) trains steps of 8 examples drawn from the four
stage datasets of recipes/benchmarks/cl_standard.yaml in turn (seq_len 192); every step runs the same examples
through the four layouts in a rotating order, from the same weights (each layout's update is undone), so the
ratios are paired per step. The first step is excluded.

    python scripts/bench/step_parts.py                     # 9 steps, the recipe's bf16 mixed precision
    python scripts/bench/step_parts.py --steps 5 --precision fp32
    python scripts/bench/step_parts.py --method lora       # LoRA (r 16, recipes/benchmarks/cl_standard_lora.yaml)
    python scripts/bench/step_parts.py --method lora --loop
    python scripts/bench/step_parts.py --shapes            # no model: how often the loop's batch shapes repeat

--loop runs instead the two layouts llmcl's loop runs (LM head at the trained positions, unpacked and packed)
through the loop's own call path: an Accelerate-prepared model and optimizer, accelerator.autocast,
llmcl.train.steps.forward_loss, llmcl.train.distributed's backward and step (gradient clipping included), on
the loop's own batches (step s of stage k: the BatchPlan of the recipe's seed), paired per step as above. Each
layout runs once as the loop runs it (no other layout has just run its shapes: shape-keyed kernel caches as cold
as in the loop) and then once more on the same batch ("same shape again": those caches warm), so the difference
of the two is what a new batch shape costs. It answers whether the loop's code loses any of packing's saving,
and whether a packed row's new length at every step does.

--shapes counts, on the loop's batches of every stage (--steps of them a stage, the stages in turn), how many steps
meet a batch width the run has already seen: unpacked (rows padded to the longest example), packed (one row of
every token), and packed with the row rounded up to a multiple of 64 tokens (a padding span of its own), with the
tokens that rounding adds.
Shape-keyed kernel caches (oneDNN's, in bf16) are cold at every width not seen before.

Prints per layout: mean step seconds and its forward / backward / optimizer parts, real tokens per second, and
the ratios to the unpacked step with full logits (the loop before issue #17) and to the unpacked step at the
trained positions (the loop's default today).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from llmcl import recipe as recipe_mod  # noqa: E402
from llmcl.data.batching import label_positions, label_tokens, make_batch, model_inputs  # noqa: E402
from llmcl.data.mixing import build_pool  # noqa: E402
from llmcl.layers import varlen  # noqa: E402
from llmcl.models import load_base_model, load_tokenizer, logits_at_labels  # noqa: E402

LAYOUTS = [("unpacked", False, False), ("unpacked, LM head at targets", False, True),
           ("packed", True, False), ("packed, LM head at targets", True, True)]
RECIPES = {"seqft": "cl_standard.yaml", "lora": "cl_standard_lora.yaml"}


def _setup(args) -> tuple:
    """The benchmark recipe (at --precision), its tokenizer, and its model with the method's adapters (LoRA)."""
    recipe = recipe_mod.load(REPO / "recipes" / "benchmarks" / RECIPES[args.method],
                             [f"train.precision={args.precision}"])
    model = load_base_model(recipe.model, recipe.seed)
    if args.method == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, recipe.method.peft_config(use_rslora=recipe.method.use_rslora))
    return recipe, load_tokenizer(recipe.model), model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=9)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--method", choices=["seqft", "lora"], default="seqft")
    p.add_argument("--loop", action="store_true", help="through the loop's call path, on the loop's batches")
    p.add_argument("--shapes", action="store_true", help="only count the repeats of the loop's batch widths")
    args = p.parse_args()
    if args.shapes:
        return shapes(args)
    if args.loop:
        return loop_parts(args)
    recipe, tokenizer, model = _setup(args)
    seq_len = recipe.stage_train(0).seq_len
    assert logits_at_labels(model), "this model keeps full logits: nothing to compare"
    with tempfile.TemporaryDirectory() as d:
        pools = [build_pool(s.data, tokenizer, seq_len, recipe.seed, Path(d))[0] for s in recipe.stages]
    capacity = varlen.row_capacity(model, seq_len)
    optimizer = torch.optim.AdamW([t for t in model.parameters() if t.requires_grad], lr=1e-5, fused=True)
    model.train()
    g = torch.Generator().manual_seed(0)
    times: dict[str, list[tuple[float, float, float]]] = {name: [] for name, _, _ in LAYOUTS}
    tokens, padding = 0, []
    print(f"SmolLM2-135M, {args.method}, {args.precision}, {args.steps} steps of 8 examples (seq_len {seq_len}), "
          f"{torch.get_num_threads()} threads", flush=True)
    for step in range(args.steps):
        pool = pools[step % len(pools)]
        examples = [pool[j] for j in torch.randint(len(pool), (8,), generator=g).tolist()]
        n_items = label_tokens(examples)
        start = {n: t.detach().clone() for n, t in model.state_dict().items()}
        for k in range(len(LAYOUTS)):
            name, packing, at_labels = LAYOUTS[(k + step) % len(LAYOUTS)]
            batch = make_batch(examples, tokenizer.pad_token_id, packing, capacity)
            if not packing and not at_labels:
                padding.append(1 - float(batch["attention_mask"].float().mean()))
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                out = model(**model_inputs(batch), **(label_positions(batch) if at_labels else {}),
                            num_items_in_batch=n_items, use_cache=False)
            t1 = time.perf_counter()
            out.loss.backward()
            t2 = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            t3 = time.perf_counter()
            if step:
                times[name].append((t1 - t0, t2 - t1, t3 - t2))
            with torch.no_grad():  # every layout of a step starts from the same weights
                model.load_state_dict(start)
        if step:
            tokens += sum(len(e.input_ids) for e in examples)
    base = statistics.fmean(sum(t) for t in times["unpacked"])
    ours = statistics.fmean(sum(t) for t in times["unpacked, LM head at targets"])
    print(f"\npadding share of the unpacked batches: {statistics.fmean(padding):.1%}\n")
    print(f"{'layout':30} {'step s':>7} {'forward':>8} {'backward':>9} {'optimizer':>10} {'real tok/s':>11} "
          f"{'vs unpacked':>12} {'vs unpacked at targets':>23}")
    for name, _, _ in LAYOUTS:
        parts = [statistics.fmean(t[i] for t in times[name]) for i in range(3)]
        step_s = sum(parts)
        print(f"{name:30} {step_s:7.3f} {parts[0]:8.3f} {parts[1]:9.3f} {parts[2]:10.3f} "
              f"{tokens / len(times[name]) / step_s:11.0f} {base / step_s:11.2f}x {ours / step_s:22.2f}x")


def shapes(args) -> None:
    """--shapes: how often the loop's micro-batch widths repeat over a run, unpacked, packed, packed to 64."""
    from llmcl.data.batching import BatchPlan, fetch

    recipe = recipe_mod.load(REPO / "recipes" / "benchmarks" / RECIPES[args.method], [])
    tokenizer, cfg = load_tokenizer(recipe.model), recipe.stage_train(0)
    with tempfile.TemporaryDirectory() as d:
        pools = [build_pool(s.data, tokenizer, cfg.seq_len, recipe.seed, Path(d))[0] for s in recipe.stages]
    print(f"{args.steps} steps of {cfg.batch_size} examples a stage (seq_len {cfg.seq_len}), the stages in turn: a "
          "stage's steps whose width the run had seen before (distinct widths of the run so far)")
    print(f"{'stage':10} {'unpacked':>12} {'packed':>12} {'packed, 64':>12} {'tokens 64 adds':>15}")
    seen: list[set[int]] = [set(), set(), set()]  # a process's kernel caches outlive a stage: counted over the run
    for k, pool in enumerate(pools):
        plan = BatchPlan(len(pool), cfg.batch_size, 1, 1, recipe.seed, k)
        widths = []
        for step in range(args.steps):
            lengths = [len(e.input_ids) for e in fetch([pool], [(0, j) for j in plan.micro_indices(step, 0, 0)])]
            widths.append((max(lengths), sum(lengths), -(-sum(lengths) // 64) * 64))
        repeats = [0, 0, 0]
        for w in widths:
            for i in range(3):
                repeats[i] += w[i] in seen[i]
                seen[i].add(w[i])
        counts = [f"{repeats[i]} ({len(seen[i])})" for i in range(3)]
        added = sum(w[2] - w[1] for w in widths) / sum(w[1] for w in widths)
        print(f"{recipe.stages[k].name:10} {counts[0]:>12} {counts[1]:>12} {counts[2]:>12} {added:15.1%}")


def loop_parts(args) -> None:
    """--loop: the loop's two layouts through the loop's call path, paired per step on the loop's batches, each
    run twice (cold, then warm shapes)."""
    from llmcl import methods
    from llmcl.data.batching import BatchPlan, fetch
    from llmcl.train import distributed
    from llmcl.train.steps import forward_loss

    recipe, tokenizer, model = _setup(args)
    cfg = recipe.stage_train(0)
    method = methods.create(recipe.method)  # seqft and lora: the base Method's forward hooks and loss
    with tempfile.TemporaryDirectory() as d:
        pools = [build_pool(s.data, tokenizer, cfg.seq_len, recipe.seed, Path(d))[0] for s in recipe.stages]
        capacity = varlen.row_capacity(model, cfg.seq_len)
        named = [(n, t) for n, t in model.named_parameters() if t.requires_grad]
        optimizer = torch.optim.AdamW([t for _, t in named], lr=1e-5, fused=True)
        accelerator = distributed.make_accelerator(recipe, Path(d), fresh=True)
        model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    params = [t for _, t in named]
    plans = [BatchPlan(len(pool), cfg.batch_size, 1, 1, recipe.seed, k) for k, pool in enumerate(pools)]
    names = {(False, False): "unpacked, LM head at targets", (False, True): "unpacked, same shape again",
             (True, False): "packed, LM head at targets", (True, True): "packed, same shape again"}
    times: dict[tuple[bool, bool], list[tuple[float, float, float]]] = {key: [] for key in names}
    tokens, padding = 0, []
    print(f"SmolLM2-135M, {args.method}, {args.precision} ({accelerator.mixed_precision}), {args.steps} steps of "
          f"{cfg.batch_size} examples (seq_len {cfg.seq_len}) through the loop's call path, "
          f"{torch.get_num_threads()} threads", flush=True)
    model.train()
    for step in range(args.steps):
        k = step % len(pools)
        examples = fetch([pools[k]], [(0, j) for j in plans[k].micro_indices(step // len(pools), 0, 0)])
        n_items = label_tokens(examples)
        start = {n: t.detach().clone() for n, t in unwrapped.state_dict().items()}
        for i in range(2):
            packing = bool((i + step) % 2)
            batch = make_batch(examples, tokenizer.pad_token_id, packing, capacity)
            if not packing:
                padding.append(1 - float(batch["attention_mask"].float().mean()))
            for again in (False, True):  # the same batch twice: the second finds every shape-keyed cache warm
                t0 = time.perf_counter()
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        _, loss = forward_loss(model, unwrapped, method, batch, examples, n_items, 1, at_labels=True)
                    t1 = time.perf_counter()
                    distributed.backward(accelerator, loss)
                t2 = time.perf_counter()
                distributed.step(accelerator, optimizer, params, cfg.max_grad_norm, take=lambda norm: True)
                optimizer.zero_grad(set_to_none=True)
                t3 = time.perf_counter()
                if step:
                    times[packing, again].append((t1 - t0, t2 - t1, t3 - t2))
                with torch.no_grad():
                    unwrapped.load_state_dict(start)
        if step:
            tokens += sum(len(e.input_ids) for e in examples)
            print(f"  step {step}: " + ", ".join(f"{name} {sum(times[key][-1]):.2f} s" for key, name in names.items()),
                  flush=True)
    print(f"\npadding share of the unpacked batches: {statistics.fmean(padding):.1%}\n")
    print(f"{'layout':30} {'step s':>7} {'forward':>8} {'backward':>9} {'optimizer':>10} {'real tok/s':>11} "
          f"{'vs unpacked':>12} {'per-step ratios (range)':>24}")
    for (packing, again), name in names.items():
        parts = [statistics.fmean(t[i] for t in times[packing, again]) for i in range(3)]
        step_s = sum(parts)
        unpacked = times[False, again]  # packed against unpacked as cold (the loop), or as warm
        ratios = sorted(sum(a) / sum(b) for a, b in zip(unpacked, times[packing, again]))
        print(f"{name:30} {step_s:7.3f} {parts[0]:8.3f} {parts[1]:9.3f} {parts[2]:10.3f} "
              f"{tokens / len(unpacked) / step_s:11.0f} {statistics.fmean(sum(t) for t in unpacked) / step_s:11.2f}x "
              f"{f'{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})':>24}")


if __name__ == "__main__":
    main()
