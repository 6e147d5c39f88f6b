"""Held-out evaluation of a global model, the math behind the federated evaluate round: a client scores the
global model on its data (:func:`heldout_loss`, :func:`domain_accuracy`), the server pools the clients' reports
(:func:`pool_loss`, :func:`pool_accuracy`, :func:`mean_accuracy`); and the statistics that say whether a change of
accuracy is more than sampling noise (:func:`binomial_band`, :func:`mean_band`, :func:`mcnemar_p`).

Accuracy is multiple-choice accuracy by log-likelihood ranking (``flux_engine.data.choice_logprobs``, per-token mean
log-probability of each choice, as ``bench/runtime.py`` reports it) on each domain's held-out test records. Soft
accuracy is the probability the model puts on the right choice: the softmax over a record's choices of those
scores, at the target, averaged over records; it moves before the ranking flips, so it shows learning that
accuracy on a few hundred records may not.

Precision (:func:`eval_context`): ``"fp32"`` scores in the model's dtype; ``"bf16"`` runs matmuls and attention
under ``torch.autocast(bfloat16)`` (weights stay as they are; norms, softmax and the scores' log-softmax in fp32),
the usual mixed-precision evaluation of GPU harnesses; ``"auto"`` picks bf16 where the device multiplies bf16
natively (:func:`native_bf16`), where it is about twice as fast as fp32, and fp32 elsewhere (CPUs without
AVX512-BF16/AMX emulate bf16, slower than fp32).
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch

from flux_engine.data import Record, Tokenizer, choice_logprobs

# Mean log-probability per choice token: summed log-probabilities favour short choices.
MC_NORMALIZE = "mean"

PRECISIONS = ("fp32", "bf16", "auto")


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset:
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), ()))
    except OSError:  # not Linux: no flags known, so no native bf16 assumed
        return frozenset()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware: a CUDA GPU with bf16 support, or a CPU with
    AVX512-BF16 or AMX-BF16 (read from ``/proc/cpuinfo``; elsewhere assumed not)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"fp32"`` or ``"bf16"``: the precision an evaluation with ``precision`` (one of :data:`PRECISIONS`) runs in
    on ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def eval_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context a held-out evaluation runs in: ``torch.autocast(device type, bfloat16)`` when ``precision``
    resolves to bf16 (:func:`resolve_precision`), else nothing."""
    device = torch.device(device)
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()

Accuracy = Dict[str, Tuple[float, int]]  # domain -> (accuracy, records scored)


@torch.no_grad()
def heldout_loss(model: Any, batches: Iterable[Dict[str, torch.Tensor]]) -> Tuple[float, int]:
    """``(mean next-token loss, predicted tokens)`` over ``lm_batches``-style dicts (``input_ids``, ``labels``,
    ``attention_mask``, each ``[B, T]``); ``(nan, 0)`` without any predicted token."""
    total, n = 0.0, 0
    for b in batches:
        out = model(b["input_ids"], labels=b["labels"], attention_mask=b["attention_mask"])
        k = int((b["labels"][:, 1:] != -100).sum())
        total += float(out.loss) * k
        n += k
    return (total / n if n else float("nan")), n


def sample_test_records(
    test: Sequence[Record], domains: Iterable[str], per_domain: int, seed: int
) -> Dict[str, List[Record]]:
    """Up to ``per_domain`` multiple-choice records of each of ``domains`` drawn from ``test`` (seeded by ``seed``
    and the domain, so a domain's sample does not depend on the other domains)."""
    out = {}
    for d in sorted(set(domains)):
        pool = sorted((r for r in test if r.domain == d and r.is_multiple_choice), key=lambda r: r.id)
        if pool:
            out[d] = random.Random(f"flux-eval:{seed}:{d}").sample(pool, min(per_domain, len(pool)))
    return out


class RecordScores(NamedTuple):
    """Per record: whether its top-scoring choice is the target, and the probability on the target."""

    correct: List[bool]
    soft: List[float]


