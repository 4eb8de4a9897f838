"""The run directory: its layout, the ledger, atomic writes, step checkpoints, stage artifacts and manifests.

    runs/<name>/
      recipe.yaml  ledger.json  metrics.jsonl  stopped.json  lock
      stage-00-<name>/   manifest.json, model/ | adapter/ | mora/, method_state.*, stage.json, optimizer.pt,
                         continue/ (infinite schedule: the pre-anneal branch)
      step-checkpoint/   the latest step checkpoint of the stage in progress
      cache/  eval/  report/

Every directory is written under a temporary name and renamed into place, and the ledger is replaced
atomically after the stage directory is complete: a kill at any moment leaves either the old state or the
new one, never a stage marked done with a broken checkpoint. The files of every stage directory and step
checkpoint are recorded (size, sha256) and checked before they are loaded (llmcl.rundir.integrity); one
process at a time works in a run directory (llmcl.rundir.lock). checkpoints.keep_stages deletes the weights of
older stages once they are scored (llmcl.rundir.retention). Training, evaluation and the CLI read and write
the run directory only through this package.
"""

from llmcl.rundir.atomic import load_tree, now, recover_dir, remove_dir, save_tree, write_dir, write_json
from llmcl.rundir.layout import CACHE, EVAL, LEDGER, MANIFEST, METRICS, RECIPE, REPORT, STEP_DIR, STOPPED, stage_dir_name
from llmcl.rundir.ledger import Ledger

__all__ = ["CACHE", "EVAL", "LEDGER", "MANIFEST", "METRICS", "RECIPE", "REPORT", "STEP_DIR", "STOPPED", "Ledger",
           "load_tree", "now", "recover_dir", "remove_dir", "save_tree", "stage_dir_name", "write_dir", "write_json"]
