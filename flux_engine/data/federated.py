"""Seeded train/test splits and client partitions of records for federated experiments."""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple, Union

import numpy as np

from flux_engine.data.records import Record, stable_seed

SCHEMES = ("domain", "dirichlet", "natural")


def _group(records: Sequence[Record], key: Callable[[Record], str]) -> Dict[str, List[Record]]:
    """Records by ``key``, groups in sorted key order and records sorted by id, so results depend only on
    the set of records and not on the order they were loaded in."""
    groups: Dict[str, List[Record]] = {}
    for r in sorted(records, key=lambda r: r.id):
        groups.setdefault(key(r), []).append(r)
    return dict(sorted(groups.items()))


def _check_unique_ids(records: Sequence[Record]) -> None:
    seen = set()
    for r in records:
        if r.id in seen:
            raise ValueError(f"record ids must be unique; {r.id!r} occurs more than once")
        seen.add(r.id)


def train_test_split(
    records: Sequence[Record], test_size: Union[float, int] = 0.2, seed: int = 0
) -> Tuple[List[Record], List[Record]]:
    """Disjoint ``(train, test)``, split separately within every task/subtask.

    ``test_size``: a fraction in (0, 1) of each task/subtask (rounded), or a count per task/subtask (capped at
    its size). Each task's shuffle is seeded by ``seed`` and the task's name, so adding or removing other
    tasks never changes which of its records are held out.
    """
    if isinstance(test_size, float):
        if not 0.0 < test_size < 1.0:
            raise ValueError(f"a fractional test_size must lie in (0, 1), got {test_size}")
    elif not isinstance(test_size, int) or isinstance(test_size, bool) or test_size < 0:
        raise ValueError(f"test_size must be a fraction or a non-negative count, got {test_size!r}")
    _check_unique_ids(records)
    train: List[Record] = []
    test: List[Record] = []
    for source, group in _group(records, lambda r: r.source).items():
        order = np.random.default_rng(stable_seed("split", seed, source)).permutation(len(group))
        n_test = round(test_size * len(group)) if isinstance(test_size, float) else min(test_size, len(group))
        test += [group[i] for i in order[:n_test]]
        train += [group[i] for i in order[n_test:]]
    return train, test


def partition(
    records: Sequence[Record], num_clients: int, scheme: str = "domain", alpha: float = 0.5, seed: int = 0
) -> List[List[Record]]:
    """Splits ``records`` over ``num_clients`` clients; every client gets at least one record.

    - ``"domain"``: each client holds one domain. With more clients than domains, client ``c`` takes domain
      ``c % D`` and a domain's records are dealt evenly among its clients.
    - ``"natural"``: the same over natural sub-sources (``Record.source``: squad_shifts/nyt, ..., or a
      task's subtasks).
    - ``"dirichlet"``: client ``c`` draws a domain mixture ``p_c ~ Dirichlet(alpha * 1_D)``; domain ``d``'s
      records go to clients in proportion to ``p_c[d]``. Small ``alpha`` gives nearly single-domain clients,
      large ``alpha`` nearly identical mixtures.

    Deterministic for a given ``seed`` and set of records.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be positive, got {num_clients}")
    if len(records) < num_clients:
        raise ValueError(f"{len(records)} records cannot give each of {num_clients} clients one")
    _check_unique_ids(records)
    rng = np.random.default_rng(seed)
    clients: List[List[Record]] = [[] for _ in range(num_clients)]
    if scheme in ("domain", "natural"):
        groups = _group(records, (lambda r: r.domain) if scheme == "domain" else (lambda r: r.source))
        if num_clients < len(groups):
            raise ValueError(
                f"scheme {scheme!r} gives each client a single group, but {len(groups)} groups do not fit "
                f"{num_clients} clients (use more clients or scheme='dirichlet')"
            )
        for g, (name, group) in enumerate(groups.items()):
            owners = range(g, num_clients, len(groups))
            if len(group) < len(owners):
                raise ValueError(f"group {name!r} has {len(group)} records for {len(owners)} clients")
            for owner, part in zip(owners, np.array_split(rng.permutation(len(group)), len(owners)), strict=True):
                clients[owner] += [group[i] for i in part]
    elif scheme == "dirichlet":
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        groups = _group(records, lambda r: r.domain)
        mix = rng.dirichlet(np.full(len(groups), float(alpha)), size=num_clients)  # [clients, domains]
        for d, group in enumerate(groups.values()):
            weight = mix[:, d]
            if weight.sum() == 0:
                # Tiny alphas underflow to exact zeros; hand an unwanted domain to one client rather than
                # dividing 0 by 0.
                weight = np.eye(num_clients)[rng.integers(num_clients)]
            cuts = np.round(np.cumsum(weight / weight.sum())[:-1] * len(group)).astype(int)
            for c, part in enumerate(np.split(rng.permutation(len(group)), cuts)):
                clients[c] += [group[i] for i in part]
        # The draw may leave a client with nothing; one record from the largest client fixes that with the
        # least change to the drawn mixtures.
        for client in clients:
            if not client:
                client.append(max(clients, key=len).pop())
    else:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {SCHEMES}")
    return clients
