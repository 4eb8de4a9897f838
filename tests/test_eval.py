"""Forgetting, measured, end to end on builtin:tiny: lm-eval after every stage, the matrix, the report files."""

from __future__ import annotations

import io
import json
import random
import re
from pathlib import Path

import pytest
import torch
import yaml

from conftest import SHARED_DATA, run_cli, write_recipe
from llmcl.eval import metrics as M
from llmcl.eval.harness import offline_and_quiet, preserved_rng
from llmcl.models import load_tokenizer
from llmcl.rundir import artifacts
from llmcl.recipe import ModelConfig

GPU_BF16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
HAS_EVAL_DATA = (SHARED_DATA / "eval" / "arc_easy" / "arc_easy.jsonl").exists()
WORDS = "good great fine bad awful poor lovely dull superb boring".split()


def _write_data(d):
    rng = random.Random(0)
    rows = [{"sentence": f"the film was {w} and {rng.choice(WORDS)}", "label": "positive" if i % 2 else "negative"}
            for i, w in enumerate(WORDS * 3)]
    (d / "cls").mkdir()
    (d / "cls" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:20]))
    (d / "cls" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[20:]))
    docs = [{"text": " ".join(rng.choice(WORDS) for _ in range(40))} for _ in range(12)]
    (d / "text").mkdir()
    (d / "text" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in docs[:8]))
    (d / "text" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in docs[8:]))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    import os

    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    d = tmp_path_factory.mktemp("evalrun")
    _write_data(d)
    recipe = write_recipe(
        d / "r.yaml",
        train={"lr": 5e-3, "max_steps": 3, "batch_size": 4, "seq_len": 64, "warmup": 0},
        stages=[{"data": {"path": "builtin:facts"}},
                {"name": "sentiment", "data": {"path": str(d / "cls"), "prompt_template": "Review: {sentence}\nSentiment:",
                                               "completion_template": " {label}", "choices": ["negative", "positive"]}},
                {"name": "prose", "data": {"path": str(d / "text")}, "train": {"seq_len": 32}}],
        eval={"after_each_stage": True, "limit": 6, "tasks": ["llmcl_arc_easy"] if HAS_EVAL_DATA else [],
              "data_dir": str(SHARED_DATA / "eval") if HAS_EVAL_DATA else None},
        logging={"trackers": ["tensorboard"], "project": "tb"},
    )
    res = run_cli("train", str(recipe), "--run-dir", str(d / "run"))
    assert res.exit_code == 0, res.output
    from llmcl.train.distributed import reset_accelerate

    reset_accelerate()  # the module-scoped run must not leave its accelerator to the tests
    return d / "run"


def _items_files(tasks_dir, stage):
    """The rendered test items files of `stage` (named by their content) in a run's eval/tasks."""
    return [p for p in tasks_dir.glob("*.jsonl") if re.fullmatch(re.escape(stage) + r"-[0-9a-f]{12}\.jsonl", p.name)]


def _test_items(tasks_dir, stage):
    """The rendered test items of `stage` that the run's task YAMLs point at (its one file)."""
    files = _items_files(tasks_dir, stage)
    assert len(files) == 1, files
    return [json.loads(line) for line in files[0].read_text().splitlines()]


def _rows(run_dir):
    return {p.stem: json.loads(p.read_text()) for p in sorted((run_dir / "eval").glob("*.json"))}


def test_every_row_scores_every_task_with_version_count_metric_and_stderr(run_dir):
    rows = _rows(run_dir)
    assert set(rows) == {"base", "stage-00", "stage-01", "stage-02"}
    expected = {"llmcl_stage_facts": "exact_match", "llmcl_stage_sentiment": "exact_match",
                "llmcl_stage_sentiment-choice": "acc", "llmcl_stage_prose": "bits_per_byte"}
    if HAS_EVAL_DATA:
        expected["llmcl_arc_easy"] = "acc"
    for name, row in rows.items():
        assert {t: r["metric"] for t, r in row["tasks"].items()} == expected, name
        assert row["lm_eval_version"].startswith("0.4.")
        for task, r in row["tasks"].items():
            assert r["version"] is not None and r["n"] == (4 if task == "llmcl_stage_prose" else 6)
            assert r["value"] is not None and ("stderr" in r)
        assert rows[name]["tasks"]["llmcl_stage_prose"]["higher_is_better"] is False
    # the model changed from row to row, and what was scored is each stage's own checkpoint
    bpb = [rows[r]["tasks"]["llmcl_stage_prose"]["value"] for r in ("base", "stage-00", "stage-01", "stage-02")]
    assert len(set(bpb)) == 4
    assert bpb[3] < bpb[2]  # training on the prose stage lowers its bits per byte


def test_stage_task_yamls_have_the_right_output_types(run_dir):
    tasks = run_dir / "eval" / "tasks"
    kinds = {p.relative_to(tasks).as_posix(): yaml.safe_load(p.read_text())["output_type"]
             for p in tasks.rglob("*.yaml")}
    # a classification stage (data.choices) both ways: its generated label and the label set's loglikelihood
    assert kinds == {"facts.yaml": "generate_until", "sentiment.yaml": "generate_until",
                     "choice/sentiment.yaml": "multiple_choice", "prose.yaml": "loglikelihood_rolling"}
    first = _test_items(tasks, "sentiment")[0]
    assert first["choices"] == [" negative", " positive"] and first["choices"][first["gold"]] == first["completion"]


def _loglikelihood(model, tok, context, continuation):
    """The scoring of one (context, continuation) pair of a stage task, computed independently: the prompt's
    tokens, then the answer's, each tokenized alone (as training tokenizes a prompt and its completion)."""
    ctx = tok(context)["input_ids"]
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.float(), -1)[0]
    return sum(logp[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont))


def test_multiple_choice_accuracy_matches_an_independent_computation(run_dir):
    ledger = json.loads((run_dir / "ledger.json").read_text())
    manifest = json.loads((run_dir / ledger["stages"][1]["checkpoint"] / "manifest.json").read_text())
    cfg = ModelConfig(path="builtin:tiny")
    model = artifacts.load(run_dir, manifest, cfg, 0, trainable=False).eval()
    tok = load_tokenizer(cfg)
    docs = _test_items(run_dir / "eval" / "tasks", "sentiment")[:6]
    correct = 0
    for doc in docs:
        lls = [_loglikelihood(model, tok, doc["prompt"], c) for c in doc["choices"]]
        correct += int(max(range(len(lls)), key=lls.__getitem__) == doc["gold"])
    acc = _rows(run_dir)["stage-01"]["tasks"]["llmcl_stage_sentiment-choice"]["value"]
    assert acc == pytest.approx(correct / len(docs))


def test_report_matrix_matches_an_independent_computation_from_the_eval_jsons(run_dir):
    res = run_cli("report", str(run_dir))
    assert res.exit_code == 0, res.output
    assert "accuracy matrix" in res.output and "BWT" in res.output
    matrix = json.loads((run_dir / "report" / "matrix.json").read_text())
    rows = _rows(run_dir)
    order = ["base", "stage-00", "stage-01", "stage-02"]
    tasks = ["llmcl_stage_facts", "llmcl_stage_sentiment", "llmcl_stage_prose"]
    assert matrix["rows"] == ["base", "facts", "sentiment", "prose"]
    assert [c["task"] for c in matrix["columns"]][:3] == tasks
    raw = [[rows[r]["tasks"][t]["value"] for t in tasks] for r in order]
    assert [row[:3] for row in matrix["R"]] == raw
    assert [c["metric"] for c in matrix["columns"]][:3] == ["exact_match", "exact_match", "bits_per_byte"]
    # stage tasks in two units: nothing is averaged over both; each metric's stages get their own summary
    assert matrix["metrics"] == {"AA": None, "BWT": None, "FWT": None, "forgetting": None,
                                 "general_delta": matrix["metrics"]["general_delta"]}
    base, A = raw[0], raw[1:]
    aa = (A[2][0] + A[2][1]) / 2  # exact match: facts (stage 0) and sentiment (stage 1)
    bwt = ((A[2][0] - A[0][0]) + (A[2][1] - A[1][1])) / 2
    fwt = A[0][1] - base[1]
    fgt = ((max(A[0][0], A[1][0]) - A[2][0]) + (max(A[0][1], A[1][1]) - A[2][1])) / 2
    got = matrix["metrics_by_metric"]["exact_match"]
    assert (got["AA"], got["BWT"], got["FWT"], got["forgetting"]) == pytest.approx((aa, bwt, fwt, fgt))
    got = matrix["metrics_by_metric"]["bits_per_byte"]  # prose (stage 2): lower is better, so negated
    assert (got["AA"], got["BWT"], got["FWT"], got["forgetting"]) == pytest.approx(
        (-A[2][2], None, -A[1][2] + base[2], None))
    assert [(a["stage"], a["metric"]) for a in matrix["after_stage"]] == [
        (k, m) for m in ("exact_match", "bits_per_byte") for k in range(3)]
    assert matrix["missing_cells"] == []
    # the label-set view of the one classification stage (sentiment, stage 1): its own AA/BWT/FWT
    c = [rows[r]["tasks"]["llmcl_stage_sentiment-choice"]["value"] for r in order]
    got = matrix["metrics_choice"]
    assert (got["AA"], got["BWT"], got["FWT"]) == pytest.approx((c[3], c[3] - c[2], c[1] - c[0]))
    assert "sentiment (labels)" in [col["label"] for col in matrix["columns"]]
    if HAS_EVAL_DATA:
        arc = [rows[r]["tasks"]["llmcl_arc_easy"]["value"] for r in order]
        assert matrix["general_delta"]["llmcl_arc_easy"] == pytest.approx(arc[3] - arc[0])
    md = (run_dir / "report" / "report.md").read_text()
    assert "| base |" in md and "| metric | AA | BWT | FWT | forgetting | general delta |" in md
    assert f"| exact_match | {aa:.3f} |" in md and f"| bits_per_byte | {-A[2][2]:.3f} |" in md
    assert "Incomplete" not in md
    from llmcl.eval import render, report as report_mod

    line = render.current_row_text(report_mod.collect(run_dir))  # the training log's line after a stage
    assert line.endswith(f"| exact_match AA {aa:.3f}, BWT {bwt:+.3f}; bits_per_byte AA {-A[2][2]:.3f}, BWT —"), line
    n = [rows["stage-02"]["tasks"][t]["n"] for t in tasks]  # each column says how many items it scored
    assert f"| after \\ task | facts (exact_match, n={n[0]}) | sentiment (exact_match, n={n[1]}) | " \
           f"prose (bits_per_byte, n={n[2]}) |" in md


