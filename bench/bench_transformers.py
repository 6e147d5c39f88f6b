"""A transformers v5 MoE decoder layer on its experts backends: ``"flux"`` against ``"grouped_mm"`` and ``"eager"``.

Run: ``python bench/report.py bench/bench_transformers.py bench/results/transformers.md``
(or ``pytest bench/bench_transformers.py --benchmark-only --benchmark-enable``).

The model: ``Qwen3MoeForCausalLM`` with one decoder layer of Qwen3-30B-A3B's shape (H 2048, 32 query / 4 KV heads
of 128, E 128 experts of I 768, top-8, renormalised) and a 256-token vocabulary, so the embedding and LM head
cost next to nothing; random weights (transformers' init), one sequence of T tokens. On CPU: H, I and the head
size divided by 16 (``bench/moe_shapes.CPU_SHRINK``), float32, T = 2048; on a GPU: bf16, T = 8192.
Two parts: ``decoder_layer`` (the whole model: attention, which dominates on CPU at this T, plus the MoE block;
loss = mean of the logits) and ``moe_block`` (the layer's ``Qwen3MoeSparseMoeBlock`` alone, router + experts,
on fixed hidden states ``[1, T, H]``; loss = mean of its output). Each group is one part and one mode, ``fwd``
(no grad) or ``fwd_bwd`` (backward into every parameter and the input); its cases (``case`` parameter):
- ``eager``: transformers' loop over the experts hit (the baseline);
- ``grouped_mm``: transformers' ``torch.nn.functional.grouped_mm`` path;
- ``flux_reference``, ``flux_triton``: ``experts_implementation="flux"`` (``flux_engine.ops.grouped_mlp``) with
  the tier forced by ``FLUX_ENGINE_BACKEND`` (triton on a GPU only: the interpreter is no benchmark);
- ``flux_reference_merged``, ``flux_triton_merged``: the same after ``merge_hf`` to E/2 physical experts (uniform
  profile, no tuning experts): the router keeps its E logits, the expert map sends them onto E/2 merged experts
  (slots of a token on one merged expert collapse into one row); the baselines cannot run a merged model.
The rest of the layer (attention through sdpa, router, norms) is transformers' own in every case.

CPU rows compare the reference tier (a loop over experts) with transformers' paths, never the kernels; on a
shared 2-core machine medians move by up to ~20% between runs (min is the steadier figure).
"""

from __future__ import annotations

import functools

import pytest
import torch

from moe_shapes import CPU_SHRINK, CUDA, DEVICE, DTYPE, MODELS

transformers = pytest.importorskip("transformers")

from flux_engine import merging  # noqa: E402
from flux_engine.backend import ENV_VAR  # noqa: E402
from flux_engine.integrations.transformers import merge_hf  # noqa: E402

CASES = ("eager", "grouped_mm", "flux_reference", "flux_triton", "flux_reference_merged", "flux_triton_merged")
TOKENS = 8192 if CUDA else 2048
HEADS, KV_HEADS, HEAD_DIM = 32, 4, 128


def _shape():
    E, H, I, k = MODELS["qwen3-30b-a3b"]
    shrink = 1 if CUDA else CPU_SHRINK
    return E, H // shrink, I // shrink, k, HEAD_DIM // shrink


@functools.lru_cache(maxsize=2)
def _model(merged: bool):
    """The one-layer model (seeded), kept across cases; ``merged``: E -> E/2 by ``merge_hf``."""
    E, H, I, k, head_dim = _shape()
    config = transformers.Qwen3MoeConfig(
        vocab_size=256, hidden_size=H, num_hidden_layers=1, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        head_dim=head_dim, intermediate_size=4 * I, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=k,
        norm_topk_prob=True, max_position_embeddings=TOKENS,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=DTYPE).to(DEVICE).eval()
    if merged:
        uniform = merging.FrequencyProfile(freq=torch.full((1, E), 1.0 / E, dtype=torch.float64))
        merge_hf(model, uniform, tuning_experts=[[]], budgets=[E // 2])
    return model


def _unavailable(case: str):
    if case.startswith("flux_triton") and not CUDA:
        return "flux triton rows need a GPU (the Triton interpreter is no benchmark)"
    if case == "grouped_mm":
        from transformers.integrations.moe import _can_use_grouped_mm

        E, H, I, _, _ = _shape()
        w = torch.empty(E, H, 2 * I, device=DEVICE, dtype=DTYPE)
        x = torch.empty(1, H, device=DEVICE, dtype=DTYPE)
        if not _can_use_grouped_mm(x, w, torch.zeros(E, dtype=torch.int32, device=DEVICE)):
            return f"torch grouped_mm unavailable for {DEVICE.type}/{DTYPE}: transformers would run its fallback loop"
    return None


def _timed(fn):
    """``fn`` made to finish on the device before the timer stops."""
    if not CUDA:
        return fn
    return lambda: (fn(), torch.cuda.synchronize())


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("part", ["decoder_layer", "moe_block"])
def test_transformers_backend(benchmark, monkeypatch, part, mode, case):
    reason = _unavailable(case)
    if reason is not None:
        pytest.skip(reason)
    model = _model(merged=case.endswith("_merged"))
    if case.startswith("flux"):
        monkeypatch.setenv(ENV_VAR, case.split("_")[1])
        model.set_experts_implementation("flux")
    else:
        model.set_experts_implementation(case)
    E, H, I, k, head_dim = _shape()
    g = torch.Generator(device=DEVICE).manual_seed(1)
    if part == "decoder_layer":
        ids = torch.randint(0, 256, (1, TOKENS), device=DEVICE, generator=g)
        forward = lambda: model(input_ids=ids).logits  # noqa: E731
    else:
        block = model.model.layers[0].mlp
        hidden = torch.randn(1, TOKENS, H, device=DEVICE, dtype=DTYPE, generator=g).requires_grad_(mode == "fwd_bwd")
        forward = lambda: block(hidden)  # noqa: E731

    if mode == "fwd_bwd":

        def step():
            forward().float().mean().backward()
            model.zero_grad(set_to_none=True)

    else:

        def step():
            with torch.no_grad():
                forward()

    benchmark.group = f"Qwen3-30B-A3B {part} E={E} H={H} I={I} k={k} heads={HEADS}x{head_dim} | T={TOKENS} {mode}"
    benchmark.extra_info["baseline"] = case == "eager"
    rounds, warmup = (10, 2) if CUDA else (5, 1)
    benchmark.pedantic(_timed(step), rounds=rounds, warmup_rounds=warmup)
