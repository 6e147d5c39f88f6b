"""flux-engine probe on the tiny model: base and tuned scores of one task, majority share, McNemar, the report."""

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
