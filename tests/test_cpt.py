"""Continual pre-training: lr traces across stage boundaries, replay shares, optimizer state, the infinite
schedule's anneal branch, token budgets, and text corpora that are never loaded whole."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_cli, write_recipe
from llmcl.data.batching import BatchPlan
from llmcl.schedules import Schedule, lr_at

WORDS = ("alpha beta gamma delta river stone cloud garden window bridge candle forest mirror island ladder "
         "pencil rocket saddle tiger violin").split()


def _text_dir(d, name, seed, docs=40, words=60):
    import random

    rng = random.Random(seed)
    (d / name).mkdir()
    for split, n in (("train", docs), ("test", 4)):
        rows = [{"text": " ".join(rng.choice(WORDS) for _ in range(words))} for _ in range(n)]
        (d / name / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(d / name)


def _metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _cpt_recipe(tmp_path, **changes):
    a, b = _text_dir(tmp_path, "a", 0), _text_dir(tmp_path, "b", 1)
    base = {"train": {"lr": 1e-3, "max_steps": 12, "batch_size": 4, "seq_len": 32, "warmup": 3},
            "stages": [{"data": {"path": a}}, {"data": {"path": b}}]}
    base.update(changes)
    return write_recipe(tmp_path / "cpt.yaml", **base)


def test_rewarming_trace_across_a_stage_boundary(tmp_path):
    recipe = _cpt_recipe(tmp_path, train={"lr": 1e-3, "max_steps": 12, "batch_size": 4, "seq_len": 32, "warmup": 3,
                                          "warmup_start": "previous", "min_lr_ratio": 0.1})
    assert run_cli("train", str(recipe), "--run-dir", str(tmp_path / "run")).exit_code == 0
    lrs = [m["lr"] for m in _metrics(tmp_path / "run")]
    s0 = Schedule("cosine", 12, 1e-3, 1e-4, warmup=3)
    s1 = Schedule("cosine", 12, 1e-3, 1e-4, warmup=3, start_lr=1e-4)  # re-warm from stage 0's final lr
    assert lrs == pytest.approx([lr_at(t, s0) for t in range(12)] + [lr_at(t, s1) for t in range(12)])
    assert lrs[11] == pytest.approx(1e-4) and lrs[12] == pytest.approx(1e-4 + 9e-4 / 3)  # no drop to 0 at the boundary
    ledger = json.loads((tmp_path / "run" / "ledger.json").read_text())
    assert ledger["stages"][0]["final_lr"] == pytest.approx(1e-4)


def test_infinite_schedule_trace_and_anneal_branch(tmp_path):
    recipe = _cpt_recipe(tmp_path, train={"lr": 1e-3, "max_steps": 20, "batch_size": 4, "seq_len": 32,
                                          "schedule": "infinite", "warmup": 2, "cooldown": 4, "const_lr_ratio": 0.5,
                                          "anneal": 5, "min_lr_ratio": 0.05})
    run = tmp_path / "run"
    assert run_cli("train", str(recipe), "--run-dir", str(run)).exit_code == 0
    lrs = [m["lr"] for m in _metrics(run)]
    first, later = lrs[:20], lrs[20:]
    assert first[1] == pytest.approx(1e-3) and first[6:15] == pytest.approx([5e-4] * 9)
    assert first[19] == pytest.approx(5e-5)  # annealed to min_lr
    assert later[:15] == pytest.approx([5e-4] * 15)  # stage 2: no re-warming, straight at const_lr
    # stage 0 saved its pre-anneal weights; stage 1 continued from them, not from the annealed ones
    m0 = json.loads((run / "stage-00-a" / "manifest.json").read_text())
    assert m0["continue"]["path"] == "stage-00-a/continue/model"
    released = load_file(str(run / "stage-00-a" / "model" / "model.safetensors"))
    branch = load_file(str(run / "stage-00-a" / "continue" / "model" / "model.safetensors"))
    key = "model.layers.1.mlp.up_proj.weight"
    assert not torch.equal(released[key], branch[key])
    # the branch is the model after step 15, before the anneal: a 15-step stage with no anneal reproduces it
    import yaml

    data = yaml.safe_load(recipe.read_text())
    data["train"].update(max_steps=15, anneal=0)
    data["stages"] = data["stages"][:1]
    recipe.write_text(yaml.safe_dump(data))
    assert run_cli("train", str(recipe), "--run-dir", str(tmp_path / "short")).exit_code == 0
    short = load_file(str(tmp_path / "short" / "stage-00-a" / "model" / "model.safetensors"))
    assert all(torch.equal(short[k], branch[k]) for k in short)


def test_anneal_branch_survives_a_crash_after_the_anneal_started(tmp_path, monkeypatch):
    train = {"lr": 1e-3, "max_steps": 20, "batch_size": 4, "seq_len": 32, "schedule": "infinite", "warmup": 2,
             "cooldown": 4, "anneal": 5, "min_lr_ratio": 0.05, "save_every": 4}
    recipe = _cpt_recipe(tmp_path, train=train)
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    assert run_cli("train", str(recipe), "--run-dir", str(clean)).exit_code == 0

    from llmcl import methods

    cls = methods.get("seqft")
    calls = {"n": 0}
    original = cls.after_step

    def after_step(self, model):
        original(self, model)
        calls["n"] += 1
        if calls["n"] == 18:  # stage 0, inside the anneal, after the branch and the step-16 checkpoint
            raise RuntimeError("crash")

    monkeypatch.setattr(cls, "after_step", after_step)
    with pytest.raises(RuntimeError):
        run_cli("train", str(recipe), "--run-dir", str(crashed))
    monkeypatch.undo()
    assert (crashed / "stage-00-a.continue" / "manifest.json").exists()
    assert run_cli("train", str(recipe), "--run-dir", str(crashed)).exit_code == 0
    for stage in ("stage-00-a/continue/model", "stage-00-a/model", "stage-01-b/model"):
        a = load_file(str(clean / stage / "model.safetensors"))
        b = load_file(str(crashed / stage / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), stage


def test_replay_share_matches_the_ratio_and_draws_from_earlier_stages(tmp_path):
    recipe = _cpt_recipe(tmp_path, train={"lr": 1e-3, "max_steps": 30, "batch_size": 4, "seq_len": 32, "warmup": 0},
                         replay={"ratio": 0.25})
    run = tmp_path / "run"
    assert run_cli("train", str(recipe), "--run-dir", str(run)).exit_code == 0
    m = _metrics(run)
    stage0 = [x["replay_fraction"] for x in m if x["stage"] == 0]
    stage1 = [x["replay_fraction"] for x in m if x["stage"] == 1]
    assert set(stage0) == {0.0}  # nothing earlier to replay
    assert abs(sum(stage1) / len(stage1) - 0.25) <= 0.01
    info = json.loads((run / "stage-01-b" / "stage.json").read_text())
    assert [r["source"] for r in info["replay"]] == ["stage:a"]


@pytest.mark.parametrize("ratio", [0.05, 0.25])
def test_replaying_text_into_instruction_data_is_noted_with_its_share_of_the_trained_tokens(ratio, tmp_path):
    import re

    from llmcl.data.batching import ListPool
    from llmcl.data.formatting import IGNORE, Example
    from llmcl.data.mixing import Source, replay_token_note
    from llmcl.data.stream import text_blocks
    from llmcl.models import load_tokenizer
    from llmcl.recipe import DataConfig, ModelConfig

    tok = load_tokenizer(ModelConfig(path="builtin:tiny"))
    own = ListPool([Example(list(range(10 + k % 5)), [IGNORE] * 8 + list(range(2 + k % 5))) for k in range(40)])
    blocks = text_blocks(DataConfig(path=_text_dir(tmp_path, "corpus", 0)), "train", tok, 64, 0, tmp_path / "cache")
    note = replay_token_note(own, [Source("corpus", blocks, 1.0)], ratio, "stages.1.replay.ratio")
    plan = BatchPlan(len(own), 8, 1, 1, 0, 1, replay_ratio=ratio, replay_sizes=[len(blocks)], replay_weights=[1.0])
    pools = [own, blocks]
    tokens = [[0, 0] for _ in range(300)]  # per step: own, replayed trained tokens, as the plan draws them
    for step in range(300):
        for src, j in plan.step_items(step):
            tokens[step][src] += pools[src].label_count(j)
    share = sum(t[1] for t in tokens) / sum(map(sum, tokens))
    assert note is not None and note.startswith(f"note: stages.1.replay.ratio={ratio:g} replays {ratio:.0%} of each")
    assert abs(int(re.search(r"about (\d+)% of the trained tokens", note).group(1)) / 100 - share) <= 0.02, (note, share)
    assert share > 2 * ratio  # what the note is for
    assert replay_token_note(own, [Source("same kind", own, 1.0)], ratio, "replay.ratio") is None  # no note


@pytest.mark.parametrize("ratio,batch,steps", [(0.05, 8, 50), (0.25, 4, 37), (0.1, 3, 11), (0.33, 16, 9)])
def test_replay_plan_is_exact_cumulatively_and_compute_equivalent(ratio, batch, steps):
    plan = BatchPlan(100, batch, 1, 1, seed=0, stage=1, replay_ratio=ratio, replay_sizes=[40, 10],
                     replay_weights=[1.0, 3.0])
    items = [plan.step_items(s) for s in range(steps)]
    assert all(len(it) == batch for it in items)  # every step has the same size: compute-equivalent
    replayed = sum(1 for it in items for src, _ in it if src)
    assert abs(replayed - ratio * batch * steps) < 1  # within one item of the ratio, after any number of steps
    own = [j for it in items for src, j in it if src == 0]
    assert sorted(own[:100]) == sorted(set(own[:100]))  # own data still goes through epochs without repeats
    again = BatchPlan(100, batch, 1, 1, 0, 1, replay_ratio=ratio, replay_sizes=[40, 10], replay_weights=[1.0, 3.0])
    assert [again.step_items(s) for s in range(steps)] == items  # deterministic by seed
    if replayed > 20:
        sources = [src for it in items for src, _ in it if src]
        assert sources.count(2) > sources.count(1)  # weights: source 2 is three times as likely


def test_named_replay_datasets_and_token_budget(tmp_path):
    extra = _text_dir(tmp_path, "pretrain", 7)
    recipe = _cpt_recipe(tmp_path, train={"lr": 1e-3, "max_tokens": 4 * 32 * 10, "batch_size": 4, "seq_len": 32,
                                          "warmup": 0},
                         replay={"ratio": 0.5, "previous_stages": False,
                                 "datasets": [{"path": extra, "weight": 1.0}]})
    run = tmp_path / "run"
    assert run_cli("train", str(recipe), "--run-dir", str(run)).exit_code == 0
    ledger = json.loads((run / "ledger.json").read_text())
    assert [s["steps"] for s in ledger["stages"]] == [10, 10]  # 1280 tokens / (4 x 32) per step
    assert [s["tokens"] for s in ledger["stages"]] == [1280, 1280]
    info = json.loads((run / "stage-00-a" / "stage.json").read_text())
    assert [r["source"] for r in info["replay"]] == [extra]  # a named dataset replays even in stage 0
    fractions = [x["replay_fraction"] for x in _metrics(run)]
    assert sum(fractions) / len(fractions) == pytest.approx(0.5)


def test_optimizer_state_keep_carries_the_moments(tmp_path):
    train = {"lr": 1e-3, "max_steps": 4, "batch_size": 4, "seq_len": 32, "warmup": 0}
    recipe = _cpt_recipe(tmp_path, train=train)
    import yaml

    data = yaml.safe_load(recipe.read_text())
    data["stages"] = [{"data": {"path": str(tmp_path / "a")}},
                      {"data": {"path": str(tmp_path / "b")}, "train": {"optimizer_state": "keep"}}]
    recipe.write_text(yaml.safe_dump(data))
    res = run_cli("train", str(recipe), "--run-dir", str(tmp_path / "keep"))
    assert res.exit_code == 0 and "optimizer state kept for" in res.output
    saved = torch.load(tmp_path / "keep" / "stage-00-a" / "optimizer.pt", weights_only=True)
    assert set(saved) >= {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"}
    assert all(int(s["step"]) == 4 for s in saved.values())
    data["stages"][1]["train"] = {}
    recipe.write_text(yaml.safe_dump(data))
    assert run_cli("train", str(recipe), "--run-dir", str(tmp_path / "reset")).exit_code == 0
    assert not (tmp_path / "reset" / "stage-00-a" / "optimizer.pt").exists()
    k, r = (load_file(str(tmp_path / d / "stage-01-b" / "model" / "model.safetensors")) for d in ("keep", "reset"))
    key = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(k[key], r[key])


@pytest.mark.slow  # writes and tokenizes 48 MB: -m slow, which CI runs (.ci/run)
def test_text_corpus_larger_than_a_memory_budget_is_never_loaded_whole(tmp_path):
    """A 48 MB corpus is tokenized into a memory-mapped file while the process grows by far less."""
    corpus = tmp_path / "big.txt"
    line = " ".join(WORDS) + "\n"
    with open(corpus, "w") as fh:
        for _ in range(48 * 2**20 // len(line)):
            fh.write(line)
    script = f"""
