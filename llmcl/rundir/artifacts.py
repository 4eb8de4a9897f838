"""Stage artifacts: the model a finished stage saved, written and loaded by manifest kind.

A stage directory's manifest.json says how to rebuild its model without knowing which method wrote it:
  {"kind": "full", "path": "stage-00-a/model"}                       a complete HF model directory
  {"kind": "peft", "path": "stage-01-b/adapter", "merged": [...]}    a PEFT adapter over the recipe's base
                                                                     model, after merging `merged` adapters
  {"kind": "mora", "path": "stage-02-c/mora"}                        MoRA expert banks (llmcl.layers.mora)
plus "stage", "method", "base_model", "seed" and, when an infinite schedule branched before its anneal,
"continue" (the branch's own manifest). Paths are relative to the run directory.

Each kind has a writer (a method's `save` calls it; it returns the manifest with "path" relative to the
directory it wrote into) and a loader registered with `@loader(kind)` next to the writer: "full" and "peft"
here, layer types of llmcl.layers in their own modules. `write_stage` lays out the stage directory atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from llmcl.errors import LlmclError
from llmcl.rundir.atomic import save_tree, write_dir, write_json
from llmcl.rundir.integrity import fingerprint
from llmcl.rundir.layout import (CONTINUE, MANIFEST, METHOD_STATE, OPTIMIZER, STAGE_INFO, branch_dir_name,
                                 stage_dir_name)

Loader = Callable[..., Any]
LOADERS: dict[str, Loader] = {}


def loader(kind: str) -> Callable[[Loader], Loader]:
    """Register fn(run_dir, manifest, model_cfg, seed, trainable) -> model as the loader of `kind`."""

    def register(fn: Loader) -> Loader:
        if kind in LOADERS and LOADERS[kind] is not fn:
            raise ValueError(f"artifact kind {kind!r} already has a loader ({LOADERS[kind].__module__})")
        LOADERS[kind] = fn
        return fn

    return register


def load(run_dir: Path, manifest: dict[str, Any], model_cfg: Any, seed: int, *, trainable: bool):
    """Rebuild the model a finished stage saved, from its manifest (no method code involved)."""
    import llmcl.layers  # noqa: F401  (registers the loaders of llmcl's own layer types)

    kind = manifest["kind"]
    if kind not in LOADERS:
        raise LlmclError(f"unknown checkpoint kind {kind!r} in {run_dir}; was it written by a newer llmcl?")
    from llmcl.models import whole

    with whole():  # the stage's files were checked against its manifest (Ledger.manifest) before this
        model = LOADERS[kind](run_dir, manifest, model_cfg, seed, trainable)
    if not trainable:
        model.eval()
    return model


# -- the base model ----------------------------------------------------------------------------------

BASE_MODEL = "base_model"  # the ledger's record of a local model.path's files, from the run's first stage


def check_base(ledger: Any, path: str, *, record: bool = False) -> None:
    """A local model.path is what the run started from, or one line: its LoRA/MoRA stages are deltas over it
    (loaded over whatever the directory holds now) and its base row scores it. `record`: the first stage has
    just loaded it and nothing trained from it is kept (rank 0): the record is made (again). A run from before
    llmcl recorded it has none to check."""
    from llmcl.rundir.integrity import model_difference, model_record

    directory = Path(path)
    if path.startswith("builtin:") or not directory.is_dir():
        return
    if record:
        ledger.data[BASE_MODEL] = {"path": path, "files": model_record(directory)}
        ledger.save()
        return
    recorded = ledger.data.get(BASE_MODEL)
    if recorded is None or recorded.get("path") != path:
        return
    diff = model_difference(directory, recorded["files"])
    if diff is not None:
        raise LlmclError(f"model.path={path!r} changed since this run started ({diff}): its stages were trained from "
                         "the original; put it back, or train again in a new run directory (--run-dir)")


def load_base(run_dir: Path, model_cfg: Any, seed: int) -> Any:
    """The run's base model, its directory checked against the run's record first (check_base)."""
    from llmcl.models import load_base_model
    from llmcl.rundir.layout import LEDGER
    from llmcl.rundir.ledger import Ledger

    if (Path(run_dir) / LEDGER).exists():  # (a directory scored without being trained has nothing recorded)
        check_base(Ledger.read(run_dir), model_cfg.path)
    return load_base_model(model_cfg, seed)


# -- full models -------------------------------------------------------------------------------------

def save_full(model: Any, out_dir: Path, state_dict: dict | None = None) -> dict[str, Any]:
    model.save_pretrained(out_dir / "model", state_dict=state_dict, safe_serialization=True)
    return {"kind": "full", "path": "model"}


@loader("full")
def _load_full(run_dir: Path, manifest: dict[str, Any], model_cfg: Any, seed: int, trainable: bool):
    from transformers import AutoModelForCausalLM

    from llmcl.models import contiguous_head, torch_dtype

    return contiguous_head(AutoModelForCausalLM.from_pretrained(
        run_dir / manifest["path"], dtype=torch_dtype(model_cfg.dtype), trust_remote_code=model_cfg.trust_remote_code))


# -- PEFT adapters -----------------------------------------------------------------------------------

def save_peft(model: Any, out_dir: Path, merged: list[str], *, adapter: str | None = None,
              state_dict: dict | None = None) -> dict[str, Any]:
    """The PEFT adapter (`adapter`, default: all) over the base model after the `merged` adapters."""
    kwargs = {"selected_adapters": [adapter]} if adapter else {}
    model.save_pretrained(out_dir / "adapter", state_dict=state_dict, safe_serialization=True, **kwargs)
    path = "adapter" if adapter in (None, "default") else f"adapter/{adapter}"  # PEFT's layout
    return {"kind": "peft", "path": path, "merged": merged}


@loader("peft")
def _load_peft(run_dir: Path, manifest: dict[str, Any], model_cfg: Any, seed: int, trainable: bool):
    from peft import PeftModel

    model = load_base(run_dir, model_cfg, seed)
    for adapter in manifest.get("merged", []):
        model = PeftModel.from_pretrained(model, run_dir / adapter).merge_and_unload()
    return PeftModel.from_pretrained(model, run_dir / manifest["path"], is_trainable=trainable)


# -- the stage directory -----------------------------------------------------------------------------

def write_stage(run_dir: Path, index: int, name: str, *, artifact: Callable[[Path], dict[str, Any]], tokenizer: Any,
                method_state: dict[str, Any], save_optimizer: Callable[[Path], None] | None = None,
                stage_info: dict[str, Any] | None = None, manifest_extra: dict[str, Any] | None = None,
                branch: bool = False) -> str:
    """Write stage `index` (or, with `branch`, its pre-anneal branch) atomically; returns the stage dir name.

    `artifact(dir)` writes the model and returns its manifest. A branch waits beside the stage directory and
    moves into it (as continue/) when the stage itself is written."""
    dirname = stage_dir_name(index, name)
    pending = run_dir / branch_dir_name(index, name)
    prefix = f"{dirname}/{CONTINUE}" if branch else dirname

    def write(tmp: Path) -> None:
        manifest = artifact(tmp)
        tokenizer.save_pretrained(tmp / manifest["path"])
        save_tree(method_state, tmp, METHOD_STATE)
        if save_optimizer is not None:
            save_optimizer(tmp / OPTIMIZER)
        manifest["path"] = f"{prefix}/{manifest['path']}"
        moved = False
        try:
            if not branch:
                manifest.update(manifest_extra or {})
                if pending.exists():  # the pre-anneal weights the next stage continues from
                    os.replace(pending, tmp / CONTINUE)
                    moved = True
                    manifest[CONTINUE] = json.loads((tmp / CONTINUE / MANIFEST).read_text())
                write_json(tmp / STAGE_INFO, stage_info or {})
            manifest["files"] = fingerprint(tmp, skip=(MANIFEST,))  # checked before the stage is loaded
            write_json(tmp / MANIFEST, manifest)
        except BaseException:
            if moved:  # a failed write (a full disk) must not take the branch with it: it goes back (a rename)
                os.replace(tmp / CONTINUE, pending)
            raise

    write_dir(pending if branch else run_dir / dirname, write)
    return dirname


def has_branch(run_dir: Path, index: int, name: str) -> bool:
    return (run_dir / branch_dir_name(index, name)).exists()


def stage_origin(ledger: Any, index: int) -> tuple[dict[str, Any], Path | None]:
    """(manifest, directory) stage `index` starts from: the base model for stage 0; else the previous stage's
    checkpoint, or the pre-anneal branch it saved (whose directory then holds the method state to continue)."""
    if index == 0:
        return {"kind": "base"}, None
    if ledger.deleted(index - 1):  # what trains again here cannot: say why it trains again
        entry = ledger.stage(index)
        why = (f"its directory {ledger.run_dir / entry['checkpoint']} is missing" if entry.get("status") == "done"
               else "it is not done")
        raise LlmclError(f"stage {index} ({entry.get('name')}) must train ({why}) from stage {index - 1}, whose "
                         "weights were deleted (checkpoints.keep_stages); restore that directory from a backup, or "
                         "train again in a new --run-dir")
    manifest = ledger.manifest(index - 1)
    directory = ledger.run_dir / ledger.stage(index - 1)["checkpoint"]
    if CONTINUE in manifest:
        return manifest[CONTINUE], directory / CONTINUE
    return manifest, directory
