"""flux_engine.data on a miniature BIG-bench archive built here (never a download), synthetic records, a
character-level tokenizer and fake models whose choice probabilities are known."""

import dataclasses
import hashlib
import io
import json
import math
import subprocess
import tarfile

import pytest
import torch
from torch import nn

from flux_engine.cache import DownloadError, PyPIFile, fetch, pip_download
from flux_engine.data import (
    BIGBENCH,
    Record,
    bigbench,
    choice_logprobs,
    exact_match,
    extract_tasks,
    fetch_archive,
    lm_batches,
    load_tasks,
    multiple_choice_accuracy,
    packs_choices,
    normalize_answer,
    partition,
    read_jsonl,
    token_f1,
    train_test_split,
)

ROOT = BIGBENCH.tasks_root

SOCIAL_IQA = {
    "name": "social_iqa",
    "append_choices_to_input": True,
    "examples": [
        {"input": f"Question {i}?", "target_scores": {"wrong one": 0, f"right {i}": 1, "wrong two": 0}}
        for i in range(6)
    ],
}
WIKIHOW_SUBTASKS = {
    "goal_inference": {
        "name": "goal_inference",
        "task_prefix": "Pick a goal.\n",
        "example_input_prefix": "\nGoal: ",
        "example_output_prefix": "\nAnswer: ",
        "append_choices_to_input": False,
        "examples": [{"input": f"step {i}", "target_scores": {"a": 0, "b": 1}} for i in range(4)],
    },
    "step_ordering": {
        "name": "step_ordering",
        "examples": [{"input": f"order {i}", "target_scores": {"first": 1, "second": 0}} for i in range(3)],
    },
}
TOPICAL_CHAT = {
    "name": "topical_chat",
    "examples": [{"input": "agent_A: hi", "target": "hello"}, {"input": "agent_A: bye", "target": ["ciao", "bye"]}],
}


def _squad(prefix, n):
    """A SQuAD-format file: one article, one paragraph, ``n`` questions (whitespace to be stripped)."""
    qas = [
        {"id": f"{prefix}{i}", "question": f" Who {i}? ", "answers": [{"text": f" Ann {i}", "answer_start": 0}]}
        for i in range(n)
    ]
    paragraph = {"context": " Ann lives. ", "qas": qas}
    return {"version": "1.0", "data": [{"title": prefix.upper(), "paragraphs": [paragraph]}]}


def _archive_files():
    files = {
        "bigbench-1.0.0/README.md": "not a task",
        f"{ROOT}/social_iqa/task.json": SOCIAL_IQA,
        f"{ROOT}/goal_step_wikihow/task.json": {"name": "goal_step_wikihow"},
        f"{ROOT}/topical_chat/task.json": TOPICAL_CHAT,
        f"{ROOT}/squad_shifts/task.py": "# programmatic",
        f"{ROOT}/squad_shifts/nyt_v1.0.json": _squad("nyt", 3),
        f"{ROOT}/squad_shifts/nyt_v1.0_removed.json": {"removed": {"nyt0": ["x"]}},
        f"{ROOT}/squad_shifts/reddit_v1.0.json": _squad("reddit", 2),
    }
    for sub, task in WIKIHOW_SUBTASKS.items():
        files[f"{ROOT}/goal_step_wikihow/{sub}/task.json"] = task
    return files


