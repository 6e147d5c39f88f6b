"""The triton tier of ``grouped_mlp`` and ``permute`` against their torch references.

Without a GPU the kernels run on CPU tensors through Triton's interpreter (tests/conftest.py), with 16-wide
blocks; H = 24 and I = 40 are not multiples of them, so every masked edge runs. The interpreter runs one
program at a time, so the (E, k, T) cross product is subsampled: every E in {1, 3, 8, 64}, every k in
{1, 2, 6, E} and every T in {1, 7, 300} appears, T = 300 only where E is small.

Errors are norm-relative: fp32 < 1e-4 (TF32 on a GPU: tests/tolerances.py), bf16/fp16 < 2e-2 (the interpreter rounds fp32 -> bf16 by truncation,
which roughly doubles bf16 errors compared with a GPU).
"""

import pytest
import torch
from host_sync import assert_no_host_sync
from tolerances import FP32_GEMM

import flux_engine.triton_kernels.grouped_mlp as kernels
import flux_engine.triton_kernels.grouped_mlp_configs as configs
from flux_engine.ops import grouped_mlp, permute
from flux_engine.ops.grouped_mlp import grouped_mlp_reference
from flux_engine.ops.permute import permute_reference
from flux_engine.triton_kernels.grouped_mlp_autograd import grouped_mlp as triton_grouped_mlp

pytestmark = pytest.mark.triton

H, I = 24, 40
TOL = {torch.float32: FP32_GEMM, torch.bfloat16: 2e-2, torch.float16: 2e-2}
PARAMS = ("x", "gate_up", "down", "topk_weights")


@pytest.fixture
def triton_device(device, force_tier):
    force_tier("triton", device)
    return device


def topk_ids(T: int, num_original: int, k: int, device) -> torch.Tensor:
    """Distinct experts per token, as a router's top-k gives."""
    return torch.rand(T, num_original).topk(k, dim=1).indices.to(torch.int32).to(device)


def make_inputs(T, E, k, dtype, device, ids=None, requires_grad=PARAMS):
    """``dict`` of grouped_mlp's tensor arguments; weights scaled so outputs are O(1)."""
    ids = topk_ids(T, E, k, device) if ids is None else ids.to(device)
    tensors = {
        "x": torch.randn(T, H),
        "gate_up": torch.randn(E, 2 * I, H) / H**0.5,
        "down": torch.randn(E, H, I) / I**0.5,
        "topk_weights": torch.rand(ids.shape),
    }
    for name, t in tensors.items():
        t = t.to(device=device, dtype=dtype if name != "topk_weights" else torch.float32)
        tensors[name] = t.requires_grad_(name in requires_grad)
    tensors["topk_ids"] = ids
    return tensors


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def run_with_grads(fn, inputs, expert_map=None):
    """Output and gradients (None where an input does not require grad) for a fixed random cotangent."""
    out = fn(inputs["x"], inputs["gate_up"], inputs["down"], inputs["topk_weights"], inputs["topk_ids"], expert_map)
    wrt = [inputs[n] for n in PARAMS if inputs[n].requires_grad]
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    grads = iter(torch.autograd.grad(out, wrt, cotangent))
    return out, {n: next(grads) if inputs[n].requires_grad else None for n in PARAMS}


def reference_fn(x, gate_up, down, topk_weights, ids, expert_map):
    return grouped_mlp_reference(x.float(), gate_up.float(), down.float(), topk_weights, ids, expert_map, None)


def check_against_reference(inputs, expert_map=None):
    dtype = inputs["x"].dtype
    out, grads = run_with_grads(grouped_mlp, inputs, expert_map)
    ref, ref_grads = run_with_grads(reference_fn, inputs, expert_map)
    assert out.dtype == dtype and out.shape == inputs["x"].shape
    assert rel_err(out, ref) < TOL[dtype], "output"
    for name in PARAMS:
        if ref_grads[name] is not None:
            assert grads[name].dtype == inputs[name].dtype and grads[name].shape == inputs[name].shape, name
            assert rel_err(grads[name], ref_grads[name]) < TOL[dtype], name
    return out, grads


# (E, k, T): every E, k and T of the issue at least once; k = E for E = 1, 3, 8 (k = 64 only in the
# permutation tests: 64 experts x every slot is the slowest case the interpreter could run here).
SHAPES = [(1, 1, 1), (1, 1, 7), (3, 1, 7), (3, 2, 1), (3, 3, 7), (8, 2, 300), (8, 6, 7), (8, 8, 1), (64, 6, 7)]


