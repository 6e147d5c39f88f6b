"""Scoring and training batches on the demo's records: today's scorer (one padded sequence per (record, choice)) vs
the packed one (each record's context encoded once, the choices behind it, logits only where a choice token is
predicted), and the padding of the clients' training batches with and without length bucketing.

    python bench/eval_speed.py                      # -> bench/results/eval_speed.md

The records are what ``make demo`` scores (``flux_engine.cli.DEMO_*``: each domain's ``--eval-records`` test
records, cut to ``--seq-len``) and trains on (the clients' ``samples-per-client`` records); the model is the demo's
warm-started SmolLM2 MoE mini preset. Both scorers run on the same records in the same process, alternating,
``--repeats`` times each (the best time is reported); their scores must agree.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

from flux_engine import provenance
from flux_engine.checkpoint import load_pretrained
from flux_engine.cli import DEMO_DATA, DEMO_DOMAINS, demo_model, demo_settings
from flux_engine.data import choice_logprobs, lm_batches, load_spec, partition, train_test_split
from flux_engine.evaluation import MC_NORMALIZE, sample_test_records
from flux_engine.fileio import atomic_write
from flux_engine.smollm2 import load_tokenizer

OUT = Path(__file__).resolve().parent / "results" / "eval_speed.md"


def timed(fn: Callable[[], object], repeats: int) -> tuple:
    """``(result of the first call, best time of ``repeats`` calls)``."""
    times, result = [], None
    for i in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        result = out if i == 0 else result
    return result, min(times)


def padding(batches: List[dict], width: Optional[int] = None) -> tuple:
    """(padding tokens, all tokens) of ``batches``, their rows ``width`` tokens wide (default: as they are)."""
    total = sum(b["attention_mask"].shape[0] * (width or b["attention_mask"].shape[1]) for b in batches)
    return total - sum(int(b["attention_mask"].sum()) for b in batches), total


def main(argv=None) -> None:
    defaults = demo_settings()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--eval-records", type=int, default=defaults["eval_records"])
    ap.add_argument("--seq-len", type=int, default=defaults["seq_len"])
    ap.add_argument("--batch-size", type=int, default=16, help="the evaluation's batch size (flux_engine.evaluation)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)

    tokenizer = load_tokenizer()
    model = load_pretrained(demo_model()).eval()
    train, test = train_test_split(load_spec(DEMO_DATA), test_size=0.2, seed=0)
    by_domain = sample_test_records(test, DEMO_DOMAINS, args.eval_records, seed=0)
    records = [r for recs in by_domain.values() for r in recs]

    def score(packed: bool):
        return choice_logprobs(model, tokenizer, records, args.batch_size, MC_NORMALIZE, args.seq_len, packed=packed)

    # Alternating, so that a change of the machine's load touches both alike.
    old, t_old = timed(lambda: score(False), 1)
    new, t_new = timed(lambda: score(True), 1)
    for _ in range(args.repeats - 1):
        t_old = min(t_old, timed(lambda: score(False), 1)[1])
        t_new = min(t_new, timed(lambda: score(True), 1)[1])
    diff = max(abs(a - b) for x, y in zip(old, new) for a, b in zip(x, y))
    same_choice = sum(max(range(len(x)), key=x.__getitem__) == max(range(len(y)), key=y.__getitem__)
                      for x, y in zip(old, new))  # fmt: skip

    clients = partition(train, len(DEMO_DOMAINS), scheme="domain", seed=0)
    mine = [c[: defaults["samples"]] for c in clients]
    kw = dict(packed=False, answer_only=True)
    fixed = [padding(list(lm_batches(m, tokenizer, args.seq_len, 4, **kw)), args.seq_len) for m in mine]
    bucketed = [padding(list(lm_batches(m, tokenizer, args.seq_len, 4, bucket=True, **kw))) for m in mine]

    n_choices = sum(len(r.choices) for r in records)
    lines = [
        "# Multiple-choice scoring and batch padding on the demo's records",
        "",
        f"- command: `{provenance.command_line(sys.argv)}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- commit: {provenance.commit()}",
        f"- device: {provenance.device()}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in provenance.versions().items())}",
        f"- model: the demo's `{demo_model()}`",
        f"- records: {len(records)} test records ({n_choices} choices) of {', '.join(by_domain)} "
        f"(`{DEMO_DATA}`, {args.eval_records} per domain, as `make demo` scores them), cut to seq-len {args.seq_len}",
        f"- batch size {args.batch_size}: sequences per batch (today's scorer), records per batch (packed)",
        "",
        "## Scoring (`flux_engine.data.choice_logprobs`, normalize=\"mean\")",
        "",
        "| scorer | seconds (best of %d) | records/s |" % args.repeats,
        "| --- | --- | --- |",
        f"| one sequence per (record, choice), padded (`packed=False`, today's) | {t_old:.2f} | {len(records) / t_old:.1f} |",
        f"| context once, choices packed behind it (`packed=True`, the default) | {t_new:.2f} | {len(records) / t_new:.1f} |",
        "",
        f"Scores agree: largest difference {diff:.2e} (per-token mean log-probability); the same choice ranked first "
        f"on {same_choice} of {len(records)} records.",
        "",
        "## Training batches (clients' records, batch 4, answer-only loss)",
        "",
        "| client | records | padding tokens, rows padded to seq-len (before) | padding tokens, bucketed, batch-wide (now) |",
        "| --- | --- | --- | --- |",
    ]
    for c, (m, f, b) in enumerate(zip(mine, fixed, bucketed)):
        lines.append(f"| {c} ({m[0].domain}) | {len(m)} | {f[0]} of {f[1]} | {b[0]} of {b[1]} |")
    lines += ["", f"scoring speedup: {t_old / t_new:.2f}"]
    atomic_write(Path(args.out), lambda f: f.write("\n".join(lines) + "\n"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