@pytest.mark.skipif(not HAS_EVAL_DATA, reason="needs ../shared/data/eval")
def test_eval_metric_chooses_the_metric_a_column_shows_without_scoring_again(run_dir, tmp_path):
    """eval.metric: {llmcl_arc_easy: acc_norm} renders ARC's column from the rows' acc_norm (kept with its
    standard error), its general delta recomputed here; a metric the task does not report, or a task the run does
    not have, is one line naming the key."""
    import shutil

    other = tmp_path / "norm"
    shutil.copytree(run_dir, other)
    data = yaml.safe_load((other / "recipe.yaml").read_text())
    data["eval"]["metric"] = {"llmcl_arc_easy": "acc_norm"}
    (other / "recipe.yaml").write_text(yaml.safe_dump(data))
    res = run_cli("report", str(other))
    assert res.exit_code == 0, res.output
    rows = _rows(other)
    order = ["base", "stage-00", "stage-01", "stage-02"]
    cells = [rows[r]["tasks"]["llmcl_arc_easy"] for r in order]
    assert all(c["metric"] == "acc" and {"acc", "acc_norm"} <= c["metrics"].keys() for c in cells)  # rows unchanged
    norm = [c["metrics"]["acc_norm"] for c in cells]
    matrix = json.loads((other / "report" / "matrix.json").read_text())
    k = [col["task"] for col in matrix["columns"]].index("llmcl_arc_easy")
    assert matrix["columns"][k]["metric"] == "acc_norm"
    assert [row[k] for row in matrix["R"]] == norm
    assert [row[k] for row in matrix["stderr"]] == [c["stderrs"]["acc_norm"] for c in cells]
    assert matrix["general_delta"]["llmcl_arc_easy"] == pytest.approx(norm[3] - norm[0])
    assert "arc_easy (acc_norm, n=" in (other / "report" / "report.md").read_text()
    data["eval"]["metric"] = {"llmcl_arc_easy": "acc_nrom"}
    (other / "recipe.yaml").write_text(yaml.safe_dump(data))
    res = run_cli("report", str(other))
    assert res.exit_code == 2 and res.output.strip() == (
        "error: recipe key 'eval.metric.llmcl_arc_easy': 'acc_nrom' is not a metric llmcl_arc_easy reports in "
        f"{other} (it reports acc, acc_norm)"), res.output
    data["eval"]["metric"] = {"sentiment": "acc_norm"}
    (other / "recipe.yaml").write_text(yaml.safe_dump(data))
    res = run_cli("report", str(other))
    assert res.exit_code == 2 and "recipe key 'eval.metric.sentiment': 'sentiment' is not a task of this run" in \
        res.output and "did you mean 'eval.metric.llmcl_stage_sentiment'" in res.output, res.output


@pytest.mark.skipif(not HAS_EVAL_DATA, reason="needs ../shared/data/eval")
def test_a_metric_no_task_reports_stops_llmcl_train_before_stage_0_and_a_rerun_records_the_new_eval_keys(tmp_path):
    """The base row scores every task: eval.metric is checked against it before the first stage trains. A later
    `llmcl train` with other eval keys (nothing to train) writes them to the run's recipe.yaml, which `llmcl
    report` and `llmcl eval` read."""
    recipe = write_recipe(tmp_path / "r.yaml", train={"max_steps": 1, "batch_size": 2, "seq_len": 48},
                          eval={"after_each_stage": True, "stage_tasks": False, "tasks": ["llmcl_arc_easy"], "limit": 2,
                                "data_dir": str(SHARED_DATA / "eval")})
    run = tmp_path / "run"
    res = run_cli("train", str(recipe), "eval.metric.llmcl_arc_easy=acc_nrm", "--run-dir", str(run))
    assert res.exit_code == 2 and res.output.strip().splitlines()[-1] == (
        "error: recipe key 'eval.metric.llmcl_arc_easy': 'acc_nrm' is not a metric llmcl_arc_easy reports in "
        f"{run} (it reports acc, acc_norm)"), res.output
    assert not list(run.glob("stage-*")) and (run / "eval" / "base.json").exists()
    res = run_cli("train", str(recipe), "eval.metric.llmcl_arc_easy=acc_norm", "--run-dir", str(run))
    assert res.exit_code == 0, res.output
    stored = lambda: yaml.safe_load((run / "recipe.yaml").read_text())["eval"]["metric"]  # noqa: E731
    assert stored() == {"llmcl_arc_easy": "acc_norm"}
    assert run_cli("report", str(run)).exit_code == 0
    assert json.loads((run / "report" / "matrix.json").read_text())["columns"][0]["metric"] == "acc_norm"
    res = run_cli("train", str(recipe), "eval.metric.llmcl_arc_easy=acc_norm,none", "--run-dir", str(run))
    assert res.exit_code == 2 and "(it reports acc, acc_norm; the first filter's is named without the filter: " \
        "acc_norm)" in res.output, res.output
    assert stored() == {"llmcl_arc_easy": "acc_norm"}  # refused before the run dir took the new value
    res = run_cli("train", str(recipe), "--run-dir", str(run))
    assert res.exit_code == 0 and "nothing to train" in res.output and stored() == {}


def test_a_run_without_its_weights_reports_the_same_matrix_and_a_stage_trained_again_ends_it(run_dir, tmp_path):
    """The report reads results: with every stage directory deleted (disk space, or an archive without weights,
    as cl_compare --archive keeps) `llmcl report` writes the matrix it wrote with them; a stage the ledger shows
    being trained again hides its row and every later one (they were trained from the old one)."""
    import shutil

    assert run_cli("report", str(run_dir)).exit_code == 0
    full = json.loads((run_dir / "report" / "matrix.json").read_text())
    light = tmp_path / "light"
    shutil.copytree(run_dir, light, ignore=shutil.ignore_patterns("stage-*-*"))  # the stage dirs, not eval rows
    assert not list(light.glob("stage-*-*")) and len(list((light / "eval").glob("stage-*.json"))) == 3
    res = run_cli("report", str(light))
    assert res.exit_code == 0, res.output
    got = json.loads((light / "report" / "matrix.json").read_text())
    assert (got["rows"], got["R"], got["metrics"]) == (full["rows"], full["R"], full["metrics"])
    ledger = json.loads((light / "ledger.json").read_text())
    ledger["stages"][1]["status"] = "running"
    (light / "ledger.json").write_text(json.dumps(ledger))
    assert run_cli("report", str(light)).exit_code == 0
    assert json.loads((light / "report" / "matrix.json").read_text())["rows"] == ["base", "facts"]


def test_report_pngs_are_valid_images(run_dir):
    from PIL import Image

    run_cli("report", str(run_dir))
    for name in ("matrix.png", "loss.png"):
        path = run_dir / "report" / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as im:
            im.verify()
            assert im.size[0] > 300 and im.size[1] > 150


