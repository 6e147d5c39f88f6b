"""Grouped SwiGLU expert GEMMs over a routing plan: kernels and launchers of the triton grouped MLP.

Rows are the (token, physical expert) pairs of a ``RoutingPlan``, grouped by expert: row ``r`` of expert ``e``
reads token ``t_r = sorted_token_ids[r]``. ``R = T * k`` bounds the number of rows; the true count lives only
on the device (``expert_offsets[E]``), and every buffer and grid is sized from ``R``, so nothing here reads the
GPU from the host.

Row blocks. A kernel walking rows splits each expert's rows into blocks of ``BLOCK_M`` and launches
``cdiv(R, BLOCK_M) + min(E, R)`` row blocks, a bound on ``sum_e cdiv(n_e, BLOCK_M)`` (each expert wastes at
most one partial block). ``_expert_block`` maps a row block to its expert with a cumulative sum of the
per-expert block counts, computed from ``expert_offsets`` in registers (``E_PAD`` lanes), so no block table
is built, and each kernel may use its own ``BLOCK_M``. Blocks past the last row return at once.

Kernels (``W1 = gate_up [E, 2I, H]``, ``W2 = down [E, H, I]``, ``gu`` = gate | up pre-activations ``[R, 2I]``):
- ``_gate_up_kernel``: ``h[r] = silu(x[t_r] W1g_e^T) * (x[t_r] W1u_e^T)``; x rows gathered in the prologue
  (no permuted copy of x), SwiGLU in the epilogue; optionally stores ``gu`` (saved for backward).
- ``_rows_kernel``: ``out[r] = A[r] @ W_e`` over sorted rows; stores rows, or with ``SCATTER`` adds
  (``w_r *``) the result into ``out[t_r]`` with atomics. Forward ``Y = h W2_e^T``; backward ``dx_r = dgu W1_e``.
- ``_combine_kernel``: deterministic scatter, ``out[t] = sum_j c[t, j] * src[slot_rows[t, j]]`` with
  ``c = topk_weights`` (forward; slots sharing a row add their weights naturally) or 1 on each distinct row
  (backward dx, so a collapsed row counts once).
- ``_down_bwd_kernel``: ``g[r] = dout[t_r] @ W2_e`` (gathered); epilogue: ``dgu[r] = SwiGLU'(gu[r]) * w_r g[r]``
  and per-column-block partial dots ``<g[r], h[r]> = <dout[t_r], Y[r]>``, the routing-weight gradient,
  so Y is never saved.
- ``_weight_grad_kernel``: ``dW_e = sum_{r in e} a(r)^T b(r)``, a sequential sweep over the expert's rows
  (deterministic): ``dW1_e = sum dgu[r]^T x[t_r]``, ``dW2_e = sum w_r dout[t_r]^T h[r]`` with h from gu.
- ``_row_weights_kernel``: ``w_r`` = sum of the weights of the slots that collapsed into row r.
All GEMMs accumulate in fp32; operands are the input dtype.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from flux_engine.backend import triton_interpreting
from flux_engine.ops.permute import RoutingPlan
from flux_engine.triton_kernels.grouped_mlp_configs import BlockConfig, config_for, rows_bucket

# Tokens x columns of a _combine_kernel program, tokens of a _row_weights_kernel program.
_COMBINE_BLOCK_T = 16
_COMBINE_BLOCK_N = 128
_ROW_WEIGHTS_BLOCK_T = 128


# ----------------------------------------------------------------------------------------------- jit helpers


@triton.jit
def _swizzle(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)`` of a 1-D grid, ``GROUP_M`` row blocks per sweep over the columns: consecutive
    programs share one expert's weight tiles (and the same rows), which then come from L2."""
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    return pid_m, pid_n


