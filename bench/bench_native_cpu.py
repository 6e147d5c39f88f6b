"""CPU tier (flux_engine._C) against the pure-torch reference, side by side per benchmark group.

Run: ``pytest bench/bench_native_cpu.py --benchmark-only`` (add ``--benchmark-enable`` if a config skips).
"""

import pytest
import torch

from flux_engine.backend import native_extension
from flux_engine.ops.permute import permute_reference
from flux_engine.ops.quantize import QuantizedTensor, dequantize_reference, pack_int4_reference

_EXT = native_extension()
pytestmark = pytest.mark.skipif(
    _EXT is None, reason="flux_engine._C is not built (pip install --no-build-isolation -e .)"
)

TIERS = ("reference", "cpu")
TOP_K = 8
# A quarter of a 64-expert stack of [2816, 2048] projections: large enough to be memory-bound, small enough
# that the reference's five full-size temporaries take seconds, not minutes, per round.
STACK = (16, 2816, 2048)
GROUP = 128
# Eight experts' [3072, 576] projections of a SmolLM2-sized MoE, int8 per-channel as profiling stores them.
INT8_STACK = (8, 3072, 576)


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("merged", [False, True], ids=["no_map", "map_2to1"])
@pytest.mark.parametrize("E", [64, 128])
@pytest.mark.parametrize("T", [2048, 8192])
def test_permute(benchmark, T, E, merged, tier):
    benchmark.group = f"permute T={T} k={TOP_K} E={E} {'map 2:1' if merged else 'no map'}"
    g = torch.Generator().manual_seed(0)
    # Distinct experts per token, as a router's top-k gives; a 2:1 map then makes some slots collide.
    ids = torch.rand(T, E, generator=g).topk(TOP_K, dim=1).indices.to(torch.int32)
    num_physical = E // 2 if merged else E
    expert_map = (torch.randperm(E, generator=g) % num_physical).to(torch.int32) if merged else None
    if tier == "reference":
        benchmark(permute_reference, ids, num_physical, expert_map)
    else:
        benchmark(_EXT.permute, ids, num_physical, expert_map)


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize(
    "dtype,symmetric",
    [(torch.bfloat16, True), (torch.bfloat16, False), (torch.float32, True)],
    ids=["bf16-sym", "bf16-asym", "fp32-sym"],
)
def test_dequantize_int4(benchmark, dtype, symmetric, tier):
    kind = "sym" if symmetric else "asym"
    benchmark.group = f"dequantize_int4 {list(STACK)} G={GROUP} {str(dtype).split('.')[-1]} {kind}"
    g = torch.Generator().manual_seed(0)
    *lead, K = STACK
    packed = torch.randint(0, 256, (*lead, K // 2), dtype=torch.uint8, generator=g)
    scales = torch.rand(*lead, K // GROUP, generator=g)
    zeros = None if symmetric else torch.randint(0, 16, (*lead, K // GROUP), dtype=torch.uint8, generator=g)
    if tier == "reference":
        q = QuantizedTensor(packed, scales, zeros, 4, GROUP, torch.Size(STACK), dtype)
        benchmark.pedantic(dequantize_reference, (q, dtype), rounds=3, warmup_rounds=1)
    else:
        benchmark.pedantic(_EXT.dequantize_int4, (packed, scales, zeros, GROUP, dtype), rounds=10, warmup_rounds=1)


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize(
    "dtype,symmetric",
    [(torch.float32, True), (torch.float32, False), (torch.bfloat16, True), (torch.float16, True)],
    ids=["fp32-sym", "fp32-asym", "bf16-sym", "fp16-sym"],
)
def test_dequantize_int8(benchmark, dtype, symmetric, tier):
    kind = "sym" if symmetric else "asym"
    benchmark.group = f"dequantize_int8 {list(INT8_STACK)} per-channel {str(dtype).split('.')[-1]} {kind}"
    g = torch.Generator().manual_seed(0)
    *lead, K = INT8_STACK
    if symmetric:
        data = torch.randint(-127, 128, INT8_STACK, dtype=torch.int8, generator=g)
        zeros = None
    else:
        data = torch.randint(0, 256, INT8_STACK, dtype=torch.uint8, generator=g)
        zeros = torch.randint(0, 256, (*lead, 1), dtype=torch.uint8, generator=g)
    scales = torch.rand(*lead, 1, generator=g)
    if tier == "reference":
        q = QuantizedTensor(data, scales, zeros, 8, K, torch.Size(INT8_STACK), dtype)
        benchmark.pedantic(dequantize_reference, (q, dtype), rounds=5, warmup_rounds=1)
    else:
        benchmark.pedantic(_EXT.dequantize_int8, (data, scales, zeros, K, dtype), rounds=20, warmup_rounds=1)


@pytest.mark.parametrize("tier", TIERS)
def test_pack_int4(benchmark, tier):
    benchmark.group = f"pack_int4 {list(STACK)}"
    codes = torch.randint(0, 16, STACK, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    benchmark(pack_int4_reference if tier == "reference" else _EXT.pack_int4, codes)
