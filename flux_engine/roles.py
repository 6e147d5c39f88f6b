"""Dynamic expert roles (FLUX_DESIGN.md section 5): expert utility (Eq. 3), the exploit/explore assignment of tuning
experts under per-client budgets (Eq. 4), and two-point zeroth-order (SPSA) gradient estimates for exploration
experts (an option: by default exploration experts train, and their utility comes from the same backward pass).

One utility scale. Every utility the server ranks is Eq. 3 read from training gradients
(``training.train_round``: exploitation and exploration experts alike, since every tuning slot trains). The only
other source is the routing-frequency prior of experts no client has trained yet (round 1: the first-contact
profile's normalised frequencies, ``frequency_utility``). ``common_scale`` puts a prior on the gradient scale, per
client and layer: ``u_e = f_e * c_l``, with ``c_l = (sum of the measured utilities of layer l) / (sum of the
frequencies of those experts)`` (Eq. 3 grows with ``|D_e|``, which the frequency predicts); a layer with no
measured expert uses the ratio over all layers; with no measured expert at all (round 1) the frequencies are the
utilities (one source, one scale). A measured utility always wins over a prior, and a client that has not
measured an expert takes the mean of the other clients' measurements before its own prior
(``aggregation.UtilityTable``). The SPSA estimates of ``explore-mode = "zo"`` (``explore_experts``) are
``|D_e|`` times an estimated gradient norm: Eq. 3's units up to the estimate's noise.

Utilities are ``[L, E]`` tensors over original experts of the MoE layers (``model.moe_layers()`` order). An expert's
trainable parameters, for the gradient norms, are its physical weight slices ``gate_up_proj[p]`` and
``down_proj[p]`` (``p = expert_map[e]``; original experts merged into one physical expert share its gradient).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------------------
# Eq. 3: utility


def frequency_utility(freq: Any) -> torch.Tensor:
    """Round-1 utility: each layer's routing frequencies normalised to sum to 1."""
    f = torch.as_tensor(freq, dtype=torch.float64).clamp_min(0)
    return f / f.sum(-1, keepdim=True).clamp_min(1e-300)


def common_scale(measured: torch.Tensor, prior: Optional[torch.Tensor]) -> torch.Tensor:
    """``[L, E]`` utilities on one scale (module docstring): ``measured`` Eq. 3 utilities (NaN: not measured)
    where present, else the frequency ``prior`` times its layer's calibration ``c_l`` (0 where there is no prior)."""
    u = torch.as_tensor(measured, dtype=torch.float64)
    if prior is None:
        return torch.nan_to_num(u, nan=0.0)
    f = torch.as_tensor(prior, dtype=torch.float64).clamp_min(0)
    have = ~torch.isnan(u)
    if not bool(have.any()):
        return f.clone()
    u0 = torch.where(have, u, torch.zeros(()))
    f_have = torch.where(have, f, torch.zeros(()))
    total = u0.sum() / f_have.sum().clamp_min(1e-300)
    per_layer = u0.sum(1) / f_have.sum(1).clamp_min(1e-300)
    c = torch.where(have.any(1) & (f_have.sum(1) > 0), per_layer, total)
    return torch.where(have, u, f * c[:, None])


def _per_sample_losses(model: nn.Module, input_ids: torch.Tensor, labels: Optional[torch.Tensor], attention_mask=None):
    """Per-sequence mean next-token loss ``[B]`` and the router outputs."""
    out = model(input_ids, attention_mask=attention_mask, return_routers=True)
    labels = input_ids if labels is None else labels
    if attention_mask is not None:
        labels = labels.masked_fill(~attention_mask.bool(), -100)
    logits = out.logits[:, :-1].float()
    tgt = labels[:, 1:]
    tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100, reduction="none")
    tok = tok.view(tgt.shape)
    n = (tgt != -100).sum(1).clamp_min(1)
    return tok.sum(1) / n, out.routers


def routed_samples(routers, batch: int, num_experts: int, attention_mask=None) -> torch.Tensor:
    """``[L, B, E]`` bool: sample b routed at least one (non-padding) token to original expert e of layer l."""
    rows = []
    for r in routers:
        ids = r.ids.long().view(batch, -1)
        hit = torch.zeros(batch, num_experts, dtype=torch.bool, device=ids.device)
        if attention_mask is not None:
            k = r.ids.shape[-1]
            keep = attention_mask.bool().repeat_interleave(k, dim=1)
            ids = torch.where(keep, ids, torch.full_like(ids, num_experts))
            hit = torch.zeros(batch, num_experts + 1, dtype=torch.bool, device=ids.device)
        hit.scatter_(1, ids, True)
        rows.append(hit[:, :num_experts].cpu())
    return torch.stack(rows)


