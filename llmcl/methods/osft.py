"""OSFT, SVD-orthogonal full fine-tuning ("Sculpting Subspaces", Nayak et al. 2025).

At the start of every stage each target matrix W (m x n: the attention and MLP projections) is decomposed in
fp32, W = U S V^T, and its top-k singular directions U_k (m x k), V_k (n x k) are protected. Training then
keeps every update of W orthogonal to them:

  1) after backward, the gradient is projected onto the complement:  G <- (I - U_k U_k^T) G (I - V_k V_k^T)
  2) after the optimizer step, the applied update dW = W_after - W_before is corrected the same way, because
     Adam's per-coordinate scaling and weight decay leak into the protected directions:
     W <- W_before + (I - U_k U_k^T) dW (I - V_k V_k^T)
     (W_before is copied into a buffer reused every step: one fp32 copy of the target matrices, no data).
After (2), U_k^T W and W V_k do not change over the stage (up to float rounding).

k per matrix = round(r x min(m, n)), with the preserved ratio r chosen per decoder layer:
  adaptive  layer importance = mean cosine similarity between the layer's input and output hidden states on
            calibration batches of the stage's data (padding masked; every rank's batches, so that every rank
            protects the same directions), min-max normalised across layers, mapped
            to r = min_ratio + importance x (max_ratio - min_ratio). `importance: similarity` protects layers
            that change their input least the most (our reading of the paper); `change` uses 1 - similarity.
  uniform   r = uniform_ratio for every layer.
Either way `growth` x stage index is added (the preserved fraction grows stage by stage; by default growth =
1 / the number of stages, as the authors' continual protocol protects more of each matrix with every task), or `stage_ratios`
gives each stage's uniform ratio. The chosen k of every matrix, the ratios and the SVD time are saved in
the stage's method state (method_state.json).

Embeddings, LM head and norms are frozen unless `train_other: true`.

Under DeepSpeed ZeRO (stage.zero) nothing is gathered: (1) runs as a hook on each weight, on every micro-batch's
gradient before DeepSpeed reduces it (the projection is linear), and (2) is computed from each rank's shard of
the fp32 master weights with one all-reduce of k(m+n) numbers per matrix (llmcl.shards; see _after_sharded_step).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

from llmcl import methods, shards
from llmcl.config import KeyFn, require
from llmcl.methods import arch
from llmcl.methods.base import Method, MethodConfig, StageInfo, merge_stage_records


@dataclass
class OSFTConfig(MethodConfig):
    """Full fine-tuning with updates orthogonal to each matrix's top singular directions."""

    name: str = "osft"
    """Always 'osft'."""
    rank_rule: Literal["adaptive", "uniform"] = "adaptive"
    """How many singular directions each matrix protects: adaptive (layer importance) or uniform."""
    min_ratio: float = 0.1
    """adaptive: preserved fraction of the least important layer."""
    max_ratio: float = 0.8
    """adaptive: preserved fraction of the most important layer."""
    uniform_ratio: float = 0.5
    """uniform: preserved fraction of every matrix."""
    growth: float | Literal["auto"] = "auto"
    """Added to every preserved fraction per stage index (stage k protects k x growth more), capped at 0.95; 'auto': 1 / the number of stages, the authors' continual protocol (PEFT's osf: (task+1)/n of each matrix; docs/deviations.md: +0.145 AA and +0.120 BWT over no growth)."""
    stage_ratios: list[float] | None = None
    """Per-stage uniform preserved fractions [r0, r1, ...] (the last repeats); overrides rank_rule."""
    importance: Literal["similarity", "change"] = "similarity"
    """adaptive: importance = input/output cosine similarity of a layer, or 1 - similarity."""
    calibration_batches: int = 2
    """adaptive: micro-batches of the stage's data used to measure layer importance."""
    train_other: bool = False
    """Also train embeddings, LM head and norms (unprotected)."""

    def check(self, key: KeyFn) -> None:
        for name in ("min_ratio", "max_ratio", "uniform_ratio"):
            v = getattr(self, name)
            require(0 <= v < 1, key(name), v, "a fraction in [0, 1)")
        require(self.min_ratio <= self.max_ratio, key("max_ratio"), self.max_ratio, f">= min_ratio ({self.min_ratio})")
        require(self.growth == "auto" or 0 <= self.growth < 1, key("growth"), self.growth, "'auto' or a fraction in [0, 1)")
        require(self.calibration_batches > 0, key("calibration_batches"), self.calibration_batches, "a positive integer")
        if self.stage_ratios is not None:
            require(bool(self.stage_ratios) and all(0 <= r < 1 for r in self.stage_ratios), key("stage_ratios"),
                    self.stage_ratios, "a non-empty list of fractions in [0, 1)")


