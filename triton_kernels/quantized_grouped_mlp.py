"""W4A16 / W8A16 grouped SwiGLU MLP, forward only: the grouped MLP kernels with weight tiles dequantised in
registers from the packed ``QuantizedTensor`` layout (``flux_engine.ops.quantize``); no dequantised copy of
the weights ever reaches memory.

The kernels mirror ``grouped_mlp.py``'s ``_gate_up_kernel`` and ``_rows_kernel`` (forward, stored rows) and reuse
its jit helpers (``_swizzle``, ``_expert_block``, ``_dot``, ``_silu``), launch bounds (``_row_blocks``), block
configs and the deterministic ``combine``; only the weight-tile load differs (``_load_wq``). Quantization
groups run along the GEMM's reduction dimension (H for gate_up, I for down), so a ``BLOCK_K`` step touches
``ceil(BLOCK_K / group)`` scales per output column.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from flux_engine.ops.permute import RoutingPlan
from flux_engine.triton_kernels import grouped_mlp as g
from flux_engine.triton_kernels.grouped_mlp import _dot, _expert_block, _silu, _swizzle


@triton.jit
def _load_wq(
    data_base, scale_base, zero_base, n, n_ok, k, stride_dn, stride_sn,
    K: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
):  # fmt: skip
    """``B[k, n] = W[n, k]`` as fp32 ``[BLOCK_K, BLOCK_N]``, dequantised from codes (int4: two per byte, even
    column in the low nibble), per-group scales and zero points (or the symmetric zero: 8 for int4, 0 for int8)."""
    mask = (k[:, None] < K) & n_ok[None, :]
    if BITS == 4:
        byte = tl.load(data_base + n[None, :] * stride_dn + k[:, None] // 2, mask=mask, other=0).to(tl.int32)
        code = (byte >> ((k[:, None] % 2) * 4)) & 0xF
    else:
        code = tl.load(data_base + n[None, :] * stride_dn + k[:, None], mask=mask, other=0).to(tl.int32)
    grp = k[:, None] // GROUP
    scale = tl.load(scale_base + n[None, :] * stride_sn + grp, mask=mask, other=0.0)
    if HAS_ZEROS:
        zero = tl.load(zero_base + n[None, :] * stride_sn + grp, mask=mask, other=0).to(tl.int32)
    else:
        zero = 8 if BITS == 4 else 0
    return (code - zero).to(tl.float32) * scale


@triton.jit
def _mma_q(
    acc, a_ptrs, a_ok, stride_ak, data_base, scale_base, zero_base, n, n_ok, stride_dn, stride_sn,
    K: tl.constexpr, BLOCK_K: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """``acc += A @ dequant(W)^T`` over ``K``, A as in ``grouped_mlp._mma``, W's rows ``n`` (static K loop)."""
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptrs + k[None, :] * stride_ak, mask=a_ok[:, None] & (k[None, :] < K), other=0.0)
        b = _load_wq(data_base, scale_base, zero_base, n, n_ok, k, stride_dn, stride_sn, K, BITS, GROUP, HAS_ZEROS)
        acc = _dot(a, b.to(a.dtype), acc, PRECISION)
    return acc


