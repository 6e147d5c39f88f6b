"""MXFP4 expert weights, as gpt-oss checkpoints store them (OCP Microscaling FP4, the layout transformers' ``mxfp4``
integration reads).

A weight ``[..., N, K]`` (``N`` output rows, ``K`` the reduction dimension, the runtime's own orientation) is held as

- ``blocks``: uint8 ``[..., N, K/32, 16]``: 32 FP4 (E2M1) codes per group, two per byte, the even column in the low
  nibble and the odd column in the high nibble;
- ``scales``: uint8 ``[..., N, K/32]``: one E8M0 power of two per group, biased by 127.

value = FP4[code] * 2^(scale - 127), FP4 = {0, 0.5, 1, 1.5, 2, 3, 4, 6} and their negatives (code bit 3 = sign).

``MXFP4Weight`` wraps the pair and decodes rows on demand, so a loader can dequantise one row chunk at a time
(``rows``) into bf16 or straight into the profiling int4 format, never the whole model in full precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

GROUP = 32  # values per scale
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_MAX_FP4 = 6.0
_SCALE_BIAS = 127
# Rows decoded per step of ``dequantize``: bounds the int64 index temporaries to a few tens of MiB.
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class MXFP4Weight:
    """A packed MXFP4 weight (see the module docstring); ``shape`` is the decoded ``[..., N, K]``, ``dtype`` what
    ``rows`` / ``dequantize`` decode to."""

    blocks: torch.Tensor
    scales: torch.Tensor
    dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        b, s = self.blocks, self.scales
        if b.dtype != torch.uint8 or s.dtype != torch.uint8:
            raise ValueError(f"MXFP4 blocks and scales must be uint8, got {b.dtype} and {s.dtype}")
        if b.dim() < 2 or b.shape[-1] != GROUP // 2 or tuple(b.shape[:-1]) != tuple(s.shape):
            raise ValueError(
                f"MXFP4 blocks {list(b.shape)} and scales {list(s.shape)}: expected [..., G, {GROUP // 2}] and [..., G]"
            )

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.scales.shape[:-1], self.scales.shape[-1] * GROUP))

    @property
    def device(self) -> torch.device:
        return self.blocks.device

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "MXFP4Weight":
        """The packed weight on ``device``, decoding to ``dtype`` (still packed)."""
        return MXFP4Weight(self.blocks.to(device), self.scales.to(device), dtype or self.dtype)

    def nbytes(self) -> int:
        return self.blocks.numel() + self.scales.numel()

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of the weight flattened to ``[R, K]``, decoded: ``[stop - start, K]``."""
        G = self.scales.shape[-1]
        blocks = self.blocks.reshape(-1, G, GROUP // 2)[start:stop]
        scales = self.scales.reshape(-1, G)[start:stop]
        lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
        codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).long()  # [r, G, 16, 2]: even, odd column
        values = lut[codes].reshape(*scales.shape, GROUP)
        # 2^(s - 127) is exact in float32 for every s but 0 and 255 (no subnormal / NaN scales in practice).
        values = torch.ldexp(values, scales.to(torch.int32).sub(_SCALE_BIAS).unsqueeze(-1).float())
        return values.reshape(scales.shape[0], G * GROUP).to(self.dtype)

    def dequantize(self) -> torch.Tensor:
        """The whole weight ``[..., N, K]``, decoded in row chunks."""
        K = self.shape[-1]
        R = math.prod(self.shape[:-1])
        out = torch.empty(R, K, dtype=self.dtype, device=self.blocks.device)
        step = max(1, _CHUNK_ELEMENTS // K)
        for i in range(0, R, step):
            out[i : i + step] = self.rows(i, min(i + step, R))
        return out.view(self.shape)


def quantize_mxfp4(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(blocks, scales)`` of ``w: [..., K]`` (K a multiple of 32): per group the smallest power of two that
    brings the group's largest magnitude within FP4's 6, then each value rounded to the nearest FP4 value (ties to
    the lower magnitude). What gpt-oss checkpoints hold; used to write MXFP4 test checkpoints."""
    K = w.shape[-1]
    if K % GROUP:
        raise ValueError(f"MXFP4 needs the last dimension to be a multiple of {GROUP}, got {K}")
    groups = w.detach().float().reshape(*w.shape[:-1], K // GROUP, GROUP)
    amax = groups.abs().amax(dim=-1)
    exp = torch.where(amax > 0, torch.ceil(torch.log2(amax / _MAX_FP4)), torch.zeros_like(amax))
    exp = exp.clamp(-_SCALE_BIAS, _SCALE_BIAS)
    scaled = groups / torch.ldexp(torch.ones_like(exp), exp.int()).unsqueeze(-1)
    magnitudes = torch.tensor(FP4_VALUES[:8], device=w.device)
    code = (scaled.abs().unsqueeze(-1) - magnitudes).abs().argmin(dim=-1)  # first (lower) magnitude on a tie
    code = code | ((scaled < 0).long() << 3)
    code = code.to(torch.uint8).reshape(*groups.shape[:-1], GROUP // 2, 2)
    blocks = code[..., 0] | (code[..., 1] << 4)
    return blocks.contiguous(), (exp + _SCALE_BIAS).to(torch.uint8)
