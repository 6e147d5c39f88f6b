"""Sparse LoRA and full-size tuning experts in ``grouped_mlp``, every tier against a dense plain-autograd oracle.

The oracle runs every physical expert on every token and weights the results by a ``[T, E]`` matrix of summed
routing weights, so it shares nothing with the kernels' permutation, shrink/expand or backward formulas. The
Triton tier runs under the interpreter on CPU (16-wide blocks; H = 24, I = 40 leave ragged edges), the
reference tier directly. Ranks 1, 8, 16, 64; LoRA slots on 0, 1, E/4 and E experts; base fp32, bf16 or int4.
"""

import pytest
import torch
from host_sync import assert_no_host_sync
from tolerances import FP32_GEMM
import torch.nn.functional as F

from flux_engine.ops import ExpertLoRA, TunedExperts, dequantize, grouped_mlp, quantize
from flux_engine.ops.quantize import QuantizedTensor

H, I = 24, 40
TOL = {torch.float32: FP32_GEMM, torch.bfloat16: 2e-2}
TIERS = ["reference", pytest.param("triton", marks=pytest.mark.triton)]


@pytest.fixture(params=TIERS)
def tier_device(request, device, force_tier):
    force_tier(request.param, device)
    return device


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def oracle(x, gate_up, down, weights, ids, expert_map, lora, tuned):
    """Dense fp32: ``out[t] = sum_e c[t, e] f_e(x_t)`` with ``c`` the summed weights of t's slots on e."""
    if isinstance(gate_up, QuantizedTensor):
        gate_up, down = dequantize(gate_up, torch.float32), dequantize(down, torch.float32)
    gu, dn = gate_up.float(), down.float()
    if tuned is not None:
        gu, dn = torch.cat([tuned.gate_up.float(), gu]), torch.cat([tuned.down.float(), dn])
    E = gu.shape[0]
    phys = ids.long() if expert_map is None else expert_map.long()[ids.long()]
    coef = torch.zeros(x.shape[0], E).scatter_add(1, phys, weights.float())
    xs = x.float()
    pre = torch.einsum("th,enh->ten", xs, gu)
    pslot = [-1] * E
    if lora is not None:
        for e, s in enumerate(lora.slots.tolist()):
            if s >= 0:
                pslot[e if expert_map is None else int(expert_map[e])] = s
    delta = lambda v, A, B, s: (v @ A[s].float().t()) @ B[s].float().t() * lora.scale  # noqa: E731
    if lora is not None and lora.gate_up_A is not None:
        pre = torch.stack([pre[:, e] + delta(xs, lora.gate_up_A, lora.gate_up_B, s) if s >= 0 else pre[:, e]
                           for e, s in enumerate(pslot)], 1)  # fmt: skip
    gate, up = pre.chunk(2, dim=-1)
    h = F.silu(gate) * up
    y = torch.einsum("tei,ehi->teh", h, dn)
    if lora is not None and lora.down_A is not None:
        y = torch.stack([y[:, e] + delta(h[:, e], lora.down_A, lora.down_B, s) if s >= 0 else y[:, e]
                         for e, s in enumerate(pslot)], 1)  # fmt: skip
    return (coef[..., None] * y).sum(1)


