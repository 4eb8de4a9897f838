#!/bin/bash
# llmcl on SLURM, one job per stage: submits train.sbatch --stage K for every stage not yet done in the run's
# ledger, each depending on the previous one (--dependency=afterok), then an eval/report job after the last.
#
#   scripts/slurm/chain.sh RECIPE [--run-dir DIR] [KEY=VALUE ...]
#
# Settings (environment):
#   LLMCL_SBATCH_ARGS   extra sbatch options for the stage jobs, e.g. "--nodes 2 --gpus-per-node 8 --time 4:00:00"
#   LLMCL_EVAL_ARGS     sbatch options for the eval/report job [one task, the partition's defaults]
#   LLMCL_TRAIN_SBATCH  the stage job script [train.sbatch next to this script; `llmcl slurm` writes its own]
#   LLMCL_PYTHON        the python that has llmcl [.venv/bin/python, else python3]
# Prints one line per submitted job: "<job id> stage <K> <name>" and "<job id> eval+report".
set -euo pipefail

# @llmcl-defaults (llmcl slurm writes its settings here)

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TRAIN_SBATCH=${LLMCL_TRAIN_SBATCH:-$HERE/train.sbatch}
if [[ -z "${LLMCL_PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then LLMCL_PYTHON=.venv/bin/python; else LLMCL_PYTHON=python3; fi
fi
PY=$LLMCL_PYTHON

RECIPE=${1:?usage: chain.sh RECIPE [--run-dir DIR] [KEY=VALUE ...]}
shift
ARGS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --run-dir) ARGS+=(--run-dir "$2"); shift 2 ;;
        --stage) echo "chain.sh: it submits every stage; use train.sbatch --stage K for one" >&2; exit 2 ;;
        *) ARGS+=("$1"); shift ;;
    esac
done

STATUS=$("$PY" -m llmcl status "$RECIPE" "${ARGS[@]}")  # exits 2 with a message on a bad recipe
RUN_DIR=$(awk -F'\t' '$1 == "run_dir" {print $2}' <<< "$STATUS")

read -r -a SBATCH_ARGS <<< "${LLMCL_SBATCH_ARGS:-}"
read -r -a EVAL_ARGS <<< "${LLMCL_EVAL_ARGS:-}"
PREV=""
while IFS=$'\t' read -r kind index name state; do
    [[ "$kind" == stage ]] || continue
    if [[ "$state" == "done" ]]; then
        echo "stage $index $name: already done in $RUN_DIR, not resubmitted" >&2
        continue
    fi
    DEP=()
    [[ -n "$PREV" ]] && DEP=(--dependency="afterok:$PREV")
    PREV=$(sbatch --parsable --job-name="llmcl-$index-$name" "${SBATCH_ARGS[@]}" "${DEP[@]}" \
        "$TRAIN_SBATCH" "$RECIPE" --stage "$index" "${ARGS[@]}")
    PREV=${PREV%%;*}
    echo "$PREV stage $index $name"
done <<< "$STATUS"

DEP=()
[[ -n "$PREV" ]] && DEP=(--dependency="afterok:$PREV")
# the eval job: rows that the stage jobs did not score (eval.after_each_stage: false), then the report
EVAL_JOB=$(sbatch --parsable --output="slurm-%x-%j.out" --job-name=llmcl-report --ntasks=1 "${EVAL_ARGS[@]}" "${DEP[@]}" \
    --wrap "$(printf '%q ' "$PY" -m llmcl eval "$RUN_DIR" --missing) && $(printf '%q ' "$PY" -m llmcl report "$RUN_DIR")")
echo "${EVAL_JOB%%;*} eval+report"
