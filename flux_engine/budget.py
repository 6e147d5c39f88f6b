"""Client memory budgets: how many tuning experts (``B_tune``) and merged non-tuning experts (``B_non``) fit.

The memory model (bytes, all terms printed by ``BudgetPlan.describe()``):

- **non-expert weights**: every parameter except the routed experts (embeddings, LM head unless tied, attention,
  norms, routers, dense MLPs, shared experts), in the weight dtype. Counted exactly from a meta-device model.
- **merged experts**: ``B_non`` frozen experts of ``3 * H * I`` weights each, in the weight dtype.
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

Split policy (``tune_fraction``, default 0.5): after the fixed terms (non-expert weights, activations, workspace)
and one merged expert per MoE layer are reserved, ``tune_fraction`` of what remains goes to tuning experts and the
rest to merged experts. When the merged experts would exceed the experts left (``L * E - B_tune``, i.e. nothing
needs merging) the surplus goes to more tuning experts. A budget that cannot hold the fixed terms plus one merged
expert per layer plus ``min_tune`` tuning experts raises ``BudgetError`` naming the missing bytes.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, Optional, Union

import torch

from flux_engine.models.config import MoEConfig

MiB = 1 << 20
_DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2, "float64": 8}
OPTIMIZERS = ("adamw", "sgd")


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

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        dtype_bytes(self.dtype)
        if self.batch_size < 1 or self.seq_len < 1:
            raise ValueError("batch_size and seq_len must be >= 1")

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
    """Weights of one routed expert: ``3 * H * I``."""
    return 3 * config.hidden_size * config.moe_intermediate_size


def merged_expert_bytes(config: MoEConfig, settings: TrainSettings) -> int:
    return expert_parameters(config) * dtype_bytes(settings.dtype)


def tuning_expert_terms(config: MoEConfig, settings: TrainSettings) -> Dict[str, int]:
    """Bytes per tuning expert, by term."""
    b = dtype_bytes(settings.dtype)
    n = expert_parameters(config)
    states = 2 if settings.optimizer == "adamw" else 0
    terms = OrderedDict(weights=n * b)
    if settings.lora:
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
        lines.append(f"  -> B_tune = {self.B_tune}, B_non = {self.B_non}")
        return "\n".join(lines)

    __str__ = describe


def memory_breakdown(config: MoEConfig, settings: TrainSettings, B_tune: int, B_non: int, budget_bytes: int = 0) -> Dict[str, int]:
    """Bytes of every term for a given ``(B_tune, B_non)``."""
    terms = tuning_expert_terms(config, settings)
    out = OrderedDict()
    out["non-expert weights"] = non_expert_parameters(config) * dtype_bytes(settings.dtype)
    out[f"merged experts ({B_non})"] = B_non * merged_expert_bytes(config, settings)
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
    tune_fraction: float = 0.5,
    min_tune: int = 1,
) -> BudgetPlan:
    """``B_tune`` and ``B_non`` for a client with ``budget_bytes`` of memory (split policy: module docstring)."""
    settings = settings or TrainSettings()
    if not 0.0 <= tune_fraction <= 1.0:
        raise ValueError(f"tune_fraction must lie in [0, 1], got {tune_fraction}")
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
    R = budget_bytes - fixed_bytes
    spare = R - floor_merged * c_m  # what is left after one merged expert per layer
    B_tune = int(tune_fraction * spare // c_t) if c_t else total_experts
    B_tune = min(max(B_tune, min_tune), total_experts, int(spare // c_t) if c_t else total_experts)
    B_non = int((R - B_tune * c_t) // c_m) if c_m else total_experts
    if B_non >= total_experts - B_tune:
        # Nothing needs merging: every non-tuning expert fits as itself. Spend the surplus on tuning experts.
        if c_t > c_m:
            extra = int((R - total_experts * c_m) // (c_t - c_m))
        else:
            extra = total_experts
        B_tune = max(B_tune, min(extra, total_experts))
        B_non = total_experts - B_tune
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
    )
