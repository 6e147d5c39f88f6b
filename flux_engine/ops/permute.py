"""Routing plan: (token, slot) pairs grouped by physical expert, index-only.

The plan never copies activations. A grouped GEMM reads row ``r`` of expert ``e`` (``offsets[e] <= r <
offsets[e+1]``) from ``x[sorted_token_ids[r]]`` and scatters its result back to the same token. With an
``expert_map`` several original experts share one physical (merged) expert; a token that chose two of
them gets one row, whose routing weight is the sum of both slots' weights (``RoutingPlan.row_weights``),
so merging removes FLOPs instead of repeating the same expert twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from flux_engine.backend import Op
from flux_engine.ops._checks import (
    check_ids_in_range,
    check_integer,
    check_positive_int,
    check_same_device,
    check_shape,
    check_tensor,
)


@dataclass(frozen=True)
class RoutingPlan:
    """Rows sorted by physical expert; buffers sized by the host-known bound ``T * k``.

    Attributes:
        sorted_token_ids: ``[T*k]`` int32, the token of each row; rows grouped by expert, tokens ascending
            within an expert. Rows at or past ``expert_offsets[-1]`` are filler holding ``T``.
        expert_offsets: ``[E+1]`` int32, rows of expert ``e`` are ``expert_offsets[e]:expert_offsets[e+1]``.
        slot_rows: ``[T, k]`` int32, the row each (token, slot) pair landed in; duplicate pairs share a row.
        num_tokens: ``T``.
        num_experts: ``E`` physical experts.
    """

    sorted_token_ids: torch.Tensor
    expert_offsets: torch.Tensor
    slot_rows: torch.Tensor
    num_tokens: int
    num_experts: int

    @property
    def capacity(self) -> int:
        """Upper bound on the number of rows, ``T * k``."""
        return self.sorted_token_ids.numel()

    def row_weights(self, topk_weights: torch.Tensor) -> torch.Tensor:
        """``[T*k]`` routing weight of each row: the sum over the slots that collapsed into it (0 on filler).

        Differentiable in ``topk_weights: [T, k]``.
        """
        check_shape("topk_weights", topk_weights, self.slot_rows.shape, "one weight per slot of the plan")
        rows = torch.zeros(self.capacity, dtype=topk_weights.dtype, device=topk_weights.device)
        return rows.index_add(0, self.slot_rows.reshape(-1).long(), topk_weights.reshape(-1))

    def tokens_per_expert(self) -> torch.Tensor:
        """``[E]`` int32 rows per physical expert."""
        return self.expert_offsets[1:] - self.expert_offsets[:-1]


def permute_reference(topk_ids: torch.Tensor, num_experts: int, expert_map: Optional[torch.Tensor]) -> RoutingPlan:
    T, k = topk_ids.shape
    device = topk_ids.device
    phys = topk_ids.long() if expert_map is None else expert_map.long()[topk_ids.long()]
    tokens = torch.arange(T, device=device).unsqueeze(1).expand(T, k)
    # Expert-major, token-minor keys: one sort yields expert grouping and ascending tokens per expert,
    # and equal keys are exactly the duplicate (token, physical expert) pairs to collapse.
    keys = (phys * T + tokens).reshape(-1)
    unique_keys, inverse = torch.unique(keys, sorted=True, return_inverse=True)
    n = unique_keys.numel()
    sorted_token_ids = torch.full((T * k,), T, dtype=torch.int32, device=device)
    sorted_token_ids[:n] = (unique_keys % T).to(torch.int32) if T > 0 else unique_keys.to(torch.int32)
    counts = torch.bincount(unique_keys // max(T, 1), minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=device)
    offsets[1:] = torch.cumsum(counts, 0).to(torch.int32)
    return RoutingPlan(sorted_token_ids, offsets, inverse.reshape(T, k).to(torch.int32), T, num_experts)


_op = Op("permute", permute_reference, preference=("cuda", "triton", "cpu"))


def _permute_native(topk_ids, num_experts, expert_map):
    from flux_engine.backend import native_extension

    ids = topk_ids.to(torch.int32).contiguous()
    emap = None if expert_map is None else expert_map.to(torch.int32).contiguous()
    sorted_token_ids, offsets, slot_rows = native_extension().permute(ids, num_experts, emap)
    return RoutingPlan(sorted_token_ids, offsets, slot_rows, ids.shape[0], num_experts)


_op.register("cpu")(_permute_native)
_op.register("cuda")(_permute_native)


@_op.register("triton")
def _permute_triton(topk_ids, num_experts, expert_map):
    from flux_engine.triton_kernels.permute import permute as kernel

    return kernel(topk_ids, num_experts, expert_map)


def permute(topk_ids: torch.Tensor, num_experts: int, expert_map: Optional[torch.Tensor] = None) -> RoutingPlan:
    """Build the routing plan of ``topk_ids`` over ``num_experts`` physical experts.

    Args:
        topk_ids: ``[T, k]`` integer ids of original experts.
        num_experts: ``E_phys``, the number of physical experts rows are grouped by.
        expert_map: optional ``[E_orig]`` integer map from original to physical expert ids in
            ``[0, num_experts)``; without it original ids are physical ids.

    Returns:
        A ``RoutingPlan``.
    """
    check_tensor("topk_ids", topk_ids, ndim=2)
    check_integer("topk_ids", topk_ids)
    check_positive_int("num_experts", num_experts)
    num_original = num_experts
    if expert_map is not None:
        check_tensor("expert_map", expert_map, ndim=1)
        check_integer("expert_map", expert_map)
        num_original = expert_map.shape[0]
        check_ids_in_range("expert_map", expert_map, num_experts)
    device = check_same_device(topk_ids=topk_ids, expert_map=expert_map)
    check_ids_in_range("topk_ids", topk_ids, num_original)
    return _op.select(device)(topk_ids, num_experts, expert_map)


permute.op = _op
