"""The tokenizer interface the data helpers rely on, right-padding, and LM batches for continued pre-training."""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch

from flux_engine.data.records import Record


class Tokenizer(Protocol):
    """All the data helpers need from a tokenizer; ``transformers.PreTrainedTokenizerFast`` satisfies it.

    ``encode(text, add_special_tokens=False)`` returns token ids for ``text`` alone: the helpers join pieces
    themselves, and a BOS inserted in front of every piece would land mid-sequence. ``eos_token_id`` ends
    each document in LM batches; ``pad_token_id`` (falling back to ``eos_token_id`` when None) fills padding,
    whose value never matters because it is masked.
    """

    pad_token_id: Optional[int]
    eos_token_id: Optional[int]

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]: ...


def encode(tokenizer: Tokenizer, text: str) -> List[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def encode_continuation(tokenizer: Tokenizer, context: str, continuation: str) -> Tuple[List[int], List[int]]:
    """``(context ids, continuation ids)`` encoded apart, as a model is scored on a choice: BPE vocabularies attach a
    space to the word after it (" Paris"), so the context's trailing whitespace is tokenized with the
    continuation, as it would be in running text."""
    head = context.rstrip()
    return encode(tokenizer, head), encode(tokenizer, context[len(head) :] + continuation)


def pad_id(tokenizer: Tokenizer) -> int:
    return next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)


def pad_right(
    rows: Sequence[Sequence[int]], pad: int, length: Optional[int] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both LongTensor ``[len(rows), length or longest row]``, rows left-aligned."""
    T = length if length is not None else max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def lm_batches(
    records: Sequence[Record],
    tokenizer: Tokenizer,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    packed: bool = True,
    answer_only: bool = False,
    bucket: bool = False,
) -> Iterator[Dict[str, torch.Tensor]]:
    """Causal-LM batches of ``context + answer + EOS`` for every record, in a ``seed``-shuffled order.

    Yields ``{"input_ids", "labels", "attention_mask"}``, each LongTensor ``[B, T]`` with ``B = batch_size`` (the
    last batch may be smaller). ``labels`` equal ``input_ids`` (the model shifts them) and are -100 wherever
    ``attention_mask`` is 0.

    ``packed=True`` concatenates all documents and cuts the stream into ``seq_len`` rows (``T = seq_len``; only the
    final row is padded); ``packed=False`` gives each record its own row, keeping its last ``seq_len`` tokens, since
    the answer at the end is what the record is about, padded to the longest row of its batch (``T <= seq_len``).
    ``bucket=True`` (unpacked): rows are sorted by length within windows of 8 batches of the shuffled order, so a
    batch holds rows of similar length and carries little padding.

    ``answer_only=True``: the loss covers the answer and its EOS only (``labels`` are -100 on the context), the
    instruction-tuning loss; context and answer are then encoded apart (``encode_continuation``), exactly as
    ``multiple_choice_accuracy`` scores a choice, so training and scoring see the same tokens.
    """
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("lm_batches needs tokenizer.eos_token_id to separate documents")
    order = np.random.default_rng(seed).permutation(len(records))
    docs, targets = [], []  # token ids, and whether each is a loss target
    for i in order:
        if answer_only:
            ctx, ans = encode_continuation(tokenizer, records[i].context, records[i].answer)
            docs.append(ctx + ans + [eos])
            targets.append([False] * len(ctx) + [True] * (len(ans) + 1))
        else:
            docs.append(encode(tokenizer, records[i].context + records[i].answer) + [eos])
            targets.append([True] * len(docs[-1]))
    if packed:
        stream = [t for doc in docs for t in doc]
        flags = [t for doc in targets for t in doc]
        rows = [stream[i : i + seq_len] for i in range(0, len(stream), seq_len)]
        is_target = [flags[i : i + seq_len] for i in range(0, len(flags), seq_len)]
    else:
        rows = [doc[-seq_len:] for doc in docs]
        is_target = [doc[-seq_len:] for doc in targets]
        if bucket:
            window = 8 * batch_size
            order = [
                i for w in range(0, len(rows), window)
                for i in sorted(range(w, min(w + window, len(rows))), key=lambda i: len(rows[i]))
            ]  # fmt: skip
            rows, is_target = [rows[i] for i in order], [is_target[i] for i in order]
    pad = pad_id(tokenizer)
    width = seq_len if packed else None  # unpacked: as wide as the batch's longest row
    for start in range(0, len(rows), batch_size):
        ids, mask = pad_right(rows[start : start + batch_size], pad, width)
        target, _ = pad_right([[int(f) for f in r] for r in is_target[start : start + batch_size]], 0, width)
        # Masked by position, not by id: the pad id is often the EOS id, and real EOS tokens must be learned.
        yield {"input_ids": ids, "labels": ids.masked_fill((mask == 0) | (target == 0), -100), "attention_mask": mask}
