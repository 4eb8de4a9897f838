"""`llmcl export`: every method's stage reloads in plain transformers (a fresh process without llmcl) with the
logits `llmcl eval` scores; the model card carries the run's matrix; damaged runs and an offline hub are one line
and write nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import run_cli, write_recipe
from llmcl import methods, model_card, recipe as recipe_mod
from llmcl.export import NOT_EXPORTABLE
from llmcl.rundir import Ledger

TEXT = "Q: In which city does Kalo Mira live?\nAnswer: Tenvo"
# every method, and LoRA's other way between stages (the last stage's adapter sits on merged earlier adapters)
CASES = [(m, {}) for m in sorted(methods.REGISTRY)] + [("lora", {"between_stages": "merge"})]
CASE_IDS = [f"{m}-{'-'.join(map(str, o.values())) or 'default'}" for m, o in CASES]

RELOAD = textwrap.dedent("""
    import sys
    sys.modules["llmcl"] = None  # plain transformers: any import of llmcl fails
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    text = sys.argv[1]
    for out, dest in zip(sys.argv[2::2], sys.argv[3::2]):  # each export on its own, from its own directory
        tok = AutoTokenizer.from_pretrained(out)
        model = AutoModelForCausalLM.from_pretrained(out).eval()
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            torch.save({"ids": ids, "logits": model(ids).logits, "dtype": str(model.dtype)}, dest)
""")


def _train(tmp_path, name, eval_on=False, **options):
    tmp_path.mkdir(exist_ok=True)
    recipe = write_recipe(tmp_path / f"{name}.yaml", method={"name": name, **options},
                          train={"lr": 5e-3, "max_steps": 3, "batch_size": 4, "seq_len": 48, "warmup": 1},
                          eval={"after_each_stage": eval_on, "limit": 4})
    run = tmp_path / "run"
    res = run_cli("train", str(recipe), "--run-dir", str(run))
    assert res.exit_code == 0, res.output
    return run


def _evaluated_logits(run, stage, text):
    """The logits of the model `llmcl eval` scores for `stage`, on `text` tokenized by the stage's tokenizer."""
    from llmcl.eval.scoring import _load_model, load_run_recipe
    from llmcl.models import load_tokenizer

    recipe = load_run_recipe(run)
    model = _load_model(run, recipe, stage, device="cpu")
    ids = load_tokenizer(recipe.model)(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return ids, model(ids).logits


def _one_line_error(res):
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert lines[-1].startswith("error: "), res.output
    return lines[-1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every case trained and exported, then every export reloaded by one plain-transformers process (starting
    it is the slow part, not a reload): case id -> (run, export dir, the export's CLI result, reloaded logits
    file), and that process's result."""
    tmp = tmp_path_factory.mktemp("export")
    cases = {}
    for case, (name, options) in zip(CASE_IDS, CASES):
        run = _train(tmp / case, name, **options)
        res = run_cli("export", str(run), "--to", str(tmp / case / "export"), "--dtype", "fp32")
        cases[case] = (run, tmp / case / "export", res, tmp / case / "reloaded.pt")
    pairs = [str(p) for _, out, res, dest in cases.values() if res.exit_code == 0 for p in (out, dest)]
    proc = subprocess.run([sys.executable, "-c", RELOAD, TEXT, *pairs], capture_output=True, text=True,
                          timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    return cases, proc


@pytest.mark.parametrize("case", CASE_IDS)
def test_stages_and_exports_are_readable_as_the_umask_allows(case, exported):
    """transformers writes safetensors weights 0600: a stage or an export another user (or a group) should load
    gets the umask's modes, like every other file llmcl writes."""
    import os

    run, out, res, _ = exported[0][case]
    mask = os.umask(0)
    os.umask(mask)
    files = [p for d in [out, *run.glob("stage-*")] for p in d.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o666 & ~mask)}


@pytest.mark.parametrize("case", CASE_IDS)
def test_an_exported_stage_loads_in_plain_transformers_with_the_logits_eval_scores(case, exported):
    (run, out, res, dest), proc = exported[0][case], exported[1]
    kind = Ledger.read(run).manifest(1)["kind"]
    if kind in NOT_EXPORTABLE:  # refused, in one line, before anything is written
        assert "cannot be exported" in _one_line_error(res) and not out.exists()
        return
    assert res.exit_code == 0, res.output
    assert "exported stage 1 (reverse)" in res.output
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]  # merged: no adapter files
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md"} <= \
        {p.name for p in out.iterdir()}
    assert proc.returncode == 0, proc.stderr[-3000:]
    reloaded = torch.load(dest)
    ids, expected = _evaluated_logits(run, 1, TEXT)
    assert torch.equal(reloaded["ids"], ids) and reloaded["dtype"] == "torch.float32"
    torch.testing.assert_close(reloaded["logits"], expected, rtol=1e-5, atol=1e-5)
    _, stage0 = _evaluated_logits(run, 0, TEXT)
    assert not torch.allclose(stage0, expected, atol=1e-3)  # the export is the last stage, not an earlier one


def test_a_half_precision_export_holds_the_evaluated_weights_rounded(tmp_path):
    run = _train(tmp_path, "lora")
    out = tmp_path / "bf16"
    assert run_cli("export", str(run), "--to", str(out), "--dtype", "bf16", "--stage", "0").exit_code == 0
    from safetensors.torch import load_file

    from llmcl.eval.scoring import _load_model, load_run_recipe

    weights = load_file(str(out / "model.safetensors"))
    evaluated = _load_model(run, load_run_recipe(run), 0, device="cpu").state_dict()
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}
    for k, v in weights.items():
        assert torch.equal(v, evaluated[k].to(torch.bfloat16)), k
    assert "in bf16" in (out / "README.md").read_text()


