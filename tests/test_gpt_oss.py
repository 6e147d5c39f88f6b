"""gpt-oss in the runtime: parity with transformers' GptOssForCausalLM (logits and gradients, fp32), the gpt_oss
checkpoint layout with bf16 and MXFP4 experts (dequantised on load, or repacked to int4 for profiling), YaRN, the
presets, and the Flux pipeline (profile, merge with biases, LoRA, PEFT export, budget, a 2-round federation)."""

import copy
import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GptOssConfig, GptOssForCausalLM  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

from flux_engine import budget, merging, ops, presets, profiling  # noqa: E402
from flux_engine.adapters import load_peft_adapter, merge_adapters, save_peft_adapter  # noqa: E402
from flux_engine.checkpoint import LAYOUTS, load_pretrained, save_pretrained  # noqa: E402
from flux_engine.checkpoint.keymap import entries  # noqa: E402
from flux_engine.checkpoint.mxfp4 import MXFP4Weight, quantize_mxfp4  # noqa: E402
from flux_engine.checkpoint.safetensors_io import write_json, write_shards  # noqa: E402
from flux_engine.models import MoEForCausalLM  # noqa: E402
from flux_engine.models.moe import rope_frequencies  # noqa: E402
from flux_engine.training import TrainConfig, train_round  # noqa: E402

V, T = 128, 20  # T > the sliding window (6): sliding layers see less than full ones


def _hf_config(**kw) -> GptOssConfig:
    cfg = dict(
        vocab_size=V, hidden_size=64, intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=2, sliding_window=6,
        max_position_embeddings=512, attn_implementation="eager",
        rope_parameters={"rope_type": "yarn", "factor": 8.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                         "original_max_position_embeddings": 64, "rope_theta": 150000.0},
    )  # fmt: skip
    cfg.update(kw)
    return GptOssConfig(**cfg)


def _hf_model(seed=0, **kw) -> GptOssForCausalLM:
    """A random tiny gpt-oss with every bias, sink and expert weight large enough to matter (transformers
    initialises biases at 0 and weights at 0.02, which would hide layout mistakes)."""
    torch.manual_seed(seed)
    model = GptOssForCausalLM(_hf_config(**kw)).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name or "sinks" in name:
                p.normal_(0.0, 0.5)
            elif "experts" in name:
                p.normal_(0.0, 0.3)  # some gate/up pre-activations pass the clamp at 7
    return model


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    hf = _hf_model()
    folder = tmp_path_factory.mktemp("gpt_oss")
    hf.save_pretrained(folder)
    return hf, folder


def _ids(seed=1, B=2):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def test_config_maps_every_gpt_oss_feature(hf_folder):
    _, folder = hf_folder
    c = load_pretrained(folder).config
    assert c.layer_types == ["sliding_attention", "full_attention"] * 2 and c.sliding_window == 6
    assert [c.layer_window(i) for i in range(4)] == [6, None, 6, None]
    assert c.attention_sinks and c.attention_bias and c.attention_output_bias and c.router_bias and c.expert_bias
    assert c.expert_form.interleaved and c.expert_form.limit == 7.0 and c.expert_form.alpha == 1.702
    assert c.rope_scaling["rope_type"] == "yarn" and c.rope_scaling["factor"] == 8.0 and c.rope_theta == 150000.0
    assert c.num_experts_per_tok == 2 and c.norm_topk_prob and c.moe_intermediate_size == 32


@pytest.mark.parametrize("truncate", [False, True])
def test_yarn_frequencies_match_transformers(truncate):
    for c in (presets.get("gpt-oss-20b"), presets.get("gpt-oss-tiny")):
        c.rope_scaling["truncate"] = truncate
        hf = _hf_config(
            head_dim=c.head_dim, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
            hidden_size=c.hidden_size, max_position_embeddings=c.max_position_embeddings,
            rope_parameters={**c.rope_scaling, "rope_theta": c.rope_theta},
        )  # fmt: skip
        ref_inv, ref_scale = ROPE_INIT_FUNCTIONS["yarn"](hf)
        inv, scale = rope_frequencies(c)
        torch.testing.assert_close(inv, ref_inv, rtol=1e-6, atol=0)
        assert scale == pytest.approx(ref_scale, rel=1e-12) and scale > 1


