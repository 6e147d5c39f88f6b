"""Grouped expert MLP: the routed-experts half of an MoE layer.

``out[t] = sum_j w[t, j] * (down_e(form(gate_up_e x_t + b1_e)) + b2_e)`` with ``e = expert_map[topk_ids[t, j]]``,
``form`` an ``ExpertForm`` (default SwiGLU, ``silu(gate) * up``; see ``expert_form``) and the optional expert biases
``b1 = gate_up_bias[e]``, ``b2 = down_bias[e]``; slots of one token that land on the same physical expert are
computed once with their weights summed (see ``permute``). Optional LoRA adds ``scale * B_s (A_s v)`` to either
projection of the experts that have a LoRA slot ``s`` (the tuning experts); the others run the frozen base only.

Two ways to train the tuning experts (FLUX_DESIGN.md section 5, "Local tuning"):
- LoRA: ``lora=ExpertLoRA(...)``; the base stacks stay frozen and may be packed int4/int8 ``QuantizedTensor``s.
- full size: ``tuned=TunedExperts(gate_up [S_t, 2I, H], down [S_t, H, I])`` holds the tuning experts' own weights
  (physical experts ``[0, S_t)``); the base stacks hold the frozen (merged) experts ``[S_t, S_t + E)``. Gradients
  then exist for the ``S_t`` tuned experts only, never for the frozen stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Union

import torch

from flux_engine.backend import Op
from flux_engine.ops._checks import (
    check_dim,
    check_floating,
    check_ids_in_range,
    check_integer,
    check_same_device,
    check_shape,
    check_tensor,
    check_value,
)
from flux_engine.ops.expert_form import SILU, ExpertForm
from flux_engine.ops.permute import permute_reference
from flux_engine.ops.quantize import QuantizedTensor, dequantize

Weights = Union[torch.Tensor, QuantizedTensor]


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

        A LoRA'd original expert must own its physical expert alone (merged experts are frozen), and a slot
        belongs to one physical expert.
        """
        slots = self.slots.long()
        if expert_map is None:
            check_value(_slots_unique(slots, self.num_slots), "lora.slots: a LoRA slot is given to several experts")
            return slots
        emap = expert_map.long()
        hi = torch.full((num_experts,), -1, dtype=torch.long, device=slots.device).scatter_reduce(0, emap, slots, "amax")
        lo = torch.full((num_experts,), num_experts, dtype=torch.long, device=slots.device).scatter_reduce(
            0, emap, slots, "amin"
        )
        used = torch.zeros(num_experts, dtype=torch.bool, device=slots.device).index_fill(0, emap, True)
        check_value(
            ((hi == lo) | ~used).all(),
            "lora.slots: a physical expert shared by several original experts has a LoRA slot on only some of them",
        )
        check_value(_slots_unique(hi, self.num_slots), "lora.slots: a LoRA slot is given to several physical experts")
        return hi


@dataclass(frozen=True)
class TunedExperts:
    """Full-size tuning experts: physical experts ``[0, S_t)`` of ``grouped_mlp`` (the base stacks hold the rest).

    Attributes:
        gate_up: ``[S_t, 2I, H]`` (``[S_t, I, H]`` ungated); down: ``[S_t, H, I]``; dtype of x (never quantized:
            they are trained).
        gate_up_bias: ``[S_t, 2I]`` (``[S_t, I]`` ungated), down_bias: ``[S_t, H]``: the tuned experts' biases, given
            exactly when ``grouped_mlp`` gets the base stacks' ``gate_up_bias`` / ``down_bias``.
    """

    gate_up: torch.Tensor
    down: torch.Tensor
    gate_up_bias: Optional[torch.Tensor] = None
    down_bias: Optional[torch.Tensor] = None

    @property
    def num_experts(self) -> int:
        return self.gate_up.shape[0]


