import pytest

from flux_engine import budget, presets
from flux_engine.budget import (
    BudgetError,
    TrainSettings,
    activation_bytes,
    expert_parameters,
    memory_breakdown,
    merged_expert_bytes,
    non_expert_parameters,
    plan_budget,
    profiling_copy_bytes,
    tuning_expert_terms,
)
from flux_engine.models import MoEForCausalLM

MiB = 1 << 20


def _settings(**kw):
    base = dict(dtype="float32", lora_rank=4, optimizer="adamw", batch_size=2, seq_len=32, workspace_bytes=0, workspace_fraction=0.0)
    base.update(kw)
    return TrainSettings(**base)


def test_parameter_counts_match_the_model():
    cfg = presets.get("tiny")
    model = MoEForCausalLM(cfg)
    L = len(cfg.moe_layer_indices)
    assert non_expert_parameters(cfg) + L * cfg.num_experts * expert_parameters(cfg) == model.num_parameters()


def test_plan_fits_and_prints_every_term():
    cfg = presets.get("tiny")
    s = _settings()
    plan = plan_budget(cfg, int(1.4 * MiB), s)
    assert plan.used_bytes <= plan.budget_bytes
    assert plan.B_tune >= 1 and plan.B_non >= len(cfg.moe_layer_indices)
    assert plan.B_tune + plan.B_non <= len(cfg.moe_layer_indices) * cfg.num_experts
    text = plan.describe()
    for term in ("non-expert weights", "merged experts", "tuning experts", "grads+optimizer", "activations", "workspace"):
        assert term in text
    assert f"B_tune = {plan.B_tune}" in text


def test_impossible_budget_names_missing_bytes():
    cfg = presets.get("tiny")
    s = _settings()
    budget = 200_000
    L = len(cfg.moe_layer_indices)
    need = sum(memory_breakdown(cfg, s, 0, 0, budget).values()) + L * merged_expert_bytes(cfg, s)
    need += sum(tuning_expert_terms(cfg, s).values())
    with pytest.raises(BudgetError) as err:
        plan_budget(cfg, budget, s)
    assert err.value.missing_bytes == need - budget
    assert str(need - budget) in str(err.value)
    # Exactly the minimum fits.
    plan = plan_budget(cfg, need, s)
    assert (plan.B_tune, plan.B_non) == (1, L)


def test_budget_monotone_and_settings_matter():
    cfg = presets.get("tiny")
    prev = (0, 0)
    for mib in (1.3, 1.4, 1.5, 1.6, 1.8):
        p = plan_budget(cfg, int(mib * MiB), _settings())
        assert p.B_tune >= prev[0]
        prev = (p.B_tune, p.B_non)
    lora = plan_budget(cfg, int(1.5 * MiB), _settings())
    full = plan_budget(cfg, int(1.5 * MiB), _settings(lora_rank=0))
    sgd = plan_budget(cfg, int(1.5 * MiB), _settings(lora_rank=0, optimizer="sgd"))
    assert full.B_tune < lora.B_tune and sgd.B_tune > full.B_tune
    assert activation_bytes(cfg, _settings(activation_checkpointing=True)) < activation_bytes(cfg, _settings())
    # The plan trains as many experts as fit: one more tuning expert would not leave one merged expert a layer.
    L = len(cfg.moe_layer_indices)
    room = lora.budget_bytes - sum(memory_breakdown(cfg, _settings(), 0, 0, lora.budget_bytes).values())
    assert (lora.B_tune + 1) * lora.tuning_expert_bytes + L * lora.merged_expert_bytes > room
    assert lora.B_tune * lora.tuning_expert_bytes + lora.B_non * lora.merged_expert_bytes <= room
    assert (lora.B_non + 1) * lora.merged_expert_bytes + lora.B_tune * lora.tuning_expert_bytes > room
    assert f"floor(" in lora.describe() and f"= {lora.B_tune}" in lora.describe()
    # Plenty of memory: nothing is merged, everything else is tuned.
    big = plan_budget(cfg, 8 * MiB, _settings())
    assert big.B_tune + big.B_non == len(cfg.moe_layer_indices) * cfg.num_experts


def test_full_tuning_terms():
    cfg = presets.get("tiny")
    n = expert_parameters(cfg)
    t = tuning_expert_terms(cfg, _settings(dtype="bfloat16", lora_rank=None))
    assert t == {"weights": 2 * n, "grads": 2 * n, "master_fp32": 4 * n, "optimizer_state": 8 * n}
    t = tuning_expert_terms(cfg, _settings(dtype="float32", lora_rank=None, optimizer="sgd"))
    assert t == {"weights": 4 * n, "grads": 4 * n, "master_fp32": 0, "optimizer_state": 0}


