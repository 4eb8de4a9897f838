"""End to end through the CLI on builtin:tiny: files written, their contents, stage control, error exits."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, run_cli, write_recipe
from llmcl.models import load_base_model
from llmcl import recipe
from llmcl.recipe import ModelConfig
from llmcl.schedules import Schedule, lr_at


def _weights(stage_dir):
    return load_file(str(stage_dir / "model" / "model.safetensors"))


def test_two_stage_run_writes_ledger_metrics_and_checkpoints(tmp_path, tiny_recipe):
    run_dir = tmp_path / "run"
    res = run_cli("train", str(tiny_recipe), "train.max_steps=5", "--run-dir", str(run_dir))
    assert res.exit_code == 0, res.output
    # the resolved recipe comes first and records the overrides
    resolved = (run_dir / "recipe.yaml").read_text()
    assert "max_steps: 5" in resolved

    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert [s["status"] for s in ledger["stages"]] == ["done", "done"]
    assert [s["checkpoint"] for s in ledger["stages"]] == ["stage-00-facts", "stage-01-reverse"]
    for s in ledger["stages"]:
        assert s["steps"] == 5 and s["tokens"] > 0 and s["wall_seconds"] > 0
        assert s["trainable_params"] == s["total_params"] > 3_000_000  # seqft trains everything

    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(m["stage"], m["step"]) for m in metrics] == [(0, s) for s in range(1, 6)] + [(1, s) for s in range(1, 6)]
    assert [m["global_step"] for m in metrics] == list(range(1, 11))
    for m in metrics:
        assert {"stage", "step", "loss", "lr", "tokens_per_s"} <= set(m)
        expected = Schedule("cosine", total=5, max_lr=1e-3, min_lr=1e-4, warmup=1)
        assert m["lr"] == pytest.approx(lr_at(m["step"] - 1, expected))
        assert m["tokens_per_s"] > 0 and m["loss"] > 0
    assert metrics[4]["loss"] < metrics[0]["loss"]  # the facts stage learns

    # each stage directory is a loadable HF model; training moved the weights stage after stage
    base = load_base_model(ModelConfig(path="builtin:tiny"), 0).state_dict()
    w0, w1 = _weights(run_dir / "stage-00-facts"), _weights(run_dir / "stage-01-reverse")
    key = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(w0[key], base[key]) and not torch.equal(w1[key], w0[key])
    manifest = json.loads((run_dir / "stage-01-reverse" / "manifest.json").read_text())
    assert manifest["kind"] == "full" and manifest["path"] == "stage-01-reverse/model"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "stage-01-reverse" / "model")
    assert torch.equal(model.state_dict()[key], w1[key])
    assert not (run_dir / "step-checkpoint").exists()  # removed once the stage is done


def test_finished_run_trains_nothing_and_says_so(tmp_path, tiny_recipe):
    run_dir = tmp_path / "run"
    assert run_cli("train", str(tiny_recipe), "--run-dir", str(run_dir)).exit_code == 0
    before = (run_dir / "ledger.json").read_text(), (run_dir / "metrics.jsonl").read_text()
    res = run_cli("train", str(tiny_recipe), "--run-dir", str(run_dir))
    assert res.exit_code == 0
    assert "nothing to train" in res.output
    assert ((run_dir / "ledger.json").read_text(), (run_dir / "metrics.jsonl").read_text()) == before


def test_stage_option_requires_previous_stage(tmp_path, tiny_recipe):
    run_dir = tmp_path / "run"
    res = run_cli("train", str(tiny_recipe), "--run-dir", str(run_dir), "--stage", "1")
    assert res.exit_code == 2
    assert "stage 0 (facts) is not done" in res.stderr and "Traceback" not in res.output
    assert run_cli("train", str(tiny_recipe), "--run-dir", str(run_dir), "--stage", "0").exit_code == 0
    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert [s["status"] for s in ledger["stages"]] == ["done", "pending"]
    assert run_cli("train", str(tiny_recipe), "--run-dir", str(run_dir), "--stage", "1").exit_code == 0
    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert [s["status"] for s in ledger["stages"]] == ["done", "done"]
    res = run_cli("train", str(tiny_recipe), "--run-dir", str(run_dir), "--stage", "1")
    assert res.exit_code == 0 and "already done" in res.output
    assert run_cli("train", str(tiny_recipe), "--run-dir", str(run_dir), "--stage", "7").exit_code == 2


def test_stage_jobs_equal_one_uninterrupted_run(tmp_path, tiny_recipe):
    """SLURM-style one-job-per-stage gives bit-identical weights to a single `llmcl train`."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli("train", str(tiny_recipe), "--run-dir", str(a)).exit_code == 0
    for s in ("0", "1"):
        assert run_cli("train", str(tiny_recipe), "--run-dir", str(b), "--stage", s).exit_code == 0
    wa, wb = _weights(a / "stage-01-reverse"), _weights(b / "stage-01-reverse")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_default_run_dir_is_runs_recipe_name(tmp_path, tiny_recipe, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_cli("train", str(tiny_recipe), "train.max_steps=1").exit_code == 0
    assert (tmp_path / "runs" / "tiny" / "ledger.json").exists()


def test_a_different_recipe_cannot_reuse_a_run_dir(tmp_path, tiny_recipe):
    run_dir = tmp_path / "run"
    assert run_cli("train", str(tiny_recipe), "--run-dir", str(run_dir), "--stage", "0").exit_code == 0
    res = run_cli("train", str(tiny_recipe), "train.lr=0.5", "--run-dir", str(run_dir))
    assert res.exit_code == 2 and "first difference at 'train.lr'" in res.stderr
    res = run_cli("status", str(tiny_recipe), "distributed.num_processes=2", "--run-dir", str(run_dir))
    assert res.exit_code == 2 and "first difference at 'distributed.num_processes'" in res.stderr
    # what does not decide the weights may change: how long ranks wait for each other, e.g.
    res = run_cli("status", str(tiny_recipe), "distributed.timeout_minutes=10", "--run-dir", str(run_dir))
    assert res.exit_code == 0, res.output


def test_a_run_whose_recipe_predates_a_key_resumes_with_the_keys_default(tmp_path, tiny_recipe):
    """A recipe.yaml written before llmcl had a key lacks it: the key is its default (what llmcl did before),
    not a difference that refuses the run."""
    run_dir = tmp_path / "run"
    assert run_cli("train", str(tiny_recipe), "--run-dir", str(run_dir), "--stage", "0").exit_code == 0
    stored = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    for stage in stored["stages"]:
        del stage["data"]["add_bos"]  # added after such runs were made
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(stored))
    res = run_cli("train", str(tiny_recipe), "--run-dir", str(run_dir))
    assert res.exit_code == 0, res.output
    assert json.loads((run_dir / "ledger.json").read_text())["stages"][1]["status"] == "done"
    res = run_cli("status", str(tiny_recipe), "stages.1.data.add_bos=true", "--run-dir", str(run_dir))
    assert res.exit_code == 2 and "first difference at 'stages.1.data.add_bos'" in res.stderr  # a real difference


