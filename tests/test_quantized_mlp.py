"""Quantization error bounds and the W4A16 / W8A16 grouped MLP (Triton, interpreted on CPU) vs dequantise-then-
reference; the fused router (route_and_count) vs route + bincount."""

import pytest
import torch

from flux_engine import ops
from flux_engine.ops.quantize import dequantize_reference, quantize_reference
from flux_engine.ops.quantized_grouped_mlp import quantized_grouped_mlp_reference
from flux_engine.ops.route_and_count import route_and_count_reference
from tolerances import FP32_DOT, FP32_GEMM, ROUTE

FORMATS = [(4, 32, True), (4, 64, False), (4, 128, True), (8, None, True), (8, None, False)]


@pytest.mark.parametrize("bits,group,sym", FORMATS)
@pytest.mark.parametrize("shape", [(3, 16, 128), (24, 128)])
def test_quantize_error_bound(bits, group, sym, shape):
    w = torch.randn(shape)
    q = quantize_reference(w, bits, group or shape[-1], sym)
    err = (dequantize_reference(q, torch.float32) - w).abs()
    # Round to nearest: at most half a step per element (+ clamp at the symmetric grid's edge, none here).
    step = q.scales.repeat_interleave(q.group_size, dim=-1)
    assert bool((err <= 0.5 * step * (1 + 1e-5) + 1e-7).all())
    rel = err.norm() / w.norm()
    assert rel < {4: 0.13, 8: 0.01}[bits]


@pytest.mark.parametrize("bits,group,sym", FORMATS)
@pytest.mark.parametrize("use_map", [False, True])
def test_packed_kernel_matches_dequantised_reference(device, force_tier, bits, group, sym, use_map):
    T, H, I, E, k = 11, 128, 64, 4, 2
    x = torch.randn(T, H, device=device)
    gate_up = torch.randn(E, 2 * I, H, device=device) * 0.1
    down = torch.randn(E, H, I, device=device) * 0.1
    qg = quantize_reference(gate_up, bits, group or H, sym)
    qd = quantize_reference(down, bits, min(group or I, I), sym)
    E_orig = 6 if use_map else E
    ids = torch.stack([torch.randperm(E_orig)[:k] for _ in range(T)]).int().to(device)
    emap = torch.tensor([0, 1, 2, 3, 1, 2], dtype=torch.int32, device=device) if use_map else None
    w = torch.rand(T, k, device=device)
    want = quantized_grouped_mlp_reference(x, qg, qd, w, ids, emap)
    force_tier("triton", device)
    got = ops.quantized_grouped_mlp(x, qg, qd, w, ids, emap)
    assert rel_err(got, want) < FP32_GEMM


def test_quantized_mlp_bf16(device, force_tier):
    T, H, I, E = 8, 64, 32, 3
    x = torch.randn(T, H, device=device, dtype=torch.bfloat16)
    qg = ops.quantize(torch.randn(E, 2 * I, H, device=device), 4, 32)
    qd = ops.quantize(torch.randn(E, H, I, device=device), 4, 32)
    ids = torch.randint(0, E, (T, 1), device=device, dtype=torch.int32)
    w = torch.ones(T, 1, device=device)
    want = quantized_grouped_mlp_reference(x.float(), qg, qd, w, ids, None)
    force_tier("triton", device)
    got = ops.quantized_grouped_mlp(x, qg, qd, w, ids)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2 * want.abs().max().item())


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def test_route_and_count_checks_dtypes(device):
    x = torch.randn(5, 16, device=device, dtype=torch.bfloat16)
    counts = torch.zeros(4, dtype=torch.int64, device=device)
    with pytest.raises(TypeError, match="router_weight.*float32.*bfloat16"):
        ops.route_and_count(x, torch.randn(4, 16, device=device), 2, counts_out=counts)
    with pytest.raises(TypeError, match="router_weight"):
        ops.route_and_count(x, torch.zeros(4, 16, dtype=torch.int32, device=device), 2, counts_out=counts)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_route_and_count_matches_bincount(device, force_tier, scoring):
    T, H, E, k = 45, 48, 12, 3
    x, w = torch.randn(T, H, device=device), torch.randn(E, H, device=device)
    tok_w, mask = torch.rand(T, device=device), torch.rand(T, device=device) > 0.25
    counts = torch.full((E,), 5, dtype=torch.int64, device=device)  # accumulates in place
    sums = torch.zeros(E, device=device)
    force_tier("triton", device)
    weights, ids, logits = ops.route_and_count(
        x, w, k, counts_out=counts, attn_sums_out=sums, token_weights=tok_w, token_mask=mask, scoring=scoring,
        return_logits=True,
    )
    # Routing from the kernel's own logits (TF32 dots on a GPU could flip a near-tie against fp32 logits).
    torch.testing.assert_close(logits, x @ w.t(), rtol=FP32_DOT[0], atol=FP32_DOT[1])
    ref_w, ref_ids = ops.route.op.impls["reference"](logits, k, scoring, True, 1.0)
    assert torch.equal(ids.cpu(), ref_ids.cpu())
    torch.testing.assert_close(weights, ref_w, rtol=ROUTE[0], atol=ROUTE[1])
    kept = ids[mask].reshape(-1).long().cpu()
    assert torch.equal(counts.cpu(), torch.bincount(kept, minlength=E) + 5)
    want_sums = torch.bincount(kept, weights=tok_w[mask].cpu().repeat_interleave(k), minlength=E).float()
    torch.testing.assert_close(sums.cpu(), want_sums, rtol=1e-5, atol=1e-6)
    # The reference tier agrees.
    c2 = torch.full((E,), 5, dtype=torch.int64)
    s2 = torch.zeros(E)
    route_and_count_reference(x.cpu(), w.cpu(), k, scoring, True, 1.0, c2, s2, tok_w.cpu(), mask.cpu(), False)
    assert torch.equal(c2, counts.cpu())
