"""The supported checkpoint layouts, one row per ``model_type``: config conversion plus key naming.

Key names were checked against each family's modelling code: transformers 5.24 ``save_pretrained`` output for
mixtral / qwen2_moe / qwen3_moe / olmoe (per-expert keys; the stacked v5 keys are accepted on load too),
``modeling_deepseek.py`` of deepseek-moe-16b, and ``smoe/models/llama_moe/modeling_llama_moe_hf.py`` of
pjlab-sys4nlp/llama-moe (the file its hub checkpoints ship with), transformers 5.24 ``modeling_gpt_oss.py`` and
its ``integrations/mxfp4.py`` for gpt_oss (stacked experts ``[E, in, out]``; MXFP4 blocks and scales).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional, Tuple

from flux_engine.checkpoint import hf_config
from flux_engine.checkpoint.errors import CheckpointError
from flux_engine.checkpoint.keymap import ExpertKeys, KeyLayout
from flux_engine.models import MoEConfig

NATIVE = "flux_moe"

# The model's own names with stacked experts: what transformers v5 holds in memory.
_STACKED = KeyLayout()
_PROJ_EXPERTS = ExpertKeys("experts.{e}.gate_proj.weight", "experts.{e}.up_proj.weight", "experts.{e}.down_proj.weight")

# gpt-oss names the router ``router`` (``mlp.router.weight`` / ``.bias``).
_GPT_OSS_RENAMES = (("gate.", "router."),)

# Non-learned RoPE caches some modelling code stores as persistent buffers.
_ROTARY_CACHE = r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"


@dataclass(frozen=True)
class Layout:
    """One checkpoint layout.

    Attributes:
        model_type: ``config.json``'s ``model_type``.
        architecture: ``config.json``'s ``architectures`` entry.
        keys: key naming for saving, and for loading unless the file holds stacked experts (``accepts_stacked``).
        from_hf / to_hf: config conversion (see ``hf_config``).
        ignored: regexes of checkpoint keys that hold nothing the model computes with; skipped on load.
        accepts_stacked: also load files with the stacked ``experts.gate_up_proj`` keys (transformers v5 names).
        quantized: key naming of files whose experts are MXFP4 (``experts.gate_up_proj_blocks`` ...); loading only.
        dropped: source-config keys not written back (the weights are saved unquantized).
    """

    model_type: str
    architecture: str
    keys: KeyLayout
    from_hf: Callable[[Dict], MoEConfig]
    to_hf: Callable[[MoEConfig], Dict]
    ignored: Tuple[str, ...] = (_ROTARY_CACHE,)
    accepts_stacked: bool = False
    quantized: Optional[KeyLayout] = None
    dropped: Tuple[str, ...] = ()

    def keys_for(self, checkpoint_keys: Iterable[str]) -> KeyLayout:
        """The key naming of a checkpoint holding ``checkpoint_keys``."""
        keys = list(checkpoint_keys)
        if self.accepts_stacked and any(key.endswith(".experts.gate_up_proj") for key in keys):
            return _STACKED
        if self.quantized is not None and any(key.endswith(".experts.gate_up_proj_blocks") for key in keys):
            return self.quantized
        return self.keys


_LAYOUTS = (
    Layout(
        "mixtral",
        "MixtralForCausalLM",
        KeyLayout(
            "block_sparse_moe",
            experts=ExpertKeys("experts.{e}.w1.weight", "experts.{e}.w3.weight", "experts.{e}.w2.weight"),
        ),
        hf_config.mixtral_from_hf,
        hf_config.mixtral_to_hf,
        accepts_stacked=True,
    ),
    Layout(
        "qwen2_moe",
        "Qwen2MoeForCausalLM",
        KeyLayout(experts=_PROJ_EXPERTS),
        hf_config.qwen2_moe_from_hf,
        hf_config.qwen2_moe_to_hf,
        accepts_stacked=True,
    ),
    Layout(
        "qwen3_moe",
        "Qwen3MoeForCausalLM",
        KeyLayout(experts=_PROJ_EXPERTS),
        hf_config.qwen3_moe_from_hf,
        hf_config.qwen3_moe_to_hf,
        accepts_stacked=True,
    ),
    Layout(
        "olmoe",
        "OlmoeForCausalLM",
        KeyLayout(experts=_PROJ_EXPERTS),
        hf_config.olmoe_from_hf,
        hf_config.olmoe_to_hf,
        accepts_stacked=True,
    ),
    Layout(
        "deepseek",
        "DeepseekForCausalLM",
        KeyLayout(renames=(("shared_expert.", "shared_experts."),), experts=_PROJ_EXPERTS),
        hf_config.deepseek_from_hf,
        hf_config.deepseek_to_hf,
    ),
    Layout(
        "llama_moe",
        "LlamaMoEForCausalLM",
        KeyLayout(
            renames=(
                ("gate.in_proj.", "gate.gate_network.0."),
                ("gate.out_proj.", "gate.gate_network.2."),
                ("gate.weight", "gate.gate_network.weight"),
            ),
            experts=ExpertKeys(
                "calculator.experts.weight_gate.{e}",
                "calculator.experts.weight_up.{e}",
                "calculator.experts.weight_down.{e}",
            ),
        ),
        hf_config.llama_moe_from_hf,
        hf_config.llama_moe_to_hf,
        # The noisy gate's noise projection acts only in training mode.
        ignored=(_ROTARY_CACHE, r"model\.layers\.\d+\.mlp\.gate\.weight_noise\.weight"),
    ),
    Layout(
        "gpt_oss",
        "GptOssForCausalLM",
        KeyLayout(renames=_GPT_OSS_RENAMES, transposed=True),
        hf_config.gpt_oss_from_hf,
        hf_config.gpt_oss_to_hf,
        quantized=KeyLayout(renames=_GPT_OSS_RENAMES, mxfp4=True),
        dropped=("quantization_config",),
    ),
    Layout(
        NATIVE, "MoEForCausalLM", KeyLayout(expert_map=True), hf_config.flux_from_json, hf_config.flux_to_json, ignored=()
    ),
)
LAYOUTS: Dict[str, Layout] = {layout.model_type: layout for layout in _LAYOUTS}


def get_layout(model_type: Optional[str], where: str) -> Layout:
    """The layout of ``model_type``; ``where`` (a file) prefixes the error."""
    if model_type not in LAYOUTS:
        raise CheckpointError(f"{where}: unsupported model_type {model_type!r} (supported: {', '.join(sorted(LAYOUTS))})")
    return LAYOUTS[model_type]