def make_case(T, E, k, r, S, dtype, base="plain", num_original=None, expert_map=None, targets=("gate_up", "down"),
              tuned=0, seed=0):  # fmt: skip
    """Inputs with LoRA slots on ``S`` randomly chosen physical-owning experts and ``tuned`` full-size experts."""
    g = torch.Generator().manual_seed(seed)
    E_phys = E + tuned
    num_original = num_original or E_phys
    ids = torch.rand(T, num_original, generator=g).topk(k, dim=1).indices.to(torch.int32)
    x = torch.randn(T, H, generator=g).to(dtype).requires_grad_()
    weights = torch.rand(T, k, generator=g).requires_grad_()
    gate_up = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(dtype)
    down = (torch.randn(E, H, I, generator=g) / I**0.5).to(dtype)
    if base == "int4":
        gate_up, down = quantize(gate_up.float(), 4, 8), quantize(down.float(), 4, 8)
    t = None
    if tuned:
        t = TunedExperts(
            (torch.randn(tuned, 2 * I, H, generator=g) / H**0.5).to(dtype).requires_grad_(),
            (torch.randn(tuned, H, I, generator=g) / I**0.5).to(dtype).requires_grad_(),
        )
    lora = None
    if S is not None:
        owners = torch.randperm(num_original, generator=g)[:S]
        slots = torch.full((num_original,), -1, dtype=torch.int64)
        slots[owners] = torch.arange(S)
        factors = {}
        for name, fan_in, fan_out in (("gate_up", H, 2 * I), ("down", I, H)):
            if name in targets:
                A = (torch.randn(S, r, fan_in, generator=g) / fan_in**0.5).to(dtype).requires_grad_()
                B = (torch.randn(S, fan_out, r, generator=g) / r**0.5).to(dtype).requires_grad_()
                factors.update({f"{name}_A": A, f"{name}_B": B})
        lora = ExpertLoRA(slots, scale=2.0 / r, **factors)
    return dict(x=x, gate_up=gate_up, down=down, weights=weights, ids=ids, expert_map=expert_map, lora=lora, tuned=t)


def differentiable(case):
    out = {"x": case["x"], "weights": case["weights"]}
    lora, tuned = case["lora"], case["tuned"]
    if lora is not None:
        for name in ("gate_up_A", "gate_up_B", "down_A", "down_B"):
            if getattr(lora, name) is not None:
                out[name] = getattr(lora, name)
    if tuned is not None:
        out.update(tuned_gate_up=tuned.gate_up, tuned_down=tuned.down)
    return out


def to_device(case, device):
    def mv(t):
        if t is None or isinstance(t, QuantizedTensor) and device.type == "cpu":
            return t
        if isinstance(t, QuantizedTensor):
            return QuantizedTensor(t.data.to(device), t.scales.to(device), None if t.zeros is None else t.zeros.to(device),
                                   t.bits, t.group_size, t.shape, t.dtype)  # fmt: skip
        return t.detach().to(device).requires_grad_(t.requires_grad)

    out = {k: mv(v) if not isinstance(v, (ExpertLoRA, TunedExperts)) else v for k, v in case.items()}
    if case["lora"] is not None:
        lo = case["lora"]
        out["lora"] = ExpertLoRA(mv(lo.slots), mv(lo.gate_up_A), mv(lo.gate_up_B), mv(lo.down_A), mv(lo.down_B), lo.scale)
    if case["tuned"] is not None:
        out["tuned"] = TunedExperts(mv(case["tuned"].gate_up), mv(case["tuned"].down))
    return out


def check(case, device):
    """Output and all gradients of ``grouped_mlp`` on ``device`` vs the oracle on CPU."""
    dtype = case["x"].dtype
    dev_case = to_device(case, device)

    def run(fn, c):
        out = fn(c["x"], c["gate_up"], c["down"], c["weights"], c["ids"], c["expert_map"], c["lora"], c["tuned"])
        wrt = differentiable(c)
        cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
        grads = torch.autograd.grad(out, list(wrt.values()), cot, allow_unused=True)
        return out, {n: torch.zeros_like(t) if g is None else g for (n, t), g in zip(wrt.items(), grads)}

    def op(x, gate_up, down, weights, ids, expert_map, lora, tuned):
        return grouped_mlp(x, gate_up, down, weights, ids, expert_map, lora=lora, tuned=tuned)

    got, got_grads = run(op, dev_case)
    want, want_grads = run(oracle, case)
    assert got.dtype == dtype and rel_err(got.cpu(), want) < TOL[dtype], "output"
    for name, g in want_grads.items():
        actual = got_grads[name]
        assert actual.shape == g.shape and actual.dtype == differentiable(dev_case)[name].dtype, name
        if g.norm() == 0:
            assert actual.norm() == 0, name
        else:
            assert rel_err(actual.cpu(), g) < TOL[dtype], name
    return got