@pytest.mark.parametrize("tier", ["reference", "triton"])
def test_logits_and_gradients_match_transformers(hf_folder, tier, force_tier):
    """fp32, a random tiny config, the HF state dict through the project's checkpoint path: logits and the gradient
    of every parameter within 1e-4 (relative to the tensor's scale), with the experts on either kernel tier
    (Triton interpreted on a CPU)."""
    force_tier(tier, torch.device("cpu"))
    hf, folder = hf_folder
    model = load_pretrained(folder, dtype=torch.float32).train()
    hf.train().zero_grad(set_to_none=True)  # the module-scoped reference is shared by both tiers
    ids = _ids()
    w = torch.randn(2, T, V, generator=torch.Generator().manual_seed(2))
    ours, ref = model(ids).logits, hf(ids).logits
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()
    (ours * w).sum().backward()
    (ref * w).sum().backward()
    hf_params = dict(hf.named_parameters())
    compared = 0
    for entry in entries(model, LAYOUTS["gpt_oss"].keys):
        p = dict(model.named_parameters()).get(entry.param)
        if p is None:
            continue
        g, g_ref = p.grad, hf_params[entry.key].grad
        if entry.transposed:
            g = g.transpose(-1, -2)
        assert g.shape == g_ref.shape, entry
        err = (g - g_ref).abs().max() / g_ref.abs().max().clamp_min(1e-12)
        assert err <= 1e-4, (entry.key, float(err))
        compared += 1
    assert compared == len(hf_params)  # every transformers parameter, sinks and biases included


def test_bf16_forward_and_backward_track_fp32(hf_folder):
    """The sink key's extra channel and the clamped experts hold in bf16: logits within bf16's error of fp32 at
    every token whose routing bf16 leaves alone (a near-tie of router logits may flip, as in any bf16 MoE), finite
    gradients for sinks and biases."""
    _, folder = hf_folder
    ids = _ids(7)
    out32 = load_pretrained(folder, dtype=torch.float32)(ids, return_routers=True)
    model = load_pretrained(folder, dtype=torch.bfloat16).train()
    out16 = model(ids, return_routers=True)
    same = torch.stack([(a.ids.sort(-1).values == b.ids.sort(-1).values).all(-1)
                        for a, b in zip(out32.routers, out16.routers)]).all(0).view(ids.shape)  # fmt: skip
    assert same.float().mean() > 0.9
    ref, logits = out32.logits, out16.logits
    assert (logits.float() - ref)[same].abs().max() <= 0.05 * ref.abs().max()
    logits.float().square().mean().backward()
    layer = model.model.layers[0]
    for p in (layer.self_attn.sinks, layer.mlp.experts.gate_up_proj_bias, layer.mlp.gate.bias):
        assert p.grad is not None and torch.isfinite(p.grad.float()).all() and p.grad.abs().max() > 0