def test_no_merge_writes_the_adapter_that_peft_loads_over_the_base_model(tmp_path):
    from peft import PeftModel

    from llmcl.models import load_base_model

    run = _train(tmp_path, "lora")
    out = tmp_path / "adapter"
    assert run_cli("export", str(run), "--to", str(out), "--no-merge", "--dtype", "fp32").exit_code == 0
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "builtin:tiny"
    r = recipe_mod.load(tmp_path / "lora.yaml")
    model = PeftModel.from_pretrained(load_base_model(r.model, r.seed), out).eval()
    ids, expected = _evaluated_logits(run, 1, TEXT)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    meta, _ = model_card.read((out / "README.md").read_text())
    assert meta["library_name"] == "peft"

    merged_run = _train(tmp_path / "m", "lora", between_stages="merge")
    line = _one_line_error(run_cli("export", str(merged_run), "--to", str(tmp_path / "x"), "--no-merge"))
    assert "merged (the default)" in line and not (tmp_path / "x").exists()


def test_the_model_card_carries_the_runs_matrix_stages_and_recipe(tmp_path):
    import yaml

    run = _train(tmp_path, "seqft", eval_on=True)
    out = tmp_path / "export"
    assert run_cli("export", str(run), "--to", str(out)).exit_code == 0
    matrix = json.loads((run / "report" / "matrix.json").read_text())  # written as `llmcl report` does
    meta, body = model_card.read((out / "README.md").read_text())
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"llmcl", "continual-learning", "seqft"} <= set(meta["tags"]) and "base_model" not in meta  # random init
    table = [line for line in body.splitlines() if line.startswith("| ") and not line.startswith("| after")]
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in table)}
    for label, values in zip(matrix["rows"], matrix["R"]):
        assert rows[label] == [("—" if v is None else f"{v:.4f}") for v in values], label
    assert len(matrix["rows"]) == 3 and matrix["rows"][0] == "base"
    m = matrix["metrics"]
    assert f"| {m['AA']:.4f} | {m['BWT']:+.4f} | {m['FWT']:+.4f} |" in body
    assert "| 1 | reverse **(this model)** | `builtin:reverse` | 3 | done |" in body
    recipe_block = body.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(recipe_block) == yaml.safe_load((run / "recipe.yaml").read_text())


