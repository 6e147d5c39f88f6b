"""Grouped experts on quantized weights (W4A16 / W8A16), forward only: profiling's MoE layer.

A thin entry point over ``grouped_mlp``, which validates packed bases and dispatches them to the same kernels
(the Triton tier dequantises weight tiles in registers inside the GEMM loops; the reference dequantises a layer).
"""

from __future__ import annotations

from typing import Optional

import torch

from flux_engine.ops.expert_form import SILU, ExpertForm
from flux_engine.ops.grouped_mlp import grouped_mlp, grouped_mlp_reference
from flux_engine.ops.quantize import QuantizedTensor


def quantized_grouped_mlp_reference(
    x, q_gate_up, q_down, topk_weights, topk_ids, expert_map, *, form=SILU, gate_up_bias=None, down_bias=None
):  # fmt: skip
    """Dequantise both stacks (one layer in x's dtype), then the reference grouped MLP."""
    return grouped_mlp_reference(
        x, q_gate_up, q_down, topk_weights, topk_ids, expert_map, None, form=form, gate_up_bias=gate_up_bias,
        down_bias=down_bias,
    )  # fmt: skip


def quantized_grouped_mlp(
    x: torch.Tensor,
    q_gate_up: QuantizedTensor,
    q_down: QuantizedTensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_map: Optional[torch.Tensor] = None,
    *,
    form: ExpertForm = SILU,
    gate_up_bias: Optional[torch.Tensor] = None,
    down_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``grouped_mlp`` with packed expert weights, forward only (no autograd).

    Args:
        x: ``[T, H]`` activations (fp32/bf16/fp16).
        q_gate_up: ``quantize(gate_up [E, 2I, H])`` (``[E, I, H]`` ungated; groups along H); q_down:
            ``quantize(down [E, H, I])``
            (groups along I). int4 group-wise or int8, symmetric or not.
        topk_weights, topk_ids, expert_map, form, gate_up_bias, down_bias: as ``grouped_mlp`` (the biases plain
            tensors in x's dtype).

    Returns:
        ``[T, H]`` in x's dtype.
    """
    for name, q in (("q_gate_up", q_gate_up), ("q_down", q_down)):
        if not isinstance(q, QuantizedTensor):
            raise TypeError(f"{name} must be a QuantizedTensor, got {type(q).__name__}")
    with torch.no_grad():
        return grouped_mlp(
            x, q_gate_up, q_down, topk_weights, topk_ids, expert_map, form=form, gate_up_bias=gate_up_bias,
            down_bias=down_bias,
        )  # fmt: skip
