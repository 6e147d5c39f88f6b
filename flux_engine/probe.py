"""Which tasks does the demo's model learn? For each candidate multiple-choice task: accuracy of the warm-started
model on held-out test records, LoRA on every expert for a few steps on the task's training split, accuracy on the
same records again; the majority label's share (what accuracy is when the model answers every record alike) and an
exact McNemar p-value of the paired right/wrong outcomes say whether the change is learning or noise.

    flux-engine probe --task olmo:piqa --out bench/results/probe        # one task -> probe/olmo__piqa.json
    flux-engine probe --follow-up bench/results/probe --out bench/results/probe_followup
    flux-engine probe --report bench/results/probe --followed-up bench/results/probe_followup > bench/results/tasks.md

A follow-up re-probes, on held-out records the first probe never scored, each task whose first result was
suggestive (alpha <= p < 0.1, accuracy up): its p-value is an independent test, so a screen of many tasks at a
small test size does not spend the significance level on every task twice.

One task per call (and per result file), so a long probe runs in resumable chunks: a task whose file exists is
skipped.
"""

from __future__ import annotations

import collections
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from flux_engine.data import Record, load_spec, lm_batches, train_test_split
from flux_engine.evaluation import RecordScores, binomial_band, mcnemar_p, score_records
from flux_engine.fileio import atomic_write


@dataclass(frozen=True)
class ProbeSettings:
    steps: int = 16
    lr: float = 5e-3
    rank: int = 8
    batch_size: int = 8
    seq_len: int = 128
    test_records: int = 200
    train_records: int = 512
    seed: int = 0
    test_offset: int = 0  # held-out records an earlier probe scored: skipped, so these test records are fresh


def result_path(out: os.PathLike, task: str) -> Path:
    return Path(out) / (task.replace(":", "__").replace("/", "__") + ".json")


def majority_share(records: Sequence[Record]) -> float:
    """Share of the most common label: the answer text when the task's records share one set of choices (a
    classification task), else the answer's position among the choices."""
    shared = len({tuple(sorted(r.choices)) for r in records}) == 1
    labels = collections.Counter(r.answer if shared else r.target for r in records)
    return max(labels.values()) / len(records)


def _summary(scores: RecordScores) -> Dict[str, float]:
    n = len(scores.correct)
    acc = sum(scores.correct) / n
    return {"accuracy": acc, "band": binomial_band(acc, n), "soft": sum(scores.soft) / n}


def split(task: str, settings: ProbeSettings) -> tuple:
    """``(train, test)`` multiple-choice records of a data spec: ``test_records`` per task/subtask after the first
    ``test_offset`` of its held-out order (the same records for every setting with those counts and seed), at most
    ``train_records`` of the rest (never a skipped one: they were an earlier probe's test records)."""
    records = [r for r in load_spec(task) if r.is_multiple_choice]
    if not records:
        raise ValueError(f"{task}: no multiple-choice records")
    train, held = train_test_split(records, test_size=settings.test_offset + settings.test_records, seed=settings.seed)
    seen: collections.Counter = collections.Counter()
    test = []
    for r in held:  # grouped by source, each group in its held-out order
        seen[r.source] += 1
        if seen[r.source] > settings.test_offset:
            test.append(r)
    if not test:
        raise ValueError(f"{task}: no held-out records after the first {settings.test_offset}")
    return train[: settings.train_records], test


