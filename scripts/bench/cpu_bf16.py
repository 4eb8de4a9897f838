"""bf16 against fp32 on this CPU: SmolLM2-135M's matrix products (a decoder layer's projections and the LM head)
over 8 x 192 tokens, as a training step under bf16 autocast multiplies them and as a bf16-scored evaluation does.

Where the CPU multiplies bfloat16 natively (avx512_bf16, AMX), bf16 is the faster of the two; where it does not
(AVX2), PyTorch emulates it and the ratio turns over. `llmcl train` notes the second case in one line.

    python scripts/bench/cpu_bf16.py          # about a minute

Prints the CPU capability, oneDNN's bf16 support, and per shape: fp32 and bf16 seconds, bf16 / fp32.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from llmcl.train.distributed import native_cpu_bf16  # noqa: E402

TOKENS = 8 * 192
# SmolLM2-135M: hidden 576, MLP 1536, 9 kv heads of 64 (k/v 192 wide), vocabulary 49,152
SHAPES = {"q/o projection": (576, 576), "k/v projection": (576, 192), "gate/up": (576, 1536),
          "down": (1536, 576), "LM head": (576, 49152)}


def seconds(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, native bf16 (oneDNN): {native_cpu_bf16()}\n")
    print(f"{'matrix product':16} {'fp32 (ms)':>10} {'bf16 (ms)':>10} {'bf16 / fp32':>12}")
    ratios = []
    for name, (k, n) in SHAPES.items():
        x, w = torch.randn(TOKENS, k), torch.randn(n, k)
        xb, wb = x.bfloat16(), w.bfloat16()
        with torch.no_grad():
            a, b = seconds(lambda: F.linear(x, w)), seconds(lambda: F.linear(xb, wb))
        ratios.append(b / a)
        print(f"{name:16} {a * 1e3:10.1f} {b * 1e3:10.1f} {b / a:11.2f}x")
    print(f"\ngeometric mean bf16 / fp32: {statistics.geometric_mean(ratios):.2f}x "
          f"({'bf16 is slower here: train.precision: fp32 is the faster setting' if statistics.geometric_mean(ratios) > 1 else 'bf16 is faster here'})")


if __name__ == "__main__":
    main()
