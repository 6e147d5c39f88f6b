"""The record every data helper exchanges, its JSONL form, and validation with file/line context."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from flux_engine.cache import sha256_file
from flux_engine.fileio import atomic_write


def stable_seed(*parts: object) -> int:
    """A 64-bit seed from ``parts`` that, unlike ``hash()``, is the same in every process."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")


@dataclass(frozen=True)
class Record:
    """One example. Multiple-choice records have ``choices`` and ``target`` (index into ``choices``);
    generative records have ``targets`` (every accepted answer). ``context`` is the full prompt, answer
    prefix included, so ``context + answer`` is the text a model should produce."""

    id: str
    task: str
    subtask: Optional[str]
    domain: str
    context: str
    choices: Optional[Tuple[str, ...]] = None
    target: Optional[int] = None
    targets: Optional[Tuple[str, ...]] = None

    @property
    def is_multiple_choice(self) -> bool:
        return self.choices is not None

    @property
    def answer(self) -> str:
        """The reference continuation: the correct choice, or the first accepted answer."""
        if self.choices is not None:
            return self.choices[self.target]
        return self.targets[0]

    @property
    def source(self) -> str:
        """``task/subtask`` (or ``task``): the natural sub-source the record was drawn from."""
        return f"{self.task}/{self.subtask}" if self.subtask else self.task

    def to_dict(self) -> dict:
        out: dict = {
            "id": self.id,
            "task": self.task,
            "subtask": self.subtask,
            "domain": self.domain,
            "context": self.context,
        }
        if self.choices is not None:
            out["choices"] = list(self.choices)
            out["target"] = self.target
        else:
            out["targets"] = list(self.targets)
        return out

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> "Record":
        """Validates ``obj``; every error is a ValueError that starts with ``where`` (file and line)."""

        def bad(msg: str) -> ValueError:
            return ValueError(f"{where}: {msg}")

        if not isinstance(obj, Mapping):
            raise bad(f"expected a JSON object, got {type(obj).__name__}")
        for key in ("id", "task", "domain", "context"):
            if not isinstance(obj.get(key), str):
                raise bad(f"field {key!r} is missing or not a string")
        subtask = obj.get("subtask")
        if subtask is not None and not isinstance(subtask, str):
            raise bad("field 'subtask' must be a string or null")
        common = dict(id=obj["id"], task=obj["task"], subtask=subtask, domain=obj["domain"], context=obj["context"])
        if "choices" in obj:
            choices, target = obj["choices"], obj.get("target")
            if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
                raise bad("field 'choices' must be a non-empty list of strings")
            # bool is an int subclass; a JSON true is never a valid index.
            if not isinstance(target, int) or isinstance(target, bool) or not 0 <= target < len(choices):
                raise bad(f"target {target!r} is not an index into {len(choices)} choices")
            return cls(**common, choices=tuple(choices), target=target)
        targets = obj.get("targets")
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
            raise bad("needs 'choices' + 'target' or a non-empty list of strings 'targets'")
        return cls(**common, targets=tuple(targets))


def read_jsonl(path: os.PathLike) -> List[Record]:
    """Reads and validates a JSONL file of records; a bad line raises ValueError naming file and line."""
    path = Path(path)
    records = []
    # Bytes, decoded line by line: a text-mode file raises UnicodeDecodeError with no line number.
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path} line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad = raw[e.start : e.start + 1]
                raise ValueError(f"{where}: not valid UTF-8 (byte {e.start + 1} of the line is {bad!r})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
            records.append(Record.from_dict(obj, where))
    return records


def read_task_files(paths: Iterable[os.PathLike]) -> List[Record]:
    """Records of the JSONL files in order; a record in two files (a task and one of its subtasks) is kept once."""
    return list({r.id: r for path in paths for r in read_jsonl(path)}.values())


def write_jsonl(path: os.PathLike, records: Iterable[Record]) -> None:
    """Writes ``records`` one JSON object per line, atomically."""

    def write(f) -> None:
        for rec in records:
            f.write(json.dumps(rec.to_dict(), ensure_ascii=False) + "\n")

    atomic_write(Path(path), write)


def _read_manifest(path: Path, source: Mapping[str, Any]) -> dict:
    """The manifest at ``path``, or a fresh one when it is missing, unreadable or written for another ``source``."""
    fresh = {**source, "tasks": {}}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return fresh
    if any(manifest.get(k) != v for k, v in source.items()):
        return fresh
    return manifest


def _is_cached(folder: Path, entry: Optional[dict]) -> bool:
    if not entry:
        return False
    path = folder / entry["file"]
    return path.is_file() and sha256_file(path) == entry["sha256"]


def cached_task_files(
    folder: Path,
    tasks: Sequence[str],
    source: Mapping[str, Any],
    build: Callable[[List[str]], Dict[str, List[Record]]],
) -> Dict[str, Path]:
    """JSONL file of each task name in ``folder``, built by ``build(missing names) -> {name: records}`` unless
    ``folder/manifest.json`` records it with a sha256 the file still has. ``source`` (the archive's name, sha256
    and the record format version) is stored in the manifest; a manifest of another source is discarded, so a
    new archive or format rebuilds every file."""
    names = list(dict.fromkeys(tasks))
    folder.mkdir(parents=True, exist_ok=True)
    manifest_path = folder / "manifest.json"
    manifest = _read_manifest(manifest_path, source)
    todo = [n for n in names if not _is_cached(folder, manifest["tasks"].get(n))]
    if todo:
        for name, records in build(todo).items():
            file = name.replace("/", "__") + ".jsonl"
            write_jsonl(folder / file, records)
            manifest["tasks"][name] = {"file": file, "sha256": sha256_file(folder / file), "records": len(records)}
        atomic_write(manifest_path, lambda f: json.dump(manifest, f, indent=1, sort_keys=True))
    return {n: folder / manifest["tasks"][n]["file"] for n in names}