def score_records(
    model: Any, tokenizer: Tokenizer, records: Sequence[Record], batch_size: int = 16, max_length: Optional[int] = None
) -> RecordScores:
    """``records`` scored by :data:`MC_NORMALIZE` choice log-likelihoods; ``max_length`` cuts each record's context
    from the left so that it and its longest choice fit (the choices are kept)."""
    scores = choice_logprobs(model, tokenizer, records, batch_size, MC_NORMALIZE, max_length)
    correct, soft = [], []
    for s, rec in zip(scores, records, strict=True):
        probs = torch.tensor(s, dtype=torch.float64).softmax(0)
        correct.append(max(range(len(s)), key=s.__getitem__) == rec.target)
        soft.append(float(probs[rec.target]))
    return RecordScores(correct, soft)


class DomainScore(NamedTuple):
    accuracy: float
    soft: float
    records: int


def domain_accuracy(
    model: Any,
    tokenizer: Tokenizer,
    records: Mapping[str, Sequence[Record]],
    batch_size: int = 16,
    max_length: Optional[int] = None,
) -> Dict[str, DomainScore]:
    """Accuracy and soft accuracy of ``model`` on each domain's ``records`` (see :func:`score_records`)."""
    out = {}
    for d, recs in records.items():
        if recs:
            r = score_records(model, tokenizer, recs, batch_size, max_length)
            out[d] = DomainScore(sum(r.correct) / len(recs), sum(r.soft) / len(recs), len(recs))
    return out


def pool_loss(reports: Iterable[Tuple[float, int]]) -> Tuple[float, int]:
    """Token-weighted mean of ``(loss, tokens)`` reports -> ``(loss, tokens)``; ``(nan, 0)`` when empty."""
    total, n = 0.0, 0
    for loss, tokens in reports:
        if tokens:
            total, n = total + loss * tokens, n + tokens
    return (total / n if n else float("nan")), n


def pool_accuracy(reports: Iterable[Accuracy]) -> Accuracy:
    """Per domain, the record-weighted mean of the clients' accuracies (clients sharing a domain score the same or
    different records of it)."""
    hits: Dict[str, float] = {}
    counts: Dict[str, int] = {}
    for report in reports:
        for d, (acc, n) in report.items():
            hits[d] = hits.get(d, 0.0) + acc * n
            counts[d] = counts.get(d, 0) + n
    return {d: (hits[d] / counts[d], counts[d]) for d in sorted(counts) if counts[d]}


def mean_accuracy(accuracy: Mapping[str, float]) -> float:
    """Unweighted mean over domains (every domain counts once, however many records it has)."""
    return sum(accuracy.values()) / len(accuracy) if accuracy else float("nan")


def binomial_band(p: float, n: int, z: float = 1.96) -> float:
    """Half-width of the normal-approximation confidence band of an accuracy ``p`` measured on ``n`` records
    (z = 1.96: 95%)."""
    return z * math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def mean_band(accuracy: Mapping[str, Tuple[float, int]], z: float = 1.96) -> float:
    """Half-width of the band of :func:`mean_accuracy` over domains ``{domain: (accuracy, records)}``: the domains'
    binomial variances (independent samples) summed and divided by the number of domains squared."""
    if not accuracy:
        return float("nan")
    variance = sum(p * (1 - p) / n for p, n in accuracy.values()) / len(accuracy) ** 2
    return z * math.sqrt(variance)


def mcnemar_p(before: Sequence[bool], after: Sequence[bool]) -> float:
    """Exact two-sided McNemar p-value that paired right/wrong outcomes on the same records did not change: the
    records that flipped (b right -> wrong, c wrong -> right) are Binomial(b + c, 1/2) under no change."""
    if len(before) != len(after):
        raise ValueError(f"paired outcomes differ in length: {len(before)} and {len(after)}")
    b = sum(x and not y for x, y in zip(before, after))
    c = sum(y and not x for x, y in zip(before, after))
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)
