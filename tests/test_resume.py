"""Exact resume: a run interrupted at any step (or during a save) and restarted with the same command ends
with weights bitwise equal to an uninterrupted run, and never marks a broken stage done."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, Crash, crash_after, run_cli, write_recipe


def _final_weights(run_dir, stage_dir="stage-01-reverse"):
    manifest = json.loads((run_dir / stage_dir / "manifest.json").read_text())
    name = "model/model.safetensors" if manifest["kind"] == "full" else "adapter/adapter_model.safetensors"
    return load_file(str(run_dir / stage_dir / name))


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


# 5 steps per stage, a step checkpoint every 2 steps; the crash comes after the n-th step of the whole run,
# before that step's checkpoint would be written, so each case resumes from an earlier step checkpoint
@pytest.mark.parametrize("method,crash_at,resume_from", [  # (every method's resume: test_method_contract)
    ("seqft", 8, (1, 2)), ("seqft", 4, (0, 2)), pytest.param("lora", 9, (1, 2), marks=pytest.mark.slow)])
def test_crash_then_same_command_equals_uninterrupted(tmp_path, monkeypatch, method, crash_at, resume_from):
    recipe = write_recipe(tmp_path / "r.yaml", method={"name": method, "between_stages": "merge", "dropout": 0.1} if method == "lora"
                          else {"name": method}, train={"lr": 1e-3, "max_steps": 5, "batch_size": 4, "seq_len": 48,
                                                        "save_every": 2, "warmup": 1})
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    assert run_cli("train", str(recipe), "--run-dir", str(clean)).exit_code == 0

    with monkeypatch.context() as m:
        crash_after(m, method, crash_at)
        with pytest.raises(Crash):
            run_cli("train", str(recipe), "--run-dir", str(crashed))
    ledger = json.loads((crashed / "ledger.json").read_text())
    assert ledger["stages"][1]["status"] != "done"
    state = json.loads((crashed / "step-checkpoint" / "state.json").read_text())
    assert (state["stage"], state["step"]) == resume_from
    assert run_cli("train", str(recipe), "--run-dir", str(crashed)).exit_code == 0

    assert _equal(_final_weights(clean), _final_weights(crashed))
    assert _equal(_final_weights(clean, "stage-00-facts"), _final_weights(crashed, "stage-00-facts"))
    # the resumed log has each step once, with the same losses as the clean run
    a, b = _metrics(clean), _metrics(crashed)
    assert [(m["stage"], m["step"]) for m in a] == [(m["stage"], m["step"]) for m in b]
    assert [m["loss"] for m in a] == [m["loss"] for m in b]
    assert [m["tokens"] for m in a] == [m["tokens"] for m in b]


def test_crash_while_saving_a_stage_never_marks_it_done(tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path / "r.yaml")
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    assert run_cli("train", str(recipe), "--run-dir", str(clean)).exit_code == 0

    from llmcl.rundir import artifacts

    real_save_tree = artifacts.save_tree
    calls = {"n": 0}

    def failing_save_tree(tree, directory, stem):
        calls["n"] += 1
        if calls["n"] == 2:  # stage 1's save, after its model files were written
            raise Crash("killed mid-save")
        return real_save_tree(tree, directory, stem)

    with monkeypatch.context() as m:
        m.setattr(artifacts, "save_tree", failing_save_tree)
        with pytest.raises(Crash):
            run_cli("train", str(recipe), "--run-dir", str(crashed))
    ledger = json.loads((crashed / "ledger.json").read_text())
    assert [s["status"] for s in ledger["stages"]] == ["done", "running"]
    assert not (crashed / "stage-01-reverse").exists()  # only the temporary directory was written
    assert (crashed / "stage-00-facts" / "manifest.json").exists()  # the finished stage is intact
    assert run_cli("train", str(recipe), "--run-dir", str(crashed)).exit_code == 0
    assert _equal(_final_weights(clean), _final_weights(crashed))
    assert not (crashed / "stage-01-reverse.tmp").exists()


def _train_cmd(recipe, run_dir):
    return [sys.executable, "-m", "llmcl", "train", str(recipe), "--run-dir", str(run_dir)]


SIGNAL_STEPS = 24  # a stage: long enough that the signal, sent from step 5-6 of stage 2 on, lands mid-stage


def _signal_recipe(path, save_every):
    return write_recipe(path, train={"lr": 1e-3, "max_steps": SIGNAL_STEPS, "batch_size": 4, "seq_len": 48,
                                     "save_every": save_every, "warmup": 2})


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The signal tests' recipe run to its end in a real process, with no step checkpoints: the one run each
    interrupted run (whatever its checkpoint interval, which must not change a single bit) is compared with."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    subprocess.run(_train_cmd(_signal_recipe(tmp / "r.yaml", 0), tmp / "clean"), check=True, cwd=REPO, env=_env(),
                   capture_output=True, timeout=600)
    return tmp / "clean"


def _interrupted_run(tmp_path, clean, save_every, ready, sig, after=None):
    """The signal tests' recipe in a real process that gets `sig` once ready(run_dir) is true; then
    after(run_dir, proc, stderr) looks at what it left, and the same command reruns to the end, which must
    give the uninterrupted run's weights and losses bit for bit."""
    recipe = _signal_recipe(tmp_path / "r.yaml", save_every)
    hit = tmp_path / "interrupted"
    proc = subprocess.Popen(_train_cmd(recipe, hit), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,  # Ctrl-C's default, even where a shell ignored it
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while time.time() < deadline and not ready(hit):
        assert proc.poll() is None, "the run finished before the signal; make the stage longer"
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert json.loads((hit / "ledger.json").read_text())["stages"][1]["status"] == "running"
    if after is not None:
        after(hit, proc, err)
    subprocess.run(_train_cmd(recipe, hit), check=True, cwd=REPO, env=_env(), capture_output=True, timeout=600)
    assert _equal(_final_weights(clean), _final_weights(hit))
    assert [m["loss"] for m in _metrics(clean)] == [m["loss"] for m in _metrics(hit)]
    return hit


def _step_checkpoint_at(run_dir, stage, step):
    try:
        s = json.loads((run_dir / "step-checkpoint" / "state.json").read_text())
        return s["stage"] == stage and s["step"] >= step
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return False


@pytest.mark.slow  # three process starts (~35 s); the SIGTERM test below stays in the default suite
def test_sigkill_mid_stage_then_restart_is_bitwise_equal(tmp_path, uninterrupted):
    """A real process killed with SIGKILL between step checkpoints, restarted with the same command."""

    def ready(run_dir):
        if _step_checkpoint_at(run_dir, 1, 6):
            time.sleep(0.15)  # land somewhere between checkpoints
            return True
        return False

    def after(run_dir, proc, err):
        assert proc.returncode == -signal.SIGKILL

    _interrupted_run(tmp_path, uninterrupted, 3, ready, signal.SIGKILL, after)


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])  # ~30 s each
def test_sigterm_mid_stage_saves_a_checkpoint_and_the_rerun_is_bitwise_equal(tmp_path, uninterrupted, sig):
    """SLURM preemption: SIGTERM to a running `llmcl train` with no periodic checkpoints at all; Ctrl-C (SIGINT)
    stops the same way."""

    def ready(run_dir):
        rows = _metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
        return any(r["stage"] == 1 and r["step"] >= 5 for r in rows)

    def after(run_dir, proc, err):
        assert proc.returncode == 75, err  # stopped, resumable: not success, not an error
        assert f"stopped: {sig.name}: stopped after step" in err and "Traceback" not in err
        state = json.loads((run_dir / "step-checkpoint" / "state.json").read_text())
        assert state["stage"] == 1 and 5 <= state["step"] < SIGNAL_STEPS
        assert sig.name in json.loads((run_dir / "stopped.json").read_text())["reason"]

    hit = _interrupted_run(tmp_path, uninterrupted, 0, ready, sig, after)
    assert not (hit / "stopped.json").exists()  # the rerun removed the marker
    assert [m["stage"] for m in _metrics(hit)].count(1) == SIGNAL_STEPS  # every step of stage 2 logged once


