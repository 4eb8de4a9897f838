"""The llmcl command line. Thin: each command parses its arguments and calls one plain function.

Errors a user can cause (LlmclError) print one line on stderr and exit with status 2; what the machine refused
(a full disk, a read-only file system, permissions) prints one line and exits with status 74. A run stopped by
SIGTERM/SIGUSR1 saves a checkpoint, prints one line and exits with status 75 (rerun to resume).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from llmcl.errors import LlmclError, environment_fault, path_fault, peer_lost
from llmcl.train.signals import INTERRUPTED_EXIT, RESUMABLE_EXIT, Stopped, defer_from_start, stop_deferring


class _Group(click.Group):
    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        """click's main, but a command-line mistake is one `error:` line like every other (click prints usage,
        a hint and the error on four)."""
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.ClickException as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # a bare `llmcl`: the help, as click shows it
                exc.show()
                sys.exit(exc.exit_code)
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if isinstance(exc, click.UsageError) and ctx else ""
            click.echo("error: " + " ".join(exc.format_message().split()) + hint, err=True)
            sys.exit(exc.exit_code)
        except click.Abort:  # Ctrl-C while click itself reads (a prompt): as in invoke below
            click.echo("error: interrupted (Ctrl-C)", err=True)
            sys.exit(INTERRUPTED_EXIT)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except Stopped as exc:
            click.echo("stopped: " + str(exc), err=True)
            ctx.exit(RESUMABLE_EXIT)
        except KeyboardInterrupt:  # Ctrl-C outside training, or a second one inside it (llmcl.train.signals)
            click.echo("error: interrupted (Ctrl-C); finished stages are kept, and the same command continues",
                       err=True)
            ctx.exit(INTERRUPTED_EXIT)
        except Exception as exc:  # noqa: BLE001  (what the user or the machine caused: one line; the rest: a traceback)
            error = exc if isinstance(exc, LlmclError) else environment_fault(exc) or path_fault(exc) or peer_lost(exc)
            if error is None:
                raise
            click.echo("error: " + " ".join(str(error).split()), err=True)
            ctx.exit(error.exit_code)


def _quiet_defaults() -> None:
    """Offline first (never reach the hub unless the user set HF_HUB_OFFLINE=0), and no library progress bars
    or banners competing with llmcl's own display."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", os.environ["HF_HUB_OFFLINE"])  # datasets reads its own first
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if _has_cuda() else "cpu")
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)


def _has_cuda() -> bool:
    return os.environ.get("CUDA_VISIBLE_DEVICES", "x") != "" and os.path.exists("/dev/nvidiactl")


def load_checked(recipe_arg: str, overrides: tuple[str, ...]):
    """Load a recipe (file or shipped name), apply overrides and run every pre-model check."""
    from llmcl import catalog, checks, recipe

    r = recipe.load(catalog.find(recipe_arg), overrides)
    for note in checks.check(r):
        click.echo(note, err=True)
    return r


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="llmcl")
def cli() -> None:
    """Continual fine-tuning of LLMs: train stage after stage, measure what was forgotten."""
    _quiet_defaults()


@cli.command()
@click.argument("recipe_file")
@click.argument("overrides", nargs=-1)
@click.option("--run-dir", type=click.Path(file_okay=False), help="Run directory (default: runs/<recipe name>).")
@click.option("--stage", type=int, default=None, help="Train only stage N (0-based); stage N-1 must be done.")
def train(recipe_file: str, overrides: tuple[str, ...], run_dir: str | None, stage: int | None) -> None:
    """Train every stage of RECIPE_FILE not yet done. OVERRIDES: dotted KEY=VALUE, e.g. train.lr=3e-5."""
    from llmcl.eval.hooks import EvalHooks
    from llmcl.train.loop import run
    from llmcl.train.progress import Display

    from llmcl import launch

    r = load_checked(recipe_file, overrides)
    if r.distributed.accelerate_config:
        if not launch.launched():  # the recipe names its launch: become `accelerate launch ... llmcl train ...`
            args = [recipe_file, *overrides] + (["--run-dir", run_dir] if run_dir else []) \
                + (["--stage", str(stage)] if stage is not None else [])
            sys.exit(launch.relaunch(r, args, _run_dir(r, run_dir)))
        if launch.LAUNCHED_ENV not in os.environ and os.environ.get("RANK", "0") == "0":
            click.echo(f"note: distributed.accelerate_config={r.distributed.accelerate_config} is ignored: a launcher "
                       "started llmcl, and its settings win", err=True)
    directory = _run_dir(r, run_dir)
    display = Display()
    hooks = EvalHooks(r, directory, display)
    hooks.check_metric_choice()  # against the rows already there, before the run dir takes the recipe's eval keys
    try:
        run(r, directory, only_stage=stage, display=display, hooks=hooks)
    finally:
        stop_deferring()


