"""The public ops under ``torch.compile(fullgraph=True)``: each traces without a graph break (dynamo raises on one)
and computes what it computes eagerly; value checks become device-side asserts there; MoE blocks (the runtime's
MoEMLP, HF Mixtral and gpt-oss through "flux") compile with gradients; HF ``generate`` with a compiled fullgraph
forward through "flux" gives eager's tokens."""

import dataclasses

import pytest
import torch
from tolerances import FP32_GEMM

from flux_engine import ops

# aot_eager runs AOTAutograd (fake tensors, the custom ops' fake and autograd registrations) without a C++
# compiler; inductor is exercised once on the MoE block.
BACKEND = "aot_eager"


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=BACKEND)


def _ids(T, E, k, seed=0):
    return torch.rand(T, E, generator=torch.Generator().manual_seed(seed)).topk(k, dim=1).indices.to(torch.int32)


def _same(got, want):
    if isinstance(want, torch.Tensor):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    elif isinstance(want, (tuple, list)):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            _same(g, w)
    elif dataclasses.is_dataclass(want):  # RoutingPlan, QuantizedTensor
        for field in dataclasses.fields(want):
            _same(getattr(got, field.name), getattr(want, field.name))
    else:
        assert got == want


def _op_cases():
    """``name -> (fn, args)``: the op applied to inputs built outside the compiled region."""
    g = torch.Generator().manual_seed(0)
    T, H, E, k, I = 9, 16, 4, 2, 8
    x = torch.randn(T, H, generator=g)
    ids, ids5 = _ids(T, E, k), _ids(T, 5, k, seed=1)
    w = torch.rand(T, k, generator=g)
    gate_up, down = torch.randn(E, 2 * I, H, generator=g) * 0.3, torch.randn(E, H, I, generator=g) * 0.3
    emap = torch.tensor([0, 1, 1, 2, 3], dtype=torch.int32)
    q_gu, q_d = ops.quantize(gate_up, 4, 8), ops.quantize(down, 8)
    form = ops.ExpertForm(interleaved=True, limit=0.5)
    b1, b2 = torch.randn(E, 2 * I, generator=g), torch.randn(E, H, generator=g)
    q, kk = torch.randn(2, 4, 6, 8, generator=g), torch.randn(2, 2, 6, 8, generator=g)
    logits, router, tw = torch.randn(T, E, generator=g), torch.randn(E, H, generator=g), torch.rand(T, generator=g)
    return {
        "route": (lambda lg: ops.route(lg, k), (logits,)),
        "expert_counts": (lambda i, ww: ops.expert_counts(i, E, ww), (ids, w)),
        "permute": (lambda i: ops.permute(i, E, emap), (ids5,)),
        "grouped_mlp": (lambda xx, i: ops.grouped_mlp(xx, gate_up, down, w, i, emap), (x, ids5)),
        "grouped_mlp_form_bias": (
            lambda xx: ops.grouped_mlp(xx, gate_up, down, w, ids, form=form, gate_up_bias=b1, down_bias=b2), (x,),
        ),  # fmt: skip
        "quantize": (lambda t: ops.quantize(t, 4, 8, symmetric=False), (gate_up,)),
        "dequantize": (lambda: ops.dequantize(q_gu, torch.float32), ()),
        "quantized_grouped_mlp": (lambda xx: ops.quantized_grouped_mlp(xx, q_gu, q_d, w, ids), (x,)),
        "received_attention": (lambda a, b: ops.received_attention(a, b, causal=True), (q, kk)),
        "route_and_count": (
            lambda xx, r, t: ops.route_and_count(
                xx, r, k, counts_out=torch.zeros(E, dtype=torch.int64), attn_sums_out=torch.zeros(E), token_weights=t,
            ),
            (x, router, tw),
        ),  # fmt: skip
    }


@pytest.mark.parametrize("name", sorted(_op_cases()))
def test_public_op_traces_without_graph_break(name):
    fn, args = _op_cases()[name]
    _same(_compiled(fn)(*args), fn(*args))


def test_value_checks_are_device_side_asserts_when_traced():
    x, gate_up, down = torch.randn(3, 16), torch.randn(4, 16, 16), torch.randn(4, 16, 8)
    bad = torch.tensor([[0, 4], [1, 2], [3, 0]], dtype=torch.int32)
    w = torch.rand(3, 2)
    with pytest.raises(ValueError, match=r"topk_ids must lie in \[0, 4\), found values in \[0, 4\]"):
        ops.grouped_mlp(x, gate_up, down, w, bad)
    compiled = _compiled(lambda ids: ops.grouped_mlp(x, gate_up, down, w, ids))
    with pytest.raises(RuntimeError, match=r"topk_ids out of range \[0, 4\)"):
        compiled(bad)