def test_per_stage_overrides_change_that_stage_only(tmp_path):
    path = write_recipe(tmp_path / "r.yaml")
    res = run_cli("train", str(path), "stages.1.train.max_steps=2", "stages.1.train.lr=0.01", "--run-dir",
                  str(tmp_path / "run"))
    assert res.exit_code == 0, res.output
    ledger = json.loads((tmp_path / "run" / "ledger.json").read_text())
    assert [s["steps"] for s in ledger["stages"]] == [4, 2]
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(m["lr"] for m in metrics if m["stage"] == 1) == pytest.approx(0.01)


def test_grad_accum_equals_bigger_batch(tmp_path):
    """batch 4 x accum 2 trains on the same examples as batch 8 and gives the same weights (token-mean loss)."""
    a = write_recipe(tmp_path / "a.yaml", train={"lr": 1e-3, "max_steps": 3, "batch_size": 8, "seq_len": 48})
    b = write_recipe(tmp_path / "b.yaml", train={"lr": 1e-3, "max_steps": 3, "batch_size": 4, "grad_accum": 2,
                                                 "seq_len": 48})
    for r, d in ((a, "ra"), (b, "rb")):
        assert run_cli("train", str(r), "--run-dir", str(tmp_path / d), "--stage", "0").exit_code == 0
    wa, wb = _weights(tmp_path / "ra" / "stage-00-facts"), _weights(tmp_path / "rb" / "stage-00-facts")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5
    la = [json.loads(x)["loss"] for x in (tmp_path / "ra" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "rb" / "metrics.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, rel=1e-4)


def test_tensorboard_tracker_logs_global_steps(tmp_path):
    pytest.importorskip("tensorboard")
    path = write_recipe(tmp_path / "r.yaml", logging={"trackers": ["tensorboard"], "project": "tb"})
    assert run_cli("train", str(path), "train.max_steps=3", "--run-dir", str(tmp_path / "run")).exit_code == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accs = [EventAccumulator(str(p.parent)) for p in (tmp_path / "run" / "tb").rglob("events.out.tfevents*")]
    accs = [a for a in accs if a.Reload() and "train/loss" in a.Tags()["scalars"]]
    assert len(accs) == 1  # one run per recipe, across stages
    acc = accs[0]
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == list(range(1, 7))  # stage-aware: stage 2 continues at step 4
    stages = [e.value for e in acc.Scalars("train/stage")]
    assert stages == [0, 0, 0, 1, 1, 1]


def test_cli_validate_and_recipes(tiny_recipe):
    res = run_cli("validate", str(tiny_recipe))
    assert res.exit_code == 0 and res.output.startswith("ok: tiny: 2 stages (facts, reverse)")
    res = run_cli("validate", str(tiny_recipe), "train.lr=-1")
    assert res.exit_code == 2
    assert res.stderr.strip() == "error: recipe key 'train.lr': got -1.0; expected a number > 0"
    res = run_cli("recipes")
    assert res.exit_code == 0 and "quickstart.yaml" in res.output and "SmolLM2" in res.output


@pytest.mark.parametrize("args,message", [
    (["validate", "{recipe}", "train.bogus=1"], "error: recipe key 'train.bogus' is unknown"),
    (["validate", "no-such-recipe.yaml"], "error: recipe file 'no-such-recipe.yaml' not found"),
    (["train", "{recipe}", "stages.0.data.path=nope.jsonl"], "error: recipe key 'stages.0.data.path': data file"),
])
def test_user_errors_exit_2_with_one_line_and_no_traceback(tiny_recipe, args, message):
    """A real process: exit status 2, one line on stderr, no traceback, nothing loaded."""
    cmd = [sys.executable, "-m", "llmcl"] + [a.format(recipe=tiny_recipe) for a in args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_wandb_offline_tracker(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    path = write_recipe(tmp_path / "r.yaml", logging={"trackers": ["wandb"], "project": "llmcl-test"})
    assert run_cli("train", str(path), "train.max_steps=2", "--run-dir", str(tmp_path / "run")).exit_code == 0
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_unreachable_hub_model_is_a_one_line_error(tiny_recipe, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = run_cli("train", str(tiny_recipe), "model.path=no-such-org/no-such-model", "--run-dir", str(tmp_path / "r"))
    assert res.exit_code == 2
    assert res.stderr.startswith("error: cannot load the tokenizer of model.path='no-such-org/no-such-model'")
    assert len(res.stderr.strip().splitlines()) == 1


def test_unreachable_hub_dataset_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = write_recipe(tmp_path / "r.yaml", stages=[{"data": {"path": "no-such-org/no-such-data"}}])
    res = run_cli("train", str(path), "--run-dir", str(tmp_path / "run"))
    assert res.exit_code == 2
    assert res.stderr.startswith("error: cannot load hub dataset 'no-such-org/no-such-data' split")
    assert len(res.stderr.strip().splitlines()) == 1


def test_progress_display_on_a_terminal_shows_stage_loss_lr_throughput_eta():
    import io

    from rich.console import Console

    from llmcl.train.progress import Display

    buf = io.StringIO()
    display = Display(Console(file=buf, force_terminal=True, width=160), enabled=True)
    assert display.live
    display.start_stage(1, 3, "reverse", steps=10, start_step=0, note="100 examples")
    display.update(4, loss=1.2345, lr=3e-4, tokens_per_s=1234.0)
    display._progress.refresh()
    display.end_stage("stage 2/3 reverse: done")
    out = buf.getvalue()
    for text in ("stage 2/3", "reverse", "4/10", "loss 1.2345", "lr 3.00e-04", "1,234 tok/s", "ETA",
                 "stage 2/3 reverse: done"):
        assert text in out, text
    quiet = io.StringIO()
    plain = Display(Console(file=quiet, force_terminal=False), enabled=True)
    assert not plain.live
    plain.start_stage(0, 1, "a", steps=5, start_step=0, note="n")
    plain.update(1, 1.0, 1e-3, 10.0)
    assert quiet.getvalue().count("\n") == 1  # one line per stage event, no live bar


@pytest.mark.parametrize("precision", ["auto", "fp32", "bf16"])
def test_train_precision_decides_the_dtype_of_the_forward_pass(precision, tiny_recipe, tmp_path):
    """What the loop's autocast does to a matmul: fp32 on a CPU for auto and fp32, bf16 when asked."""
    from llmcl.train.distributed import make_accelerator

    r = recipe.load(tiny_recipe, [f"train.precision={precision}"])
    accelerator = make_accelerator(r, tmp_path, fresh=True)
    a = torch.randn(4, 4)
    with accelerator.autocast():
        out = a @ a
    gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    expected = torch.bfloat16 if precision == "bf16" or (precision == "auto" and gpu_bf16) else torch.float32
    assert out.dtype == expected


def test_a_finished_stage_is_freed_before_it_is_evaluated_and_the_next_loads(tmp_path, monkeypatch):
    """Nothing of a stage (weights, optimizer, method) stays in memory once it is saved: evaluation and the next
    stage's model would otherwise need twice the memory on a GPU."""
    import gc
    import weakref

    from llmcl.train import loop
    from llmcl.train.progress import Display

    refs = []
    real_finish = loop.finish_stage

    def finish(ctx):
        refs.append(weakref.ref(ctx.named[0][1]))
        real_finish(ctx)

    monkeypatch.setattr(loop, "finish_stage", finish)

    class Hooks:
        alive: list[bool] = []

        def on_start(self, accelerator, ledger):
            pass

        def on_stage_end(self, index, accelerator, ledger):
            gc.collect()
            self.alive.append(refs[-1]() is not None)

    hooks = Hooks()
    loop.run(recipe.load(write_recipe(tmp_path / "r.yaml")), tmp_path / "run", display=Display(enabled=False),
             hooks=hooks)
    assert hooks.alive == [False, False]


@pytest.mark.parametrize("native, precision, noted", [(False, "bf16", True), (True, "bf16", False),
                                                     (False, "fp32", False)])
def test_bf16_on_a_cpu_without_native_bfloat16_is_noted_in_one_line(native, precision, noted, tmp_path, monkeypatch):
    """An AVX2 CPU emulates bf16 matrix products (6-9x slower than fp32): a recipe that pins bf16 trains there
    with a one-line note that names the key, and no note where bf16 is native or the run is fp32."""
    from llmcl.train import distributed

    monkeypatch.setattr(distributed, "native_cpu_bf16", lambda: native)
    path = write_recipe(tmp_path / "r.yaml", train={"lr": 1e-3, "max_steps": 1, "batch_size": 2, "seq_len": 32,
                                                     "precision": precision},
                        stages=[{"data": {"path": "builtin:facts"}}])
    res = run_cli("train", str(path), "--run-dir", str(tmp_path / "run"))
    assert res.exit_code == 0, res.output
    lines = [line for line in res.output.splitlines() if "without native bfloat16" in line]
    assert len(lines) == (1 if noted else 0), res.output
    if noted:
        assert "train.precision: fp32" in lines[0] and "Traceback" not in res.output


@pytest.mark.parametrize("hub,datasets_expected", [(None, "1"), ("1", "1"), ("0", "0")])
def test_hf_hub_offline_0_lets_hub_datasets_through_too(monkeypatch, hub, datasets_expected):
    """The README's one switch: llmcl keeps the hub offline unless HF_HUB_OFFLINE=0, and `datasets` reads
    HF_DATASETS_OFFLINE before it, so that one follows HF_HUB_OFFLINE unless the user set it."""
    from llmcl.cli import _quiet_defaults

    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    if hub is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", hub)
    _quiet_defaults()
    assert os.environ["HF_DATASETS_OFFLINE"] == datasets_expected
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # set by the user: kept
    _quiet_defaults()
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"


def test_a_seq_len_past_the_models_positions_is_a_note_naming_the_key(tmp_path):
    """builtin:tiny was made for 2048 positions: train.seq_len 4096 trains (rotary positions run past it), with a
    note naming the key and the limit; 2048 gives none."""
    from llmcl.models import positions_note

    recipe = write_recipe(tmp_path / "r.yaml", train={"max_steps": 1, "batch_size": 2, "seq_len": 4096})
    res = run_cli("train", str(recipe), "--run-dir", str(tmp_path / "run"), "stages.1.train.seq_len=2048")
    assert res.exit_code == 0, res.output
    assert "note: train.seq_len=4096 is beyond the 2048 positions this model was trained at" in " ".join(res.output.split())
    assert "stages.1.train.seq_len" not in res.output
    model = type("M", (), {"config": type("C", (), {"n_positions": 1024})()})()  # GPT-2's name for the limit
    assert "stages.0.train.seq_len=2048 is beyond the 1024" in positions_note(model, 2048, "stages.0.train.seq_len")
    assert positions_note(model, 1024, "train.seq_len") is None


def test_a_seq_len_past_learned_positions_is_refused_naming_the_key_and_the_stage_before_stays(tmp_path):
    """A model with learned positions (GPT-2's wpe) cannot run past them: the stage whose train.seq_len reaches
    past is refused in one line naming its key, exit 2, before it trains; the stage before it is kept as it
    was. Rotary models only get the note (the test above)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from llmcl.models import smollm2_tokenizer_dir

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tokenizer), n_positions=32)
                    ).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    recipe = write_recipe(tmp_path / "r.yaml", model={"path": str(tmp_path / "gpt2")},
                          train={"max_steps": 1, "batch_size": 2, "seq_len": 32})
    run_dir = tmp_path / "run"
    res = run_cli("train", str(recipe), "--run-dir", str(run_dir), "stages.1.train.seq_len=40")
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    assert "stages.1.train.seq_len=40 is beyond the 32 positions" in lines[0], lines[0]
    assert "at most 32" in lines[0]
    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert [s["status"] for s in ledger["stages"]] == ["done", "pending"], ledger
    assert (run_dir / "stage-00-facts" / "model").is_dir() and not (run_dir / "stage-01-reverse").exists()


@pytest.mark.parametrize("where", ["stages.1.data", "replay.datasets.0"])
def test_data_that_trains_nothing_within_seq_len_is_refused_naming_its_recipe_key(where, tmp_path):
    """Records whose prompt fills train.seq_len keep no trained token: the source is refused in one line that
    names its recipe key (a later stage's data, or a replay dataset), not a bare `data.path`, exit 2. Found when
    the stage that reads it starts (tokenizing every stage up front would double the tokenization)."""
    bad = tmp_path / "long.jsonl"
    bad.write_text("".join(json.dumps({"prompt": "word " * 200, "completion": "y"}) + "\n" for _ in range(6)))
    changes = {"stages__1__data__path": str(bad)} if where.startswith("stages") else \
        {"replay": {"ratio": 0.25, "previous_stages": False, "datasets": [{"path": str(bad)}]}}
    recipe = write_recipe(tmp_path / "r.yaml", train={"max_steps": 1, "batch_size": 2, "seq_len": 48}, **changes)
    res = run_cli("train", str(recipe), "--run-dir", str(tmp_path / "run"))
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    assert lines[0].startswith(f"error: {where}.path {str(bad)!r}: no example keeps a trained token"), lines[0]


def test_a_model_directory_without_tokenizer_files_or_with_a_cut_weight_file_is_one_line(tmp_path):
    """Two common states of a user's own model directory: only model.save_pretrained was called (transformers
    raised a ValueError about sentencepiece), and a weight file cut short by an interrupted copy (safetensors'
    SafetensorError): each is one line, exit 2, saying what is wrong with the directory."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from llmcl.models import smollm2_tokenizer_dir, tiny_config

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    model = tmp_path / "mine"
    LlamaForCausalLM(tiny_config()).save_pretrained(model)
    recipe = write_recipe(tmp_path / "r.yaml", model={"path": str(model)}, train={"max_steps": 1, "batch_size": 2})

    def error(run):
        res = run_cli("train", str(recipe), "--run-dir", str(tmp_path / run))
        lines = [line for line in res.output.splitlines() if line.startswith("error:")]
        assert res.exit_code == 2 and len(lines) == 1 and "Traceback" not in res.output, res.output
        return lines[0]

    assert "the directory holds no tokenizer files (tokenizer.json," in error("no_tokenizer")
    tokenizer.save_pretrained(model)
    weights = model / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])
    assert f"cannot load model.path={str(model)!r}: a weight file is damaged (" in error("cut")
    weights.write_bytes(whole)  # as the message says: saved again; the same run directory then trains
    res = run_cli("train", str(recipe), "--run-dir", str(tmp_path / "cut"), "--stage", "0")
    assert res.exit_code == 0, res.output


def test_an_encoder_model_that_would_see_the_tokens_it_predicts_is_refused(tmp_path):
    """AutoModelForCausalLM loads BERT's LM head without is_decoder (a warning in transformers' log, which llmcl
    keeps quiet): its attention is bidirectional, so a changed later token moves an earlier position's logits and
    the "causal" loss is learned by looking. Refused in one line; with is_decoder: true it is causal and loads."""
    from transformers import AutoTokenizer, BertConfig, BertLMHeadModel

    from llmcl.errors import LlmclError
    from llmcl.models import load_base_model, smollm2_tokenizer_dir
    from llmcl.recipe import ModelConfig

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    for decoder in (False, True):
        path = tmp_path / f"bert-{decoder}"
        BertLMHeadModel(BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=32, is_decoder=decoder)).save_pretrained(path)
        tokenizer.save_pretrained(path)
    from transformers import AutoModelForCausalLM

    ids, later_changed = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[5, 6, 7, 9]])
    causal = load_base_model(ModelConfig(path=str(tmp_path / "bert-True")), 0).eval()
    seeing = AutoModelForCausalLM.from_pretrained(tmp_path / "bert-False").eval()
    with torch.no_grad():  # the premise: is_decoder decides whether an earlier position sees a later token
        assert torch.equal(causal(ids).logits[0, 0], causal(later_changed).logits[0, 0])
        assert not torch.equal(seeing(ids).logits[0, 0], seeing(later_changed).logits[0, 0])
    with pytest.raises(LlmclError, match=r"^model.path='.*bert-False' is a bert model whose attention sees the whole "
                                         r"text \(its config's is_decoder is false\)"):
        load_base_model(ModelConfig(path=str(tmp_path / "bert-False")), 0)


