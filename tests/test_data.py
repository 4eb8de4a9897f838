"""Data: built-in tasks, file readers, formatting/masking, packing, deterministic batches."""

from __future__ import annotations

import json

import pytest

from conftest import REPO, SHARED_DATA
from llmcl.data import builtin
from llmcl.data.batching import BatchPlan, collate, label_tokens
from llmcl.data.formatting import IGNORE, encode, pack
from llmcl.data.sources import load_records, read_file
from llmcl.errors import LlmclError
from llmcl.recipe import DataConfig


@pytest.fixture(scope="module")
def tok():
    from llmcl.models import load_tokenizer
    from llmcl.recipe import ModelConfig

    return load_tokenizer(ModelConfig(path="builtin:tiny"))


@pytest.mark.parametrize("task", sorted(builtin.TASKS))
def test_builtin_tasks_are_deterministic_by_seed(task):
    a = builtin.generate(task, "train", 0)
    assert a == builtin.generate(task, "train", 0)
    assert a != builtin.generate(task, "train", 1)
    assert all(set(r) == {"prompt", "completion"} and r["prompt"].endswith("\nAnswer:") for r in a)


def test_builtin_skill_tasks_hold_out_unseen_test_items_and_are_correct():
    for task in ("reverse", "arithmetic"):
        train = {r["prompt"] for r in builtin.generate(task, "train", 0)}
        test = builtin.generate(task, "test", 0)
        assert len(test) == 100 and not train & {r["prompt"] for r in test}
    for r in builtin.generate("reverse", "test", 0):
        words = r["prompt"].split(": ", 1)[1].split("\n")[0].split()
        assert r["completion"] == " " + " ".join(reversed(words))
    for r in builtin.generate("arithmetic", "test", 0):
        a, b = [int(x) for x in r["prompt"].replace("?", " ").split() if x.isdigit()]
        assert r["completion"] == f" {a + b}"


def test_knowledge_tasks_test_recall_of_the_trained_facts():
    for task in ("facts", "vocab"):
        assert builtin.generate(task, "train", 3) == builtin.generate(task, "test", 3)
        prompts = [r["prompt"] for r in builtin.generate(task, "train", 3)]
        assert len(prompts) == len(set(prompts)) == 48


def test_prompt_completion_loss_is_on_completion_and_eos_only(tok):
    cfg = DataConfig(path="builtin:facts")
    rec = {"prompt": "Q: In which city does Ana Bel live?\nAnswer:", "completion": " Korvan"}
    (ex,), stats = encode([rec], cfg, tok, 64)
    n_prompt = len(tok(rec["prompt"])["input_ids"])
    assert ex.labels[:n_prompt] == [IGNORE] * n_prompt
    trained = [t for t in ex.labels if t != IGNORE]
    assert tok.decode(trained) == " Korvan" + tok.eos_token
    assert ex.input_ids[n_prompt:] == trained
    assert stats.format == "prompt_completion" and stats.label_tokens == len(trained)


def test_templates_map_record_fields(tok):
    cfg = DataConfig(path="x.json", prompt_template="Text: {sentence}\nLabel:", completion_template=" {label}")
    (ex,), _ = encode([{"sentence": "great film", "label": "positive"}], cfg, tok, 64)
    assert tok.decode(ex.input_ids) == "Text: great film\nLabel: positive" + tok.eos_token
    assert tok.decode([t for t in ex.labels if t != IGNORE]) == " positive" + tok.eos_token


def test_chat_messages_train_only_assistant_turns(tok):
    cfg = DataConfig(path="x.jsonl")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"},
            {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    (ex,), stats = encode([{"messages": msgs}], cfg, tok, 256)
    assert stats.format == "messages"
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(msgs, tokenize=False)
    trained = tok.decode([t for t in ex.labels if t != IGNORE])
    assert trained == "hello!<|im_end|>\n4<|im_end|>\n"


def _bos_adding_tokenizer(tok):
    """The built-in tokenizer made to add a BOS to every text, with a chat template that renders one too (the
    Llama 3 / Gemma / Mistral-instruct layout)."""
    import copy

    from tokenizers import processors

    bos = copy.deepcopy(tok)
    bos.bos_token = "<|endoftext|>"
    bos._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos.bos_token_id)])
    bos.chat_template = "{{ bos_token }}" + tok.chat_template
    assert bos("hi")["input_ids"][0] == bos.bos_token_id  # the premise: the tokenizer adds one
    return bos


