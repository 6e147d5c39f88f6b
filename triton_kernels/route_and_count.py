"""Fused router for profiling: router GEMM + scoring + top-k + renormalisation + per-expert accumulation.

One program owns ``BLOCK_T`` tokens: it computes their ``[BLOCK_T, E_PAD]`` logits ``x W^T`` in fp32 registers
(``H`` swept in ``BLOCK_H`` steps with the grouped MLP's ``_dot``), picks experts with ``route.py``'s
``_topk_tile``, stores weights and ids, and adds its private histogram (tokens per expert, and the sum of the
tokens' weights, e.g. received attention) into the accumulators with one atomic per expert it saw. Nothing is
read back on the host; the logits never reach memory unless asked for.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from flux_engine.triton_kernels.grouped_mlp import _dot, _precision
from flux_engine.triton_kernels.route import _topk_tile

_BLOCK_T = 16
_BLOCK_H = 32


@triton.jit
def _route_and_count_kernel(
    x_ptr, w_ptr, weights_ptr, ids_ptr, logits_ptr, tok_w_ptr, mask_ptr, counts_ptr, sums_ptr, T, E,
    stride_xt, stride_xh, stride_we, stride_wh, scaling_factor,
    H: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr, SOFTMAX: tl.constexpr, RENORMALIZE: tl.constexpr, STORE_LOGITS: tl.constexpr,
    HAS_TOKEN_WEIGHTS: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """``x: [T, H]``, ``W: [E, H]`` -> ``weights/ids: [T, K]``, ``counts[e] += #slots``, ``sums[e] += sum tok_w``
    over counted tokens (``mask != 0``). Grid ``cdiv(T, BLOCK_T)``."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    src_rows = tl.minimum(rows, T - 1).to(tl.int64)
    cols = tl.arange(0, E_PAD)
    col_ok = cols < E
    acc = tl.zeros((BLOCK_T, E_PAD), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        a = tl.load(x_ptr + src_rows[:, None] * stride_xt + h[None, :] * stride_xh, mask=h[None, :] < H, other=0.0)
        b = tl.load(w_ptr + cols[None, :] * stride_we + h[:, None] * stride_wh, mask=col_ok[None, :] & (h[:, None] < H), other=0.0)
        acc = _dot(a, b, acc, PRECISION)
    if STORE_LOGITS:
        l_ptrs = logits_ptr + rows.to(tl.int64)[:, None] * E + cols[None, :]
        tl.store(l_ptrs, acc.to(logits_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    x = tl.where(col_ok[None, :], acc, float("-inf"))
    top_w, top_i = _topk_tile(x, cols, col_ok, scaling_factor, K, K_PAD, E_PAD, BLOCK_T, SOFTMAX, RENORMALIZE)
    kcols = tl.arange(0, K_PAD)
    out_offs = rows[:, None].to(tl.int64) * K + kcols[None, :]
    slot_ok = row_ok[:, None] & (kcols[None, :] < K)
    tl.store(weights_ptr + out_offs, top_w, mask=slot_ok)
    tl.store(ids_ptr + out_offs, top_i, mask=slot_ok)

    counted = row_ok
    if HAS_MASK:
        counted = counted & (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0)
    # [BLOCK_T, E_PAD] slots per (token, expert): experts are distinct within a token, so 0 or 1.
    hits = tl.zeros((BLOCK_T, E_PAD), dtype=tl.int32)
    for j in range(K):
        idx = tl.sum(tl.where(kcols[None, :] == j, top_i, 0), axis=1)
        hits += (cols[None, :] == idx[:, None]).to(tl.int32)
    hits = tl.where(counted[:, None], hits, 0)
    counts = tl.sum(hits, axis=0)
    seen = (counts > 0) & col_ok
    tl.atomic_add(counts_ptr + cols, counts.to(tl.int64), mask=seen, sem="relaxed")
    if HAS_TOKEN_WEIGHTS:
        tw = tl.load(tok_w_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        sums = tl.sum(hits.to(tl.float32) * tw[:, None], axis=0)
        tl.atomic_add(sums_ptr + cols, sums, mask=seen, sem="relaxed")


def route_and_count(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    k: int,
    scoring: str,
    renormalize: bool,
    scaling_factor: float,
    counts_out: torch.Tensor,
    attn_sums_out: Optional[torch.Tensor],
    token_weights: Optional[torch.Tensor],
    token_mask: Optional[torch.Tensor],
    return_logits: bool,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Triton tier of ``flux_engine.ops.route_and_count`` (arguments validated by the op)."""
    T, H = x.shape
    E = router_weight.shape[0]
    weights = torch.empty((T, k), dtype=torch.float32, device=x.device)
    ids = torch.empty((T, k), dtype=torch.int32, device=x.device)
    logits = torch.empty((T, E), dtype=x.dtype, device=x.device) if return_logits else None
    if T == 0:
        return weights, ids, logits
    has_sums = attn_sums_out is not None and token_weights is not None
    _route_and_count_kernel[(triton.cdiv(T, _BLOCK_T),)](
        x, router_weight, weights, ids, logits if return_logits else weights,
        token_weights if has_sums else weights, token_mask if token_mask is not None else ids,
        counts_out, attn_sums_out if has_sums else weights, T, E, x.stride(0), x.stride(1),
        router_weight.stride(0), router_weight.stride(1), float(scaling_factor),
        H=H, K=k, K_PAD=triton.next_power_of_2(k), E_PAD=max(16, triton.next_power_of_2(E)), BLOCK_T=_BLOCK_T,
        BLOCK_H=_BLOCK_H, SOFTMAX=scoring == "softmax", RENORMALIZE=bool(renormalize), STORE_LOGITS=return_logits,
        HAS_TOKEN_WEIGHTS=has_sums, HAS_MASK=token_mask is not None, PRECISION=_precision(x.dtype),
    )  # fmt: skip
    return weights, ids, logits
