"""Grouped expert MLP: flux-engine tiers against transformers' experts implementations and a dense bound.

Run: ``python bench/report.py bench/bench_grouped_gemm.py bench/results/grouped_gemm_<device>.md``
(or ``pytest bench/bench_grouped_gemm.py --benchmark-only --benchmark-enable``). Set
``FLUX_ENGINE_AUTOTUNE=1`` on a GPU to tune the triton tier's block configs first (cached on disk).

One benchmark group per (model layer, T, routing, forward or forward+backward, expert map); its cases
(``tier`` parameter):
- ``reference``, ``triton``: the tiers of ``flux_engine.ops.grouped_mlp`` (triton on a GPU only; the
  interpreter is no benchmark);
- ``hf_eager``: transformers' ``Qwen3MoeExperts`` eager loop over experts;
- ``hf_grouped_mm``: the same module on transformers' ``grouped_mm`` path (``torch._grouped_mm`` /
  ``torch.nn.functional.grouped_mm``), skipped where transformers would fall back to its loop;
- ``dense``: the same FLOPs as one dense SwiGLU MLP over pre-gathered rows, no routing: the upper bound.
``extra_info`` holds the useful FLOPs and TFLOP/s (``report.py`` adds the % of the group's dense bound).
Merged groups (``map E->E/2``) remap the router's ids onto E/2 experts: slots of a token on one merged
expert collapse into one row, so the useful FLOPs drop; the baselines cannot merge and run unmerged only.

Shapes: the expert layers of Qwen3-30B-A3B, OLMoE, Mixtral-8x7B and DeepSeek-MoE-16B at T in {2048, 8192,
32768}, bf16. On CPU: T = 2048 only, H and I divided by 16, float32 (a CPU run takes under a minute); the
CPU rows measure the reference tier and transformers' paths, never the kernels.

GPU goals (issue 4, H100): triton forward >= 75% of the dense bound at T = 8192 on the Qwen3 shape, >= 0.95x
``hf_grouped_mm``, merged E/2 <= 0.9x the unmerged time; zero host syncs per layer (that one is a test:
``tests/test_grouped_mlp_triton.py::test_no_host_sync_on_cuda``). Rows not run on this machine are listed
under "Not measured".
"""

from __future__ import annotations

from typing import Callable, Optional

import pytest
import torch

from flux_engine.ops.grouped_mlp import grouped_mlp
from flux_engine.ops.permute import permute_reference
from moe_shapes import CUDA, DEVICE, DTYPE, MODELS, layer_shape, layer_weights

TOKENS = (2048, 8192, 32768)
TIERS = ("reference", "triton", "hf_eager", "hf_grouped_mm", "dense")
ZIPF_EXPONENT = 1.2


def _routing(T: int, E: int, k: int, kind: str):
    """``topk_ids [T, k]`` distinct experts per token (uniform, or Zipf-skewed popularity) and weights summing to 1."""
    g = torch.Generator(device=DEVICE).manual_seed(1)
    if kind == "uniform":
        ids = torch.rand(T, E, generator=g, device=DEVICE).topk(k, dim=1).indices
    else:
        popularity = 1.0 / torch.arange(1, E + 1, device=DEVICE, dtype=torch.float32) ** ZIPF_EXPONENT
        ids = torch.multinomial(popularity.expand(T, E), k, replacement=False, generator=g)
    weights = torch.rand(T, k, generator=g, device=DEVICE)
    return ids.to(torch.int32), weights / weights.sum(dim=1, keepdim=True)