@pytest.mark.parametrize("chat", ["messages", "prompt_completion_chat_template", "prompt_completion"])
def test_one_bos_whether_the_tokenizer_or_the_chat_template_adds_it(chat, tok):
    bos_tok = _bos_adding_tokenizer(tok)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}]
    if chat == "messages":
        (ex,), _ = encode([{"messages": msgs}], DataConfig(path="x.jsonl"), bos_tok, 256)
    else:
        cfg = DataConfig(path="x.jsonl", chat_template=chat.endswith("template"))
        (ex,), _ = encode([{"prompt": "hi", "completion": " hello!"}], cfg, bos_tok, 256)
    if chat == "prompt_completion":  # no template: the tokenizer's BOS, once
        assert ex.input_ids == bos_tok("hi")["input_ids"] + bos_tok(" hello!", add_special_tokens=False)["input_ids"] \
            + [bos_tok.eos_token_id]
    else:  # as transformers tokenizes the rendered conversation: the template's BOS alone
        rendered = bos_tok.apply_chat_template(msgs, tokenize=False)
        assert ex.input_ids == bos_tok(rendered, add_special_tokens=False)["input_ids"]
    assert ex.input_ids[0] == bos_tok.bos_token_id and ex.input_ids[1] != bos_tok.bos_token_id


FIXTURES = REPO / "tests" / "fixtures"


def _openai_messages(record):
    """The OpenAI messages a ShareGPT or Alpaca fixture record stands for, written out independently."""
    system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    if "conversations" in record:
        role = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
        return system + [{"role": role[t["from"]], "content": t["value"]} for t in record["conversations"]]
    history = [m for q, a in record.get("history", []) for m in ({"role": "user", "content": q},
                                                                  {"role": "assistant", "content": a})]
    user = record["instruction"] + (f"\n{record['input']}" if record.get("input") else "")
    return system + history + [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


@pytest.mark.parametrize("fmt", ["sharegpt", "alpaca"])
def test_sharegpt_and_alpaca_records_train_exactly_their_assistant_turns(fmt, tok):
    records = read_file(FIXTURES / f"{fmt}.jsonl")
    examples, stats = encode(records, DataConfig(path=str(FIXTURES / f"{fmt}.jsonl")), tok, 512)
    assert stats.format == fmt and len(examples) == len(records)  # recognised with no template in the recipe
    for record, ex in zip(records, examples):
        msgs = _openai_messages(record)
        (same,), _ = encode([{"messages": msgs}], DataConfig(path="x.jsonl"), tok, 512)
        assert (ex.input_ids, ex.labels) == (same.input_ids, same.labels)  # the OpenAI form, token for token
        assert tok.decode(ex.input_ids) == tok.apply_chat_template(msgs, tokenize=False)
        trained = tok.decode([t for t in ex.labels if t != IGNORE])
        assert trained == "".join(m["content"] + "<|im_end|>\n" for m in msgs if m["role"] == "assistant")


@pytest.mark.parametrize("fmt", ["sharegpt", "alpaca"])
def test_a_recipe_trains_and_scores_sharegpt_and_alpaca_data_without_a_template(fmt, tmp_path):
    from conftest import run_cli, write_recipe
    from llmcl import recipe as recipe_mod
    from llmcl.eval.tasks import render_test_records

    path = str(FIXTURES / f"{fmt}.jsonl")
    recipe = write_recipe(tmp_path / "r.yaml", stages=[{"name": fmt, "data": {"path": path, "holdout": 2}}],
                          train={"lr": 1e-3, "max_steps": 2, "batch_size": 2, "seq_len": 128, "warmup": 0})
    res = run_cli("train", str(recipe), "--run-dir", str(tmp_path / "run"))
    assert res.exit_code == 0 and f"{fmt} examples" in res.output, res.output
    stage = recipe_mod.load(recipe).stages[0]
    records = read_file(FIXTURES / f"{fmt}.jsonl")
    tok = _tokenizer()
    kind, rows = render_test_records(stage, 0, records, tok)
    assert kind == "generate" and len(rows) == len(records)
    for record, row in zip(records, rows):
        msgs = _openai_messages(record)
        assert row == {"prompt": tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True),
                       "completion": msgs[-1]["content"]}


def _tokenizer():
    from llmcl.models import load_tokenizer
    from llmcl.recipe import ModelConfig

    return load_tokenizer(ModelConfig(path="builtin:tiny"))


@pytest.mark.parametrize("record,message", [
    ({"conversations": [{"from": "observation", "value": "x"}]}, "turn 0 has from='observation'"),
    ({"conversations": []}, "non-empty list of {from, value} turns"),
    ({"instruction": "do", "output": 3}, "field 'output' holds a int, not text"),
    ({"instruction": "do", "output": "ok", "history": [["only a query"]]}, "[query, answer] text pairs"),
])
def test_malformed_sharegpt_or_alpaca_records_name_the_key_and_the_field(record, message):
    from llmcl.data.formatting import check_record

    with pytest.raises(LlmclError, match="recipe key 'stages.0.data.format'") as err:
        check_record(DataConfig(path="x.jsonl"), record, "stages.0.data")
    assert message in str(err.value)


