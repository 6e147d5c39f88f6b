"""The MoE decoder, top to bottom: RMSNorm, RoPE, GQA attention, dense and MoE MLPs, the causal LM.

Parameter names follow transformers v5 (``model.layers.{i}.mlp.experts.gate_up_proj`` ...), so native
checkpoints map onto this model with few renames. The routed experts call ``flux_engine.ops`` only, so the
kernel tier (reference, Triton, CUDA) is chosen by dispatch, not here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from flux_engine import ops
from flux_engine.models.config import MoEConfig
from flux_engine.ops.expert_form import SILU, ExpertForm
from flux_engine.ops.grouped_mlp import ExpertLoRA, TunedExperts

INIT_STD = 0.02


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 like the reference implementations, then scale in the input dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_frequencies(config: MoEConfig, device=None) -> Tuple[torch.Tensor, float]:
    """RoPE's inverse frequencies ``[head_dim / 2]`` (float32) and the factor cos/sin are scaled by: plain RoPE
    (factor 1), or YaRN (``config.rope_scaling``; transformers' ``_compute_yarn_parameters``): low frequencies
    interpolated by ``factor``, high ones kept, a linear ramp between the dimensions that turn ``beta_slow`` and
    ``beta_fast`` times over ``original_max_position_embeddings``; factor ``0.1 ln(factor) + 1`` unless given."""
    D, base = config.head_dim, config.rope_theta
    pos_freqs = base ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D)
    s = config.rope_scaling
    if s is None or s["rope_type"] == "default":
        return 1.0 / pos_freqs, 1.0
    factor = float(s["factor"])
    scale = s["attention_factor"]
    if scale is None:
        scale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0

    def correction_dim(rotations: float) -> float:
        return D * math.log(s["original_max_position_embeddings"] / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(s["beta_fast"]), correction_dim(s["beta_slow"])
    if s["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, D - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(D // 2, device=device, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (high frequencies), 0: interpolate
    return (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep, float(scale)


def rope_cos_sin(positions: torch.Tensor, config: MoEConfig, dtype: torch.dtype):
    """``positions: [B, T]`` -> cos, sin ``[B, 1, T, head_dim]`` (computed each call: no buffers to restore
    after meta-device construction)."""
    inv_freq, scale = rope_frequencies(config, positions.device)
    freqs = positions.float().unsqueeze(-1) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


# Channels appended to q and k for the sink key: one carries the sink logit, the rest keep the head dim a
# multiple of 8 (the fused attention kernels' alignment).
_SINK_CHANNELS = 8


def sink_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, mask: Optional[torch.Tensor]
) -> torch.Tensor:
    """Attention whose softmax also holds one learned logit per query head with a zero value (gpt-oss sinks).

    ``q: [B, Hq, T, D]``, ``k``/``v``: ``[B, Hkv, T, D]``, ``sinks: [Hq]``, ``mask``: bool ``[B or 1, 1, T, T]``
    (True = attend) or None for causal -> ``[B, Hq, T, D]``. Runs in one ``scaled_dot_product_attention`` (no
    ``[B, H, T, T]`` float tensor): the sink is one more key, last, with value 0; q gets the channel
    ``sink_h / scale`` and that key the channel 1, real keys 0 there, so its logit is ``sink_h`` for every query
    of head h, while every real logit is unchanged.
    """
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    scale = D**-0.5
    sink_channel = (sinks / scale).to(q.dtype).view(1, Hq, 1, 1).expand(B, Hq, T, 1)
    q = torch.cat([q, sink_channel, q.new_zeros(B, Hq, T, _SINK_CHANNELS - 1)], dim=-1)
    sink_key = k.new_zeros(B, Hkv, 1, D + _SINK_CHANNELS)
    sink_key[..., D] = 1.0
    k = torch.cat([torch.cat([k, k.new_zeros(B, Hkv, T, _SINK_CHANNELS)], dim=-1), sink_key], dim=2)
    v = torch.cat([v, v.new_zeros(B, Hkv, 1, D)], dim=2)
    if mask is None:
        i = torch.arange(T, device=q.device)
        mask = (i[None, :] <= i[:, None])[None, None]
    mask = torch.cat([mask, mask.new_ones(*mask.shape[:-1], 1)], dim=-1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=Hq != Hkv)


class Attention(nn.Module):
    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        H, D = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, D
        bias = config.attention_bias
        self.q_proj = nn.Linear(H, self.num_heads * D, bias=bias)
        self.k_proj = nn.Linear(H, self.num_kv_heads * D, bias=bias)
        self.v_proj = nn.Linear(H, self.num_kv_heads * D, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * D, H, bias=config.attention_output_bias)
        self.sinks = nn.Parameter(torch.empty(self.num_heads)) if config.attention_sinks else None
        if config.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(D, config.rms_norm_eps), RMSNorm(D, config.rms_norm_eps)
        elif config.qk_norm == "full":
            self.q_norm = RMSNorm(self.num_heads * D, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.num_kv_heads * D, config.rms_norm_eps)
        # Profiling: when True, forward keeps ``(q [B, Hq, T, D], k [B, Hkv, T, D])`` after RoPE in ``last_qk``.
        self.capture_qk = False
        self.last_qk = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """``x: [B, T, H]``; ``mask``: bool ``[B, 1, T, T]`` (True = attend) or None for plain causal."""
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.config.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.config.clip_qkv is not None:
            c = self.config.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        if self.config.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.capture_qk:
            self.last_qk = (q, k)
        if self.sinks is not None:
            y = sink_attention(q, k, v, self.sinks, mask)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.num_heads != self.num_kv_heads
            )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class DenseMLP(nn.Module):
    """SwiGLU: ``down(silu(gate x) * up x)``."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


LORA_TARGETS = ("gate_up", "down")


def check_lora_settings(rank: int, targets: Sequence[str]) -> None:
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if not targets or set(targets) - set(LORA_TARGETS):
        raise ValueError(f"LoRA targets must be a non-empty subset of {LORA_TARGETS}, got {tuple(targets)}")


class ExpertLoRAAdapter(nn.Module):
    """Trainable LoRA factors of one layer's ``S`` tuning experts (never of all ``E``).

    ``slots: [E_orig]`` buffer, the slot of each original expert (-1: none); per target in ``targets``:
    ``gate_up_A [S, r, H]``, ``gate_up_B [S, 2I, r]``, ``down_A [S, r, I]``, ``down_B [S, H, r]``; the update of
    slot s is ``scale * B_s A_s`` with ``scale = alpha / rank`` (PEFT's convention). Factors are fp32 whatever the
    base dtype: they are the optimizer's master weights and the kernels accumulate in fp32 anyway.

    ``biases`` (experts with biases only, when asked): trainable bias deltas ``gate_up_bias [S, 2I]`` /
    ``down_bias [S, H]`` (fp32, zero at first), added to the slot's expert biases; otherwise the biases stay frozen.
    """

    def __init__(self, slots: torch.Tensor, hidden_size: int, intermediate_size: int, rank: int, alpha: float,
                 targets: Sequence[str] = LORA_TARGETS, biases: bool = False):  # fmt: skip
        super().__init__()
        check_lora_settings(rank, targets)
        self.register_buffer("slots", slots.to(torch.int32))
        S = int((slots >= 0).sum())
        self.rank, self.alpha, self.scale = int(rank), float(alpha), float(alpha) / rank
        shapes = {"gate_up": (hidden_size, 2 * intermediate_size), "down": (intermediate_size, hidden_size)}
        dev = slots.device
        for name, (fan_in, fan_out) in shapes.items():
            present = name in targets
            A = nn.Parameter(torch.zeros(S, rank, fan_in, device=dev)) if present else None
            B = nn.Parameter(torch.zeros(S, fan_out, rank, device=dev)) if present else None
            self.register_parameter(f"{name}_A", A)
            self.register_parameter(f"{name}_B", B)
            self.register_parameter(f"{name}_bias", nn.Parameter(torch.zeros(S, fan_out, device=dev)) if biases else None)

    @property
    def targets(self) -> Tuple[str, ...]:
        return tuple(t for t in LORA_TARGETS if getattr(self, f"{t}_A") is not None)

    @property
    def bias_names(self) -> Tuple[str, ...]:
        """The trainable bias deltas (``gate_up_bias``, ``down_bias``), none unless asked for."""
        return tuple(f"{t}_bias" for t in LORA_TARGETS if getattr(self, f"{t}_bias") is not None)

    def biased(self, name: str, base: torch.Tensor, expert_map: torch.Tensor) -> torch.Tensor:
        """``base [E_phys, D]`` (the layer's bias that delta ``name`` adapts) with this adapter's deltas added at the
        slots' physical experts (fp32 sum, base's dtype); differentiable in the deltas."""
        delta = getattr(self, name)
        owners = torch.nonzero(self.slots >= 0).flatten()
        physical = expert_map.long()[owners]
        return base.float().index_add(0, physical, delta[self.slots.long()[owners]]).to(base.dtype)

    @torch.no_grad()
    def reset_slot(self, slot: int, generator: Optional[torch.Generator] = None) -> None:
        """PEFT's initialisation: ``A`` kaiming-uniform (a = sqrt 5, i.e. U(+-1/sqrt(fan_in))), ``B`` zeros, so the
        adapter starts as the identity. Drawn on the CPU so a seed gives the same factors on every device."""
        for t in self.targets:
            A = getattr(self, f"{t}_A")
            init = torch.empty(A.shape[1:])
            nn.init.kaiming_uniform_(init, a=math.sqrt(5), generator=generator)
            A[slot].copy_(init)
            getattr(self, f"{t}_B")[slot].zero_()
        for name in self.bias_names:
            getattr(self, name)[slot].zero_()

    def as_op(self) -> ExpertLoRA:
        return ExpertLoRA(self.slots, self.gate_up_A, self.gate_up_B, self.down_A, self.down_B, self.scale)


# The routed experts' per-physical-expert tensors (dim 0 = physical expert), weights first; the biases exist only
# when the config has expert biases.
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")
EXPERT_BIASES = ("gate_up_proj_bias", "down_proj_bias")


class Experts(nn.Module):
    """Routed expert stacks in the transformers v5 layout, plus the original -> physical expert map.

    ``gate_up_proj [E_phys, 2I, H]`` (rows in ``form``'s layout), ``down_proj [E_phys, H, I]`` and, with ``bias``,
    ``gate_up_proj_bias [E_phys, 2I]`` / ``down_proj_bias [E_phys, H]``; ``form`` (``ops.ExpertForm``) is what an
    expert computes between them.

    Tuning experts can be attached (``flux_engine.training.attach_tuning``) in two ways:
    - ``lora``: an ``ExpertLoRAAdapter`` over the (frozen) stacks;
    - ``tuned_<stack>`` for each stack (``tuned_gate_up_proj [S_t, 2I, H]`` ...): full-size tuning experts,
      physical experts ``[0, S_t)``; the base stacks then hold only the physical experts ``[S_t, E_phys)``.
    """

    # A plain attribute: subclasses that pack their stacks (baselines.QuantizedExperts) keep today's form.
    form: ExpertForm = SILU

    def __init__(self, num_original: int, num_physical: int, hidden_size: int, intermediate_size: int,
                 form: ExpertForm = SILU, bias: bool = False):  # fmt: skip
        super().__init__()
        self.form = form
        self.gate_up_proj = nn.Parameter(torch.empty(num_physical, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_physical, hidden_size, intermediate_size))
        biases = (torch.empty(num_physical, 2 * intermediate_size), torch.empty(num_physical, hidden_size))
        for name, b in zip(EXPERT_BIASES, biases):
            self.register_parameter(name, nn.Parameter(b) if bias else None)
        self.register_buffer("expert_map", torch.empty(num_original, dtype=torch.int32))
        self.lora: Optional[ExpertLoRAAdapter] = None
        for name in EXPERT_WEIGHTS + EXPERT_BIASES:
            self.register_parameter(f"tuned_{name}", None)
        # Physical order before tuned experts were split off (new physical j was old ``tuned_order[j]``).
        self.tuned_order: Optional[List[int]] = None
        self.reset_expert_map()

    @property
    def stacks(self) -> Tuple[str, ...]:
        """Names of the base stacks this layer has (weights, then biases when present)."""
        return EXPERT_WEIGHTS + tuple(n for n in EXPERT_BIASES if getattr(self, n, None) is not None)

    @torch.no_grad()
    def reset_expert_map(self) -> None:
        """Original expert e -> physical e mod E_phys (the identity when nothing is merged)."""
        if not self.expert_map.is_meta:
            n = self.expert_map.numel()
            self.expert_map.copy_(torch.arange(n, dtype=torch.int32, device=self.expert_map.device) % self.num_physical)

    @property
    def num_tuned(self) -> int:
        return 0 if self.tuned_gate_up_proj is None else self.tuned_gate_up_proj.shape[0]

    @property
    def num_physical(self) -> int:
        return self.num_tuned + self.gate_up_proj.shape[0]

    @property
    def has_tuning(self) -> bool:
        return self.lora is not None or self.tuned_gate_up_proj is not None

    def physical_tensors(self, p: int) -> Dict[str, torch.Tensor]:
        """Views of physical expert ``p``'s tensors by stack name (``gate_up_proj [2I, H]``, ``down_proj [H, I]``,
        the biases when present), in whichever stacks hold it."""
        S = self.num_tuned
        if p < S:
            return {name: getattr(self, f"tuned_{name}")[p] for name in self.stacks}
        return {name: getattr(self, name)[p - S] for name in self.stacks}

    def physical_weights(self, p: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Views ``(gate_up [2I, H], down [H, I])`` of physical expert ``p``, in whichever stack holds it."""
        t = self.physical_tensors(p)
        return t["gate_up_proj"], t["down_proj"]

    @torch.no_grad()
    def split_tuned(self, physical: Sequence[int]) -> None:
        """Move the given physical experts (in this order) into full-size ``tuned_*`` stacks, which become physical
        ``[0, S_t)``; the others stay, frozen, in the base stacks (copies: the frozen stacks never get a gradient
        buffer). The tuned weights are trainable, the tuned biases frozen (``requires_grad_`` them to train them)."""
        if self.has_tuning:
            raise ValueError("tuning experts are already attached")
        E, chosen = self.num_physical, set(physical)
        order = list(physical) + [p for p in range(E) if p not in chosen]
        dev = self.gate_up_proj.device
        tuned, rest = torch.tensor(order[: len(physical)], device=dev), torch.tensor(order[len(physical):], device=dev)
        for name in self.stacks:
            w = getattr(self, name)
            setattr(self, f"tuned_{name}", nn.Parameter(w.index_select(0, tuned), requires_grad=name in EXPERT_WEIGHTS))
            setattr(self, name, nn.Parameter(w.index_select(0, rest), requires_grad=False))
        new_of_old = torch.empty(E, dtype=torch.long, device=dev)
        new_of_old[torch.tensor(order, device=dev)] = torch.arange(E, device=dev)
        self.expert_map.copy_(new_of_old[self.expert_map.long()].to(self.expert_map.dtype))
        self.tuned_order = order

    @torch.no_grad()
    def fold_tuned(self) -> None:
        """Undo ``split_tuned``: one frozen stack per tensor in the original physical order, trained values
        included."""
        if self.tuned_order is None:
            return
        dev = self.gate_up_proj.device
        old_of_new = torch.tensor(self.tuned_order, device=dev)
        new_of_old = torch.empty_like(old_of_new)
        new_of_old[old_of_new] = torch.arange(old_of_new.numel(), device=dev)
        for name in self.stacks:
            w = torch.cat([getattr(self, f"tuned_{name}").detach(), getattr(self, name)]).index_select(0, new_of_old)
            setattr(self, f"tuned_{name}", None)
            setattr(self, name, nn.Parameter(w, requires_grad=False))
        self.expert_map.copy_(old_of_new[self.expert_map.long()].to(self.expert_map.dtype))
        self.tuned_order = None

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """``x: [N, H]``, ``topk_*: [N, k]`` over original experts -> ``[N, H]``."""
        lora = None if self.lora is None else self.lora.as_op()
        tuned = None
        if self.tuned_gate_up_proj is not None:
            tuned = TunedExperts(self.tuned_gate_up_proj, self.tuned_down_proj, self.tuned_gate_up_proj_bias,
                                 self.tuned_down_proj_bias)  # fmt: skip
        return ops.grouped_mlp(
            x, self.gate_up_proj, self.down_proj, topk_weights, topk_ids, self.expert_map, lora, tuned,
            **self.form_kwargs(),
        )  # fmt: skip

    def form_kwargs(self) -> Dict[str, Any]:
        """The ``form`` / ``gate_up_bias`` / ``down_bias`` keywords of ``ops.grouped_mlp`` for the base stacks (with
        a LoRA adapter's trained bias deltas added, when it has them)."""
        biases = {f"{t}_bias": getattr(self, f"{t}_proj_bias", None) for t in LORA_TARGETS}
        if self.lora is not None:
            for name in self.lora.bias_names:
                biases[name] = self.lora.biased(name, biases[name], self.expert_map)
        return {"form": self.form, **biases}


def materialize(model: nn.Module, device: torch.device, skip: Callable[[str], bool] = lambda name: False) -> None:
    """Give every parameter and buffer of a meta-device model uninitialised storage on ``device``, except the
    parameters whose qualified name ``skip`` accepts (left on meta, to be filled or replaced later, e.g. expert
    stacks streamed from a checkpoint). A tied parameter is materialised once and stays tied."""
    new: Dict[int, nn.Parameter] = {}
    for mname, module in model.named_modules():
        for pname, p in list(module._parameters.items()):
            if p is None or skip(f"{mname}.{pname}".lstrip(".")):
                continue
            if id(p) not in new:
                new[id(p)] = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
            module._parameters[pname] = new[id(p)]
        for bname, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[bname] = torch.empty_like(b, device=device)


@dataclass
class RouterOutput:
    """One MoE layer's routing of ``N = B*T`` tokens: ``logits [N, E_orig]``, ``weights``/``ids`` ``[N, k]``."""

    layer: int
    logits: torch.Tensor
    weights: torch.Tensor
    ids: torch.Tensor


class TanhMLPRouter(nn.Module):
    """LLaMA-MoE's gate network: ``logits = out_proj(tanh(in_proj x))``, ``in_proj: [E, H]``, ``out_proj: [E, E]``."""

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.in_proj = nn.Linear(hidden_size, num_experts, bias=False)
        self.out_proj = nn.Linear(num_experts, num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.in_proj(x)))


class MoEMLP(nn.Module):
    def __init__(self, config: MoEConfig, layer: int):
        super().__init__()
        self.config, self.layer = config, layer
        H = config.hidden_size
        # The router, named ``gate`` as in transformers.
        if config.router_type == "tanh_mlp":
            self.gate = TanhMLPRouter(H, config.num_experts)
        else:
            self.gate = nn.Linear(H, config.num_experts, bias=config.router_bias)
        self.experts = Experts(
            config.num_experts, config.physical_experts_of(layer), H, config.moe_intermediate_size,
            config.expert_form, config.expert_bias,
        )  # fmt: skip
        self.shared_expert = None
        self.shared_expert_gate = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = DenseMLP(H, config.shared_expert_intermediate_size)
            if config.shared_expert_gate:
                self.shared_expert_gate = nn.Linear(H, 1, bias=False)

    def forward(self, x: torch.Tensor):
        """``x: [B, T, H]`` -> ``([B, T, H], RouterOutput)``."""
        flat = x.reshape(-1, x.shape[-1])
        logits = self.gate(flat)
        c = self.config
        if c.scoring == "ones":
            _, ids = ops.route(logits, c.num_experts_per_tok, scoring="softmax", renormalize=False)
            weights = torch.full(ids.shape, c.routed_scaling_factor, dtype=torch.float32, device=ids.device)
        else:
            weights, ids = ops.route(
                logits, c.num_experts_per_tok, scoring=c.scoring, renormalize=c.norm_topk_prob, scaling_factor=c.routed_scaling_factor
            )
        y = self.experts(flat, weights, ids)
        if self.shared_expert is not None:
            shared = self.shared_expert(flat)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
            y = y + shared
        return y.view_as(x), RouterOutput(self.layer, logits, weights, ids)


def load_balancing_loss(router: RouterOutput, num_experts: int) -> torch.Tensor:
    """Switch-Transformer auxiliary loss ``E * sum_e f_e P_e`` (1.0 when routing is uniform)."""
    probs = torch.softmax(router.logits.float(), dim=-1)
    frac = ops.expert_counts(router.ids, num_experts).float() / max(router.ids.numel(), 1)
    return num_experts * (frac * probs.mean(0)).sum()


class DecoderLayer(nn.Module):
    def __init__(self, config: MoEConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer)
        self.mlp = MoEMLP(config, layer) if self.is_moe else DenseMLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            y, router = self.mlp(h)
            return x + y, router
        return x + self.mlp(h), None


class MoEModel(nn.Module):
    def __init__(self, config: MoEConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


@dataclass
class CausalLMOutput:
    """``logits: [B, T, V]``; ``loss`` = next-token cross-entropy (+ aux loss when configured);
    ``routers``: one ``RouterOutput`` per MoE layer when requested."""

    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None
    routers: List[RouterOutput] = field(default_factory=list)


def attention_mask_4d(attention_mask: Optional[torch.Tensor], T: int, sliding_window: Optional[int], device) -> Optional[torch.Tensor]:
    """Bool ``[B or 1, 1, T, T]`` mask (True = attend), or None when plain causal attention suffices.

    ``attention_mask``: ``[B, T]`` (1 = token, 0 = padding; combined with the causal mask), or ``[B, T, T]`` (True =
    query t attends key s) taken as it is: several continuations packed behind one shared context, each seeing the
    context and itself only."""
    if attention_mask is not None and attention_mask.dim() == 3:
        return attention_mask.bool()[:, None]
    if attention_mask is None and (sliding_window is None or sliding_window >= T):
        return None
    i = torch.arange(T, device=device)
    mask = i[None, :] <= i[:, None]
    if sliding_window is not None:
        mask = mask & (i[:, None] - i[None, :] < sliding_window)
    mask = mask[None, None]
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, None, :]
        # A fully padded query row would make softmax NaN; let it see itself (its output is ignored).
        mask = mask | torch.eye(T, dtype=torch.bool, device=device)[None, None]
    return mask


def layer_masks(config: MoEConfig, attention_mask: Optional[torch.Tensor], T: int, device) -> List[Optional[torch.Tensor]]:
    """The ``attention_mask_4d`` of every decoder layer (its own window: ``config.layer_window``), each distinct
    mask built once."""
    built: Dict[Optional[int], Optional[torch.Tensor]] = {}
    out = []
    for i in range(config.num_layers):
        window = config.layer_window(i)
        if window not in built:
            built[window] = attention_mask_4d(attention_mask, T, window, device)
        out.append(built[window])
    return out


class MoEForCausalLM(nn.Module):
    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.model = MoEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.gradient_checkpointing = False
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    def tie_weights(self) -> None:
        """Share the LM head with the embeddings when configured (again after ``to_empty``, which unties)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """Random initialisation (normal 0.02, norms at 1, biases at 0, identity expert maps; attention sinks
        normal 0.02 as weights); ``torch.manual_seed`` makes it reproducible."""
        self.tie_weights()
        for module in self.modules():
            if isinstance(module, Experts):
                module.reset_expert_map()
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith((".bias", "_bias")):
                p.zero_()
            else:
                p.normal_(0.0, INIT_STD)

    def moe_layers(self) -> List[MoEMLP]:
        return [layer.mlp for layer in self.model.layers if layer.is_moe]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        return_routers: bool = False,
        logits_positions: Optional[torch.Tensor] = None,
    ) -> CausalLMOutput:
        """``input_ids: [B, T]``; ``labels: [B, T]`` (shifted inside, -100 ignored); ``attention_mask: [B, T]``
        (1 = token, 0 = padding) or ``[B, T, T]`` (see ``attention_mask_4d``); ``position_ids: [B, T]``.
        ``logits_positions``: bool ``[B, T]``; when given, ``logits`` is ``[N, V]`` for those positions only (row-major
        order; scoring needs a few positions, and the vocabulary projection is a fifth of a small model's work)."""
        if logits_positions is not None and labels is not None:
            raise ValueError("labels need the logits of every position; pass logits_positions or labels, not both")
        B, T = input_ids.shape
        x = self.model.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        cos, sin = rope_cos_sin(position_ids, self.config, x.dtype)
        masks = layer_masks(self.config, attention_mask, T, input_ids.device)
        routers: List[RouterOutput] = []
        for layer, mask in zip(self.model.layers, masks):
            if self.gradient_checkpointing and self.training:
                x, router = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x, router = layer(x, cos, sin, mask)
            if router is not None:
                routers.append(router)
        logits = self.lm_head(self.model.norm(x if logits_positions is None else x[logits_positions]))
        out = CausalLMOutput(logits, routers=routers if return_routers else [])
        if self.config.router_aux_loss_coef > 0 and routers:
            out.aux_loss = torch.stack([load_balancing_loss(r, self.config.num_experts) for r in routers]).mean()
        if labels is not None:
            out.loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
            if out.aux_loss is not None and self.training:
                out.loss = out.loss + self.config.router_aux_loss_coef * out.aux_loss
        return out