import sys
from pathlib import Path
from llmcl.data.stream import text_blocks, peak_rss_bytes
from llmcl.models import load_tokenizer
from llmcl.recipe import DataConfig, ModelConfig
tok = load_tokenizer(ModelConfig(path="builtin:tiny"))
tok("warm up the tokenizer " * 100)
before = peak_rss_bytes()
blocks = text_blocks(DataConfig(path={str(corpus)!r}, format="text"), "train", tok, 512, 0, Path({str(tmp_path)!r}) / "cache")
first, last = blocks[0], blocks[len(blocks) - 1]
print(len(blocks), blocks.n_tokens, peak_rss_bytes() - before)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr
    n_blocks, n_tokens, growth = map(int, out.stdout.split()[-3:])
    assert n_tokens > 5_000_000 and n_blocks == n_tokens // 512
    budget = 16 * 2**20
    assert growth < budget, f"peak RSS grew by {growth / 2**20:.1f} MiB for a 48 MiB corpus"


def test_text_stages_keep_every_positions_logits(tmp_path):
    """A text stage trains every position, so the loop keeps the model's full logits (the short path of the LM head
    at the trained positions is for instruction data); an instruction stage of the same model takes it."""
    from llmcl import recipe as recipe_mod
    from llmcl.rundir import Ledger
    from llmcl.train.distributed import make_accelerator
    from llmcl.train.loop import run_context
    from llmcl.train.progress import Display
    from llmcl.train.stage import build_stage

    text = _text_dir(tmp_path, "a", 0)
    flags = []
    for k, data in enumerate((text, "builtin:facts")):
        r = recipe_mod.load(write_recipe(tmp_path / f"r{k}.yaml", stages=[{"data": {"path": data}}]))
        run_dir = tmp_path / f"run{k}"
        accelerator = make_accelerator(r, run_dir, fresh=True)
        run = run_context(r, run_dir, accelerator, Ledger.open(run_dir, r), Display(enabled=False))
        flags.append(build_stage(run, 0).logits_at_labels)
        run.metrics.close()
    assert flags == [False, True]
