"""Server-side math of a Flux round (FLUX_DESIGN.md section 5, "Aggregation" and "Assignment"): validation of client
updates, the per-expert weighted average, and the utility table the next round's role assignment reads. The
average is over the clients that use an expert (``aggregate``'s ``over="users"``, the default run key), not only
over those that trained it as in the paper: README, "Averaging over users", says why and what it measured.

An update is what one client trained this round, keyed by ``ExpertKey = (moe_layer_index, original_expert_id)``
(``moe_layer_index`` counts MoE layers in ``model.moe_layers()`` order, from 0):

- ``tensors[key]``: the expert's trainable tensors, by name. Full mode: ``gate_up [2I, H]``, ``down [H, I]``.
  LoRA mode (rank r): ``gate_up_A [r, H]``, ``gate_up_B [2I, r]``, ``down_A [r, I]``, ``down_B [H, r]``;
- ``token_counts[key]``: tokens the client routed to that expert while training (the averaging weight);
- ``routed [L, E]`` (optional): tokens it routed to every expert while training, trained or not (a merged expert
  serves the tokens routed to each expert of its group), so that the server knows who *uses* an expert it did not
  train (``aggregate``'s ``over="users"``).

Clients upload fp32 (section 5); averages are accumulated in float64 and stored back in the global tensor's dtype.

One participant must not be able to break the federation, so before averaging the server screens updates
(``screen_updates``: a per-tensor norm bound relative to the global tensor, or to the round's median norm where
there is none yet) and bounds token counts (``validate_update``'s ``max_tokens``); the average itself may be made
robust (``aggregate``'s ``method``: a coordinate-wise trimmed mean, or norm clipping around the global tensor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

ExpertKey = Tuple[int, int]
ExpertTensors = Dict[str, torch.Tensor]
Update = Dict[ExpertKey, ExpertTensors]
FULL_NAMES = ("gate_up", "down")
LORA_NAMES = ("gate_up_A", "gate_up_B", "down_A", "down_B")
# Averaging rules (run key ``aggregation``): the token-weighted mean (Flux), a coordinate-wise trimmed mean
# (Yin et al., 2018: drops the ``trim`` fraction of largest and smallest values per coordinate), or the token-weighted
# mean of updates whose distance to the global tensor is clipped to the round's median distance (Sun et al., 2019).
AGGREGATIONS = ("weighted", "trimmed-mean", "norm-clip")
# Whom an expert's average is over (run key ``average-over``): the clients that trained it (the paper's rule), or
# the clients that routed tokens to it, those that did not train it contributing the value they hold (``aggregate``).
AVERAGE_OVER = ("trainers", "users")


def flat_tensors(state: Update, prefix: str = "") -> Dict[str, torch.Tensor]:
    """``{f"{prefix}{layer}/{expert}/{name}": tensor}`` (contiguous): an ``Update`` as safetensors keys."""
    return {f"{prefix}{l}/{e}/{name}": t.contiguous() for (l, e), ts in state.items() for name, t in ts.items()}


def nested_tensors(flat: Mapping[str, torch.Tensor], prefix: str = "") -> Update:
    """The ``Update`` of ``flat_tensors``' keys that start with ``prefix`` (others ignored)."""
    out: Update = {}
    for key, t in flat.items():
        if key.startswith(prefix):
            l, e, name = key[len(prefix) :].split("/")
            out.setdefault((int(l), int(e)), {})[name] = t
    return out


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
    routed: Optional[torch.Tensor] = None  # [L, E] tokens routed to every expert (trained or not); None: not reported


def validate_update(
    update: ClientUpdate,
    shapes: Mapping[str, Sequence[int]],
    num_layers: int,
    num_experts: int,
    max_tokens: Optional[int] = None,
) -> None:
    """Raise ``UpdateError`` unless every trained expert is a known ``(layer, expert)`` with exactly the tensor
    names of ``shapes``, each a floating-point tensor of that shape, finite, and a token count that is an int in
    ``[0, max_tokens]`` (``max_tokens``: the most tokens a client can route to one expert in a round); utilities,
    when given, must pass ``check_utilities``; routed counts, when given, must be integers in ``[0, max_tokens]`` of
    shape ``[num_layers, num_experts]`` that agree with the token counts of the experts it trained."""
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
            if not t.is_floating_point():
                raise UpdateError(f"{who}, expert {key}: {name} has dtype {t.dtype}, expected floating point")
            if tuple(t.shape) != tuple(shapes[name]):
                raise UpdateError(
                    f"{who}, expert {key}: {name} has shape {tuple(t.shape)}, expected {tuple(shapes[name])}"
                )
            if not torch.isfinite(t).all():
                raise UpdateError(f"{who}, expert {key}: {name} has non-finite values")
        n = update.token_counts[key]
        # bool is an int subclass; a JSON/record True is no count.
        if not (isinstance(n, int) and not isinstance(n, bool) and n >= 0):
            raise UpdateError(f"{who}, expert {key}: token count must be a non-negative int, got {n!r}")
        if max_tokens is not None and n > max_tokens:
            raise UpdateError(
                f"{who}, expert {key}: token count {n} is implausible, a client routes at most {max_tokens} tokens "
                "to an expert in a round (local-steps x batch-size x seq-len)"
            )
    if update.utilities is not None:
        check_utilities(update.utilities, num_layers, num_experts, who)
    if update.routed is not None:
        _check_routed(update, num_layers, num_experts, max_tokens, who)


