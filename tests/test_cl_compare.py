"""scripts/bench/cl_compare.py builds every method's run from the shipped recipes at one budget: the same data,
the same samples per step and steps per stage, the same evaluation; the multitask bound sees the same samples."""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

import pytest

from conftest import chdir_beside_shared_data
from llmcl import checks
from llmcl import recipe as recipe_mod

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("cl_compare", REPO / "scripts" / "bench" / "cl_compare.py")
cl_compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cl_compare)


def _args(**kw):
    base = dict(model="builtin:smollm2-135m", steps=None, batch=None, train_samples=1000, limit=None, general=None,
                general_limit=None, full=False, out=Path("/nonexistent"), seed_offset=0, benchmark="standard")
    return argparse.Namespace(**{**base, **kw})


def _recipes(args, tmp_path):
    return {m: cl_compare.recipe_for(m, args, 1, tmp_path / "tasks") for m in cl_compare.METHODS}


def _samples_per_step(r):
    return r["train"]["batch_size"] + (r["method"].get("replay_batch") or 0)


@pytest.mark.parametrize("kw", [{}, {"steps": 3, "batch": 6, "limit": 5}, {"batch": 7}, {"full": True}],
                         ids=["cpu", "options", "odd-batch", "full"])
def test_every_method_gets_the_same_budget_data_and_evaluation(kw, tmp_path):
    rs = _recipes(_args(**kw), tmp_path)
    seq = {m: r for m, r in rs.items() if m != "multitask"}
    ref = seq["seqft"]
    steps = ref["train"]["max_steps"]
    assert {m: _samples_per_step(r) for m, r in rs.items()} == {m: _samples_per_step(ref) for m in rs}
    assert {m: r["train"]["max_steps"] for m, r in seq.items()} == {m: steps for m in seq}
    assert rs["multitask"]["train"]["max_steps"] == len(ref["stages"]) * steps
    for m, r in seq.items():
        assert r["stages"] == ref["stages"], m
        assert r["eval"] == ref["eval"], m
        assert r["train"]["seq_len"] == ref["train"]["seq_len"], m
    assert rs["ilora"]["train"]["batch_size"] - rs["ilora"]["method"]["replay_batch"] in (0, 1)  # half and half
    assert rs["seqft+replay"]["replay"]["ratio"] == 0.2 and "replay" not in ref
    names = {m: r["method"]["name"] for m, r in rs.items()}
    assert names == {"seqft": "seqft", "seqft+replay": "seqft", "hft": "hft", "osft": "osft", "lora": "lora",
                     "ilora": "ilora", "mora": "mora", "multitask": "seqft"}
    # multitask: one stage over the last task, mixed evenly with the other three; scored on all four
    mt = rs["multitask"]
    assert [s["data"] for s in mt["stages"]] == [ref["stages"][-1]["data"]]
    assert mt["replay"]["ratio"] == pytest.approx(1 - 1 / len(ref["stages"]))
    assert [{k: v for k, v in d.items() if k != "weight"} for d in mt["replay"]["datasets"]] == \
        [s["data"] for s in ref["stages"][:-1]]
    assert mt["eval"]["tasks"][:4] == [f"llmcl_stage_{s['name']}" for s in ref["stages"]]
    if kw.get("full"):
        assert ref["train"]["seq_len"] == 512 and ref["eval"]["limit"] is None
        assert steps * _samples_per_step(ref) >= 1000 > (steps - 1) * _samples_per_step(ref)
    if "steps" in kw:
        assert steps == 3 and _samples_per_step(ref) == 6 and ref["eval"]["limit"] == 5


def test_the_cpu_size_is_the_shipped_recipes_and_they_validate(tmp_path, monkeypatch):
    chdir_beside_shared_data(tmp_path, monkeypatch)
    for m, r in _recipes(_args(), tmp_path).items():
        if m == "multitask":
            r["eval"]["include_path"] = []  # the seqft run writes them
            r["eval"]["tasks"] = [t for t in r["eval"]["tasks"] if not t.startswith("llmcl_stage_")]
        parsed = recipe_mod.from_dict(r)
        checks.check(parsed)
        shipped = recipe_mod.load(REPO / "recipes" / "benchmarks" / cl_compare.METHODS[m])
        if m != "multitask":  # `llmcl train` of the shipped recipe is the run of the table (but for save_every)
            assert (parsed.train.max_steps, parsed.train.batch_size, parsed.train.lr, parsed.eval.limit) == \
                (shipped.train.max_steps, shipped.train.batch_size, shipped.train.lr, shipped.eval.limit), m
            assert parsed.method == shipped.method, m


