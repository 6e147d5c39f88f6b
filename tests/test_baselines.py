"""The baselines' policies (FedAvg-LoRA, FMD, FMQ, FMES) and Flux's merge ablations on the tiny preset."""

import copy

import pytest
import torch

from flux_engine import MoEForCausalLM, baselines, merging, presets, training
from flux_engine.budget import BudgetError, TrainSettings, expert_parameters, memory_breakdown, plan_budget
from flux_engine.merging import FrequencyProfile

SETTINGS = TrainSettings(dtype="float32", lora_rank=8, batch_size=4, seq_len=32, workspace_bytes=0,
                         workspace_fraction=0)
# Tiny preset: 2 MoE layers x 8 experts, top-2. A hand-made profile; its ranking over all layers is
# (1,0) .30, (0,0) .25, (0,1) .20, (1,1) .20, (0,2) .15, (1,2) .15, (0,3) .10, (1,3) .10, (0,4) .08, ...
FREQ = torch.tensor(
    [[0.25, 0.20, 0.15, 0.10, 0.08, 0.08, 0.07, 0.07],
     [0.30, 0.20, 0.15, 0.10, 0.09, 0.06, 0.05, 0.05]], dtype=torch.float64,
)  # fmt: skip
PROFILE = FrequencyProfile(FREQ)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MoEForCausalLM(presets.get("tiny")).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))


def _fixed(config):
    return sum(memory_breakdown(config, SETTINGS, 0, 0, 0).values())


def _per_tuning(config):
    return sum(baselines.tuning_expert_terms(config, SETTINGS).values())


def test_fedavg_lora_tunes_every_expert_and_reports_memory(model, ids):
    c = model.config
    pol = baselines.fedavg_lora(model, budget_bytes=1, settings=SETTINGS)  # far too small: reported, no error
    assert pol.tuning == [list(range(8))] * 2 and bool(pol.tuning_mask().all())
    assert pol.model is model
    assert pol.memory.total == sum(memory_breakdown(c, SETTINGS, 16, 0, 1).values())
    assert not pol.memory.fits and not pol.info["fits_budget"] and "EXCEEDS" in pol.memory.describe()
    work = copy.deepcopy(model)
    result = training.train_round(work, pol.tuning, [ids], training.TrainConfig(steps=1))
    assert set(result.trained) == {(l, e) for l in range(2) for e in range(8)}
    assert baselines.upload_bytes(result.trained) == 16 * 8 * (2 * 64 + 3 * 48) * 4
    with pytest.raises(ValueError):
        baselines.fedavg_lora(model, 1, TrainSettings(lora_rank=0))


def _fmd_budget(c, resident):
    w = expert_parameters(c) * 4
    return _fixed(c) + 16 * baselines._lora_state_bytes(c, SETTINGS) + (resident + 8) * w  # + staging of 8


def test_fmd_residency_and_fetched_bytes_on_hand_made_routing(model, ids):
    c = model.config
    res = baselines.plan_residency(c, PROFILE, _fmd_budget(c, 3), SETTINGS)
    w = expert_parameters(c) * 4
    assert res.expert_bytes == w and res.num_resident == 3
    assert res.resident.nonzero().tolist() == [[0, 0], [0, 1], [1, 0]]  # the top-3 pairs ((1,1) loses the tie)
    assert res.memory.fits and any("staging" in k for k in res.memory.terms)
    # Layer 0 routes to 0, 1, 2 (0 and 1 resident: 2 fetched); layer 1 to 0, 1, 5 (1 and 5 fetched, each once
    # although several tokens pick them).
    routing = [torch.tensor([[0, 1], [1, 2], [0, 1]]), torch.tensor([[0, 1], [5, 0], [1, 5]])]
    fb = baselines.fetch_bytes(res, routing)
    assert fb.experts == [[2], [1, 5]] and fb.per_layer == [w, 2 * w] and fb.total == 3 * w
    counts = torch.zeros(2, 8, dtype=torch.long)
    counts[0, [0, 1, 2]] = 1
    counts[1, [0, 1, 5]] = 4
    assert baselines.fetch_bytes(res, counts).total == 3 * w
    # Everything fits: all resident, no staging, nothing fetched.
    big = baselines.plan_residency(c, PROFILE, _fmd_budget(c, 100), SETTINGS)
    assert big.num_resident == 16 and baselines.fetch_bytes(big, routing).total == 0
    with pytest.raises(BudgetError):
        baselines.plan_residency(c, PROFILE, _fixed(c), SETTINGS)
    # While training: the counter sees every forward pass; one pass equals fetch_bytes of its routing.
    pol = baselines.fmd(model, PROFILE, _fmd_budget(c, 3), SETTINGS)
    assert pol.tuning == [list(range(8))] * 2
    with torch.no_grad(), pol.fetch:
        out = model(ids, return_routers=True)
    assert pol.fetch.passes == 1 and pol.pcie_bytes() == baselines.fetch_bytes(res, out.routers).total > 0
    work = copy.deepcopy(model)
    counter = baselines.FetchCounter(work, res)
    with counter:
        result = training.train_round(work, pol.tuning, [ids], training.TrainConfig(steps=2))
    # Two training passes, each fetching for its forward and again for its backward pass.
    assert counter.passes == 2 and counter.bytes == 2 * 2 * pol.pcie_bytes()
    rec = baselines.client_round(pol, result, download_bytes=123, client=3, profile_seconds=0.5)
    assert (rec.client, rec.download_bytes, rec.profile_seconds) == (3, 123, 0.5)
    assert rec.upload_bytes == baselines.upload_bytes(result.trained) and rec.train_seconds == result.seconds
    assert rec.pcie_bytes == pol.pcie_bytes() and rec.merge_seconds == pol.prepare_seconds
    with torch.no_grad():
        model(ids)  # detached: not counted
    assert counter.passes == 2