def test_whole_model_compiles_without_graph_breaks():
    """Sinks, sliding and full layers, YaRN and the biased clamped experts trace under torch.compile(fullgraph=True)
    and compute what eager does, gradients included."""
    torch.manual_seed(0)
    model = MoEForCausalLM(presets.get("gpt-oss-tiny"))
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = model(ids).logits
    ref.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    out = torch.compile(model, fullgraph=True, backend="aot_eager")(ids).logits
    out.square().mean().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_padded_batches_match_transformers(hf_folder):
    hf, folder = hf_folder
    model = load_pretrained(folder, dtype=torch.float32)
    ids, mask = _ids(3), torch.ones(2, T, dtype=torch.long)
    mask[1, 13:] = 0  # right padding
    ours, ref = model(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits
    keep = mask.bool()
    assert (ours[keep] - ref[keep]).abs().max() <= 1e-4 * ref.abs().max()


def test_gpt_oss_layout_round_trip_and_transformers_reads_it(hf_folder, tmp_path):
    hf, folder = hf_folder
    model = load_pretrained(folder, dtype=torch.float32)
    save_pretrained(model, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["model_type"] == "gpt_oss" and "quantization_config" not in saved
    back = GptOssForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").float()
    ids = _ids(4)
    torch.testing.assert_close(back(ids).logits, hf(ids).logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(load_pretrained(tmp_path / "out")(ids).logits, model(ids).logits, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ MXFP4


def test_mxfp4_codec_round_trips_representable_values():
    g = torch.Generator().manual_seed(0)
    fp4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    values = fp4[torch.randint(0, 8, (3, 5, 64), generator=g)] * torch.where(torch.rand(3, 5, 64, generator=g) < 0.5, -1, 1)
    values = values * 2.0 ** torch.randint(-6, 6, (3, 5, 2, 1), generator=g).repeat_interleave(32, -1).flatten(-2)
    blocks, scales = quantize_mxfp4(values)
    assert blocks.shape == (3, 5, 2, 16) and scales.shape == (3, 5, 2)
    torch.testing.assert_close(MXFP4Weight(blocks, scales, torch.float32).dequantize(), values, rtol=0, atol=0)
    # transformers' decoder reads the same bytes as the same values (it returns [..., K, N]).
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    ref = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).transpose(1, 2)
    torch.testing.assert_close(ref, values, rtol=0, atol=0)


def _write_mxfp4_checkpoint(hf: GptOssForCausalLM, folder) -> GptOssForCausalLM:
    """gpt-oss's shipped layout: experts as MXFP4 blocks/scales, the rest as it is; returns the transformers model
    holding exactly the dequantised experts (the reference)."""
    items, ref = [], {}
    for key, t in hf.state_dict().items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = quantize_mxfp4(t.transpose(-1, -2))  # stored [E, out, in/32, 16]
            items += [(key + "_blocks", blocks), (key + "_scales", scales)]
            ref[key] = MXFP4Weight(blocks, scales, torch.float32).dequantize().transpose(-1, -2)
        else:
            items.append((key, t))
    folder.mkdir()
    config = hf.config.to_dict()
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    write_json(str(folder / "config.json"), config)
    write_shards(str(folder), items, 40_000)  # several shards: a blocks/scales pair may straddle two
    out = _hf_model()
    out.load_state_dict({**hf.state_dict(), **ref})
    return out


def test_mxfp4_checkpoint_dequantised_on_load_matches_transformers(hf_folder, tmp_path):
    hf, _ = hf_folder
    ref = _write_mxfp4_checkpoint(hf, tmp_path / "mx")
    model = load_pretrained(tmp_path / "mx", dtype=torch.float32)
    ids = _ids(5)
    assert (model(ids).logits - ref(ids).logits).abs().max() <= 1e-4 * ref(ids).logits.abs().max()
    gu = ref.model.layers[1].mlp.experts.gate_up_proj.transpose(-1, -2)
    torch.testing.assert_close(model.model.layers[1].mlp.experts.gate_up_proj, gu, rtol=0, atol=0)
    assert model.config.metadata["checkpoint_layout"] == "gpt_oss"
    bf16 = load_pretrained(tmp_path / "mx", dtype=torch.bfloat16)  # MXFP4 values are exact in bf16
    torch.testing.assert_close(bf16.model.layers[1].mlp.experts.gate_up_proj.float(), gu, rtol=0, atol=0)


def test_mxfp4_checkpoint_repacks_to_int4_for_profiling(hf_folder, tmp_path, monkeypatch):
    """Profiling a MXFP4 folder quantizes each expert stack to int4 row chunk by row chunk, never decoding a whole
    stack, and gives the copy (and profile) of dequantising first and quantizing after."""
    hf, _ = hf_folder
    _write_mxfp4_checkpoint(hf, tmp_path / "mx")
    widest = []
    real_rows = MXFP4Weight.rows

    def rows(self, start, stop):
        widest.append(stop - start)
        return real_rows(self, start, stop)

    monkeypatch.setattr(profiling, "_CHUNK_ELEMENTS", 64 * 32)  # 32 rows of 64 per chunk
    monkeypatch.setattr(MXFP4Weight, "rows", rows)
    direct = profiling.prepare(tmp_path / "mx", bits=4, group_size=32, dtype=torch.float32)
    assert widest and max(widest) <= 64 < 8 * 64  # 2048 elements per chunk; a stack has 8 x 64 rows
    monkeypatch.undo()
    detour = profiling.prepare(load_pretrained(tmp_path / "mx", dtype=torch.float32), bits=4, group_size=32)
    for layer, le in direct.experts.items():
        for a, b in ((le.gate_up, detour.experts[layer].gate_up), (le.down, detour.experts[layer].down)):
            assert torch.equal(a.data, b.data) and torch.equal(a.scales, b.scales)
    batches = [{"input_ids": _ids(6, B=3)}]
    p1, p2 = profiling.profile(direct, batches), profiling.profile(detour, batches)
    assert torch.equal(p1.counts, p2.counts) and p1.samples == p2.samples
    assert int(p1.counts.sum()) == 4 * 3 * T * 2  # every layer, token and slot counted


def test_shipped_config_format_and_bad_mxfp4_tensors_are_named(hf_folder, tmp_path):
    """The config.json gpt-oss-20b ships (transformers 4.55: ``rope_scaling`` + top-level ``rope_theta``,
    ``experts_per_token``, ``quantization_config``) reads as the v5 one does; a damaged MXFP4 pair is an error
    naming the key."""
    from flux_engine.checkpoint import CheckpointError

    hf, _ = hf_folder
    _write_mxfp4_checkpoint(hf, tmp_path / "mx")
    config = json.loads((tmp_path / "mx" / "config.json").read_text())
    params = config.pop("rope_parameters")
    config.update(rope_theta=params.pop("rope_theta"), rope_scaling=params, experts_per_token=2)
    config.pop("num_experts_per_tok")
    write_json(str(tmp_path / "mx" / "config.json"), config)
    c = load_pretrained(tmp_path / "mx").config
    assert c.rope_theta == 150000.0 and c.rope_scaling["factor"] == 8.0 and c.num_experts_per_tok == 2
    from safetensors.torch import load_file, save_file

    for shard in sorted((tmp_path / "mx").glob("*.safetensors")):
        tensors = load_file(str(shard))
        key = "model.layers.2.mlp.experts.down_proj_scales"
        if key in tensors:
            tensors[key] = tensors[key][..., :-1].contiguous()  # one group short
            save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="down_proj_scales"):
        load_pretrained(tmp_path / "mx")


# ------------------------------------------------------------------------------------------------ presets, budget


def test_gpt_oss_20b_preset_has_the_published_shapes():
    c = presets.get("gpt-oss-20b")
    assert (c.num_layers, c.hidden_size, c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size) == (
        24, 2880, 32, 4, 2880)  # fmt: skip
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size, c.sliding_window) == (64, 8, 64, 201088, 128)
    assert c.rope_theta == 150000.0 and c.rope_scaling["factor"] == 32.0
    assert c.rope_scaling["original_max_position_embeddings"] == 4096
    with torch.device("meta"):
        n = MoEForCausalLM(c).num_parameters()
    assert abs(n - 20.9e9) <= 0.01 * 20.9e9, n  # published: 20.9B total (model card)
    # The tiny variant is the same architecture, and transformers reads its config the same way.
    tiny = presets.get("gpt-oss-tiny")
    assert tiny.attention_sinks and tiny.expert_form == c.expert_form and tiny.layer_types[:2] == c.layer_types[:2]


def test_budget_knows_mxfp4_and_int4_experts():
    c = presets.get("gpt-oss-20b")
    H, I = 2880, 2880
    bf16 = budget.expert_parameters(c) * 2
    assert budget.expert_parameters(c) == 3 * H * I + 2 * I + H  # biases included
    mx = budget.expert_storage_bytes(c, "mxfp4", "bfloat16")
    assert mx == 3 * H * I // 2 + 3 * H * I // 32 + (2 * I + H) * 2  # 4-bit codes, one byte per 32, bf16 biases
    int4 = budget.expert_storage_bytes(c, "int4", "bfloat16")
    assert mx < int4 < bf16 / 3
    plans = {fmt: budget.plan_budget(c, 24 << 30, budget.TrainSettings(
        frozen_experts=fmt, activation_checkpointing=True, batch_size=1, seq_len=1024)) for fmt in ("dtype", "mxfp4")}  # fmt: skip
    assert plans["mxfp4"].B_tune + plans["mxfp4"].B_non > plans["dtype"].B_tune + plans["dtype"].B_non
    assert "B_tune" in plans["mxfp4"].describe() and "mxfp4" in plans["mxfp4"].describe()


# ------------------------------------------------------------------------------------------------ the Flux pipeline


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = MoEForCausalLM(presets.get("gpt-oss-tiny"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("_bias", ".bias", "sinks")):
                p.normal_(0.0, 0.1)
    return model.eval().requires_grad_(False)


def _batches(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 256, (4, 24), generator=g)} for _ in range(n)]