def _write_archive(path, files):
    """A tar.gz with BIG-bench's layout; returns its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, content in files.items():
            data = (content if isinstance(content, str) else json.dumps(content)).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("FLUX_ENGINE_CACHE", str(root))
    return root


def _no_download(spec, dest):
    raise AssertionError("tests never download")


@pytest.fixture
def spec(cache):
    """The miniature archive in the cache, and the spec that pins its sha256."""
    sha = _write_archive(cache / "bigbench" / BIGBENCH.filename, _archive_files())
    return dataclasses.replace(BIGBENCH, sha256=sha)


# ------------------------------------------------------------------------------------- extraction and cache


def test_extracts_tasks_into_jsonl_with_manifest(spec, cache):
    paths = extract_tasks(["social_iqa", "goal_step_wikihow", "topical_chat", "squad_shifts"], spec, _no_download)
    folder = cache / "bigbench" / spec.extract_dirname
    assert all(p.parent == folder for p in paths.values())
    manifest = json.loads((folder / "manifest.json").read_text())
    for name, path in paths.items():
        entry = manifest["tasks"][name]
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry["records"] == len(path.read_text().splitlines())

    social = read_jsonl(paths["social_iqa"])
    assert [r.id for r in social] == [f"social_iqa/{i:06d}" for i in range(6)]
    for i, r in enumerate(social):
        assert (r.task, r.subtask, r.domain) == ("social_iqa", None, "social_iqa")
        assert sorted(r.choices) == sorted(SOCIAL_IQA["examples"][i]["target_scores"])
        assert r.answer == f"right {i}"
        listing = "".join("\n  choice: " + c for c in r.choices)  # BIG-bench's defaults
        assert r.context == f"\nQ: Question {i}?{listing}\nA: "
    # The correct choice is always second in the file; the seeded shuffle must move it around.
    assert len({r.target for r in social}) > 1

    wikihow = read_jsonl(paths["goal_step_wikihow"])
    assert [r.subtask for r in wikihow] == ["goal_inference"] * 4 + ["step_ordering"] * 3
    assert wikihow[0].context == "Pick a goal.\n\nGoal: step 0\nAnswer: " and wikihow[0].answer == "b"
    assert wikihow[4].answer == "first"

    chat = read_jsonl(paths["topical_chat"])
    assert [r.targets for r in chat] == [("hello",), ("ciao", "bye")] and not chat[0].is_multiple_choice

    squad = read_jsonl(paths["squad_shifts"])  # the *_removed.json file is not a sub-source
    assert [r.subtask for r in squad] == ["nyt"] * 3 + ["reddit"] * 2
    assert squad[0].context == "Title: NYT\nBackground: Ann lives.\nQ: Who 0?\nA: "
    assert squad[0].targets == ("Ann 0",)

    # A subtask on its own, and load_tasks keeping a record named twice only once.
    assert len(load_tasks(["goal_step_wikihow/step_ordering"], spec, _no_download)) == 3
    assert len(load_tasks(["goal_step_wikihow", "goal_step_wikihow/step_ordering"], spec, _no_download)) == 7


def test_cache_is_reused_and_repaired(spec, monkeypatch):
    first = extract_tasks(["social_iqa"], spec, _no_download)["social_iqa"]
    content = first.read_bytes()

    def no_archive(*args):
        raise AssertionError("the archive must not be read when the cache is complete")

    with monkeypatch.context() as m:
        m.setattr(bigbench, "fetch_archive", no_archive)
        assert extract_tasks(["social_iqa"], spec, _no_download)["social_iqa"] == first

    first.write_text(first.read_text().replace("right", "RIGHT"))  # tampered: sha256 no longer matches
    assert extract_tasks(["social_iqa"], spec, _no_download)["social_iqa"].read_bytes() == content


def test_unknown_or_programmatic_task_is_an_error(spec):
    with pytest.raises(ValueError, match="no examples found for \\['not_a_task'\\]"):
        extract_tasks(["social_iqa", "not_a_task"], spec, _no_download)


def test_cached_archive_with_wrong_sha256_is_rejected(spec):
    wrong = dataclasses.replace(spec, sha256="0" * 64)
    with pytest.raises(ValueError, match="sha256 mismatch .*expected 0{64}, got " + spec.sha256):
        extract_tasks(["social_iqa"], wrong, _no_download)


def test_download_is_verified_and_atomic(cache, tmp_path):
    good = tmp_path / "good.tar.gz"
    spec = dataclasses.replace(BIGBENCH, sha256=_write_archive(good, _archive_files()))
    folder = cache / "bigbench"

    def corrupt(spec, dest):
        (dest / spec.filename).write_bytes(b"truncated")

    def interrupted(spec, dest):
        (dest / spec.filename).write_bytes(good.read_bytes()[:100])
        raise KeyboardInterrupt

    with pytest.raises(ValueError, match="sha256 mismatch"):
        fetch_archive(spec, corrupt)
    with pytest.raises(KeyboardInterrupt):
        fetch_archive(spec, interrupted)
    assert list(folder.iterdir()) == []  # neither a file under the final name nor temporary leftovers

    calls = []

    def fine(spec, dest):
        calls.append(dest)
        (dest / spec.filename).write_bytes(good.read_bytes())

    assert fetch_archive(spec, fine).read_bytes() == good.read_bytes()
    fetch_archive(spec, fine)
    assert len(calls) == 1 and [p.name for p in folder.iterdir()] == [spec.filename]


def test_fetch_reports_a_missing_download_and_logs_progress(cache, monkeypatch):
    wheel = PyPIFile("pkg==1.0", "pkg-1.0-py3-none-any.whl", hashlib.sha256(b"wheel").hexdigest())
    assert wheel.binary and not BIGBENCH.binary

    with pytest.raises(DownloadError, match="download of pkg==1.0 produced no pkg-1.0-py3-none-any.whl"):
        fetch(wheel, "pkgs", lambda spec, dest: None)
    assert list((cache / "pkgs").iterdir()) == []

    messages = []
    path = fetch(wheel, "pkgs", lambda spec, dest: (dest / spec.filename).write_bytes(b"wheel"), messages.append)
    assert path == cache / "pkgs" / wheel.filename and path.read_bytes() == b"wheel"
    assert messages == [f"downloading pkg==1.0 into {cache / 'pkgs'} ...", f"{wheel.filename}: sha256 verified"]

    # pip is asked for the wheel or the sdist as the file name says; its failure is a DownloadError.
    argv = []

    def fake_run(cmd, **kwargs):
        argv.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, stderr="no index")

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(DownloadError, match="pip download of pkg==1.0 failed \\(exit 1\\):\nno index"):
        pip_download(wheel, cache)
    with pytest.raises(DownloadError, match="pip download of bigbench==1.0.0 failed"):
        pip_download(BIGBENCH, cache)
    assert [cmd[3:7] for cmd in argv] == [
        ["download", "--no-deps", "--only-binary", ":all:"],
        ["download", "--no-deps", "--no-binary", ":all:"],
    ]


def test_pip_download_retries_with_an_older_pip_when_a_direct_url_is_refused(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        if len(calls) == 1:  # this pip refuses the sdist
            return subprocess.CompletedProcess(cmd, 1, stderr="... has a dependency on a direct URL ...")
        if len(calls) == 2:  # the older pip's wheel
            wheels = tmp_path / "pip-wheel"
            wheels.mkdir()
            (wheels / "pip-26.2.1-py3-none-any.whl").write_bytes(b"")
            return subprocess.CompletedProcess(cmd, 0, stderr="")
        (tmp_path / BIGBENCH.filename).write_bytes(b"sdist")
        return subprocess.CompletedProcess(cmd, 0, stderr="")

    monkeypatch.setattr(subprocess, "run", fake_run)
    pip_download(BIGBENCH, tmp_path)
    assert "pip==26.2.1" in calls[1]
    assert calls[2][1] == str(tmp_path / "pip-wheel" / "pip-26.2.1-py3-none-any.whl" / "pip")
    assert calls[2][2:] == calls[0][3:] and (tmp_path / BIGBENCH.filename).read_bytes() == b"sdist"


GOOD = {"id": "t/0", "task": "t", "subtask": None, "domain": "t", "context": "Q", "choices": ["a", "b"], "target": 1}


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"id": "t/2", "task": ', "invalid JSON"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "context"}), "'context' is missing"),
        (json.dumps({**GOOD, "target": 2}), "target 2 is not an index into 2 choices"),
        (json.dumps({**GOOD, "target": True}), "target True is not an index"),
        (json.dumps({**GOOD, "choices": []}), "'choices' must be a non-empty list"),
        (json.dumps({k: v for k, v in GOOD.items() if k not in ("choices", "target")}), "list of strings 'targets'"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_malformed_jsonl_record_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + line + "\n")
    with pytest.raises(ValueError, match=f"bad.jsonl line 3: .*{message}"):
        read_jsonl(path)


def test_non_utf8_jsonl_names_file_and_line(tmp_path):
    """Latin-1 bytes used to raise a bare UnicodeDecodeError, without file or line."""
    path = tmp_path / "latin1.jsonl"
    latin1 = json.dumps({**GOOD, "context": "café"}, ensure_ascii=False).encode("latin-1")
    path.write_bytes((json.dumps(GOOD) + "\n").encode() * 2 + latin1)
    with pytest.raises(ValueError, match=r"latin1.jsonl line 3: not valid UTF-8 \(byte \d+ of the line is b'\\xe9'\)"):
        read_jsonl(path)
    assert len(read_jsonl(_write(tmp_path / "ok.jsonl", (json.dumps(GOOD) + "\r\n") * 2))) == 2  # CRLF files too


def _write(path, text):
    path.write_bytes(text.encode())
    return path


@pytest.mark.parametrize(
    "task_json, message",
    [
        ('{"examples": [', "invalid JSON"),
        (
            {"examples": [{"input": "x", "target": "y"}, {"input": "x", "target_scores": {}}]},
            "example 1: 'target_scores' must be a non-empty object",
        ),
        ({"examples": [{"input": "x", "target_scores": {"a": 0, "b": 0}}]}, "example 0: no choice scores higher"),
        ({"examples": [{"target": "y"}]}, "example 0: needs a string 'input'"),
        ({"examples": [{"input": "x", "target": []}]}, "example 0: needs 'choices'"),
    ],
)
def test_malformed_task_json_names_member_and_example(cache, task_json, message):
    member = f"{ROOT}/broken/task.json"
    sha = _write_archive(cache / "bigbench" / BIGBENCH.filename, {member: task_json})
    with pytest.raises(ValueError, match=f"{member}.*{message}"):
        extract_tasks(["broken"], dataclasses.replace(BIGBENCH, sha256=sha), _no_download)


# ------------------------------------------------------------------------------------ splits and partitions


def _records(domains, per_source, subtasks=(None,)):
    return [
        Record(f"{d}/{s}/{i}", d, s, d, f"ctx {i}", choices=("a", "b"), target=i % 2)
        for d in domains
        for s in subtasks
        for i in range(per_source)
    ]


def test_train_test_split_is_disjoint_deterministic_and_per_task():
    records = _records(["a", "b"], 20, subtasks=("x", "y"))
    train, test = train_test_split(records, test_size=0.25, seed=1)
    assert {r.id for r in train}.isdisjoint({r.id for r in test})
    assert len(train) + len(test) == len(records)
    assert all(sum(r.source == src for r in test) == 5 for src in ("a/x", "a/y", "b/x", "b/y"))
    assert (train, test) == train_test_split(list(reversed(records)), test_size=0.25, seed=1)
    assert test != train_test_split(records, test_size=0.25, seed=2)[1]
    # A task's held-out records do not depend on which other tasks were loaded with it.
    only_a = train_test_split([r for r in records if r.task == "a"], test_size=0.25, seed=1)[1]
    assert only_a == [r for r in test if r.task == "a"]
    assert len(train_test_split(records, test_size=3)[1]) == 12
    with pytest.raises(ValueError, match="unique"):
        train_test_split(records + records[:1])


def _check_partition(clients, records):
    assert all(clients)
    ids = [r.id for c in clients for r in c]
    assert sorted(ids) == sorted(r.id for r in records)


def test_partition_domain_and_natural():
    records = _records(["a", "b", "c"], 8, subtasks=("x", "y"))
    clients = partition(records, 6, "domain", seed=0)
    _check_partition(clients, records)
    assert [{r.domain for r in c} for c in clients] == [{"a"}, {"b"}, {"c"}] * 2
    assert [len(c) for c in clients] == [8] * 6
    with pytest.raises(ValueError, match="3 groups do not fit 2 clients"):
        partition(records, 2, "domain")

    natural = partition(records, 6, "natural", seed=0)
    _check_partition(natural, records)
    assert sorted(next(iter({r.source for r in c})) for c in natural) == ["a/x", "a/y", "b/x", "b/y", "c/x", "c/y"]
    assert all(len({r.source for r in c}) == 1 for c in natural)
    with pytest.raises(ValueError, match="unknown scheme"):
        partition(records, 3, "iid")


def _mean_top_share(clients):
    shares = []
    for c in clients:
        counts = [sum(r.domain == d for r in c) for d in {r.domain for r in c}]
        shares.append(max(counts) / len(c))
    return sum(shares) / len(shares)


def test_partition_dirichlet_deterministic_nonempty_and_skewed_by_alpha():
    records = _records(["a", "b", "c", "d"], 100)
    clients = partition(records, 8, "dirichlet", alpha=0.5, seed=3)
    _check_partition(clients, records)
    assert clients == partition(list(reversed(records)), 8, "dirichlet", alpha=0.5, seed=3)
    assert clients != partition(records, 8, "dirichlet", alpha=0.5, seed=4)
    skewed = [partition(records, 8, "dirichlet", alpha=0.01, seed=s) for s in range(5)]
    mixed = [partition(records, 8, "dirichlet", alpha=100.0, seed=s) for s in range(5)]
    for parts in skewed + mixed:
        _check_partition(parts, records)
    assert sum(map(_mean_top_share, skewed)) / 5 > 0.9
    assert sum(map(_mean_top_share, mixed)) / 5 < 0.5
    # More clients than a skewed draw can feed: empty clients still get a record.
    _check_partition(partition(records[:20], 20, "dirichlet", alpha=0.01, seed=0), records[:20])


# ------------------------------------------------------------------------------------------- evaluation


class CharTokenizer:
    """One token per character (its code point, < 128). The minimal interface flux_engine.data relies on."""

    def __init__(self, pad_token_id=0):
        self.pad_token_id = pad_token_id
        self.eos_token_id = 3

    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]


class FirstTokenEcho(nn.Module):
    """Predicts, at every position, the first token of its row; records the attention masks it sees."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.masks = []

    def forward(self, input_ids, attention_mask=None):
        self.masks.append(attention_mask.clone())
        return torch.nn.functional.one_hot(input_ids[:, :1], 128).float().expand(*input_ids.shape, 128) * 10