@triton.jit
def _gate_up_q_kernel(
    x_ptr, data_ptr, scale_ptr, zero_ptr, token_ids_ptr, offsets_ptr, h_ptr, E, num_m, stride_xt, stride_xh,
    stride_de, stride_dn, stride_se, stride_sn,
    H: tl.constexpr, I: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
    HAS_ZEROS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """``h [R, I] = silu(x W1g^T) * (x W1u^T)`` from packed ``W1 [E, 2I, H]``; as ``grouped_mlp._gate_up_kernel``."""
    pid_m, pid_n = _swizzle(tl.program_id(0), num_m, tl.cdiv(I, BLOCK_N), GROUP_M)
    expert, start, end = _expert_block(offsets_ptr, pid_m, E, E_PAD, BLOCK_M)
    if start >= end:
        return
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    tokens = tl.load(token_ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    c = tl.arange(0, 2 * BLOCK_N)
    n_of_c = pid_n * BLOCK_N + c // 2
    w_rows = n_of_c + (c % 2) * I
    e64 = expert.to(tl.int64)
    acc = _mma_q(
        tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32), x_ptr + tokens[:, None] * stride_xt, row_ok, stride_xh,
        data_ptr + e64 * stride_de, scale_ptr + e64 * stride_se, zero_ptr + e64 * stride_se, w_rows, n_of_c < I,
        stride_dn, stride_sn, H, BLOCK_K, BITS, GROUP, HAS_ZEROS, PRECISION,
    )  # fmt: skip
    gate, up = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = row_ok[:, None] & (cols[None, :] < I)
    h = _silu(gate) * up
    tl.store(h_ptr + rows.to(tl.int64)[:, None] * I + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _down_q_kernel(
    a_ptr, data_ptr, scale_ptr, zero_ptr, offsets_ptr, out_ptr, E, num_m, N, stride_de, stride_dn, stride_se,
    stride_sn, stride_out,
    K: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """``out[r] = h[r] @ dequant(W2_e)^T`` for sorted rows (``W2 [E, N=H, K=I]`` packed); as ``_rows_kernel``."""
    pid_m, pid_n = _swizzle(tl.program_id(0), num_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    expert, start, end = _expert_block(offsets_ptr, pid_m, E, E_PAD, BLOCK_M)
    if start >= end:
        return
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    e64 = expert.to(tl.int64)
    acc = _mma_q(
        tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), a_ptr + rows.to(tl.int64)[:, None] * K, row_ok, 1,
        data_ptr + e64 * stride_de, scale_ptr + e64 * stride_se, zero_ptr + e64 * stride_se, cols, col_ok,
        stride_dn, stride_sn, K, BLOCK_K, BITS, GROUP, HAS_ZEROS, PRECISION,
    )  # fmt: skip
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _qargs(q):
    data, scales = q.data, q.scales
    zeros = q.zeros if q.zeros is not None else scales
    if data.stride(-1) != 1 or scales.stride(-1) != 1 or (q.zeros is not None and q.zeros.stride() != scales.stride()):
        raise ValueError("quantized weights must be contiguous along their last dimension")
    return data, scales, zeros, (data.stride(0), data.stride(1), scales.stride(0), scales.stride(1))


def quantized_grouped_mlp_forward(
    x: torch.Tensor, q_gate_up, q_down, topk_weights: torch.Tensor, plan: RoutingPlan
) -> torch.Tensor:
    """``[T, H]`` in x's dtype; ``q_gate_up`` packs ``[E, 2I, H]``, ``q_down`` packs ``[E, H, I]``."""
    E, two_i, H = q_gate_up.shape
    I = two_i // 2
    R = plan.capacity
    h = torch.empty((R, I), dtype=x.dtype, device=x.device)
    y = torch.empty((R, H), dtype=x.dtype, device=x.device)
    if R:
        prec, e_pad = g._precision(x.dtype), triton.next_power_of_2(E)
        data, scales, zeros, strides = _qargs(q_gate_up)
        cfg = g._config("gate_up", I, H, plan, x.dtype, x.device, None)
        num_m = g._row_blocks(plan, cfg.BLOCK_M)
        _gate_up_q_kernel[(num_m * triton.cdiv(I, cfg.BLOCK_N),)](
            x, data, scales, zeros, plan.sorted_token_ids, plan.expert_offsets, h, E, num_m, x.stride(0),
            x.stride(1), *strides, H=H, I=I, E_PAD=e_pad, BITS=q_gate_up.bits, GROUP=q_gate_up.group_size,
            HAS_ZEROS=q_gate_up.zeros is not None, PRECISION=prec, **g._meta(cfg),
        )  # fmt: skip
        data, scales, zeros, strides = _qargs(q_down)
        cfg = g._config("down", H, I, plan, x.dtype, x.device, None)
        num_m = g._row_blocks(plan, cfg.BLOCK_M)
        _down_q_kernel[(num_m * triton.cdiv(H, cfg.BLOCK_N),)](
            h, data, scales, zeros, plan.expert_offsets, y, E, num_m, H, *strides, y.stride(0), K=I, E_PAD=e_pad,
            BITS=q_down.bits, GROUP=q_down.group_size, HAS_ZEROS=q_down.zeros is not None, PRECISION=prec,
            **g._meta(cfg),
        )  # fmt: skip
    return g.combine(y, plan, topk_weights, x.dtype)


def quantized_grouped_mlp(x, q_gate_up, q_down, topk_weights, topk_ids, expert_map: Optional[torch.Tensor]):
    """Triton tier of ``flux_engine.ops.quantized_grouped_mlp`` (validated by the op)."""
    from flux_engine.ops.permute import permute

    plan = permute.op.select(topk_ids.device)(topk_ids, q_gate_up.shape[0], expert_map)
    return quantized_grouped_mlp_forward(x, q_gate_up, q_down, topk_weights, plan)