def probe_task(model: Any, tokenizer: Any, task: str, settings: ProbeSettings) -> Dict[str, Any]:
    """Base and tuned scores of ``model`` (tuned in place: LoRA on every expert) on one task (a data spec)."""
    from flux_engine.training import TrainConfig, train_round

    train, test = split(task, settings)
    t0 = time.perf_counter()
    before = score_records(model, tokenizer, test, max_length=settings.seq_len)
    score_seconds = time.perf_counter() - t0
    batches = list(lm_batches(train, tokenizer, settings.seq_len, settings.batch_size, seed=settings.seed,
                              packed=False, answer_only=True, bucket=True))  # fmt: skip
    E = model.config.num_experts
    config = TrainConfig(mode="lora", rank=settings.rank, alpha=2.0 * settings.rank, lr=settings.lr,
                         steps=settings.steps, micro_batch_size=settings.batch_size, seed=settings.seed)  # fmt: skip
    result = train_round(model, [list(range(E))] * len(model.moe_layers()), batches, config)
    after = score_records(model, tokenizer, test, max_length=settings.seq_len)
    return {
        "task": task,
        "settings": asdict(settings),
        "train_records": len(train),
        "test_records": len(test),
        "majority_share": majority_share(test),
        "base": _summary(before),
        "tuned": _summary(after),
        "mcnemar_p": mcnemar_p(before.correct, after.correct),
        "flipped": {"right_to_wrong": sum(b and not a for b, a in zip(before.correct, after.correct)),
                    "wrong_to_right": sum(a and not b for b, a in zip(before.correct, after.correct))},  # fmt: skip
        "train_loss": [result.losses[0], result.losses[-1]] if result.losses else [],
        "seconds": {"score_base": score_seconds, "train": result.seconds, "total": time.perf_counter() - t0},
    }


def run(jobs: Sequence[Tuple[str, ProbeSettings]], out: os.PathLike, checkpoint: str) -> List[Path]:
    """Probe every ``(task, settings)`` whose task has no result file in ``out`` (each from a fresh copy of the
    checkpoint's model); returns the files written."""
    import sys

    from flux_engine import provenance
    from flux_engine.checkpoint import load_pretrained
    from flux_engine.smollm2 import load_tokenizer

    tokenizer = load_tokenizer()
    written = []
    for task, settings in jobs:
        path = result_path(out, task)
        if path.exists():
            continue
        model = load_pretrained(checkpoint)
        result = probe_task(model, tokenizer, task, settings)
        result["provenance"] = {"device": provenance.device(), "commit": provenance.commit(), **provenance.versions(),
                                "command": provenance.command_line(sys.argv), "checkpoint": checkpoint,
                                "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                time.gmtime())}  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: json.dump(result, f, indent=1))
        print(f"{task}: {result['base']['accuracy']:.3f} -> {result['tuned']['accuracy']:.3f} "
              f"(p = {result['mcnemar_p']:.2g}, majority {result['majority_share']:.2f}) -> {path}")  # fmt: skip
        written.append(path)
    return written


PAPER_BENCHMARKS = ("olmo:mmlu", "olmo:piqa", "olmo:arc")  # the paper's tasks among the candidates (prefixes)
SUGGESTIVE_P = 0.1  # a first result below this (and above alpha) earns a follow-up on fresh records


def _load(folder: os.PathLike) -> List[Dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))]


def suggestive(folder: os.PathLike, alpha: float = 0.01) -> List[Dict[str, Any]]:
    """The results in ``folder`` worth a follow-up: accuracy up with ``alpha <= p < SUGGESTIVE_P``."""
    return [r for r in _load(folder) if _suggests(r, alpha)]


def follow_up_settings(first: Dict[str, Any], test_records: int) -> ProbeSettings:
    """The first result's settings on the next ``test_records`` held-out records (after those it scored)."""
    s = dict(first["settings"])
    s.update(test_offset=s.get("test_offset", 0) + first["test_records"], test_records=test_records)
    return ProbeSettings(**s)


