"""The ``ClientApp``: Flux's round (``flux_engine.flux_round``) or a baseline's on one client, with the base model
kept resident between rounds. No math here: the handlers read messages, call the mechanisms and reply.

A client keeps, per run (``ClientRuntime``, cached in this process): the base model (never modified), its copy of
the global trainable tensors and the round it last synced, its data batches, its budget plan, and either its
``FluxClient`` (the low-bit profiling copy, the next round's profile, the last compact model) or a baseline's
policy.

Handlers:

- ``query.profile`` (first contact): plan the budget (``budget.plan_budget``; node config ``memory-budget`` or
  the run config; its profile phase, the profiling copy, checked to fit) and profile the base model (``profile-samples`` rows); reply
  ``B_tune`` and the routing-frequency prior (``roles.frequency_utility``).
- ``train``: apply the server's delta, run the Flux round (``FluxClient.train``: profile of the previous round's
  global model, merge, train the tuning experts), reply the trained tensors, routed-token counts, Eq. 3 utilities
  and the measured terms of the time model; then, with the reply built, the stale profile of this round's global
  model for the next round (``FluxClient.profile_next``: the client's idle window; a background thread, or inline
  and timed apart with ``profile-in-background = false``).
- ``train`` for a baseline (``handle_train_baseline``): its ``baselines.Policy`` (FedAvg-LoRA, FMD, FMQ, FMES),
  built once from the base model (and the first-contact profile for FMD / FMES), trains its experts' adapters from
  the global ones; FMD reports its PCIe bytes.
- ``evaluate``: the global model on held-out data: LM loss and, with ``eval-records``, multiple-choice accuracy per
  domain (``flux_engine.evaluation``). Flux: every expert, nothing merged, adapters folded in; a baseline: its
  policy's model (int4 experts for FMQ, the kept experts for FMES) with the global adapters attached.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flux_engine import baselines, budget, evaluation, presets, profiling, roles
from flux_engine.flux_round import FluxClient, FluxSettings, apply_global, round_copy
from flux_engine.aggregation import Update
from flux_engine.data import Record
from flux_engine.evaluation import sample_test_records
from flux_engine.federated import wire
from flux_engine.federated.config import RunConfig, parse_size_or_error
from flux_engine.models.moe import MoEForCausalLM


# ------------------------------------------------------------------------------------------------ resources


def model_config(run: RunConfig):
    """The MoE config of the run's model (a checkpoint folder's, else the preset's), checked against the run's
    model-dependent keys (``RunConfig.check_model``)."""
    if run.checkpoint:
        from flux_engine.checkpoint import CONFIG_FILE, read_config, get_layout, read_json

        path = os.path.join(run.checkpoint, CONFIG_FILE)
        raw = read_json(path)
        config = read_config(get_layout(raw.get("model_type"), path), raw, path)
    else:
        config = presets.get(run.preset)
    run.check_model(config)
    return config


def build_model(run: RunConfig) -> MoEForCausalLM:
    """The base model every client holds: the checkpoint, or the preset with weights seeded by ``run.seed`` (the
    same on every client)."""
    dtype = getattr(torch, run.dtype)
    if run.checkpoint:
        from flux_engine.checkpoint import load_pretrained

        return load_pretrained(run.checkpoint, dtype=dtype)
    torch.manual_seed(run.seed)
    return MoEForCausalLM(presets.get(run.preset)).to(dtype).eval()


@functools.lru_cache(maxsize=1)
def _split_records(data: str, seed: int) -> Tuple[Tuple[Record, ...], Tuple[Record, ...]]:
    """``(train, test)`` records of a data spec (``flux_engine.data.sources``), split within every task.
    Cached: the clients of an in-process federation all read the same records (BIG-bench: ~1 s per load)."""
    from flux_engine.data import load_spec, train_test_split

    train, test = train_test_split(load_spec(data), test_size=0.2, seed=seed)
    return tuple(train), tuple(test)


def client_records(
    run: RunConfig, partition_id: int, num_partitions: int
) -> Tuple[List[Record], Dict[str, List[Record]]]:
    """``(training records, evaluation records by domain)`` of one client: its partition of the train split (at
    most ``samples-per-client``) and ``eval-records`` test records of each domain in that partition."""
    from flux_engine.data import partition

    train, test = _split_records(run.data, run.seed)
    mine = partition(train, num_partitions, scheme=run.partition, alpha=run.alpha, seed=run.seed)[partition_id]
    mine = mine[: run.samples_per_client]
    return mine, sample_test_records(test, {r.domain for r in mine}, run.eval_records, run.seed)


def client_batches(
    run: RunConfig, partition_id: int, num_partitions: int, vocab_size: int
) -> Tuple[List[dict], List[dict]]:
    """``(train, eval)`` batches of ``{"input_ids", "labels", "attention_mask"}`` ``[B, T]`` (``T <= seq_len``: records
    bucketed by length, each batch as wide as its longest row) for one client."""
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
    else:
        from flux_engine.data import lm_batches

        mine, _ = client_records(run, partition_id, num_partitions)
        rows = list(lm_batches(mine, tokenizer(run), run.seq_len, run.batch_size, seed=run.seed, packed=False,
                               answer_only=run.loss_on == "answer", bucket=True))  # fmt: skip
    n_eval = max(1, round(run.eval_fraction * len(rows))) if len(rows) > 1 else 0
    return rows[n_eval:], rows[:n_eval]


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocabulary 256, id 0 ends documents): real text for the ``tiny`` preset."""

    pad_token_id = eos_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        return [b or 1 for b in text.encode("utf-8")]


