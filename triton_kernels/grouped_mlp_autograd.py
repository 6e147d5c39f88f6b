"""Triton tier of ``flux_engine.ops.grouped_mlp``: the autograd Function over the kernels of ``grouped_mlp.py``.

Two switches, each a keyword of ``grouped_mlp`` and an environment variable read when the keyword is None:

- ``atomic_scatter`` / ``FLUX_ENGINE_ATOMIC_SCATTER=1``: the down GEMM (forward) and the dx GEMM (backward)
  add their rows into the token outputs with float32 atomics in the epilogue, saving the ``[R, H]`` row
  buffer and one pass over it. Summation order then varies from run to run (not bit-reproducible).
  Default off: rows are stored and ``combine`` sums each token's rows in slot order (deterministic).
- ``recompute`` / ``FLUX_ENGINE_MOE_RECOMPUTE=1``: save only the inputs and the routing plan for backward
  and recompute the gate/up pre-activations from x there (one extra ``[R, H] x [H, 2I]`` GEMM).
  Default off: forward also stores the pre-activations ``gu: [R, 2I]`` (R = T * k, input dtype) and saves
  them; h, its SwiGLU derivative and the unweighted expert outputs Y are never saved (h is re-derived from
  gu where needed, and the routing-weight gradient ``<dout[t], Y[r]>`` is computed as ``<dout[t] W2_e, h[r]>``).

Backward always yields deterministic gradients: dx sums each token's distinct rows in slot order (unless
``atomic_scatter``), weight gradients sweep each expert's rows sequentially. Gradients of gate_up, down and
topk_weights are computed only when those require grad.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from flux_engine.ops.permute import RoutingPlan, permute
from flux_engine.triton_kernels import grouped_mlp as kernels

ATOMIC_SCATTER_ENV = "FLUX_ENGINE_ATOMIC_SCATTER"
RECOMPUTE_ENV = "FLUX_ENGINE_MOE_RECOMPUTE"


def _flag(value: Optional[bool], env: str) -> bool:
    return bool(value) if value is not None else os.environ.get(env, "0") == "1"


def _plan(topk_ids: torch.Tensor, num_experts: int, expert_map: Optional[torch.Tensor]) -> RoutingPlan:
    # The permute op's own dispatch: the CUDA kernel of flux_engine._C when built, else the Triton one (and
    # under FLUX_ENGINE_BACKEND=triton the Triton one); the arguments were validated by grouped_mlp.
    return permute.op.select(topk_ids.device)(topk_ids, num_experts, expert_map)


def _forward(x, gate_up, down, topk_weights, plan: RoutingPlan, atomic_scatter: bool, save_gu: bool):
    """``(out [T, H], gu [R, 2I] or None)``."""
    h, gu = kernels.gate_up_forward(x, gate_up, plan, store_h=True, store_gu=save_gu)
    if atomic_scatter:
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        row_w = kernels.row_weights(plan, topk_weights)
        kernels.rows_matmul(h, down, False, plan, kind="down", scatter_into=out, row_weights=row_w)
        return out.to(x.dtype), gu
    y = kernels.rows_matmul(h, down, False, plan, kind="down")
    return kernels.combine(y, plan, topk_weights, x.dtype), gu


class GroupedMLPFunction(torch.autograd.Function):
    """``out: [T, H] = sum_j w[t, j] * down_e(silu(gate_e x_t) * up_e x_t)``; see ``grouped_mlp``."""

    @staticmethod
    def forward(ctx, x, gate_up, down, topk_weights, topk_ids, expert_map, atomic_scatter, recompute):
        plan = _plan(topk_ids, gate_up.shape[0], expert_map)
        out, gu = _forward(x, gate_up, down, topk_weights, plan, atomic_scatter, save_gu=not recompute)
        index = (plan.sorted_token_ids, plan.expert_offsets, plan.slot_rows)
        ctx.save_for_backward(x, gate_up, down, topk_weights, *index, gu)
        ctx.atomic_scatter = atomic_scatter
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x, gate_up, down, topk_weights, sorted_token_ids, expert_offsets, slot_rows, gu = ctx.saved_tensors
        need_x, need_gate_up, need_down, need_weights = ctx.needs_input_grad[:4]
        T, H = x.shape
        E, two_i, _ = gate_up.shape
        plan = RoutingPlan(sorted_token_ids, expert_offsets, slot_rows, T, E)
        dout = dout.to(x.dtype)
        if gu is None:
            _, gu = kernels.gate_up_forward(x, gate_up, plan, store_h=False, store_gu=True)
        row_w = kernels.row_weights(plan, topk_weights)

        dx = d_gate_up = d_down = d_weights = None
        dgu, partial = None, None
        if need_x or need_gate_up or need_weights:
            dgu, partial = kernels.down_backward(
                dout, down, plan, gu, row_w, store_dgu=need_x or need_gate_up, store_partial=need_weights
            )
        if need_weights:
            # <dout[t], Y[row]> for every slot; slots that collapsed into one row share it, as d w_r / d w[t, j] = 1.
            d_weights = partial.sum(dim=1)[slot_rows.long()].to(topk_weights.dtype)
        if need_x:
            if ctx.atomic_scatter:
                dx32 = torch.zeros((T, H), dtype=torch.float32, device=x.device)
                kernels.rows_matmul(dgu, gate_up, True, plan, kind="dx", scatter_into=dx32)
                dx = dx32.to(x.dtype)
            else:
                dx = kernels.combine(kernels.rows_matmul(dgu, gate_up, True, plan, kind="dx"), plan, None, x.dtype)
        if need_gate_up:
            d_gate_up = kernels.weight_grad(dgu, x, plan, (E, two_i, H), a_by_token=False, b_by_token=True)
        if need_down:
            d_down = kernels.weight_grad(
                dout, gu, plan, (E, H, two_i // 2), a_by_token=True, b_by_token=False, row_weights=row_w, b_swiglu=True
            )
        return dx, d_gate_up, d_down, d_weights, None, None, None, None


def grouped_mlp(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_map: Optional[torch.Tensor] = None,
    *,
    atomic_scatter: Optional[bool] = None,
    recompute: Optional[bool] = None,
) -> torch.Tensor:
    """Routed SwiGLU experts on the Triton kernels; differentiable in x, gate_up, down and topk_weights.

    Args:
        x: ``[T, H]``; gate_up: ``[E, 2I, H]`` gate rows first; down: ``[E, H, I]`` (x's dtype).
        topk_weights: ``[T, k]`` float; topk_ids: ``[T, k]`` original expert ids.
        expert_map: optional ``[E_orig]`` map to physical experts ``[0, E)``.
        atomic_scatter: atomics instead of the deterministic combine (default: ``FLUX_ENGINE_ATOMIC_SCATTER``).
        recompute: recompute the gate/up pre-activations in backward (default: ``FLUX_ENGINE_MOE_RECOMPUTE``).

    Inputs are validated by ``flux_engine.ops.grouped_mlp``; this function trusts them.

    Returns:
        ``[T, H]`` in x's dtype.
    """
    atomic_scatter = _flag(atomic_scatter, ATOMIC_SCATTER_ENV)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, gate_up, down, topk_weights)):
        recompute = _flag(recompute, RECOMPUTE_ENV)
        return GroupedMLPFunction.apply(x, gate_up, down, topk_weights, topk_ids, expert_map, atomic_scatter, recompute)
    # Inference: no autograd node, nothing saved, no pre-activations stored.
    plan = _plan(topk_ids, gate_up.shape[0], expert_map)
    return _forward(x, gate_up, down, topk_weights, plan, atomic_scatter, save_gu=False)[0]
