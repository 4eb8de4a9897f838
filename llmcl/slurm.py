"""`llmcl slurm`: write scripts/slurm/train.sbatch and chain.sh for one recipe, with the cluster settings filled in.

The templates are the repository's scripts/slurm files; the rendered copies differ only in their #SBATCH
header (nodes, GPUs, partition, time, account, log path) and a block of defaults (the recipe and its
overrides, processes per node, the accelerate config, the python), so what the tests run is what users run.
"""

from __future__ import annotations

import re
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


_SBATCH_VALUE = re.compile(r"[A-Za-z0-9_.,:+-]+")  # partitions, accounts, times (1-00:00:00); nothing a shell or sbatch parses
# sbatch --time: minutes, minutes:seconds, hours:minutes:seconds, days-hours[:minutes[:seconds]], or no limit
_SBATCH_TIME = re.compile(r"\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}|(?i:unlimited|infinite)")


@dataclass
class Cluster:
    nodes: int
    gpus_per_node: int
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    cpus_per_task: int | None = None  # the CPUs of a node's one task, shared by its training processes
    mem: str | None = None  # sbatch --mem (per node): 0 = all of it

    def note(self) -> str | None:
        """What a user should hear about the CPUs the job will get, or None."""
        if self.cpus_per_task is not None:
            return None
        procs = max(1, self.gpus_per_node)
        return (f"note: no --cpus-per-task: on a cluster that binds CPUs to tasks SLURM gives the node's one task "
                f"(its {procs} training process{'es' if procs > 1 else ''} and their data loading) its default, "
                "often 1 CPU; pass --cpus-per-task (and --mem, 0 = a node's whole memory) for what a node has")


def _defaults(lines: list[str]) -> str:
    return MARKER + "\n" + "\n".join(lines)


def _setdefault(name: str, value: str) -> str:
    """A bash line giving $name a default (the environment wins), safe for any characters in value."""
    return f"[[ -n ${{{name}:-}} ]] || {name}={shlex.quote(value)}"


def render(recipe_path: Path, overrides: list[str], run_dir: Path, recipe_name: str, cluster: Cluster,
           accelerate_config: str | None, python: str | None = None,
           out_dir: Path | None = None) -> dict[str, str]:
    """{"train.sbatch": text, "chain.sh": text} for this recipe and cluster; out_dir is where they will be
    written (their logs go there too; default <run_dir>/slurm)."""
    if cluster.nodes < 1:
        raise LlmclError(f"--nodes {cluster.nodes}: expected at least 1")
    if cluster.gpus_per_node < 0:
        raise LlmclError(f"--gpus-per-node {cluster.gpus_per_node}: expected 0 (CPU) or more")
    d = templates_dir()
    python = python or sys.executable
    procs = max(1, cluster.gpus_per_node)
    world = cluster.nodes * procs
    if accelerate_config:  # as the recipe check saw it: relative to the current directory
        config = str(Path(accelerate_config).expanduser().resolve())
    else:
        config = str(d.parents[1] / "recipes" / "accelerate" / "ddp.yaml") if world > 1 else ""
    out_dir = (out_dir or run_dir / "slurm").resolve()
    args = [str(recipe_path.resolve()), "--run-dir", str(run_dir.resolve()), *overrides]
    q = shlex.quote

    header = [f"#SBATCH --job-name=llmcl-{recipe_name}", f"#SBATCH --nodes={cluster.nodes}",
              "#SBATCH --ntasks-per-node=1"]
    if cluster.gpus_per_node:
        header.append(f"#SBATCH --gpus-per-node={cluster.gpus_per_node}")
    if cluster.cpus_per_task is not None:
        if cluster.cpus_per_task < 1:
            raise LlmclError(f"--cpus-per-task {cluster.cpus_per_task}: expected at least 1")
        header.append(f"#SBATCH --cpus-per-task={cluster.cpus_per_task}")
    for flag, value in (("partition", cluster.partition), ("time", cluster.time), ("account", cluster.account),
                        ("mem", cluster.mem)):
        if value and not _SBATCH_VALUE.fullmatch(value):
            raise LlmclError(f"--{flag} {value!r}: expected letters, digits and _ . , : + - only (it goes into an "
                             "#SBATCH line)")
        if flag == "time" and value and not _SBATCH_TIME.fullmatch(value):
            raise LlmclError(f"--time {value!r}: expected a SLURM time limit: minutes, hours:minutes:seconds or "
                             "days-hours:minutes:seconds (e.g. 1-00:00:00)")
        if value:
            header.append(f"#SBATCH --{flag}={value}")
    header += ["#SBATCH --requeue", "#SBATCH --signal=USR1@180", "#SBATCH --open-mode=append",
               f"#SBATCH --output={out_dir}/%x-%j.out"]
    if any(c.isspace() for c in str(out_dir)):
        raise LlmclError(f"--out {out_dir}: SLURM cannot write logs to a path with spaces; choose another")

    train = (d / "train.sbatch").read_text()
    lines = train.splitlines()
    first = next(i for i, x in enumerate(lines) if x.startswith("#SBATCH"))
    last = max(i for i, x in enumerate(lines) if x.startswith("#SBATCH"))
    defaults = [
        f"# written by `llmcl slurm` for {recipe_path}: {cluster.nodes} node(s) x {procs} process(es)",
        "# no arguments, or only options (--stage K): the recipe, run dir and overrides below come first",
        f'if [[ $# -eq 0 || $1 == --* ]]; then set -- {" ".join(q(a) for a in args)} "$@"; fi',
        "# processes per node: what SLURM allocated (sbatch --gpus-per-node), else what llmcl slurm was told",
        _setdefault("LLMCL_PROCS_PER_NODE", "${SLURM_GPUS_ON_NODE:-%d}" % procs).replace(
            q("${SLURM_GPUS_ON_NODE:-%d}" % procs), '"${SLURM_GPUS_ON_NODE:-%d}"' % procs),
        _setdefault("LLMCL_ACCELERATE_CONFIG", config) if config else ": # no accelerate config: one process",
        _setdefault("LLMCL_PYTHON", python),
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
        f'if [[ $# -eq 0 || $1 == --* ]]; then set -- {" ".join(q(a) for a in args)} "$@"; fi',
        _setdefault("LLMCL_TRAIN_SBATCH", str(out_dir / "train.sbatch")),
        _setdefault("LLMCL_PYTHON", python),
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
