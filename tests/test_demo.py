"""The accuracy curve of ``flux-engine demo``: evaluation math (``flux_engine.evaluation``), per-domain accuracy through
the federated evaluate round (round 0 included, kept across a resume), and the CSV / PNG the demo writes, on the
tiny model with multiple-choice records of two domains. The demo itself (SmolLM2, minutes) is ``make demo``."""

import csv
import math

import pytest
import torch

pytest.importorskip("flwr")  # the federated layer runs on Flower; the GPU image has none

from flux_engine import evaluation  # noqa: E402
from flux_engine.data import Record, write_jsonl  # noqa: E402
from flux_engine.federated.config import RunConfig  # noqa: E402
from flux_engine.federated.simulation import run_local  # noqa: E402


def test_pooling():
    assert evaluation.pool_loss([(2.0, 10), (4.0, 30), (float("nan"), 0)]) == (3.5, 40)
    assert math.isnan(evaluation.pool_loss([])[0])
    pooled = evaluation.pool_accuracy([{"a": (0.5, 10)}, {"a": (1.0, 30), "b": (0.25, 4)}])
    assert pooled == {"a": (0.875, 40), "b": (0.25, 4)}
    # Every domain counts once in the mean, whatever its number of records.
    assert evaluation.mean_accuracy({d: acc for d, (acc, _) in pooled.items()}) == 0.5625


def test_bands_and_mcnemar():
    assert evaluation.binomial_band(0.5, 100) == pytest.approx(1.96 * 0.05)
    # Two domains of 100 records at 0.5: the mean's standard error is 0.05 / sqrt(2).
    assert evaluation.mean_band({"a": (0.5, 100), "b": (0.5, 100)}) == pytest.approx(1.96 * 0.05 / math.sqrt(2))
    assert evaluation.mcnemar_p([True] * 10, [True] * 10) == 1.0
    # 8 records flipped right, none wrong: 2 * 0.5**8.
    assert evaluation.mcnemar_p([False] * 8 + [True] * 4, [True] * 12) == pytest.approx(2 * 0.5**8)
    # 6 up, 2 down: 2 * P(X <= 2), X ~ Bin(8, 1/2) = 2 * 37 / 256.
    before = [False] * 6 + [True] * 2 + [True] * 5
    after = [True] * 6 + [False] * 2 + [True] * 5
    assert evaluation.mcnemar_p(before, after) == pytest.approx(2 * 37 / 256)
    with pytest.raises(ValueError, match="differ in length"):
        evaluation.mcnemar_p([True], [])


def _records(n: int = 40):
    """Two domains of two-choice questions whose answer a byte-level model can learn (the context ends in it)."""
    out = []
    for d, (yes, no) in {"alpha": (" yes", " no"), "beta": (" up", " down")}.items():
        for i in range(n):
            target = i % 2
            choices = [yes, no] if target == 0 else [no, yes]
            out.append(Record(f"{d}/{i:04d}", d, None, d, f"Q{i}: say{yes}?\nA:", tuple(choices), target))
    return out


def test_sample_test_records_is_seeded_per_domain():
    recs = _records()
    a = evaluation.sample_test_records(recs, ["alpha", "beta"], 5, seed=0)
    b = evaluation.sample_test_records(recs, ["alpha"], 5, seed=0)
    assert [len(v) for v in a.values()] == [5, 5] and a["alpha"] == b["alpha"]
    assert evaluation.sample_test_records(recs, ["gamma"], 5, seed=0) == {}


@pytest.fixture
def mc_run(tmp_path):
    data = tmp_path / "mc.jsonl"
    write_jsonl(data, _records())
    cfg = {
        "preset": "tiny", "num-clients": 2, "min-clients": 2, "num-rounds": 2, "budgets": "2440KiB,2560KiB",
        "workspace": "0", "lora-rank": 4, "batch-size": 4, "seq-len": 32, "samples-per-client": 8, "local-steps": 2,
        "lr": 1e-2, "data": f"jsonl:{data}", "partition": "domain", "eval-records": 4,
        "state-dir": str(tmp_path / "state"),
    }  # fmt: skip
    return cfg


def test_per_domain_accuracy_every_round_and_round_zero(mc_run):
    pytest.importorskip("flux_engine.training")
    state = run_local(RunConfig.from_mapping(mc_run))
    for report in [state.baseline, *state.history]:
        # One domain per client: each domain scored on its own client's 4 test records.
        assert report["eval_records"] == {"alpha": 4, "beta": 4}
        assert set(report["accuracy"]) == {"alpha", "beta"} and all(0 <= a <= 1 for a in report["accuracy"].values())
        assert report["accuracy_mean"] == pytest.approx(sum(report["accuracy"].values()) / 2)
        assert set(report["soft_accuracy"]) == {"alpha", "beta"} and 0 < report["soft_accuracy_mean"] < 1
        assert report["eval_loss"] > 0 and report["eval_seconds"] > 0
    # A resumed run keeps the round-0 evaluation and does not repeat it.
    resumed = run_local(RunConfig.from_mapping({**mc_run, "num-rounds": 3, "resume": True}))
    assert resumed.baseline == state.baseline and [h["round"] for h in resumed.history] == [1, 2, 3]


