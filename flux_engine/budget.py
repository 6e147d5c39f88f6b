"""Client memory budgets: how many tuning experts (``B_tune``) and merged non-tuning experts (``B_non``) fit.

The memory model (bytes, all terms printed by ``BudgetPlan.describe()``):

- **non-expert weights**: every parameter except the routed experts (embeddings, LM head unless tied, attention,
  norms, routers, dense MLPs, shared experts), in the weight dtype. Counted exactly from a meta-device model.
- **merged experts**: ``B_non`` frozen experts of ``3 * H * I`` weights each (plus ``2I + H`` biases when the
  model has expert biases, gpt-oss), stored as ``frozen_experts`` says: the weight dtype (default), ``int4``
  (``profiling``'s packed group-wise format: 4-bit codes plus an fp32 scale per group) or ``mxfp4`` (gpt-oss's
  checkpoint format: 4-bit codes plus one byte per 32 values); biases stay in the weight dtype. In LoRA mode the
  frozen base weights of the tuning experts are stored the same way (QLoRA-style). What computes on them: int4
  stacks are ``ops.QuantizedTensor`` bases the grouped MLP reads packed (LoRA included); MXFP4 is the memory a
  gpt-oss checkpoint's experts take as shipped, which the runtime dequantises on load or repacks to int4
  (``checkpoint.mxfp4``), so an ``mxfp4`` plan is the bound such a kernel would reach, not today's runtime.
- **tuning experts**: ``B_tune`` experts, each its base weights plus
  - LoRA mode (``lora_rank > 0``): LoRA factors on gate_up and down (``r * (2H + 3I)`` parameters), kept in fp32,
    their fp32 gradients and optimizer state (AdamW: two fp32 moments; SGD: none);
  - full tuning (``lora_rank`` 0/None): gradients in the weight dtype, an fp32 master copy when the weight dtype
    is not fp32, and optimizer state (AdamW: two fp32 moments; SGD: none).
- **activations** for one ``batch x seq`` step. Without activation checkpointing every decoder layer keeps its
  attention inputs/outputs (``2H + 2*heads*D + 2*kv_heads*D``), residual (``H``) and MLP intermediates (dense:
  ``H + 3 I_dense``; MoE: ``H + E`` router logits + ``k (H + 3I)`` routed rows + the shared expert); with
  checkpointing only each layer's input (``H``) plus one layer's intermediates (recomputed one layer at a time).
  The logits add ``V`` per token in the weight dtype plus ``V`` in fp32 for the loss.
- **workspace**: a fixed allowance (allocator fragmentation, kernels' scratch, CUDA context) plus a fraction of the
  budget.

- **profiling copy** (``profile_bits`` set): the low-bit copy of the model that quantized profiling reads
  (expert stacks at ``profile_bits``, attention / dense MLPs / embedding / LM head at ``profile_dense_bits``:
  ``profiling``'s format, codes plus fp32 scales per group; norms and routers in the weight dtype;
  ``profile_bits = 0``: a full-precision copy). It is **not** a term of the training plan: profiling runs in the
  client's idle window after its upload (stale profiling), when the round's compact model, LoRA state and
  activations are gone, so the copy time-shares the card with training. Between profiles it waits in host memory
  and comes back over PCIe for the next one (``hardware`` charges that copy to the idle window); only the experts
  whose global weights changed are re-quantised. The plan checks instead that the **profile phase** fits:
  ``profile_phase`` (the copy, one forward's activations, one MoE layer dequantised, the workspace) must be within
  the budget, else ``BudgetError``; ``phase_peaks`` gives every phase's peak, which ``bench/memory.py`` measures in
  separate processes.

Split policy: every tuning slot trains (exploitation and exploration experts alike), and in LoRA mode a tuning
expert costs about what a merged one costs (its base weights plus small fp32 factors and their optimizer state),
so the plan trains as many experts as fit: after the fixed terms (non-expert weights, activations, workspace) and
one merged expert per MoE layer are reserved, ``B_tune = floor(spare / c_tune)`` (at most ``L * E``),
and whatever is left holds ``B_non = floor(left / c_merged)`` merged experts (at most the ``L * E - B_tune`` experts
not tuned; 0 when every expert is tuned). ``BudgetPlan.describe()`` prints this arithmetic with the numbers. A
budget that cannot hold the fixed terms plus one merged expert per layer plus ``min_tune`` tuning experts, or the
profile phase, raises ``BudgetError`` naming the missing bytes.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

import torch

from flux_engine.models.config import MoEConfig

MiB = 1 << 20
_DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2, "float64": 8}
OPTIMIZERS = ("adamw", "sgd")
EXPERT_FORMATS = ("dtype", "int4", "mxfp4")  # how frozen expert weights are stored (module docstring)


def dtype_bytes(dtype: Union[str, torch.dtype]) -> int:
    if isinstance(dtype, torch.dtype):
        return torch.empty((), dtype=dtype).element_size()
    try:
        return _DTYPE_BYTES[str(dtype).replace("torch.", "")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(sorted(_DTYPE_BYTES))}") from None


class BudgetError(ValueError):
    """The budget cannot hold the minimum configuration; ``missing_bytes`` says by how much."""

    def __init__(self, message: str, missing_bytes: int):
        super().__init__(message)
        self.missing_bytes = int(missing_bytes)


@dataclass
class TrainSettings:
    """A client's training settings, as far as memory is concerned."""

    dtype: Union[str, torch.dtype] = "bfloat16"
    lora_rank: Optional[int] = 8  # 0 / None: full tuning of the tuning experts
    optimizer: str = "adamw"
    batch_size: int = 4
    seq_len: int = 512
    activation_checkpointing: bool = False
    workspace_bytes: int = 256 * MiB
    workspace_fraction: float = 0.05
    # The profiling copy (resident in the profile phase only): None (no profiling planned), 0 (full precision),
    # 4 or 8; dense weights at profile_dense_bits (None: full precision).
    profile_bits: Optional[int] = None
    profile_dense_bits: Optional[int] = 8
    frozen_experts: str = "dtype"  # storage of frozen expert weights: one of EXPERT_FORMATS

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.frozen_experts not in EXPERT_FORMATS:
            raise ValueError(f"frozen_experts must be one of {EXPERT_FORMATS}, got {self.frozen_experts!r}")
        dtype_bytes(self.dtype)
        if self.batch_size < 1 or self.seq_len < 1:
            raise ValueError("batch_size and seq_len must be >= 1")
        if self.profile_bits not in (None, 0, 4, 8) or self.profile_dense_bits not in (None, 4, 8):
            raise ValueError(
                f"profile_bits must be None, 0, 4 or 8 and profile_dense_bits None, 4 or 8, got "
                f"{self.profile_bits!r} and {self.profile_dense_bits!r}"
            )

    @property
    def lora(self) -> bool:
        return bool(self.lora_rank)


