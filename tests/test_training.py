"""Local training of the tuning experts: attach/detach, freezing, LoRA and full modes, accumulation, utilities."""

import copy

import pytest
import torch

from flux_engine import MoEForCausalLM, merging, presets, save_pretrained
from flux_engine.models.moe import ExpertLoRAAdapter
from flux_engine.profiling import ExpertProfile
from flux_engine.training import (
    TrainConfig,
    attach_tuning,
    detach_tuning,
    initial_adapters,
    load_expert_weights,
    routed_subset,
    train_round,
    tuning_state,
)

TUNING = [[0, 3], [5]]


def tiny_model() -> MoEForCausalLM:
    torch.manual_seed(0)
    return MoEForCausalLM(presets.get("tiny"))


def batches(n=3, B=4, T=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (B, T), generator=g) for _ in range(n)]


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_trainable_parameters_scale_with_tuning_experts_and_optimizer_covers_only_them():
    cfg = TrainConfig(rank=4)
    H, I = 64, 48
    per_expert_lora = 4 * (H + 2 * I) + 4 * (I + H)
    for tuning in ([[0], []], [[0, 3], [5]], [[0, 1, 2], [4, 5, 6]]):
        model = tiny_model()
        params = attach_tuning(model, tuning, cfg)
        S = sum(len(t) for t in tuning)
        assert sum(p.numel() for p in params) == S * per_expert_lora
        assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in params}
    model = tiny_model()
    params = attach_tuning(model, TUNING, TrainConfig(mode="full"))
    assert sum(p.numel() for p in params) == 3 * (2 * I * H + H * I)
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in params}



@pytest.mark.parametrize("mode", ["lora", "full"])
def test_optimizer_state_and_gradients_only_for_trainable_tensors(mode, monkeypatch):
    created = []

    class Recording(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            super().__init__(params, **kwargs)
            created.append(self)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    model = tiny_model()
    train_round(model, TUNING, batches(1), TrainConfig(mode=mode, rank=4))
    (opt,) = created
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in opt.state} == trainable
    assert {id(p) for group in opt.param_groups for p in group["params"]} == trainable
    # No gradient buffer ever exists for frozen tensors (in full mode: the frozen part of the expert stacks).
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_no_tuning_experts_forward_identical_to_base():
    model = tiny_model().eval()
    ids = batches(1)[0]
    ref = model(ids).logits
    attach_tuning(model, [[], []], TrainConfig())
    assert torch.equal(model(ids).logits, ref)
    detach_tuning(model)
    # A fresh LoRA (B = 0) does not change the output either.
    attach_tuning(model, TUNING, TrainConfig())
    assert torch.allclose(model(ids).logits, ref, atol=1e-6)
    detach_tuning(model)
    attach_tuning(model, TUNING, TrainConfig(mode="full"))
    assert torch.allclose(model(ids).logits, ref, atol=1e-6)
    detach_tuning(model)
    assert torch.equal(model(ids).logits, ref)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_training_reduces_loss_and_changes_only_tuning_experts(mode):
    model = tiny_model()
    before = snapshot(model)
    data = batches(2)
    config = TrainConfig(mode=mode, lr=1e-2, epochs=8, max_grad_norm=None)
    result = train_round(model, TUNING, data, config)
    assert result.steps == 16 and len(result.losses) == 16
    assert result.losses[-1] < result.losses[0] - 0.05
    assert result.tokens == 16 * 4 * 16
    if mode == "lora":
        assert set(result.trained[(0, 0)]) == {"gate_up_A", "gate_up_B", "down_A", "down_B"}
        assert result.trained[(0, 0)]["gate_up_B"].abs().sum() > 0
    else:
        assert result.trained[(0, 0)]["gate_up"].shape == (96, 64)
    detach_tuning(model)
    after = model.state_dict()
    assert set(after) == set(before)
    for name, value in before.items():
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            layer = 0 if ".layers.1." in name else 1
            changed = [e for e in range(8) if not torch.equal(after[name][e], value[e])]
            assert changed == (TUNING[layer] if mode == "full" else []), name
        else:
            assert torch.equal(after[name], value), name
    if mode == "full":
        # Folding back keeps the trained weights at their experts' physical slots.
        assert torch.equal(model.moe_layers()[0].experts.gate_up_proj[3], result.trained[(0, 3)]["gate_up"])