def test_budget_roles_merge_pipeline_fits():
    import torch

    from flux_engine.merging import FrequencyProfile, layer_budgets, merge
    from flux_engine.roles import assign_roles, frequency_utility

    cfg = presets.get("tiny")
    s = _settings()
    plan = plan_budget(cfg, int(1.5 * MiB), s)
    torch.manual_seed(0)
    model = MoEForCausalLM(cfg)
    freq = torch.rand(2, 8, dtype=torch.float64)
    prof = FrequencyProfile(freq / freq.sum(1, keepdim=True), torch.ones(2, 8, dtype=torch.float64))
    (roles,) = assign_roles(frequency_utility(prof.freq), [plan.B_tune], seed=0)
    tuning = roles.tuning_lists()
    budgets = layer_budgets(prof.freq, plan.B_non, [8 - len(t) for t in tuning])
    compact = merge(model, prof, tuning, budgets)
    assert sum(compact.config.physical_experts) == plan.B_tune + plan.B_non
    expert_bytes = sum(m.experts.gate_up_proj.numel() + m.experts.down_proj.numel() for m in compact.moe_layers()) * 4
    assert expert_bytes == plan.B_tune * plan.tuning_terms["weights"] + plan.B_non * plan.merged_expert_bytes


def test_profiling_copy_counted_in_the_profile_phase_not_in_training():
    """The copy is exact to the bytes ``profiling.prepare`` allocates; it time-shares the card with training (the
    idle window), so the plan's training terms leave it out and the plan checks the profile phase instead."""
    from flux_engine import profiling

    cfg = presets.get("tiny")
    torch_model = MoEForCausalLM(cfg)
    for bits, dense_bits in ((4, 8), (8, None), (4, 4)):
        low = profiling.prepare(torch_model, bits=bits, dense_bits=dense_bits)
        counted = profiling_copy_bytes(cfg, _settings(profile_bits=bits, profile_dense_bits=dense_bits))
        assert counted == low.nbytes(), (bits, dense_bits)
    assert profiling_copy_bytes(cfg, _settings(profile_bits=0)) == profiling.prepare(torch_model, bits=None).nbytes()
    without = plan_budget(cfg, int(1.6 * MiB), _settings())
    with_copy = plan_budget(cfg, int(1.6 * MiB), _settings(profile_bits=4))
    assert not any(k.startswith("profiling copy") for k in with_copy.breakdown) and not without.profile_phase
    assert (with_copy.B_tune, with_copy.B_non, with_copy.breakdown) == (without.B_tune, without.B_non, without.breakdown)
    prof = budget.profile_phase(cfg, _settings(profile_bits=4), int(1.6 * MiB))
    assert with_copy.profile_phase == prof and list(prof.values())[0] == profiling_copy_bytes(cfg, _settings(profile_bits=4))
    assert "profile phase" in with_copy.describe()
    # A budget whose profile phase (here a full-precision copy) does not fit is refused, naming the missing bytes,
    # where training alone fits.
    full = _settings(batch_size=1, seq_len=4, profile_bits=0)
    small = sum(budget.profile_phase(cfg, full, 0).values()) - 1
    assert plan_budget(cfg, small, _settings(batch_size=1, seq_len=4)).B_tune >= 1
    with pytest.raises(BudgetError, match="profile phase") as e:
        plan_budget(cfg, small, full)
    assert e.value.missing_bytes == 1


def test_phase_peaks_terms():
    """Each phase's predicted peak, term by term: training is memory_breakdown; the compact build holds the compact
    model plus one layer's unmerged experts; profiling holds the low-bit copy plus one layer dequantised."""
    from flux_engine import budget, presets

    config = presets.get("deepseek-moe-16b")
    settings = budget.TrainSettings(dtype="bfloat16", batch_size=1, seq_len=512, activation_checkpointing=True)
    prof = budget.TrainSettings(dtype="float32", batch_size=1, seq_len=512, profile_bits=4)
    peaks = budget.phase_peaks(config, settings, 100, 200, 20 << 30, prof)
    assert peaks["train"] == budget.memory_breakdown(config, settings, 100, 200, 20 << 30)
    expert = 3 * 2048 * 1408
    compact = list(peaks["compact"].values())
    assert compact[1] == 300 * expert * 2 and compact[2] == 64 * expert * 2
    assert compact[0] == budget.non_expert_parameters(config) * 2
    profile = list(peaks["profile"].values())
    assert profile[0] == budget.profiling_copy_bytes(config, prof) and profile[2] == 64 * expert * 4
    assert 512 * 2048 * 4 < profile[1] < 512 * 100_000 * 4  # one layer's intermediates in fp32, not all 28