def tokenizer(run: RunConfig):
    return _tokenizer(run.tokenizer)


@functools.lru_cache(maxsize=2)
def _tokenizer(name: str):
    # Cached: loading SmolLM2's tokenizer takes ~1.5 s, and in-process clients share it (tokenizers are stateless).
    if name == "bytes":
        return ByteTokenizer()
    if name == "smollm2":
        from flux_engine.smollm2 import load_tokenizer

        return load_tokenizer()
    raise ValueError(f"tokenizer must be 'bytes' or 'smollm2', got {name!r}")


def train_settings(run: RunConfig) -> budget.TrainSettings:
    """The memory model's settings; Flux's plan checks that its profile phase (the profiling copy) fits too."""
    return budget.TrainSettings(
        dtype=run.dtype,
        lora_rank=run.lora_rank if run.mode == "lora" else 0,
        batch_size=run.batch_size,
        seq_len=run.seq_len,
        workspace_bytes=parse_size_or_error(run.workspace, "workspace"),
        profile_bits=run.profile_bits if run.method == "flux" else None,
    )


def client_plan(run: RunConfig, config, budget_bytes: int) -> budget.BudgetPlan:
    """The client's budget plan: from its budget, or with ``structure-from`` the real shape's fractions
    (``structure.matched_budget_plan``)."""
    if run.structure_from:
        from flux_engine import structure

        m = structure.match(run.structure_from, config, train_settings(run), run.fmq_bits)
        return structure.matched_budget_plan(config, m, train_settings(run))
    return budget.plan_budget(config, budget_bytes, train_settings(run))


@dataclass
class ClientRuntime:
    run: RunConfig
    partition_id: int
    base: MoEForCausalLM
    plan: budget.BudgetPlan
    train_batches: List[dict]
    eval_batches: List[dict]
    eval_records: Dict[str, List[Record]]
    global_tensors: Update = field(default_factory=dict)
    synced: int = 0
    num_layers: int = 0
    flux: Optional[FluxClient] = None  # Flux's rounds, built on first use
    # A baseline's first-contact profile (FMD / FMES) with its seconds, charged to round 1, and its
    # baselines.Policy, built on first use and kept (the base never changes), with the seconds building it took.
    profile: Any = None
    profile_seconds: float = 0.0
    policy: Any = None
    policy_seconds: float = 0.0

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
        # A new dict each sync: the Flux client compares global states by the objects it was given.
        self.global_tensors = {**self.global_tensors, **wire.unpack_tensors(content["global"], "server")}
        self.synced = int(content["config"]["synced"])
        state["flux-global"] = wire.pack_tensors(self.global_tensors)
        state["flux-sync"] = ConfigRecord({"synced": self.synced})

    def flux_client(self) -> FluxClient:
        if self.flux is None:
            run = self.run
            settings = FluxSettings(
                mode=run.mode, lora_scale=run.lora_alpha / run.lora_rank, profile_bits=_profile_bits(run),
                stale_profile=run.stale_profile, profile_in_background=run.profile_in_background,
                merge_weighting=run.merge_weighting, merge_budgets=run.merge_budgets, explore_mode=run.explore_mode,
                seed=run.seed, state_dir=os.path.join(run.client_state_dir or os.path.join(run.state_dir, "clients"),
                                                      f"client-{self.partition_id}"),
            )  # fmt: skip
            self.flux = FluxClient(self.base, self.plan, settings, train_config(run), profile_batches(self))
        return self.flux