def _expert_params(model: nn.Module) -> List[nn.Parameter]:
    ps = []
    for mlp in model.moe_layers():
        ps += [mlp.experts.gate_up_proj, mlp.experts.down_proj]
    return ps


def _sq_norms_per_original(model: nn.Module, grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[L, E_orig]`` squared gradient norms of each original expert's physical weights."""
    rows = []
    for l, mlp in enumerate(model.moe_layers()):
        g_gu, g_dn = grads[2 * l], grads[2 * l + 1]
        E_phys = mlp.experts.num_physical
        sq = torch.zeros(E_phys, dtype=torch.float64)
        if g_gu is not None:
            sq += g_gu.double().pow(2).flatten(1).sum(1).cpu()
        if g_dn is not None:
            sq += g_dn.double().pow(2).flatten(1).sum(1).cpu()
        rows.append(sq[mlp.experts.expert_map.long().cpu()])
    return torch.stack(rows)


def utility_from(sum_sq: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    # u_e = |D_e| * sqrt(sum_k ||g_k||^2 / |D_e|), 0 when D_e is empty.
    return torch.where(count > 0, count * (sum_sq / count.clamp_min(1)).sqrt(), torch.zeros_like(sum_sq))


def utility_exact(model: nn.Module, input_ids: torch.Tensor, labels=None, attention_mask=None) -> torch.Tensor:
    """Eq. 3 with true per-sample gradients (one backward per sample: small models). ``input_ids [B, T]``, a sample
    is a sequence; ``D_e`` = samples that routed a token to e. Returns ``[L, E]`` float64."""
    return utility_microbatch(model, input_ids, labels, attention_mask, micro_batch=1)


def utility_microbatch(
    model: nn.Module, input_ids: torch.Tensor, labels=None, attention_mask=None, micro_batch: int = 4
) -> torch.Tensor:
    """Cheap Eq. 3: one backward per micro-batch of the SUM of its samples' losses; ``sum_k ||g_k||^2`` over D_e is
    approximated by ``sum_j ||G_j||^2`` over the micro-batches j touching e (exact when ``micro_batch == 1``; for
    larger micro-batches cross terms between samples are included). ``|D_e|`` still counts samples."""
    params = _expert_params(model)
    saved = [p.requires_grad for p in params]
    B = input_ids.shape[0]
    E = model.config.num_experts
    L = len(model.moe_layers())
    sum_sq = torch.zeros(L, E, dtype=torch.float64)
    count = torch.zeros(L, E, dtype=torch.float64)
    try:
        for p in params:
            p.requires_grad_(True)
        for s in range(0, B, micro_batch):
            sl = slice(s, min(s + micro_batch, B))
            am = None if attention_mask is None else attention_mask[sl]
            losses, routers = _per_sample_losses(model, input_ids[sl], None if labels is None else labels[sl], am)
            grads = torch.autograd.grad(losses.sum(), params, allow_unused=True)
            hit = routed_samples(routers, losses.shape[0], E, am)  # [L, b, E]
            touched = hit.any(1)
            sum_sq += torch.where(touched, _sq_norms_per_original(model, grads), torch.zeros(()))
            count += hit.sum(1).double()
    finally:
        for p, r in zip(params, saved):
            p.requires_grad_(r)
    return utility_from(sum_sq, count)


# ----------------------------------------------------------------------------------------------------------------
# Eq. 4: assignment


@dataclass
class EpsilonSchedule:
    """Exploitation share ``eps_t = eps_0 + (eps_max - eps_0) * min(1, t / ramp_rounds)`` (``t`` = round, from 0):
    a linear rise that reaches ``eps_max`` ``ramp_rounds`` rounds after the first (``for_run`` derives it from a
    fraction of the run); ``fixed`` (ablation) pins it."""

    eps_0: float = 0.5
    eps_max: float = 0.9
    ramp_rounds: int = 4
    fixed: Optional[float] = None

    @classmethod
    def for_run(cls, eps_0: float, eps_max: float, ramp: float, num_rounds: int,
                fixed: Optional[float] = None) -> "EpsilonSchedule":  # fmt: skip
        """eps reaches ``eps_max`` at round ``ceil(ramp * num_rounds)`` (rounds counted from 1; at least round 2)."""
        return cls(eps_0, eps_max, max(1, math.ceil(ramp * num_rounds) - 1), fixed)

    def __call__(self, t: int) -> float:
        if self.fixed is not None:
            return float(self.fixed)
        return float(self.eps_0 + (self.eps_max - self.eps_0) * min(1.0, t / max(self.ramp_rounds, 1)))


@dataclass
class ClientRoles:
    """One client's roles: bool ``[L, E]`` masks of tuning experts, split into exploitation and exploration."""

    tuning: torch.Tensor
    exploit: torch.Tensor
    explore: torch.Tensor
    eps: float

    def tuning_lists(self) -> List[List[int]]:
        """Per-layer original ids of the tuning experts (the ``tuning_experts`` argument of ``merging.merge``)."""
        return [torch.nonzero(row).flatten().tolist() for row in self.tuning]

    def explore_pairs(self) -> List[tuple]:
        return [tuple(x) for x in torch.nonzero(self.explore).tolist()]


def assign_roles(
    utilities: Any,
    budgets: Sequence[int],
    round_t: int = 0,
    schedule: Optional[EpsilonSchedule] = None,
    seed: int = 0,
    untried: Optional[torch.Tensor] = None,
) -> List[ClientRoles]:
    """Eq. 4 per client: ``round(eps_t * B_tune_i)`` slots to the highest-utility experts (ties: lower layer, then
    lower id) and the rest drawn uniformly without replacement (seeded by ``(seed, round_t, client)``) from the other
    experts. ``utilities``: one ``[L, E]`` tensor shared by all clients or a list of per-client tensors. Never more
    than ``min(B_tune_i, L * E)`` experts per client.

    ``untried`` (bool ``[L, E]``, e.g. the experts no client has measured yet): exploration draws those first, and
    an expert one client explores this round counts as tried for the clients after it, so that exploration covers
    the experts nobody has measured before it draws any twice."""
    schedule = schedule or EpsilonSchedule()
    eps = schedule(round_t)
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps_t must lie in [0, 1], got {eps}")
    if isinstance(utilities, torch.Tensor):
        utilities = [utilities] * len(budgets)
    if len(utilities) != len(budgets):
        raise ValueError(f"{len(utilities)} utility tables for {len(budgets)} clients")
    out = []
    pending = None if untried is None else torch.as_tensor(untried, dtype=torch.bool).reshape(-1).clone()
    for i, (u, B) in enumerate(zip(utilities, budgets)):
        u = torch.as_tensor(u, dtype=torch.float64).cpu()
        L, E = u.shape
        B = max(0, min(int(B), L * E))
        n_exploit = min(B, int(math.floor(eps * B + 0.5)))
        flat = u.reshape(-1)
        order = torch.sort(-flat, stable=True).indices
        exploit_ids = order[:n_exploit]
        rest = order[n_exploit:].sort().values  # canonical order before the random draw
        g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(round_t)) * 1_000_003 + i)
        rest = rest[torch.randperm(rest.numel(), generator=g)]
        if pending is not None:  # untried first (a stable sort keeps the random order within each group)
            rest = rest[torch.sort((~pending[rest]).to(torch.int8), stable=True).indices]
        explore_ids = rest[: B - n_exploit]
        if pending is not None:
            pending[explore_ids] = False
        exploit = torch.zeros(L * E, dtype=torch.bool)
        explore = torch.zeros(L * E, dtype=torch.bool)
        exploit[exploit_ids] = True
        explore[explore_ids] = True
        out.append(ClientRoles((exploit | explore).view(L, E), exploit.view(L, E), explore.view(L, E), eps))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Zeroth-order (SPSA) estimates


