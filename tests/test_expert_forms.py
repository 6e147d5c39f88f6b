"""Every ``ExpertForm`` (activation, gated or not, interleaved gate/up rows, gpt-oss's clamped SwiGLU) and the
expert biases, through ``grouped_mlp`` and ``quantized_grouped_mlp``: the reference tier against a hand-written
per-token loop (values and gradients), the Triton tier against the reference (expert_map, LoRA, tuned experts,
packed int4/int8 bases), and the argument checks."""

import math

import pytest
import torch
from tolerances import FP32_GEMM

from flux_engine.ops import SILU, ExpertForm, ExpertLoRA, TunedExperts, grouped_mlp, quantize, quantized_grouped_mlp
from flux_engine.ops.quantize import dequantize

H, I = 24, 40
FORMS = {
    "silu": SILU,
    "gelu": ExpertForm("gelu"),
    "gelu_tanh": ExpertForm("gelu_tanh"),
    "relu": ExpertForm("relu"),
    "silu_interleaved": ExpertForm(interleaved=True),
    "gelu_ungated": ExpertForm("gelu", gated=False),
    "relu_ungated": ExpertForm("relu", gated=False),
    "relu2_ungated": ExpertForm("relu2", gated=False),
    "gpt_oss": ExpertForm(interleaved=True, limit=0.7, alpha=1.702),
}


# -- the oracle: one token at a time, the activations written out -------------------------------------------------


def _act(name: str, v: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return v / (1 + torch.exp(-v))
    if name == "gelu":
        return 0.5 * v * (1 + torch.erf(v / math.sqrt(2)))
    if name == "gelu_tanh":
        return 0.5 * v * (1 + torch.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))
    if name == "relu2":
        return torch.where(v > 0, v * v, torch.zeros_like(v))
    return torch.where(v > 0, v, torch.zeros_like(v))


def _expert(form: ExpertForm, gu: torch.Tensor) -> torch.Tensor:
    if not form.gated:
        return _act(form.activation, gu)
    n = gu.shape[0] // 2
    gate, up = (gu[0::2], gu[1::2]) if form.interleaved else (gu[:n], gu[n:])
    if form.limit is not None:
        gate = torch.minimum(gate, torch.tensor(form.limit))
        up = torch.maximum(torch.minimum(up, torch.tensor(form.limit)), torch.tensor(-form.limit))
        return (up + 1) * gate / (1 + torch.exp(-form.alpha * gate))
    return _act(form.activation, gate) * up


def per_token(x, gate_up, down, w, ids, expert_map=None, *, form=SILU, gate_up_bias=None, down_bias=None):
    """``out[t] = sum over the distinct physical experts e of token t of (sum of its slots' weights) *
    (down_e form(gate_up_e x_t + b1_e) + b2_e)``, in float64."""
    T = x.shape[0]
    out = []
    for t in range(T):
        weights = {}
        for j in range(ids.shape[1]):
            e = int(ids[t, j]) if expert_map is None else int(expert_map[ids[t, j]])
            weights[e] = weights.get(e, 0) + w[t, j].double()
        acc = torch.zeros(x.shape[1], dtype=torch.float64)
        for e, we in weights.items():
            gu = gate_up[e].double() @ x[t].double()
            if gate_up_bias is not None:
                gu = gu + gate_up_bias[e].double()
            y = down[e].double() @ _expert(form, gu)
            if down_bias is not None:
                y = y + down_bias[e].double()
            acc = acc + we * y
        out.append(acc)
    return torch.stack(out)


# -- inputs ---------------------------------------------------------------------------------------------------------


def make(T, E, k, form, *, bias=True, dtype=torch.float32, num_original=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_original = num_original or E
    rows = form.gate_up_rows(I)
    t = {
        "x": torch.randn(T, H, generator=g),
        "gate_up": torch.randn(E, rows, H, generator=g) / H**0.5,
        "down": torch.randn(E, H, I, generator=g) / I**0.5,
        "topk_weights": torch.rand(T, k, generator=g),
    }
    if bias:
        t["gate_up_bias"] = torch.randn(E, rows, generator=g) * 0.5
        t["down_bias"] = torch.randn(E, H, generator=g) * 0.5
    t = {n: v.to(dtype if n != "topk_weights" else torch.float32).requires_grad_() for n, v in t.items()}
    t["topk_ids"] = torch.rand(T, num_original, generator=g).topk(k, dim=1).indices.to(torch.int32)
    return t


DIFF = ("x", "gate_up", "down", "topk_weights", "gate_up_bias", "down_bias")


def grads_of(out, tensors, extra=None):
    """Gradients of ``<out, fixed random cotangent>`` wrt the differentiable tensors (and ``extra``, a dict)."""
    tensors = {**{n: tensors[n] for n in DIFF if n in tensors}, **(extra or {})}
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out)
    return dict(zip(tensors, torch.autograd.grad(out, list(tensors.values()), cot)))