def _hf_experts(impl: str, gate_up: torch.Tensor, down: torch.Tensor):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    E, two_i, H = gate_up.shape
    config = Qwen3MoeConfig(num_experts=E, hidden_size=H, moe_intermediate_size=two_i // 2, hidden_act="silu")
    config._experts_implementation = impl
    with torch.device("meta"):
        module = Qwen3MoeExperts(config)
    module.gate_up_proj = torch.nn.Parameter(gate_up, requires_grad=gate_up.requires_grad)
    module.down_proj = torch.nn.Parameter(down, requires_grad=down.requires_grad)
    return module


def _grouped_mm_unavailable(x: torch.Tensor, gate_up: torch.Tensor) -> Optional[str]:
    try:
        from transformers.integrations.moe import _can_use_grouped_mm
    except ImportError as e:
        return f"transformers has no grouped_mm experts path ({e})"
    offs = torch.zeros(gate_up.shape[0], dtype=torch.int32, device=x.device)
    if not _can_use_grouped_mm(x, gate_up, offs):
        return f"torch grouped_mm unavailable for {x.device.type}/{x.dtype}: transformers would run its fallback loop"
    return None


def _dense_bound(x_rows: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    gate, up = torch.nn.functional.linear(x_rows, gate_up).chunk(2, dim=-1)
    return torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, down)


def _timed(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` made to finish on the device before the timer stops."""
    if not CUDA:
        return fn
    return lambda: (fn(), torch.cuda.synchronize())


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("merged", [False, True], ids=["no_map", "map_half"])
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("routing", ["uniform", "zipf"])
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("model", list(MODELS))
def test_grouped_mlp(benchmark, model, T, routing, mode, merged, tier):
    if not CUDA and T != TOKENS[0]:
        pytest.skip("CPU run: smallest T only")
    if tier == "triton" and not CUDA:
        pytest.skip("triton rows need a GPU (the interpreter is no benchmark)")
    if merged and tier.startswith("hf_"):
        pytest.skip("transformers' experts cannot merge experts")
    E, H, I, k = layer_shape(model)
    backward = mode == "fwd_bwd"
    gate_up, down = (w.detach().requires_grad_(backward) for w in layer_weights(model))
    ids, weights = _routing(T, E, k, routing)
    x = torch.randn(T, H, device=DEVICE, dtype=DTYPE, generator=torch.Generator(device=DEVICE).manual_seed(2))
    x.requires_grad_(backward)
    weights.requires_grad_(backward)
    expert_map = None
    if merged:
        E_phys = E // 2
        order = torch.randperm(E, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(3))
        expert_map = (order % E_phys).to(torch.int32)
        gate_up = gate_up[:E_phys].detach().requires_grad_(backward)
        down = down[:E_phys].detach().requires_grad_(backward)
    rows = int(permute_reference(ids, gate_up.shape[0], expert_map).expert_offsets[-1])  # setup only: may sync
    flops = 6 * rows * H * I * (3 if backward else 1)

    if tier in ("reference", "triton"):
        impl = grouped_mlp.op.impls[tier]
        forward = lambda: impl(x, gate_up, down, weights, ids, expert_map, None)  # noqa: E731
        inputs = [x, gate_up, down, weights]
    elif tier == "dense":
        x_rows = torch.randn(rows, H, device=DEVICE, dtype=DTYPE).requires_grad_(backward)
        forward = lambda: _dense_bound(x_rows, gate_up[0], down[0])  # noqa: E731
        inputs = [x_rows, gate_up, down]
    else:
        if tier == "hf_grouped_mm":
            reason = _grouped_mm_unavailable(x, gate_up)
            if reason is not None:
                pytest.skip(reason)
        module = _hf_experts(tier[len("hf_") :], gate_up, down)
        hf_weights = weights.detach().to(DTYPE).requires_grad_(backward)
        forward = lambda: module(x, ids.long(), hf_weights)  # noqa: E731
        inputs = [x, module.gate_up_proj, module.down_proj, hf_weights]

    if backward:

        def step():
            out = forward()
            torch.autograd.grad(out, inputs, torch.ones_like(out))

    else:

        def step():
            with torch.no_grad():
                forward()

    benchmark.group = f"{model} E={E} H={H} I={I} k={k} | T={T} {routing} {mode} {'map E->E/2' if merged else 'no map'}"
    benchmark.extra_info["flops"] = flops
    if CUDA:
        rounds, warmup = (3, 1) if flops > 2e12 else (10, 2)
    else:  # keeps a whole CPU run within minutes; the reference's loop over experts needs no warm-up
        rounds, warmup = (2, 0) if tier == "reference" else (5, 1)
    benchmark.pedantic(_timed(step), rounds=rounds, warmup_rounds=warmup)
    if benchmark.stats is not None:
        benchmark.extra_info["tflops"] = flops / benchmark.stats.stats.median / 1e12