def _run_dir(r, run_dir: str | None) -> Path:
    return Path(run_dir) if run_dir else Path("runs") / r.name


@cli.command()
@click.argument("recipe_file")
@click.argument("overrides", nargs=-1)
@click.option("--run-dir", type=click.Path(file_okay=False), help="Run directory (default: runs/<recipe name>).")
def status(recipe_file: str, overrides: tuple[str, ...], run_dir: str | None) -> None:
    """Where a run stands, tab-separated for scripts: `run_dir<TAB>DIR`, then per stage
    `stage<TAB>INDEX<TAB>NAME<TAB>STATUS`, STATUS being what `llmcl train` would do with it: done (kept),
    running (begun: a train works on it now, or stopped in it and resumes it) or pending (to train)."""
    from llmcl.rundir import Ledger
    from llmcl.rundir.lock import check_run_dir_path

    r = load_checked(recipe_file, overrides)
    directory = _run_dir(r, run_dir)
    check_run_dir_path(directory)
    ledger = Ledger.open(directory, r, write=False)  # a run dir made by another recipe is refused, as by train
    click.echo(f"run_dir\t{directory}")
    for i, st in enumerate(r.stages):  # what `llmcl train` would do: a done stage whose directory is gone trains again
        status = "done" if ledger.is_done(i) else "running" if ledger.status(i) == "running" else "pending"
        click.echo(f"stage\t{i}\t{st.name}\t{status}")


@cli.command()
@click.argument("recipe_file")
@click.argument("overrides", nargs=-1)
@click.option("--nodes", type=int, default=1, show_default=True, help="Nodes per stage job.")
@click.option("--gpus-per-node", type=int, default=1, show_default=True,
              help="GPUs (= training processes) per node; 0 = one CPU process per node.")
@click.option("--partition", default=None, help="sbatch --partition.")
@click.option("--time", "time_limit", default=None, help="sbatch --time, e.g. 24:00:00.")
@click.option("--account", default=None, help="sbatch --account.")
@click.option("--cpus-per-task", type=int, default=None,
              help="sbatch --cpus-per-task: a node's CPUs for its training processes (default: SLURM's).")
@click.option("--mem", default=None, help="sbatch --mem per node, e.g. 512G; 0 = the whole node's (default: SLURM's).")
@click.option("--run-dir", type=click.Path(file_okay=False), help="Run directory (default: runs/<recipe name>).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Where to write train.sbatch and chain.sh (default: <run dir>/slurm).")
@click.option("--print", "print_only", is_flag=True, help="Print train.sbatch instead of writing files.")
def slurm(recipe_file: str, overrides: tuple[str, ...], nodes: int, gpus_per_node: int, partition: str | None,
          time_limit: str | None, account: str | None, cpus_per_task: int | None, mem: str | None,
          run_dir: str | None, out: str | None, print_only: bool) -> None:
    """Write the SLURM scripts for RECIPE_FILE: train.sbatch (all stages, or --stage K) and chain.sh (a job per stage)."""
    from llmcl import catalog
    from llmcl import slurm as slurm_mod

    r = load_checked(recipe_file, overrides)
    directory = _run_dir(r, run_dir)
    cluster = slurm_mod.Cluster(nodes, gpus_per_node, partition, time_limit, account, cpus_per_task, mem)
    target = Path(out) if out else directory / "slurm"
    files = slurm_mod.render(catalog.find(recipe_file), list(overrides), directory, r.name, cluster,
                             r.distributed.accelerate_config, out_dir=target)
    if cluster.note():
        click.echo(cluster.note(), err=True)
    if print_only:
        click.echo(files["train.sbatch"], nl=False)
        return
    for path in slurm_mod.write(files, target):
        click.echo(f"wrote {path}")
    click.echo(f"all stages in one job:  sbatch {target / 'train.sbatch'}")
    click.echo(f"one job per stage:      bash {target / 'chain.sh'}")


