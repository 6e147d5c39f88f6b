"""Fused router: score the expert logits, pick the top k, renormalise and scale, in one kernel.

Each program owns ``BLOCK_T`` tokens and holds their whole ``[BLOCK_T, E_PAD]`` logit tile in registers
(``E_PAD``: ``E`` rounded up to a power of two, padding loaded as ``-inf``), so MoE widths up to a few
hundred experts need no second pass over memory.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

# Elements of the [BLOCK_T, E_PAD] tile a program holds: enough tokens per program to amortise the
# launch for narrow routers, few enough registers per thread for wide ones.
_TILE = 4096
_MAX_BLOCK_T = 64


@triton.jit
def _topk_tile(
    x, cols, col_ok, scaling_factor, K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, SOFTMAX: tl.constexpr, RENORMALIZE: tl.constexpr,
):  # fmt: skip
    """Scores, top-k and renormalisation of a ``[BLOCK_T, E_PAD]`` fp32 logit tile (padding columns ``-inf``):
    ``(weights [BLOCK_T, K_PAD] fp32, ids [BLOCK_T, K_PAD] int32)``, slots past K zero. Shared with the fused
    router of ``route_and_count``."""
    if SOFTMAX:
        row_max = tl.max(x, axis=1)
        denom = tl.sum(tl.exp(x - row_max[:, None]), axis=1)

    # Both scorings are increasing in the logit, so selecting on the logit picks the same experts as
    # selecting on the score while never merging distinct logits whose fp32 scores round to one value.
    # torch.topk ranks NaN above everything; so does this key.
    key = tl.where(x != x, float("inf"), x)
    # A separate availability mask (not overwriting picks with -inf) keeps a picked column from being
    # picked again when the remaining real logits are -inf themselves.
    avail = tl.broadcast_to(col_ok[None, :], (BLOCK_T, E_PAD))
    kcols = tl.arange(0, K_PAD)
    top_w = tl.zeros((BLOCK_T, K_PAD), dtype=tl.float32)
    top_i = tl.zeros((BLOCK_T, K_PAD), dtype=tl.int32)
    for j in range(K):
        best = tl.max(tl.where(avail, key, float("-inf")), axis=1)
        # Lowest available column holding the maximum: ties go to the lowest expert id.
        idx = tl.min(tl.where(avail & (key == best[:, None]), cols[None, :], E_PAD), axis=1)
        hit = cols[None, :] == idx[:, None]
        avail = avail & (cols[None, :] != idx[:, None])
        picked = tl.sum(tl.where(hit, x, 0.0), axis=1)
        if SOFTMAX:
            score = tl.exp(picked - row_max) / denom
        else:
            score = 1.0 / (1.0 + tl.exp(-picked))
        top_w = tl.where(kcols[None, :] == j, score[:, None], top_w)
        top_i = tl.where(kcols[None, :] == j, idx[:, None], top_i)

    if RENORMALIZE:
        top_w = top_w / tl.sum(top_w, axis=1)[:, None]
    top_w = top_w * scaling_factor

    return top_w, top_i


@triton.jit
def _route_kernel(
    logits_ptr,
    weights_ptr,
    ids_ptr,
    T,
    E,
    stride_t,
    stride_e,
    scaling_factor,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    SOFTMAX: tl.constexpr,
    RENORMALIZE: tl.constexpr,
):
    """``logits: [T, E]`` -> ``weights: [T, K]`` float32, ``ids: [T, K]`` int32; grid ``cdiv(T, BLOCK_T)``."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, E_PAD)
    row_ok = rows < T
    col_ok = cols < E
    # Rows past T re-read the last token instead of an all -inf row, which would make NaNs (never stored).
    src_rows = tl.minimum(rows, T - 1).to(tl.int64)
    x = tl.load(
        logits_ptr + src_rows[:, None] * stride_t + cols[None, :] * stride_e,
        mask=col_ok[None, :],
        other=float("-inf"),
    ).to(tl.float32)

    top_w, top_i = _topk_tile(x, cols, col_ok, scaling_factor, K, K_PAD, E_PAD, BLOCK_T, SOFTMAX, RENORMALIZE)
    kcols = tl.arange(0, K_PAD)
    out_offs = rows[:, None].to(tl.int64) * K + kcols[None, :]
    out_mask = row_ok[:, None] & (kcols[None, :] < K)
    tl.store(weights_ptr + out_offs, top_w, mask=out_mask)
    tl.store(ids_ptr + out_offs, top_i, mask=out_mask)


def route(
    logits: torch.Tensor, k: int, scoring: str, renormalize: bool, scaling_factor: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Triton tier of ``flux_engine.ops.route``.

    Args:
        logits: ``[T, E]`` float (any strides; scored in fp32).
        k: experts per token, ``1 <= k <= E``.
        scoring: ``"softmax"`` or ``"sigmoid"``.
        renormalize: divide the k picked scores by their sum.
        scaling_factor: multiplies the final weights.

    Returns:
        ``topk_weights: [T, k]`` float32 and ``topk_ids: [T, k]`` int32, by descending score; equal
        scores go to the lowest expert id.
    """
    T, E = logits.shape
    weights = torch.empty((T, k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((T, k), dtype=torch.int32, device=logits.device)
    if T == 0:
        return weights, ids
    e_pad = triton.next_power_of_2(E)
    block_t = max(1, min(_MAX_BLOCK_T, _TILE // e_pad, triton.next_power_of_2(T)))
    _route_kernel[(triton.cdiv(T, block_t),)](
        logits,
        weights,
        ids,
        T,
        E,
        logits.stride(0),
        logits.stride(1),
        float(scaling_factor),
        K=k,
        K_PAD=triton.next_power_of_2(k),
        E_PAD=e_pad,
        BLOCK_T=block_t,
        SOFTMAX=scoring == "softmax",
        RENORMALIZE=bool(renormalize),
    )
    return weights, ids
