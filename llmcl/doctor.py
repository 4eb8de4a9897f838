"""`llmcl doctor`: the self-check a user runs on a new GPU node (also `make gpu-check`).

In about 8 minutes on one GPU:
  methods     every registered method trains a few bf16 steps of SmolLM2-135M on packed text (tokens/s, MFU,
              peak GPU memory from the stage's ledger entry)
  zero2/zero3 one stage of full fine-tuning under DeepSpeed ZeRO-2 and ZeRO-3 (accelerate launch, 1 process)
  eval        one row of the accuracy matrix scored with lm-eval (`llmcl eval --stage 0`)
  throughput  llmcl's loop against the fastest bare PyTorch loop and the HF Trainer
              (scripts/bench/throughput.py) on SmolLM2-135M and on builtin:llama-1b (1.17B, random weights)
and one table: pass/fail per check, tokens/s, MFU, peak GPU memory. Every check is its own process, so a
failure (an out-of-memory, a crash) is one row, not the end of the check. Without CUDA it says so in one line
and exits 0; `--cpu` runs the same checks on builtin:tiny with a few CPU steps, which tests the check itself.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
THROUGHPUT = REPO / "scripts" / "bench" / "throughput.py"
# dense bf16 tensor-core peak (FLOP/s) by device name, for MFU; others get no MFU
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12, "L40": 181e12,
             "A10G": 125e12, "A10": 125e12, "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12}
CHECKS = ("methods", "zero2", "zero3", "eval", "throughput")


@dataclass
class Result:
    check: str
    ok: bool
    seconds: float
    tokens_per_s: float | None = None
    mfu: float | None = None
    peak_gpu_mib: int | None = None
    note: str = ""


@dataclass
class Settings:
    model: str
    steps: int
    batch: int
    seq_len: int
    throughput_models: tuple[str, ...]
    timeout: int
    peak_flops: float | None


def gpu_settings() -> Settings:
    import torch

    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    return Settings("builtin:smollm2-135m", 12, 8, 512, ("builtin:smollm2-135m", "builtin:llama-1b"), 240, peak)


def cpu_settings() -> Settings:
    return Settings("builtin:tiny", 3, 2, 64, ("builtin:tiny",), 300, None)


def mfu(tokens_per_s: float | None, params: int | None, peak: float | None) -> float | None:
    """Model FLOPs utilisation: 6 FLOPs per parameter per trained token (forward + backward) over the peak."""
    if not tokens_per_s or not params or not peak:
        return None
    return 6 * params * tokens_per_s / peak


def recipe_file(directory: Path, name: str, method: str, s: Settings, data: dict[str, Any]) -> Path:
    """One stage of `method` on `data`, s.steps constant-lr steps, no evaluation during training."""
    import yaml

    recipe = {"name": name, "model": {"path": s.model}, "method": {"name": method},
              "train": {"lr": 1e-4, "max_steps": s.steps, "batch_size": s.batch, "seq_len": s.seq_len, "warmup": 0,
                        "schedule": "constant", "log_every": 1},
              "stages": [{"data": data}], "eval": {"after_each_stage": False, "limit": 16, "batch_size": 8}}
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _run(cmd: list[str], timeout: int, env: dict[str, str] | None = None) -> tuple[bool, str]:
    try:
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                             env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout}s"
    last = (out.stderr.strip() or out.stdout.strip()).splitlines()[-1:] or [""]
    return out.returncode == 0, "" if out.returncode == 0 else f"exit {out.returncode}: {last[0][:160]}"


def _train_result(check: str, run_dir: Path, ok: bool, note: str, seconds: float, s: Settings) -> Result:
    if not ok:
        return Result(check, False, seconds, note=note)
    from llmcl.rundir import Ledger
    from llmcl.rundir.metrics import read

    rates = [r["tokens_per_s"] for r in read(run_dir)][2:]  # the first steps warm up (allocator, kernels)
    entry = Ledger.read(run_dir).stage(0)
    rate = statistics.median(rates) if rates else None
    return Result(check, True, seconds, rate, mfu(rate, entry.get("total_params"), s.peak_flops),
                  entry.get("peak_gpu_mib"), note)


def check_method(method: str, work: Path, data: Path, s: Settings, launch: list[str] | None = None,
                 label: str | None = None) -> Result:
    label = label or method
    run_dir = work / f"run-{label}"
    recipe = recipe_file(work, label, method, s, {"path": str(data), "format": "text"})
    cmd = (launch or [sys.executable, "-m"]) + ["llmcl", "train", str(recipe), "--run-dir", str(run_dir)]
    t0 = time.perf_counter()
    ok, note = _run(cmd, s.timeout)
    return _train_result(label, run_dir, ok, note, time.perf_counter() - t0, s)


def check_zero(stage: int, work: Path, data: Path, s: Settings) -> Result:
    config = REPO / "recipes" / "accelerate" / f"zero{stage}.yaml"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes",
              "1", "--main_process_port", "0", "-m"]
    return check_method("seqft", work, data, s, launch=launch, label=f"zero{stage}")


def check_eval(work: Path, s: Settings) -> Result:
    recipe = recipe_file(work, "eval", "seqft", s, {"path": "builtin:facts"})
    run_dir = work / "run-eval"
    t0 = time.perf_counter()
    ok, note = _run([sys.executable, "-m", "llmcl", "train", str(recipe), "--run-dir", str(run_dir)], s.timeout)
    if ok:
        ok, note = _run([sys.executable, "-m", "llmcl", "eval", str(run_dir), "--stage", "0"], s.timeout)
    row = run_dir / "eval" / "stage-00.json"
    if ok and row.exists():
        tasks = json.loads(row.read_text())["tasks"]
        note = ", ".join(f"{t['stage_name']} {t['metric']} {t['value']:.3f} (n={t['n']})" for t in tasks.values())
    return Result("eval", ok and row.exists(), time.perf_counter() - t0, note=note)


def check_throughput(work: Path, s: Settings) -> list[Result]:
    if not THROUGHPUT.exists():
        return [Result("throughput", False, 0.0, note=f"{THROUGHPUT} not found: run from the repository")]
    out = work / "throughput.json"
    cmd = [sys.executable, str(THROUGHPUT), "--models", *s.throughput_models, "--steps", str(max(s.steps, 8)),
           "--warmup", "3", "--repeats", "1", "--batch", str(s.batch), "--seq-len", str(s.seq_len), "--json", str(out)]
    t0 = time.perf_counter()
    ok, note = _run(cmd, s.timeout * 2)
    seconds = time.perf_counter() - t0
    if not ok or not out.exists():
        return [Result("throughput", False, seconds, note=note)]
    results = []
    for row in json.loads(out.read_text()):
        ratios = f"llmcl/bare {row['llmcl_over_bare']:.2f}, llmcl/Trainer {row['llmcl_over_trainer']:.2f}"
        results.append(Result(f"throughput {row['model']}", True, seconds / len(s.throughput_models),
                              row["llmcl"], mfu(row["llmcl"], row.get("params"), s.peak_flops), None,
                              f"bare {row['bare']:,.0f} tok/s, Trainer {row['trainer']:,.0f} tok/s; {ratios}"))
    return results


def run_checks(s: Settings, only: tuple[str, ...] = CHECKS,
               report: Callable[[Result], None] = lambda r: None) -> list[Result]:
    from llmcl import methods
    from llmcl.data.builtin import write_text_corpus

    results: list[Result] = []

    def add(r: Result) -> None:
        results.append(r)
        report(r)

    with tempfile.TemporaryDirectory(prefix="llmcl-doctor-") as tmp:
        work = Path(tmp)
        data = write_text_corpus(work / "corpus.jsonl", repeat=4)  # packed: every step trains batch x seq_len tokens
        if "methods" in only:
            for name in sorted(methods.REGISTRY):
                add(check_method(name, work, data, s))
        for stage in (2, 3):
            if f"zero{stage}" in only:
                add(check_zero(stage, work, data, s))
        if "eval" in only:
            add(check_eval(work, s))
        if "throughput" in only:
            for r in check_throughput(work, s):
                add(r)
    return results


def _cell(value: Any, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def render(results: list[Result], header: str) -> str:
    """The report: one line per check, then how many passed."""
    lines = [header, f"{'check':<36} {'result':<6} {'seconds':>8} {'tokens/s':>10} {'MFU':>6} {'peak GPU MiB':>13}  note"]
    for r in results:
        lines.append(f"{r.check:<36} {'pass' if r.ok else 'FAIL':<6} {r.seconds:8.1f} {_cell(r.tokens_per_s, ',.0f'):>10} "
                     f"{_cell(r.mfu, '.1%'):>6} {_cell(r.peak_gpu_mib, ','):>13}  {r.note}")
    passed = sum(r.ok for r in results)
    lines.append(f"{passed}/{len(results)} checks passed")
    return "\n".join(lines)


def environment(cpu: bool) -> str:
    import torch

    if cpu:
        return f"llmcl doctor on the CPU (builtin:tiny; tests the check itself), torch {torch.__version__}"
    p = torch.cuda.get_device_properties(0)
    return (f"llmcl doctor on {p.name} ({p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}), "
            f"torch {torch.__version__}, CUDA {torch.version.cuda}, bf16 {torch.cuda.is_bf16_supported()}")


def main(cpu: bool = False, only: tuple[str, ...] = CHECKS, json_path: Path | None = None,
         echo: Callable[[str], None] = print) -> int:
    """Run the checks; returns the exit status (0 all passed or no CUDA, 1 a check failed)."""
    import torch

    if not cpu and not torch.cuda.is_available():
        echo("llmcl doctor: no CUDA device here; the self-check needs a GPU (`llmcl doctor --cpu` checks the check)")
        return 0
    s = cpu_settings() if cpu else gpu_settings()
    header = environment(cpu)
    echo(header)
    t0 = time.perf_counter()
    results = run_checks(s, only, report=lambda r: echo(f"  {r.check}: {'pass' if r.ok else 'FAIL'} "
                                                         f"({r.seconds:.0f}s) {r.note}"))
    echo("")
    echo(render(results, f"{header}; {time.perf_counter() - t0:.0f}s in all"))
    if json_path is not None:
        json_path.write_text(json.dumps({"environment": header, "results": [asdict(r) for r in results]}, indent=1))
    return 0 if all(r.ok for r in results) else 1