def test_utilities_token_counts_and_determinism():
    data = batches(2)
    results = []
    for _ in range(2):
        model = tiny_model()
        results.append(train_round(model, TUNING, data, TrainConfig(seed=3, epochs=2)))
    a, b = results
    assert a.losses == b.losses
    assert all(torch.equal(a.trained[k][n], b.trained[k][n]) for k in a.trained for n in a.trained[k])
    u = a.utilities
    assert u.shape == (2, 8) and u.dtype == torch.float64
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, [0, 3]] = True
    mask[1, 5] = True
    assert torch.isnan(u[~mask]).all() and (u[mask] > 0).all()
    # Token counts: every (token, slot) routed to a tuning expert over both epochs.
    model = tiny_model()
    want = torch.zeros(2, 8, dtype=torch.long)
    with torch.no_grad():
        for ids in data:
            for l, r in enumerate(model(ids, return_routers=True).routers):
                want[l] += torch.bincount(r.ids.reshape(-1).long(), minlength=8)
    assert a.token_counts == {(0, 0): 2 * int(want[0, 0]), (0, 3): 2 * int(want[0, 3]), (1, 5): 2 * int(want[1, 5])}
    # Routed counts: the same for every expert, trained or not.
    assert a.routed.dtype == torch.int64 and torch.equal(a.routed, 2 * want)


def test_utilities_match_roles_microbatch_form():
    """With lr = 0 the model never changes, so the training-time Eq. 3 equals ``roles.utility_microbatch`` on the
    compact model with full-size tuning experts (whose physical weights are the trained tensors)."""
    from flux_engine.roles import utility_microbatch

    data = batches(1, B=4)
    model = tiny_model()
    profile = merging.profile_from_routers(model(data[0], return_routers=True).routers, 8)
    compact = merging.merge(model, profile, TUNING, [3, 3])
    ref = utility_microbatch(compact, data[0], micro_batch=2)
    got = train_round(compact, TUNING, data, TrainConfig(mode="full", micro_batch_size=2, lr=1e-30, max_grad_norm=None))
    for l, ids in enumerate(TUNING):
        assert torch.allclose(got.utilities[l, ids], ref[l, ids], rtol=1e-4)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_gradient_accumulation_matches_larger_micro_batch(mode):
    data = [{"input_ids": torch.randint(0, 256, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)}]
    data[0]["attention_mask"][1, 9:] = 0  # uneven target counts: the step loss is the token mean over the step
    out = []
    for mb, accum in ((4, 1), (2, 2), (1, 4)):
        model = tiny_model()
        cfg = TrainConfig(mode=mode, micro_batch_size=mb, grad_accum_steps=accum, epochs=3, lr=1e-2)
        out.append(train_round(model, TUNING, data, cfg))
    for r in out[1:]:
        assert r.steps == 3
        assert all(abs(x - y) < 1e-5 for x, y in zip(r.losses, out[0].losses))
        for k, tensors in out[0].trained.items():
            for n, t in tensors.items():
                # Adam's first steps move every element by ~lr whatever its gradient's size, so summation-order noise
                # on near-zero gradients shows up at ~1e-5 of the ~3e-2 weights.
                assert torch.allclose(r.trained[k][n], t, atol=1e-4), (k, n)


def test_merged_model_activation_checkpointing_steps_and_lm_batch_dicts():
    model = tiny_model()
    ids = batches(1)[0]
    profile = merging.profile_from_routers(model(ids, return_routers=True).routers, 8)
    compact = merging.merge(model, profile, TUNING, [2, 3])
    mask = torch.ones_like(ids)
    mask[0, 10:] = 0
    data = [{"input_ids": ids, "labels": ids.masked_fill(mask == 0, -100), "attention_mask": mask}]
    results = []
    for ckpt in (False, True):
        m = copy.deepcopy(compact)
        results.append(train_round(m, TUNING, data, TrainConfig(steps=3, micro_batch_size=2, activation_checkpointing=ckpt)))
        assert not m.gradient_checkpointing
    # Steps of one 2-row micro-batch, cycling over the data: rows 0-1, 2-3, 0-1.
    assert results[0].steps == 3 and results[0].tokens == 2 * int(mask[:2].sum()) + int(mask[2:].sum())
    # Every non-padding token is routed to top-k original experts in every layer, merged or not.
    k = model.config.num_experts_per_tok
    assert results[0].routed.sum(1).tolist() == [results[0].tokens * k] * 2
    assert all(abs(a - b) < 1e-6 for a, b in zip(results[0].losses, results[1].losses))
    with pytest.raises(ValueError, match="merge a model without LoRA or tuned experts"):
        merging.merge(m, profile, TUNING, [2, 3])
    # The load-balancing term (about 1 per layer) is added to the reported loss when asked for.
    aux = train_round(copy.deepcopy(compact), TUNING, data, TrainConfig(steps=1, micro_batch_size=2, aux_loss_coef=0.5))
    assert 0.3 < aux.losses[0] - results[0].losses[0] < 1.5


