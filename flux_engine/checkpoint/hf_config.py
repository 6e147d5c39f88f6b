"""config.json <-> MoEConfig for each supported ``model_type``.

Each layout has a reader (``*_from_hf``: the config dict its own modelling code would see -> MoEConfig, refusing
what MoEConfig cannot express) and a writer (``*_to_hf``: the config keys that reader needs). Writers only emit
keys; the caller merges them over the source config and checks that reading the result back gives the same
MoEConfig, so a feature a layout cannot carry is an error at save time rather than a silently different model.

Behaviour read from each family's modelling code:

* mixtral: every layer MoE, experts of ``intermediate_size``, softmax then top-k renormalised.
* qwen2_moe / qwen3_moe: MoE where ``i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0``;
  ``norm_topk_prob``; qwen2_moe always has a sigmoid-gated shared expert and q/k/v biases (``qkv_bias``, True
  before transformers v5 had the key); qwen3_moe has per-head q/k RMSNorm.
* olmoe: every layer MoE, experts of ``intermediate_size``, q/k RMSNorm over all heads, optional ``clip_qkv``.
* deepseek (deepseek-moe-16b, remote code ``modeling_deepseek.py``): MoE where ``i >= first_k_dense_replace and
  i % moe_layer_freq == 0``; ``n_shared_experts`` shared experts fused into one ungated MLP of
  ``n_shared_experts * moe_intermediate_size``; softmax scoring only; renormalises only when ``k > 1``.
* gpt_oss: see ``gpt_oss_from_hf``.
* llama_moe (LLaMA-MoE, remote code ``modeling_llama_moe_hf.py``): every layer MoE; gate network ``mlp``
  (Linear(H, E) -> tanh -> Linear(E, E)) or ``linear``; top-k on the logits, weights = softmax over the k
  selected logits (= softmax over all, renormalised), times ``score_scale_factor``; noise only in training;
  RoPE base fixed at 10000 whatever the config says.

Auxiliary losses map onto ``router_aux_loss_coef`` (a Switch-style loss averaged over layers, added in training
only): transformers' coefficient when ``output_router_logits`` is set (transformers adds the loss only then),
DeepSeek's ``aux_loss_alpha`` (it uses a sequence-level variant) and LLaMA-MoE's ``gate_balance_loss_weight``
(it uses a squared-coefficient-of-variation loss): same role, not the same formula.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

from flux_engine.checkpoint.errors import CheckpointError
from flux_engine.models import MoEConfig

Json = Dict[str, Any]


# MoEConfig fields by the values a config may give them (None allowed where the field is Optional).
_POSITIVE_INTS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                  "max_position_embeddings", "num_experts", "num_experts_per_tok", "moe_intermediate_size")  # fmt: skip
_OPTIONAL_POSITIVE_INTS = ("head_dim", "sliding_window")
_POSITIVE_FLOATS = ("rms_norm_eps", "rope_theta", "swiglu_alpha")
_BOOLS = ("tie_word_embeddings", "attention_bias", "norm_topk_prob", "shared_expert_gate", "attention_output_bias",
          "attention_sinks", "router_bias", "expert_bias", "expert_interleaved")  # fmt: skip
_INT_LISTS = ("moe_layers", "physical_experts")


def _check_fields(fields: Json) -> None:
    """Types and ranges of the MoEConfig fields a config gives, before any arithmetic on them (a string or a
    negative size would otherwise surface as a torch traceback when the model is built)."""

    def bad(name: str, what: str) -> CheckpointError:
        return CheckpointError(f"config key {name}={fields[name]!r} must be {what}")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_number(v: Any) -> bool:
        return (is_int(v) or isinstance(v, float)) and math.isfinite(v)

    for name, value in fields.items():
        if name in _POSITIVE_INTS or (name in _OPTIONAL_POSITIVE_INTS and value is not None):
            if not (is_int(value) and value >= 1):
                raise bad(name, "a positive int")
        elif name == "shared_expert_intermediate_size" and not (is_int(value) and value >= 0):
            raise bad(name, "an int >= 0")
        elif name in _POSITIVE_FLOATS and not (is_number(value) and value > 0):
            raise bad(name, "a positive number")
        elif name in ("clip_qkv", "swiglu_limit") and value is not None and not (is_number(value) and value > 0):
            raise bad(name, "a positive number or null")
        elif name in ("routed_scaling_factor", "router_aux_loss_coef") and not (is_number(value) and value >= 0):
            raise bad(name, "a finite number >= 0")
        elif name in _BOOLS and not isinstance(value, bool):
            raise bad(name, "true or false")
        elif name in _INT_LISTS and value is not None and not (
            isinstance(value, list) and all(is_int(v) for v in value)
        ):
            raise bad(name, "a list of ints or null")


def _build(**fields: Any) -> MoEConfig:
    """``MoEConfig(**fields)`` once ``_check_fields`` passes."""
    _check_fields(fields)
    return MoEConfig(**fields)


def _require(cfg: Json, *names: str) -> Any:
    """The first of ``names`` present (several spellings of one key)."""
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    raise CheckpointError(f"missing config key {names[0]!r}")


def _refuse(cfg: Json, key: str, supported: Any, default: Any) -> None:
    value = cfg.get(key, default)
    if value != supported:
        raise CheckpointError(f"config key {key}={value!r} is not supported (only {supported!r})")


def _rope_type(cfg: Json) -> str:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    return params.get("rope_type", params.get("type")) or scaling.get("rope_type", scaling.get("type")) or "default"


def _rope_theta(cfg: Json, default: float, allowed: Tuple[str, ...] = ("default",)) -> float:
    """RoPE of a type in ``allowed`` (plain RoPE unless a family says more); transformers v5 keeps theta in
    ``rope_parameters``, older configs in ``rope_theta``."""
    rope_type = _rope_type(cfg)
    if rope_type not in allowed:
        raise CheckpointError(f"config key rope_type={rope_type!r} is not supported (only {', '.join(allowed)})")
    params = cfg.get("rope_parameters") or {}
    return float(params.get("rope_theta") or cfg.get("rope_theta") or default)


def _yarn_from_hf(cfg: Json) -> Optional[Json]:
    """``MoEConfig.rope_scaling`` of a YaRN config (v5 ``rope_parameters`` or older ``rope_scaling``), else None."""
    if _rope_type(cfg) != "yarn":
        return None
    params = {**(cfg.get("rope_scaling") or {}), **(cfg.get("rope_parameters") or {})}
    params.pop("type", None)
    params.pop("rope_theta", None)
    params["rope_type"] = "yarn"
    return params


def _backbone_from_hf(
    cfg: Json, default_rope_theta: float, reads_head_dim: bool = True, rope_types: Tuple[str, ...] = ("default",)
) -> Json:
    """The MoEConfig fields every family reads alike: embeddings, attention shapes, norms, RoPE."""
    _refuse(cfg, "hidden_act", "silu", "silu")
    num_heads = _require(cfg, "num_attention_heads")
    return dict(
        vocab_size=_require(cfg, "vocab_size"),
        hidden_size=_require(cfg, "hidden_size"),
        num_layers=_require(cfg, "num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=cfg.get("head_dim") if reads_head_dim else None,
        rms_norm_eps=_require(cfg, "rms_norm_eps"),
        rope_theta=_rope_theta(cfg, default_rope_theta, rope_types),
        max_position_embeddings=cfg.get("max_position_embeddings", MoEConfig.max_position_embeddings),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
    )


def _backbone_to_hf(c: MoEConfig) -> Json:
    # RoPE both ways: transformers v5 reads rope_parameters, the remote-code families rope_theta/rope_scaling.
    return {
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": c.rms_norm_eps,
        "rope_parameters": {"rope_theta": c.rope_theta, "rope_type": "default"},
        "rope_theta": c.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
    }


def _aux_from_hf(cfg: Json, default: float) -> float:
    return float(cfg.get("router_aux_loss_coef", default)) if cfg.get("output_router_logits", False) else 0.0


def _aux_to_hf(c: MoEConfig) -> Json:
    out: Json = {"output_router_logits": c.router_aux_loss_coef > 0}
    if c.router_aux_loss_coef > 0:
        out["router_aux_loss_coef"] = c.router_aux_loss_coef
    return out


def _no_output_bias(cfg: Json) -> None:
    # These families put the bias on o_proj too; MoEConfig.attention_bias covers q/k/v only.
    _refuse(cfg, "attention_bias", False, False)


def _moe_layers(indices: Sequence[int], num_layers: int) -> Optional[List[int]]:
    return None if list(indices) == list(range(num_layers)) else list(indices)


# -- mixtral ---------------------------------------------------------------------------------------------------


def mixtral_from_hf(cfg: Json) -> MoEConfig:
    size = _require(cfg, "intermediate_size")
    return _build(
        **_backbone_from_hf(cfg, default_rope_theta=1e6),
        intermediate_size=size,
        moe_intermediate_size=size,
        num_experts=_require(cfg, "num_local_experts", "num_experts"),
        num_experts_per_tok=_require(cfg, "num_experts_per_tok"),
        sliding_window=cfg.get("sliding_window"),
        norm_topk_prob=True,
        router_aux_loss_coef=_aux_from_hf(cfg, 0.001),
    )


def mixtral_to_hf(c: MoEConfig) -> Json:
    return {
        **_backbone_to_hf(c),
        "intermediate_size": c.moe_intermediate_size,
        "num_local_experts": c.num_experts,
        "num_experts_per_tok": c.num_experts_per_tok,
        "sliding_window": c.sliding_window,
        **_aux_to_hf(c),
    }


# -- qwen2_moe / qwen3_moe -------------------------------------------------------------------------------------


def _qwen_moe_layers(cfg: Json, num_layers: int) -> Optional[List[int]]:
    dense = set(cfg.get("mlp_only_layers") or [])
    step = cfg.get("decoder_sparse_step", 1)
    return _moe_layers([i for i in range(num_layers) if i not in dense and (i + 1) % step == 0], num_layers)


def _qwen_moe_layers_to_hf(c: MoEConfig) -> Json:
    return {"decoder_sparse_step": 1, "mlp_only_layers": [i for i in range(c.num_layers) if not c.is_moe_layer(i)]}


def _qwen_moe_common(cfg: Json) -> Json:
    fields = _backbone_from_hf(cfg, default_rope_theta=10000.0)
    return dict(
        fields,
        intermediate_size=_require(cfg, "intermediate_size"),
        moe_intermediate_size=_require(cfg, "moe_intermediate_size"),
        num_experts=_require(cfg, "num_experts", "num_local_experts"),
        num_experts_per_tok=_require(cfg, "num_experts_per_tok"),
        moe_layers=_qwen_moe_layers(cfg, fields["num_layers"]),
        norm_topk_prob=cfg.get("norm_topk_prob", False),
        router_aux_loss_coef=_aux_from_hf(cfg, 0.001),
    )


def _qwen_moe_common_to_hf(c: MoEConfig) -> Json:
    return {
        **_backbone_to_hf(c),
        "intermediate_size": c.intermediate_size,
        "moe_intermediate_size": c.moe_intermediate_size,
        "num_experts": c.num_experts,
        "num_experts_per_tok": c.num_experts_per_tok,
        "norm_topk_prob": c.norm_topk_prob,
        **_qwen_moe_layers_to_hf(c),
        **_aux_to_hf(c),
    }


def _qwen2_sliding_window(cfg: Json, num_layers: int) -> Optional[int]:
    if not cfg.get("use_sliding_window", False):
        return None
    # transformers derives layer_types when absent: sliding on even layers below max_window_layers.
    types = cfg.get("layer_types") or [
        "sliding_attention" if i % 2 == 0 and i < cfg.get("max_window_layers", 28) else "full_attention"
        for i in range(num_layers)
    ]
    sliding = sum(t == "sliding_attention" for t in types)
    if sliding == 0:
        return None
    if sliding < num_layers:
        raise CheckpointError("config key layer_types: sliding-window attention on only some layers is not supported")
    return _require(cfg, "sliding_window")


def qwen2_moe_from_hf(cfg: Json) -> MoEConfig:
    fields = _qwen_moe_common(cfg)
    return _build(
        **fields,
        attention_bias=cfg.get("qkv_bias", True),
        sliding_window=_qwen2_sliding_window(cfg, fields["num_layers"]),
        shared_expert_intermediate_size=_require(cfg, "shared_expert_intermediate_size"),
        shared_expert_gate=True,
    )


def qwen2_moe_to_hf(c: MoEConfig) -> Json:
    window = c.sliding_window
    return {
        **_qwen_moe_common_to_hf(c),
        "qkv_bias": c.attention_bias,
        "shared_expert_intermediate_size": c.shared_expert_intermediate_size,
        "use_sliding_window": window is not None,
        "sliding_window": window,
        "max_window_layers": c.num_layers,
        "layer_types": ["sliding_attention" if window is not None else "full_attention"] * c.num_layers,
    }


def qwen3_moe_from_hf(cfg: Json) -> MoEConfig:
    _no_output_bias(cfg)
    return _build(
        **_qwen_moe_common(cfg),
        qk_norm="head",
        sliding_window=_require(cfg, "sliding_window") if cfg.get("use_sliding_window", False) else None,
    )


def qwen3_moe_to_hf(c: MoEConfig) -> Json:
    return {
        **_qwen_moe_common_to_hf(c),
        "attention_bias": c.attention_bias,
        "use_sliding_window": c.sliding_window is not None,
        "sliding_window": c.sliding_window,
    }


# -- olmoe -----------------------------------------------------------------------------------------------------


def olmoe_from_hf(cfg: Json) -> MoEConfig:
    _no_output_bias(cfg)
    size = _require(cfg, "intermediate_size")
    return _build(
        **_backbone_from_hf(cfg, default_rope_theta=10000.0),
        qk_norm="full",
        clip_qkv=cfg.get("clip_qkv"),
        intermediate_size=size,
        moe_intermediate_size=size,
        num_experts=_require(cfg, "num_experts", "num_local_experts"),
        num_experts_per_tok=_require(cfg, "num_experts_per_tok"),
        norm_topk_prob=cfg.get("norm_topk_prob", False),
        router_aux_loss_coef=_aux_from_hf(cfg, 0.01),
    )


def olmoe_to_hf(c: MoEConfig) -> Json:
    return {
        **_backbone_to_hf(c),
        "attention_bias": c.attention_bias,
        "clip_qkv": c.clip_qkv,
        "intermediate_size": c.moe_intermediate_size,
        "num_experts": c.num_experts,
        "num_experts_per_tok": c.num_experts_per_tok,
        "norm_topk_prob": c.norm_topk_prob,
        **_aux_to_hf(c),
    }


# -- deepseek (deepseek-moe-16b) -------------------------------------------------------------------------------


def deepseek_from_hf(cfg: Json) -> MoEConfig:
    _no_output_bias(cfg)
    _refuse(cfg, "scoring_func", "softmax", "softmax")
    fields = _backbone_from_hf(cfg, default_rope_theta=10000.0, reads_head_dim=False)
    num_layers, k = fields["num_layers"], _require(cfg, "num_experts_per_tok")
    first_dense, freq = cfg.get("first_k_dense_replace", 0), cfg.get("moe_layer_freq", 1)
    moe_intermediate = _require(cfg, "moe_intermediate_size")
    return _build(
        **fields,
        intermediate_size=_require(cfg, "intermediate_size"),
        moe_intermediate_size=moe_intermediate,
        num_experts=_require(cfg, "n_routed_experts"),
        num_experts_per_tok=k,
        moe_layers=_moe_layers([i for i in range(num_layers) if i >= first_dense and i % freq == 0], num_layers),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)) and k > 1,
        shared_expert_intermediate_size=moe_intermediate * (cfg.get("n_shared_experts") or 0),
        router_aux_loss_coef=float(cfg.get("aux_loss_alpha", 0.001)),
    )


def _deepseek_layer_rule(c: MoEConfig) -> Tuple[int, int]:
    """``(first_k_dense_replace, moe_layer_freq)`` selecting exactly the MoE layers of ``c``."""
    wanted = c.moe_layer_indices
    for freq in range(1, c.num_layers + 1):
        for first in range(c.num_layers + 1):
            if [i for i in range(c.num_layers) if i >= first and i % freq == 0] == wanted:
                return first, freq
    raise CheckpointError(f"MoE layers {wanted} cannot be written as first_k_dense_replace/moe_layer_freq")


def deepseek_to_hf(c: MoEConfig) -> Json:
    first_dense, freq = _deepseek_layer_rule(c)
    return {
        **_backbone_to_hf(c),
        "attention_bias": c.attention_bias,
        "intermediate_size": c.intermediate_size,
        "moe_intermediate_size": c.moe_intermediate_size,
        "n_routed_experts": c.num_experts,
        "n_shared_experts": c.shared_expert_intermediate_size // c.moe_intermediate_size or None,
        "num_experts_per_tok": c.num_experts_per_tok,
        "first_k_dense_replace": first_dense,
        "moe_layer_freq": freq,
        "norm_topk_prob": c.norm_topk_prob,
        "scoring_func": c.scoring,
        "aux_loss_alpha": c.router_aux_loss_coef,
    }


# -- llama_moe (LLaMA-MoE v1) ----------------------------------------------------------------------------------


def _llama_moe_expert_size(cfg: Json, num_experts: int, num_layers: int) -> int:
    total = _require(cfg, "intermediate_size")
    sizes = cfg.get("size_experts")
    if sizes is None:
        return total // num_experts
    distinct = {int(size) for layer in sizes for size in layer}
    if len(sizes) != num_layers or len(distinct) != 1:
        raise CheckpointError("config key size_experts: experts of different sizes are not supported")
    return distinct.pop()


def _llama_moe_scale(cfg: Json) -> float:
    scale = cfg.get("score_scale_factor", 1.0)
    if isinstance(scale, list):
        if len(set(scale)) != 1:
            raise CheckpointError("config key score_scale_factor: a different factor per layer is not supported")
        scale = scale[0]
    return float(scale)


def llama_moe_from_hf(cfg: Json) -> MoEConfig:
    _refuse(cfg, "gate_type", "TopKBalancedNoisyGate", "TopKBalancedNoisyGate")
    _refuse(cfg, "calculator_type", "UniversalCalculator", "UniversalCalculator")
    _refuse(cfg, "add_weight_norm", False, False)
    gate_network = cfg.get("gate_network", "mlp")
    if gate_network not in ("mlp", "linear"):
        raise CheckpointError(f"config key gate_network={gate_network!r} is not supported (only 'mlp' or 'linear')")
    weighted = cfg.get("multiply_gate_scores", True)
    if weighted:
        # Unweighted routing never looks at the scores, so gate_use_softmax only matters here.
        _refuse(cfg, "gate_use_softmax", True, True)
    fields = _backbone_from_hf(cfg, default_rope_theta=10000.0, reads_head_dim=False)
    fields["rope_theta"] = 10000.0  # LLaMA-MoE's rotary embedding is built without the config's theta
    num_experts = _require(cfg, "num_experts")
    return _build(
        **fields,
        intermediate_size=_require(cfg, "intermediate_size"),
        moe_intermediate_size=_llama_moe_expert_size(cfg, num_experts, fields["num_layers"]),
        num_experts=num_experts,
        num_experts_per_tok=_require(cfg, "num_selects"),
        router_type="tanh_mlp" if gate_network == "mlp" else "linear",
        # Softmax over the k selected logits equals the softmax over all E renormalised over the k.
        scoring="softmax" if weighted else "ones",
        norm_topk_prob=True,
        routed_scaling_factor=_llama_moe_scale(cfg) if weighted else 1.0,
        router_aux_loss_coef=float(cfg.get("gate_balance_loss_weight", 1e-2)) if cfg.get("gate_use_balance", True) else 0.0,
    )


def llama_moe_to_hf(c: MoEConfig) -> Json:
    out = {
        **_backbone_to_hf(c),
        "intermediate_size": c.num_experts * c.moe_intermediate_size,
        "num_experts": c.num_experts,
        "num_selects": c.num_experts_per_tok,
        "size_experts": [[c.moe_intermediate_size] * c.num_experts for _ in range(c.num_layers)],
        "gate_type": "TopKBalancedNoisyGate",
        "gate_network": "mlp" if c.router_type == "tanh_mlp" else "linear",
        "gate_use_softmax": True,
        # The noise weights are not kept (they only perturb training), so the saved gate has none.
        "gate_add_noise": False,
        "gate_use_balance": c.router_aux_loss_coef > 0,
        "calculator_type": "UniversalCalculator",
        "multiply_gate_scores": c.scoring != "ones",
        "score_scale_factor": c.routed_scaling_factor,
        "add_weight_norm": False,
    }
    if c.router_aux_loss_coef > 0:
        out["gate_balance_loss_weight"] = c.router_aux_loss_coef
    return out


# -- flux_moe (native) -----------------------------------------------------------------------------------------

NATIVE_RESERVED = ("model_type", "architectures", "dtype")
# Keys a flux_moe config.json must have (save_pretrained writes every field): their defaults would silently build a
# different model. The others default to "feature off" (the value configs written before the feature existed meant).
NATIVE_REQUIRED = (*_POSITIVE_INTS, *_POSITIVE_FLOATS, "tie_word_embeddings", "scoring", "norm_topk_prob",
                   "routed_scaling_factor")  # fmt: skip


def flux_from_json(cfg: Json) -> MoEConfig:
    missing = [k for k in NATIVE_REQUIRED if k not in cfg]
    if missing:
        raise CheckpointError(f"missing config key {missing[0]!r}" + (f" (and {missing[1:]})" if missing[1:] else ""))
    fields = {k: v for k, v in cfg.items() if k not in NATIVE_RESERVED}
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(MoEConfig)})
    if unknown:
        raise CheckpointError(f"unknown config keys for flux_moe: {', '.join(unknown)}")
    return _build(**fields)


def flux_to_json(c: MoEConfig) -> Json:
    return c.to_dict()


# -- gpt_oss ---------------------------------------------------------------------------------------------------


def gpt_oss_from_hf(cfg: Json) -> MoEConfig:
    """gpt-oss (transformers ``modeling_gpt_oss.py``): every layer MoE, experts of ``intermediate_size`` with
    biases, interleaved gate/up and the clamped SwiGLU (``swiglu_limit``, ``swiglu_alpha``); a router with a bias,
    softmax over the top-k logits (= softmax renormalised over the top k); q/k/v/o biases (``attention_bias``), a
    learned sink per head, ``layer_types`` alternating sliding-window and full attention; YaRN RoPE."""
    fields = _backbone_from_hf(cfg, default_rope_theta=150000.0, rope_types=("default", "yarn"))
    num_layers = fields["num_layers"]
    types = cfg.get("layer_types") or [
        "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)
    ]
    bias = cfg.get("attention_bias", True)
    size = _require(cfg, "intermediate_size")
    return _build(
        **fields,
        intermediate_size=size,
        moe_intermediate_size=size,
        num_experts=_require(cfg, "num_local_experts", "num_experts"),
        num_experts_per_tok=_require(cfg, "num_experts_per_tok", "experts_per_token"),
        sliding_window=cfg.get("sliding_window", 128) if "sliding_attention" in types else None,
        layer_types=list(types),
        attention_bias=bias,
        attention_output_bias=bias,
        attention_sinks=True,
        rope_scaling=_yarn_from_hf(cfg),
        router_bias=True,
        norm_topk_prob=True,
        router_aux_loss_coef=_aux_from_hf(cfg, 0.001),
        expert_bias=True,
        expert_interleaved=True,
        swiglu_limit=float(cfg.get("swiglu_limit", 7.0)),
        swiglu_alpha=float(cfg.get("swiglu_alpha", 1.702)),
    )


def gpt_oss_to_hf(c: MoEConfig) -> Json:
    out = {
        **_backbone_to_hf(c),
        "intermediate_size": c.moe_intermediate_size,
        "num_local_experts": c.num_experts,
        "num_experts_per_tok": c.num_experts_per_tok,
        "sliding_window": c.sliding_window,
        "layer_types": [
            "sliding_attention" if c.layer_window(i) is not None else "full_attention" for i in range(c.num_layers)
        ],
        "attention_bias": c.attention_bias,
        "swiglu_limit": c.swiglu_limit,
        "swiglu_alpha": c.swiglu_alpha,
        **_aux_to_hf(c),
    }
    if c.rope_scaling is not None:
        params = {"rope_theta": c.rope_theta, **c.rope_scaling}
        out.update(rope_parameters=params, rope_scaling=dict(c.rope_scaling))
    return out
