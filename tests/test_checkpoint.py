"""Checkpoint folders: parity with transformers for its MoE families, the remote-code layouts (LLaMA-MoE,
DeepSeek-MoE) against straightforward re-implementations of their MoE blocks, bit-exact round trips, sharding,
errors that name file and key, atomic saves and streaming loads."""

import json
import os
import shutil
import weakref
from pathlib import Path
from typing import Dict

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from flux_engine import MoEConfig, MoEForCausalLM, load_pretrained, save_pretrained
from flux_engine.checkpoint import LAYOUTS, NATIVE, CheckpointError, safetensors_io
from flux_engine.checkpoint.keymap import entries, model_tensors

VOCAB, HIDDEN, HEADS = 96, 32, 4
SEQ = (2, 11)

# Small transformers configs with each family's distinctive features.
HF_CASES = {
    "mixtral": ("MixtralConfig", dict(num_hidden_layers=2, intermediate_size=24, num_local_experts=4, sliding_window=7)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            num_hidden_layers=3,
            intermediate_size=40,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=4,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
            qkv_bias=True,
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(
            num_hidden_layers=3,
            head_dim=16,
            intermediate_size=40,
            moe_intermediate_size=16,
            num_experts=5,
            norm_topk_prob=True,
            decoder_sparse_step=2,
            tie_word_embeddings=True,
        ),
    ),
    "olmoe": ("OlmoeConfig", dict(num_hidden_layers=2, intermediate_size=16, num_experts=4, clip_qkv=0.3)),
}
HF_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_attention_heads=HEADS,
    num_key_value_heads=2,
    num_experts_per_tok=2,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def _randomize(model: torch.nn.Module) -> None:
    """Every tensor random (norm weights around 1), so no transposition or mix-up can hide behind an init value."""
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            tensor.copy_(torch.randn_like(tensor) * 0.1 + (1.0 if "norm" in name else 0.0))


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_checkpoints(transformers, tmp_path_factory):
    """model_type -> (folder written by transformers' save_pretrained, the transformers model)."""
    out = {}
    for model_type, (config_class, kwargs) in HF_CASES.items():
        torch.manual_seed(0)
        config = getattr(transformers, config_class)(**HF_COMMON, **kwargs)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        _randomize(model)
        folder = tmp_path_factory.mktemp(model_type)
        model.save_pretrained(folder)
        out[model_type] = (folder, model)
    return out


def _tiny_config(**changes) -> MoEConfig:
    base = MoEConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_layers=3,
        num_heads=HEADS,
        num_kv_heads=2,
        intermediate_size=40,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        moe_layers=[1, 2],
        max_position_embeddings=64,
    )
    return base.replace(**changes)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _assert_same_weights(a: MoEForCausalLM, b: MoEForCausalLM) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


def _checkpoint_keys(folder) -> set:
    return set(safetensors_io.scan(os.fspath(folder)))


# -- transformers families -------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", sorted(HF_CASES))
def test_logits_match_transformers(hf_checkpoints, model_type):
    folder, reference = hf_checkpoints[model_type]
    model = load_pretrained(folder).eval()
    ids = torch.randint(0, VOCAB, SEQ)
    torch.testing.assert_close(_logits(model, ids), _logits(reference, ids), atol=1e-4, rtol=0)
    assert model.config.metadata["source_model_type"] == model_type
    assert not any(t.is_meta for t in model.state_dict().values())


@pytest.mark.parametrize("model_type", sorted(HF_CASES))
def test_transformers_layouts_round_trip(hf_checkpoints, transformers, model_type, tmp_path):
    folder, reference = hf_checkpoints[model_type]
    model = load_pretrained(folder)
    save_pretrained(model, tmp_path / "again")  # defaults to the layout it was loaded from
    assert _checkpoint_keys(tmp_path / "again") == _checkpoint_keys(folder)
    _assert_same_weights(load_pretrained(tmp_path / "again"), model)
    # transformers reads what we wrote as the same model.
    rewritten = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    ids = torch.randint(0, VOCAB, SEQ)
    torch.testing.assert_close(_logits(rewritten, ids), _logits(reference, ids), atol=1e-6, rtol=0)


