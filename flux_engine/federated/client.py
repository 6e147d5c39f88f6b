"""The Flux ``ClientApp``: profile -> merge -> train on one client, with the base model kept resident between rounds.

A client keeps, per run (``ClientRuntime``, cached in this process): the base model (never modified), its copy of
the global trainable tensors and the round it last synced, its data batches, its budget plan, and the profile
computing in the background for the next round.

Handlers:

- ``query.profile`` (first contact): plan the budget (``budget.plan_budget``; node config ``memory-budget`` or
  the run config), profile the base model (``profiling.profile``) and reply ``B_tune`` and the round-1 utilities
  (normalised frequencies, ``roles.frequency_utility``).
- ``train``: apply the received global tensors to a copy of the base (the global model) and start profiling it in
  the background (stale profiling: that profile serves the next round); merge the non-tuning experts with the
  previous round's profile (``merging.merge``, tuning experts first); train (``training.train_round``; LoRA mode:
  tuning experts keep their base weights and resume from their global adapters via ``init``); reply the trained
  tensors, routed-token counts and utilities.
- ``evaluate``: held-out loss of the global model (every expert, nothing merged).
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flux_engine import budget, merging, presets, profiling, roles
from flux_engine.aggregation import Update
from flux_engine.federated import wire
from flux_engine.federated.config import RunConfig, parse_size_or_error
from flux_engine.models.moe import MoEForCausalLM


# ------------------------------------------------------------------------------------------------ resources


def model_config(run: RunConfig):
    """The MoE config of the run's model (a checkpoint folder's, else the preset's)."""
    if run.checkpoint:
        from flux_engine.checkpoint import CONFIG_FILE, _read_config, get_layout, read_json

        path = os.path.join(run.checkpoint, CONFIG_FILE)
        raw = read_json(path)
        return _read_config(get_layout(raw.get("model_type"), path), raw, path)
    return presets.get(run.preset)


def build_model(run: RunConfig) -> MoEForCausalLM:
    """The base model every client holds: the checkpoint, or the preset with weights seeded by ``run.seed`` (the
    same on every client)."""
    dtype = getattr(torch, run.dtype)
    if run.checkpoint:
        from flux_engine.checkpoint import load_pretrained

        return load_pretrained(run.checkpoint, dtype=dtype)
    torch.manual_seed(run.seed)
    return MoEForCausalLM(presets.get(run.preset)).to(dtype).eval()