def _slots_unique(physical_slots: torch.Tensor, num_slots: int) -> torch.Tensor:
    # Bucket 0 collects the experts without a slot (-1).
    counts = torch.zeros(num_slots + 1, dtype=torch.long, device=physical_slots.device)
    counts.index_add_(0, physical_slots.clamp_min(-1) + 1, torch.ones_like(physical_slots))
    return (counts[1:] <= 1).all()


def _lora_delta(v: torch.Tensor, A: Optional[torch.Tensor], B: Optional[torch.Tensor], slot: int, scale: float):
    if A is None or slot < 0:
        return None
    return (v @ A[slot].float().t()) @ B[slot].float().t() * scale


def _stacks(x: torch.Tensor, gate_up: Weights, down: Weights, tuned: Optional[TunedExperts]):
    """Per physical expert ``(gate_up_e, down_e)`` lists: tuned experts first, then the base (dequantised) ones."""
    if isinstance(gate_up, QuantizedTensor):
        gate_up, down = dequantize(gate_up, x.dtype), dequantize(down, x.dtype)
    # unbind: one backward allocation per weight stack instead of a full-size zero gradient per expert slice.
    gate_ups, downs = list(gate_up.unbind(0)), list(down.unbind(0))
    if tuned is not None:
        gate_ups, downs = list(tuned.gate_up.unbind(0)) + gate_ups, list(tuned.down.unbind(0)) + downs
    return gate_ups, downs


def _biases(bias: Optional[torch.Tensor], tuned_bias: Optional[torch.Tensor], num_experts: int) -> list:
    """Per physical expert bias rows (tuned experts first), or ``None`` each without biases."""
    if bias is None:
        return [None] * num_experts
    return (list(tuned_bias.unbind(0)) if tuned_bias is not None else []) + list(bias.unbind(0))


def grouped_mlp_reference(
    x, gate_up, down, topk_weights, topk_ids, expert_map, lora, tuned=None, *, form=SILU, gate_up_bias=None,
    down_bias=None,
):  # fmt: skip
    T, H = x.shape
    gate_ups, downs = _stacks(x, gate_up, down, tuned)
    E = len(gate_ups)
    gate_up_biases = _biases(gate_up_bias, tuned.gate_up_bias if tuned is not None else None, E)
    down_biases = _biases(down_bias, tuned.down_bias if tuned is not None else None, E)
    plan = permute_reference(topk_ids, E, expert_map)
    row_weights = plan.row_weights(topk_weights.float())
    offsets = plan.expert_offsets.tolist()
    if lora is not None:
        lora_slots = lora.physical_slots(expert_map, E).tolist()
        gu_A, gu_B, d_A, d_B, scale = lora.gate_up_A, lora.gate_up_B, lora.down_A, lora.down_B, lora.scale
    else:
        lora_slots, gu_A, gu_B, d_A, d_B, scale = [-1] * E, None, None, None, None, 0.0
    ys = []
    for e in range(E):
        lo, hi = offsets[e], offsets[e + 1]
        if lo == hi:
            continue
        xe = x[plan.sorted_token_ids[lo:hi].long()].float()
        gu = xe @ gate_ups[e].float().t()
        if gate_up_biases[e] is not None:
            gu = gu + gate_up_biases[e].float()
        delta = _lora_delta(xe, gu_A, gu_B, lora_slots[e], scale)
        if delta is not None:
            gu = gu + delta
        h = form.apply(gu)
        y = h @ downs[e].float().t()
        if down_biases[e] is not None:
            y = y + down_biases[e].float()
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


def _triton_lacks(x, gate_up, down, topk_weights, topk_ids, expert_map, lora, tuned, *, form, gate_up_bias,
                  down_bias):  # fmt: skip
    if tuned is not None and isinstance(gate_up, QuantizedTensor):
        return "full-size tuned experts over a packed base"
    return None


