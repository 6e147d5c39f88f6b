"""MoEConfig: one config for every decoder the runtime builds (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-MoE,
LLaMA-MoE, gpt-oss and the SmolLM2-derived presets)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from flux_engine.ops.expert_form import ExpertForm

SCORINGS = ("softmax", "sigmoid", "ones")
QK_NORMS = ("none", "head", "full")
ROUTER_TYPES = ("linear", "tanh_mlp")
LAYER_TYPES = ("full_attention", "sliding_attention")
ROPE_TYPES = ("default", "yarn")
# YaRN parameters (transformers' ``rope_parameters`` names): required, then optional with their defaults.
YARN_REQUIRED = ("factor", "original_max_position_embeddings")
YARN_DEFAULTS = {"beta_fast": 32.0, "beta_slow": 1.0, "truncate": True, "attention_factor": None}


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
    # Per layer "full_attention" | "sliding_attention" (gpt-oss alternates them); None: every layer attends
    # within ``sliding_window`` when it is set.
    layer_types: Optional[List[str]] = None
    attention_output_bias: bool = False  # o_proj bias (gpt-oss); ``attention_bias`` is q/k/v only
    # One learned logit per query head that joins each softmax with a zero value (gpt-oss "sinks"): attention
    # mass a head may put nowhere.
    attention_sinks: bool = False
    # RoPE frequency scaling: None (plain RoPE) or {"rope_type": "yarn", "factor", "original_max_position_embeddings",
    # optional "beta_fast", "beta_slow", "truncate", "attention_factor"} (YaRN as transformers computes it).
    rope_scaling: Optional[Dict[str, Any]] = None
    # Routed experts.
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 512
    moe_layers: Optional[List[int]] = None
    physical_experts: Optional[List[int]] = None  # per MoE layer; None = num_experts everywhere
    # "linear": logits = W x (W: [E, H]); "tanh_mlp": LLaMA-MoE's gate network, logits = W2 tanh(W1 x) with
    # W1: [E, H], W2: [E, E] (see moe.TanhMLPRouter).
    router_type: str = "linear"
    router_bias: bool = False  # a linear router with a bias (gpt-oss)
    # "ones": the router picks the top-k experts but each is weighted 1 (times routed_scaling_factor), so a
    # neuron split with k = E sums back to the dense FFN exactly; the router then learns from the aux loss only.
    scoring: str = "softmax"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    router_aux_loss_coef: float = 0.0
    # Expert form: biases on gate_up and down (gpt-oss), gate/up rows interleaved (gpt-oss: row 2i gate i, 2i+1 up
    # i), and the clamped SwiGLU ``(up + 1) * gate * sigmoid(alpha * gate)`` with gate <= limit, |up| <= limit when
    # ``swiglu_limit`` is set (see ``flux_engine.ops.ExpertForm``).
    expert_bias: bool = False
    expert_interleaved: bool = False
    swiglu_limit: Optional[float] = None
    swiglu_alpha: float = 1.702
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
        if self.layer_types is not None:
            self.layer_types = [str(t) for t in self.layer_types]
            if len(self.layer_types) != self.num_layers or set(self.layer_types) - set(LAYER_TYPES):
                raise ValueError(
                    f"layer_types must hold num_layers={self.num_layers} entries of {LAYER_TYPES}, got {self.layer_types}"
                )
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError("layer_types has sliding_attention layers but sliding_window is None")
        if self.rope_scaling is not None:
            self.rope_scaling = _check_rope_scaling(self.rope_scaling)
        if self.router_bias and self.router_type != "linear":
            raise ValueError(f"router_bias needs router_type='linear', got {self.router_type!r}")
        self.expert_form  # validates the expert form fields (ExpertForm raises with the field named)

    @property
    def moe_layer_indices(self) -> List[int]:
        return list(range(self.num_layers)) if self.moe_layers is None else list(self.moe_layers)

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe_layers is None or layer in self.moe_layers

    def layer_window(self, layer: int) -> Optional[int]:
        """The sliding window of decoder layer ``layer`` (None: full causal attention)."""
        if self.layer_types is not None and self.layer_types[layer] == "full_attention":
            return None
        return self.sliding_window

    @property
    def expert_form(self) -> ExpertForm:
        """What the routed experts compute between gate_up and down (``flux_engine.ops.ExpertForm``)."""
        return ExpertForm(interleaved=self.expert_interleaved, limit=self.swiglu_limit, alpha=self.swiglu_alpha)

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


def _check_rope_scaling(params: Dict[str, Any]) -> Dict[str, Any]:
    """``rope_scaling`` completed with YaRN's defaults, or a ValueError naming the bad key."""
    if not isinstance(params, dict):
        raise ValueError(f"rope_scaling must be a dict or None, got {params!r}")
    rope_type = params.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_scaling.rope_type must be one of {ROPE_TYPES}, got {rope_type!r}")
    if rope_type == "default":
        return {"rope_type": "default"}
    unknown = sorted(set(params) - {"rope_type", *YARN_REQUIRED, *YARN_DEFAULTS})
    if unknown:
        raise ValueError(f"rope_scaling: unknown YaRN keys {unknown}")
    missing = [k for k in YARN_REQUIRED if params.get(k) is None]
    if missing:
        raise ValueError(f"rope_scaling: YaRN needs {missing}")
    out = {"rope_type": "yarn", **YARN_DEFAULTS, **{k: v for k, v in params.items() if v is not None}}
    for key in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow"):
        if not isinstance(out[key], (int, float)) or isinstance(out[key], bool) or not out[key] > 0:
            raise ValueError(f"rope_scaling.{key}={out[key]!r} must be a positive number")
    if out["attention_factor"] is not None and not out["attention_factor"] > 0:
        raise ValueError(f"rope_scaling.attention_factor={out['attention_factor']!r} must be positive or None")
    if not isinstance(out["truncate"], bool):
        raise ValueError(f"rope_scaling.truncate={out['truncate']!r} must be true or false")
    return out
