"""Named model shapes: the published MoE models (random weights, for memory and speed work), the SmolLM2-based
experiment models (weights built by ``flux_engine.models.from_dense``) and a tiny model for tests.

Sources of the published shapes: the models' own config.json files (LLaMA-MoE-v1-3.5B 4/16, deepseek-moe-16b-base,
Mixtral-8x7B-v0.1, Qwen3-30B-A3B, OLMoE-1B-7B-0924, gpt-oss-20b).
"""

from __future__ import annotations

from typing import Callable, Dict, List

from flux_engine.models.config import MoEConfig

# SmolLM2-135M (Llama architecture), the dense base of the experiment presets.
SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    num_heads=9,
    num_kv_heads=3,
    intermediate_size=1536,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
)
SMOLLM2_LAYERS = 30


def _tiny() -> MoEConfig:
    return MoEConfig(
        vocab_size=256,
        hidden_size=64,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=48,
        moe_layers=[1, 2],
        max_position_embeddings=512,
        metadata={"preset": "tiny"},
    )


def _llama_moe_3_5b() -> MoEConfig:
    # LLaMA-2-7B with each FFN's 11008 neurons split into 16 experts of 688, top-4 (LLaMA-MoE-v1-3.5B 4/16).
    return MoEConfig(
        vocab_size=32000,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        intermediate_size=11008,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        num_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=688,
        metadata={"preset": "llama-moe-3.5b", "source_model_type": "llama_moe"},
    )


def _deepseek_moe_16b() -> MoEConfig:
    return MoEConfig(
        vocab_size=102400,
        hidden_size=2048,
        num_layers=28,
        num_heads=16,
        num_kv_heads=16,
        intermediate_size=10944,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        num_experts=64,
        num_experts_per_tok=6,
        moe_intermediate_size=1408,
        moe_layers=list(range(1, 28)),  # first_k_dense_replace = 1
        scoring="softmax",
        norm_topk_prob=False,
        shared_expert_intermediate_size=2 * 1408,  # 2 shared experts fused into one MLP
        metadata={"preset": "deepseek-moe-16b", "source_model_type": "deepseek"},
    )


def _mixtral_8x7b() -> MoEConfig:
    return MoEConfig(
        vocab_size=32000,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=14336,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        max_position_embeddings=32768,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=14336,
        metadata={"preset": "mixtral-8x7b", "source_model_type": "mixtral"},
    )


def _qwen3_30b_a3b() -> MoEConfig:
    return MoEConfig(
        vocab_size=151936,
        hidden_size=2048,
        num_layers=48,
        num_heads=32,
        num_kv_heads=4,
        head_dim=128,
        intermediate_size=6144,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        max_position_embeddings=40960,
        qk_norm="head",
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
        norm_topk_prob=True,
        metadata={"preset": "qwen3-30b-a3b", "source_model_type": "qwen3_moe"},
    )


def _olmoe_1b_7b() -> MoEConfig:
    return MoEConfig(
        vocab_size=50304,
        hidden_size=2048,
        num_layers=16,
        num_heads=16,
        num_kv_heads=16,
        intermediate_size=1024,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        qk_norm="full",
        num_experts=64,
        num_experts_per_tok=8,
        moe_intermediate_size=1024,
        norm_topk_prob=False,
        metadata={"preset": "olmoe-1b-7b", "source_model_type": "olmoe"},
    )


def _gpt_oss(**shape) -> MoEConfig:
    """gpt-oss's architecture (transformers ``GptOssConfig``): experts with biases, interleaved gate/up and the
    clamped SwiGLU (limit 7, alpha 1.702); a biased router (softmax over the top k); q/k/v/o biases and a learned
    sink per head; sliding-window (even layers) and full attention alternating; YaRN RoPE (factor 32 over 4096
    original positions, beta 32/1, untruncated)."""
    num_layers = shape["num_layers"]
    fields = dict(
        rms_norm_eps=1e-5,
        rope_theta=150000.0,
        rope_scaling={"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                      "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False},  # fmt: skip
        max_position_embeddings=131072,
        sliding_window=128,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)],
        attention_bias=True,
        attention_output_bias=True,
        attention_sinks=True,
        router_bias=True,
        norm_topk_prob=True,
        expert_bias=True,
        expert_interleaved=True,
        swiglu_limit=7.0,
        swiglu_alpha=1.702,
    )
    fields.update(shape)
    return MoEConfig(**fields)


def _gpt_oss_20b() -> MoEConfig:
    # openai/gpt-oss-20b config.json: 24 layers, hidden 2880, 32 experts top-4 of 2880, 64 q / 8 kv heads of 64,
    # vocabulary 201088; 20.91e9 parameters (the model card's 21B).
    return _gpt_oss(
        vocab_size=201088,
        hidden_size=2880,
        num_layers=24,
        num_heads=64,
        num_kv_heads=8,
        head_dim=64,
        intermediate_size=2880,
        num_experts=32,
        num_experts_per_tok=4,
        moe_intermediate_size=2880,
        metadata={"preset": "gpt-oss-20b", "source_model_type": "gpt_oss"},
    )


