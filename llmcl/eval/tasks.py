"""Stage test splits as lm-eval tasks, llmcl's local general-ability tasks, and task-name checks.

Every stage with test data becomes an lm-eval task YAML (plus its rendered JSON-lines data, named by its content:
<stage>-<sha256[:12]>.jsonl) under run_dir/eval/tasks/:
  prompt/completion or chat data  -> generate_until, exact match (surrounding whitespace ignored)
  ... with data.choices           -> multiple_choice, loglikelihood over the choices (acc)
  text data                       -> loglikelihood_rolling perplexity (bits_per_byte, word/byte perplexity)
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llmcl.data.formatting import CHAT_FORMATS, chat_render, chat_template_key, conversation, detect_format, render
from llmcl.data.sources import load_records
from llmcl.errors import LlmclError, RecipeError, did_you_mean
from llmcl.rundir import EVAL
from llmcl.rundir.atomic import write_text

LOCAL_TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
STAGE_PREFIX = "llmcl_stage_"


@dataclass
class StageTask:
    stage: int
    stage_name: str
    task: str
    kind: str  # generate | choice | perplexity
    n: int
    note: str | None = None
    """A one-line note for the user about this task's scores (answers longer than eval.max_new_tokens)."""
    zero_shot: bool = False
    """Scored without few-shot examples whatever eval.num_fewshot says (a chat stage: see write_stage_tasks)."""
    rendered: bool = False
    """Its prompts went through the tokenizer's chat template (chat data, or data.chat_template): they are scored
    without the tokenizer's special tokens, as they were trained."""
    items: str | None = None
    """The content hash of its rendered test items (their file's name): rows scored on other items (the stage's
    test data edited between them) differ in it."""

    @property
    def view(self) -> str:
        """How the report files it: 'stage' (the accuracy matrix: generated answers, or perplexity) or
        'stage_choice' (the same items scored by loglikelihood over the stage's label set)."""
        return "stage_choice" if self.kind == "choice" else "stage"


AFTER_THE_FIRST_LINE = "\\n[\\s\\S]*"  # once leading whitespace is gone: what follows the answer's line


def _lead(completion: str) -> str:
    """The whitespace an answer begins with (" " of " positive", "\n" of "\nnegative")."""
    return completion[:len(completion) - len(completion.lstrip())]


def stage_task_name(stage_name: str) -> str:
    return STAGE_PREFIX + stage_name.replace("-", "_").replace(".", "_")


def choice_task_name(stage_name: str) -> str:
    """The label-set view of a stage with data.choices (no stage task name has a '-': no clash)."""
    return stage_task_name(stage_name) + "-choice"


def local_task_names() -> list[str]:
    return sorted(p.stem for p in LOCAL_TASKS_DIR.glob("*.yaml"))


def _chat_prompt(tokenizer: Any, messages: list[dict[str, str]], key: str) -> str:
    return chat_render(tokenizer, messages, key, add_generation_prompt=True)


def render_test_records(stage: Any, index: int, records: list[dict[str, Any]], tokenizer: Any) -> tuple[str, list[dict]]:
    """(kind, rows) with rows ready for the task YAML: prompt/completion (kind 'generate'; with data.choices
    also the label set and the gold index, for the 'choice' view of the same rows) or text ('perplexity')."""
    cfg = stage.data
    key = f"stages.{index}.data"
    fmt = detect_format(cfg, records[0], key)
    if fmt == "text":
        return "perplexity", [{"text": r[cfg.text_field]} for r in records]
    template_key = chat_template_key(cfg, fmt, key) or key
    rows = []
    for r in records:
        if fmt in CHAT_FORMATS:
            msgs = conversation(cfg, r, fmt)
            last = max((k for k, m in enumerate(msgs) if m.get("role") == "assistant"), default=None)
            if last is None:
                raise LlmclError(f"recipe key '{key}': a test conversation has no assistant turn to score")
            prompt, completion = _chat_prompt(tokenizer, msgs[:last], template_key), msgs[last]["content"]
        else:
            prompt, completion = render(cfg, r)
            if cfg.chat_template:
                prompt = _chat_prompt(tokenizer, [{"role": "user", "content": prompt}], template_key)
                completion = completion.strip()
        rows.append({"prompt": prompt, "completion": completion})
    if cfg.choices is None:
        return "generate", rows
    choices = [c.strip() for c in cfg.choices]
    if cfg.drop_unknown_answers:
        rows = [row for row in rows if row["completion"].strip() in choices]
        if not rows:
            raise LlmclError(f"recipe key '{key}.choices': no test answer is one of {choices}")
    for row in rows:
        gold = row["completion"].strip()
        if gold not in choices:
            raise LlmclError(f"recipe key '{key}.choices': test completion {gold!r} is not one of the choices {choices} "
                             f"(set {key}.drop_unknown_answers: true to leave such items out)")
        row["choices"] = [_lead(row["completion"]) + c for c in choices]
        row["gold"] = choices.index(gold)
    return "generate", rows