def test_a_lora_run_refuses_a_base_model_directory_that_changed_since_it_started(tmp_path):
    """A LoRA stage is a delta over the base model, loaded again from model.path for every later stage, row and
    export: a directory re-saved with other weights in between was used without a word (exports and scores of
    a model never trained). The run records the directory's files when its first stage starts; a changed file
    is one line, for training, evaluation and export alike; the same bytes put back (a new modification time)
    are the same model."""
    import shutil

    from transformers import AutoTokenizer, LlamaForCausalLM

    from llmcl.models import smollm2_tokenizer_dir, tiny_config

    model_dir, kept = tmp_path / "mine", tmp_path / "kept"
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config()).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(smollm2_tokenizer_dir()).save_pretrained(model_dir)
    shutil.copytree(model_dir, kept)
    recipe = write_recipe(tmp_path / "r.yaml", model={"path": str(model_dir)}, method={"name": "lora", "r": 4},
                          train={"max_steps": 2, "batch_size": 2, "seq_len": 32}, eval={"after_each_stage": False})
    run_dir = tmp_path / "run"
    assert run_cli("train", str(recipe), "--run-dir", str(run_dir), "--stage", "0").exit_code == 0
    recorded = json.loads((run_dir / "ledger.json").read_text())["base_model"]
    assert recorded["path"] == str(model_dir) and "model.safetensors" in recorded["files"]
    model = LlamaForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    model.save_pretrained(model_dir)  # the same size, other weights

    for args in (["train", str(recipe), "--run-dir", str(run_dir)], ["eval", str(run_dir), "--stage", "0"],
                 ["export", str(run_dir), "--to", str(tmp_path / "export")]):
        res = run_cli(*args)
        lines = [line for line in res.output.splitlines() if line.startswith("error:")]
        assert res.exit_code == 2 and len(lines) == 1 and "Traceback" not in res.output, (args, res.output)
        assert (f"model.path={str(model_dir)!r} changed since this run started (model.safetensors has other content "
                "(sha256 differs))") in lines[0], lines[0]
    assert not (tmp_path / "export").exists() and not (run_dir / "stage-01-reverse").exists()
    shutil.copy(kept / "model.safetensors", model_dir / "model.safetensors")  # the original bytes, a new mtime
    assert run_cli("train", str(recipe), "--run-dir", str(run_dir)).exit_code == 0
    assert (run_dir / "stage-01-reverse" / "manifest.json").is_file()
