"""Expert LoRA adapters: PEFT on-disk format round trips, foreign layouts, folding into the weights, errors."""

import json
import os

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from flux_engine import MoEForCausalLM, presets
from flux_engine.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    expert_module,
    load_peft_adapter,
    merge_adapters,
    merge_lora,
    save_peft_adapter,
)
from flux_engine.checkpoint import CheckpointError
from flux_engine.training import TrainConfig, attach_tuning, detach_tuning, train_round, tuning_state

TUNING = [[0, 3], [5]]
H, I, R = 64, 48, 4


def tiny_model() -> MoEForCausalLM:
    torch.manual_seed(0)
    return MoEForCausalLM(presets.get("tiny"))


def random_adapters(targets=("gate_up", "down"), seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"gate_up_A": (R, H), "gate_up_B": (2 * I, R), "down_A": (R, I), "down_B": (H, R)}
    names = [n for n in shapes if n.rsplit("_", 1)[0] in targets]
    return {(l, e): {n: torch.randn(shapes[n], generator=g) for n in names} for l, ids in enumerate(TUNING) for e in ids}


def trained_lora_model():
    model = tiny_model()
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    result = train_round(model, TUNING, [ids], TrainConfig(rank=R, alpha=8.0, lr=2e-2, epochs=3))
    return model, result, ids


def test_peft_round_trip_is_exact(tmp_path):
    config = presets.get("tiny")
    _, result, _ = trained_lora_model()
    save_peft_adapter(tmp_path / "a", result.trained, config, alpha=8.0)
    cfg = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == R and cfg["lora_alpha"] == 8.0
    assert "model.layers.1.mlp.experts.0.gate_proj" in cfg["target_modules"]
    assert expert_module(config, 1, 5, "down_proj") == "model.layers.2.mlp.experts.5.down_proj"
    keys = set(load_file(tmp_path / "a" / ADAPTER_WEIGHTS))
    assert "base_model.model.model.layers.2.mlp.experts.5.up_proj.lora_B.weight" in keys and len(keys) == 3 * 3 * 2
    back = load_peft_adapter(tmp_path / "a", config)
    assert (back.rank, back.alpha, back.scale) == (R, 8.0, 2.0)
    assert back.adapters.keys() == result.trained.keys()
    for key, tensors in result.trained.items():
        assert back.adapters[key].keys() == tensors.keys()
        assert all(torch.equal(back.adapters[key][n], t) for n, t in tensors.items())
    # Down-only adapters round trip too; the folder is replaced only with overwrite=True.
    down_only = random_adapters(("down",))
    with pytest.raises(CheckpointError, match="not empty"):
        save_peft_adapter(tmp_path / "a", down_only, config, alpha=8.0)
    save_peft_adapter(tmp_path / "a", down_only, config, alpha=8.0, overwrite=True)
    back = load_peft_adapter(tmp_path / "a", config).adapters
    assert all(set(t) == {"down_A", "down_B"} and torch.equal(t["down_B"], down_only[k]["down_B"]) for k, t in back.items())
    assert [p for p in os.listdir(tmp_path) if p != "a"] == []  # no staging folders left behind


