"""A scripted subset of transformers' own model tests for Mixtral and gpt-oss, run with each experts implementation
made the default (as if every user passed ``experts_implementation=...``): transformers' own default choice (None:
``grouped_mm``, which on CPU needs 16-byte-aligned strides and so fails every check at the testers' I = 37 with
torch 2.13), its reference ``"eager"``, ``"batched_mm"``, and ``"flux"``. The backend must pass every check that
``"eager"`` or ``"batched_mm"`` passes.

The configs are the model testers' defaults (``MixtralModelTester``: gelu experts, 2 experts top-2, I = 37, router
jitter 0.1; ``CausalLMModelTester`` for gpt-oss: 8 experts top-2, I = 37, 2 heads of 16), and each check mirrors one
of ``ModelTesterMixin`` / ``GenerationTesterMixin``'s tests that run the experts: forward of every head, training
(plain and gradient-checkpointed), save/load, KV-cache consistency, left padding, batching, greedy / sampled /
beam generation, generation with a compiled fullgraph forward (static cache), and the experts implementations'
equivalence. transformers' test sources are not installed with the package, so the checks are written here.

    python tests/test_hf_model_suite.py     # prints the pass/fail table of both implementations
"""

from __future__ import annotations

import tempfile
from typing import Callable, Dict

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import PreTrainedModel  # noqa: E402

from flux_engine.integrations import transformers as fx  # noqa: E402

BATCH, SEQ = 13, 7
TESTERS = {
    "mixtral": (
        "MixtralConfig",
        dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=37, hidden_act="gelu", max_position_embeddings=512, pad_token_id=0,
             num_experts_per_tok=2, num_local_experts=2, router_jitter_noise=0.1),
        ("MixtralModel", "MixtralForCausalLM", "MixtralForSequenceClassification", "MixtralForTokenClassification",
         "MixtralForQuestionAnswering"),
    ),
    "gpt_oss": (
        "GptOssConfig",
        dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
             head_dim=16, intermediate_size=37, max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
             eos_token_id=2, num_experts_per_tok=2, num_local_experts=8),
        ("GptOssModel", "GptOssForCausalLM", "GptOssForSequenceClassification", "GptOssForTokenClassification"),
    ),
}  # fmt: skip


class _DefaultExperts:
    """Context: models built inside default to ``experts_implementation=impl`` (an explicit request still wins)."""

    def __init__(self, impl):
        self.impl = impl

    def __enter__(self):
        self.original = PreTrainedModel.get_correct_experts_implementation

        def choose(model, requested):
            return self.original(model, self.impl if requested is None else requested)

        PreTrainedModel.get_correct_experts_implementation = choose
        return self

    def __exit__(self, *exc):
        PreTrainedModel.get_correct_experts_implementation = self.original


def _config(family: str):
    name, kwargs, _ = TESTERS[family]
    return getattr(transformers, name)(**kwargs)


def _model(family: str, cls_name: str = "", seed: int = 0, **overrides):
    config = _config(family)
    for k, v in overrides.items():
        setattr(config, k, v)
    cls = getattr(transformers, cls_name or TESTERS[family][2][1])
    torch.manual_seed(seed)
    return cls(config).eval()


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (BATCH, SEQ), generator=g)
    return ids, torch.tril(torch.ones_like(ids))  # the testers' attention mask


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# -- the checks: each raises on failure -------------------------------------------------------------------------


def check_every_head_forward(family):
    ids, mask = _inputs()
    for cls_name in TESTERS[family][2]:
        model = _model(family, cls_name)
        out = model(ids, attention_mask=mask)
        first = out[0]
        assert torch.isfinite(first).all(), cls_name
        if cls_name.endswith("Model"):
            assert first.shape == (BATCH, SEQ, 32)


def check_causal_lm_loss(family):
    ids, mask = _inputs()
    out = _model(family)(ids, attention_mask=mask, labels=ids)
    assert out.logits.shape == (BATCH, SEQ, 99) and torch.isfinite(out.loss)


