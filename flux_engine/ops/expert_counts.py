"""Per-expert histograms of routing decisions (profiling's frequency and attention sums)."""

from __future__ import annotations

from typing import Optional

import torch

from flux_engine.backend import Op
from flux_engine.ops._checks import (
    check_floating,
    check_ids_in_range,
    check_integer,
    check_positive_int,
    check_same_device,
    check_shape,
    check_tensor,
)


def expert_counts_reference(
    topk_ids: torch.Tensor, num_experts: int, weights: Optional[torch.Tensor], out: torch.Tensor
) -> torch.Tensor:
    ids = topk_ids.reshape(-1).long()
    w = None
    if weights is not None:
        w = (weights.unsqueeze(1).expand_as(topk_ids) if weights.dim() == 1 else weights).reshape(-1).to(out.dtype)
    out += torch.bincount(ids, weights=w, minlength=num_experts).to(out.dtype)
    return out


_op = Op("expert_counts", expert_counts_reference, preference=("triton",))


@_op.register("triton")
def _expert_counts_triton(topk_ids, num_experts, weights, out):
    from flux_engine.triton_kernels.expert_counts import expert_counts as kernel

    return kernel(topk_ids, num_experts, weights, out)


def expert_counts(
    topk_ids: torch.Tensor,
    num_experts: int,
    weights: Optional[torch.Tensor] = None,
    *,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Count how often each expert was chosen, optionally weighted.

    Args:
        topk_ids: ``[T, k]`` integer expert ids in ``[0, num_experts)``.
        num_experts: ``E``, the length of the histogram.
        weights: optional ``[T]`` (one weight per token, e.g. received attention) or ``[T, k]`` (per slot).
        out: optional ``[E]`` accumulator, added to in place (profiling sums batches without host syncs);
            int64 or float32 as below.

    Returns:
        ``[E]``: int64 counts, or float32 sums of the weights when ``weights`` is given. ``out`` when passed.
    """
    check_tensor("topk_ids", topk_ids, ndim=2)
    check_integer("topk_ids", topk_ids)
    check_positive_int("num_experts", num_experts)
    if weights is not None:
        check_tensor("weights", weights)
        check_floating("weights", weights)
        if weights.dim() == 1:
            check_shape("weights", weights, topk_ids.shape[:1], "one weight per token of topk_ids")
        else:
            check_shape("weights", weights, topk_ids.shape, "one weight per slot of topk_ids")
    want = torch.float32 if weights is not None else torch.int64
    if out is None:
        out = torch.zeros(num_experts, dtype=want, device=topk_ids.device)
    else:
        check_tensor("out", out, ndim=1)
        check_shape("out", out, (num_experts,), "num_experts")
        if out.dtype != want:
            raise TypeError(f"out must be {want} for {'weighted' if weights is not None else 'plain'} counts, got {out.dtype}")
    device = check_same_device(topk_ids=topk_ids, weights=weights, out=out)
    check_ids_in_range("topk_ids", topk_ids, num_experts)
    return _op.select(device)(topk_ids, num_experts, weights, out)


expert_counts.op = _op
