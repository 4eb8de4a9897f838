"""The method interface's contract, checked for every registered method (a new method is picked up without
anyone listing it): what a stage saves is the model it trained, the method state survives a save and a load,
and a run interrupted mid-stage resumes to the same bits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import Crash, crash_after, run_cli, untimed, write_recipe
from llmcl import methods, recipe as recipe_mod
from llmcl.rundir import Ledger, artifacts, load_tree
from llmcl.train.distributed import make_accelerator
from llmcl.train.loop import run_context
from llmcl.train.progress import Display
from llmcl.train.stage import build_stage, finish_stage
from llmcl.train.steps import train_steps

METHODS = sorted(methods.REGISTRY)
# I-LoRA saves its slow learner by default, which is not the model the optimizer trains: compare the fast one;
# LoRA's other way between stages (merge the adapter, start a fresh one) is checked too
COMPARABLE = [(m, {"evaluate": "fast"} if m == "ilora" else {}) for m in METHODS] + [("lora", {"between_stages": "merge"})]


def _recipe(tmp_path, name, **options):
    return write_recipe(tmp_path / f"{name}.yaml", method={"name": name, **options},
                        train={"lr": 5e-3, "max_steps": 4, "batch_size": 4, "seq_len": 48, "warmup": 1,
                               "save_every": 2})


def _tensors(stage_dir):
    """Every tensor a stage directory holds (model or adapter or bank, method state), by file and name."""
    return {f"{f.relative_to(stage_dir)}:{k}": v for f in sorted(stage_dir.rglob("*.safetensors"))
            for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("name,options", COMPARABLE, ids=[f"{m}-{'-'.join(map(str, o.values())) or 'default'}"
                                                            for m, o in COMPARABLE])
def test_a_stage_saves_the_model_it_trained(name, options, tmp_path):
    """The three stage functions called directly: the model in memory after finish equals the saved artifact
    loaded back by its manifest kind (what evaluation and the next stage load)."""
    r = recipe_mod.load(_recipe(tmp_path, name, **options))
    run_dir = tmp_path / "run"
    accelerator = make_accelerator(r, run_dir, fresh=True)
    run = run_context(r, run_dir, accelerator, Ledger.open(run_dir, r), Display(enabled=False))
    x = torch.tensor([[1, 5, 9, 14, 3, 7, 11, 2]])
    base = None
    for i in range(len(r.stages)):
        ctx = build_stage(run, i)
        if i == 0:
            base = accelerator.unwrap_model(ctx.model).eval()(x).logits.detach().clone()
        train_steps(ctx)
        model = accelerator.unwrap_model(ctx.model)
        finish_stage(ctx)
        trained = model.eval()(x).logits.detach()
        saved = artifacts.load(run_dir, run.ledger.manifest(i), r.model, r.seed, trainable=False)(x).logits
        torch.testing.assert_close(saved, trained, rtol=0, atol=1e-5)
        assert not torch.allclose(saved, base, atol=1e-4)  # it did learn something
    run.metrics.close()


@pytest.mark.parametrize("name", METHODS)
def test_method_state_survives_save_and_load(name, tmp_path):
    """A fresh method, prepared for the next stage and given the saved state, holds the state that was saved."""
    assert run_cli("train", str(_recipe(tmp_path, name)), "--run-dir", str(tmp_path / "run")).exit_code == 0
    r = recipe_mod.load(tmp_path / f"{name}.yaml")
    ledger = Ledger.read(tmp_path / "run")
    stage_dir = tmp_path / "run" / ledger.stage(1)["checkpoint"]
    saved = load_tree(stage_dir, "method_state")
    from llmcl.methods.base import StageInfo

    method = methods.create(r.method)
    model = artifacts.load(tmp_path / "run", ledger.manifest(1), r.model, r.seed, trainable=True)
    method.prepare(model, StageInfo(index=2, name="next", num_stages=3, max_steps=1, seed=r.seed + 2,
                                    origin=ledger.manifest(1)))
    method.load_state_dict(saved)
    _assert_contained(saved, method.state_dict())


def _assert_contained(saved, again, key="state"):
    """Everything `saved` holds is in `again` unchanged (prepare() may add its own stage's entries on top)."""
    if torch.is_tensor(saved):
        assert torch.equal(saved, again), key
    elif isinstance(saved, dict):
        for k, v in saved.items():
            assert k in again, f"{key}.{k}"
            _assert_contained(v, again[k], f"{key}.{k}")
    elif isinstance(saved, list) and saved and all(isinstance(v, dict) and "stage" in v for v in saved):
        assert [v for v in again if v["stage"] in {s["stage"] for s in saved}] == saved, key
    else:
        assert saved == again, key


@pytest.mark.parametrize("name", METHODS)
def test_a_crash_mid_stage_resumes_to_the_same_bits(name, tmp_path, monkeypatch):
    """Crash after step 3 of stage 1 (its step checkpoint is after step 2): the same command ends with every
    tensor of every stage directory equal to an uninterrupted run's."""
    recipe = _recipe(tmp_path, name)
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    assert run_cli("train", str(recipe), "--run-dir", str(clean)).exit_code == 0
    with monkeypatch.context() as m:
        crash_after(m, name, 7)
        with pytest.raises(Crash):
            run_cli("train", str(recipe), "--run-dir", str(crashed))
    assert json.loads((crashed / "step-checkpoint" / "state.json").read_text())["step"] == 2
    assert run_cli("train", str(recipe), "--run-dir", str(crashed)).exit_code == 0
    for stage in ("stage-00-facts", "stage-01-reverse"):
        a, b = _tensors(clean / stage), _tensors(crashed / stage)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stage
        states = [json.loads((d / stage / "method_state.json").read_text()) for d in (clean, crashed)]
        assert untimed(states[0]) == untimed(states[1]), stage


def test_the_readme_example_method_is_one_module_that_the_invariants_accept(tmp_path, monkeypatch):
    """The 'Adding a method' example, as the README prints it: registered by its module alone, it trains
    through the recipe, saves what it trained, and resumes bitwise (the invariants above, run on it)."""
    import re
    import sys
    import types

    from conftest import REPO

    text = (REPO / "README.md").read_text().split("### Adding a method", 1)[1]
    source = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    module = types.ModuleType("llmcl_readme_l2sp")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(methods, "REGISTRY", dict(methods.REGISTRY))  # the registration ends with the test
    exec(compile(source, "README.md", "exec"), module.__dict__)
    assert "l2sp" in methods.REGISTRY
    assert "strength" in recipe_mod.load(_recipe(tmp_path, "l2sp", strength=0.5)).method.__dict__
    for sub in ("saves", "resume"):
        (tmp_path / sub).mkdir()
    test_a_stage_saves_the_model_it_trained("l2sp", {"strength": 0.5}, tmp_path / "saves")
    test_a_crash_mid_stage_resumes_to_the_same_bits("l2sp", tmp_path / "resume", monkeypatch)


# adaptive OSFT measures layer importance with forward passes, which need real numbers: uniform on `meta`
ON_META = {"osft": {"rank_rule": "uniform"}}


def _held_tensors(obj, seen=None):
    """Every tensor reachable from a method or module: attributes, containers, submodules' parameters and
    buffers and plain tensor attributes (e.g. statistics a layer keeps)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _held_tensors(v, seen)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            yield from _held_tensors(v, seen)
    elif isinstance(obj, (torch.nn.Module, methods.Method)):
        for v in vars(obj).values():
            yield from _held_tensors(v, seen)


@pytest.mark.parametrize("name", METHODS)
def test_a_method_is_prepared_on_the_training_device(name, tmp_path):
    """build_stage on a training device that is not the CPU (`meta`, which has no data): everything the method
    makes (bases, masks, banks, EMA copies, statistics) must be there too, or a GPU run fails on its first step."""
    r = recipe_mod.load(_recipe(tmp_path, name, **ON_META.get(name, {})))
    run_dir = tmp_path / "run"
    real = make_accelerator(r, run_dir, fresh=True)

    class OnMeta:  # the accelerator, but training on `meta`; its own wrappers would copy the data back
        device = torch.device("meta")

        def __getattr__(self, attr):
            return getattr(real, attr)

        def prepare(self, *objects):
            return objects

    run = run_context(r, run_dir, OnMeta(), Ledger.open(run_dir, r), Display(enabled=False))
    ctx = build_stage(run, 0)
    held = list(_held_tensors(ctx.method)) + list(_held_tensors(ctx.model))
    assert held and sum(t.numel() for t in held) > 0
    elsewhere = {t.device.type for t in held} - {"meta"}
    assert not elsewhere, f"{name} keeps tensors on {elsewhere}"
    run.metrics.close()


def _hflm(lm_class, model, tokenizer):
    return lm_class(pretrained=model, tokenizer=tokenizer, batch_size=3, max_length=model.config.max_position_embeddings)


@pytest.mark.parametrize("name", METHODS)
def test_shared_context_scoring_gives_lm_eval_s_loglikelihoods_for_every_method(name, tmp_path):
    """The model evaluation loads after a stage, scored by lm-eval's HFLM and by llmcl's packed rows (one row per
    context with all its continuations), with sdpa and eager attention: the same log-likelihood (1e-5) and greedy
    flag for every request. Contexts of several lengths, 1- to 4-token continuations, a context with one
    continuation, and the model's own greedy continuation (flag true); continuations that could see each other, or
    that sat at other positions, would change the values. The same in bfloat16 (eval.dtype), to its rounding."""
    from lm_eval.models.huggingface import HFLM

    from llmcl.eval.scoring import _load_model, cast
    from llmcl.eval.shared_context import SharedContextScoring, shared_context_lm
    from llmcl.models import load_tokenizer

    r = recipe_mod.load(_recipe(tmp_path, name))
    run_dir = tmp_path / "run"
    run = run_context(r, run_dir, make_accelerator(r, run_dir, fresh=True), Ledger.open(run_dir, r),
                      Display(enabled=False))
    ctx = build_stage(run, 0)
    train_steps(ctx)
    finish_stage(ctx)
    model = _load_model(run_dir, r, 0, "cpu")
    g = torch.Generator().manual_seed(0)
    contexts = [torch.randint(5, 400, (n,), generator=g).tolist() for n in (9, 23, 4, 31)]
    requests = []
    for k, context in enumerate(contexts):
        for length in ([1, 2, 4, 3, 1] if k != 2 else [3]):
            requests.append((None, context, torch.randint(5, 400, (length,), generator=g).tolist()))
    with torch.no_grad():
        greedy = model.generate(torch.tensor([contexts[1]]), max_new_tokens=3, do_sample=False,
                                attention_mask=torch.ones(1, len(contexts[1]), dtype=torch.long))[0, -3:].tolist()
    requests.append((None, contexts[1], greedy))
    tok = load_tokenizer(r.model)
    lm_class = shared_context_lm(HFLM)
    values = lambda answers: torch.tensor([v for v, _ in answers])  # noqa: E731
    packed_rows = []
    spy = lambda lm: setattr(lm, "_score_rows", lambda batch, reqs: packed_rows.extend(batch) or  # noqa: E731
                             SharedContextScoring._score_rows(lm, batch, reqs))
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):  # eval.dtype bfloat16: the GPU default
            cast(model, dtype)
            expected = _hflm(HFLM, model, tok)._loglikelihood_tokens(requests)
            assert expected[-1][1] is True
            for attention in ("sdpa", "eager"):
                model.set_attn_implementation(attention)
                lm = _hflm(lm_class, model, tok)
                spy(lm)
                packed_rows.clear()
                got = lm._loglikelihood_tokens(requests)
                assert lm._packing is True and len({c for c, _ in packed_rows}) == 3, attention  # all but k=2
                assert lm._head_at_predictors is True, attention  # the LM head only where a token is predicted
                tol = 1e-5 if dtype == torch.float32 else 0.03  # bf16: packed and HFLM's rows round differently
                torch.testing.assert_close(values(got), values(expected), rtol=tol, atol=tol, msg=attention)
                if dtype == torch.float32:
                    assert [flag for _, flag in got] == [flag for _, flag in expected], attention


@pytest.mark.parametrize("name", METHODS)
def test_the_lm_head_gets_a_contiguous_input_in_the_trained_and_the_scored_model(name, tmp_path):
    """Generation runs the LM head on a view of the last position (hidden_states[:, -1:, :]), which PyTorch's CPU
    linear with a frozen weight multiplies 250x slower in bf16 (llmcl.models.contiguous_head). The model a method
    trains and the one evaluation loads after the stage hand their head a contiguous input, and generate the
    same tokens as without the hook."""
    from llmcl.eval.scoring import _load_model
    from llmcl.models import _contiguous_input

    r = recipe_mod.load(_recipe(tmp_path, name))
    run_dir = tmp_path / "run"
    accelerator = make_accelerator(r, run_dir, fresh=True)
    run = run_context(r, run_dir, accelerator, Ledger.open(run_dir, r), Display(enabled=False))
    ctx = build_stage(run, 0)
    train_steps(ctx)
    trained = accelerator.unwrap_model(ctx.model)
    finish_stage(ctx)
    run.metrics.close()
    x = torch.tensor([[1, 5, 9, 14, 3, 7, 11, 2], [4, 8, 15, 16, 23, 42, 6, 10]])
    for model in (trained.eval(), _load_model(run_dir, r, 0, "cpu")):
        head = model.get_output_embeddings()
        seen = []
        spy = head.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
        with torch.no_grad():
            tokens = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=3, do_sample=False)
            assert seen and all(seen)
            ours = {k: h for k, h in head._forward_pre_hooks.items() if h is _contiguous_input}
            for k in ours:  # without the hook: a view reaches the head, the same tokens come out
                del head._forward_pre_hooks[k]
            seen.clear()
            again = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=3, do_sample=False)
            head._forward_pre_hooks.update(ours)
            head._forward_pre_hooks.move_to_end(spy.id)
        assert ours and seen and not all(seen)
        assert torch.equal(tokens, again)
        spy.remove()
