"""N clients in one process.

``run_local`` (default, tests, ``flux-engine demo``/``run``): the same ``ServerApp`` and ``ClientApp`` objects that
``flwr run`` deploys, wired through ``LocalGrid``, an implementation of Flower's public ``Grid`` interface that
hands each message to the ClientApp of its node, one client after another. No Ray, no sockets: Flower 1.42's
Simulation Runtime has a single backend, Ray, which is too heavy for 2-core CI (3 clients x 2 rounds of the tiny
model: 17.6 s under Ray, 1.5 s here, same apps). Each node runs its messages on a thread of its own, so the round
timeout holds as in a deployment: a client that hangs is left behind, without a reply, once the timeout passes.

``run_ray``: Flower's Simulation Runtime (``flwr.simulation.run_simulation``, needs ``pip install "flwr[simulation]"``,
i.e. ray 2.55 with CPU wheels).
"""

from __future__ import annotations

import itertools
import queue
import threading
import traceback
import uuid
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from logging import WARNING
from typing import Callable, Dict, Iterable, List, Mapping, Optional

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log
from flwr.supercore.task_identity import TaskIdentity

from flux_engine.federated.config import ConfigError, RunConfig
from flux_engine.federated.state import ServerState

_RUN_IDS = itertools.count(1)


class LocalGrid(Grid):
    """A ``Grid`` whose nodes are ClientApps in this process. Node ``i`` (ids 1..N) gets node config
    ``partition-id = i - 1``, ``num-partitions = N`` (as in Flower's simulation) plus ``node_configs[i - 1]``.
    A ClientApp that raises becomes an error reply, as under Flower's runtimes.

    ``send_and_receive`` runs the messages one after another, as if the clients ran side by side: each message
    gets ``timeout`` seconds from its own start (in a deployment every client starts at once and has the whole
    timeout). A node works through its messages in order on one daemon thread, like a SuperNode: a message to a
    node still stuck in an earlier one waits behind it (and times out too); a reply that comes too late is
    dropped. Running them one at a time keeps the clients' measured seconds free of each other's load."""

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        run_config: Mapping,
        node_configs: Optional[List[Mapping]] = None,
        run_id: int = 1,
    ):
        self.client_app = client_app
        self.contexts: Dict[int, Context] = {}
        for i in range(num_nodes):
            node_config = {
                "partition-id": i,
                "num-partitions": num_nodes,
                **dict((node_configs or [{}] * num_nodes)[i]),
            }
            self.contexts[i + 1] = Context(
                run_id=run_id, node_id=i + 1, node_config=node_config, state=RecordDict(), run_config=dict(run_config)
            )
        self._replies: Dict[str, Message] = {}
        self._pending: Dict[str, Future] = {}
        self._workers: Dict[int, queue.SimpleQueue] = {}
        self._run = None

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: Optional[float] = None
    ) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            # Flower's runtimes assign message ids when a message is pushed; replies point back to them.
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            done: Future = Future()
            self._worker(msg.metadata.dst_node_id).put((msg, done))
            self._pending[msg.metadata.message_id] = done
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies that have arrived (each handed out once)."""
        for i in message_ids:
            done = self._pending.get(i)
            if done is not None and done.done():
                self._replies[i] = self._pending.pop(i).result()
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: Optional[float] = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            (mid,) = self.push_messages([msg])
            try:
                self._pending[mid].result(timeout=timeout)
            except FutureTimeout:
                # Left behind: its reply, should it come, is never pulled.
                log(WARNING, "node %s: no reply within the round timeout (%s s)", msg.metadata.dst_node_id, timeout)
                self._pending.pop(mid)
                continue
            replies += self.pull_messages([mid])
        return replies

    def _worker(self, node_id: int) -> "queue.SimpleQueue":
        """The queue of ``node_id``'s thread, started on first use."""
        if node_id not in self._workers:
            jobs: queue.SimpleQueue = queue.SimpleQueue()
            # Daemon: a ClientApp hung for good must not keep the process alive after the run.
            threading.Thread(target=self._serve, args=(node_id, jobs), daemon=True, name=f"node-{node_id}").start()
            self._workers[node_id] = jobs
        return self._workers[node_id]

    def _serve(self, node_id: int, jobs: "queue.SimpleQueue") -> None:
        while True:
            msg, done = jobs.get()
            if msg is None:
                return
            try:
                reply = self.client_app(msg, self.contexts[node_id])
            except BaseException as e:  # noqa: BLE001 - a failing client (even sys.exit) is reported, not fatal
                log(WARNING, "ClientApp of node %s raised:\n%s", node_id, traceback.format_exc())
                reason = f"{type(e).__name__}: {e}"
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
            done.set_result(reply)

    def close(self) -> None:
        """Stop the node threads once their current message is done (a hung one stays behind, a daemon)."""
        for jobs in self._workers.values():
            jobs.put((None, None))
        self._workers.clear()


def run_local(
    run: RunConfig,
    server_app: Optional[ServerApp] = None,
    client_app: Optional[ClientApp] = None,
    node_configs: Optional[List[Mapping]] = None,
    on_round: Optional[Callable[[Dict], None]] = None,
) -> ServerState:
    """Run the federation in this process with ``run.num_clients`` clients; returns the final server state (as
    checkpointed after the last round)."""
    from flux_engine.federated.app import make_server_app
    from flux_engine.federated.client import make_client_app, release

    if run.num_clients < run.min_clients:
        raise ConfigError(
            f"num-clients {run.num_clients} < min-clients {run.min_clients}: the server would wait forever"
        )
    server_app = server_app or make_server_app(on_round=on_round)
    client_app = client_app or make_client_app()
    cfg = run.to_flower()
    run_id = next(_RUN_IDS)  # a fresh run: clients build their resources anew
    grid = LocalGrid(client_app, run.num_clients, cfg, node_configs, run_id=run_id)
    # Messages take their sender from the process's task identity, which Flower's runtimes set (as run_simulation
    # does for its in-process ServerApp).
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
    context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=cfg)
    try:
        server_app(grid, context)
    finally:
        grid.close()
        release(run_id)
    return ServerState.load(run.state_dir)


def run_ray(run: RunConfig, backend_config: Optional[dict] = None) -> None:
    """Run the federation under Flower's Simulation Runtime (Ray backend)."""
    from flwr.simulation import run_simulation

    from flux_engine.federated.app import make_server_app
    from flux_engine.federated.client import make_client_app

    # run_simulation passes no run config to the apps: they take ``run`` directly.
    run_simulation(
        server_app=make_server_app(run),
        client_app=make_client_app(run),
        num_supernodes=run.num_clients,
        backend_config=backend_config or {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
