"""Group-wise int4 / int8 quantization and dequantization (layout: ``flux_engine.ops.quantize``).

The weight is viewed as ``[R, K]`` rows (all leading dimensions flattened). ``quantize`` runs one program
per (block of ``BLOCK_R`` rows, group): a first sweep over the group finds its range, a second computes
and stores the codes, so a per-channel group as wide as ``K`` streams through registers in chunks.
int4 programs read even and odd columns as two tiles, which makes packing a byte a plain OR.

Bit-exactness with the torch reference rests on two choices: divisions use ``tl.math.div_rn`` (a plain
``/`` on fp32 compiles to an approximate division on NVIDIA GPUs), and rounding is round-half-to-even
like ``torch.round`` through the fp32 magic-number trick (``_rint``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from flux_engine.triton_kernels.grouped_mlp import _interleave

# Elements of a program's [BLOCK_R, chunk] tile.
_TILE = 4096
_MAX_CHUNK = 1024


@triton.jit
def _rint(x):
    # 1.5 * 2**23: for |x| < 2**22 the sum has no fraction bits left, so the fp32 adder rounds x to an
    # integer, ties to even; subtracting the constant back is exact. Here |x| stays near 255 at most.
    return (x + 12582912.0) - 12582912.0


@triton.jit
def _to_bf16(x):
    # Round-to-nearest-even done on the fp32 bit pattern. A plain cast is RNE on GPUs, but the Triton
    # interpreter truncates fp32 -> bf16, so the explicit form is the one path exact on both.
    # Finite inputs only: a NaN with an all-low payload would round to inf.
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _codes(x, scale, zero, QMIN: tl.constexpr, QMAX: tl.constexpr):
    """Codes of the fp32 tile ``x: [BLOCK_R, CHUNK]`` as int32: ``clamp(round(x / scale) + zero, QMIN, QMAX)``."""
    q = _rint(tl.math.div_rn(x, scale[:, None])) + zero[:, None]
    return tl.minimum(tl.maximum(q, QMIN), QMAX).to(tl.int32)


@triton.jit
def _quantize_kernel(
    w_ptr,
    data_ptr,
    scales_ptr,
    zeros_ptr,
    R,
    G: tl.constexpr,  # constexpr: the group sweeps are static loops (Triton 3.6's interpreter needs that too)
    NG,
    stride_wr,
    BITS: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    DIVISOR: tl.constexpr,
    BIAS: tl.constexpr,
    QMIN: tl.constexpr,
    QMAX: tl.constexpr,
    BLOCK_R: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """``w: [R, K]`` (unit column stride) -> ``data: [R, K/2 or K]``, ``scales`` / ``zeros: [R, NG]``.

    Grid ``(cdiv(R, BLOCK_R), NG)``; ``CHUNK`` columns (int4: column pairs) per step of a sweep.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    group = tl.program_id(1)
    row_ok = rows < R
    row_base = w_ptr + rows[:, None].to(tl.int64) * stride_wr
    col0 = group * G
    lanes = tl.arange(0, CHUNK)

    lo = tl.zeros((BLOCK_R,), dtype=tl.float32)
    hi = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c in range(0, G, CHUNK):
        cols = c + lanes
        mask = row_ok[:, None] & (cols[None, :] < G)
        # Padding loads 0, which cannot move min(group, 0), max(group, 0) or the absolute maximum.
        x = tl.load(row_base + col0 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        lo = tl.minimum(lo, tl.min(x, axis=1))
        hi = tl.maximum(hi, tl.max(x, axis=1))

    divisor = tl.full((BLOCK_R,), DIVISOR, tl.float32)
    if SYMMETRIC:
        amax = tl.maximum(hi, -lo)
        scale = tl.where(amax > 0, tl.math.div_rn(amax, divisor), 1.0)
        zero = tl.full((BLOCK_R,), BIAS, tl.float32)
    else:
        span = hi - lo
        scale = tl.where(span > 0, tl.math.div_rn(span, divisor), 1.0)
        zero = tl.minimum(tl.maximum(_rint(tl.math.div_rn(-lo, scale)), 0.0), QMAX)
        tl.store(zeros_ptr + rows.to(tl.int64) * NG + group, zero.to(tl.uint8), mask=row_ok)
    tl.store(scales_ptr + rows.to(tl.int64) * NG + group, scale, mask=row_ok)

    if BITS == 4:
        out_base = data_ptr + rows[:, None].to(tl.int64) * (NG * G // 2) + col0 // 2
        for c in range(0, G // 2, CHUNK):
            pairs = c + lanes
            mask = row_ok[:, None] & (pairs[None, :] < G // 2)
            even = tl.load(row_base + col0 + 2 * pairs[None, :], mask=mask, other=0.0)
            odd = tl.load(row_base + col0 + 2 * pairs[None, :] + 1, mask=mask, other=0.0)
            q_even = _codes(even.to(tl.float32), scale, zero, QMIN, QMAX)
            q_odd = _codes(odd.to(tl.float32), scale, zero, QMIN, QMAX)
            tl.store(out_base + pairs[None, :], (q_even | (q_odd << 4)).to(tl.uint8), mask=mask)
    else:
        out_base = data_ptr + rows[:, None].to(tl.int64) * (NG * G) + col0
        for c in range(0, G, CHUNK):
            cols = c + lanes
            mask = row_ok[:, None] & (cols[None, :] < G)
            x = tl.load(row_base + col0 + cols[None, :], mask=mask, other=0.0)
            q = _codes(x.to(tl.float32), scale, zero, QMIN, QMAX)
            tl.store(out_base + cols[None, :], q.to(data_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequantize_kernel(
    data_ptr,
    scales_ptr,
    zeros_ptr,
    out_ptr,
    R,
    K,
    G,
    BITS: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    BIAS: tl.constexpr,
    OUT_BF16: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Codes ``[R, K/2 or K]`` with ``scales`` / ``zeros: [R, K/G]`` -> ``out: [R, K]``; grid over 2-D tiles."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows < R)[:, None] & (cols < K)[None, :]
    r64 = rows[:, None].to(tl.int64)
    if BITS == 4:
        # Each byte loaded once (an arange of byte columns, so the load vectorises), split into its two nibbles.
        bcols = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        bmask = (rows < R)[:, None] & (bcols < K // 2)[None, :]
        packed = tl.load(data_ptr + r64 * (K // 2) + bcols[None, :], mask=bmask, other=0).to(tl.int32)
        code = _interleave(packed & 0xF, packed >> 4, 1).to(tl.float32)
    else:
        code = tl.load(data_ptr + r64 * K + cols[None, :], mask=mask, other=0).to(tl.float32)
    NG = K // G
    gidx = r64 * NG + cols[None, :] // G
    scale = tl.load(scales_ptr + gidx, mask=mask, other=1.0)
    if SYMMETRIC:
        value = (code - BIAS) * scale
    else:
        zero = tl.load(zeros_ptr + gidx, mask=mask, other=0).to(tl.float32)
        value = (code - zero) * scale
    if OUT_BF16:
        value = _to_bf16(value)
    tl.store(out_ptr + r64 * K + cols[None, :], value.to(out_ptr.dtype.element_ty), mask=mask)


def _sym_bias(bits: int) -> int:
    """Zero point of the symmetric grids: int4 codes are stored as q + 8, int8 codes signed."""
    return 8 if bits == 4 else 0


def _pow2_at_most(n: int, cap: int) -> int:
    return min(cap, triton.next_power_of_2(max(n, 1)))


def quantize(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Triton tier of ``flux_engine.ops.quantize``; bit-exact with ``quantize_reference``.

    Args:
        w: ``[..., K]`` float weight.
        bits: 4 or 8.
        group_size: ``G``, divides ``K`` (even for int4).
        symmetric: fixed zero point (8 for int4, 0 for int8) instead of a stored one.

    Returns:
        ``data`` (int4: uint8 ``[..., K/2]``; int8: int8 ``[..., K]`` when symmetric, else uint8),
        ``scales`` float32 ``[..., K/G]``, ``zeros`` uint8 ``[..., K/G]`` or None when symmetric.
    """
    lead, K = tuple(w.shape[:-1]), w.shape[-1]
    w2 = w.reshape(-1, K)
    if w2.dtype == torch.float64:
        # The kernel computes in fp32, as the reference does (it quantizes ``w.float()``): round once here rather
        # than have the kernel load fp64, which the GPU path does not support.
        w2 = w2.float()
    if w2.stride(1) != 1:
        # Unit column stride keeps the loads coalesced and the column offsets in int32.
        w2 = w2.contiguous()
    R, ng = w2.shape[0], K // group_size
    dev = w.device
    code_dtype = torch.int8 if bits == 8 and symmetric else torch.uint8
    data = torch.empty((R, K // 2 if bits == 4 else K), dtype=code_dtype, device=dev)
    scales = torch.empty((R, ng), dtype=torch.float32, device=dev)
    zeros = None if symmetric else torch.empty((R, ng), dtype=torch.uint8, device=dev)
    if R > 0:
        half, qmax = (1 << (bits - 1)) - 1, (1 << bits) - 1
        per_chunk = group_size // 2 if bits == 4 else group_size
        chunk = _pow2_at_most(per_chunk, _MAX_CHUNK)
        block_r = _pow2_at_most(R, max(1, _TILE // chunk))
        _quantize_kernel[(triton.cdiv(R, block_r), ng)](
            w2,
            data,
            scales,
            scales if zeros is None else zeros,  # never written when symmetric
            R,
            group_size,
            ng,
            w2.stride(0),
            BITS=bits,
            SYMMETRIC=symmetric,
            DIVISOR=half if symmetric else qmax,
            BIAS=_sym_bias(bits),
            # Symmetric int4 uses the whole -8..7 grid (stored 0..15); int8 stays within -127..127.
            QMIN=(0 if bits == 4 else -half) if symmetric else 0,
            QMAX=_sym_bias(bits) + half if symmetric else qmax,
            BLOCK_R=block_r,
            CHUNK=chunk,
        )
    data = data.reshape(*lead, data.shape[-1])
    scales = scales.reshape(*lead, ng)
    return data, scales, None if zeros is None else zeros.reshape(*lead, ng)


def dequantize(
    data: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    bits: int,
    group_size: int,
    shape: torch.Size,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Triton tier of ``flux_engine.ops.dequantize``: ``(code - zero) * scale`` in fp32, cast to ``dtype``.

    Args:
        data: packed codes (int4: uint8 ``[..., K/2]``; int8: int8 / uint8 ``[..., K]``).
        scales: float32 ``[..., K/G]``.
        zeros: uint8 ``[..., K/G]``, or None when symmetric (zero 8 for int4, 0 for int8).
        bits: 4 or 8.
        group_size: ``G``.
        shape: ``[..., K]``, the shape of the original weight.
        dtype: output dtype.

    Returns:
        ``[..., K]`` tensor of ``dtype``.
    """
    K = shape[-1]
    if dtype == torch.float64:
        # Values are computed in fp32 (as the reference does); the kernel stores fp32/bf16/fp16 only.
        return dequantize(data, scales, zeros, bits, group_size, shape, torch.float32).double()
    out = torch.empty(shape, dtype=dtype, device=data.device)
    R = out.numel() // K if K else 0
    if R == 0:
        return out
    block_k = _pow2_at_most(K, _MAX_CHUNK)
    block_r = _pow2_at_most(R, max(1, _TILE // block_k))
    _dequantize_kernel[(triton.cdiv(R, block_r), triton.cdiv(K, block_k))](
        data.contiguous(),
        scales.contiguous(),
        scales if zeros is None else zeros.contiguous(),  # never read when symmetric
        out,
        R,
        K,
        group_size,
        BITS=bits,
        SYMMETRIC=zeros is None,
        BIAS=_sym_bias(bits),
        OUT_BF16=dtype == torch.bfloat16,
        BLOCK_R=block_r,
        BLOCK_K=block_k,
    )
    return out
