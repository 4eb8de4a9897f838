"""Records -> token examples: prompt/completion (loss on the completion), chat conversations (loss on the
assistant turns), and text (packed into fixed-length blocks for continual pre-training).

Conversations come in the three shapes fine-tuning datasets use, all rendered through the tokenizer's chat template:
  messages   OpenAI's {"messages": [{"role", "content"}, ...]} (the field: data.messages_field)
  sharegpt   {"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...], "system"?: ...}
  alpaca     {"instruction", "input"?, "output", "system"?, "history"?: [[query, answer], ...]}: the user turn is
             the instruction and the input joined by a newline, as LLaMA-Factory renders it
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from typing import Any

from llmcl.errors import LlmclError

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


@dataclass
class EncodeStats:
    examples: int = 0
    truncated: int = 0  # kept examples cut to seq_len
    dropped: int = 0  # records left out: no trained token within their first seq_len tokens
    label_tokens: int = 0
    tokens: int = 0
    format: str = ""
    notes: list[str] = field(default_factory=list)


def template_fields(template: str, key: str = "data.prompt_template") -> set[str]:
    """The record fields a prompt/completion template names (`{sentence[0]}` names 'sentence'); raises naming
    `key` for a template str.format cannot apply to a record: an unmatched brace, a positional field ({} or
    {0}), a conversion other than !s, !r or !a."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise LlmclError(f"recipe key '{key}': {template!r} is not a format template ({exc}); expected fields as "
                         "{name} and literal braces doubled as {{ and }}") from None
    names: set[str] = set()
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        base = re.match(r"[^.\[]*", name).group()
        if not base or base.isdigit():
            raise LlmclError(f"recipe key '{key}': {template!r} has the positional field {{{name}}}; expected "
                             "record fields by name, e.g. {prompt}")
        if conversion not in (None, "s", "r", "a"):
            raise LlmclError(f"recipe key '{key}': {template!r} has the conversion !{conversion} in {{{name}}}; "
                             "expected !s, !r or !a")
        names |= {base} | (template_fields(spec, key) if spec else set())
    return names


DEFAULT_TEMPLATES = ("{prompt}", "{completion}")
CHAT_FORMATS = ("messages", "sharegpt", "alpaca")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def detect_format(cfg: Any, record: dict[str, Any], key: str = "data") -> str:
    """The stage's format: cfg.format, or for 'auto': prompt_completion when templates were set, else the
    first format the record's fields support (messages, sharegpt, alpaca, prompt/completion, text)."""
    if cfg.format != "auto":
        return cfg.format
    if (cfg.prompt_template, cfg.completion_template) != DEFAULT_TEMPLATES:
        return "prompt_completion"
    if cfg.messages_field in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if {"instruction", "output"} <= set(record):
        return "alpaca"
    if (template_fields(cfg.prompt_template, f"{key}.prompt_template")
            | template_fields(cfg.completion_template, f"{key}.completion_template")) <= set(record):
        return "prompt_completion"
    if cfg.text_field in record:
        return "text"
    raise LlmclError(
        f"recipe key '{key}.format': cannot tell the data format from the record fields {fields(record)}; set "
        f"{key}.format, or {key}.text_field / messages_field / prompt_template + completion_template to your fields")


