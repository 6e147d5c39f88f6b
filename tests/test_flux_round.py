"""Flux's client round (flux_engine.flux_round): every assigned slot trains and nothing else moves, the kept low-bit
copy, one profile per global model, one utility scale, and the compact model's merge ablations."""

import pytest
import torch

from flux_engine import MoEForCausalLM, merging, presets, profiling
from flux_engine.aggregation import UtilityTable
from flux_engine.budget import BudgetPlan
from flux_engine.flux_round import FluxClient, FluxSettings, compact_model
from flux_engine.roles import EpsilonSchedule, assign_roles, common_scale, explore_experts, frequency_utility
from flux_engine.training import TrainConfig

L, E = 2, 8  # the tiny preset's MoE layers and experts
FREQ = torch.tensor(
    [[0.25, 0.20, 0.15, 0.10, 0.08, 0.08, 0.07, 0.07],
     [0.30, 0.20, 0.15, 0.10, 0.09, 0.06, 0.05, 0.05]], dtype=torch.float64,
)  # fmt: skip


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return MoEForCausalLM(presets.get("tiny")).eval().requires_grad_(False)


def _batches(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 256, (4, 24), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 16:] = 0  # right padding
        out.append({"input_ids": ids, "labels": ids.masked_fill(mask == 0, -100), "attention_mask": mask})
    return out


def _client(base, B_non=4, **kw):
    plan = BudgetPlan(B_tune=4, B_non=B_non, budget_bytes=0, breakdown={}, tuning_expert_bytes=0,
                      merged_expert_bytes=0)  # fmt: skip
    settings = FluxSettings(**{"lora_scale": 4.0, "profile_bits": 8, **kw})
    train = TrainConfig(mode=settings.mode, rank=4, alpha=16, lr=1e-2, steps=2)
    return FluxClient(base, plan, settings, train, _batches(2, seed=7))


def _mask(pairs):
    m = torch.zeros(L, E, dtype=torch.bool)
    for l, e in pairs:
        m[l, e] = True
    return m


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_every_assigned_expert_trains_and_nothing_else_moves(base, mode):
    """Exploitation and exploration experts alike (one tuning mask) change; merged and unassigned ones do not."""
    client = _client(base, mode=mode)
    client.first_profile()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    tuning = _mask([(0, 0), (0, 5), (1, 2), (1, 7)])  # (0, 5) and (1, 7): rarely routed exploration picks
    out = client.train({}, tuning, torch.zeros(L, E, dtype=torch.bool), _batches(), 1)
    assert sorted(out.result.trained) == [(0, 0), (0, 5), (1, 2), (1, 7)]
    for (l, e), tensors in out.result.trained.items():
        if mode == "lora":  # B starts at zero, A from the seeded init: both must have moved
            assert tensors["gate_up_B"].abs().sum() > 0 and tensors["down_B"].abs().sum() > 0
        else:
            gu, dn = base.moe_layers()[l].experts.physical_weights(e)
            assert not torch.equal(tensors["gate_up"], gu.float()) and not torch.equal(tensors["down"], dn.float())
    assert torch.isfinite(out.utilities[tuning]).all() and torch.isnan(out.utilities[~tuning]).all()
    # The base never changes; the compact model's experts (merged, and in LoRA mode the tuned ones' frozen bases)
    # are exactly what merging made of the global model: training moved only the assigned experts' tensors.
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())
    if mode == "lora":
        trained_model = client._compact[1]
        fresh = compact_model(base, client.first_profile(), [[0, 5], [2, 7]], 4)
        for a, b in zip(trained_model.moe_layers(), fresh.moe_layers()):
            assert a.experts.lora is None  # detached after the round
            assert torch.equal(a.experts.gate_up_proj, b.experts.gate_up_proj)
            assert torch.equal(a.experts.down_proj, b.experts.down_proj)


def test_kept_low_bit_copy_and_one_profile_per_global_model(base, monkeypatch):
    from flux_engine import adapters
    from flux_engine.flux_round import apply_global, round_copy

    client = _client(base)
    client.first_profile()
    out = client.train({}, _mask([(0, 1), (1, 3)]), torch.zeros(L, E, dtype=torch.bool), _batches(), 1)
    calls = []
    real = profiling.profile
    monkeypatch.setattr(profiling, "profile", lambda *a, **k: calls.append(1) or real(*a, **k))
    client.profile_next({}, 1)  # round 1's global model is the base: profiled already
    assert calls == []
    glob = dict(out.result.trained)
    client.profile_next(glob, 2)
    assert len(calls) == 1
    # The refreshed copy profiles exactly like a fresh copy of the folded global model.
    full = round_copy(base)
    apply_global(full, glob, "lora", 4.0)
    fresh = real(full, client.profile_batches, bits=8)
    p2, seconds, stale = client._take_profile(glob, 3)
    assert stale and seconds > 0
    assert torch.equal(p2.counts, fresh.counts) and torch.allclose(p2.attn_sums, fresh.attn_sums)
    assert p2.samples == fresh.samples
    client.profile_next(dict(glob), 3)  # same values in new dicts: nothing to profile
    assert len(calls) == 1
    assert client._take_profile(glob, 4)[1] == 0.0  # its seconds were charged once