def test_eval_rows_are_logged_to_the_trackers(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accs = [EventAccumulator(str(p.parent)) for p in (run_dir / "tb").rglob("events.out.tfevents*")]
    accs = [a for a in accs if a.Reload() and "cl/exact_match/AA" in a.Tags()["scalars"]]
    assert len(accs) == 1
    assert "cl/AA" not in accs[0].Tags()["scalars"]  # the run's stage tasks are in two units: one AA per metric
    steps = [e.step for e in accs[0].Scalars("cl/exact_match/AA")]
    assert steps == [3, 6, 9]  # logged at the global step where each stage ended
    matrix = json.loads((run_dir / "report" / "matrix.json").read_text()) if (run_dir / "report").exists() else None
    if matrix:
        for metric in ("exact_match", "bits_per_byte"):
            assert accs[0].Scalars(f"cl/{metric}/AA")[-1].value == pytest.approx(
                matrix["metrics_by_metric"][metric]["AA"], rel=1e-5)


def test_llmcl_eval_rescores_one_row_and_keeps_the_others(run_dir):
    before = _rows(run_dir)
    res = run_cli("eval", str(run_dir), "--stage", "1", "--tasks", "sentiment")
    assert res.exit_code == 0, res.output
    after = _rows(run_dir)
    assert after["stage-01"]["tasks"] == before["stage-01"]["tasks"]  # deterministic, and nothing dropped
    assert after["stage-01"]["created_at"] >= before["stage-01"]["created_at"]
    res = run_cli("eval", str(run_dir), "--stage", "7")
    assert res.exit_code == 2 and "expected 'base' or a finished stage" in res.stderr


def test_a_missing_row_is_scored_when_the_run_is_restarted(run_dir):
    recipe = run_dir.parent / "r.yaml"
    (run_dir / "eval" / "stage-01.json").unlink()
    res = run_cli("train", str(recipe), "--run-dir", str(run_dir))
    assert res.exit_code == 0 and "nothing to train" in res.output
    assert (run_dir / "eval" / "stage-01.json").exists()


@pytest.mark.slow  # scores a 3-stage run's rows again (~25 s here): -m slow, which CI runs (.ci/run)
def test_a_run_renders_its_stage_tasks_once_however_many_rows_it_scores(run_dir, tmp_path, monkeypatch):
    """The stage tasks are the same for every row of a run: `llmcl eval` (every row) and a restarted `llmcl train`
    (the rows a run left unscored) render and write them once, and score the rows they scored before."""
    import shutil

    from llmcl.eval import scoring, tasks

    calls = []
    monkeypatch.setattr(scoring, "write_stage_tasks", lambda *a, **k: calls.append(a) or tasks.write_stage_tasks(*a, **k))
    before = {row: data["tasks"] for row, data in _rows(run_dir).items()}
    other = tmp_path / "run"
    shutil.copytree(run_dir, other)
    for p in (other / "eval").glob("*.json"):
        p.unlink()
    res = run_cli("eval", str(other))
    assert res.exit_code == 0, res.output
    assert len(calls) == 1 and {row: data["tasks"] for row, data in _rows(other).items()} == before
    calls.clear()
    for row in ("base", "stage-00", "stage-02"):
        (other / "eval" / f"{row}.json").unlink()
    res = run_cli("train", str(run_dir.parent / "r.yaml"), "--run-dir", str(other))
    assert res.exit_code == 0 and "nothing to train" in res.output, res.output
    assert len(calls) == 1 and {row: data["tasks"] for row, data in _rows(other).items()} == before


def test_comparison_of_several_runs(run_dir, tmp_path):
    other = tmp_path / "copy"
    import shutil

    shutil.copytree(run_dir, other)
    res = run_cli("report", str(run_dir), str(other), "--markdown", str(tmp_path / "cmp.md"))
    assert res.exit_code == 0
    assert "comparison" in res.output and res.output.count("seqft") >= 2
    md = (tmp_path / "cmp.md").read_text().splitlines()
    assert md[0] == "| run | method | AA | BWT | FWT | forgetting | general delta | train time |"
    assert len(md) == 6 and all(line.count("|") == 9 for line in md)  # a row per run and metric (two units)
    assert [line.split(" | ")[0] for line in md[2:]] == [  # two runs of one recipe: named by their directories
        f"| tiny [{d}] ({m})" for d in ("run", "copy") for m in ("exact_match", "bits_per_byte")]


def test_the_report_says_how_the_rows_were_scored_and_a_comparison_where_runs_differ(run_dir, tmp_path):
    """Every row records its lm-eval version, weight dtype, item limits and few-shot setting: the report says
    them in one sentence (from the rows, not the recipe), marks a setting the cells differ in, and a comparison of
    runs scored on different numbers of items says so under the table."""
    import shutil

    rows = _rows(run_dir)
    version = {r["lm_eval_version"] for r in rows.values()}
    assert len(version) == 1 and {r["num_fewshot"] for r in rows.values()} == {None}
    assert run_cli("report", str(run_dir)).exit_code == 0
    matrix = json.loads((run_dir / "report" / "matrix.json").read_text())
    assert matrix["scoring"] == {"lm_eval_version": list(version), "dtype": ["float32"], "limit": [6],
                                 **({"tasks_limit": [6]} if HAS_EVAL_DATA else {}), "num_fewshot": [None],
                                 "max_prompt_tokens": [None], "max_new_tokens": [32]}
    general = "general tasks: at most 6 items (eval.tasks_limit); " if HAS_EVAL_DATA else ""
    sentence = (f"Scored with lm-eval {version.pop()}; weights in float32; stage tasks: at most 6 items (eval.limit); "
                f"{general}few-shot: each task's default (eval.num_fewshot); stage prompts: any length "
                "(eval.max_prompt_tokens); tokens generated: 32 (eval.max_new_tokens).")
    assert sentence in (run_dir / "report" / "report.md").read_text().splitlines()
    other = tmp_path / "fewer"
    shutil.copytree(run_dir, other)
    row = json.loads((other / "eval" / "stage-02.json").read_text())
    for task, cell in row["tasks"].items():  # as if the last row had been scored with eval.limit 3
        if task.startswith("llmcl_stage_"):
            cell["scoring"]["limit"] = 3
    (other / "eval" / "stage-02.json").write_text(json.dumps(row))
    res = run_cli("report", str(run_dir), str(other), "--markdown", str(tmp_path / "cmp.md"))
    assert res.exit_code == 0, res.output
    differ = "stage tasks: at most 6 items / at most 3 items (eval.limit) [cells differ]"
    assert differ in (other / "report" / "report.md").read_text()
    text = " ".join(res.output.split())  # the terminal's tables say it too (brackets are not rich markup)
    assert differ in text and "The runs were scored differently (limit): tiny [run]: Scored with" in text
    md = (tmp_path / "cmp.md").read_text()
    assert "The runs were scored differently (limit): tiny [run]: Scored with" in " ".join(md.split())
    old = tmp_path / "old"  # rows written before num_fewshot was recorded: not a difference
    shutil.copytree(run_dir, old)
    for path in (old / "eval").glob("*.json"):
        row = json.loads(path.read_text())
        del row["num_fewshot"]
        for cell in row["tasks"].values():
            del cell["scoring"]
        path.write_text(json.dumps(row))
    res = run_cli("report", str(run_dir), str(old))
    assert res.exit_code == 0 and "scored differently" not in res.output, res.output


def test_a_column_whose_rows_were_scored_on_other_test_items_says_so(run_dir, tmp_path):
    """A stage's test data edited between two rows (one job per stage, the file rewritten between them): as many
    items, other ones, and the column compared them as forgetting. Each stage cell records its items' content
    hash; a column with two says [items differ] (the control: the run as scored says nothing)."""
    import shutil

    rows = _rows(run_dir)
    items = _items_files(run_dir / "eval" / "tasks", "sentiment")[0].stem.rsplit("-", 1)[1]
    assert {r["tasks"][t]["scoring"]["items"] for r in rows.values()
            for t in ("llmcl_stage_sentiment", "llmcl_stage_sentiment-choice")} == {items}
    assert "items" not in rows["base"]["tasks"].get("llmcl_arc_easy", {}).get("scoring", {})  # general: no such hash
    assert run_cli("report", str(run_dir)).exit_code == 0
    assert "[items differ]" not in (run_dir / "report" / "report.md").read_text()
    other = tmp_path / "edited"
    shutil.copytree(run_dir, other)
    row = json.loads((other / "eval" / "stage-02.json").read_text())
    row["tasks"]["llmcl_stage_sentiment"]["scoring"]["items"] = "0" * 12  # as if scored after the file changed
    (other / "eval" / "stage-02.json").write_text(json.dumps(row))
    assert run_cli("report", str(other)).exit_code == 0
    text = " ".join((other / "report" / "report.md").read_text().split())
    assert "sentiment (exact_match, n=6 [items differ])" in text and "sentiment (labels) (acc, n=6)" in text


def test_each_cell_records_how_it_was_scored_and_a_rescored_task_leaves_the_others_records(run_dir, tmp_path):
    """`llmcl eval --tasks X` with other eval keys than the row was scored with: the other cells keep their own
    record (the row's used to be rewritten to the new keys), and the report shows both settings and the column's
    item counts where rows differ."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    data = yaml.safe_load((copy / "recipe.yaml").read_text())
    data["eval"].update(limit=3, max_new_tokens=16)
    (copy / "recipe.yaml").write_text(yaml.safe_dump(data))
    res = run_cli("eval", str(copy), "--stage", "base", "--tasks", "sentiment")
    assert res.exit_code == 0, res.output
    cells = json.loads((copy / "eval" / "base.json").read_text())["tasks"]
    assert cells["llmcl_stage_facts"]["scoring"]["limit"] == 6 and cells["llmcl_stage_facts"]["n"] == 6
    assert cells["llmcl_stage_facts"]["scoring"]["max_new_tokens"] == 32
    assert cells["llmcl_stage_sentiment"]["scoring"]["limit"] == 3 and cells["llmcl_stage_sentiment"]["n"] == 3
    assert cells["llmcl_stage_sentiment"]["scoring"]["max_new_tokens"] == 16
    assert "max_new_tokens" not in cells["llmcl_stage_sentiment-choice"]["scoring"]  # nothing is generated
    assert "max_prompt_tokens" not in cells["llmcl_stage_prose"]["scoring"]  # documents are scored whole
    res = run_cli("report", str(copy))
    assert res.exit_code == 0, res.output
    text = " ".join((copy / "report" / "report.md").read_text().split())
    assert "stage tasks: at most 6 items / at most 3 items (eval.limit) [cells differ]" in text
    assert "tokens generated: 32 / 16 (eval.max_new_tokens) [cells differ]" in text
    assert "sentiment (exact_match, n=3/6 [rows differ])" in text and "facts (exact_match, n=6)" in text
    from rich.console import Console

    from llmcl.eval import render, report as report_mod

    console = Console(width=400, record=True, file=io.StringIO())
    console.print(render.tables(report_mod.collect(copy))[0])
    assert "n=3/6 [rows differ]" in console.export_text()  # the terminal's header too (not read as rich markup)
    # a row written before cells kept their own record: rescoring one task keeps the others' (the row's, then)
    row = json.loads((copy / "eval" / "stage-00.json").read_text())
    for cell in row["tasks"].values():
        del cell["scoring"]
    row["tasks"]["llmcl_stage_prose"]["scoring"] = None  # damaged: read as a cell without a record
    (copy / "eval" / "stage-00.json").write_text(json.dumps(row))
    res = run_cli("eval", str(copy), "--stage", "0", "--tasks", "sentiment")
    assert res.exit_code == 0, res.output
    cells = json.loads((copy / "eval" / "stage-00.json").read_text())["tasks"]
    assert cells["llmcl_stage_facts"]["scoring"]["limit"] == 6 and cells["llmcl_stage_prose"]["scoring"]["limit"] == 6
    assert cells["llmcl_stage_sentiment"]["scoring"]["limit"] == 3


@pytest.mark.slow  # lm-eval indexes its ~10,000 task files (~18 s here): -m slow, which CI runs (.ci/run)
def test_unknown_eval_task_is_a_validation_error_with_near_matches(tiny_recipe):
    res = run_cli("validate", str(tiny_recipe), "eval.tasks=[llmcl_arc_esy]")
    assert res.exit_code == 2
    assert "recipe key 'eval.tasks.0': unknown lm-eval task 'llmcl_arc_esy' (did you mean 'llmcl_arc_easy'" \
        in res.stderr


def test_choices_must_contain_every_test_answer(tmp_path):
    from llmcl.eval.tasks import render_test_records
    from llmcl.errors import LlmclError
    from llmcl.recipe import DataConfig, StageConfig

    stage = StageConfig(data=DataConfig(path="x.jsonl", prompt_template="{q}", completion_template=" {a}",
                                        choices=["yes", "no"]), name="s")
    kind, rows = render_test_records(stage, 0, [{"q": "is it?", "a": "no"}], tokenizer=None)
    assert kind == "generate" and rows[0]["gold"] == 1 and rows[0]["choices"] == [" yes", " no"]
    with pytest.raises(LlmclError, match="'stages.0.data.choices': test completion 'maybe' is not one of"):
        render_test_records(stage, 0, [{"q": "is it?", "a": "maybe"}], tokenizer=None)


def test_evaluation_leaves_the_training_rng_untouched():
    import numpy as np

    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    with preserved_rng():
        random.seed(1234), np.random.seed(1234), torch.manual_seed(1234)  # what lm-eval does
        random.random(), torch.rand(3)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_metrics_module_and_report_agree_on_partial_runs(run_dir, tmp_path):
    """A run with only its first stage done: the report's summary is what the metrics module gives for the
    1-stage matrix (AA = the one score, no transfer or forgetting yet)."""
    import shutil

    from llmcl.eval import report as report_mod

    partial = tmp_path / "partial"
    shutil.copytree(run_dir, partial)
    ledger = json.loads((partial / "ledger.json").read_text())
    for entry in ledger["stages"][1:]:
        entry["status"] = "pending"
    (partial / "ledger.json").write_text(json.dumps(ledger))
    for row in ("stage-01", "stage-02"):
        (partial / "eval" / f"{row}.json").unlink()
    rep = report_mod.collect(partial)
    rows = _rows(partial)
    facts = [rows[r]["tasks"]["llmcl_stage_facts"]["value"] for r in ("stage-00", "base")]
    assert rep.by_metric["exact_match"] == pytest.approx(M.summary([[facts[0]]], [facts[1]]))
    assert rep.by_metric["exact_match"]["AA"] == pytest.approx(facts[0]) and rep.by_metric["exact_match"]["BWT"] is None
    assert rep.missing == []  # the rows not written are of stages not done


def test_a_missing_row_or_cell_is_named_and_the_summary_is_of_the_last_row(run_dir, tmp_path):
    """A finished run whose stage-1 row is gone and whose last row lacks one task: the summary is still of the
    last row (it stopped at the gap, describing stage 0 beside a table that shows stage 2), and the report names
    every cell it reads that has no score, with the command that scores them."""
    import shutil

    from llmcl.eval import report as report_mod

    gap = tmp_path / "gap"
    shutil.copytree(run_dir, gap)
    (gap / "eval" / "stage-01.json").unlink()
    last = json.loads((gap / "eval" / "stage-02.json").read_text())
    del last["tasks"]["llmcl_stage_sentiment"]
    (gap / "eval" / "stage-02.json").write_text(json.dumps(last))
    rep = report_mod.collect(gap)
    rows = _rows(gap)
    assert rep.rows == ["base", "facts", "prose"]
    facts = [rows[r]["tasks"]["llmcl_stage_facts"]["value"] for r in ("stage-00", "stage-02")]
    assert rep.by_metric["exact_match"]["AA"] == pytest.approx(facts[1])  # the last row's one exact-match cell
    assert rep.by_metric["exact_match"]["BWT"] == pytest.approx(facts[1] - facts[0])
    assert rep.missing == [("sentiment", "facts"), ("sentiment", "sentiment"), ("prose", "sentiment")]
    if HAS_EVAL_DATA:
        arc = [rows[r]["tasks"]["llmcl_arc_easy"]["value"] for r in ("base", "stage-02")]
        assert rep.general_delta["llmcl_arc_easy"] == pytest.approx(arc[1] - arc[0])
    res = run_cli("report", str(gap))
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "incomplete: 3 cells the summary reads have no score (facts after sentiment, sentiment after sentiment, " \
           "sentiment after prose)" in text and "--stage N" in text
    assert "**Incomplete:** 3 cells" in (gap / "report" / "report.md").read_text()
    assert json.loads((gap / "report" / "matrix.json").read_text())["missing_cells"] == [list(c) for c in rep.missing]


@pytest.mark.skipif(not HAS_EVAL_DATA, reason="needs ../shared/data/eval")
def test_general_tasks_only_on_base_and_last_stage_when_asked(run_dir, tmp_path):
    import shutil

    other = tmp_path / "ends"
    shutil.copytree(run_dir, other)
    data = yaml.safe_load((other / "recipe.yaml").read_text())
    data["eval"].update(tasks_every_stage=False, tasks_limit=3)
    (other / "recipe.yaml").write_text(yaml.safe_dump(data))
    for p in (other / "eval").glob("*.json"):
        p.unlink()
    res = run_cli("eval", str(other))
    assert res.exit_code == 0, res.output
    rows = _rows(other)
    has_general = {k: "llmcl_arc_easy" in v["tasks"] for k, v in rows.items()}
    assert has_general == {"base": True, "stage-00": False, "stage-01": False, "stage-02": True}
    assert rows["base"]["tasks"]["llmcl_arc_easy"]["n"] == 3  # eval.tasks_limit
    assert rows["base"]["tasks"]["llmcl_stage_sentiment"]["n"] == 6  # eval.limit
    # the general delta (last row vs base) is computed from the two rows that have it
    assert run_cli("report", str(run_dir)).exit_code == 0 and run_cli("report", str(other)).exit_code == 0
    full = json.loads((run_dir / "report" / "matrix.json").read_text())
    ends = json.loads((other / "report" / "matrix.json").read_text())
    assert full["general_delta"]["llmcl_arc_easy"] is not None
    delta = rows["stage-02"]["tasks"]["llmcl_arc_easy"]["value"] - rows["base"]["tasks"]["llmcl_arc_easy"]["value"]
    assert ends["general_delta"]["llmcl_arc_easy"] == pytest.approx(delta)


def test_unseen_stages_next_scores_only_what_fwt_reads_and_keeps_every_metric(run_dir, tmp_path):
    """eval.unseen_stages: next leaves out the stages more than one ahead of a row, and
    AA, BWT and FWT of both views equal the whole matrix's; `llmcl eval --tasks` still scores one ahead."""
    import shutil

    other = tmp_path / "next"
    shutil.copytree(run_dir, other)
    data = yaml.safe_load((other / "recipe.yaml").read_text())
    data["eval"]["unseen_stages"] = "next"
    (other / "recipe.yaml").write_text(yaml.safe_dump(data))
    (other / "eval" / "stage-00.json").unlink()  # with 3 stages, the only row that has a stage two ahead
    assert run_cli("eval", str(other), "--stage", "0").exit_code == 0
    stages = lambda row: {v["stage_name"] for v in row["tasks"].values() if v["stage_name"]}  # noqa: E731
    assert stages(_rows(other)["stage-00"]) == {"facts", "sentiment"}
    assert run_cli("report", str(run_dir)).exit_code == 0 and run_cli("report", str(other)).exit_code == 0
    full = json.loads((run_dir / "report" / "matrix.json").read_text())
    ahead = json.loads((other / "report" / "matrix.json").read_text())
    for key in ("metrics", "metrics_choice"):
        assert ahead[key] == pytest.approx(full[key]), key
    assert run_cli("eval", str(other), "--stage", "0", "--tasks", "prose").exit_code == 0
    assert "prose" in stages(_rows(other)["stage-00"])


def test_seen_stages_current_scores_the_diagonal_and_the_last_row_and_keeps_aa_bwt_fwt(run_dir, tmp_path):
    """eval.seen_stages: current (with unseen_stages: next, the long sequence's cheap triangle) scores a middle row
    on its own stage and the next one only, the last row on every stage; AA, BWT and FWT of both views equal the
    whole matrix's."""
    import shutil

    other = tmp_path / "current"
    shutil.copytree(run_dir, other)
    data = yaml.safe_load((other / "recipe.yaml").read_text())
    data["eval"].update(unseen_stages="next", seen_stages="current")
    (other / "recipe.yaml").write_text(yaml.safe_dump(data))
    for row in ("stage-00", "stage-01", "stage-02"):
        (other / "eval" / f"{row}.json").unlink()
    for stage in ("0", "1", "2"):
        assert run_cli("eval", str(other), "--stage", stage).exit_code == 0
    stages = lambda row: {v["stage_name"] for v in row["tasks"].values() if v["stage_name"]}  # noqa: E731
    rows = _rows(other)
    assert [stages(rows[r]) for r in ("stage-00", "stage-01", "stage-02")] == [
        {"facts", "sentiment"}, {"sentiment", "prose"}, {"facts", "sentiment", "prose"}]
    assert run_cli("report", str(run_dir)).exit_code == 0 and run_cli("report", str(other)).exit_code == 0
    full = json.loads((run_dir / "report" / "matrix.json").read_text())
    cheap = json.loads((other / "report" / "matrix.json").read_text())
    for key in ("metrics", "metrics_choice"):
        for metric in ("AA", "BWT", "FWT"):
            assert cheap[key][metric] == pytest.approx(full[key][metric]), (key, metric)


def test_rendered_test_items_are_named_by_their_content_so_a_rewrite_is_never_read_as_the_old_items(tmp_path):
    """`datasets` caches a data file by path and modification time: a stage's test items rendered again with other
    settings (here another seed's order) under the same name, within one tick of a coarse file-system clock, were
    read as the old items. Named by their content they are a new file; the same items leave the file as it was (no
    new cache entry), and the stage's earlier file goes, not another stage's whose name begins with it."""
    import os

    from lm_eval.tasks import TaskManager, get_task_dict

    from llmcl import recipe as recipe_mod
    from llmcl.eval.tasks import write_stage_tasks

    _write_data(tmp_path)
    data = {"path": str(tmp_path / "cls"), "prompt_template": "Review: {sentence}\nSentiment:",
            "completion_template": " {label}"}
    path = write_recipe(tmp_path / "r.yaml", stages=[{"name": "cls", "data": data}, {"name": "cls-b", "data": data}])
    tok, tasks_dir = load_tokenizer(recipe_mod.load(path, []).model), tmp_path / "run" / "eval" / "tasks"

    def write(overrides):  # the file stage cls's YAML points at
        write_stage_tasks(recipe_mod.load(path, overrides), tmp_path / "run", tok)
        return Path(yaml.safe_load((tasks_dir / "cls.yaml").read_text())["dataset_kwargs"]["data_files"]["test"])

    def read():  # the prompts lm-eval reads for stage cls
        with offline_and_quiet():
            task = get_task_dict(["llmcl_stage_cls"], TaskManager(include_path=[str(tasks_dir)],
                                                                   include_defaults=False))["llmcl_stage_cls"]
            return [d["prompt"] for d in task.test_docs()]

    first_file = write([])
    first = read()
    assert first == [r["prompt"] for r in _test_items(tasks_dir, "cls")] and _items_files(tasks_dir, "cls") == [first_file]
    stamp = first_file.stat()
    second_file = write(["seed=7"])
    os.utime(second_file, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # written within the first one's clock tick
    written = [json.loads(line)["prompt"] for line in second_file.read_text().splitlines()]
    assert sorted(written) == sorted(first) and written != first  # the same items in the other seed's order
    assert read() == written
    assert _items_files(tasks_dir, "cls") == [second_file] and len(_items_files(tasks_dir, "cls-b")) == 1  # the
    assert write(["seed=7"]) == second_file  # earlier file went, cls-b's stayed; the same items again: the file
    assert second_file.stat().st_mtime_ns == stamp.st_mtime_ns  # left as it was


def test_a_stage_task_reads_its_test_split_for_few_shot_only_when_shots_are_asked(run_dir, tmp_path):
    """Without eval.num_fewshot, lm-eval builds a stage task with an empty few-shot pool (by default it reads the
    whole test split into it, for every row); with eval.num_fewshot: 1 a prompt carries one other test item."""
    from lm_eval.tasks import TaskManager, get_task_dict

    from llmcl import recipe as recipe_mod
    from llmcl.eval.tasks import write_stage_tasks

    def built(tasks_dir):
        with offline_and_quiet():
            manager = TaskManager(include_path=[str(tasks_dir)], include_defaults=False)
            return get_task_dict(["llmcl_stage_sentiment"], manager)["llmcl_stage_sentiment"]

    plain = built(run_dir / "eval" / "tasks")
    docs = list(plain.test_docs())
    assert len(docs) > 1 and list(plain.sampler.df) == []
    assert plain.fewshot_context(docs[0], num_fewshot=0).count("Review:") == 1
    r = recipe_mod.load(run_dir.parent / "r.yaml", ["eval.num_fewshot=1"])
    write_stage_tasks(r, tmp_path, load_tokenizer(r.model))
    shots = built(tmp_path / "eval" / "tasks")
    assert len(shots.sampler.df) == len(docs)
    assert shots.fewshot_context(docs[0], num_fewshot=1).count("Review:") == 2
    # a run that borrows the stage tasks written without shots and asks for them: one line, naming the key
    import shutil

    borrower = tmp_path / "borrower"
    shutil.copytree(run_dir, borrower)
    data = yaml.safe_load((borrower / "recipe.yaml").read_text())
    data["eval"].update(stage_tasks=False, include_path=[str(run_dir / "eval" / "tasks")], num_fewshot=1,
                        tasks=["llmcl_stage_sentiment"])
    (borrower / "recipe.yaml").write_text(yaml.safe_dump(data))
    res = run_cli("eval", str(borrower), "--stage", "base")
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and "'eval.num_fewshot': 1 examples asked" in res.stderr, res.output
    # more shots than a stage's own test split holds (lm-eval's sampler: random.sample's ValueError): the same line
    data["eval"].update(stage_tasks=True, include_path=[], num_fewshot=len(docs) + 5)
    (borrower / "recipe.yaml").write_text(yaml.safe_dump(data))
    res = run_cli("eval", str(borrower), "--stage", "base")
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and "examples asked" in res.stderr, res.output
    assert (borrower / "eval" / "base.json").read_bytes() == (run_dir / "eval" / "base.json").read_bytes()  # kept


@pytest.mark.skipif(not HAS_EVAL_DATA, reason="needs ../shared/data/eval")
def test_another_runs_stage_tasks_get_the_stage_limit_not_tasks_limit(run_dir, tmp_path):
    """A run scored on stage tasks it includes by name (cl_compare's multitask bound) uses eval.limit for them."""
    import shutil

    other = tmp_path / "borrowing"
    shutil.copytree(run_dir, other)
    data = yaml.safe_load((other / "recipe.yaml").read_text())
    data["eval"].update(stage_tasks=False, include_path=[str(run_dir / "eval" / "tasks")], limit=5, tasks_limit=3,
                        tasks=["llmcl_stage_sentiment", "llmcl_arc_easy"])
    (other / "recipe.yaml").write_text(yaml.safe_dump(data))
    shutil.rmtree(other / "eval")
    res = run_cli("eval", str(other), "--stage", "base")
    assert res.exit_code == 0, res.output
    tasks = _rows(other)["base"]["tasks"]
    assert (tasks["llmcl_stage_sentiment"]["n"], tasks["llmcl_arc_easy"]["n"]) == (5, 3)


def test_max_prompt_tokens_leaves_out_longer_test_prompts_and_names_the_key(tmp_path):
    from llmcl import recipe as recipe_mod
    from llmcl.errors import LlmclError
    from llmcl.eval.tasks import write_stage_tasks

    (tmp_path / "cls").mkdir()
    rows = [{"sentence": " ".join(WORDS[: 1 + i % len(WORDS)]), "label": "positive"} for i in range(12)]
    for split in ("train", "test"):
        (tmp_path / "cls" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = load_tokenizer(ModelConfig(path="builtin:tiny"))
    stage = {"name": "sentiment", "data": {"path": str(tmp_path / "cls"), "prompt_template": "Review: {sentence}\nSentiment:",
                                           "completion_template": " {label}"}}
    lengths = [len(tok(f"Review: {json.loads(x)['sentence']}\nSentiment:", add_special_tokens=False)["input_ids"])
               for x in (tmp_path / "cls" / "test.jsonl").read_text().splitlines()]
    cap = sorted(lengths)[len(lengths) // 2]
    kept = []
    for value in (None, cap):
        r = recipe_mod.load(write_recipe(tmp_path / "r.yaml", stages=[stage], eval={"max_prompt_tokens": value}))
        (task,) = write_stage_tasks(r, tmp_path / f"run{value}", tok)
        rows = _test_items(tmp_path / f"run{value}" / "eval" / "tasks", "sentiment")
        assert task.n == len(rows)
        kept.append(rows)
    assert len(kept[0]) == len(lengths) and len(kept[1]) == sum(n <= cap for n in lengths) < len(lengths)
    assert all(len(tok(r["prompt"], add_special_tokens=False)["input_ids"]) <= cap for r in kept[1])
    r = recipe_mod.load(write_recipe(tmp_path / "r.yaml", stages=[stage], eval={"max_prompt_tokens": 1}))
    with pytest.raises(LlmclError, match="eval.max_prompt_tokens"):
        write_stage_tasks(r, tmp_path / "run1", tok)
    for bad in (0, True):
        with pytest.raises(LlmclError, match="eval.max_prompt_tokens"):
            recipe_mod.load(write_recipe(tmp_path / "r.yaml", stages=[stage], eval={"max_prompt_tokens": bad}))


def test_a_cell_scored_with_another_metric_than_its_column_is_missing_not_mixed(run_dir, tmp_path):
    """A row from before a task changed (e.g. a classification stage scored by loglikelihood, now by exact match)
    does not enter the column's metrics: the cell is empty until `llmcl eval` scores it again."""
    import shutil

    from llmcl.eval import report as report_mod

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    path = copy / "eval" / "stage-01.json"
    row = json.loads(path.read_text())
    row["tasks"]["llmcl_stage_facts"]["metric"] = "acc"  # scored another way
    path.write_text(json.dumps(row))
    rep = report_mod.collect(copy)
    k = [c.task for c in rep.columns].index("llmcl_stage_facts")
    assert rep.values[rep.rows.index("sentiment")][k] is None
    assert rep.values[rep.rows.index("prose")][k] is not None


@pytest.mark.parametrize("dtype,train_precision,expected", [
    ("auto", "fp32", torch.float32), ("auto", "auto", torch.bfloat16 if GPU_BF16 else torch.float32),
    ("auto", "bf16", torch.bfloat16),
    ("auto", "fp16", torch.float16), ("float32", "bf16", torch.float32), ("bfloat16", "fp32", torch.bfloat16)])
def test_a_stage_is_evaluated_in_eval_dtype_and_auto_follows_training(run_dir, dtype, train_precision, expected):
    """eval.dtype is the dtype the loaded stage is scored in (auto = the half precision training ran in; CPU has no
    GPU bf16, so auto with train.precision auto stays float32 here): the weights and what the model's linear
    layers return during lm-eval scoring."""
    from llmcl.eval import harness
    from llmcl.eval.scoring import _load_model, load_run_recipe

    recipe = load_run_recipe(run_dir)
    recipe.eval.dtype, recipe.train.precision = dtype, train_precision
    model = _load_model(run_dir, recipe, 1, "cpu")
    assert {p.dtype for p in model.parameters()} == {expected}
    # RoPE's inverse frequencies stay float32, as when transformers loads a model in a half dtype
    assert {n: b.dtype for n, b in model.named_buffers()} == {"model.rotary_emb.inv_freq": torch.float32,
                                                              "model.rotary_emb.original_inv_freq": torch.float32}
    seen = set()
    linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda mod, args, out: seen.add(out.dtype))
    result = harness.evaluate(model, load_tokenizer(recipe.model), ["llmcl_stage_sentiment-choice"],
                              include_path=[str(run_dir / "eval" / "tasks")], include_defaults=False, limit=4,
                              batch_size=4, num_fewshot=None)
    assert seen == {expected}
    assert result["llmcl_stage_sentiment-choice"].n == 4


def test_stage_tasks_give_lm_eval_the_fields_as_written_not_read_as_python_literals(tmp_path):
    """lm-eval reads a rendered template that looks like a Python literal as one: a completion "[1, 2]" became a
    list of two alternative answers (exact match 0 for the right answer, a TypeError for lists of numbers) and a
    prompt "42" of a choice task the number 42. The stage tasks name their fields, which lm-eval passes as written."""
    from lm_eval.tasks import TaskManager, get_task_dict

    from llmcl import recipe as recipe_mod
    from llmcl.eval.tasks import choice_task_name, stage_task_name, write_stage_tasks

    data = tmp_path / "lists"
    data.mkdir()
    rows = [{"n": str(40 + i), "label": "[1, 2]" if i % 2 else "[3]"} for i in range(8)]
    for split, part in (("train", rows[:4]), ("test", rows[4:])):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    path = write_recipe(tmp_path / "r.yaml", stages=[{"name": "lists", "data": {
        "path": str(data), "prompt_template": "{n}", "completion_template": "{label}", "choices": ["[1, 2]", "[3]"]}}])
    r = recipe_mod.load(path, [])
    write_stage_tasks(r, tmp_path / "run", load_tokenizer(r.model))
    with offline_and_quiet():
        manager = TaskManager(include_path=[str(tmp_path / "run" / "eval" / "tasks")], include_defaults=False)
        tasks = get_task_dict([stage_task_name("lists"), choice_task_name("lists")], manager)
    generate, choice = tasks[stage_task_name("lists")], tasks[choice_task_name("lists")]
    docs = list(generate.test_docs())
    assert sorted((generate.doc_to_text(d), generate.doc_to_target(d)) for d in docs) == \
        sorted((row["n"], row["label"]) for row in rows[4:])
    for d in choice.test_docs():
        assert choice.doc_to_text(d) == d["prompt"] and isinstance(d["prompt"], str)
        assert choice.doc_to_choice(d) == ["[1, 2]", "[3]"] and choice.doc_to_target(d) == ["[1, 2]", "[3]"].index(
            d["completion"])


def test_answers_longer_than_max_new_tokens_are_a_note_naming_the_key(run_dir, tmp_path):
    """A generated answer is cut at eval.max_new_tokens: a test answer longer than that scores 0 whatever the model
    knows. The stage task carries a note counting them and naming the key and the length that would do; `llmcl
    eval` prints it. The default (32) cuts none of the fixture's answers."""
    import shutil

    from llmcl import recipe as recipe_mod
    from llmcl.eval.tasks import write_stage_tasks

    tok = load_tokenizer(ModelConfig(path="builtin:tiny"))
    r = recipe_mod.load(run_dir.parent / "r.yaml", [])
    assert [t.note for t in write_stage_tasks(r, tmp_path / "a", tok, write=False)] == [None] * 4
    r = recipe_mod.load(run_dir.parent / "r.yaml", ["eval.max_new_tokens=1"])
    notes = {t.task: t.note for t in write_stage_tasks(r, tmp_path / "b", tok, write=False)}
    rows = _test_items(run_dir / "eval" / "tasks", "facts")
    lengths = [len(tok(row["completion"], add_special_tokens=False)["input_ids"]) for row in rows]
    assert notes["llmcl_stage_facts"] == (
        f"note: stage 'facts': {sum(n > 1 for n in lengths)} of {len(rows)} test answers are longer than "
        f"eval.max_new_tokens=1 tokens (the longest {max(lengths)}): they cannot be matched exactly; set "
        f"eval.max_new_tokens to at least {max(lengths)}")
    assert notes["llmcl_stage_prose"] is None and notes["llmcl_stage_sentiment-choice"] is None
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    data = yaml.safe_load((copy / "recipe.yaml").read_text())
    data["eval"]["max_new_tokens"] = 1
    (copy / "recipe.yaml").write_text(yaml.safe_dump(data))
    res = run_cli("eval", str(copy), "--stage", "base", "--tasks", "facts")
    assert res.exit_code == 0, res.output
    assert notes["llmcl_stage_facts"] in " ".join(res.output.split())


@pytest.mark.parametrize("template", [" {label}", "\n{label}", "\n\n{label}"])
@pytest.mark.parametrize("says", ["the answer, then more lines", "the answer, a space, more lines", "the other label"])
def test_a_one_line_answer_is_scored_on_its_line_whether_or_not_it_begins_a_new_line(template, says, tmp_path):
    """An answer template beginning with a newline ("Response:" + "\\n{output}") was cut to nothing by the
    stop at "\\n" (exact match 0 whatever the model said). A model that says a stage's answer and then goes on with
    more lines scores 1, one that says another label 0, with lm-eval's own exact match, HFLM's stop-sequence cut
    (copied here) and the task llmcl writes."""
    import lm_eval
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

    from llmcl import recipe as recipe_mod
    from llmcl.eval.tasks import stage_task_name, write_stage_tasks

    _write_data(tmp_path)
    path = write_recipe(tmp_path / "r.yaml", stages=[{"name": "cls", "data": {
        "path": str(tmp_path / "cls"), "prompt_template": "Review: {sentence}\nSentiment:",
        "completion_template": template}}])
    r = recipe_mod.load(path, [])
    write_stage_tasks(r, tmp_path / "run", load_tokenizer(r.model))
    answers = {row["prompt"]: row["completion"] for row in _test_items(tmp_path / "run" / "eval" / "tasks", "cls")}
    other = {"positive": "negative", "negative": "positive"}

    class Says(LM):  # a model that answers as `says`
        def generate_until(self, requests):
            out = []
            for context, kwargs in (req.args for req in requests):
                answer = answers[context]
                s = {"the answer, then more lines": answer + "\nReview: more\n",
                     "the answer, a space, more lines": answer + " \r\nReview: more\n",
                     "the other label": answer.replace(answer.strip(), other[answer.strip()])}[says]
                for term in kwargs["until"]:  # HFLM.generate_until's cut at its stop sequences
                    s = s.split(term)[0]
                out.append(s)
            return out

        loglikelihood = loglikelihood_rolling = None

    with offline_and_quiet():
        manager = TaskManager(include_path=[str(tmp_path / "run" / "eval" / "tasks")], include_defaults=False)
        res = lm_eval.simple_evaluate(model=Says(), tasks=[stage_task_name("cls")], task_manager=manager,
                                      verbosity="ERROR", bootstrap_iters=0)
    score = res["results"][stage_task_name("cls")]["exact_match,none"]
    assert score == (1.0 if says.startswith("the answer") else 0.0)


def test_a_document_is_scored_as_its_tokens_after_the_prefix_whatever_special_tokens_the_tokenizer_adds(tmp_path):
    """Perplexity and bits per byte: lm-eval's HFLM encoded a document with the tokenizer's special tokens, so a
    tokenizer that adds a BOS (Llama, Mistral, Gemma) had log p(BOS | BOS) in every document's score. The score is
    the document's own tokens after the prefix token, computed here independently, with the built-in tokenizer and
    with a copy of it that adds a BOS."""
    import copy
    import math

    from tokenizers import processors

    from llmcl import recipe as recipe_mod
    from llmcl.eval.harness import evaluate
    from llmcl.eval.tasks import stage_task_name, write_stage_tasks
    from llmcl.models import load_base_model

    _write_data(tmp_path)
    path = write_recipe(tmp_path / "r.yaml", stages=[{"name": "prose", "data": {"path": str(tmp_path / "text")}}])
    r = recipe_mod.load(path, [])
    tok = load_tokenizer(r.model)
    write_stage_tasks(r, tmp_path / "run", tok)
    adds_bos = copy.deepcopy(tok)
    adds_bos._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    assert adds_bos("a b")["input_ids"][0] == tok.bos_token_id != tok("a b")["input_ids"][0]  # the premise
    model = load_base_model(r.model, 0).eval()
    docs = [r["text"] for r in _test_items(tmp_path / "run" / "eval" / "tasks", "prose")]
    total = 0.0
    for doc in docs:  # log p(document | prefix), the prefix being HFLM's (the BOS, where the tokenizer has one)
        ids = [tok.bos_token_id] + tok(doc, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits.float(), -1)[0]
        total += sum(logp[k, ids[k + 1]].item() for k in range(len(ids) - 1))
    expected = -total / sum(len(d.encode()) for d in docs) / math.log(2)
    task = stage_task_name("prose")
    for tokenizer in (tok, adds_bos):
        got = evaluate(model, tokenizer, [task], include_path=[str(tmp_path / "run" / "eval" / "tasks")],
                       include_defaults=False, limit=None, batch_size=4, num_fewshot=None)[task]
        assert got.metric == "bits_per_byte" and got.value == pytest.approx(expected, rel=1e-5)


def test_a_label_set_is_scored_on_the_tokens_training_gave_its_prompt_and_answers(tmp_path):
    """lm-eval's HFLM moves a prompt's trailing spaces into the answer and tokenizes the two joined: "Sentiment: "
    + "positive" was scored as " positive" after "Sentiment:". A stage task's pair is scored as training
    tokenizes it (prompt, then answer, each alone), checked against an independent computation; a general task's
    pair keeps HFLM's way (the control)."""
    from lm_eval.api.instance import Instance

    from llmcl import recipe as recipe_mod
    from llmcl.eval.harness import ScoredAsTrained
    from llmcl.eval.shared_context import hflm_class
    from llmcl.models import load_base_model

    _write_data(tmp_path)
    path = write_recipe(tmp_path / "r.yaml", stages=[{"name": "cls", "data": {
        "path": str(tmp_path / "cls"), "prompt_template": "Review: {sentence}\nSentiment: ",
        "completion_template": "{label}", "choices": ["negative", "positive"]}}])
    r = recipe_mod.load(path, [])
    tok = load_tokenizer(r.model)
    model = load_base_model(r.model, 0).eval()
    lm = type("LM", (ScoredAsTrained, hflm_class()), {})(pretrained=model, tokenizer=tok, batch_size=4)
    context = "Review: the film was dull and good\nSentiment: "
    assert tok(context + "positive")["input_ids"] != tok(context)["input_ids"] + tok("positive")["input_ids"]  # premise
    pairs = [(context, label) for label in ("negative", "positive")]

    def scores(task):
        reqs = [Instance("loglikelihood", {}, pair, i, (task, i, 1)) for i, pair in enumerate(pairs)]
        return [ll for ll, _ in lm.loglikelihood(reqs, disable_tqdm=True)]

    stage = scores("llmcl_stage_cls-choice")
    assert stage == pytest.approx([_loglikelihood(model, tok, *pair) for pair in pairs], abs=1e-4)
    general = scores("some_general_task")  # HFLM's: " positive" after "Sentiment:"
    whole = [tok(c + a)["input_ids"] for c, a in pairs]
    ctx = tok(context.rstrip())["input_ids"]
    with torch.no_grad():
        expected = []
        for ids in whole:
            logp = torch.log_softmax(model(torch.tensor([ids])).logits.float(), -1)[0]
            expected.append(sum(logp[k - 1, ids[k]].item() for k in range(len(ctx), len(ids))))
    assert general == pytest.approx(expected, abs=1e-4) and general != pytest.approx(stage, abs=1e-2)


def test_a_cell_records_the_shots_lm_eval_gave_not_only_those_asked(run_dir, tmp_path):
    """With eval.num_fewshot, lm-eval keeps 0 for a task whose own YAML fixes num_fewshot: 0 (79 of its tasks do):
    the cell records the 0 it was scored with (it recorded the shots asked); a task without one records them."""
    import shutil

    general = tmp_path / "general"
    general.mkdir()
    config = yaml.safe_load((run_dir / "eval" / "tasks" / "choice" / "sentiment.yaml").read_text())
    del config["fewshot_config"]  # (the stage task's empty few-shot pool: these draw from the test split)
    for name, fixed in (("fixed_zero", {"num_fewshot": 0}), ("free_shots", {})):
        (general / f"{name}.yaml").write_text(yaml.safe_dump({**config, "task": name, "tag": [], **fixed}))
    other = tmp_path / "run"
    shutil.copytree(run_dir, other)
    data = yaml.safe_load((other / "recipe.yaml").read_text())
    data["eval"].update(include_path=[str(general)], num_fewshot=1, tasks=["fixed_zero", "free_shots"], limit=2,
                        tasks_limit=2)
    (other / "recipe.yaml").write_text(yaml.safe_dump(data))
    res = run_cli("eval", str(other), "--stage", "base", "--tasks", "fixed_zero,free_shots,sentiment")
    assert res.exit_code == 0, res.output
    cells = json.loads((other / "eval" / "base.json").read_text())["tasks"]
    assert {t: c["scoring"]["num_fewshot"] for t, c in cells.items() if t in ("fixed_zero", "free_shots",
            "llmcl_stage_sentiment")} == {"fixed_zero": 0, "free_shots": 1, "llmcl_stage_sentiment": 1}
    assert all("num_fewshot" not in c for c in cells.values())  # in the cell's scoring record only


def test_with_few_shot_asked_a_chat_stage_is_scored_zero_shot_and_says_so(tmp_path):
    """lm-eval joins few-shot examples as text: around a prompt rendered by the chat template they made a format
    training never showed (a shot's answer without its end of turn, the system prompt repeated). With
    eval.num_fewshot, a chat stage's views are scored zero-shot (a note says it, the cells record 0); a
    prompt/completion stage still gets its shots (the control)."""
    import lm_eval
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

    from llmcl import recipe as recipe_mod
    from llmcl.eval.scoring import cell_scoring
    from llmcl.eval.tasks import write_stage_tasks

    _write_data(tmp_path)
    data = {"path": str(tmp_path / "cls"), "prompt_template": "Review: {sentence}\nSentiment:",
            "completion_template": " {label}", "choices": ["negative", "positive"]}
    path = write_recipe(tmp_path / "r.yaml", stages=[{"name": "plain", "data": data},
                                                     {"name": "chat", "data": {**data, "chat_template": True}}])
    r = recipe_mod.load(path, ["eval.num_fewshot=1"])
    written = {t.task: t for t in write_stage_tasks(r, tmp_path / "run", load_tokenizer(r.model))}
    assert [t.zero_shot for t in written.values()] == [False, False, True, True]
    assert written["llmcl_stage_chat"].note == ("note: stage 'chat' is scored zero-shot (eval.num_fewshot=1 is for "
                                                "the other tasks): its prompts go through the chat template, outside "
                                                "which lm-eval would join the examples")
    assert written["llmcl_stage_plain"].note is None and written["llmcl_stage_chat-choice"].note is None
    assert cell_scoring(r, "llmcl_stage_chat", written["llmcl_stage_chat"])["num_fewshot"] == 0
    assert cell_scoring(r, "llmcl_stage_plain", written["llmcl_stage_plain"])["num_fewshot"] == 1
    contexts: dict[str, list[str]] = {}

    class Records(LM):  # what lm-eval asks a model, by task
        def generate_until(self, requests):
            for req in requests:
                contexts.setdefault(req.task_name, []).append(req.args[0])
            return [""] * len(requests)

        def loglikelihood(self, requests):
            for req in requests:
                contexts.setdefault(req.task_name, []).append(req.args[0])
            return [(0.0, False)] * len(requests)

        loglikelihood_rolling = None

    with offline_and_quiet():
        manager = TaskManager(include_path=[str(tmp_path / "run" / "eval" / "tasks")], include_defaults=False)
        lm_eval.simple_evaluate(model=Records(), tasks=list(written), task_manager=manager, num_fewshot=1,
                                verbosity="ERROR", bootstrap_iters=0)
    for task in written:
        shots = {context.count("Review:") - 1 for context in contexts[task]}
        assert shots == ({0} if "chat" in task else {1}), task


def _special_tokens_variant(tok, case):
    """The built-in tokenizer made to add a BOS its (ChatML) chat template does not render (Zephyr's and
    TinyLlama-Chat's layout), or to end every text with an EOS (add_eos_token), or as it is (adds neither)."""
    import copy

    from tokenizers import processors

    out = copy.deepcopy(tok)
    if case == "bos_the_template_does_not_render":
        out.bos_token = "<|endoftext|>"
        out._tokenizer.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", out.bos_token_id)])
        assert out("hi")["input_ids"][0] == out.bos_token_id
    elif case == "bos_without_a_chat_template":
        out.bos_token = "<|endoftext|>"
        out._tokenizer.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A <|im_end|>", special_tokens=[("<|endoftext|>", out.bos_token_id),
                                                                  ("<|im_end|>", out.eos_token_id)])
    elif case == "eos_after_every_text":
        out._tokenizer.post_processor = processors.TemplateProcessing(
            single="$A <|im_end|>", special_tokens=[("<|im_end|>", out.eos_token_id)])
        assert out("hi")["input_ids"][-1] == out.eos_token_id
    return out


@pytest.mark.parametrize("case", ["bos_the_template_does_not_render", "bos_without_a_chat_template",
                                  "eos_after_every_text", "as_built"])
def test_a_stage_prompt_is_scored_with_the_special_tokens_it_was_trained_with(case, tmp_path, monkeypatch):
    """A chat-rendered prompt carries the template's own special tokens: training adds none, and lm-eval added
    the tokenizer's BOS to it where the template renders none; a tokenizer that ends every text with an EOS put
    one between prompt and answer, in training and in scoring. Generation's prompts and a label set's contexts
    are now the tokens training gave the prompt, here against an independent construction (the built-in
    tokenizer as it is: the control, the same before and after)."""
    from transformers import LlamaForCausalLM

    from llmcl import recipe as recipe_mod
    from llmcl.data.formatting import IGNORE, encode
    from llmcl.data.sources import load_records
    from llmcl.eval import harness
    from llmcl.eval.scoring import score_row
    from llmcl.eval.tasks import render_test_records

    tok = _special_tokens_variant(load_tokenizer(ModelConfig(path="builtin:tiny")), case)
    _write_data(tmp_path)
    data = {"path": str(tmp_path / "cls"), "prompt_template": "Review: {sentence}\nSentiment:",
            "completion_template": " {label}", "choices": ["negative", "positive"],
            "chat_template": case == "bos_the_template_does_not_render"}
    r = recipe_mod.load(write_recipe(tmp_path / "r.yaml", stages=[{"name": "cls", "data": data}],
                                     eval={"limit": 4, "batch_size": 2}), [])
    records = load_records(r.stages[0].data, "test", r.seed)
    prompts = [row["prompt"] for row in render_test_records(r.stages[0], 0, records, tok)[1]]
    bos = [tok.bos_token_id] if case == "bos_without_a_chat_template" else []  # (a chat prompt gets none)
    expected = {p: bos + tok(p, add_special_tokens=False)["input_ids"] for p in prompts}
    trained = encode(records, r.stages[0].data, tok, 512)[0]  # training's prompt tokens: up to the first label
    assert {tuple(ex.input_ids[:next(i for i, x in enumerate(ex.labels) if x != IGNORE)]) for ex in trained} == \
        {tuple(ids) for ids in expected.values()}
    generated, paired = [], []
    original_generate = LlamaForCausalLM.generate

    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        for ids, mask in zip(input_ids, attention_mask):  # left-padded with the pad token
            pads = int((mask == 0).sum())
            assert mask[pads:].all() and (ids[:pads] == tok.pad_token_id).all(), (ids, mask)
            generated.append(ids[pads:].tolist())
        return original_generate(self, input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    original_pair = harness.ScoredAsTrained._encode_pair

    def encode_pair(self, context, continuation):
        out = original_pair(self, context, continuation)
        paired.append(out[0])
        return out

    monkeypatch.setattr(LlamaForCausalLM, "generate", generate)
    monkeypatch.setattr(harness.ScoredAsTrained, "_encode_pair", encode_pair)
    row = score_row(tmp_path / "run", "base", recipe=r, tokenizer=tok)
    assert {c["n"] for c in row["tasks"].values()} == {4}
    assert len(generated) == 4 and len(paired) == 8  # 4 items, and 4 items x 2 labels
    valid = [list(ids) for ids in expected.values()]
    assert all(ids in valid for ids in generated) and all(ids in valid for ids in paired), (generated, paired)
