"""``FluxStrategy``: the Flower strategy of a Flux round. It holds no math: roles come from ``roles.assign_roles``,
the average from ``aggregation.aggregate``, and everything it knows lives in a ``ServerState`` saved after each round.

A round r (``start``):

1. ``configure_train``: sample clients (seeded by the state's RNG); ask clients never seen before for their budget
   and first profile (a ``query.profile`` message: ``B_tune`` and its routing-frequency prior); assign tuning
   experts per client from the utility table (stale by one round; measured Eq. 3 utilities and priors on one
   scale, ``roles.common_scale``) and each client's ``B_tune``: exploitation and exploration experts, all trained
   (explore-mode "train", the default; "zo": it only reports a forward-only utility estimate of the exploration
   experts); send each client its roles plus only the global tensors changed since it last synced. A baseline (run key ``method``) has no roles: every expert is allowed, the
   client's policy picks what it trains (``flux_engine.baselines``).
2. ``aggregate_train``: drop clients that failed or did not reply in time (a reply counts for the node its message
   was sent to: the SuperLink answers for a lost SuperNode with an error of its own), reject updates with a
   malformed field, that fail validation (shapes, finite values, token counts a client cannot have routed), touch
   experts the client was not assigned or hold a tensor far larger than its reference (``update-norm-bound``),
   average the rest per expert (``aggregation``; over the clients that routed tokens to it, from the routed
   counts each reply carries, or with ``average-over = "trainers"`` over those that trained it); with fewer than
   ``min-clients`` accepted updates, or fewer connected clients once the round timeout has passed, the round
   changes nothing and the run goes on. Each round's report (accepted, dropped with the reason, and per client
   the time model's inputs: download/upload bytes and the measured seconds it reported, ``clients``) is logged and
   kept in ``state.history``.
3. every ``evaluate-every`` rounds, ``configure_evaluate`` / ``aggregate_evaluate``: the global model on the
   clients' held-out data (LM loss; with ``eval-records``, multiple-choice accuracy per domain), pooled over
   clients (``flux_engine.evaluation``); round 0 (before any training) is evaluated too, into ``state.baseline``.
4. the state is checkpointed; ``--resume`` continues at round r + 1.
"""

from __future__ import annotations

import functools
import math
import time
from logging import INFO, WARNING
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore import log

from flux_engine.aggregation import (
    ClientUpdate,
    UpdateError,
    aggregate,
    expert_shapes,
    screen_updates,
    validate_update,
)
from flux_engine.evaluation import mean_accuracy, pool_accuracy, pool_loss
from flux_engine.federated import wire
from flux_engine.federated.config import RunConfig
from flux_engine.federated.state import ServerState
from flux_engine.models.config import MoEConfig
from flux_engine.roles import EpsilonSchedule, assign_roles
from flux_engine.timemodel import tensor_bytes
from flux_engine.training import initial_adapters

PROFILE_QUERY = f"{MessageType.QUERY}.profile"
# The time model's measured terms each client reports with its update (train reply metrics).
TIME_METRICS = ("profile-seconds", "profile-stale", "merge-seconds", "train-seconds", "explore-seconds", "pcie-bytes")


