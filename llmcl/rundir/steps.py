"""Step checkpoints (exact resume inside a stage) and optimizer state carried by parameter name across stages.

A step checkpoint holds only what is not a pure function of (seed, stage, step): the trainable parameters,
the optimizer state, the RNG state, the method state and the progress counters. Under DeepSpeed the parameters
and the optimizer are sharded over the ranks: every rank writes its shard with DeepSpeed's own checkpoint
(deepspeed/ inside the step checkpoint) and rank 0 writes the rest.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from llmcl.errors import LlmclError
from llmcl.rundir.integrity import fingerprint, read_json, reading, verify
from llmcl.rundir.atomic import load_tree, recover_dir, remove_dir, save_tree, swap_in, write_dir, write_json
from llmcl.rundir.layout import METHOD_STATE, STEP_DIR

STATE = "state.json"  # the step, the progress counters and the files of the step checkpoint, written last
DEEPSPEED = "deepspeed"  # inside a step checkpoint: DeepSpeed's own checkpoint of every rank's shard


def rng_state(rank: int) -> dict[str, torch.Tensor]:
    """This process's RNG state, keyed by its rank: every rank draws its own dropout masks (over batches of its
    own shapes), so a step checkpoint holds every rank's (llmcl.train.steps gathers them for rank 0)."""
    state = {f"cpu.{rank}": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state[f"cuda.{rank}"] = torch.cuda.get_rng_state()  # the current device's, the one this rank uses
    return state


def _write_common(tmp: Path, stage: int, step: int, method_state: dict[str, Any], progress: dict[str, Any],
                  rng: dict[str, torch.Tensor]) -> None:
    save_file(rng, str(tmp / "rng.safetensors"))
    save_tree(method_state, tmp, METHOD_STATE)
    files = fingerprint(tmp)  # everything but state.json itself, checked before a resume trusts it
    write_json(tmp / STATE, {"stage": stage, "step": step, **progress, "files": files})


def save_step(run_dir: Path, *, stage: int, step: int, params: dict[str, torch.Tensor], optimizer_state: dict,
              method_state: dict[str, Any], progress: dict[str, Any], rng: dict[str, torch.Tensor]) -> None:
    """Everything needed to continue stage `stage` after optimizer step `step` bit for bit (`rng`: every rank's
    rng_state)."""

    def write(tmp: Path) -> None:
        save_file({k: v.detach().contiguous().cpu() for k, v in params.items()}, str(tmp / "trainable.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        _write_common(tmp, stage, step, method_state, progress, rng)

    write_dir(run_dir / STEP_DIR, write)


def save_step_sharded(run_dir: Path, *, stage: int, step: int, save_shards: Callable[[Path], None], main: bool,
                      barrier: Callable[[], None], method_state: Callable[[], dict[str, Any]],
                      progress: dict[str, Any], rng: dict[str, torch.Tensor]) -> None:
    """The same under DeepSpeed: every rank calls this; `save_shards(dir)` writes this rank's shard."""
    tmp = run_dir / (STEP_DIR + ".tmp")
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    save_shards(tmp / DEEPSPEED)
    barrier()
    if main:
        _write_common(tmp, stage, step, method_state(), progress, rng)
        swap_in(tmp, run_dir / STEP_DIR)
    barrier()


def load_step(run_dir: Path, stage: int, steps: int) -> dict[str, Any] | None:
    """The step checkpoint of `stage` (of `steps` optimizer steps), or None (a checkpoint of another stage is
    stale and ignored)."""
    directory = recover_dir(run_dir / STEP_DIR)
    if directory is None:
        return None
    way_out = step_way_out(run_dir)
    state = read_json(directory / STATE, way_out)
    if not isinstance(state, dict) or "stage" not in state:
        raise LlmclError(f"{directory / STATE} is damaged (no stage); {way_out}")
    if state["stage"] != stage:
        return None
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= steps:
        raise LlmclError(f"{directory / STATE} is damaged (step {step!r} of a stage of {steps} steps); {way_out}")
    verify(directory, state.get("files"), way_out)
    with reading(directory, way_out):
        common = {"state": state, "rng": load_file(str(directory / "rng.safetensors")),
                  "method_state": load_tree(directory, METHOD_STATE)}
        if (directory / DEEPSPEED).is_dir():  # DeepSpeed shards: loaded by the engine (llmcl.train.distributed)
            return {**common, "deepspeed": directory / DEEPSPEED}
        return {
            **common,
            "params": load_file(str(directory / "trainable.safetensors")),
            # written by this run; weights_only refuses anything but tensors and plain containers
            "optimizer": torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True),
        }


def step_way_out(run_dir: Path) -> str:
    return f"delete {Path(run_dir) / STEP_DIR} to restart the stage from its first step"


def restore_rng(rng: dict[str, torch.Tensor], rank: int) -> None:
    """Give this rank the RNG state it had when the step checkpoint was written."""
    if f"cpu.{rank}" not in rng:  # written before every rank's state was kept: rank 0's CPU state, every device's
        torch.set_rng_state(rng["cpu"])
        cuda = [rng[k] for k in sorted((k for k in rng if k.startswith("cuda")), key=lambda k: int(k[4:]))]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
        return
    torch.set_rng_state(rng[f"cpu.{rank}"])
    if f"cuda.{rank}" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng[f"cuda.{rank}"])


def clear_step(run_dir: Path) -> None:
    remove_dir(run_dir / STEP_DIR)


def save_optimizer_by_name(optimizer: Any, named: list, path: Path) -> None:
    """The AdamW moments of every trainable parameter, keyed by parameter name (stages may differ in which
    parameters train, so positions would not line up)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    by_id = {id(p): n for n, p in named}
    state = {by_id[id(p)]: {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in s.items()}
             for p, s in inner.state.items() if id(p) in by_id}
    torch.save(state, path)


def load_optimizer_by_name(optimizer: Any, named: list, path: Path, device: Any) -> int:
    """Restore saved moments into the parameters with the same name and shape; returns how many were restored."""
    if not path.exists():
        raise LlmclError(f"train.optimizer_state=keep, but the previous stage saved no optimizer state ({path}); "
                         "it was trained before this setting was chosen")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    restored = 0
    for n, p in named:
        s = saved.get(n)
        if s is None or s.get("exp_avg") is None or s["exp_avg"].shape != p.shape:
            continue
        optimizer.state[p] = {k: (v.to(device) if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in s.items()}
        restored += 1
    return restored
