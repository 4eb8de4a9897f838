"""checkpoints.keep_stages: the weights of finished stages before the last N are deleted once their rows are
scored; what a run needs later (resume, the report, the kept stages and the adapters they merge) stays, and the
kept weights are those of a run that deletes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import run_cli, untimed, write_recipe
from llmcl import methods as method_registry
from llmcl.recipe import load
from llmcl.rundir import Ledger
from llmcl.rundir.layout import MANIFEST, STAGE_INFO

THREE = [{"data": {"path": "builtin:facts"}}, {"data": {"path": "builtin:reverse"}},
         {"data": {"path": "builtin:facts"}, "name": "again"}]
TRAIN = {"lr": 1e-3, "max_steps": 2, "batch_size": 4, "seq_len": 48, "warmup": 0}
# a method's defaults, plus LoRA merging each stage's adapter into the base: its last stage loads the earlier
# stages' adapters from their directories, which must survive the deletion
CASES = {**{m: {"name": m} for m in sorted(method_registry.REGISTRY)},
         "lora_merge": {"name": "lora", "between_stages": "merge"}}


def _files(run: Path, stage_dir: str) -> set[str]:
    return {str(p.relative_to(run / stage_dir)) for p in (run / stage_dir).rglob("*") if p.is_file()}


def _train(recipe: Path, run: Path, *overrides: str) -> str:
    res = run_cli("train", str(recipe), *overrides, "--run-dir", str(run))
    assert res.exit_code == 0, res.output
    return res.output


# the default suite runs a whole-model method and the adapter chain; the rest of the registry runs with -m slow
QUICK = ("seqft",)  # the others with -m slow


@pytest.mark.parametrize("case", [c if c in QUICK else pytest.param(c, marks=pytest.mark.slow) for c in sorted(CASES)])
def test_keep_stages_deletes_older_weights_and_the_kept_stage_is_the_same(case, tmp_path):
    """Without evaluation nothing waits for a row: after 3 stages with keep_stages 1, stages 0 and 1 keep only
    stage.json (and adapters the last stage merges), the ledger marks them, and the last stage's files are, byte
    for byte, those of the same run with every stage kept; it loads, and a rerun trains nothing."""
    recipe = write_recipe(tmp_path / "r.yaml", method=CASES[case], train=TRAIN, stages=THREE,
                          eval={"after_each_stage": False, "stage_tasks": False})
    full, kept = tmp_path / "full", tmp_path / "kept"
    _train(recipe, full)
    out = _train(recipe, kept, "checkpoints.keep_stages=1")
    assert "deleted the weights of stage 0 (checkpoints.keep_stages: 1)" in out
    assert "deleted the weights of stage 1 (checkpoints.keep_stages: 1)" in out
    ledger = Ledger.read(kept)
    assert [bool(ledger.stage(i).get("weights_deleted")) for i in range(3)] == [True, True, False]
    assert ledger.done_stages() == [0, 1, 2]  # deleted stages stay done: nothing trains again
    last = ledger.stage(2)["checkpoint"]
    manifest = json.loads((kept / last / MANIFEST).read_text())
    reference = json.loads((full / last / MANIFEST).read_text())
    state = "method_state.json"  # OSFT's records its SVD seconds: the same but for them
    assert untimed(json.loads((kept / last / state).read_text())) == untimed(json.loads((full / last / state).read_text()))
    for m in (manifest, reference):
        del m["files"][state]
    assert manifest == reference  # the sizes and sha256 of every other file: the same weights, byte for byte
    loaded = {Path(p) for p in [manifest["path"], *manifest.get("merged", [])]}
    for i in (0, 1):
        d = ledger.stage(i)["checkpoint"]
        expected = {STAGE_INFO} | {str(p.relative_to(d)) + "/" + f for p in loaded if p.parts[0] == d
                                   for f in _files(full, str(p))}
        assert _files(kept, d) == expected, (case, d)
        assert (kept / d / STAGE_INFO).read_bytes() == (full / d / STAGE_INFO).read_bytes()
    if case == "lora_merge":
        assert len(manifest["merged"]) == 2  # the two earlier adapters stayed, and the stage loads with them
    from llmcl.rundir import artifacts

    r = load(kept / "recipe.yaml")
    model = artifacts.load(kept, ledger.manifest(2), r.model, r.seed, trainable=False)
    assert sum(p.numel() for p in model.parameters()) > 0
    again = _train(recipe, kept, "checkpoints.keep_stages=1")
    assert "all 3 stages" in again and "nothing to train" in again
    import shutil

    shutil.rmtree(kept / last)  # the kept stage deleted by hand: it would train again, from deleted weights
    res = run_cli("train", str(recipe), "checkpoints.keep_stages=1", "--run-dir", str(kept))
    assert res.exit_code == 2 and f"stage 2 (again) must train (its directory {kept / last} is missing) from " \
        "stage 1, whose weights were deleted" in res.output, res.output
    res = run_cli("export", str(kept), "--to", str(tmp_path / "out"))  # 'last' is not stage 1
    assert res.exit_code == 2 and res.stderr.strip() == f"error: --stage last: a stage the run finished is not " \
        f"there; stage 2's directory {last} is missing (restore it)", res.stderr  # stages 0, 1: nothing to load


def test_rows_are_scored_before_the_weights_go_and_a_deleted_stage_is_one_line(tmp_path):
    """With evaluation the rows of the deleted stages are written first (the same rows as a run that deletes
    nothing), the report reads them, `llmcl eval` leaves the deleted stages out with a note and refuses one by
    --stage in one line, and so does `llmcl export --stage`."""
    recipe = write_recipe(tmp_path / "r.yaml", train=TRAIN, stages=THREE,
                          eval={"after_each_stage": True, "limit": 2})
    full, kept = tmp_path / "full", tmp_path / "kept"
    _train(recipe, full)
    _train(recipe, kept, "checkpoints.keep_stages=2")
    ledger = Ledger.read(kept)
    assert [bool(ledger.stage(i).get("weights_deleted")) for i in range(3)] == [True, False, False]
    for name in ("base", "stage-00", "stage-01", "stage-02"):
        a = json.loads((full / "eval" / f"{name}.json").read_text())["tasks"]
        b = json.loads((kept / "eval" / f"{name}.json").read_text())["tasks"]
        assert {t: v["value"] for t, v in a.items()} == {t: v["value"] for t, v in b.items()}, name
    for run in (full, kept):
        res = run_cli("report", str(run))
        assert res.exit_code == 0, res.output
    matrices = [json.loads((run / "report" / "matrix.json").read_text())["R"] for run in (full, kept)]
    assert matrices[0] == matrices[1] and len(matrices[0]) == 4  # base and three stages
    res = run_cli("eval", str(kept), "--tasks", "facts")
    assert res.exit_code == 0, res.output
    assert "note: stage 0 left out: the weights were deleted (checkpoints.keep_stages)" in " ".join(res.output.split())
    assert "evaluating stage 1" in res.output and "evaluating stage 0" not in res.output
    res = run_cli("export", str(kept), "--stage", "5", "--to", str(tmp_path / "x"))  # no advice to retrain stage 0
    assert res.exit_code == 2 and "missing" not in res.output and "--stage 5: expected 'last' or a finished" in \
        res.output, res.output
    (kept / "eval" / "stage-00.json").unlink()  # a deleted stage's row gone: a resume cannot score it, and goes on
    out = _train(recipe, kept, "checkpoints.keep_stages=2")
    assert "nothing to train" in out and not (kept / "eval" / "stage-00.json").exists()
    for args in (["eval", str(kept), "--stage", "0"], ["export", str(kept), "--stage", "0", "--to", str(tmp_path / "x")]):
        res = run_cli(*args)
        lines = res.output.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1, res.output
        assert lines[0].startswith("error: stage 0 (facts) of ") and "weights were deleted at" in lines[0] \
            and "checkpoints.keep_stages" in lines[0], lines[0]
    assert not (tmp_path / "x").exists()


def test_weights_stay_while_a_row_is_missing_and_keep_may_change_between_runs(tmp_path, monkeypatch):
    """A stage whose row is not scored (an evaluation that failed) keeps its weights; keep_stages added to a
    finished run deletes on the next `llmcl train` (nothing trains), once the row is there; leftovers of a
    deletion a kill cut short go then too."""
    from llmcl.eval import hooks as hooks_mod

    recipe = write_recipe(tmp_path / "r.yaml", train=TRAIN, stages=THREE, eval={"after_each_stage": True, "limit": 2})
    run = tmp_path / "run"
    original = hooks_mod.EvalHooks._score

    def fail_stage0(self, row, accelerator):  # stage 0's row is never written in this run
        if row != 0:
            original(self, row, accelerator)

    monkeypatch.setattr(hooks_mod.EvalHooks, "_score", fail_stage0)
    _train(recipe, run, "checkpoints.keep_stages=1")
    ledger = Ledger.read(run)
    assert [bool(ledger.stage(i).get("weights_deleted")) for i in range(3)] == [False, True, False]
    assert (run / ledger.stage(0)["checkpoint"] / MANIFEST).exists()
    monkeypatch.setattr(hooks_mod.EvalHooks, "_score", original)
    stage1 = run / ledger.stage(1)["checkpoint"]
    (stage1 / "model").mkdir()
    (stage1 / "model" / "left.safetensors").write_bytes(b"x" * 10)  # what a kill mid-deletion left
    out = _train(recipe, run)  # without keep_stages: stage 0's missing row is scored, nothing is deleted ...
    assert "deleted the weights" not in out and (stage1 / "model" / "left.safetensors").exists()
    assert (run / "eval" / "stage-00.json").exists()
    out = _train(recipe, run, "checkpoints.keep_stages=1")  # ... with it, stage 0 goes, and stage 1's leftovers
    assert "nothing to train" in out and "deleted the weights of stage 0" in out
    ledger = Ledger.read(run)
    assert [bool(ledger.stage(i).get("weights_deleted")) for i in range(3)] == [True, True, False]
    assert _files(run, ledger.stage(0)["checkpoint"]) == {STAGE_INFO} and _files(run, stage1.name) == {STAGE_INFO}


def test_a_damaged_row_is_scored_again_before_its_stages_weights_go(tmp_path):
    """A row file that cannot be read (cut short, or a score that is not a number) is not a scored row: the
    report names the damaged file in one line; the next `llmcl train` scores the row again from the weights
    keep_stages kept for it, then deletes them."""
    from llmcl.eval.scoring import row_scored

    recipe = write_recipe(tmp_path / "r.yaml", train=TRAIN, stages=THREE, eval={"after_each_stage": True, "limit": 2})
    run = tmp_path / "run"
    _train(recipe, run)
    row0, row1 = run / "eval" / "stage-00.json", run / "eval" / "stage-01.json"
    data = json.loads(row0.read_text())
    next(iter(data["tasks"].values()))["value"] = "high"
    row0.write_text(json.dumps(data))
    row1.write_bytes(row1.read_bytes()[:200])
    assert not row_scored(run, 0) and not row_scored(run, 1) and row_scored(run, 2)
    res = run_cli("report", str(run))
    assert res.exit_code == 2 and "is damaged" in res.output and "Traceback" not in res.output, res.output
    out = _train(recipe, run, "checkpoints.keep_stages=1")
    assert f"note: {row0} cannot be read: its row is scored again" in out and f"note: {row1} cannot be" in out
    assert out.index(f"{row1} cannot be read") < out.index("deleted the weights of stages 0, 1")  # scored first
    assert row_scored(run, 0) and row_scored(run, 1) and run_cli("report", str(run)).exit_code == 0


@pytest.mark.parametrize("keep", [None, 1])
def test_a_damaged_adapter_that_a_later_stage_merges_is_one_line(keep, tmp_path):
    """LoRA merging each stage's adapter: stage 2's model loads stage 0's and 1's adapters. Cut one short and
    loading stage 2 (export, eval) names the file, whether stage 0's manifest records it (checked against its
    sha256) or its weights were deleted (checkpoints.keep_stages: the adapter must still parse)."""
    recipe = write_recipe(tmp_path / "r.yaml", method=CASES["lora_merge"], train=TRAIN, stages=THREE,
                          eval={"after_each_stage": False, "stage_tasks": False})
    run = tmp_path / "run"
    _train(recipe, run, *([f"checkpoints.keep_stages={keep}"] if keep else []))
    adapter = run / Ledger.read(run).stage(0)["checkpoint"] / "adapter" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])
    res = run_cli("export", str(run), "--to", str(tmp_path / "out"))
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert str(adapter) in res.output and ("has 100 bytes" if keep is None else "is damaged") in res.output, res.output


@pytest.mark.parametrize("value, expected", [(0, "a positive integer or null"), ("two", "an integer or null"),
                                             (True, "an integer or null")])
def test_keep_stages_values_are_checked(tmp_path, value, expected):
    recipe = write_recipe(tmp_path / "r.yaml", checkpoints={"keep_stages": value})
    res = run_cli("validate", str(recipe))
    assert res.exit_code == 2 and "checkpoints.keep_stages" in res.output and expected in res.output, res.output


def test_keep_stages_needs_the_rows_scored_during_training(tmp_path):
    """Deleted weights cannot be scored by a later `llmcl eval`: with eval.after_each_stage false and something
    to evaluate the key is refused; with nothing to evaluate it is accepted."""
    recipe = write_recipe(tmp_path / "r.yaml", checkpoints={"keep_stages": 1})  # after_each_stage: false
    res = run_cli("validate", str(recipe))
    assert res.exit_code == 2 and "recipe key 'checkpoints.keep_stages'" in res.output \
        and "eval.after_each_stage is false" in res.output, res.output
    data = yaml.safe_load(recipe.read_text())
    data["eval"]["stage_tasks"] = False
    recipe.write_text(yaml.safe_dump(data))
    assert run_cli("validate", str(recipe)).exit_code == 0


def test_general_tasks_only_at_the_ends_leave_the_middle_rows_unscored(tmp_path):
    """eval.tasks_every_stage: false without stage tasks: a stage in the middle has nothing to score. It used to
    stop `llmcl train` after stage 0 ("nothing to evaluate") at every rerun; now that row is not written, and
    `llmcl eval` scores the rows that have tasks."""
    from conftest import SHARED_DATA

    if not (SHARED_DATA / "eval" / "arc_easy").is_dir():
        pytest.skip("needs ../shared/data/eval")
    recipe = write_recipe(tmp_path / "r.yaml", train=TRAIN, stages=THREE[:2],
                          eval={"after_each_stage": True, "stage_tasks": False, "tasks": ["llmcl_arc_easy"],
                                "tasks_every_stage": False, "limit": 2, "data_dir": str(SHARED_DATA / "eval")})
    run = tmp_path / "run"
    _train(recipe, run)
    assert sorted(p.name for p in (run / "eval").glob("*.json")) == ["base.json", "stage-01.json"]
    out = _train(recipe, run, "checkpoints.keep_stages=1")  # and no row for stage 0 to wait for
    assert "deleted the weights of stage 0" in out
    res = run_cli("eval", str(run))
    assert res.exit_code == 0, res.output
    assert "evaluating the base model" in res.output and "evaluating stage 1" in res.output
    assert "evaluating stage 0" not in res.output


def _fake_run(tmp_path: Path, checkpoints: list[str]) -> Ledger:
    """A run directory of finished stages without training: each with a manifest, a weights file, stage.json."""
    run = tmp_path / "run"
    stages = []
    for i, checkpoint in enumerate(checkpoints):
        d = (run / checkpoint).resolve()
        d.mkdir(parents=True, exist_ok=True)
        (d / "model").mkdir(exist_ok=True)
        (d / "model" / "w.safetensors").write_bytes(b"w")
        (d / STAGE_INFO).write_text("{}")
        (d / MANIFEST).write_text(json.dumps({"kind": "full", "path": f"{checkpoint}/model"}))
        stages.append({"index": i, "name": f"s{i}", "status": "done", "checkpoint": checkpoint})
    return Ledger(run, {"version": 1, "stages": stages})


def test_only_llmcl_own_stage_directories_are_deleted_from_and_an_unreadable_kept_manifest_deletes_nothing(tmp_path):
    """A hand-edited ledger naming a directory outside the run (`../elsewhere`) or a symlinked stage directory is
    never deleted from; a kept stage whose manifest cannot be read (what it loads is unknown) stops every
    deletion; a stage marked again (trained again) has its weights again."""
    from llmcl.rundir.retention import delete_old_weights

    ledger = _fake_run(tmp_path, ["../elsewhere", "stage-01-s1", "stage-02-s2", "stage-03-s3"])
    outside = tmp_path / "elsewhere" / "model" / "w.safetensors"
    assert delete_old_weights(ledger, 1, lambda i: False) == [1, 2]
    assert outside.exists() and not ledger.deleted(0)
    assert not (ledger.run_dir / "stage-01-s1" / "model").exists() and (ledger.run_dir / "stage-03-s3" / "model").exists()

    ledger = _fake_run(tmp_path / "b", ["stage-00-s0", "stage-01-s1", "stage-02-s2"])
    (ledger.run_dir / "stage-02-s2" / MANIFEST).write_text("{not json")
    assert delete_old_weights(ledger, 1, lambda i: False) == []
    assert (ledger.run_dir / "stage-00-s0" / "model" / "w.safetensors").exists() and not ledger.deleted(0)

    ledger = _fake_run(tmp_path / "c", ["stage-00-s0", "stage-01-s1"])
    assert delete_old_weights(ledger, 1, lambda i: False) == [0]
    ledger.mark(0, "running")
    assert not ledger.deleted(0)
