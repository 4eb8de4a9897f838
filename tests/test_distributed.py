"""Scale-out on CPU: DDP over 2 gloo processes and DeepSpeed ZeRO-2/3 (+ offload) in one process, every method.

Each distributed configuration is one `accelerate launch` of tests/helpers/dist_driver.py that trains a 2-stage
tiny recipe per method; the same recipes trained by a plain single process are the reference. These tests back
every "yes" of the README's compatibility table, and check every "no" is refused with a clear message.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, SHARED_DATA, run_cli, untimed, write_recipe
from llmcl import methods as method_registry

DRIVER = REPO / "tests" / "helpers" / "dist_driver.py"
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
# each method runs its defaults (adaptive OSFT included); these variants add options the invariants also cover
VARIANTS = {"mora_prune": {"prune_below": 0.2},  # pruning decides from the expert counts, reduced over the ranks
            "osft_uniform": {"rank_rule": "uniform", "uniform_ratio": 0.5}}  # every matrix keeps half its rank


def _supported(stage):
    return [m for m, cls in sorted(method_registry.REGISTRY.items()) if stage not in cls.zero_refused]


# configuration -> methods that run under it, from each method's declared refusals (the README's table is
# generated from the same declarations): offload under the highest ZeRO stage a method supports
SUPPORTED = {
    "ddp_cpu": sorted(method_registry.REGISTRY),
    "zero2": _supported(2),
    "zero3": _supported(3),
    "zero3_offload": _supported(3),
    "zero2_offload": _supported(2),
}
REFUSED = {f"zero{k}": [m for m in sorted(method_registry.REGISTRY) if m not in _supported(k)] for k in (2, 3)}
STEPS = 3


def _recipe(tmp_path, method, per_rank_batch, stage1_accum=False, precision="auto"):
    extra = {}
    if stage1_accum:  # stage 2 as 2 micro-batches of half the size: the same step, another DeepSpeed config
        extra["stages"] = [{"data": {"path": "builtin:facts"}},
                           {"data": {"path": "builtin:reverse"},
                            "train": {"batch_size": per_rank_batch // 2, "grad_accum": 2}}]
    if method == "seqft_replay_eval":  # replay (sampled per rank from the global plan) and data-parallel evaluation
        # (WikiText's bits per byte differ from article to article: a wrong sharding could not go unseen)
        wikitext = SHARED_DATA / "eval" / "wikitext2"
        # (and checkpoints.keep_stages: rank 0 deletes stage 0's weights once its row is written by both ranks)
        extra = {"replay": {"ratio": 0.5}, "eval": {"after_each_stage": True, "limit": 4, "tasks_limit": 2, **(
            {"tasks": ["llmcl_wikitext2"], "data_dir": str(SHARED_DATA / "eval")} if wikitext.is_dir() else {})},
            "checkpoints": {"keep_stages": 1}}
    return write_recipe(tmp_path / f"{method}-b{per_rank_batch}{'-acc' if stage1_accum else ''}-{precision}.yaml",
                        **{"method": {"name": method.split("_")[0], **VARIANTS.get(method, {})}, **extra},
                        train={"lr": 1e-3, "max_steps": STEPS, "batch_size": per_rank_batch, "seq_len": 48,
                               "warmup": 0, "precision": precision})


def _launch(config, pairs, processes, tmp_path, dump_ranks=False, sigterm_at=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}
    if dump_ranks:
        env["LLMCL_DUMP_RANKS"] = "1"
    if sigterm_at:
        env["LLMCL_SIGTERM_AT"] = sigterm_at
    cmd = ACCELERATE + ["--config_file", str(REPO / "recipes" / "accelerate" / f"{config}.yaml"),
                        "--num_processes", str(processes), "--main_process_port", "0", str(DRIVER),
                        *[f"{r}:{d}" for r, d in pairs]]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def _losses(run_dir):
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _final(run_dir):
    d = run_dir / "stage-01-reverse"
    files = [p for p in d.rglob("*.safetensors")]
    assert files, f"no weights in {d}"
    out = {}
    for p in files:
        out.update({f"{p.relative_to(d)}:{k}": v for k, v in load_file(str(p)).items()})
    return out


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Each method trained by one plain process with the global batch (4)."""
    tmp = tmp_path_factory.mktemp("ref")
    runs = {}
    for method in [*sorted(method_registry.REGISTRY), *VARIANTS, "seqft_replay_eval"]:
        recipe = _recipe(tmp, method, 4)
        res = run_cli("train", str(recipe), "--run-dir", str(tmp / method))
        assert res.exit_code == 0, res.output
        runs[method] = tmp / method
    return runs


