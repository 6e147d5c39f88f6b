"""Grouped SwiGLU experts on quantized weights (W4A16 / W8A16), forward only: profiling's MoE layer."""

from __future__ import annotations

from typing import Optional

import torch

from flux_engine.backend import Op
from flux_engine.ops._checks import (
    check_floating,
    check_ids_in_range,
    check_integer,
    check_same_device,
    check_shape,
    check_tensor,
)
from flux_engine.ops.grouped_mlp import grouped_mlp_reference
from flux_engine.ops.quantize import QuantizedTensor


def quantized_grouped_mlp_reference(x, q_gate_up, q_down, topk_weights, topk_ids, expert_map):
    """Dequantise both stacks (one layer in x's dtype), then the reference grouped MLP."""
    return grouped_mlp_reference(x, q_gate_up, q_down, topk_weights, topk_ids, expert_map, None)


_op = Op("quantized_grouped_mlp", quantized_grouped_mlp_reference, preference=("triton",))


@_op.register("triton")
def _quantized_grouped_mlp_triton(x, q_gate_up, q_down, topk_weights, topk_ids, expert_map):
    from flux_engine.triton_kernels.grouped_mlp_autograd import grouped_mlp as kernel

    return kernel(x, q_gate_up, q_down, topk_weights, topk_ids, expert_map)


def quantized_grouped_mlp(
    x: torch.Tensor,
    q_gate_up: QuantizedTensor,
    q_down: QuantizedTensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_map: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``grouped_mlp`` with packed expert weights, forward only (no autograd).

    Args:
        x: ``[T, H]`` activations (fp32/bf16/fp16).
        q_gate_up: ``quantize(gate_up [E, 2I, H])`` (groups along H); q_down: ``quantize(down [E, H, I])``
            (groups along I). int4 group-wise or int8, symmetric or not.
        topk_weights, topk_ids, expert_map: as ``grouped_mlp``.

    Returns:
        ``[T, H]`` in x's dtype. The Triton tier (the grouped MLP kernels with a packed base) dequantises weight
        tiles in registers inside the GEMM loops.
    """
    check_tensor("x", x, ndim=2)
    check_floating("x", x)
    for name, q in (("q_gate_up", q_gate_up), ("q_down", q_down)):
        if not isinstance(q, QuantizedTensor):
            raise TypeError(f"{name} must be a QuantizedTensor, got {type(q).__name__}")
        if len(q.shape) != 3:
            raise ValueError(f"{name} must quantize a 3-D expert stack, got shape {tuple(q.shape)}")
    T, H = x.shape
    E, two_i, h_in = q_gate_up.shape
    I = two_i // 2
    if h_in != H or two_i != 2 * I:
        raise ValueError(f"q_gate_up must be [E, 2I, H={H}], got {tuple(q_gate_up.shape)}")
    if tuple(q_down.shape) != (E, H, I):
        raise ValueError(f"q_down must be [E={E}, H={H}, I={I}], got {tuple(q_down.shape)}")
    check_tensor("topk_weights", topk_weights, ndim=2)
    check_tensor("topk_ids", topk_ids, ndim=2)
    check_integer("topk_ids", topk_ids)
    check_shape("topk_ids", topk_ids, (T, topk_ids.shape[1]), "one row per token of x")
    check_shape("topk_weights", topk_weights, topk_ids.shape, "same [T, k] as topk_ids")
    num_original = E if expert_map is None else expert_map.shape[0]
    device = check_same_device(
        x=x, gate_up=q_gate_up.data, down=q_down.data, topk_weights=topk_weights, topk_ids=topk_ids,
        expert_map=expert_map,
    )  # fmt: skip
    if expert_map is not None:
        check_ids_in_range("expert_map", expert_map, E)
    check_ids_in_range("topk_ids", topk_ids, num_original)
    with torch.no_grad():
        return _op.select(device)(x, q_gate_up, q_down, topk_weights, topk_ids, expert_map)


quantized_grouped_mlp.op = _op