@pytest.mark.parametrize("E,k,T", SHAPES, ids=[f"E{e}-k{k}-T{t}" for e, k, t in SHAPES])
def test_forward_backward_fp32(triton_device, E, k, T):
    check_against_reference(make_inputs(T, E, k, torch.float32, triton_device))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("E,k,T", [(8, 2, 19), (3, 3, 7)], ids=["E8-k2-T19", "E3-k3-T7"])
def test_forward_backward_half(triton_device, dtype, E, k, T):
    check_against_reference(make_inputs(T, E, k, dtype, triton_device))


@pytest.mark.parametrize(
    "num_original,E,k,T,dtype",
    [
        (8, 2, 6, 37, torch.float32),
        (64, 8, 6, 7, torch.float32),
        (4, 1, 3, 7, torch.float32),
        (8, 3, 4, 19, torch.bfloat16),
    ],
    ids=["8to2-k6", "64to8-k6", "4to1-k3", "8to3-k4-bf16"],
)
def test_expert_map_many_to_one(triton_device, num_original, E, k, T, dtype):
    """Merged experts: a token's slots on one merged expert collapse into one row whose weight is their sum."""
    expert_map = (torch.arange(num_original) % E).to(torch.int32).to(triton_device)
    inputs = make_inputs(T, E, k, dtype, triton_device, ids=topk_ids(T, num_original, k, "cpu"))
    check_against_reference(inputs, expert_map)
    plan = permute(inputs["topk_ids"], E, expert_map)
    assert int(plan.expert_offsets[-1]) < T * k  # rows really collapsed: fewer rows than slots


def test_empty_experts(triton_device):
    ids = torch.tensor([0, 5])[torch.randint(0, 2, (23, 1))].to(torch.int32)
    ids = torch.cat([ids, 5 - ids], dim=1)  # experts 0 and 5 only; 1-4, 6, 7 get no rows
    check_against_reference(make_inputs(23, 8, 2, torch.float32, triton_device, ids=ids))


def test_all_tokens_on_one_expert(triton_device):
    ids = torch.full((40, 1), 6, dtype=torch.int32)
    check_against_reference(make_inputs(40, 8, 1, torch.float32, triton_device, ids=ids))


def test_no_tokens(triton_device):
    inputs = make_inputs(0, 8, 2, torch.float32, triton_device)
    out = grouped_mlp(*(inputs[n] for n in ("x", "gate_up", "down", "topk_weights", "topk_ids")))
    assert out.shape == (0, H)
    out.sum().backward()
    assert inputs["x"].grad.shape == (0, H)
    assert not inputs["gate_up"].grad.any() and not inputs["down"].grad.any()


def test_inference_saves_nothing(triton_device, monkeypatch):
    """Under no_grad there is no autograd node and the gate/up pre-activations are never stored."""
    store_gu = []
    real = kernels.gate_up_forward
    monkeypatch.setattr(kernels, "gate_up_forward", lambda *a, **kw: store_gu.append(kw["store_gu"]) or real(*a, **kw))
    inputs = make_inputs(7, 3, 2, torch.float32, triton_device)
    args = [inputs[n] for n in ("x", "gate_up", "down", "topk_weights", "topk_ids")]
    with torch.no_grad():
        out = grouped_mlp(*args)
        ref = reference_fn(*args, None)
    assert store_gu == [False] and out.grad_fn is None
    assert rel_err(out, ref) < FP32_GEMM


def test_weight_grads_skipped_when_frozen(triton_device, monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "weight_grad", lambda *a, **kw: calls.append(a) or pytest.fail("weight grad computed"))
    inputs = make_inputs(19, 8, 2, torch.float32, triton_device, requires_grad=("x", "topk_weights"))
    _, grads = check_against_reference(inputs)
    assert not calls and grads["gate_up"] is None and grads["down"] is None
    assert inputs["gate_up"].grad is None and inputs["down"].grad is None


def test_only_down_requires_grad(triton_device):
    check_against_reference(make_inputs(19, 3, 2, torch.float32, triton_device, requires_grad=("down",)))


def test_atomic_scatter_agrees(triton_device):
    inputs = make_inputs(19, 4, 3, torch.float32, triton_device)
    atomic = lambda *args: triton_grouped_mlp(*args, atomic_scatter=True)  # noqa: E731
    out, grads = run_with_grads(atomic, inputs)
    ref, ref_grads = run_with_grads(reference_fn, inputs)
    assert rel_err(out, ref) < FP32_GEMM
    for name in PARAMS:
        assert rel_err(grads[name], ref_grads[name]) < FP32_GEMM, name