_HOLD_LOCK = """
import sys, time
from pathlib import Path
from llmcl.rundir.lock import acquire
lock = acquire(Path(sys.argv[1]), command="llmcl train elsewhere.yaml")
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """One launch of 2 gloo processes: every method and variant with 2 samples per rank (the references' global
    batch), every rank dumping its weights and method state after every stage."""
    tmp = tmp_path_factory.mktemp("ddp")
    variants = SUPPORTED["ddp_cpu"] + [*VARIANTS] + ["seqft_replay_eval"]
    pairs = [(_recipe(tmp, m, 2), tmp / f"ddp-{m}") for m in variants]
    locked = tmp / "locked"  # a run dir another process holds: every rank refuses it, the launch goes on
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(locked)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        out = _launch("ddp_cpu", [(pairs[0][0], locked)] + pairs, 2, tmp, dump_ranks=True)
    finally:
        holder.kill()
        holder.wait()
    return {"runs": {m: tmp / f"ddp-{m}" for m in variants}, "locked": (locked, holder.pid, out)}


def _check_same_training(ref, run, loss_tol, weight_tol):
    a, b = _losses(ref), _losses(run)
    assert len(b) == len(a) == 2 * STEPS  # every step logged exactly once (rank 0 only)
    assert max(abs(x - y) for x, y in zip(a, b)) < loss_tol, (a, b)
    wa, wb = _final(ref), _final(run)
    assert wa.keys() == wb.keys()
    diff = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    assert diff < weight_tol, diff
    ledger = json.loads((run / "ledger.json").read_text())
    assert [s["status"] for s in ledger["stages"]] == ["done", "done"]
    for a_stage, b_stage in zip(*[_method_records(r) for r in (ref, run)]):  # the same decisions (k, pruning)
        assert {k: v for k, v in a_stage.items() if k not in ("svd_seconds", "activation_frequency")} == \
            {k: v for k, v in b_stage.items() if k not in ("svd_seconds", "activation_frequency")}


def _method_records(run):
    state = json.loads((run / "stage-01-reverse" / "method_state.json").read_text())
    return state.get("records", []) if isinstance(state, dict) else []


def _osft_leak(run):
    """OSFT's promise, recomputed from the saved weights: stage 2's update W1 - W0 has no component along the
    top-k singular directions of W0 (k as recorded), relative to its size; the largest over every matrix."""
    w0 = load_file(str(run / "stage-00-facts" / "model" / "model.safetensors"))
    w1 = load_file(str(run / "stage-01-reverse" / "model" / "model.safetensors"))
    record = next(r for r in _method_records(run) if r["stage"] == 1)
    leak = 0.0
    for name, k in record["k"].items():
        if k:
            u, _, vh = torch.linalg.svd(w0[name].double(), full_matrices=False)
            d = w1[name].double() - w0[name].double()
            leak = max(leak, float((u[:, :k].T @ d).norm() / d.norm()), float((d @ vh[:k].T).norm() / d.norm()))
    return leak


# without the correction after the step the leak is ~0.4; with it, float32 rounding of the SVDs leaves ~3e-4
OSFT_LEAK = 1e-2


@pytest.mark.slow  # one 2-process launch of 9 runs and their 1-process references (~2 min): -m slow, which CI runs
def test_ddp_two_cpu_processes_match_one_process_with_the_same_global_batch(ddp_runs, references):
    """2 gloo processes x 2 samples = 1 process x 4 samples: the same data, so the same losses (float tolerance).
    After every stage each rank holds bitwise the same trainable weights and method state (statistics a method
    decides from are reduced over the ranks)."""
    for run in ddp_runs["runs"].values():
        for stage in (0, 1):
            dumps = [json.loads((run.parent / f"{run.name}.rank{r}.stage{stage}.json").read_text()) for r in (0, 1)]
            assert dumps[0]["params"] and dumps[0]["params"] == dumps[1]["params"], (run.name, stage)
            assert untimed(dumps[0]["method_state"]) == untimed(dumps[1]["method_state"]), (run.name, stage)
    for m, run in ddp_runs["runs"].items():  # both ranks finish every run
        assert (run.parent / f"{run.name}.rank0.done").exists() and (run.parent / f"{run.name}.rank1.done").exists()
        if m == "ilora":  # one reservoir, but each rank draws its own replay samples from it: replay differs
            a, b = _losses(references[m]), _losses(run)
            assert len(a) == len(b) and a[0] == pytest.approx(b[0], abs=1e-4)  # no replay before the first step
            assert all(abs(x - y) < 0.05 * x for x, y in zip(a, b)), (a, b)  # the replay terms weigh the same
            continue
        # tolerance: gloo sums gradients in another order than one process does (float32 rounding); OSFT projects
        # gradients onto a complement where many coordinates are ~0, and Adam scales that rounding noise up to ~lr
        _check_same_training(references[m], run, loss_tol=1e-4, weight_tol=2e-3 if m.startswith("osft") else 1e-4)
        assert not list(run.glob("*.tmp")) and (run / "recipe.yaml").exists()
    assert max(_osft_leak(ddp_runs["runs"][m]) for m in ("osft", "osft_uniform")) < OSFT_LEAK
    # every row scored on the saved checkpoints by both ranks, each on its share: the same scores as one process
    replay = ddp_runs["runs"]["seqft_replay_eval"]
    ref_rows = {p.name: json.loads(p.read_text())["tasks"] for p in (references["seqft_replay_eval"] / "eval").glob("*.json")}
    rows = {p.name: json.loads(p.read_text())["tasks"] for p in (replay / "eval").glob("*.json")}
    assert sorted(rows) == ["base.json", "stage-00.json", "stage-01.json"]
    assert rows["base.json"] == ref_rows["base.json"] or all(  # the same model: the same numbers, bar summation order
        r["metrics"] == pytest.approx(ref_rows["base.json"][t]["metrics"], rel=1e-12) for t, r in rows["base.json"].items())
    for k, v in rows.items():  # the trained stages match one process's to float tolerance (see above), so do scores
        assert v.keys() == ref_rows[k].keys()
        for t, r in v.items():
            assert r["n"] == ref_rows[k][t]["n"] and r["metrics"] == pytest.approx(ref_rows[k][t]["metrics"], rel=1e-6)
    # data-parallel: lm-eval split every task's requests over both ranks, rank 0 gathered them
    assert {t["processes"] for v in rows.values() for t in v.values()} == {2}
    fractions = [json.loads(x)["replay_fraction"] for x in (replay / "metrics.jsonl").read_text().splitlines()]
    assert fractions[STEPS:] == [0.5] * STEPS  # stage 2 replays half of every step, summed over both ranks
    for run in (replay, references["seqft_replay_eval"]):  # stage 0's weights went after its row, as one process
        ledger = json.loads((run / "ledger.json").read_text())["stages"]
        assert [bool(s.get("weights_deleted")) for s in ledger] == [True, False]
        assert sorted(p.name for p in (run / "stage-00-facts").iterdir()) == ["stage.json"]


@pytest.mark.slow  # 1-2 min a config: -m slow, which CI runs (.ci/run)
@pytest.mark.parametrize("config", ["zero2", "zero3", "zero3_offload", "zero2_offload"])
def test_deepspeed_zero_runs_every_supported_method_and_refuses_the_others(config, tmp_path, references, ddp_runs):
    """2 processes under DeepSpeed (every parameter, gradient and optimizer state sharded over them) train what
    one process trains with the same global batch; stage 2 takes 2 micro-batches a step. I-LoRA keeps one
    micro-batch (its replay is drawn per micro-batch and per rank) and matches the 2-process DDP run."""
    methods = SUPPORTED[config] + [v for v in VARIANTS if v.split("_")[0] in SUPPORTED[config]] + REFUSED.get(config, [])
    pairs = [(_recipe(tmp_path, m, 2, stage1_accum=m != "ilora"), tmp_path / f"{config}-{m}") for m in methods]
    out = _launch(config, pairs, 2, tmp_path)
    for m in methods:
        if m in REFUSED.get(config, []):
            continue
        run = tmp_path / f"{config}-{m}"
        assert f"done: {run}" in out
        reference = ddp_runs["runs"][m] if m == "ilora" else references[m]
        _check_same_training(reference, run, loss_tol=1e-4, weight_tol=1e-3 if m.startswith("osft") else 1e-4)
        if m.startswith("osft"):  # the projections under sharding: without the gradient hooks the weights are 5e-3 off
            assert _osft_leak(run) < OSFT_LEAK
    zero = config[len("zero")]
    for m in REFUSED.get(config, []):
        line = next(x for x in out.splitlines() if x.startswith(f"refused: {tmp_path / f'{config}-{m}'}"))
        assert f"does not support DeepSpeed ZeRO-{zero}" in line
        assert not (tmp_path / f"{config}-{m}" / "stage-00-facts").exists()  # refused before any training


def _saved(run_dir, index):
    """{file:tensor name: tensor} of every weight file stage `index` saved."""
    d = next(run_dir.glob(f"stage-{index:02d}-*"))
    return {f"{p.relative_to(d)}:{k}": v for p in sorted(d.rglob("*.safetensors")) for k, v in load_file(str(p)).items()}


def _unchanged(before, after):
    """Names (without the file) whose tensor `after` holds bitwise as `before` did."""
    by_name = {k.split(":", 1)[1]: v for k, v in before.items()}
    return {k.split(":", 1)[1] for k, v in after.items()
            if k.split(":", 1)[1] in by_name and torch.equal(by_name[k.split(":", 1)[1]], v)}


@pytest.mark.slow  # 1-2 min a config: -m slow, which CI runs (.ci/run)
@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_deepspeed_in_bf16_runs_every_supported_method_and_saves_frozen_weights_as_they_came_in(config, tmp_path):
    """DeepSpeed's bf16 casts the whole module (parameters, not buffers) and keeps fp32 masters of the trained
    parameters only. Every supported method trains two stages under it, and each stage saves what one plain
    process in bf16 mixed precision saves: the same dtypes, and every weight that process leaves untouched in a
    stage (HFT's frozen half, OSFT's embeddings and norms, the base weights) bitwise as the stage began."""
    from llmcl.models import load_base_model
    from llmcl.recipe import load as load_recipe

    methods = SUPPORTED[config]
    refs, pairs = {}, []
    for m in methods:
        recipe = _recipe(tmp_path, m, 2, precision="bf16")
        res = run_cli("train", str(recipe), "--run-dir", str(tmp_path / f"ref-{m}"))
        assert res.exit_code == 0, res.output
        refs[m] = tmp_path / f"ref-{m}"
        pairs.append((recipe, tmp_path / f"{config}-{m}"))
    out = _launch(config, pairs, 2, tmp_path)
    recipe = load_recipe(pairs[0][0])
    base = {f"model:{k}": v for k, v in load_base_model(recipe.model, recipe.seed).state_dict().items()}
    for m in methods:
        run, ref = tmp_path / f"{config}-{m}", refs[m]
        assert f"done: {run}" in out
        for i in (0, 1):
            got, want = _saved(run, i), _saved(ref, i)
            assert {k: v.dtype for k, v in got.items()} == {k: v.dtype for k, v in want.items()}, (m, i)
            start_ref, start_run = (base, base) if i == 0 else (_saved(ref, 0), _saved(run, 0))
            kept = _unchanged(start_ref, want)
            assert kept <= _unchanged(start_run, got), (m, i, sorted(kept - _unchanged(start_run, got))[:3])
            if m in ("hft", "osft"):  # frozen weights every stage: the check above is not empty
                assert kept, (m, i)


def test_the_readme_compatibility_table_is_what_the_tests_check():
    """Every yes in README's table is a configuration tested above; every no is a refusal tested above."""
    text = (REPO / "README.md").read_text()
    start = text.index("<!-- compat:start -->")
    rows = [line for line in text[start:text.index("<!-- compat:end -->")].splitlines() if line.startswith("| `")]
    table = {}
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        table[cells[0].strip("`")] = cells[1:]
    columns = ["ddp_cpu", "zero2", "zero3", "offload"]
    for method, cells in table.items():
        for col, cell in zip(columns, cells):
            yes = cell.startswith("yes")
            if col == "offload":
                tested = method in SUPPORTED["zero3_offload"] + SUPPORTED["zero2_offload"]
            else:
                tested = method in SUPPORTED[col]
            assert yes == tested, (method, col, cell)
            if not yes and col in REFUSED:
                assert method in REFUSED[col], (method, col)
    assert set(table) == set(method_registry.REGISTRY)