@_op.register("triton", unsupported=_triton_lacks)
def _grouped_mlp_triton(x, gate_up, down, topk_weights, topk_ids, expert_map, lora, tuned, *, form, gate_up_bias,
                        down_bias):  # fmt: skip
    from flux_engine.triton_kernels.grouped_mlp_autograd import grouped_mlp as kernel

    return kernel(
        x, gate_up, down, topk_weights, topk_ids, expert_map, lora=lora, tuned=tuned, form=form,
        gate_up_bias=gate_up_bias, down_bias=down_bias,
    )  # fmt: skip


def _check_lora(lora: ExpertLoRA, num_original: int, H: int, I: int, form: ExpertForm) -> None:
    if not isinstance(lora, ExpertLoRA):
        raise TypeError(f"lora must be an ExpertLoRA, got {type(lora).__name__}")
    check_tensor("lora.slots", lora.slots, ndim=1)
    check_integer("lora.slots", lora.slots)
    check_shape("lora.slots", lora.slots, (num_original,), "one slot per original expert")
    pairs = {
        "gate_up": (lora.gate_up_A, lora.gate_up_B, H, form.gate_up_rows(I)),
        "down": (lora.down_A, lora.down_B, I, H),
    }
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


def _check_weights(x: torch.Tensor, gate_up: Weights, down: Weights, tuned: Optional[TunedExperts], form: ExpertForm):
    """``(E_base, I)`` after checking the base stacks (tensors or packed) and the tuned experts against x."""
    T, H = x.shape
    quantized = isinstance(gate_up, QuantizedTensor)
    if quantized != isinstance(down, QuantizedTensor):
        raise TypeError("gate_up and down must both be tensors or both be QuantizedTensors")
    if quantized:
        for name, q in (("gate_up", gate_up), ("down", down)):
            if len(q.shape) != 3:
                raise ValueError(f"{name} must quantize a 3-D expert stack, got shape {tuple(q.shape)}")
        gate_up_shape, down_shape = tuple(gate_up.shape), tuple(down.shape)
    else:
        check_tensor("gate_up", gate_up, ndim=3)
        check_tensor("down", down, ndim=3)
        for name, t in (("gate_up", gate_up), ("down", down)):
            check_floating(name, t)
            if t.dtype != x.dtype:
                raise TypeError(f"{name} dtype {t.dtype} differs from x dtype {x.dtype}")
        gate_up_shape, down_shape = tuple(gate_up.shape), tuple(down.shape)
    E, rows, h_in = gate_up_shape
    if h_in != H:
        raise ValueError(f"gate_up has size {h_in} in dim 2, expected {H} (hidden size H of x); shape {gate_up_shape}")
    if down_shape[:2] != (E, H):
        raise ValueError(f"down must be [E={E}, H={H}, I], got {down_shape}")
    I = down_shape[2]
    if rows != form.gate_up_rows(I):
        what = "2 * intermediate size I of down: gated form" if form.gated else "intermediate size I of down: ungated"
        raise ValueError(f"gate_up has size {rows} in dim 1, expected {form.gate_up_rows(I)} ({what})")
    if tuned is not None:
        if not isinstance(tuned, TunedExperts):
            raise TypeError(f"tuned must be a TunedExperts, got {type(tuned).__name__}")
        check_tensor("tuned.gate_up", tuned.gate_up, ndim=3)
        check_tensor("tuned.down", tuned.down, ndim=3)
        S = tuned.gate_up.shape[0]
        check_shape("tuned.gate_up", tuned.gate_up, (S, rows, H), "[S_t, 2I, H] (ungated: [S_t, I, H])")
        check_shape("tuned.down", tuned.down, (S, H, I), "[S_t, H, I]")
        for name, t in (("tuned.gate_up", tuned.gate_up), ("tuned.down", tuned.down)):
            if t.dtype != x.dtype:
                raise TypeError(f"{name} dtype {t.dtype} differs from x dtype {x.dtype}")
    return E, I