_RUNTIMES: Dict[Tuple[int, int], ClientRuntime] = {}
# Base models by run: the clients of one process share one (it is never modified: every round works on copies), so
# an in-process federation of N clients holds one base model, not N.
_BASES: Dict[int, MoEForCausalLM] = {}


def runtime(context: Context, run: Optional[RunConfig] = None) -> ClientRuntime:
    """This node's resources for the run, built on first use and kept resident."""
    key = (context.run_id, context.node_id)
    if key not in _RUNTIMES:
        run = run or RunConfig.from_mapping(dict(context.run_config))
        pid = int(context.node_config.get("partition-id", 0))
        num = int(context.node_config.get("num-partitions", 1))
        if context.run_id not in _BASES:
            # Frozen once here: copies share its non-expert tensors (round_copy), and training would otherwise
            # switch their requires_grad off in the shared base.
            _BASES[context.run_id] = build_model(run).requires_grad_(False)
        base = _BASES[context.run_id]
        plan = client_plan(run, base.config, run.budget_for(pid, context.node_config))
        train, ev = client_batches(run, pid, num, base.config.vocab_size)
        records = client_records(run, pid, num)[1] if run.eval_records and run.data != "synthetic" else {}
        _RUNTIMES[key] = ClientRuntime(run, pid, base, plan, train, ev, records, num_layers=len(base.moe_layers()))
    return _RUNTIMES[key]


def release(run_id: int) -> None:
    """Free the resources this process holds for a finished run."""
    for key in [k for k in _RUNTIMES if k[0] == run_id]:
        del _RUNTIMES[key]
    _BASES.pop(run_id, None)


# ------------------------------------------------------------------------------------------------ model state


def _profile_bits(run: RunConfig) -> Optional[int]:
    return run.profile_bits or None


def train_config(run: RunConfig):
    from flux_engine.training import TrainConfig

    # One seed for every client and round: an expert nobody has trained yet starts from the same LoRA factors on
    # every client (training keys the init by (seed, layer, expert)), so their average is meaningful.
    return TrainConfig(mode=run.mode, rank=run.lora_rank, alpha=run.lora_alpha, lr=run.lr, steps=run.local_steps,
                       micro_batch_size=run.batch_size, seed=run.seed)  # fmt: skip


# ------------------------------------------------------------------------------------------------ handlers


# Methods that choose experts by routing frequency and so profile their data (FedAvg-LoRA and FMQ train every
# expert and need no profile).
PROFILING_METHODS = ("flux", "fmd", "fmes")


def handle_profile(rt: ClientRuntime) -> RecordDict:
    """First contact: the budget plan and the routing-frequency prior (normalised routing frequencies of the base
    model; zero for methods that do not profile). The profile's seconds are charged to round 1, which nothing hides
    it behind."""
    L, E = rt.num_layers, rt.base.config.num_experts
    utilities = torch.zeros(L, E, dtype=torch.float64)
    if rt.run.method == "flux":
        utilities = roles.frequency_utility(rt.flux_client().first_profile().frequency)
    elif rt.run.method in PROFILING_METHODS:
        utilities = roles.frequency_utility(first_profile(rt).frequency)
    return RecordDict(
        {
            "plan": ConfigRecord({"B_tune": rt.plan.B_tune, "B_non": rt.plan.B_non, "partition-id": rt.partition_id}),
            "utilities": ArrayRecord({"utilities": utilities}),
        }
    )


def profile_batches(rt: ClientRuntime) -> List[dict]:
    """The training batches profiling reads: all of them, or the first ones holding ``profile-samples`` rows
    (routing statistics settle on a sample; the whole local dataset may be far larger)."""
    n = rt.run.profile_samples
    if n <= 0:
        return rt.train_batches
    out, rows = [], 0
    for b in rt.train_batches:
        if rows >= n:
            break
        out.append(b)
        rows += int(b["input_ids"].shape[0])
    return out