def test_truncation_keeps_seq_len_and_counts(tok):
    cfg = DataConfig(path="x.jsonl")
    recs = [{"prompt": "a b c d e f g h i j k l m n o p", "completion": " q r s t u v w x y z"},  # cut in its answer
            {"prompt": "a b c d e f g h i j k l m n o p q r s t u v", "completion": " w"},  # no answer within 20
            {"prompt": "a b", "completion": " c"}]
    (ex, short), stats = encode(recs, cfg, tok, 20)
    assert len(ex.input_ids) == 20 and len(short.input_ids) < 20
    assert (stats.examples, stats.truncated, stats.dropped) == (2, 1, 1)  # a record left out is not "truncated"


def test_text_packing_is_lossless_blocks(tok):
    texts = [f"document number {i} " * (i + 1) for i in range(20)]
    blocks = pack(texts, tok, 16)
    stream = []
    for t in texts:
        stream += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert all(len(b.input_ids) == 16 and b.labels == b.input_ids for b in blocks)
    assert sum((b.input_ids for b in blocks), []) == stream[: 16 * len(blocks)]
    assert len(stream) - 16 * len(blocks) < 16


def _stream_tokens(records, tok):
    """Documents tokenized and joined with EOS, as the text token file holds them (written out here)."""
    return sum((tok(r["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in records), [])


@pytest.mark.parametrize("extra", [{"max_train_samples": 3}, {"holdout": 4}, {"holdout": 4, "max_train_samples": 2}])
def test_a_streamed_text_corpus_takes_the_records_load_records_takes(extra, tok, tmp_path):
    from llmcl.data.stream import text_blocks

    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": f"doc{i} alpha beta"}) + "\n" for i in range(10)))
    cfg = DataConfig(path=str(tmp_path / "c.jsonl"), **extra)
    kept = load_records(cfg, "train", 5)
    assert [r["text"] for r in kept] != [f"doc{i} alpha beta" for i in range(len(kept))]  # not the file's first N
    blocks = text_blocks(cfg, "train", tok, 4, 5, tmp_path / "cache")
    assert blocks.tokens.tolist() == _stream_tokens(kept, tok)  # the seeded subset the README promises
    full = text_blocks(DataConfig(path=str(tmp_path / "c.jsonl")), "train", tok, 4, 5, tmp_path / "cache")
    assert full.n_tokens == len(_stream_tokens(read_file(tmp_path / "c.jsonl"), tok))  # its own file, not the subset's
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": f"new{i} gamma"}) + "\n" for i in range(12)))
    edited = text_blocks(cfg, "train", tok, 4, 5, tmp_path / "cache")  # the corpus edited: tokenized again
    assert edited.tokens.tolist() == _stream_tokens(load_records(cfg, "train", 5), tok)


def test_a_streamed_hub_text_corpus_with_a_record_limit_takes_a_seeded_shuffle_of_the_stream(monkeypatch):
    import datasets

    from llmcl.data.stream import sampled_records

    docs = [{"text": f"doc{i}"} for i in range(50)]

    def load_dataset(path, subset, split, streaming):
        assert (path, split, streaming) == ("org/corpus", "train", True)
        return datasets.IterableDataset.from_generator(lambda: iter(docs))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    cfg = DataConfig(path="org/corpus", format="text", max_train_samples=5)
    taken = [r["text"] for r in sampled_records(cfg, "train", 0)]
    assert len(taken) == 5 and taken != [d["text"] for d in docs[:5]] and set(taken) <= {d["text"] for d in docs}
    assert [r["text"] for r in sampled_records(cfg, "train", 0)] == taken  # seeded
    assert [r["text"] for r in sampled_records(cfg, "train", 1)] != taken


def test_a_txt_file_has_the_same_documents_streamed_or_read_whole(tmp_path):
    from llmcl.data.stream import iter_records

    (tmp_path / "a.txt").write_text("one\x0ctwo\u2028three\r\nfour\rfive\n\nsix", encoding="utf-8")
    whole = read_file(tmp_path / "a.txt")
    assert whole == list(iter_records(DataConfig(path=str(tmp_path / "a.txt")), "train", 0))
    assert [r["text"] for r in whole] == ["one\x0ctwo\u2028three", "four", "five", "six"]  # lines, not splitlines()


def test_text_corpora_of_one_directory_with_other_splits_do_not_share_a_token_file(tok, tmp_path):
    from llmcl.data.stream import text_blocks

    (tmp_path / "d").mkdir()
    for split in ("train", "de"):
        (tmp_path / "d" / f"{split}.jsonl").write_text(json.dumps({"text": f"the {split} split"}) + "\n")
    for split in ("train", "de", "train"):
        blocks = text_blocks(DataConfig(path=str(tmp_path / "d"), train_split=split), "train", tok, 4, 0,
                             tmp_path / "cache")
        assert blocks.tokens.tolist() == _stream_tokens([{"text": f"the {split} split"}], tok)


@pytest.mark.parametrize("streamed", [True, False])
def test_add_bos_begins_every_text_document_and_has_its_own_token_file(streamed, tok, tmp_path):
    import copy

    from llmcl.data.stream import text_blocks

    records = [{"text": f"document {i} " * (i + 1)} for i in range(6)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    def tokens(**extra):
        cfg = DataConfig(path=str(tmp_path / "c.jsonl"), **extra)
        if streamed:
            return text_blocks(cfg, "train", tok, 4, 0, tmp_path / "cache").tokens.tolist()
        return sum((b.input_ids for b in encode(records, cfg, tok, 4)[0]), [])

    with_bos, without = tokens(add_bos=True), tokens()
    expected = sum(([tok.bos_token_id] + _stream_tokens([r], tok) for r in records), [])
    assert with_bos == expected[:len(with_bos)] and len(expected) - len(with_bos) < 4  # BOS, document, EOS, BOS, ...
    default = _stream_tokens(records, tok)  # the default: no BOS
    assert without == default[:len(without)] and len(default) - len(without) < 4
    if streamed:
        assert tokens(add_bos=True) == with_bos and len(list((tmp_path / "cache").glob("*.bin"))) == 2
    nobos = copy.deepcopy(tok)
    nobos.bos_token = None
    with pytest.raises(LlmclError, match="recipe key 'data.add_bos': the tokenizer of model.path=.* has no BOS"):
        cfg = DataConfig(path=str(tmp_path / "c.jsonl"), add_bos=True)
        text_blocks(cfg, "train", nobos, 4, 0, tmp_path / "cache") if streamed else encode(records, cfg, nobos, 4)


@pytest.mark.parametrize("fmt", ["text", "sharegpt", "prompt_completion"])
def test_add_bos_on_data_that_is_not_text_is_noted(fmt, tmp_path):
    path = {"text": tmp_path / "t.jsonl", "sharegpt": FIXTURES / "sharegpt.jsonl", "prompt_completion": "builtin:facts"}[fmt]
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "a document"}) + "\n")
    res = _validate(tmp_path, f"stages.1.data.path={path}", "stages.1.data.add_bos=true")
    assert res.exit_code == 0, res.output
    note = f"note: recipe key 'stages.1.data.add_bos': true has no effect on {fmt} data"
    assert (note in res.stderr) == (fmt != "text"), res.stderr


def test_file_readers(tmp_path):
    rows = [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "a.csv").write_text("prompt,completion\np1,c1\np2,c2\n")
    (tmp_path / "a.txt").write_text("line one\n\nline two\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    for ext in ("json", "jsonl", "csv", "parquet"):
        assert read_file(tmp_path / f"a.{ext}") == rows, ext
    assert read_file(tmp_path / "a.txt") == [{"text": "line one"}, {"text": "line two"}]
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(LlmclError, match="cannot read data file"):
        read_file(tmp_path / "bad.json")


def test_directory_splits_and_sample_limits(tmp_path):
    d = tmp_path / "task"
    d.mkdir()
    (d / "train.json").write_text(json.dumps([{"text": f"t{i}"} for i in range(50)]))
    (d / "test.jsonl").write_text("".join(json.dumps({"text": f"e{i}"}) + "\n" for i in range(10)))
    cfg = DataConfig(path=str(d), max_train_samples=5, max_test_samples=3)
    train = load_records(cfg, "train", seed=0)
    assert len(train) == 5 and train == load_records(cfg, "train", seed=0)
    assert train != load_records(cfg, "train", seed=1)
    assert len(load_records(cfg, "test", seed=0)) == 3
    single = DataConfig(path=str(d / "train.json"))
    assert load_records(single, "test", seed=0) is None


@pytest.mark.skipif(not (SHARED_DATA / "cl_benchmark").exists(), reason="shared data not present")
def test_reads_the_cl_benchmark_format(tok):
    cfg = DataConfig(path=str(SHARED_DATA / "cl_benchmark/TC/agnews"), prompt_template="{sentence}\nTopic:",
                     completion_template=" {label}", max_train_samples=8)
    recs = load_records(cfg, "train", 0)
    examples, stats = encode(recs, cfg, tok, 256)
    assert len(examples) == 8 and stats.format == "prompt_completion"
    labels = set(json.loads((SHARED_DATA / "cl_benchmark/TC/agnews/labels.json").read_text()))
    assert {r["label"] for r in recs} <= labels


def test_batch_plan_layout_and_epochs():
    plan = BatchPlan(n_examples=10, batch_size=2, grad_accum=2, world_size=2, seed=0, stage=1)
    assert plan.global_batch == 8
    first_epoch = plan.step_indices(0) + plan.step_indices(1)[:2]
    assert sorted(first_epoch) == list(range(10))  # every example once per epoch
    for step in range(4):
        parts = [plan.micro_indices(step, m, r) for m in range(2) for r in range(2)]
        assert sum(parts, []) == plan.step_indices(step)  # micro-batches x ranks tile the global batch
    again = BatchPlan(10, 2, 2, 2, 0, 1)
    assert [again.step_indices(s) for s in (3, 0)] == [plan.step_indices(3), plan.step_indices(0)]
    other_stage = BatchPlan(10, 2, 2, 2, 0, 2)
    assert other_stage.step_indices(0) != plan.step_indices(0)


def test_collate_pads_right_and_masks(tok):
    from llmcl.data.formatting import Example

    batch = collate([Example([5, 6, 7], [IGNORE, 6, 7]), Example([8], [8])], pad_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert label_tokens([Example([5, 6, 7], [IGNORE, 6, 7])]) == 2


def test_holdout_makes_a_disjoint_seeded_test_split(tmp_path):
    (tmp_path / "all.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "completion": " a"}) + "\n"
                                                for i in range(40)))
    cfg = DataConfig(path=str(tmp_path / "all.jsonl"), holdout=0.25)
    train, test = load_records(cfg, "train", 0), load_records(cfg, "test", 0)
    assert len(train) == 30 and len(test) == 10
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert test == load_records(cfg, "test", 0) and test != load_records(cfg, "test", 1)
    assert len(load_records(DataConfig(path=str(tmp_path / "all.jsonl"), holdout=5), "test", 0)) == 5


# one line naming the recipe key or the file, before stage 0 trains: `llmcl validate` (which `llmcl train` runs first)

def _validate(tmp_path, *overrides):
    from conftest import run_cli, write_recipe

    return run_cli("validate", str(write_recipe(tmp_path / "r.yaml")), *overrides)


def _one_line_error(res, *parts):
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
    for part in parts:
        assert part in res.stderr, res.stderr


@pytest.mark.parametrize("fmt", ["text", "sharegpt", "prompt_completion"])
def test_chat_template_true_where_it_does_nothing_is_noted(fmt, tmp_path):
    path = {"text": tmp_path / "t.jsonl", "sharegpt": FIXTURES / "sharegpt.jsonl", "prompt_completion": "builtin:facts"}[fmt]
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "a document"}) + "\n")
    res = _validate(tmp_path, f"stages.1.data.path={path}", "stages.1.data.chat_template=true")
    assert res.exit_code == 0, res.output  # a note, not a refusal: a run begun with the key still resumes
    note = f"note: recipe key 'stages.1.data.chat_template': true has no effect on {fmt} data"
    assert (note in res.stderr) == (fmt != "prompt_completion"), res.stderr  # prompt/completion: what it is for


