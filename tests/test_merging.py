import gc
import weakref

import pytest
import torch

from flux_engine import presets
from flux_engine.merging import (
    FrequencyProfile,
    cluster_layers,
    cluster_layers_loop,
    layer_budgets,
    layer_weights,
    merge,
    merge_output_error,
    plan_merge,
    profile_from_routers,
)
from flux_engine.models import MoEForCausalLM


def _row(d):
    # Four experts, population variance d^2.
    return [0.25 + d, 0.25 + d, 0.25 - d, 0.25 - d]


def test_eq1_weights_hand_computed():
    b = layer_weights([_row(0.1), _row(0.1), _row(0.2)], eps=0.0)
    assert torch.allclose(b, torch.tensor([300.0, 200.0, 25.0], dtype=torch.float64))


def test_eq1_budgets_hand_computed():
    freqs = [_row(0.1), _row(0.1), _row(0.2)]  # b = 300, 200, 25 (sum 525)
    # total 10: shares 5.71, 3.81, 0.48 -> layer 3 pinned at 1, 9 re-shared as 5.4, 3.6 -> 5 + 3, remainder to layer 2.
    assert layer_budgets(freqs, 10, [8, 8, 8], eps=0.0) == [5, 4, 1]
    # total 8 with 4 non-tuning experts each: layer 1 capped at 4, then layer 3 pinned at 1, layer 2 gets 3.
    assert layer_budgets(freqs, 8, [4, 4, 4], eps=0.0) == [4, 3, 1]
    # No clamping: plain floor + largest remainder. total 21: 12.0, 8.0, 1.0.
    assert layer_budgets(freqs, 21, [20, 20, 20], eps=0.0) == [12, 8, 1]


def test_eq1_zero_variance_layer():
    freqs = [[0.25] * 4, _row(0.1), _row(0.2)]  # v = 0 -> b = 3 / eps dominates
    assert layer_budgets(freqs, 7, [4, 4, 4]) == [4, 2, 1]
    assert layer_budgets(freqs, 3, [4, 4, 4]) == [1, 1, 1]


def test_eq1_budget_smaller_than_layer_count_and_empty_layers():
    freqs = [_row(0.1), _row(0.1), _row(0.2)]
    assert layer_budgets(freqs, 2, [4, 4, 4]) == [1, 1, 1]  # cannot go below 1 per layer
    assert layer_budgets(freqs, 0, [4, 4, 4]) == [1, 1, 1]
    assert layer_budgets(freqs, 2, [0, 4, 4]) == [0, 1, 1]  # an all-tuning layer merges nothing
    assert layer_budgets(freqs, 99, [2, 3, 4]) == [2, 3, 4]


def test_eq1_sums_to_total_when_clamps_allow():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        L = int(torch.randint(1, 7, (1,), generator=g))
        freqs = torch.rand(L, 8, generator=g)
        freqs = freqs / freqs.sum(1, keepdim=True)
        n = torch.randint(0, 9, (L,), generator=g).tolist()
        active = sum(1 for c in n if c)
        for total in range(active, sum(n) + 1):
            out = layer_budgets(freqs, total, n)
            assert sum(out) == total
            assert all((1 if c else 0) <= o <= c for o, c in zip(out, n))


def _planted(g, n, k, D=40, noise=0.02):
    centres = torch.randn(k, D, generator=g)
    labels = torch.arange(n) % k
    labels = labels[torch.randperm(n, generator=g)]
    return centres[labels] + noise * torch.randn(n, D, generator=g), labels


def _same_partition(a, b):
    return torch.equal(a[:, None] == a[None, :], b[:, None] == b[None, :])


def test_kmeans_recovers_planted_clusters_batched_equals_loop():
    g = torch.Generator().manual_seed(1)
    spec = [(6, 2), (9, 3), (4, 2), (12, 4)]
    feats, truth = zip(*[_planted(g, n, k) for n, k in spec])
    ks = [k for _, k in spec]
    batched = cluster_layers(feats, ks, pca_dim=8, seed=3)
    loop = cluster_layers_loop(feats, ks, pca_dim=8, seed=3)
    for b, lo, t, k in zip(batched, loop, truth, ks):
        assert torch.equal(b, lo)
        assert _same_partition(b, t)
        assert sorted(b.unique().tolist()) == list(range(k))
    # Deterministic given the seed.
    again = cluster_layers(feats, ks, pca_dim=8, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(again, batched))


def test_batched_equals_loop_on_unstructured_points():
    g = torch.Generator().manual_seed(2)
    feats = [torch.randn(n, 30, generator=g) for n in (8, 5, 8, 7)]
    ks = [3, 2, 5, 1]
    a = cluster_layers(feats, ks, seed=0)
    b = cluster_layers_loop(feats, ks, seed=0)
    for x, y, k in zip(a, b, ks):
        assert torch.equal(x, y)
        assert sorted(x.unique().tolist()) == list(range(k))  # no empty cluster


def _model():
    torch.manual_seed(0)
    return MoEForCausalLM(presets.get("tiny")).eval()