def test_refusal_under_deepspeed_names_the_method_and_stage():
    from llmcl.errors import LlmclError
    from llmcl.methods.base import Method
    from llmcl.train import distributed

    class Demo(Method):  # not registered: no llmcl method refuses a ZeRO stage today
        name = "demo"
        zero_refused = {2: "it needs the whole gradient"}

    method = Demo(None)
    with pytest.raises(LlmclError, match="'demo' does not support DeepSpeed ZeRO-2: it needs the whole gradient"):
        distributed.check_method(_FakeAccel(2), method)
    distributed.check_method(_FakeAccel(3), method)
    distributed.check_method(_FakeAccel(None), method)  # no DeepSpeed: nothing to refuse


class _FakeAccel:
    def __init__(self, stage):
        from accelerate.utils import DistributedType

        self.distributed_type = DistributedType.DEEPSPEED if stage else DistributedType.NO

        class _Plugin:
            zero_stage = stage
            deepspeed_config: dict = {}

        class _State:
            deepspeed_plugin = _Plugin()

        self.state = _State()


@pytest.mark.slow  # a 2-process self-launch (~35 s here): -m slow, which CI runs (.ci/run)
def test_a_recipe_that_names_an_accelerate_config_launches_itself_through_it(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", train={"max_steps": 2, "batch_size": 2, "seq_len": 48},
                          distributed={"accelerate_config": str(REPO / "recipes" / "accelerate" / "ddp_cpu.yaml")})
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "LLMCL_LAUNCHED")}
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, "-m", "llmcl", "train", str(recipe), "--run-dir", str(tmp_path / "run")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    stages = json.loads((tmp_path / "run" / "ledger.json").read_text())["stages"]
    assert [(s["processes"], s["distributed"]) for s in stages] == [(2, "multi_cpu")] * 2