def call(fn, t, form, expert_map=None, **kw):
    return fn(
        t["x"], t["gate_up"], t["down"], t["topk_weights"], t["topk_ids"], expert_map, form=form,
        gate_up_bias=t.get("gate_up_bias"), down_bias=t.get("down_bias"), **kw,
    )  # fmt: skip


def rel(a, b) -> float:
    b = b.double()
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


# -- ExpertForm ----------------------------------------------------------------------------------------------------


def test_form_is_hashable_and_validated():
    assert ExpertForm() == SILU
    assert hash(ExpertForm(interleaved=True, limit=7)) == hash(ExpertForm(interleaved=True, limit=7.0))
    assert len(set(FORMS.values())) == len(FORMS)
    with pytest.raises(ValueError, match="activation must be one of silu, gelu, gelu_tanh, relu, relu2, got 'tanh'"):
        ExpertForm("tanh")
    with pytest.raises(ValueError, match="interleaved needs gated=True"):
        ExpertForm(gated=False, interleaved=True)
    with pytest.raises(ValueError, match="limit .* needs activation='silu' and gated=True"):
        ExpertForm("gelu", limit=7.0)
    with pytest.raises(ValueError, match="limit must be a positive finite number"):
        ExpertForm(limit=float("inf"))
    with pytest.raises(ValueError, match="alpha must be a positive finite number"):
        ExpertForm(limit=7.0, alpha=0)
    with pytest.raises(TypeError, match="gated must be a bool"):
        ExpertForm(gated=1)


@pytest.mark.parametrize("name", sorted(FORMS))
def test_form_apply_matches_written_out_math(name):
    form = FORMS[name]
    gu = torch.randn(5, form.gate_up_rows(I), dtype=torch.float64) * 2
    want = torch.stack([_expert(form, row) for row in gu])
    torch.testing.assert_close(form.apply(gu), want)


# -- the reference tier against the per-token loop -----------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", sorted(FORMS))
def test_reference_matches_per_token_loop(name, bias, force_tier):
    force_tier("reference", torch.device("cpu"))
    form = FORMS[name]
    t = make(11, 5, 2, form, bias=bias, num_original=7, seed=3)
    emap = torch.tensor([0, 1, 2, 3, 4, 2, 2], dtype=torch.int32)  # originals 2, 5, 6 merged: collapsed rows
    t["topk_ids"][0] = torch.tensor([5, 6], dtype=torch.int32)
    out = call(grouped_mlp, t, form, emap)
    want = call(per_token, t, form, emap)
    assert out.dtype == torch.float32
    assert rel(out, want) < 1e-6
    got, expected = grads_of(out, t), grads_of(want, t)
    for n in got:
        assert rel(got[n], expected[n]) < 1e-6, n


def test_tuned_experts_with_biases(force_tier):
    force_tier("reference", torch.device("cpu"))
    form = FORMS["gpt_oss"]
    t = make(9, 6, 3, form, seed=4)
    S = 2
    tuned = TunedExperts(t["gate_up"][:S], t["down"][:S], t["gate_up_bias"][:S], t["down_bias"][:S])
    out = grouped_mlp(
        t["x"], t["gate_up"][S:], t["down"][S:], t["topk_weights"], t["topk_ids"], tuned=tuned, form=form,
        gate_up_bias=t["gate_up_bias"][S:], down_bias=t["down_bias"][S:],
    )  # fmt: skip
    assert rel(out, call(per_token, t, form)) < 1e-6
    with pytest.raises(ValueError, match="gate_up_bias is given but tuned.gate_up_bias is not"):
        grouped_mlp(
            t["x"], t["gate_up"][S:], t["down"][S:], t["topk_weights"], t["topk_ids"], form=form,
            tuned=TunedExperts(t["gate_up"][:S], t["down"][:S]), gate_up_bias=t["gate_up_bias"][S:],
        )  # fmt: skip