# -- MoE blocks ---------------------------------------------------------------------------------------------------


def _block_and_grads(block, x):
    out = block(x)
    out = out[0] if isinstance(out, tuple) else out
    params = [p for p in block.parameters() if p.requires_grad]
    return out, torch.autograd.grad(out.square().sum(), [x, *params])


def _check_block(block, x, backend):
    want_out, want_grads = _block_and_grads(block, x)
    torch._dynamo.reset()
    got_out, got_grads = _block_and_grads(torch.compile(block, fullgraph=True, backend=backend), x)
    torch.testing.assert_close(got_out, want_out, rtol=1e-4, atol=1e-5)
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_runtime_moe_block_compiles():
    """The runtime's MoEMLP with a merged expert map: forward and every gradient."""
    from flux_engine.models.config import MoEConfig
    from flux_engine.models.moe import MoEMLP

    torch.manual_seed(0)
    config = MoEConfig(hidden_size=32, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16)
    block = MoEMLP(config, 0)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 5, 32, requires_grad=True)
    _check_block(block, x, BACKEND)


transformers = pytest.importorskip("transformers")


def _hf(family: str):
    from flux_engine.integrations import transformers as fx  # noqa: F401  (registers "flux")

    common = dict(vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                  num_experts_per_tok=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=2)  # fmt: skip
    if family == "mixtral":  # the testers' default gelu experts
        config = transformers.MixtralConfig(**common, intermediate_size=16, num_local_experts=4, hidden_act="gelu")
    elif family == "olmoe":
        config = transformers.OlmoeConfig(**common, intermediate_size=16, num_experts=4)
    else:
        config = transformers.GptOssConfig(
            **common, intermediate_size=16, num_local_experts=4, head_dim=8, swiglu_limit=0.5,
            layer_types=["sliding_attention", "full_attention"], sliding_window=4,
        )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="flux")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.3)
    return model.eval()


@pytest.mark.parametrize(
    "family, backend", [("mixtral", "aot_eager"), ("gpt_oss", "aot_eager"), ("mixtral", "inductor")]
)
def test_hf_sparse_block_compiles_through_flux(family, backend):
    model = _hf(family)
    block = model.model.layers[0].mlp
    assert model.config._experts_implementation == "flux"
    _check_block(block, torch.randn(2, 5, 32, requires_grad=True), backend)


@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
def test_hf_generate_with_compiled_fullgraph_forward(family):
    """transformers compiles the decoding forward (static cache, CompileConfig(fullgraph=True)) through "flux"."""
    from transformers.generation.configuration_utils import CompileConfig

    model = _hf(family)
    ids = torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static")
    want = model.generate(ids, disable_compile=True, **kwargs)
    compile_config = CompileConfig(fullgraph=True, dynamic=False, backend=BACKEND, mode=None)
    compile_config._compile_all_devices = True  # transformers compiles on GPUs only unless asked
    torch._dynamo.reset()
    got = model.generate(ids, compile_config=compile_config, **kwargs)
    assert hasattr(model, "_compiled_call"), "generate did not compile the forward"
    assert torch.equal(got, want)


@pytest.mark.triton
def test_grouped_mlp_compiles_on_the_triton_tier(device, force_tier):
    """The opaque op runs the forced tier inside (the Triton kernels; interpreted without a GPU): gpt-oss's form
    with biases over a merged expert map, values and gradients against the eager reference."""
    g = torch.Generator().manual_seed(4)
    T, H, E, I = 7, 16, 4, 8
    form = ops.ExpertForm(interleaved=True, limit=0.5)
    tensors = [torch.randn(T, H, generator=g), torch.randn(E, 2 * I, H, generator=g) * 0.3,
               torch.randn(E, H, I, generator=g) * 0.3, torch.rand(T, 2, generator=g),
               torch.randn(E, 2 * I, generator=g), torch.randn(E, H, generator=g)]  # fmt: skip
    tensors = [t.to(device).requires_grad_() for t in tensors]
    ids, emap = _ids(T, 5, 2, seed=3).to(device), torch.tensor([0, 1, 1, 2, 3], dtype=torch.int32, device=device)

    def fn(x, gate_up, down, w, b1, b2):
        return ops.grouped_mlp(x, gate_up, down, w, ids, emap, form=form, gate_up_bias=b1, down_bias=b2)

    def run(f):
        out = f(*tensors)
        return out, torch.autograd.grad(out.square().sum(), tensors)

    force_tier("reference", device)
    want = run(fn)
    force_tier("triton", device)
    got = run(_compiled(fn))
    for a, b in zip((got[0], *got[1]), (want[0], *want[1])):
        torch.testing.assert_close(a, b, rtol=FP32_GEMM, atol=FP32_GEMM)  # TF32 on a GPU