def _facts_file(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in builtin.generate("facts", "train", 0)))
    return path


@pytest.mark.parametrize("content,kind", [("42", "a number"), ("null", "null"), ('"text"', "a string"),
                                          ("true", "true or false")])
def test_a_json_file_holding_no_list_of_records_is_one_line(content, kind, tmp_path):
    (tmp_path / "scalar.json").write_text(content + "\n")
    res = _validate(tmp_path, f"stages.1.data.path={tmp_path / 'scalar.json'}")
    _one_line_error(res, "scalar.json: holds " + kind, "must hold a list of records")
    with pytest.raises(LlmclError, match="must hold a list of records"):
        read_file(tmp_path / "scalar.json")


@pytest.mark.parametrize("attr,template,message", [
    ("prompt_template", "{prompt", "is not a format template (expected '}' before end of string)"),
    ("prompt_template", "Q {} {prompt}", "has the positional field {}"),
    ("prompt_template", "{0}", "has the positional field {0}"),
    ("prompt_template", "{prompt!z}", "has the conversion !z in {prompt}"),
    ("prompt_template", "{prompt:d}", "record 1 of facts.jsonl: '{prompt:d}' cannot render the record (Unknown format"),
    ("prompt_template", "{prompt.x}", "cannot render the record ('str' object has no attribute 'x'"),
    ("completion_template", "{completion:d}", "cannot render the record (Unknown format code 'd'"),
    ("completion_template", "}{completion}", "is not a format template (Single '}'"),
])
def test_a_template_that_cannot_render_the_records_is_refused_naming_its_key(attr, template, message, tmp_path):
    res = _validate(tmp_path, f"stages.1.data.path={_facts_file(tmp_path)}",
                    f"stages.1.data.{attr}={json.dumps(template)}")
    _one_line_error(res, f"error: recipe key 'stages.1.data.{attr}': ", message)


