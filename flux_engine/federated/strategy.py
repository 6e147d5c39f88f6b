"""``FluxStrategy``: the Flower strategy of a Flux round. It holds no math: roles come from ``roles.assign_roles``,
the average from ``aggregation.aggregate``, and everything it knows lives in a ``ServerState`` saved after each round.

A round r (``start``):

1. ``configure_train``: sample clients (seeded by the state's RNG); ask clients never seen before for their budget
   and first profile (a ``query.profile`` message: ``B_tune`` and round-1 utilities = normalised frequencies);
   assign tuning experts per client from the utility table (stale by one round) and each client's ``B_tune``:
   exploitation experts it trains and exploration experts (explore-mode "zo": it reports a forward-only utility
   estimate of them; "train": it trains them too); send each client its roles plus only the global tensors
   changed since it last synced. A baseline (run key ``method``) has no roles: every expert is allowed, the
   client's policy picks what it trains (``flux_engine.baselines``).
2. ``aggregate_train``: drop clients that failed or did not reply in time, reject updates that fail validation or
   touch experts the client was not assigned, average the rest per expert; with fewer than ``min-clients``
   accepted updates the round changes nothing. Each round's report (accepted, dropped with the reason, and per
   client the time model's inputs: download/upload bytes and the measured seconds it reported, ``clients``) is
   logged and kept in ``state.history``.
3. every ``evaluate-every`` rounds, ``configure_evaluate`` / ``aggregate_evaluate``: the global model on the
   clients' held-out data (LM loss; with ``eval-records``, multiple-choice accuracy per domain), pooled over
   clients (``flux_engine.evaluation``); round 0 (before any training) is evaluated too, into ``state.baseline``.
4. the state is checkpointed; ``--resume`` continues at round r + 1.
"""

from __future__ import annotations

import math
import time
from logging import INFO, WARNING
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore import log

from flux_engine.aggregation import ClientUpdate, UpdateError, aggregate, expert_shapes, validate_update
from flux_engine.evaluation import mean_accuracy, pool_accuracy, pool_loss
from flux_engine.federated import wire
from flux_engine.federated.config import RunConfig
from flux_engine.federated.state import ServerState
from flux_engine.models.config import MoEConfig
from flux_engine.roles import EpsilonSchedule, assign_roles
from flux_engine.timemodel import tensor_bytes

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
        self.schedule = EpsilonSchedule(
            run.eps_0, run.d_eps, run.eps_max, run.eps_fixed if run.eps_fixed >= 0 else None
        )
        if state is None:
            state = ServerState(self.L, self.E, config=run.to_flower())
            state.rng.manual_seed(run.seed)
        self.state = state
        self._assigned: Dict[str, Set[Tuple[int, int]]] = {}  # this round's tuning experts per client
        self._download: Dict[str, int] = {}  # this round's training download per client (bytes, time model)
        self._dropped: Dict[str, str] = {}  # clients dropped while configuring this round
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
        self._dropped = {}
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
        for msg in replies:
            client = str(msg.metadata.src_node_id)
            if msg.has_error():
                dropped[client] = f"failed: {msg.error.reason}"
                continue
            try:
                update = self._parse_update(client, msg.content)
            except UpdateError as e:
                dropped[client] = f"rejected, not averaged: {e}"
                continue
            updates.append(update)
            metrics = msg.content["metrics"] if "metrics" in msg.content else {}
            losses[client] = float(metrics.get("train-loss", math.nan))
            times[client] = {
                "download_bytes": self._download.get(client, 0),
                "upload_bytes": tensor_bytes(update.tensors, dtype_bytes=4),
                **{k.replace("-", "_"): float(metrics.get(k, 0.0)) for k in TIME_METRICS},
            }
        for client in set(self._assigned) - {u.client for u in updates} - set(dropped):
            dropped[client] = "no reply before the round timeout"
        applied = len(updates) >= self.run.min_clients
        changed: List[Tuple[int, int]] = []
        if applied:
            self.state.global_tensors, changed = aggregate(self.state.global_tensors, updates)
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
            "train_loss": losses,
            "clients": times,
            "aggregate_seconds": time.perf_counter() - t0,
        }
        self.state.history.append(report)
        for client, reason in sorted(dropped.items()):
            # Whatever it holds now is unknown: resend the full global state next time.
            self.state.last_sync.pop(client, None)
            log(WARNING, "round %d: client %s dropped (%s)", server_round, client, reason)
        if not applied:
            log(
                WARNING,
                "round %d: %d accepted updates < min-clients %d: global model unchanged",
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
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Optional[MetricRecord]:
        """Pool the clients' held-out loss and per-domain accuracy; the summary is kept in ``self.evaluation`` (a
        dict: ``eval_loss``, ``accuracy``, ``soft_accuracy`` and ``eval_records`` per domain, ``accuracy_mean``,
        ``soft_accuracy_mean``, ``eval_failed``)."""
        losses, accuracies, softs, failed = [], [], [], {}
        for msg in replies:
            client = str(msg.metadata.src_node_id)
            if msg.has_error():
                failed[client] = msg.error.reason
                log(WARNING, "round %d: evaluation failed on client %s (%s)", server_round, client, msg.error.reason)
                self.state.last_sync.pop(client, None)
                continue
            try:
                m = msg.content["metrics"]
                loss = (float(m["eval-loss"]), int(m["num-tokens"]))
                acc = msg.content["accuracy"] if "accuracy" in msg.content else {}
                n = msg.content["records"] if "records" in msg.content else {}
                accuracy = {d: (float(acc[d]), int(n[d])) for d in acc}
                soft = msg.content["soft-accuracy"] if "soft-accuracy" in msg.content else {}
                soft = {d: (float(soft[d]), int(n[d])) for d in soft}
            except (KeyError, TypeError, ValueError) as e:
                failed[client] = f"bad evaluation reply ({type(e).__name__}: {e})"
                log(WARNING, "round %d: bad evaluation reply from %s (%s)", server_round, client, e)
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
        """Wait (up to the round timeout) for ``min-clients`` nodes, then draw ``ceil(fraction * N)`` of them."""
        deadline = time.monotonic() + self.run.round_timeout
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= self.run.min_clients:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(nodes)} clients connected, min-clients is {self.run.min_clients}")
            time.sleep(1.0)
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
        for msg in grid.send_and_receive(msgs, timeout=self.run.round_timeout):
            client = str(msg.metadata.src_node_id)
            answered.add(client)
            if msg.has_error():
                self._dropped[client] = f"profile query failed: {msg.error.reason}"
                continue
            try:
                u = msg.content["utilities"].to_torch_state_dict()["utilities"]
                self.state.utilities.update(client, u)
            except (KeyError, UpdateError) as e:
                self._dropped[client] = f"profile reply rejected: {e}"
                continue
            self.state.budgets[client] = int(msg.content["plan"]["B_tune"])
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

    def _parse_update(self, client: str, content: RecordDict) -> ClientUpdate:
        try:
            tensors = wire.unpack_tensors(content["update"], client)
            counts = wire.unpack_counts(content["token_counts"], client)
            u = content["utilities"].to_torch_state_dict().get("utilities") if "utilities" in content else None
        except KeyError as e:
            raise UpdateError(f"client {client}: reply lacks record {e}") from None
        update = ClientUpdate(client, tensors, counts, u)
        validate_update(update, self.shapes, self.L, self.E)
        extra = sorted(set(tensors) - self._assigned.get(client, set()))
        if extra:
            raise UpdateError(f"client {client}: trained experts it was not assigned: {extra}")
        return update