def _human(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def non_expert_parameters(config: MoEConfig) -> int:
    """Parameters of everything but the routed experts (exact, from a meta-device model)."""
    from flux_engine.models.moe import Experts, MoEForCausalLM

    with torch.device("meta"):
        model = MoEForCausalLM(config)
    expert_ids = {id(p) for m in model.modules() if isinstance(m, Experts) for p in m.parameters(recurse=False)}
    return sum(p.numel() for p in model.parameters() if id(p) not in expert_ids)


def expert_parameters(config: MoEConfig) -> int:
    """Parameters of one routed expert: ``3 * H * I`` weights, plus ``2I + H`` biases when it has them."""
    return 3 * config.hidden_size * config.moe_intermediate_size + _expert_bias_parameters(config)


def _expert_bias_parameters(config: MoEConfig) -> int:
    return (2 * config.moe_intermediate_size + config.hidden_size) if config.expert_bias else 0


def expert_storage_bytes(config: MoEConfig, fmt: str, dtype: Union[str, torch.dtype]) -> int:
    """Bytes of one frozen routed expert stored as ``fmt`` (``EXPERT_FORMATS``), biases in ``dtype``."""
    b = dtype_bytes(dtype)
    if fmt == "dtype":
        return expert_parameters(config) * b
    weights = 3 * config.hidden_size * config.moe_intermediate_size
    if fmt == "int4":
        packed = quantized_expert_bytes(config, 4)
    elif fmt == "mxfp4":
        packed = weights // 2 + math.ceil(weights / 32)  # FP4 codes + one E8M0 scale per 32 values
    else:
        raise ValueError(f"expert format must be one of {EXPERT_FORMATS}, got {fmt!r}")
    return packed + _expert_bias_parameters(config) * b


def quantized_bytes(rows: int, K: int, bits: int, group_size: Optional[int] = None) -> int:
    """Bytes of a symmetric packed ``[rows, K]`` weight: codes plus fp32 scales (``profiling``'s groups)."""
    from flux_engine.profiling import group_for

    g = group_for(K, bits, group_size)
    return rows * K * bits // 8 + rows * (K // g) * 4


def quantized_expert_bytes(config: MoEConfig, bits: int = 4, group_size: Optional[int] = None) -> int:
    """Bytes of one packed expert: ``gate_up [2I, H]`` and ``down [H, I]``."""
    H, I = config.hidden_size, config.moe_intermediate_size
    return quantized_bytes(2 * I, H, bits, group_size) + quantized_bytes(H, I, bits, group_size)


_COPY_BYTES: Dict[str, int] = {}  # (config, dtype, bits) as JSON -> bytes: counting builds a meta-device model


def profiling_copy_bytes(config: MoEConfig, settings: TrainSettings) -> int:
    """Bytes of the profiling copy (module docstring; 0 when ``settings.profile_bits`` is None), counted from a
    meta-device model with ``profiling``'s choice of low-bit weights, once per config and format (the time model
    asks for it every modelled round)."""
    if settings.profile_bits is None:
        return 0
    key = json.dumps([config.to_dict(), str(settings.dtype), settings.profile_bits, settings.profile_dense_bits],
                     sort_keys=True, default=str)  # fmt: skip
    if key not in _COPY_BYTES:
        _COPY_BYTES[key] = _count_copy_bytes(config, settings)
    return _COPY_BYTES[key]


def _count_copy_bytes(config: MoEConfig, settings: TrainSettings) -> int:
    from flux_engine.models.moe import MoEForCausalLM
    from flux_engine.profiling import dense_weight_names, is_expert_stack

    b = dtype_bytes(settings.dtype)
    bits = settings.profile_bits or None
    dense_bits = settings.profile_dense_bits if bits is not None else None
    with torch.device("meta"):
        model = MoEForCausalLM(config)
    dense = dense_weight_names(model) if dense_bits is not None else set()
    total, seen = 0, set()
    for name, p in model.state_dict(keep_vars=True).items():
        if id(p) in seen:  # a tied LM head is the embedding
            continue
        seen.add(id(p))
        if is_expert_stack(name) and bits is not None:
            total += quantized_bytes(p.numel() // p.shape[-1], p.shape[-1], bits)
        elif name in dense:
            total += quantized_bytes(p.numel() // p.shape[-1], p.shape[-1], dense_bits)
        else:
            total += p.numel() * b
    return total


def merged_expert_bytes(config: MoEConfig, settings: TrainSettings) -> int:
    return expert_storage_bytes(config, settings.frozen_experts, settings.dtype)


def tuning_expert_terms(config: MoEConfig, settings: TrainSettings) -> Dict[str, int]:
    """Bytes per tuning expert, by term."""
    b = dtype_bytes(settings.dtype)
    n = expert_parameters(config)
    states = 2 if settings.optimizer == "adamw" else 0
    terms = OrderedDict(weights=n * b)
    if settings.lora:  # the base weights are frozen: stored like the merged experts
        terms["weights"] = merged_expert_bytes(config, settings)
        H, I, r = config.hidden_size, config.moe_intermediate_size, int(settings.lora_rank)
        n_lora = r * (2 * H + 3 * I)
        terms["lora_params_fp32"] = n_lora * 4
        terms["lora_grads_fp32"] = n_lora * 4
        terms["optimizer_state"] = n_lora * 4 * states
    else:
        terms["grads"] = n * b
        terms["master_fp32"] = n * 4 if b != 4 else 0
        terms["optimizer_state"] = n * 4 * states
    return terms


def activation_bytes(config: MoEConfig, settings: TrainSettings) -> int:
    """Activations kept for the backward pass of one ``batch x seq`` step (see the module docstring)."""
    c = config
    b = dtype_bytes(settings.dtype)
    H, D = c.hidden_size, c.head_dim
    attn = 2 * H + 2 * c.num_heads * D + 2 * c.num_kv_heads * D + H  # + residual
    shared = (H + 3 * c.shared_expert_intermediate_size) if c.shared_expert_intermediate_size else 0
    moe = H + c.num_experts * 4 / b + c.num_experts_per_tok * (H + 3 * c.moe_intermediate_size) + shared
    dense = H + 3 * c.intermediate_size
    per_layer = [attn + (moe if c.is_moe_layer(i) else dense) for i in range(c.num_layers)]
    if settings.activation_checkpointing:
        per_token = c.num_layers * H + max(per_layer)
    else:
        per_token = sum(per_layer)
    per_token_bytes = per_token * b + c.vocab_size * (b + 4)
    return int(math.ceil(settings.batch_size * settings.seq_len * per_token_bytes))


@dataclass
class BudgetPlan:
    """``B_tune`` tuning experts and ``B_non`` merged experts in total, with the memory breakdown behind them."""

    B_tune: int
    B_non: int
    budget_bytes: int
    breakdown: Dict[str, int]
    tuning_expert_bytes: int
    merged_expert_bytes: int
    tuning_terms: Dict[str, int] = field(default_factory=dict)
    arithmetic: List[str] = field(default_factory=list)  # how B_tune and B_non were chosen, with the numbers
    profile_phase: Dict[str, int] = field(default_factory=dict)  # the idle window's peak by term ({}: no profiling)

    @property
    def used_bytes(self) -> int:
        return sum(self.breakdown.values())

    def describe(self) -> str:
        lines = [f"memory budget {_human(self.budget_bytes)} ({self.budget_bytes} B)"]
        for name, value in self.breakdown.items():
            lines.append(f"  {name:<34} {_human(value):>12}  ({value} B)")
        lines.append(f"  {'total':<34} {_human(self.used_bytes):>12}  ({self.used_bytes} B)")
        lines.append(f"  {'free':<34} {_human(self.budget_bytes - self.used_bytes):>12}")
        per = ", ".join(f"{k} {_human(v)}" for k, v in self.tuning_terms.items())
        lines.append(f"  per tuning expert: {_human(self.tuning_expert_bytes)} ({per})")
        lines.append(f"  per merged expert: {_human(self.merged_expert_bytes)}")
        lines += [f"  {line}" for line in self.arithmetic]
        lines.append(f"  -> B_tune = {self.B_tune}, B_non = {self.B_non}")
        if self.profile_phase:
            peak = sum(self.profile_phase.values())
            lines.append(f"  profile phase (idle window, training state released): {_human(peak)} of the budget")
            lines += [f"    {name:<32} {_human(value):>12}" for name, value in self.profile_phase.items()]
        return "\n".join(lines)

    __str__ = describe


def memory_breakdown(config: MoEConfig, settings: TrainSettings, B_tune: int, B_non: int, budget_bytes: int = 0) -> Dict[str, int]:
    """Bytes of every term of the training phase for a given ``(B_tune, B_non)`` (the profiling copy is not one:
    module docstring)."""
    terms = tuning_expert_terms(config, settings)
    out = OrderedDict()
    out["non-expert weights"] = non_expert_parameters(config) * dtype_bytes(settings.dtype)
    stored = "" if settings.frozen_experts == "dtype" else f", {settings.frozen_experts}"
    out[f"merged experts ({B_non}{stored})"] = B_non * merged_expert_bytes(config, settings)
    mode = f"LoRA r={settings.lora_rank}" if settings.lora else "full"
    out[f"tuning experts ({B_tune}, weights)"] = B_tune * terms["weights"]
    out[f"tuning grads+optimizer ({mode}, {settings.optimizer})"] = B_tune * (sum(terms.values()) - terms["weights"])
    ckpt = ", checkpointed" if settings.activation_checkpointing else ""
    out[f"activations ({settings.batch_size}x{settings.seq_len}{ckpt})"] = activation_bytes(config, settings)
    out["workspace"] = int(settings.workspace_bytes + settings.workspace_fraction * budget_bytes)
    return out


def plan_budget(
    config: MoEConfig,
    budget_bytes: int,
    settings: Optional[TrainSettings] = None,
    min_tune: int = 1,
) -> BudgetPlan:
    """``B_tune`` and ``B_non`` for a client with ``budget_bytes`` of memory (split policy: module docstring)."""
    settings = settings or TrainSettings()
    L = len(config.moe_layer_indices)
    E = config.num_experts
    total_experts = L * E
    c_t = sum(tuning_expert_terms(config, settings).values())
    c_m = merged_expert_bytes(config, settings)
    fixed = memory_breakdown(config, settings, 0, 0, budget_bytes)
    fixed_bytes = sum(fixed.values())
    min_tune = min(max(int(min_tune), 0), total_experts)
    floor_merged = L if min_tune < total_experts else 0
    need = fixed_bytes + floor_merged * c_m + min_tune * c_t
    if budget_bytes < need:
        missing = need - budget_bytes
        detail = ", ".join(f"{k} {_human(v)}" for k, v in fixed.items() if v)
        raise BudgetError(
            f"memory budget {_human(budget_bytes)} is {missing} bytes ({_human(missing)}) short of the minimum "
            f"{_human(need)}: {detail}, {floor_merged} merged experts (one per MoE layer) x {_human(c_m)}, "
            f"{min_tune} tuning expert(s) x {_human(c_t)}",
            missing,
        )
    profile = profile_phase(config, settings, budget_bytes) if settings.profile_bits is not None else {}
    if sum(profile.values()) > budget_bytes:
        missing = sum(profile.values()) - budget_bytes
        detail = ", ".join(f"{k} {_human(v)}" for k, v in profile.items())
        raise BudgetError(f"memory budget {_human(budget_bytes)} is {missing} bytes ({_human(missing)}) short of the "
                          f"profile phase: {detail}", missing)  # fmt: skip
    R = budget_bytes - fixed_bytes
    if R >= total_experts * c_t:
        B_tune, B_non = total_experts, 0
        arithmetic = [f"room for experts {_human(R)} >= {total_experts} experts x {_human(c_t)}: every expert tunes"]
    else:
        spare = R - L * c_m
        B_tune = min(max(int(spare // c_t), min_tune), total_experts - 1)
        left = R - B_tune * c_t
        B_non = min(int(left // c_m), total_experts - B_tune)
        arithmetic = [
            f"room for experts = budget - fixed terms = {_human(budget_bytes)} - {_human(fixed_bytes)} = {_human(R)}",
            f"B_tune = floor((room - {L} merged x {_human(c_m)}) / {_human(c_t)} per tuning expert) = "
            f"floor({_human(spare)} / {_human(c_t)}) = {B_tune}",
            f"B_non = min(floor((room - B_tune x {_human(c_t)}) / {_human(c_m)}), {total_experts} - B_tune) = "
            f"min(floor({_human(left)} / {_human(c_m)}), {total_experts - B_tune}) = {B_non}",
        ]
    breakdown = memory_breakdown(config, settings, B_tune, B_non, budget_bytes)
    assert sum(breakdown.values()) <= budget_bytes, (breakdown, budget_bytes)
    return BudgetPlan(
        B_tune=B_tune,
        B_non=B_non,
        budget_bytes=int(budget_bytes),
        breakdown=breakdown,
        tuning_expert_bytes=c_t,
        merged_expert_bytes=c_m,
        tuning_terms=dict(tuning_expert_terms(config, settings)),
        arithmetic=arithmetic,
        profile_phase=profile,
    )


def profile_phase(config: MoEConfig, p: TrainSettings, budget_bytes: int) -> Dict[str, int]:
    """Peak bytes of the profile phase by term: the profiling copy (``p.profile_bits``, ``p.dtype`` for what is not
    quantised), one forward's activations without gradients (one layer's intermediates at a time for
    ``batch_size x seq_len`` tokens: the checkpointed ``activation_bytes`` less the kept layer inputs and logits),
    one MoE layer's expert stacks dequantised to ``p.dtype`` (the grouped MLP's reference tier dequantises a layer's
    stack at once) and the workspace."""
    one_layer = TrainSettings(dtype=p.dtype, batch_size=p.batch_size, seq_len=p.seq_len,
                              activation_checkpointing=True, lora_rank=None)  # fmt: skip
    # No LM head (profiling stops at the last MoE layer) and no kept layer inputs (no backward pass).
    tokens, pb = p.batch_size * p.seq_len, dtype_bytes(p.dtype)
    kept_inputs = tokens * (config.num_layers * config.hidden_size * pb + config.vocab_size * (pb + 4))
    fmt = f"int{p.profile_bits} experts" if p.profile_bits else "full precision"
    return OrderedDict([
        (f"profiling copy ({fmt})", profiling_copy_bytes(config, p)),
        (f"forward activations ({p.batch_size}x{p.seq_len}, one layer)", activation_bytes(config, one_layer) - kept_inputs),
        ("one MoE layer's experts dequantised", config.num_experts * expert_parameters(config) * pb),
        ("workspace", int(p.workspace_bytes + p.workspace_fraction * budget_bytes)),
    ])  # fmt: skip


def phase_peaks(
    config: MoEConfig,
    settings: TrainSettings,
    B_tune: int,
    B_non: int,
    budget_bytes: int,
    profile_settings: Optional[TrainSettings] = None,
) -> Dict[str, Dict[str, int]]:
    """Predicted peak bytes of each phase of a client's round, by term, for ``(B_tune, B_non)``.

    - ``profile``: ``profile_phase`` with ``profile_settings`` (the low-bit copy, in the idle window).
    - ``compact``: the compact model's weights (non-expert weights, ``B_tune + B_non`` experts in ``settings.dtype``)
      plus one MoE layer's unmerged experts (the merge streams one layer at a time) and the workspace.
    - ``train``: ``memory_breakdown`` (weights, LoRA state, activations, workspace).
    """
    b = dtype_bytes(settings.dtype)
    layer_experts = config.num_experts * expert_parameters(config)
    workspace = int(settings.workspace_bytes + settings.workspace_fraction * budget_bytes)
    out: Dict[str, Dict[str, int]] = OrderedDict()
    if profile_settings is not None:
        out["profile"] = profile_phase(config, profile_settings, budget_bytes)
    out["compact"] = OrderedDict([
        ("non-expert weights", non_expert_parameters(config) * b),
        (f"experts ({B_tune} tuning + {B_non} merged)", (B_tune + B_non) * expert_parameters(config) * b),
        ("one MoE layer's unmerged experts", layer_experts * b),
        ("workspace", workspace),
    ])  # fmt: skip
    out["train"] = memory_breakdown(config, settings, B_tune, B_non, budget_bytes)
    return out