def test_the_card_links_a_builtin_model_published_on_the_hub():
    assert model_card.hub_id("builtin:smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    for written in ("PEFT adapter", "merged model"):  # and says that the builtin is the hub's model quantized
        card = model_card.render(recipe={"name": "r", "model": {"path": "builtin:smollm2-135m"}}, recipe_text="",
                                 stage=0, stages=[{"name": "a", "data": "x", "steps": 1, "status": "done"}],
                                 method="lora", export={"as": written, "dtype": "float32"}, matrix=None)
        assert "dequantized from the Q4_1 GGUF" in card
        assert ("other logits than llmcl scored" in card) == (written == "PEFT adapter")
    assert model_card.hub_id("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert model_card.hub_id("builtin:tiny") is None and model_card.hub_id("/models/llama") is None


def test_a_missing_or_corrupt_stage_or_a_wrong_argument_is_one_line_and_writes_nothing(tmp_path):
    run = _train(tmp_path, "seqft")
    out = tmp_path / "export"
    ledger = Ledger.read(run)
    weights = next((run / ledger.stage(1)["checkpoint"]).rglob("model.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])  # a truncated copy
    assert "stage-01-reverse" in _one_line_error(run_cli("export", str(run), "--to", str(out)))
    assert not out.exists()
    import shutil

    assert "expected 'last' or a finished stage" in _one_line_error(
        run_cli("export", str(run), "--to", str(out), "--stage", "7"))
    assert "not an llmcl run directory" in _one_line_error(run_cli("export", str(tmp_path), "--to", str(out)))
    (out / "keep.txt").parent.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "not an empty directory" in _one_line_error(run_cli("export", str(run), "--to", str(out), "--stage", "0"))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    shutil.rmtree(out)
    shutil.rmtree(run / ledger.stage(0)["checkpoint"])  # a missing stage: no stage after it is done either
    line = _one_line_error(run_cli("export", str(run), "--to", str(out), "--stage", "0"))
    assert "no finished stage" in line and f"{ledger.stage(0)['checkpoint']} is missing" in line
    assert not out.exists()
    assert not list(tmp_path.glob("export.*"))  # no temporary directory left beside it
    assert not any(out.parent.glob("*.tmp"))


def test_push_to_hub_offline_or_unreachable_is_one_line_before_anything_is_written(tmp_path, monkeypatch):
    import huggingface_hub

    run = _train(tmp_path, "seqft")
    out = tmp_path / "export"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "offline" in _one_line_error(run_cli("export", str(run), "--to", str(out), "--push-to-hub", "me/model"))
    assert not out.exists()

    calls = []

    class Hub:
        fail = True

        def whoami(self):
            if Hub.fail:
                raise OSError("Connection refused\nmore detail")
            return {"name": "me"}

        def create_repo(self, repo, exist_ok):
            calls.append(("create", repo))

        def upload_folder(self, folder_path, repo_id, commit_message):
            from pathlib import Path

            calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "HfApi", Hub)
    line = _one_line_error(run_cli("export", str(run), "--to", str(out), "--push-to-hub", "me/model"))
    assert "Connection refused" in line and "more detail" not in line and not out.exists() and not calls
    assert "not a hub repo id" in _one_line_error(run_cli("export", str(run), "--to", str(out),
                                                           "--push-to-hub", "a/b/c"))
    Hub.fail = False
    res = run_cli("export", str(run), "--to", str(out), "--push-to-hub", "me/model")
    assert res.exit_code == 0 and "pushed to me/model" in res.output
    assert calls[0] == ("create", "me/model") and calls[1][:2] == ("upload", "me/model")
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(calls[1][2])
