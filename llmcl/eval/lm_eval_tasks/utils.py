"""Loader for llmcl's local general-ability tasks: JSON-lines files (the llm-foundry local_data formats)
under a data directory that llmcl passes in the task metadata (eval.data_dir)."""

import json
import os
from pathlib import Path


def _data_dir(metadata_dir):
    # llmcl passes the resolved directory in the task metadata; plain lm-eval users set LLMCL_EVAL_DATA
    for candidate in (metadata_dir, os.environ.get("LLMCL_EVAL_DATA"), "../shared/data/eval"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    raise FileNotFoundError(
        "llmcl local eval data not found: set eval.data_dir in the recipe or LLMCL_EVAL_DATA "
        "(a directory like ../shared/data/eval holding arc_easy/arc_easy.jsonl, ...)")


def load(file=None, llmcl_eval_data=None, **_):
    import datasets

    path = _data_dir(llmcl_eval_data) / file
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {"test": datasets.Dataset.from_list(rows)}


# schema format (winogrande, winograd_wsc): several contexts, one continuation
def schema_gold(doc):
    return doc["gold"]


def schema_contexts(doc):
    return doc["context_options"]


def schema_continuation(doc):
    return " " + doc["continuation"]


def load_wikitext(file=None, llmcl_eval_data=None, **_):
    """WikiText-2 (tokenised, v1) as one document per article (split at top-level ' = Title = ' lines)."""
    import re

    import datasets

    lines = (_data_dir(llmcl_eval_data) / file).read_text().splitlines(keepends=True)
    docs, current = [], []
    for line in lines:
        if re.match(r"^ = [^=].* = \s*$", line) and current:
            docs.append("".join(current))
            current = []
        current.append(line)
    if current:
        docs.append("".join(current))
    return {"test": datasets.Dataset.from_list([{"page": d} for d in docs if d.strip()])}
