"""Held-out evaluation of a global model, the math behind the federated evaluate round: a client scores the
global model on its data (:func:`heldout_loss`, :func:`domain_accuracy`), the server pools the clients' reports
(:func:`pool_loss`, :func:`pool_accuracy`, :func:`mean_accuracy`).

Accuracy is multiple-choice accuracy by log-likelihood ranking (``flux_engine.data.multiple_choice_accuracy``,
per-token mean log-probability of each choice, as ``bench/runtime.py`` reports it) on each domain's held-out test
records.
"""

from __future__ import annotations

import random
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from flux_engine.data import Record, Tokenizer, multiple_choice_accuracy

# Mean log-probability per choice token: summed log-probabilities favour short choices.
MC_NORMALIZE = "mean"

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


def domain_accuracy(
    model: Any,
    tokenizer: Tokenizer,
    records: Mapping[str, Sequence[Record]],
    batch_size: int = 16,
    max_length: Optional[int] = None,
) -> Accuracy:
    """Multiple-choice accuracy of ``model`` on each domain's ``records``; ``max_length`` drops context tokens from
    the left (the choices, at the end, are kept)."""
    return {
        d: (multiple_choice_accuracy(model, tokenizer, recs, batch_size, MC_NORMALIZE, max_length), len(recs))
        for d, recs in records.items()
        if recs
    }


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