@triton.jit
def _expert_block(offsets_ptr, pid_m, E, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """``(expert, start, end)`` of row block ``pid_m``: its rows are ``start + [0, BLOCK_M)`` below ``end``.

    Blocks are numbered expert by expert, ``cdiv(n_e, BLOCK_M)`` each; past the last one ``start >= end``.
    """
    e = tl.arange(0, E_PAD)
    lo = tl.load(offsets_ptr + e, mask=e < E, other=0)
    hi = tl.load(offsets_ptr + e + 1, mask=e < E, other=0)
    blocks = (hi - lo + BLOCK_M - 1) // BLOCK_M
    blocks_end = tl.cumsum(blocks, axis=0)
    expert = tl.sum((blocks_end <= pid_m).to(tl.int32), axis=0)
    mine = e == expert
    start = tl.sum(tl.where(mine, lo + (pid_m - blocks_end + blocks) * BLOCK_M, 0), axis=0)
    end = tl.sum(tl.where(mine, hi, 0), axis=0)
    return expert, start, end


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    """``acc + a @ b``. ``PRECISION``: ``"ieee"``/``"tf32"`` (fp32 operands; ignored for 16-bit ones), or
    ``"upcast"``: dot fp32 copies. Triton's interpreter multiplies the bit patterns of bf16 operands
    (triton-lang/triton#11584), so interpreted bf16 runs use ``"upcast"``; compiled kernels never do."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _mma(
    acc, a_ptrs, a_ok, b_ptrs, b_ok, stride_ak, stride_bk,
    K: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """``acc [BM, BN] += A @ B`` over ``K``: ``A[m, k]`` at ``a_ptrs[m] + k * stride_ak`` (``a_ptrs: [BM, 1]``),
    ``B[k, n]`` at ``b_ptrs[n] + k * stride_bk`` (``b_ptrs: [1, BN]``). K is constexpr: a static loop, which
    Triton pipelines on GPUs and every interpreter version runs."""
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptrs + k[None, :] * stride_ak, mask=a_ok[:, None] & (k[None, :] < K), other=0.0)
        b = tl.load(b_ptrs + k[:, None] * stride_bk, mask=(k[:, None] < K) & b_ok[None, :], other=0.0)
        acc = _dot(a, b, acc, PRECISION)
    return acc


@triton.jit
def _silu(g):
    return g / (1.0 + tl.exp(-g))


@triton.jit
def _load_gate_up(gu_ptrs, mask, I: tl.constexpr):
    """fp32 gate and up pre-activations; ``gu_ptrs`` point at the gate half of rows of ``gu [R, 2I]``."""
    gate = tl.load(gu_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptrs + I, mask=mask, other=0.0).to(tl.float32)
    return gate, up


@triton.jit
def _swiglu_grad(gate, up, dh):
    """``(d gate, d up)`` of ``h = silu(gate) * up`` given ``dh``."""
    sig = 1.0 / (1.0 + tl.exp(-gate))
    silu = gate * sig
    return dh * up * sig * (1.0 + gate * (1.0 - sig)), dh * silu


@triton.jit
def _slot_column(tile, kcols, j):
    """Column ``j`` of a ``[BLOCK_T, K_PAD]`` per-slot tile."""
    return tl.sum(tl.where(kcols[None, :] == j, tile, 0), axis=1)


@triton.jit
def _first_slot_of_row(rows, kcols, j, row_j):
    """Whether slot ``j`` is the first slot of its token landing in row ``row_j`` (collapsed duplicates share it)."""
    earlier = (kcols[None, :] < j) & (rows == row_j[:, None])
    return tl.sum(earlier.to(tl.int32), axis=1) == 0


# ------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _gate_up_kernel(
    x_ptr,
    w_ptr,
    token_ids_ptr,
    offsets_ptr,
    h_ptr,
    gu_ptr,
    E,
    num_m,
    stride_xt,
    stride_xh,
    stride_we,
    stride_wn,
    stride_wh,
    H: tl.constexpr,
    I: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    STORE_H: tl.constexpr,
    STORE_GU: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``x: [T, H]``, ``W1: [E, 2I, H]`` -> ``h: [R, I]`` and/or ``gu: [R, 2I]`` in sorted row order.

    Grid ``num_m * cdiv(I, BLOCK_N)``.
    """
    pid_m, pid_n = _swizzle(tl.program_id(0), num_m, tl.cdiv(I, BLOCK_N), GROUP_M)
    expert, start, end = _expert_block(offsets_ptr, pid_m, E, E_PAD, BLOCK_M)
    if start >= end:
        return
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    tokens = tl.load(token_ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    # The weight tile's columns alternate gate row n and up row I + n: one dot yields both SwiGLU inputs of
    # the same columns, split apart in the epilogue.
    c = tl.arange(0, 2 * BLOCK_N)
    n_of_c = pid_n * BLOCK_N + c // 2
    w_rows = n_of_c + (c % 2) * I
    acc = _mma(
        tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32),
        x_ptr + tokens[:, None] * stride_xt,
        row_ok,
        w_ptr + expert.to(tl.int64) * stride_we + w_rows[None, :] * stride_wn,
        n_of_c < I,
        stride_xh,
        stride_wh,
        H,
        BLOCK_K,
        PRECISION,
    )
    gate, up = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = row_ok[:, None] & (cols[None, :] < I)
    if STORE_GU:
        gu_ptrs = gu_ptr + rows.to(tl.int64)[:, None] * (2 * I) + cols[None, :]
        tl.store(gu_ptrs, gate.to(gu_ptr.dtype.element_ty), mask=mask)
        tl.store(gu_ptrs + I, up.to(gu_ptr.dtype.element_ty), mask=mask)
    if STORE_H:
        h = _silu(gate) * up
        tl.store(h_ptr + rows.to(tl.int64)[:, None] * I + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rows_kernel(
    a_ptr,
    w_ptr,
    token_ids_ptr,
    offsets_ptr,
    row_w_ptr,
    out_ptr,
    E,
    num_m,
    N,
    stride_we,
    stride_wn,
    stride_wk,
    stride_out,
    K: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SCATTER: tl.constexpr,
    WEIGHTED: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``acc[r] = A[r] @ W_e^T`` for ``A: [R, K]`` (contiguous, sorted rows), ``W_e[n, k]`` at
    ``w_ptr + e * stride_we + n * stride_wn + k * stride_wk``.

    Stores ``out[r] = acc[r]`` (``out: [R, N]``), or with ``SCATTER`` adds ``(w_r *) acc[r]`` into
    ``out[t_r]`` (``out: [T, N]`` float32) atomically. Grid ``num_m * cdiv(N, BLOCK_N)``.
    """
    pid_m, pid_n = _swizzle(tl.program_id(0), num_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    expert, start, end = _expert_block(offsets_ptr, pid_m, E, E_PAD, BLOCK_M)
    if start >= end:
        return
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = _mma(
        tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
        a_ptr + rows.to(tl.int64)[:, None] * K,
        row_ok,
        w_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wn,
        col_ok,
        1,
        stride_wk,
        K,
        BLOCK_K,
        PRECISION,
    )
    mask = row_ok[:, None] & col_ok[None, :]
    if SCATTER:
        if WEIGHTED:
            acc = acc * tl.load(row_w_ptr + rows, mask=row_ok, other=0.0)[:, None]
        tokens = tl.load(token_ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        tl.atomic_add(out_ptr + tokens[:, None] * stride_out + cols[None, :], acc, mask=mask, sem="relaxed")
    else:
        out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _down_bwd_kernel(
    dout_ptr,
    w_ptr,
    token_ids_ptr,
    offsets_ptr,
    gu_ptr,
    row_w_ptr,
    dgu_ptr,
    partial_ptr,
    E,
    num_m,
    num_n,
    stride_dt,
    stride_dh,
    stride_we,
    stride_wh,
    stride_wi,
    H: tl.constexpr,
    I: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    STORE_DGU: tl.constexpr,
    STORE_PARTIAL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``dout: [T, H]``, ``W2: [E, H, I]``, ``gu: [R, 2I]``, ``row_w: [R]`` -> ``dgu: [R, 2I]`` and
    ``partial: [R, num_n]`` float32 (``<g[r], h[r]>`` over column block ``pid_n``). Grid ``num_m * num_n``."""
    pid_m, pid_n = _swizzle(tl.program_id(0), num_m, num_n, GROUP_M)
    expert, start, end = _expert_block(offsets_ptr, pid_m, E, E_PAD, BLOCK_M)
    if start >= end:
        return
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    tokens = tl.load(token_ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < I
    g = _mma(
        tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
        dout_ptr + tokens[:, None] * stride_dt,
        row_ok,
        w_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wi,
        col_ok,
        stride_dh,
        stride_wh,
        H,
        BLOCK_K,
        PRECISION,
    )
    mask = row_ok[:, None] & col_ok[None, :]
    gu_ptrs = gu_ptr + rows.to(tl.int64)[:, None] * (2 * I) + cols[None, :]
    gate, up = _load_gate_up(gu_ptrs, mask, I)
    if STORE_PARTIAL:
        tl.store(partial_ptr + rows.to(tl.int64) * num_n + pid_n, tl.sum(g * (_silu(gate) * up), axis=1), mask=row_ok)
    if STORE_DGU:
        w = tl.load(row_w_ptr + rows, mask=row_ok, other=0.0)
        dgate, dup = _swiglu_grad(gate, up, g * w[:, None])
        dgu_ptrs = dgu_ptr + rows.to(tl.int64)[:, None] * (2 * I) + cols[None, :]
        tl.store(dgu_ptrs, dgate.to(dgu_ptr.dtype.element_ty), mask=mask)
        tl.store(dgu_ptrs + I, dup.to(dgu_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _weight_grad_step(
    acc,
    r0,
    end,
    a_ptr,
    b_ptr,
    token_ids_ptr,
    row_w_ptr,
    m,
    m_ok,
    n,
    n_ok,
    stride_ar,
    stride_am,
    stride_br,
    stride_bn,
    I: tl.constexpr,
    BLOCK_K: tl.constexpr,
    A_BY_TOKEN: tl.constexpr,
    A_ROW_WEIGHT: tl.constexpr,
    B_BY_TOKEN: tl.constexpr,
    B_SWIGLU: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``acc [BM, BN] += a(rows)^T b(rows)`` for rows ``r0 + [0, BLOCK_K)`` below ``end``."""
    rows = r0 + tl.arange(0, BLOCK_K)
    row_ok = rows < end
    tokens = tl.load(token_ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    a_rows = tokens if A_BY_TOKEN else rows.to(tl.int64)
    a_mask = m_ok[:, None] & row_ok[None, :]
    a = tl.load(a_ptr + a_rows[None, :] * stride_ar + m[:, None] * stride_am, mask=a_mask, other=0.0)
    if A_ROW_WEIGHT:
        a = (a * tl.load(row_w_ptr + rows, mask=row_ok, other=0.0)[None, :]).to(a_ptr.dtype.element_ty)
    b_mask = row_ok[:, None] & n_ok[None, :]
    if B_SWIGLU:
        gate, up = _load_gate_up(b_ptr + rows.to(tl.int64)[:, None] * (2 * I) + n[None, :], b_mask, I)
        b = (_silu(gate) * up).to(b_ptr.dtype.element_ty)
    else:
        b_rows = tokens if B_BY_TOKEN else rows.to(tl.int64)
        b = tl.load(b_ptr + b_rows[:, None] * stride_br + n[None, :] * stride_bn, mask=b_mask, other=0.0)
    return _dot(a, b, acc, PRECISION)


@triton.jit
def _weight_grad_kernel(
    a_ptr,
    b_ptr,
    token_ids_ptr,
    offsets_ptr,
    row_w_ptr,
    out_ptr,
    M,
    N,
    stride_ar,
    stride_am,
    stride_br,
    stride_bn,
    stride_oe,
    stride_om,
    stride_on,
    I: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    A_BY_TOKEN: tl.constexpr,
    A_ROW_WEIGHT: tl.constexpr,
    B_BY_TOKEN: tl.constexpr,
    B_SWIGLU: tl.constexpr,
    ROW_LOOP_FOR: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``out[e] = sum over rows r of expert e of a(r)^T b(r)``: ``[M, N]`` per expert, ``out: [E, M, N]``.

    ``a(r) = (w_r *) A[t_r or r, :M]``, ``b(r) = B[t_r or r, :N]`` or ``silu(gate) * up`` of ``gu[r]`` (then
    ``b_ptr`` is ``gu: [R, 2I]``). One program per (expert, M tile, N tile); grid ``E * tiles``. The sweep over
    the expert's rows is sequential, so the sum is deterministic; an expert without rows gets zeros.
    """
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    expert = pid // (num_m * num_n)
    tile = pid % (num_m * num_n)
    m = (tile // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = (tile % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < M
    n_ok = n < N
    start = tl.load(offsets_ptr + expert)
    end = tl.load(offsets_ptr + expert + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # The trip count depends on the routing. A for loop is software-pipelined on GPUs; Triton 3.6's
    # interpreter cannot take runtime range() bounds, so interpreted runs may use the equivalent while loop.
    if ROW_LOOP_FOR:
        for r0 in range(start, end, BLOCK_K):
            acc = _weight_grad_step(
                acc, r0, end, a_ptr, b_ptr, token_ids_ptr, row_w_ptr, m, m_ok, n, n_ok, stride_ar, stride_am,
                stride_br, stride_bn, I, BLOCK_K, A_BY_TOKEN, A_ROW_WEIGHT, B_BY_TOKEN, B_SWIGLU, PRECISION,
            )  # fmt: skip
    else:
        r0 = start
        while r0 < end:
            acc = _weight_grad_step(
                acc, r0, end, a_ptr, b_ptr, token_ids_ptr, row_w_ptr, m, m_ok, n, n_ok, stride_ar, stride_am,
                stride_br, stride_bn, I, BLOCK_K, A_BY_TOKEN, A_ROW_WEIGHT, B_BY_TOKEN, B_SWIGLU, PRECISION,
            )  # fmt: skip
            r0 += BLOCK_K
    out_ptrs = out_ptr + expert.to(tl.int64) * stride_oe + m[:, None] * stride_om + n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _combine_kernel(
    src_ptr,
    slot_rows_ptr,
    weights_ptr,
    out_ptr,
    T,
    N,
    stride_src,
    stride_wt,
    stride_wk,
    stride_out,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WEIGHTED: tl.constexpr,
):
    """``out[t] = sum_j c[t, j] * src[slot_rows[t, j]]`` in fp32, ``c = weights[t, j]`` (``WEIGHTED``) or 1 on
    the first slot of each distinct row. ``src: [R, N]``, ``out: [T, N]``; grid
    ``(cdiv(T, BLOCK_T), cdiv(N, BLOCK_N))``."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_ok = tokens < T
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    kcols = tl.arange(0, K_PAD)
    slot_ok = token_ok[:, None] & (kcols[None, :] < K)
    rows = tl.load(slot_rows_ptr + tokens.to(tl.int64)[:, None] * K + kcols[None, :], mask=slot_ok, other=-1)
    mask = token_ok[:, None] & (cols[None, :] < N)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for j in range(K):
        row_j = _slot_column(rows, kcols, j)
        if WEIGHTED:
            coef = tl.load(weights_ptr + tokens.to(tl.int64) * stride_wt + j * stride_wk, mask=token_ok, other=0.0)
            coef = coef.to(tl.float32)
        else:
            coef = _first_slot_of_row(rows, kcols, j, row_j).to(tl.float32)
        src = tl.load(src_ptr + row_j.to(tl.int64)[:, None] * stride_src + cols[None, :], mask=mask, other=0.0)
        acc += coef[:, None] * src.to(tl.float32)
    out_ptrs = out_ptr + tokens.to(tl.int64)[:, None] * stride_out + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row_weights_kernel(
    slot_rows_ptr,
    weights_ptr,
    out_ptr,
    T,
    stride_wt,
    stride_wk,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """``out[r] = sum of weights[t, j] over the slots with slot_rows[t, j] == r`` (fp32, slot order); grid
    ``cdiv(T, BLOCK_T)``. Written by each row's first slot only, so no two programs touch one row."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_ok = tokens < T
    kcols = tl.arange(0, K_PAD)
    slot_ok = token_ok[:, None] & (kcols[None, :] < K)
    rows = tl.load(slot_rows_ptr + tokens.to(tl.int64)[:, None] * K + kcols[None, :], mask=slot_ok, other=-1)
    w = tl.load(
        weights_ptr + tokens.to(tl.int64)[:, None] * stride_wt + kcols[None, :] * stride_wk, mask=slot_ok, other=0.0
    ).to(tl.float32)
    for j in range(K):
        row_j = _slot_column(rows, kcols, j)
        total = tl.sum(tl.where(rows == row_j[:, None], w, 0.0), axis=1)
        first = _first_slot_of_row(rows, kcols, j, row_j)
        tl.store(out_ptr + row_j, total, mask=token_ok & first)


# ------------------------------------------------------------------------------------------------ launchers


def _precision(dtype: torch.dtype) -> str:
    """``PRECISION`` of ``_dot``: like torch.matmul, fp32 GEMMs are exact fp32 unless torch allows TF32."""
    if dtype == torch.bfloat16 and triton_interpreting():
        return "upcast"
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _row_blocks(plan: RoutingPlan, block_m: int) -> int:
    """Upper bound on ``sum_e cdiv(n_e, block_m)`` from host-known sizes only."""
    R = plan.capacity
    return triton.cdiv(R, block_m) + min(plan.num_experts, R)


def _meta(cfg: BlockConfig, grouped: bool = True) -> dict:
    meta = dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K)
    meta.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if grouped:
        meta["GROUP_M"] = cfg.GROUP_M
    return meta


def _config(kind: str, N: int, K: int, plan: RoutingPlan, dtype: torch.dtype, device: torch.device, tune):
    """Config of a launch; ``tune(cfg)`` runs it on scratch outputs, for the opt-in autotuner."""
    return config_for(kind, N, K, rows_bucket(plan.capacity, plan.num_experts), dtype, device, tune=tune)


def row_loop_is_for() -> bool:
    """Whether ``_weight_grad_kernel`` sweeps rows with a (pipelined) for loop rather than a while loop."""
    return not triton_interpreting()


def _empty_like(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else torch.empty_like(t)


def gate_up_forward(
    x: torch.Tensor, gate_up: torch.Tensor, plan: RoutingPlan, *, store_h: bool = True, store_gu: bool = False
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``h: [R, I]`` (``store_h``) and ``gu: [R, 2I]`` pre-activations (``store_gu``) in x's dtype, sorted rows.

    Args:
        x: ``[T, H]``; gate_up: ``[E, 2I, H]``; plan: the routing plan over ``E`` experts.
    """
    E, two_i, H = gate_up.shape
    I = two_i // 2
    R = plan.capacity
    h = torch.empty((R, I), dtype=x.dtype, device=x.device) if store_h else None
    gu = torch.empty((R, two_i), dtype=x.dtype, device=x.device) if store_gu else None

    def launch(cfg: BlockConfig, h_out: Optional[torch.Tensor], gu_out: Optional[torch.Tensor]) -> None:
        num_m = _row_blocks(plan, cfg.BLOCK_M)
        _gate_up_kernel[(num_m * triton.cdiv(I, cfg.BLOCK_N),)](
            x, gate_up, plan.sorted_token_ids, plan.expert_offsets, h_out if store_h else x, gu_out if store_gu else x,
            E, num_m, x.stride(0), x.stride(1), *gate_up.stride(), H=H, I=I, E_PAD=triton.next_power_of_2(E),
            STORE_H=store_h, STORE_GU=store_gu, PRECISION=_precision(x.dtype), **_meta(cfg),
        )  # fmt: skip

    if R:
        tune = lambda cfg: launch(cfg, _empty_like(h), _empty_like(gu))  # noqa: E731
        launch(_config("gate_up", I, H, plan, x.dtype, x.device, tune), h, gu)
    return h, gu


def rows_matmul(
    a: torch.Tensor,
    weight: torch.Tensor,
    transpose: bool,
    plan: RoutingPlan,
    *,
    kind: str,
    scatter_into: Optional[torch.Tensor] = None,
    row_weights: Optional[torch.Tensor] = None,
) -> Optional[torch.Tensor]:
    """Per sorted row r of expert e: ``a[r] @ W_e^T`` (or ``a[r] @ W_e`` with ``transpose``).

    Args:
        a: ``[R, K]`` contiguous rows (h or dgu).
        weight: ``[E, N, K]`` (or ``[E, K, N]`` with ``transpose``).
        plan: the routing plan.
        kind: the config kind (``down`` or ``dx``).
        scatter_into: ``[T, N]`` float32: add each row into its token's row atomically instead of returning
            the rows; scaled by ``row_weights: [R]`` when given.

    Returns:
        ``[R, N]`` rows in a's dtype, or None with ``scatter_into``.
    """
    E = weight.shape[0]
    if transpose:
        K, N = weight.shape[1:]
        stride_wk, stride_wn = weight.stride(1), weight.stride(2)
    else:
        N, K = weight.shape[1:]
        stride_wn, stride_wk = weight.stride(1), weight.stride(2)
    R = plan.capacity
    out = torch.empty((R, N), dtype=a.dtype, device=a.device) if scatter_into is None else scatter_into

    def launch(cfg: BlockConfig, target: torch.Tensor) -> None:
        num_m = _row_blocks(plan, cfg.BLOCK_M)
        _rows_kernel[(num_m * triton.cdiv(N, cfg.BLOCK_N),)](
            a, weight, plan.sorted_token_ids, plan.expert_offsets, row_weights if row_weights is not None else a,
            target, E, num_m, N, weight.stride(0), stride_wn, stride_wk, target.stride(0), K=K,
            E_PAD=triton.next_power_of_2(E), SCATTER=scatter_into is not None, WEIGHTED=row_weights is not None,
            PRECISION=_precision(a.dtype), **_meta(cfg),
        )  # fmt: skip

    if R:
        tune = lambda cfg: launch(cfg, torch.empty_like(out))  # noqa: E731
        launch(_config(kind, N, K, plan, a.dtype, a.device, tune), out)
    return out if scatter_into is None else None


def down_backward(
    dout: torch.Tensor,
    down: torch.Tensor,
    plan: RoutingPlan,
    gu: torch.Tensor,
    row_weights: torch.Tensor,
    *,
    store_dgu: bool,
    store_partial: bool,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``dgu: [R, 2I]`` (down's dtype) and ``partial: [R, nb]`` float32 with ``partial.sum(1)[r] = <dout[t_r], Y[r]>``.

    Args:
        dout: ``[T, H]`` in down's dtype; down: ``[E, H, I]``; gu: ``[R, 2I]``; row_weights: ``[R]`` float32.
    """
    E, H, I = down.shape
    R = plan.capacity
    dgu = torch.empty((R, 2 * I), dtype=down.dtype, device=down.device) if store_dgu else None

    def partials(cfg: BlockConfig) -> Optional[torch.Tensor]:
        if not store_partial:
            return None
        return torch.empty((R, triton.cdiv(I, cfg.BLOCK_N)), dtype=torch.float32, device=down.device)

    def launch(cfg: BlockConfig, dgu_out: Optional[torch.Tensor], partial: Optional[torch.Tensor]) -> None:
        num_m = _row_blocks(plan, cfg.BLOCK_M)
        num_n = triton.cdiv(I, cfg.BLOCK_N)
        _down_bwd_kernel[(num_m * num_n,)](
            dout, down, plan.sorted_token_ids, plan.expert_offsets, gu, row_weights, dgu_out if store_dgu else gu,
            partial if store_partial else row_weights, E, num_m, num_n, dout.stride(0), dout.stride(1), *down.stride(),
            H=H, I=I, E_PAD=triton.next_power_of_2(E), STORE_DGU=store_dgu, STORE_PARTIAL=store_partial,
            PRECISION=_precision(down.dtype), **_meta(cfg),
        )  # fmt: skip

    if R == 0:
        return dgu, torch.zeros((0, 1), dtype=torch.float32, device=down.device) if store_partial else None
    tune = lambda cfg: launch(cfg, _empty_like(dgu), partials(cfg))  # noqa: E731
    cfg = _config("down_bwd", I, H, plan, down.dtype, down.device, tune)
    partial = partials(cfg)
    launch(cfg, dgu, partial)
    return dgu, partial


def weight_grad(
    a: torch.Tensor,
    b: torch.Tensor,
    plan: RoutingPlan,
    out_shape: Tuple[int, int, int],
    *,
    a_by_token: bool,
    b_by_token: bool,
    row_weights: Optional[torch.Tensor] = None,
    b_swiglu: bool = False,
) -> torch.Tensor:
    """``out[e] = sum_{r in e} a(r)^T b(r)``, ``[E, M, N]`` in b's dtype (see ``_weight_grad_kernel``).

    Args:
        a: ``[T or R, M]`` rows read by token (``a_by_token``) or by row; scaled by ``row_weights`` when given.
        b: ``[T or R, N]`` likewise, or ``gu: [R, 2N]`` with ``b_swiglu`` (then b(r) = h[r]).
        out_shape: ``(E, M, N)``.
    """
    E, M, N = out_shape
    out = torch.empty(out_shape, dtype=b.dtype, device=b.device)

    def launch(cfg: BlockConfig, target: torch.Tensor) -> None:
        tiles = triton.cdiv(M, cfg.BLOCK_M) * triton.cdiv(N, cfg.BLOCK_N)
        _weight_grad_kernel[(E * tiles,)](
            a, b, plan.sorted_token_ids, plan.expert_offsets, row_weights if row_weights is not None else a, target,
            M, N, a.stride(0), a.stride(1), b.stride(0), b.stride(1), *target.stride(),
            I=N if b_swiglu else 0, A_BY_TOKEN=a_by_token, A_ROW_WEIGHT=row_weights is not None, B_BY_TOKEN=b_by_token,
            B_SWIGLU=b_swiglu, ROW_LOOP_FOR=row_loop_is_for(), PRECISION=_precision(b.dtype),
            **_meta(cfg, grouped=False),
        )  # fmt: skip

    if out.numel():
        tune = lambda cfg: launch(cfg, torch.empty_like(out))  # noqa: E731
        launch(_config("weight_grad", M, N, plan, b.dtype, b.device, tune), out)
    return out


def combine(
    src: torch.Tensor, plan: RoutingPlan, weights: Optional[torch.Tensor], out_dtype: torch.dtype
) -> torch.Tensor:
    """Deterministic per-token sum of rows: ``[T, N]`` in ``out_dtype``.

    ``out[t] = sum_j weights[t, j] * src[slot_rows[t, j]]``, or without weights the plain sum over the token's
    distinct rows.
    """
    T, k = plan.slot_rows.shape
    N = src.shape[1]
    out = torch.empty((T, N), dtype=out_dtype, device=src.device)
    if T == 0:
        return out
    w = weights if weights is not None else src
    grid = (triton.cdiv(T, _COMBINE_BLOCK_T), triton.cdiv(N, _COMBINE_BLOCK_N))
    _combine_kernel[grid](
        src, plan.slot_rows, w, out, T, N, src.stride(0), w.stride(0), w.stride(1) if weights is not None else 0,
        out.stride(0), K=k, K_PAD=triton.next_power_of_2(k), BLOCK_T=_COMBINE_BLOCK_T, BLOCK_N=_COMBINE_BLOCK_N,
        WEIGHTED=weights is not None,
    )  # fmt: skip
    return out


def row_weights(plan: RoutingPlan, topk_weights: torch.Tensor) -> torch.Tensor:
    """``[R]`` float32 routing weight of each row (deterministic; filler rows are left unset)."""
    T, k = plan.slot_rows.shape
    out = torch.empty(plan.capacity, dtype=torch.float32, device=topk_weights.device)
    if T:
        _row_weights_kernel[(triton.cdiv(T, _ROW_WEIGHTS_BLOCK_T),)](
            plan.slot_rows, topk_weights, out, T, topk_weights.stride(0), topk_weights.stride(1), K=k,
            K_PAD=triton.next_power_of_2(k), BLOCK_T=_ROW_WEIGHTS_BLOCK_T,
        )  # fmt: skip
    return out