def test_fmq_quantized_model_is_close_and_trains(model, ids):
    pol = baselines.fmq(model, budget_bytes=10**9, settings=SETTINGS)
    q = pol.model
    assert q is not model and not isinstance(model.moe_layers()[0].experts, baselines.QuantizedExperts)
    for mlp in q.moe_layers():
        ex = mlp.experts
        assert isinstance(ex, baselines.QuantizedExperts)
        assert ex.gate_up_proj.bits == 4 and tuple(ex.gate_up_proj.shape) == (8, 96, 64)
        assert not any(True for _ in ex.parameters())  # packed weights are buffers: frozen
    per_expert = baselines.quantized_expert_bytes(model.config, 4)
    assert pol.info["packed_expert_bytes"] == 16 * per_expert
    assert pol.info["saved_bytes"] == 16 * expert_parameters(model.config) * 4 - 16 * per_expert > 0
    assert pol.memory.fits and pol.tuning == [list(range(8))] * 2
    with torch.no_grad():
        a, b = model(ids).logits, q(ids).logits
    assert float((a - b).norm() / a.norm()) < 0.05
    assert float((a.argmax(-1) == b.argmax(-1)).float().mean()) > 0.9
    result = training.train_round(q, pol.tuning, [ids], training.TrainConfig(steps=6, lr=1e-2))
    assert result.losses[-1] < result.losses[0] - 0.1
    assert all(isinstance(p, torch.nn.Parameter) for p in training.trainable_parameters(q))
    training.detach_tuning(q)
    assert all(mlp.experts.lora is None for mlp in q.moe_layers())
    with pytest.raises(NotImplementedError):  # full-size tuning of packed experts
        training.train_round(q, [[0], []], [ids], training.TrainConfig(mode="full", steps=1))


