"""bench/memory.py: its pure helpers and its streamed, per-layer compact-model build."""

import importlib.util
import os

import pytest
import torch

_PATH = os.path.join(os.path.dirname(__file__), "..", "bench", "memory.py")


@pytest.fixture(scope="module")
def gm():
    spec = importlib.util.spec_from_file_location("bench_memory", _PATH)
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
                              remove_checkpoints=True, activation_checkpointing=False)
    res = gm.run_preset("deepseek-moe-16b", args, torch.device("cpu"), time.monotonic() + 600)  # never the limit: a loaded CPU must not stop the search
    assert res["search"]["largest_fit"] == 20 and res["search"]["smallest_oom"] == 21
    assert res["train_oom"] is None and len(res["losses"]) == 2
    text = gm.render([res], {"device": "cpu"}, cuda=False, cap_gib=24)
    assert "Largest B_tune that fits: 20" in text and "not measured" in text
    assert not os.listdir(tmp_path)  # checkpoint folder removed


def test_capped_cpu_pipeline_on_shrunk_shapes(gm, tmp_path):
    """CPU mode: every phase in a fresh process under a kernel-enforced cap, measured against budget.phase_peaks,
    the summary line in its fixed form; a search try installs drawn experts of the try's shapes."""
    import json
    import re

    out = tmp_path / "memory.md"
    rc = gm.main(["--out", str(out), "--shrink", "--presets", "deepseek-moe-16b:2", "--seq-len", "32",
                  "--profile-seqs", "1", "--workdir", str(tmp_path / "w")])  # fmt: skip
    assert rc == 0
    text = out.read_text()
    assert re.search(r"^deepseek-moe-16b: peak \d+\.\d GiB under a 2 GiB cap \(full bf16 model \d+\.\d GB\), "
                     r"B_tune 48$", text, re.M)  # fmt: skip
    for row in ("| profile: forward (fp32 compute) |", "| compact at B_tune 48: stream + merge one layer at a time |",
                "| train at B_tune 48: 1 LoRA step(s) |"):  # fmt: skip
        assert row in text
    res = json.loads((tmp_path / "memory.json").read_text())["results"][0]
    assert res["phases"]["train"]["losses"] and res["checkpoint"]["layout"] == "deepseek"
    assert set(res["predicted"]) == {"profile", "compact", "train"}
    # The checkpoint folder is kept for the next run, which reuses it.
    assert os.path.isdir(tmp_path / "w" / "deepseek-moe-16b-shrunk")
    cap = gm.Cap(2 << 30, "test")
    try:
        spec = json.loads((tmp_path / "w" / "deepseek-moe-16b.train.spec.json").read_text())
        r = gm.run_phase(cap, "checkpoint", spec, str(tmp_path / "w"), "again")
        assert r["checkpoint"]["reused"]
        r = gm.run_phase(cap, "try", dict(spec, B_tune=5, B_non=6, steps=1), str(tmp_path / "w"), "try5")
        assert r["physical_experts"] == 5 + 6 and len(r["losses"]) == 1
    finally:
        cap.close()


def test_cap_kills_a_phase_over_it(gm, tmp_path):
    cap = gm.Cap(64 << 20, "tiny")  # less than the interpreter with torch imported
    try:
        if cap.path is None:
            pytest.skip(f"no writable memory cgroup here ({cap.mechanism})")
        spec = {"preset": "deepseek-moe-16b", "shrink": True, "folder": str(tmp_path), "seq_len": 8, "seed": 0}
        r = gm.run_phase(cap, "baseline", spec, str(tmp_path), "tiny")
        assert r["over_cap"]
    finally:
        cap.close()


def test_fp32_matmul_under_activation_checkpointing(gm):
    """Checkpointed layers recompute inside autograd.grad: the fp32 F.linear must be the one they see there too
    (a TorchFunctionMode is off while its handler runs autograd.grad: different saved tensors, CheckpointError)."""
    import copy

    from flux_engine import MoEForCausalLM, presets, training

    torch.manual_seed(0)
    model = MoEForCausalLM(presets.get("tiny")).to(torch.bfloat16)
    data = [torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))]
    tuning = [[0, 1]] * len(model.moe_layers())
    native, losses = torch.nn.functional.linear, {}
    for ckpt in (False, True):
        config = training.TrainConfig(mode="lora", rank=4, alpha=8.0, lr=1e-2, steps=2, micro_batch_size=1, seed=0,
                                      activation_checkpointing=ckpt)  # fmt: skip
        with gm.fp32_matmul():
            losses[ckpt] = training.train_round(copy.deepcopy(model), tuning, data * 2, config).losses
    assert torch.nn.functional.linear is native  # restored on leaving the block
    assert losses[True] == pytest.approx(losses[False], rel=1e-2)