def _busiest(model, counts):
    """The ``counts[l]`` most routed experts of each MoE layer on the training batches (tuning experts that see
    tokens)."""
    freq = profiling.profile(model, _batches(), bits=None).frequency
    return [torch.argsort(-f, stable=True)[:n].tolist() for f, n in zip(freq, counts)]


def test_merge_averages_expert_biases_like_the_weights(tiny, tmp_path):
    prof = profiling.profile(tiny, _batches(), bits=None)
    merged = merging.merge(tiny, prof, [[0, 1], [2], [], [3]], budgets=[2, 3, 2, 4], weighting="freq")
    for l, (mlp, new) in enumerate(zip(tiny.moe_layers(), merged.moe_layers())):
        alpha = merging.merge_alphas(prof, l, "freq")
        for p, members in enumerate(merged.merge_plan.groups[l]):
            w = merging.merge_weights(alpha[members])
            for name in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"):
                want = torch.einsum("m,m...->...", w, getattr(mlp.experts, name)[members].double()).float()
                torch.testing.assert_close(getattr(new.experts, name)[p], want, rtol=1e-6, atol=1e-7)
    assert merged.moe_layers()[0].experts.down_proj_bias.shape[0] == 4  # 2 tuning + 2 merged
    # A merged gpt-oss model is saved in the native layout only, and reloads to the same model.
    with pytest.raises(ValueError, match="merged"):
        save_pretrained(merged, tmp_path / "hf", layout="gpt_oss")
    save_pretrained(merged, tmp_path / "native", layout="flux_moe")
    ids = _batches(1, 5)[0]["input_ids"]
    torch.testing.assert_close(load_pretrained(tmp_path / "native")(ids).logits, merged(ids).logits, rtol=0, atol=0)
    err = merging.merge_output_error(tiny, merged, _batches(1, 3)[0]["input_ids"])
    assert all(math.isfinite(e) for e in err) and max(err) > 0, err