_LOCK_ON_EACH_RANK = """
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from llmcl.errors import LlmclError
from llmcl.rundir.lock import locked

accelerator = Accelerator(cpu=True)
rank = accelerator.process_index
said = []
for mode in ("shared", "local"):  # local: rank 1's --run-dir is a directory of its own, as on an unshared node
    run_dir = Path(sys.argv[1]) / (mode if mode == "shared" or rank == 0 else f"{mode}-rank{rank}")
    try:
        with locked(run_dir, accelerator):
            said.append(f"{mode} rank {rank}: locked")
    except LlmclError as exc:
        said.append(f"{mode} rank {rank}: refused: {exc}")
Path(sys.argv[1], f"rank{rank}.txt").write_text("\\n".join(said) + "\\n")
accelerator.wait_for_everyone()
torch.distributed.destroy_process_group()
"""


def test_a_run_dir_that_is_not_shared_by_every_rank_is_refused_on_every_rank(tmp_path):
    """Ranks that do not see the directory rank 0 locked (a node whose --run-dir is local, or another path)
    would each decide what is done and where to resume, train other steps than rank 0 and hang at the stage's
    end: every rank refuses instead, in one line, before anything is read. Control: the same launch on one
    shared directory locks on both ranks."""
    script = tmp_path / "lock_each_rank.py"
    script.write_text(_LOCK_ON_EACH_RANK)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = ACCELERATE + ["--config_file", str(REPO / "recipes" / "accelerate" / "ddp_cpu.yaml"),
                        "--main_process_port", "0", str(script), str(tmp_path)]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = sorted(line for rank in (0, 1) for line in (tmp_path / f"rank{rank}.txt").read_text().splitlines())
    assert lines[:2] == ["local rank 0: refused: run directory " + str(tmp_path / "local") + " is not the one rank 0 "
                         "locked on every rank: a run directory must be on a file system that every node shares",
                         "local rank 1: refused: run directory " + str(tmp_path / "local-rank1") + " is not the "
                         "one rank 0 locked on every rank (rank 1 on " + __import__("socket").gethostname()
                         + " does not): a run directory must be on a file system that every node shares"], lines
    assert lines[2:] == ["shared rank 0: locked", "shared rank 1: locked"]


