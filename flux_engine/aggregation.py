"""Server-side math of a Flux round (FLUX_DESIGN.md section 5, "Aggregation" and "Assignment"): validation of client
updates, the per-expert weighted average, and the utility table the next round's role assignment reads.

An update is what one client trained this round, keyed by ``ExpertKey = (moe_layer_index, original_expert_id)``
(``moe_layer_index`` counts MoE layers in ``model.moe_layers()`` order, from 0):

- ``tensors[key]``: the expert's trainable tensors, by name. Full mode: ``gate_up [2I, H]``, ``down [H, I]``.
  LoRA mode (rank r): ``gate_up_A [r, H]``, ``gate_up_B [2I, r]``, ``down_A [r, I]``, ``down_B [H, r]``;
- ``token_counts[key]``: tokens the client routed to that expert while training (the averaging weight).

Clients upload fp32 (section 5); averages are accumulated in float64 and stored back in the global tensor's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

ExpertKey = Tuple[int, int]
ExpertTensors = Dict[str, torch.Tensor]
Update = Dict[ExpertKey, ExpertTensors]
FULL_NAMES = ("gate_up", "down")
LORA_NAMES = ("gate_up_A", "gate_up_B", "down_A", "down_B")


class UpdateError(ValueError):
    """A client update that must not be averaged; the message names the client and the expert."""


def expert_shapes(hidden: int, intermediate: int, lora_rank: Optional[int] = None) -> Dict[str, Tuple[int, ...]]:
    """The tensor names and shapes of one expert's trainable state (full mode when ``lora_rank`` is 0/None)."""
    H, I = hidden, intermediate
    if not lora_rank:
        return {"gate_up": (2 * I, H), "down": (H, I)}
    r = int(lora_rank)
    return {"gate_up_A": (r, H), "gate_up_B": (2 * I, r), "down_A": (r, I), "down_B": (H, r)}


@dataclass
class ClientUpdate:
    """One client's contribution to a round."""

    client: str
    tensors: Update
    token_counts: Dict[ExpertKey, int]
    utilities: Optional[torch.Tensor] = None  # [L, E] float64, NaN where the client measured nothing


def validate_update(
    update: ClientUpdate, shapes: Mapping[str, Sequence[int]], num_layers: int, num_experts: int
) -> None:
    """Raise ``UpdateError`` unless every trained expert is a known ``(layer, expert)`` with exactly the tensor
    names of ``shapes``, each of that shape, finite, and a non-negative token count; utilities, when given, must be
    ``[num_layers, num_experts]``."""
    who = f"client {update.client}"
    if set(update.token_counts) != set(update.tensors):
        extra = sorted(set(update.token_counts) ^ set(update.tensors))
        raise UpdateError(f"{who}: token counts and tensors name different experts: {extra}")
    for key, tensors in update.tensors.items():
        l, e = key
        if not (0 <= l < num_layers and 0 <= e < num_experts):
            raise UpdateError(
                f"{who}: unknown expert {key} (model has {num_layers} MoE layers x {num_experts} experts)"
            )
        missing = sorted(set(shapes) - set(tensors))
        unexpected = sorted(set(tensors) - set(shapes))
        if missing or unexpected:
            raise UpdateError(f"{who}, expert {key}: missing tensors {missing}, unexpected tensors {unexpected}")
        for name, t in tensors.items():
            if tuple(t.shape) != tuple(shapes[name]):
                raise UpdateError(
                    f"{who}, expert {key}: {name} has shape {tuple(t.shape)}, expected {tuple(shapes[name])}"
                )
            if not torch.isfinite(t).all():
                raise UpdateError(f"{who}, expert {key}: {name} has non-finite values")
        n = update.token_counts[key]
        if not (isinstance(n, int) and n >= 0):
            raise UpdateError(f"{who}, expert {key}: token count must be a non-negative int, got {n!r}")
    u = update.utilities
    if u is not None and tuple(u.shape) != (num_layers, num_experts):
        raise UpdateError(f"{who}: utilities have shape {tuple(u.shape)}, expected {(num_layers, num_experts)}")