def test_atomic_scatter_env_flag(triton_device, monkeypatch):
    monkeypatch.setenv("FLUX_ENGINE_ATOMIC_SCATTER", "1")
    used = []
    real = kernels.rows_matmul

    def spy(*args, **kwargs):
        used.append(kwargs.get("scatter_into") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "rows_matmul", spy)
    check_against_reference(make_inputs(7, 3, 2, torch.float32, triton_device))
    assert used == [True, True]  # forward down GEMM and backward dx GEMM


def test_deterministic(triton_device):
    """The default path is bit-reproducible, including merged experts and their collapsed rows."""
    expert_map = torch.tensor([0, 1, 1, 2, 0, 2, 1, 0], dtype=torch.int32, device=triton_device)
    inputs = make_inputs(29, 3, 4, torch.bfloat16, triton_device, ids=topk_ids(29, 8, 4, "cpu"))
    first = run_with_grads(grouped_mlp, inputs, expert_map)
    second = run_with_grads(grouped_mlp, inputs, expert_map)
    assert torch.equal(first[0], second[0])
    for name in PARAMS:
        assert torch.equal(first[1][name], second[1][name]), name


def test_recompute_matches_saved(triton_device, monkeypatch):
    """Recomputing the pre-activations in backward gives the very same gradients as saving them."""
    inputs = make_inputs(13, 3, 2, torch.bfloat16, triton_device)
    saved = run_with_grads(grouped_mlp, inputs)
    monkeypatch.setenv("FLUX_ENGINE_MOE_RECOMPUTE", "1")
    recomputed = run_with_grads(grouped_mlp, inputs)
    for name in PARAMS:
        assert torch.equal(saved[1][name], recomputed[1][name]), name


def test_weight_grad_for_loop_variant(triton_device, monkeypatch):
    """The row sweep compiled GPUs use (a for loop with runtime bounds) agrees with the interpreter's while loop."""
    from triton.runtime.errors import InterpreterError

    inputs = make_inputs(23, 3, 2, torch.float32, triton_device)
    expected = run_with_grads(grouped_mlp, inputs)[1]
    monkeypatch.setattr(kernels, "row_loop_is_for", lambda: True)
    try:
        got = run_with_grads(grouped_mlp, inputs)[1]
    except InterpreterError as e:
        pytest.skip(f"this Triton's interpreter cannot run runtime range() bounds: {e}")
    assert torch.equal(got["gate_up"], expected["gate_up"]) and torch.equal(got["down"], expected["down"])