def client_batches(
    run: RunConfig, partition_id: int, num_partitions: int, vocab_size: int
) -> Tuple[List[dict], List[dict]]:
    """``(train, eval)`` batches of ``{"input_ids", "labels", "attention_mask"}`` ``[B, seq_len]`` for one client."""
    if run.data == "synthetic":
        # Non-IID tokens: each client draws from its own skewed distribution over the vocabulary (smaller alpha,
        # more skew), so clients route differently.
        g = torch.Generator().manual_seed(run.seed * 7919 + partition_id)
        weights = torch.rand(vocab_size, generator=g) ** (1.0 / max(run.alpha, 1e-3))
        ids = torch.multinomial(weights, run.samples_per_client * run.seq_len, replacement=True, generator=g)
        ids = ids.view(run.samples_per_client, run.seq_len)
        rows = [{"input_ids": ids[i : i + run.batch_size], "labels": ids[i : i + run.batch_size].clone(),
                 "attention_mask": torch.ones_like(ids[i : i + run.batch_size])}
                for i in range(0, len(ids), run.batch_size)]  # fmt: skip
    elif run.data.startswith(("bigbench:", "jsonl:")):
        from flux_engine.data import lm_batches, partition, read_jsonl, train_test_split

        kind, _, arg = run.data.partition(":")
        if kind == "jsonl":
            records = read_jsonl(arg)
        else:
            from flux_engine.data import load_tasks

            records = load_tasks([t for t in arg.split(",") if t])
        train, _ = train_test_split(records, test_size=0.2, seed=run.seed)
        mine = partition(train, num_partitions, scheme=run.partition, alpha=run.alpha, seed=run.seed)[partition_id]
        mine = mine[: run.samples_per_client]
        rows = list(lm_batches(mine, tokenizer(run), run.seq_len, run.batch_size, seed=run.seed, packed=False))
    else:
        raise ValueError(f"data must be 'synthetic', 'jsonl:PATH' or 'bigbench:TASK,...', got {run.data!r}")
    n_eval = max(1, round(run.eval_fraction * len(rows))) if len(rows) > 1 else 0
    return rows[n_eval:], rows[:n_eval]


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocabulary 256, id 0 ends documents): real text for the ``tiny`` preset."""

    pad_token_id = eos_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        return [b or 1 for b in text.encode("utf-8")]


def tokenizer(run: RunConfig):
    if run.tokenizer == "bytes":
        return ByteTokenizer()
    if run.tokenizer == "smollm2":
        from flux_engine.smollm2 import load_tokenizer

        return load_tokenizer()
    raise ValueError(f"tokenizer must be 'bytes' or 'smollm2', got {run.tokenizer!r}")


def train_settings(run: RunConfig) -> budget.TrainSettings:
    return budget.TrainSettings(
        dtype=run.dtype,
        lora_rank=run.lora_rank if run.mode == "lora" else 0,
        batch_size=run.batch_size,
        seq_len=run.seq_len,
        workspace_bytes=parse_size_or_error(run.workspace, "workspace"),
    )


@dataclass
class ClientRuntime:
    run: RunConfig
    partition_id: int
    base: MoEForCausalLM
    plan: budget.BudgetPlan
    train_batches: List[dict]
    eval_batches: List[dict]
    global_tensors: Update = field(default_factory=dict)
    synced: int = 0
    profile: Any = None  # an ExpertProfile, or a ProfileHandle still computing
    num_layers: int = 0

    def sync(self, content: RecordDict, state: RecordDict) -> None:
        """Apply the server's delta. The global copy is also kept in the node's Flower context ``state``: under
        ``flower-supernode`` every message runs in a fresh ClientApp process, so this object does not survive
        between rounds there, the context does. A delta relative to a round this client does not hold is refused
        (the server then resends everything)."""
        if not self.synced and "flux-sync" in state:
            self.global_tensors = wire.unpack_tensors(state["flux-global"], "context")
            self.synced = int(state["flux-sync"]["synced"])
        since = int(content["config"]["since"])
        if since > self.synced:
            raise RuntimeError(
                f"server sent changes since round {since}, this client holds round {self.synced}: resync"
            )
        self.global_tensors.update(wire.unpack_tensors(content["global"], "server"))
        self.synced = int(content["config"]["synced"])
        state["flux-global"] = wire.pack_tensors(self.global_tensors)
        state["flux-sync"] = ConfigRecord({"synced": self.synced})

    def take_profile(self) -> Any:
        p = self.profile
        return p.result() if isinstance(p, profiling.ProfileHandle) else p


_RUNTIMES: Dict[Tuple[int, int], ClientRuntime] = {}


def runtime(context: Context, run: Optional[RunConfig] = None) -> ClientRuntime:
    """This node's resources for the run, built on first use and kept resident."""
    key = (context.run_id, context.node_id)
    if key not in _RUNTIMES:
        run = run or RunConfig.from_mapping(dict(context.run_config))
        pid = int(context.node_config.get("partition-id", 0))
        num = int(context.node_config.get("num-partitions", 1))
        base = build_model(run)
        plan = budget.plan_budget(base.config, run.budget_for(pid, context.node_config), train_settings(run))
        train, ev = client_batches(run, pid, num, base.config.vocab_size)
        _RUNTIMES[key] = ClientRuntime(run, pid, base, plan, train, ev, num_layers=len(base.moe_layers()))
    return _RUNTIMES[key]


def release(run_id: int) -> None:
    """Free the resources this process holds for a finished run."""
    for key in [k for k in _RUNTIMES if k[0] == run_id]:
        del _RUNTIMES[key]


# ------------------------------------------------------------------------------------------------ model state


def _profile_bits(run: RunConfig) -> Optional[int]:
    return run.profile_bits or None


def apply_global(model: MoEForCausalLM, tensors: Update, run: RunConfig, skip=()) -> None:
    """Put the global state into an unmerged model: full mode sets the experts' weights, LoRA mode folds the
    adapters in (``skip``: this round's tuning experts, which resume from their factors through ``init``)."""
    from flux_engine import adapters, training

    if run.mode == "full":
        training.load_expert_weights(model, tensors)
    else:
        adapters.merge_adapters(model, tensors, run.lora_alpha / run.lora_rank, skip=skip)