def test_initial_adapters_are_every_clients_start():
    model = tiny_model()
    attach_tuning(model, TUNING, TrainConfig(rank=4, seed=3))
    start = tuning_state(model)
    H, I = model.config.hidden_size, model.config.moe_intermediate_size
    for key, tensors in start.items():
        want = initial_adapters(3, key, H, I, 4)
        assert set(want) == set(tensors) and all(torch.equal(want[n], t) for n, t in tensors.items())
    assert not torch.equal(initial_adapters(4, (0, 0), H, I, 4)["gate_up_A"], start[(0, 0)]["gate_up_A"])


def test_init_and_load_expert_weights():
    model = tiny_model()
    first = train_round(model, TUNING, batches(1), TrainConfig(lr=1e-2))
    detach_tuning(model)
    fresh = tiny_model()
    init = dict(first.trained)
    init[(1, 7)] = {"ignored": torch.zeros(1)}  # not a tuning expert this round: ignored
    attach_tuning(fresh, TUNING, TrainConfig(), init=init)
    state = tuning_state(fresh)
    assert all(torch.equal(state[k][n], first.trained[k][n]) for k in first.trained for n in first.trained[k])
    with pytest.raises(ValueError, match="expected tensors"):
        detach_tuning(fresh)
        attach_tuning(fresh, TUNING, TrainConfig(), init={(0, 0): {"gate_up_A": torch.zeros(8, 64)}})
    detach_tuning(fresh)
    full = train_round(tiny_model(), TUNING, batches(1), TrainConfig(mode="full", lr=1e-2)).trained
    target = tiny_model()
    load_expert_weights(target, full)
    assert torch.equal(target.moe_layers()[1].experts.down_proj[5], full[(1, 5)]["down"])


def test_bad_inputs_give_clear_errors():
    model = tiny_model()
    ids = batches(1)[0]
    profile = merging.profile_from_routers(model(ids, return_routers=True).routers, 8)
    compact = merging.merge(model, profile, TUNING, [2, 2])
    merged_away = next(e for e in range(8) if e not in TUNING[0])
    with pytest.raises(ValueError, match="does not own its physical expert"):
        attach_tuning(compact, [[merged_away], []], TrainConfig())
    with pytest.raises(ValueError, match="mode must be one of"):
        attach_tuning(model, TUNING, TrainConfig(mode="qlora"))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        attach_tuning(model, TUNING, TrainConfig(rank=0))
    with pytest.raises(ValueError, match="targets"):
        attach_tuning(model, TUNING, TrainConfig(targets=("q_proj",)))
    with pytest.raises(ValueError, match="one list per MoE layer"):
        attach_tuning(model, [[0]], TrainConfig())
    with pytest.raises(ValueError, match="distinct ids"):
        attach_tuning(model, [[0, 0], []], TrainConfig())
    with pytest.raises(ValueError, match="at least one batch"):
        train_round(model, TUNING, [], TrainConfig())
    detach_tuning(model)
    attach_tuning(model, TUNING, TrainConfig())
    with pytest.raises(ValueError, match="already attached"):
        attach_tuning(model, TUNING, TrainConfig())
    with pytest.raises(ValueError, match="rank must be >= 1"):
        ExpertLoRAAdapter(torch.zeros(8, dtype=torch.int32), 64, 48, rank=0, alpha=1.0)


def test_routed_subset():
    samples = [[{"a"}, {"b"}, set(), {"c"}], [{"d"}, set(), {"a", "e"}, set()]]
    assert routed_subset(samples, [[1, 3], [2]], ["a", "b", "c", "d", "e", "f"]) == ["a", "b", "c", "e"]
    profile = ExpertProfile([1, 2], torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.float64),
                            [[sorted(s) for s in layer] for layer in samples])  # fmt: skip
    assert routed_subset(profile, [[0], [0]], ["d", "c", "a"]) == ["d", "a"]
    assert routed_subset(samples, [[], []], ["a"]) == []
    with pytest.raises(ValueError, match="MoE layers"):
        routed_subset(samples, [[1]], ["a"])


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_save_pretrained_refuses_attached_tuning_experts(mode, tmp_path):
    """A checkpoint never holds half-attached tuning state: folding first makes it loadable."""
    from flux_engine import load_pretrained
    from flux_engine.adapters import merge_lora

    model = tiny_model()
    attach_tuning(model, [[0]] + [[] for _ in model.moe_layers()[1:]], TrainConfig(mode=mode))
    with pytest.raises(ValueError, match="tuning experts attached"):
        save_pretrained(model, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    merge_lora(model) if mode == "lora" else detach_tuning(model)
    save_pretrained(model, tmp_path / "ckpt")
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    assert torch.equal(load_pretrained(tmp_path / "ckpt").eval()(ids).logits, model.eval()(ids).logits)