def _profile(L=2, E=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = torch.rand(L, E, generator=g, dtype=torch.float64)
    return FrequencyProfile(freq=f / f.sum(1, keepdim=True), attn=torch.rand(L, E, generator=g, dtype=torch.float64))


def test_all_tuning_compact_model_equals_original():
    model = _model()
    ids = torch.randint(0, 256, (2, 16))
    compact = merge(model, _profile(), [list(range(8))] * 2, [0, 0])
    assert compact.config.physical_experts == [8, 8]
    assert torch.equal(compact(ids).logits, model(ids).logits)
    assert merge_output_error(model, compact, ids) == [0.0, 0.0]


def test_merging_identical_experts_is_exact():
    model = _model()
    with torch.no_grad():
        for mlp in model.moe_layers():
            mlp.experts.gate_up_proj[5].copy_(mlp.experts.gate_up_proj[3])
            mlp.experts.down_proj[5].copy_(mlp.experts.down_proj[3])
    tuning = [[0, 1, 2, 4, 6, 7]] * 2
    compact = merge(model, _profile(), tuning, [1, 1], weighting="freq_attn")
    plan = compact.merge_plan
    assert plan.groups[0][-1] == [3, 5] and compact.config.physical_experts == [7, 7]
    emap = compact.moe_layers()[0].experts.expert_map
    assert emap[3] == emap[5] == 6
    ids = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(compact(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert max(merge_output_error(model, compact, ids)) < 1e-5


@pytest.mark.parametrize("weighting", ["freq_attn", "freq", "uniform", "zeros"])
def test_merge_weights_follow_eq2(weighting):
    model = _model()
    prof = _profile()
    if weighting == "zeros":
        prof.freq[0, [0, 2, 5]] = 0.0
    tuning = [[1, 3, 4, 6, 7], list(range(8))]
    compact = merge(model, prof, tuning, [1, 0], weighting="freq_attn" if weighting == "zeros" else weighting)
    members = [0, 2, 5]
    plan = compact.merge_plan
    assert plan.groups[0][-1] == members
    f, a = prof.freq[0, members], prof.attn[0, members]
    ones = torch.ones(3, dtype=torch.float64)
    alpha = {"freq_attn": f * a, "freq": f, "uniform": ones, "zeros": ones}[weighting]
    w = (alpha / alpha.sum()).float()
    old = model.moe_layers()[0].experts
    new = compact.moe_layers()[0].experts
    torch.testing.assert_close(new.gate_up_proj[-1], torch.einsum("m,mij->ij", w, old.gate_up_proj[members]))
    torch.testing.assert_close(new.down_proj[-1], torch.einsum("m,mij->ij", w, old.down_proj[members]))
    # Tuning experts are untouched, in id order.
    for p, e in enumerate([1, 3, 4, 6, 7]):
        assert torch.equal(new.gate_up_proj[p], old.gate_up_proj[e]) and int(new.expert_map[e]) == p


def test_replaced_experts_memory_released():
    model = _model()
    cfg = model.config
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    before = model.num_parameters()
    old = weakref.ref(model.moe_layers()[0].experts.gate_up_proj)
    tuning = [[0, 1], [2]]
    compact = merge(model, _profile(), tuning, [2, 3], inplace=True)
    assert compact is model
    assert compact.config.physical_experts == [4, 4]
    gc.collect()
    assert old() is None
    assert before - compact.num_parameters() == per_expert * ((8 - 4) + (8 - 4))
    ex = compact.moe_layers()[1].experts
    assert ex.gate_up_proj.shape[0] == 4 and ex.expert_map.dtype == torch.int32
    assert sorted(set(ex.expert_map.tolist())) == [0, 1, 2, 3]
    # The compact model runs and its config round-trips.
    compact(torch.randint(0, 256, (1, 8)))
    assert type(cfg).from_dict(compact.config.to_dict()).physical_experts == [4, 4]


def test_merge_with_total_budget_and_profile_from_routers():
    model = _model()
    ids = torch.randint(0, 256, (2, 32))
    prof = profile_from_routers(model(ids, return_routers=True).routers, 8)
    assert torch.allclose(prof.freq.sum(1), torch.ones(2, dtype=torch.float64))
    compact = merge(model, prof, [[0], [1]], 6)  # an int total goes through Eq. 1
    assert sum(compact.config.physical_experts) - 2 == 6
    errs = merge_output_error(model, compact, torch.randint(0, 256, (2, 16)))
    assert len(errs) == 2 and all(0 < e < 2 for e in errs)
    # Batched and per-layer clustering give the same plan.
    p2 = plan_merge(model, prof, [[0], [1]], 6, batched=False)
    assert p2.groups == compact.merge_plan.groups


def test_profiling_attribute_names_accepted():
    class Prof:  # the names of profiling.ExpertProfile
        def __init__(self, p):
            self.frequency, self.importance = p.freq, p.attn

    model = _model()
    prof = _profile()
    tuning = [[1, 3, 4, 6, 7], list(range(8))]
    a = merge(model, prof, tuning, [2, 0])
    b = merge(model, Prof(prof), tuning, 2)
    assert a.merge_plan.groups == b.merge_plan.groups
    for x, y in zip(a.moe_layers(), b.moe_layers()):
        assert torch.equal(x.experts.gate_up_proj, y.experts.gate_up_proj)


def test_expert_gram_streams_the_full_gram():
    from flux_engine.merging import expert_gram

    ex = _model().moe_layers()[0].experts
    ids = [5, 0, 3]
    with torch.no_grad():
        x = torch.cat([ex.gate_up_proj[ids].flatten(1), ex.down_proj[ids].flatten(1)], 1).double()
    torch.testing.assert_close(expert_gram(ex, ids, chunk_rows=7), x @ x.t())