def aggregate(global_state: Update, updates: Sequence[ClientUpdate]) -> Tuple[Update, List[ExpertKey]]:
    """Per expert, the token-weighted average over the clients that trained it:
    ``W_e = sum_i n_ie W_ie / sum_i n_ie``. An expert whose trainers all report 0 tokens gets their plain mean
    (they did train it, on nothing routed: keep their result rather than divide by zero). Experts nobody trained
    keep their global value. Returns the new global state (a new dict; untouched entries are shared) and the keys
    that changed. Updates must have passed ``validate_update``."""
    trainers: Dict[ExpertKey, List[ClientUpdate]] = {}
    for u in updates:
        for key in u.tensors:
            trainers.setdefault(key, []).append(u)
    out = dict(global_state)
    for key, us in sorted(trainers.items()):
        w = torch.tensor([float(u.token_counts[key]) for u in us], dtype=torch.float64)
        w = w / w.sum() if w.sum() > 0 else torch.full_like(w, 1.0 / len(us))
        avg: ExpertTensors = {}
        for name in us[0].tensors[key]:
            stacked = torch.stack([u.tensors[key][name].to(torch.float64) for u in us])
            dtype = global_state[key][name].dtype if key in global_state else us[0].tensors[key][name].dtype
            avg[name] = torch.einsum("n,n...->...", w, stacked).to(dtype)
        out[key] = avg
    return out, sorted(trainers)


@dataclass
class UtilityTable:
    """Per-client ``[L, E]`` expert utilities for Eq. 4's ``u_ie``, on one scale (``roles.common_scale``).

    ``tables``: Eq. 3 utilities as last measured (training gradients); a report's NaN entries (experts the client
    did not measure) keep the client's previous value. ``priors``: each client's routing-frequency prior (its
    first-contact profile). Stale by one round: the table used to assign round r holds what clients reported up to
    round r-1. For a client, an expert it never measured takes the mean of the other clients' measurements, and
    one nobody measured its prior put on the measured scale (``common_scale``; the mean prior of the others when it
    sent none; 0 when there is none).
    """

    num_layers: int
    num_experts: int
    tables: Dict[str, torch.Tensor] = field(default_factory=dict)
    priors: Dict[str, torch.Tensor] = field(default_factory=dict)

    def _checked(self, client: str, utilities: torch.Tensor) -> torch.Tensor:
        u = torch.as_tensor(utilities, dtype=torch.float64)
        if tuple(u.shape) != (self.num_layers, self.num_experts):
            raise UpdateError(
                f"client {client}: utilities have shape {tuple(u.shape)}, "
                f"expected {(self.num_layers, self.num_experts)}"
            )
        return u

    def update(self, client: str, utilities: torch.Tensor) -> None:
        """Eq. 3 utilities measured by ``client`` (NaN: not measured)."""
        u = self._checked(client, utilities)
        old = self.tables.get(client, torch.full_like(u, math.nan))
        self.tables[client] = torch.where(torch.isnan(u), old, u)

    def set_prior(self, client: str, frequencies: torch.Tensor) -> None:
        """``client``'s routing-frequency prior (``roles.frequency_utility`` of its first profile)."""
        self.priors[client] = torch.nan_to_num(self._checked(client, frequencies), nan=0.0)

    def _measured_mean(self) -> torch.Tensor:
        """``[L, E]``: NaN-aware mean of the measurements over clients (NaN where nobody measured)."""
        if not self.tables:
            return torch.full((self.num_layers, self.num_experts), math.nan, dtype=torch.float64)
        return torch.stack(list(self.tables.values())).nanmean(0)

    def for_client(self, client: str) -> torch.Tensor:
        from flux_engine.roles import common_scale

        mean = self._measured_mean()
        u = self.tables.get(client)
        measured = mean if u is None else torch.where(torch.isnan(u), mean, u)
        prior = self.priors.get(client)
        if prior is None and self.priors:
            prior = torch.stack(list(self.priors.values())).mean(0)
        return common_scale(measured, prior)

    def for_clients(self, clients: Iterable[str]) -> List[torch.Tensor]:
        return [self.for_client(c) for c in clients]
