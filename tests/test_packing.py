"""train.packing: a micro-batch's examples as packed rows (positions restarting at every example, attention
confined to it) are the same training as one padded row per example: the same tokens and labels, no token that
sees another example, and for every registered method the same loss, gradients and method state."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from conftest import Crash, crash_after, run_cli, untimed, write_recipe
from llmcl import methods, recipe as recipe_mod
from llmcl.data.batching import collate, collate_packed, fetch, label_tokens, make_batch, model_inputs
from llmcl.data.formatting import IGNORE, Example
from llmcl.layers import varlen
from llmcl.models import load_base_model, load_tokenizer, smollm2_tokenizer_dir, tiny_config, why_not_packable
from llmcl.recipe import ModelConfig
from llmcl.rundir import Ledger
from llmcl.train.distributed import make_accelerator
from llmcl.train.loop import run_context
from llmcl.train.progress import Display
from llmcl.train.stage import build_stage
from llmcl.train.steps import forward_loss

METHODS = sorted(methods.REGISTRY)
TINY = ModelConfig(path="builtin:tiny")


def _examples(lengths: list[int], seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for k, n in enumerate(lengths):
        ids = torch.randint(5, 1000, (n,), generator=g).tolist()
        prompt = n // 2 if k % 2 else 0  # a prompt whose labels are IGNORE and its completion, or text (all labels)
        out.append(Example(ids, [IGNORE] * prompt + ids[prompt:]))
    return out


def test_packed_rows_hold_every_example_once_with_its_positions_restarting():
    examples = _examples([30, 7, 12, 25, 5, 40, 9, 3])
    batch = collate_packed(examples, pad_id=0, capacity=48)
    rows, width = batch["input_ids"].shape
    assert rows < len(examples) and width <= 48  # it packed, and no row is over capacity
    assert torch.equal(collate_packed(examples, 0, 48)["input_ids"], batch["input_ids"])  # a pure function
    found = []
    for r in range(rows):
        starts = [t for t in range(width) if batch["position_ids"][r, t] == 0 and batch["attention_mask"][r, t]]
        for t in starts:
            n = next(n for n in range(1, width - t + 1) if t + n == width or batch["position_ids"][r, t + n] == 0)
            ids = batch["input_ids"][r, t:t + n].tolist()
            k = next(k for k, e in enumerate(examples) if e.input_ids == ids and k not in found)
            found.append(k)
            assert batch["position_ids"][r, t:t + n].tolist() == list(range(n))
            assert batch["labels"][r, t] == IGNORE  # never a target across the boundary
            assert batch["labels"][r, t + 1:t + n].tolist() == examples[k].labels[1:]
            assert batch["attention_mask"][r, t:t + n].all()
    assert sorted(found) == list(range(len(examples)))
    assert int(batch["attention_mask"].sum()) == sum(len(e.input_ids) for e in examples)
    assert int((batch["labels"][:, 1:] != IGNORE).sum()) == label_tokens(examples)
    padded = collate(examples, 0)
    assert batch["input_ids"].numel() < padded["input_ids"].numel()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_no_token_attends_across_an_example_boundary(attn):
    """Changing one example of a row moves its own logits and not its neighbours'; each example's logits equal
    those of the example alone in a padded batch."""
    model = load_base_model(ModelConfig(path="builtin:tiny", attn_implementation=attn), 0).eval()
    examples = _examples([10, 14, 9, 6])
    changed = [Example([7] * 10, examples[0].labels)] + examples[1:]

    def logits(exs):
        b = collate_packed(exs, 0, capacity=40)
        assert b["input_ids"].shape[0] == 1  # all four in one row
        with torch.no_grad():
            return b, model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits[0]

    batch, before = logits(examples)
    _, after = logits(changed)
    spans = _spans(batch["position_ids"][0], batch["attention_mask"][0])
    first = next(s for s in spans if batch["input_ids"][0, s[0]:s[1]].tolist() == examples[0].input_ids)
    for a, b in spans:
        if (a, b) == first:
            assert not torch.allclose(before[a:b], after[a:b], atol=1e-3)  # the control: its own logits moved
        else:
            torch.testing.assert_close(before[a:b], after[a:b], rtol=0, atol=1e-6)
    padded = collate(examples, 0)
    with torch.no_grad():
        alone = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    for k, e in enumerate(examples):
        a, b = next(s for s in spans if batch["input_ids"][0, s[0]:s[1]].tolist() == e.input_ids)
        torch.testing.assert_close(before[a:b], alone[k, :len(e.input_ids)], rtol=0, atol=1e-5)


def _forward(model, batch, grad=False):
    model.zero_grad(set_to_none=True)
    out = model(**model_inputs(batch), use_cache=False)
    if grad:
        out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("capacity", [None, 40])
def test_per_example_attention_equals_the_block_mask(capacity, monkeypatch):
    """llmcl.layers.varlen on a packed batch (one row; rows with padding tails) gives transformers' sdpa with
    its block-diagonal mask: the logits of every example token and every gradient to 1e-5; and it did run per
    example (the control: the span reader was called)."""
    model = load_base_model(TINY, 0)
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped-query attention covered
    batch = collate_packed(_examples([10, 14, 9, 6, 25, 3]), 0, capacity)
    assert (batch["input_ids"].shape[0] == 1) == (capacity is None)
    keep = batch["attention_mask"].bool()
    logits_a, grads_a = _forward(model, batch, grad=True)
    assert varlen.row_capacity(model, 48) is None and model.config._attn_implementation == varlen.NAME
    calls = []
    monkeypatch.setattr(varlen, "spans", lambda p, f=varlen.spans: calls.append(1) or f(p))
    logits_b, grads_b = _forward(model, batch, grad=True)
    assert calls  # the per-example branch ran, not the block mask
    torch.testing.assert_close(logits_b[keep], logits_a[keep], rtol=1e-5, atol=1e-5)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=1e-5, atol=1e-6, msg=n)


def test_per_example_attention_leaves_unpacked_inputs_to_sdpa():
    """A padded batch (with its attention_mask) and a generation with a cache give the bits of plain sdpa."""
    model = load_base_model(TINY, 0).eval()
    padded = collate(_examples([10, 14, 9]), 0)
    with torch.no_grad():
        before = model(**padded, use_cache=False).logits
        generated = model.generate(padded["input_ids"][:1, :10], max_new_tokens=5, do_sample=False)
        varlen.row_capacity(model, 48)
        assert model.config._attn_implementation == varlen.NAME
        assert torch.equal(model(**padded, use_cache=False).logits, before)
        assert torch.equal(model.generate(padded["input_ids"][:1, :10], max_new_tokens=5, do_sample=False),
                           generated)


def test_packed_rows_fit_the_attention():
    """One row where attention runs per example; rows of seq_len where a block mask is built (eager) or the
    span rule would be wrong (a sliding window): those models stay as they are."""
    assert varlen.row_capacity(load_base_model(TINY, 0), 48) is None
    eager = load_base_model(ModelConfig(path="builtin:tiny", attn_implementation="eager"), 0)
    assert varlen.row_capacity(eager, 48) == 48 and eager.config._attn_implementation == "eager"
    sliding = load_base_model(TINY, 0)
    sliding.config.sliding_window = 16
    assert varlen.row_capacity(sliding, 48) == 48 and sliding.config._attn_implementation == "sdpa"
    one = collate_packed(_examples([10, 14, 9]), 0, None)
    assert one["input_ids"].shape == (1, 33) and bool(one["attention_mask"].all())


def _spans(positions: torch.Tensor, mask: torch.Tensor) -> list[tuple[int, int]]:
    starts = [t for t in range(len(positions)) if positions[t] == 0 and mask[t]]
    ends = [*starts[1:], int(mask.sum()) if mask.all() else int(mask.nonzero().max()) + 1]
    return list(zip(starts, ends))


def _stage(tmp_path, name, packing):
    r = recipe_mod.load(write_recipe(tmp_path / f"{name}-{packing}.yaml", method={"name": name},
                                     train={"lr": 5e-3, "max_steps": 4, "batch_size": 6, "seq_len": 48,
                                            "warmup": 1, "packing": packing}))
    run_dir = tmp_path / f"run-{packing}"
    accelerator = make_accelerator(r, run_dir, fresh=True)
    run = run_context(r, run_dir, accelerator, Ledger.open(run_dir, r), Display(enabled=False))
    return run, build_stage(run, 0)


@pytest.mark.parametrize("name", METHODS)
def test_a_packed_step_gives_the_unpacked_loss_gradients_and_method_state(name, tmp_path):
    """The loop's micro-batch function (forward_loss, then after_backward) on the first two micro-batches of a
    stage, packed and padded, from identically built stages: the loss and every trainable parameter's gradient
    agree to 1e-5 (relative), and so does what the method keeps (I-LoRA's reservoir, which the second
    micro-batch replays from)."""
    results = {}
    for packing in (False, True):
        run, ctx = _stage(tmp_path, name, packing)
        unwrapped = run.accelerator.unwrap_model(ctx.model)
        got, rows = [], []
        for step in (0, 1):
            examples = fetch(ctx.pools, ctx.batches.micro_items(step, 0, 0))
            n_items = sum(ctx.pools[0].label_count(j) for _, j in ctx.batches.micro_items(step, 0, 0))
            batch = make_batch(examples, run.tokenizer.pad_token_id, packing, ctx.row_tokens)
            rows.append(batch["input_ids"].shape[0])
            _, loss = forward_loss(ctx.model, unwrapped, ctx.method, batch, examples, n_items, 1)
            loss.backward()
            ctx.method.after_backward(ctx.model)
            got.append((loss.detach(), {n: p.grad.detach().clone() for n, p in ctx.named if p.grad is not None}))
            ctx.optimizer.zero_grad(set_to_none=True)
        results[packing] = got, untimed(ctx.method.state_dict()), rows
        run.metrics.close()
    (plain, plain_state, plain_rows), (packed, packed_state, packed_rows) = results[False], results[True]
    assert packed_rows == [1, 1] and plain_rows == [6, 6]  # sdpa runs per example: a micro-batch is one row
    for (loss_a, grads_a), (loss_b, grads_b) in zip(plain, packed):
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=0)
        assert grads_a.keys() == grads_b.keys() and grads_a
        for n in grads_a:
            scale = grads_a[n].abs().max().clamp_min(1e-12)
            assert (grads_b[n] - grads_a[n]).abs().max() / scale < 1e-5, n
    _assert_same(plain_state, packed_state)


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("name", METHODS)
def test_the_lm_head_at_the_trained_positions_gives_the_full_loss_and_gradients(name, packing, tmp_path):
    """The loop computes the LM head at the trained positions only (llmcl.models.logits_at_labels): for every
    method, packed or not, the loss and every trainable gradient equal those of the full [rows, positions,
    vocabulary] logits (1e-5 relative), and the logits really are one row per target."""
    run, ctx = _stage(tmp_path, name, packing)
    assert ctx.logits_at_labels  # builtin:tiny is a transformers Llama: the loop takes the short path
    unwrapped = run.accelerator.unwrap_model(ctx.model)
    items = ctx.batches.micro_items(0, 0, 0)
    examples = fetch(ctx.pools, items)
    n_items = sum(ctx.pools[0].label_count(j) for _, j in items)
    batch = make_batch(examples, run.tokenizer.pad_token_id, packing, ctx.row_tokens)
    got = {}
    for at_labels in (False, True):
        outputs, loss = forward_loss(ctx.model, unwrapped, ctx.method, batch, examples, n_items, 1,
                                     at_labels=at_labels)
        loss.backward()
        got[at_labels] = loss.detach(), {n: p.grad.detach().clone() for n, p in ctx.named if p.grad is not None}
        ctx.optimizer.zero_grad(set_to_none=True)
        if at_labels:
            assert outputs.logits.shape[0] == label_tokens(examples) == n_items
        else:
            assert outputs.logits.shape[:2] == batch["input_ids"].shape
    run.metrics.close()
    assert 0 < label_tokens(examples) < int(batch["attention_mask"].sum()) // 2  # prompts are most positions
    (loss_a, grads_a), (loss_b, grads_b) = got[False], got[True]
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=0)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for n in grads_a:
        scale = grads_a[n].abs().max().clamp_min(1e-12)
        assert (grads_b[n] - grads_a[n]).abs().max() / scale < 1e-5, n


def test_a_model_without_the_boolean_logits_mask_keeps_the_full_logits():
    """The short path is taken only where the forward slices its hidden states with transformers' helper and
    hands shift_labels to its loss; a model whose forward does not (here: one wrapped in a plain module) keeps
    the full logits."""
    from llmcl.models import logits_at_labels

    model = load_base_model(TINY, 0)
    assert logits_at_labels(model)

    class Plain(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs):
            return self.inner(**kwargs)

        def loss_function(self, logits, labels):
            return None

    assert not logits_at_labels(Plain(model))


def _assert_same(a, b, key="state"):
    if torch.is_tensor(a):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=key)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), key
        for k in a:
            _assert_same(a[k], b[k], f"{key}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), key
        for k, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{key}[{k}]")
    else:
        assert a == b, key


def test_mora_counts_the_same_tokens_packed():
    """MoRA's selection statistics count the examples' tokens, never a packed row's padding."""
    from llmcl.methods.base import StageInfo

    counts = {}
    examples = _examples([11, 30, 6, 17, 9])
    for packing in (False, True):
        method = methods.create(recipe_mod.from_dict({"method": {"name": "mora", "r": 4},
                                                      "stages": [{"data": {"path": "builtin:facts"}}]}).method)
        model = method.prepare(load_base_model(TINY, 0), StageInfo(0, "s", 1, 1, seed=0))
        batch = make_batch(examples, 0, packing, 32)
        method.before_forward(batch)
        with torch.no_grad():
            model(**{k: v for k, v in batch.items() if not (packing and k == "attention_mask")})
        counts[packing] = {n: (layer.counts.clone(), int(layer.tokens)) for n, layer in method.layers.items()}
    assert all(t == sum(len(e.input_ids) for e in examples) for _, t in counts[True].values())
    for n, (c, t) in counts[False].items():
        assert torch.equal(counts[True][n][0], c) and counts[True][n][1] == t, n