@pytest.mark.parametrize("rank", [0, 1])
def test_every_rank_that_stops_leaves_the_marker_a_batch_script_tests(rank, tmp_path, monkeypatch):
    """During a data-parallel evaluation a signal stops each rank where it is; the rank that got it may be rank 1
    while rank 0 fails in a collective its peer left. stopped.json (what train.sbatch requeues on) is written by
    whichever rank stopped, each through a temporary file of its own, so two at once cannot collide."""
    import contextlib
    from types import SimpleNamespace

    from llmcl import recipe as recipe_mod
    from llmcl.train import loop
    from llmcl.train.signals import Stopped

    def stopped(*args, **kwargs):
        raise Stopped("SIGUSR1: stopped while evaluating", step_checkpoint=False)

    monkeypatch.setattr(loop, "locked", lambda run_dir, accelerator: contextlib.nullcontext())
    monkeypatch.setattr(loop, "_run", stopped)
    accelerator = SimpleNamespace(process_index=rank, is_main_process=rank == 0)
    r = recipe_mod.load(write_recipe(tmp_path / "r.yaml"), [])
    (tmp_path / "run").mkdir()
    with pytest.raises(Stopped):
        loop.run(r, tmp_path / "run", accelerator=accelerator)
    marker = json.loads((tmp_path / "run" / "stopped.json").read_text())
    assert marker["reason"] == "SIGUSR1: stopped while evaluating" and marker["step_checkpoint"] is False
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["stopped.json"]  # no temporary file left