def train_config(run: RunConfig):
    from flux_engine.training import TrainConfig

    # One seed for every client and round: an expert nobody has trained yet starts from the same LoRA factors on
    # every client (training keys the init by (seed, layer, expert)), so their average is meaningful.
    return TrainConfig(mode=run.mode, rank=run.lora_rank, alpha=run.lora_alpha, lr=run.lr, steps=run.local_steps,
                       micro_batch_size=run.batch_size, seed=run.seed)  # fmt: skip


# ------------------------------------------------------------------------------------------------ handlers


def handle_profile(rt: ClientRuntime) -> RecordDict:
    p = profiling.profile(rt.base, rt.train_batches, bits=_profile_bits(rt.run))
    rt.profile = p
    return RecordDict(
        {
            "plan": ConfigRecord({"B_tune": rt.plan.B_tune, "B_non": rt.plan.B_non, "partition-id": rt.partition_id}),
            "utilities": ArrayRecord({"utilities": roles.frequency_utility(p.frequency)}),
        }
    )


def handle_train(rt: ClientRuntime, content: RecordDict, state: RecordDict) -> RecordDict:
    from flux_engine.training import train_round

    t0 = time.perf_counter()
    rt.sync(content, state)
    cfg = content["config"]
    L, E = rt.num_layers, rt.base.config.num_experts
    tuning = wire.ids_to_mask(cfg["tuning"], L, E)
    tuning_keys = {tuple(k) for k in torch.nonzero(tuning).tolist()}
    global_model = copy.deepcopy(rt.base)
    apply_global(global_model, rt.global_tensors, rt.run)
    profile = rt.take_profile()
    if profile is None:
        profile = profiling.profile(global_model, rt.train_batches, bits=_profile_bits(rt.run))
    # Stale profiling: this round's global model is profiled while we train and the server aggregates, for use
    # next round. profile_async snapshots the weights before returning, so the model may change afterwards.
    rt.profile = (
        profiling.profile_async(global_model, rt.train_batches, bits=_profile_bits(rt.run))
        if rt.run.stale_profile
        else None
    )
    working = global_model
    if rt.run.mode == "lora" and tuning_keys & set(rt.global_tensors):
        # Tuning experts resume from their global factors (init) on their base weights: do not fold those in.
        working = copy.deepcopy(rt.base)
        apply_global(working, rt.global_tensors, rt.run, skip=tuning_keys)
    tuning_lists = [torch.nonzero(row).flatten().tolist() for row in tuning]
    model = merging.merge(
        working, profile, tuning_lists, rt.plan.B_non, weighting=rt.run.merge_weighting, seed=rt.run.seed, inplace=True
    )
    init = {k: v for k, v in rt.global_tensors.items() if k in tuning_keys}
    result = train_round(model, tuning_lists, rt.train_batches, train_config(rt.run), init)
    trained = result.trained
    losses = [float(x) for x in result.losses]
    return RecordDict(
        {
            "update": wire.pack_tensors(trained),
            "token_counts": wire.pack_counts({k: int(result.token_counts.get(k, 0)) for k in trained}),
            "utilities": ArrayRecord({"utilities": result.utilities}),
            "metrics": MetricRecord(
                {
                    "train-loss": sum(losses) / len(losses) if losses else float("nan"),
                    "steps": int(result.steps),
                    "tokens": int(result.tokens),
                    "train-seconds": float(result.seconds),
                    "round-seconds": time.perf_counter() - t0,
                    "partition-id": rt.partition_id,
                }
            ),
        }
    )


@torch.no_grad()
def handle_evaluate(rt: ClientRuntime, content: RecordDict, state: RecordDict) -> RecordDict:
    rt.sync(content, state)
    model = copy.deepcopy(rt.base)
    apply_global(model, rt.global_tensors, rt.run)
    total, n = 0.0, 0
    for b in rt.eval_batches:
        out = model(b["input_ids"], labels=b["labels"], attention_mask=b["attention_mask"])
        k = int((b["labels"][:, 1:] != -100).sum())
        total += float(out.loss) * k
        n += k
    return RecordDict({"metrics": MetricRecord({"eval-loss": total / max(n, 1), "num-tokens": n})})


def make_client_app(run: Optional[RunConfig] = None) -> ClientApp:
    """The ClientApp; ``run`` overrides the run config Flower passes in the context (simulation helpers)."""
    app = ClientApp()

    @app.query("profile")
    def query(msg: Message, context: Context) -> Message:
        return Message(handle_profile(runtime(context, run)), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return Message(handle_train(runtime(context, run), msg.content, context.state), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return Message(handle_evaluate(runtime(context, run), msg.content, context.state), reply_to=msg)

    return app