def test_a_packed_run_trains_like_an_unpacked_one_and_resumes_to_the_same_bits(tmp_path, monkeypatch):
    """End to end with I-LoRA (a reservoir, replay, a second learner): the packed run's logged losses are the
    unpacked run's to 1e-4, it runs fewer rows, and a crash mid-stage resumes to the same bits as the
    uninterrupted packed run."""
    from test_method_contract import _tensors

    def recipe(packing):
        return write_recipe(tmp_path / f"p{packing}.yaml", method={"name": "ilora", "r": 4, "buffer_size": 16},
                            train={"lr": 5e-3, "max_steps": 4, "batch_size": 6, "seq_len": 48, "warmup": 1,
                                   "save_every": 2, "packing": packing})

    runs = {p: tmp_path / f"run-{p}" for p in (False, True)}
    for packing, run_dir in runs.items():
        assert run_cli("train", str(recipe(packing)), "--run-dir", str(run_dir)).exit_code == 0
    logs = {p: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for p, d in runs.items()}
    assert len(logs[True]) == len(logs[False]) == 8
    for a, b in zip(logs[False], logs[True]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4) and b["tokens"] == a["tokens"]
    crashed = tmp_path / "crashed"
    with monkeypatch.context() as m:
        crash_after(m, "ilora", 7)
        with pytest.raises(Crash):
            run_cli("train", str(recipe(True)), "--run-dir", str(crashed))
    assert run_cli("train", str(recipe(True)), "--run-dir", str(crashed)).exit_code == 0
    for stage in ("stage-00-facts", "stage-01-reverse"):
        a, b = _tensors(runs[True] / stage), _tensors(crashed / stage)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stage