def _gpt_oss_tiny() -> MoEConfig:
    # The gpt-oss architecture at test size: 4 layers (sliding window 8 on layers 0 and 2), 8 experts top-2.
    return _gpt_oss(
        vocab_size=256,
        hidden_size=64,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        intermediate_size=64,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        sliding_window=8,
        max_position_embeddings=512,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                      "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False},  # fmt: skip
        metadata={"preset": "gpt-oss-tiny", "source_model_type": "gpt_oss"},
    )


def _smollm2_llama_moe(moe_layers: List[int], name: str) -> Callable[[], MoEConfig]:
    """SmolLM2 upcycled: the FFNs of ``moe_layers`` become 8 experts (full-size copies), top-2, with 10% of each
    copy's neurons re-initialised (Drop-Upcycling). Measured on the mini variant (``python -m flux_engine.pretrain``):
    perplexity 41.4 vs 39.6 dense at step 0 and expert outputs 0.62 apart, where plain copies stay 0.09 apart
    even after 30 steps of continued pre-training."""

    def build() -> MoEConfig:
        return MoEConfig(
            num_layers=SMOLLM2_LAYERS,
            **SMOLLM2_135M,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=SMOLLM2_135M["intermediate_size"],
            moe_layers=moe_layers,
            norm_topk_prob=True,
            router_aux_loss_coef=0.01,
            metadata={"preset": name, "base": "SmolLM2-135M-Instruct", "construction": "upcycle", "drop_fraction": 0.1},
        )

    return build


def _smollm2_deepseek_moe(moe_layers: List[int], name: str) -> Callable[[], MoEConfig]:
    """SmolLM2 DeepSeek-MoE style in ``moe_layers``: the dense FFN is the shared expert; 16 fine-grained routed
    experts of a quarter width each (zero-initialised down projections, so step 0 equals the dense model), top-4.
    The routed experts only start to differ with continued pre-training (``flux_engine.pretrain``)."""

    def build() -> MoEConfig:
        return MoEConfig(
            num_layers=SMOLLM2_LAYERS,
            **SMOLLM2_135M,
            num_experts=16,
            num_experts_per_tok=4,
            moe_intermediate_size=SMOLLM2_135M["intermediate_size"] // 4,
            moe_layers=moe_layers,
            norm_topk_prob=False,
            shared_expert_intermediate_size=SMOLLM2_135M["intermediate_size"],
            router_aux_loss_coef=0.01,
            metadata={"preset": name, "base": "SmolLM2-135M-Instruct", "construction": "fine_grained"},
        )

    return build


# All SmolLM2 presets keep the 30 layers: any 12-layer cut of SmolLM2-135M is no language model (perplexity of
# a pydoc page: 8.6 with 30 layers, 1e10 with the first 12, 7.7e3 with the first and last 6), so the "-mini"
# variants are shallower in MoE only: 5 MoE layers (3, 9, ..., 27) instead of every other layer.
SMOLLM2_MOE_LAYERS = list(range(1, SMOLLM2_LAYERS, 2))
SMOLLM2_MINI_MOE_LAYERS = list(range(3, SMOLLM2_LAYERS, 6))
_PRESETS: Dict[str, Callable[[], MoEConfig]] = {
    "tiny": _tiny,
    "llama-moe-3.5b": _llama_moe_3_5b,
    "deepseek-moe-16b": _deepseek_moe_16b,
    "mixtral-8x7b": _mixtral_8x7b,
    "qwen3-30b-a3b": _qwen3_30b_a3b,
    "olmoe-1b-7b": _olmoe_1b_7b,
    "gpt-oss-20b": _gpt_oss_20b,
    "gpt-oss-tiny": _gpt_oss_tiny,
    "smollm2-llama-moe": _smollm2_llama_moe(SMOLLM2_MOE_LAYERS, "smollm2-llama-moe"),
    "smollm2-llama-moe-mini": _smollm2_llama_moe(SMOLLM2_MINI_MOE_LAYERS, "smollm2-llama-moe-mini"),
    "smollm2-deepseek-moe": _smollm2_deepseek_moe(SMOLLM2_MOE_LAYERS, "smollm2-deepseek-moe"),
    "smollm2-deepseek-moe-mini": _smollm2_deepseek_moe(SMOLLM2_MINI_MOE_LAYERS, "smollm2-deepseek-moe-mini"),
}


def names() -> List[str]:
    return sorted(_PRESETS)


def get(name: str) -> MoEConfig:
    """A fresh ``MoEConfig`` for preset ``name``."""
    try:
        return _PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(names())}") from None
