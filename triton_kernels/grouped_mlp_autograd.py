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

Frozen bases and the tuning experts. The base stacks may be packed int4/int8 (read packed in every GEMM,
forward and dx alike, never dequantised to memory); gradients then flow to x, the routing weights, the LoRA
factors and the full-size tuned stacks only. Weight gradients are computed only for tensors that require grad,
and only over their own experts (the tuned ones, or each LoRA slot's expert), so a frozen base costs no dW.

LoRA, with ``s`` the scale, per row r of an expert with slot ``s_e`` (``xa = s x A_gu^T``, ``ha = s h A_d^T``,
``u = s dout B_d``, ``dxa = s dgu B_gu``, all ``[R, rank]``, computed by the shrink kernel):
``gu += xa B_gu^T``, ``Y += ha B_d^T``; backward ``g = dout W2 + u A_d`` (so dgu and the routing-weight
gradient include the LoRA path), ``dx += dxa A_gu``, ``dB_gu = sum dgu^T xa``, ``dA_gu = sum dxa^T x``,
``dB_d = sum w dout^T ha``, ``dA_d = sum w u^T h``.

Expert forms and biases (``form``, ``gate_up_bias``, ``down_bias``, ``TunedExperts``' biases): the form is a
compile-time constant of the kernels; the biases are added in the forward GEMMs' epilogues, their gradients are
column sums over each expert's rows (``db1_e = sum dgu[r]``, ``db2_e = sum w_r dout[t_r]``), and the routing-weight
gradient gains ``<dout[t], b2_e>``.

Backward always yields deterministic gradients: dx sums each token's distinct rows in slot order (unless
``atomic_scatter``), weight gradients sweep each expert's rows sequentially.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from flux_engine.ops.expert_form import SILU, ExpertForm
from flux_engine.ops.grouped_mlp import ExpertLoRA, TunedExperts
from flux_engine.ops.permute import RoutingPlan, permute
from flux_engine.ops.quantize import QuantizedTensor
from flux_engine.triton_kernels import grouped_mlp as kernels
from flux_engine.triton_kernels.grouped_mlp import Expand, Stack

ATOMIC_SCATTER_ENV = "FLUX_ENGINE_ATOMIC_SCATTER"
RECOMPUTE_ENV = "FLUX_ENGINE_MOE_RECOMPUTE"


def _flag(value: Optional[bool], env: str) -> bool:
    return bool(value) if value is not None else os.environ.get(env, "0") == "1"


def _plan(topk_ids: torch.Tensor, num_experts: int, expert_map: Optional[torch.Tensor]) -> RoutingPlan:
    # The permute op's own dispatch: the CUDA kernel of flux_engine._C when built, else the Triton one (and
    # under FLUX_ENGINE_BACKEND=triton the Triton one); the arguments were validated by grouped_mlp.
    return permute.op.select(topk_ids.device)(topk_ids, num_experts, expert_map)


class _LoRA:
    """The device-side view of an ``ExpertLoRA`` over the physical experts: ``slots: [E]`` int32 (-1 none) and
    ``experts: [S]`` int32, the physical expert of each slot (``E`` for none), computed without a host sync."""

    def __init__(self, lora: ExpertLoRA, expert_map: Optional[torch.Tensor], num_experts: int):
        slots = lora.physical_slots(expert_map, num_experts)
        S = lora.num_slots
        experts = torch.full((S + 1,), num_experts, dtype=torch.int32, device=slots.device)
        # Bucket 0 takes every expert without a slot; slots are unique per physical expert (checked above).
        experts.scatter_(0, slots.clamp_min(-1) + 1, torch.arange(num_experts, dtype=torch.int32, device=slots.device))
        self.slots, self.experts, self.scale = slots.to(torch.int32), experts[1:], float(lora.scale)
        self.gate_up_A, self.gate_up_B = lora.gate_up_A, lora.gate_up_B
        self.down_A, self.down_B = lora.down_A, lora.down_B

    def shrink(self, a, factor, transpose: bool, plan: RoutingPlan, by_token: bool) -> torch.Tensor:
        return kernels.lora_shrink(a, factor, transpose, self.slots, plan, by_token=by_token, scale=self.scale)

    def expand(self, rows: Optional[torch.Tensor], factor, transposed: bool) -> Optional[Expand]:
        return None if rows is None else Expand(self.slots, rows, factor, transposed)


def _forward(x, gate_up: Stack, down: Stack, topk_weights, plan: RoutingPlan, lora: Optional[_LoRA], form: ExpertForm,
             atomic_scatter: bool, save_gu: bool):  # fmt: skip
    """``(out [T, H], gu [R, 2I] or None, xa, ha)``: the LoRA intermediates are None without those factors."""
    xa = ha = None
    if lora is not None and lora.gate_up_A is not None:
        xa = lora.shrink(x, lora.gate_up_A, False, plan, by_token=True)
    h, gu = kernels.gate_up_forward(
        x, gate_up, plan, form, store_h=True, store_gu=save_gu,
        expand=lora.expand(xa, lora.gate_up_B, False) if lora is not None else None,
    )  # fmt: skip
    if lora is not None and lora.down_A is not None:
        ha = lora.shrink(h, lora.down_A, False, plan, by_token=False)
    expand = lora.expand(ha, lora.down_B, False) if lora is not None else None
    if atomic_scatter:
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        row_w = kernels.row_weights(plan, topk_weights)
        kernels.rows_matmul(h, down, False, plan, kind="down", scatter_into=out, row_weights=row_w, expand=expand)
        return out.to(x.dtype), gu, xa, ha
    y = kernels.rows_matmul(h, down, False, plan, kind="down", expand=expand)
    return kernels.combine(y, plan, topk_weights, x.dtype), gu, xa, ha


def _stacks(gate_up, down, tuned_gate_up, tuned_down, biases=(None,) * 4):
    """``(gate_up, down)`` ``Stack``s; ``biases``: gate_up_bias, down_bias and the tuned experts' ones."""
    b1, b2, t_b1, t_b2 = biases
    return Stack(gate_up, tuned_gate_up, b1, t_b1), Stack(down, tuned_down, b2, t_b2)


# The differentiable inputs of GroupedMLPFunction, in order (its forward's arguments from x on, topk_ids and
# expert_map excepted); each gets a gradient when it requires one.
_GRADS = ("x", "gate_up", "down", "weights", None, None, "t_gate_up", "t_down", "gu_A", "gu_B", "d_A", "d_B", "b1",
          "b2", "t_b1", "t_b2")  # fmt: skip


class GroupedMLPFunction(torch.autograd.Function):
    """``out: [T, H] = sum_j w[t, j] * (down_e(form(gate_up_e x_t + b1_e)) + b2_e)`` (+ LoRA); see ``grouped_mlp``.

    Tensor inputs, in order: x, gate_up, down (None when packed: then ``packed`` holds them), topk_weights,
    topk_ids, expert_map, tuned gate_up / down, LoRA gate_up_A / gate_up_B / down_A / down_B, the biases
    gate_up / down and the tuned experts' gate_up / down, LoRA slots."""

    @staticmethod
    def forward(ctx, x, gate_up, down, topk_weights, topk_ids, expert_map, t_gate_up, t_down, gu_A, gu_B, d_A, d_B,
                b1, b2, t_b1, t_b2, lora_slots, packed, lora_scale, form, atomic_scatter, recompute):  # fmt: skip
        base_gate_up, base_down = packed if packed is not None else (gate_up, down)
        gate_up_stack, down_stack = _stacks(base_gate_up, base_down, t_gate_up, t_down, (b1, b2, t_b1, t_b2))
        E = gate_up_stack.shape[0]
        lora = None
        if lora_slots is not None:
            lora = _LoRA(ExpertLoRA(lora_slots, gu_A, gu_B, d_A, d_B, lora_scale), expert_map, E)
        plan = _plan(topk_ids, E, expert_map)
        out, gu, xa, ha = _forward(x, gate_up_stack, down_stack, topk_weights, plan, lora, form, atomic_scatter,
                                   save_gu=not recompute)  # fmt: skip
        index = (plan.sorted_token_ids, plan.expert_offsets, plan.slot_rows, topk_ids, expert_map)
        ctx.save_for_backward(x, gate_up, down, topk_weights, t_gate_up, t_down, gu_A, gu_B, d_A, d_B, b1, b2, t_b1,
                              t_b2, *index, gu, xa, ha)  # fmt: skip
        ctx.packed, ctx.lora, ctx.atomic_scatter, ctx.form = packed, lora, atomic_scatter, form
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        (x, gate_up, down, topk_weights, t_gate_up, t_down, gu_A, gu_B, d_A, d_B, b1, b2, t_b1, t_b2,
         sorted_token_ids, expert_offsets, slot_rows, topk_ids, expert_map, gu, xa, ha) = ctx.saved_tensors  # fmt: skip
        need = {name: n for name, n in zip(_GRADS, ctx.needs_input_grad) if name is not None}
        form = ctx.form
        base_gate_up, base_down = ctx.packed if ctx.packed is not None else (gate_up, down)
        gate_up_stack, down_stack = _stacks(base_gate_up, base_down, t_gate_up, t_down, (b1, b2, t_b1, t_b2))
        E, two_i, H = gate_up_stack.shape
        I = down_stack.shape[2]
        T = x.shape[0]
        S_t = gate_up_stack.num_tuned
        lora = ctx.lora
        plan = RoutingPlan(sorted_token_ids, expert_offsets, slot_rows, T, E)
        dout = dout.to(x.dtype)
        if gu is None:
            expand = lora.expand(xa, gu_B, False) if lora is not None else None
            _, gu = kernels.gate_up_forward(x, gate_up_stack, plan, form, store_h=False, store_gu=True, expand=expand)
        row_w = kernels.row_weights(plan, topk_weights)

        # u = s dout B_d feeds g (hence dgu, dx, the routing-weight gradient) and dA_d.
        need_dgu = any(need[n] for n in ("x", "gate_up", "t_gate_up", "gu_A", "gu_B", "b1", "t_b1"))
        u = None
        if ha is not None and (need_dgu or need["weights"] or need["d_A"]):
            u = lora.shrink(dout, d_B, True, plan, by_token=True)
        dgu = partial = None
        if need_dgu or need["weights"]:
            dgu, partial = kernels.down_backward(
                dout, down_stack, plan, gu, row_w, form, store_dgu=need_dgu, store_partial=need["weights"],
                expand=lora.expand(u, d_A, True) if lora is not None else None,
            )  # fmt: skip
        grads = dict.fromkeys(need)
        if need["weights"]:
            # <dout[t], Y[row]> for every slot; slots that collapsed into one row share it, as d w_r / d w[t, j] = 1.
            dw = partial.sum(dim=1)[slot_rows.long()]
            if b2 is not None:
                # + <dout[t], b2_e> of the slot's physical expert: one [T, H] x [H, E] product, then a gather.
                b2_all = b2 if t_b2 is None else torch.cat((t_b2, b2))
                phys = topk_ids.long() if expert_map is None else expert_map.long()[topk_ids.long()]
                dw = dw + torch.gather(dout.float() @ b2_all.float().t(), 1, phys)
            grads["weights"] = dw.to(topk_weights.dtype)
        dxa = None
        if xa is not None and (need["x"] or need["gu_A"]):
            dxa = lora.shrink(dgu, gu_B, True, plan, by_token=False)
        if need["x"]:
            expand = lora.expand(dxa, gu_A, True) if lora is not None else None
            if ctx.atomic_scatter:
                dx32 = torch.zeros((T, H), dtype=torch.float32, device=x.device)
                kernels.rows_matmul(dgu, gate_up_stack, True, plan, kind="dx", scatter_into=dx32, expand=expand)
                grads["x"] = dx32.to(x.dtype)
            else:
                rows = kernels.rows_matmul(dgu, gate_up_stack, True, plan, kind="dx", expand=expand)
                grads["x"] = kernels.combine(rows, plan, None, x.dtype)

        def experts(lo: int, n: int) -> torch.Tensor:
            return torch.arange(lo, lo + n, dtype=torch.int32, device=x.device)

        def gate_up_grad(ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            return kernels.weight_grad(dgu, x, plan, ids, (two_i, H), a_by_token=False, b_by_token=True, out_dtype=dtype)

        def down_grad(ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            return kernels.weight_grad(dout, gu, plan, ids, (H, I), a_by_token=True, b_by_token=False,
                                       row_weights=row_w, b_form=form, out_dtype=dtype)  # fmt: skip

        def ones(like: torch.Tensor) -> torch.Tensor:
            # b(r) = 1 for every row: weight_grad then sums a(r) over each expert's rows (stride 0, no buffer).
            return torch.ones((1, 1), dtype=like.dtype, device=like.device).expand(plan.capacity, 1)

        def gate_up_bias_grad(ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            return kernels.weight_grad(dgu, ones(dgu), plan, ids, (two_i, 1), a_by_token=False, b_by_token=False,
                                       out_dtype=dtype)[..., 0]  # fmt: skip

        def down_bias_grad(ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            return kernels.weight_grad(dout, ones(dout), plan, ids, (H, 1), a_by_token=True, b_by_token=False,
                                       row_weights=row_w, out_dtype=dtype)[..., 0]  # fmt: skip

        for name, fn, tuned_experts, like in (
            ("gate_up", gate_up_grad, False, gate_up), ("down", down_grad, False, down),
            ("t_gate_up", gate_up_grad, True, t_gate_up), ("t_down", down_grad, True, t_down),
            ("b1", gate_up_bias_grad, False, b1), ("b2", down_bias_grad, False, b2),
            ("t_b1", gate_up_bias_grad, True, t_b1), ("t_b2", down_bias_grad, True, t_b2),
        ):  # fmt: skip
            if need[name]:
                grads[name] = fn(experts(0, S_t) if tuned_experts else experts(S_t, E - S_t), like.dtype)
        r = xa.shape[1] if xa is not None else (ha.shape[1] if ha is not None else 0)
        if need["gu_B"]:
            grads["gu_B"] = kernels.weight_grad(dgu, xa, plan, lora.experts, (two_i, r), a_by_token=False,
                                                b_by_token=False, out_dtype=gu_B.dtype)  # fmt: skip
        if need["gu_A"]:
            grads["gu_A"] = kernels.weight_grad(dxa, x, plan, lora.experts, (r, H), a_by_token=False,
                                                b_by_token=True, out_dtype=gu_A.dtype)  # fmt: skip
        if need["d_B"]:
            grads["d_B"] = kernels.weight_grad(dout, ha, plan, lora.experts, (H, r), a_by_token=True,
                                               b_by_token=False, row_weights=row_w, out_dtype=d_B.dtype)  # fmt: skip
        if need["d_A"]:
            grads["d_A"] = kernels.weight_grad(u, gu, plan, lora.experts, (r, I), a_by_token=False, b_by_token=False,
                                               row_weights=row_w, b_form=form, out_dtype=d_A.dtype)  # fmt: skip
        # None for topk_ids, expert_map and the non-tensor arguments after the biases.
        return tuple(grads[n] if n is not None else None for n in _GRADS) + (None,) * 6


def grouped_mlp(
    x: torch.Tensor,
    gate_up,
    down,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_map: Optional[torch.Tensor] = None,
    *,
    lora: Optional[ExpertLoRA] = None,
    tuned: Optional[TunedExperts] = None,
    form: ExpertForm = SILU,
    gate_up_bias: Optional[torch.Tensor] = None,
    down_bias: Optional[torch.Tensor] = None,
    atomic_scatter: Optional[bool] = None,
    recompute: Optional[bool] = None,
) -> torch.Tensor:
    """Routed experts on the Triton kernels; differentiable in x, the plain base stacks, topk_weights, the tuned
    stacks, the biases and the LoRA factors.

    Args:
        x: ``[T, H]``; gate_up: ``[E, 2I, H]`` (``[E, I, H]`` ungated) in ``form``'s row layout; down: ``[E, H, I]``
            (x's dtype), or both packed ``QuantizedTensor``s (frozen).
        topk_weights: ``[T, k]`` float; topk_ids: ``[T, k]`` original expert ids.
        expert_map: optional ``[E_orig]`` map to physical experts ``[0, S_t + E)``.
        lora: LoRA of the tuning experts; tuned: full-size tuning experts (physical ``[0, S_t)``, with their biases).
        form: the experts' ``ExpertForm``; gate_up_bias ``[E, 2I]`` / down_bias ``[E, H]``: the base experts' biases.
        atomic_scatter: atomics instead of the deterministic combine (default: ``FLUX_ENGINE_ATOMIC_SCATTER``).
        recompute: recompute the gate/up pre-activations in backward (default: ``FLUX_ENGINE_MOE_RECOMPUTE``).

    Inputs are validated by ``flux_engine.ops.grouped_mlp``; this function trusts them.

    Returns:
        ``[T, H]`` in x's dtype.
    """
    atomic_scatter = _flag(atomic_scatter, ATOMIC_SCATTER_ENV)
    packed = (gate_up, down) if isinstance(gate_up, QuantizedTensor) else None
    plain = (None, None) if packed is not None else (gate_up, down)
    t_gate_up, t_down = (tuned.gate_up, tuned.down) if tuned is not None else (None, None)
    biases = (gate_up_bias, down_bias, *((tuned.gate_up_bias, tuned.down_bias) if tuned is not None else (None, None)))
    factors = (lora.gate_up_A, lora.gate_up_B, lora.down_A, lora.down_B) if lora is not None else (None,) * 4
    differentiable = (x, *plain, topk_weights, t_gate_up, t_down, *factors, *biases)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in differentiable):
        recompute = _flag(recompute, RECOMPUTE_ENV)
        return GroupedMLPFunction.apply(
            x, *plain, topk_weights, topk_ids, expert_map, t_gate_up, t_down, *factors, *biases,
            lora.slots if lora is not None else None, packed, lora.scale if lora is not None else 1.0, form,
            atomic_scatter, recompute,
        )  # fmt: skip
    # Inference: no autograd node, nothing saved, no pre-activations stored.
    gate_up_stack, down_stack = _stacks(gate_up, down, t_gate_up, t_down, biases)
    E = gate_up_stack.shape[0]
    state = _LoRA(lora, expert_map, E) if lora is not None else None
    plan = _plan(topk_ids, E, expert_map)
    return _forward(x, gate_up_stack, down_stack, topk_weights, plan, state, form, atomic_scatter, save_gu=False)[0]