def test_which_models_can_pack():
    assert why_not_packable(load_base_model(TINY, 0)) is None
    model = SimpleNamespace(config=SimpleNamespace(model_type="bloom"), forward=lambda input_ids, position_ids: 0)
    assert "ALiBi" in why_not_packable(model)
    hybrid = SimpleNamespace(config=SimpleNamespace(model_type="qwen3_next",
                                                    layer_types=["linear_attention", "full_attention"]),
                             forward=lambda input_ids, position_ids: 0)
    assert "linear_attention" in why_not_packable(hybrid)
    plain = SimpleNamespace(config=SimpleNamespace(model_type="x"), forward=lambda input_ids: 0)
    assert "position_ids" in why_not_packable(plain)


def test_packing_a_model_that_cannot_pack_is_a_one_line_error(tmp_path):
    """A local ALiBi model (a tiny random Bloom with the SmolLM2 tokenizer) with train.packing: true."""
    from transformers import BloomConfig, BloomForCausalLM

    model_dir = tmp_path / "bloom"
    BloomForCausalLM(BloomConfig(vocab_size=tiny_config().vocab_size, hidden_size=16, n_layer=1, n_head=2)) \
        .save_pretrained(model_dir)
    for f in smollm2_tokenizer_dir().iterdir():
        shutil.copy(f, model_dir / f.name)
    load_tokenizer(ModelConfig(path=str(model_dir)))
    recipe = write_recipe(tmp_path / "r.yaml", model={"path": str(model_dir)}, train__packing=True)
    result = run_cli("train", str(recipe), "--run-dir", str(tmp_path / "run"))
    assert result.exit_code != 0
    assert "train.packing: true needs a model whose positions come from position_ids" in result.output
    assert "ALiBi" in result.output and "Traceback" not in result.output
