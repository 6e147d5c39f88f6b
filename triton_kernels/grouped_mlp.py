"""Grouped expert GEMMs over a routing plan: kernels and launchers of the triton grouped MLP.

Rows are the (token, physical expert) pairs of a ``RoutingPlan``, grouped by expert: row ``r`` of expert ``e``
reads token ``t_r = sorted_token_ids[r]``. ``R = T * k`` bounds the number of rows; the true count lives only
on the device (``expert_offsets[E]``), and every buffer and grid is sized from ``R``, so nothing here reads the
GPU from the host.

Row blocks. A kernel walking rows splits each expert's rows into blocks of ``BLOCK_M`` and launches
``cdiv(R, BLOCK_M) + min(E, R)`` row blocks, a bound on ``sum_e cdiv(n_e, BLOCK_M)`` (each expert wastes at
most one partial block). ``_expert_block`` maps a row block to its expert with a cumulative sum of the
per-expert block counts, computed from ``expert_offsets`` in registers (``E_PAD`` lanes), so no block table
is built, and each kernel may use its own ``BLOCK_M``. Blocks past the last row return at once.

Expert weights (``Stack``). Each projection's experts come from one base stack ``[E_b, D1, D2]``, plain or
packed int4/int8 (``flux_engine.ops.quantize`` layout, groups along ``D2``; weight tiles are dequantised in
registers inside the GEMM loop, never copied), optionally preceded by a stack of ``S_t`` full-size tuned
experts: physical expert ``e < S_t`` reads ``tuned[e]``, the others ``base[e - S_t]``. A GEMM reads a stack as
``B[k, n] = W[n, k]`` (``PACK_K``: the packed dim is the reduction) or, transposed, ``B[k, n] = W[k, n]``.

LoRA (``Expand``). Rows of an expert with a LoRA slot ``s`` get ``L[r] @ F_s`` added to the accumulator, where
``L: [R, rank]`` holds the row's thin intermediate (scale folded in) and ``F_s`` a LoRA factor read like a
stack: one ``[BLOCK_M, RP] x [RP, BLOCK_N]`` dot in the epilogue (``RP``: rank padded to >= 16, the smallest
``tl.dot``). The intermediates come from ``_rows_kernel`` run as a "shrink" (``N = rank``, weights indexed by
slot, other experts' blocks return at once), so rows of experts without LoRA cost nothing.

Expert forms (``flux_engine.ops.ExpertForm``). The activation, gating, gate/up row layout and gpt-oss's clamp are
compile-time constants of the kernels that touch pre-activations (``ACT, GATED, INTERLEAVED, CLAMPED, LIMIT, ALPHA``,
``form_meta``): one kernel, specialised per form. ``gu`` keeps ``W1``'s row layout (``[R, 2I]`` gate rows first or
interleaved, ``[R, I]`` ungated), so the dx GEMM, ``dW1`` and the gate_up LoRA read ``dgu`` like ``W1``'s rows.

Biases. A stack may carry ``bias: [E_b, D1]`` (and ``tuned_bias: [S_t, D1]``), added to its forward GEMM's
accumulator in the epilogue (gate_up before the activation; down before the routing weight).

Kernels (``W1 = gate_up [E, 2I, H]`` (``[E, I, H]`` ungated), ``W2 = down [E, H, I]``, ``gu`` = the pre-activations):
- ``_gate_up_kernel``: ``h[r] = form(x[t_r] W1_e^T + b1_e)``; x rows gathered in the prologue
  (no permuted copy of x), the form in the epilogue; optionally stores ``gu`` (saved for backward).
- ``_rows_kernel``: ``out[r] = alpha * A[r or t_r] @ B_e`` over sorted rows; stores rows, or with ``SCATTER``
  adds (``w_r *``) the result into ``out[t_r]`` with atomics. Forward ``Y = h W2_e^T``; backward
  ``dx_r = dgu W1_e``; and the LoRA shrinks ``x A^T``, ``h A^T``, ``dout B``, ``dgu B``.
- ``_combine_kernel``: deterministic scatter, ``out[t] = sum_j c[t, j] * src[slot_rows[t, j]]`` with
  ``c = topk_weights`` (forward; slots sharing a row add their weights naturally) or 1 on each distinct row
  (backward dx, so a collapsed row counts once).
- ``_down_bwd_kernel``: ``g[r] = dout[t_r] @ W2_e`` (gathered); epilogue: ``dgu[r] = form'(gu[r]) * w_r g[r]``
  and per-column-block partial dots ``<g[r], h[r]> = <dout[t_r], Y[r]>``, the routing-weight gradient,
  so Y is never saved.
- ``_weight_grad_kernel``: ``dW_p = sum_{r in e_p} a(r)^T b(r)`` for a list of experts ``e_p`` (all, the tuned
  ones, or the expert of each LoRA slot), a sequential sweep over the expert's rows (deterministic):
  ``dW1_e = sum dgu[r]^T x[t_r]``, ``dW2_e = sum w_r dout[t_r]^T h[r]`` with h from gu, the LoRA factors', and
  the biases' (``b(r) = 1``: ``db1_e = sum dgu[r]``, ``db2_e = sum w_r dout[t_r]``).
- ``_row_weights_kernel``: ``w_r`` = sum of the weights of the slots that collapsed into row r.
All GEMMs accumulate in fp32; operands are the input dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from flux_engine.backend import triton_interpreting
from flux_engine.ops.expert_form import SILU, ExpertForm
from flux_engine.ops.permute import RoutingPlan
from flux_engine.ops.quantize import QuantizedTensor
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
def _expert_weights(
    w_ptr, wt_ptr, s_ptr, z_ptr, expert, S_T, stride_we, stride_wte, stride_se, TUNED: tl.constexpr,
):  # fmt: skip
    """``(weights, scales, zeros)`` base pointers of physical expert ``expert``: ``tuned[expert]`` below ``S_T``,
    else ``base[expert - S_T]`` (scales and zero points exist for a packed base only)."""
    e = expert.to(tl.int64)
    b = e - S_T
    w_base = w_ptr + b * stride_we
    if TUNED:
        if expert < S_T:
            w_base = wt_ptr + e * stride_wte
    return w_base, s_ptr + b * stride_se, z_ptr + b * stride_se


@triton.jit
def _interleave(lo, hi, AXIS: tl.constexpr):
    """``[A, B]`` tiles ``lo``, ``hi`` -> ``[2A, B]`` with rows ``lo[j], hi[j]`` at ``2j, 2j + 1`` (``AXIS`` 0), or
    ``[A, 2B]`` with the columns interleaved (``AXIS`` 1)."""
    both = tl.join(lo, hi)  # [A, B, 2]
    if AXIS == 0:
        out = tl.reshape(tl.permute(both, (0, 2, 1)), (2 * lo.shape[0], lo.shape[1]))
    else:
        out = tl.reshape(both, (lo.shape[0], 2 * lo.shape[1]))
    return out


@triton.jit
def _load_b(
    w_base, s_base, z_base, k0, n, n0, n_end, n_ok, stride_bk, stride_bn, stride_srow,
    K: tl.constexpr, BLOCK_K: tl.constexpr, N_TILE: tl.constexpr, QBITS: tl.constexpr, GROUP: tl.constexpr,
    HAS_ZEROS: tl.constexpr, PACK_K: tl.constexpr,
):  # fmt: skip
    """``B[k, n]`` for ``k = k0 + [0, BLOCK_K)`` below ``K``, as a ``[BLOCK_K, N_TILE]`` tile (``N_TILE = len(n)``):
    plain (``QBITS == 0``) at ``k * stride_bk + n * stride_bn``, or dequantised to fp32 from packed codes (int4: two
    per byte, even index in the low nibble), per-group scales and zero points (or the symmetric zero: 8 for int4, 0
    for int8). The packed dimension is k (``PACK_K``: rows of codes are n, ``stride_bn`` apart) or n (rows are k,
    ``stride_bk`` apart; then ``n = n0 + [0, N_TILE)`` below ``n_end``).

    Packed tiles are loaded once as bytes, contiguous along the packed dimension (``[BLOCK_K / 2, BN]`` or
    ``[BLOCK_K, BN / 2]`` for int4), and split into nibbles in registers. When the tile lies in one group along
    the packed dimension (the group a multiple of the block, or the whole dimension), one scale (and zero point)
    per row of codes is loaded: a ``[1, BN]`` or ``[BLOCK_K, 1]`` vector; otherwise one per element."""
    k = k0 + tl.arange(0, BLOCK_K)
    k_ok = k < K
    if QBITS == 0:
        mask = k_ok[:, None] & n_ok[None, :]
        b = tl.load(w_base + k[:, None] * stride_bk + n[None, :] * stride_bn, mask=mask, other=0.0)
    else:
        if PACK_K:
            rows = n[None, :].to(tl.int64) * stride_bn
            if QBITS == 4:
                kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # bytes along k: an arange, so loads vectorise
                byte = tl.load(w_base + rows + kb[:, None], mask=(kb < K // 2)[:, None] & n_ok[None, :], other=0)
                byte = byte.to(tl.int32)
                code = _interleave(byte & 0xF, byte >> 4, 0)
            else:
                code = tl.load(w_base + rows + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0).to(tl.int32)
            if GROUP % BLOCK_K == 0 or GROUP >= K:
                s_off = n[None, :].to(tl.int64) * stride_srow + k0 // GROUP
                s_ok = n_ok[None, :]
            else:
                s_off = n[None, :].to(tl.int64) * stride_srow + k[:, None] // GROUP
                s_ok = k_ok[:, None] & n_ok[None, :]
        else:
            rows = k[:, None].to(tl.int64) * stride_bk
            if QBITS == 4:
                nb = n0 // 2 + tl.arange(0, N_TILE // 2)  # bytes along n
                byte = tl.load(w_base + rows + nb[None, :], mask=k_ok[:, None] & (nb < n_end // 2)[None, :], other=0)
                byte = byte.to(tl.int32)
                code = _interleave(byte & 0xF, byte >> 4, 1)
            else:
                code = tl.load(w_base + rows + n[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0).to(tl.int32)
            if GROUP % N_TILE == 0:
                s_off = k[:, None].to(tl.int64) * stride_srow + n0 // GROUP
                s_ok = k_ok[:, None]
            else:
                s_off = k[:, None].to(tl.int64) * stride_srow + n[None, :] // GROUP
                s_ok = k_ok[:, None] & n_ok[None, :]
        scale = tl.load(s_base + s_off, mask=s_ok, other=0.0)
        if HAS_ZEROS:
            zero = tl.load(z_base + s_off, mask=s_ok, other=0).to(tl.int32)
        else:
            zero = 8 if QBITS == 4 else 0
        b = (code - zero).to(tl.float32) * scale
    return b


@triton.jit
def _mma(
    acc, a_ptrs, a_ok, stride_ak, w_base, s_base, z_base, n, n0, n_end, n_ok, stride_bk, stride_bn, stride_srow,
    K: tl.constexpr, BLOCK_K: tl.constexpr, N_TILE: tl.constexpr, PRECISION: tl.constexpr,
    QBITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, PACK_K: tl.constexpr,
):  # fmt: skip
    """``acc [BM, BN] += A @ B`` over ``K``: ``A[m, k]`` at ``a_ptrs[m] + k * stride_ak`` (``a_ptrs: [BM, 1]``),
    ``B[k, n]`` from ``_load_b`` for the columns ``n`` (``n0``: the first, when they are contiguous, below
    ``n_end``). K is constexpr: a static loop, which Triton pipelines on GPUs and every interpreter version runs."""
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptrs + k[None, :] * stride_ak, mask=a_ok[:, None] & (k[None, :] < K), other=0.0)
        b = _load_b(
            w_base, s_base, z_base, k0, n, n0, n_end, n_ok, stride_bk, stride_bn, stride_srow, K, BLOCK_K, N_TILE,
            QBITS, GROUP, HAS_ZEROS, PACK_K,
        )  # fmt: skip
        acc = _dot(a, b.to(a.dtype), acc, PRECISION)
    return acc


@triton.jit
def _lora_expand(
    acc, slots_ptr, expert, l_ptr, rows, row_ok, f_ptr, stride_fs, stride_fk, stride_fn, n, n_ok,
    RANK: tl.constexpr, RP: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """``acc += L[rows] @ F_s[:, n]`` when ``expert`` has LoRA slot ``s >= 0``: ``L: [R, RANK]`` contiguous,
    ``F_s[k, n]`` at ``f_ptr + s * stride_fs + k * stride_fk + n * stride_fn``."""
    slot = tl.load(slots_ptr + expert)
    if slot >= 0:
        r = tl.arange(0, RP)
        lo = tl.load(
            l_ptr + rows.to(tl.int64)[:, None] * RANK + r[None, :], mask=row_ok[:, None] & (r[None, :] < RANK), other=0.0
        )
        f = tl.load(
            f_ptr + slot.to(tl.int64) * stride_fs + r[:, None] * stride_fk + n[None, :] * stride_fn,
            mask=(r[:, None] < RANK) & n_ok[None, :],
            other=0.0,
        )
        acc = _dot(lo, f.to(lo.dtype), acc, PRECISION)
    return acc


@triton.jit
def _sigmoid(v):
    return 1.0 / (1.0 + tl.exp(-v))


@triton.jit
def _act(v, ACT: tl.constexpr):
    """``ACT(v)``: silu, gelu (erf), gelu_tanh (``0.5 (1 + tanh(u)) = sigmoid(2u)``, no tanh needed), relu or
    relu2 (``relu(v)^2``)."""
    if ACT == "silu":
        out = v * _sigmoid(v)
    elif ACT == "gelu":
        out = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    elif ACT == "gelu_tanh":
        out = v * _sigmoid(1.5957691216057308 * (v + 0.044715 * v * v * v))
    elif ACT == "relu2":
        r = tl.maximum(v, 0.0)
        out = r * r
    else:
        out = tl.maximum(v, 0.0)
    return out


@triton.jit
def _act_grad(v, ACT: tl.constexpr):
    """``ACT'(v)`` (relu: 1 where ``v > 0``, as torch; relu2: ``2 relu(v)``)."""
    if ACT == "silu":
        s = _sigmoid(v)
        out = s * (1.0 + v * (1.0 - s))
    elif ACT == "gelu":
        out = 0.5 * (1.0 + tl.math.erf(v * 0.7071067811865476)) + v * 0.3989422804014327 * tl.exp(-0.5 * v * v)
    elif ACT == "gelu_tanh":
        s = _sigmoid(1.5957691216057308 * (v + 0.044715 * v * v * v))
        out = s + v * s * (1.0 - s) * 1.5957691216057308 * (1.0 + 0.134145 * v * v)
    elif ACT == "relu2":
        out = 2.0 * tl.maximum(v, 0.0)
    else:
        out = (v > 0.0).to(tl.float32)
    return out


