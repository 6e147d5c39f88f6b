"""Sparse LoRA on the tuning experts: overhead over the frozen base, against PEFT-style LoRA on every expert.

Run: ``python bench/report.py bench/bench_sparse_lora.py bench/results/sparse_lora.md``.

One benchmark group per (layer shape, T, share of experts with LoRA); every case is forward + backward of one
expert layer with gradients for x and the routing weights (what a frozen layer inside a trained model needs):
- ``frozen_base`` (the baseline): ``grouped_mlp`` without LoRA, no weight gradients;
- ``sparse_lora``: LoRA (rank 16, gate_up and down) on ``S`` experts, gradients also for their factors
  ``A: [S, r, .]``, ``B: [S, ., r]``; at S = 0 the factors are empty (goal: overhead about 0);
- ``sparse_lora_int4``: the same over an int4 packed base (QLoRA-style: no dequantised copy of the base);
- ``peft_all_experts``: LoRA factors on all E experts applied the way PEFT applies LoRA to a 3-D expert
  parameter (``target_parameters``): ``W_e + scale * B_e A_e`` materialised for every expert each step, then
  the same grouped MLP (in the S = 100% group).
Each case's ``notes`` give the memory it adds: trainable parameters, AdamW state (2 fp32 per parameter),
and the bytes autograd saves for backward (counted with ``saved_tensors_hooks``, unique storages).

GPU goals (issue 7, H100): sparse LoRA overhead <= 15% at 25% of experts, <= 30% at 100%, about 0 at 0.
Cases run the triton tier on a GPU; on CPU the reference tier (H and I divided by 16, T = 2048, fp32),
which says nothing about the kernels: the triton rows are then listed as not measured.
"""

from __future__ import annotations

import functools

import pytest
import torch

from flux_engine.ops import ExpertLoRA, grouped_mlp, quantize
from moe_shapes import CUDA, DEVICE, DTYPE, layer_shape, layer_weights

RANK = 16
SHAPES = ("deepseek-moe-16b", "qwen3-30b-a3b")
TOKENS = (2048, 8192)
SHARES = (0.0, 0.25, 1.0)
CASES = ("frozen_base", "sparse_lora", "sparse_lora_int4", "peft_all_experts")


@functools.lru_cache(maxsize=1)
def _packed(model: str):
    gate_up, down = layer_weights(model)
    return quantize(gate_up, 4, 128), quantize(down, 4, 128)


def _factors(S: int, H: int, I: int, grad: bool):
    g = torch.Generator(device=DEVICE).manual_seed(4)

    def f(*shape, fan_in):
        return (torch.randn(*shape, generator=g, device=DEVICE, dtype=DTYPE) / fan_in**0.5).requires_grad_(grad)

    return f(S, RANK, H, fan_in=H), f(S, 2 * I, RANK, fan_in=RANK), f(S, RANK, I, fan_in=I), f(S, H, RANK, fan_in=RANK)


def _saved_bytes(fn) -> int:
    """Bytes autograd keeps for backward while ``fn`` runs (each storage counted once)."""
    seen = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("tier", ["reference", "triton"])
@pytest.mark.parametrize("share", SHARES, ids=[f"S{int(100 * s)}pct" for s in SHARES])
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("model", SHAPES)
def test_sparse_lora(benchmark, model, T, tier, share, case):
    if tier == "triton" and not CUDA:
        pytest.skip("triton tier: needs a GPU (the interpreter is no benchmark)")
    if tier == "reference" and CUDA:
        pytest.skip("reference tier: the CPU oracle, not benchmarked on a GPU")
    if not CUDA and T != TOKENS[0]:
        pytest.skip("CPU run: smallest T only")
    if not CUDA and case == "sparse_lora_int4":
        pytest.skip("the int4 base only pays on the triton tier (the reference dequantises the whole layer)")
    if case == "peft_all_experts" and share != 1.0:
        pytest.skip("LoRA on all experts: compared in the S = 100% group")
    E, H, I, k = layer_shape(model)
    S = round(share * E)
    gate_up, down = layer_weights(model)
    g = torch.Generator(device=DEVICE).manual_seed(1)
    ids = torch.rand(T, E, generator=g, device=DEVICE).topk(k, dim=1).indices.to(torch.int32)
    weights = torch.rand(T, k, generator=g, device=DEVICE).requires_grad_()
    x = torch.randn(T, H, generator=g, device=DEVICE, dtype=DTYPE).requires_grad_()
    impl = grouped_mlp.op.impls[tier]
    scale = 2.0
    trainable = []
    if case == "frozen_base":
        forward = lambda: impl(x, gate_up, down, weights, ids, None, None, None)  # noqa: E731
    elif case == "peft_all_experts":
        trainable = list(_factors(E, H, I, True))
        gA, gB, dA, dB = trainable

        def forward():
            w1 = gate_up + scale * torch.bmm(gB, gA)
            w2 = down + scale * torch.bmm(dB, dA)
            return impl(x, w1, w2, weights, ids, None, None, None)

    else:
        trainable = list(_factors(S, H, I, True))
        slots = torch.full((E,), -1, dtype=torch.int32, device=DEVICE)
        owners = torch.randperm(E, generator=torch.Generator().manual_seed(5))[:S].to(DEVICE)
        slots[owners] = torch.arange(S, dtype=torch.int32, device=DEVICE)
        lora = ExpertLoRA(slots, *trainable, scale=scale)
        base = _packed(model) if case == "sparse_lora_int4" else (gate_up, down)
        forward = lambda: impl(x, *base, weights, ids, None, lora, None)  # noqa: E731

    inputs = [x, weights, *trainable]

    def step():
        out = forward()
        torch.autograd.grad(out, inputs, torch.ones_like(out), allow_unused=True)  # S = 0: empty factors

    params = sum(t.numel() for t in trainable)
    benchmark.group = f"{model} E={E} H={H} I={I} k={k} r={RANK} | T={T} fwd_bwd {tier} tier | S={S} ({int(100 * share)}%)"
    benchmark.extra_info["baseline"] = case == "frozen_base"
    benchmark.extra_info["notes"] = (
        f"trainable {params:,} params ({_mib(params * x.element_size())}), "
        f"AdamW state {_mib(8 * params)}, saved for backward {_mib(_saved_bytes(forward))}"
    )
    sync = (lambda: (step(), torch.cuda.synchronize())) if CUDA else step
    benchmark.pedantic(sync, rounds=10 if CUDA else 3, warmup_rounds=2 if CUDA else 1)
