"""Group-wise integer quantization of weights (int4 / int8), the format profiling runs on.

Packed layout (documented contract for every kernel that reads it):
- Groups run along the last dimension ``K`` (the input dimension of a linear / expert weight), ``group_size``
  consecutive columns share one scale (and zero point). ``group_size == K`` is per-channel.
- int4: ``data`` is uint8 ``[..., K/2]``; column ``2j`` sits in the low nibble of byte ``j``, column ``2j+1``
  in the high nibble. Codes are unsigned 0..15.
- int8: ``data`` is ``[..., K]``, int8 codes -127..127 when symmetric, uint8 codes 0..255 when asymmetric.
- ``scales``: float32 ``[..., K/group_size]``. ``zeros``: uint8 ``[..., K/group_size]`` zero-point codes
  (asymmetric), or None (symmetric: the zero point is 8 for int4 and 0 for int8).
- value = (code - zero) * scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from flux_engine.backend import Op, native_extension
from flux_engine.ops._checks import check_floating, check_tensor

BITS = (4, 8)
DEFAULT_INT4_GROUP = 128


@dataclass(frozen=True)
class QuantizedTensor:
    """A quantized weight; see the module docstring for the layout.

    Attributes:
        data: packed codes (int4: uint8 ``[..., K/2]``; int8: int8/uint8 ``[..., K]``).
        scales: float32 ``[..., K/group_size]``.
        zeros: uint8 ``[..., K/group_size]`` or None when symmetric.
        bits: 4 or 8.
        group_size: columns per scale.
        shape: shape of the original tensor ``[..., K]``.
        dtype: dtype of the original tensor, restored by ``dequantize``.
    """

    data: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    bits: int
    group_size: int
    shape: torch.Size
    dtype: torch.dtype

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def device(self) -> torch.device:
        return self.data.device

    def nbytes(self) -> int:
        """Bytes held by codes, scales and zero points."""
        total = self.data.numel() * self.data.element_size() + self.scales.numel() * self.scales.element_size()
        return total + (0 if self.zeros is None else self.zeros.numel() * self.zeros.element_size())


def _qmax(bits: int) -> int:
    return (1 << bits) - 1


def quantize_codes_reference(w: torch.Tensor, bits: int, group_size: int, symmetric: bool):
    """Unpacked codes ``[..., K]`` (uint8 or int8), scales and zeros: the math every tier must reproduce."""
    # Contiguous: codes keep the input's strides through the elementwise math, and the packers read rows.
    groups = w.float().contiguous().reshape(*w.shape[:-1], w.shape[-1] // group_size, group_size)
    if symmetric:
        half = (1 << (bits - 1)) - 1  # 7 or 127: keeps the grid symmetric around zero
        amax = groups.abs().amax(dim=-1)
        scales = torch.where(amax > 0, amax / half, torch.ones_like(amax))
        q = torch.clamp(torch.round(groups / scales.unsqueeze(-1)), -half - (bits == 4), half)
        codes = (q + 8).to(torch.uint8) if bits == 4 else q.to(torch.int8)
        zeros = None
    else:
        lo = groups.amin(dim=-1).clamp(max=0)
        hi = groups.amax(dim=-1).clamp(min=0)
        span = hi - lo
        scales = torch.where(span > 0, span / _qmax(bits), torch.ones_like(span))
        zeros_f = torch.clamp(torch.round(-lo / scales), 0, _qmax(bits))
        q = torch.clamp(torch.round(groups / scales.unsqueeze(-1)) + zeros_f.unsqueeze(-1), 0, _qmax(bits))
        codes = q.to(torch.uint8)
        zeros = zeros_f.to(torch.uint8)
    return codes.reshape(w.shape), scales, zeros


def pack_int4_reference(codes: torch.Tensor) -> torch.Tensor:
    """``codes: [..., K]`` uint8 in 0..15 -> ``[..., K/2]`` uint8, even column in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4_reference(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_int4_reference``: ``[..., K/2]`` -> ``[..., K]`` uint8."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def quantize_reference(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> QuantizedTensor:
    codes, scales, zeros = quantize_codes_reference(w, bits, group_size, symmetric)
    data = pack_int4_reference(codes) if bits == 4 else codes
    return QuantizedTensor(data, scales, zeros, bits, group_size, w.shape, w.dtype)


def dequantize_reference(q: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    codes = unpack_int4_reference(q.data) if q.bits == 4 else q.data
    groups = codes.float().reshape(*q.shape[:-1], q.shape[-1] // q.group_size, q.group_size)
    if q.zeros is not None:
        zero = q.zeros.float().unsqueeze(-1)
    else:
        zero = torch.tensor(8.0 if q.bits == 4 else 0.0, device=codes.device)
    return ((groups - zero) * q.scales.unsqueeze(-1)).reshape(q.shape).to(dtype)


_quantize_op = Op("quantize", quantize_reference, preference=("triton", "cpu"))
_dequantize_op = Op("dequantize", dequantize_reference, preference=("cuda", "triton", "cpu"))


@_quantize_op.register("cpu")
def _quantize_cpu(w, bits, group_size, symmetric):
    codes, scales, zeros = quantize_codes_reference(w, bits, group_size, symmetric)
    data = native_extension().pack_int4(codes) if bits == 4 else codes
    return QuantizedTensor(data, scales, zeros, bits, group_size, w.shape, w.dtype)


# Output dtypes of the native dequantize kernels.
_NATIVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dequantize_native(q, dtype):
    if dtype not in _NATIVE_DTYPES:
        # The kernels write only these; float64 (the default for a quantized float64 weight) takes the reference.
        return dequantize_reference(q, dtype)
    if q.bits == 4:
        return native_extension().dequantize_int4(q.data, q.scales, q.zeros, q.group_size, dtype)
    # The reference materialises full-size float32 temporaries: ~64 ms for an [8, 3072, 576] per-channel stack, where
    # a copy of the float32 result takes ~3 ms. The kernel reads each code once and writes each output once.
    return native_extension().dequantize_int8(q.data, q.scales, q.zeros, q.group_size, dtype)


def _cuda_lacks(q, dtype):
    # int8 goes on to the next tier on a GPU: the Triton kernel, which reads both widths.
    return "int8 (there is no CUDA int8 kernel)" if q.bits == 8 else None


_dequantize_op.register("cpu")(_dequantize_native)
_dequantize_op.register("cuda", unsupported=_cuda_lacks)(_dequantize_native)


@_quantize_op.register("triton")
def _quantize_triton(w, bits, group_size, symmetric):
    from flux_engine.triton_kernels.quantize import quantize as kernel

    data, scales, zeros = kernel(w, bits, group_size, symmetric)
    return QuantizedTensor(data, scales, zeros, bits, group_size, w.shape, w.dtype)


@_dequantize_op.register("triton")
def _dequantize_triton(q, dtype):
    from flux_engine.triton_kernels.quantize import dequantize as kernel

    return kernel(q.data, q.scales, q.zeros, q.bits, q.group_size, q.shape, dtype)


def quantize(
    w: torch.Tensor, bits: int = 4, group_size: Optional[int] = None, *, symmetric: bool = True
) -> QuantizedTensor:
    """Quantize ``w: [..., K]`` group-wise along its last dimension.

    Args:
        w: floating-point weight, e.g. an expert stack ``[E, N, K]`` or a linear ``[N, K]``.
        bits: 4 or 8.
        group_size: columns per scale; must divide ``K`` (and be even for int4). Default: 128 for int4,
            ``K`` (per-channel) for int8.
        symmetric: zero point fixed at the grid's centre; otherwise a per-group zero point is stored.
    """
    check_tensor("w", w)
    check_floating("w", w)
    if w.dim() < 1 or w.shape[-1] == 0:
        raise ValueError(f"w must have a non-empty last dimension, got shape {tuple(w.shape)}")
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    K = w.shape[-1]
    if group_size is None:
        group_size = DEFAULT_INT4_GROUP if bits == 4 else K
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or K % group_size:
        raise ValueError(f"group_size={group_size!r} must be a positive divisor of the last dimension K={K}")
    if bits == 4 and group_size % 2:
        raise ValueError(f"group_size={group_size} must be even for int4 (two codes per byte)")
    # One NaN or Inf makes its group's scale NaN/Inf and every code of the group garbage, silently. Checked on the
    # host (a sync on CUDA): weights are quantized once per profile or model load, never per token. Traced by dynamo:
    # a device-side assert (no graph break).
    finite = torch.isfinite(w)
    if torch.compiler.is_compiling():
        torch._assert_async(finite.all(), "w has non-finite values (NaN/Inf): their quantized groups would be garbage")
    elif not bool(finite.all()):
        first = tuple(torch.nonzero(~finite)[0].tolist())
        raise ValueError(
            f"w has {int((~finite).sum())} non-finite values (NaN/Inf; the first at index {first}): quantizing "
            "would turn their whole groups into garbage"
        )
    return _quantize_op.select(w.device)(w, bits, group_size, bool(symmetric))


def dequantize(q: QuantizedTensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Rebuild a ``[..., K]`` tensor from ``q`` in ``dtype`` (default: the original dtype)."""
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"q must be a QuantizedTensor, got {type(q).__name__}")
    return _dequantize_op.run(q.device, q, dtype or q.dtype)


quantize.op = _quantize_op
dequantize.op = _dequantize_op