def test_templates_with_literal_braces_conversions_and_specs_still_validate(tmp_path):
    res = _validate(tmp_path, f"stages.1.data.path={_facts_file(tmp_path)}",
                    'stages.1.data.prompt_template="{{literal}} {prompt!s:>5} {prompt[0]}"',
                    'stages.1.data.completion_template="{completion!r}"')
    assert res.exit_code == 0, res.stderr


def test_render_names_the_template_key():
    from llmcl.data.formatting import render

    cfg = DataConfig(path="org/hub-dataset", prompt_template="{prompt:d}")
    with pytest.raises(LlmclError, match=r"recipe key 'stages.2.data.prompt_template': '\{prompt:d\}' cannot render"):
        render(cfg, {"prompt": "p", "completion": "c"}, "stages.2.data")


@pytest.mark.parametrize("rows,message", [("Q1,A1,X\n", "record 1 (line 2) has 3 values, the header 2"),
                                          ("Q1,A1\nQ2\n", "record 2 (line 3) has 1 value, the header 2")])
def test_a_csv_row_with_more_or_fewer_values_than_the_header_is_one_line(rows, message, tmp_path):
    (tmp_path / "x.csv").write_text("question,answer\n" + rows)
    res = _validate(tmp_path, f"stages.1.data.path={tmp_path / 'x.csv'}", 'stages.1.data.prompt_template="{question}"',
                    'stages.1.data.completion_template="{answer}"')
    _one_line_error(res, "x.csv: " + message)
    with pytest.raises(LlmclError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_file(tmp_path / "x.csv")  # the non-streaming reader (holdout, test splits) as well


def test_a_record_with_an_odd_key_is_still_described_in_one_line():
    from llmcl.data.formatting import check_record

    with pytest.raises(LlmclError, match=r"cannot tell the data format from the record fields \['None', 'a'\]"):
        check_record(DataConfig(path="x.jsonl"), {None: ["x"], "a": "b"}, "stages.0.data")


def _no_chat_template_tokenizer():
    tok = _tokenizer()
    tok.chat_template = None
    return tok


@pytest.mark.parametrize("overrides,key", [
    ({"stages__1__data__chat_template": True}, "stages.1.data.chat_template"),
    ({"stages__0__data__path": str(FIXTURES / "sharegpt.jsonl")}, "stages.0.data.path"),
    ({"stages__1__data__path": str(FIXTURES / "alpaca.jsonl"), "stages__1__data__format": "alpaca"},
     "stages.1.data.format"),
])
def test_data_needing_a_chat_template_the_tokenizer_lacks_is_refused_before_training(overrides, key, tmp_path):
    from conftest import write_recipe
    from llmcl import recipe as recipe_mod
    from llmcl.data.mixing import check_tokenizer

    recipe = recipe_mod.load(write_recipe(tmp_path / "r.yaml", **overrides))
    check_tokenizer(recipe, _tokenizer())  # the built-in tokenizer has one
    with pytest.raises(LlmclError, match=rf"^recipe key '{key}': .*tokenizer of model.path='builtin:tiny' has no"):
        check_tokenizer(recipe, _no_chat_template_tokenizer())


def test_add_bos_with_a_tokenizer_without_one_is_refused_before_stage_0_trains(tmp_path):
    """Not when the text stage is reached, after the stages before it (hours, in a real run)."""
    import copy

    from conftest import write_recipe
    from llmcl import recipe as recipe_mod
    from llmcl.data.mixing import check_tokenizer

    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "a document"}) + "\n")
    nobos = copy.deepcopy(_tokenizer())
    nobos.bos_token = None
    for add_bos, path in ((False, tmp_path / "t.jsonl"), (True, "builtin:facts")):  # controls: nothing to refuse
        check_tokenizer(recipe_mod.load(write_recipe(tmp_path / "r.yaml"), [
            f"stages.1.data.path={path}", f"stages.1.data.add_bos={str(add_bos).lower()}"]), nobos)
    recipe = recipe_mod.load(write_recipe(tmp_path / "r.yaml"), [f"stages.1.data.path={tmp_path / 't.jsonl'}",
                                                                  "stages.1.data.add_bos=true"])
    with pytest.raises(LlmclError, match=r"^recipe key 'stages.1.data.add_bos': the tokenizer of model.path=.* has no BOS"):
        check_tokenizer(recipe, nobos)


