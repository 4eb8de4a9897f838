"""Atomic saves, the run ledger, finished-stage directories and step checkpoints for exact resume.

Run directory:
    recipe.yaml              the resolved recipe, written first
    ledger.json              stage -> status, checkpoint dir, steps, tokens, wall seconds, parameter counts
    stage-00-<name>/         manifest.json, the model (model/ or adapter/), method_state.*, stage.json
    step-checkpoint/         the latest step checkpoint of the stage in progress (deleted when it finishes)

Every directory is written under a temporary name and renamed into place, and the ledger is replaced
atomically after the stage directory is complete: a kill at any moment leaves either the old state or
the new one, never a stage marked done with a broken checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from llmcl.errors import LlmclError
from llmcl.recipe import Recipe, comparable, dump, first_difference

STEP_DIR = "step-checkpoint"


# -- atomic primitives -----------------------------------------------------------------------------

def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_dir(final: Path, write: Callable[[Path], None]) -> None:
    """Fill a temporary directory with `write`, then swap it in for `final`."""
    tmp = final.with_name(final.name + ".tmp")
    old = final.with_name(final.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(final: Path) -> Path | None:
    """The directory after an interrupted `write_dir` (the old copy if the swap was cut short)."""
    old = final.with_name(final.name + ".old")
    if not final.exists() and old.exists():
        os.replace(old, final)
    shutil.rmtree(final.with_name(final.name + ".tmp"), ignore_errors=True)
    return final if final.exists() else None


# -- tensor trees (method state) without pickle ------------------------------------------------------

def save_tree(tree: dict[str, Any], directory: Path, stem: str) -> None:
    """Split a nested dict into tensors (safetensors) and everything else (JSON)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[path] = node.detach().contiguous().cpu()
            return {"__tensor__": path}
        if isinstance(node, dict):
            return {str(k): walk(v, f"{path}/{k}") for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(node)]
        return node

    skeleton = walk(tree, "")
    write_json(directory / f"{stem}.json", skeleton)
    if tensors:
        save_file(tensors, str(directory / f"{stem}.safetensors"))


def load_tree(directory: Path, stem: str) -> dict[str, Any]:
    meta = directory / f"{stem}.json"
    if not meta.exists():
        return {}
    skeleton = json.loads(meta.read_text())
    st = directory / f"{stem}.safetensors"
    tensors = load_file(str(st)) if st.exists() else {}

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if set(node) == {"__tensor__"}:
                return tensors[node["__tensor__"]]
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(skeleton)


# -- the ledger ------------------------------------------------------------------------------------

class Ledger:
    """ledger.json: the single source of truth for which stages are done."""

    def __init__(self, run_dir: Path, data: dict[str, Any]):
        self.run_dir = run_dir
        self.data = data

    @property
    def path(self) -> Path:
        return self.run_dir / "ledger.json"

    @classmethod
    def open(cls, run_dir: Path, recipe: Recipe, *, write: bool = True) -> "Ledger":
        """Open the run dir's ledger, creating the run dir (recipe.yaml first) if it is new.

        An existing run dir must have been made by the same recipe (logging/eval may differ)."""
        import yaml

        recipe_path = run_dir / "recipe.yaml"
        resolved = recipe.to_dict()
        if recipe_path.exists():
            stored = yaml.safe_load(recipe_path.read_text())
            diff = first_difference(comparable(stored), comparable(resolved))
            if diff is not None:
                raise LlmclError(f"run dir {run_dir} was made by a different recipe (first difference at "
                                 f"'{diff}'); use the same recipe and overrides, or a new --run-dir")
        elif write:
            run_dir.mkdir(parents=True, exist_ok=True)
            tmp = recipe_path.with_name("recipe.yaml.tmp")
            tmp.write_text(dump(recipe))
            os.replace(tmp, recipe_path)
        if (run_dir / "ledger.json").exists():
            data = json.loads((run_dir / "ledger.json").read_text())
        else:
            data = {"version": 1, "recipe": recipe.name, "stages": [
                {"index": i, "name": s.name, "status": "pending"} for i, s in enumerate(recipe.stages)]}
        ledger = cls(run_dir, data)
        if write and not ledger.path.exists():
            ledger.save()
        return ledger

    @classmethod
    def read(cls, run_dir: Path) -> "Ledger":
        path = run_dir / "ledger.json"
        if not path.exists():
            raise LlmclError(f"{run_dir} is not an llmcl run directory (no ledger.json)")
        return cls(run_dir, json.loads(path.read_text()))

    def save(self) -> None:
        write_json(self.path, self.data)

    def stage(self, index: int) -> dict[str, Any]:
        return self.data["stages"][index]

    def is_done(self, index: int) -> bool:
        entry = self.stage(index)
        return entry["status"] == "done" and (self.run_dir / entry["checkpoint"] / "manifest.json").exists()

    def done_stages(self) -> list[int]:
        return [i for i in range(len(self.data["stages"])) if self.is_done(i)]

    def mark(self, index: int, status: str, **fields: Any) -> None:
        entry = self.stage(index)
        entry.update(fields)
        entry["status"] = status
        self.save()

    def manifest(self, index: int) -> dict[str, Any]:
        return json.loads((self.run_dir / self.stage(index)["checkpoint"] / "manifest.json").read_text())


def stage_dir_name(index: int, name: str) -> str:
    return f"stage-{index:02d}-{name}"


# -- step checkpoints --------------------------------------------------------------------------------

def save_step(run_dir: Path, *, stage: int, step: int, params: dict[str, torch.Tensor], optimizer_state: dict,
              method_state: dict[str, Any], progress: dict[str, Any]) -> None:
    """Everything needed to continue stage `stage` after optimizer step `step` bit for bit."""

    def write(tmp: Path) -> None:
        save_file({k: v.detach().contiguous().cpu() for k, v in params.items()}, str(tmp / "trainable.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, str(tmp / "rng.safetensors"))
        save_tree(method_state, tmp, "method_state")
        write_json(tmp / "state.json", {"stage": stage, "step": step, **progress})

    write_dir(run_dir / STEP_DIR, write)


def load_step(run_dir: Path, stage: int) -> dict[str, Any] | None:
    """The step checkpoint of `stage`, or None (a checkpoint of another stage is stale and ignored)."""
    directory = recover_dir(run_dir / STEP_DIR)
    if directory is None:
        return None
    state = json.loads((directory / "state.json").read_text())
    if state["stage"] != stage:
        return None
    return {
        "state": state,
        "params": load_file(str(directory / "trainable.safetensors")),
        # written by this run; weights_only refuses anything but tensors and plain containers
        "optimizer": torch.load(directory / "optimizer.pt", weights_only=True),
        "rng": load_file(str(directory / "rng.safetensors")),
        "method_state": load_tree(directory, "method_state"),
    }


def restore_rng(rng: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(rng["cpu"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def clear_step(run_dir: Path) -> None:
    for suffix in ("", ".tmp", ".old"):
        shutil.rmtree(run_dir / (STEP_DIR + suffix), ignore_errors=True)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# -- optimizer state carried across stages (train.optimizer_state: keep) -----------------------------

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
    saved = torch.load(path, weights_only=True)
    restored = 0
    for n, p in named:
        s = saved.get(n)
        if s is None or s.get("exp_avg") is None or s["exp_avg"].shape != p.shape:
            continue
        optimizer.state[p] = {k: (v.to(device) if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in s.items()}
        restored += 1
    return restored
