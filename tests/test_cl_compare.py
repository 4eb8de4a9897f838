"""scripts/bench/cl_compare.py builds every method's run from the shipped recipes at one budget: the same data,
the same samples per step and steps per stage, the same evaluation; the multitask bound sees the same samples."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

from conftest import chdir_beside_shared_data
from llmcl import checks
from llmcl import recipe as recipe_mod

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("cl_compare", REPO / "scripts" / "bench" / "cl_compare.py")
cl_compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cl_compare)


def _args(**kw):
    base = dict(model="builtin:smollm2-135m", steps=None, batch=None, train_samples=1000, limit=None, general=None,
                general_limit=None, full=False, out=Path("/nonexistent"))
    return argparse.Namespace(**{**base, **kw})


def _recipes(args, tmp_path):
    return {m: cl_compare.recipe_for(m, args, 0, tmp_path / "tasks") for m in cl_compare.METHODS}


def _samples_per_step(r):
    return r["train"]["batch_size"] + (r["method"].get("replay_batch") or 0)


@pytest.mark.parametrize("kw", [{}, {"steps": 3, "batch": 6, "limit": 5}, {"batch": 7}, {"full": True}],
                         ids=["cpu", "options", "odd-batch", "full"])
def test_every_method_gets_the_same_budget_data_and_evaluation(kw, tmp_path):
    rs = _recipes(_args(**kw), tmp_path)
    seq = {m: r for m, r in rs.items() if m != "multitask"}
    ref = seq["seqft"]
    steps = ref["train"]["max_steps"]
    assert {m: _samples_per_step(r) for m, r in rs.items()} == {m: _samples_per_step(ref) for m in rs}
    assert {m: r["train"]["max_steps"] for m, r in seq.items()} == {m: steps for m in seq}
    assert rs["multitask"]["train"]["max_steps"] == len(ref["stages"]) * steps
    for m, r in seq.items():
        assert r["stages"] == ref["stages"], m
        assert r["eval"] == ref["eval"], m
        assert r["train"]["seq_len"] == ref["train"]["seq_len"], m
    assert rs["ilora"]["train"]["batch_size"] - rs["ilora"]["method"]["replay_batch"] in (0, 1)  # half and half
    assert rs["seqft+replay"]["replay"]["ratio"] == 0.2 and "replay" not in ref
    names = {m: r["method"]["name"] for m, r in rs.items()}
    assert names == {"seqft": "seqft", "seqft+replay": "seqft", "hft": "hft", "osft": "osft", "lora": "lora",
                     "ilora": "ilora", "mora": "mora", "multitask": "seqft"}
    # multitask: one stage over the last task, mixed evenly with the other three; scored on all four
    mt = rs["multitask"]
    assert [s["data"] for s in mt["stages"]] == [ref["stages"][-1]["data"]]
    assert mt["replay"]["ratio"] == pytest.approx(1 - 1 / len(ref["stages"]))
    assert [{k: v for k, v in d.items() if k != "weight"} for d in mt["replay"]["datasets"]] == \
        [s["data"] for s in ref["stages"][:-1]]
    assert mt["eval"]["tasks"][:4] == [f"llmcl_stage_{s['name']}" for s in ref["stages"]]
    if kw.get("full"):
        assert ref["train"]["seq_len"] == 512 and ref["eval"]["limit"] is None
        assert steps * _samples_per_step(ref) >= 1000 > (steps - 1) * _samples_per_step(ref)
    if "steps" in kw:
        assert steps == 3 and _samples_per_step(ref) == 6 and ref["eval"]["limit"] == 5


def test_the_cpu_size_is_the_shipped_recipes_and_they_validate(tmp_path, monkeypatch):
    chdir_beside_shared_data(tmp_path, monkeypatch)
    for m, r in _recipes(_args(), tmp_path).items():
        if m == "multitask":
            r["eval"]["include_path"] = []  # the seqft run writes them
            r["eval"]["tasks"] = [t for t in r["eval"]["tasks"] if not t.startswith("llmcl_stage_")]
        parsed = recipe_mod.from_dict(r)
        checks.check(parsed)
        shipped = recipe_mod.load(REPO / "recipes" / "benchmarks" / cl_compare.METHODS[m])
        if m != "multitask":  # `llmcl train` of the shipped recipe is the run of the table (but for save_every)
            assert (parsed.train.max_steps, parsed.train.batch_size, parsed.train.lr, parsed.eval.limit) == \
                (shipped.train.max_steps, shipped.train.batch_size, shipped.train.lr, shipped.eval.limit), m
            assert parsed.method == shipped.method, m


def test_a_finished_run_with_other_settings_is_refused_not_reused(tmp_path, monkeypatch):
    chdir_beside_shared_data(tmp_path, monkeypatch)  # the recipes' data paths are validated
    r = cl_compare.recipe_for("lora", _args(), 0, tmp_path / "tasks")
    run_dir = tmp_path / "lora-s0"
    run_dir.mkdir()
    assert cl_compare._settings_changed(run_dir, r) is None  # nothing run yet
    (run_dir / "recipe.yaml").write_text(recipe_mod.dump(recipe_mod.from_dict(r)))
    assert cl_compare._settings_changed(run_dir, r) is None
    assert cl_compare._settings_changed(run_dir, cl_compare.recipe_for("lora", _args(limit=100), 0, tmp_path)) == \
        "eval.limit"
    assert cl_compare._settings_changed(run_dir, cl_compare.recipe_for("lora", _args(steps=3), 0, tmp_path)) == \
        "train.max_steps"


def test_the_base_row_is_shared_only_when_scored_with_the_same_limits_and_tasks(tmp_path):
    r = cl_compare.recipe_for("mora", _args(), 0, tmp_path / "tasks")
    ev = r["eval"]
    tasks = [f"llmcl_stage_{st['name']}" for st in r["stages"]] + ev["tasks"]
    base = tmp_path / "base.json"
    assert not cl_compare._shareable_base(base, r)  # no base row yet
    row = {"limit": ev["limit"], "tasks_limit": ev["tasks_limit"], "tasks": {t: {} for t in tasks}}
    base.write_text(json.dumps(row))
    assert cl_compare._shareable_base(base, r)
    base.write_text(json.dumps({**row, "limit": ev["limit"] + 1}))
    assert not cl_compare._shareable_base(base, r)
    base.write_text(json.dumps({**row, "tasks": {t: {} for t in tasks[1:]}}))
    assert not cl_compare._shareable_base(base, r)
    mt = cl_compare.recipe_for("multitask", _args(), 0, tmp_path / "tasks")  # names the stage tasks in eval.tasks
    base.write_text(json.dumps(row))
    assert cl_compare._shareable_base(base, mt)
