"""Grouped SwiGLU expert MLP: the routed-experts half of an MoE layer.

``out[t] = sum_j w[t, j] * down_e(silu(gate_e x_t) * up_e x_t)`` with ``e = expert_map[topk_ids[t, j]]``;
slots of one token that land on the same physical expert are computed once with their weights summed
(see ``permute``). Optional LoRA adds ``scale * B_s (A_s v)`` to either projection of the experts that have
a LoRA slot ``s`` (the tuning experts); the others run the frozen base only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from flux_engine.backend import Op
from flux_engine.ops._checks import (
    check_dim,
    check_floating,
    check_ids_in_range,
    check_integer,
    check_same_device,
    check_shape,
    check_tensor,
)
from flux_engine.ops.permute import permute_reference


@dataclass(frozen=True)
class ExpertLoRA:
    """LoRA factors for the ``S`` tuning experts of one layer (never for all ``E``).

    Attributes:
        slots: ``[E_orig]`` integer, the LoRA slot of each original expert, -1 for none.
        gate_up_A: ``[S, r, H]``, gate_up_B: ``[S, 2I, r]`` (or both None: no LoRA on gate_up).
        down_A: ``[S, r, I]``, down_B: ``[S, H, r]`` (or both None: no LoRA on down).
        scale: multiplier of the LoRA update (``alpha / r`` in PEFT terms).
    """

    slots: torch.Tensor
    gate_up_A: Optional[torch.Tensor] = None
    gate_up_B: Optional[torch.Tensor] = None
    down_A: Optional[torch.Tensor] = None
    down_B: Optional[torch.Tensor] = None
    scale: float = 1.0

    @property
    def num_slots(self) -> int:
        factor = self.gate_up_A if self.gate_up_A is not None else self.down_A
        return factor.shape[0]

    def physical_slots(self, expert_map: Optional[torch.Tensor], num_experts: int) -> torch.Tensor:
        """``[E_phys]`` int64 LoRA slot of each physical expert, -1 for none.

        A LoRA'd original expert must own its physical expert alone: merged experts are frozen.
        """
        slots = self.slots.long()
        if expert_map is None:
            return slots
        emap = expert_map.long()
        hi = torch.full((num_experts,), -1, dtype=torch.long, device=slots.device).scatter_reduce(0, emap, slots, "amax")
        lo = torch.full((num_experts,), num_experts, dtype=torch.long, device=slots.device).scatter_reduce(
            0, emap, slots, "amin"
        )
        used = torch.zeros(num_experts, dtype=torch.bool, device=slots.device).index_fill(0, emap, True)
        consistent = ((hi == lo) | ~used).all()
        message = "lora.slots: a physical expert shared by several original experts has a LoRA slot on only some of them"
        if consistent.device.type == "cuda":
            torch._assert_async(consistent, message)
        elif not bool(consistent):
            raise ValueError(message)
        return hi


def _lora_delta(v: torch.Tensor, A: Optional[torch.Tensor], B: Optional[torch.Tensor], slot: int, scale: float):
    if A is None or slot < 0:
        return None
    return (v @ A[slot].float().t()) @ B[slot].float().t() * scale


def grouped_mlp_reference(x, gate_up, down, topk_weights, topk_ids, expert_map, lora):
    T, H = x.shape
    E = gate_up.shape[0]
    plan = permute_reference(topk_ids, E, expert_map)
    row_weights = plan.row_weights(topk_weights.float())
    offsets = plan.expert_offsets.tolist()
    if lora is not None:
        lora_slots = lora.physical_slots(expert_map, E).tolist()
        gu_A, gu_B, d_A, d_B, scale = lora.gate_up_A, lora.gate_up_B, lora.down_A, lora.down_B, lora.scale
    else:
        lora_slots, gu_A, gu_B, d_A, d_B, scale = [-1] * E, None, None, None, None, 0.0
    # unbind: one backward allocation per weight stack instead of a full-size zero gradient per expert slice.
    gate_ups, downs = gate_up.unbind(0), down.unbind(0)
    ys = []
    for e in range(E):
        lo, hi = offsets[e], offsets[e + 1]
        if lo == hi:
            continue
        xe = x[plan.sorted_token_ids[lo:hi].long()].float()
        gu = xe @ gate_ups[e].float().t()
        delta = _lora_delta(xe, gu_A, gu_B, lora_slots[e], scale)
        if delta is not None:
            gu = gu + delta
        gate, up = gu.chunk(2, dim=-1)
        h = F.silu(gate) * up
        y = h @ downs[e].float().t()
        delta = _lora_delta(h, d_A, d_B, lora_slots[e], scale)
        if delta is not None:
            y = y + delta
        ys.append(y)
    n = offsets[-1]
    out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    if n:
        rows = torch.cat(ys) * row_weights[:n, None]
        out = out.index_add(0, plan.sorted_token_ids[:n].long(), rows)
    return out.to(x.dtype)


_op = Op("grouped_mlp", grouped_mlp_reference, preference=("triton",))


def _triton_lacks(x, gate_up, down, topk_weights, topk_ids, expert_map, lora):
    return "lora yet" if lora is not None else None


@_op.register("triton", unsupported=_triton_lacks)
def _grouped_mlp_triton(x, gate_up, down, topk_weights, topk_ids, expert_map, lora):
    from flux_engine.triton_kernels.grouped_mlp_autograd import grouped_mlp as kernel

    return kernel(x, gate_up, down, topk_weights, topk_ids, expert_map)


def _check_lora(lora: ExpertLoRA, num_original: int, H: int, I: int) -> None:
    if not isinstance(lora, ExpertLoRA):
        raise TypeError(f"lora must be an ExpertLoRA, got {type(lora).__name__}")
    check_tensor("lora.slots", lora.slots, ndim=1)
    check_integer("lora.slots", lora.slots)
    check_shape("lora.slots", lora.slots, (num_original,), "one slot per original expert")
    pairs = {"gate_up": (lora.gate_up_A, lora.gate_up_B, H, 2 * I), "down": (lora.down_A, lora.down_B, I, H)}
    present = [name for name, (A, B, _, _) in pairs.items() if A is not None or B is not None]
    if not present:
        raise ValueError("lora has no factors: give gate_up_A/gate_up_B, down_A/down_B or both")
    S = r = None
    for name in present:
        A, B, fan_in, fan_out = pairs[name]
        if A is None or B is None:
            raise ValueError(f"lora.{name}_A and lora.{name}_B must be given together")
        check_tensor(f"lora.{name}_A", A, ndim=3)
        check_tensor(f"lora.{name}_B", B, ndim=3)
        check_floating(f"lora.{name}_A", A)
        check_floating(f"lora.{name}_B", B)
        S = A.shape[0] if S is None else S
        r = A.shape[1] if r is None else r
        check_shape(f"lora.{name}_A", A, (S, r, fan_in), "[S, r, fan_in]")
        check_shape(f"lora.{name}_B", B, (S, fan_out, r), "[S, fan_out, r]")
    if lora.slots.numel():
        check_ids_in_range("lora.slots + 1", lora.slots + 1, S + 1)


def grouped_mlp(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_map: Optional[torch.Tensor] = None,
    lora: Optional[ExpertLoRA] = None,
) -> torch.Tensor:
    """Routed SwiGLU experts, differentiable in x, the expert weights, topk_weights and the LoRA factors.

    Args:
        x: ``[T, H]`` token activations.
        gate_up: ``[E, 2I, H]`` gate rows first, then up rows (transformers v5 layout); same dtype as x.
        down: ``[E, H, I]``.
        topk_weights: ``[T, k]`` routing weights (float; computed in fp32).
        topk_ids: ``[T, k]`` original expert ids.
        expert_map: optional ``[E_orig]`` map from original to physical expert ids in ``[0, E)``.
        lora: optional ``ExpertLoRA`` for the tuning experts.

    Returns:
        ``[T, H]`` in x's dtype.

    The triton tier has no LoRA yet (such calls go to the next tier), and reads two switches:
    ``FLUX_ENGINE_ATOMIC_SCATTER=1`` and ``FLUX_ENGINE_MOE_RECOMPUTE=1`` (see
    ``flux_engine.triton_kernels.grouped_mlp_autograd``).
    """
    check_tensor("x", x, ndim=2)
    check_tensor("gate_up", gate_up, ndim=3)
    check_tensor("down", down, ndim=3)
    check_tensor("topk_weights", topk_weights, ndim=2)
    check_tensor("topk_ids", topk_ids, ndim=2)
    for name, t in (("x", x), ("gate_up", gate_up), ("down", down), ("topk_weights", topk_weights)):
        check_floating(name, t)
    check_integer("topk_ids", topk_ids)
    T, H = x.shape
    E = gate_up.shape[0]
    check_dim("gate_up", gate_up, 2, H, "hidden size H of x")
    check_dim("down", down, 0, E, "number of experts E of gate_up")
    check_dim("down", down, 1, H, "hidden size H of x")
    I = down.shape[2]
    check_dim("gate_up", gate_up, 1, 2 * I, "2 * intermediate size I of down")
    for name, t in (("gate_up", gate_up), ("down", down)):
        if t.dtype != x.dtype:
            raise TypeError(f"{name} dtype {t.dtype} differs from x dtype {x.dtype}")
    check_dim("topk_ids", topk_ids, 0, T, "tokens T of x")
    check_shape("topk_weights", topk_weights, topk_ids.shape, "same [T, k] as topk_ids")
    num_original = E
    if expert_map is not None:
        check_tensor("expert_map", expert_map, ndim=1)
        check_integer("expert_map", expert_map)
        num_original = expert_map.shape[0]
    if lora is not None:
        _check_lora(lora, num_original, H, I)
    device = check_same_device(
        x=x,
        gate_up=gate_up,
        down=down,
        topk_weights=topk_weights,
        topk_ids=topk_ids,
        expert_map=expert_map,
        **(
            {}
            if lora is None
            else {
                "lora.slots": lora.slots,
                "lora.gate_up_A": lora.gate_up_A,
                "lora.gate_up_B": lora.gate_up_B,
                "lora.down_A": lora.down_A,
                "lora.down_B": lora.down_B,
            }
        ),
    )
    if expert_map is not None:
        check_ids_in_range("expert_map", expert_map, E)
    check_ids_in_range("topk_ids", topk_ids, num_original)
    return _op.run(device, x, gate_up, down, topk_weights, topk_ids, expert_map, lora)


grouped_mlp.op = _op
