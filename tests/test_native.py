"""flux_engine._C against the pure-torch references: bit-exact results, and TORCH_CHECK on bad input.

Runs on CPU tensors, and on CUDA tensors too when a GPU is present and the extension has CUDA kernels.
"""

import pytest
import torch

from flux_engine.backend import native_extension
from flux_engine.ops.permute import permute, permute_reference
from flux_engine.ops.quantize import (
    QuantizedTensor,
    dequantize_reference,
    pack_int4_reference,
    quantize_codes_reference,
    unpack_int4_reference,
)

_EXT = native_extension()
pytestmark = pytest.mark.skipif(
    _EXT is None, reason="flux_engine._C is not built (pip install --no-build-isolation -e .)"
)

DEVICES = ["cpu"]
if torch.cuda.is_available() and _EXT is not None and _EXT.has_cuda():
    DEVICES.append("cuda")


@pytest.fixture(params=DEVICES)
def dev(request) -> torch.device:
    return torch.device(request.param)


def assert_plan_matches(ids, num_experts, expert_map, dev):
    """The native plan of ``ids`` equals the reference plan, tensor for tensor."""
    ids32 = ids.to(torch.int32)
    emap = None if expert_map is None else expert_map.to(torch.int32)
    got = _EXT.permute(ids32.to(dev), num_experts, None if emap is None else emap.to(dev))
    want = permute_reference(ids, num_experts, expert_map)
    names = ("sorted_token_ids", "expert_offsets", "slot_rows")
    for name, g, w in zip(names, got, (want.sorted_token_ids, want.expert_offsets, want.slot_rows)):
        assert g.device.type == dev.type, name
        assert g.dtype == torch.int32, name
        assert g.shape == w.shape, name
        assert torch.equal(g.cpu(), w), f"{name} differs\n got {g}\nwant {w}"


@pytest.mark.parametrize("use_map", [False, True], ids=["no_map", "many_to_one"])
@pytest.mark.parametrize("E", [1, 3, 8, 64])
@pytest.mark.parametrize("k", [1, 2, 6])
@pytest.mark.parametrize("T", [0, 1, 7, 300])
def test_permute_matches_reference(T, k, E, use_map, dev):
    if use_map:
        num_original = 2 * E + 3
        expert_map = torch.randint(0, E, (num_original,))
    else:
        num_original, expert_map = E, None
    # Ids repeat within a token on purpose: duplicates must collapse with or without a map.
    ids = torch.randint(0, num_original, (T, k))
    assert_plan_matches(ids, E, expert_map, dev)


@pytest.mark.parametrize("use_map", [False, True], ids=["no_map", "map"])
def test_permute_all_tokens_on_one_expert(use_map, dev):
    T, k, E = 300, 6, 8
    if use_map:
        expert_map = torch.full((16,), 5)
        ids = torch.randint(0, 16, (T, k))
    else:
        expert_map = None
        ids = torch.full((T, k), 5)
    assert_plan_matches(ids, E, expert_map, dev)


def test_permute_hand_computed(dev):
    # Originals 0 and 2 merge into physical 0, so token 0 (slots 0 and 2) and token 2 collapse into one row.
    ids = torch.tensor([[0, 2], [1, 1], [2, 0]], dtype=torch.int32, device=dev)
    emap = torch.tensor([0, 1, 0], dtype=torch.int32, device=dev)
    tokens, offsets, slot_rows = _EXT.permute(ids, 2, emap)
    assert tokens.tolist() == [0, 2, 1, 3, 3, 3]
    assert offsets.tolist() == [0, 2, 3]
    assert slot_rows.tolist() == [[0, 0], [2, 2], [1, 1]]


@pytest.mark.parametrize("threads", [1, 2])
def test_permute_many_chunks_is_thread_independent(threads):
    # Large enough for the CPU kernel to split tokens into several chunks when it has threads.
    ids = torch.randint(0, 40, (20000, 8))
    expert_map = torch.randint(0, 16, (40,))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert_plan_matches(ids, 16, expert_map, torch.device("cpu"))
    finally:
        torch.set_num_threads(before)


