"""Loglikelihood requests that share a context, scored in one packed row (the compute behind multiple choice).

lm-eval's HFLM scores every (context, continuation) pair as its own sequence: a 14-way multiple-choice item
runs its 180-token prompt through the model 14 times. Here each context runs once, with all its continuations
after it in the same row:

    row        c0 c1 c2 c3 | a0 a1 | b0 | d0 d1 d2          (context, then each continuation but its last token)
    positions   0  1  2  3 |  4  5 |  4 |  4  5  6          (every continuation restarts where the context ends)
    attention   causal over the context; a continuation's tokens see the context and their own earlier tokens

so every continuation sees exactly the tokens it would see alone, at the same positions. The token sequences
are HFLM's own (its `_encode_pair` and left truncation), so the log-likelihoods and greedy flags are HFLM's up
to float rounding (tests/test_method_contract.py compares them for every method). Requests that cannot be packed
this way (a model whose attention takes no custom mask or whose positions do not come from position_ids, a pair
longer than a sliding window or the model, batch_size auto) go through HFLM unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from llmcl.models import logits_at_positions, why_not_packable

# attention implementations that take a 4D mask as given (transformers returns a 4D mask unchanged)
MASKABLE = ("sdpa", "eager")
# a context's requests are packed when the row has at most this fraction of the tokens HFLM would run (a packed
# row's custom mask costs sdpa its fused causal kernel: piqa's two long answers to a short goal gain nothing)
SAVING = 0.75

Request = tuple[tuple[str, str] | None, list[int], list[int]]


def packed_row(context: list[int], continuations: list[list[int]]) -> tuple[list[int], list[int], list[int], list[list[int]]]:
    """One context and its continuations as one row: tokens, position ids, the branch of each token (-1 for the
    context, k for continuation k) and, per continuation, the row indices whose logits predict its tokens."""
    tokens, positions, branch = list(context), list(range(len(context))), [-1] * len(context)
    predictors = []
    for k, cont in enumerate(continuations):
        start = len(tokens)
        tokens += cont[:-1]
        positions += range(len(context), len(context) + len(cont) - 1)
        branch += [k] * (len(cont) - 1)
        predictors.append([len(context) - 1] + list(range(start, start + len(cont) - 1)))
    return tokens, positions, branch, predictors


def branch_mask(branch: list[int], length: int) -> torch.Tensor:
    """[length, length] bool, True = may attend: causal, and a continuation's token sees the context and its own
    branch only. Padding (beyond the row) sees itself, so that no query row is fully masked."""
    n = len(branch)
    b = torch.tensor(branch)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    visible = (b[None, :] == -1) | (b[None, :] == b[:, None])
    mask = torch.zeros(length, length, dtype=torch.bool)
    mask[:n, :n] = causal & visible
    idx = torch.arange(n, length)
    mask[idx, idx] = True
    return mask


class SharedContextScoring:
    """Mixin for lm-eval's HFLM: `_loglikelihood_tokens` packs the requests of each context into one row.

    Packing needs a model whose tokens interact only through attention that honours a custom mask and whose
    positions come from position_ids: `_model_packs` checks what it can read (attention implementation, a
    position_ids argument, no ALiBi, only attention layers, no prompt-learning adapter), and the first packed row
    of every call is also scored HFLM's way: a model that does not give the same values is scored HFLM's way
    from then on."""

    _packing: bool | None = None  # None until the first packed row was checked against HFLM
    _head_at_predictors: bool | None = None  # whether the forward takes a boolean logits_to_keep (checked once)

    def _model_packs(self) -> bool:
        config = getattr(self.model, "config", None)
        if (self.backend != "causal" or not isinstance(self.batch_size, int)  # 'auto' sizes batches collectively
                or getattr(config, "_attn_implementation", None) not in MASKABLE):
            return False
        return why_not_packable(self.model) is None

    def _packable(self, context: list[int], continuation: list[int]) -> bool:
        window = getattr(self.model.config, "sliding_window", None)
        length = len(context) + len(continuation)
        return 0 < len(context) and 0 < len(continuation) and length <= self.max_length + 1 and \
            (not window or length <= window)

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        groups: dict[tuple[int, ...], list[int]] = {}
        alone = []
        packs = self._packing is not False and self._model_packs()
        for i, (_, context, continuation) in enumerate(requests):
            if packs and self._packable(context, continuation):
                groups.setdefault(tuple(context), []).append(i)
            else:
                alone.append(i)
        packed = {context: len(context) + sum(len(requests[i][2]) - 1 for i in members)  # a row's tokens
                  for context, members in groups.items()}
        for context, members in list(groups.items()):  # packing pays where the context is the larger part
            unpacked = sum(len(context) + len(requests[i][2]) - 1 for i in members)
            if packed[context] > SAVING * unpacked or packed[context] > self.max_length:
                alone += groups.pop(context)
        rows = sorted(groups.items(), key=lambda g: -packed[g[0]])
        if rows and self._packing is None:  # the first packed row, checked against HFLM's way
            first = rows[0][1]
            expected = super()._loglikelihood_tokens([requests[i] for i in first], disable_tqdm=True)  # type: ignore[misc]
            atol, rtol = (1e-3, 1e-4) if self.model.dtype == torch.float32 else (0.1, 0.02)  # half: rounding
            self._packing = all(abs(got[0] - want[0]) <= atol + rtol * abs(want[0])
                                for (_, got), want in zip(self._score_rows(rows[:1], requests), expected))
            if not self._packing:
                alone += [i for _, members in rows for i in members]
                rows = []
        if alone:
            alone.sort()
            for i, answer in zip(alone, super()._loglikelihood_tokens(  # type: ignore[misc]
                    [requests[i] for i in alone], disable_tqdm=True, override_bs=override_bs)):
                results[i] = answer
        for start in range(0, len(rows), self.batch_size):
            for i, answer in self._score_rows(rows[start:start + self.batch_size], requests):
                results[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def _score_rows(self, batch: list[tuple[tuple[int, ...], list[int]]], requests: list[Request]) -> list[tuple[int, tuple[float, bool]]]:
        packed = [packed_row(list(context), [requests[i][2] for i in members]) for context, members in batch]
        length = max(len(p[0]) for p in packed)
        ids = torch.zeros(len(packed), length, dtype=torch.long)
        pos = torch.zeros(len(packed), length, dtype=torch.long)
        allowed = torch.zeros(len(packed), 1, length, length, dtype=torch.bool)
        for r, (tokens, positions, branch, _) in enumerate(packed):
            ids[r, :len(tokens)] = torch.tensor(tokens)
            pos[r, :len(tokens)] = torch.tensor(positions)
            allowed[r, 0] = branch_mask(branch, length)
        if self.model.config._attn_implementation == "eager":  # eager adds the mask to the scores
            mask: torch.Tensor = torch.zeros(allowed.shape, dtype=self.model.dtype).masked_fill(
                ~allowed, torch.finfo(self.model.dtype).min)
        else:
            mask = allowed
        keep = None
        if self._head_at_predictors is None:
            self._head_at_predictors = logits_at_positions(self.model)
        if self._head_at_predictors:  # the LM head only where a continuation's token is predicted
            keep = torch.zeros(len(packed), length, dtype=torch.bool)
            for r, (_, _, _, predictors) in enumerate(packed):
                keep[r, [w for where in predictors for w in where]] = True
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                            position_ids=pos.to(self.device),
                            **({"logits_to_keep": keep.to(self.device)} if keep is not None else {})).logits
        if keep is not None:  # [kept positions, vocabulary], row-major: where each (row, position) landed
            row_of = (keep.flatten().cumsum(0) - 1).view(keep.shape)
        out = []
        for r, ((_, members), (_, _, _, predictors)) in enumerate(zip(batch, packed)):
            for i, where in zip(members, predictors):
                cont = torch.tensor(requests[i][2], device=logits.device)
                at = logits[row_of[r, where].to(logits.device)] if keep is not None else logits[r, where]
                logp = F.log_softmax(at, dim=-1, dtype=self.softmax_dtype)
                greedy = bool((logp.argmax(-1) == cont).all())
                out.append((i, (float(logp.gather(1, cont[:, None]).sum()), greedy)))
        return out


def shared_context_lm(base: type) -> type:
    """`base` (lm-eval's HFLM) with its loglikelihood requests scored one packed row per context."""
    return type("SharedContextHFLM", (SharedContextScoring, base), {})


def hflm_class() -> Any:
    from lm_eval.models.huggingface import HFLM

    return shared_context_lm(HFLM)