# (r, S) pairs: every rank in {1, 8, 16, 64} and every S in {0, 1, E/4, E} for E = 8.
RANKS_SLOTS = [(1, 1), (8, 2), (16, 8), (64, 2), (8, 0)]


@pytest.mark.parametrize("r,S", RANKS_SLOTS, ids=[f"r{r}-S{s}" for r, s in RANKS_SLOTS])
def test_lora_fp32(tier_device, r, S):
    check(make_case(19, 8, 2, r, S, torch.float32), tier_device)


@pytest.mark.parametrize("r,S", [(8, 2), (16, 8)], ids=["r8-S2", "r16-S8"])
def test_lora_bf16(tier_device, r, S):
    check(make_case(19, 8, 2, r, S, torch.bfloat16), tier_device)


@pytest.mark.parametrize(
    "dtype,r,S", [(torch.float32, 8, 2), (torch.float32, 1, 8), (torch.bfloat16, 16, 2)], ids=["fp32-r8", "fp32-r1-S8", "bf16"]
)
def test_lora_over_int4_base(tier_device, dtype, r, S):
    """QLoRA-style: the packed base is read in forward and in dX, and gets no gradient."""
    check(make_case(19, 8, 2, r, S, dtype, base="int4"), tier_device)


@pytest.mark.parametrize("targets", [("gate_up",), ("down",)], ids=["gate_up-only", "down-only"])
def test_lora_one_projection(tier_device, targets):
    check(make_case(11, 4, 2, 4, 2, torch.float32, targets=targets), tier_device)


def test_lora_on_tuning_experts_of_a_merged_layer(tier_device):
    """16 original experts: 2 tuning experts own physical 0 and 1 (LoRA slots), the other 14 share 4 merged ones."""
    emap = torch.tensor([0, 1] + [2 + (e % 4) for e in range(14)], dtype=torch.int32)
    case = make_case(23, 6, 4, 8, None, torch.float32, num_original=16, expert_map=emap)
    A = torch.randn(2, 8, H) / H**0.5
    B = torch.randn(2, 2 * I, 8) / 8**0.5
    slots = torch.full((16,), -1)
    slots[:2] = torch.tensor([1, 0])
    case["lora"] = ExpertLoRA(slots, A.requires_grad_(), B.requires_grad_(), scale=0.5)
    check(case, tier_device)