@cli.command("eval")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--stage", "row", default=None, help="A stage index, or 'base' (default: base and every finished stage).")
@click.option("--tasks", default=None, help="Comma-separated stage names or lm-eval tasks to (re)score (default: all).")
@click.option("--missing", is_flag=True, help="Only rows that have no results yet (e.g. after a chain of stage jobs).")
def eval_command(run_dir: str, row: str | None, tasks: str | None, missing: bool) -> None:
    """(Re)score checkpoints of RUN_DIR with lm-eval, without training (data-parallel under `accelerate launch`)."""
    from rich.console import Console

    from llmcl.eval import render, report as report_mod
    from llmcl.eval.scoring import BASE, load_run_recipe, prepare_stage_tasks, row_tasks, score_row
    from llmcl.models import load_tokenizer
    from llmcl.rundir import Ledger
    from llmcl.rundir.lock import locked

    directory = Path(run_dir)
    recipe = load_run_recipe(directory)
    ledger = Ledger.read(directory, recipe)
    done = ledger.done_stages()
    gone = [i for i in done if ledger.deleted(i)] if row is None else []
    if row is None:
        rows: list = [BASE, *(i for i in done if i not in gone)]
    elif row == BASE:
        rows = [BASE]
    elif row.isdigit() and int(row) in done:
        ledger.check_loadable(int(row))
        rows = [int(row)]
    else:
        raise LlmclError(f"--stage {row!r}: expected 'base' or a finished stage of {run_dir} ({done or 'none yet'})")
    if missing:  # rows without a row file, or with one that cannot be read
        from llmcl.eval.scoring import row_scored

        rows = [r for r in rows if not row_scored(directory, r)]
    only = [t.strip() for t in tasks.split(",") if t.strip()] if tasks is not None else None
    if only == []:
        raise LlmclError(f"--tasks {tasks!r}: expected task names separated by commas (leave --tasks out to score "
                         "every task)")
    accelerator = _eval_accelerator(recipe, directory)
    main = accelerator is None or accelerator.is_main_process
    console = Console(soft_wrap=True, quiet=not main)
    if gone:
        console.print(f"note: stage{'s' * (len(gone) > 1)} {', '.join(map(str, gone))} left out: the weights were "
                      "deleted (checkpoints.keep_stages); their rows, where they have one, stay", highlight=False)
    tokenizer = load_tokenizer(recipe.model)
    with locked(directory, accelerator):  # not while a `llmcl train` or another `llmcl eval` works there
        stage_tasks = prepare_stage_tasks(directory, recipe, tokenizer, accelerator) if rows else []
        for note in (t.note for t in stage_tasks if t.note):
            console.print(note, highlight=False, markup=False)
        if not only and row is None:  # every row: those with nothing to score are not rows (eval.tasks_every_stage)
            rows = [r for r in rows if row_tasks(recipe, r, stage_tasks)] or rows[:1]
        for r in rows:
            console.print(f"evaluating {'the base model' if r == BASE else f'stage {r}'} ...", highlight=False)
            score_row(directory, r, recipe=recipe, tokenizer=tokenizer, only=only, accelerator=accelerator,
                      stage_tasks=stage_tasks)
    if main:
        for table in render.tables(report_mod.collect(directory)):
            console.print(table)


