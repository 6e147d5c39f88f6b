"""flux_engine.profiling: low-bit expert profiles, serialisation, merging, stale (async) profiling, comparison."""

import pytest
import torch

from flux_engine import presets
from flux_engine.models import MoEForCausalLM
from flux_engine.profiling import ExpertProfile, compare, group_for, profile, profile_async, spearman, top_k_jaccard


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return MoEForCausalLM(presets.get("tiny"))


def _batches(n=2, B=3, T=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n):
        mask = torch.ones(B, T, dtype=torch.long)
        mask[-1, T // 2 :] = 0  # right padding: not counted
        ids = [f"rec{b * B + i}" for i in range(B)]
        out.append({"input_ids": torch.randint(0, 256, (B, T), generator=g), "attention_mask": mask, "sample_ids": ids})
    return out


@pytest.mark.parametrize("bits", [None, 4, 8])
def test_frequencies_sum_to_one_and_counts_match(tiny, bits):
    batches = _batches()
    p = profile(tiny, batches, bits=bits, group_size=32)
    k = tiny.config.num_experts_per_tok
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    assert p.layers == [1, 2] and p.num_tokens == tokens
    assert torch.equal(p.counts.sum(1), torch.full((2,), tokens * k))
    torch.testing.assert_close(p.frequency.sum(1), torch.ones(2, dtype=torch.float64))
    assert bool((p.importance >= 0).all()) and bool((p.importance <= 1).all())
    for li, layer in enumerate(p.samples):
        for e, ids in enumerate(layer):
            assert set(ids) <= {f"rec{i}" for i in range(6)}
            assert (len(ids) > 0) == (int(p.counts[li, e]) > 0)


def test_routing_matches_the_model(tiny):
    # Full precision: the profile's counts equal the model's own routers (unpadded batch).
    batch = {"input_ids": torch.randint(0, 256, (2, 16))}
    p = profile(tiny, [batch], bits=None)
    out = tiny(batch["input_ids"], return_routers=True)
    for li, router in enumerate(out.routers):
        assert torch.equal(p.counts[li], torch.bincount(router.ids.reshape(-1).long(), minlength=8))


def test_quantized_profile_close_to_full(tiny):
    batches = _batches(n=2, B=4, T=32)
    full = profile(tiny, batches, bits=None)
    for bits in (4, 8):
        c = compare(profile(tiny, batches, bits=bits, group_size=32), full)
        assert c["mean"]["freq_error"] < 0.1 and c["mean"]["spearman"] > 0.8
    assert compare(full, full)["mean"] == {"jaccard": 1.0, "freq_error": 0.0, "spearman": 1.0, "importance_spearman": 1.0}


def test_save_load_merge(tiny, tmp_path):
    b = _batches(n=2)
    whole = profile(tiny, b, bits=4)
    parts = profile(tiny, b[:1], bits=4).merge(profile(tiny, b[1:], bits=4))
    assert torch.equal(whole.counts, parts.counts) and whole.samples == parts.samples
    torch.testing.assert_close(whole.attn_sums, parts.attn_sums)
    path = tmp_path / "p.json"
    whole.save(path)
    back = ExpertProfile.load(path)
    assert torch.equal(back.counts, whole.counts) and torch.equal(back.attn_sums, whole.attn_sums)
    assert back.samples == whole.samples and back.meta == whole.meta and back.num_tokens == whole.num_tokens
    assert [f.name for f in tmp_path.iterdir()] == ["p.json"]


def test_async_equals_sync_and_snapshots(tiny):
    batches = _batches()
    sync = profile(tiny, batches, bits=4, group_size=32)
    handle = profile_async(tiny, batches, bits=4, group_size=32)
    with torch.no_grad():  # the caller keeps working (and changing the model) meanwhile
        saved = tiny.model.layers[1].mlp.gate.weight.clone()
        tiny.model.layers[1].mlp.gate.weight.mul_(-1)
    res = handle.result(timeout=120)
    with torch.no_grad():
        tiny.model.layers[1].mlp.gate.weight.copy_(saved)
    assert handle.done()
    assert torch.equal(res.counts, sync.counts) and torch.equal(res.attn_sums, sync.attn_sums)
    assert res.samples == sync.samples


def test_checkpoint_folder_equals_in_memory(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "ck")
    batches = _batches(n=1)
    for bits in (4, 8):
        a = profile(tmp_path / "ck", batches, bits=bits, group_size=32)
        b = profile(tiny, batches, bits=bits, group_size=32)
        assert torch.equal(a.counts, b.counts) and a.samples == b.samples
        torch.testing.assert_close(a.attn_sums, b.attn_sums, rtol=0, atol=0)


def test_triton_tier_profile_matches_reference(tiny, device, force_tier):
    batch = [{"input_ids": torch.randint(0, 256, (1, 16)), "sample_ids": ["a"]}]
    want = profile(tiny, batch, bits=4, group_size=32)
    force_tier("triton", device)
    got = profile(tiny, batch, bits=4, group_size=32, device=device)
    assert torch.equal(got.counts, want.counts)
    torch.testing.assert_close(got.attn_sums, want.attn_sums, rtol=1e-4, atol=1e-6)


def test_metrics():
    assert top_k_jaccard(torch.tensor([3.0, 2, 1, 0]), torch.tensor([3.0, 1, 2, 0]), 2) == pytest.approx(1 / 3)
    assert spearman(torch.tensor([1.0, 2, 3]), torch.tensor([10.0, 20, 30])) == pytest.approx(1.0)
    assert spearman(torch.tensor([1.0, 2, 3]), torch.tensor([3.0, 2, 1])) == pytest.approx(-1.0)
    assert group_for(48, 4, 32) == 24 and group_for(64, 4, 32) == 32 and group_for(48, 8, None) == 48
