"""The runtime model: presets, forward semantics, masks, checkpointing, meta construction."""

import pytest
import torch

from flux_engine import MoEConfig, MoEForCausalLM, presets

PUBLISHED_TOTALS = {"llama-moe-3.5b": 6.7e9, "deepseek-moe-16b": 16.4e9, "mixtral-8x7b": 46.7e9, "qwen3-30b-a3b": 30.5e9, "olmoe-1b-7b": 6.9e9}


def tiny(**changes) -> MoEConfig:
    return presets.get("tiny").replace(**changes)


@pytest.mark.parametrize("name", sorted(PUBLISHED_TOTALS))
def test_preset_parameter_counts_match_published(name):
    with torch.device("meta"):
        model = MoEForCausalLM(presets.get(name))
    assert abs(model.num_parameters() / PUBLISHED_TOTALS[name] - 1) < 0.01


def test_every_preset_builds_and_unknown_preset_errors():
    for name in presets.names():
        with torch.device("meta"):
            MoEForCausalLM(presets.get(name))
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        presets.get("nope")


def test_forward_is_causal_and_returns_routers():
    model = MoEForCausalLM(tiny()).eval()
    ids = torch.randint(0, 256, (2, 10))
    out = model(ids, return_routers=True)
    assert out.logits.shape == (2, 10, 256)
    assert [r.layer for r in out.routers] == [1, 2]
    assert out.routers[0].logits.shape == (20, 8) and out.routers[0].ids.shape == (20, 2)
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 256
    assert torch.allclose(model(changed).logits[:, :6], out.logits[:, :6], atol=1e-6)


def test_left_padding_matches_unpadded_sequence():
    model = MoEForCausalLM(tiny(qk_norm="head", attention_bias=True)).eval()
    ids = torch.randint(0, 256, (1, 7))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.tensor([[0, 0, 0] + [1] * 7])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    got = model(padded, attention_mask=mask, position_ids=positions).logits[:, 3:]
    assert torch.allclose(got, model(ids).logits, atol=1e-5)


def test_sliding_window_limits_context():
    model = MoEForCausalLM(tiny(sliding_window=3)).eval()
    ids = torch.randint(0, 256, (1, 9))
    changed = ids.clone()
    changed[0, 0] = (changed[0, 0] + 1) % 256
    base, other = model(ids).logits, model(changed).logits
    # Each of the 3 layers reaches 2 positions back, so token 0 influences positions 0..6 only.
    assert not torch.allclose(base[0, 6], other[0, 6])
    assert torch.allclose(base[0, 7:], other[0, 7:], atol=1e-6)
    full = MoEForCausalLM(tiny()).eval()
    full.load_state_dict(model.state_dict())
    assert not torch.allclose(full(ids).logits[0, 8], base[0, 8])


def test_loss_is_shifted_cross_entropy_and_ignores_padding_labels():
    model = MoEForCausalLM(tiny()).eval()
    ids = torch.randint(0, 256, (2, 6))
    labels = ids.clone()
    labels[1, 3:] = -100
    out = model(ids, labels=labels)
    logits = out.logits[:, :-1]
    keep = labels[:, 1:] != -100
    want = torch.nn.functional.cross_entropy(logits[keep], labels[:, 1:][keep])
    assert torch.allclose(out.loss, want, atol=1e-6)


def test_aux_loss_added_in_training_only():
    model = MoEForCausalLM(tiny(router_aux_loss_coef=0.5))
    ids = torch.randint(0, 256, (2, 8))
    train = model.train()(ids, labels=ids)
    evaluation = model.eval()(ids, labels=ids)
    assert train.aux_loss is not None and train.aux_loss.item() >= 0.99  # >= 1, equality for uniform routing
    assert torch.allclose(train.loss, evaluation.loss + 0.5 * evaluation.aux_loss, atol=1e-6)


def test_gradient_checkpointing_matches_plain_backward():
    torch.manual_seed(1)
    model = MoEForCausalLM(tiny(shared_expert_intermediate_size=32, shared_expert_gate=True))
    ids = torch.randint(0, 256, (2, 8))
    model(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing = True
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, plain[n], atol=1e-6), n
    assert plain["model.layers.1.mlp.gate.weight"].abs().sum() > 0, "the router must receive gradients"


def test_meta_construction_then_materialise():
    with torch.device("meta"):
        model = MoEForCausalLM(tiny(tie_word_embeddings=True))
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.isfinite(model(torch.randint(0, 256, (1, 4))).logits).all()


def test_merged_layer_uses_expert_map():
    config = tiny()
    model = MoEForCausalLM(config).eval()
    merged = MoEForCausalLM(config.with_physical_experts([4, 8])).eval()
    state = model.state_dict()
    # Physical expert j of layer 1 = original expert 2j; originals 2j and 2j+1 both map to it.
    state["model.layers.1.mlp.experts.gate_up_proj"] = state["model.layers.1.mlp.experts.gate_up_proj"][0::2].clone()
    state["model.layers.1.mlp.experts.down_proj"] = state["model.layers.1.mlp.experts.down_proj"][0::2].clone()
    state["model.layers.1.mlp.experts.expert_map"] = torch.arange(8, dtype=torch.int32) // 2
    merged.load_state_dict(state)
    with torch.no_grad():
        for e in range(1, 8, 2):  # make the odd originals copies of their even partners: merging is exact
            model.model.layers[1].mlp.experts.gate_up_proj[e] = model.model.layers[1].mlp.experts.gate_up_proj[e - 1]
            model.model.layers[1].mlp.experts.down_proj[e] = model.model.layers[1].mlp.experts.down_proj[e - 1]
    ids = torch.randint(0, 256, (2, 9))
    assert torch.allclose(merged(ids).logits, model(ids).logits, atol=1e-5)


def test_config_validation():
    with pytest.raises(ValueError, match="num_kv_heads"):
        tiny(num_kv_heads=3)
    with pytest.raises(ValueError, match="moe_layers"):
        tiny(moe_layers=[5])
    with pytest.raises(ValueError, match="physical_experts"):
        tiny(physical_experts=[4])
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        tiny(num_experts_per_tok=9)
    with pytest.raises(ValueError, match="unknown MoEConfig keys: bogus"):
        MoEConfig.from_dict({"bogus": 1})
    assert MoEConfig.from_dict(tiny().to_dict()) == tiny()
