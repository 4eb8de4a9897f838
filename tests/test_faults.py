"""The README's error contract under faults, driven through the CLI: a mistake in the input or a damaged run
directory is exit 2, what the machine refuses is exit 74, each is one line on stderr with no traceback, and
the finished stage is byte-identical afterwards. A new fault is one row of FAULTS.

Every row starts from a copy of one partial run: stage 0 done, stage 1 stopped after its step checkpoint at step 2
(local jsonl data, so data faults are real files)."""

from __future__ import annotations

import errno
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, Crash, crash_after, run_cli, set_keys, write_recipe
from llmcl.rundir.integrity import fingerprint

STAGE0 = "stage-00-facts"


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _records(name: str) -> list[dict]:
    from llmcl.data import builtin

    return builtin.generate(name, "train", 0)


def make_partial(root: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """(recipe, run dir): stage 0 done, stage 1 crashed after step 3 with a step checkpoint at step 2."""
    from llmcl import recipe as recipe_mod
    from llmcl.train.loop import run

    root.mkdir(parents=True, exist_ok=True)
    facts = _write_jsonl(root / "facts.jsonl", _records("facts"))
    reverse = _write_jsonl(root / "reverse.jsonl", _records("reverse"))
    path = write_recipe(root / "r.yaml", train={"lr": 1e-3, "max_steps": 4, "batch_size": 4, "seq_len": 48,
                                                "warmup": 1, "save_every": 2},
                        stages=[{"name": "facts", "data": {"path": str(facts)}},
                                {"name": "reverse", "data": {"path": str(reverse)}}])
    with monkeypatch.context() as m:
        crash_after(m, "seqft", 7)
        with pytest.raises(Crash):
            run(recipe_mod.load(path), root / "run")
    from llmcl.train.distributed import reset_accelerate

    reset_accelerate()
    return path, root / "run"


@pytest.fixture(scope="module")
def partial(tmp_path_factory):
    monkeypatch = pytest.MonkeyPatch()
    try:
        yield make_partial(tmp_path_factory.mktemp("partial"), monkeypatch)
    finally:
        monkeypatch.undo()


@pytest.fixture
def run_copy(partial, tmp_path):
    recipe, run_dir = partial
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return recipe, copy


def cli(*args: str):
    from click.testing import CliRunner

    from llmcl.cli import cli as group

    return CliRunner().invoke(group, list(args), catch_exceptions=True)


def assert_contract(result, code: int, text: str) -> None:
    """Exit status `code`, exactly one line on stderr starting with 'error:' and containing `text`, no traceback."""
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"{type(result.exception).__name__}: {result.exception}"
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == code, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert text in lines[0], lines[0]
    assert "Traceback" not in result.output


# -- faults ------------------------------------------------------------------------------------------------
# each: prepare(recipe, run_dir, tmp) -> CLI arguments; then the exit status and a piece of the one line

def _train(recipe, run_dir, *extra):
    return ["train", str(recipe), "--run-dir", str(run_dir), *extra]


def _recipe_with(tmp, recipe, **changes):
    data = set_keys(yaml.safe_load(Path(recipe).read_text()), changes)
    out = tmp / "changed.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "garbage":  # 4 KiB of garbage in the middle, same size
        mid = len(data) // 2
        data[mid:mid + 4096] = bytes(range(256)) * 16
        path.write_bytes(bytes(data[: len(data)]))
    elif how == "nan":  # float32 NaN bit patterns over the last tensor bytes
        data[-64:] = b"\x00\x00\xc0\x7f" * 16
        path.write_bytes(bytes(data))


def _bad_data(tmp, recipe, records, name="bad.jsonl", stage=1, key="path"):
    path = tmp / name
    if isinstance(records, bytes):
        path.write_bytes(records)
    else:
        _write_jsonl(path, records)
    return _train(_recipe_with(tmp, recipe, **{f"stages__{stage}__data__{key}": str(path)}), tmp / "fresh")


GOOD = _records("facts")
FAULTS = {
    # the recipe and its values
    "lr_inf": (lambda r, d, t: _train(r, t / "fresh", "train.lr=.inf"), 2, "expected a finite number"),
    "lr_nan": (lambda r, d, t: _train(r, t / "fresh", "train.lr=.nan"), 2, "expected a finite number"),
    "seed_too_big": (lambda r, d, t: _train(r, t / "fresh", f"seed={2**32}"), 2, "recipe key 'seed'"),
    "replay_with_nothing_to_replay": (lambda r, d, t: _train(r, t / "fresh", "replay.ratio=0.5",
                                                             "replay.previous_stages=false"), 2,
                                      "recipe key 'replay.ratio': 0.5 of every step is to be replayed"),
    "num_fewshot_negative": (lambda r, d, t: _train(r, t / "fresh", "eval.num_fewshot=-1"), 2,
                             "recipe key 'eval.num_fewshot'"),
    "seed_negative": (lambda r, d, t: _train(r, t / "fresh", "seed=-1"), 2, "recipe key 'seed'"),
    "recipe_not_utf8": (lambda r, d, t: (t.joinpath("x.yaml").write_bytes(Path(r).read_bytes() + b"# \xff\xfe\n"),
                                         _train(t / "x.yaml", t / "fresh"))[1], 2, "is not UTF-8"),
    "name_newline": (lambda r, d, t: _train(_recipe_with(t, r, name="evil\n"), t / "fresh"), 2, "recipe key 'name'"),
    "stage_name_newline": (lambda r, d, t: _train(_recipe_with(t, r, stages__1__name="b\n"), t / "fresh"), 2,
                           "recipe key 'stages.1.name'"),
    "eval_data_dir_nowhere": (lambda r, d, t: _train(r, t / "fresh", "eval.data_dir=/nonexistent/eval"), 2,
                              "recipe key 'eval.data_dir'"),
    "slurm_partition_injection": (lambda r, d, t: ["slurm", str(r), "--partition", "gpu\n#SBATCH --wrap=x",
                                                   "--print"], 2, "--partition"),
    "slurm_time_not_a_time": (lambda r, d, t: ["slurm", str(r), "--time", "forever", "--print"], 2,
                              "--time 'forever': expected a SLURM time limit"),
    "slurm_account_injection": (lambda r, d, t: ["slurm", str(r), "--account", "a;rm -rf ~", "--print"], 2,
                                "--account"),
    # the data, every record of every stage before stage 0 trains
    "parquet_corrupt": (lambda r, d, t: _bad_data(t, r, b"PAR1 this is not parquet PAR1", "bad.parquet"), 2,
                        "cannot read data file"),
    "data_not_utf8": (lambda r, d, t: _bad_data(t, r, json.dumps(GOOD[0]).encode() + b"\n{\"prompt\": \"\xff\"}\n"),
                      2, "bad.jsonl (line 2): not UTF-8 text (byte 0xff); save it as UTF-8"),
    "later_record_missing_field": (lambda r, d, t: _bad_data(t, r, GOOD[:3] + [{"prompt": "x"}] + GOOD[3:6]), 2,
                                   "record 4 of bad.jsonl"),
    "later_record_wrong_type": (lambda r, d, t: _bad_data(t, r, GOOD[:4] + [{"prompt": "x", "completion": [1, 2]}]),
                                2, "field 'completion' holds a list"),
    "later_record_null": (lambda r, d, t: _bad_data(t, r, GOOD[:4] + [{"prompt": None, "completion": "y"}]), 2,
                          "field 'prompt' holds null"),
    "empty_data_in_stage_2": (lambda r, d, t: _bad_data(t, r, b""), 2, "has no training records"),
    "replay_dataset_bad_record": (lambda r, d, t: _train(_recipe_with(
        t, r, replay={"ratio": 0.25, "datasets": [{"path": str(_write_jsonl(t / "rp.jsonl", GOOD[:5] + [{"x": 1}]))}]}),
        t / "fresh"), 2, "recipe key 'replay.datasets.0"),
    # a damaged run directory
    "ledger_truncated": (lambda r, d, t: (_damage(d / "ledger.json", "truncate"), _train(r, d))[1], 2,
                         "ledger.json is damaged"),
    "run_recipe_truncated": (lambda r, d, t: (d.joinpath("recipe.yaml").write_text("stages:\n  - data: {path: "),
                                              _train(r, d))[1], 2, "recipe.yaml is damaged"),
    "stage_weights_truncated": (lambda r, d, t: (_damage(d / STAGE0 / "model" / "model.safetensors", "truncate"),
                                                 _train(r, d))[1], 2, "were written: it changed after it was saved"),
    "stage_weights_garbage": (lambda r, d, t: (_damage(d / STAGE0 / "model" / "model.safetensors", "garbage"),
                                               _train(r, d))[1], 2, "sha256 differs"),
    "stage_manifest_truncated": (lambda r, d, t: (_damage(d / STAGE0 / "manifest.json", "truncate"),
                                                  _train(r, d))[1], 2, "manifest.json is damaged"),
    "step_checkpoint_truncated": (lambda r, d, t: (_damage(d / "step-checkpoint" / "trainable.safetensors",
                                                           "truncate"), _train(r, d))[1], 2, "step-checkpoint to restart"),
    "step_checkpoint_nan": (lambda r, d, t: (_damage(d / "step-checkpoint" / "trainable.safetensors", "nan"),
                                             _train(r, d))[1], 2, "sha256 differs"),
    "step_state_truncated": (lambda r, d, t: (_damage(d / "step-checkpoint" / "state.json", "truncate"),
                                              _train(r, d))[1], 2, "state.json is damaged"),
    "data_edited_before_resume": (lambda r, d, t: (_write_jsonl(Path(yaml.safe_load(Path(r).read_text())["stages"][1]
                                                                     ["data"]["path"]), _records("reverse")[:-1]),
                                                   _train(r, d))[1], 2, "changed since the step checkpoint"),
    "eval_row_truncated": (lambda r, d, t: ((d / "eval").mkdir(), d.joinpath("eval", "base.json").write_text(
        '{"row": "base", "tasks": {"x'), ["report", str(d)])[2], 2, "base.json is damaged"),
    "eval_unknown_task": (lambda r, d, t: ["eval", str(d), "--stage", "0", "--tasks", "no_such_task_xyz"], 2,
                          "--tasks 'no_such_task_xyz'"),
    "eval_task_yaml_that_does_not_parse": (lambda r, d, t: (t.joinpath("tasks").mkdir(), t.joinpath(
        "tasks", "mytask.yaml").write_text("task: mytask\ndataset_kwargs: {file: [\n"), _train(
        r, t / "fresh", f"eval.include_path=[{t / 'tasks'}]", "eval.tasks=[mytask]"))[2], 2, "mytask.yaml ("),
    "eval_not_a_run_dir": (lambda r, d, t: ["eval", str(t)], 2, "is not an llmcl run directory"),
    "ledger_unknown_status": (lambda r, d, t: (_edit_json(d / "ledger.json", lambda j: j["stages"][0].update(
        status="finished")), _train(r, d))[1], 2, "ledger.json is damaged"),
    "ledger_stage_without_a_status": (lambda r, d, t: (_edit_json(d / "ledger.json", lambda j: j["stages"][0].pop(
        "status")), _train(r, d))[1], 2, "ledger.json is damaged"),  # not read as pending: nothing trains again
    "ledger_fewer_stages_than_the_recipe": (lambda r, d, t: (_edit_json(d / "ledger.json", lambda j: j.update(
        stages=j["stages"][:1])), _train(r, d))[1], 2, "ledger.json is damaged"),
    "ledger_more_stages_than_the_recipe": (lambda r, d, t: (_edit_json(d / "ledger.json", lambda j: j["stages"].append(
        {"index": 2, "name": "extra", "status": "pending"})), ["report", str(d)])[1], 2, "ledger.json is damaged"),
    "ledger_checkpoint_outside_the_run": (lambda r, d, t: (_edit_json(d / "ledger.json", lambda j: j["stages"][0].update(
        checkpoint=f"../elsewhere/{STAGE0}")), ["export", str(d), "--to", str(t / "out")])[1], 2,
        "ledger.json is damaged (ValueError: stage 0's checkpoint"),
    "run_recipe_bad_value": (lambda r, d, t: (d.joinpath("recipe.yaml").write_text(d.joinpath(
        "recipe.yaml").read_text().replace("seed: 0", "seed: -5")), ["report", str(d)])[1], 2,
        "recipe.yaml: recipe key 'seed': got -5"),
    "eval_row_score_not_a_number": (lambda r, d, t: ((d / "eval").mkdir(), d.joinpath("eval", "base.json").write_text(
        json.dumps({"row": "base", "tasks": {"x": {"value": "high", "metric": "acc"}}})), ["report", str(d)])[2], 2,
        "base.json is damaged (task 'x' holds a score that is not a number)"),
    "eval_empty_tasks": (lambda r, d, t: ["eval", str(d), "--stage", "0", "--tasks", " , "], 2,
                         "--tasks ' , ': expected task names"),
    "eval_metric_not_a_name": (lambda r, d, t: _train(r, t / "fresh", "eval.metric={x: [acc]}"), 2,
                               "recipe key 'eval.metric.x': got ['acc']; expected a string"),
    "status_of_a_run_by_another_recipe": (lambda r, d, t: ["status", str(r), "train.lr=0.5", "--run-dir", str(d)], 2,
                                          "was made by a different recipe"),
    "status_of_a_stage_directory": (lambda r, d, t: ["status", str(r), "--run-dir", str(d / STAGE0)], 2,
                                    "is a stage directory of a run"),
    "stage_manifest_files_not_records": (lambda r, d, t: (_edit_json(d / STAGE0 / "manifest.json", lambda j: j.update(
        files="x")), _train(r, d))[1], 2, "manifest.json is damaged (its file records are not sizes and sha256)"),
    "stage_manifest_path_outside_the_run": (lambda r, d, t: (_edit_json(d / STAGE0 / "manifest.json", lambda j: j.update(
        path="../elsewhere/model")), _train(r, d))[1], 2, "'../elsewhere/model' is not a path inside the run directory"),
    "stage_manifest_path_not_there": (lambda r, d, t: (_edit_json(d / STAGE0 / "manifest.json", lambda j: j.update(
        path=f"{STAGE0}/nomodel")), _train(r, d))[1], 2, "nomodel is not a directory"),
    "stage_manifest_not_an_object": (lambda r, d, t: (d.joinpath(STAGE0, "manifest.json").write_text("[1]"),
                                                      _train(r, d))[1], 2, "manifest.json is damaged"),
    "step_state_step_beyond_the_stage": (lambda r, d, t: (_edit_json(d / "step-checkpoint" / "state.json",
                                                                     lambda j: j.update(step=99999)),
                                                          _train(r, d))[1], 2, "state.json is damaged (step 99999"),
    "lock_is_a_directory": (lambda r, d, t: ((d / "lock").unlink(missing_ok=True), (d / "lock").mkdir(),
                                             _train(r, d))[2], 2, "is a directory where a file is needed"),
    "metrics_is_a_directory": (lambda r, d, t: ((d / "metrics.jsonl").unlink(), (d / "metrics.jsonl").mkdir(),
                                                _train(r, d))[2], 2, "is a directory where a file is needed"),
    # paths that are not what they must be
    "run_dir_under_a_file": (lambda r, d, t: (t.joinpath("afile").write_text("x"), _train(r, t / "afile" / "fresh"))[1],
                             2, "has a file where a directory is needed"),
    "run_dir_a_dangling_link": (lambda r, d, t: (t.joinpath("link").symlink_to(t / "nowhere"), _train(r, t / "link"))[1],
                                2, "exists and is not a directory"),
    "run_dir_is_a_finished_stage": (lambda r, d, t: _train(r, d / STAGE0), 2, "is a stage directory of a run"),
    "export_to_under_a_file": (lambda r, d, t: (t.joinpath("afile").write_text("x"),
                                                ["export", str(d), "--stage", "0", "--to", str(t / "afile" / "x")])[1],
                               2, "afile is not a directory"),
    "chat_data_without_a_chat_template": (lambda r, d, t: _train(r, t / "fresh", f"model.path={_no_chat(d, t)}",
                                                                 "stages.1.data.chat_template=true"), 2,
                                          "recipe key 'stages.1.data.chat_template'"),
    # the command line itself: click's usage errors, one line too
    "usage_option_without_its_value": (lambda r, d, t: ["train", str(r), "--run-dir"], 2,
                                       "Option '--run-dir' requires an argument"),
    "usage_unknown_option": (lambda r, d, t: ["eval", str(d), "--no-such-flag"], 2, "No such option"),
    "usage_not_an_integer": (lambda r, d, t: ["slurm", str(r), "--nodes", "two"], 2, "'two' is not a valid integer"),
    "usage_run_dir_is_a_file": (lambda r, d, t: ["eval", str(d / "ledger.json")], 2, "ledger.json"),
    # methods whose options select nothing to train
    "lora_targets_match_nothing": (lambda r, d, t: _train(r, t / "fresh", "method.name=lora",
                                                          "method.target_modules=[q_proj,nonexistent_proj]"), 2,
                                   "recipe key 'method.target_modules'"),
    "mora_targets_match_nothing": (lambda r, d, t: _train(r, t / "fresh", "method.name=mora",
                                                          "method.target_modules=[nonexistent_proj]"), 2,
                                   "recipe key 'method.target_modules'"),
    "hft_ratio_trains_nothing": (lambda r, d, t: _train(r, t / "fresh", "method.name=hft", "method.ratio=0.01"), 2,
                                 "left no parameter to train"),
    "eval_data_dir_without_the_tasks_files": (lambda r, d, t: _train(
        r, t / "fresh", "eval.after_each_stage=true", "eval.tasks=[llmcl_arc_easy]", f"eval.data_dir={t}"), 2,
        "has no arc_easy/arc_easy.jsonl"),
}


def _no_chat(run_dir: Path, tmp: Path) -> Path:
    """A copy of stage 0's model whose tokenizer has no chat template."""
    shutil.copytree(run_dir / STAGE0 / "model", tmp / "nochat")
    (tmp / "nochat" / "chat_template.jinja").unlink()
    return tmp / "nochat"


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


SLOW_FAULTS = {"eval_task_yaml_that_does_not_parse"}  # ~15 s: lm-eval indexes its whole task catalogue


@pytest.mark.parametrize("fault", [pytest.param(f, marks=pytest.mark.slow) if f in SLOW_FAULTS else f
                                   for f in sorted(FAULTS)])
def test_fault_is_one_line_and_keeps_the_finished_stage(fault, run_copy, tmp_path):
    recipe, run_dir = run_copy
    prepare, code, text = FAULTS[fault]
    if fault == "data_edited_before_resume":  # it edits a data file: a partial run of its own
        recipe, run_dir = make_partial(tmp_path / "own", pytest.MonkeyPatch())
    before = fingerprint(run_dir / STAGE0)
    ledger_before = (run_dir / "ledger.json").read_bytes()
    args = prepare(recipe, run_dir, tmp_path)
    result = cli(*args)
    assert_contract(result, code, text)
    if "stage_weights" not in fault and "stage_manifest" not in fault:
        assert fingerprint(run_dir / STAGE0) == before  # the finished stage is untouched
    if not fault.startswith("ledger_"):
        assert (run_dir / "ledger.json").read_bytes() == ledger_before  # nothing was marked done
    assert not (tmp_path / "fresh" / STAGE0).exists()  # input faults are refused before anything trains


def test_the_damage_is_detected_not_only_refused(partial, tmp_path):
    """Negative control: the undamaged copy resumes and finishes (so each row above fails for its fault)."""
    recipe, run_dir = partial
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    result = cli(*_train(recipe, copy))
    assert result.exit_code == 0, result.output
    assert json.loads((copy / "ledger.json").read_text())["stages"][1]["status"] == "done"


def test_status_says_what_train_would_do(run_copy):
    """`llmcl status` (what SLURM chains submit from): a done stage is one whose directory is there; one whose
    directory was deleted by hand trains again, so it is pending (an interrupted stage after it stays running)."""
    recipe, run_dir = run_copy
    lines = cli("status", str(recipe), "--run-dir", str(run_dir)).output.splitlines()
    assert [line.split("\t")[-1] for line in lines[1:]] == ["done", "running"]
    shutil.rmtree(run_dir / STAGE0)
    lines = cli("status", str(recipe), "--run-dir", str(run_dir)).output.splitlines()
    assert [line.split("\t")[-1] for line in lines[1:]] == ["pending", "running"]


def test_half_written_metrics_line_is_tolerated(run_copy):
    """A kill (or a full disk) in the middle of a metrics line: the resume drops it and finishes."""
    recipe, run_dir = run_copy
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write('{"stage": 1, "step": 3, "lo')
    result = cli(*_train(recipe, run_dir))
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in rows] == [(0, 1), (0, 2), (0, 3), (0, 4), (1, 1), (1, 2), (1, 3), (1, 4)]


