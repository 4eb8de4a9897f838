"""`llmcl slurm`: write scripts/slurm/train.sbatch and chain.sh for one recipe, with the cluster settings filled in.

The templates are the repository's scripts/slurm files; the rendered copies differ only in their #SBATCH
header (nodes, GPUs, partition, time, account, log path) and a block of defaults (the recipe and its
overrides, processes per node, the accelerate config, the python), so what the tests run is what users run.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from llmcl.errors import LlmclError

MARKER = "# @llmcl-defaults (llmcl slurm writes its settings here)"


def templates_dir() -> Path:
    for d in (Path.cwd() / "scripts" / "slurm", Path(__file__).resolve().parents[1] / "scripts" / "slurm"):
        if (d / "train.sbatch").is_file() and (d / "chain.sh").is_file():
            return d
    raise LlmclError("llmcl slurm needs the repository's scripts/slurm/ (train.sbatch, chain.sh); run it from a "
                     "checkout of llmcl")


@dataclass
class Cluster:
    nodes: int
    gpus_per_node: int
    partition: str | None = None
    time: str | None = None
    account: str | None = None


def _defaults(lines: list[str]) -> str:
    return MARKER + "\n" + "\n".join(lines)


def render(recipe_path: Path, overrides: list[str], run_dir: Path, recipe_name: str, cluster: Cluster,
           accelerate_config: str | None, python: str | None = None) -> dict[str, str]:
    """{"train.sbatch": text, "chain.sh": text} for this recipe and cluster."""
    if cluster.nodes < 1:
        raise LlmclError(f"--nodes {cluster.nodes}: expected at least 1")
    if cluster.gpus_per_node < 0:
        raise LlmclError(f"--gpus-per-node {cluster.gpus_per_node}: expected 0 (CPU) or more")
    d = templates_dir()
    python = python or sys.executable
    procs = max(1, cluster.gpus_per_node)
    world = cluster.nodes * procs
    config = accelerate_config or ("recipes/accelerate/ddp.yaml" if world > 1 else "")
    if config and not Path(config).is_absolute():
        config = str((templates_dir().parents[1] / config).resolve())
    args = [str(recipe_path.resolve()), "--run-dir", str(run_dir.resolve()), *overrides]
    q = shlex.quote

    header = [f"#SBATCH --job-name=llmcl-{recipe_name}", f"#SBATCH --nodes={cluster.nodes}",
              "#SBATCH --ntasks-per-node=1"]
    if cluster.gpus_per_node:
        header.append(f"#SBATCH --gpus-per-node={cluster.gpus_per_node}")
    for flag, value in (("partition", cluster.partition), ("time", cluster.time), ("account", cluster.account)):
        if value:
            header.append(f"#SBATCH --{flag}={value}")
    header += ["#SBATCH --requeue", "#SBATCH --signal=USR1@180", "#SBATCH --open-mode=append",
               f"#SBATCH --output={run_dir.resolve()}/slurm/%x-%j.out"]

    train = (d / "train.sbatch").read_text()
    lines = train.splitlines()
    first = next(i for i, x in enumerate(lines) if x.startswith("#SBATCH"))
    last = max(i for i, x in enumerate(lines) if x.startswith("#SBATCH"))
    defaults = [
        f"# written by `llmcl slurm` for {recipe_path}: {cluster.nodes} node(s) x {procs} process(es)",
        f'[[ $# -gt 0 ]] || set -- {" ".join(q(a) for a in args)}',
        f': "${{LLMCL_PROCS_PER_NODE:={procs}}}"',
        f': "${{LLMCL_ACCELERATE_CONFIG:={config}}}"' if config else ": # no accelerate config: one process",
        f': "${{LLMCL_PYTHON:={python}}}"',
    ]
    train = "\n".join(lines[:first] + header + lines[last + 1:]) + "\n"
    if MARKER not in train:
        raise LlmclError(f"{d / 'train.sbatch'} has no '{MARKER}' line")
    train = train.replace(MARKER, _defaults(defaults))

    chain = (d / "chain.sh").read_text()
    if MARKER not in chain:
        raise LlmclError(f"{d / 'chain.sh'} has no '{MARKER}' line")
    chain = chain.replace(MARKER, _defaults([
        f"# written by `llmcl slurm` for {recipe_path}",
        f'[[ $# -gt 0 ]] || set -- {" ".join(q(a) for a in args)}',
        f': "${{LLMCL_TRAIN_SBATCH:={run_dir.resolve()}/slurm/train.sbatch}}"',
        f': "${{LLMCL_PYTHON:={python}}}"',
    ]))
    return {"train.sbatch": train, "chain.sh": chain}


def write(files: dict[str, str], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        path = out_dir / name
        path.write_text(text)
        path.chmod(0o755)
        written.append(path)
    return written