def test_lora_on_an_ungated_form(force_tier):
    """LoRA B of gate_up is ``[S, I, r]`` for an ungated form; the update is the merged weight's."""
    force_tier("reference", torch.device("cpu"))
    form = FORMS["gelu_ungated"]
    t = make(8, 4, 2, form, seed=5)
    g = torch.Generator().manual_seed(9)
    lora = ExpertLoRA(
        torch.tensor([-1, 0, -1, 1], dtype=torch.int32), torch.randn(2, 3, H, generator=g),
        torch.randn(2, I, 3, generator=g), torch.randn(2, 3, I, generator=g), torch.randn(2, H, 3, generator=g), 0.5,
    )  # fmt: skip
    out = call(grouped_mlp, t, form, lora=lora)
    merged_gate_up, merged_down = t["gate_up"].detach().clone(), t["down"].detach().clone()
    for e, s in ((1, 0), (3, 1)):
        merged_gate_up[e] += 0.5 * lora.gate_up_B[s] @ lora.gate_up_A[s]
        merged_down[e] += 0.5 * lora.down_B[s] @ lora.down_A[s]
    want = per_token(t["x"], merged_gate_up, merged_down, t["topk_weights"], t["topk_ids"], form=form,
                     gate_up_bias=t["gate_up_bias"], down_bias=t["down_bias"])  # fmt: skip
    assert rel(out, want) < 1e-6


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_with_form_and_biases(bits, force_tier):
    force_tier("reference", torch.device("cpu"))
    form = FORMS["gpt_oss"]
    t = make(10, 4, 2, form, seed=6)
    q_gate_up, q_down = quantize(t["gate_up"].detach(), bits, 8), quantize(t["down"].detach(), bits, 8)
    out = quantized_grouped_mlp(
        t["x"], q_gate_up, q_down, t["topk_weights"], t["topk_ids"], form=form, gate_up_bias=t["gate_up_bias"],
        down_bias=t["down_bias"],
    )  # fmt: skip
    want = per_token(t["x"], dequantize(q_gate_up, torch.float32), dequantize(q_down, torch.float32),
                     t["topk_weights"], t["topk_ids"], form=form, gate_up_bias=t["gate_up_bias"],
                     down_bias=t["down_bias"])  # fmt: skip
    assert not out.requires_grad and rel(out, want) < 1e-6


# -- argument checks ----------------------------------------------------------------------------------------------


def test_bad_arguments_name_the_tensor():
    form = FORMS["gelu_ungated"]
    t = make(4, 3, 2, form)
    x, gu, d, w, ids = t["x"], t["gate_up"], t["down"], t["topk_weights"], t["topk_ids"]
    with pytest.raises(ValueError, match=r"gate_up has size 40 in dim 1, expected 80 \(2 \* intermediate size"):
        grouped_mlp(x, gu, d, w, ids)
    with pytest.raises(TypeError, match="form must be an ExpertForm, got str"):
        grouped_mlp(x, gu, d, w, ids, form="gelu")
    with pytest.raises(ValueError, match=r"gate_up_bias must have shape \(3, 40\)"):
        grouped_mlp(x, gu, d, w, ids, form=form, gate_up_bias=torch.zeros(3, 80))
    with pytest.raises(ValueError, match="down_bias must have 2 dimensions"):
        grouped_mlp(x, gu, d, w, ids, form=form, down_bias=torch.zeros(3 * H))
    with pytest.raises(TypeError, match="down_bias dtype torch.float64 differs from x dtype torch.float32"):
        grouped_mlp(x, gu, d, w, ids, form=form, down_bias=torch.zeros(3, H, dtype=torch.float64))


# -- the Triton tier against the reference -------------------------------------------------------------------------


def _both_tiers(force_tier, device, fn, *args):
    """``fn(*args)`` (output, grads) on the triton tier, then on the reference."""
    force_tier("triton", device)
    got = fn(*args)
    force_tier("reference", device)
    return got, fn(*args)


def _assert_close(got, want, tol):
    (out, grads), (ref, ref_grads) = got, want
    assert out.dtype == ref.dtype and rel(out, ref) < tol
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        assert rel(grads[n], ref_grads[n]) < tol, n


def _to(t, device):
    return {n: (v.detach().to(device).requires_grad_(v.requires_grad)) for n, v in t.items()}


