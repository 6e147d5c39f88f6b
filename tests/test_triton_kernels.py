"""The triton tier of the public ops against their torch references.

Every test forces ``FLUX_ENGINE_BACKEND=triton``; without a GPU the kernels run on CPU tensors through
Triton's interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1``), so shapes stay small.
Integer outputs must match bit for bit; float32 weights within 1e-6 relative.
"""

import pytest
import torch

from flux_engine.ops import dequantize, expert_counts, quantize, route
from flux_engine.ops.expert_counts import expert_counts_reference
from flux_engine.ops.quantize import dequantize_reference, quantize_reference
from flux_engine.ops.route import route_reference
from tolerances import ROUTE

pytestmark = pytest.mark.triton

ROUTE_RTOL, ROUTE_ATOL = ROUTE  # the GPU's approximate exp/div: tests/tolerances.py


@pytest.fixture
def triton_device(device, force_tier):
    force_tier("triton", device)
    return device


def distinct_logits(T: int, E: int, dtype: torch.dtype, device) -> torch.Tensor:
    """``[T, E]`` logits whose values in a row differ by at least 1/40 even after rounding to ``dtype``.

    torch.topk orders equal values arbitrarily, so comparisons with it need rows without ties: a shuffled
    grid with step 1/8 plus jitter below 1/20 stays tie-free in bf16 over the range [-4, 4] used here.
    """
    grid = torch.stack([torch.randperm(E) for _ in range(T)]) if T else torch.empty(0, E, dtype=torch.long)
    jitter = (torch.rand(T, E) - 0.5) * 0.1
    return ((grid - E / 2) * 0.125 + jitter).to(dtype).to(device)


def check_route(logits, k, scoring, renormalize, scaling_factor):
    w, ids = route(logits, k, scoring=scoring, renormalize=renormalize, scaling_factor=scaling_factor)
    rw, rids = route_reference(logits, k, scoring, renormalize, scaling_factor)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    assert w.shape == ids.shape == (logits.shape[0], k)
    assert torch.equal(ids, rids)
    torch.testing.assert_close(w, rw, rtol=ROUTE_RTOL, atol=ROUTE_ATOL)