def layer_similarity(model: torch.nn.Module, layers: list[torch.nn.Module], batches: list[dict],
                     reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> list[float]:
    """Mean cosine similarity between each decoder layer's input and output hidden states (non-pad tokens), over
    the batches of every rank (`reduce_sum` sums over ranks: every rank then protects the same directions)."""
    sums = [0.0] * len(layers)
    count = 0
    mask_holder: dict[str, torch.Tensor] = {}

    def hook(index: int):
        def fn(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
            m = mask_holder["mask"].to(cos.dtype)
            sums[index] += float((cos * m).sum())
        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            for batch in batches:
                mask_holder["mask"] = batch["attention_mask"].to(device)
                count += int(batch["attention_mask"].sum())
                model(input_ids=batch["input_ids"].to(device), attention_mask=mask_holder["mask"], use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    total = reduce_sum(torch.tensor(sums + [float(count)], dtype=torch.float64, device=device)).tolist()
    sums, count = total[:-1], total[-1]
    return [s / max(count, 1) for s in sums]


class Projector:
    """x -> (I - U_k U_k^T) x (I - V_k V_k^T) for one m x n matrix, from its SVD W = U S V^T.

    A side of the projection either subtracts the k protected directions, x - U_k (U_k^T x), or, where the SVD
    holds that side's whole basis (the side of length min(m, n)) and fewer than k directions remain, keeps the
    part of x along the remaining c ones, U_c (U_c^T x). A kept side is applied first, and the other side then
    works on the c x n (or m x c) compressed matrix before it is expanded again: with c = (1 - ratio) min(m, n),
    the projection costs about 2 c m n multiply-adds where subtracting on both sides costs 4 k m n. A growing
    preserved share makes this the common case."""

    def __init__(self, u: torch.Tensor, vh: torch.Tensor, k: int, complements: bool = True):
        m, r = u.shape
        n = vh.shape[1]
        self.left_keep = complements and m == r and m - k < k  # keep the complement's part, not remove U_k's
        self.right_keep = complements and n == r and n - k < k
        self.left = (u[:, k:] if self.left_keep else u[:, :k]).contiguous()
        self.right = (vh[k:] if self.right_keep else vh[:k]).T.contiguous()

    def __call__(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """The projection of the fp32 matrix x; with inplace=True x itself is overwritten with it."""
        a, b = self.left, self.right
        out = x if inplace else None
        if self.left_keep and self.right_keep:  # a (a^T x b) b^T
            return torch.mm(a @ ((a.T @ x) @ b), b.T, out=out)
        if self.left_keep:  # a [(a^T x) - ((a^T x) b) b^T]
            y = a.T @ x
            return torch.mm(a, y.addmm_(y @ b, b.T, alpha=-1), out=out)
        if self.right_keep:  # [(x b) - a (a^T (x b))] b^T
            y = x @ b
            return torch.mm(y.addmm_(a, a.T @ y, alpha=-1), b.T, out=out)
        x = x.addmm_(a, a.T @ x, alpha=-1) if inplace else torch.addmm(x, a, a.T @ x, alpha=-1)
        return x.addmm_(x @ b, b.T, alpha=-1)


@methods.register
class OSFT(Method):
    config_class = OSFTConfig

    def __init__(self, config: OSFTConfig):
        super().__init__(config)
        self.records: list[dict[str, Any]] = []
        self.bases: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # param name -> (U_k, V_k), under ZeRO
        self.projectors: dict[str, Projector] = {}  # param name -> its projection onto the complement
        self.params: dict[str, torch.nn.Parameter] = {}
        self._before: dict[str, Any] = {}  # param name -> W before the step (buffer reused every step; ZeRO: shard)
        self._pending: set[str] = set()
        self.zero: int | None = None
        self.reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
        self._hooks: list[Any] = []

    # -- which fraction each layer preserves ---------------------------------------------------------
    def ratios(self, model: torch.nn.Module, layers: list[torch.nn.Module], stage: StageInfo) -> tuple[list[float], list[float] | None]:
        cfg = self.config
        n = len(layers)
        if cfg.stage_ratios is not None:
            r = cfg.stage_ratios[min(stage.index, len(cfg.stage_ratios) - 1)]
            return [r] * n, None
        importance = None
        if cfg.rank_rule == "uniform":
            base = [cfg.uniform_ratio] * n
        else:
            batches = []
            if stage.batches is not None:
                for b in stage.batches():
                    batches.append(b)
                    if len(batches) >= cfg.calibration_batches:
                        break
            sim = layer_similarity(model, layers, batches, stage.reduce_sum)
            score = sim if cfg.importance == "similarity" else [1 - s for s in sim]
            lo, hi = min(score), max(score)
            importance = [(s - lo) / (hi - lo) if hi > lo else 0.5 for s in score]
            base = [cfg.min_ratio + imp * (cfg.max_ratio - cfg.min_ratio) for imp in importance]
        growth = 1.0 / stage.num_stages if cfg.growth == "auto" else cfg.growth
        return [min(0.95, r + growth * stage.index) for r in base], importance

    # -- the interface --------------------------------------------------------------------------------
    def prepare(self, model: torch.nn.Module, stage: StageInfo) -> torch.nn.Module:
        mapping = arch.layer_map(model, self.name)
        layers = arch.decoder_layers(model, mapping)
        ratios, importance = self.ratios(model, layers, stage)
        for p in model.parameters():
            p.requires_grad_(self.config.train_other)
        self.bases, self.params, self._before, self._pending = {}, {}, {}, set()
        self.projectors = {}
        ks: dict[str, int] = {}
        t0 = time.perf_counter()
        per_layer = [a + f for a, f in zip(arch.matrices(model, mapping, "attention"), arch.matrices(model, mapping, "ffn"))]
        for i, mats in enumerate(per_layer):
            for name, module in mats:
                w = module.weight
                w.requires_grad_(True)
                full = min(w.shape)
                k = min(full - 1, max(0, round(ratios[i] * full)))
                ks[f"{name}.weight"] = k
                if k == 0:
                    continue
                u, _, vh = torch.linalg.svd(w.detach().float(), full_matrices=False)
                # under ZeRO the sharded correction needs U_k and V_k themselves (then both sides subtract them)
                project = self.projectors[f"{name}.weight"] = Projector(u, vh, k, complements=not stage.zero)
                if stage.zero:
                    self.bases[f"{name}.weight"] = (project.left, project.right)
                self.params[f"{name}.weight"] = w
        svd_seconds = time.perf_counter() - t0
        self.zero, self.reduce_sum = stage.zero, stage.reduce_sum
        for h in self._hooks:
            h.remove()
        # DeepSpeed reduces and shards the gradients inside backward: each micro-batch's gradient is projected
        # as autograd produces it (the projection is linear, so projecting every rank's and micro-batch's part
        # is projecting their sum)
        self._hooks = [self.params[n].register_hook(self._gradient_hook(n)) for n in self.params] \
            if stage.zero else []
        self.records = [r for r in self.records if r["stage"] != stage.index]
        self.records.append({"stage": stage.index, "ratios": [round(r, 6) for r in ratios],
                             "importance": None if importance is None else [round(x, 6) for x in importance],
                             "k": ks, "svd_seconds": round(svd_seconds, 3)})
        return model

    def describe_stage(self) -> str:
        r = self.records[-1]
        return (f"osft: protected {sum(r['k'].values()):,} singular directions in {len(r['k'])} matrices "
                f"(preserved {min(r['ratios']):.2f}-{max(r['ratios']):.2f}), SVD {r['svd_seconds']:.1f}s")

    def _gradient_hook(self, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda g: self.projectors[name](g.float()).to(g.dtype)

    def after_backward(self, model: torch.nn.Module) -> None:
        if self.zero:  # gradients were projected by the hooks; keep this rank's shard of W before the step
            self._before = {name: shards.master(w, self.bases[name][0].device) for name, w in self.params.items()}
            return
        # 1) the gradient, projected onto the complement (Adam's moments only ever see allowed directions)
        # 2) a copy of the weights before the step, in a buffer kept across steps (one fp32 copy of the target
        #    matrices): the applied update is then projected exactly, 4kmn flops a matrix instead of the 12kmn
        #    that tracking U^T W and W V around the step takes
        with torch.no_grad():
            for name, project in self.projectors.items():
                w = self.params[name]
                if w.grad is not None:
                    if w.grad.dtype == torch.float32:
                        project(w.grad, inplace=True)
                    else:
                        w.grad.copy_(project(w.grad.float()).to(w.grad.dtype))
                buf = self._before.get(name)
                if buf is None or buf.shape != w.shape:
                    buf = self._before[name] = torch.empty(w.shape, dtype=torch.float32, device=w.device)
                buf.copy_(w.detach())
                self._pending.add(name)

    def after_step(self, model: torch.nn.Module) -> None:
        # Adam's per-coordinate scaling and weight decay move W outside the complement: keep only P(W_after -
        # W_before), i.e. subtract the update's part along U_k / V_k
        if self.zero:
            self._after_sharded_step()
            return
        with torch.no_grad():
            for name in self._pending:
                w, before = self.params[name], self._before[name]
                delta = torch.sub(w.detach().float(), before, out=before)  # the buffer is rewritten next step
                if w.dtype == torch.float32:  # W_before + P(dW), without another m x n temporary
                    w.sub_(delta)
                    w.add_(self.projectors[name](delta, inplace=True))
                else:  # one rounding to the weights' dtype
                    w.sub_((delta - self.projectors[name](delta.clone(), inplace=True)).to(w.dtype))
        self._pending = set()

    def _after_sharded_step(self) -> None:
        """The same correction under DeepSpeed ZeRO, where each rank holds a shard of every matrix's fp32 master
        weights. The correction is U X + Y V^T - U (X V) V^T with X = U^T dW and Y = dW V: every rank computes
        its shard's part of X and Y, one all-reduce of k(m+n) numbers per matrix sums them, and every rank
        corrects its own shard (and its working copy). No matrix is ever gathered."""
        names = sorted(self._before)
        after, parts = {}, []
        with torch.no_grad():
            for name in names:
                u, v = self.bases[name]
                w, before = self.params[name], self._before[name]
                after[name] = now = shards.master(w, u.device)
                delta = shards.scatter(now, shards.shape(w).numel())
                delta[now.start:now.start + now.numel] -= before.values
                delta = delta.view(shards.shape(w))
                parts += [(u.T @ delta).reshape(-1), (delta @ v).reshape(-1)]
            if not parts:
                return
            total, offset = self.reduce_sum(torch.cat(parts)), 0
            for name in names:
                u, v = self.bases[name]
                (m, n), k = shards.shape(self.params[name]), u.shape[1]
                x = total[offset:offset + k * n].view(k, n)
                y = total[offset + k * n:offset + k * (n + m)].view(m, k)
                offset += k * (n + m)
                shards.subtract(self.params[name], after[name], u @ x + (y - u @ (x @ v)) @ v.T)
        self._before = {}

    def end_stage(self, model: torch.nn.Module, stage: StageInfo) -> torch.nn.Module:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        return model

    def state_dict(self) -> dict[str, Any]:
        return {"records": self.records}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.records = merge_stage_records(state.get("records", []), self.records)
