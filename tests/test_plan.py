"""Every stage's steps and schedule are planned before anything trains: `llmcl validate` refuses a schedule
that does not fit a later stage, `llmcl train` refuses it before the first stage trains, and the plan is what
the stages then do."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli, write_recipe
from llmcl import methods, recipe
from llmcl.errors import LlmclError
from llmcl.methods.base import Method, MethodConfig
from llmcl.train.plan import plan_stages


def test_validate_refuses_a_later_stage_whose_schedule_does_not_fit(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", train={"lr": 1e-3, "max_steps": 4, "batch_size": 4, "seq_len": 48,
                                                    "schedule": "wsd", "decay": 2, "warmup": 1})
    assert run_cli("validate", str(path)).exit_code == 0
    res = run_cli("validate", str(path), "stages.1.train.max_steps=2")
    assert res.exit_code == 2
    assert "'stages.1.train.warmup' (1) + 'stages.1.train.decay' (2) = 3 steps, more than the stage's 2 steps" in res.stderr


def test_train_refuses_before_the_first_stage_trains(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", train={"lr": 1e-3, "max_steps": 4, "batch_size": 4, "seq_len": 48,
                                                    "warmup": 1, "schedule": "wsd", "decay": 1},
                        stages=[{"data": {"path": "builtin:facts"}},
                                {"data": {"path": "builtin:reverse"}, "train": {"epochs": 0.05, "max_steps": None,
                                                                                "warmup": 1000}}])
    assert run_cli("validate", str(path)).exit_code == 0  # epochs: the steps need the data, seen by train
    res = run_cli("train", str(path), "--run-dir", str(tmp_path / "run"))
    assert res.exit_code == 2 and "'stages.1.train.warmup' (1000) + 'stages.1.train.decay' (1) = 1001 steps" in res.stderr
    assert not (tmp_path / "run" / "stage-00-facts").exists()  # nothing trained


def test_the_plan_is_what_the_stages_do(tmp_path):
    """Steps from epochs over the pool (with replay taking a share) and the re-warmed schedule: the ledger
    records what the plan said, before any stage ran."""
    path = write_recipe(tmp_path / "r.yaml", train={"lr": 1e-3, "max_steps": None, "epochs": 0.1, "batch_size": 4,
                                                    "seq_len": 48, "warmup": 1, "warmup_start": "previous"},
                        replay={"ratio": 0.25})
    r = recipe.load(path)
    from llmcl.data.mixing import build_pool
    from llmcl.models import load_tokenizer

    tok = load_tokenizer(r.model)
    sizes = {i: len(build_pool(s.data, tok, 48, 0, tmp_path / "cache")[0]) for i, s in enumerate(r.stages)}
    plans = plan_stages(r, 1, sizes.__getitem__)
    assert run_cli("train", str(path), "--run-dir", str(tmp_path / "run")).exit_code == 0
    ledger = json.loads((tmp_path / "run" / "ledger.json").read_text())
    assert [s["steps"] for s in ledger["stages"]] == [p.steps for p in plans]
    assert [s["final_lr"] for s in ledger["stages"]] == [p.final_lr for p in plans]
    # stage 1 replays stage 0 (a quarter of every step), so it needs more steps for the same epochs
    assert plans[1].steps > plans[0].steps and plans[1].schedule.start_lr == plans[0].final_lr
    assert plan_stages(r)[0] is None  # without the pool sizes an epoch-based stage is not planned


def test_the_registry_refuses_a_name_already_taken():
    class Clash(Method):
        config_class = MethodConfig  # its name field defaults to 'seqft'

    with pytest.raises(ValueError, match="method name 'seqft' is already registered by llmcl.methods.seqft.SeqFT"):
        methods.register(Clash)
    assert methods.get("seqft").__module__ == "llmcl.methods.seqft"
    with pytest.raises(LlmclError):
        methods.get("clash")