def test_a_finished_run_with_other_settings_is_refused_not_reused(tmp_path, monkeypatch):
    chdir_beside_shared_data(tmp_path, monkeypatch)  # the recipes' data paths are validated
    r = cl_compare.recipe_for("lora", _args(), 1, tmp_path / "tasks")
    run_dir = tmp_path / "lora-s0"
    run_dir.mkdir()
    assert cl_compare._settings_changed(run_dir, r) is None  # nothing run yet
    (run_dir / "recipe.yaml").write_text(recipe_mod.dump(recipe_mod.from_dict(r)))
    assert cl_compare._settings_changed(run_dir, r) is None
    assert cl_compare._settings_changed(run_dir, cl_compare.recipe_for("lora", _args(limit=100), 1, tmp_path)) == \
        "eval.limit"
    assert cl_compare._settings_changed(run_dir, cl_compare.recipe_for("lora", _args(steps=3), 1, tmp_path)) == \
        "train.max_steps"


def test_the_base_row_is_shared_only_when_scored_with_the_same_model_dtype_limits_and_tasks(tmp_path):
    r = cl_compare.recipe_for("mora", _args(), 1, tmp_path / "tasks")
    ev = r["eval"]
    generated = [f"llmcl_stage_{st['name']}" for st in r["stages"]]
    tasks = generated + [f"{t}-choice" for t in generated] + ev["tasks"]  # every task scored both ways
    base = tmp_path / "base.json"
    assert not cl_compare.shareable_base(base, r)  # no base row yet
    row = {"limit": ev["limit"], "tasks_limit": ev["tasks_limit"], "model": r["model"]["path"], "dtype": "bfloat16",
           "tasks": {t: {} for t in tasks}}
    base.write_text(json.dumps(row))
    assert cl_compare.shareable_base(base, r)  # the benchmark trains in bf16 mixed precision: scored in bfloat16
    for key, other in (("dtype", "float32"), ("model", "builtin:tiny")):
        base.write_text(json.dumps({**row, key: other}))
        assert not cl_compare.shareable_base(base, r), key
    base.write_text(json.dumps({**row, "limit": ev["limit"] + 1}))
    assert not cl_compare.shareable_base(base, r)
    base.write_text(json.dumps({**row, "tasks": {t: {} for t in tasks[1:]}}))
    assert not cl_compare.shareable_base(base, r)
    base.write_text(json.dumps({**row, "tasks": {t: {} for t in tasks if not t.endswith("-choice")}}))
    assert not cl_compare.shareable_base(base, r)  # a base row from before the label-set view
    (tmp_path / "tasks").mkdir()  # the seqft run's task YAMLs
    mt = cl_compare.recipe_for("multitask", _args(), 1, tmp_path / "tasks")  # names the stage tasks in eval.tasks
    base.write_text(json.dumps(row))
    assert cl_compare.shareable_base(base, mt)


@pytest.mark.parametrize("order", cl_compare.BENCHMARKS["standard"][1])
def test_each_order_is_olora_s_with_its_own_seed(order, tmp_path):
    """The three orders of the standard benchmark, each with its own seed; every method sees the same order."""
    shipped = [st["name"] for st in recipe_mod.read_yaml(REPO / "recipes" / "benchmarks" / "cl_standard.yaml")["stages"]]
    rs = {m: cl_compare.recipe_for(m, _args(seed_offset=100), order, tmp_path) for m in cl_compare.METHODS}
    for m, r in rs.items():
        assert r["seed"] == order - 1 + 100, m
        if m != "multitask":
            assert [st["name"] for st in r["stages"]] == cl_compare.ORDERS[order], m
    assert sorted(cl_compare.ORDERS[order]) == sorted(shipped)
    assert cl_compare.ORDERS[1] == shipped  # the shipped recipes are order 1
    assert len({tuple(o) for o in cl_compare.ORDERS.values()}) == len(cl_compare.ORDERS) == 6
    assert cl_compare.run_dir_of(tmp_path, "seqft+replay", order, 7).name == f"seqft_replay-o{order}-s7"