def test_demo_table_csv_and_png(mc_run, tmp_path):
    pytest.importorskip("flux_engine.training")
    pytest.importorskip("matplotlib")
    from flux_engine.cli import mean_accuracy_line, plot_accuracy, round_rows, write_csv

    state = run_local(RunConfig.from_mapping({**mc_run, "num-rounds": 1}))
    rows = round_rows(state)
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[0]["accepted"] == "-" and rows[1]["accepted"] == 2
    assert rows[1]["mean_acc"] == pytest.approx((rows[1]["alpha"] + rows[1]["beta"]) / 2)
    write_csv(str(tmp_path / "demo.csv"), rows)
    plot_accuracy(str(tmp_path / "demo.png"), rows, ["alpha", "beta"], state.baseline["eval_records"])
    a0, a1 = state.baseline["accuracy_mean"], state.history[-1]["accuracy_mean"]
    band = evaluation.mean_band({d: (a, 4) for d, a in state.baseline["accuracy"].items()})
    line, verdict = mean_accuracy_line(state)
    assert line == f"mean accuracy: round 0 {a0:.3f} -> round 1 {a1:.3f} (95% band +-{band:.3f})"
    assert verdict.endswith("learning shows." if a1 - a0 > band else "not more than the band.")
    assert rows[1]["mean_soft"] == state.history[-1]["soft_accuracy_mean"]
    with open(tmp_path / "demo.csv") as f:
        read = list(csv.DictReader(f))
    assert [r["round"] for r in read] == ["0", "1"] and float(read[1]["alpha"]) == rows[1]["alpha"]
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --evaluate-every 2: round 1 has no scores; the plot joins the evaluated rounds.
    skipped = [rows[0], {**rows[1], "round": 1, "alpha": math.nan, "beta": math.nan, "mean_acc": math.nan,
                         "eval_loss": math.nan}, {**rows[1], "round": 2}]  # fmt: skip
    plot_accuracy(str(tmp_path / "gap.png"), skipped, ["alpha", "beta"], state.baseline["eval_records"])
    assert (tmp_path / "gap.png").stat().st_size > 0


def test_held_out_loss_matches_the_model_loss():
    from flux_engine import MoEForCausalLM, presets

    model = MoEForCausalLM(presets.get("tiny")).eval()
    ids = torch.randint(0, 256, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    loss, tokens = evaluation.heldout_loss(model, [{"input_ids": ids, "labels": labels, "attention_mask": mask}])
    assert tokens == 11 + 7
    with torch.no_grad():
        assert loss == pytest.approx(float(model(ids, labels=labels, attention_mask=mask).loss), rel=1e-6)


def test_eval_precision_resolves_and_scores_close_to_fp32(monkeypatch):
    from flux_engine import MoEForCausalLM, presets
    from flux_engine.federated.client import ByteTokenizer

    cpu = torch.device("cpu")
    assert evaluation.resolve_precision("fp32", cpu) == "fp32" and evaluation.resolve_precision("bf16", cpu) == "bf16"
    for flags, want in ((frozenset({"avx2", "avx512_bf16"}), "bf16"), (frozenset({"amx_bf16"}), "bf16"),
                        (frozenset({"avx2", "avx512f"}), "fp32"), (frozenset(), "fp32")):  # fmt: skip
        monkeypatch.setattr(evaluation, "_cpu_flags", lambda f=flags: f)
        assert evaluation.resolve_precision("auto", cpu) == want
    with pytest.raises(ValueError, match="precision must be one of"):
        evaluation.resolve_precision("fp16", cpu)
    with pytest.raises(Exception, match="eval-precision must be one of"):
        RunConfig(eval_precision="half")

    torch.manual_seed(0)
    model = MoEForCausalLM(presets.get("tiny")).eval()
    records = _records(8)
    full = evaluation.score_records(model, ByteTokenizer(), records)
    dtypes = []
    hook = model.lm_head.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    with evaluation.eval_context("bf16", cpu):
        mixed = evaluation.score_records(model, ByteTokenizer(), records)
    hook.remove()
    # Under autocast the matmuls ran in bf16; the weights stayed fp32 and the scores stay close to fp32's.
    assert set(dtypes) == {torch.bfloat16} and model.lm_head.weight.dtype == torch.float32
    assert max(abs(a - b) for a, b in zip(full.soft, mixed.soft, strict=True)) < 0.05
    with evaluation.eval_context("fp32", cpu):
        assert evaluation.score_records(model, ByteTokenizer(), records) == full
