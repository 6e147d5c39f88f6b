"""The thin federated layer on Flower (``flwr==1.42.0``): it moves messages and calls the algorithms, no math here.

Flower API used (Message API, checked against the installed 1.42.0 source):

- ``flwr.serverapp.ServerApp`` with ``@app.main()`` ``main(grid, context)``; ``flwr.serverapp.strategy.Strategy``
  subclassed by ``FluxStrategy`` (``configure_train``, ``aggregate_train``, ``configure_evaluate``,
  ``aggregate_evaluate``, ``summary``; ``start`` overridden to resume from a checkpointed round, since the base
  ``start`` always counts from round 1); ``flwr.serverapp.Grid`` (``get_node_ids``, ``send_and_receive``).
- ``flwr.clientapp.ClientApp`` with ``@app.train()``, ``@app.evaluate()`` and ``@app.query("profile")``
  (message type ``"query.profile"``: first contact, the client's budget and first profile).
- ``flwr.app``: ``Message(content, dst_node_id=, message_type=, group_id=)`` / ``Message(content, reply_to=msg)``,
  ``RecordDict`` of ``ArrayRecord`` (torch tensors), ``ConfigRecord``, ``MetricRecord``; ``Context``
  (``run_config``, ``node_config`` with ``partition-id``/``num-partitions`` in simulation).
- Simulation: ``flwr.simulation.run_simulation`` (deprecated in favour of ``flwr run``) and ``flwr run`` with a
  local SuperLink both go through the Simulation Runtime, whose only backend in 1.42 is Ray (``flwr[simulation]``
  adds ray 2.55 + jsonschema/msgpack; CPU wheels, no CUDA). Ray is too heavy for 2-core CI, so tests and the CLI use
  ``simulation.LocalGrid``: Flower's public ``Grid`` interface, delivering each message to the ClientApp in-process.
  ``simulation.run_ray`` uses the real runtime.
- Deployment: ``flwr run .`` reads ``[tool.flwr.app]`` in pyproject.toml (``publisher``, ``components.serverapp``
  = ``flux_engine.federated.app:serverapp``, ``components.clientapp``, ``config`` = run config keys of
  ``config.RunConfig``); ``flower-superlink`` + ``flower-supernode --node-config "memory-budget='24GiB' ..."``
  run the same apps on many machines. Per-client budgets travel as node config.

Modules: ``config`` (run config keys), ``state`` (atomic server checkpoints), ``wire`` (tensors in records),
``strategy`` (``FluxStrategy``), ``client`` (``make_client_app``), ``app`` (``serverapp``/``clientapp``),
``simulation`` (``run_local``, ``run_ray``).
"""

from flux_engine.federated.config import ConfigError, RunConfig
from flux_engine.federated.state import ServerState, StateError

__all__ = ["ConfigError", "RunConfig", "ServerState", "StateError"]