def round_batches(rt: ClientRuntime, round_: int) -> List[dict]:
    """This round's training batches: the client's batches rotated so that successive rounds continue through its
    data (``local-steps`` batches a round) instead of revisiting the first ones."""
    n = len(rt.train_batches)
    start = (max(round_ - 1, 0) * rt.run.local_steps) % n if n else 0
    return rt.train_batches[start:] + rt.train_batches[:start]


def first_profile(rt: ClientRuntime) -> Any:
    """A baseline's profile of the base model, computed on first use (its seconds wait in ``rt.profile_seconds``
    for round 1)."""
    if rt.profile is None:
        t0 = time.perf_counter()
        rt.profile = profiling.profile(rt.base, profile_batches(rt), bits=_profile_bits(rt.run))
        rt.profile_seconds = time.perf_counter() - t0
    return rt.profile


def _train_reply(rt: ClientRuntime, result: Any, utilities: torch.Tensor, t0: float, times: Dict[str, float]):
    """The train reply: trained tensors, routed-token counts (of the trained experts, and of every expert), utilities
    and metrics, with the measured terms of the time model (``times``: profile-seconds, profile-stale,
    merge-seconds, explore-seconds, pcie-bytes)."""
    losses = [float(x) for x in result.losses]
    return RecordDict(
        {
            "update": wire.pack_tensors(result.trained),
            "token_counts": wire.pack_counts({k: int(result.token_counts.get(k, 0)) for k in result.trained}),
            "utilities": ArrayRecord({"utilities": utilities}),
            # Who uses which expert, trained or not (the server's average-over "users").
            "routed": ArrayRecord({"routed": result.routed}),
            "metrics": MetricRecord(
                {
                    "train-loss": sum(losses) / len(losses) if losses else float("nan"),
                    "steps": int(result.steps),
                    "tokens": int(result.tokens),
                    "train-seconds": float(result.seconds),
                    "round-seconds": time.perf_counter() - t0,
                    "partition-id": rt.partition_id,
                    **times,
                }
            ),
        }
    )


def handle_train(rt: ClientRuntime, content: RecordDict, state: RecordDict) -> RecordDict:
    if rt.run.method != "flux":
        return handle_train_baseline(rt, content, state)
    t0 = time.perf_counter()
    rt.sync(content, state)
    cfg = content["config"]
    L, E = rt.num_layers, rt.base.config.num_experts
    tuning = wire.ids_to_mask(cfg["tuning"], L, E)
    # Exploration experts the server wants a forward-only utility estimate of (explore-mode "zo"; else none).
    explore = wire.ids_to_mask(cfg["explore"] if "explore" in cfg else [], L, E)
    round_ = int(cfg["round"])
    flux = rt.flux_client()
    out = flux.train(rt.global_tensors, tuning, explore, round_batches(rt, round_), round_)
    reply = _train_reply(rt, out.result, out.utilities, t0, {**out.times, "pcie-bytes": 0})
    # The idle window: the reply is ready. After the run's (or this chunk's) last round no round needs the profile.
    flux.profile_next(rt.global_tensors, round_, last=round_ >= (rt.run.stop_after or rt.run.num_rounds))
    return reply


def baseline_policy(rt: ClientRuntime) -> Any:
    """A baseline client's ``baselines.Policy``, built on first use from the base model (and the first-contact
    profile for FMD / FMES) and kept: in LoRA mode the base never changes, the global adapters go on top each
    round. The seconds building it took wait in ``rt.policy_seconds`` for the next training round."""
    if rt.policy is not None:
        return rt.policy
    run = rt.run
    profile = first_profile(rt) if run.method in PROFILING_METHODS else None
    options = {"fmq": {"bits": run.fmq_bits, "inplace": True}, "fmes": {"allocation": run.fmes_allocation,
               "inplace": True}, "fmd": {"staging_experts": run.fmd_staging_experts or None}}  # fmt: skip
    if run.structure_from and run.method == "fmes":
        from flux_engine import structure

        options["fmes"]["num_kept"] = structure.match(run.structure_from, rt.base.config, train_settings(run)).kept
    t0 = time.perf_counter()
    model = round_copy(rt.base)
    budget_bytes = rt.plan.budget_bytes
    if run.structure_from and run.method == "fmd":
        # Matched structure: FMD's math is FedAvg-LoRA's; every expert resident (its PCIe time is modelled apart).
        budget_bytes = baselines.fedavg_lora_memory(model.config, train_settings(run), 0).total
    rt.policy = baselines.make_policy(run.method, model, budget_bytes=budget_bytes,
                                      settings=train_settings(run), profile=profile,
                                      **options.get(run.method, {}))  # fmt: skip
    rt.policy_seconds = time.perf_counter() - t0
    return rt.policy


