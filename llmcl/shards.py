"""A parameter's values where DeepSpeed ZeRO keeps them, for methods that change weights outside the optimizer.

Without DeepSpeed a parameter is one full tensor on every rank and these functions are trivial. Under ZeRO the
optimizer updates fp32 master weights of which each rank holds a shard (ZeRO-1/2: a fragment of a flat
partition; ZeRO-3: the rank's slice of every parameter), and the module holds a working copy: full on every
rank under ZeRO-1/2, the rank's slice (`ds_tensor`) under ZeRO-3, in the training precision (bf16/fp16 with
mixed precision). A method that edits weights after the step must edit the master (the next step starts from
it) and the working copy (the next forward reads it).

Everything here works on a flat view of the parameter: a rank's `Fragment` is the elements [start, start+numel)
of the row-major flattened matrix. All functions are safe on one process; those marked "collective" must be
called by every rank at the same point.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass
class Fragment:
    """This rank's share of a parameter's fp32 master weights: a copy of its values, and where they sit."""

    values: torch.Tensor
    """fp32, 1-D, numel elements (a copy: editing it changes nothing until `subtract` writes it back)."""
    start: int
    """Offset of the first element in the flattened parameter."""
    numel: int
    """Elements this rank holds (0: none of this parameter)."""


def zero3(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_id")


def sharded(p: torch.nn.Parameter) -> bool:
    """Whether DeepSpeed ZeRO manages the parameter's master weights."""
    return zero3(p) or hasattr(p, "_hp_mapping")


def shape(p: torch.nn.Parameter) -> torch.Size:
    """The parameter's full shape (ZeRO-3 replaces the tensor of a partitioned parameter with an empty one)."""
    return p.ds_shape if zero3(p) else p.shape


def master(p: torch.nn.Parameter, device: torch.device | None = None) -> Fragment:
    """This rank's fp32 master values of `p` (the whole parameter without DeepSpeed), copied to `device`."""
    if zero3(p):
        from deepspeed.utils import safe_get_local_fp32_param

        local = safe_get_local_fp32_param(p)
        start = p._z3_optimizer._get_param_partition_rank(p) * local.numel()
        numel = max(0, min(local.numel(), p.ds_numel - start))  # the last rank's slice is padded
        return Fragment(local[:numel].detach().to(device or local.device, torch.float32, copy=True), start, numel)
    if hasattr(p, "_hp_mapping"):
        mapping = p._hp_mapping
        if mapping is None:  # this rank's partition holds nothing of p
            return Fragment(torch.zeros(0, dtype=torch.float32, device=device or p.device), 0, 0)
        frag = mapping.get_hp_fragment()
        return Fragment(frag.detach().to(device or frag.device, torch.float32, copy=True),
                        mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel)
    return Fragment(p.detach().reshape(-1).to(device or p.device, torch.float32, copy=True), 0, p.numel())


def scatter(fragment: Fragment, numel: int) -> torch.Tensor:
    """A flat fp32 tensor of `numel` zeros holding the fragment's values at their place."""
    out = torch.zeros(numel, dtype=torch.float32, device=fragment.values.device)
    out[fragment.start:fragment.start + fragment.numel] = fragment.values
    return out


def subtract(p: torch.nn.Parameter, fragment: Fragment, correction: torch.Tensor) -> None:
    """p -= correction (the full fp32 matrix, the same on every rank): the master shard `fragment` (as read by
    `master` after the step) and the working copy. The working copy becomes the new master where this rank holds
    it; a full working copy (ZeRO-1/2, or a ZeRO-3 parameter small enough to stay gathered) is corrected in its
    own precision on every rank, so the replicas stay equal (exact in fp32; within one bf16 rounding until the
    next step rewrites it from the master)."""
    flat = correction.reshape(-1)
    new = fragment.values - flat[fragment.start:fragment.start + fragment.numel].to(fragment.values.device)
    with torch.no_grad():
        if zero3(p):
            from deepspeed.utils import safe_set_local_fp32_param

            local = p.ds_tensor
            padded = torch.zeros(local.numel(), dtype=torch.float32, device=new.device)
            padded[:fragment.numel] = new
            safe_set_local_fp32_param(p, padded)
            local.data[:fragment.numel].copy_(new.to(local.dtype))
            if p.numel() == p.ds_numel:  # kept gathered (persistence threshold): a full working copy too
                p.data.copy_((p.data.float() - correction.to(p.device)).to(p.dtype))
            return
        if hasattr(p, "_hp_mapping"):
            if p._hp_mapping is not None:
                p._hp_mapping.get_hp_fragment().data.copy_(new)
            p.data.copy_((p.data.float() - correction.to(p.device)).to(p.dtype))
            return
        p.data.copy_(new.view_as(p).to(p.dtype))


def full_fp32(p: torch.nn.Parameter) -> torch.Tensor:
    """The full fp32 master value of a trained parameter on every rank (collective under DeepSpeed)."""
    if sharded(p):
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(p).detach().float().reshape(shape(p))
    return p.detach().float()


@contextlib.contextmanager
def writable(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Full tensors of `params` inside the block (collective under ZeRO-3); what the block writes into them is
    kept (rank 0's values: write the same on every rank). For parameters the optimizer does not train."""
    if not any(zero3(p) for p in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        yield