def test_multiple_choice_accuracy_picks_the_likeliest_choice():
    def mc(ctx, target):
        return Record(f"r/{ctx}", "r", None, "r", ctx, choices=("a", "b", "c"), target=target)

    # The echo model favours the choice equal to the context's first character; the last record's target
    # disagrees, so exactly 3 of 4 are right. Contexts of different length make the batches padded.
    records = [mc("b?", 1), mc("c???????", 2), mc("a? ", 0), mc("a?", 2)]
    model = FirstTokenEcho().train()
    tok = CharTokenizer()
    assert multiple_choice_accuracy(model, tok, records, batch_size=5) == pytest.approx(0.75)
    assert model.training  # put back in its mode
    mask = torch.cat([m for m in model.masks if m.shape[1] == 9])
    assert mask.sum(1).tolist()[:3] == [9, 9, 9] and (mask == 0).any()  # right-padded, masked
    one = choice_logprobs(model, tok, records, batch_size=1)
    torch.testing.assert_close(torch.tensor(one), torch.tensor(choice_logprobs(model, tok, records, batch_size=5)))
    assert one[2][0] > one[2][1]  # "a? ": the space moves into the choice and is scored too


class FixedDistribution(nn.Module):
    """Context-free next-token distribution: p('x') = 0.6, p('y') = 0.13, the rest spread evenly."""

    def __init__(self):
        super().__init__()
        probs = torch.full((128,), 0.27 / 126)
        probs[ord("x")], probs[ord("y")] = 0.6, 0.13
        self.register_buffer("log_probs", probs.log())

    def forward(self, input_ids, attention_mask=None):
        return self.log_probs.expand(*input_ids.shape, 128)


