"""The hardware model (flux_engine.hardware) against hand-computed values."""

import math

import pytest

from flux_engine import hardware as hw
from flux_engine import presets, structure, timemodel
from flux_engine.models.config import MoEConfig


def small_config() -> MoEConfig:
    # 2 layers (layer 0 dense, layer 1 MoE), H 4, 2 heads / 1 KV head of D 2, I_d 6, E 4 of I 4, k 2, V 10.
    return MoEConfig(vocab_size=10, hidden_size=4, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=2,
                     intermediate_size=6, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=4,
                     moe_layers=[1])  # fmt: skip


def test_forward_flops_by_hand():
    f = hw.forward_flops_per_token(small_config(), seq_len=7)
    # per layer 2 H D (2 nh + 2 nkv) = 2*4*2*(4+2) = 96, two layers
    assert f["attention projections"] == 192
    # per layer 2 nh D (S + 1) = 2*2*2*8 = 64, two layers
    assert f["attention core"] == 128
    assert f["dense MLP"] == 6 * 4 * 6  # one dense layer
    assert f["router"] == 2 * 4 * 4
    assert f["routed experts"] == 6 * 2 * 4 * 4
    assert f["shared experts"] == 0
    assert f["LM head"] == 2 * 4 * 10
    # LoRA per token: k x share x 2 r (2H + 3I) = 2 * 0.5 * 2*8*(8+12)
    assert hw.lora_flops_per_token(small_config(), rank=8, lora_share=0.5) == 2 * 0.5 * 2 * 8 * 20
    linear = 192 + 144 + 32 + 192 + 80
    assert hw.forward_flops(small_config(), 5, 7) == 5 * (linear + 128)
    assert hw.train_flops(small_config(), 5, 7, 8, 0.5) == 5 * (2 * linear + 3 * 128 + 3 * 320)


def test_p_touched_and_regimes():
    c = small_config()  # k/E = 1/2
    assert hw.p_touched(c, 2) == pytest.approx(0.75)
    assert structure.parse_regime("deepseek-moe-16b@24GiB") == ("deepseek-moe-16b", 24.0)
    assert structure.parse_regime(" llama-moe-3.5b @ 12GiB ") == ("llama-moe-3.5b", 12.0)
    for bad in ("deepseek-moe-16b", "deepseek-moe-16b@24GB", "nope@24GiB", "deepseek-moe-16b@0GiB"):
        with pytest.raises(ValueError):
            structure.parse_regime(bad)


def test_params_are_checked_and_described():
    p = hw.HardwareParams()
    assert p.flops_per_s == pytest.approx(165.2e12 * 0.4)
    assert p.pcie_bytes_per_s == pytest.approx(31.5077e9 * 0.8, rel=1e-4)
    assert p.budget_bytes == 24 << 30
    text = p.describe()
    for needle in ("RTX 4090", "165.2", "utilisation 0.4", "1008 GB/s", "31.5 GB/s", "1000 Mbit/s", "overlap on"):
        assert needle in text
    for bad in ({"device": "a100"}, {"utilisation": 1.5}, {"local_steps": 0}, {"network_bps": 0}):
        with pytest.raises(ValueError):
            hw.HardwareParams(**bad)
    with pytest.raises(ValueError, match="unknown hardware parameters"):
        hw.params_from(p, nope=1)


def test_deepseek_on_a_24gib_card_plans():
    p24 = hw.HardwareParams(device="rtx4090")
    plans = structure.method_plans(presets.get("deepseek-moe-16b"), p24.budget_bytes, p24.settings())
    assert not plans["fedavg-lora"].feasible  # 16B params in bf16 alone exceed 24 GiB
    assert "INFEASIBLE" in plans["fedavg-lora"].text()
    for m in ("flux", "fmd", "fmq", "fmes"):
        assert plans[m].feasible and plans[m].used_bytes <= 24 << 30
    assert 0 < plans["flux"].structure["B_tune"] < 27 * 64
    assert 0 < plans["fmd"].structure["resident"] < 27 * 64
    # A budget below the fixed terms makes every method infeasible, reported, not assumed to fit.
    tiny = structure.method_plans(presets.get("deepseek-moe-16b"), 2 << 30, p24.settings())
    assert not any(p.feasible for p in tiny.values())