def test_differences_to_seqft_are_paired_by_order_with_a_t_interval():
    from scipy import stats

    method, seqft = [0.52, 0.61, 0.47], [0.40, 0.44, 0.41]
    diffs = [m - s for m, s in zip(method, seqft)]
    mean, half = cl_compare.paired_difference(method, seqft)
    sd = (sum((d - sum(diffs) / 3) ** 2 for d in diffs) / 2) ** 0.5
    assert mean == pytest.approx(sum(diffs) / 3)
    assert half == pytest.approx(stats.t.ppf(0.975, 2) * sd / 3 ** 0.5, rel=1e-3)
    assert cl_compare.paired_difference([0.5], [0.4]) is None  # one run: no interval
    assert cl_compare.paired_difference([0.5, None, 0.6], [0.4, 0.4, None]) is None  # one complete pair
    runs = [{"method": m, "order": k, "seed": k - 1, "AA": a, "BWT": -a / 2, "FWT": 0.0, "general_delta": None,
             "train_s": 1.0, "wall_s": 2.0, "peak_rss_mib": 3.0}
            for m, values in (("seqft", seqft), ("ilora", method)) for k, a in zip((3, 1, 2), values)]
    lines = cl_compare.table(runs)
    row = next(line for line in lines if line.startswith("| ilora |"))
    # runs are paired by order, not by their place in the list: order 3's ilora run minus order 3's seqft run, ...
    paired = cl_compare.paired_difference([0.61, 0.47, 0.52], [0.44, 0.41, 0.40])
    assert f"| 3 | {sum(method) / 3:.3f} ± " in row
    assert f"{paired[0]:+.3f} [{paired[0] - paired[1]:+.3f}, {paired[0] + paired[1]:+.3f}]" in row


# -- the long 15-task sequence ------------------------------------------------------------------------------

def _long_recipes_module():
    spec = importlib.util.spec_from_file_location("long_recipes", REPO / "scripts" / "dev" / "long_recipes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("order", [4, 5, 6])
def test_the_long_recipes_are_what_their_generator_writes_in_olora_s_orders(order, tmp_path, monkeypatch):
    chdir_beside_shared_data(tmp_path, monkeypatch)
    long_recipes = _long_recipes_module()
    monkeypatch.setattr(long_recipes, "DATA", Path("../shared/data/cl_benchmark").resolve())
    path = REPO / "recipes" / "benchmarks" / f"cl_long_order{order}.yaml"
    assert path.read_text() == long_recipes.recipe(order)  # regenerate: python scripts/dev/long_recipes.py
    r = recipe_mod.load(path)
    assert [s.name for s in r.stages] == cl_compare.ORDERS[order] == long_recipes.ORDERS[order]
    checks.check(r)  # every record of the 15 datasets, every test answer one of its stage's labels
    assert all(s.data.choices for s in r.stages)  # every stage is classification: scored both ways
    assert {s.name for s in r.stages if s.data.holdout} == {"multirc", "imdb", "yelp"}  # no test split shared


def test_the_long_benchmark_runs_every_method_with_its_standard_settings_on_the_15_tasks(tmp_path):
    args = _args(benchmark="long")
    std = {m: cl_compare.recipe_for(m, _args(), 1, tmp_path) for m in cl_compare.METHODS}
    for order in (4, 5, 6):
        for m, r in {m: cl_compare.recipe_for(m, args, order, tmp_path) for m in cl_compare.METHODS}.items():
            assert r["method"] == std[m]["method"], m
            assert r["train"]["lr"] == std[m]["train"]["lr"] and r["train"]["seq_len"] == 512, m
            assert r.get("replay") == std[m].get("replay") or m == "multitask", m
            if m != "multitask":
                assert [s["name"] for s in r["stages"]] == cl_compare.ORDERS[order], m
    mt = cl_compare.recipe_for("multitask", args, 4, tmp_path)
    assert len(mt["replay"]["datasets"]) == 14 and mt["train"]["max_steps"] == 15 * 10
    assert len([t for t in mt["eval"]["tasks"] if t.endswith("-choice")]) == 15


def _compare(tmp_path, *options, out_name="out"):
    import subprocess
    import sys

    out = tmp_path / out_name
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "bench" / "cl_compare.py"), "--model", "builtin:tiny",
                          "--steps", "1", "--batch", "2", "--limit", "2", "--general", "--out", str(out), *options],
                         cwd=REPO, capture_output=True, text=True, timeout=3600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out, json.loads((out / "summary.json").read_text()), (out / "summary.md").read_text(), res.stdout


