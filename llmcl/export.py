"""`llmcl export`: one finished stage as a directory that plain transformers loads, with a model card.

What each artifact kind becomes (the stage is loaded by its manifest, exactly as `llmcl eval` loads it):
  full  (seqft, hft, osft)  the model as safetensors shards, with the tokenizer and generation config
  peft  (lora, ilora)       merged: the adapter (I-LoRA: the learner the stage evaluated) merged into the weights
                            of the base model, after any adapters earlier stages merged; --no-merge: the PEFT
                            adapter itself, over the recipe's base model
  mora                      refused: its rank-1 experts are chosen per token from the input, so no weight matrix
                            holds the stage's update, and no layer outside llmcl runs them
The directory is written beside --to and renamed into place when complete; --push-to-hub checks the hub before
anything is written.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from llmcl.errors import LlmclError

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
NOT_EXPORTABLE = {
    "mora": "MoRA selects its rank-1 experts per token from the input, so its update is no weight matrix to merge "
            "and plain transformers has no layer that runs it; score it with `llmcl eval`, or train lora/ilora for "
            "a stage that exports",
}


@dataclass
class Exported:
    directory: Path
    stage: int
    stage_name: str
    written_as: str  # "full model" | "merged model" | "PEFT adapter"
    dtype: str
    pushed_to: str | None = None


def resolve_stage(ledger: Any, stage: str) -> int:
    """--stage: 'last' (the last finished stage) or the index of a finished stage."""
    done = ledger.done_stages()
    if not done:
        raise LlmclError(f"{ledger.run_dir} has no finished stage to export{_missing(ledger)}")
    if stage == "last":
        if missing := _missing(ledger):  # a stage the run finished is gone: "last" is not done[-1]
            loadable = [i for i in done if not ledger.deleted(i)]
            raise LlmclError(f"--stage last: a stage the run finished is not there{missing}"
                             + (f"; or export stage {loadable[-1]} with --stage {loadable[-1]}" if loadable else ""))
        return done[-1]
    if stage.isdigit() and int(stage) in done:
        return int(stage)
    raise LlmclError(f"--stage {stage}: expected 'last' or a finished stage of {ledger.run_dir} ({done})"
                     f"{_missing(ledger)}")


def _missing(ledger: Any) -> str:
    """Why a stage the ledger calls done is not: its directory is gone."""
    from llmcl.rundir import MANIFEST

    for i, entry in enumerate(ledger.data["stages"]):
        if entry.get("status") == "done" and not ledger.deleted(i) \
                and not (ledger.run_dir / entry["checkpoint"] / MANIFEST).exists():
            again = ("" if i > 0 and ledger.deleted(i - 1) else  # it would train from deleted weights: no rerun
                     ", or rerun `llmcl train` to train it and the stages after it again")
            return f"; stage {i}'s directory {entry['checkpoint']} is missing (restore it{again})"
    return ""


def check_hub(repo: str) -> None:
    """Before anything is written: the hub is reachable, the repo id is valid and there is a token."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise LlmclError(f"--push-to-hub {repo}: the hub is offline (HF_HUB_OFFLINE={os.environ['HF_HUB_OFFLINE']}, "
                         "llmcl's default); run with HF_HUB_OFFLINE=0 after `hf auth login`")
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as exc:
        raise LlmclError(f"--push-to-hub {repo}: not a hub repo id (expected user/name): {exc}") from None
    try:
        HfApi().whoami()
    except Exception as exc:  # noqa: BLE001  (no token, no network, a proxy: all one line)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LlmclError(f"--push-to-hub {repo}: cannot use the hub ({first}); check the network and "
                         "`hf auth login`") from None


def push(directory: Path, repo: str) -> None:
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(folder_path=str(directory), repo_id=repo, commit_message="llmcl export")
    except Exception as exc:  # noqa: BLE001
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LlmclError(f"--push-to-hub {repo}: the upload failed ({first}); the export in {directory} is complete: "
                         f"push it again with `hf upload {repo} {directory}`") from None