def test_lora_with_recompute_and_atomics(tier_device, monkeypatch):
    """The triton tier's two switches keep LoRA exact (the reference tier ignores them)."""
    monkeypatch.setenv("FLUX_ENGINE_MOE_RECOMPUTE", "1")
    monkeypatch.setenv("FLUX_ENGINE_ATOMIC_SCATTER", "1")
    check(make_case(19, 8, 2, 8, 2, torch.float32), tier_device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_full_size_tuned_experts(tier_device, dtype):
    """Paper mode: 2 tuned experts (physical 0, 1) train at full size; the 6 frozen base experts get no gradient."""
    check(make_case(19, 6, 2, 1, None, dtype, tuned=2), tier_device)


def test_tuned_experts_with_lora(tier_device):
    case = make_case(19, 6, 2, 4, 3, torch.float32, tuned=2)
    check(case, tier_device)


def test_no_lora_rows_equals_frozen_base(tier_device):
    """LoRA slots only on experts no token reaches, or S = 0: bit-identical to the frozen base alone."""
    case = to_device(make_case(13, 8, 2, 8, 0, torch.float32), tier_device)
    args = (case["x"], case["gate_up"], case["down"], case["weights"], case["ids"])
    base = grouped_mlp(*args)
    assert torch.equal(grouped_mlp(*args, lora=case["lora"]), base)
    ids = case["ids"] % 4  # experts 4..7 unused
    slots = torch.tensor([-1, -1, -1, -1, 0, 1, -1, -1], device=tier_device)
    lora = ExpertLoRA(slots, torch.randn(2, 8, H, device=tier_device), torch.randn(2, 2 * I, 8, device=tier_device))
    args = (case["x"], case["gate_up"], case["down"], case["weights"], ids)
    assert torch.equal(grouped_mlp(*args, lora=lora), grouped_mlp(*args))


def test_slot_shared_by_two_experts_is_an_error(device):
    case = make_case(5, 4, 2, 2, 2, torch.float32)
    lora = case["lora"]
    slots = torch.tensor([0, 0, -1, 1])
    bad = ExpertLoRA(slots, lora.gate_up_A, lora.gate_up_B, lora.down_A, lora.down_B, lora.scale)
    with pytest.raises(ValueError, match="LoRA slot is given to several"):
        grouped_mlp(case["x"], case["gate_up"], case["down"], case["weights"], case["ids"], lora=bad)


def test_tuned_shape_errors():
    case = make_case(5, 4, 2, 2, None, torch.float32, tuned=1)
    bad = TunedExperts(case["tuned"].gate_up, case["tuned"].down[:, :, :3])
    with pytest.raises(ValueError, match=r"tuned.down must have shape"):
        grouped_mlp(case["x"], case["gate_up"], case["down"], case["weights"], case["ids"], tuned=bad)
    ids = torch.full_like(case["ids"], 5)  # 1 tuned + 4 base = 5 physical experts: id 5 is out of range
    with pytest.raises(ValueError, match=r"topk_ids must lie in \[0, 5\)"):
        grouped_mlp(case["x"], case["gate_up"], case["down"], case["weights"], ids, tuned=case["tuned"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-sync checks need a CUDA device")
@pytest.mark.parametrize("variant", ["lora", "lora-int4", "tuned"])
def test_no_host_sync_on_cuda(force_tier, variant):
    """LoRA slots, tuned experts and packed bases add no host synchronisation to the triton tier."""
    device = torch.device("cuda")
    force_tier("triton", device)
    emap = torch.tensor([0, 1] + [2 + (e % 4) for e in range(14)], dtype=torch.int32)
    if variant == "tuned":
        case = make_case(300, 4, 4, 8, None, torch.bfloat16, num_original=16, expert_map=emap, tuned=2)
    else:
        case = make_case(300, 6, 4, 8, 2, torch.bfloat16, base="int4" if variant == "lora-int4" else "plain",
                         num_original=16, expert_map=emap)  # fmt: skip
        slots = torch.full((16,), -1)
        slots[:2] = torch.tensor([0, 1])
        lo = case["lora"]
        case["lora"] = ExpertLoRA(slots, lo.gate_up_A, lo.gate_up_B, lo.down_A, lo.down_B, lo.scale)
    c = to_device(case, device)
    wrt = list(differentiable(c).values())

    def step():
        out = grouped_mlp(c["x"], c["gate_up"], c["down"], c["weights"], c["ids"], c["expert_map"], lora=c["lora"],
                          tuned=c["tuned"])  # fmt: skip
        torch.autograd.grad(out, wrt, torch.ones_like(out))

    assert_no_host_sync(step)


def test_fp32_factors_on_bf16_base(tier_device):
    """The runtime keeps LoRA factors in fp32 (optimizer master weights) over a bf16 base."""
    case = make_case(19, 8, 2, 8, 2, torch.bfloat16)
    lo = case["lora"]
    f32 = [t.detach().float().requires_grad_() for t in (lo.gate_up_A, lo.gate_up_B, lo.down_A, lo.down_B)]
    case["lora"] = ExpertLoRA(lo.slots, *f32, lo.scale)
    check(case, tier_device)