def test_permute_through_public_op(force_tier):
    force_tier("cpu", torch.device("cpu"))
    ids = torch.randint(0, 12, (50, 4))
    expert_map = torch.randint(0, 5, (12,))
    got = permute(ids, 5, expert_map)
    want = permute_reference(ids, 5, expert_map)
    assert torch.equal(got.sorted_token_ids, want.sorted_token_ids)
    assert torch.equal(got.expert_offsets, want.expert_offsets)
    assert torch.equal(got.slot_rows, want.slot_rows)


@pytest.mark.parametrize("shape", [(2,), (64,), (3, 5, 64), (4, 0), (0, 8)])
def test_pack_unpack_match_reference(shape, dev):
    codes = torch.randint(0, 16, shape, dtype=torch.uint8)
    packed = _EXT.pack_int4(codes.to(dev))
    assert torch.equal(packed.cpu(), pack_int4_reference(codes))
    unpacked = _EXT.unpack_int4(packed)
    assert torch.equal(unpacked.cpu(), unpack_int4_reference(pack_int4_reference(codes)))
    assert torch.equal(unpacked.cpu(), codes)


def test_unpack_every_byte(dev):
    packed = torch.arange(256, dtype=torch.uint8).reshape(4, 64)
    assert torch.equal(_EXT.unpack_int4(packed.to(dev)).cpu(), unpack_int4_reference(packed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_dequantize_matches_reference(symmetric, group_size, dtype, dev):
    w = torch.randn(3, 5, 256) * torch.logspace(-3, 2, 5).reshape(1, 5, 1)
    codes, scales, zeros = quantize_codes_reference(w, 4, group_size, symmetric)
    q = QuantizedTensor(pack_int4_reference(codes), scales, zeros, 4, group_size, w.shape, w.dtype)
    got = _EXT.dequantize_int4(
        q.data.to(dev), scales.to(dev), None if zeros is None else zeros.to(dev), group_size, dtype
    )
    assert got.dtype == dtype and got.shape == w.shape and got.device.type == dev.type
    assert torch.equal(got.cpu(), dequantize_reference(q, dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantize_rounding_over_the_float_range(dtype, dev):
    # Scales from random bit patterns reach every rounding regime of the 16-bit casts: subnormals, ties,
    # overflow to infinity.
    bits = torch.randint(-(2**31), 2**31 - 1, (64, 4), dtype=torch.int64).to(torch.int32)
    scales = bits.view(torch.float32)
    scales = torch.where(scales.isfinite(), scales, torch.ones_like(scales))
    codes = torch.randint(0, 16, (64, 4 * 16), dtype=torch.uint8)
    zeros = torch.randint(0, 16, (64, 4), dtype=torch.uint8)
    q = QuantizedTensor(pack_int4_reference(codes), scales, zeros, 4, 16, codes.shape, torch.float32)
    got = _EXT.dequantize_int4(q.data.to(dev), scales.to(dev), zeros.to(dev), 16, dtype)
    assert torch.equal(got.cpu(), dequantize_reference(q, dtype))


def test_dequantize_unaligned_views(dev):
    # Packed data at an odd offset takes the kernels' byte-wise path.
    codes = torch.randint(0, 16, (4, 64), dtype=torch.uint8)
    packed = torch.cat([torch.zeros(1, dtype=torch.uint8), pack_int4_reference(codes).reshape(-1)])[1:].reshape(4, 32)
    scales = torch.rand(4, 2)
    q = QuantizedTensor(packed, scales, None, 4, 32, codes.shape, torch.float32)
    got = _EXT.dequantize_int4(packed.to(dev), scales.to(dev), None, 32, torch.bfloat16)
    assert torch.equal(got.cpu(), dequantize_reference(q, torch.bfloat16))


def _int8_dequantize(q, dtype):
    return _EXT.dequantize_int8(q.data, q.scales, q.zeros, q.group_size, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group_size", [1, 3, 32, 96], ids=lambda g: f"G{g}")
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("shape", [(96,), (3, 5, 96)], ids=["1d", "3d"])
def test_dequantize_int8_matches_reference(shape, symmetric, group_size, dtype):
    # K = 96: per-channel, 32 and odd or single-column groups.
    w = torch.randn(shape) * torch.logspace(-3, 2, shape[-1]).flip(0)
    codes, scales, zeros = quantize_codes_reference(w, 8, group_size, symmetric)
    assert codes.dtype == (torch.int8 if symmetric else torch.uint8)
    q = QuantizedTensor(codes, scales, zeros, 8, group_size, w.shape, w.dtype)
    got = _int8_dequantize(q, dtype)
    assert got.dtype == dtype and got.shape == w.shape
    assert torch.equal(got, dequantize_reference(q, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("signed,with_zeros", [(True, False), (False, True), (False, False)],
                         ids=["int8", "uint8", "uint8-zero-point-0"])
def test_dequantize_int8_every_code_over_the_float_range(signed, with_zeros, dtype):
    # Every code (int8 -128 too: the kernel takes whatever it is given) against scales from random bit patterns,
    # which reach every rounding regime of the 16-bit casts: subnormals, ties, overflow to infinity.
    rows, groups, group_size = 64, 4, 256
    bits = torch.randint(-(2**31), 2**31 - 1, (rows, groups), dtype=torch.int64).to(torch.int32)
    scales = bits.view(torch.float32)
    scales = torch.where(scales.isfinite(), scales, torch.ones_like(scales))
    codes = torch.arange(256).repeat(rows, groups)[:, torch.randperm(groups * group_size)]
    codes = (codes - 128).to(torch.int8) if signed else codes.to(torch.uint8)
    zeros = torch.randint(0, 256, (rows, groups), dtype=torch.uint8) if with_zeros else None
    q = QuantizedTensor(codes, scales, zeros, 8, group_size, codes.shape, torch.float32)
    assert torch.equal(_int8_dequantize(q, dtype), dequantize_reference(q, dtype))


@pytest.mark.parametrize("shape,group_size", [((0, 32), 32), ((4, 0), 1), ((0,), 4)])
def test_dequantize_int8_empty(shape, group_size):
    data = torch.zeros(shape, dtype=torch.uint8)
    scales = torch.ones(*shape[:-1], shape[-1] // group_size)
    zeros = torch.zeros_like(scales, dtype=torch.uint8)
    q = QuantizedTensor(data, scales, zeros, 8, group_size, data.shape, torch.float32)
    got = _int8_dequantize(q, torch.bfloat16)
    assert got.shape == shape and got.dtype == torch.bfloat16
    assert torch.equal(got, dequantize_reference(q, torch.bfloat16))


def test_dequantize_int8_unaligned_view():
    # Codes at an odd offset: the vectorised loop must not assume aligned rows.
    codes = torch.randint(-127, 128, (4, 63), dtype=torch.int8)
    data = torch.cat([torch.zeros(1, dtype=torch.int8), codes.reshape(-1)])[1:].reshape(4, 63)
    q = QuantizedTensor(data, torch.rand(4, 3), None, 8, 21, data.shape, torch.float32)
    assert torch.equal(_int8_dequantize(q, torch.float32), dequantize_reference(q, torch.float32))


@pytest.mark.parametrize("threads", [1, 2])
def test_dequantize_int8_is_thread_independent(threads):
    # Enough rows for the rows to be split across threads.
    codes, scales, zeros = quantize_codes_reference(torch.randn(4096, 64), 8, 16, False)
    q = QuantizedTensor(codes, scales, zeros, 8, 16, codes.shape, torch.float32)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert torch.equal(_int8_dequantize(q, torch.float16), dequantize_reference(q, torch.float16))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_dequantize_through_public_op_on_the_cpu_tier(force_tier, bits, symmetric):
    """The cpu tier runs the kernels for its three output dtypes and the reference for float64."""
    force_tier("cpu", torch.device("cpu"))
    from flux_engine.ops import dequantize
    from flux_engine.ops.quantize import quantize_reference

    q = quantize_reference(torch.randn(2, 6, 64, dtype=torch.float64), bits, 32, symmetric)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        got = dequantize(q, dtype)
        assert got.dtype == dtype and torch.equal(got, dequantize_reference(q, dtype))
    assert dequantize(q).dtype == torch.float64


def _ids(*shape, dtype=torch.int32):
    return torch.zeros(shape, dtype=dtype)


@pytest.mark.parametrize(
    "args,match",
    [
        ((_ids(4, 2, dtype=torch.int64), 4, None), "topk_ids"),
        ((_ids(4), 4, None), "topk_ids"),
        ((_ids(2, 4).t(), 4, None), "topk_ids"),
        ((_ids(4, 2), 0, None), "num_experts"),
        ((torch.full((4, 2), 4, dtype=torch.int32), 4, None), "topk_ids"),
        ((torch.full((4, 2), -1, dtype=torch.int32), 4, None), "topk_ids"),
        ((_ids(4, 2), 4, _ids(3, dtype=torch.int64)), "expert_map"),
        ((_ids(4, 2), 4, _ids(3, 1)), "expert_map"),
        ((torch.ones(4, 2, dtype=torch.int32), 2, torch.tensor([0, 2, 1], dtype=torch.int32)), "expert_map"),
        ((torch.full((4, 2), 3, dtype=torch.int32), 2, _ids(3)), "topk_ids"),
        ((_ids(4, 2, dtype=torch.int32).to("meta"), 4, None), "topk_ids"),
    ],
)
def test_permute_bad_input(args, match):
    with pytest.raises(RuntimeError, match=match):
        _EXT.permute(*args)


def _u8(*shape):
    return torch.zeros(shape, dtype=torch.uint8)


@pytest.mark.parametrize(
    "fn,args,match",
    [
        ("pack_int4", (_u8(4, 3),), "even"),
        ("pack_int4", (torch.zeros(4, 2, dtype=torch.int32),), "codes"),
        ("pack_int4", (_u8(2, 4).t(),), "codes"),
        ("pack_int4", (torch.tensor(3, dtype=torch.uint8),), "codes"),
        ("unpack_int4", (torch.zeros(4, 2),), "packed"),
        ("dequantize_int4", (_u8(2, 32), torch.ones(2, 2), None, 32, torch.int32), "dtype"),
        ("dequantize_int4", (_u8(2, 32), torch.ones(2, 2), None, 24, torch.float32), "group_size"),
        ("dequantize_int4", (_u8(2, 32), torch.ones(2, 64), None, 1, torch.float32), "group_size"),
        ("dequantize_int4", (_u8(2, 32), torch.ones(2, 3), None, 32, torch.float32), "scales"),
        ("dequantize_int4", (_u8(2, 32), torch.ones(3, 2), None, 32, torch.float32), "scales"),
        ("dequantize_int4", (_u8(2, 32), torch.ones(2, 2, dtype=torch.float64), None, 32, torch.float32), "scales"),
        ("dequantize_int4", (_u8(2, 32), torch.ones(2, 2), _u8(2, 3), 32, torch.float32), "zeros"),
        ("dequantize_int4", (_u8(2, 32), torch.ones(2, 2), torch.zeros(2, 2), 32, torch.float32), "zeros"),
        ("dequantize_int4", (_u8(2, 32).to(torch.int8), torch.ones(2, 2), None, 32, torch.float32), "packed"),
        ("dequantize_int4", (_u8(2, 32), torch.ones(2, 2).to("meta"), None, 32, torch.float32), "scales"),
    ],
)
def test_int4_bad_input(fn, args, match):
    with pytest.raises(RuntimeError, match=match):
        getattr(_EXT, fn)(*args)


def _i8(*shape):
    return torch.zeros(shape, dtype=torch.int8)


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.zeros(2, 32), torch.ones(2, 1), None, 32, torch.float32), "data"),
        ((torch.zeros(2, 32, dtype=torch.int32), torch.ones(2, 1), None, 32, torch.float32), "data"),
        ((_i8(32, 2).t(), torch.ones(2, 1), None, 32, torch.float32), "data"),
        ((torch.tensor(3, dtype=torch.int8), torch.ones(1), None, 1, torch.float32), "data"),
        ((_i8(2, 32).to("meta"), torch.ones(2, 1), None, 32, torch.float32), "data"),
        ((_i8(2, 32), torch.ones(2, 1), None, 32, torch.int32), "dtype"),
        ((_i8(2, 32), torch.ones(2, 1), None, 32, torch.float64), "dtype"),
        ((_i8(2, 32), torch.ones(2, 1), None, 0, torch.float32), "group_size"),
        ((_i8(2, 32), torch.ones(2, 1), None, 5, torch.float32), "group_size"),
        ((_i8(2, 32), torch.ones(2, 3), None, 16, torch.float32), "scales"),
        ((_i8(2, 32), torch.ones(3, 1), None, 32, torch.float32), "scales"),
        ((_i8(2, 32), torch.ones(32), None, 32, torch.float32), "scales"),
        ((_i8(2, 32), torch.ones(2, 1, dtype=torch.float64), None, 32, torch.float32), "scales"),
        ((_i8(2, 32), torch.ones(2, 1).to("meta"), None, 32, torch.float32), "scales"),
        ((_i8(2, 32), torch.ones(2, 1), _u8(2, 1), 32, torch.float32), "zeros"),
        ((_u8(2, 32), torch.ones(2, 1), _u8(2, 2), 32, torch.float32), "zeros"),
        ((_u8(2, 32), torch.ones(2, 1), torch.zeros(2, 1), 32, torch.float32), "zeros"),
    ],
)
def test_int8_bad_input(args, match):
    with pytest.raises(RuntimeError, match=match):
        _EXT.dequantize_int8(*args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_int8_cuda_tensors_raise():
    with pytest.raises(RuntimeError, match="no CUDA kernel"):
        _EXT.dequantize_int8(_i8(2, 32).cuda(), torch.ones(2, 1, device="cuda"), None, 32, torch.float32)


def test_has_cuda_is_bool():
    assert isinstance(_EXT.has_cuda(), bool)


@pytest.mark.skipif(
    not torch.cuda.is_available() or _EXT is None or _EXT.has_cuda(), reason="needs a GPU and a CPU-only extension"
)
def test_cuda_tensor_without_cuda_kernels_raises():
    with pytest.raises(RuntimeError, match="without CUDA kernels"):
        _EXT.pack_int4(torch.zeros(4, dtype=torch.uint8, device="cuda"))


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_non_contiguous_weight_on_the_cpu_tier(force_tier, bits):
    """A transposed (or sliced) weight used to fail in the cpu tier's int4 packer ("codes must be contiguous")."""
    force_tier("cpu", torch.device("cpu"))
    from flux_engine.ops import dequantize, quantize
    from flux_engine.ops.quantize import quantize_reference

    for w in (torch.randn(64, 32).t(), torch.randn(8, 128)[:, ::2]):
        assert not w.is_contiguous()
        q, want = quantize(w, bits, 32), quantize_reference(w.contiguous(), bits, 32, True)
        assert torch.equal(q.data, want.data) and torch.equal(q.scales, want.scales)
        assert torch.equal(dequantize(q), dequantize_reference(want, torch.float32))