@pytest.mark.parametrize("world", ["1", "2"])
def test_a_collective_another_rank_left_is_one_line_on_this_rank(world, tmp_path, monkeypatch):
    """Rank 1 refused its input (exit 2) or stopped on a signal: rank 0, waiting in a collective, gets gloo's
    'Connection closed by peer'. Under a launch that is one line naming the cause's place, exit 74, not a
    traceback; in a single process the same exception has no peer to blame and stays a bug (exit 1)."""
    from llmcl.train import loop

    def peer_gone(*args, **kwargs):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                           "[127.0.0.1]:41527")

    monkeypatch.setattr(loop, "run", peer_gone)
    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setenv("RANK", "0")
    if world == "1":
        with pytest.raises(RuntimeError, match="Connection closed by peer"):  # a bug: the traceback
            run_cli("train", str(write_recipe(tmp_path / "r.yaml")), "--run-dir", str(tmp_path / "run"))
        return
    res = run_cli("train", str(write_recipe(tmp_path / "r.yaml")), "--run-dir", str(tmp_path / "run"))
    assert res.exit_code == 74, res.output
    assert res.stderr.count("\n") == 1 and res.stderr.startswith(
        "error: rank 0: another process of this launch left a collective operation"), res.stderr
    assert "Connection closed by peer" in res.stderr and "finished stages are kept" in res.stderr