def spsa_gradient(
    loss_fn: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    c: float = 1e-3,
    num_samples: int = 1,
    generator: Optional[torch.Generator] = None,
):
    """Two-point SPSA: for a Rademacher direction ``delta``, ``d = (f(theta + c delta) - f(theta - c delta)) / 2c``
    estimates the directional derivative ``delta . g`` and ``d * delta`` the gradient (unbiased up to O(c^2)).
    ``params`` are perturbed in place and restored bit-exactly. Returns ``(grads, dir_derivs)``: the estimates averaged over
    ``num_samples`` directions and the ``num_samples`` directional derivatives (``mean(d^2)`` estimates ``||g||^2``).
    """
    grads = [torch.zeros_like(p) for p in params]
    derivs = []
    with torch.no_grad():
        for _ in range(num_samples):
            deltas = [
                (torch.randint(0, 2, p.shape, generator=generator, dtype=torch.int8).to(p.device, p.dtype) * 2 - 1)
                for p in params
            ]
            saved = [p.clone() for p in params]
            for p, d in zip(params, deltas):
                p.add_(d, alpha=c)
            f_plus = float(loss_fn())
            for p, s, d in zip(params, saved, deltas):
                torch.add(s, d, alpha=-c, out=p)
            f_minus = float(loss_fn())
            for p, s in zip(params, saved):
                p.copy_(s)  # exact restore
            del saved
            dd = (f_plus - f_minus) / (2 * c)
            derivs.append(dd)
            for g, d in zip(grads, deltas):
                g.add_(d, alpha=dd / num_samples)
    return grads, derivs


