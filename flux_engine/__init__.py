"""flux-engine: federated fine-tuning of Mixture-of-Experts LLMs on memory-constrained GPUs (Flux)."""

from flux_engine import ops
from flux_engine.backend import BackendUnavailableError
from flux_engine.checkpoint import load_pretrained, save_pretrained
from flux_engine.models import MoEConfig, MoEForCausalLM

__version__ = "0.1.0"
__all__ = ["ops", "BackendUnavailableError", "MoEConfig", "MoEForCausalLM", "load_pretrained", "save_pretrained", "__version__"]
