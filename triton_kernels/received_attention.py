"""Received attention without the ``T x T`` matrix: the attention probability each key token receives.

Two passes over ``(batch, query head)`` pairs, both tiled ``BLOCK_T x BLOCK_T``:
1. ``_row_lse_kernel``: per query row ``i``, the log-sum-exp of its scaled scores ``s_ij = <q_i, k_j> / sqrt(D)``
   over the keys it sees (online max/sum, like flash attention's forward);
2. ``_col_sum_kernel``: per key ``j``, ``sum_i exp(s_ij - lse_i)`` over the queries that see it, written per head
   (``[B, Hq, T]``); the launcher sums heads deterministically and divides by ``Hq * T``.
GQA: query head ``h`` reads key head ``h // (Hq / Hkv)``.

Each program loads its own block (queries, or keys) once and sweeps the other side; under causal masking the
sweep stops at the diagonal (pass 1: keys up to the block's last query; pass 2: queries from the block's first
key), half the work. Scores are tensor-core dots on the inputs' dtype with fp32 accumulation (bf16/fp16 operands;
fp32 inputs run TF32 on a GPU, ``grouped_mlp._precision``); the softmax math is fp32. ``T`` is a run-time argument:
one compiled kernel serves every sequence length.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from flux_engine.triton_kernels.grouped_mlp import _dot, _precision

# 64 query/key rows per block: the M of a Hopper wgmma (a 32-row block compiles to mma.sync).
_BLOCK_T = 64


@triton.jit
def _load_rows(base, rows, T, stride_t, D: tl.constexpr, D_PAD: tl.constexpr):
    """``[len(rows), D_PAD]`` tile of one head's rows (zeros past T and D), in the input dtype."""
    d = tl.arange(0, D_PAD)
    return tl.load(base + rows[:, None] * stride_t + d[None, :], mask=(rows[:, None] < T) & (d[None, :] < D), other=0.0)