def _check_routed(update: ClientUpdate, num_layers: int, num_experts: int, max_tokens: Optional[int], who: str) -> None:
    r = update.routed
    if not isinstance(r, torch.Tensor) or r.is_floating_point() or r.is_complex() or r.dtype == torch.bool:
        raise UpdateError(f"{who}: routed counts must be an integer tensor, got {getattr(r, 'dtype', type(r))}")
    if tuple(r.shape) != (num_layers, num_experts):
        raise UpdateError(f"{who}: routed counts have shape {tuple(r.shape)}, expected {(num_layers, num_experts)}")
    if bool((r < 0).any()) or (max_tokens is not None and bool((r > max_tokens).any())):
        raise UpdateError(f"{who}: routed counts must lie in [0, {max_tokens}] (local-steps x batch-size x seq-len)")
    wrong = sorted(k for k, n in update.token_counts.items() if int(r[k]) != n)
    if wrong:
        raise UpdateError(f"{who}: routed counts disagree with the token counts of trained experts {wrong}")


def check_utilities(u: torch.Tensor, num_layers: int, num_experts: int, who: str) -> None:
    """``u`` must be a floating ``[num_layers, num_experts]`` tensor of non-negative values or NaN ("not
    measured"): Eq. 3 utilities and normalised frequencies are never negative, and an infinite one would take every
    exploitation slot of Eq. 4."""
    if not isinstance(u, torch.Tensor) or not u.is_floating_point():
        raise UpdateError(f"{who}: utilities must be a floating-point tensor, got {getattr(u, 'dtype', type(u))}")
    if tuple(u.shape) != (num_layers, num_experts):
        raise UpdateError(f"{who}: utilities have shape {tuple(u.shape)}, expected {(num_layers, num_experts)}")
    measured = u[~torch.isnan(u)]
    if not (torch.isfinite(measured).all() and (measured >= 0).all()):
        raise UpdateError(f"{who}: utilities must be finite and >= 0 (NaN: not measured)")


def _lower_median(values: Sequence[float]) -> float:
    """The lower median (``torch.median``'s): with two clients, the smaller value, so that one of two cannot raise
    a reference it is then measured against."""
    return float(torch.tensor(values, dtype=torch.float64).median())


def screen_updates(
    global_state: Update, updates: Sequence[ClientUpdate], norm_bound: float
) -> Tuple[List[ClientUpdate], Dict[str, str]]:
    """Reject every update holding a tensor whose norm exceeds ``norm_bound`` times its reference: the larger of
    the global tensor's norm and the round's median norm of tensors of that name (the median over clients of each
    client's median over its experts, so a client training many experts counts once; nonzero norms only, so a
    round where most LoRA ``B`` factors are still zero does not make every moved one an outlier). Returns
    ``(kept updates, {client: reason})``; ``norm_bound <= 0`` keeps everything. Updates must have passed
    ``validate_update``. Norms are taken in float64: the square of a finite fp32 value (1e30) overflows fp32."""
    if norm_bound <= 0 or not updates:
        return list(updates), {}
    norms = {
        u.client: {(key, name): float(t.double().norm()) for key, ts in u.tensors.items() for name, t in ts.items()}
        for u in updates
    }
    per_client: Dict[str, Dict[str, List[float]]] = {}
    for client, ns in norms.items():
        for (_, name), n in ns.items():
            if n > 0:
                per_client.setdefault(name, {}).setdefault(client, []).append(n)
    median = {name: _lower_median([_lower_median(v) for v in by.values()]) for name, by in per_client.items()}
    kept, rejected = [], {}
    for u in updates:
        for (key, name), n in sorted(norms[u.client].items()):
            g = global_state.get(key, {}).get(name)
            ref = max(median.get(name, 0.0), float(g.double().norm()) if g is not None else 0.0)
            if ref > 0 and n > norm_bound * ref:
                rejected[u.client] = (
                    f"expert {key}: {name} has norm {n:.3g}, over {norm_bound:g}x its reference {ref:.3g} (the "
                    "global tensor's norm or the round's median; update-norm-bound)"
                )
                break
        else:
            kept.append(u)
    return kept, rejected