def _check_biases(x, E: int, I: int, form: ExpertForm, tuned, gate_up_bias, down_bias) -> None:
    """Each bias ``[E, D]`` in x's dtype (``D = 2I`` or ``I`` for gate_up, ``H`` for down); the tuned experts carry
    theirs ``[S_t, D]`` exactly when the base stacks do."""
    H = x.shape[1]
    for name, bias, width in (("gate_up_bias", gate_up_bias, form.gate_up_rows(I)), ("down_bias", down_bias, H)):
        tuned_bias = getattr(tuned, name) if tuned is not None else None
        if tuned is not None and (bias is None) != (tuned_bias is None):
            given, missing = (name, f"tuned.{name}") if tuned_bias is None else (f"tuned.{name}", name)
            raise ValueError(f"{given} is given but {missing} is not: the tuned and base experts share one form")
        S_t = tuned.num_experts if tuned is not None else 0
        for label, t, rows in ((name, bias, E), (f"tuned.{name}", tuned_bias, S_t)):
            if t is None:
                continue
            check_tensor(label, t, ndim=2)
            check_floating(label, t)
            if t.dtype != x.dtype:
                raise TypeError(f"{label} dtype {t.dtype} differs from x dtype {x.dtype}")
            check_shape(label, t, (rows, width), f"one row of {width} per expert")


def _fields(prefix: str, obj, names) -> dict:
    """``{"<prefix>.<name>": obj.<name>}`` (empty when ``obj`` is None): tensors named for ``check_same_device``."""
    return {} if obj is None else {f"{prefix}.{n}": getattr(obj, n) for n in names}