def check_record(cfg: Any, record: dict[str, Any], key: str, fmt: str | None = None, where: str = "") -> str:
    """Validate that a record fits the stage's format (`fmt`, default: detected from this record): the fields
    exist and hold what the format needs. Returns the format; raises naming the recipe key (and `where`, e.g.
    'record 7 of data.jsonl: ')."""
    if not isinstance(record, dict):
        raise LlmclError(f"recipe key '{key}.path': {where}records must be objects with named fields, got "
                         f"{type(record).__name__}")
    fmt = fmt or detect_format(cfg, record, key)
    if fmt == "prompt_completion":
        for attr in ("prompt_template", "completion_template"):
            names = template_fields(getattr(cfg, attr), f"{key}.{attr}")
            missing = names - set(record)
            if missing:
                raise LlmclError(f"recipe key '{key}.{attr}': {where}field(s) {sorted(missing)} not in the record "
                                 f"(fields: {fields(record)})")
            for name in sorted(names):
                if not isinstance(record[name], (str, int, float)) or isinstance(record[name], bool):
                    raise LlmclError(f"recipe key '{key}.{attr}': {where}field {name!r} holds "
                                     f"{_kind(record[name])}, not text or a number")
            _fill(getattr(cfg, attr), record, f"{key}.{attr}", where)
    elif fmt == "text":
        if cfg.text_field not in record:
            raise LlmclError(f"recipe key '{key}.text_field': {where}{cfg.text_field!r} not in the record "
                             f"(fields: {fields(record)})")
        if not isinstance(record[cfg.text_field], str):
            raise LlmclError(f"recipe key '{key}.text_field': {where}field {cfg.text_field!r} holds "
                             f"{_kind(record[cfg.text_field])}, not text")
    elif fmt == "messages":
        if cfg.messages_field not in record:
            raise LlmclError(f"recipe key '{key}.messages_field': {where}{cfg.messages_field!r} not in the record "
                             f"(fields: {fields(record)})")
        messages = record[cfg.messages_field]
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise LlmclError(f"recipe key '{key}.messages_field': {where}field {cfg.messages_field!r} must be a "
                             "non-empty list of {role, content} messages with text values")
    elif fmt == "sharegpt":
        turns = record.get("conversations")
        if not isinstance(turns, list) or not turns or not all(
                isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns):
            raise LlmclError(f"recipe key '{key}.format': {where}ShareGPT field 'conversations' must be a non-empty "
                             "list of {from, value} turns with text values")
        for n, t in enumerate(turns):
            if t.get("from") not in SHAREGPT_ROLES:
                raise LlmclError(f"recipe key '{key}.format': {where}ShareGPT turn {n} has from={t.get('from')!r}; "
                                 f"expected one of {', '.join(SHAREGPT_ROLES)}")
        _check_text(record, ("system",), key, where, optional=True)
    elif fmt == "alpaca":
        _check_text(record, ("instruction", "output"), key, where)
        _check_text(record, ("input", "system"), key, where, optional=True)
        history = record.get("history") or []
        if not isinstance(history, list) or not all(
                isinstance(h, (list, tuple)) and len(h) == 2 and all(isinstance(x, str) for x in h) for h in history):
            raise LlmclError(f"recipe key '{key}.format': {where}Alpaca field 'history' must be a list of "
                             "[query, answer] text pairs")
    return fmt


def _check_text(record: dict[str, Any], names: tuple[str, ...], key: str, where: str, optional: bool = False) -> None:
    for name in names:
        if optional and record.get(name) is None:
            continue
        if name not in record:
            raise LlmclError(f"recipe key '{key}.format': {where}field {name!r} not in the record "
                             f"(fields: {fields(record)})")
        if not isinstance(record[name], str):
            raise LlmclError(f"recipe key '{key}.format': {where}field {name!r} holds {_kind(record[name])}, not text")