def test_sum_and_mean_normalisation_differ_when_lengths_differ():
    record = Record("r/0", "r", None, "r", "Q:", choices=("y", "x" * 8), target=1)
    model, tok = FixedDistribution(), CharTokenizer()
    (total,) = choice_logprobs(model, tok, [record], normalize="sum")
    (mean,) = choice_logprobs(model, tok, [record], normalize="mean")
    assert total == pytest.approx([math.log(0.13), 8 * math.log(0.6)], rel=1e-5)
    assert mean == pytest.approx([math.log(0.13), math.log(0.6)], rel=1e-5)
    assert multiple_choice_accuracy(model, tok, [record], normalize="sum") == 0.0  # short choice wins
    assert multiple_choice_accuracy(model, tok, [record], normalize="mean") == 1.0
    with pytest.raises(ValueError, match="not multiple-choice"):
        choice_logprobs(model, tok, [Record("g", "g", None, "g", "Q", targets=("a",))])


def _small_moe():
    from flux_engine import MoEConfig, MoEForCausalLM

    torch.manual_seed(0)
    config = MoEConfig(
        vocab_size=128,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=2,
        intermediate_size=64,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
    )
    return MoEForCausalLM(config)


def test_padding_does_not_change_scores_of_a_real_moe_model():
    model = _small_moe()
    records = [
        Record(f"r/{i}", "r", None, "r", "Question " * (i + 1), choices=("yes", "no", "maybe not"), target=0)
        for i in range(4)
    ]
    for packed in (False, True):
        one = choice_logprobs(model, CharTokenizer(), records, batch_size=1, normalize="mean", packed=packed)
        many = choice_logprobs(model, CharTokenizer(), records, batch_size=12, normalize="mean", packed=packed)
        torch.testing.assert_close(torch.tensor(one), torch.tensor(many), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("normalize", ["sum", "mean"])
@pytest.mark.parametrize("max_length", [None, 12])
def test_packed_choices_score_as_one_sequence_per_choice(normalize, max_length):
    """The context encoded once with every choice behind it (the MoE model's packed path) gives the scores of one
    padded sequence per (record, choice): contexts of many lengths, cut by max_length, an empty one, 2-4 choices
    of different lengths."""
    model = _small_moe()
    assert packs_choices(model) and not packs_choices(FixedDistribution())
    contexts = ["", "Q: ", "Is it? ", "A much longer question, cut by max_length? ", "Why"]
    # The last choice of the fourth set is longer than max_length: it is cut to its first 11 tokens.
    choices = [("yes", "no"), ("a", "bb", "ccc", "dddd"), ("maybe not", "x"), ("one", "two", "six", "y" * 20)]
    records = [Record(f"r/{i}", "r", None, "r", c, choices=choices[i % 4], target=0) for i, c in enumerate(contexts)]
    pairwise = choice_logprobs(model, CharTokenizer(), records, 3, normalize, max_length, packed=False)
    packed = choice_logprobs(model, CharTokenizer(), records, 2, normalize, max_length, packed=True)
    assert [len(s) for s in packed] == [len(r.choices) for r in records]
    torch.testing.assert_close(torch.tensor(sum(packed, [])), torch.tensor(sum(pairwise, [])), atol=1e-5, rtol=1e-5)
    assert choice_logprobs(model, CharTokenizer(), records, 2, normalize, max_length) == packed  # the default


def test_works_with_a_transformers_tokenizer():
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[PAD]": 0, "[EOS]": 1, "[UNK]": 2, "Q:": 3, "cat": 4, "dog": 5}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", eos_token="[EOS]")
    record = Record("r/0", "r", None, "r", "Q: ", choices=("cat", "dog"), target=1)
    assert choice_logprobs(FixedDistribution(), tok, [record]) == [[pytest.approx(math.log(0.27 / 126))] * 2]
    (batch,) = lm_batches([record], tok, seq_len=4, batch_size=1)
    assert batch["input_ids"].tolist() == [[3, 5, 1, 0]] and batch["labels"].tolist() == [[3, 5, 1, -100]]