@pytest.mark.slow
def test_the_comparison_runs_end_to_end_over_two_orders_on_the_tiny_model(tmp_path, monkeypatch):
    chdir_beside_shared_data(tmp_path, monkeypatch)
    archive = tmp_path / "archive"
    out, results, md, _ = _compare(tmp_path, "--methods", "seqft", "lora", "multitask", "--orders", "1", "2",
                                   "--archive", str(archive))
    assert sorted((r["method"], r["order"], r["seed"]) for r in results) == sorted(
        (m, k, k - 1) for m in ("seqft", "lora", "multitask") for k in (1, 2))
    assert all(r["AA_labels"] is not None for r in results)  # every task scored both ways
    lora = sorted((r for r in results if r["method"] == "lora"), key=lambda r: r["order"])
    seq = sorted((r for r in results if r["method"] == "seqft"), key=lambda r: r["order"])
    mean, half = cl_compare.paired_difference([r["AA"] for r in lora], [r["AA"] for r in seq])
    assert "| lora | 2 |" in md and f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}]" in md
    matrix = json.loads((out / "lora-o2-s1" / "report" / "matrix.json").read_text())
    assert [c["label"] for c in matrix["columns"] if c["kind"] == "stage"] == cl_compare.ORDERS[2]
    # another clone continues from the archive: every finished run comes back untrained; the multitask run whose
    # archive is gone trains again, on the stage tasks written again for the restored seqft run
    assert (archive / "summary.json").read_text() == (out / "summary.json").read_text()
    shutil.rmtree(archive / "multitask-o2-s1")
    _, again, _, stdout = _compare(tmp_path, "--methods", "seqft", "lora", "multitask", "--orders", "1", "2",
                                   "--archive", str(archive), out_name="clone")
    assert stdout.count("restored from") == 5 and (archive / "multitask-o2-s1" / "bench.json").exists()
    key = lambda r: (r["method"], r["order"])  # noqa: E731
    assert [(key(r), r["AA"], r["BWT"]) for r in sorted(again, key=key)] == \
        [(key(r), r["AA"], r["BWT"]) for r in sorted(results, key=key)]


@pytest.mark.slow
def test_the_long_benchmark_runs_end_to_end_on_the_tiny_model(tmp_path, monkeypatch):
    chdir_beside_shared_data(tmp_path, monkeypatch)
    out, results, md, _ = _compare(tmp_path, "--benchmark", "long", "--methods", "seqft", "--orders", "4")
    assert [(r["method"], r["order"]) for r in results] == [("seqft", 4)]
    matrix = json.loads((out / "seqft-o4-s3" / "report" / "matrix.json").read_text())
    assert [c["label"] for c in matrix["columns"] if c["kind"] == "stage"] == cl_compare.ORDERS[4]
    assert len([c for c in matrix["columns"] if c["kind"] == "stage_choice"]) == 15
    assert len(matrix["rows"]) == 16 and results[0]["BWT"] is not None


def test_every_ablation_is_a_valid_recipe_that_carries_its_overrides(tmp_path):
    import yaml

    spec = importlib.util.spec_from_file_location("ablate", REPO / "scripts" / "bench" / "ablate.py")
    ablate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablate)
    for method, variants in ablate.ABLATIONS.items():
        for variant, overrides in variants:
            parsed = recipe_mod.from_dict(cl_compare.recipe_for(method, _args(set=overrides), 1, tmp_path))
            assert parsed.method.name == method
            for text in overrides:
                key, value = text.split("=", 1)
                assert getattr(parsed.method, key.split(".")[1]) == yaml.safe_load(value), (method, variant, key)


def test_an_archived_run_comes_back_with_its_light_files_and_no_weights(tmp_path):
    """--archive keeps what the report and the summary read (no weights, no rendered test data) and a fresh
    --out takes the finished run back from it; a run finished in --out is never overwritten by the archive."""
    out, archive = tmp_path / "out", tmp_path / "archive"
    run = cl_compare.run_dir_of(out, "seqft+replay", 2, 1)
    files = {"recipe.yaml": f"include: {out}/seqft-o2-s1/eval/tasks\n", "ledger.json": '{"stages": []}', "bench.json": '{"wall_s": 3.0}',
             "metrics.jsonl": '{"loss": 1.0}\n', "eval/base.json": '{"tasks": {}}', "eval/stage-00.json": "{}",
             "report/matrix.json": '{"R": []}', "report/report.md": "# r\n"}
    heavy = {"stage-00-dbpedia/model.safetensors": "weights", "eval/tasks/dbpedia.jsonl": "test data"}
    for rel, text in {**files, **heavy}.items():
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text(text)
    (out / f"{run.name}.log").write_text("the training log\n")
    archive.mkdir()
    cl_compare.archive_run(run, archive)
    kept = {str(p.relative_to(archive / run.name)) for p in (archive / run.name).rglob("*") if p.is_file()}
    assert kept == set(files) | {"run.log"}

    fresh = cl_compare.run_dir_of(tmp_path / "fresh", "seqft+replay", 2, 1)
    assert cl_compare.restore_run(fresh, archive)
    assert {rel: (fresh / rel).read_text() for rel in files if rel != "recipe.yaml"} == \
        {rel: text for rel, text in files.items() if rel != "recipe.yaml"}
    # a recipe naming another run of --out names it in the --out the run came back to
    assert (fresh / "recipe.yaml").read_text() == f"include: {fresh.parent}/seqft-o2-s1/eval/tasks\n"
    assert not (fresh / "stage-00-dbpedia").exists()
    assert (fresh.parent / f"{fresh.name}.log").read_text() == "the training log\n"
    (fresh / "bench.json").write_text('{"wall_s": 9.0}')
    assert not cl_compare.restore_run(fresh, archive) and (fresh / "bench.json").read_text() == '{"wall_s": 9.0}'
    assert not cl_compare.restore_run(cl_compare.run_dir_of(out, "lora", 1, 0), archive)  # nothing archived


