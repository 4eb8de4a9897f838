"""ledger.json: which stages of a run are done, where their checkpoints are, and what they cost."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llmcl.errors import LlmclError
from llmcl.rundir.atomic import write_json
from llmcl.rundir.integrity import read_json, reading, verify
from llmcl.rundir.layout import LEDGER, MANIFEST, RECIPE


_RUN_WAY_OUT = "restore it from a backup, or train in a new --run-dir"


class Ledger:
    """ledger.json: the single source of truth for which stages are done."""

    def __init__(self, run_dir: Path, data: dict[str, Any]):
        self.run_dir = run_dir
        self.data = data

    @property
    def path(self) -> Path:
        return self.run_dir / LEDGER

    @classmethod
    def open(cls, run_dir: Path, recipe: Any, *, write: bool = True) -> "Ledger":
        """Open the run dir's ledger, creating the run dir (recipe.yaml first) if it is new.

        An existing run dir must have been made by the same recipe; what may differ (eval, logging, checkpoints,
        train.on_nonfinite, distributed.timeout_minutes: llmcl.recipe.comparable) takes the new values in
        recipe.yaml. A key the stored recipe lacks (written before llmcl had it) is its default, which keeps what
        llmcl did before the key existed."""
        import yaml

        from llmcl.recipe import comparable, dump, first_difference, with_defaults

        recipe_path = run_dir / RECIPE
        resolved = recipe.to_dict()
        if recipe_path.exists():
            with reading(recipe_path, _RUN_WAY_OUT):
                stored = yaml.safe_load(recipe_path.read_text(encoding="utf-8"))
                if not isinstance(stored, dict):
                    raise ValueError("not a recipe mapping")
            diff = first_difference(comparable(with_defaults(stored)), comparable(resolved))
            if diff is not None:
                raise LlmclError(f"run dir {run_dir} was made by a different recipe (first difference at "
                                 f"'{diff}'); use the same recipe and overrides, or a new --run-dir")
        if write and (not recipe_path.exists() or first_difference(stored, resolved) is not None):
            # new, or the keys that may change (eval, logging, checkpoints) changed: `llmcl eval` and `llmcl
            # report` read the latest run's
            run_dir.mkdir(parents=True, exist_ok=True)
            tmp = recipe_path.with_name(RECIPE + ".tmp")
            tmp.write_text(dump(recipe))
            os.replace(tmp, recipe_path)
        if (run_dir / LEDGER).exists():
            data = cls.read(run_dir, recipe).data
        else:
            data = {"version": 1, "recipe": recipe.name, "stages": [
                {"index": i, "name": s.name, "status": "pending"} for i, s in enumerate(recipe.stages)]}
        ledger = cls(run_dir, data)
        if write and not ledger.path.exists():
            ledger.save()
        return ledger

    @classmethod
    def read(cls, run_dir: Path, recipe: Any = None) -> "Ledger":
        """The run dir's ledger; with `recipe` (the run's), one whose stages are not the recipe's is damaged."""
        path = run_dir / LEDGER
        if not path.exists():
            raise LlmclError(f"{run_dir} is not an llmcl run directory (no {LEDGER})")
        with reading(path, _RUN_WAY_OUT):
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or not isinstance(data.get("stages"), list):
                raise ValueError("no 'stages' list")
            for i, entry in enumerate(data["stages"]):
                _check_entry(i, entry)
            names = [entry.get("name") for entry in data["stages"]]
            if recipe is not None and names != [s.name for s in recipe.stages]:
                raise ValueError(f"it lists the stages {names}, the run's recipe {[s.name for s in recipe.stages]}")
        return cls(run_dir, data)

    def save(self) -> None:
        write_json(self.path, self.data)

    def stage(self, index: int) -> dict[str, Any]:
        return self.data["stages"][index]

    def status(self, index: int) -> str:
        """pending, running or done ('pending' for a stage the ledger does not list)."""
        stages = self.data["stages"]
        return stages[index].get("status", "pending") if index < len(stages) else "pending"

    def is_done(self, index: int) -> bool:
        """Stage `index` and every stage before it are done (each later stage was trained from the earlier ones:
        deleting a stage's directory makes it and the stages after it train again)."""
        return all(self._done(j) for j in range(index + 1))

    def _done(self, index: int) -> bool:
        entry = self.stage(index)
        return entry.get("status") == "done" and (self.deleted(index)
                                                  or (self.run_dir / entry["checkpoint"] / MANIFEST).exists())

    def deleted(self, index: int) -> bool:
        """Whether finished stage `index`'s weights were deleted to save space (checkpoints.keep_stages): it stays
        done (the stages after it were trained from it), its row and stage.json stay, it cannot be loaded."""
        return bool(self.stage(index).get(WEIGHTS_DELETED))

    def done_stages(self) -> list[int]:
        return [i for i in range(len(self.data["stages"])) if self.is_done(i)]

    def recorded_done(self) -> list[int]:
        """The stages the ledger records as done, each after stages recorded done, whether or not their directories
        are still there: what was trained and evaluated (a report's rows; a run whose weights were deleted to save
        space, or archived without them, still reports). A stage being trained again ends the list."""
        done: list[int] = []
        for i in range(len(self.data["stages"])):
            if self.status(i) != "done":
                break
            done.append(i)
        return done

    def steps_before(self, index: int) -> int:
        """Optimizer steps of the stages before `index` (the global step axis continues across stages)."""
        return sum(self.stage(j).get("steps", 0) for j in range(index))

    def mark(self, index: int, status: str, **fields: Any) -> None:
        entry = self.stage(index)
        entry.pop(WEIGHTS_DELETED, None)  # a stage trained again has its weights again
        entry.update(fields)
        entry["status"] = status
        self.save()

    def stage_dir(self, index: int) -> Path:
        return self.run_dir / self.stage(index)["checkpoint"]

    def check_loadable(self, index: int) -> None:
        """Refuse, in one line, a finished stage whose weights were deleted (checkpoints.keep_stages)."""
        if self.deleted(index):
            entry = self.stage(index)
            raise LlmclError(f"stage {index} ({entry.get('name')}) of {self.run_dir} cannot be loaded: its weights were "
                             f"deleted at {entry[WEIGHTS_DELETED]} once its row was scored (checkpoints.keep_stages); "
                             "its row stays in the report; train again in a new --run-dir to get them back")

    def manifest(self, index: int) -> dict[str, Any]:
        """The manifest of finished stage `index`, after checking that the stage's files are those it wrote."""
        self.check_loadable(index)
        directory = self.stage_dir(index)
        way_out = stage_way_out(directory)
        manifest = read_json(directory / MANIFEST, way_out)
        if not isinstance(manifest, dict) or not isinstance(manifest.get("kind"), str):
            raise LlmclError(f"{directory / MANIFEST} is damaged (no checkpoint kind); {way_out}")
        if (why := _unlike_written(self.run_dir, manifest)) is not None:
            raise LlmclError(f"{directory / MANIFEST} is damaged ({why}); {way_out}")
        verify(directory, manifest.get("files"), way_out)
        for adapter in manifest.get("merged", []):  # earlier stages' adapters, checked against their own manifests
            self._verify_merged(adapter)
        return manifest

    def _verify_merged(self, adapter: str) -> None:
        """An earlier stage's adapter that a stage's model merges, against the files that stage recorded (when
        its manifest is there: a stage whose weights were deleted keeps the adapter, not its manifest)."""
        owner = self.run_dir / Path(adapter).parts[0]
        way_out = stage_way_out(owner)
        if not (owner / MANIFEST).is_file():  # its weights deleted: the adapter's files must at least parse
            from safetensors import safe_open

            weights = sorted((self.run_dir / adapter).glob("*.safetensors"))
            if not weights:
                raise LlmclError(f"{self.run_dir / adapter} has no adapter weights; {way_out}")
            for path in weights:
                with reading(path, way_out), safe_open(str(path), "pt"):
                    pass
            return
        recorded = read_json(owner / MANIFEST, way_out)
        files = recorded.get("files", {}) if isinstance(recorded, dict) else None
        if not isinstance(files, dict):
            raise LlmclError(f"{owner / MANIFEST} is damaged (its file records are not a mapping); {way_out}")
        inside = Path(adapter).relative_to(owner.name).as_posix() + "/"
        verify(owner, {rel: rec for rel, rec in files.items() if rel.startswith(inside)}, way_out)