def test_fmes_keeps_top_frequency_experts_and_dropped_get_no_tokens(model, ids):
    c = model.config
    budget = _fixed(c) + 7 * _per_tuning(c)  # room for 7 tuning experts
    plan = baselines.plan_kept(c, PROFILE, budget, SETTINGS)
    # Each layer's top-2 first ((0,0) (0,1) (1,0) (1,1)), then the most frequent others: (0,2) (1,2) (0,3).
    assert plan.kept == [[0, 1, 2, 3], [0, 1, 2]] and plan.num_kept == 7
    assert plan.memory.fits and any("sink" in k for k in plan.memory.notes)
    top7 = sorted(baselines._rank_pairs(FREQ)[:7])
    assert sorted((l, e) for l, ks in enumerate(plan.kept) for e in ks) == top7
    uniform = baselines.plan_kept(c, PROFILE, budget, SETTINGS, allocation="uniform")
    assert uniform.kept == [[0, 1, 2, 3], [0, 1, 2]]  # 4 + 3, each layer's most frequent
    with pytest.raises(BudgetError):
        baselines.plan_kept(c, PROFILE, _fixed(c) + 3 * _per_tuning(c), SETTINGS)  # < k per layer

    pol = baselines.fmes(model, PROFILE, budget, SETTINGS)
    m = pol.model
    assert pol.tuning == plan.kept and m is not model
    assert m.config.physical_experts == [5, 4] and model.config.physical_experts is None
    out = m(ids, return_routers=True)
    for l, (r, kept) in enumerate(zip(out.routers, plan.kept)):
        routed = set(r.ids.flatten().tolist())
        assert routed <= set(kept) and routed  # no token on a dropped expert
        dropped = [e for e in range(8) if e not in kept]
        assert torch.isinf(r.logits[:, dropped]).all() and torch.isfinite(r.logits[:, kept]).all()
        assert torch.allclose(r.weights.sum(-1), torch.ones(r.weights.shape[0]))  # renormalised over the kept
        ex = m.moe_layers()[l].experts
        sink = len(kept)
        assert ex.expert_map[dropped].tolist() == [sink] * len(dropped)
        assert float(ex.gate_up_proj[sink].detach().abs().sum()) == 0.0
    # Unmasked, the original model routes to dropped experts on these tokens (the mask does the work).
    unmasked = model(ids, return_routers=True).routers
    assert any(set(r.ids.flatten().tolist()) - set(k) for r, k in zip(unmasked, plan.kept))
    result = training.train_round(m, pol.tuning, [ids], training.TrainConfig(steps=3, lr=1e-2))
    assert set(result.trained) == {(l, e) for l, ks in enumerate(plan.kept) for e in ks}
    assert result.losses[-1] < result.losses[0]
    # Keeping everything changes nothing.
    full = baselines.drop_experts(model, [list(range(8))] * 2)
    with torch.no_grad():
        assert torch.allclose(full(ids).logits, model(ids).logits, atol=1e-6)
    with pytest.raises(ValueError):
        baselines.drop_experts(m, plan.kept, inplace=True)  # already dropped


def test_make_policy_dispatch(model):
    c = model.config
    with pytest.raises(ValueError):
        baselines.make_policy("flux", model, budget_bytes=1, profile=PROFILE)  # Flux is flux_round's
    with pytest.raises(ValueError):
        baselines.make_policy("fedprox", model, budget_bytes=1)
    assert baselines.make_policy("fmes", model, budget_bytes=_fixed(c) + 16 * _per_tuning(c), settings=SETTINGS,
                                 profile=PROFILE).info["kept_experts"] == 16  # fmt: skip


def test_fmes_masked_logits_route_identically_on_the_triton_tier(model, ids, force_tier, device):
    from flux_engine import ops

    m = baselines.drop_experts(model, [[1, 5, 6], [0, 2, 3, 7]])
    with torch.no_grad():
        routers = m(ids, return_routers=True).routers
    force_tier("triton", device)
    for r, kept in zip(routers, [[1, 5, 6], [0, 2, 3, 7]]):
        w, i = ops.route(r.logits.to(device), 2, scoring="softmax", renormalize=True)
        assert set(i.flatten().tolist()) <= set(kept) and bool(torch.isfinite(w).all())
        assert torch.equal(i.cpu().sort(-1).values, r.ids.sort(-1).values)
        assert torch.allclose(w.cpu().sort(-1).values, r.weights.sort(-1).values, atol=1e-6)


@pytest.mark.parametrize("name", ["tta_cpu", "tta_gpu"])
def test_tta_configs_parse_and_force_merging(name):
    import pathlib
    import tomllib

    from flux_engine.federated.client import train_settings
    from flux_engine.federated.config import RunConfig

    raw = tomllib.loads((pathlib.Path(__file__).parent.parent / "bench" / "configs" / f"{name}.toml").read_text())
    exp = raw.pop("experiment")
    assert set(exp["methods"]) <= {"flux", *baselines.BASELINES} and exp["reference"] in exp["methods"]
    runs = [RunConfig.from_mapping(raw)]
    for preset, over in exp.get("preset-overrides", {}).items():
        runs.append(RunConfig.from_mapping({**raw, "preset": preset,
                                            **{k: v for k, v in over.items() if not k.startswith("experiment.")}}))
    assert [r.preset for r in runs] == exp.get("presets", [runs[0].preset])
    for run in runs:
        c = presets.get(run.preset)
        plan = plan_budget(c, run.budget_for(0, {}), train_settings(run))
        assert plan.B_non < len(c.moe_layer_indices) * c.num_experts - plan.B_tune  # Flux has to merge