@triton.jit
def _visible(qi, kj, T, mask_base, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
    ok = (qi[:, None] < T) & (kj[None, :] < T)
    if CAUSAL:
        ok = ok & (kj[None, :] <= qi[:, None])
    if HAS_MASK:
        q_ok = tl.load(mask_base + qi, mask=qi < T, other=0) != 0
        k_ok = tl.load(mask_base + kj, mask=kj < T, other=0) != 0
        ok = ok & q_ok[:, None] & k_ok[None, :]
    return ok


@triton.jit
def _row_lse_kernel(
    q_ptr, k_ptr, mask_ptr, lse_ptr, T, HQ, GROUP, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, scale,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_T: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    HAS_MASK: tl.constexpr,
):  # fmt: skip
    """``lse: [B * Hq, T]`` fp32; grid ``(B * Hq, cdiv(T, BLOCK_T))``."""
    bh = tl.program_id(0)
    b = bh // HQ
    h = bh % HQ
    q0 = tl.program_id(1) * BLOCK_T
    qi = q0 + tl.arange(0, BLOCK_T)
    q = _load_rows(q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh, qi, T, stride_qt, D, D_PAD)
    k_base = k_ptr + b.to(tl.int64) * stride_kb + (h // GROUP).to(tl.int64) * stride_kh
    m = tl.full((BLOCK_T,), float("-inf"), dtype=tl.float32)
    acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
    k_end = tl.minimum(T, q0 + BLOCK_T) if CAUSAL else T  # keys past the block's last query are never visible
    for k0 in range(0, k_end, BLOCK_T):
        kj = k0 + tl.arange(0, BLOCK_T)
        k = _load_rows(k_base, kj, T, stride_kt, D, D_PAD)
        s = _dot(q, tl.trans(k), tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32), PRECISION) * scale
        s = tl.where(_visible(qi, kj, T, mask_ptr + b.to(tl.int64) * T, CAUSAL, HAS_MASK), s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        # Rows with nothing visible yet keep m = -inf; shift by 0 there to avoid inf - inf.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        acc = acc * tl.exp(m - shift) + tl.sum(tl.exp(s - shift[:, None]), axis=1)
        m = m_new
    # Lanes past T saw nothing (acc = 0): never stored, but keep log() finite.
    lse = m + tl.log(tl.where(acc > 0, acc, 1.0))
    tl.store(lse_ptr + bh.to(tl.int64) * T + qi, lse, mask=qi < T)


@triton.jit
def _col_sum_kernel(
    q_ptr, k_ptr, mask_ptr, lse_ptr, out_ptr, T, HQ, GROUP, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    scale, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_T: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    HAS_MASK: tl.constexpr,
):  # fmt: skip
    """``out: [B * Hq, T]`` fp32, ``out[bh, j] = sum_i exp(s_ij - lse_i)``; grid ``(B * Hq, cdiv(T, BLOCK_T))``."""
    bh = tl.program_id(0)
    b = bh // HQ
    h = bh % HQ
    k0 = tl.program_id(1) * BLOCK_T
    kj = k0 + tl.arange(0, BLOCK_T)
    k = _load_rows(k_ptr + b.to(tl.int64) * stride_kb + (h // GROUP).to(tl.int64) * stride_kh, kj, T, stride_kt, D, D_PAD)
    q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
    q_start = k0 if CAUSAL else 0  # queries before the block's first key see none of it
    for q0 in range(q_start, T, BLOCK_T):
        qi = q0 + tl.arange(0, BLOCK_T)
        q = _load_rows(q_base, qi, T, stride_qt, D, D_PAD)
        # s^T = k q^T: [keys, queries], the fixed key block as the dot's M.
        s_t = _dot(k, tl.trans(q), tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32), PRECISION) * scale
        lse = tl.load(lse_ptr + bh.to(tl.int64) * T + qi, mask=qi < T, other=0.0)
        visible = tl.trans(_visible(qi, kj, T, mask_ptr + b.to(tl.int64) * T, CAUSAL, HAS_MASK))
        acc += tl.sum(tl.where(visible, tl.exp(s_t - lse[None, :]), 0.0), axis=1)
    tl.store(out_ptr + bh.to(tl.int64) * T + kj, acc, mask=kj < T)


def received_attention(q: torch.Tensor, k: torch.Tensor, causal: bool, mask=None) -> torch.Tensor:
    """Triton tier of ``flux_engine.ops.received_attention``: ``q [B, Hq, T, D]``, ``k [B, Hkv, T, D]``, optional
    ``mask [B, T]`` (0 = padding: neither attends nor is attended) -> ``[B, T]`` fp32 (validated by the op)."""
    B, HQ, T, D = q.shape
    HKV = k.shape[1]
    out = torch.zeros((B, T), dtype=torch.float32, device=q.device)
    if B * HQ * T == 0:
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    if k.dtype != q.dtype:
        k = k.to(q.dtype)  # one dot dtype: the queries'
    lse = torch.empty((B * HQ, T), dtype=torch.float32, device=q.device)
    per_head = torch.empty((B * HQ, T), dtype=torch.float32, device=q.device)
    grid = (B * HQ, triton.cdiv(T, _BLOCK_T))
    args = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), 1.0 / math.sqrt(D))
    meta = dict(
        D=D, D_PAD=max(16, triton.next_power_of_2(D)), BLOCK_T=_BLOCK_T, CAUSAL=bool(causal),
        PRECISION=_precision(q.dtype), HAS_MASK=mask is not None,
    )  # fmt: skip
    m = mask.contiguous() if mask is not None else lse
    _row_lse_kernel[grid](q, k, m, lse, T, HQ, HQ // HKV, *args, **meta)
    _col_sum_kernel[grid](q, k, m, lse, per_head, T, HQ, HQ // HKV, *args, **meta)
    queries = float(T) if mask is None else (mask != 0).sum(dim=1, keepdim=True).clamp(min=1).float()
    return per_head.view(B, HQ, T).sum(dim=1).div_(queries * HQ)