def test_fmq_keeps_the_gpt_oss_form_and_biases(tiny):
    """FMQ's packed experts compute the same clamped, biased experts on the dequantised weights."""
    from flux_engine import baselines

    packed, _ = baselines.quantize_experts(tiny, bits=8)
    ex = packed.moe_layers()[0].experts
    assert ex.form == tiny.moe_layers()[0].experts.form and ex.down_proj_bias is not None
    want = copy.deepcopy(tiny)
    for mlp, q in zip(want.moe_layers(), packed.moe_layers()):
        mlp.experts.gate_up_proj.copy_(ops.dequantize(q.experts.gate_up_proj))
        mlp.experts.down_proj.copy_(ops.dequantize(q.experts.down_proj))
    ids = _batches(1, 7)[0]["input_ids"]
    torch.testing.assert_close(packed(ids).logits, want(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_sparse_lora_and_full_tuning_leave_biases_frozen(tiny, mode):
    model = copy.deepcopy(tiny)
    before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("_bias")}
    tuning = _busiest(model, [2, 1, 0, 0])
    res = train_round(model, tuning, _batches(), TrainConfig(mode=mode, rank=4, lr=1e-2, steps=3))
    assert res.losses[-1] < res.losses[0]
    if mode == "full":
        assert all(not p.requires_grad for n, p in model.named_parameters() if n.endswith("_bias"))
        from flux_engine.training import detach_tuning

        detach_tuning(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert set(res.trained) == {(l, e) for l, ids in enumerate(tuning) for e in ids}


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_biases_train_when_asked(tiny, mode, tmp_path):
    """``train_biases``: LoRA trains per-expert bias deltas (folded by merge_lora, refused by the PEFT export), full
    mode the tuned experts' biases; either way the folded model computes what the trained one did."""
    from flux_engine.adapters import merge_lora
    from flux_engine.training import detach_tuning

    model = copy.deepcopy(tiny)
    tuning = _busiest(model, [2, 1, 0, 0])
    res = train_round(model, tuning, _batches(), TrainConfig(mode=mode, rank=4, lr=5e-2, steps=3, train_biases=True))
    for (l, e), t in res.trained.items():
        assert {"gate_up_bias", "down_bias"} <= set(t)
        base = tiny.moe_layers()[l].experts.down_proj_bias[e]
        moved = t["down_bias"] if mode == "lora" else t["down_bias"] - base
        assert moved.abs().max() > 0  # the biases trained
    ids = _batches(1, 4)[0]["input_ids"]
    trained_logits = model(ids).logits
    if mode == "lora":
        with pytest.raises(ValueError, match="bias deltas"):
            save_peft_adapter(tmp_path / "a", res.trained, model.config, alpha=16.0)
        merge_lora(model)
    else:
        detach_tuning(model)
    torch.testing.assert_close(model(ids).logits, trained_logits, rtol=1e-4, atol=1e-5)
    untouched = [(l, e) for l in range(4) for e in range(8) if e not in tuning[l]]
    for l, e in untouched:
        b0, b1 = tiny.moe_layers()[l].experts.gate_up_proj_bias[e], model.moe_layers()[l].experts.gate_up_proj_bias[e]
        assert torch.equal(b0, b1)
    with pytest.raises(ValueError, match="no biases"):
        train_round(MoEForCausalLM(presets.get("tiny")), [[0], [1]], _batches(), TrainConfig(train_biases=True))


def _trained_lora(tiny, alpha=8.0):
    model = copy.deepcopy(tiny)
    tuning = _busiest(model, [2, 1, 0, 1])
    res = train_round(model, tuning, _batches(), TrainConfig(rank=4, alpha=alpha, lr=5e-2, steps=2))
    return model, res


def test_peft_export_is_what_peft_puts_on_transformers_gpt_oss(tiny, tmp_path):
    """gpt-oss adapters are written as PEFT's target_parameters LoRA of the stacked experts: read back exactly, and
    PeftModel.from_pretrained on transformers' GptOssForCausalLM computes what the trained model computes."""
    model, res = _trained_lora(tiny)
    save_peft_adapter(tmp_path / "a", res.trained, model.config, alpha=8.0)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert cfg["target_modules"] == []
    back = load_peft_adapter(tmp_path / "a", model.config)
    assert set(back.adapters) == set(res.trained) and back.scale == 2.0
    for key, tensors in res.trained.items():
        for name, v in tensors.items():
            torch.testing.assert_close(back.adapters[key][name], v, rtol=0, atol=0)
    peft = pytest.importorskip("peft")
    save_pretrained(tiny, tmp_path / "base", layout="gpt_oss")
    hf = GptOssForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager").float()
    hf = peft.PeftModel.from_pretrained(hf, tmp_path / "a").eval()
    ids = _batches(1, 4)[0]["input_ids"]
    with torch.no_grad():
        ours, ref = model(ids).logits, hf(input_ids=ids).logits
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_per_expert_peft_export_of_interleaved_experts(tiny, tmp_path):
    """The per-expert PEFT layout (families with expert modules) splits interleaved gate/up rows: gate_proj / up_proj
    get B's even / odd rows, and folding the read-back adapter gives the model the trained one computes."""
    model, res = _trained_lora(tiny)
    config = model.config.replace(metadata={})  # not gpt-oss by name: the per-expert layout
    save_peft_adapter(tmp_path / "a", res.trained, config, alpha=8.0)
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    (l, e), tensors = sorted(res.trained.items())[0]
    prefix = f"base_model.model.model.layers.{config.moe_layer_indices[l]}.mlp.experts.{e}"
    torch.testing.assert_close(t[f"{prefix}.gate_proj.lora_B.weight"], tensors["gate_up_B"][0::2], rtol=0, atol=0)
    torch.testing.assert_close(t[f"{prefix}.up_proj.lora_B.weight"], tensors["gate_up_B"][1::2], rtol=0, atol=0)
    back = load_peft_adapter(tmp_path / "a", config)
    for key, tensors in res.trained.items():
        for name, v in tensors.items():
            torch.testing.assert_close(back.adapters[key][name], v, rtol=0, atol=0)
    ids = _batches(1, 4)[0]["input_ids"]
    folded = copy.deepcopy(tiny)
    merge_adapters(folded, back.adapters, back.scale)
    torch.testing.assert_close(folded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)


def test_plan_for_gpt_oss_20b_on_24_gib(capsys, hf_folder):
    from flux_engine.cli import main

    assert main(["plan", "--preset", "gpt-oss-20b", "--budget", "24GiB", "--frozen-experts", "mxfp4"]) == 0
    out = capsys.readouterr().out
    assert "B_tune" in out and "B_non" in out and "memory budget 24.00 GiB" in out
    # MXFP4 experts fit 24 GiB whole (the int4 profiling copy, 11 GiB, waits out training in host memory) ...
    assert "every expert tunes" in out and "-> B_tune = 768, B_non = 0" in out
    assert main(["plan", "--preset", "gpt-oss-20b", "--budget", "14GiB", "--frozen-experts", "mxfp4"]) == 0
    assert "merged experts (24, mxfp4)" in capsys.readouterr().out  # ... 14 GiB merges, one per MoE layer at least
    # ... and 12 GiB holds training but not the profile phase: refused, naming it.
    assert main(["plan", "--preset", "gpt-oss-20b", "--budget", "12GiB", "--frozen-experts", "mxfp4"]) == 2
    assert "short of the profile phase: profiling copy (int4 experts) 11.18 GiB" in capsys.readouterr().err
    _, folder = hf_folder  # a checkpoint's config.json is enough
    assert main(["plan", "--checkpoint", str(folder), "--budget", "300MiB", "--profile-bits", "-1"]) == 0
    assert "-> B_tune = " in capsys.readouterr().out
    assert main(["plan", "--preset", "gpt-oss-20b", "--budget", "2GiB"]) == 2  # too small: one line, status 2
    assert "short of the minimum" in capsys.readouterr().err


@pytest.mark.parametrize("mode, explore", [("lora", "train"), ("full", "zo")])
def test_tiny_gpt_oss_runs_a_flux_federation_of_two_rounds(tmp_path, mode, explore):
    pytest.importorskip("flwr")
    from flux_engine.federated.config import RunConfig
    from flux_engine.federated.simulation import run_local

    cfg = {
        "preset": "gpt-oss-tiny", "mode": mode, "explore-mode": explore, "num-clients": 2, "min-clients": 2, "num-rounds": 2,
        "budgets": "6MiB,6MiB", "workspace": "0", "lora-rank": 4, "batch-size": 4, "seq-len": 32,
        "samples-per-client": 8, "local-steps": 2, "lr": 1e-2, "state-dir": str(tmp_path / "state"),
    }  # fmt: skip
    state = run_local(RunConfig.from_mapping(cfg))
    assert state.round == 2
    assert all(h["applied"] and h["experts_changed"] > 0 and math.isfinite(h["eval_loss"]) for h in state.history)