def test_separate_gate_and_up_factors_import_exactly(tmp_path):
    """A foreign adapter with different gate/up A's (and one expert with gate only) becomes one gate_up LoRA of
    concatenated rank whose update equals the per-projection updates."""
    config = presets.get("tiny")
    g = torch.Generator().manual_seed(0)
    prefix = "base_model.model.model.layers.1.mlp.experts"
    tensors = {
        f"{prefix}.2.gate_proj.lora_A.weight": torch.randn(R, H, generator=g),
        f"{prefix}.2.gate_proj.lora_B.weight": torch.randn(I, R, generator=g),
        f"{prefix}.2.up_proj.lora_A.weight": torch.randn(R, H, generator=g),
        f"{prefix}.2.up_proj.lora_B.weight": torch.randn(I, R, generator=g),
        f"{prefix}.4.gate_proj.lora_A.weight": torch.randn(R, H, generator=g),
        f"{prefix}.4.gate_proj.lora_B.weight": torch.randn(I, R, generator=g),
    }
    folder = tmp_path / "foreign"
    folder.mkdir()
    save_file(tensors, folder / ADAPTER_WEIGHTS)
    (folder / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": R, "lora_alpha": 4, "use_rslora": True}))
    got = load_peft_adapter(folder, config)
    assert got.scale == 2.0  # rsLoRA: alpha / sqrt(r)
    delta = lambda proj, e: tensors[f"{prefix}.{e}.{proj}.lora_B.weight"] @ tensors[f"{prefix}.{e}.{proj}.lora_A.weight"]  # noqa: E731
    two = got.adapters[(0, 2)]
    assert two["gate_up_A"].shape == (2 * R, H)
    assert torch.allclose(two["gate_up_B"] @ two["gate_up_A"], torch.cat([delta("gate_proj", 2), delta("up_proj", 2)]), atol=1e-5)
    four = got.adapters[(0, 4)]
    assert torch.allclose(four["gate_up_B"] @ four["gate_up_A"], torch.cat([delta("gate_proj", 4), torch.zeros(I, H)]), atol=1e-5)


def test_merge_lora_matches_lora_model_and_merge_adapters_skips():
    model, result, ids = trained_lora_model()
    model.eval()
    with torch.no_grad():
        want = model(ids).logits
        merge_lora(model)
        assert all(mlp.experts.lora is None for mlp in model.moe_layers())
        assert torch.allclose(model(ids).logits, want, atol=1e-5)
    # The same through merge_adapters on a fresh model, from the exported dict.
    fresh = tiny_model().eval()
    merge_adapters(fresh, result.trained, scale=8.0 / R)
    assert torch.allclose(fresh(ids).logits, want, atol=1e-5)
    skipped = tiny_model()
    base = skipped.moe_layers()[0].experts.gate_up_proj.detach().clone()
    merge_adapters(skipped, result.trained, scale=2.0, skip=[(0, 0)])
    W = skipped.moe_layers()[0].experts.gate_up_proj
    assert torch.equal(W[0], base[0]) and not torch.equal(W[3], base[3])


def test_merge_adapters_then_resume_from_global_factors():
    """The client flow: fold the global adapters of non-tuning experts, resume the tuning experts' factors."""
    _, result, ids = trained_lora_model()
    reference = tiny_model().eval()
    merge_adapters(reference, result.trained, scale=2.0)
    client = tiny_model().eval()
    merge_adapters(client, result.trained, scale=2.0, skip=[(0, 0), (1, 5)])
    attach_tuning(client, [[0], [5]], TrainConfig(rank=R, alpha=8.0), init=result.trained)
    with torch.no_grad():
        assert torch.allclose(client(ids).logits, reference(ids).logits, atol=1e-5)
    assert set(tuning_state(client)) == {(0, 0), (1, 5)}
    detach_tuning(client)


def test_adapter_errors(tmp_path):
    config = presets.get("tiny")
    with pytest.raises(CheckpointError, match="adapter_config.json: no such file"):
        load_peft_adapter(tmp_path / "missing", config)
    save_peft_adapter(tmp_path / "a", random_adapters(), config, alpha=8.0)
    os.remove(tmp_path / "a" / ADAPTER_WEIGHTS)
    with pytest.raises(CheckpointError, match="adapter_model.safetensors: no such file"):
        load_peft_adapter(tmp_path / "a", config)
    save_peft_adapter(tmp_path / "b", random_adapters(), config, alpha=8.0)
    small = presets.get("tiny").replace(moe_intermediate_size=32)
    with pytest.raises(CheckpointError, match=r"expert \(0, 0\) \w+_proj: lora_A .* expected"):
        load_peft_adapter(tmp_path / "b", small)
    cfg_path = tmp_path / "b" / ADAPTER_CONFIG
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(CheckpointError, match="peft_type must be 'LORA'"):
        load_peft_adapter(tmp_path / "b", config)
    cfg_path.write_text(json.dumps(cfg))
    tensors = load_file(tmp_path / "b" / ADAPTER_WEIGHTS)
    del tensors["base_model.model.model.layers.1.mlp.experts.0.down_proj.lora_B.weight"]
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(R, H)
    save_file(tensors, tmp_path / "b" / ADAPTER_WEIGHTS)
    with pytest.raises(CheckpointError, match="unsupported key"):
        load_peft_adapter(tmp_path / "b", config)
    del tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    save_file(tensors, tmp_path / "b" / ADAPTER_WEIGHTS)
    with pytest.raises(CheckpointError, match="lora_A without its partner"):
        load_peft_adapter(tmp_path / "b", config)
    mixed = random_adapters()
    mixed[(0, 0)] = {"down_A": torch.zeros(2, I), "down_B": torch.zeros(H, 2)}
    with pytest.raises(ValueError, match="one rank r"):
        save_peft_adapter(tmp_path / "c", mixed, config, alpha=8.0)
    model = tiny_model()
    model.moe_layers()[0].experts.expert_map[1] = 0  # experts 0 and 1 share a physical expert
    with pytest.raises(ValueError, match="does not own its physical expert"):
        merge_adapters(model, random_adapters(), scale=1.0)


def test_real_peft_reads_our_adapter(tmp_path):
    """PEFT 0.21 parses our adapter_config.json, targets exactly the exported per-expert modules of a per-expert
    model (dense MLPs untouched), names their state as our file does, and computes the same update."""
    peft = pytest.importorskip("peft")
    config = presets.get("tiny")
    adapters = random_adapters()
    save_peft_adapter(tmp_path / "a", adapters, config, alpha=8.0)

    def mlp(n_in, n_mid):
        m = nn.Module()
        m.gate_proj, m.up_proj, m.down_proj = nn.Linear(n_in, n_mid, False), nn.Linear(n_in, n_mid, False), nn.Linear(n_mid, n_in, False)
        return m

    base = nn.Module()
    base.model = nn.Module()
    base.model.layers = nn.ModuleList()
    for i in range(config.num_layers):
        layer = nn.Module()
        layer.mlp = mlp(H, 128)  # dense gate/up/down projections must not be adapted
        if config.is_moe_layer(i):
            layer.mlp.experts = nn.ModuleList(mlp(H, I) for _ in range(config.num_experts))
        base.model.layers.append(layer)
    lora_config = peft.LoraConfig.from_pretrained(str(tmp_path / "a"))
    assert lora_config.r == R and lora_config.lora_alpha == 8.0
    lora_config.task_type = None  # a bare module: no generation wrapper (the key names are the same)
    model = peft.get_peft_model(base, lora_config)
    ours = load_file(tmp_path / "a" / ADAPTER_WEIGHTS)
    assert set(peft.get_peft_model_state_dict(model)) == set(ours)
    peft.set_peft_model_state_dict(model, ours)
    x = torch.randn(3, H)
    gate = model.base_model.model.model.layers[2].mlp.experts[5].gate_proj
    t = adapters[(1, 5)]
    want = gate.base_layer(x) + 2.0 * x @ t["gate_up_A"].t() @ t["gate_up_B"][:I].t()
    assert torch.allclose(gate(x), want, atol=1e-5)