def test_encoding_chat_data_without_a_chat_template_is_one_line():
    cfg = DataConfig(path="x.jsonl", chat_template=True)
    with pytest.raises(LlmclError, match="recipe key 'data.chat_template': the tokenizer of model.path="):
        encode([{"prompt": "p", "completion": "c"}], cfg, _no_chat_template_tokenizer(), 64)
    with pytest.raises(LlmclError, match="recipe key 'data.path': messages data is rendered with the tokenizer's"):
        encode([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
               DataConfig(path="x.jsonl"), _no_chat_template_tokenizer(), 64)


@pytest.mark.parametrize("make,overrides,parts", [
    (None, ["stages.1.data.path="], ["recipe key 'stages.1.data.path': got ''; expected a built-in task"]),
    (None, ["stages.1.data.test_path=builtin:facts"],
     ["recipe key 'stages.1.data.test_path': got 'builtin:facts'; expected a local file"]),
    ("empty", ["stages.1.data.path={d}"], ["recipe key 'stages.1.data.path': data directory", "holds no data file"]),
    ("test-only", ["stages.1.data.path={d}"],
     ["has no train.<jsonl|json|csv|parquet|txt> file", "data files there: test.jsonl"]),
    ("file", ["stages.1.data.path={d}/facts.jsonl", "stages.1.data.holdout=1000"],
     ["data.holdout=1000 of data.path", "facts.jsonl' leaves no training or no test records (48 records); "
      "expected 1 to 47 records"]),
])
def test_poor_data_paths_are_one_clear_line(make, overrides, parts, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    if make == "test-only":
        _facts_file(tmp_path).rename(d / "test.jsonl")
    elif make == "file":
        _facts_file(tmp_path).rename(d / "facts.jsonl")
    _one_line_error(_validate(tmp_path, *[o.format(d=d) for o in overrides]), *parts)


@pytest.mark.parametrize("suffix", [".jsonl", ".txt", ".csv", ".json"])
def test_a_file_that_is_not_utf8_names_the_line_streamed_or_read_whole(suffix, tmp_path):
    """The decoder's byte position is within a chunk of a streamed read (8 KB from a line that is not the bad
    one): the line is found again. Streamed (validate) and read whole (holdout) say the same."""
    head = {".jsonl": [json.dumps({"prompt": f"p{i}", "completion": " c"}) for i in range(900)],
            ".txt": [f"a document {i}" for i in range(900)], ".csv": ["prompt,completion"] + [f"p{i}, c" for i in
                                                                                            range(899)]}
    lines = head.get(suffix, ["[", *(json.dumps({"prompt": f"p{i}", "completion": " c"}) + "," for i in range(898))])
    path = tmp_path / f"bad{suffix}"
    bad = {".jsonl": b'{"prompt": "\xff", "completion": " c"}', ".txt": b"caf\xe9",
           ".csv": b"\xff, c", ".json": b'{"prompt": "\xff", "completion": " c"}]'}[suffix]
    path.write_bytes("\n".join(lines).encode() + b"\n" + bad + b"\n")
    where = f"bad{suffix} (line {len(lines) + 1}): not UTF-8 text"
    extra = ["stages.1.data.format=text"] if suffix == ".txt" else []
    _one_line_error(_validate(tmp_path, f"stages.1.data.path={path}", *extra), where)
    _one_line_error(_validate(tmp_path, f"stages.1.data.path={path}", "stages.1.data.holdout=1", *extra), where)


@pytest.mark.parametrize("name,text,where", [
    ("jl.json", '{"prompt": "a", "completion": "b"}\n{"prompt": oops}\n', "line 2 column 12: Expecting value"),
    ("jl.jsonl", '{"prompt": "a", "completion": "b"}\n\n{"prompt": oops}\n', "line 3 column 12: Expecting value"),
    ("arr.json", '[\n {"prompt": "a", "completion": "b"},\n {"prompt": oops}\n]\n',
     "line 3 column 13: Expecting value"),
])
def test_a_bad_line_of_a_json_file_names_its_own_line(name, text, where, tmp_path):
    (tmp_path / name).write_text(text)
    _one_line_error(_validate(tmp_path, f"stages.1.data.path={tmp_path / name}"), f"{name}: {where}")
    _one_line_error(_validate(tmp_path, f"stages.1.data.path={tmp_path / name}", "stages.1.data.holdout=1"),
                    f"{name}: {where}")  # read whole, not streamed
    with pytest.raises(LlmclError, match=where):
        read_file(tmp_path / name)


def test_a_chat_template_that_refuses_a_conversation_is_one_line_naming_the_key(tok):
    """Gemma's template raises "System role not supported", Mistral's on roles that do not alternate (jinja2's
    TemplateError, a traceback before): training and the test tasks both say it in one line, naming the key."""
    import copy
    from types import SimpleNamespace

    from llmcl.eval.tasks import render_test_records

    strict = copy.deepcopy(tok)
    strict.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                            "{% endif %}" + tok.chat_template)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    system = [{"role": "system", "content": "be brief"}, *msgs]
    cfg = DataConfig(path="x.jsonl")
    assert encode([{"messages": msgs}], cfg, strict, 64)[0]  # the control: no system turn, no complaint
    message = (r"^recipe key 'stages.1.data.path': the tokenizer's chat template refuses a conversation of the data "
               r"\(roles system, user(, assistant)?\): System role not supported$")
    with pytest.raises(LlmclError, match=message):
        encode([{"messages": system}], cfg, strict, 64, key="stages.1.data")
    with pytest.raises(LlmclError, match=message):
        render_test_records(SimpleNamespace(data=cfg), 1, [{"messages": system}], strict)
    pc = DataConfig(path="x.jsonl", chat_template=True)
    alternating = copy.deepcopy(tok)  # a prompt/completion stage through a template that refuses every user turn
    alternating.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"
    with pytest.raises(LlmclError, match=r"^recipe key 'stages.0.data.chat_template': .*roles user\): Conversation"):
        render_test_records(SimpleNamespace(data=pc), 0, [{"prompt": "a", "completion": " b"}], alternating)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".txt"])