@pytest.mark.triton
@pytest.mark.parametrize("name", sorted(FORMS))
def test_triton_matches_reference(name, device, force_tier):
    """Every form, with biases, over an expert map that collapses slots; values and all gradients."""
    form = FORMS[name]
    t = _to(make(13, 5, 3, form, num_original=7, seed=2), device)
    emap = torch.tensor([0, 1, 2, 3, 4, 2, 2], dtype=torch.int32, device=device)

    def run():
        out = call(grouped_mlp, t, form, emap)
        return out, grads_of(out, t)

    _assert_close(*_both_tiers(force_tier, device, run), FP32_GEMM)


@pytest.mark.triton
@pytest.mark.parametrize("name", ["gpt_oss", "gelu_ungated", "gelu_tanh"])
def test_triton_lora_and_tuned_experts(name, device, force_tier):
    """LoRA on gate_up and down of two tuned experts that are full-size TunedExperts with their own biases."""
    form = FORMS[name]
    t = _to(make(12, 6, 2, form, seed=8), device)
    g = torch.Generator().manual_seed(3)
    rows = form.gate_up_rows(I)
    shapes = ((2, 4, H), (2, rows, 4), (2, 4, I), (2, H, 4))
    f = [torch.randn(s, generator=g).to(device).requires_grad_() for s in shapes]
    lora = ExpertLoRA(torch.tensor([-1, 0, -1, 1, -1, -1], dtype=torch.int32, device=device), *f, 0.5)
    S = 2
    tuned = TunedExperts(t["gate_up"][:S], t["down"][:S], t["gate_up_bias"][:S], t["down_bias"][:S])

    def run():
        out = grouped_mlp(
            t["x"], t["gate_up"][S:], t["down"][S:], t["topk_weights"], t["topk_ids"], lora=lora, tuned=tuned,
            form=form, gate_up_bias=t["gate_up_bias"][S:], down_bias=t["down_bias"][S:],
        )  # fmt: skip
        return out, grads_of(out, t, dict(zip(("gu_A", "gu_B", "d_A", "d_B"), f)))

    _assert_close(*_both_tiers(force_tier, device, run), FP32_GEMM)


@pytest.mark.triton
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("name", ["gpt_oss", "relu_ungated"])
def test_triton_packed_bases(name, bits, device, force_tier):
    """Packed int4/int8 bases with fp32 biases: forward (quantized_grouped_mlp) and dx / bias gradients."""
    form = FORMS[name]
    t = _to(make(10, 4, 2, form, seed=6), device)
    q_gate_up, q_down = quantize(t.pop("gate_up").detach(), bits, 8), quantize(t.pop("down").detach(), bits, 8)

    def run():
        out = grouped_mlp(
            t["x"], q_gate_up, q_down, t["topk_weights"], t["topk_ids"], form=form, gate_up_bias=t["gate_up_bias"],
            down_bias=t["down_bias"],
        )  # fmt: skip
        infer = quantized_grouped_mlp(
            t["x"], q_gate_up, q_down, t["topk_weights"], t["topk_ids"], form=form, gate_up_bias=t["gate_up_bias"],
            down_bias=t["down_bias"],
        )  # fmt: skip
        torch.testing.assert_close(infer, out.detach(), rtol=FP32_GEMM, atol=FP32_GEMM)
        return out, grads_of(out, t)

    _assert_close(*_both_tiers(force_tier, device, run), FP32_GEMM)


@pytest.mark.triton
@pytest.mark.parametrize("env", ["FLUX_ENGINE_MOE_RECOMPUTE", "FLUX_ENGINE_ATOMIC_SCATTER"])
def test_triton_recompute_and_atomic_scatter(env, device, force_tier, monkeypatch):
    monkeypatch.setenv(env, "1")
    form = FORMS["gpt_oss"]
    t = _to(make(9, 4, 2, form, seed=11), device)

    def run():
        out = call(grouped_mlp, t, form)
        return out, grads_of(out, t)

    _assert_close(*_both_tiers(force_tier, device, run), FP32_GEMM)


@pytest.mark.triton
def test_triton_bf16_form(device, force_tier):
    """bf16, gpt-oss's own limit (7): the clamps' gradients jump at the limit, and gu is rounded to bf16 before
    them, so at the tests' limit 0.7 about 0.1% of the gates change side and dx moves by ~7%."""
    form = ExpertForm(interleaved=True, limit=7.0)
    t = _to(make(9, 4, 2, form, dtype=torch.bfloat16, seed=12), device)

    def run():
        out = call(grouped_mlp, t, form)
        return out, grads_of(out, t)

    _assert_close(*_both_tiers(force_tier, device, run), 2e-2)
