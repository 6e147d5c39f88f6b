"""The reference tier against independent dense implementations (no sorting, no index tricks)."""

import math

import pytest
import torch
import torch.nn.functional as F

from flux_engine.ops import ExpertLoRA, dequantize, expert_counts, grouped_mlp, permute, quantize, route
from flux_engine.ops.grouped_mlp import grouped_mlp_reference
from flux_engine.ops.quantize import QuantizedTensor


@pytest.fixture(autouse=True)
def _reference_tier(monkeypatch):
    monkeypatch.setenv("FLUX_ENGINE_BACKEND", "reference")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def dense_moe(x, gate_up, down, weights, ids, expert_map=None, lora=None):
    """Every expert on every token in float64, combined through a dense [T, E_phys] weight matrix."""
    x, gate_up, down = x.double(), gate_up.double(), down.double()
    E, two_i, _ = gate_up.shape
    I = two_i // 2
    phys = ids.long() if expert_map is None else expert_map.long()[ids.long()]
    combine = torch.zeros(x.shape[0], E, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            combine[t, phys[t, j]] += weights[t, j].double()
    out = torch.zeros_like(x)
    for e in range(E):
        gu = x @ gate_up[e].t()
        slot = -1
        if lora is not None:
            owners = [o for o in range(lora.slots.numel()) if (expert_map is None and o == e) or (expert_map is not None and expert_map[o] == e)]
            slot = max(int(lora.slots[o]) for o in owners) if owners else -1
        if slot >= 0 and lora.gate_up_A is not None:
            gu = gu + lora.scale * (x @ lora.gate_up_A[slot].double().t()) @ lora.gate_up_B[slot].double().t()
        h = F.silu(gu[:, :I]) * gu[:, I:]
        y = h @ down[e].t()
        if slot >= 0 and lora.down_A is not None:
            y = y + lora.scale * (h @ lora.down_A[slot].double().t()) @ lora.down_B[slot].double().t()
        out += combine[:, e : e + 1] * y
    return out


def random_routing(T, E_orig, k):
    logits = torch.randn(T, E_orig)
    return route(logits, k)


# ---------------------------------------------------------------- route


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("E,k", [(1, 1), (3, 2), (8, 8), (64, 6)])
def test_route_matches_manual_scoring(scoring, renormalize, E, k):
    logits = torch.randn(37, E)
    weights, ids = route(logits, k, scoring=scoring, renormalize=renormalize, scaling_factor=2.5)
    z = logits.double()
    scores = torch.exp(z - z.max(-1, keepdim=True).values)
    scores = scores / scores.sum(-1, keepdim=True) if scoring == "softmax" else 1 / (1 + torch.exp(-z))
    order = torch.argsort(scores, dim=-1, descending=True)[:, :k]
    picked = scores.gather(1, order)
    if renormalize:
        picked = picked / picked.sum(-1, keepdim=True)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.equal(ids.long(), order)
    assert rel_err(weights, 2.5 * picked) < 1e-6


def test_route_low_precision_logits_score_in_fp32():
    logits = torch.randn(16, 8).bfloat16()
    weights, ids = route(logits, 2)
    ref_w, ref_ids = route(logits.float(), 2)
    assert torch.equal(ids, ref_ids) and torch.allclose(weights, ref_w)


# ---------------------------------------------------------------- expert_counts


def test_expert_counts_plain_weighted_and_accumulating():
    ids = torch.randint(0, 5, (40, 3))
    per_token = torch.rand(40)
    per_slot = torch.rand(40, 3)
    plain = torch.zeros(5, dtype=torch.int64)
    tok = torch.zeros(5)
    slot = torch.zeros(5)
    for t in range(40):
        for j in range(3):
            plain[ids[t, j]] += 1
            tok[ids[t, j]] += per_token[t]
            slot[ids[t, j]] += per_slot[t, j]
    assert torch.equal(expert_counts(ids, 5), plain)
    assert torch.allclose(expert_counts(ids, 5, per_token), tok)
    assert torch.allclose(expert_counts(ids, 5, per_slot), slot)
    acc = torch.ones(5, dtype=torch.int64)
    result = expert_counts(ids, 5, out=acc)
    assert result is acc and torch.equal(acc, plain + 1)


# ---------------------------------------------------------------- permute


def loop_permute(ids, E, expert_map=None):
    """Per expert, the sorted unique tokens that reached it; per slot, the row it lands in."""
    T, k = ids.shape
    phys = ids.tolist() if expert_map is None else [[int(expert_map[i]) for i in row] for row in ids.tolist()]
    rows, offsets = [], [0]
    for e in range(E):
        rows += sorted({t for t in range(T) if e in phys[t]})
        offsets.append(len(rows))
    where = {}
    for e in range(E):
        for r in range(offsets[e], offsets[e + 1]):
            where[(rows[r], e)] = r
    slot_rows = [[where[(t, phys[t][j])] for j in range(k)] for t in range(T)]
    return rows, offsets, slot_rows


@pytest.mark.parametrize("T,E,k,merged", [(0, 4, 2, False), (1, 1, 1, False), (7, 3, 2, False), (50, 8, 6, True), (33, 64, 8, True)])
def test_permute_matches_loop(T, E, k, merged):
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]) if T else torch.zeros(0, k, dtype=torch.long)
    expert_map = None
    E_phys = E
    if merged:
        E_phys = max(1, E // 3)
        expert_map = torch.randint(0, E_phys, (E,))
    plan = permute(ids, E_phys, expert_map)
    rows, offsets, slot_rows = loop_permute(ids, E_phys, expert_map)
    n = len(rows)
    assert plan.expert_offsets.tolist() == offsets
    assert plan.sorted_token_ids[:n].tolist() == rows
    assert plan.sorted_token_ids[n:].tolist() == [T] * (T * k - n)
    assert plan.slot_rows.tolist() == slot_rows
    if merged and T:
        assert n < T * k or E_phys == E, "a many-to-one map must collapse some pairs"


def test_row_weights_sum_collapsed_slots():
    ids = torch.tensor([[0, 1], [2, 3]])
    plan = permute(ids, 2, torch.tensor([0, 0, 1, 0]))
    w = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
    rows = plan.row_weights(w)
    # token 0: experts 0,1 -> merged 0 (one row, 1.0); token 1: 2 -> merged 1, 3 -> merged 0.
    assert plan.expert_offsets.tolist() == [0, 2, 3]
    assert plan.sorted_token_ids.tolist() == [0, 1, 1, 2]
    assert rows.tolist() == [1.0, 0.5, 0.5, 0.0]


# ---------------------------------------------------------------- grouped_mlp


@pytest.mark.parametrize("T,H,I,E,k", [(1, 8, 4, 1, 1), (7, 24, 12, 3, 2), (64, 32, 20, 8, 6), (40, 16, 8, 8, 8)])
@pytest.mark.parametrize("merged", [False, True])
def test_grouped_mlp_matches_dense(T, H, I, E, k, merged):
    x = torch.randn(T, H)
    gate_up = torch.randn(E, 2 * I, H) / math.sqrt(H)
    down = torch.randn(E, H, I) / math.sqrt(I)
    weights, ids = random_routing(T, E, k)
    expert_map = None
    gu, dn = gate_up, down
    if merged:
        E_phys = max(1, E // 2)
        expert_map = torch.arange(E) % E_phys
        gu, dn = gate_up[:E_phys], down[:E_phys]
    out = grouped_mlp(x, gu, dn, weights, ids, expert_map)
    assert out.dtype == x.dtype and out.shape == (T, H)
    assert rel_err(out, dense_moe(x, gu, dn, weights, ids, expert_map)) < 1e-5


def test_grouped_mlp_lora_matches_dense():
    T, H, I, E, k, S, r = 30, 16, 12, 8, 2, 3, 4
    x = torch.randn(T, H)
    gate_up = torch.randn(E, 2 * I, H) / 4
    down = torch.randn(E, H, I) / 4
    weights, ids = random_routing(T, E, k)
    slots = torch.full((E,), -1)
    slots[torch.tensor([1, 4, 6])] = torch.tensor([0, 1, 2])
    lora = ExpertLoRA(slots, torch.randn(S, r, H), torch.randn(S, 2 * I, r), torch.randn(S, r, I), torch.randn(S, H, r), scale=0.5)
    out = grouped_mlp(x, gate_up, down, weights, ids, lora=lora)
    assert rel_err(out, dense_moe(x, gate_up, down, weights, ids, lora=lora)) < 1e-5
    # LoRA on merged layers: tuning experts own their physical expert, the rest are merged.
    expert_map = torch.tensor([0, 1, 0, 2, 3, 2, 4, 0])
    slots_orig = torch.tensor([-1, 0, -1, -1, 1, -1, 2, -1])
    lora_m = ExpertLoRA(slots_orig, lora.gate_up_A, lora.gate_up_B, None, None, scale=0.5)
    out = grouped_mlp(x, gate_up[:5], down[:5], weights, ids, expert_map, lora_m)
    assert rel_err(out, dense_moe(x, gate_up[:5], down[:5], weights, ids, expert_map, lora_m)) < 1e-5


def test_grouped_mlp_without_lora_rows_equals_base():
    T, H, I, E = 9, 8, 4, 4
    x, gate_up, down = torch.randn(T, H), torch.randn(E, 2 * I, H), torch.randn(E, H, I)
    weights, ids = random_routing(T, E, 2)
    lora = ExpertLoRA(torch.full((E,), -1), down_A=torch.randn(1, 2, I), down_B=torch.randn(1, H, 2))
    assert torch.equal(grouped_mlp(x, gate_up, down, weights, ids, lora=lora), grouped_mlp(x, gate_up, down, weights, ids))


def test_grouped_mlp_gradients_match_dense():
    T, H, I, E, k = 12, 8, 6, 4, 2
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    gate_up = torch.randn(E, 2 * I, H, dtype=torch.float64, requires_grad=True)
    down = torch.randn(E, H, I, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(T, E, dtype=torch.float64)
    ids = torch.topk(logits, k).indices
    weights = torch.rand(T, k, dtype=torch.float64, requires_grad=True)
    slots = torch.tensor([0, -1, 1, -1])
    factors = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in [(2, 3, H), (2, 2 * I, 3), (2, 3, I), (2, H, 3)]]
    lora = ExpertLoRA(slots, *factors, scale=0.3)
    inputs = (x, gate_up, down, weights, *factors)
    got = torch.autograd.grad(grouped_mlp(x, gate_up, down, weights, ids, lora=lora).square().sum(), inputs)
    want = torch.autograd.grad(dense_moe(x, gate_up, down, weights, ids, lora=lora).square().sum(), inputs)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grouped_mlp_low_precision_close_to_fp32(dtype):
    T, H, I, E = 20, 32, 16, 4
    x, gate_up, down = torch.randn(T, H), torch.randn(E, 2 * I, H) / 6, torch.randn(E, H, I) / 4
    weights, ids = random_routing(T, E, 2)
    out = grouped_mlp(x.to(dtype), gate_up.to(dtype), down.to(dtype), weights, ids)
    assert out.dtype == dtype
    assert rel_err(out, grouped_mlp_reference(x, gate_up, down, weights, ids, None, None)) < 2e-2


# ---------------------------------------------------------------- quantize


def elementwise_quantize(w, bits, group, symmetric):
    """Scalar loops of the documented formulas; returns the dequantized float64 values."""
    flat = w.double().reshape(-1, group)
    out = torch.empty_like(flat)
    qmax = 2**bits - 1
    for g in range(flat.shape[0]):
        vals = flat[g]
        if symmetric:
            half = 2 ** (bits - 1) - 1
            scale = float(vals.abs().max()) / half or 1.0
            lo_code = -half - (1 if bits == 4 else 0)
            out[g] = torch.clamp(torch.round(vals / scale), lo_code, half) * scale
        else:
            lo, hi = min(float(vals.min()), 0.0), max(float(vals.max()), 0.0)
            scale = (hi - lo) / qmax or 1.0
            zero = min(max(round(-lo / scale), 0), qmax)
            out[g] = (torch.clamp(torch.round(vals / scale) + zero, 0, qmax) - zero) * scale
    return out.reshape(w.shape)


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (4, 128), (8, 128), (8, 256)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_matches_formula_and_error_bound(bits, group, symmetric):
    w = torch.randn(3, 5, 256)
    q = quantize(w, bits, group, symmetric=symmetric)
    assert isinstance(q, QuantizedTensor) and q.shape == w.shape
    assert q.data.shape == (3, 5, 256 // 2 if bits == 4 else 256)
    assert q.scales.shape == (3, 5, 256 // group)
    deq = dequantize(q)
    assert deq.dtype == w.dtype
    assert torch.allclose(deq.double(), elementwise_quantize(w, bits, group, symmetric), atol=1e-6)
    # Round-to-nearest error is at most half a step of the group's scale.
    step = q.scales.repeat_interleave(group, dim=-1)
    assert ((deq - w).abs() <= 0.5 * step + 1e-6).all()


def test_quantize_zero_and_constant_groups():
    w = torch.zeros(2, 64)
    w[1] = 3.0
    for symmetric in (True, False):
        assert torch.allclose(dequantize(quantize(w, 4, 32, symmetric=symmetric)), w)


def test_quantize_int8_default_per_channel_and_int4_default_group():
    assert quantize(torch.randn(4, 96), bits=8).scales.shape == (4, 1)
    assert quantize(torch.randn(4, 256), bits=4).scales.shape == (4, 2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_quantize_rejects_non_finite_weights(bad):
    """A NaN used to turn its whole group into garbage codes, silently."""
    w = torch.randn(4, 64)
    w[2, 37] = bad
    with pytest.raises(ValueError, match=r"w has 1 non-finite values \(NaN/Inf; the first at index \(2, 37\)\)"):
        quantize(w, 4, 32)
