"""Expert-layer shapes and random weights shared by the kernel benchmarks.

On a GPU the real shapes in bf16; on CPU H and I divided by ``CPU_SHRINK`` in fp32, so a CPU run (which
proves the scripts run and measures the reference tier) takes minutes.
"""

from __future__ import annotations

import functools
from typing import Tuple

import torch

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
CPU_SHRINK = 16

# name: (E, H, I, k)
MODELS = {
    "qwen3-30b-a3b": (128, 2048, 768, 8),
    "olmoe": (64, 2048, 1024, 8),
    "mixtral-8x7b": (8, 4096, 14336, 2),
    "deepseek-moe-16b": (64, 2048, 1408, 6),
}


def layer_shape(model: str) -> Tuple[int, int, int, int]:
    """``(E, H, I, k)`` of ``model``'s expert layer as benchmarked on this device."""
    E, H, I, k = MODELS[model]
    return (E, H, I, k) if CUDA else (E, H // CPU_SHRINK, I // CPU_SHRINK, k)


@functools.lru_cache(maxsize=1)
def layer_weights(model: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``gate_up [E, 2I, H]``, ``down [E, H, I]`` of one layer (seeded), kept across the cases of a model."""
    E, H, I, _ = layer_shape(model)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    gate_up = torch.randn(E, 2 * I, H, generator=g, device=DEVICE, dtype=DTYPE) / H**0.5
    down = torch.randn(E, H, I, generator=g, device=DEVICE, dtype=DTYPE) / I**0.5
    return gate_up, down
