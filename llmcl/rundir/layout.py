"""The names of the files and directories at the top of a run directory and of a stage directory (what is
inside eval/ and report/ is named by llmcl.eval)."""

from __future__ import annotations

RECIPE = "recipe.yaml"  # the resolved recipe, written first
LEDGER = "ledger.json"  # stage -> status, checkpoint dir, steps, tokens, wall seconds, parameter counts
METRICS = "metrics.jsonl"  # one JSON object per logged step
STEP_DIR = "step-checkpoint"  # the latest step checkpoint of the stage in progress (gone once it is done)
CACHE = "cache"  # memory-mapped token files of the text corpora
LOCK = "lock"  # held by the one `llmcl train` / `llmcl eval` working in the run dir (llmcl.rundir.lock)
STOPPED = "stopped.json"  # written when SIGTERM/SIGUSR1 stopped the run (a batch script tests for it)
EVAL = "eval"  # base.json, stage-NN.json, tasks/
REPORT = "report"  # matrix.json, report.md, plots

# inside a stage directory
MANIFEST = "manifest.json"  # how to load the stage's model (see llmcl.rundir.artifacts)
STAGE_INFO = "stage.json"  # data stats, train settings, schedule, replay sources
METHOD_STATE = "method_state"  # method_state.json (+ .safetensors): the method's state after the stage
OPTIMIZER = "optimizer.pt"  # AdamW moments by parameter name, when the next stage keeps them
CONTINUE = "continue"  # infinite schedule: the pre-anneal weights the next stage continues from


def stage_dir_name(index: int, name: str) -> str:
    return f"stage-{index:02d}-{name}"


def branch_dir_name(index: int, name: str) -> str:
    """Where the pre-anneal branch waits until its stage directory is written (then it moves to CONTINUE)."""
    return f"{stage_dir_name(index, name)}.{CONTINUE}"