@dataclass
class ZerothOrderConfig:
    """SPSA settings for exploration experts. ``update``: also apply an SGD step with the estimate (the design's
    open switch); ``lr`` its learning rate."""

    c: float = 1e-3
    num_samples: int = 1
    update: bool = False
    lr: float = 1e-4
    seed: int = 0


class _ExpertSlice:
    """A view-free handle on one physical expert's weights (perturbed through ``narrow`` views in place)."""

    def __init__(self, experts, p: int):
        self.views = [experts.gate_up_proj.data[p], experts.down_proj.data[p]]


def explore_experts(
    model: nn.Module,
    input_ids: torch.Tensor,
    explore: Sequence[tuple],
    config: Optional[ZerothOrderConfig] = None,
    labels=None,
    attention_mask=None,
) -> torch.Tensor:
    """Forward-only refresh of exploration experts' utilities (``explore-mode = "zo"``, an option: by default
    exploration experts train). For each ``(layer, expert)`` in ``explore`` an SPSA estimate over its physical
    weights, two forward passes per direction over only the sequences routed to it (``input_ids [B, T]``: the rows
    of ``D_e``; the others' loss does not depend on the expert), utility ``|D_e| * sqrt(mean d^2)`` (a batch-level
    stand-in for the per-sample norms of Eq. 3; 0 when no sequence reaches it). The loss differences are computed in
    fp32 whatever the model's dtype (a perturbation of ``c`` = 1e-3 is below bf16's resolution): a model in another
    dtype is evaluated through an fp32 copy. With ``config.update`` the estimate is also applied as an SGD step.
    Returns ``[L, E]`` utilities (NaN elsewhere)."""
    config = config or ZerothOrderConfig()
    E = model.config.num_experts
    g = torch.Generator().manual_seed(config.seed)
    with torch.no_grad():
        out = model(input_ids, attention_mask=attention_mask, return_routers=True)
        hit = routed_samples(out.routers, input_ids.shape[0], E, attention_mask)
    fp32 = all(p.dtype == torch.float32 for p in model.parameters())
    work = model if fp32 else copy.deepcopy(model).float()
    layers = work.moe_layers()
    util = torch.full((len(layers), E), float("nan"), dtype=torch.float64)
    labels = input_ids if labels is None else labels
    for l, e in explore:
        rows = torch.nonzero(hit[l, :, e]).flatten().to(input_ids.device)
        if rows.numel() == 0:
            util[l, e] = 0.0
            continue
        ids, lab = input_ids[rows], labels[rows]
        am = None if attention_mask is None else attention_mask[rows]

        def loss_fn():
            return work(ids, labels=lab, attention_mask=am).loss.float()

        ex = layers[l].experts
        p = int(ex.expert_map[e])
        views = _ExpertSlice(ex, p).views
        grads, derivs = spsa_gradient(loss_fn, views, c=config.c, num_samples=config.num_samples, generator=g)
        # loss_fn is a mean over the routed rows' tokens: the directional derivatives are per routed sample's
        # share, as in the full-batch form's |D_e| normalisation.
        util[l, e] = float(rows.numel()) * math.sqrt(sum(d * d for d in derivs) / len(derivs))
        if config.update:
            with torch.no_grad():
                for v, gr in zip(views, grads):
                    v.add_(gr, alpha=-config.lr)
                if work is not model:
                    for v, w in zip(views, _ExpertSlice(model.moe_layers()[l].experts, p).views):
                        w.copy_(v.to(w.dtype))
    return util
