"""Where the weight matrices of a decoder live, by architecture: a utility the methods share (not a method).

A layer map names, relative to one decoder layer, the attention matrices, the feed-forward matrices and the
norms. An architecture it cannot map is a clear error listing the module names it found.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmcl.errors import LlmclError

_LLAMA_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_LLAMA_FFN = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_LLAMA_NORMS = ("input_layernorm", "post_attention_layernorm")


@dataclass(frozen=True)
class LayerMap:
    layers: str
    """Attribute path of the decoder layer list."""
    attention: tuple[str, ...]
    ffn: tuple[str, ...]
    norms: tuple[str, ...]
    embeddings: tuple[str, ...]
    """Token embeddings, the LM head and the final norm (outside the decoder layers)."""


_QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")  # per-head norms of the queries and keys (Qwen3, OLMo-2)
# the norms of a layer, where they are not Llama's two (every norm with a weight in a decoder layer is mapped:
# tests/test_methods.py builds each architecture and checks)
_NORMS = {"qwen3": _LLAMA_NORMS + _QK_NORMS,
          "gemma2": _LLAMA_NORMS + ("pre_feedforward_layernorm", "post_feedforward_layernorm"),
          "olmo2": ("post_attention_layernorm", "post_feedforward_layernorm") + _QK_NORMS}

ARCHITECTURES: dict[str, LayerMap] = {
    **{t: LayerMap("model.layers", _LLAMA_ATTN, _LLAMA_FFN, _NORMS.get(t, _LLAMA_NORMS),
                   ("model.embed_tokens", "lm_head", "model.norm"))
       for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2", "granite")},
    "gpt_neox": LayerMap("gpt_neox.layers", ("attention.query_key_value", "attention.dense"),
                         ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"), ("input_layernorm", "post_attention_layernorm"),
                         ("gpt_neox.embed_in", "embed_out", "gpt_neox.final_layer_norm")),
}


def _get(module: torch.nn.Module, path: str) -> torch.nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def layer_map(model: torch.nn.Module, method: str) -> LayerMap:
    """The map for this model, checked against its modules; an unknown layout is a clear error."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    mapping = ARCHITECTURES.get(model_type or "")
    layers = _get(model, mapping.layers) if mapping else None
    if mapping is None or layers is None or not len(layers):
        found = _describe(model)
        raise LlmclError(f"method {method!r} cannot map the layers of model type {model_type!r} (mapped: "
                         f"{', '.join(sorted(ARCHITECTURES))}); it has {found}")
    first = layers[0]
    missing = [p for p in mapping.attention + mapping.ffn + mapping.norms if _get(first, p) is None]
    if missing:
        raise LlmclError(f"method {method!r}: model type {model_type!r} lacks the expected modules {missing}; "
                         f"it has {_describe(model)}")
    return mapping


def _describe(model: torch.nn.Module) -> str:
    """A short list of the modules with weights inside the first repeated block (or the top level)."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if lists:
        name, block = lists[0]
        inner = sorted(n for n, m in block[0].named_modules() if n and getattr(m, "weight", None) is not None)
        return f"layer list '{name}' whose first layer holds: {', '.join(inner)}"
    return "modules: " + ", ".join(sorted(n for n, _ in model.named_children()))


def decoder_layers(model: torch.nn.Module, mapping: LayerMap) -> list[torch.nn.Module]:
    return list(_get(model, mapping.layers))


def matrices(model: torch.nn.Module, mapping: LayerMap, category: str) -> list[list[tuple[str, torch.nn.Module]]]:
    """Per decoder layer, the (full name, module) pairs of one category: attention, ffn or norms."""
    names = getattr(mapping, category)
    out = []
    for i, layer in enumerate(decoder_layers(model, mapping)):
        out.append([(f"{mapping.layers}.{i}.{p}", _get(layer, p)) for p in names])
    return out


def outside_layers(model: torch.nn.Module, mapping: LayerMap) -> list[tuple[str, torch.nn.Module]]:
    """Embeddings, LM head, final norm (those present)."""
    return [(p, m) for p in mapping.embeddings if (m := _get(model, p)) is not None]
