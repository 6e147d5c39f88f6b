"""flux-engine probe on the tiny model: base and tuned scores of one task, majority share, McNemar, the report."""

import dataclasses
import json

import pytest
import torch

from flux_engine import probe
from flux_engine.data import Record, write_jsonl


def _records(n=60):
    """A learnable two-label task: the context ends in the answer."""
    return [Record(f"t/{i:04d}", "t", None, "t", f"Q{i}: say {'yes' if i % 3 else 'no'}?\nA:", (" yes", " no"),
                   0 if i % 3 else 1) for i in range(n)]  # fmt: skip


def test_majority_share():
    recs = _records(30)
    assert probe.majority_share(recs) == pytest.approx(20 / 30)  # shared choices: by answer text
    mc = [Record(f"m/{i}", "m", None, "m", "Q", (f"a{i}", f"b{i}", f"c{i}"), i % 3 and 1) for i in range(10)]
    assert probe.majority_share(mc) == pytest.approx(6 / 10)  # varied choices: by position (1 six times)


def test_probe_task_and_report(tmp_path):
    pytest.importorskip("flux_engine.training")
    from flux_engine import MoEForCausalLM, presets
    from flux_engine.federated.client import ByteTokenizer

    data = tmp_path / "t.jsonl"
    write_jsonl(data, _records())
    torch.manual_seed(0)
    model = MoEForCausalLM(presets.get("tiny"))
    settings = probe.ProbeSettings(steps=2, batch_size=4, seq_len=32, test_records=20, train_records=16)
    result = probe.probe_task(model, ByteTokenizer(), f"jsonl:{data}", settings)
    assert result["test_records"] == 20 and result["train_records"] == 16
    flips = result["flipped"]
    changed = round((result["tuned"]["accuracy"] - result["base"]["accuracy"]) * 20)
    assert flips["wrong_to_right"] - flips["right_to_wrong"] == changed
    assert 0 < result["mcnemar_p"] <= 1 and len(result["train_loss"]) == 2

    out = tmp_path / "probe"
    out.mkdir()
    for name, p, base, tuned in (("a", 0.001, 0.2, 0.7), ("b", 0.5, 0.5, 0.45)):
        r = dict(result, task=f"olmo:{name}", mcnemar_p=p, base=dict(result["base"], accuracy=base),
                 tuned=dict(result["tuned"], accuracy=tuned))  # fmt: skip
        probe.result_path(out, r["task"]).write_text(json.dumps(r))
    for r in out.glob("*.json"):  # as probe.run records them
        r.write_text(json.dumps(dict(json.loads(r.read_text()), provenance={"commit": "abc", "device": "CPU",
                                                                            "torch": "2.13", "date": "today"})))
    text = probe.report(out)
    table = [line for line in text.splitlines() if line.startswith("| olmo:")]
    assert table[0].startswith("| olmo:a | 20 | 16 |") and table[0].endswith("| yes |")
    assert table[1].startswith("| olmo:b |") and "-0.050" in table[1] and table[1].endswith("| no |")
    assert "1 of 2 tasks gain significantly (p < 0.01): olmo:a." in text
    assert "- run at commit abc on CPU, torch 2.13" in text
    with pytest.raises(FileNotFoundError):
        probe.report(tmp_path / "empty")


def test_follow_up_scores_fresh_records(tmp_path):
    data = tmp_path / "t.jsonl"
    write_jsonl(data, _records())
    first = probe.ProbeSettings(test_records=10, train_records=100)
    train1, test1 = probe.split(f"jsonl:{data}", first)
    result = {"task": "jsonl", "settings": dataclasses.asdict(first), "test_records": len(test1)}
    later = probe.follow_up_settings(result, test_records=20)
    assert (later.test_offset, later.test_records, later.steps) == (10, 20, first.steps)
    train2, test2 = probe.split(f"jsonl:{data}", later)
    ids1, ids2 = {r.id for r in test1}, {r.id for r in test2}
    assert len(ids2) == 20 and not ids1 & ids2  # fresh test records
    assert not (ids1 | ids2) & {r.id for r in train2} and len(train2) == 30  # trained on neither test set
    with pytest.raises(ValueError, match="no held-out records after the first 60"):
        probe.split(f"jsonl:{data}", dataclasses.replace(later, test_offset=60))


def test_report_counts_follow_ups(tmp_path):
    base = {"settings": dataclasses.asdict(probe.ProbeSettings()), "test_records": 128, "train_records": 512,
            "majority_share": 0.5, "provenance": {"commit": "abc", "device": "CPU", "torch": "2.13", "date": "d"}}
    first, later = tmp_path / "first", tmp_path / "later"
    first.mkdir(), later.mkdir()

    def write(folder, task, p, acc):
        r = dict(base, task=task, mcnemar_p=p, base={"accuracy": 0.4, "band": 0.08, "soft": 0.3},
                 tuned={"accuracy": acc, "band": 0.08, "soft": 0.35})  # fmt: skip
        probe.result_path(folder, task).write_text(json.dumps(r))

    write(first, "olmo:sst2", 0.001, 0.8)  # significant at once
    write(first, "olmo:mmlu/anatomy", 0.03, 0.5)  # suggestive, confirmed below
    write(first, "olmo:csqa", 0.05, 0.45)  # suggestive, not confirmed
    write(first, "olmo:piqa", 0.04, 0.35)  # down: no follow-up
    write(first, "olmo:boolq", 0.5, 0.42)
    assert sorted(r["task"] for r in probe.suggestive(first)) == ["olmo:csqa", "olmo:mmlu/anatomy"]
    write(later, "olmo:mmlu/anatomy", 0.004, 0.5)
    assert "Suggestive, not followed up yet: olmo:csqa." in probe.report(first, followed_up=later)
    write(later, "olmo:csqa", 0.2, 0.44)
    text = probe.report(first, followed_up=later)
    assert "2 of 5 tasks gain significantly (p < 0.01, in the first probe or its follow-up): olmo:sst2, " \
           "olmo:mmlu/anatomy." in text  # fmt: skip
    assert "olmo:mmlu/anatomy gains significantly." in text
    follow = text.split("## Follow-ups")[1]
    assert "| olmo:mmlu/anatomy | 128 |" in follow and follow.count("| olmo:") == 2