def export_stage(run_dir: Path, to: Path, *, stage: str = "last", merge: bool = True, dtype: str = "auto",
                 push_to_hub: str | None = None, echo: Callable[[str], None] = lambda _: None) -> Exported:
    """Write finished stage `stage` of `run_dir` to `to` (a new directory) and, with `push_to_hub`, upload it."""
    import torch

    from llmcl.eval.scoring import cast, eval_dtype, load_run_recipe
    from llmcl.models import torch_dtype
    from llmcl.rundir import Ledger, artifacts
    from llmcl.rundir.atomic import write_dir

    run_dir, to = Path(run_dir), Path(to)
    recipe = load_run_recipe(run_dir, data_files=False)
    ledger = Ledger.read(run_dir, recipe)
    index = resolve_stage(ledger, stage)
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise LlmclError(f"--to {to}: exists and is not an empty directory; choose a new one")
    blocking = next((p for p in to.parents if p.exists() or p.is_symlink()), None)
    if blocking is not None and not blocking.is_dir():
        raise LlmclError(f"--to {to}: {blocking} is not a directory; choose another path")
    if dtype != "auto" and dtype not in DTYPES:
        raise LlmclError(f"--dtype {dtype}: expected auto, {', '.join(DTYPES)}")
    manifest = ledger.manifest(index)  # the stage's files checked against what it wrote
    kind = manifest["kind"]
    if kind in NOT_EXPORTABLE:
        raise LlmclError(f"stage {index} of {run_dir} ({manifest.get('method', kind)}) cannot be exported: "
                         f"{NOT_EXPORTABLE[kind]}")
    if kind not in ("full", "peft"):
        raise LlmclError(f"stage {index} of {run_dir}: checkpoint kind {kind!r} has no export")
    if kind == "peft" and not merge and manifest.get("merged"):
        raise LlmclError(f"--no-merge: stage {index}'s adapter sits on the base model after merging the adapters of "
                         "earlier stages, which no adapter file can carry; export it merged (the default)")
    if push_to_hub:
        check_hub(push_to_hub)
    target = torch_dtype(DTYPES[dtype]) if dtype != "auto" else eval_dtype(recipe)
    dtype_name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[target]

    echo(f"loading stage {index} ({recipe.stages[index].name}) of {run_dir} ...")
    with _quiet():
        model = artifacts.load(run_dir, manifest, recipe.model, recipe.seed, trainable=False)
    if kind == "peft":
        if merge:
            with _quiet():
                model = model.merge_and_unload()
            written_as = "merged model"
        else:
            written_as = "PEFT adapter"
            from llmcl.model_card import hub_id

            for cfg in model.peft_config.values():
                cfg.base_model_name_or_path = hub_id(recipe.model.path) or recipe.model.path
    else:
        written_as = "full model"
    model = cast(model, target)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run_dir / manifest["path"])  # the tokenizer the stage saved
    card = _card(run_dir, recipe, ledger, index, {"as": written_as, "dtype": dtype_name})

    def write(tmp: Path) -> None:
        with _quiet():
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(card, encoding="utf-8")

    echo(f"writing {to} ...")
    to.parent.mkdir(parents=True, exist_ok=True)
    write_dir(to, write)
    out = Exported(to, index, recipe.stages[index].name, written_as, dtype_name)
    if push_to_hub:
        echo(f"pushing {to} to {push_to_hub} ...")
        push(to, push_to_hub)
        out.pushed_to = push_to_hub
    return out


@contextlib.contextmanager
def _quiet():
    """Library warnings that say nothing to the user of an export: transformers' deprecations inside PEFT, and PEFT
    looking for the base model's config (to see whether its vocabulary changed) where the base is llmcl's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message="Could not find a config file")
        yield


def _card(run_dir: Path, recipe: Any, ledger: Any, index: int, export: dict[str, Any]) -> str:
    from llmcl import model_card
    from llmcl.eval import render
    from llmcl.eval.scoring import written_rows
    from llmcl.rundir import RECIPE, REPORT

    matrix = None
    if (run_dir / REPORT / "matrix.json").exists():
        matrix = render.read_matrix(run_dir)
    elif written_rows(run_dir):
        render.run_report([run_dir])  # as `llmcl report` writes it
        matrix = render.read_matrix(run_dir)
    stages = []
    for i, s in enumerate(recipe.stages):
        entry = ledger.stage(i) if i < len(ledger.data["stages"]) else {}
        stages.append({"name": s.name, "data": s.data.path, "steps": entry.get("steps", "—"),
                       "status": ledger.status(i)})
    text = (run_dir / RECIPE).read_text(encoding="utf-8")
    return model_card.render(recipe=yaml.safe_load(text), recipe_text=text, stage=index, stages=stages,
                             method=recipe.method.name, export=export, matrix=matrix)
