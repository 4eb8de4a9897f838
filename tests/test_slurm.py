"""SLURM: the scripts llmcl ships and writes, statically, from their launch lines, and on a real SLURM.

The `slurm` tests run against a one-node cluster on this machine (scripts/slurm/local_cluster.sh: Debian's
slurm-wlm, munge, slurmctld, slurmd); `make test-slurm` starts it and runs them, `.ci/run` does so in CI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_cli, write_recipe

SCRIPTS = [REPO / "scripts" / "slurm" / n for n in ("train.sbatch", "chain.sh", "local_cluster.sh")]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_and_pass_shellcheck(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (make test-slurm installs it)")
    out = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def _rendered(tmp_path, nodes, gpus, **kw):
    recipe = write_recipe(tmp_path / "r.yaml")
    res = run_cli("slurm", str(recipe), "train.lr=3e-4", "--nodes", str(nodes), "--gpus-per-node", str(gpus),
                  "--run-dir", str(tmp_path / "run"), *[f"--{k}={v}" for k, v in kw.items()])
    assert res.exit_code == 0, res.output
    return recipe, tmp_path / "run" / "slurm"


def test_the_cpus_and_memory_of_a_node_are_asked_for_or_their_absence_is_a_note(tmp_path):
    """One task a node runs every training process of it: without --cpus-per-task a cluster that binds CPUs to
    tasks gives it SLURM's default (often 1 CPU for 8 GPUs' processes). Asked for, the header has them; not
    asked for, `llmcl slurm` says so in one note."""
    recipe = write_recipe(tmp_path / "r.yaml")
    res = run_cli("slurm", str(recipe), "--nodes", "2", "--gpus-per-node", "8", "--run-dir", str(tmp_path / "a"))
    assert res.exit_code == 0 and res.stderr.startswith("note: no --cpus-per-task") and "8 training processes" in \
        res.stderr, res.output
    assert "--cpus-per-task" not in (tmp_path / "a" / "slurm" / "train.sbatch").read_text()
    res = run_cli("slurm", str(recipe), "--nodes", "2", "--gpus-per-node", "8", "--cpus-per-task", "96", "--mem", "0",
                  "--run-dir", str(tmp_path / "b"))
    assert res.exit_code == 0 and "note:" not in res.stderr, res.output
    lines = (tmp_path / "b" / "slurm" / "train.sbatch").read_text().splitlines()
    assert "#SBATCH --cpus-per-task=96" in lines and "#SBATCH --mem=0" in lines
    for bad, says in ((["--cpus-per-task", "0"], "--cpus-per-task 0: expected at least 1"),
                      (["--mem", "1G\n#SBATCH --wrap=x"], "--mem")):
        res = run_cli("slurm", str(recipe), *bad, "--print")
        assert res.exit_code == 2 and res.stderr.startswith("error: " + says), res.output


def _fake_scontrol(tmp_path, hosts):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "scontrol"
    fake.write_text("#!/bin/bash\n[[ $1 == show && $2 == hostnames ]] && printf '%s\\n' " + " ".join(hosts) + "\n")
    fake.chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("node_id", [0, 3])
def test_multi_node_launch_line_comes_from_the_slurm_environment(tmp_path, node_id):
    recipe, out = _rendered(tmp_path, 4, 8, partition="gpu", time="1:00:00", account="proj")
    train = (out / "train.sbatch").read_text()
    for line in ("#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu",
                 "#SBATCH --time=1:00:00", "#SBATCH --account=proj", "#SBATCH --requeue", "#SBATCH --signal=USR1@180"):
        assert line in train.splitlines(), line
    hosts = ["gpu-a017", "gpu-a018", "gpu-b002", "gpu-b003"]
    env = {**os.environ, "PATH": f"{_fake_scontrol(tmp_path, hosts)}:{os.environ['PATH']}", "LLMCL_DRY_RUN": "1",
           "SLURM_NNODES": "4", "SLURM_NODEID": str(node_id), "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "gpu-a[017-018],gpu-b[002-003]", "SLURM_SUBMIT_DIR": str(REPO),
           "MASTER_ADDR": "stale-login-node", "MASTER_PORT": "1"}  # the submitting shell's, exported by sbatch
    line = subprocess.run(["bash", str(out / "train.sbatch")], env=env, capture_output=True, text=True, check=True)
    words = line.stdout.split()
    flag = {words[i]: words[i + 1] for i in range(len(words) - 1) if words[i].startswith("--")}
    assert words[1:3] == ["-m", "accelerate.commands.launch"]
    assert flag["--num_machines"] == "4" and flag["--machine_rank"] == str(node_id)
    assert flag["--num_processes"] == "32" and flag["--main_process_ip"] == "gpu-a017"
    assert flag["--main_process_port"] == str(29500 + 4242 % 1000)
    assert flag["--config_file"].endswith("recipes/accelerate/ddp.yaml")
    assert words[words.index("llmcl") + 1:words.index("llmcl") + 3] == ["train", str(recipe)]
    assert flag["--run-dir"] == str(tmp_path / "run") and "train.lr=3e-4" in words
    env.update(LLMCL_MASTER_ADDR="head-node", LLMCL_MASTER_PORT="31000")  # what a user sets on purpose
    words = subprocess.run(["bash", str(out / "train.sbatch")], env=env, capture_output=True, text=True,
                           check=True).stdout.split()
    assert words[words.index("--main_process_ip") + 1:words.index("--main_process_ip") + 4] == [
        "head-node", "--main_process_port", "31000"]


def test_one_process_runs_llmcl_directly_and_arguments_replace_the_defaults(tmp_path):
    recipe, out = _rendered(tmp_path, 1, 0)
    env = {**os.environ, "LLMCL_DRY_RUN": "1", "SLURM_SUBMIT_DIR": str(REPO)}
    env.pop("SLURM_NNODES", None)
    line = subprocess.run(["bash", str(out / "train.sbatch")], env=env, capture_output=True, text=True, check=True)
    assert line.stdout.split()[1:4] == ["-m", "llmcl", "train"] and "accelerate" not in line.stdout
    line = subprocess.run(["bash", str(out / "train.sbatch"), str(recipe), "--stage", "1"], env=env,
                          capture_output=True, text=True, check=True)
    assert "--stage 1" in line.stdout


def test_llmcl_slurm_refuses_impossible_settings(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml")
    res = run_cli("slurm", str(recipe), "--nodes", "0")
    assert res.exit_code == 2 and "--nodes 0: expected at least 1" in res.stderr


# -- on a real SLURM --------------------------------------------------------------------------------------

def _squeue_empty(job_ids, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i %T"], capture_output=True,
                             text=True).stdout.strip()
        if not out:
            return
        time.sleep(1)
    raise AssertionError(f"jobs {job_ids} still queued after {timeout}s: {out}")


@pytest.fixture(scope="module")
def cluster():
    if shutil.which("sbatch") is None or subprocess.run(["sinfo", "-h"], capture_output=True).returncode != 0:
        pytest.skip("no SLURM here: `make test-slurm` starts a local one-node cluster")
    return True


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "LLMCL_PYTHON": sys.executable}


def _weights(run_dir):
    return load_file(str(run_dir / "stage-01-reverse" / "model" / "model.safetensors"))


@pytest.mark.slurm
def test_chain_submits_dependent_stage_jobs_then_eval_and_report(cluster, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", eval={"limit": 4})
    run = tmp_path / "run"
    out = subprocess.run(["bash", str(REPO / "scripts" / "slurm" / "chain.sh"), str(recipe), "--run-dir", str(run)],
                         cwd=REPO, env={**_env(), "LLMCL_SBATCH_ARGS": f"--output={tmp_path}/%x-%j.out",
                                        "LLMCL_EVAL_ARGS": f"--output={tmp_path}/%x-%j.out"},
                         capture_output=True, text=True, check=True)
    jobs = [line.split()[0] for line in out.stdout.splitlines()]
    assert [line.split(None, 1)[1] for line in out.stdout.splitlines()] == ["stage 0 facts", "stage 1 reverse",
                                                                           "eval+report"]
    deps = [subprocess.run(["squeue", "-h", "-j", j, "-o", "%E"], capture_output=True, text=True).stdout.strip()
            for j in jobs[1:]]  # right after submission: stage 0 is still starting, the others wait on it
    assert deps[0].startswith(f"afterok:{jobs[0]}") and deps[1].startswith(f"afterok:{jobs[1]}"), deps
    _squeue_empty(jobs, 600)
    ledger = json.loads((run / "ledger.json").read_text())
    assert [s["status"] for s in ledger["stages"]] == ["done", "done"]
    assert (run / "report" / "matrix.json").exists() and (run / "eval" / "stage-01.json").exists()
    # resubmitting a finished run submits no stage job, only the report
    again = subprocess.run(["bash", str(REPO / "scripts" / "slurm" / "chain.sh"), str(recipe), "--run-dir",
                            str(run)], cwd=REPO, env={**_env(), "LLMCL_EVAL_ARGS": f"--output={tmp_path}/%x-%j.out"},
                           capture_output=True, text=True, check=True)
    assert [line.split(None, 1)[1] for line in again.stdout.splitlines()] == ["eval+report"]
    assert "already done" in again.stderr
    _squeue_empty([again.stdout.split()[0]], 300)


@pytest.mark.slurm
def test_train_sbatch_starts_two_processes_through_srun_and_accelerate(cluster, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", train={"max_steps": 3, "batch_size": 2, "seq_len": 48})
    run = tmp_path / "run"
    job = subprocess.run(["sbatch", "--parsable", f"--output={tmp_path}/%j.out", str(REPO / "scripts" / "slurm" /
                          "train.sbatch"), str(recipe), "--run-dir", str(run)], cwd=REPO,
                         env={**_env(), "LLMCL_PROCS_PER_NODE": "2",
                              "LLMCL_ACCELERATE_CONFIG": "recipes/accelerate/ddp_cpu.yaml"},
                         capture_output=True, text=True, check=True).stdout.strip()
    _squeue_empty([job], 600)
    log = (tmp_path / f"{job}.out").read_text()
    stages = json.loads((run / "ledger.json").read_text())["stages"]
    assert [(s["status"], s["processes"], s["distributed"]) for s in stages] == [("done", 2, "multi_cpu")] * 2, log
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 6  # written once, by rank 0


@pytest.mark.slurm
def test_a_job_sigtermed_mid_stage_is_requeued_and_resumes_bitwise(cluster, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", train={"lr": 1e-3, "max_steps": 40, "batch_size": 4, "seq_len": 48,
                                                      "save_every": 0, "warmup": 2})
    clean, run = tmp_path / "clean", tmp_path / "run"
    subprocess.run([sys.executable, "-m", "llmcl", "train", str(recipe), "--run-dir", str(clean)], cwd=REPO,
                   env=_env(), check=True, capture_output=True)
    job = subprocess.run(["sbatch", "--parsable", f"--output={tmp_path}/%j.out",
                          str(REPO / "scripts" / "slurm" / "train.sbatch"), str(recipe), "--run-dir", str(run)],
                         cwd=REPO, env=_env(), capture_output=True, text=True, check=True).stdout.strip()
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
        if any(r["stage"] == 1 and r["step"] >= 5 for r in rows):
            break
        time.sleep(0.05)
    subprocess.run(["scancel", "--signal=TERM", job], check=True)
    _squeue_empty([job], 600)  # SLURM holds a requeued job ~2 minutes before it starts again
    log = (tmp_path / f"{job}.out").read_text()
    assert "stopped: SIGTERM: stopped after step" in log and "requeueing job" in log, log
    assert "(restart 1)" in log and "resuming after step" in log, log
    assert [s["status"] for s in json.loads((run / "ledger.json").read_text())["stages"]] == ["done", "done"]
    a, b = _weights(clean), _weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
