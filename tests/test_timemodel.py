"""The time model (hand-computed rounds, stale profiling in idle windows) and the time-to-accuracy report."""

import dataclasses
import math

import pytest
import torch

from flux_engine.timemodel import (
    ClientRound,
    CurvePoint,
    TimeModel,
    curve,
    group_by_method,
    plot_curves,
    read_csv,
    speedups,
    tensor_bytes,
    time_to_accuracy,
    tta_table,
    tta_target,
    write_csv,
)

# 1 Gbit/s: 125e6 bytes take 1 s; 16 GB/s PCIe: 16e9 bytes take 1 s.
S_NET = 125_000_000
S_PCIE = 16_000_000_000


def _rounds():
    a1 = ClientRound("a", download_bytes=S_NET, upload_bytes=S_NET // 2, profile_seconds=2.0, merge_seconds=0.5,
                     train_seconds=3.0)  # fmt: skip
    b1 = ClientRound("b", upload_bytes=S_NET, profile_seconds=1.0, train_seconds=4.0, pcie_bytes=S_PCIE)
    a2 = ClientRound("a", download_bytes=S_NET, upload_bytes=S_NET // 2, profile_seconds=4.0, merge_seconds=0.5,
                     train_seconds=3.0)  # fmt: skip
    b2 = ClientRound("b", upload_bytes=S_NET, profile_seconds=1.0, train_seconds=4.5, pcie_bytes=S_PCIE)
    return [([a1, b1], 1.5), ([a2, b2], 1.0)]


def test_hand_computed_rounds_with_stale_profiling():
    tm = TimeModel()
    r1, r2 = tm.simulate(_rounds())
    # Round 1: nothing hides the profiling. a: 1 + 2 + 0.5 + 3 + 0.5 = 7; b: 1 + 4 + 1 (PCIe) + 1 = 7.
    a, b = r1.clients
    assert a.total == pytest.approx(7.0) and b.total == pytest.approx(7.0)
    assert a.download == pytest.approx(1.0) and a.upload == pytest.approx(0.5) and b.pcie == pytest.approx(1.0)
    assert r1.idle_windows == {} and a.profile_hidden == 0.0
    assert r1.duration == pytest.approx(8.5) and r1.end == pytest.approx(8.5)
    # Round 2: each client's profiling hides in its idle window since its round-1 upload began: upload + wait for
    # the slowest + aggregation + its round-2 download. a: 0.5 + 0 + 1.5 + 1 = 3 s of its 4 s -> 1 s shows, total
    # 1 + 1 + 0.5 + 3 + 0.5 = 6; b: 1 + 0 + 1.5 + 0 = 2.5 s >= its 1 s -> hidden, total 4.5 + 1 + 1 = 6.5.
    a, b = r2.clients
    assert r2.idle_windows == {"a": pytest.approx(3.0), "b": pytest.approx(2.5)}
    assert a.profile == pytest.approx(1.0) and a.profile_hidden == pytest.approx(3.0) and a.total == pytest.approx(6.0)
    assert b.profile == pytest.approx(0.0) and b.total == pytest.approx(6.5)
    assert r2.slowest is b
    assert r2.start == pytest.approx(8.5) and r2.duration == pytest.approx(7.5) and r2.end == pytest.approx(16.0)
    assert r1.bytes_sent == S_NET + S_NET // 2 + S_NET
    text = r2.describe()
    assert "slowest" in text and "aggregation 1.000" in text and "idle window of 3.000" in text
    # A client that sat a round out idles through it too.
    c = ClientRound("c", profile_seconds=20.0)
    r = tm.simulate([([c], 0.0), (_rounds()[0][0], 0.0), ([c], 0.0)])
    assert r[2].idle_windows["c"] == pytest.approx(r[1].duration)


def test_stale_ablation_and_per_client_switches():
    ablation = TimeModel(stale_profiling=False).simulate(_rounds())
    assert ablation[1].clients[0].total == pytest.approx(9.0)  # a: all 4 s of profiling count
    assert ablation[1].end == pytest.approx(8.5 + 9.0 + 1.0)
    # A client that profiles on the critical path (stale=False) under a stale model.
    c = ClientRound("x", profile_seconds=3.0, stale=False)
    assert TimeModel().client_time(c, idle_window=10.0).profile == pytest.approx(3.0)
    # Own link and an asymmetric uplink.
    tm = TimeModel(uplink_bps=0.5e9)
    t = tm.client_time(ClientRound(download_bytes=S_NET, upload_bytes=S_NET))
    assert (t.download, t.upload) == (pytest.approx(1.0), pytest.approx(2.0))
    t = tm.client_time(ClientRound(download_bytes=S_NET, upload_bytes=S_NET, network_bps=2e9))
    assert (t.download, t.upload) == (pytest.approx(0.5), pytest.approx(0.5))
    with pytest.raises(ValueError):
        TimeModel(network_bps=0)
    with pytest.raises(ValueError):
        tm.client_time(ClientRound(train_seconds=-1.0))


def test_describe_lists_every_term_and_assumption():
    text = TimeModel().describe()
    for word in ("download", "upload", "profiling", "merge", "local train", "PCIe", "aggregation", "1 Gbit/s",
                 "16 GB/s", "stale", "measured", "not modelled"):  # fmt: skip
        assert word in text, word
    assert "OFF" in TimeModel(stale_profiling=False).describe()


