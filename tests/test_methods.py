"""SeqFT and LoRA behind the method interface: what trains, what is saved, how stages chain."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, write_recipe
from llmcl import methods
from llmcl.methods.base import StageInfo
from llmcl.models import count_parameters, load_base_model
from llmcl.rundir import artifacts
from llmcl.recipe import ModelConfig

TINY = ModelConfig(path="builtin:tiny")
STAGE = StageInfo(index=0, name="s", num_stages=1, max_steps=1, seed=0)


def _method(name, **cfg):
    cls = methods.get(name)
    return cls(cls.config_class(name=name, **cfg))


def test_registry_suggests_near_names():
    with pytest.raises(Exception, match="did you mean 'seqft'"):
        methods.get("seqtf")


def test_seqft_trains_everything_or_everything_but_embeddings():
    model = _method("seqft").prepare(load_base_model(TINY, 0), STAGE)
    trainable, total = count_parameters(model)
    assert trainable == total
    model = _method("seqft", train_embeddings=False).prepare(load_base_model(TINY, 0), STAGE)
    trainable, total = count_parameters(model)
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    assert total - trainable == vocab * hidden  # tied embedding/LM head frozen, nothing else


def test_lora_trains_only_low_rank_factors_of_every_linear():
    model = load_base_model(TINY, 0)
    linears = [(m.in_features, m.out_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    method = _method("lora", r=4)
    model = method.prepare(model, STAGE)
    named = method.trainable_parameters(model)
    assert named and all("lora_A" in n or "lora_B" in n for n, _ in named)
    assert sum(p.numel() for _, p in named) == sum(4 * (i + o) for i, o in linears)


def _lora_run(tmp_path, between):
    recipe = write_recipe(tmp_path / f"{between}.yaml", method={"name": "lora", "r": 4, "alpha": 8,
                                                                "between_stages": between},
                          train={"lr": 5e-3, "max_steps": 4, "batch_size": 4, "seq_len": 48})
    run_dir = tmp_path / between
    res = run_cli("train", str(recipe), "--run-dir", str(run_dir))
    assert res.exit_code == 0, res.output
    return run_dir


def _adapter(run_dir, stage):
    return load_file(str(run_dir / stage / "adapter" / "adapter_model.safetensors"))


def test_lora_continue_keeps_one_adapter_and_a_frozen_base(tmp_path):
    run_dir = _lora_run(tmp_path, "continue")
    m0 = json.loads((run_dir / "stage-00-facts" / "manifest.json").read_text())
    m1 = json.loads((run_dir / "stage-01-reverse" / "manifest.json").read_text())
    assert m0 == {**m0, "kind": "peft", "path": "stage-00-facts/adapter", "merged": []}
    assert m1["merged"] == []
    a0, a1 = _adapter(run_dir, "stage-00-facts"), _adapter(run_dir, "stage-01-reverse")
    assert a0.keys() == a1.keys()
    key = next(k for k in a0 if "lora_B" in k)
    assert a0[key].abs().sum() > 0 and not torch.equal(a0[key], a1[key])  # stage 1 continued stage 0's adapter
    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert all(s["trainable_params"] < s["total_params"] / 10 for s in ledger["stages"])

    # PEFT users can load the adapter directly; the base weights under it are the untouched base model
    from peft import PeftModel

    base = load_base_model(TINY, 0)
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    model = PeftModel.from_pretrained(base, run_dir / "stage-01-reverse" / "adapter")
    w = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert torch.equal(w, reference["model.layers.0.self_attn.q_proj.weight"])


def test_lora_merge_folds_each_adapter_into_the_base(tmp_path):
    run_dir = _lora_run(tmp_path, "merge")
    m1 = json.loads((run_dir / "stage-01-reverse" / "manifest.json").read_text())
    assert m1["merged"] == ["stage-00-facts/adapter"]
    a0 = _adapter(run_dir, "stage-00-facts")
    scale = 8 / 4
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    delta0 = scale * a0[f"{prefix}.lora_B.weight"] @ a0[f"{prefix}.lora_A.weight"]
    base_w = load_base_model(TINY, 0).state_dict()["model.layers.0.self_attn.q_proj.weight"]

    model = artifacts.load(run_dir, m1, TINY, 0, trainable=False)
    merged_w = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    torch.testing.assert_close(merged_w, base_w + delta0, rtol=0, atol=1e-6)
    # the stage-1 adapter started fresh: it is not stage 0's adapter trained further
    a1 = _adapter(run_dir, "stage-01-reverse")
    assert not torch.allclose(a1[f"{prefix}.lora_A.weight"], a0[f"{prefix}.lora_A.weight"])


@pytest.mark.parametrize("model_type", sorted(__import__("llmcl.methods.arch", fromlist=["x"]).ARCHITECTURES))
def test_every_mapped_architecture_maps_all_of_a_layers_matrices_and_norms(model_type):
    """A tiny random model of each architecture the layer map names (README: the mapped layouts): it maps, and
    every linear layer and every norm with a weight in a decoder layer is in one of its categories (an unmapped
    norm would stay frozen under HFT whatever its ratio; OLMo-2 has no input_layernorm)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmcl.methods import arch

    config = AutoConfig.for_model(model_type, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=2, vocab_size=64, head_dim=8)
    model = AutoModelForCausalLM.from_config(config)
    mapping = arch.layer_map(model, "hft")
    layer = arch.decoder_layers(model, mapping)[0]
    weighted = {n for n, m in layer.named_modules() if n and isinstance(getattr(m, "weight", None), torch.nn.Parameter)}
    assert weighted == set(mapping.attention + mapping.ffn) | {n for n in mapping.norms if n in weighted}
    assert {n for n in weighted if "norm" in n} <= set(mapping.norms)