def test_fmd_pcie_and_fmq_dequant_by_hand():
    c = small_config()
    N, t_e = 4, 3 * 4 * 4 * 2  # one MoE layer of 4 experts, 3 H I bf16 weights each
    p = hw.HardwareParams(local_steps=3, batch_size=1, seq_len=1, utilisation=1.0, pcie_efficiency=1.0,
                          pcie_gbytes_per_s=1e-9, mem_efficiency=1.0)  # 1 B/s: seconds = bytes
    plan = structure.MethodPlan("fmd", True, 0, 1, structure={"resident": 1, "experts": N})
    first, later = hw.round_terms(c, "fmd", plan, p)
    P = 1 - (1 - 2 / 4) ** 1
    assert later.pcie == pytest.approx(3 * 2 * (N - 1) * P * t_e)
    # round 1 adds loading the resident expert and the first profile (every expert streamed, then a forward)
    assert first.setup >= (1 + N) * t_e
    q = structure.MethodPlan("fmq", True, 0, 1, structure={"bits": 4, "experts": N})
    assert hw.round_terms(c, "fmq", q, p)[1].dequant == 0.0  # fused
    unfused = hw.params_from(p, fmq_fused=False)
    from flux_engine.budget import quantized_expert_bytes

    q_e = quantized_expert_bytes(c, 4)
    dram = unfused.dram_bytes_per_s
    assert hw.round_terms(c, "fmq", q, unfused)[1].dequant == pytest.approx(3 * 2 * N * P * (q_e + t_e) / dram)


def test_overlap_hides_pcie_up_to_the_training_time():
    c = timemodel.ClientRound(client=0, train_seconds=1.5, pcie_bytes=2 * 10**9)
    plain = timemodel.TimeModel(pcie_bytes_per_s=1e9).client_time(c)
    hidden = timemodel.TimeModel(pcie_bytes_per_s=1e9, pcie_overlap=True).client_time(c)
    assert plain.pcie == pytest.approx(2.0) and hidden.pcie == pytest.approx(0.5)
    c.pcie_bytes = 10**9
    assert timemodel.TimeModel(pcie_bytes_per_s=1e9, pcie_overlap=True).client_time(c).pcie == 0.0


def test_network_structure_and_round_times():
    c = small_config()
    plan = structure.MethodPlan("flux", True, 0, 1, structure={"B_tune": 1, "B_non": 1, "experts": 4})
    net = hw.structural_network("flux", plan, clients=2, rounds=3)
    assert net.rounds[0]["0"] == (1.0, 0.25) and net.rounds[1]["1"] == (0.5, 0.25)
    e = hw.lora_expert_bytes(c, 8)
    assert e == 8 * (8 + 12) * 4
    hist = [{"clients": {0: {"download_bytes": 4 * e, "upload_bytes": e}}, "experts_changed": 2}]
    m = hw.NetworkStructure.from_history(hist, e, 4)
    assert m.rounds == [{"0": (1.0, 0.25)}] and m.changed == [0.5]
    p = hw.HardwareParams(network_bps=8.0, clients=2)  # 1 byte/s
    rts = hw.round_times(c, "flux", plan, p, net, 3)
    assert len(rts) == 3
    slow = rts[1].slowest
    assert slow.download == pytest.approx(0.5 * 4 * e) and slow.upload == pytest.approx(0.25 * 4 * e)
    assert rts[2].end == pytest.approx(sum(r.duration for r in rts))
    assert math.isfinite(rts[-1].end)


def test_structure_matching_carries_the_real_fractions_over():
    from flux_engine.budget import TrainSettings

    small = presets.get("smollm2-llama-moe-mini")  # 5 MoE layers x 8 experts, top-2
    s = TrainSettings(dtype="float32", lora_rank=8, batch_size=4, seq_len=64)
    m = structure.match("deepseek-moe-16b@24GiB", small, s)
    real = m.real
    N, n = 27 * 64, 40
    assert not real["fedavg-lora"].feasible and real["flux"].feasible and real["fmes"].feasible
    assert m.B_tune == max(1, min(n - 1, round(real["flux"].structure["B_tune"] / N * n)))
    assert m.B_non == max(5, min(n - m.B_tune, round(real["flux"].structure["B_non"] / N * n)))
    assert m.kept == max(10, min(n, round(real["fmes"].structure["kept"] / N * n)))
    assert m.fmq_bits == 4
    text = m.describe()
    assert "deepseek-moe-16b@24GiB" in text and f"-> {m.B_tune}/{n}" in text and "INFEASIBLE" in text
    plan = structure.matched_budget_plan(small, m, s)
    assert (plan.B_tune, plan.B_non) == (m.B_tune, m.B_non) and plan.used_bytes == plan.budget_bytes


def test_run_keys_structure_from_and_stop_after():
    from flux_engine.federated.config import ConfigError, RunConfig

    r = RunConfig(structure_from="deepseek-moe-16b@24GiB", num_rounds=10, stop_after=3)
    assert r.last_round == 3 and RunConfig(num_rounds=10).last_round == 10
    with pytest.raises(ConfigError, match="structure-from"):
        RunConfig(structure_from="deepseek-moe-16b@24")
    with pytest.raises(ConfigError, match="stop-after"):
        RunConfig(stop_after=-1)
