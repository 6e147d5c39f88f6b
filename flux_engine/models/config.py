"""MoEConfig: one config for every decoder the runtime builds (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-MoE,
LLaMA-MoE and the SmolLM2-derived presets)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

SCORINGS = ("softmax", "sigmoid", "ones")
QK_NORMS = ("none", "head", "full")
ROUTER_TYPES = ("linear", "tanh_mlp")


@dataclass
class MoEConfig:
    """Shapes and switches of a decoder-only MoE LM (see FLUX_DESIGN.md section 2).

    MoE layers are ``moe_layers`` (indices; None = every layer); the others use a dense SwiGLU MLP of
    ``intermediate_size``. Each MoE layer has a router over ``num_experts`` original experts and
    ``physical_experts[i]`` expert weight stacks (fewer after merging; the ``expert_map`` buffer of the
    layer maps original ids onto them).
    """

    vocab_size: int = 32000
    hidden_size: int = 512
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 8
    head_dim: Optional[int] = None
    intermediate_size: int = 1408
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: str = "none"  # "head": per-head RMSNorm (Qwen3); "full": over all heads (OLMoE)
    clip_qkv: Optional[float] = None
    sliding_window: Optional[int] = None
    # Routed experts.
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 512
    moe_layers: Optional[List[int]] = None
    physical_experts: Optional[List[int]] = None  # per MoE layer; None = num_experts everywhere
    # "linear": logits = W x (W: [E, H]); "tanh_mlp": LLaMA-MoE's gate network, logits = W2 tanh(W1 x) with
    # W1: [E, H], W2: [E, E] (see moe.TanhMLPRouter).
    router_type: str = "linear"
    # "ones": the router picks the top-k experts but each is weighted 1 (times routed_scaling_factor), so a
    # neuron split with k = E sums back to the dense FFN exactly; the router then learns from the aux loss only.
    scoring: str = "softmax"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    router_aux_loss_coef: float = 0.0
    # Shared experts: one always-on SwiGLU MLP of shared_expert_intermediate_size (0 = none).
    shared_expert_intermediate_size: int = 0
    shared_expert_gate: bool = False
    # Free-form provenance (source model type, preset name, construction recipe).
    metadata: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if self.router_type not in ROUTER_TYPES:
            raise ValueError(f"router_type must be one of {ROUTER_TYPES}, got {self.router_type!r}")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must lie in [1, num_experts={self.num_experts}]")
        if self.moe_layers is not None:
            self.moe_layers = sorted(int(i) for i in self.moe_layers)
            bad = [i for i in self.moe_layers if not 0 <= i < self.num_layers]
            if bad:
                raise ValueError(f"moe_layers {bad} are outside [0, num_layers={self.num_layers})")
        if self.physical_experts is not None:
            self.physical_experts = [int(e) for e in self.physical_experts]
            if len(self.physical_experts) != len(self.moe_layer_indices):
                raise ValueError(
                    f"physical_experts has {len(self.physical_experts)} entries for {len(self.moe_layer_indices)} MoE layers"
                )
            if any(not 1 <= e <= self.num_experts for e in self.physical_experts):
                raise ValueError(f"physical_experts {self.physical_experts} must lie in [1, num_experts={self.num_experts}]")

    @property
    def moe_layer_indices(self) -> List[int]:
        return list(range(self.num_layers)) if self.moe_layers is None else list(self.moe_layers)

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe_layers is None or layer in self.moe_layers

    def physical_experts_of(self, layer: int) -> int:
        """Physical expert stacks of MoE layer ``layer`` (a decoder-layer index)."""
        if self.physical_experts is None:
            return self.num_experts
        return self.physical_experts[self.moe_layer_indices.index(layer)]

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "MoEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MoEConfig keys: {', '.join(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> "MoEConfig":
        return dataclasses.replace(self, **changes)

    def with_physical_experts(self, counts: Sequence[int]) -> "MoEConfig":
        return self.replace(physical_experts=list(counts))
