"""bench/gpu_memory.py: its pure helpers and its streamed, per-layer compact-model build."""

import importlib.util
import os

import pytest
import torch

_PATH = os.path.join(os.path.dirname(__file__), "..", "bench", "gpu_memory.py")


@pytest.fixture(scope="module")
def gm():
    spec = importlib.util.spec_from_file_location("bench_gpu_memory", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_split_groups(gm):
    assert gm.split_groups([], 3) == []
    assert gm.split_groups([1, 2, 3, 4, 5], 2) == [[1, 2, 3], [4, 5]]
    assert gm.split_groups([1, 2], 5) == [[1], [2]]
    assert gm.split_groups([1, 2, 3], 0) == [[1, 2, 3]]


@pytest.mark.parametrize("limit", [0, 1, 7, 99, 100])
def test_largest_fitting(gm, limit):
    lo, hi, tries = gm.largest_fitting(-1, 101, lambda n: n <= limit)
    assert (lo, hi) == (limit, limit + 1)
    assert len(tries) <= 8


def test_largest_fitting_stops(gm):
    calls = []

    def fits(n):
        calls.append(n)
        return None if len(calls) > 2 else n <= 40

    lo, hi, tries = gm.largest_fitting(0, 101, fits)
    assert tries[-1][1] is None and 0 <= lo < hi <= 101 and hi - lo > 1


@pytest.mark.parametrize("preset", ["deepseek-moe-16b", "llama-moe-3.5b"])
def test_build_compact_matches_merge(gm, preset, tmp_path):
    from flux_engine import merging, presets, profiling
    from flux_engine.checkpoint import load_pretrained

    config = gm.shrink(presets.get(preset))
    folder = str(tmp_path / "ckpt")
    info = gm.write_checkpoint(config, folder, seed=0, device=torch.device("cpu"), reuse=False)
    assert info["layout"] == config.metadata["source_model_type"]
    full = load_pretrained(folder)
    ids = torch.randint(0, config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    prof = profiling.profile(folder, [{"input_ids": ids}])
    L, E = len(config.moe_layer_indices), config.num_experts
    tuning = gm.tuning_for(prof, 5, seed=0)
    budgets = merging.layer_budgets(prof.frequency, 2 * L, [E - len(t) for t in tuning])
    compact = gm.build_compact(folder, prof, tuning, budgets, torch.device("cpu"), seed=0)
    assert compact.config.physical_experts == [len(t) + b for t, b in zip(tuning, budgets)]
    # Non-expert weights are the checkpoint's; MoE layer 0 merges exactly as merging.merge of the whole model does
    # (later layers may cluster differently: the per-layer merge seeds k-means with layer id 0).
    ref = merging.merge(full, prof, tuning, budgets, inplace=False)
    ref_t, got_t = ref.state_dict(), compact.state_dict()
    for k, v in ref_t.items():
        if ".mlp.experts." not in k:
            assert torch.equal(got_t[k], v), k
    a, b = ref.moe_layers()[0].experts, compact.moe_layers()[0].experts
    assert torch.equal(a.expert_map, b.expert_map)
    assert torch.equal(a.gate_up_proj, b.gate_up_proj) and torch.equal(a.down_proj, b.down_proj)
    out = compact(ids)
    assert torch.isfinite(out.logits.float()).all()


def test_run_preset_search_recovers_from_oom(gm, tmp_path, monkeypatch):
    """The search catches out-of-memory errors (emulated on the CPU above 20 tuning experts) and finds the limit."""
    import argparse
    import time

    from flux_engine import training

    real = training.train_round

    def train_round(model, tuning, *a, **k):
        if sum(len(t) for t in tuning) > 20:
            model.moe_layers()[0].experts.lora = None  # partly attached, as after a real OOM
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        return real(model, tuning, *a, **k)

    monkeypatch.setattr(training, "train_round", train_round)
    args = argparse.Namespace(seq_len=32, steps=2, search_steps=1, profile_seqs=2, seed=0, workdir=str(tmp_path),
                              reuse_checkpoint=False, keep_checkpoints=False, activation_checkpointing=False)
    res = gm.run_preset("deepseek-moe-16b", args, torch.device("cpu"), time.monotonic() + 60)
    assert res["search"]["largest_fit"] == 20 and res["search"]["smallest_oom"] == 21
    assert res["train_oom"] is None and len(res["losses"]) == 2
    text = gm.render([res], {"device": "cpu"}, cuda=False, cap_gib=24)
    assert "Largest B_tune that fits: 20" in text and "not measured" in text
    assert not os.listdir(tmp_path)  # checkpoint folder removed