STATUSES = ("pending", "running", "done")
WEIGHTS_DELETED = "weights_deleted"  # a done stage's entry: when its weights were deleted (llmcl.rundir.retention)


def _check_entry(i: int, entry: Any) -> None:
    """A ledger's stage entry as llmcl writes it, or ValueError (read() reports the ledger as damaged)."""
    if not isinstance(entry, dict) or entry.get("status") not in STATUSES:  # llmcl writes every stage's status
        raise ValueError(f"stage {i}'s status is not one of {', '.join(STATUSES)}")
    if entry.get("status") == "done" and not isinstance(entry.get("checkpoint"), str):
        raise ValueError(f"stage {i} is done but names no checkpoint directory")
    checkpoint = entry.get("checkpoint")
    if checkpoint is not None and (not isinstance(checkpoint, str) or len(Path(checkpoint).parts) != 1
                                   or checkpoint in (".", "..")):
        raise ValueError(f"stage {i}'s checkpoint {checkpoint!r} is not a directory of the run")


def _unlike_written(run_dir: Path, manifest: dict[str, Any]) -> str | None:
    """What makes a manifest unlike any llmcl writes, or None: its file records, and the model directories it
    names (its own, and the adapters it merges), each a directory inside the run directory."""
    files = manifest.get("files", {})  # none in a stage written before llmcl recorded them: nothing to check
    if not isinstance(files, dict) or not all(isinstance(r, dict) and isinstance(r.get("size"), int)
                                              and isinstance(r.get("sha256"), str) for r in files.values()):
        return "its file records are not sizes and sha256"
    merged = manifest.get("merged", [])
    if not isinstance(merged, list):
        return "'merged' is not a list"
    for where in [manifest.get("path"), *merged]:  # paths relative to the run directory
        if not isinstance(where, str) or Path(where).is_absolute() or ".." in Path(where).parts:
            return f"{where!r} is not a path inside the run directory"
        if not (run_dir / where).is_dir():
            return f"{run_dir / where} is not a directory"
    return None


def stage_way_out(directory: Path) -> str:
    return (f"restore it, or delete {directory} and rerun `llmcl train` (that stage and the ones after it train "
            "again)")
