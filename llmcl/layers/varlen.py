"""Attention over packed rows that computes each example on its own (train.packing with sdpa).

transformers confines attention to each example of a packed row (position_ids restarting, no attention_mask)
with a block-diagonal mask for sdpa and eager: correct, but every row then costs the attention of its whole
length, L², however many examples share it. This implementation runs sdpa's causal kernel on each example's
span instead (Σ Lᵢ², the cost of the examples alone, as flash-attention's varlen path does on a GPU), so a
micro-batch can be one padding-free row. Inputs that are not packed (no restart in position_ids, a cache, a
padded batch) go to transformers' sdpa with its mask, unchanged.

`row_capacity(model, seq_len)` switches a model to it where that is exact (sdpa attention, no sliding window,
no softcap) and says how train.packing lays out a micro-batch for it: one row (None) where attention runs per
example (this, or flash-attention's varlen path), else rows of at most seq_len tokens (the block mask's cost
grows with the square of a row's length).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

NAME = "llmcl_packed_sdpa"


def spans(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the [start, end) of every run of consecutive positions (a new one wherever a position is not the
    previous one + 1: transformers' own rule for packed rows)."""
    restart = torch.ones_like(position_ids, dtype=torch.bool)
    restart[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    out = []
    for row in restart.tolist():
        starts = [t for t, r in enumerate(row) if r] + [len(row)]
        out.append(list(zip(starts[:-1], starts[1:])))
    return out


_last: tuple[Any, list[list[tuple[int, int]]]] = (lambda: None, [])


def _packed_spans(position_ids: torch.Tensor | None, query: torch.Tensor,
                  key: torch.Tensor) -> list[list[tuple[int, int]]] | None:
    """The rows' spans if this is a packed input, else None. Every layer of a forward gets the same position_ids
    tensor: its spans are read once (one device-to-host copy a forward, not one a layer)."""
    global _last
    if position_ids is None or query.shape[2] != key.shape[2] or query.shape[2] < 2:
        return None
    ref, rows = _last
    if ref() is not position_ids:
        rows = spans(position_ids.expand(query.shape[0], -1))
        _last = (weakref.ref(position_ids), rows)
    return rows if any(len(r) > 1 for r in rows) else None


def packed_sdpa(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [B, H, T, D], key/value [B, Hkv, T, D] -> [B, T, H, D].

    A packed row gets causal sdpa on each span: restarting position_ids, query and key of one length, and the mask
    transformers built for it (which, with no cache and no attention_mask, is the block-diagonal causal mask of
    those spans; with a cache transformers builds none and ignores the restarts, and so does this). Anything
    else, or a module with a sliding window or softcap, goes to transformers' sdpa with the mask it was given."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    rows = None if attention_mask is None else _packed_spans(kwargs.get("position_ids"), query, key)
    if rows is None or getattr(module, "sliding_window", None) or kwargs.get("softcap") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    # split, not slicing: split's backward writes each span's gradient into one tensor, where every slice's
    # backward would allocate and add a zero-filled gradient of the whole row (the attention backward 1.4x slower
    # on SmolLM2 at 8 examples a row: scripts/bench/packed_attention.py)
    out = []
    for q, k, v, row in zip(query.split(1), key.split(1), value.split(1), rows):
        sizes = [e - s for s, e in row]
        parts = [torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, dropout_p=dropout, scale=scaling, is_causal=qs.shape[2] > 1)
            for qs, ks, vs in zip(q.split(sizes, dim=2), k.split(sizes, dim=2), v.split(sizes, dim=2))]
        out.append(torch.cat(parts, dim=2))
    return torch.cat(out).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, packed_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # the masks of unpacked inputs stay sdpa's


def use(model: Any) -> bool:
    """Switch `model` (a transformers model, PEFT-wrapped or not) to per-example attention for packed rows, where
    that is exact; True if it did. The switch is the model's in-memory config only (nothing saved changes)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False  # eager keeps the block mask; flash-attention has its own varlen path from position_ids
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or []):
        return False
    if getattr(config, "attn_logit_softcapping", None):
        return False
    _register()
    config._attn_implementation = NAME
    return True


def row_capacity(model: Any, seq_len: int) -> int | None:
    """The capacity of train.packing's rows for `model`: None (the micro-batch as one row, no padding at all)
    where attention runs per example, else `seq_len`."""
    if use(model) or str(getattr(model.config, "_attn_implementation", "")).startswith("flash_attention"):
        return None
    return seq_len