def test_exact_match_and_token_f1():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert exact_match("the cat", ["A cat.", "dog"]) == 1.0
    assert exact_match("cat sat", "cat") == 0.0
    assert token_f1("cat sat", "the cat sat down") == pytest.approx(0.8)  # P = 2/2, R = 2/3
    assert token_f1("cat cat", ["cat", "dog cat cat"]) == pytest.approx(0.8)  # best reference: P = 1, R = 2/3
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("the", "a") == 1.0  # both normalise to nothing
    with pytest.raises(ValueError):
        token_f1("cat", [])


# ------------------------------------------------------------------------------------------- LM batches


def test_lm_batches_padded_rows_mask_padding():
    records = [Record(f"r/{i}", "r", None, "r", "ab" * i + "?", targets=("Z",)) for i in range(5)]
    tok = CharTokenizer(pad_token_id=None)  # padding falls back to EOS, whose real occurrences stay labelled
    batches = list(lm_batches(records, tok, seq_len=8, batch_size=2, seed=0, packed=False))
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    # No column of padding only: each batch is as wide as its longest row.
    assert [b["input_ids"].shape[1] for b in batches] == [int(b["attention_mask"].sum(1).max()) for b in batches]
    rows = []
    for b in batches:
        ids, labels, mask = b["input_ids"], b["labels"], b["attention_mask"]
        assert ids.dtype == labels.dtype == torch.long
        assert (labels[mask == 0] == -100).all() and torch.equal(labels[mask == 1], ids[mask == 1])
        rows += [r[m.bool()].tolist() for r, m in zip(ids, mask, strict=True)]
    assert all(r[-1] == 3 for r in rows)
    # Too long for 8 tokens (i = 3, 4): the start is dropped, the answer and EOS kept.
    texts = sorted("".join(map(chr, r[:-1])) for r in rows)
    assert texts == ["?Z", "ab?Z", "abab?Z", "babab?Z", "babab?Z"]