def _yaml_for(task: str, kind: str, data_file: Path, rows: list[dict], tokenizer: Any, max_new_tokens: int,
              few_shot: bool) -> dict:
    """The lm-eval task config. Its doc_to_* name the data file's fields: lm-eval returns a named field as it is,
    where a template ("{{completion}}") is rendered and then read as a Python literal when it looks like one (a
    completion "[1, 2]" became a list of answers, a prompt "42" of a choice task the number 42)."""
    base = {
        "task": task,
        "tag": ["llmcl_stages"],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "metadata": {"version": 1.0},
    }
    if not few_shot:  # else lm-eval reads the whole test split into its few-shot sampler when it builds the task, for
        base["fewshot_config"] = {"sampler": "first_n", "samples": []}  # every row (seconds; no shot is drawn)
    if kind == "perplexity":
        return {**base, "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "text",
                "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"},
                                {"metric": "bits_per_byte"}]}
    if kind == "choice":
        return {**base, "output_type": "multiple_choice", "doc_to_text": "prompt", "doc_to_choice": "choices",
                "doc_to_target": "gold", "target_delimiter": "",
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    completions = sorted({r["completion"] for r in rows})  # a classification stage has a handful: one batched call
    longest = max(map(len, tokenizer(completions, add_special_tokens=False)["input_ids"]))
    multiline = any("\n" in r["completion"].strip() for r in rows)
    # a one-line answer ends at its line's end: a stop at "\n", or, where answers begin on a new line ("Response:",
    # "\n{label}": a stop would cut them to nothing), no stop and everything after the answer's line ignored
    new_line_first = not multiline and any("\n" in _lead(r["completion"]) for r in rows if r["completion"].strip())
    return {**base, "output_type": "generate_until", "doc_to_text": "prompt", "doc_to_target": "completion",
            "target_delimiter": "",
            "generation_kwargs": {"until": [] if multiline or new_line_first else ["\n"], "do_sample": False,
                                  "max_gen_toks": min(max_new_tokens, longest + 4)},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                             "regexes_to_ignore": ["^\\s+", *[AFTER_THE_FIRST_LINE] * new_line_first, "\\s+$"]}]}


