"""The "flux" experts implementation inside transformers v5 and the Flux mechanisms on HF models: parity with
transformers' eager experts (logits and gradients, reference and Triton tiers), profiling against the runtime's
profiler, merge -> save_pretrained -> reload against the runtime's merged model, sparse LoRA, conversions,
generate, and clear errors for layouts the op cannot express."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.integrations.moe import use_experts_implementation  # noqa: E402

from transformers.activations import ACT2FN  # noqa: E402

from flux_engine import merging, ops  # noqa: E402
from flux_engine.checkpoint import CheckpointError  # noqa: E402
from flux_engine.integrations import transformers as fx  # noqa: E402
from flux_engine.profiling import profile  # noqa: E402

VOCAB, HIDDEN, SEQ = 64, 32, (2, 6)
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    num_experts_per_tok=2,
    max_position_embeddings=32,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
# Each family's config with 4 experts of I=16; every layer MoE.
FAMILIES = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=16, num_local_experts=4)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(intermediate_size=24, moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=4),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(head_dim=8, intermediate_size=24, moe_intermediate_size=16, num_experts=4, norm_topk_prob=True),
    ),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=16, num_experts=4)),
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(
            intermediate_size=24, moe_intermediate_size=16, n_routed_experts=4, n_shared_experts=1,
            first_k_dense_replace=0, n_group=1, topk_group=1, kv_lora_rank=8, q_lora_rank=None, qk_rope_head_dim=4,
            qk_nope_head_dim=4, v_head_dim=8, num_key_value_heads=4,  # MLA: one key head per query head
        ),
    ),  # fmt: skip
    "granitemoe": ("GraniteMoeConfig", dict(intermediate_size=16, num_local_experts=4)),
    # The other expert forms: the testers' default gelu, a tanh gelu, gpt-oss (interleaved clamped SwiGLU, biases,
    # transposed stacks; a small swiglu_limit so the clamps act on these activations).
    "mixtral_gelu": ("MixtralConfig", dict(intermediate_size=16, num_local_experts=4, hidden_act="gelu")),
    "qwen3_moe_gelu_tanh": (
        "Qwen3MoeConfig",
        dict(head_dim=8, intermediate_size=24, moe_intermediate_size=16, num_experts=4, hidden_act="gelu_pytorch_tanh"),
    ),
    "nemotron_h": (  # ungated relu2 experts behind a latent-free MoE mixer, between a mamba and an attention layer
        "NemotronHConfig",
        dict(head_dim=8, layers_block_type=["mamba", "moe", "attention"], n_routed_experts=4, moe_intermediate_size=16,
             moe_shared_expert_intermediate_size=16, n_group=1, topk_group=1, mamba_num_heads=4, mamba_head_dim=8,
             ssm_state_size=8, n_groups=1, chunk_size=8, intermediate_size=24),
    ),
    "gpt_oss": (
        "GptOssConfig",
        dict(intermediate_size=16, num_local_experts=4, head_dim=8, swiglu_limit=0.5,
             layer_types=["sliding_attention", "full_attention"], sliding_window=4),
    ),  # fmt: skip
}


def _randomize(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name else 0.0))


def _build(family: str, impl: str = "eager"):
    config_class, kwargs = FAMILIES[family]
    config = getattr(transformers, config_class)(**{**COMMON, **kwargs})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, experts_implementation=impl)
    _randomize(model)
    return model.eval()


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, SEQ, generator=torch.Generator().manual_seed(seed))


def _logits_and_grads(model, ids):
    model.zero_grad()
    logits = model(input_ids=ids).logits
    logits.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


# -- the backend -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tier", ["reference", "triton"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_flux_matches_eager(family, tier, force_tier):
    force_tier(tier, torch.device("cpu"))
    model = _build(family)
    ids = _ids()
    want_logits, want_grads = _logits_and_grads(model, ids)
    model.set_experts_implementation("flux")
    calls = []
    hook = fx.moe_layers(model)[0].experts.register_forward_hook(lambda *a: calls.append(1))
    logits, grads = _logits_and_grads(model, ids)
    hook.remove()
    assert calls and model.config._experts_implementation == "flux"
    torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=1e-4)
    assert grads.keys() == want_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], atol=1e-4, rtol=1e-4, msg=name)


def test_from_pretrained_and_generate(tmp_path):
    model = _build("qwen3_moe")
    model.save_pretrained(tmp_path)
    flux = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="flux").eval()
    assert flux.config._experts_implementation == "flux"
    ids = _ids()[:1]
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    want = model.generate(ids, **kwargs)
    got = flux.generate(ids, **kwargs)
    assert got.shape == (1, ids.shape[1] + 4)
    assert torch.equal(got, want)


def _param(*shape):
    return torch.nn.Parameter(torch.randn(*shape) * 0.4)


@use_experts_implementation(is_transposed=True)
class TransposedExperts(torch.nn.Module):
    """Experts stored ``[E, H, 2I]`` / ``[E, I, H]`` (aria's layout); its own forward is never used."""

    def __init__(self, config):
        super().__init__()
        self.num_experts, self.act_fn = 4, ACT2FN[config.hidden_act]
        self.gate_up_proj, self.down_proj = _param(4, HIDDEN, 2 * 16), _param(4, 16, HIDDEN)


@use_experts_implementation(has_gate=False, has_bias=True, is_transposed=True)
class UngatedBiasedExperts(torch.nn.Module):
    """Ungated experts (Nemotron-H's layout, ``act(up)``) with biases, transposed stacks."""

    def __init__(self, config):
        super().__init__()
        self.num_experts, self.act_fn = 4, ACT2FN[config.hidden_act]
        self.up_proj, self.up_proj_bias = _param(4, HIDDEN, 16), _param(4, 16)
        self.down_proj, self.down_proj_bias = _param(4, 16, HIDDEN), _param(4, HIDDEN)


@use_experts_implementation(is_concatenated=False, has_bias=True)
class InterleavedExperts(torch.nn.Module):
    """Gate/up rows interleaved, split by its own ``_apply_gate``, with biases."""

    def __init__(self, config):
        super().__init__()
        self.num_experts, self.act_fn = 4, ACT2FN[config.hidden_act]
        self.gate_up_proj, self.gate_up_proj_bias = _param(4, 2 * 16, HIDDEN), _param(4, 2 * 16)
        self.down_proj, self.down_proj_bias = _param(4, HIDDEN, 16), _param(4, HIDDEN)

    def _apply_gate(self, gate_up):
        return self.act_fn(gate_up[..., ::2]) * gate_up[..., 1::2]


@use_experts_implementation(has_post_expert_norm=True)
class PostNormExperts(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_experts, self.act_fn = 4, ACT2FN[config.hidden_act]
        self.gate_up_proj, self.down_proj = _param(4, 2 * 16, HIDDEN), _param(4, HIDDEN, 16)
        self.post_expert_norm = torch.nn.LayerNorm(HIDDEN)


class SquaredGateExperts(InterleavedExperts):
    """A custom gate that is no ExpertForm: ``act(gate)^2 * up``."""

    def _apply_gate(self, gate_up):
        return self.act_fn(gate_up[..., ::2]) ** 2 * gate_up[..., 1::2]


@pytest.mark.parametrize(
    "cls, act", [(TransposedExperts, "silu"), (UngatedBiasedExperts, "relu2"), (UngatedBiasedExperts, "gelu_new"),
                 (InterleavedExperts, "gelu"), (InterleavedExperts, "silu")],
)  # fmt: skip
def test_expert_layouts_match_batched_mm(cls, act):
    """Transposed stacks, ungated experts with biases, an interleaved custom gate: values and every gradient."""
    config = transformers.PretrainedConfig(hidden_act=act)
    experts = cls(config)
    x = torch.randn(9, HIDDEN, requires_grad=True)
    ids = torch.rand(9, 4).topk(2, dim=1).indices
    w = torch.rand(9, 2, requires_grad=True)
    wrt = (x, w, *experts.parameters())
    out = {}
    for impl in ("batched_mm", "flux"):
        config._experts_implementation = impl
        y = experts(x, ids, w)
        out[impl] = (y, *torch.autograd.grad(y.square().sum(), wrt))
    for want, got in zip(out["batched_mm"], out["flux"]):
        # fp32, summed in other orders; relu2 squares values of a few units, so rtol 1e-3 (relative)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)


def test_expert_forms_of_hf_modules():
    def form(cls, act="silu", **attrs):
        experts = cls(transformers.PretrainedConfig(hidden_act=act))
        for k, v in attrs.items():
            setattr(experts, k, v)
        return fx.expert_form(experts)

    assert form(TransposedExperts) == ops.SILU
    assert form(TransposedExperts, "gelu_pytorch_tanh") == ops.ExpertForm("gelu_tanh")
    assert form(UngatedBiasedExperts, "relu") == ops.ExpertForm("relu", gated=False)
    assert form(InterleavedExperts, "gelu") == ops.ExpertForm("gelu", interleaved=True)
    gpt_oss = _build("gpt_oss")
    assert fx.expert_form(fx.moe_layers(gpt_oss)[0].experts) == ops.ExpertForm(interleaved=True, limit=0.5, alpha=1.702)
    assert form(UngatedBiasedExperts, "relu2") == ops.ExpertForm("relu2", gated=False)  # Nemotron-H's
    with pytest.raises(fx.UnsupportedExpertsLayout, match=r"UngatedBiasedExperts: the activation QuickGELUActivation"):
        form(UngatedBiasedExperts, "quick_gelu")
    with pytest.raises(fx.UnsupportedExpertsLayout, match=r"PostNormExperts: has_post_expert_norm=True"):
        form(PostNormExperts)
    with pytest.raises(fx.UnsupportedExpertsLayout, match=r"SquaredGateExperts: a custom _apply_gate computing"):
        form(SquaredGateExperts)
    model = _build("mixtral_gelu")
    model.set_experts_implementation("flux")
    fx.moe_layers(model)[0].experts._is_expert_parallel = True
    with pytest.raises(fx.UnsupportedExpertsLayout, match=r"MixtralExperts: expert parallelism"):
        model(input_ids=_ids())
    with pytest.raises(CheckpointError, match="unsupported model_type 'deepseek_v3'"):
        fx.to_runtime(_build("deepseek_v3"))


# -- the Flux mechanisms -----------------------------------------------------------------------------------------


def _batches():
    mask = torch.ones(*SEQ, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    return [{"input_ids": _ids(1), "attention_mask": mask, "sample_ids": ["a", "b"]}, {"input_ids": _ids(2)}]


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe"])
def test_profile_matches_runtime_profiler(family):
    model = _build(family)
    got = fx.profile_hf(model, _batches())
    want = profile(fx.to_runtime(model), _batches(), bits=None)
    assert model.config._attn_implementation == "sdpa"  # restored
    assert got.layers == want.layers == [0, 1]
    assert torch.equal(got.counts, want.counts) and got.num_tokens == want.num_tokens == 2 * 6 * 2 - 2
    torch.testing.assert_close(got.attn_sums, want.attn_sums, atol=1e-5, rtol=1e-5)
    assert got.samples == want.samples


def test_merge_save_reload_matches_runtime_merge(tmp_path):
    model = _build("qwen2_moe")
    runtime = fx.to_runtime(model)
    prof = fx.profile_hf(model, _batches())
    tuning, budgets = [[1], [0]], [2, 1]
    plan = fx.merge_hf(model, prof, tuning, budgets)
    assert plan.physical_experts == [3, 2]
    assert model.config._experts_implementation == "flux"
    assert [m.experts.gate_up_proj.shape[0] for m in fx.moe_layers(model)] == [3, 2]
    merged_runtime = merging.merge(runtime, prof, tuning, budgets)
    assert merged_runtime.merge_plan.groups == plan.groups
    ids = _ids(3)
    with torch.no_grad():
        want = merged_runtime(ids).logits
        torch.testing.assert_close(model(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = fx.load_merged_hf(tmp_path)
    assert type(reloaded) is type(model) and reloaded.config._experts_implementation == "flux"
    for a, b in zip(fx.moe_layers(reloaded), fx.moe_layers(model)):
        assert torch.equal(a.experts.expert_map, b.experts.expert_map)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
    # Both conversions keep the merge.
    back = fx.to_runtime(reloaded)
    assert back.config.physical_experts == [3, 2]
    again = fx.from_runtime(merged_runtime)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(again(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_runtime_round_trip(family):
    model = _build(family)
    runtime = fx.to_runtime(model)
    back = fx.from_runtime(runtime)
    assert type(back) is type(model) and back.config._experts_implementation == "flux"
    ids = _ids()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        torch.testing.assert_close(runtime(ids).logits, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(back(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


@pytest.mark.parametrize("tier", ["reference", "triton"])
def test_sparse_lora_trains_only_tuning_experts(tier, force_tier):
    model = _build("olmoe")
    ids = _ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    loras = fx.attach_sparse_lora(model, [[1, 3], []], r=4, alpha=8.0)
    assert list(loras) == [0] and loras[0].gate_up_A.shape == (2, 4, HIDDEN)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.0.mlp.experts.lora.{f}" for f in ("gate_up_A", "gate_up_B", "down_A", "down_B")}
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before)  # B = 0: unchanged
        for p in loras[0].parameters():
            p.normal_(0, 0.2)
    # The runtime model with a copy of the adapter, on the reference tier, is the oracle; and back again.
    runtime = fx.to_runtime(model)
    assert runtime.moe_layers()[0].experts.lora is not loras[0]
    force_tier("reference", torch.device("cpu"))
    with torch.no_grad():
        want = runtime(ids).logits
        torch.testing.assert_close(fx.from_runtime(runtime)(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
    force_tier(tier, torch.device("cpu"))
    logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits.detach(), want, atol=1e-4, rtol=1e-4)
    logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loras[0].parameters())


@pytest.mark.parametrize("family", ["deepseek_v3", "granitemoe"])
def test_profile_invariants_without_runtime_layout(family):
    """Families the runtime cannot load: every counted token routes k slots; each sequence's received attention
    sums to 1, so per layer the attention sums add up to k per sequence."""
    got = fx.profile_hf(_build(family), _batches())
    k = COMMON["num_experts_per_tok"]
    assert got.layers == [0, 1] and got.num_tokens == 22
    assert got.counts.sum(1).tolist() == [k * 22] * 2
    torch.testing.assert_close(got.attn_sums.sum(1), torch.full((2,), 4.0 * k, dtype=torch.float64))
