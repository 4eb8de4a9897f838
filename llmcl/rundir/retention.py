"""checkpoints.keep_stages: deleting the weights of finished stages older than the last N.

A stage's weights are deleted when it is done, it is not among the last N done stages, and nothing needs it
any more (`needed(i)`: its evaluation row is not written yet). What goes: everything in its directory except
stage.json and the files a stage that keeps its weights still loads (a PEFT stage's manifest lists the earlier
adapters merged below it).
The ledger records the deletion first (`weights_deleted`), then the files go: a kill in between leaves a stage
that is done and marked deleted, whose leftovers the next pass removes, never a done stage without weights that
the ledger does not know about (which would make it, and every stage after it, train again).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

from llmcl.rundir.atomic import now
from llmcl.rundir.layout import CONTINUE, MANIFEST, STAGE_INFO, stage_dir_name
from llmcl.rundir.ledger import WEIGHTS_DELETED, Ledger

KEPT = (STAGE_INFO,)  # what a deleted stage's directory keeps: its data statistics and settings


def delete_old_weights(ledger: Ledger, keep: int | None, needed: Callable[[int], bool]) -> list[int]:
    """Mark and delete the weights of the done stages before the last `keep` that nothing `needed` any more;
    returns the stages newly marked. Rank 0 alone calls this; the other ranks of a launch read the ledger after."""
    if keep is None:
        return []
    done = ledger.done_stages()
    old = done[:-keep] if len(done) > keep else []
    newly = [i for i in old if not ledger.deleted(i) and not needed(i) and _own_directory(ledger, i)]
    still_loaded = _referenced(ledger, [i for i in done if not ledger.deleted(i) and i not in newly])
    if still_loaded is None:  # a kept stage's manifest is unreadable: what it loads is unknown, nothing goes
        return []
    for i in newly:
        ledger.stage(i)[WEIGHTS_DELETED] = now()
    if newly:
        ledger.save()  # first: a kill during the deletion leaves the stage marked, not a done stage without weights
    for i in done:
        if ledger.deleted(i) and _own_directory(ledger, i):  # again for earlier ones: what a kill mid-deletion left
            _remove_except(ledger.stage_dir(i), ledger.run_dir, still_loaded, top=True)
    return newly


def _own_directory(ledger: Ledger, index: int) -> bool:
    """Whether stage `index`'s checkpoint directory is the one llmcl names it, a real directory in the run
    directory: a hand-edited ledger (`..`, another run's path) or a symlink is never deleted from."""
    entry = ledger.stage(index)
    directory = ledger.stage_dir(index)
    return entry.get("checkpoint") == stage_dir_name(index, entry.get("name", "")) and directory.is_dir() \
        and not directory.is_symlink()


def _referenced(ledger: Ledger, stages: list[int]) -> set[Path] | None:
    """Every path (relative to the run directory) the manifests of `stages` load from; None when one of them
    cannot be read."""
    paths: set[Path] = set()

    def add(manifest: dict[str, Any]) -> None:
        for p in [manifest.get("path"), *manifest.get("merged", [])]:
            if isinstance(p, str):
                paths.add(Path(p))
        if isinstance(manifest.get(CONTINUE), dict):
            add(manifest[CONTINUE])

    for i in stages:
        path = ledger.stage_dir(i) / MANIFEST
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(manifest, dict):
            return None
        add(manifest)
    return paths


def _remove_except(path: Path, run_dir: Path, kept: set[Path], *, top: bool = False) -> None:
    """Delete `path` (a file or a directory tree) except the files under `kept` paths and, in a stage directory
    (`top`), KEPT."""
    if not path.exists() and not path.is_symlink():
        return
    rel = path.relative_to(run_dir)
    if rel in kept:
        return
    if path.is_dir() and not path.is_symlink() and (top or any(k.is_relative_to(rel) for k in kept)):
        for child in sorted(path.iterdir()):
            if top and child.name in KEPT:
                continue
            _remove_except(child, run_dir, kept)
        return
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