def grouped_mlp(
    x: torch.Tensor,
    gate_up: Weights,
    down: Weights,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_map: Optional[torch.Tensor] = None,
    lora: Optional[ExpertLoRA] = None,
    tuned: Optional[TunedExperts] = None,
    *,
    form: ExpertForm = SILU,
    gate_up_bias: Optional[torch.Tensor] = None,
    down_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Routed experts, differentiable in x, the expert weights and biases, topk_weights and the LoRA factors.

    Args:
        x: ``[T, H]`` token activations.
        gate_up: ``[E, 2I, H]`` in ``form``'s row layout (default gate rows first, then up rows: transformers v5);
            ``[E, I, H]`` for an ungated form; same dtype as x. Or a ``QuantizedTensor`` of it (int4/int8, frozen:
            no gradient), read packed by the Triton tier.
        down: ``[E, H, I]`` (or its ``QuantizedTensor``, together with gate_up).
        topk_weights: ``[T, k]`` routing weights (float; computed in fp32).
        topk_ids: ``[T, k]`` original expert ids.
        expert_map: optional ``[E_orig]`` map from original to physical expert ids in ``[0, S_t + E)``.
        lora: optional ``ExpertLoRA`` for the tuning experts (its slots index physical experts).
        tuned: optional ``TunedExperts``: physical experts ``[0, S_t)``; the base stacks are ``[S_t, S_t + E)``.
        form: the experts' ``ExpertForm`` (activation, gating, gate/up layout, gpt-oss clamp); default SwiGLU.
        gate_up_bias: optional ``[E, 2I]`` (``[E, I]`` ungated) added to gate_up's output, by physical expert like
            the weights (with ``tuned``: the base experts'; ``tuned.gate_up_bias`` holds the tuned ones').
        down_bias: optional ``[E, H]`` added to each expert's output before the routing weight.

    Returns:
        ``[T, H]`` in x's dtype.

    The triton tier reads two switches: ``FLUX_ENGINE_ATOMIC_SCATTER=1`` and ``FLUX_ENGINE_MOE_RECOMPUTE=1``
    (see ``flux_engine.triton_kernels.grouped_mlp_autograd``).
    """
    check_tensor("x", x, ndim=2)
    check_floating("x", x)
    check_tensor("topk_weights", topk_weights, ndim=2)
    check_tensor("topk_ids", topk_ids, ndim=2)
    check_floating("topk_weights", topk_weights)
    check_integer("topk_ids", topk_ids)
    T, H = x.shape
    if not isinstance(form, ExpertForm):
        raise TypeError(f"form must be an ExpertForm, got {type(form).__name__}")
    E, I = _check_weights(x, gate_up, down, tuned, form)
    _check_biases(x, E, I, form, tuned, gate_up_bias, down_bias)
    E_phys = E + (tuned.num_experts if tuned is not None else 0)
    check_dim("topk_ids", topk_ids, 0, T, "tokens T of x")
    check_shape("topk_weights", topk_weights, topk_ids.shape, "same [T, k] as topk_ids")
    num_original = E_phys
    if expert_map is not None:
        check_tensor("expert_map", expert_map, ndim=1)
        check_integer("expert_map", expert_map)
        num_original = expert_map.shape[0]
    if lora is not None:
        _check_lora(lora, num_original, H, I, form)
    quantized = isinstance(gate_up, QuantizedTensor)
    device = check_same_device(
        x=x,
        gate_up=gate_up.data if quantized else gate_up,
        down=down.data if quantized else down,
        topk_weights=topk_weights,
        topk_ids=topk_ids,
        expert_map=expert_map,
        gate_up_bias=gate_up_bias,
        down_bias=down_bias,
        **_fields("tuned", tuned, ("gate_up", "down", "gate_up_bias", "down_bias")),
        **_fields("lora", lora, ("slots", "gate_up_A", "gate_up_B", "down_A", "down_B")),
    )
    if expert_map is not None:
        check_ids_in_range("expert_map", expert_map, E_phys)
    check_ids_in_range("topk_ids", topk_ids, num_original)
    if torch.compiler.is_compiling():
        return _traced(x, gate_up, down, topk_weights, topk_ids, expert_map, lora, tuned, form, gate_up_bias, down_bias)
    return _op.run(
        device, x, gate_up, down, topk_weights, topk_ids, expert_map, lora, tuned, form=form,
        gate_up_bias=gate_up_bias, down_bias=down_bias,
    )  # fmt: skip


grouped_mlp.op = _op


# ------------------------------------------------------------------------------------------- under torch.compile
# Dynamo cannot trace the tiers (the reference loops over experts with host-known row counts; the Triton tier
# plans launches on the host), so a traced call becomes one opaque custom op, ``flux_engine::grouped_mlp``, whose
# implementation runs the usual dispatch eagerly. Its backward is a second op that recomputes the forward with
# autograd and differentiates it: the tiers keep one definition of their math, at the price of one more forward.
# Structured arguments travel flattened: every tensor its own (optional) argument, the rest as scalars.

_GRAPH_TENSORS = (
    "x", "gate_up", "down", "topk_weights", "topk_ids", "expert_map", "gate_up_bias", "down_bias", "tuned_gate_up",
    "tuned_down", "tuned_gate_up_bias", "tuned_down_bias", "lora_slots", "lora_gate_up_A", "lora_gate_up_B",
    "lora_down_A", "lora_down_B", "q_gate_up_data", "q_gate_up_scales", "q_gate_up_zeros", "q_down_data",
    "q_down_scales", "q_down_zeros",
)  # fmt: skip
_PACKED_META = 5  # per packed stack: bits, group_size, the 3-D shape


def _flatten(x, gate_up, down, topk_weights, topk_ids, expert_map, lora, tuned, form, gate_up_bias, down_bias):
    """``(tensors, scalars)``: the op's arguments in ``_GRAPH_TENSORS`` order and its non-tensor ones."""
    packed = isinstance(gate_up, QuantizedTensor)
    quantized = [q for q in (gate_up, down) if packed]
    t = [x, None if packed else gate_up, None if packed else down, topk_weights, topk_ids, expert_map, gate_up_bias,
         down_bias]  # fmt: skip
    t += [tuned.gate_up, tuned.down, tuned.gate_up_bias, tuned.down_bias] if tuned is not None else [None] * 4
    t += [lora.slots, lora.gate_up_A, lora.gate_up_B, lora.down_A, lora.down_B] if lora is not None else [None] * 5
    t += [v for q in quantized for v in (q.data, q.scales, q.zeros)] or [None] * 6
    meta = [v for q in quantized for v in (q.bits, q.group_size, *q.shape)]
    scalars = dict(
        q_meta=meta, q_dtype=gate_up.dtype if packed else None,
        lora_scale=float(lora.scale) if lora is not None else 1.0, activation=form.activation, gated=form.gated,
        interleaved=form.interleaved, limit=form.limit, alpha=form.alpha,
    )  # fmt: skip
    return t, scalars


def _unflatten(tensors, q_meta, q_dtype, lora_scale, activation, gated, interleaved, limit, alpha):
    """``_op.run``'s ``(args, kwargs)`` from ``_flatten``'s output."""
    a = dict(zip(_GRAPH_TENSORS, tensors))
    gate_up, down = a["gate_up"], a["down"]
    if q_meta:
        stacks = []
        for i, name in enumerate(("gate_up", "down")):
            bits, group, *shape = q_meta[i * _PACKED_META : (i + 1) * _PACKED_META]
            data, scales, zeros = (a[f"q_{name}_{f}"] for f in ("data", "scales", "zeros"))
            stacks.append(QuantizedTensor(data, scales, zeros, bits, group, torch.Size(shape), q_dtype))
        gate_up, down = stacks
    tuned = None
    if a["tuned_gate_up"] is not None:
        tuned = TunedExperts(a["tuned_gate_up"], a["tuned_down"], a["tuned_gate_up_bias"], a["tuned_down_bias"])
    lora = None
    if a["lora_slots"] is not None:
        factors = (a[f"lora_{n}"] for n in ("gate_up_A", "gate_up_B", "down_A", "down_B"))
        lora = ExpertLoRA(a["lora_slots"], *factors, lora_scale)
    form = ExpertForm(activation, gated, interleaved, limit, alpha)
    args = (a["x"], gate_up, down, a["topk_weights"], a["topk_ids"], a["expert_map"], lora, tuned)
    return args, dict(form=form, gate_up_bias=a["gate_up_bias"], down_bias=a["down_bias"])


def _run_flat(tensors, scalars):
    args, kwargs = _unflatten(tensors, **scalars)
    return _op.run(args[0].device, *args, **kwargs)


_T = Optional[torch.Tensor]


@torch.library.custom_op("flux_engine::grouped_mlp", mutates_args=())
def _graph_op(
    x: torch.Tensor, gate_up: _T, down: _T, topk_weights: torch.Tensor, topk_ids: torch.Tensor, expert_map: _T,
    gate_up_bias: _T, down_bias: _T, tuned_gate_up: _T, tuned_down: _T, tuned_gate_up_bias: _T, tuned_down_bias: _T,
    lora_slots: _T, lora_gate_up_A: _T, lora_gate_up_B: _T, lora_down_A: _T, lora_down_B: _T, q_gate_up_data: _T,
    q_gate_up_scales: _T, q_gate_up_zeros: _T, q_down_data: _T, q_down_scales: _T, q_down_zeros: _T,
    q_meta: List[int], q_dtype: Optional[torch.dtype], lora_scale: float, activation: str, gated: bool,
    interleaved: bool, limit: Optional[float], alpha: float,
) -> torch.Tensor:  # fmt: skip
    tensors, scalars = _split_graph_args(locals())
    return _run_flat(tensors, scalars)


@_graph_op.register_fake
def _(x, *args, **kwargs):
    return torch.empty_like(x)


def _split_graph_args(named: dict):
    """``(tensors, scalars)`` of the graph ops' arguments given by name."""
    return [named[n] for n in _GRAPH_TENSORS], {k: v for k, v in named.items() if k not in _GRAPH_TENSORS}


@torch.library.custom_op("flux_engine::grouped_mlp_backward", mutates_args=())
def _graph_backward_op(
    grad: torch.Tensor, needs: List[bool], x: torch.Tensor, gate_up: _T, down: _T, topk_weights: torch.Tensor,
    topk_ids: torch.Tensor, expert_map: _T, gate_up_bias: _T, down_bias: _T, tuned_gate_up: _T, tuned_down: _T,
    tuned_gate_up_bias: _T, tuned_down_bias: _T, lora_slots: _T, lora_gate_up_A: _T, lora_gate_up_B: _T,
    lora_down_A: _T, lora_down_B: _T, q_gate_up_data: _T, q_gate_up_scales: _T, q_gate_up_zeros: _T, q_down_data: _T,
    q_down_scales: _T, q_down_zeros: _T, q_meta: List[int], q_dtype: Optional[torch.dtype], lora_scale: float,
    activation: str, gated: bool, interleaved: bool, limit: Optional[float], alpha: float,
) -> List[torch.Tensor]:  # fmt: skip
    """Gradients of ``<grad, grouped_mlp(...)>`` wrt the tensors with ``needs[i]`` (empty tensors for the others)."""
    named = dict(locals())
    tensors, scalars = _split_graph_args(named)
    del scalars["grad"], scalars["needs"]
    # A custom op's implementation runs below autograd; the recomputation needs it back (keys re-admitted for this
    # block only).
    with torch._C._SetExcludeDispatchKeyGuard(torch._C.DispatchKey.AutogradFunctionality, False):
        with torch._C._SetExcludeDispatchKeyGuard(torch._C.DispatchKey.ADInplaceOrView, False), torch.enable_grad():
            leaves = [t.detach().requires_grad_() if n else t for t, n in zip(tensors, needs)]
            out = _run_flat(leaves, scalars)
            wrt = [t for t, n in zip(leaves, needs) if n]
            grads = iter(torch.autograd.grad(out, wrt, grad, allow_unused=True) if wrt else ())
    result = []
    for t, n in zip(leaves, needs):
        g = next(grads) if n else grad.new_empty(0)
        result.append(torch.zeros_like(t) if g is None else g)  # None: unused by this call (allow_unused)
    return result


@_graph_backward_op.register_fake
def _(grad, needs, *tensors_and_scalars, **kwargs):
    named = dict(zip(("grad", "needs", *_GRAPH_TENSORS), (grad, needs, *tensors_and_scalars)))
    return [torch.empty_like(named[n]) if need else grad.new_empty(0) for n, need in zip(_GRAPH_TENSORS, needs)]


def _graph_setup(ctx, inputs, output):
    tensors = inputs[: len(_GRAPH_TENSORS)]
    ctx.scalars = inputs[len(_GRAPH_TENSORS) :]
    ctx.needs = [t is not None and t.requires_grad for t in tensors]
    ctx.present = [t is not None for t in tensors]
    ctx.save_for_backward(*(t for t in tensors if t is not None))


def _graph_backward(ctx, grad):
    saved = iter(ctx.saved_tensors)
    tensors = [next(saved) if p else None for p in ctx.present]
    grads = _graph_backward_op(grad, ctx.needs, *tensors, *ctx.scalars)
    return (*(g if n else None for g, n in zip(grads, ctx.needs)), *(None,) * len(ctx.scalars))


_graph_op.register_autograd(_graph_backward, setup_context=_graph_setup)


def _traced(x, gate_up, down, topk_weights, topk_ids, expert_map, lora, tuned, form, gate_up_bias, down_bias):
    """``grouped_mlp`` as one ``flux_engine::grouped_mlp`` node of the traced graph."""
    tensors, scalars = _flatten(x, gate_up, down, topk_weights, topk_ids, expert_map, lora, tuned, form, gate_up_bias,
                                down_bias)  # fmt: skip
    return _graph_op(*tensors, **scalars)
