"""The record every data helper exchanges, its JSONL form, and validation with file/line context."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, List, Mapping, Optional, Tuple

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


def write_jsonl(path: os.PathLike, records: Iterable[Record]) -> None:
    """Writes ``records`` one JSON object per line, atomically."""

    def write(f) -> None:
        for rec in records:
            f.write(json.dumps(rec.to_dict(), ensure_ascii=False) + "\n")

    atomic_write(Path(path), write)