def write_stage_tasks(recipe: Any, run_dir: Path, tokenizer: Any, *, write: bool = True) -> list[StageTask]:
    """Write one lm-eval task per stage with test data into run_dir/eval/tasks; return what was written
    (`write=False`: only what would be, for the other ranks of a data-parallel evaluation)."""
    out_dir = run_dir / EVAL / "tasks"
    if write:
        out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, stage in enumerate(recipe.stages):
        records = load_records(stage.data, "test", recipe.seed)
        if not records:
            continue
        kind, rows = render_test_records(stage, i, records, tokenizer)
        # a prompt rendered by the chat template: lm-eval would join few-shot examples as text around it (each
        # shot's answer without its end of turn, the system prompt repeated), a format training never showed
        fmt = detect_format(stage.data, records[0], f"stages.{i}.data")
        rendered = fmt in CHAT_FORMATS or fmt != "text" and bool(stage.data.chat_template)
        zero_shot = bool(recipe.eval.num_fewshot) and rendered
        cap = recipe.eval.max_prompt_tokens
        if cap is not None and kind != "perplexity":
            lengths = map(len, tokenizer([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"])
            rows = [r for r, n in zip(rows, lengths) if n <= cap]
            if not rows:
                raise LlmclError(f"recipe key 'eval.max_prompt_tokens': no test prompt of stage {stage.name!r} is "
                                 f"within {cap} tokens")
        # a seeded shuffle: eval.limit (lm-eval takes the first N) then scores a random subset, not the head
        random.Random(f"llmcl-eval-order:{recipe.seed}:{i}").shuffle(rows)
        data_file = _write_test_data(out_dir, stage.name, rows, write)
        # a classification stage is scored both ways: its generated label (exact match) and loglikelihood over
        # its label set, so "forgot the task" and "answers in another task's labels" can be told apart
        views = [(kind, stage_task_name(stage.name), out_dir / f"{stage.name}.yaml")]
        if "choices" in rows[0]:
            views.append(("choice", choice_task_name(stage.name), out_dir / "choice" / f"{stage.name}.yaml"))
        for view, task, yaml_file in views:
            if write:
                config = _yaml_for(task, view, data_file, rows, tokenizer, recipe.eval.max_new_tokens,
                                   few_shot=bool(recipe.eval.num_fewshot) and not zero_shot)
                if zero_shot:  # lm-eval keeps a task's own num_fewshot of 0 over simple_evaluate's
                    config["num_fewshot"] = 0
                yaml_file.parent.mkdir(exist_ok=True)
                write_text(yaml_file, yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
            notes = [_cut_answers_note(stage.name, rows, tokenizer, recipe.eval.max_new_tokens)
                     if view == "generate" else None,
                     f"note: stage {stage.name!r} is scored zero-shot (eval.num_fewshot={recipe.eval.num_fewshot} is "
                     "for the other tasks): its prompts go through the chat template, outside which lm-eval would "
                     "join the examples" if zero_shot and view == views[0][0] else None]
            written.append(StageTask(i, stage.name, task, view, len(rows), "\n".join(n for n in notes if n) or None,
                                     zero_shot, rendered, data_file.stem.rsplit("-", 1)[1]))
    return written


def _write_test_data(out_dir: Path, stage_name: str, rows: list[dict], write: bool) -> Path:
    """The stage's rendered test items as JSON lines, in a file named by their content (`write=False`: only its
    path). `datasets` caches a data file by path and modification time: items rewritten under one name (another
    eval.max_prompt_tokens, seed or tokenizer) within one tick of a coarse file-system clock were read as the
    old ones, and each rewrite added a cache entry. A file with the same items is left as it is; the stage's
    files of other items are removed."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    data_file = out_dir / f"{stage_name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}.jsonl"
    if not write:
        return data_file
    if not (data_file.is_file() and data_file.read_text(encoding="utf-8") == text):
        write_text(data_file, text)
    stale = re.compile(re.escape(stage_name) + r"(-[0-9a-f]{12})?\.jsonl")  # (and the unhashed name of before)
    for path in out_dir.glob("*.jsonl"):
        if path != data_file and stale.fullmatch(path.name):
            path.unlink(missing_ok=True)
    return data_file


def _cut_answers_note(stage_name: str, rows: list[dict], tokenizer: Any, max_new_tokens: int) -> str | None:
    """A note when test answers are longer than the tokens generated for them: those items score 0 whatever
    the model knows (exact match against a cut answer)."""
    completions = [r["completion"] for r in rows]
    unique = sorted(set(completions))
    length = dict(zip(unique, map(len, tokenizer(unique, add_special_tokens=False)["input_ids"])))
    cut = sum(length[c] > max_new_tokens for c in completions)
    if not cut:
        return None
    longest = max(length.values())
    return (f"note: stage {stage_name!r}: {cut} of {len(rows)} test answers are longer than eval.max_new_tokens="
            f"{max_new_tokens} tokens (the longest {longest}): they cannot be matched exactly; set "
            f"eval.max_new_tokens to at least {longest}")


def data_dir(recipe: Any) -> str | None:
    """The local general-ability data: eval.data_dir when the recipe sets it (nothing else then), else
    $LLMCL_EVAL_DATA, ../shared/data/eval next to the working directory or next to this checkout."""
    import os

    if recipe.eval.data_dir:
        candidates: tuple = (recipe.eval.data_dir,)
    else:
        candidates = (os.environ.get("LLMCL_EVAL_DATA"), "../shared/data/eval",
                      Path(__file__).resolve().parents[3] / "shared" / "data" / "eval")
    for candidate in candidates:
        if candidate and Path(candidate).expanduser().is_dir():
            return str(Path(candidate).expanduser().resolve())
    return None


def include_paths(recipe: Any, run_dir: Path | None = None) -> list[str]:
    paths = [str(LOCAL_TASKS_DIR)] + [str(Path(p).expanduser().resolve()) for p in recipe.eval.include_path]
    if run_dir is not None and (run_dir / EVAL / "tasks").is_dir():
        paths.insert(0, str(run_dir / EVAL / "tasks"))
    return paths


def needs_harness_index(names: list[str]) -> bool:
    """True when a name is not one of llmcl's own tasks (so lm-eval's full task index is needed)."""
    return any(not (n.startswith(STAGE_PREFIX) or n in local_task_names()) for n in names)


def check_task_names(recipe: Any) -> None:
    """Unknown eval.tasks are a recipe error, with near matches from lm-eval's index and the include paths."""
    names = list(recipe.eval.tasks)
    if not names:
        return
    local = set(local_task_names())
    directory = data_dir(recipe)
    if local & set(names) and directory is None:
        raise RecipeError("eval.data_dir", message="recipe key 'eval.data_dir': the llmcl_* tasks need their local "
                          "data (a directory like ../shared/data/eval); set eval.data_dir or LLMCL_EVAL_DATA")
    for name in sorted(local & set(names)):
        file = yaml.load((LOCAL_TASKS_DIR / f"{name}.yaml").read_text(), Loader=_LenientLoader)["dataset_kwargs"]["file"]
        if not (Path(directory) / file).is_file():
            raise RecipeError("eval.data_dir", message=f"recipe key 'eval.data_dir': {directory} has no {file} (the "
                              f"data of {name}); point eval.data_dir or LLMCL_EVAL_DATA at a directory like "
                              "../shared/data/eval")
    known = known_tasks(recipe, names)
    for i, name in enumerate(names):
        if name not in known:
            broken = _unreadable_task_files(recipe.eval.include_path)
            raise RecipeError(f"eval.tasks.{i}", message=f"recipe key 'eval.tasks.{i}': unknown lm-eval task {name!r}"
                              + did_you_mean(name, known)
                              + (f"; eval.include_path has task YAMLs that do not parse: {broken}" if broken else ""))


def _unreadable_task_files(paths: list[str]) -> str:
    """The task YAMLs under `paths` that do not parse (the first three, with the parser's reason), or ''."""
    bad = []
    for p in paths:
        for f in sorted(Path(p).expanduser().rglob("*.yaml")):
            try:
                yaml.load(f.read_text(), Loader=_LenientLoader)
            except (yaml.YAMLError, UnicodeDecodeError, OSError) as exc:
                bad.append(f"{f} ({' '.join(str(exc).split())[:120]})")
    return ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")


def known_tasks(recipe: Any, names: list[str], run_dir: Path | None = None) -> set[str]:
    """The task names the harness can find: llmcl's own, those under eval.include_path (and the run's stage
    tasks), and, when one of `names` is none of those, lm-eval's whole index."""
    known = set(local_task_names())
    for p in [*recipe.eval.include_path] + ([run_dir / EVAL / "tasks"] if run_dir is not None else []):
        for f in Path(p).expanduser().rglob("*.yaml"):
            try:
                doc = yaml.load(f.read_text(), Loader=_LenientLoader)
            except (yaml.YAMLError, UnicodeDecodeError, OSError):
                continue
            if isinstance(doc, dict) and isinstance(doc.get("task"), str):
                known.add(doc["task"])
    if all(n in known for n in names):
        return known
    from lm_eval.tasks import TaskManager

    on_paths = TaskManager(include_path=include_paths(recipe), include_defaults=False).all_tasks  # groups, tags too
    return known | set(on_paths) | _harness_defaults()


@functools.cache
def _harness_defaults() -> frozenset[str]:
    """Every task, group and tag lm-eval ships: indexing them reads its ~10k YAMLs (10-15 s), so once a process."""
    from lm_eval.tasks import TaskManager

    return frozenset(TaskManager().all_tasks)


class _LenientLoader(yaml.SafeLoader):
    """Reads lm-eval YAMLs that use `!function` tags (kept as strings)."""


_LenientLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
