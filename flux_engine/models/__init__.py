"""The MoE runtime: config, model and constructions."""

from flux_engine.models.config import MoEConfig
from flux_engine.models.moe import CausalLMOutput, MoEForCausalLM, RouterOutput
from flux_engine.models.from_dense import from_dense

__all__ = ["MoEConfig", "MoEForCausalLM", "CausalLMOutput", "RouterOutput", "from_dense"]
