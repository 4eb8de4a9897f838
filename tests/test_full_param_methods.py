"""HFT and OSFT: which matrices train, what stays bitwise frozen, what the orthogonality constraint keeps."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from conftest import Crash, crash_after, run_cli, write_recipe
from llmcl import methods
from llmcl.errors import LlmclError
from llmcl.methods.base import StageInfo


def _small(model_type: str, layers: int = 6):
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
              max_position_embeddings=64)
    if model_type in ("llama", "mistral", "qwen2"):
        kw["num_key_value_heads"] = 2
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw))


def _method(name, **cfg):
    cls = methods.get(name)
    return cls(cls.config_class(name=name, **cfg))


def _stage(i, seed=0, batches=None):
    return StageInfo(index=i, name=f"s{i}", num_stages=3, max_steps=1, seed=seed + i, batches=batches)


def _trained_modules(model):
    return {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad}


# -- HFT ------------------------------------------------------------------------------------------------

def test_hft_trains_half_of_every_category():
    model = _small("llama", layers=6)
    hft = _method("hft")
    hft.prepare(model, _stage(0))
    trained = _trained_modules(model)
    per_layer = Counter()
    for name in trained:
        parts = name.split(".")
        per_layer[(int(parts[2]), "ffn" if "mlp" in name else "attention" if "self_attn" in name else "norms")] += 1
    assert all(per_layer[(i, "attention")] == 2 for i in range(6))  # 2 of q, k, v, o in every layer
    ffn = [per_layer[(i, "ffn")] for i in range(6)]
    assert sorted(ffn) == [1, 1, 1, 2, 2, 2]  # 2 of 3 in half the layers, 1 of 3 in the other half
    assert all(per_layer[(i, "norms")] == 1 for i in range(6))
    assert not any(n.startswith(("model.embed_tokens", "lm_head", "model.norm")) for n in trained)  # default
    # no gradient and no optimizer state for frozen matrices
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(model.get_parameter(n).grad is None for n in frozen)


@pytest.mark.parametrize("ratio,layers", [(0.25, 8), (0.75, 5), (0.5, 7)])
def test_hft_other_ratios_stay_within_one_matrix(ratio, layers):
    model = _small("llama", layers=layers)
    chosen = _method("hft", ratio=ratio).draw(model, seed=3)
    for cat, per_layer_total in (("attention", 4), ("ffn", 3), ("norms", 2)):
        assert abs(len(chosen[cat]) - ratio * per_layer_total * layers) <= 1, cat


def test_hft_masks_are_redrawn_each_stage_and_reproducible():
    model = _small("llama")
    hft = _method("hft")
    m0, m1 = hft.draw(model, seed=0), hft.draw(model, seed=1)
    assert m0 != m1
    assert hft.draw(model, seed=0) == m0


def test_hft_granularity_ablations():
    model = _small("llama", layers=6)
    by_layer = _method("hft", granularity="layer").draw(model, seed=0)
    layers = {int(n.split(".")[2]) for n in by_layer["attention"]}
    assert len(layers) == 3 and len(by_layer["attention"]) == 12 and len(by_layer["ffn"]) == 9
    pooled = _method("hft", granularity="model").draw(model, seed=0)
    assert len(pooled["attention"]) + len(pooled["ffn"]) == round(0.5 * 6 * 7)
    trained = _method("hft", embeddings="trained").draw(model, seed=0)
    assert set(trained["embeddings"]) == {"model.embed_tokens", "lm_head", "model.norm"}


@pytest.mark.parametrize("model_type", ["qwen2", "mistral", "gpt_neox"])
def test_hft_maps_other_decoder_architectures(model_type):
    model = _small(model_type, layers=4)
    chosen = _method("hft").draw(model, seed=0)
    n_attn = 2 if model_type == "gpt_neox" else 4
    assert len(chosen["attention"]) == n_attn * 4 // 2
    assert chosen["ffn"] and chosen["norms"]


def test_unknown_architecture_lists_the_modules_it_found():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32))
    with pytest.raises(LlmclError, match=r"cannot map the layers of model type 'gpt2'.*attn.c_attn.*mlp.c_fc"):
        _method("hft").draw(model, seed=0)


def _run(tmp_path, method, name="run", steps=6, lr=3e-3, **method_cfg):
    recipe = write_recipe(tmp_path / f"{name}.yaml", method={"name": method, **method_cfg},
                          train={"lr": lr, "max_steps": steps, "batch_size": 4, "seq_len": 48, "warmup": 0,
                                 "weight_decay": 0.1, "save_every": 3})
    res = run_cli("train", str(recipe), "--run-dir", str(tmp_path / name))
    assert res.exit_code == 0, res.output
    return tmp_path / name


def _weights(run_dir, stage):
    return load_file(str(next(run_dir.glob(f"stage-{stage:02d}-*")) / "model" / "model.safetensors"))


def test_hft_run_freezes_half_bitwise_and_masks_differ_between_stages(tmp_path):
    from llmcl.models import load_base_model
    from llmcl.recipe import ModelConfig

    run = _run(tmp_path, "hft")
    base = load_base_model(ModelConfig(path="builtin:tiny"), 0).state_dict()
    w0, w1 = _weights(run, 0), _weights(run, 1)
    state = json.loads((run / "stage-01-reverse" / "method_state.json").read_text())
    masks = state["masks"]
    assert [m["stage"] for m in masks] == [0, 1] and masks[0]["trained"] != masks[1]["trained"]
    for stage, (before, after) in enumerate(((base, w0), (w0, w1))):
        trained = {n for names in masks[stage]["trained"].values() for n in names}
        for key in after:
            module = key.rsplit(".", 1)[0]
            if module in trained:
                assert not torch.equal(before[key], after[key]), key
            elif key != "lm_head.weight":
                assert torch.equal(before[key], after[key]), f"stage {stage}: frozen {key} changed"
    ledger = json.loads((run / "ledger.json").read_text())
    t, total = ledger["stages"][0]["trainable_params"], ledger["stages"][0]["total_params"]
    assert t < total / 4  # half of the blocks; the 3.1M embedding of the tiny model stays frozen


def test_hft_resume_reproduces_the_mask(tmp_path, monkeypatch):
    clean = _run(tmp_path, "hft", name="clean")
    crash_after(monkeypatch, "hft", 8)
    with pytest.raises(Crash):
        _run(tmp_path, "hft", name="crashed")
    monkeypatch.undo()
    crashed = _run(tmp_path, "hft", name="crashed")
    a = json.loads((clean / "stage-01-reverse" / "method_state.json").read_text())
    b = json.loads((crashed / "stage-01-reverse" / "method_state.json").read_text())
    assert a == b
    wa, wb = _weights(clean, 1), _weights(crashed, 1)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# -- OSFT -----------------------------------------------------------------------------------------------

def test_layer_similarity_of_identity_layers_is_one():
    from llmcl.methods.osft import layer_similarity

    model = _small("llama", layers=3)
    layers = list(model.model.layers)
    for layer in layers:  # zero the residual branches: each layer returns its input
        layer.self_attn.o_proj.weight.data.zero_()
        layer.mlp.down_proj.weight.data.zero_()
    batch = {"input_ids": torch.randint(0, 64, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    assert layer_similarity(model, layers, [batch]) == pytest.approx([1.0, 1.0, 1.0], abs=1e-5)


def test_osft_rank_rules():
    batch = {"input_ids": torch.randint(0, 64, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    model = _small("llama", layers=4)
    osft = _method("osft", min_ratio=0.1, max_ratio=0.8)
    osft.prepare(model, _stage(0, batches=lambda: iter([batch])))
    rec = osft.records[-1]
    assert min(rec["ratios"]) == pytest.approx(0.1) and max(rec["ratios"]) == pytest.approx(0.8)
    assert rec["k"]["model.layers.0.self_attn.q_proj.weight"] == round(rec["ratios"][0] * 32)
    most = rec["importance"].index(1.0)
    assert rec["ratios"][most] == pytest.approx(0.8)
    grown = _method("osft", rank_rule="uniform", uniform_ratio=0.25, growth=0.2)
    grown.prepare(_small("llama", layers=2), _stage(2))
    assert grown.records[-1]["ratios"] == pytest.approx([0.65, 0.65])
    auto = _method("osft", rank_rule="uniform", uniform_ratio=0.4)  # the default growth: 1 / the 3 stages
    for index, expected in ((0, 0.4), (1, 0.4 + 1 / 3), (2, 0.95)):  # 0.4 + 2/3 > 0.95: capped
        auto.prepare(_small("llama", layers=2), _stage(index))
        assert auto.records[-1]["ratios"] == pytest.approx([expected] * 2), index
    sched = _method("osft", stage_ratios=[0.2, 0.5])
    sched.prepare(_small("llama", layers=2), _stage(3))
    assert sched.records[-1]["ratios"] == [0.5, 0.5]


def _constraint_leak(run_dir, stage, w_start, w_end):
    """max over matrices of |U_k^T dW| / |dW| and |dW V_k| / |dW|, from the checkpoints and the recorded k."""
    record = json.loads((next(run_dir.glob(f"stage-{stage:02d}-*")) / "method_state.json").read_text())["records"][-1]
    worst, checked = 0.0, 0
    for name, k in record["k"].items():
        if k == 0:
            continue
        u, _, vh = torch.linalg.svd(w_start[name].float(), full_matrices=False)
        dw = (w_end[name] - w_start[name]).float()
        norm = dw.norm()
        assert norm > 0, f"{name} did not train"
        worst = max(worst, float((u[:, :k].T @ dw).norm() / norm), float((dw @ vh[:k].T).norm() / norm))
        checked += 1
    return worst, checked


def test_osft_updates_stay_orthogonal_to_the_protected_subspace_and_the_loss_falls(tmp_path):
    from llmcl.models import load_base_model
    from llmcl.recipe import ModelConfig

    run = _run(tmp_path, "osft", steps=10, lr=5e-3, rank_rule="uniform", uniform_ratio=0.6)
    base = load_base_model(ModelConfig(path="builtin:tiny"), 0).state_dict()
    w0, w1 = _weights(run, 0), _weights(run, 1)
    for stage, (start, end) in enumerate(((base, w0), (w0, w1))):
        leak, checked = _constraint_leak(run, stage, start, end)
        assert checked == 14 and leak < 1e-4, f"stage {stage}: leak {leak:.2e}"
    assert torch.equal(base["model.embed_tokens.weight"], w1["model.embed_tokens.weight"])  # others frozen
    losses = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    first = [m["loss"] for m in losses if m["stage"] == 0]
    assert first[-1] < first[0] - 0.05


def test_without_the_post_step_correction_adam_leaks_into_the_protected_subspace(tmp_path, monkeypatch):
    """The test above can fail: gradient projection alone lets Adam and weight decay leak."""
    from llmcl.models import load_base_model
    from llmcl.recipe import ModelConfig

    monkeypatch.setattr(methods.get("osft"), "after_step", lambda self, model: None)
    run = _run(tmp_path, "osft", steps=10, lr=5e-3, rank_rule="uniform", uniform_ratio=0.6)
    base = load_base_model(ModelConfig(path="builtin:tiny"), 0).state_dict()
    leak, _ = _constraint_leak(run, 0, base, _weights(run, 0))
    assert leak > 1e-2


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)])
@pytest.mark.parametrize("ratio", [0.2, 0.8])
def test_osft_projector_is_the_two_sided_projection_whichever_basis_it_uses(shape, ratio):
    """The projector maps onto the complement of the k protected directions on each side, through U_k or,
    where the SVD gives that side's whole basis and fewer directions remain, through the complement: the same
    matrix as (I - U_k U_k^T) x (I - V_k V_k^T) either way, in place or not; the complement is taken exactly
    on the short side(s) when k > half of it."""
    from llmcl.methods.osft import Projector

    torch.manual_seed(0)
    m, n = shape
    u, _, vh = torch.linalg.svd(torch.randn(m, n), full_matrices=False)
    k = round(ratio * min(m, n))
    uk, vk = u[:, :k], vh[:k].T
    x = torch.randn(m, n)
    expected = (torch.eye(m) - uk @ uk.T) @ x @ (torch.eye(n) - vk @ vk.T)
    p = Projector(u, vh, k)
    assert (p.left_keep, p.right_keep) == (ratio > 0.5 and m <= n, ratio > 0.5 and n <= m)
    assert p.left.shape[1] + p.right.shape[1] < 2 * k if ratio > 0.5 else p.left.shape[1] == p.right.shape[1] == k
    for inplace in (False, True):
        y = x.clone()
        out = p(y, inplace=inplace)
        assert torch.allclose(out, expected, atol=1e-5), inplace
        assert torch.equal(y, x) != inplace  # in place overwrites its input, otherwise it is left alone
    plain = Projector(u, vh, k, complements=False)
    assert not (plain.left_keep or plain.right_keep) and torch.allclose(plain(x), expected, atol=1e-5)


def test_osft_projector_through_the_complement_is_the_more_accurate_when_most_is_protected():
    """At 95% preserved, subtracting U_k U_k^T x from x cancels most of x; mapping onto the few remaining
    directions does not: against a float64 projection, its fp32 error is the smaller."""
    from llmcl.methods.osft import Projector

    torch.manual_seed(0)
    u, _, vh = torch.linalg.svd(torch.randn(64, 64, dtype=torch.float64))
    x, k = torch.randn(64, 64, dtype=torch.float64), 61
    eye = torch.eye(64, dtype=torch.float64)
    exact = (eye - u[:, :k] @ u[:, :k].T) @ x @ (eye - vh[:k].T @ vh[:k])
    error = {c: float((Projector(u.float(), vh.float(), k, complements=c)(x.float()).double() - exact).norm()
                      / exact.norm()) for c in (True, False)}
    assert error[True] < error[False] / 2, error


def test_osft_with_complement_bases_trains_the_same_weights_as_with_the_protected_ones(tmp_path, monkeypatch):
    """A run whose projections go through the complements where they are smaller (60% preserved: 13 of the
    tiny model's 32 directions remain on each side of its square matrices, on the short side of the others)
    ends at the weights of one that subtracts U_k and V_k everywhere, as before, to 1e-5. With a larger
    adam_eps: at the default 1e-8 Adam's first steps divide every gradient element by its own magnitude, so
    float rounding in elements near zero changes whole updates (two orderings of the old projection, a
    subtraction and an addmm, already differ by 2e-4 after six steps of this run)."""
    import llmcl.methods.osft as osft_mod

    def run(name):
        recipe = write_recipe(tmp_path / f"{name}.yaml", method={"name": "osft", "rank_rule": "uniform",
                                                                 "uniform_ratio": 0.6},
                              train={"lr": 5e-3, "max_steps": 6, "batch_size": 4, "seq_len": 48, "warmup": 0,
                                     "weight_decay": 0.1, "adam_eps": 1e-4},
                              stages=[{"name": "facts", "data": {"path": "builtin:facts"}}])
        assert run_cli("train", str(recipe), "--run-dir", str(tmp_path / name)).exit_code == 0
        return _weights(tmp_path / name, 0)

    real, made = osft_mod.Projector, {True: [], False: []}

    def recording(complements):
        return lambda u, vh, k, **_: made[complements].append(real(u, vh, k, complements=complements)) or made[complements][-1]

    monkeypatch.setattr(osft_mod, "Projector", recording(True))
    fast = run("fast")
    monkeypatch.setattr(osft_mod, "Projector", recording(False))
    plain = run("plain")
    assert len(made[True]) == len(made[False]) == 14
    assert all(p.left_keep or p.right_keep for p in made[True])  # every matrix has a short side with 13 < 19 left
    assert not any(p.left_keep or p.right_keep for p in made[False])
    worst = max(float((fast[k] - plain[k]).abs().max() / plain[k].abs().max()) for k in plain)
    assert worst < 1e-5 and any(not torch.equal(fast[k], plain[k]) for k in plain), worst