def test_stacked_transformers_v5_keys_load(hf_checkpoints, tmp_path):
    folder, reference = hf_checkpoints["mixtral"]
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    # In memory transformers v5 holds mlp.experts.gate_up_proj [E, 2I, H] and mlp.gate (not block_sparse_moe).
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "model.safetensors")
    assert any(key.endswith("mlp.experts.gate_up_proj") for key in _checkpoint_keys(tmp_path))
    ids = torch.randint(0, VOCAB, SEQ)
    torch.testing.assert_close(_logits(load_pretrained(tmp_path).eval(), ids), _logits(reference, ids), atol=1e-4, rtol=0)


def test_native_layout_keeps_provenance_for_export(hf_checkpoints, tmp_path):
    folder, _ = hf_checkpoints["qwen2_moe"]
    save_pretrained(load_pretrained(folder), tmp_path / "native", layout=NATIVE)
    native = load_pretrained(tmp_path / "native")
    assert native.config.metadata["checkpoint_layout"] == NATIVE
    assert native.config.metadata["source_model_type"] == "qwen2_moe"
    save_pretrained(native, tmp_path / "default")  # the layout it was loaded from: native again
    assert json.loads((tmp_path / "default" / "config.json").read_text())["model_type"] == NATIVE
    save_pretrained(native, tmp_path / "exported", layout="qwen2_moe")
    assert _checkpoint_keys(tmp_path / "exported") == _checkpoint_keys(folder)
    original = json.loads((folder / "config.json").read_text())
    exported = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert {k: exported[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")} == {
        k: original[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
    }
    _assert_same_weights(load_pretrained(tmp_path / "exported"), native)


def test_bfloat16_round_trip_is_bit_exact(hf_checkpoints, tmp_path):
    model = load_pretrained(hf_checkpoints["qwen2_moe"][0], dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    save_pretrained(model, tmp_path / "bf16")
    again = load_pretrained(tmp_path / "bf16")  # dtype from the written config
    _assert_same_weights(again, model)


# -- remote-code families: hand-built checkpoints with the documented keys ------------------------------------


def _rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape) * 0.2


def _backbone(num_layers: int) -> Dict[str, torch.Tensor]:
    """Embeddings, attention, norms and head in the Llama naming both remote-code families share."""
    tensors = {
        "model.embed_tokens.weight": _rand(VOCAB, HIDDEN),
        "model.norm.weight": 1 + _rand(HIDDEN),
        "lm_head.weight": _rand(VOCAB, HIDDEN),
    }
    for i in range(num_layers):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = 1 + _rand(HIDDEN)
        tensors[p + "post_attention_layernorm.weight"] = 1 + _rand(HIDDEN)
        for proj in "qkvo":
            tensors[p + f"self_attn.{proj}_proj.weight"] = _rand(HIDDEN, HIDDEN)
    return tensors


def _llama_config(model_type: str, num_layers: int, **extra) -> dict:
    return dict(
        model_type=model_type,
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=num_layers,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        hidden_act="silu",
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        rope_scaling=None,
        tie_word_embeddings=False,
        torch_dtype="float32",
        **extra,
    )


def _write(folder: Path, config: dict, tensors: Dict[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, folder / "model.safetensors")


def _swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


def _llama_moe_reference(x, t, p, k, scale, gate_network, weighted):
    """LLaMA-MoE's MoE layer (TopKBalancedNoisyGate in eval + UniversalCalculator), written out per token:
    gate logits, the top k logits, softmax over those k only, times score_scale_factor."""
    if gate_network == "mlp":
        logits = torch.tanh(x @ t[p + "gate.gate_network.0.weight"].T) @ t[p + "gate.gate_network.2.weight"].T
    else:
        logits = x @ t[p + "gate.gate_network.weight"].T
    top_logits, top_ids = logits.topk(k, dim=-1)
    scores = torch.softmax(top_logits, dim=-1) * scale if weighted else torch.ones_like(top_logits)
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(k):
            e = int(top_ids[n, j])
            w = [t[p + f"calculator.experts.weight_{proj}.{e}"] for proj in ("gate", "up", "down")]
            out[n] += scores[n, j] * _swiglu(x[n], *w)
    return out


def _llama_moe_checkpoint(folder: Path, gate_network: str, weighted: bool):
    num_layers, num_experts, size, k, scale = 2, 4, 8, 2, 4.0
    config = _llama_config(
        "llama_moe",
        num_layers,
        intermediate_size=num_experts * size,
        num_experts=num_experts,
        num_selects=k,
        size_experts=[[size] * num_experts] * num_layers,
        gate_type="TopKBalancedNoisyGate",
        gate_network=gate_network,
        gate_use_softmax=True,
        gate_use_balance=True,
        gate_balance_loss_weight=0.01,
        gate_add_noise=True,
        gate_noise_epsilon=0.01,
        calculator_type="UniversalCalculator",
        multiply_gate_scores=weighted,
        score_scale_factor=scale,
        add_weight_norm=False,
        auto_map={"AutoModelForCausalLM": "modeling_llama_moe_hf.LlamaMoEForCausalLM"},
    )
    tensors = _backbone(num_layers)
    for i in range(num_layers):
        p = f"model.layers.{i}."
        # A persistent RoPE cache and the training-only noise projection: both ignored on load.
        tensors[p + "self_attn.rotary_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, 8, 2) / 8)
        tensors[p + "mlp.gate.weight_noise.weight"] = _rand(num_experts, HIDDEN)
        if gate_network == "mlp":
            tensors[p + "mlp.gate.gate_network.0.weight"] = _rand(num_experts, HIDDEN) * 5
            tensors[p + "mlp.gate.gate_network.2.weight"] = _rand(num_experts, num_experts) * 5
        else:
            tensors[p + "mlp.gate.gate_network.weight"] = _rand(num_experts, HIDDEN) * 5
        for e in range(num_experts):
            tensors[p + f"mlp.calculator.experts.weight_gate.{e}"] = _rand(size, HIDDEN)
            tensors[p + f"mlp.calculator.experts.weight_up.{e}"] = _rand(size, HIDDEN)
            tensors[p + f"mlp.calculator.experts.weight_down.{e}"] = _rand(HIDDEN, size)
    _write(folder, config, tensors)
    return config, tensors


@pytest.mark.parametrize("gate_network,weighted", [("mlp", True), ("linear", False)])
def test_llama_moe_layers_match_reference_and_round_trip(tmp_path, gate_network, weighted):
    config, tensors = _llama_moe_checkpoint(tmp_path / "src", gate_network, weighted)
    model = load_pretrained(tmp_path / "src").eval()
    x = torch.randn(SEQ[0] * SEQ[1], HIDDEN)
    for i, layer in enumerate(model.model.layers):
        expected = _llama_moe_reference(
            x, tensors, f"model.layers.{i}.mlp.", config["num_selects"], config["score_scale_factor"], gate_network, weighted
        )
        torch.testing.assert_close(layer.mlp(x[None])[0][0], expected, atol=1e-5, rtol=1e-5)

    save_pretrained(model, tmp_path / "again")
    written = json.loads((tmp_path / "again" / "config.json").read_text())
    assert written["gate_add_noise"] is False and written["auto_map"] == config["auto_map"]
    dropped = {k for k in tensors if k.endswith(("weight_noise.weight", "rotary_emb.inv_freq"))}
    assert _checkpoint_keys(tmp_path / "again") == set(tensors) - dropped
    _assert_same_weights(load_pretrained(tmp_path / "again"), model)


def _deepseek_reference(x, t, p, k):
    """deepseek-moe-16b's DeepseekMoE in eval: softmax over all experts, top-k weights not renormalised
    (norm_topk_prob False), plus the always-on shared experts."""
    scores = torch.softmax(x @ t[p + "gate.weight"].T, dim=-1)
    weights, ids = scores.topk(k, dim=-1)
    out = _swiglu(x, *(t[p + f"shared_experts.{proj}_proj.weight"] for proj in ("gate", "up", "down")))
    for n in range(x.shape[0]):
        for j in range(k):
            e = int(ids[n, j])
            w = [t[p + f"experts.{e}.{proj}_proj.weight"] for proj in ("gate", "up", "down")]
            out[n] += weights[n, j] * _swiglu(x[n], *w)
    return out


def test_deepseek_layers_match_reference_and_round_trip(tmp_path):
    num_layers, num_experts, size, shared, dense, k = 3, 6, 8, 2, 40, 3
    config = _llama_config(
        "deepseek",
        num_layers,
        intermediate_size=dense,
        moe_intermediate_size=size,
        n_routed_experts=num_experts,
        n_shared_experts=shared,
        num_experts_per_tok=k,
        first_k_dense_replace=1,
        moe_layer_freq=1,
        norm_topk_prob=False,
        scoring_func="softmax",
        aux_loss_alpha=0.001,
        seq_aux=True,
        rope_theta=10000.0,
        attention_bias=False,
    )
    tensors = _backbone(num_layers)
    for proj, shape in (("gate", (dense, HIDDEN)), ("up", (dense, HIDDEN)), ("down", (HIDDEN, dense))):
        tensors[f"model.layers.0.mlp.{proj}_proj.weight"] = _rand(*shape)
    for i in range(1, num_layers):
        p = f"model.layers.{i}.mlp."
        tensors[p + "gate.weight"] = _rand(num_experts, HIDDEN) * 5
        width = shared * size
        for proj, shape in (("gate", (width, HIDDEN)), ("up", (width, HIDDEN)), ("down", (HIDDEN, width))):
            tensors[p + f"shared_experts.{proj}_proj.weight"] = _rand(*shape)
        for e in range(num_experts):
            for proj, shape in (("gate", (size, HIDDEN)), ("up", (size, HIDDEN)), ("down", (HIDDEN, size))):
                tensors[p + f"experts.{e}.{proj}_proj.weight"] = _rand(*shape)
    _write(tmp_path / "src", config, tensors)

    model = load_pretrained(tmp_path / "src").eval()
    assert model.config.moe_layer_indices == [1, 2]
    x = torch.randn(SEQ[0] * SEQ[1], HIDDEN)
    dense_weights = (tensors[f"model.layers.0.mlp.{proj}_proj.weight"] for proj in ("gate", "up", "down"))
    torch.testing.assert_close(model.model.layers[0].mlp(x), _swiglu(x, *dense_weights), atol=1e-5, rtol=1e-5)
    for i in (1, 2):
        expected = _deepseek_reference(x, tensors, f"model.layers.{i}.mlp.", k)
        torch.testing.assert_close(model.model.layers[i].mlp(x[None])[0][0], expected, atol=1e-5, rtol=1e-5)

    save_pretrained(model, tmp_path / "again")
    assert _checkpoint_keys(tmp_path / "again") == set(tensors)
    written = json.loads((tmp_path / "again" / "config.json").read_text())
    assert (written["first_k_dense_replace"], written["moe_layer_freq"], written["n_shared_experts"]) == (1, 1, shared)
    _assert_same_weights(load_pretrained(tmp_path / "again"), model)


# -- native layout, merged models, sharding --------------------------------------------------------------------


def test_meta_construction_and_key_plans_cover_each_element_once():
    config = _tiny_config(shared_expert_intermediate_size=24, shared_expert_gate=True, router_type="tanh_mlp")
    with torch.device("meta"):
        model = MoEForCausalLM(config)
    assert all(t.is_meta for t in model_tensors(model).values())
    tensors = {name: torch.zeros(t.shape) for name, t in model_tensors(model).items()}
    for layout in LAYOUTS.values():
        counts = {name: torch.zeros_like(t) for name, t in tensors.items()}
        plan = entries(model, layout.keys)
        assert len({entry.key for entry in plan}) == len(plan), layout.model_type
        for entry in plan:
            counts[entry.param][entry.index] += 1
        for name, count in counts.items():
            implied = name.endswith("expert_map") and not layout.keys.expert_map
            assert torch.all(count == (0 if implied else 1)), (layout.model_type, name)


def test_merged_model_round_trips_in_native_layout_only(tmp_path):
    model = MoEForCausalLM(_tiny_config(physical_experts=[2, 3])).eval()
    model.model.layers[1].mlp.experts.expert_map.copy_(torch.tensor([1, 0, 0, 1]))
    model.model.layers[2].mlp.experts.expert_map.copy_(torch.tensor([2, 2, 0, 1]))
    save_pretrained(model, tmp_path / "merged")  # never loaded: the native layout
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["model_type"] == NATIVE
    again = load_pretrained(tmp_path / "merged").eval()
    _assert_same_weights(again, model)
    assert again.config.physical_experts == [2, 3]
    ids = torch.randint(0, VOCAB, SEQ)
    assert torch.equal(_logits(again, ids), _logits(model, ids))
    for layout in ("mixtral", "qwen3_moe", "deepseek"):
        with pytest.raises(CheckpointError, match=f"merged .*layout='flux_moe', not '{layout}'"):
            save_pretrained(model, tmp_path / layout, layout=layout)
        assert not (tmp_path / layout).exists()


def test_unexpressible_features_refuse_to_save(tmp_path):
    model = MoEForCausalLM(_tiny_config(moe_layers=None, qk_norm="head", moe_intermediate_size=40))
    with pytest.raises(CheckpointError, match="cannot save as 'mixtral'.*qk_norm='head'"):
        save_pretrained(model, tmp_path / "m", layout="mixtral")
    with pytest.raises(CheckpointError, match="unsupported model_type 'gpt2'"):
        save_pretrained(model, tmp_path / "m", layout="gpt2")


def test_sharded_save_loads_back(tmp_path):
    model = MoEForCausalLM(_tiny_config(shared_expert_intermediate_size=24, shared_expert_gate=True, attention_bias=True))
    save_pretrained(model, tmp_path / "sharded", max_shard_size=20_000)
    files = sorted(os.listdir(tmp_path / "sharded"))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) >= 3 and "model.safetensors.index.json" in files
    assert all(os.path.getsize(tmp_path / "sharded" / f) < 20_000 + 4096 for f in shards)
    _assert_same_weights(load_pretrained(tmp_path / "sharded"), model)


# -- errors ------------------------------------------------------------------------------------------------------


def _rewrite(path: Path, change) -> None:
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def _shards(folder: Path) -> list:
    return sorted(folder.glob("model-*.safetensors"))


# Each damage spoils a sharded checkpoint and returns the error it must cause (a regex).


def _truncate(folder: Path) -> str:
    shard = _shards(folder)[2]
    os.truncate(shard, os.path.getsize(shard) - 7)
    return rf"{shard.name}: truncated: key '[^']+'"


def _corrupt_header(folder: Path) -> str:
    shard = _shards(folder)[1]
    with open(shard, "r+b") as f:
        f.seek(9)
        f.write(b"#corrupt#")
    return rf"{shard.name}: corrupt safetensors header"


def _drop_key(folder: Path) -> str:
    shard = next(s for s in _shards(folder) if any(k.endswith("experts.down_proj") for k in load_file(s)))
    victim = next(k for k in load_file(shard) if k.endswith("experts.down_proj"))
    _rewrite(shard, lambda tensors: tensors.pop(victim))
    return rf"{shard.name}: lacks key '{victim}' listed in model\.safetensors\.index\.json"


def _reshape_key(folder: Path) -> str:
    shard = next(s for s in _shards(folder) if "model.norm.weight" in load_file(s))
    _rewrite(shard, lambda tensors: tensors.update({"model.norm.weight": torch.ones(HIDDEN + 1)}))
    return rf"{shard.name}: key 'model\.norm\.weight' has shape \[33\], expected \[32\]"


def _unsupported_type(folder: Path) -> str:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    return r"config\.json: unsupported model_type 'gpt2'"


def _add_key(folder: Path) -> str:
    shard, key = _shards(folder)[-1], "model.layers.0.mlp.bogus.weight"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"][key] = shard.name
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    _rewrite(shard, lambda tensors: tensors.update({key: torch.ones(3)}))
    return rf"{shard.name}: unexpected key '{key}'"


@pytest.mark.parametrize(
    "damage",
    [_truncate, _corrupt_header, _drop_key, _reshape_key, _unsupported_type, _add_key],
    ids=["truncated", "corrupt-header", "missing-key", "shape", "model-type", "unexpected-key"],
)
def test_bad_checkpoints_raise_naming_file_and_key(tmp_path, damage):
    save_pretrained(MoEForCausalLM(_tiny_config()), tmp_path, max_shard_size=30_000)
    assert len(_shards(tmp_path)) >= 3
    message = damage(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        load_pretrained(tmp_path)


def test_missing_key_in_single_file_names_it(tmp_path):
    save_pretrained(MoEForCausalLM(_tiny_config()), tmp_path)
    _rewrite(tmp_path / "model.safetensors", lambda t: t.pop("model.layers.2.mlp.gate.weight"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing key 'model\.layers\.2\.mlp\.gate\.weight'"):
        load_pretrained(tmp_path)


# -- atomic saving, streaming loading ---------------------------------------------------------------------------


def _snapshot(folder: Path) -> Dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def test_interrupted_save_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    save_pretrained(MoEForCausalLM(_tiny_config()), target, max_shard_size=30_000)
    before = _snapshot(target)
    with pytest.raises(CheckpointError, match="not empty"):
        save_pretrained(MoEForCausalLM(_tiny_config()), target)

    real_write, calls = safetensors_io._write_shard, []

    def crash_on_second_shard(path, tensors):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real_write(path, tensors)

    monkeypatch.setattr(safetensors_io, "_write_shard", crash_on_second_shard)
    other = MoEForCausalLM(_tiny_config())
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(other, target, max_shard_size=30_000, overwrite=True)
    assert _snapshot(target) == before
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(other, tmp_path / "fresh", max_shard_size=30_000)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no target, no staging folder left behind


def test_overwrite_replaces_the_checkpoint(tmp_path):
    first, second = MoEForCausalLM(_tiny_config()), MoEForCausalLM(_tiny_config())
    save_pretrained(first, tmp_path / "ckpt", max_shard_size=30_000)
    save_pretrained(second, tmp_path / "ckpt", overwrite=True)  # one file now: the old shards must be gone
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "model.safetensors"]
    _assert_same_weights(load_pretrained(tmp_path / "ckpt"), second)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_loading_streams_one_shard_and_one_tensor_at_a_time(tmp_path, monkeypatch):
    model = MoEForCausalLM(_tiny_config())
    save_pretrained(model, tmp_path, max_shard_size=30_000)
    real_open = safetensors_io.safe_open
    opened, open_now, reads = [], [0], []

    class TrackedShard:
        def __init__(self, path, **kwargs):
            opened.append(path)
            self.shard = real_open(path, **kwargs)

        def __enter__(self):
            open_now[0] += 1
            assert open_now[0] == 1, "two shards open at once"
            return self

        def __exit__(self, *exc):
            open_now[0] -= 1
            return self.shard.__exit__(*exc)

        def get_tensor(self, key):
            assert all(ref() is None for ref in reads), "an earlier source tensor is still alive"
            tensor = self.shard.get_tensor(key)
            reads.append(weakref.ref(tensor))
            return tensor

    monkeypatch.setattr(safetensors_io, "safe_open", TrackedShard)
    loaded = load_pretrained(tmp_path)
    assert len(opened) == len(set(opened)) == len(_shards(tmp_path)) >= 3
    assert len(reads) == len(model_tensors(model))
    _assert_same_weights(loaded, model)


# -- configs and weights that must not load silently ----------------------------------------------------------


def _native_config(tmp_path: Path, **changes) -> Path:
    save_pretrained(MoEForCausalLM(_tiny_config()), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key, value in changes.items():
        if value is _DROP:
            del config[key]
        else:
            config[key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


_DROP = object()


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("num_experts_per_tok", _DROP, "missing config key 'num_experts_per_tok'"),
        ("hidden_size", _DROP, "missing config key 'hidden_size'"),
        ("hidden_size", -32, "config key hidden_size=-32 must be a positive int"),
        ("num_experts", "8", "config key num_experts='8' must be a positive int"),
        ("moe_intermediate_size", 0, "config key moe_intermediate_size=0 must be a positive int"),
        ("rms_norm_eps", "tiny", "config key rms_norm_eps='tiny' must be a positive number"),
        ("tie_word_embeddings", "no", "config key tie_word_embeddings='no' must be true or false"),
        ("moe_layers", ["0"], r"config key moe_layers=\['0'\] must be a list of ints or null"),
        ("bogus", 1, "unknown config keys for flux_moe: bogus"),
    ],
)
def test_native_config_keys_are_required_and_checked(tmp_path, key, value, message):
    """A flux_moe config.json without num_experts_per_tok used to load with the default (different outputs);
    negative or string sizes gave raw torch tracebacks."""
    folder = _native_config(tmp_path, **{key: value})
    with pytest.raises(CheckpointError, match=rf"config\.json: {message}"):
        load_pretrained(folder)


def test_hf_config_sizes_are_checked(hf_checkpoints, tmp_path):
    folder = tmp_path / "mixtral"
    shutil.copytree(hf_checkpoints["mixtral"][0], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": -1}))
    with pytest.raises(CheckpointError, match=r"config\.json: config key intermediate_size=-1 must be a positive int"):
        load_pretrained(folder)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_reported_by_name(tmp_path, bad):
    save_pretrained(MoEForCausalLM(_tiny_config()), tmp_path)

    def spoil(tensors):
        tensors["model.layers.1.mlp.experts.down_proj"][3, 0, 5] = bad

    _rewrite(tmp_path / "model.safetensors", spoil)
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: key 'model\.layers\.1\.mlp\.experts\.down_proj' holds 1 non-finite"
    ):
        load_pretrained(tmp_path)


def test_torch_errors_while_loading_are_checkpoint_errors(tmp_path):
    save_pretrained(MoEForCausalLM(_tiny_config()), tmp_path)
    device = "xpu" if not (hasattr(torch, "xpu") and torch.xpu.is_available()) else "mps"
    with pytest.raises(CheckpointError, match=rf"{tmp_path}: cannot load the checkpoint \("):
        load_pretrained(tmp_path, device=device)