def _eval_accelerator(recipe, directory: Path):
    """Under a launcher with several processes (DDP), the accelerator that shares the requests among them; a
    DeepSpeed launch evaluates on rank 0 alone (the other ranks leave at once)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        if os.environ.get("RANK", "0") != "0":
            sys.exit(0)
        return None
    from llmcl.train.distributed import make_accelerator

    return make_accelerator(recipe, directory)


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the comparison table (one row per run) to this markdown file.")
def report(run_dirs: tuple[str, ...], markdown_path: str | None) -> None:
    """Accuracy matrix, AA/BWT/FWT/forgetting and plots of RUN_DIRS (several: a comparison table)."""
    from rich.console import Console

    from llmcl.eval import render

    console = Console(soft_wrap=True)
    reports = render.run_report([Path(d) for d in run_dirs])
    for rep in reports:
        for table in render.tables(rep):
            console.print(table)
        console.print(f"[dim]written: {rep.run_dir / 'report'}/(matrix.json, report.md, matrix.png, loss.png)[/dim]")
    if len(reports) > 1 or markdown_path:
        table, md = render.compare(reports)
        if len(reports) > 1:
            console.print(table)
        if markdown_path:
            Path(markdown_path).write_text(md)


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--stage", default="last", show_default=True, help="A finished stage index, or 'last'.")
@click.option("--to", "to", required=True, type=click.Path(file_okay=False), help="A new directory to write.")
@click.option("--merge/--no-merge", default=True, show_default=True,
              help="Merge a LoRA/I-LoRA adapter into the weights, or write the PEFT adapter itself.")
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True,
              help="Weights' dtype; auto = the dtype the stage was evaluated in.")
@click.option("--push-to-hub", "repo", default=None, help="Also upload the directory to this hub repo (user/name).")
def export(run_dir: str, stage: str, to: str, merge: bool, dtype: str, repo: str | None) -> None:
    """Write a finished stage of RUN_DIR as a model directory that plain transformers loads, with a model card."""
    from llmcl.export import export_stage

    out = export_stage(Path(run_dir), Path(to), stage=stage, merge=merge, dtype=dtype, push_to_hub=repo,
                       echo=lambda line: click.echo(line, err=True))
    click.echo(f"exported stage {out.stage} ({out.stage_name}) as a {out.written_as} in {out.dtype}: {out.directory}"
               + (f" (pushed to {out.pushed_to})" if out.pushed_to else ""))


@cli.command()
@click.argument("recipe_file")
@click.argument("overrides", nargs=-1)
def validate(recipe_file: str, overrides: tuple[str, ...]) -> None:
    """Parse and check RECIPE_FILE (and OVERRIDES) without loading a model."""
    r = load_checked(recipe_file, overrides)
    names = ", ".join(s.name for s in r.stages)
    click.echo(f"ok: {r.name}: {len(r.stages)} stages ({names}), method {r.method.name}, model {r.model.path}")


@cli.command()
@click.option("--cpu", is_flag=True, help="Run the checks on the CPU with builtin:tiny (tests the self-check itself).")
@click.option("--only", default=None, help="Comma-separated checks: methods, zero2, zero3, eval, throughput (default: all).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write the results as JSON.")
def doctor(cpu: bool, only: str | None, json_path: str | None) -> None:
    """GPU self-check of a new node: every method in bf16, ZeRO-2/3, one evaluated row, tokens/s against a bare loop
    and the HF Trainer; one table. Without CUDA it says so and exits 0."""
    from llmcl import doctor as doctor_mod

    checks = tuple(c.strip() for c in only.split(",")) if only else doctor_mod.CHECKS
    unknown = [c for c in checks if c not in doctor_mod.CHECKS]
    if unknown:
        raise LlmclError(f"--only {unknown[0]!r}: expected some of {', '.join(doctor_mod.CHECKS)}")
    status = doctor_mod.main(cpu=cpu, only=checks, json_path=Path(json_path) if json_path else None, echo=click.echo)
    if status:
        sys.exit(status)


@cli.command("recipes")
def list_recipes() -> None:
    """List the shipped recipes with their purpose."""
    from rich.console import Console
    from rich.table import Table

    from llmcl import catalog

    table = Table("recipe", "purpose", box=None, pad_edge=False)
    for path in catalog.shipped():
        try:
            shown = str(path.relative_to(Path.cwd()))
        except ValueError:
            shown = str(path)
        table.add_row(shown, catalog.purpose(path))
    Console(width=max(100, Console().width)).print(table)


def main() -> None:
    if sys.argv[1:2] == ["train"]:  # from the first moment: a SIGTERM during start-up stops cleanly (exit 75)
        defer_from_start()
    cli(prog_name="llmcl")


if __name__ == "__main__":
    main()
    sys.exit(0)