def test_a_signal_during_a_save_lets_the_save_finish_then_stops(tmp_path, monkeypatch):
    """SIGUSR1 (SLURM's time-limit warning) arriving while a step checkpoint is being written."""
    from llmcl.train import steps

    recipe = write_recipe(tmp_path / "r.yaml", train={"lr": 1e-3, "max_steps": 5, "batch_size": 4, "seq_len": 48,
                                                      "save_every": 2, "warmup": 0})
    clean, stopped = tmp_path / "clean", tmp_path / "stopped"
    assert run_cli("train", str(recipe), "--run-dir", str(clean)).exit_code == 0
    original = steps.save_step

    def save_step_signalled(run_dir, **kw):
        if kw["stage"] == 1:
            os.kill(os.getpid(), signal.SIGUSR1)  # delivered now, in the middle of the save
        original(run_dir, **kw)

    with monkeypatch.context() as m:
        m.setattr(steps, "save_step", save_step_signalled)
        res = run_cli("train", str(recipe), "--run-dir", str(stopped))
    assert res.exit_code == 75 and "SIGUSR1: stopped after step 2/5 of stage 1" in res.stderr
    assert json.loads((stopped / "step-checkpoint" / "state.json").read_text())["step"] == 2
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the handler is gone after the run
    assert run_cli("train", str(recipe), "--run-dir", str(stopped)).exit_code == 0
    assert _equal(_final_weights(clean), _final_weights(stopped))


@pytest.mark.slow  # a run stopped and resumed around an evaluation (~21 s here): -m slow, which CI runs (.ci/run)
def test_a_signal_during_evaluation_stops_it_at_once_and_the_rerun_scores_the_row(tmp_path, monkeypatch):
    """SLURM's SIGTERM while a row is scored (minutes, longer than the grace before SIGKILL): the scoring stops
    where it is, nothing half written, the finished stages stay done, and the rerun scores the row as a run that
    was never stopped did. Once during the base row, once during stage 0's."""
    from llmcl.eval import harness

    recipe = write_recipe(tmp_path / "r.yaml", eval={"after_each_stage": True, "limit": 4})
    clean = tmp_path / "clean"
    assert run_cli("train", str(recipe), "--run-dir", str(clean)).exit_code == 0
    clean_rows = {p.name: json.loads(p.read_text())["tasks"] for p in sorted((clean / "eval").glob("*.json"))}
    assert len(clean_rows) == 3
    original = harness.evaluate
    for call, row, done in [(1, "base", []), (2, "stage-00", [0])]:
        hit, calls, went_on = tmp_path / row, [], []

        def evaluate_signalled(*args, **kwargs):
            calls.append(1)
            if len(calls) == call:  # one lm-eval call a row here: `call` picks the row
                os.kill(os.getpid(), signal.SIGTERM)
                went_on.append(1)  # the handler raises before this line
            return original(*args, **kwargs)

        with monkeypatch.context() as m:
            m.setattr(harness, "evaluate", evaluate_signalled)
            res = run_cli("train", str(recipe), "--run-dir", str(hit))
        assert res.exit_code == 75 and not went_on, res.output
        assert "stopped: SIGTERM: stopped while evaluating" in res.stderr and "Traceback" not in res.stderr
        assert "SIGTERM" in json.loads((hit / "stopped.json").read_text())["reason"]
        assert not (hit / "eval" / f"{row}.json").exists() and not list((hit / "eval").glob("*.tmp"))
        ledger = json.loads((hit / "ledger.json").read_text())["stages"]
        assert [i for i, s in enumerate(ledger) if s["status"] == "done"] == done, row
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone after the run

        assert run_cli("train", str(recipe), "--run-dir", str(hit)).exit_code == 0
        assert _equal(_final_weights(clean), _final_weights(hit))
        assert clean_rows == {p.name: json.loads(p.read_text())["tasks"] for p in sorted((hit / "eval").glob("*.json"))}