def conversation(cfg: Any, record: dict[str, Any], fmt: str) -> list[dict[str, str]]:
    """The chat turns ({role, content}) of a record in one of CHAT_FORMATS."""
    if fmt == "messages":
        return record[cfg.messages_field]
    system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    if fmt == "sharegpt":
        return system + [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in record["conversations"]]
    turns = [m for query, answer in record.get("history") or []
             for m in ({"role": "user", "content": query}, {"role": "assistant", "content": answer})]
    user = "\n".join(x for x in (record["instruction"], record.get("input")) if x)
    return system + turns + [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def _kind(value: Any) -> str:
    return "null" if value is None else f"a {type(value).__name__}"


def fields(record: dict[str, Any]) -> list[str]:
    """A record's field names, sorted, for messages (str() so that no odd key can break the sort)."""
    return sorted(str(name) for name in record)


def _fill(template: str, record: dict[str, Any], key: str, where: str = "") -> str:
    """`template` filled from a record; one line naming `key` when the template cannot render it (a format spec
    such as {prompt:d} on text, {prompt.x} on a field without x, a missing field)."""
    try:
        return template.format_map(record)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        what = f"field {exc}" if isinstance(exc, KeyError) else str(exc)
        raise LlmclError(f"recipe key '{key}': {where}{template!r} cannot render the record ({what}; "
                         f"fields: {fields(record)})") from None


def render(cfg: Any, record: dict[str, Any], key: str = "data") -> tuple[str, str]:
    """(prompt, completion) strings of a prompt/completion record."""
    return (_fill(cfg.prompt_template, record, f"{key}.prompt_template"),
            _fill(cfg.completion_template, record, f"{key}.completion_template"))


def chat_template_key(cfg: Any, fmt: str, key: str = "data") -> str | None:
    """The recipe key that sends a stage's data through the tokenizer's chat template; None when nothing does."""
    if fmt in CHAT_FORMATS:
        return f"{key}.format" if cfg.format == fmt else f"{key}.path"
    if fmt == "prompt_completion" and cfg.chat_template:
        return f"{key}.chat_template"
    return None


def check_chat_template(cfg: Any, fmt: str, tokenizer: Any, key: str = "data", model_path: str | None = None) -> None:
    """Raise naming the recipe key when the data (`fmt`) needs a chat template and the tokenizer has none."""
    needs = chat_template_key(cfg, fmt, key)
    if needs is None or getattr(tokenizer, "chat_template", None):
        return
    model = model_path or getattr(tokenizer, "name_or_path", "") or "?"
    if needs.endswith(".chat_template"):
        raise LlmclError(f"recipe key '{needs}': the tokenizer of model.path={model!r} has no chat template; set "
                         f"{needs}: false or use a model whose tokenizer has one")
    raise LlmclError(f"recipe key '{needs}': {fmt} data is rendered with the tokenizer's chat template and the "
                     f"tokenizer of model.path={model!r} has none; use a model whose tokenizer has one, or "
                     "prompt/completion data")


def chat_render(tokenizer: Any, messages: list[dict[str, str]], key: str, **kwargs: Any) -> str:
    """`messages` through the tokenizer's chat template, as text; a template that refuses them (Gemma's "System
    role not supported", Mistral's roles that must alternate: jinja2's TemplateError) is one line naming `key`."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except TemplateError as exc:
        roles = ", ".join(str(m.get("role")) for m in messages)
        raise LlmclError(f"recipe key '{key}': the tokenizer's chat template refuses a conversation of the data "
                         f"(roles {roles}): {str(exc).strip()}") from None


def _chat_segments(tokenizer: Any, messages: list[dict[str, str]], key: str) -> list[tuple[str, bool]]:
    """Split a rendered conversation into (text, is_assistant) segments by rendering growing prefixes (`key`: the
    recipe key that sends the data through the chat template, for the messages)."""
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, msg in enumerate(messages):
        if msg.get("role") != "assistant":
            continue
        prefix = chat_render(tokenizer, messages[:i], key, add_generation_prompt=True)
        full = chat_render(tokenizer, messages[: i + 1], key)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise LlmclError(f"recipe key '{key}': the tokenizer's chat template does not render conversations as "
                             "growing prefixes; use format prompt_completion instead")
        segments.append((prefix[len(done):], False))
        segments.append((full[len(prefix):], True))
        done = full
    rest = chat_render(tokenizer, messages, key)[len(done):]
    if rest:
        segments.append((rest, False))
    return segments


def prompt_ids(tokenizer: Any, text: str, rendered: bool) -> list[int]:
    """The tokens of a prompt (an example's first segment) as training and scoring see them. `rendered`: the text
    is a chat template's output, which carries the template's own special tokens (its BOS), so the tokenizer
    adds none, as transformers' apply_chat_template(tokenize=True) does; otherwise the special tokens the
    tokenizer puts before a text (its BOS), unless the text already begins with the BOS, and never those it puts
    after one (a tokenizer with add_eos_token would end the prompt with an EOS)."""
    bare = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token", None)
    if rendered or (bos and text.startswith(bos)):
        return bare
    return _leading_special(tokenizer) + bare


def _leading_special(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts before a text (its BOS, or none), read off a one-letter text (an
    empty one would not tell a BOS from an EOS)."""
    full, bare = tokenizer("a")["input_ids"], tokenizer("a", add_special_tokens=False)["input_ids"]
    return next((full[:k] for k in range(len(full) - len(bare) + 1) if full[k:k + len(bare)] == bare), [])


def _encode_supervised(tokenizer: Any, segments: list[tuple[str, bool]], add_eos: bool, *, rendered: bool) -> Example:
    """`segments` tokenized one after another, the first as a prompt (prompt_ids: `rendered` by a chat template
    or not), the others alone."""
    ids: list[int] = []
    labels: list[int] = []
    for i, (text, trained) in enumerate(segments):
        piece = prompt_ids(tokenizer, text, rendered) if i == 0 else tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    if add_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return Example(ids, labels)


def encode(records: list[dict[str, Any]], cfg: Any, tokenizer: Any, seq_len: int,
           key: str = "data") -> tuple[list[Example], EncodeStats]:
    """Tokenize a stage's training records into examples of at most seq_len tokens (`key`: the data config's
    recipe key, for the messages)."""
    if not records:
        raise LlmclError(f"{key}.path {cfg.path!r}: no training records")
    stats = EncodeStats(format=detect_format(cfg, records[0]))
    check_chat_template(cfg, stats.format, tokenizer)
    if stats.format == "text":
        examples = pack([r[cfg.text_field] for r in records], tokenizer, seq_len, bos_of(cfg, tokenizer, key))
    else:
        examples = []
        template_key = chat_template_key(cfg, stats.format, key) or key
        for r in records:
            if stats.format in CHAT_FORMATS:
                segments = _chat_segments(tokenizer, conversation(cfg, r, stats.format), template_key)
                ex = _encode_supervised(tokenizer, segments, add_eos=False, rendered=True)
            else:
                prompt, completion = render(cfg, r)
                if cfg.chat_template:
                    msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion.strip()}]
                    ex = _encode_supervised(tokenizer, _chat_segments(tokenizer, msgs, template_key), add_eos=False,
                                            rendered=True)
                else:
                    ex = _encode_supervised(tokenizer, [(prompt, False), (completion, True)], add_eos=True,
                                            rendered=False)
            cut = len(ex.input_ids) > seq_len
            if cut:
                ex = Example(ex.input_ids[:seq_len], ex.labels[:seq_len])
            if any(label != IGNORE for label in ex.labels[1:]):
                examples.append(ex)
                stats.truncated += cut
            else:
                stats.dropped += 1
    if not examples:
        raise LlmclError(f"{key}.path {cfg.path!r}: no example keeps a trained token within its first {seq_len} "
                         "tokens (train.seq_len)")
    stats.examples = len(examples)
    stats.tokens = sum(len(e.input_ids) for e in examples)
    stats.label_tokens = sum(sum(1 for x in e.labels[1:] if x != IGNORE) for e in examples)
    return examples, stats