def test_a_file_saved_with_a_utf8_byte_order_mark_reads_as_without_it(suffix, tmp_path):
    """Excel's "CSV UTF-8" and Windows editors begin a file with a byte order mark: its first field was named
    '\\ufeffprompt' (a missing-field error), a JSON-lines file's first line did not parse, and a text corpus's
    first document began with U+FEFF. Read whole and streamed, the records are those of the file without it."""
    from llmcl.data.stream import _local_records

    records = [{"prompt": f"p{i}", "completion": f" c{i}"} for i in range(3)]
    text = {".jsonl": "".join(json.dumps(r) + "\n" for r in records), ".json": json.dumps(records),
            ".csv": "prompt,completion\n" + "".join(f"{r['prompt']},{r['completion']}\n" for r in records),
            ".txt": "first document\nsecond document\n"}[suffix]
    plain, marked = tmp_path / f"plain{suffix}", tmp_path / f"marked{suffix}"
    plain.write_text(text, encoding="utf-8")
    marked.write_text(text, encoding="utf-8-sig")
    assert marked.read_bytes().startswith(b"\xef\xbb\xbf")
    assert read_file(marked) == read_file(plain) and list(_local_records(marked)) == list(_local_records(plain))
    assert read_file(plain)[0] == ({"text": "first document"} if suffix == ".txt" else records[0])


