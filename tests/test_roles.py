import pytest
import torch

from flux_engine import presets
from flux_engine.models import MoEForCausalLM
from flux_engine.roles import (
    EpsilonSchedule,
    ZerothOrderConfig,
    assign_roles,
    explore_experts,
    frequency_utility,
    spsa_gradient,
    utility_exact,
    utility_microbatch,
)


def _model():
    torch.manual_seed(0)
    return MoEForCausalLM(presets.get("tiny")).eval()


def test_frequency_utility_normalises():
    u = frequency_utility(torch.tensor([[1.0, 3.0, 0.0], [2.0, 2.0, 4.0]]))
    assert torch.allclose(u, torch.tensor([[0.25, 0.75, 0.0], [0.25, 0.25, 0.5]], dtype=torch.float64))


def test_exact_utility_matches_manual_per_sample_gradients():
    model = _model()
    ids = torch.randint(0, 256, (3, 8))
    u = utility_exact(model, ids)
    # Manual Eq. 3 for layer 1: one backward per sample, then per expert.
    layer = model.moe_layers()[1]
    params = [layer.experts.gate_up_proj, layer.experts.down_proj]
    per_sample = []
    for k in range(3):
        out = model(ids[k : k + 1], labels=ids[k : k + 1], return_routers=True)
        g = torch.autograd.grad(out.loss, params)
        per_sample.append((out.routers[1].ids, g))
    for e in range(8):
        sq = [float(g[0][e].pow(2).sum() + g[1][e].pow(2).sum()) for r, g in per_sample if bool((r == e).any())]
        n = len(sq)
        expected = n * (sum(sq) / n) ** 0.5 if n else 0.0
        assert u[1, e].item() == pytest.approx(expected, rel=1e-4, abs=1e-12)
    assert not any(p.requires_grad is False for p in params)  # requires_grad restored (default True)


def test_microbatch_utility_is_close_and_positive():
    model = _model()
    ids = torch.randint(0, 256, (4, 8))
    exact = utility_exact(model, ids)
    cheap = utility_microbatch(model, ids, micro_batch=2)
    assert cheap.shape == exact.shape == (2, 8)
    assert ((cheap > 0) == (exact > 0)).all()
    rank = lambda x: x.flatten().argsort().argsort().double()
    assert torch.corrcoef(torch.stack([rank(cheap), rank(exact)]))[0, 1] > 0.5


def test_epsilon_schedule():
    s = EpsilonSchedule(eps_0=0.2, eps_max=0.5, ramp_rounds=3)
    assert [s(t) for t in range(5)] == pytest.approx([0.2, 0.3, 0.4, 0.5, 0.5])
    assert EpsilonSchedule(fixed=0.3)(10) == 0.3
    # A 5-round run with a ramp of half the run reaches eps-max at round 3 (t = 2).
    s = EpsilonSchedule.for_run(0.5, 0.9, 0.5, num_rounds=5)
    assert [s(t) for t in range(5)] == pytest.approx([0.5, 0.7, 0.9, 0.9, 0.9])


def test_assignment_respects_budgets_and_is_reproducible():
    g = torch.Generator().manual_seed(0)
    L, E = 3, 8
    utils = [torch.rand(L, E, generator=g, dtype=torch.float64) for _ in range(4)]
    budgets = [1, 5, 10, 100]
    sched = EpsilonSchedule(eps_0=0.4, eps_max=0.8, ramp_rounds=4)
    for t in range(4):
        roles = assign_roles(utils, budgets, round_t=t, schedule=sched, seed=7)
        again = assign_roles(utils, budgets, round_t=t, schedule=sched, seed=7)
        eps = sched(t)
        for r, r2, u, B in zip(roles, again, utils, budgets):
            B = min(B, L * E)
            assert int(r.tuning.sum()) == B
            assert not (r.exploit & r.explore).any()
            assert int(r.exploit.sum()) == int(eps * B + 0.5)
            if r.exploit.any() and (~r.exploit).any():
                assert u[r.exploit].min() >= u[~r.exploit].max()  # exploitation = top utilities
            assert torch.equal(r.tuning, r2.tuning) and torch.equal(r.explore, r2.explore)
            assert sum(len(x) for x in r.tuning_lists()) == B
    a = assign_roles(utils[0], [10] * 8, round_t=0, schedule=EpsilonSchedule(fixed=0.2), seed=1)
    b = assign_roles(utils[0], [10] * 8, round_t=0, schedule=EpsilonSchedule(fixed=0.2), seed=2)
    assert any(not torch.equal(x.explore, y.explore) for x, y in zip(a, b))


def test_spsa_positive_cosine_on_quadratic():
    g = torch.Generator().manual_seed(0)
    d = 20
    M = torch.randn(d, d, generator=g, dtype=torch.float64)
    A = M @ M.t() + torch.eye(d, dtype=torch.float64)
    b = torch.randn(d, generator=g, dtype=torch.float64)
    theta = torch.randn(d, generator=g, dtype=torch.float64)
    before = theta.clone()
    true = A @ theta + b
    f = lambda: 0.5 * theta @ A @ theta + b @ theta
    cos = []
    for _ in range(50):
        (est,), dd = spsa_gradient(f, [theta], c=1e-3, generator=g)
        cos.append(torch.nn.functional.cosine_similarity(est, true, dim=0))
    assert torch.stack(cos).mean() > 0.1
    assert torch.equal(theta, before)  # restored exactly
    (avg,), dd = spsa_gradient(f, [theta], c=1e-3, num_samples=400, generator=g)
    assert torch.nn.functional.cosine_similarity(avg, true, dim=0) > 0.6
    # mean of squared directional derivatives estimates ||g||^2
    assert sum(x * x for x in dd) / len(dd) == pytest.approx(float(true @ true), rel=0.3)


@pytest.mark.parametrize("update", [False, True])
def test_explore_experts_switch(update):
    model = _model()
    ids = torch.randint(0, 256, (2, 8))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pairs = [(0, 2), (1, 5)]
    u = explore_experts(model, ids, pairs, ZerothOrderConfig(num_samples=2, update=update, lr=1e-2))
    assert torch.isfinite(u[0, 2]) and torch.isfinite(u[1, 5]) and int(torch.isfinite(u).sum()) == 2
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    if not update:
        assert not changed  # perturbations restored bit-exactly
        return
    assert changed == {f"model.layers.{i}.mlp.experts.{w}" for i in (1, 2) for w in ("gate_up_proj", "down_proj")}
    gu, old = model.moe_layers()[0].experts.gate_up_proj, before["model.layers.1.mlp.experts.gate_up_proj"]
    assert [e for e in range(8) if not torch.equal(gu[e], old[e])] == [2]


def test_exploration_covers_untried_experts_first_and_clients_spread():
    L, E = 2, 8
    u = torch.arange(L * E, dtype=torch.float64).view(L, E)
    untried = torch.zeros(L, E, dtype=torch.bool)
    untried[0, :5] = True  # five experts nobody has measured
    roles = assign_roles(u, [4, 4], round_t=0, schedule=EpsilonSchedule(fixed=0.5), seed=0, untried=untried)
    a, b = roles
    # Each client exploits the top 2 and explores 2: the five untried experts come first, none twice.
    assert bool(a.explore[untried].sum() == 2) and bool((b.explore & untried).sum() == 2)
    assert not (a.explore & b.explore).any()
    # Without the mask, the draw is the plain uniform one.
    plain = assign_roles(u, [4, 4], round_t=0, schedule=EpsilonSchedule(fixed=0.5), seed=0)
    assert all(torch.equal(p.exploit, r.exploit) for p, r in zip(plain, roles))