@pytest.mark.parametrize("argv, orders, limit", [
    ([], [1, 2, 3], 100), (["--quick"], [1], 30), (["--quick", "--limit", "50"], [1], 50),
    (["--orders", "3"], [3], 100), (["--full"], [1, 2, 3], None),
    (["--benchmark", "long"], [4, 5, 6], None), (["--benchmark", "long", "--limit", "100"], [4, 5, 6], 100),
    (["--benchmark", "long", "--quick"], [4], 30)])
def test_the_comparison_size_where_the_command_line_leaves_it_open(argv, orders, limit, tmp_path):
    args = cl_compare.parser().parse_args(argv)
    cl_compare.resolve_size(args)
    assert (args.orders, args.limit) == (orders, limit)
    if limit is None and not args.full:  # the long sequence: its recipe's test items, not the standard 100
        assert cl_compare.recipe_for("seqft", args, 4, tmp_path)["eval"]["limit"] == 30


def test_jobs_run_at_most_that_many_at_once_each_order_s_seqft_first_in_its_own_share(monkeypatch, tmp_path):
    import threading

    lock, now, spans = threading.Lock(), [0], {}

    def fake_run(name, args, order, env):
        with lock:
            now[0] += 1
            start = now[0]
        if name == "seqft":  # scores the base row first, then trains on
            time.sleep(0.2)
            base = cl_compare.run_dir_of(args.out, name, order, order - 1) / "eval" / "base.json"
            base.parent.mkdir(parents=True)
            with lock:
                now[0] += 1
                base_at[order] = now[0]
                base.write_text("{}")
        time.sleep(1.5 if name == "seqft" else 0.2)  # seqft's run is far longer than a look for base rows
        with lock:
            now[0] += 1
            spans[(order, name)] = (start, now[0], env)
        return {"method": name, "order": order, "seed": order - 1, "AA": 0.5, "BWT": -0.1}

    base_at = {}
    monkeypatch.setattr(cl_compare, "run_one", fake_run)
    monkeypatch.setattr(cl_compare, "POLL_SECONDS", 0.05)
    monkeypatch.setattr(cl_compare.os, "cpu_count", lambda: 8)
    args = cl_compare.parser().parse_args(["--jobs", "3", "--orders", "1", "2", "--out", str(tmp_path)])
    methods = ["seqft", "lora", "hft", "multitask"]
    results = cl_compare.run_all(args, methods)
    assert [(r["order"], r["method"]) for r in results] == [(o, m) for o in (1, 2) for m in methods]
    for (order, name), (start, _, env) in spans.items():
        assert env == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}  # 8 cores // 3 runs
        if name != "seqft":  # the order's base row and stage tasks exist before its other runs start ...
            assert start > base_at[order], (order, name)
    assert spans[(1, "lora")][0] < spans[(1, "seqft")][1]  # ... and they need not wait for the seqft run's end
    events = sorted([(s, 1) for s, _, _ in spans.values()] + [(e, -1) for _, e, _ in spans.values()])
    at_once = [sum(d for _, d in events[:i + 1]) for i in range(len(events))]
    assert max(at_once) == 3  # the machine is used: three at once, never more

    def failing(name, args, order, env):
        if name == "hft":
            sys.exit("hft (order 1, seed 0) failed with exit 1")
        return fake_run(name, args, order, env)

    monkeypatch.setattr(cl_compare, "run_one", failing)
    args.out = tmp_path / "again"
    with pytest.raises(SystemExit, match="hft .* failed"):
        cl_compare.run_all(args, methods)
