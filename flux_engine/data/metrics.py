"""Evaluation: multiple-choice accuracy by log-likelihood ranking, SQuAD-style exact match and token F1."""

from __future__ import annotations

import collections
import inspect
import re
import string
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from flux_engine.data.records import Record
from flux_engine.data.tokens import Tokenizer, encode_continuation, pad_id, pad_right

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _forward_params(model: Any) -> set:
    target = model.forward if isinstance(model, nn.Module) else model
    try:
        return {p.name if p.kind is not inspect.Parameter.VAR_KEYWORD else "**" for p in inspect.signature(target).parameters.values()}
    except (TypeError, ValueError):  # builtins and some C extensions have no signature
        return set()


def causal_lm_logits(model: Any) -> LogitsFn:
    """Adapts ``model`` to ``(input_ids [B, T], attention_mask [B, T]) -> logits [B, T, V]``.

    ``model(input_ids)`` may return the logits or an object with ``.logits`` (``flux_engine.MoEForCausalLM``,
    transformers causal LMs). The mask goes in as ``attention_mask=`` when the callable takes it; callables
    that do not are still right: with right padding a causal model's logits at real tokens never see pads.
    """
    params = _forward_params(model)
    takes_mask = "attention_mask" in params or "**" in params

    def logits(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = model(input_ids, attention_mask=attention_mask) if takes_mask else model(input_ids)
        return out if isinstance(out, torch.Tensor) else out.logits

    return logits


def packs_choices(model: Any) -> bool:
    """Whether ``model`` can score a record's choices in one row behind a shared context: its forward takes a
    ``[B, T, T]`` ``attention_mask``, ``position_ids`` and ``logits_positions`` (``flux_engine.MoEForCausalLM``)."""
    return {"attention_mask", "position_ids", "logits_positions"} <= _forward_params(model)


def _record_ids(tokenizer: Tokenizer, record: Record, max_length: Optional[int]) -> Tuple[List[int], List[List[int]]]:
    """``(context ids, [choice ids, ...])``; with ``max_length``, the context loses tokens from the left until it and
    the longest choice fit, so every choice is scored against the same context (at least one context token is
    kept: a choice longer than ``max_length - 1`` tokens is scored on its first ``max_length - 1``)."""
    if not record.is_multiple_choice:
        raise ValueError(f"record {record.id} is not multiple-choice")
    pairs = [encode_continuation(tokenizer, record.context, choice) for choice in record.choices]
    ctx, choices = pairs[0][0], [cont for _, cont in pairs]
    for choice, cont in zip(record.choices, choices, strict=True):
        if not cont:
            raise ValueError(f"record {record.id}: choice {choice!r} encodes to no tokens")
    if not ctx:
        # The first choice token needs a position to be predicted from.
        if tokenizer.eos_token_id is None:
            raise ValueError(f"record {record.id}: empty context and no eos_token_id to stand in for it")
        ctx = [tokenizer.eos_token_id]
    if max_length is not None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (a context token and a choice token), got {max_length}")
        choices = [cont[: max_length - 1] for cont in choices]
        ctx = ctx[-(max_length - max(map(len, choices))) :]
    return ctx, choices


def _device_of(model: Any) -> torch.device:
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


Encoded = Sequence[Tuple[List[int], List[List[int]]]]  # per record: (context ids, [choice ids, ...])


def _pairwise_logprobs(model: Any, encoded: Encoded, batch_size: int, pad: int, device) -> List[List[float]]:
    """Summed log-probability of each choice, one sequence ``context + choice`` per (record, choice) pair; works
    with any causal LM (see :func:`causal_lm_logits`)."""
    logits_fn = causal_lm_logits(model)
    pairs = [(ri, ci, ctx, cont) for ri, (ctx, conts) in enumerate(encoded) for ci, cont in enumerate(conts)]
    sums = [[0.0] * len(conts) for _, conts in encoded]
    # Longest first, so sequences of similar length share a batch and little compute goes to padding.
    pairs.sort(key=lambda p: len(p[2]) + len(p[3]), reverse=True)
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        ids, mask = pad_right([ctx + cont for _, _, ctx, cont in batch], pad)
        is_choice = torch.zeros_like(mask, dtype=torch.bool)
        for b, (_, _, ctx, cont) in enumerate(batch):
            is_choice[b, len(ctx) : len(ctx) + len(cont)] = True
        ids, mask, is_choice = ids.to(device), mask.to(device), is_choice.to(device)
        logits = logits_fn(ids, mask)[:, :-1]  # [B, T-1, V]: position t predicts token t+1
        scored = is_choice[:, 1:]  # [B, T-1]
        # Normalising only the scored positions keeps the float32 log-softmax at [N, V], not [B, T, V].
        token_lp = torch.zeros(scored.shape, dtype=torch.float32, device=device)
        picked = logits[scored].float().log_softmax(-1)  # [N, V]
        token_lp[scored] = picked.gather(-1, ids[:, 1:][scored].unsqueeze(-1)).squeeze(-1)
        for (ri, ci, _, _), value in zip(batch, token_lp.sum(1).tolist(), strict=True):
            sums[ri][ci] = value
    return sums


def _packed_logprobs(model: Any, encoded: Encoded, batch_size: int, pad: int, device) -> List[List[float]]:
    """The same sums as :func:`_pairwise_logprobs` with one row per record: ``context + choice_0 + choice_1 + ...``,
    each choice attending to the context and to itself only, its positions continuing the context's, so the context
    is encoded once; logits are computed only where a choice token is predicted (the context's last position is
    shared by every choice's first token)."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]) + sum(map(len, encoded[i][1])), reverse=True)
    sums = [[0.0] * len(conts) for _, conts in encoded]
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]  # longest first: rows of similar length, little padding
        T = len(encoded[batch[0]][0]) + sum(map(len, encoded[batch[0]][1]))
        ids = torch.full((len(batch), T), pad, dtype=torch.long)
        positions = torch.zeros((len(batch), T), dtype=torch.long)
        mask = torch.eye(T, dtype=torch.bool).repeat(len(batch), 1, 1)  # [B, T, T]; padding sees itself only
        keep = torch.zeros((len(batch), T), dtype=torch.bool)
        # (row, position predicting the token, token id, record, choice) of every scored token
        wanted: List[Tuple[int, int, int, int, int]] = []
        for b, ri in enumerate(batch):
            ctx, conts = encoded[ri]
            n = len(ctx)
            ids[b, :n], positions[b, :n] = torch.tensor(ctx), torch.arange(n)
            mask[b, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
            keep[b, n - 1] = True
            at = n
            for ci, cont in enumerate(conts):
                L = len(cont)
                ids[b, at : at + L], positions[b, at : at + L] = torch.tensor(cont), torch.arange(n, n + L)
                mask[b, at : at + L, :n] = True
                mask[b, at : at + L, at : at + L] = torch.ones(L, L, dtype=torch.bool).tril()
                keep[b, at : at + L - 1] = True
                wanted += [(b, n - 1 if j == 0 else at + j - 1, tok, ri, ci) for j, tok in enumerate(cont)]
                at += L
        out = model(ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                    logits_positions=keep.to(device))  # fmt: skip
        logits = out if isinstance(out, torch.Tensor) else out.logits  # [N, V], N = keep.sum()
        row_of = torch.full((len(batch), T), -1, dtype=torch.long)
        row_of[keep] = torch.arange(int(keep.sum()))
        rows = row_of[[w[0] for w in wanted], [w[1] for w in wanted]].to(device)
        token_lp = logits.float().log_softmax(-1)[rows, torch.tensor([w[2] for w in wanted], device=device)]
        for (_, _, _, ri, ci), value in zip(wanted, token_lp.tolist(), strict=True):
            sums[ri][ci] += value
    return sums


@torch.no_grad()
def choice_logprobs(
    model: Any,
    tokenizer: Tokenizer,
    records: Sequence[Record],
    batch_size: int = 16,
    normalize: str = "sum",
    max_length: Optional[int] = None,
    packed: Optional[bool] = None,
) -> List[List[float]]:
    """``log p(choice | context)`` for every choice of every multiple-choice record: summed over the choice's
    tokens (``"sum"``) or averaged per token (``"mean"``, which removes the bias towards short choices).

    ``packed`` (default: whenever :func:`packs_choices`): one row per record, the context encoded once and the
    choices behind it (``batch_size`` records per batch); else one right-padded sequence per (record, choice)
    (``batch_size`` sequences per batch), which any causal LM can score. Both give the same scores up to float
    rounding. ``max_length`` cuts the context from the left (see :func:`_record_ids`). The model runs in eval mode
    and is put back in the mode it was in.
    """
    if normalize not in ("sum", "mean"):
        raise ValueError(f"normalize must be 'sum' or 'mean', got {normalize!r}")
    encoded = [_record_ids(tokenizer, rec, max_length) for rec in records]
    packed = packs_choices(model) if packed is None else packed
    was_training = getattr(model, "training", False)
    if isinstance(model, nn.Module):
        model.eval()
    try:
        score = _packed_logprobs if packed else _pairwise_logprobs
        sums = score(model, encoded, batch_size, pad_id(tokenizer), _device_of(model))
    finally:
        if isinstance(model, nn.Module):
            model.train(was_training)
    if normalize == "sum":
        return sums
    return [[v / len(cont) for v, cont in zip(row, conts, strict=True)] for row, (_, conts) in zip(sums, encoded)]


def multiple_choice_accuracy(
    model: Any,
    tokenizer: Tokenizer,
    records: Sequence[Record],
    batch_size: int = 16,
    normalize: str = "sum",
    max_length: Optional[int] = None,
) -> float:
    """Fraction of records whose highest-scoring choice (:func:`choice_logprobs`) is the target."""
    if not records:
        raise ValueError("no records to evaluate")
    scores = choice_logprobs(model, tokenizer, records, batch_size, normalize, max_length)
    hits = sum(max(range(len(s)), key=s.__getitem__) == rec.target for s, rec in zip(scores, records, strict=True))
    return hits / len(records)


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def _as_list(references: Union[str, Sequence[str]]) -> Sequence[str]:
    refs = [references] if isinstance(references, str) else references
    if not refs:
        raise ValueError("at least one reference answer is needed")
    return refs


def exact_match(prediction: str, references: Union[str, Sequence[str]]) -> float:
    """1.0 when the normalised prediction equals some normalised reference, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(ref) for ref in _as_list(references)))


def token_f1(prediction: str, references: Union[str, Sequence[str]]) -> float:
    """Best F1 over the references of the bag of normalised tokens (an empty answer only matches empty)."""
    pred = normalize_answer(prediction).split()
    best = 0.0
    for ref in _as_list(references):
        gold = normalize_answer(ref).split()
        if not pred or not gold:
            best = max(best, float(pred == gold))
            continue
        common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
        if common:
            precision, recall = common / len(pred), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best
