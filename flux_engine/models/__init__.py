"""The MoE runtime: config, model and constructions."""

from flux_engine.models.config import MoEConfig
from flux_engine.models.moe import CausalLMOutput, MoEForCausalLM, RouterOutput

__all__ = ["MoEConfig", "MoEForCausalLM", "CausalLMOutput", "RouterOutput"]