def test_a_prompt_gets_the_special_tokens_a_tokenizer_puts_before_a_text_even_an_empty_one(tok):
    """The BOS a tokenizer adds (and never the EOS one with add_eos_token puts after a text) begins every prompt
    of prompt/completion data, an empty one too; a chat-rendered prompt, or one already beginning with the BOS
    text, gets none."""
    import copy

    from tokenizers import processors

    from llmcl.data.formatting import prompt_ids

    both = copy.deepcopy(tok)
    both.bos_token = "<|endoftext|>"
    both._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A <|im_end|>", special_tokens=[("<|endoftext|>", both.bos_token_id),
                                                              ("<|im_end|>", both.eos_token_id)])
    bos, bare = both.bos_token_id, both("Question: x", add_special_tokens=False)["input_ids"]
    assert both("Question: x")["input_ids"] == [bos, *bare, both.eos_token_id]  # the premise
    assert prompt_ids(both, "Question: x", rendered=False) == [bos, *bare]
    assert prompt_ids(both, "", rendered=False) == [bos]
    assert prompt_ids(both, "Question: x", rendered=True) == bare
    assert prompt_ids(both, "<|endoftext|>Question: x", rendered=False)[:2] != [bos, bos]
    (ex,), _ = encode([{"prompt": "", "completion": " yes"}], DataConfig(path="x.jsonl"), both, 64)
    assert ex.input_ids == [bos, *both(" yes", add_special_tokens=False)["input_ids"], both.eos_token_id]
    assert prompt_ids(tok, "", rendered=False) == [] and prompt_ids(tok, "hi", rendered=False) == tok("hi")["input_ids"]