def test_restarted_client_recomputes_the_profile_it_owes(base, tmp_path, monkeypatch):
    a = _client(base, state_dir=str(tmp_path))
    a.first_profile()
    out = a.train({}, _mask([(0, 1), (1, 3)]), torch.zeros(L, E, dtype=torch.bool), _batches(), 1)
    glob = dict(out.result.trained)
    a.profile_next(glob, 2)  # owed to round 3
    expected = a._take_profile(glob, 3)[0]
    b = _client(base, state_dir=str(tmp_path))  # a new process: nothing in memory
    got = b._take_profile({**glob, (0, 7): glob[(0, 1)]}, 3)[0]  # whatever it holds now, round 3 is owed glob's
    assert torch.equal(got.counts, expected.counts) and got.samples == expected.samples
    # After a run's last round nothing is profiled; the tensors are kept, and a resumed run's client (or this one,
    # should another round come) profiles them then.
    calls = []
    real = profiling.profile
    monkeypatch.setattr(profiling, "profile", lambda *a, **k: calls.append(1) or real(*a, **k))
    a.profile_next(glob, 3, last=True)
    assert calls == [] and a._next is None
    got = a._take_profile({}, 4)[0]
    assert calls == [1] and torch.equal(got.counts, expected.counts)


def test_padding_columns_are_not_profiled(base):
    batch = _batches(1)[0]
    batch["attention_mask"][:, 20:] = 0
    padded = {k: torch.cat([v, torch.zeros_like(v[:, :8])], 1) for k, v in batch.items()}
    low = profiling.prepare(base, bits=8)
    a, b = profiling.profile(low, [batch]), profiling.profile(low, [padded])
    assert torch.equal(a.counts, b.counts) and torch.allclose(a.attn_sums, b.attn_sums, atol=1e-6)


def test_one_utility_scale():
    prior = frequency_utility(FREQ)
    nothing = torch.full((L, E), float("nan"), dtype=torch.float64)
    assert torch.equal(common_scale(nothing, prior), prior)  # round 1: frequencies as they are
    measured = nothing.clone()
    measured[0, 0], measured[0, 1] = 9.0, 3.0  # layer 0: c = 12 / (0.25 + 0.20)
    u = common_scale(measured, prior)
    assert u[0, 0] == 9.0 and u[0, 2] == pytest.approx(0.15 * 12 / 0.45)
    assert u[1, 0] == pytest.approx(0.30 * 12 / 0.45)  # layer 1 has no measurement: the all-layer ratio
    # Measured utilities win over priors; a client without its own prior takes the others' (UtilityTable).
    table = UtilityTable(L, E)
    table.set_prior("a", prior)
    table.update("a", measured)
    assert torch.equal(table.for_client("a"), u) and torch.equal(table.for_client("b"), u)


def test_an_explored_expert_with_the_largest_utility_is_exploited_next_round():
    """A synthetic run of the server's logic: priors from frequencies, every slot trains and reports Eq. 3 for what
    it trained; the rarely routed expert (1, 7), drawn for exploration, has the largest true gradient utility."""
    true = torch.rand(L, E, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10
    true[1, 7] = 50.0
    table = UtilityTable(L, E)
    table.set_prior("c", frequency_utility(FREQ))
    schedule = EpsilonSchedule(eps_0=0.5, eps_max=0.5, ramp_rounds=1)
    for t in range(20):
        (r,) = assign_roles(table.for_clients(["c"]), [4], round_t=t, schedule=schedule, seed=3)
        explored = bool(r.explore[1, 7])
        table.update("c", torch.where(r.tuning, true, torch.full_like(true, float("nan"))))
        if explored:
            (nxt,) = assign_roles(table.for_clients(["c"]), [4], round_t=t + 1, schedule=schedule, seed=3)
            assert bool(nxt.exploit[1, 7])
            return
    pytest.fail("(1, 7) was never explored in 20 rounds")


def test_zo_exploration_is_fp32_on_routed_rows_only(base):
    ids = torch.randint(1, 256, (4, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        routers = base(ids, return_routers=True).routers
    hit = torch.zeros(L, E, dtype=torch.bool)
    for l, r in enumerate(routers):
        hit[l, r.ids.flatten().unique()] = True
    unrouted = [(l, e) for l in range(L) for e in range(E) if not hit[l, e]]
    routed = (0, int(routers[0].ids[0, 0]))
    pairs = [routed] + unrouted[:1]
    u32 = explore_experts(base, ids, pairs)
    assert u32[routed] > 0 and all(u32[p] == 0 for p in unrouted[:1])
    u16 = explore_experts(base.to(torch.bfloat16), ids, pairs)
    base.float()
    assert u16[routed] > 0  # the +-c perturbation is visible: the difference is taken in fp32


def test_compact_model_and_merge_ablations(base):
    profile = merging.FrequencyProfile(FREQ)
    tuning = [[0, 1], [2]]
    eq1 = compact_model(base, profile, tuning, 6, seed=0)
    uni = compact_model(base, profile, tuning, 6, layer_budgets="uniform", weighting="freq")
    nt = [6, 7]
    assert merging.uniform_layer_budgets(7, [6, 7]) == [4, 3]
    assert merging.uniform_layer_budgets(3, [1, 7]) == [1, 2]
    assert merging.uniform_layer_budgets(1, [0, 5]) == [0, 1]
    uniform = merging.uniform_layer_budgets(6, nt)
    assert uni.merge_plan.physical_experts == [t + b for t, b in zip([2, 1], uniform)]
    assert eq1.merge_plan.physical_experts == [t + b for t, b in zip([2, 1], merging.layer_budgets(FREQ, 6, nt))]
    assert uniform != merging.layer_budgets(FREQ, 6, nt)  # the ablation changes something
    with pytest.raises(ValueError, match="layer_budgets"):
        compact_model(base, profile, tuning, 6, layer_budgets="random")