def report(folder: os.PathLike, alpha: float = 0.01, followed_up: Optional[os.PathLike] = None) -> str:
    """``bench/results/tasks.md``: how the results were made (settings, provenance of each run) and the table of every
    probe result in ``folder``, significant gains first, then the follow-ups in ``followed_up`` (fresh test records),
    with a count of the tasks that gain (in the first probe or its follow-up) and what the paper's benchmarks did."""
    results = _load(folder)
    if not results:
        raise FileNotFoundError(f"no probe results (*.json) in {folder}")
    later = _load(followed_up) if followed_up is not None else []
    for rs in (results, later):
        rs.sort(key=lambda r: (not _learns(r, alpha), r["mcnemar_p"], r["task"]))
    settings = sorted({json.dumps(r["settings"], sort_keys=True) for r in results + later})
    runs = sorted({(r["provenance"]["commit"], r["provenance"]["device"], r["provenance"]["torch"])
                   for r in results + later})  # fmt: skip
    lines = [
        "# Which tasks the demo's model learns (`flux-engine probe`)", "",
        "Each task: the warm-started `smollm2-llama-moe-mini` (the model `make demo` fine-tunes) scored on held-out "
        "test records (multiple choice, per-token mean log-likelihood, records cut to seq-len), then LoRA on every "
        "expert of every MoE layer for `steps` AdamW steps on the task's training split (answer-only loss), then "
        "scored on the same records. `majority share`: the most common label's share of the test records (answer "
        "text for classification tasks, answer position otherwise), the accuracy of a model that answers every "
        "record alike. McNemar: exact two-sided test on the records that flipped. Soft: mean probability on the "
        "right choice. Band: 95% binomial half-width of the base accuracy.", "",
        f"- command: `bash bench/probe_tasks.sh` (one `flux-engine probe --task SPEC` per task, then the follow-ups "
        f"`flux-engine probe --follow-up {folder}`), then `flux-engine probe --report {folder}"
        + (f" --followed-up {followed_up}`" if followed_up is not None else "`"),
        *[f"- settings: `{s}`" for s in settings],
        *[f"- run at commit {c} on {d}, torch {t}" for c, d, t in runs],
        f"- dates: {min(r['provenance']['date'] for r in results + later)} to "
        f"{max(r['provenance']['date'] for r in results + later)}",
        "", *_table(results, alpha),
    ]  # fmt: skip
    if later:
        lines += ["", f"## Follow-ups on fresh records ({followed_up})", "",
                  f"Every task whose first result was suggestive ({alpha:g} <= p < {SUGGESTIVE_P:g}, accuracy up), probed "
                  "again from the same warm-started model on held-out records the first probe never scored (`test_offset` "
                  "skips them; its training split excludes them too): an independent test of the same question.",
                  "", *_table(later, alpha)]  # fmt: skip
    done = {r["task"] for r in later}
    pending = sorted(r["task"] for r in results if _suggests(r, alpha) and r["task"] not in done)
    if pending:
        lines += ["", f"Suggestive, not followed up yet: {', '.join(pending)}."]
    learning = {r["task"] for r in results + later if _learns(r, alpha)}
    learners = [r["task"] for r in results if r["task"] in learning]
    paper = [r for r in results if r["task"].startswith(PAPER_BENCHMARKS)]
    moved = [r["task"] for r in paper if r["task"] in learning]
    lines += [
        "", f"{len(learners)} of {len(results)} tasks gain significantly (p < {alpha:g}"
        + (", in the first probe or its follow-up" if later else "") + f"): {', '.join(learners) or 'none'}.",
        f"Of the paper's benchmarks probed ({', '.join(r['task'] for r in paper) or 'none'}): "
        + (f"{', '.join(moved)} {'gains' if len(moved) == 1 else 'gain'} significantly." if moved else "none gains significantly in this budget."),
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def _table(results: Sequence[Dict[str, Any]], alpha: float) -> List[str]:
    lines = ["| task | test | train | majority share | base acc | tuned acc | change | McNemar p | base soft | "
             "tuned soft | learns (p < %g) |" % alpha,
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in results:
        b, t = r["base"], r["tuned"]
        lines.append(
            f"| {r['task']} | {r['test_records']} | {r['train_records']} | {r['majority_share']:.3f} | "
            f"{b['accuracy']:.3f} +-{b['band']:.3f} | {t['accuracy']:.3f} | {t['accuracy'] - b['accuracy']:+.3f} | "
            f"{r['mcnemar_p']:.2g} | {b['soft']:.3f} | {t['soft']:.3f} | {'yes' if _learns(r, alpha) else 'no'} |"
        )
    return lines


def _suggests(result: Dict[str, Any], alpha: float) -> bool:
    return result["tuned"]["accuracy"] > result["base"]["accuracy"] and alpha <= result["mcnemar_p"] < SUGGESTIVE_P


def _learns(result: Dict[str, Any], alpha: float) -> bool:
    return result["mcnemar_p"] < alpha and result["tuned"]["accuracy"] > result["base"]["accuracy"]