def test_lm_batches_bucketed_rows_carry_less_padding():
    records = [Record(f"r/{i}", "r", None, "r", "ab" * (i % 7) + "?", targets=("Z",)) for i in range(32)]
    tok = CharTokenizer()

    def rows_and_padding(**kw):
        batches = list(lm_batches(records, tok, seq_len=16, batch_size=4, seed=0, packed=False, **kw))
        rows = sorted(r[m.bool()].tolist() for b in batches for r, m in zip(b["input_ids"], b["attention_mask"]))
        return rows, sum(int((b["attention_mask"] == 0).sum()) for b in batches)

    (plain, plain_pad), (bucketed, bucketed_pad) = rows_and_padding(), rows_and_padding(bucket=True)
    assert bucketed == plain and bucketed_pad < plain_pad


def test_lm_batches_packed_stream():
    records = [Record(f"r/{i}", "r", None, "r", "x" * i, choices=("p", "q"), target=i % 2) for i in range(1, 8)]
    tok = CharTokenizer()
    batches = list(lm_batches(records, tok, seq_len=6, batch_size=3, seed=5))
    total = sum(i + 2 for i in range(1, 8))  # context + answer + EOS
    ids = torch.cat([b["input_ids"] for b in batches])
    mask = torch.cat([b["attention_mask"] for b in batches])
    assert ids.shape == (math.ceil(total / 6), 6) and int(mask.sum()) == total
    assert mask[:-1].all() and (torch.cat([b["labels"] for b in batches])[mask == 0] == -100).all()
    assert int((ids[mask == 1] == 3).sum()) == 7  # one EOS per document
    again = torch.cat([b["input_ids"] for b in lm_batches(records, tok, seq_len=6, batch_size=3, seed=5)])
    other = torch.cat([b["input_ids"] for b in lm_batches(records, tok, seq_len=6, batch_size=3, seed=6)])
    assert torch.equal(ids, again) and not torch.equal(ids, other)