class FluxStrategy(Strategy):
    """Flux on Flower's Message API. ``state`` resumes a previous run (``ServerState.load``)."""

    def __init__(
        self,
        model_config: MoEConfig,
        run: RunConfig,
        state: Optional[ServerState] = None,
        on_round: Optional[Callable[[Dict], None]] = None,
    ):
        self.run = run
        self.on_round = on_round  # called with each round's report once it is checkpointed (progress bars)
        self.L = len(model_config.moe_layer_indices)
        self.E = model_config.num_experts
        rank = run.lora_rank if run.mode == "lora" else None
        self.shapes = expert_shapes(model_config.hidden_size, model_config.moe_intermediate_size, rank)
        # What a client holds for an expert no round has trained yet (average-over "users"): LoRA's seeded start;
        # full mode's is the base weights, which the server does not hold (its first average is the trainers').
        self._initial = (
            functools.partial(initial_adapters, run.seed, hidden=model_config.hidden_size,
                              intermediate=model_config.moe_intermediate_size, rank=run.lora_rank)
            if run.mode == "lora" else None
        )  # fmt: skip
        self.schedule = EpsilonSchedule.for_run(
            run.eps_0, run.eps_max, run.eps_ramp, run.num_rounds, run.eps_fixed if run.eps_fixed >= 0 else None
        )
        if state is None:
            state = ServerState(self.L, self.E, config=run.to_flower())
            state.rng.manual_seed(run.seed)
        self.state = state
        self._assigned: Dict[str, Set[Tuple[int, int]]] = {}  # this round's tuning experts per client
        self._download: Dict[str, int] = {}  # this round's training download per client (bytes, time model)
        self._dropped: Dict[str, str] = {}  # clients dropped while configuring this round
        self._skipped = ""  # why this round changes nothing although updates may be accepted (else "")
        self._sent: List[Message] = []  # this round's training messages (replies are matched to them)
        self._sent_evaluate: List[Message] = []
        self.evaluation: Dict = {}  # the last evaluation's summary (aggregate_evaluate)

    # ------------------------------------------------------------------------------------------ Strategy API

    def summary(self) -> None:
        log(INFO, "\t├── FluxStrategy: %d MoE layers x %d experts, %s mode", self.L, self.E, self.run.mode)
        log(
            INFO,
            "\t├── min clients %d, fraction %.2f, eps %s",
            self.run.min_clients,
            self.run.fraction_train,
            self.schedule,
        )
        if self.state.round > 0:
            log(INFO, "\t└── resuming after round %d", self.state.round)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Roles per client (Eq. 4) and the global tensors it lacks; ``arrays``/``config`` are unused (the global
        state lives in ``self.state``)."""
        self._dropped, self._sent = {}, []
        nodes = self._sample(grid)
        self._query_new(grid, [n for n in nodes if str(n) not in self.state.budgets])
        nodes = [n for n in nodes if str(n) in self.state.budgets]
        clients = [str(n) for n in nodes]
        zo = self.run.explore_mode == "zo"
        if self.run.method == "flux":
            # assign_roles counts rounds from 0 (eps_0 in the first round).
            roles = assign_roles(
                self.state.utilities.for_clients(clients),
                [self.state.budgets[c] for c in clients],
                round_t=server_round - 1,
                schedule=self.schedule,
                seed=self.run.seed,
                untried=self.state.utilities.untried(),
            )
            # "zo": the client trains the exploitation experts and only estimates the exploration experts' utility.
            plans = [(r.exploit if zo else r.tuning, r.explore if zo else None) for r in roles]
        else:
            # A baseline's client policy picks its experts (all of them, or the kept ones): any may be trained.
            plans = [(torch.ones(self.L, self.E, dtype=torch.bool), None)] * len(clients)
        self._assigned, self._download = {}, {}
        messages = []
        for node, client, (trained, explore) in zip(nodes, clients, plans):
            self._assigned[client] = {tuple(k) for k in torch.nonzero(trained).tolist()}
            delta = self._delta(client)
            self._download[client] = self._train_download_bytes(client)
            content = RecordDict(
                {
                    "config": ConfigRecord(
                        {
                            "round": server_round,
                            "tuning": wire.mask_to_ids(trained),
                            "explore": [] if explore is None else wire.mask_to_ids(explore),
                            **self._sync_config(client, server_round - 1),
                        }
                    ),
                    "global": wire.pack_tensors(delta),
                }
            )
            messages.append(
                Message(content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(server_round))
            )
        self._sent = messages
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> Tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        """Validate, drop, average; returns the global tensors and round metrics (None, metrics if not applied)."""
        t0 = time.perf_counter()
        dropped = dict(self._dropped)
        updates: List[ClientUpdate] = []
        losses: Dict[str, float] = {}
        times: Dict[str, Dict[str, float]] = {}
        metrics_of: Dict[str, Dict[str, float]] = {}
        for client, msg in self._attribute(replies, self._sent, server_round):
            if msg.has_error():
                dropped[client] = f"failed: {msg.error.reason}"
                continue
            try:
                update = self._parse_update(client, msg.content)
                metrics_of[client] = _train_metrics(client, msg.content)
            except UpdateError as e:
                dropped[client] = f"rejected, not averaged: {e}"
                continue
            updates.append(update)
        updates, outliers = screen_updates(self.state.global_tensors, updates, self.run.update_norm_bound)
        dropped.update({c: f"rejected, not averaged: client {c}, {reason}" for c, reason in outliers.items()})
        for update in updates:
            metrics = metrics_of[update.client]
            losses[update.client] = metrics.get("train-loss", math.nan)
            times[update.client] = {
                "download_bytes": self._download.get(update.client, 0),
                "upload_bytes": tensor_bytes(update.tensors, dtype_bytes=4),
                **{k.replace("-", "_"): metrics.get(k, 0.0) for k in TIME_METRICS},
            }
        for client in set(self._assigned) - {u.client for u in updates} - set(dropped):
            dropped[client] = "no reply before the round timeout"
        applied = len(updates) >= self.run.min_clients
        changed: List[Tuple[int, int]] = []
        if applied:
            new, changed = aggregate(self.state.global_tensors, updates, self.run.aggregation, self.run.trim_fraction,
                                     self.run.average_over, self._initial)  # fmt: skip
            bad = [k for k in changed if not all(torch.isfinite(t).all() for t in new[k].values())]
            if bad:
                # Finite updates can still overflow the stored dtype; a non-finite global model would end the run.
                self._skipped = f"the average of experts {bad} is not finite"
                applied, changed = False, []
            else:
                self.state.global_tensors = new
                for key in changed:
                    self.state.updated_round[key] = server_round
        for u in updates:
            if u.utilities is not None:
                self.state.utilities.update(u.client, u.utilities)
            # It holds every tensor changed before this round (the delta it was sent).
            self.state.last_sync[u.client] = server_round - 1
        report = {
            "round": server_round,
            "applied": applied,
            "accepted": sorted(u.client for u in updates),
            "dropped": dropped,
            "experts_changed": len(changed),
            **({"skipped": self._skipped} if self._skipped else {}),
            "train_loss": losses,
            "clients": times,
            "aggregate_seconds": time.perf_counter() - t0,
        }
        self.state.history.append(report)
        for client, reason in sorted(dropped.items()):
            # Whatever it holds now is unknown: resend the full global state next time.
            self.state.last_sync.pop(client, None)
            log(WARNING, "round %d: client %s dropped (%s)", server_round, client, reason)
        if self._skipped:
            log(WARNING, "round %d: %s: global model unchanged", server_round, self._skipped)
        elif not applied:
            log(
                WARNING,
                "round %d: %d accepted updates, min-clients %d: global model unchanged",
                server_round,
                len(updates),
                self.run.min_clients,
            )
        finite = [v for v in losses.values() if math.isfinite(v)]
        metrics = MetricRecord(
            {
                "clients-accepted": len(updates),
                "clients-dropped": len(dropped),
                "experts-changed": len(changed),
                "train-loss": sum(finite) / len(finite) if finite else math.nan,
            }
        )
        return (wire.pack_tensors(self.state.global_tensors) if applied else None), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        every = self.run.evaluate_every
        self._sent_evaluate = []
        if every <= 0 or server_round % every:
            return []
        messages = []
        for node in sorted(grid.get_node_ids()):
            client = str(node)
            sync = self._sync_config(client, server_round)
            content = RecordDict(
                {
                    "config": ConfigRecord({"round": server_round, **sync}),
                    "global": wire.pack_tensors(self._delta(client)),
                }
            )
            messages.append(
                Message(content, dst_node_id=node, message_type=MessageType.EVALUATE, group_id=str(server_round))
            )
        self._sent_evaluate = messages
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Optional[MetricRecord]:
        """Pool the clients' held-out loss and per-domain accuracy; the summary is kept in ``self.evaluation`` (a
        dict: ``eval_loss``, ``accuracy``, ``soft_accuracy`` and ``eval_records`` per domain, ``accuracy_mean``,
        ``soft_accuracy_mean``, ``eval_failed``)."""
        losses, accuracies, softs, failed = [], [], [], {}
        for client, msg in self._attribute(replies, self._sent_evaluate, server_round):
            if msg.has_error():
                failed[client] = msg.error.reason
                log(WARNING, "round %d: evaluation failed on client %s (%s)", server_round, client, msg.error.reason)
                self.state.last_sync.pop(client, None)
                continue
            try:
                loss, accuracy, soft = self._parse_evaluation(msg.content)
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                failed[client] = f"bad evaluation reply ({_reason(e)})"
                log(WARNING, "round %d: bad evaluation reply from %s (%s)", server_round, client, e)
                self.state.last_sync.pop(client, None)
                continue
            losses.append(loss)
            accuracies.append(accuracy)
            softs.append(soft)
            self.state.last_sync[client] = server_round
        loss, tokens = pool_loss(losses)
        pooled = pool_accuracy(accuracies)
        if not tokens and not pooled:
            self.evaluation = {"eval_failed": failed} if failed else {}
            return None
        accuracy = {d: acc for d, (acc, _) in pooled.items()}
        soft = {d: acc for d, (acc, _) in pool_accuracy(softs).items()}
        self.evaluation = {
            "eval_loss": loss,
            "accuracy": accuracy,
            "eval_records": {d: n for d, (_, n) in pooled.items()},
            "accuracy_mean": mean_accuracy(accuracy),
            "eval_failed": failed,
        }
        if soft:
            self.evaluation.update(soft_accuracy=soft, soft_accuracy_mean=mean_accuracy(soft))
        return MetricRecord(
            {"eval-loss": loss, "num-tokens": tokens, "accuracy-mean": self.evaluation["accuracy_mean"],
             **{f"accuracy/{d}": a for d, a in accuracy.items()}}
        )  # fmt: skip

    def start(
        self,
        grid: Grid,
        initial_arrays: Optional[ArrayRecord] = None,
        num_rounds: Optional[int] = None,
        timeout: Optional[float] = None,
        train_config: Optional[ConfigRecord] = None,
        evaluate_config: Optional[ConfigRecord] = None,
        evaluate_fn=None,
    ) -> Result:
        """``Strategy.start`` made resumable: rounds ``state.round + 1 .. num_rounds``, the state checkpointed to
        ``run.state_dir`` after each. The other arguments exist for the base signature and are unused: clients hold
        the base model, and the round settings come from ``run``."""
        num_rounds = self.run.num_rounds if num_rounds is None else num_rounds
        timeout = self.run.round_timeout if timeout is None else timeout
        log(INFO, "Starting FluxStrategy:")
        self.summary()
        result = Result()
        if self.state.round == 0 and self.run.evaluate_every > 0:
            # Round 0: the model before any training, the start of every accuracy curve.
            self.state.baseline = self._evaluate(grid, 0, result, timeout)
        for r in range(self.state.round + 1, num_rounds + 1):
            log(INFO, "[ROUND %s/%s]", r, num_rounds)
            t_round = time.perf_counter()
            replies = grid.send_and_receive(
                self.configure_train(r, ArrayRecord(), ConfigRecord(), grid), timeout=timeout
            )
            arrays, metrics = self.aggregate_train(r, replies)
            if arrays is not None:
                result.arrays = arrays
            result.train_metrics_clientapp[r] = metrics
            log(INFO, "\t└──> %s", metrics)
            report = self.state.history[-1]
            report["train_seconds"] = time.perf_counter() - t_round
            if self.run.evaluate_every > 0 and r % self.run.evaluate_every == 0:
                report.update(self._evaluate(grid, r, result, timeout))
            self.state.round = r
            report["seconds"] = time.perf_counter() - t_round
            self.state.save(self.run.state_dir)
            if self.on_round is not None:
                self.on_round(report)
        return result

    # ------------------------------------------------------------------------------------------ helpers

    def _evaluate(self, grid: Grid, server_round: int, result: Result, timeout: float) -> Dict:
        """One evaluation round on every client -> its summary (``aggregate_evaluate``) with ``eval_seconds``."""
        t0 = time.perf_counter()
        msgs = list(self.configure_evaluate(server_round, ArrayRecord(), ConfigRecord(), grid))
        ev = self.aggregate_evaluate(server_round, grid.send_and_receive(msgs, timeout=timeout))
        if ev is not None:
            result.evaluate_metrics_clientapp[server_round] = ev
            log(INFO, "\t└──> %s", ev)
        return {**self.evaluation, "eval_seconds": time.perf_counter() - t0}

    def _sample(self, grid: Grid) -> List[int]:
        """Wait (up to the round timeout) for ``min-clients`` nodes, then draw ``ceil(fraction * N)`` of them. With
        fewer connected by then, nobody: the round changes nothing (``_skipped`` says why), and the next round
        waits again (a lost SuperNode may be back)."""
        deadline = time.monotonic() + self.run.round_timeout
        self._skipped = ""
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= self.run.min_clients:
                break
            if time.monotonic() > deadline:
                self._skipped = f"only {len(nodes)} clients connected, min-clients is {self.run.min_clients}"
                return []
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        n = min(len(nodes), max(self.run.min_clients, math.ceil(self.run.fraction_train * len(nodes))))
        pick = torch.randperm(len(nodes), generator=self.state.rng)[:n]
        return [nodes[i] for i in sorted(pick.tolist())]

    def _query_new(self, grid: Grid, nodes: List[int]) -> None:
        """First contact: each client's ``B_tune`` and round-1 utilities (its normalised routing frequencies)."""
        if not nodes:
            return
        msgs = [
            Message(RecordDict({"config": ConfigRecord({"round": 0})}), dst_node_id=n, message_type=PROFILE_QUERY)
            for n in nodes
        ]
        answered = set()
        replies = grid.send_and_receive(msgs, timeout=self.run.round_timeout)
        for client, msg in self._attribute(replies, msgs, 0):
            answered.add(client)
            if msg.has_error():
                self._dropped[client] = f"profile query failed: {msg.error.reason}"
                continue
            try:
                budget = _int_field(_record(msg.content, "plan", ConfigRecord), "B_tune", "plan")
                u = _record(msg.content, "utilities", ArrayRecord).to_torch_state_dict()["utilities"]
                if budget < 0:
                    raise UpdateError(f"B_tune must be >= 0, got {budget}")
                self.state.utilities.set_prior(client, u)
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                self._dropped[client] = f"profile reply rejected: {_reason(e)}"
                continue
            self.state.budgets[client] = budget
        for n in nodes:
            if str(n) not in answered:
                self._dropped[str(n)] = "no reply to the profile query"

    def _sync_config(self, client: str, synced: int) -> Dict[str, int]:
        """``since``: the round the delta starts after; ``synced``: the round the client holds once it is applied."""
        return {"since": self.state.last_sync.get(client, 0), "synced": synced}

    def _delta(self, client: str, since: Optional[int] = None):
        """Global tensors changed after round ``since`` (default: the client's last sync; all of them for a new
        client)."""
        since = self.state.last_sync.get(client, 0) if since is None else since
        return {k: v for k, v in self.state.global_tensors.items() if self.state.updated_round.get(k, 0) > since}

    def _train_download_bytes(self, client: str) -> int:
        """Bytes (fp32) of the global tensors changed since the client last trained: what a training round must
        send it. Not ``_delta``'s bytes, which also shrink when an evaluation round synced the client (evaluation
        is a measurement, outside the time model)."""
        # A client that trained in round s started it from round s - 1's state: round s's aggregate is new to it.
        trained = [h["round"] for h in self.state.history if client in h.get("accepted", ())]
        return tensor_bytes(self._delta(client, since=trained[-1] - 1 if trained else 0), dtype_bytes=4)

    def _attribute(
        self, replies: Iterable[Message], sent: List[Message], server_round: int
    ) -> List[Tuple[str, Message]]:
        """``(client, reply)`` for each reply, the client being the node its message was sent to (matched by
        ``reply_to_message_id``; the grid set the sent messages' ids when it pushed them), not the reply's sender:
        for a lost SuperNode the SuperLink replies an error of its own, from its own node id. A reply to no message
        of ours, or a second reply, is ignored."""
        to = {m.metadata.message_id: str(m.metadata.dst_node_id) for m in sent}
        out: List[Tuple[str, Message]] = []
        for msg in replies:
            client = to.pop(msg.metadata.reply_to_message_id, None)
            if client is None:
                log(WARNING, "round %d: ignored a reply (from node %s) to no pending message", server_round,
                    msg.metadata.src_node_id)  # fmt: skip
                continue
            out.append((client, msg))
        return out

    def _max_tokens(self) -> int:
        """The most tokens one client can route to one expert in a round: one per position of the ``local-steps``
        batches of ``batch-size`` rows of ``seq-len`` tokens it trains on (each token picks an expert once)."""
        return self.run.local_steps * self.run.batch_size * self.run.seq_len

    def _parse_update(self, client: str, content: RecordDict) -> ClientUpdate:
        try:
            tensors = wire.unpack_tensors(_record(content, "update", ArrayRecord), client)
            counts = wire.unpack_counts(_record(content, "token_counts", ConfigRecord), client)
            u = routed = None
            if "utilities" in content:
                u = _record(content, "utilities", ArrayRecord).to_torch_state_dict().get("utilities")
            if "routed" in content:
                routed = _record(content, "routed", ArrayRecord).to_torch_state_dict().get("routed")
        except UpdateError as e:
            who = f"client {client}"
            raise UpdateError(str(e) if str(e).startswith(who) else f"{who}: {e}") from None
        except KeyError as e:
            raise UpdateError(f"client {client}: reply lacks record {e}") from None
        except (TypeError, ValueError, AttributeError, RuntimeError) as e:
            raise UpdateError(f"client {client}: malformed reply ({type(e).__name__}: {e})") from None
        update = ClientUpdate(client, tensors, counts, u, routed)
        validate_update(update, self.shapes, self.L, self.E, max_tokens=self._max_tokens())
        extra = sorted(set(tensors) - self._assigned.get(client, set()))
        if extra:
            raise UpdateError(f"client {client}: trained experts it was not assigned: {extra}")
        return update

    def _parse_evaluation(self, content: RecordDict):
        """``((eval loss, tokens), {domain: (accuracy, records)}, {domain: (soft accuracy, records)})`` of an
        evaluation reply; ValueError (or KeyError / TypeError) for a field that is missing, of the wrong type, or out
        of range: a loss that is not finite and >= 0, more tokens than the client's data holds
        (``samples-per-client`` rows of ``seq-len``), an accuracy outside [0, 1] or more records than
        ``eval-records``."""
        m = _record(content, "metrics", MetricRecord)
        loss, tokens = _number(m, "eval-loss", "metrics"), _int_field(m, "num-tokens", "metrics")
        if not (math.isfinite(loss) and loss >= 0):
            raise ValueError(f"eval-loss must be finite and >= 0, got {loss}")
        if not 0 <= tokens <= self.run.samples_per_client * self.run.seq_len:
            raise ValueError(f"num-tokens {tokens} is outside [0, samples-per-client x seq-len]")
        acc = _record(content, "accuracy", MetricRecord) if "accuracy" in content else {}
        n = _record(content, "records", MetricRecord) if "records" in content else {}
        accuracy = {d: (_number(acc, d, "accuracy"), _int_field(n, d, "records")) for d in acc}
        soft = _record(content, "soft-accuracy", MetricRecord) if "soft-accuracy" in content else {}
        soft = {d: (_number(soft, d, "soft-accuracy"), _int_field(n, d, "records")) for d in soft}
        for d, (a, k) in [*accuracy.items(), *soft.items()]:
            if not (0.0 <= a <= 1.0 and 0 <= k <= self.run.eval_records):
                raise ValueError(f"domain {d!r}: accuracy {a} outside [0, 1] or {k} records outside [0, eval-records]")
        return (loss, tokens), accuracy, soft


