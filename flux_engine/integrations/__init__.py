"""Bridges to other libraries. Each submodule imports its library lazily (only when imported itself), so
``flux_engine`` never needs them:

- ``flux_engine.integrations.transformers``: a ``"flux"`` experts implementation for transformers v5 MoE models,
  plus profiling, merging, sparse LoRA and conversion to/from the runtime ``MoEForCausalLM``.
"""