def test_tensor_bytes():
    trained = {(0, 1): {"gate_up_A": torch.zeros(8, 64), "gate_up_B": torch.zeros(96, 8)},
               (1, 3): {"down_A": torch.zeros(8, 48, dtype=torch.bfloat16)}}  # fmt: skip
    assert tensor_bytes(trained) == (512 + 768) * 4 + 384 * 2
    assert tensor_bytes(trained, dtype_bytes=4) == (512 + 768 + 384) * 4
    assert tensor_bytes(None) == 0 and tensor_bytes([torch.zeros(3)]) == 12


def _series():
    def pts(method, times, accs):
        return [CurvePoint(method, i, t, {"x": a, "y": a}, 100 * i) for i, (t, a) in enumerate(zip(times, accs))]

    return {
        "flux": pts("flux", [0, 10, 20, 30], [0.2, 0.5, 0.7, 0.8]),
        "fedavg-lora": pts("fedavg-lora", [0, 25, 50, 75], [0.2, 0.4, 0.6, 0.78]),
        "fmes": pts("fmes", [0, 5, 10, 15], [0.2, 0.3, 0.35, 0.4]),
    }


def test_tta_target_speedups_and_table():
    series = _series()
    target = tta_target(series, 0.95)
    assert target.value == pytest.approx(0.76)
    assert "95%" in target.statement and "flux" in target.statement and "0.8000" in target.statement
    assert time_to_accuracy(series["flux"], target.value) == (30, 3)
    assert time_to_accuracy(series["fedavg-lora"], target.value) == (75, 3)
    assert time_to_accuracy(series["fmes"], target.value) is None
    ups = speedups(series, target.value)
    assert ups["fedavg-lora"].value == pytest.approx(2.5)
    assert math.isinf(ups["fmes"].value) and ups["fmes"].lower_bound == pytest.approx(0.5)
    table = tta_table(series, target)
    assert target.statement in table
    assert "| fedavg-lora |" in table and "2.50x" in table and "not reached" in table and "(reference)" in table
    # The "best at any round" rule and a method that never gets an accuracy.
    series["fmes"][1].accuracy = {"x": 0.95, "y": 0.95}
    assert tta_target(series, 1.0, rule="best_any").value == pytest.approx(0.95)
    with pytest.raises(ValueError):
        tta_target({"flux": []})
    with pytest.raises(ValueError):
        tta_target(series, rule="median")
    # Reference never reaches: no speedups.
    assert speedups(series, 0.99)["fedavg-lora"].value is None


def test_curve_from_simulated_rounds_and_csv_round_trip(tmp_path):
    rounds = TimeModel().simulate(_rounds())
    pts = curve("flux", rounds, [{"social_iqa": 0.4, "winowhy": 0.5}, {"social_iqa": 0.45, "winowhy": 0.55}],
                initial={"social_iqa": 0.3, "winowhy": 0.5})  # fmt: skip
    assert [p.round for p in pts] == [0, 1, 2]
    assert [p.time for p in pts] == [0.0, pytest.approx(8.5), pytest.approx(16.0)]
    assert pts[1].bytes_sent == rounds[0].bytes_sent and pts[2].mean_accuracy == pytest.approx(0.5)
    other = [CurvePoint("fmq", 1, 1 / 3, {"social_iqa": 0.1}, 7)]  # a domain missing: empty cell
    path = tmp_path / "tta.csv"
    write_csv(path, pts + other)
    back = read_csv(path)
    # No held-out loss given: NaN, which compares unequal to itself.
    assert all(math.isnan(p.loss) for p in back)
    assert [dataclasses.replace(p, loss=0.0) for p in back] == [dataclasses.replace(p, loss=0.0) for p in pts + other]
    header = path.read_text().splitlines()[0]
    assert header == "method,round,time_s,bytes_sent,eval_loss,acc_mean,acc:social_iqa,acc:winowhy"
    assert list(group_by_method(back)) == ["flux", "fmq"]


def test_plot_curves_writes_a_png(tmp_path):
    series = _series()
    path = tmp_path / "tta.png"
    plot_curves(series, path, tta_target(series))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loss_target_is_reached_from_above():
    series = _series()
    for name, losses in {"flux": [3.0, 2.0, 1.2, 1.0], "fedavg-lora": [3.0, 2.5, 2.0, 1.04], "fmes": [3.0] * 4}.items():
        for p, loss in zip(series[name], losses):
            p.loss = loss
    target = tta_target(series, 0.95, metric="loss")
    # Lower is better: best final loss 1.0 (flux) / 0.95.
    assert target.metric == "loss" and target.value == pytest.approx(1.0 / 0.95)
    assert "held-out loss <=" in target.statement and "flux, round 3: 1.0000" in target.statement
    assert time_to_accuracy(series["flux"], target.value, "loss") == (30, 3)
    assert time_to_accuracy(series["fedavg-lora"], target.value, "loss") == (75, 3)
    assert time_to_accuracy(series["fmes"], target.value, "loss") is None
    assert speedups(series, target.value, metric="loss")["fedavg-lora"].value == pytest.approx(2.5)
    table = tta_table(series, target)
    assert "| final loss | best loss |" in table and "| flux | 1.0000 | 1.0000 |" in table
    with pytest.raises(ValueError, match="metric must be one of"):
        tta_target(series, metric="perplexity")