def handle_train_baseline(rt: ClientRuntime, content: RecordDict, state: RecordDict) -> RecordDict:
    """A baseline's round: its policy's tuning experts (those of them the server allows: ``config.tuning``) train
    through LoRA, resuming from the global adapters, on the policy's model (full, int4 or with experts dropped);
    FMD counts its PCIe fetches meanwhile."""
    from flux_engine.training import detach_tuning, train_round

    t0 = time.perf_counter()
    rt.sync(content, state)
    profile_seconds = rt.profile_seconds  # the first-contact profile, charged to the first round
    rt.profile_seconds = 0.0
    policy = baseline_policy(rt)
    prepare_seconds, rt.policy_seconds = rt.policy_seconds, 0.0
    allowed = wire.ids_to_mask(content["config"]["tuning"], rt.num_layers, rt.base.config.num_experts)
    tuning = [[e for e in ids if bool(allowed[l, e])] for l, ids in enumerate(policy.tuning)]
    keys = {(l, e) for l, ids in enumerate(tuning) for e in ids}
    init = {k: v for k, v in rt.global_tensors.items() if k in keys}
    batches = round_batches(rt, int(content["config"]["round"]))
    try:
        if policy.fetch is not None:
            policy.fetch.reset()
            with policy.fetch:
                result = train_round(policy.model, tuning, batches, train_config(rt.run), init)
        else:
            result = train_round(policy.model, tuning, batches, train_config(rt.run), init)
    finally:
        detach_tuning(policy.model)  # the adapters travel in the result; the kept model stays plain
    times = {"profile-seconds": profile_seconds, "profile-stale": 0, "merge-seconds": prepare_seconds,
             "explore-seconds": 0.0, "pcie-bytes": policy.pcie_bytes()}  # fmt: skip
    return _train_reply(rt, result, result.utilities, t0, times)


@torch.no_grad()
def handle_evaluate(rt: ClientRuntime, content: RecordDict, state: RecordDict) -> RecordDict:
    """The global model (every expert, nothing merged) on this client's held-out data: LM loss on its held-out
    batches and multiple-choice accuracy on its domains' test records."""
    from flux_engine.training import attach_tuning, detach_tuning

    rt.sync(content, state)
    if rt.run.method == "flux":
        model = round_copy(rt.base)
        apply_global(model, rt.global_tensors, rt.run.mode, rt.run.lora_alpha / rt.run.lora_rank)
    else:
        # A baseline's global model is its own: the adapters on its policy's model (int4 experts for FMQ, dropped
        # experts for FMES), attached rather than folded (packed weights cannot take them).
        policy = baseline_policy(rt)
        model = policy.model
        attach_tuning(model, policy.tuning, train_config(rt.run), rt.global_tensors)
    try:
        with evaluation.eval_context(rt.run.eval_precision, next(model.parameters()).device):
            loss, tokens = evaluation.heldout_loss(model, rt.eval_batches)
            # Records cut to seq-len, the length the model trains on (long ones would dominate the time).
            accuracy = evaluation.domain_accuracy(model, tokenizer(rt.run), rt.eval_records,
                                                  max_length=rt.run.seq_len)  # fmt: skip
    finally:
        if rt.run.method != "flux":
            detach_tuning(model)
    return RecordDict(
        {
            "metrics": MetricRecord({"eval-loss": loss, "num-tokens": tokens}),
            "accuracy": MetricRecord({d: a.accuracy for d, a in accuracy.items()}),
            "soft-accuracy": MetricRecord({d: a.soft for d, a in accuracy.items()}),
            "records": MetricRecord({d: a.records for d, a in accuracy.items()}),
        }
    )


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
