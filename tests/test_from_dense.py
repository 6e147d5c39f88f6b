"""MoE construction from a dense Llama model: exact step-0 equalities, Drop-Upcycling, errors."""

import pytest
import torch

from flux_engine.models import MoEConfig, MoEForCausalLM, from_dense
from flux_engine.models.from_dense import llama_config

V, H, I = 97, 32, 48


def dense_model(tied: bool = True, layers: int = 3) -> MoEForCausalLM:
    """A random dense Llama (GQA) whose FFNs are large enough to dominate the residual stream, so a wrong
    expert construction shows in the logits."""
    config = MoEConfig(
        vocab_size=V, hidden_size=H, num_layers=layers, num_heads=4, num_kv_heads=2, intermediate_size=I,
        moe_layers=[], tie_word_embeddings=tied, rope_theta=10000.0,
    )
    model = MoEForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp." in name:
                p.normal_(0.0, 0.3)
    return model.eval()


def logits(model: MoEForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.fixture
def ids():
    return torch.randint(0, V, (2, 13))


def assert_same_logits(moe, dense, ids):
    torch.testing.assert_close(logits(moe, ids), logits(dense, ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("split", ["random", "kmeans"])
def test_split_with_all_experts_and_unit_weights_is_the_dense_model(split, ids):
    dense = dense_model()
    moe = from_dense(dense.state_dict(), dense.config, 4, 4, method="split", split=split, scoring="ones")
    assert moe.config.moe_intermediate_size == I // 4 and moe.config.moe_layer_indices == [0, 1, 2]
    assert_same_logits(moe, dense, ids)
    # The groups partition the neurons: every dense gate row appears in exactly one expert.
    gate = dense.model.layers[1].mlp.gate_proj.weight
    rows = moe.model.layers[1].mlp.experts.gate_up_proj[:, : I // 4].reshape(-1, H)
    assert torch.equal(torch.sort(rows, dim=0).values, torch.sort(gate, dim=0).values)
    # With k < E the split is lossy: the check above is sensitive.
    lossy = from_dense(dense.state_dict(), dense.config, 4, 2, method="split", split=split)
    assert (logits(lossy, ids) - logits(dense, ids)).abs().max() > 1e-2


def test_kmeans_groups_neurons_with_similar_weights():
    """Two planted clusters of neurons (opposite directions) are recovered exactly."""
    from flux_engine.models.from_dense import kmeans_groups

    base = torch.randn(1, 16)
    features = torch.cat([base + 0.05 * torch.randn(8, 16), -base + 0.05 * torch.randn(8, 16)])[torch.randperm(16)]
    groups = kmeans_groups(features, 2, torch.Generator().manual_seed(0))
    signs = torch.sign(features[groups] @ base.t()).squeeze(-1)
    assert groups.shape == (2, 8) and (signs == signs[:, :1]).all()


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_upcycle_matches_dense_at_step_0_for_any_k(top_k, ids):
    dense = dense_model(tied=False)
    moe = from_dense(dense.state_dict(), dense.config, 4, top_k, method="upcycle", moe_layers=[0, 2])
    assert [layer.is_moe for layer in moe.model.layers] == [True, False, True]
    assert_same_logits(moe, dense, ids)


def test_upcycle_from_transformers_names_and_config(ids):
    """A transformers-style state dict (tied head absent, rotary buffers present) and LlamaConfig dict."""
    dense = dense_model(tied=True)
    state = {k: v for k, v in dense.state_dict().items() if k != "lm_head.weight"}
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    c = dense.config
    hf = dict(model_type="llama", vocab_size=V, hidden_size=H, num_hidden_layers=c.num_layers, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=I, rms_norm_eps=c.rms_norm_eps, hidden_act="silu",
              rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
              max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=True, mlp_bias=False)
    assert llama_config(hf).replace(metadata={}) == c.replace(metadata={})
    moe = from_dense(state, hf, 8, 2)
    assert moe.lm_head.weight is moe.model.embed_tokens.weight
    assert_same_logits(moe, dense, ids)


def test_fine_grained_shared_expert_matches_dense_at_step_0_and_learns(ids):
    dense = dense_model()
    moe = from_dense(dense.state_dict(), dense.config, 8, 2, method="fine_grained", expert_size=12, moe_layers=[1])
    mlp = moe.model.layers[1].mlp
    assert moe.config.shared_expert_intermediate_size == I and not moe.config.norm_topk_prob
    assert mlp.experts.gate_up_proj.shape == (8, 24, H) and not mlp.experts.down_proj.any()
    assert_same_logits(moe, dense, ids)
    # Zero down projections still receive gradient, so the routed experts start learning at once.
    moe.train()(ids, labels=ids).loss.backward()
    assert mlp.experts.down_proj.grad.abs().sum() > 0


def test_drop_upcycling_reinitialises_the_requested_fraction_per_expert(ids):
    dense = dense_model()
    moe = from_dense(dense.state_dict(), dense.config, 4, 2, method="upcycle", drop_fraction=0.25, moe_layers=[1])
    mlp, ref = moe.model.layers[1].mlp.experts, dense.model.layers[1].mlp
    kept = []
    for e in range(4):
        same = [
            (mlp.gate_up_proj[e, :I] == ref.gate_proj.weight).all(1),
            (mlp.gate_up_proj[e, I:] == ref.up_proj.weight).all(1),
            (mlp.down_proj[e] == ref.down_proj.weight).all(0),
        ]
        assert torch.equal(same[0], same[1]) and torch.equal(same[0], same[2]), "a neuron is dropped as a whole"
        assert int((~same[0]).sum()) == I // 4
        kept.append(same[0])
    assert len({tuple(k.tolist()) for k in kept}) == 4, "each expert drops a different set"
    assert (logits(moe, ids) - logits(dense, ids)).abs().max() > 1e-3, "step-0 equality no longer holds"
    again = from_dense(dense.state_dict(), dense.config, 4, 2, method="upcycle", drop_fraction=0.25, moe_layers=[1])
    assert torch.equal(again.model.layers[1].mlp.experts.down_proj, mlp.down_proj), "seeded"


def test_noise_is_relative_and_the_dense_model_is_untouched():
    dense = dense_model()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    moe = from_dense(dense.state_dict(), dense.config, 2, 1, noise=0.01, moe_layers=[0])
    w = moe.model.layers[0].mlp.experts.gate_up_proj
    rel = (w[0] - w[1]).norm() / w[0].norm()
    assert 0.005 < rel < 0.03
    with torch.no_grad():
        for p in moe.parameters():
            p.add_(1.0)
    assert all(torch.equal(v, before[k]) for k, v in dense.state_dict().items())


def test_errors():
    dense = dense_model()
    state, cfg = dense.state_dict(), dense.config
    with pytest.raises(ValueError, match="missing.*mlp.up_proj"):
        from_dense({k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"}, cfg, 4, 2)
    with pytest.raises(ValueError, match="unsupported.*q_proj.bias"):
        from_dense({**state, "model.layers.0.self_attn.q_proj.bias": torch.zeros(H)}, cfg, 4, 2)
    with pytest.raises(ValueError, match="down_proj.weight.*shape"):
        from_dense({**state, "model.layers.2.mlp.down_proj.weight": torch.zeros(H, I + 1)}, cfg, 4, 2)
    with pytest.raises(ValueError, match="divide intermediate_size"):
        from_dense(state, cfg, 5, 2, method="split")
    with pytest.raises(ValueError, match="method"):
        from_dense(state, cfg, 4, 2, method="merge")
    with pytest.raises(ValueError, match="top_k"):
        from_dense(state, cfg, 4, 5)
    with pytest.raises(ValueError, match="upcycle.*only"):
        from_dense(state, cfg, 4, 2, method="split", drop_fraction=0.5)
    with pytest.raises(ValueError, match="width"):
        from_dense(state, cfg, 4, 2, method="upcycle", expert_size=12)
    with pytest.raises(ValueError, match="only.*scoring"):
        from_dense(state, cfg, 4, 2, num_layers=2)
    with pytest.raises(ValueError, match="outside"):
        from_dense(state, cfg, 4, 2, moe_layers=[3])
    with pytest.raises(ValueError, match="expected a dense model"):
        from_dense(state, cfg.replace(moe_layers=None), 4, 2)
    with pytest.raises(ValueError, match="model_type='mistral'"):
        from_dense(state, {"model_type": "mistral"}, 4, 2)