def _train_step(family, checkpointing: bool):
    model = _model(family).train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    ids, mask = _inputs()
    torch.manual_seed(1)  # router jitter
    loss = model(ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    experts = [m.experts for m in fx.moe_layers(model)]
    for e in experts:
        for name, p in e.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def check_training(family):
    _train_step(family, checkpointing=False)


def check_training_gradient_checkpointing(family):
    loss, grads = _train_step(family, checkpointing=False)
    loss_ckpt, grads_ckpt = _train_step(family, checkpointing=True)
    _close(loss_ckpt, loss)
    for name in grads:
        _close(grads_ckpt[name], grads[name], 1e-4)


def check_save_load(family):
    model = _model(family)
    ids, mask = _inputs()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        loaded = type(model).from_pretrained(tmp).eval()
    assert loaded.config._experts_implementation == model.config._experts_implementation
    _close(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)


def check_past_key_values(family):
    """Decoding 3 tokens on the cache equals the full forward (create_and_check_decoder_model_past_large_inputs)."""
    model = _model(family)
    ids, mask = _inputs()
    past = model(ids, attention_mask=mask, use_cache=True).past_key_values
    g = torch.Generator().manual_seed(5)
    nxt, nxt_mask = torch.randint(3, 99, (BATCH, 3), generator=g), torch.randint(0, 2, (BATCH, 3), generator=g)
    full_ids, full_mask = torch.cat([ids, nxt], -1), torch.cat([mask, nxt_mask], -1)
    no_past = model(full_ids, attention_mask=full_mask, output_hidden_states=True).hidden_states[-1][:, -3:]
    with_past = model(nxt, attention_mask=full_mask, past_key_values=past, output_hidden_states=True).hidden_states[-1]
    _close(with_past, no_past, 1e-3)


def check_left_padding(family):
    """The last token's logits of a left-padded batch equal the unpadded ones (test_left_padding_compatibility)."""
    model = _model(family)
    ids, _ = _inputs()
    want = model(ids, attention_mask=torch.ones_like(ids)).logits[:, -1]
    padded = torch.cat([torch.zeros(BATCH, 4, dtype=ids.dtype), ids], 1)
    mask = torch.cat([torch.zeros(BATCH, 4, dtype=ids.dtype), torch.ones_like(ids)], 1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    got = model(padded, attention_mask=mask, position_ids=position_ids).logits[:, -1]
    _close(got, want, 1e-4)


def check_batching_equivalence(family):
    model = _model(family)
    ids, mask = _inputs()
    batched = model(ids, attention_mask=mask).logits
    for i in (0, 5, 12):
        _close(model(ids[i : i + 1], attention_mask=mask[i : i + 1]).logits[0], batched[i], 1e-4)


def _generate(model, ids, mask, **kwargs):
    return model.generate(ids, attention_mask=mask, max_new_tokens=5, pad_token_id=0, **kwargs)


def check_greedy_generate(family):
    """Greedy tokens are the argmax of the scores generate returns, and a cache-free generate agrees on them (at
    the testers' initializer_range of 0.02 the logits are near-uniform, so compared through the scores)."""
    model = _model(family)
    ids, mask = _inputs()
    # min_new_tokens: no EOS (gpt-oss's tester has one), so no padding after it.
    kwargs = dict(do_sample=False, output_scores=True, return_dict_in_generate=True, min_new_tokens=5)
    out = _generate(model, ids, mask, **kwargs)
    assert out.sequences.shape == (BATCH, SEQ + 5) and torch.equal(out.sequences[:, :SEQ], ids)
    scores = torch.stack(out.scores, 1)  # [B, 5, V]
    assert torch.equal(out.sequences[:, SEQ:], scores.argmax(-1))
    no_cache = _generate(model, ids, mask, use_cache=False, **kwargs)
    first = torch.stack(no_cache.scores, 1)[:, 0]
    _close(first, scores[:, 0], 1e-4)  # same prompt: the first step's scores agree


def check_sample_generate(family):
    model = _model(family)
    ids, mask = _inputs()
    torch.manual_seed(3)
    a = _generate(model, ids, mask, do_sample=True, top_k=10)
    torch.manual_seed(3)
    b = _generate(model, ids, mask, do_sample=True, top_k=10)
    assert a.shape == (BATCH, SEQ + 5) and torch.equal(a, b)


def check_beam_search_generate(family):
    model = _model(family)
    ids, mask = _inputs()
    out = _generate(model, ids, mask, do_sample=False, num_beams=2, num_return_sequences=2)
    assert out.shape == (2 * BATCH, SEQ + 5)


def check_generate_compiled_fullgraph(family):
    """generate with a compiled fullgraph forward equals eager generate (test_generate_compile_model_forward)."""
    from transformers.generation.configuration_utils import CompileConfig

    model = _model(family)
    ids, mask = _inputs()
    kwargs = dict(do_sample=False, cache_implementation="static")
    want = _generate(model, ids[:2], mask[:2], disable_compile=True, **kwargs)
    config = CompileConfig(fullgraph=True, dynamic=False, backend="aot_eager", mode=None)
    config._compile_all_devices = True
    torch._dynamo.reset()
    got = _generate(model, ids[:2], mask[:2], compile_config=config, **kwargs)
    assert hasattr(model, "_compiled_call")
    assert torch.equal(got, want)


def check_experts_implementations_agree(family):
    """batched_mm and flux compute eager's logits (grouped_mm needs aligned strides on CPU: not at I = 37)."""
    ids, mask = _inputs()
    model = _model(family)
    model.set_experts_implementation("eager")
    want = model(ids, attention_mask=mask).logits
    for impl in ("batched_mm", fx.IMPLEMENTATION):
        model.set_experts_implementation(impl)
        _close(model(ids, attention_mask=mask).logits, want, 1e-4)


CHECKS: Dict[str, Callable[[str], None]] = {
    name[len("check_") :]: fn for name, fn in sorted(globals().items()) if name.startswith("check_")
}


MODES = ("default", "eager", "batched_mm", fx.IMPLEMENTATION)  # "default": transformers' own choice (no request)


def outcome(family: str, check: str, mode: str) -> str:
    """``"pass"`` or the failure (exception type and first line), with ``mode`` as the experts default."""
    try:
        if mode == "default":
            CHECKS[check](family)
        else:
            with _DefaultExperts(mode):
                assert _model(family).config._experts_implementation == mode
                CHECKS[check](family)
    except Exception as e:  # noqa: BLE001  (a failing check is data here)
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    return "pass"


@pytest.mark.parametrize("check", sorted(CHECKS))
@pytest.mark.parametrize("family", sorted(TESTERS))
def test_flux_passes_what_transformers_passes(family, check):
    theirs = {mode: outcome(family, check, mode) for mode in ("eager", "batched_mm")}
    assert "pass" in theirs.values(), f"transformers' experts implementations fail {check}: {theirs}"
    assert outcome(family, check, fx.IMPLEMENTATION) == "pass"


if __name__ == "__main__":
    counts = {mode: [0, 0] for mode in MODES}
    for family in sorted(TESTERS):
        for check in sorted(CHECKS):
            results = {mode: outcome(family, check, mode) for mode in MODES}
            for mode, result in results.items():
                counts[mode][result != "pass"] += 1
            print(f"{family:8s} {check:32s} " + " | ".join(f"{m}: {r}" for m, r in results.items()))
    for mode, (ok, bad) in counts.items():
        print(f"{mode:8s} {ok} passed, {bad} failed")
