"""Per-expert histogram of routing decisions, accumulated in place without host syncs.

Each program reduces ``BLOCK_N`` routing slots to a private ``[E_PAD]`` histogram (a one-hot
``[BLOCK_N, E_PAD]`` tile summed over the slots) and adds it to ``out`` with one atomic per expert it
saw. Hot experts therefore take one atomic per program instead of one per slot.

Integer counts are exact. Weighted sums are float32 and their summation order depends on which
program's atomic lands first, so repeated runs may differ in the last ulps (and from the reference).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

# Elements of the one-hot tile: bounds registers per thread for wide expert counts.
_TILE = 8192
_MAX_BLOCK_N = 1024


@triton.jit
def _expert_counts_kernel(
    ids_ptr,
    weights_ptr,
    out_ptr,
    N,
    E,
    stride_it,
    stride_ik,
    stride_wt,
    stride_wk,
    stride_out,
    K: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
):
    """``out[e] += #(ids == e)`` or the matching weight sum, over the ``N = T * K`` slots of ``ids: [T, K]``."""
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = offs < N
    tok = (offs // K).to(tl.int64)
    slot = offs % K
    ids = tl.load(ids_ptr + tok * stride_it + slot * stride_ik, mask=ok, other=0).to(tl.int32)
    bins = tl.arange(0, E_PAD)
    onehot = (ids[:, None] == bins[None, :]) & ok[:, None]
    counts = tl.sum(onehot.to(tl.int32), axis=0)
    # Experts this block never saw get no atomic at all.
    hit = (counts > 0) & (bins < E)
    if HAS_WEIGHTS:
        w = tl.load(weights_ptr + tok * stride_wt + slot * stride_wk, mask=ok, other=0.0).to(tl.float32)
        sums = tl.sum(tl.where(onehot, w[:, None], 0.0), axis=0)
        tl.atomic_add(out_ptr + bins * stride_out, sums, mask=hit, sem="relaxed")
    else:
        tl.atomic_add(out_ptr + bins * stride_out, counts.to(tl.int64), mask=hit, sem="relaxed")


def expert_counts(
    topk_ids: torch.Tensor, num_experts: int, weights: Optional[torch.Tensor], out: torch.Tensor
) -> torch.Tensor:
    """Triton tier of ``flux_engine.ops.expert_counts``: ``out += histogram``, in place.

    Args:
        topk_ids: ``[T, k]`` integer expert ids in ``[0, num_experts)`` (validated by the op).
        num_experts: ``E``.
        weights: None, ``[T]`` (one weight per token, broadcast over its k slots) or ``[T, k]``.
        out: ``[E]`` accumulator: int64 for plain counts, float32 for weighted sums.

    Returns:
        ``out``.
    """
    T, k = topk_ids.shape
    n = T * k
    if n == 0:
        return out
    e_pad = triton.next_power_of_2(num_experts)
    block_n = max(1, min(_MAX_BLOCK_N, _TILE // e_pad, triton.next_power_of_2(n)))
    if weights is None:
        w, stride_wt, stride_wk = out, 0, 0  # never read: HAS_WEIGHTS is False
    elif weights.dim() == 1:
        w, stride_wt, stride_wk = weights, weights.stride(0), 0
    else:
        w, stride_wt, stride_wk = weights, weights.stride(0), weights.stride(1)
    _expert_counts_kernel[(triton.cdiv(n, block_n),)](
        topk_ids,
        w,
        out,
        n,
        num_experts,
        topk_ids.stride(0),
        topk_ids.stride(1),
        stride_wt,
        stride_wk,
        out.stride(0),
        K=k,
        E_PAD=e_pad,
        BLOCK_N=block_n,
        HAS_WEIGHTS=weights is not None,
    )
    return out
