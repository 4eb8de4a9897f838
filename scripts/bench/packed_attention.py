"""The attention of one packed row, forward and backward, as train.packing runs it (llmcl.layers.varlen.packed_sdpa:
causal sdpa on each example's span of the row), against the same examples padded to one row each (what the
unpacked step's attention costs), and against the per-span slicing packed_sdpa did before (each span cut out of
the row by indexing, whose backward fills a zero gradient of the whole row per span and adds them up).

SmolLM2-135M's attention shape (9 query heads, 3 key/value heads, head size 64), 8 examples of the CL
benchmark's lengths (90 to 190 tokens, 1,140 in all), one layer; printed per layout: median forward and
backward ms over the repeats (interleaved), times 30 for the model's 30 layers, and the ratio to the current
packed_sdpa. Outputs and gradients of the three are checked equal first.

    python scripts/bench/packed_attention.py                  # fp32, 30 repeats
    python scripts/bench/packed_attention.py --dtype bf16 --repeats 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from llmcl.layers import varlen  # noqa: E402

HEADS, KV_HEADS, DIM, LAYERS = 9, 3, 64, 30
LENGTHS = [190, 170, 160, 150, 140, 130, 110, 90]
F = torch.nn.functional.scaled_dot_product_attention
POSITIONS = torch.cat([torch.arange(n) for n in LENGTHS])[None]  # one tensor, as every layer of a forward gets


def _repeat(x: torch.Tensor) -> torch.Tensor:
    return x.repeat_interleave(HEADS // KV_HEADS, dim=1)


def current(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """llmcl's packed_sdpa itself, called as transformers calls it (output [B, T, H, D] back to [B, H, T, D])."""
    module = SimpleNamespace(num_key_value_groups=HEADS // KV_HEADS)
    mask = torch.ones(1, dtype=torch.bool)  # any mask: transformers passes the block mask, unused on this branch
    out, _ = varlen.packed_sdpa(module, q, k, v, mask, position_ids=POSITIONS)
    return out.transpose(1, 2)


def slicing(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The per-span indexing of packed_sdpa before 2026-12-07."""
    k, v = _repeat(k), _repeat(v)
    bounds, at = [], 0
    for n in LENGTHS:
        bounds.append((at, at + n))
        at += n
    return torch.cat([F(q[0:1, :, s:e], k[0:1, :, s:e], v[0:1, :, s:e], is_causal=True) for s, e in bounds], 2)


def padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The unpacked step's attention: one row per example, right-padded to the longest, with sdpa's boolean mask
    (causal over each example; a padding query sees the first token, as transformers' mask lets it)."""
    k, v = _repeat(k), _repeat(v)
    width = max(LENGTHS)

    def pad(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.nn.functional.pad(p[0], (0, 0, 0, width - p.shape[2])) for p in x.split(LENGTHS, 2)])

    mask = torch.zeros(len(LENGTHS), 1, width, width, dtype=torch.bool)
    for i, n in enumerate(LENGTHS):
        mask[i, 0, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
        mask[i, 0, n:, 0] = True
    out = F(pad(q), pad(k), pad(v), attn_mask=mask)
    return torch.cat([out[i:i + 1, :, :n] for i, n in enumerate(LENGTHS)], 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    tokens = sum(LENGTHS)

    def inputs() -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        return [torch.randn(1, h, tokens, DIM, generator=g).to(dtype).requires_grad_()
                for h in (HEADS, KV_HEADS, KV_HEADS)]

    layouts = [current, slicing, padded]
    grad = torch.randn(1, HEADS, tokens, DIM, generator=torch.Generator().manual_seed(1)).to(dtype)
    results = {}
    for f in layouts:
        x = inputs()
        out = f(*x)
        out.backward(grad)
        results[f.__name__] = [out.detach()] + [t.grad for t in x]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name, got in results.items():
        for a, b in zip(got, results["current"]):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=name)
    times: dict[str, tuple[list[float], list[float]]] = {f.__name__: ([], []) for f in layouts}
    for r in range(args.repeats):
        for f in layouts[r % len(layouts):] + layouts[:r % len(layouts)]:
            x = inputs()
            t0 = time.perf_counter()
            out = f(*x)
            t1 = time.perf_counter()
            out.backward(grad)
            t2 = time.perf_counter()
            times[f.__name__][0].append(t1 - t0)
            times[f.__name__][1].append(t2 - t1)
    print(f"one layer's attention, {args.dtype}, {len(LENGTHS)} examples ({tokens} tokens), {args.repeats} repeats, "
          f"{torch.get_num_threads()} threads; outputs and gradients equal\n")
    ours = sum(statistics.median(t) for t in times["current"])
    print(f"{'layout':10} {'forward ms':>11} {'backward ms':>12} {f'x{LAYERS} layers s':>15} {'vs current':>11}")
    for name, (fw, bw) in times.items():
        total = statistics.median(fw) + statistics.median(bw)
        print(f"{name:10} {statistics.median(fw) * 1e3:11.2f} {statistics.median(bw) * 1e3:12.2f} "
              f"{LAYERS * total:15.3f} {total / ours:10.2f}x")


if __name__ == "__main__":
    main()