@pytest.mark.parametrize("E,k", [(1, 1), (3, 1), (3, 2), (3, 3), (8, 1), (8, 2), (8, 8), (64, 1), (64, 2), (64, 64)])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_route_shapes(triton_device, E, k, scoring):
    for T in (0, 1, 7, 300):
        check_route(distinct_logits(T, E, torch.float32, triton_device), k, scoring, True, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_route_dtypes_renormalize_scaling(triton_device, dtype, renormalize, scoring):
    logits = distinct_logits(37, 16, dtype, triton_device)
    for k, scaling_factor in ((1, 1.0), (4, 2.5), (16, 0.125)):
        check_route(logits, k, scoring, renormalize, scaling_factor)


def test_route_strided_logits(triton_device):
    logits = distinct_logits(12, 8, torch.float32, triton_device).t().contiguous().t()
    assert not logits.is_contiguous()
    check_route(logits, 3, "softmax", True, 1.0)


def test_route_ties_go_to_the_lowest_id(triton_device):
    logits = torch.zeros(3, 6, device=triton_device)
    logits[1, 4] = 1.0  # one winner, then ties among the rest
    w, ids = route(logits, 3, renormalize=False)
    expected = torch.tensor([[0, 1, 2], [4, 0, 1], [0, 1, 2]], dtype=torch.int32, device=triton_device)
    assert torch.equal(ids, expected)
    torch.testing.assert_close(w, route_reference(logits, 3, "softmax", False, 1.0)[0], rtol=ROUTE_RTOL, atol=0)


def test_route_minus_inf_logits_never_repeat_an_expert(triton_device):
    inf = float("inf")
    logits = torch.tensor([[-inf, 1.0, -inf, 2.0], [-inf, -inf, -inf, 0.0]], device=triton_device)
    for scoring in ("softmax", "sigmoid"):
        w, ids = route(logits, 4, scoring=scoring, renormalize=False)
        assert torch.equal(ids, torch.tensor([[3, 1, 0, 2], [3, 0, 1, 2]], dtype=torch.int32, device=triton_device))
        rw = route_reference(logits, 4, scoring, False, 1.0)[0]
        torch.testing.assert_close(w, rw, rtol=ROUTE_RTOL, atol=0)


@pytest.mark.parametrize("E", [1, 3, 64])
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_expert_counts_plain(triton_device, E, ids_dtype):
    for T, k in ((0, 2), (1, 1), (7, 2), (300, 4)):
        k = min(k, E)
        ids = torch.randint(0, E, (T, k), dtype=ids_dtype, device=triton_device)
        got = expert_counts(ids, E)
        assert got.dtype == torch.int64
        zeros = torch.zeros(E, dtype=torch.int64, device=triton_device)
        assert torch.equal(got, expert_counts_reference(ids, E, None, zeros))


@pytest.mark.parametrize("E", [1, 3, 64])
@pytest.mark.parametrize("per_slot", [False, True])
def test_expert_counts_weighted(triton_device, E, per_slot):
    for T, k in ((0, 2), (1, 1), (7, 2), (300, 4)):
        k = min(k, E)
        ids = torch.randint(0, E, (T, k), dtype=torch.int32, device=triton_device)
        # Per-slot weights in bf16 also check the upcast; per-token fp32 weights check the broadcast over k.
        weights = torch.rand(T, k, device=triton_device).bfloat16() if per_slot else torch.rand(T, device=triton_device)
        got = expert_counts(ids, E, weights)
        assert got.dtype == torch.float32
        want = expert_counts_reference(ids, E, weights, torch.zeros(E, device=triton_device))
        # Atomic float sums run in a different order than torch.bincount.
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_expert_counts_accumulates_into_out(triton_device):
    E = 8
    ids = torch.randint(0, E, (50, 2), device=triton_device)
    weights = torch.rand(50, device=triton_device)

    start_counts = torch.arange(E, dtype=torch.int64, device=triton_device) * 1000
    hist = torch.bincount(ids.flatten(), minlength=E)
    counts = start_counts.clone()
    returned = expert_counts(ids, E, out=counts)
    assert returned is counts
    assert torch.equal(counts, start_counts + hist)
    expert_counts(ids, E, out=counts)  # a second batch adds on top
    assert torch.equal(counts, start_counts + 2 * hist)

    start = torch.rand(E, device=triton_device)
    sums = start.clone()
    expert_counts(ids, E, weights, out=sums)
    want = expert_counts_reference(ids, E, weights, start.clone())
    torch.testing.assert_close(sums, want, rtol=1e-5, atol=1e-6)


def test_expert_counts_strided_inputs(triton_device):
    E = 5
    ids = torch.randint(0, E, (3, 40), device=triton_device).t()  # [40, 3], column-major
    weights = torch.rand(3, 40, device=triton_device).t()
    buffer = torch.zeros(2 * E, device=triton_device)
    out = buffer[::2]
    expert_counts(ids, E, weights, out=out)
    want = expert_counts_reference(ids, E, weights, torch.zeros(E, device=triton_device))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(buffer[1::2], torch.zeros(E, device=triton_device))


def weight_with_edge_groups(shape, dtype, device, group_size):
    """Random weight whose first group is all zeros (scale 1.0) and second group non-negative (lo = 0)."""
    w = torch.randn(shape) * 0.05
    rows = w.reshape(-1, shape[-1])
    rows[0, :group_size] = 0
    rows[min(1, rows.shape[0] - 1), group_size : 2 * group_size].abs_()
    return w.to(dtype).to(device)


def assert_same_quantized(got, want):
    assert got.data.dtype == want.data.dtype and torch.equal(got.data, want.data)
    assert got.scales.dtype == torch.float32 and torch.equal(got.scales, want.scales)
    if want.zeros is None:
        assert got.zeros is None
    else:
        assert got.zeros.dtype == torch.uint8 and torch.equal(got.zeros, want.zeros)
    assert (got.bits, got.group_size, got.shape, got.dtype) == (want.bits, want.group_size, want.shape, want.dtype)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("shape", [(6, 256), (3, 4, 128)])
def test_quantize_dequantize(triton_device, bits, symmetric, group_size, shape):
    for dtype in (torch.float32, torch.bfloat16):
        w = weight_with_edge_groups(shape, dtype, triton_device, group_size)
        q = quantize(w, bits, group_size, symmetric=symmetric)
        assert_same_quantized(q, quantize_reference(w, bits, group_size, symmetric))
        for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
            assert torch.equal(dequantize(q, out_dtype), dequantize_reference(q, out_dtype))


@pytest.mark.parametrize("bits,K", [(4, 2304), (8, 1500), (8, 7)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_per_channel(triton_device, bits, K, symmetric):
    """group_size == K: groups wider than one chunk of the kernel, and an odd K for int8."""
    w = torch.randn(3, K, device=triton_device)
    q = quantize(w, bits, K, symmetric=symmetric)
    assert_same_quantized(q, quantize_reference(w, bits, K, symmetric))
    assert torch.equal(dequantize(q), dequantize_reference(q, torch.float32))


def test_quantize_rounds_half_to_even(triton_device):
    # Symmetric int4 with amax 7 has scale 1, so the halves stay exact: torch.round sends them to even.
    halves = torch.tensor([[7.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5]], device=triton_device)
    q = quantize(halves, 4, 8, symmetric=True)
    assert_same_quantized(q, quantize_reference(halves, 4, 8, True))
    # Asymmetric int4 with range [-7.5, 7.5] has scale 1 and zero point round(7.5) = 8.
    spread = torch.tensor([[-7.5, 7.5, 0.5, -0.5, 4.5, -4.5, 6.5, -6.5]], device=triton_device)
    q = quantize(spread, 4, 8, symmetric=False)
    assert_same_quantized(q, quantize_reference(spread, 4, 8, False))
    assert q.zeros.item() == 8


def test_quantize_strided_weight(triton_device):
    w = torch.randn(128, 6, device=triton_device).t()  # [6, 128], column-major
    q = quantize(w, 4, 32, symmetric=False)
    assert_same_quantized(q, quantize_reference(w, 4, 32, False))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_dequantize_reference_quantized(device, force_tier, bits, symmetric):
    w = torch.randn(2, 8, 128, device=device).bfloat16()
    q = quantize_reference(w, bits, 64, symmetric)
    force_tier("triton", device)
    for out_dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert torch.equal(dequantize(q, out_dtype), dequantize_reference(q, out_dtype))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_float64_matches_the_reference(triton_device, bits, symmetric):
    """float64 weights (the reference quantizes their fp32 rounding) used to come back NaN from the GPU kernel."""
    w = torch.randn(5, 256, dtype=torch.float64, device=triton_device)
    q = quantize(w, bits, 64, symmetric=symmetric)
    assert_same_quantized(q, quantize_reference(w, bits, 64, symmetric))
    out = dequantize(q)
    assert out.dtype == torch.float64 and torch.equal(out, dequantize_reference(q, torch.float64))
    assert (out - w).abs().max() <= q.scales.max()