def _reason(e: Exception) -> str:
    """A rejected reply's reason for the round report."""
    if isinstance(e, KeyError):
        return f"lacks {e}"
    return str(e) if isinstance(e, UpdateError) else f"{type(e).__name__}: {e}"


def _record(content: RecordDict, name: str, kind: type):
    """``content[name]``, which must be a ``kind`` record (KeyError when absent)."""
    record = content[name]
    if not isinstance(record, kind):
        raise UpdateError(f"record {name!r} is a {type(record).__name__}, not a {kind.__name__}")
    return record


def _number(record, key: str, where: str) -> float:
    """``record[key]`` as a float; it must be an int or a float (not a bool, a string or a list)."""
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UpdateError(f"{where} {key!r} must be a number, got {value!r}")
    return float(value)


def _int_field(record, key: str, where: str) -> int:
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise UpdateError(f"{where} {key!r} must be an int, got {value!r}")
    return value


def _train_metrics(client: str, content: RecordDict) -> Dict[str, float]:
    """The numbers the round report keeps from a train reply's ``metrics``: ``train-loss`` (NaN allowed) and the
    time model's terms (``TIME_METRICS``: finite, >= 0); absent ones are left out. UpdateError for any other."""
    if "metrics" not in content:
        return {}
    try:
        m = _record(content, "metrics", MetricRecord)
        out = {k: _number(m, k, "metric") for k in ("train-loss", *TIME_METRICS) if k in m}
    except UpdateError as e:
        raise UpdateError(f"client {client}: {e}") from None
    bad = [k for k in TIME_METRICS if k in out and not (math.isfinite(out[k]) and out[k] >= 0)]
    if bad:
        raise UpdateError(f"client {client}: metric {bad[0]!r} must be finite and >= 0, got {out[bad[0]]}")
    return out