@pytest.mark.parametrize(
    "T,num_original,E,k,mapped",
    [(0, 4, 4, 2, False), (1, 1, 1, 1, False), (7, 3, 3, 3, False), (300, 8, 8, 2, False), (300, 64, 64, 6, False),
     (300, 64, 8, 6, True), (257, 8, 2, 8, True), (100, 130, 130, 4, False)],
)  # fmt: skip
def test_permute_bit_exact(triton_device, T, num_original, E, k, mapped):
    ids = topk_ids(T, num_original, k, triton_device)
    expert_map = torch.randint(0, E, (num_original,), device=triton_device) if mapped else None
    got, want = permute(ids, E, expert_map), permute_reference(ids, E, expert_map)
    for field in ("sorted_token_ids", "expert_offsets", "slot_rows"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field


def test_permute_int64_ids_and_strides(triton_device):
    ids = topk_ids(50, 16, 8, triton_device).long().t().contiguous().t()  # column-major [T, k]
    got, want = permute(ids, 16), permute_reference(ids, 16, None)
    assert torch.equal(got.slot_rows, want.slot_rows) and torch.equal(got.sorted_token_ids, want.sorted_token_ids)


# ------------------------------------------------------------------------------------------------ configs


# Usable shared memory per block (KiB) of each table's architecture.
_SMEM_KIB = {"sm_80": 163, "sm_86": 99, "sm_89": 99, "sm_90": 227}


@pytest.mark.parametrize("arch", sorted(configs.DEFAULTS))
def test_default_configs_fit_shared_memory(arch):
    for kind in configs.KIND_FAMILY:
        for bucket in (1, 16, 64, 256, 4096):
            for dtype in (torch.bfloat16, torch.float32):
                cfg = configs.default_config(arch, kind, bucket, dtype)
                b_width = 2 * cfg.BLOCK_N if kind == "gate_up" else cfg.BLOCK_N  # gate and up columns
                stage = (cfg.BLOCK_M + b_width) * cfg.BLOCK_K * dtype.itemsize
                assert stage * cfg.num_stages <= _SMEM_KIB[arch] * 1024, (arch, kind, bucket, dtype, cfg)
                assert min(cfg.BLOCK_M, cfg.BLOCK_N, cfg.BLOCK_K) >= 16  # tl.dot's minimum


def test_config_disk_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("FLUX_ENGINE_CACHE", str(tmp_path))
    configs._disk_cache.cache_clear()
    try:
        cache = configs._disk_cache("NVIDIA H100 80GB HBM3")
        assert cache.path.parent == tmp_path / "triton" / "grouped_mlp"
        key = configs._key("down", 2048, 768, 256, torch.bfloat16)
        assert cache.get(key) is None
        cfg = configs.BlockConfig(64, 128, 64, 8, 4, 4)
        cache.put(key, cfg)
        assert configs._DiskCache(cache.path).get(key) == cfg  # a fresh process reads it back
    finally:
        configs._disk_cache.cache_clear()


def test_autotune_picks_fastest_and_persists(tmp_path, monkeypatch):
    """The host side of autotuning, with a fake GPU and a fake timer: the fastest fitting candidate is kept
    on disk and reused without tuning again."""
    import triton.testing
    from triton.runtime.errors import OutOfResources

    monkeypatch.setenv("FLUX_ENGINE_CACHE", str(tmp_path))
    monkeypatch.setenv("FLUX_ENGINE_AUTOTUNE", "1")
    monkeypatch.setattr(configs, "triton_interpreting", lambda: False)
    monkeypatch.setattr(configs, "arch_of", lambda device: "sm_90")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    configs._disk_cache.cache_clear()
    candidates = configs._candidates("sm_90", "down", torch.bfloat16)
    too_big, fastest = candidates[-1], candidates[1]

    def fake_do_bench(fn, warmup, rep):
        cfg = fn()
        if cfg == too_big:
            raise OutOfResources(300000, 232448, "shared memory")
        return 1.0 if cfg == fastest else 2.0

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    tuned = []
    cuda = torch.device("cuda")
    try:
        down = ("down", 2048, 768, 128, torch.bfloat16, cuda)
        assert configs.config_for(*down, tune=lambda c: tuned.append(c) or c) == fastest
        assert len(tuned) == len(candidates)
        configs._disk_cache.cache_clear()  # as a new process would
        assert configs.config_for(*down, tune=lambda c: pytest.fail("tuned again")) == fastest
        monkeypatch.setenv("FLUX_ENGINE_AUTOTUNE", "0")
        default = configs.default_config("sm_90", "dx", 128, torch.bfloat16)
        assert configs.config_for("dx", 2048, 1536, 128, torch.bfloat16, cuda) == default
    finally:
        configs._disk_cache.cache_clear()


def test_interpreter_uses_fixed_config():
    assert configs.config_for("down", 2048, 768, 256, torch.bfloat16, torch.device("cpu")) == configs.INTERPRETER


# ------------------------------------------------------------------------ compiled for a GPU, without one


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """The compiled path, which the interpreter never runs (TF32 and bf16 dots, packed-weight tiles, for loops with
    runtime bounds, software pipelining), compiles with ptxas for sm_90 for every kernel and config bucket:
    no spills, shared memory fits, wgmma where BLOCK_M >= 64, no FMA dots (tests/sm90_compile.py; its table of
    registers and spills per kernel is printed)."""
    import os
    import subprocess
    import sys

    try:
        from triton._C.libtriton import native_specialize_impl  # noqa: F401
    except ImportError as e:
        pytest.skip(f"this Triton has no specialisation hook used to mimic a JIT launch: {e}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "sm90_compile.py")
    result = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=1200)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr


# -------------------------------------------------------------------------------------------- GPU only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-sync checks need a CUDA device")
@pytest.mark.parametrize("atomic", ["0", "1"], ids=["combine", "atomic"])
def test_no_host_sync_on_cuda(force_tier, monkeypatch, atomic):
    """The public op on the triton tier (validation, permutation, forward, backward) never waits for the GPU."""
    device = torch.device("cuda")
    force_tier("triton", device)
    monkeypatch.setenv("FLUX_ENGINE_ATOMIC_SCATTER", atomic)
    inputs = make_inputs(300, 8, 4, torch.bfloat16, device, ids=topk_ids(300, 16, 4, device))
    expert_map = (torch.arange(16, device=device) % 8).to(torch.int32)
    args = [inputs[n] for n in ("x", "gate_up", "down", "topk_weights", "topk_ids")]

    def step():
        out = grouped_mlp(*args, expert_map=expert_map)
        torch.autograd.grad(out, [inputs[n] for n in PARAMS], torch.ones_like(out))

    assert_no_host_sync(step)