@triton.jit
def _gate_up_cols(n, I: tl.constexpr, GATED: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Columns of gate ``n`` and up ``n`` in a row of ``gu`` (``W1``'s row layout; ungated: both the up column)."""
    if INTERLEAVED:
        gate, up = 2 * n, 2 * n + 1
    elif GATED:
        gate, up = n, n + I
    else:
        gate, up = n, n
    return gate, up


@triton.jit
def _load_gate_up(gu_rows, n, mask, I: tl.constexpr, GATED: tl.constexpr, INTERLEAVED: tl.constexpr):
    """fp32 gate and up pre-activations of columns ``n`` (ungated: up twice); ``gu_rows`` point at rows of ``gu``."""
    gate_col, up_col = _gate_up_cols(n, I, GATED, INTERLEAVED)
    up = tl.load(gu_rows + up_col, mask=mask, other=0.0).to(tl.float32)
    if GATED:
        gate = tl.load(gu_rows + gate_col, mask=mask, other=0.0).to(tl.float32)
    else:
        gate = up
    return gate, up


@triton.jit
def _glu(gate, up, ACT: tl.constexpr, GATED: tl.constexpr, CLAMPED: tl.constexpr, LIMIT: tl.constexpr,
         ALPHA: tl.constexpr):  # fmt: skip
    """The expert form's ``h`` from fp32 ``gate``, ``up`` (ungated: ``ACT(up)``)."""
    if CLAMPED:
        g = tl.minimum(gate, LIMIT)
        u = tl.minimum(tl.maximum(up, -LIMIT), LIMIT)
        h = (u + 1.0) * g * _sigmoid(ALPHA * g)
    elif GATED:
        h = _act(gate, ACT) * up
    else:
        h = _act(up, ACT)
    return h


@triton.jit
def _glu_grad(gate, up, dh, ACT: tl.constexpr, GATED: tl.constexpr, CLAMPED: tl.constexpr, LIMIT: tl.constexpr,
              ALPHA: tl.constexpr):  # fmt: skip
    """``(d gate, d up)`` of ``_glu`` given ``dh`` (ungated: d gate unused). A clamp passes the gradient where its
    input lies within the bounds, ends included, as torch's clamp."""
    if CLAMPED:
        g = tl.minimum(gate, LIMIT)
        u = tl.minimum(tl.maximum(up, -LIMIT), LIMIT)
        s = _sigmoid(ALPHA * g)
        dgate = tl.where(gate <= LIMIT, dh * (u + 1.0) * s * (1.0 + ALPHA * g * (1.0 - s)), 0.0)
        dup = tl.where((up >= -LIMIT) & (up <= LIMIT), dh * g * s, 0.0)
    elif GATED:
        dgate = dh * up * _act_grad(gate, ACT)
        dup = dh * _act(gate, ACT)
    else:
        dgate = dh
        dup = dh * _act_grad(up, ACT)
    return dgate, dup


@triton.jit
def _add_bias(acc, b_ptr, bt_ptr, expert, S_T, stride_be, stride_bte, cols, col_ok, TUNED: tl.constexpr):
    """``acc + bias_e[cols]`` (a row broadcast): ``tuned_bias[expert]`` below ``S_T``, else ``bias[expert - S_T]``."""
    e = expert.to(tl.int64)
    base = b_ptr + (e - S_T) * stride_be
    if TUNED:
        if expert < S_T:
            base = bt_ptr + e * stride_bte
    return acc + tl.load(base + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]


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
# Argument groups shared by the GEMM kernels (see ``Stack.args``, ``Expand.args`` and ``form_meta``):
#   weights: w_ptr, wt_ptr, s_ptr, z_ptr, S_T, stride_we, stride_wte, stride_bk, stride_bn, stride_se, stride_srow,
#            b_ptr, bt_ptr, stride_be, stride_bte + constexprs QBITS, GROUP, HAS_ZEROS, PACK_K, TUNED, HAS_BIAS
#   LoRA:    slots_ptr, l_ptr, f_ptr, stride_fs, stride_fk, stride_fn + constexprs HAS_LORA, RANK, RP
#   form:    constexprs ACT, GATED, INTERLEAVED, CLAMPED, LIMIT, ALPHA


@triton.jit
def _gate_up_kernel(
    x_ptr, token_ids_ptr, offsets_ptr, h_ptr, gu_ptr, E, num_m, stride_xt, stride_xh,
    w_ptr, wt_ptr, s_ptr, z_ptr, S_T, stride_we, stride_wte, stride_bk, stride_bn, stride_se, stride_srow,
    b_ptr, bt_ptr, stride_be, stride_bte, slots_ptr, l_ptr, f_ptr, stride_fs, stride_fk, stride_fn,
    H: tl.constexpr, I: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, STORE_H: tl.constexpr, STORE_GU: tl.constexpr,
    PRECISION: tl.constexpr, QBITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
    PACK_K: tl.constexpr, TUNED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, RANK: tl.constexpr,
    RP: tl.constexpr,
    ACT: tl.constexpr, GATED: tl.constexpr, INTERLEAVED: tl.constexpr, CLAMPED: tl.constexpr, LIMIT: tl.constexpr,
    ALPHA: tl.constexpr,
):  # fmt: skip
    """``x: [T, H]``, ``W1: [E, 2I, H]`` (``[E, I, H]`` ungated) -> ``h: [R, I]`` and/or ``gu: [R, 2I]`` (``[R, I]``)
    in sorted row order (plus the bias and the LoRA update ``L[r] @ B_s^T`` of the rows of LoRA experts).
    Grid ``num_m * cdiv(I, BLOCK_N)``."""
    pid_m, pid_n = _swizzle(tl.program_id(0), num_m, tl.cdiv(I, BLOCK_N), GROUP_M)
    expert, start, end = _expert_block(offsets_ptr, pid_m, E, E_PAD, BLOCK_M)
    if start >= end:
        return
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    tokens = tl.load(token_ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    W_TILE: tl.constexpr = 2 * BLOCK_N if GATED else BLOCK_N
    if GATED:
        # The weight tile's columns alternate gate row and up row of the same n (rows n and I + n, or 2n and
        # 2n + 1 interleaved): one dot yields both inputs of the same columns, split apart in the epilogue.
        c = tl.arange(0, 2 * BLOCK_N)
        n_of_c = pid_n * BLOCK_N + c // 2
        gate_rows, up_rows = _gate_up_cols(n_of_c, I, GATED, INTERLEAVED)
        w_rows = tl.where(c % 2 == 0, gate_rows, up_rows)
    else:
        n_of_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        w_rows = n_of_c
    w_base, s_base, z_base = _expert_weights(w_ptr, wt_ptr, s_ptr, z_ptr, expert, S_T, stride_we, stride_wte, stride_se, TUNED)
    acc = _mma(
        tl.zeros((BLOCK_M, W_TILE), dtype=tl.float32), x_ptr + tokens[:, None] * stride_xt, row_ok, stride_xh,
        w_base, s_base, z_base, w_rows, 0, I, n_of_c < I, stride_bk, stride_bn, stride_srow,
        H, BLOCK_K, W_TILE, PRECISION, QBITS, GROUP, HAS_ZEROS, PACK_K,
    )  # fmt: skip
    if HAS_BIAS:
        acc = _add_bias(acc, b_ptr, bt_ptr, expert, S_T, stride_be, stride_bte, w_rows, n_of_c < I, TUNED)
    if HAS_LORA:
        acc = _lora_expand(
            acc, slots_ptr, expert, l_ptr, rows, row_ok, f_ptr, stride_fs, stride_fk, stride_fn, w_rows, n_of_c < I,
            RANK, RP, PRECISION,
        )  # fmt: skip
    if GATED:
        gate, up = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))
    else:
        gate, up = acc, acc

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = row_ok[:, None] & (cols[None, :] < I)
    if STORE_GU:
        gu_rows = gu_ptr + rows.to(tl.int64)[:, None] * (2 * I if GATED else I)
        gate_col, up_col = _gate_up_cols(cols[None, :], I, GATED, INTERLEAVED)
        if GATED:
            tl.store(gu_rows + gate_col, gate.to(gu_ptr.dtype.element_ty), mask=mask)
        tl.store(gu_rows + up_col, up.to(gu_ptr.dtype.element_ty), mask=mask)
    if STORE_H:
        h = _glu(gate, up, ACT, GATED, CLAMPED, LIMIT, ALPHA)
        tl.store(h_ptr + rows.to(tl.int64)[:, None] * I + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rows_kernel(
    a_ptr, token_ids_ptr, offsets_ptr, row_w_ptr, out_ptr, E, num_m, N, alpha, stride_ar, stride_ak, stride_out,
    w_ptr, wt_ptr, s_ptr, z_ptr, S_T, stride_we, stride_wte, stride_bk, stride_bn, stride_se, stride_srow,
    b_ptr, bt_ptr, stride_be, stride_bte, slots_ptr, l_ptr, f_ptr, stride_fs, stride_fk, stride_fn,
    K: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SCATTER: tl.constexpr, WEIGHTED: tl.constexpr, A_BY_TOKEN: tl.constexpr,
    SLOT_WEIGHTS: tl.constexpr, PRECISION: tl.constexpr, QBITS: tl.constexpr, GROUP: tl.constexpr,
    HAS_ZEROS: tl.constexpr, PACK_K: tl.constexpr, TUNED: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr, RANK: tl.constexpr, RP: tl.constexpr,
):  # fmt: skip
    """``acc[r] = alpha * (A[r] @ B_e (+ bias_e))`` over sorted rows, ``A[r]`` at ``a_ptr + (t_r if A_BY_TOKEN else r) *
    stride_ar``. ``SLOT_WEIGHTS``: B is the ``slots[e]``-th matrix of the stack and experts without a slot
    skip their rows (the LoRA shrink).

    Stores ``out[r] = acc[r]`` (``out: [R, N]``), or with ``SCATTER`` adds ``(w_r *) acc[r]`` into
    ``out[t_r]`` (``out: [T, N]`` float32) atomically. Grid ``num_m * cdiv(N, BLOCK_N)``.
    """
    pid_m, pid_n = _swizzle(tl.program_id(0), num_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    expert, start, end = _expert_block(offsets_ptr, pid_m, E, E_PAD, BLOCK_M)
    if start >= end:
        return
    if SLOT_WEIGHTS:
        slot = tl.load(slots_ptr + expert)
        if slot < 0:
            return
        w_base, s_base, z_base = w_ptr + slot.to(tl.int64) * stride_we, s_ptr, z_ptr
    else:
        w_base, s_base, z_base = _expert_weights(
            w_ptr, wt_ptr, s_ptr, z_ptr, expert, S_T, stride_we, stride_wte, stride_se, TUNED
        )
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if A_BY_TOKEN:
        a_rows = tl.load(token_ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    else:
        a_rows = rows.to(tl.int64)
    acc = _mma(
        tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), a_ptr + a_rows[:, None] * stride_ar, row_ok, stride_ak,
        w_base, s_base, z_base, cols, pid_n * BLOCK_N, N, col_ok, stride_bk, stride_bn, stride_srow,
        K, BLOCK_K, BLOCK_N, PRECISION, QBITS, GROUP, HAS_ZEROS, PACK_K,
    )  # fmt: skip
    if HAS_BIAS:
        acc = _add_bias(acc, b_ptr, bt_ptr, expert, S_T, stride_be, stride_bte, cols, col_ok, TUNED)
    if HAS_LORA:
        acc = _lora_expand(
            acc, slots_ptr, expert, l_ptr, rows, row_ok, f_ptr, stride_fs, stride_fk, stride_fn, cols, col_ok,
            RANK, RP, PRECISION,
        )  # fmt: skip
    acc = acc * alpha
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
    dout_ptr, token_ids_ptr, offsets_ptr, gu_ptr, row_w_ptr, dgu_ptr, partial_ptr, E, num_m, num_n,
    stride_dt, stride_dh,
    w_ptr, wt_ptr, s_ptr, z_ptr, S_T, stride_we, stride_wte, stride_bk, stride_bn, stride_se, stride_srow,
    b_ptr, bt_ptr, stride_be, stride_bte, slots_ptr, l_ptr, f_ptr, stride_fs, stride_fk, stride_fn,
    H: tl.constexpr, I: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, STORE_DGU: tl.constexpr, STORE_PARTIAL: tl.constexpr,
    PRECISION: tl.constexpr, QBITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
    PACK_K: tl.constexpr, TUNED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, RANK: tl.constexpr,
    RP: tl.constexpr,
    ACT: tl.constexpr, GATED: tl.constexpr, INTERLEAVED: tl.constexpr, CLAMPED: tl.constexpr, LIMIT: tl.constexpr,
    ALPHA: tl.constexpr,
):  # fmt: skip
    """``dout: [T, H]``, ``W2: [E, H, I]``, ``gu: [R, 2I]`` (``[R, I]`` ungated), ``row_w: [R]`` -> ``dgu`` (gu's
    shape) and
    ``partial: [R, num_n]`` float32 (``<g[r], h[r]>`` over column block ``pid_n``), with
    ``g[r] = dout[t_r] @ W2_e (+ L[r] @ A_s`` for LoRA rows, ``L = scale * dout B``). Grid ``num_m * num_n``."""
    pid_m, pid_n = _swizzle(tl.program_id(0), num_m, num_n, GROUP_M)
    expert, start, end = _expert_block(offsets_ptr, pid_m, E, E_PAD, BLOCK_M)
    if start >= end:
        return
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    tokens = tl.load(token_ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < I
    w_base, s_base, z_base = _expert_weights(w_ptr, wt_ptr, s_ptr, z_ptr, expert, S_T, stride_we, stride_wte, stride_se, TUNED)
    g = _mma(
        tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), dout_ptr + tokens[:, None] * stride_dt, row_ok, stride_dh,
        w_base, s_base, z_base, cols, pid_n * BLOCK_N, I, col_ok, stride_bk, stride_bn, stride_srow,
        H, BLOCK_K, BLOCK_N, PRECISION, QBITS, GROUP, HAS_ZEROS, PACK_K,
    )  # fmt: skip
    if HAS_LORA:
        g = _lora_expand(
            g, slots_ptr, expert, l_ptr, rows, row_ok, f_ptr, stride_fs, stride_fk, stride_fn, cols, col_ok,
            RANK, RP, PRECISION,
        )  # fmt: skip
    mask = row_ok[:, None] & col_ok[None, :]
    gu_rows = rows.to(tl.int64)[:, None] * (2 * I if GATED else I)
    gate, up = _load_gate_up(gu_ptr + gu_rows, cols[None, :], mask, I, GATED, INTERLEAVED)
    if STORE_PARTIAL:
        h = _glu(gate, up, ACT, GATED, CLAMPED, LIMIT, ALPHA)
        tl.store(partial_ptr + rows.to(tl.int64) * num_n + pid_n, tl.sum(g * h, axis=1), mask=row_ok)
    if STORE_DGU:
        w = tl.load(row_w_ptr + rows, mask=row_ok, other=0.0)
        dgate, dup = _glu_grad(gate, up, g * w[:, None], ACT, GATED, CLAMPED, LIMIT, ALPHA)
        gate_col, up_col = _gate_up_cols(cols[None, :], I, GATED, INTERLEAVED)
        if GATED:
            tl.store(dgu_ptr + gu_rows + gate_col, dgate.to(dgu_ptr.dtype.element_ty), mask=mask)
        tl.store(dgu_ptr + gu_rows + up_col, dup.to(dgu_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _weight_grad_step(
    acc, r0, end, a_ptr, b_ptr, token_ids_ptr, row_w_ptr, m, m_ok, n, n_ok,
    stride_ar, stride_am, stride_br, stride_bn,
    I: tl.constexpr, BLOCK_K: tl.constexpr, A_BY_TOKEN: tl.constexpr, A_ROW_WEIGHT: tl.constexpr,
    B_BY_TOKEN: tl.constexpr, B_FROM_GU: tl.constexpr, PRECISION: tl.constexpr,
    ACT: tl.constexpr, GATED: tl.constexpr, INTERLEAVED: tl.constexpr, CLAMPED: tl.constexpr, LIMIT: tl.constexpr,
    ALPHA: tl.constexpr,
):  # fmt: skip
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
    if B_FROM_GU:
        gu_rows = b_ptr + rows.to(tl.int64)[:, None] * (2 * I if GATED else I)
        gate, up = _load_gate_up(gu_rows, n[None, :], b_mask, I, GATED, INTERLEAVED)
        b = _glu(gate, up, ACT, GATED, CLAMPED, LIMIT, ALPHA).to(b_ptr.dtype.element_ty)
    else:
        b_rows = tokens if B_BY_TOKEN else rows.to(tl.int64)
        b = tl.load(b_ptr + b_rows[:, None] * stride_br + n[None, :] * stride_bn, mask=b_mask, other=0.0)
    return _dot(a, b.to(a.dtype), acc, PRECISION)


@triton.jit
def _weight_grad_kernel(
    a_ptr, b_ptr, token_ids_ptr, offsets_ptr, row_w_ptr, experts_ptr, out_ptr, E, M, N,
    stride_ar, stride_am, stride_br, stride_bn, stride_oe, stride_om, stride_on,
    I: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    A_BY_TOKEN: tl.constexpr, A_ROW_WEIGHT: tl.constexpr, B_BY_TOKEN: tl.constexpr, B_FROM_GU: tl.constexpr,
    ROW_LOOP_FOR: tl.constexpr, PRECISION: tl.constexpr,
    ACT: tl.constexpr, GATED: tl.constexpr, INTERLEAVED: tl.constexpr, CLAMPED: tl.constexpr, LIMIT: tl.constexpr,
    ALPHA: tl.constexpr,
):  # fmt: skip
    """``out[p] = sum over rows r of expert experts[p] of a(r)^T b(r)``: ``[M, N]`` per entry, ``out: [P, M, N]``.

    ``a(r) = (w_r *) A[t_r or r, :M]``, ``b(r) = B[t_r or r, :N]`` or ``h[r] = form(gu[r])`` (``B_FROM_GU``: then
    ``b_ptr`` is ``gu``). One program per (entry, M tile, N tile); grid ``P * tiles``. The sweep over
    the expert's rows is sequential, so the sum is deterministic; an expert without rows, or an entry naming
    no expert (``experts[p] >= E``), gets zeros.
    """
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    p = pid // (num_m * num_n)
    tile = pid % (num_m * num_n)
    m = (tile // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = (tile % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < M
    n_ok = n < N
    expert = tl.load(experts_ptr + p)
    valid = expert < E
    start = tl.load(offsets_ptr + expert, mask=valid, other=0)
    end = tl.load(offsets_ptr + expert + 1, mask=valid, other=0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # The trip count depends on the routing. A for loop is software-pipelined on GPUs; Triton 3.6's
    # interpreter cannot take runtime range() bounds, so interpreted runs may use the equivalent while loop.
    if ROW_LOOP_FOR:
        for r0 in range(start, end, BLOCK_K):
            acc = _weight_grad_step(
                acc, r0, end, a_ptr, b_ptr, token_ids_ptr, row_w_ptr, m, m_ok, n, n_ok, stride_ar, stride_am,
                stride_br, stride_bn, I, BLOCK_K, A_BY_TOKEN, A_ROW_WEIGHT, B_BY_TOKEN, B_FROM_GU, PRECISION,
                ACT, GATED, INTERLEAVED, CLAMPED, LIMIT, ALPHA,
            )  # fmt: skip
    else:
        r0 = start
        while r0 < end:
            acc = _weight_grad_step(
                acc, r0, end, a_ptr, b_ptr, token_ids_ptr, row_w_ptr, m, m_ok, n, n_ok, stride_ar, stride_am,
                stride_br, stride_bn, I, BLOCK_K, A_BY_TOKEN, A_ROW_WEIGHT, B_BY_TOKEN, B_FROM_GU, PRECISION,
                ACT, GATED, INTERLEAVED, CLAMPED, LIMIT, ALPHA,
            )  # fmt: skip
            r0 += BLOCK_K
    out_ptrs = out_ptr + p.to(tl.int64) * stride_oe + m[:, None] * stride_om + n[None, :] * stride_on
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
    """``PRECISION`` of ``_dot`` for operands of ``dtype``.

    Compiled, fp32 operands run TF32 tensor-core dots (10-bit mantissa, fp32 accumulation): an fp32 FMA dot is
    over ten times slower on Hopper, and a GPU run asked for fp32 must not silently take that path; 16-bit
    operands ignore the setting. Interpreted, fp32 is exact ("ieee") and bf16 dots take fp32 copies
    ("upcast"), so CPU tests compare tightly against the references.
    """
    if triton_interpreting():
        return "upcast" if dtype == torch.bfloat16 else "ieee"
    return "tf32"


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


def form_meta(form: ExpertForm) -> dict:
    """The expert form as the kernels' compile-time constants (``ACT, GATED, INTERLEAVED, CLAMPED, LIMIT, ALPHA``)."""
    clamped = form.limit is not None
    return dict(
        ACT=form.activation, GATED=form.gated, INTERLEAVED=form.interleaved, CLAMPED=clamped,
        LIMIT=form.limit if clamped else 0.0, ALPHA=form.alpha if clamped else 1.0,
    )  # fmt: skip


def rank_pad(rank: int) -> int:
    """The LoRA rank as a ``tl.dot`` dimension: a power of two, at least 16."""
    return max(16, triton.next_power_of_2(rank))


@dataclass(frozen=True)
class Stack:
    """One projection's expert weights as the kernels read them: ``[E_b, D1, D2]`` plain or packed (groups along
    ``D2``), optionally preceded by ``tuned: [S_t, D1, D2]`` (physical experts ``[0, S_t)``); with the forward
    projection's biases ``bias: [E_b, D1]`` (and ``tuned_bias: [S_t, D1]`` with tuned experts) when it has them."""

    base: Union[torch.Tensor, QuantizedTensor]
    tuned: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    tuned_bias: Optional[torch.Tensor] = None

    @property
    def quantized(self) -> bool:
        return isinstance(self.base, QuantizedTensor)

    def kind(self, kind: str) -> str:
        """The config kind of a GEMM over this stack (packed stacks have their own, see grouped_mlp_configs)."""
        return f"{kind}@int{self.base.bits}" if self.quantized else kind

    @property
    def num_tuned(self) -> int:
        return 0 if self.tuned is None else self.tuned.shape[0]

    @property
    def shape(self) -> Tuple[int, int, int]:
        """``(S_t + E_b, D1, D2)``."""
        E, D1, D2 = self.base.shape
        return self.num_tuned + E, D1, D2

    def args(self, transposed: bool) -> Tuple[tuple, dict]:
        """Kernel arguments for ``B[k, n] = W[n, k]`` (``D2`` is the reduction, the forward GEMM: with the bias) or,
        transposed, ``W[k, n]`` (a backward GEMM: no bias)."""
        w = self.base
        if self.quantized:
            if self.tuned is not None:
                raise ValueError("full-size tuned experts need a plain (unquantized) base stack")
            data, scales = w.data, w.scales
            zeros = w.zeros if w.zeros is not None else scales
            if data.stride(-1) != 1 or scales.stride(-1) != 1 or zeros.stride() != scales.stride():
                raise ValueError("quantized weights must be contiguous along their last dimension")
            s1, s2 = data.stride(1), 1
            head = (data, data, scales, zeros, 0, data.stride(0), 0)
            tail = (scales.stride(0), scales.stride(1))
            consts = dict(QBITS=w.bits, GROUP=w.group_size, HAS_ZEROS=w.zeros is not None, TUNED=False)
        else:
            tuned = self.tuned if self.tuned is not None else w
            if tuned.stride()[1:] != w.stride()[1:]:
                raise ValueError("tuned experts must share the base stack's inner strides")
            s1, s2 = w.stride(1), w.stride(2)
            head = (w, tuned, w, w, self.num_tuned, w.stride(0), tuned.stride(0))
            tail = (0, 0)
            consts = dict(QBITS=0, GROUP=1, HAS_ZEROS=False, TUNED=self.tuned is not None)
        strides = (s1, s2) if transposed else (s2, s1)
        bias = None if transposed else self.bias
        if bias is None:
            bias_args = (head[0], head[0], 0, 0)
        else:
            tuned_bias = self.tuned_bias if self.tuned_bias is not None else bias
            if bias.stride(-1) != 1 or tuned_bias.stride(-1) != 1:
                raise ValueError("expert biases must be contiguous along their last dimension")
            bias_args = (bias, tuned_bias, bias.stride(0), tuned_bias.stride(0))
        return head + strides + tail + bias_args, dict(consts, PACK_K=not transposed, HAS_BIAS=bias is not None)


@dataclass(frozen=True)
class Expand:
    """A LoRA update added in a GEMM's epilogue: ``L[r] @ F_s`` for the rows of experts with slot ``s`` (``slots:
    [E]`` int32, -1 none). ``L: [R, rank]`` contiguous; ``factor: [S, D1, D2]`` read as ``B[k, n] = F[n, k]`` or,
    ``transposed``, ``F[k, n]`` (k runs over the rank)."""

    slots: torch.Tensor
    rows: torch.Tensor
    factor: torch.Tensor
    transposed: bool

    @staticmethod
    def args(expand: Optional["Expand"], like: torch.Tensor) -> Tuple[tuple, dict]:
        if expand is None:
            return (like, like, like, 0, 0, 0), dict(HAS_LORA=False, RANK=1, RP=16)
        f = expand.factor
        rank = expand.rows.shape[1]
        fk, fn = (f.stride(1), f.stride(2)) if expand.transposed else (f.stride(2), f.stride(1))
        return (expand.slots, expand.rows, f, f.stride(0), fk, fn), dict(HAS_LORA=True, RANK=rank, RP=rank_pad(rank))


def gate_up_forward(
    x: torch.Tensor, gate_up: Stack, plan: RoutingPlan, form: ExpertForm, *, store_h: bool = True,
    store_gu: bool = False, expand: Optional[Expand] = None,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:  # fmt: skip
    """``h: [R, I]`` (``store_h``) and ``gu: [R, 2I]`` (``[R, I]`` ungated) pre-activations (``store_gu``, in
    gate_up's row layout) in x's dtype, sorted rows.

    Args:
        x: ``[T, H]``; gate_up: ``[E, 2I, H]`` (``[E, I, H]`` ungated, with its bias if any); plan: the routing plan
            over ``E`` experts; form: the experts' form.
        expand: the gate_up LoRA: ``rows = scale * x A^T`` and ``factor = B: [S, 2I, r]``.
    """
    E, rows, H = gate_up.shape
    I = rows // 2 if form.gated else rows
    R = plan.capacity
    h = torch.empty((R, I), dtype=x.dtype, device=x.device) if store_h else None
    gu = torch.empty((R, rows), dtype=x.dtype, device=x.device) if store_gu else None
    w_args, w_consts = gate_up.args(transposed=False)
    l_args, l_consts = Expand.args(expand, x)

    def launch(cfg: BlockConfig, h_out: Optional[torch.Tensor], gu_out: Optional[torch.Tensor]) -> None:
        num_m = _row_blocks(plan, cfg.BLOCK_M)
        _gate_up_kernel[(num_m * triton.cdiv(I, cfg.BLOCK_N),)](
            x, plan.sorted_token_ids, plan.expert_offsets, h_out if store_h else x, gu_out if store_gu else x,
            E, num_m, x.stride(0), x.stride(1), *w_args, *l_args, H=H, I=I, E_PAD=triton.next_power_of_2(E),
            STORE_H=store_h, STORE_GU=store_gu, PRECISION=_precision(x.dtype), **w_consts, **l_consts,
            **form_meta(form), **_meta(cfg),
        )  # fmt: skip

    if R:
        tune = lambda cfg: launch(cfg, _empty_like(h), _empty_like(gu))  # noqa: E731
        launch(_config(gate_up.kind("gate_up"), I, H, plan, x.dtype, x.device, tune), h, gu)
    return h, gu


def rows_matmul(
    a: torch.Tensor,
    weight: Stack,
    transpose: bool,
    plan: RoutingPlan,
    *,
    kind: str,
    scatter_into: Optional[torch.Tensor] = None,
    row_weights: Optional[torch.Tensor] = None,
    expand: Optional[Expand] = None,
) -> Optional[torch.Tensor]:
    """Per sorted row r of expert e: ``a[r] @ W_e^T`` (or ``a[r] @ W_e`` with ``transpose``), plus ``expand``.

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
    E, D1, D2 = weight.shape
    K, N = (D1, D2) if transpose else (D2, D1)
    R = plan.capacity
    out = torch.empty((R, N), dtype=a.dtype, device=a.device) if scatter_into is None else scatter_into
    w_args, w_consts = weight.args(transposed=transpose)
    l_args, l_consts = Expand.args(expand, a)

    def launch(cfg: BlockConfig, target: torch.Tensor) -> None:
        num_m = _row_blocks(plan, cfg.BLOCK_M)
        _rows_kernel[(num_m * triton.cdiv(N, cfg.BLOCK_N),)](
            a, plan.sorted_token_ids, plan.expert_offsets, row_weights if row_weights is not None else a, target,
            E, num_m, N, 1.0, a.stride(0), a.stride(1), target.stride(0), *w_args, *l_args, K=K,
            E_PAD=triton.next_power_of_2(E), SCATTER=scatter_into is not None, WEIGHTED=row_weights is not None,
            A_BY_TOKEN=False, SLOT_WEIGHTS=False, PRECISION=_precision(a.dtype), **w_consts, **l_consts, **_meta(cfg),
        )  # fmt: skip

    if R:
        tune = lambda cfg: launch(cfg, torch.empty_like(out))  # noqa: E731
        launch(_config(weight.kind(kind), N, K, plan, a.dtype, a.device, tune), out)
    return out if scatter_into is None else None


def lora_shrink(
    a: torch.Tensor, factor: torch.Tensor, transpose: bool, slots: torch.Tensor, plan: RoutingPlan, *,
    by_token: bool, scale: float,
) -> torch.Tensor:  # fmt: skip
    """``out[r] = scale * a[t_r or r] @ F_s^T`` (or ``@ F_s`` with ``transpose``) for the rows of experts with
    LoRA slot ``s``; ``[R, rank]`` in a's dtype (rows of other experts are left unset: nothing reads them).

    Args:
        a: ``[T, K]`` read by token (``by_token``) or ``[R, K]`` rows.
        factor: ``[S, rank, K]`` (or ``[S, K, rank]`` with ``transpose``).
        slots: ``[E]`` int32 LoRA slot of each physical expert, -1 for none.
    """
    K, rank = (factor.shape[1], factor.shape[2]) if transpose else (factor.shape[2], factor.shape[1])
    R, E = plan.capacity, plan.num_experts
    out = torch.empty((R, rank), dtype=a.dtype, device=a.device)
    fk, fn = (factor.stride(1), factor.stride(2)) if transpose else (factor.stride(2), factor.stride(1))
    if R:
        # N = rank: one rank-wide column block, rows and K from the row GEMM table.
        cfg = replace(_config("down", rank, K, plan, a.dtype, a.device, None), BLOCK_N=rank_pad(rank))
        num_m = _row_blocks(plan, cfg.BLOCK_M)
        l_args, l_consts = Expand.args(None, a)
        _rows_kernel[(num_m,)](
            a, plan.sorted_token_ids, plan.expert_offsets, a, out, E, num_m, rank, float(scale), a.stride(0),
            a.stride(1), out.stride(0), factor, factor, factor, factor, 0, factor.stride(0), 0, fk, fn, 0, 0,
            factor, factor, 0, 0, slots, *l_args[1:], K=K, E_PAD=triton.next_power_of_2(E), SCATTER=False,
            WEIGHTED=False, A_BY_TOKEN=by_token, SLOT_WEIGHTS=True, PRECISION=_precision(a.dtype), QBITS=0, GROUP=1,
            HAS_ZEROS=False, PACK_K=False, TUNED=False, HAS_BIAS=False, **l_consts, **_meta(cfg),
        )  # fmt: skip
    return out


def down_backward(
    dout: torch.Tensor,
    down: Stack,
    plan: RoutingPlan,
    gu: torch.Tensor,
    row_weights: torch.Tensor,
    form: ExpertForm,
    *,
    store_dgu: bool,
    store_partial: bool,
    expand: Optional[Expand] = None,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``dgu`` (gu's shape and dtype) and ``partial: [R, nb]`` float32 with ``partial.sum(1)[r] = <dout[t_r], Y[r]>``
    (``Y = h W2^T`` without the down bias).

    Args:
        dout: ``[T, H]`` in gu's dtype; down: ``[E, H, I]``; gu: ``[R, 2I]`` (``[R, I]`` ungated) in ``form``'s layout;
            row_weights: ``[R]`` float32.
        expand: the down LoRA's backward: ``rows = scale * dout B`` and ``factor = A: [S, r, I]``.
    """
    E, H, I = down.shape
    R = plan.capacity
    dgu = torch.empty_like(gu) if store_dgu else None
    w_args, w_consts = down.args(transposed=True)
    l_args, l_consts = Expand.args(expand, gu)

    def partials(cfg: BlockConfig) -> Optional[torch.Tensor]:
        if not store_partial:
            return None
        return torch.empty((R, triton.cdiv(I, cfg.BLOCK_N)), dtype=torch.float32, device=gu.device)

    def launch(cfg: BlockConfig, dgu_out: Optional[torch.Tensor], partial: Optional[torch.Tensor]) -> None:
        num_m = _row_blocks(plan, cfg.BLOCK_M)
        num_n = triton.cdiv(I, cfg.BLOCK_N)
        _down_bwd_kernel[(num_m * num_n,)](
            dout, plan.sorted_token_ids, plan.expert_offsets, gu, row_weights, dgu_out if store_dgu else gu,
            partial if store_partial else row_weights, E, num_m, num_n, dout.stride(0), dout.stride(1), *w_args,
            *l_args, H=H, I=I, E_PAD=triton.next_power_of_2(E), STORE_DGU=store_dgu, STORE_PARTIAL=store_partial,
            PRECISION=_precision(gu.dtype), **w_consts, **l_consts, **form_meta(form), **_meta(cfg),
        )  # fmt: skip

    if R == 0:
        return dgu, torch.zeros((0, 1), dtype=torch.float32, device=gu.device) if store_partial else None
    tune = lambda cfg: launch(cfg, _empty_like(dgu), partials(cfg))  # noqa: E731
    cfg = _config(down.kind("down_bwd"), I, H, plan, gu.dtype, gu.device, tune)
    partial = partials(cfg)
    launch(cfg, dgu, partial)
    return dgu, partial


def weight_grad(
    a: torch.Tensor,
    b: torch.Tensor,
    plan: RoutingPlan,
    experts: torch.Tensor,
    out_shape: Tuple[int, int],
    *,
    a_by_token: bool,
    b_by_token: bool,
    row_weights: Optional[torch.Tensor] = None,
    b_form: Optional[ExpertForm] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``out[p] = sum_{r in experts[p]} a(r)^T b(r)``, ``[P, M, N]`` (see ``_weight_grad_kernel``).

    Args:
        a: ``[T or R, M]`` rows read by token (``a_by_token``) or by row; scaled by ``row_weights`` when given.
        b: ``[T or R, N]`` likewise (a ``[R, 1]`` view of ones, stride 0: column sums, the bias gradients), or with
            ``b_form`` the pre-activations ``gu`` of that form (then b(r) = h[r], ``N = I``).
        experts: ``[P]`` int32 physical experts (``>= E``: none, zeros).
        out_shape: ``(M, N)``.
        out_dtype: default b's dtype.
    """
    M, N = out_shape
    P = experts.shape[0]
    out = torch.empty((P, M, N), dtype=out_dtype or b.dtype, device=b.device)

    def launch(cfg: BlockConfig, target: torch.Tensor) -> None:
        tiles = triton.cdiv(M, cfg.BLOCK_M) * triton.cdiv(N, cfg.BLOCK_N)
        _weight_grad_kernel[(P * tiles,)](
            a, b, plan.sorted_token_ids, plan.expert_offsets, row_weights if row_weights is not None else a, experts,
            target, plan.num_experts, M, N, a.stride(0), a.stride(1), b.stride(0), b.stride(1), *target.stride(),
            I=N if b_form is not None else 0, A_BY_TOKEN=a_by_token, A_ROW_WEIGHT=row_weights is not None,
            B_BY_TOKEN=b_by_token, B_FROM_GU=b_form is not None, ROW_LOOP_FOR=row_loop_is_for(),
            PRECISION=_precision(b.dtype), **form_meta(b_form or SILU), **_meta(cfg, grouped=False),
        )  # fmt: skip

    def fit(cfg: BlockConfig) -> BlockConfig:
        # LoRA factors' gradients are rank-thin ([r, K] or [K, r]): no tile wider than the padded dimension.
        return replace(cfg, BLOCK_M=min(cfg.BLOCK_M, rank_pad(M)), BLOCK_N=min(cfg.BLOCK_N, rank_pad(N)))

    if out.numel():
        tune = lambda cfg: launch(fit(cfg), torch.empty_like(out))  # noqa: E731
        launch(fit(_config("weight_grad", M, N, plan, b.dtype, b.device, tune)), out)
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
