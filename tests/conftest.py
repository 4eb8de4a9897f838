"""Shared fixtures: offline environment, a tiny-model recipe, in-process CLI runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

REPO = Path(__file__).resolve().parents[1]


def _shared_data() -> Path:
    """../shared/data next to the checkout (or $LLMCL_SHARED_DATA, or the workplace copy)."""
    for candidate in (os.environ.get("LLMCL_SHARED_DATA"), REPO.parent / "shared" / "data", "/work/shared/data"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return REPO.parent / "shared" / "data"


SHARED_DATA = _shared_data()


def chdir_beside_shared_data(tmp_path: Path, monkeypatch) -> None:
    """Recipes read ../shared/data relative to the working directory: give them one wherever the data lives."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not available here")
    (tmp_path / "repo").mkdir()
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(SHARED_DATA)
    monkeypatch.chdir(tmp_path / "repo")


def write_recipe(path: Path, **changes) -> Path:
    """A 2-stage recipe on builtin:tiny that trains in about a second per stage."""
    recipe = {
        "name": "tiny",
        "seed": 0,
        "model": {"path": "builtin:tiny"},
        "method": {"name": "seqft"},
        "train": {"lr": 1e-3, "max_steps": 4, "batch_size": 4, "seq_len": 48, "warmup": 1},
        "stages": [{"data": {"path": "builtin:facts"}}, {"data": {"path": "builtin:reverse"}}],
        "eval": {"after_each_stage": False},  # training tests; tests/test_eval.py turns it on
    }
    set_keys(recipe, changes)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def set_keys(recipe: dict, changes: dict) -> dict:
    """Set `a__b__0__c=value` style keys (list indices as numbers) in a recipe dict, in place."""
    for key, value in changes.items():
        node = recipe
        parts = key.split("__")
        for p in parts[:-1]:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        node[parts[-1]] = value
    return recipe


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Path:
    return write_recipe(tmp_path / "tiny.yaml")


@pytest.fixture(autouse=True)
def _reset_accelerate():
    yield
    from llmcl.train.distributed import reset_accelerate

    reset_accelerate()


def untimed(tree):
    """A method state without wall-clock measurements (OSFT records its SVD seconds), which no two runs share."""
    if isinstance(tree, dict):
        return {k: untimed(v) for k, v in tree.items() if not k.endswith("_seconds")}
    if isinstance(tree, list):
        return [untimed(v) for v in tree]
    return tree


class Crash(Exception):
    """A crash injected into a run (tests of resume and of what a crash leaves behind)."""


def crash_after(monkeypatch, method_name: str, n_steps: int) -> None:
    """Make the method raise Crash after its n-th optimizer step (counted across stages and runs)."""
    from llmcl import methods

    cls = methods.get(method_name)
    original = cls.after_step
    count = {"n": 0}

    def after_step(self, model):
        original(self, model)
        count["n"] += 1
        if count["n"] == n_steps:
            raise Crash(f"injected crash after step {n_steps}")

    monkeypatch.setattr(cls, "after_step", after_step)


def run_cli(*args: str):
    from click.testing import CliRunner

    from llmcl.cli import cli

    return CliRunner().invoke(cli, list(args), catch_exceptions=False)