def user_shares(updates: Sequence[ClientUpdate]) -> Dict[ExpertKey, float]:
    """Per trained expert ``e``: ``s_e = sum_{i trained e} n_ie / (sum_{i trained e} n_ie + sum_{i did not} r_ie)``,
    the share of the tokens this round's clients routed to ``e`` that its trainers routed (``n``: token counts,
    ``r``: routed counts; a client that reports none routed nothing to experts it did not train). 1 when nobody
    routed any token to it."""
    shares = {}
    for key in sorted({k for u in updates for k in u.tensors}):
        trained = sum(float(u.token_counts[key]) for u in updates if key in u.tensors)
        others = sum(float(u.routed[key]) for u in updates if key not in u.tensors and u.routed is not None)
        shares[key] = trained / (trained + others) if trained + others > 0 else 1.0
    return shares


def aggregate(
    global_state: Update,
    updates: Sequence[ClientUpdate],
    method: str = "weighted",
    trim: float = 0.25,
    over: str = "trainers",
    initial: Optional[Callable[[ExpertKey], ExpertTensors]] = None,
) -> Tuple[Update, List[ExpertKey]]:
    """Per expert, over the clients that trained it (``AGGREGATIONS``):

    - ``"weighted"``: the token-weighted average ``W_e = sum_i n_ie W_ie / sum_i n_ie``. An expert whose trainers
      all report 0 tokens gets their plain mean (they did train it, on nothing routed: keep their result rather than
      divide by zero);
    - ``"trimmed-mean"``: per coordinate, the mean of the values left after dropping the ``floor(trim * n)``
      largest and smallest of its ``n`` trainers (token counts unused: they are the client's word);
    - ``"norm-clip"``: the token-weighted average of ``c + clip(W_ie - c)``, where ``c`` is the global tensor (the
      coordinate-wise median of the trainers' tensors for an expert with none yet) and each difference is scaled
      down to at most the median difference norm of the expert's trainers.

    ``over="users"`` (``AVERAGE_OVER``) averages over the clients that *use* the expert instead: those that routed
    tokens to it this round, a client that did not train it contributing the value ``W_e`` it holds (the global
    value; ``initial(key)`` for an expert with none yet: the start every client gives it), weighted by its routed
    count. For the token-weighted average that is ``W_e + s_e (avg_e - W_e)``, with ``avg_e`` the trainers' average
    and ``s_e`` their share of the expert's tokens (``user_shares``); the same damping is applied to the other
    rules' ``avg_e``. Where every user trained the expert (FedAvg: every client trains every expert), or an
    expert's users avoid each other's experts, it is the trainers' rule; where routing is spread evenly and roles
    split the experts between clients, an expert moves by its trainers' share of the federation's use of it
    instead of by one small subset's whole update (README, "Averaging over users": a deviation from the paper,
    measured). An expert with no global value and no ``initial`` keeps its trainers' average.

    Experts nobody trained keep their global value. Returns the new global state (a new dict; untouched entries are
    shared) and the keys that changed. Updates must have passed ``validate_update``."""
    if method not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {method!r}")
    if over not in AVERAGE_OVER:
        raise ValueError(f"average-over must be one of {AVERAGE_OVER}, got {over!r}")
    shares = user_shares(updates) if over == "users" else {}
    trainers: Dict[ExpertKey, List[ClientUpdate]] = {}
    for u in updates:
        for key in u.tensors:
            trainers.setdefault(key, []).append(u)
    out = dict(global_state)
    for key, us in sorted(trainers.items()):
        w = torch.tensor([float(u.token_counts[key]) for u in us], dtype=torch.float64)
        w = w / w.sum() if w.sum() > 0 else torch.full_like(w, 1.0 / len(us))
        avg: ExpertTensors = {}
        damp = shares.get(key, 1.0) < 1.0  # 1: every user trained it (exactly the trainers' average)
        # What the users that did not train it hold: the global value, else the start every client gives it.
        start = initial(key) if damp and key not in global_state and initial is not None else {}
        for name in us[0].tensors[key]:
            stacked = torch.stack([u.tensors[key][name].to(torch.float64) for u in us])  # [n, ...]
            current = global_state.get(key, {}).get(name)
            dtype = current.dtype if current is not None else us[0].tensors[key][name].dtype
            if method == "trimmed-mean":
                k = int(math.floor(trim * len(us)))
                value = stacked.sort(dim=0).values[k : len(us) - k].mean(0)
            elif method == "norm-clip":
                center = current.to(torch.float64) if current is not None else stacked.median(dim=0).values
                diff = stacked - center
                norms = diff.flatten(1).norm(dim=1)
                scale = (norms.median() / norms.clamp_min(1e-300)).clamp(max=1.0)
                value = center + torch.einsum("n,n...->...", w * scale, diff)
            else:
                value = torch.einsum("n,n...->...", w, stacked)
            held = current if current is not None else start.get(name)
            if damp and held is not None:
                held = held.to(torch.float64)
                value = held + shares[key] * (value - held)
            avg[name] = value.to(dtype)
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
        check_utilities(utilities, self.num_layers, self.num_experts, f"client {client}")
        return utilities.to(torch.float64)

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

    def untried(self) -> torch.Tensor:
        """Bool ``[L, E]``: the experts no client has measured yet (exploration covers them first)."""
        return torch.isnan(self._measured_mean())

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