def _processes_naming(text: str) -> list[int]:
    """Live processes whose command line holds `text` (orphaned ranks of a run directory)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                found.append(int(proc.name))
        except OSError:
            pass
    return found


@pytest.mark.slow  # two launches of 2 ranks per signal (~1.5 min each)
@pytest.mark.parametrize("sig", ["SIGUSR1", "SIGTERM", "SIGINT"])
def test_a_self_launched_run_stops_on_a_signal_with_status_75_and_no_orphaned_ranks(sig, tmp_path):
    """`llmcl train` of a recipe with distributed.accelerate_config re-launches itself under accelerate launch.
    SLURM's SIGUSR1 (torch elastic does not handle it: the launcher died and its ranks trained on, orphaned,
    holding the lock), SIGTERM (the launcher's 143) and a terminal's Ctrl-C (to the whole foreground group: the
    parent exited 130 before the ranks had saved) all stop the ranks with a step checkpoint, and `llmcl train`
    exits 75 like a single process; the same command then finishes the run."""
    import signal
    import time

    recipe = write_recipe(tmp_path / "r.yaml", train={"max_steps": 400, "batch_size": 2, "seq_len": 48},
                          distributed={"accelerate_config": str(REPO / "recipes" / "accelerate" / "ddp_cpu.yaml")},
                          stages=[{"data": {"path": "builtin:facts"}}])
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "LLMCL_LAUNCHED")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "llmcl", "train", str(recipe), "--run-dir", str(run_dir)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,  # its own group, as a terminal's foreground job
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while time.time() < deadline and not (run_dir / "metrics.jsonl").exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    time.sleep(1.0)
    if sig == "SIGINT":
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole foreground group
    else:
        proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 75, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    time.sleep(1.0)
    assert _processes_naming(str(run_dir)) == []  # no rank left behind
    assert (run_dir / "stopped.json").exists()
    state = json.loads((run_dir / "step-checkpoint" / "state.json").read_text())
    assert 0 < state["step"] < 400
    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming after step {state['step']}" in rerun.stderr + rerun.stdout
    assert json.loads((run_dir / "ledger.json").read_text())["stages"][0]["status"] == "done"


def test_launcher_flags_win_over_the_recipes_accelerate_config(tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path / "r.yaml", train={"max_steps": 1},
                          distributed={"accelerate_config": str(REPO / "recipes" / "accelerate" / "zero3.yaml")})
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # as if `accelerate launch` had started us (1 process)
    res = run_cli("train", str(recipe), "--run-dir", str(tmp_path / "run"))
    assert res.exit_code == 0 and "is ignored: a launcher started llmcl" in res.stderr
    stages = json.loads((tmp_path / "run" / "ledger.json").read_text())["stages"]
    assert stages[0]["processes"] == 1 and stages[0]["distributed"] == "no"


class _FakePlugin:
    def __init__(self, config):
        self.zero_stage = 2
        self.deepspeed_config = config

        class _Hf:
            pass

        self.hf_ds_config = _Hf()
        self.hf_ds_config.config = config


def test_deepspeed_auto_values_are_filled_per_stage_from_the_launched_config():
    from types import SimpleNamespace

    from llmcl.errors import LlmclError
    from llmcl.train import distributed

    accel = _FakeAccel(2)
    accel.num_processes = 4
    accel.state.deepspeed_plugin = _FakePlugin({"train_micro_batch_size_per_gpu": "auto",
                                                "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
                                                "gradient_clipping": "auto", "zero_optimization": {"stage": 2}})
    stage0 = SimpleNamespace(batch_size=8, grad_accum=1, max_grad_norm=1.0)
    stage1 = SimpleNamespace(batch_size=2, grad_accum=4, max_grad_norm=0.0)
    distributed.configure_stage(accel, stage0)
    cfg = accel.state.deepspeed_plugin.deepspeed_config
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"],
            cfg["gradient_clipping"]) == (8, 1, 32, 1.0)
    distributed.configure_stage(accel, stage1)  # from the launched "auto"s again, not from stage 0's numbers
    cfg = accel.state.deepspeed_plugin.deepspeed_config
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"],
            cfg["gradient_clipping"]) == (2, 4, 32, 0.0)
    assert accel.state.deepspeed_plugin.hf_ds_config.config is cfg and accel.gradient_accumulation_steps == 4

    fixed = _FakeAccel(2)
    fixed.num_processes = 1
    fixed.state.deepspeed_plugin = _FakePlugin({"train_micro_batch_size_per_gpu": 3})
    with pytest.raises(LlmclError, match="train_micro_batch_size_per_gpu=3 but the recipe's stage needs 8"):
        distributed.configure_stage(fixed, stage0)


@pytest.mark.parametrize("name", sorted(method_registry.REGISTRY))
@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_deepspeed_zero_stages_a_method_cannot_work_under_are_refused_before_training(name, zero):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from llmcl.errors import LlmclError
    from llmcl.train import distributed

    accelerator = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED,
                                  state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=zero)))
    method = method_registry.get(name)
    if zero == 0 or zero in method.zero_refused:  # ZeRO-0 shards nothing: DDP does the same, tested
        with pytest.raises(LlmclError, match=f"ZeRO-{zero}"):
            distributed.check_method(accelerator, method)
    else:
        distributed.check_method(accelerator, method)


@pytest.mark.slow  # 1.5-2 min a config: -m slow, which CI runs (.ci/run)
@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_deepspeed_sigterm_saves_a_sharded_step_checkpoint_and_the_rerun_resumes_bitwise(config, tmp_path):
    """SIGTERM after step 3 of stage 2 under DeepSpeed with 2 processes, every method with its defaults: every rank
    writes its shard (DeepSpeed's checkpoint) and rank 0 the rest; the same launch again resumes there and ends
    with the weights of an uninterrupted run (OSFT's projections, I-LoRA's slow learner and MoRA's counts too)."""
    pairs, targets = [], []
    for m in sorted(method_registry.REGISTRY):
        recipe = write_recipe(tmp_path / f"{m}.yaml", method={"name": m},
                              train={"lr": 1e-3, "max_steps": 5, "batch_size": 2, "seq_len": 48, "warmup": 0})
        pairs += [(recipe, tmp_path / f"clean-{m}"), (recipe, tmp_path / f"stopped-{m}")]
        targets.append(f"stopped-{m}:8")
    out = _launch(config, pairs, 2, tmp_path, sigterm_at=",".join(targets))
    for m in sorted(method_registry.REGISTRY):
        clean, stopped = tmp_path / f"clean-{m}", tmp_path / f"stopped-{m}"
        assert f"stopped: {stopped}: SIGTERM: stopped after step 3/5 of stage 1" in out
        assert json.loads((stopped / "stopped.json").read_text())["step_checkpoint"] is True
        assert (stopped / "step-checkpoint" / "deepspeed").is_dir()
        assert json.loads((stopped / "step-checkpoint" / "state.json").read_text())["step"] == 3
    _launch(config, [(recipe, tmp_path / f"stopped-{m}") for recipe, m in
                     ((tmp_path / f"{m}.yaml", m) for m in sorted(method_registry.REGISTRY))], 2, tmp_path)
    for m in sorted(method_registry.REGISTRY):
        clean, stopped = tmp_path / f"clean-{m}", tmp_path / f"stopped-{m}"
        a, b = _final(clean), _final(stopped)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), m
        assert _losses(clean) == _losses(stopped), m
        assert untimed(json.loads((clean / "stage-01-reverse" / "method_state.json").read_text())) == \
            untimed(json.loads((stopped / "stage-01-reverse" / "method_state.json").read_text())), m


@pytest.mark.slow  # two 2-process launches (~1 min): -m slow, which CI runs (.ci/run)
def test_ddp_sigterm_with_dropout_resumes_every_rank_bitwise(tmp_path):
    """Under DDP every rank draws its own dropout masks from its own RNG: a step checkpoint keeps every rank's RNG
    state, and two processes stopped by SIGTERM after step 3 of stage 2 and launched again end with the weights,
    the losses and, on each rank, the RNG state of an uninterrupted launch (LoRA with dropout 0.1). On the CPU
    a rank given rank 0's state ends the same (the old code passes everything here but the saved keys); on a GPU
    each rank's device generator advances with its own batches and would not: test_resume.py checks that each
    rank restores its own state."""
    recipe = write_recipe(tmp_path / "lora.yaml", method={"name": "lora", "dropout": 0.1},
                          train={"lr": 1e-3, "max_steps": 5, "batch_size": 2, "seq_len": 48, "warmup": 0})
    clean, stopped = tmp_path / "clean", tmp_path / "stopped"
    out = _launch("ddp_cpu", [(recipe, clean), (recipe, stopped)], 2, tmp_path, dump_ranks=True,
                  sigterm_at="stopped:8")
    assert f"stopped: {stopped}: SIGTERM: stopped after step 3/5 of stage 1" in out
    rng = load_file(str(stopped / "step-checkpoint" / "rng.safetensors"))
    assert {"cpu.0", "cpu.1"} <= rng.keys() and not torch.equal(rng["cpu.0"], rng["cpu.1"])  # the ranks differ
    _launch("ddp_cpu", [(recipe, stopped)], 2, tmp_path, dump_ranks=True)
    a, b = _final(clean), _final(stopped)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(clean) == _losses(stopped)
    for r in (0, 1):
        dumps = [json.loads((tmp_path / f"{run}.rank{r}.stage1.json").read_text()) for run in ("clean", "stopped")]
        assert dumps[0]["rng"] == dumps[1]["rng"], f"rank {r} resumed with another RNG state"


@pytest.mark.slow  # a 2-process launch of training and evaluation: -m slow, which CI runs (.ci/run)
def test_llmcl_eval_under_accelerate_launch_shares_the_requests_among_the_processes(tmp_path):
    """`accelerate launch -m llmcl eval` with 2 CPU processes: each scores its share, rank 0 writes the rows, and
    they equal what one process writes (WikiText's per-article perplexity included)."""
    wikitext = SHARED_DATA / "eval" / "wikitext2"
    if not wikitext.is_dir():
        pytest.skip("needs ../shared/data/eval")
    recipe = write_recipe(tmp_path / "r.yaml", train={"lr": 1e-3, "max_steps": 2, "batch_size": 4, "seq_len": 48},
                          eval={"after_each_stage": False, "limit": 4, "tasks_limit": 2, "tasks": ["llmcl_wikitext2"],
                                "data_dir": str(SHARED_DATA / "eval")})
    one = tmp_path / "one"
    assert run_cli("train", str(recipe), "--run-dir", str(one)).exit_code == 0
    assert run_cli("eval", str(one), "--stage", "1").exit_code == 0
    two = tmp_path / "two"
    import shutil

    shutil.copytree(one, two)
    shutil.rmtree(two / "eval")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = ACCELERATE + ["--config_file", str(REPO / "recipes" / "accelerate" / "ddp_cpu.yaml"), "--num_processes", "2",
                        "--main_process_port", "0", "-m", "llmcl", "eval", str(two), "--stage", "1"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert out.stdout.count("evaluating stage 1") == 1  # rank 0 speaks
    a, b = [json.loads((d / "eval" / "stage-01.json").read_text())["tasks"] for d in (one, two)]
    assert a.keys() == b.keys() and {t["processes"] for t in b.values()} == {2}
    for task in a:
        assert b[task]["n"] == a[task]["n"] and b[task]["metrics"] == pytest.approx(a[task]["metrics"], rel=1e-12)


@pytest.mark.slow  # in the launch above
def test_a_locked_run_dir_refuses_every_rank_and_the_launch_goes_on(ddp_runs):
    """Rank 0 finds the run dir locked by another process: every rank refuses in one line (none waits in a
    collective for the others), and the same process group then trains the next runs."""
    locked, pid, out = ddp_runs["locked"]
    assert f"refused: {locked}: {locked} is in use by PID {pid}" in out
    assert "llmcl train elsewhere.yaml" in out
    assert not (locked / "stage-00-facts").exists()
    first = next(iter(ddp_runs["runs"].values()))
    assert all(Path(f"{first}.rank{k}.done").exists() for k in (0, 1))