# -- non-finite training -----------------------------------------------------------------------------------

def test_nonfinite_loss_stops_the_stage_and_never_marks_it_done(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml")
    run_dir = tmp_path / "run"
    result = cli(*_train(recipe, run_dir, "train.lr=1e30", "train.warmup=0", "train.max_grad_norm=0"))
    assert_contract(result, 2, "non-finite gradient norm")
    assert "stage 0 (facts)" in result.stderr and "on_nonfinite=skip" in result.stderr
    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert [s["status"] for s in ledger["stages"]] == ["running", "pending"]
    assert not (run_dir / STAGE0).exists()


def test_nonfinite_steps_are_skipped_and_counted_when_asked(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml")
    run_dir = tmp_path / "run"
    result = cli(*_train(recipe, run_dir, "train.lr=1e30", "train.warmup=0", "train.on_nonfinite=skip",
                         "stages.1.train.lr=1e-3"))
    assert result.exit_code == 0, result.output
    ledger = json.loads((run_dir / "ledger.json").read_text())
    skipped = ledger["stages"][0].get("skipped_steps", 0)
    def strict(constant):
        raise AssertionError(f"metrics.jsonl holds {constant}: not JSON")

    rows = [json.loads(line, parse_constant=strict) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    stage0 = [r for r in rows if r["stage"] == 0]
    assert 1 <= skipped == stage0[-1]["skipped_steps"] < 4  # the first step is finite, what follows is not
    assert stage0[-1]["loss"] is None and stage0[-1]["grad_norm"] is None  # a skipped step: null, not NaN


# -- the run directory lock ---------------------------------------------------------------------------------

_HOLD = """
import sys, time
from pathlib import Path
from llmcl.rundir.lock import acquire
lock = acquire(Path(sys.argv[1]), command="llmcl train other.yaml")
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_process_on_a_locked_run_dir_is_refused_naming_the_holder(run_copy):
    import socket

    recipe, run_dir = run_copy
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        for args in (_train(recipe, run_dir), ["eval", str(run_dir), "--stage", "0"]):
            result = cli(*args)
            assert_contract(result, 2, f"is in use by PID {holder.pid} on {socket.gethostname()}")
            assert "llmcl train other.yaml" in result.stderr
        assert not (run_dir / "stage-01-reverse").exists()
    finally:
        holder.kill()
        holder.wait()
    result = cli(*_train(recipe, run_dir))  # the holder died: its lock is taken over
    assert result.exit_code == 0, result.output
    assert (run_dir / "stage-01-reverse" / "manifest.json").exists()


def test_a_stale_lock_file_of_a_dead_process_is_taken_over(run_copy):
    recipe, run_dir = run_copy
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run_dir / "lock").write_text(json.dumps({"pid": int(dead.stdout), "host": "elsewhere", "command": "x"}))
    result = cli(*_train(recipe, run_dir))
    assert result.exit_code == 0, result.output
    assert (run_dir / "lock").read_text() == ""  # released


# -- the environment: a full disk, a read-only file system ---------------------------------------------------

@pytest.fixture
def tmpfs(tmp_path):
    mount = tmp_path / "fs"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_is_an_environment_error_and_keeps_the_finished_stage(run_copy, tmpfs):
    recipe, run_dir = run_copy
    shutil.copytree(run_dir, tmpfs / "run")
    run_dir = tmpfs / "run"
    before = fingerprint(run_dir / STAGE0)
    filler = tmpfs / "filler"
    with open(filler, "wb") as fh:  # leave 32 KiB: the lock and the ledger fit, stage 1's weights do not
        free = shutil.disk_usage(tmpfs).free
        fh.write(b"\0" * max(free - 32 * 1024, 0))
    result = cli(*_train(recipe, run_dir))
    assert_contract(result, 74, "no space left on device; free some space")
    assert fingerprint(run_dir / STAGE0) == before
    assert json.loads((run_dir / "ledger.json").read_text())["stages"][1]["status"] != "done"
    filler.unlink()  # the way out works: the same command resumes
    again = cli(*_train(recipe, run_dir))
    assert again.exit_code == 0, again.output


def test_read_only_run_dir_is_an_environment_error(run_copy, tmpfs):
    recipe, run_dir = run_copy
    shutil.copytree(run_dir, tmpfs / "run")
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    result = cli(*_train(recipe, tmpfs / "run"))
    assert_contract(result, 74, "read-only file system; write somewhere writable (--run-dir")


@pytest.mark.parametrize("code,text", [(errno.EACCES, "permission denied"), (errno.ENOSPC, "no space left"),
                                       (errno.EROFS, "read-only"), (errno.EDQUOT, "disk quota exceeded")])
def test_environment_errors_map_to_one_line(code, text):
    """The errno mapping itself (a root test process cannot be refused permission for real)."""
    from llmcl.errors import ENVIRONMENT_EXIT, environment_fault

    fault = environment_fault(RuntimeError("saving failed"), None)
    assert fault is None  # an unrelated error stays a bug (a traceback)
    assert environment_fault(RuntimeError("connect() failed: Permission denied")) is None  # not a file's I/O
    try:
        try:
            raise OSError(code, "x", "/runs/a/f")
        except OSError:
            raise KeyError("a bug while handling it") from None
    except KeyError as bug:
        assert environment_fault(bug) is None  # `from None`: the OSError is not its cause
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = OSError(code, "x", "/runs/a/metrics.jsonl")
    fault = environment_fault(wrapped)
    assert fault.exit_code == ENVIRONMENT_EXIT and str(fault).startswith("/runs/a/metrics.jsonl: " + text)


# -- signals from the first moment --------------------------------------------------------------------------

def test_sigterm_in_the_first_second_stops_cleanly(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml")
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "llmcl", "train", str(recipe), "--run-dir", str(run_dir)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)  # still importing torch
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("stopped: SIGTERM")
    stopped = json.loads((run_dir / "stopped.json").read_text())
    assert stopped["step_checkpoint"] is False and "before anything was trained" in stopped["reason"]
    assert not (run_dir / STAGE0).exists()


def test_a_failed_stage_write_keeps_the_pre_anneal_branch(tmp_path, monkeypatch):
    """The branch waits beside the stage directory and moves into it while the stage is written: a write that
    fails after that (a full disk) puts it back, so the rerun still continues from the pre-anneal weights."""
    from llmcl.rundir import artifacts, integrity

    class Tok:
        def save_pretrained(self, path):
            Path(path).mkdir(parents=True, exist_ok=True)
            (Path(path) / "tokenizer.json").write_text("{}")

    def artifact(out):
        (out / "model").mkdir()
        (out / "model" / "weights.bin").write_bytes(b"w")
        return {"kind": "full", "path": "model"}

    artifacts.write_stage(tmp_path, 0, "a", artifact=artifact, tokenizer=Tok(), method_state={}, branch=True)
    pending = tmp_path / "stage-00-a.continue"
    before = integrity.fingerprint(pending)
    real = integrity.fingerprint

    def full_disk(directory, skip=()):
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))

    monkeypatch.setattr(artifacts, "fingerprint", full_disk)
    with pytest.raises(Exception, match="no space left"):
        artifacts.write_stage(tmp_path, 0, "a", artifact=artifact, tokenizer=Tok(), method_state={})
    assert integrity.fingerprint(pending) == before and not (tmp_path / "stage-00-a").exists()
    monkeypatch.setattr(artifacts, "fingerprint", real)  # the rerun writes the stage with its branch inside
    artifacts.write_stage(tmp_path, 0, "a", artifact=artifact, tokenizer=Tok(), method_state={})
    assert not pending.exists() and (tmp_path / "stage-00-a" / "continue" / "manifest.json").exists()


# -- Ctrl-C ---------------------------------------------------------------------------------------------------

def test_ctrl_c_outside_training_is_one_line_and_exit_130(monkeypatch, tmp_path):
    """A KeyboardInterrupt (Ctrl-C while a recipe is read, a model loads or lm-eval scores outside a run) is
    the one line of an interrupted command, not click's 'Aborted!' and exit 1 (which the README keeps for bugs)."""
    import llmcl.cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(llmcl.cli, "load_checked", interrupted)
    result = cli("validate", str(write_recipe(tmp_path / "r.yaml")))
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 130 and len(lines) == 1 and lines[0].startswith("error: interrupted"), result.output


def test_ctrl_c_while_training_asks_for_a_stop_and_a_second_one_interrupts_at_once():
    """The first SIGINT is recorded like SIGTERM (the loop saves a step checkpoint and stops: test_resume.py);
    a second one raises KeyboardInterrupt where the code is; outside the block Ctrl-C is Python's again."""
    import os

    from llmcl.train.signals import StopSignals

    before = signal.getsignal(signal.SIGINT)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.requested == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before


def test_a_refused_write_names_its_file_and_keeps_what_the_file_held(tmp_path, monkeypatch):
    """A full disk reported at the flush (no file name in the OSError, as for an evaluation's task files): the
    one line names the file, the file keeps its old content and no temporary copy is left."""
    import os

    from llmcl.errors import EnvironmentFault
    from llmcl.rundir.atomic import write_text

    path = tmp_path / "stage.jsonl"
    path.write_text("old\n")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(EnvironmentFault, match=f"{path}: no space left on device"):
        write_text(path, "new\n")
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["stage.jsonl"]


def test_a_run_kept_without_its_data_still_reports_and_exports(tmp_path):
    """`llmcl report` and `llmcl export` read the run's recipe, rows and weights, not its data: a run archived
    without its data files still reports and exports; `llmcl eval`, which renders the stages' test splits from
    the data, says in one line which file is missing."""
    data = _write_jsonl(tmp_path / "facts.jsonl", _records("facts"))
    recipe = write_recipe(tmp_path / "r.yaml", train={"max_steps": 2, "batch_size": 4, "seq_len": 48},
                          stages=[{"name": "facts", "data": {"path": str(data), "holdout": 8}}],
                          eval={"after_each_stage": True, "limit": 2})
    run_dir = tmp_path / "run"
    trained = cli(*_train(recipe, run_dir))
    assert trained.exit_code == 0, trained.output
    data.unlink()
    report = cli("report", str(run_dir))
    assert report.exit_code == 0 and "facts" in report.output, report.output
    exported = cli("export", str(run_dir), "--to", str(tmp_path / "export"))
    assert exported.exit_code == 0 and (tmp_path / "export" / "model.safetensors").exists(), exported.output
    assert_contract(cli("eval", str(run_dir), "--stage", "0"), 2, f"data file {str(data)!r} does not exist")


def test_data_an_earlier_stage_trained_on_edited_before_a_later_stage_replays_it_is_one_line(tmp_path):
    """One job per stage (--stage N) with stage 0's training data edited between the jobs: the later stages replay
    it, so the run would not be the one a single job trains. The stage is refused in one line naming the file and
    the stage that trained on it; stage 0 stays as it was; with the original back the stage trains. Its test split
    may change (nothing trains on it: the report marks the rows scored on other items)."""
    d0 = tmp_path / "facts"
    d0.mkdir()
    train = _write_jsonl(d0 / "train.jsonl", _records("facts"))
    test = _write_jsonl(d0 / "test.jsonl", _records("facts")[:8])
    reverse = _write_jsonl(tmp_path / "reverse.jsonl", _records("reverse"))
    recipe = write_recipe(tmp_path / "r.yaml", train={"lr": 1e-3, "max_steps": 2, "batch_size": 4, "seq_len": 48,
                                                      "warmup": 0},
                          replay={"ratio": 0.5}, eval={"after_each_stage": False},
                          stages=[{"name": "facts", "data": {"path": str(d0)}},
                                  {"name": "reverse", "data": {"path": str(reverse)}},
                                  {"name": "again", "data": {"path": str(reverse)}}])
    run_dir = tmp_path / "run"
    assert run_cli(*_train(recipe, run_dir, "--stage", "0")).exit_code == 0
    before = fingerprint(run_dir / STAGE0)
    _write_jsonl(test, _records("facts")[8:16])  # the test split: no stage trains on it
    res = run_cli(*_train(recipe, run_dir, "--stage", "1"))
    assert res.exit_code == 0, res.output
    original = train.read_bytes()
    _write_jsonl(train, _records("facts")[:-1])
    res = run_cli(*_train(recipe, run_dir, "--stage", "2"))
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert res.exit_code == 2 and len(lines) == 1 and "Traceback" not in res.output, res.output
    assert f"data file {train} changed since stage 0 (facts) trained on it (has " in lines[0], lines[0]
    assert fingerprint(run_dir / STAGE0) == before
    train.write_bytes(original)
    assert run_cli(*_train(recipe, run_dir, "--stage", "2")).exit_code == 0