def _as_if_written_on_cuda(path):
    """Relabel every tensor storage of a torch.save file as cuda:0 (what a GPU run's optimizer state records)."""
    import zipfile

    src = zipfile.ZipFile(path)
    entries = [(info, src.read(info.filename)) for info in src.infolist()]
    src.close()
    relabelled = 0
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as out:
        for info, data in entries:
            if info.filename.endswith("data.pkl"):
                relabelled += data.count(b"X\x03\x00\x00\x00cpu")
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            out.writestr(info, data)
    assert relabelled
    if not torch.cuda.is_available():  # the file now loads only where cuda:0 exists, unless mapped
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)


def test_optimizer_state_written_on_a_gpu_loads_on_the_cpu_not_on_gpu_0(tmp_path):
    """A step checkpoint and a kept optimizer state hold rank 0's tensors as they were saved (cuda:0 on a GPU
    node): they are read onto the CPU, then placed at each parameter's device, so that no rank materialises
    the whole state on GPU 0, and a GPU run resumes on a CPU node."""
    from llmcl.rundir.integrity import fingerprint
    from llmcl.rundir.steps import STATE, load_optimizer_by_name, load_step, rng_state, save_step

    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = torch.optim.AdamW([p])
    p.grad = torch.randn(4, 4)
    opt.step()
    save_step(tmp_path, stage=0, step=1, params={"w": p}, optimizer_state=opt.state_dict(), method_state={},
              progress={"tokens": 0, "wall_seconds": 0.0}, rng=rng_state(0))
    step_dir = tmp_path / "step-checkpoint"
    _as_if_written_on_cuda(step_dir / "optimizer.pt")
    state = json.loads((step_dir / STATE).read_text())
    state["files"] = fingerprint(step_dir, skip=(STATE,))
    (step_dir / STATE).write_text(json.dumps(state))
    loaded = load_step(tmp_path, 0, 5)["optimizer"]
    assert loaded["state"][0]["exp_avg"].device.type == "cpu"
    assert torch.equal(loaded["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])

    from llmcl.rundir.steps import save_optimizer_by_name

    save_optimizer_by_name(opt, [("w", p)], tmp_path / "optimizer.pt")
    _as_if_written_on_cuda(tmp_path / "optimizer.pt")
    fresh = torch.optim.AdamW([q := torch.nn.Parameter(torch.randn(4, 4))])
    assert load_optimizer_by_name(fresh, [("w", q)], tmp_path / "optimizer.pt", "cpu") == 1
    assert torch.equal(fresh.state[q]["exp_avg_sq"], opt.state[p]["exp_avg_sq"])


def test_each_rank_resumes_with_its_own_rng_state(monkeypatch):
    """A step checkpoint holds every rank's RNG state (cpu.R, cuda.R: the device that rank uses); rank R restores
    its own. One written before that holds rank 0's CPU state and every device's, restored in device order."""
    from llmcl.rundir.steps import restore_rng

    states = {}
    for r in (0, 1):
        torch.manual_seed(100 + r)
        states[r] = torch.get_rng_state()
    cuda = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s: cuda.update(own=s))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda ss: cuda.update(all=ss))
    saved = {"cpu.0": states[0], "cpu.1": states[1], "cuda.0": torch.tensor([0], dtype=torch.uint8),
             "cuda.1": torch.tensor([1], dtype=torch.uint8)}
    for r in (1, 0):
        restore_rng(saved, r)
        assert torch.equal(torch.get_rng_state(), states[r]) and int(cuda["own"]) == r
    legacy = {"cpu": states[0], **{f"cuda{i}": torch.tensor([i], dtype=torch.uint8) for i in (0, 1, 2, 10, 11)}}
    restore_rng(legacy, 1)
    assert torch.equal(torch.get_rng_state(), states[0]) and [int(s) for s in cuda["all"]] == [0, 1, 2, 10, 11]
