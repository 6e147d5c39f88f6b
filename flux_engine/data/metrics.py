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


def causal_lm_logits(model: Any) -> LogitsFn:
    """Adapts ``model`` to ``(input_ids [B, T], attention_mask [B, T]) -> logits [B, T, V]``.

    ``model(input_ids)`` may return the logits or an object with ``.logits`` (``flux_engine.MoEForCausalLM``,
    transformers causal LMs). The mask goes in as ``attention_mask=`` when the callable takes it; callables
    that do not are still right: with right padding a causal model's logits at real tokens never see pads.
    """
    target = model.forward if isinstance(model, nn.Module) else model
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):  # builtins and some C extensions have no signature
        params = ()
    takes_mask = any(p.name == "attention_mask" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)

    def logits(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = model(input_ids, attention_mask=attention_mask) if takes_mask else model(input_ids)
        return out if isinstance(out, torch.Tensor) else out.logits

    return logits


def _context_and_choice_ids(
    tokenizer: Tokenizer, record: Record, choice: str, max_length: Optional[int]
) -> Tuple[List[int], List[int]]:
    ctx, cont = encode_continuation(tokenizer, record.context, choice)
    if not cont:
        raise ValueError(f"record {record.id}: choice {choice!r} encodes to no tokens")
    if not ctx:
        # The first choice token needs a position to be predicted from.
        if tokenizer.eos_token_id is None:
            raise ValueError(f"record {record.id}: empty context and no eos_token_id to stand in for it")
        ctx = [tokenizer.eos_token_id]
    if max_length is not None:
        if len(cont) >= max_length:
            raise ValueError(f"record {record.id}: choice {choice!r} alone fills max_length={max_length}")
        ctx = ctx[-(max_length - len(cont)) :]
    return ctx, cont


def _device_of(model: Any) -> torch.device:
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


@torch.no_grad()
def choice_logprobs(
    model: Any,
    tokenizer: Tokenizer,
    records: Sequence[Record],
    batch_size: int = 16,
    normalize: str = "sum",
    max_length: Optional[int] = None,
) -> List[List[float]]:
    """``log p(choice | context)`` for every choice of every multiple-choice record: summed over the choice's
    tokens (``"sum"``) or averaged per token (``"mean"``, which removes the bias towards short choices).

    Each (record, choice) pair is one sequence ``context ids + choice ids``; sequences are right-padded into
    batches of ``batch_size`` with an attention mask. ``max_length`` drops context tokens from the left.
    The model runs in eval mode and is put back in the mode it was in.
    """
    if normalize not in ("sum", "mean"):
        raise ValueError(f"normalize must be 'sum' or 'mean', got {normalize!r}")
    logits_fn = causal_lm_logits(model)
    device = _device_of(model)
    pairs = []  # (record index, choice index, context ids, choice ids)
    for ri, rec in enumerate(records):
        if not rec.is_multiple_choice:
            raise ValueError(f"record {rec.id} is not multiple-choice")
        for ci, choice in enumerate(rec.choices):
            pairs.append((ri, ci, *_context_and_choice_ids(tokenizer, rec, choice, max_length)))
    scores = [[0.0] * len(rec.choices) for rec in records]
    # Longest first, so sequences of similar length share a batch and little compute goes to padding.
    pairs.sort(key=lambda p: len(p[2]) + len(p[3]), reverse=True)
    was_training = getattr(model, "training", False)
    if isinstance(model, nn.Module):
        model.eval()
    try:
        for start in range(0, len(pairs), batch_size):
            batch = pairs[start : start + batch_size]
            ids, mask = pad_right([ctx + cont for _, _, ctx, cont in batch], pad_id(tokenizer))
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
            totals = token_lp.sum(1)
            if normalize == "mean":
                totals = totals / scored.sum(1)
            for (ri, ci, _, _), value in zip(batch, totals.tolist(), strict=True):
                scores[ri][ci] = value
    finally:
        if isinstance(model, nn.Module):
            model.train(was_training)
    return scores


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