def document_tokens(texts: list[str], tokenizer: Any, bos: int | None = None) -> list[list[int]]:
    """Each document's tokens, as a text stage trains them: `bos` first (data.add_bos), EOS last."""
    eos = tokenizer.eos_token_id
    head, tail = ([] if bos is None else [bos]), ([] if eos is None else [eos])
    return [head + ids + tail for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def bos_of(cfg: Any, tokenizer: Any, key: str = "data") -> int | None:
    """The token a text document begins with: the tokenizer's BOS with data.add_bos, else none."""
    if not getattr(cfg, "add_bos", False):
        return None
    if tokenizer.bos_token_id is None:
        model = getattr(tokenizer, "name_or_path", "") or "?"
        raise LlmclError(f"recipe key '{key}.add_bos': the tokenizer of model.path={model!r} has no BOS token; set "
                         f"{key}.add_bos: false")
    return tokenizer.bos_token_id


def pack(texts: list[str], tokenizer: Any, seq_len: int, bos: int | None = None) -> list[Example]:
    """Concatenate documents (each followed by EOS, and begun by `bos` if given) and cut them into blocks of
    seq_len tokens.

    The last partial block is dropped unless it is the only one."""
    stream: list[int] = []
    for ids in document_tokens(texts, tokenizer, bos):
        stream += ids
    n_full = len(stream) // seq_len
    blocks = [stream[i * seq_len:(i + 1) * seq_len] for i in range(n_full)] or [stream[:seq_len]]
    return [Example(b, list(b)) for b in blocks]
