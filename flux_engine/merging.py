"""Layer-aware expert merging (FLUX_DESIGN.md section 5): Eq. 1 per-layer budgets, PCA + cosine k-means clustering
of the non-tuning experts (all layers in one batched computation), Eq. 2 weighted merge into a compact model, and
the merge's output error.

Profiles: any object with per-MoE-layer tensors ``freq [L, E]`` (routing frequency, rows sum to 1) and optionally
``attn [L, E]`` (mean received attention of the tokens routed to each original expert); the names of
``profiling.ExpertProfile`` (``frequency``, ``importance``) are accepted too. ``FrequencyProfile`` and
``profile_from_routers`` build a minimal one from a forward pass.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

WEIGHTINGS = ("freq_attn", "freq", "uniform")


# ----------------------------------------------------------------------------------------------------------------
# Profiles


@dataclass
class FrequencyProfile:
    """The minimal profile the merge needs: ``freq [L, E]`` (rows sum to 1), ``attn [L, E]``, ``tokens [L, E]``."""

    freq: torch.Tensor
    attn: Optional[torch.Tensor] = None
    tokens: Optional[torch.Tensor] = None


def profile_from_routers(routers, num_experts: int) -> FrequencyProfile:
    """A frequency-only profile (``attn`` = 1) from ``model(ids, return_routers=True).routers``."""
    counts = torch.stack([torch.bincount(r.ids.reshape(-1).long().cpu(), minlength=num_experts) for r in routers])
    counts = counts.double()
    freq = counts / counts.sum(1, keepdim=True).clamp_min(1)
    return FrequencyProfile(freq=freq, attn=torch.ones_like(freq), tokens=counts)


def profile_freq(profile: Any) -> torch.Tensor:
    """``[L, E]`` float64 routing frequencies of a profile (``freq`` or ``frequency``)."""
    f = getattr(profile, "freq", None)
    if f is None:
        f = getattr(profile, "frequency", None)
    if f is None:
        raise TypeError(f"{type(profile).__name__} has neither .freq nor .frequency")
    return torch.as_tensor(f, dtype=torch.float64).cpu()


def profile_attn(profile: Any) -> Optional[torch.Tensor]:
    """``[L, E]`` float64 attention importance (``attn`` or ``importance``), None when the profile has none."""
    a = getattr(profile, "attn", None)
    if a is None:
        a = getattr(profile, "importance", None)
    return None if a is None else torch.as_tensor(a, dtype=torch.float64).cpu()


def _as_2d(x: Any, name: str) -> List[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        if x.ndim != 2:
            raise ValueError(f"{name} must be [L, E], got shape {tuple(x.shape)}")
        return [row.detach().double().cpu() for row in x]
    return [torch.as_tensor(row, dtype=torch.float64) for row in x]


# ----------------------------------------------------------------------------------------------------------------
# Eq. 1: per-layer merge budgets


def layer_weights(freqs: Any, eps: float = 1e-8) -> torch.Tensor:
    """``b_l = (L - l + 1) / (v_l + eps)`` with ``v_l`` the (population) variance of layer l's expert frequencies,
    ``l = 1`` the shallowest MoE layer."""
    rows = _as_2d(freqs, "freqs")
    L = len(rows)
    v = torch.stack([row.var(unbiased=False) if row.numel() else torch.zeros((), dtype=torch.float64) for row in rows])
    depth = torch.arange(L, 0, -1, dtype=torch.float64)  # L - l + 1 for l = 1..L
    return depth / (v + eps)


def layer_budgets(freqs: Any, total: int, non_tuning_counts: Sequence[int], eps: float = 1e-8) -> List[int]:
    """Merged experts per MoE layer (Eq. 1).

    ``floor(b_l / sum_k b_k * total)`` with the remainder handed out by largest fractional part (ties: shallower
    layer first), each layer clamped to ``[1, n_l]`` (``n_l`` = its non-tuning experts; 0 when it has none). Clamps
    are resolved by water-filling: layers whose proportional share falls outside their bounds are pinned at the
    bound and the remaining total is re-shared among the others in proportion to ``b``; without clamping this is
    exactly the rule above. The result sums to ``total`` whenever ``#{l: n_l > 0} <= total <= sum n_l``; below that
    every layer keeps 1 merged expert, above it every layer keeps all its experts.
    """
    b = layer_weights(freqs, eps)
    n = [int(c) for c in non_tuning_counts]
    L = len(n)
    if b.numel() != L:
        raise ValueError(f"freqs has {b.numel()} layers, non_tuning_counts {L}")
    if any(c < 0 for c in n):
        raise ValueError(f"non_tuning_counts must be >= 0, got {n}")
    total = int(total)
    lo = [1 if c > 0 else 0 for c in n]
    out = [0] * L
    active = [l for l in range(L) if n[l] > 0]
    if total <= sum(lo):
        return lo
    if total >= sum(n):
        return list(n)
    free = set(active)
    pinned = {}
    while True:
        remaining = total - sum(pinned.values())
        bsum = sum(float(b[l]) for l in free)
        share = {l: float(b[l]) / bsum * remaining for l in free}
        over = [l for l in free if share[l] > n[l]]
        if over:
            for l in over:
                pinned[l] = n[l]
                free.discard(l)
            continue
        under = [l for l in free if share[l] < 1]
        if under:
            for l in under:
                pinned[l] = 1
                free.discard(l)
            continue
        break
    for l, v in pinned.items():
        out[l] = v
    floors = {l: min(int(math.floor(share[l] + 1e-9)), n[l]) for l in free}
    for l, v in floors.items():
        out[l] = v
    rest = total - sum(out)
    order = sorted(free, key=lambda l: (-(share[l] - floors[l]), l))
    for l in order:
        if rest <= 0:
            break
        if out[l] < n[l]:
            out[l] += 1
            rest -= 1
    return out


def uniform_layer_budgets(total: int, non_tuning_counts: Sequence[int]) -> List[int]:
    """The "uniform merge budgets" ablation of Eq. 1: ``total`` merged experts shared equally over the layers
    (remainder to the shallowest layers), each clamped to ``[1, n_l]`` (0 when a layer has no non-tuning expert),
    the surplus of clamped layers re-shared among the others."""
    n = [int(c) for c in non_tuning_counts]
    out = [1 if c > 0 else 0 for c in n]
    rest = int(total) - sum(out)
    while rest > 0:
        open_ = [l for l in range(len(n)) if out[l] < n[l]]
        if not open_:
            break
        share, extra = divmod(rest, len(open_))
        for i, l in enumerate(open_):
            add = min(share + (1 if i < extra else 0), n[l] - out[l])
            out[l] += add
            rest -= add
    return out



# ----------------------------------------------------------------------------------------------------------------
# Clustering: PCA + cosine k-means, batched over layers


def _layer_generator(seed: int, layer: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(layer))


def pca_from_gram(gram: torch.Tensor, counts: torch.Tensor, dim: int) -> torch.Tensor:
    """PCA coordinates ``[L, N, dim]`` of the points of every layer from their Gram matrices ``[L, N, N]``
    (rows/cols beyond ``counts[l]`` are padding). Centres each layer on its own mean; padded points get 0."""
    L, N, _ = gram.shape
    valid = (torch.arange(N)[None, :] < counts[:, None]).to(gram.dtype)  # [L, N]
    n = counts.to(gram.dtype).clamp_min(1)[:, None]
    # Centring matrix J = I - 1 1^T / n restricted to the valid points.
    J = torch.diag_embed(valid) - valid[:, :, None] * valid[:, None, :] / n[:, :, None]
    G = J @ gram @ J
    G = 0.5 * (G + G.transpose(1, 2))
    evals, evecs = torch.linalg.eigh(G)  # ascending
    evals, evecs = evals.flip(-1), evecs.flip(-1)
    d = min(dim, N)
    coords = evecs[:, :, :d] * evals[:, None, :d].clamp_min(0).sqrt()
    # Deterministic signs: make the largest-magnitude coordinate of each component positive.
    idx = coords.abs().argmax(1, keepdim=True)
    sign = torch.sign(torch.gather(coords, 1, idx))
    sign[sign == 0] = 1
    return coords * sign * valid[:, :, None]


def cosine_kmeans(
    points: torch.Tensor, counts: torch.Tensor, ks: torch.Tensor, seed: int = 0, iters: int = 50, layer_ids=None
) -> torch.Tensor:
    """Batched cosine k-means. ``points [L, N, p]`` (padding beyond ``counts[l]``), ``ks [L]`` clusters per layer
    -> labels ``[L, N]`` (-1 on padding). k-means++ initialisation from per-layer seeded generators (so one layer
    clusters identically alone or in a batch); assignments to clusters of other layers or beyond ``ks[l]`` are
    masked out; empty clusters are refilled with the worst-fitting point of a cluster of size > 1."""
    L, N, p = points.shape
    K = int(ks.max()) if L else 0
    layer_ids = list(range(L)) if layer_ids is None else list(layer_ids)
    x = points / points.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    valid = torch.arange(N)[None, :] < counts[:, None]  # [L, N]
    cvalid = torch.arange(K)[None, :] < ks[:, None]  # [L, K]
    # Uniform draws per layer (same numbers batched or alone).
    u = torch.zeros(L, max(K, 1), dtype=torch.float64)
    for i, l in enumerate(layer_ids):
        g = _layer_generator(seed, l)
        u[i, : int(ks[i])] = torch.rand(int(ks[i]), generator=g, dtype=torch.float64)
    # k-means++ (cosine distance 1 - s).
    centers = torch.zeros(L, K, p, dtype=x.dtype)
    first = (u[:, 0] * counts.to(torch.float64)).floor().long().clamp_max((counts - 1).clamp_min(0))
    centers[:, 0] = x[torch.arange(L), first]
    best = torch.full((L, N), 2.0, dtype=x.dtype)
    for j in range(1, K):
        d = (1 - (x * centers[:, j - 1 : j]).sum(-1)).clamp_min(0)
        best = torch.minimum(best, d)
        w = (best * valid).to(torch.float64) ** 2
        tot = w.sum(1, keepdim=True)
        cdf = w.cumsum(1) / tot.clamp_min(1e-300)
        pick = torch.searchsorted(cdf, u[:, j : j + 1].contiguous(), right=True).squeeze(1)
        # A layer whose remaining points all coincide with chosen centres: take the j-th point.
        pick = torch.where(tot.squeeze(1) > 0, pick, torch.full_like(pick, j)).clamp_max((counts - 1).clamp_min(0))
        centers[:, j] = x[torch.arange(L), pick]
    labels = torch.full((L, N), -1, dtype=torch.long)
    for _ in range(iters):
        sim = x @ centers.transpose(1, 2)  # [L, N, K]
        sim = sim.masked_fill(~cvalid[:, None, :], -float("inf"))
        new = sim.argmax(-1).masked_fill(~valid, -1)
        new = _fill_empty(new, sim, counts, ks)
        onehot = torch.nn.functional.one_hot(new.clamp_min(0), K).to(x.dtype) * valid[:, :, None]
        sums = onehot.transpose(1, 2) @ x  # [L, K, p]
        norm = sums.norm(dim=-1, keepdim=True)
        centers = torch.where(norm > 1e-12, sums / norm.clamp_min(1e-12), centers)
        if torch.equal(new, labels):
            break
        labels = new
    return labels


def _fill_empty(labels: torch.Tensor, sim: torch.Tensor, counts: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """Give every cluster at least one point (deterministic: worst-fitting point of a multi-point cluster)."""
    L, N = labels.shape
    K = sim.shape[-1]
    sizes = torch.zeros(L, K + 1, dtype=torch.long).scatter_add_(1, labels.clamp_min(-1) + 1, torch.ones_like(labels))[:, 1:]
    empty = (sizes == 0) & (torch.arange(K)[None, :] < ks[:, None])
    if not bool(empty.any()):
        return labels
    labels = labels.clone()
    for l in torch.nonzero(empty.any(1)).flatten().tolist():
        n = int(counts[l])
        lab = labels[l, :n]
        own = sim[l, torch.arange(n), lab.clamp_min(0)]
        for c in torch.nonzero(empty[l]).flatten().tolist():
            size = torch.bincount(lab, minlength=K)
            movable = size[lab] > 1
            if not bool(movable.any()):
                break
            score = torch.where(movable, own, torch.full_like(own, float("inf")))
            i = int(score.argmin())
            lab[i] = c
            own[i] = sim[l, i, c]
        labels[l, :n] = lab
    return labels


def _gram(f: torch.Tensor) -> torch.Tensor:
    f = f.reshape(f.shape[0], -1).double()
    return f @ f.t()


def _pad_grams(grams: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    N = max((g.shape[0] for g in grams), default=0)
    out = torch.zeros(len(grams), N, N, dtype=torch.float64)
    for l, g in enumerate(grams):
        out[l, : g.shape[0], : g.shape[0]] = g
    return out, torch.tensor([g.shape[0] for g in grams], dtype=torch.long)


def _cluster_from_gram(gram, counts, ks_t, pca_dim, seed, iters, layer_ids):
    coords = pca_from_gram(gram, counts, pca_dim)
    labels = cosine_kmeans(coords, counts, ks_t.clamp_min(1), seed=seed, iters=iters, layer_ids=layer_ids)
    return [labels[i, : int(counts[i])].clone() for i in range(len(layer_ids))]


def cluster_grams(
    grams: Sequence[torch.Tensor],
    ks: Sequence[int],
    pca_dim: int = 16,
    seed: int = 0,
    iters: int = 50,
    batched: bool = True,
) -> List[torch.Tensor]:
    """Clustering from per-layer Gram matrices ``grams[l] = X_l X_l^T`` (``[n_l, n_l]``): the points themselves are
    never needed together, so a layer's experts can be streamed into its Gram matrix (``expert_gram``).
    ``batched``: all layers in one computation (padded to a common size, cross-layer assignments masked);
    otherwise one layer at a time (the reference; same results)."""
    ks = [max(1, min(int(k), g.shape[0])) for k, g in zip(ks, grams)]
    if not grams:
        return []
    if batched:
        gram, counts = _pad_grams(grams)
        return _cluster_from_gram(gram, counts, torch.tensor(ks), pca_dim, seed, iters, list(range(len(grams))))
    out = []
    for l, (g, k) in enumerate(zip(grams, ks)):
        gram, counts = _pad_grams([g])
        out += _cluster_from_gram(gram, counts, torch.tensor([k]), pca_dim, seed, iters, [l])
    return out


def cluster_layers(
    features: Sequence[torch.Tensor], ks: Sequence[int], pca_dim: int = 16, seed: int = 0, iters: int = 50
) -> List[torch.Tensor]:
    """Cluster every layer's points (``features[l]: [n_l, D]``, e.g. flattened non-tuning experts) into ``ks[l]``
    clusters in ONE batched computation: PCA of each layer (from its Gram matrix; batched ``eigh`` over the layers
    padded to a common size), then batched cosine k-means with cross-layer assignments masked. Seeded and
    deterministic. Returns per-layer labels ``[n_l]`` in ``[0, ks[l])``, every cluster non-empty."""
    return cluster_grams([_gram(f) for f in features], ks, pca_dim, seed, iters, batched=True)


def cluster_layers_loop(
    features: Sequence[torch.Tensor], ks: Sequence[int], pca_dim: int = 16, seed: int = 0, iters: int = 50
) -> List[torch.Tensor]:
    """The per-layer reference of ``cluster_layers`` (one layer at a time; same results)."""
    return cluster_grams([_gram(f) for f in features], ks, pca_dim, seed, iters, batched=False)


@torch.no_grad()
def expert_gram(experts: nn.Module, physical_ids: Sequence[int], chunk_rows: int = 256) -> torch.Tensor:
    """``[n, n]`` float64 Gram matrix of the flattened (gate_up, down) weights of the given physical experts,
    accumulated over row chunks (never a full float64 copy of the experts)."""
    idx = torch.as_tensor(list(physical_ids), dtype=torch.long, device=experts.gate_up_proj.device)
    n = idx.numel()
    G = torch.zeros(n, n, dtype=torch.float64)
    for W in (experts.gate_up_proj, experts.down_proj):
        for r in range(0, W.shape[1], chunk_rows):
            x = W[:, r : r + chunk_rows].index_select(0, idx).reshape(n, -1).double()
            G += (x @ x.t()).cpu()
    return G


# ----------------------------------------------------------------------------------------------------------------
# Eq. 2 merge into a compact model


def _tuning_masks(tuning_experts: Any, L: int, E: int) -> List[torch.Tensor]:
    if isinstance(tuning_experts, torch.Tensor) and tuning_experts.dtype == torch.bool:
        if tuning_experts.shape != (L, E):
            raise ValueError(f"tuning_experts mask must be [L={L}, E={E}], got {tuple(tuning_experts.shape)}")
        return [row.cpu().clone() for row in tuning_experts]
    if len(tuning_experts) != L:
        raise ValueError(f"tuning_experts needs one entry per MoE layer ({L}), got {len(tuning_experts)}")
    masks = []
    for ids in tuning_experts:
        m = torch.zeros(E, dtype=torch.bool)
        ids = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
        if any(not 0 <= i < E for i in ids):
            raise ValueError(f"tuning expert ids {ids} outside [0, {E})")
        m[ids] = True
        masks.append(m)
    return masks


def merge_alphas(profile: Any, layer: int, weighting: str) -> torch.Tensor:
    """``alpha_e`` of Eq. 2 for the original experts of MoE layer ``layer``."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    freq = profile_freq(profile)[layer]
    if weighting == "uniform":
        return torch.ones_like(freq)
    if weighting == "freq":
        return freq
    attn = profile_attn(profile)
    a = torch.ones_like(freq) if attn is None else attn[layer]
    return freq * a


def merge_weights(alpha: torch.Tensor) -> torch.Tensor:
    """Normalised Eq. 2 coefficients of one cluster (uniform when every alpha is 0)."""
    alpha = alpha.double().clamp_min(0)
    s = alpha.sum()
    return alpha / s if s > 0 else torch.full_like(alpha, 1.0 / max(alpha.numel(), 1))


@dataclass
class MergePlan:
    """Per MoE layer: the physical experts of the compact layer as lists of original ids (tuning experts first, one
    each), and the new ``expert_map``."""

    groups: List[List[List[int]]]
    expert_maps: List[torch.Tensor]

    @property
    def physical_experts(self) -> List[int]:
        return [len(g) for g in self.groups]


def plan_merge(
    model: nn.Module,
    profile: Any,
    tuning_experts: Any,
    budgets: Union[int, Sequence[int]],
    pca_dim: int = 16,
    seed: int = 0,
    iters: int = 50,
    batched: bool = True,
) -> MergePlan:
    """Which original experts end up in which physical expert (clustering only; weights untouched)."""
    layers = model.moe_layers()
    L, E = len(layers), model.config.num_experts
    masks = _tuning_masks(tuning_experts, L, E)
    non = [torch.nonzero(~m).flatten().tolist() for m in masks]
    if isinstance(budgets, int):
        budgets = layer_budgets(profile_freq(profile), budgets, [len(x) for x in non])
    budgets = [int(b) for b in budgets]
    if len(budgets) != L:
        raise ValueError(f"budgets needs one entry per MoE layer ({L}), got {len(budgets)}")
    grams, ks = [], []
    for mlp, ids, k in zip(layers, non, budgets):
        if ids and k < 1:
            raise ValueError(f"layer {mlp.layer}: {len(ids)} non-tuning experts need a budget >= 1, got {k}")
        if ids:
            grams.append(expert_gram(mlp.experts, mlp.experts.expert_map.long()[ids].tolist()))
            ks.append(min(k, len(ids)))
    todo = [i for i, ids in enumerate(non) if ids]
    labels = dict(zip(todo, cluster_grams(grams, ks, pca_dim=pca_dim, seed=seed, iters=iters, batched=batched)))
    groups, maps = [], []
    for l in range(L):
        tuning = torch.nonzero(masks[l]).flatten().tolist()
        g = [[e] for e in tuning]
        if l in labels:
            lab = labels[l].tolist()
            clusters = {}
            for e, c in zip(non[l], lab):
                clusters.setdefault(c, []).append(e)
            g += sorted(clusters.values(), key=lambda members: members[0])
        emap = torch.empty(E, dtype=torch.int32)
        for p, members in enumerate(g):
            emap[members] = p
        groups.append(g)
        maps.append(emap)
    return MergePlan(groups, maps)


@torch.no_grad()
def merge(
    model: nn.Module,
    profile: Any,
    tuning_experts: Any,
    budgets: Union[int, Sequence[int]],
    weighting: str = "freq_attn",
    pca_dim: int = 16,
    seed: int = 0,
    iters: int = 50,
    batched: bool = True,
    inplace: bool = False,
    plan: Optional[MergePlan] = None,
):
    """The compact model: per MoE layer, the tuning experts (``tuning_experts``: per-layer lists of original ids or
    a bool ``[L, E]`` mask) keep their own physical experts, untouched; the non-tuning experts are clustered into
    ``budgets[l]`` merged experts (``budgets`` an int total goes through ``layer_budgets``) and each cluster becomes
    ``sum_e alpha_e / sum alpha * W_e`` (Eq. 2, expert biases alike; ``weighting``: ``freq_attn`` alpha = f*a, ``freq`` alpha = f,
    ``uniform``). The expert weight stacks are replaced by new, smaller parameters (the old ones are dropped), and
    ``expert_map`` and ``config.physical_experts`` are updated. ``inplace=False`` works on a deep copy.
    Returns ``(model, plan)``.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if not inplace:
        model = copy.deepcopy(model)
    if plan is None:
        plan = plan_merge(model, profile, tuning_experts, budgets, pca_dim=pca_dim, seed=seed, iters=iters, batched=batched)
    for l, mlp in enumerate(model.moe_layers()):
        ex = mlp.experts
        if ex.has_tuning:
            raise ValueError("merge a model without LoRA or tuned experts attached (detach_tuning first)")
        old_map = ex.expert_map.long()
        alpha = merge_alphas(profile, l, weighting)
        for name in ex.stacks:  # weights and, when the experts have them, biases (gpt-oss): merged alike
            old = getattr(ex, name)
            new = torch.empty((len(plan.groups[l]),) + tuple(old.shape[1:]), dtype=old.dtype, device=old.device)
            for p, members in enumerate(plan.groups[l]):
                phys = old_map[members]
                if len(members) == 1:
                    new[p] = old[phys[0]]
                else:
                    w = merge_weights(alpha[members]).to(device=old.device)
                    new[p] = torch.einsum("m,m...->...", w, old[phys].double()).to(old.dtype)
            setattr(ex, name, nn.Parameter(new, requires_grad=old.requires_grad))
            del old
        ex.expert_map = plan.expert_maps[l].to(ex.expert_map.device)
    # MoEMLP/Attention modules share the model's config object: update it in place.
    model.config.physical_experts = plan.physical_experts
    model.merge_plan = plan
    return model


# ----------------------------------------------------------------------------------------------------------------
# Output error


@torch.no_grad()
def moe_layer_inputs(model: nn.Module, input_ids: torch.Tensor, attention_mask=None) -> List[torch.Tensor]:
    """The hidden states entering every MoE layer's MLP on a forward pass of ``model``."""
    captured, hooks = [], []
    for mlp in model.moe_layers():
        hooks.append(mlp.register_forward_hook(lambda m, args, out: captured.append(args[0].detach())))
    try:
        model(input_ids, attention_mask=attention_mask)
    finally:
        for h in hooks:
            h.remove()
    return captured


@torch.no_grad()
def merge_output_error(original: nn.Module, merged: nn.Module, input_ids: torch.Tensor, attention_mask=None) -> List[float]:
    """Relative error ``||y_merged - y||_F / ||y||_F`` of every MoE layer's output on held-out tokens, both layers
    fed the same inputs (the original model's hidden states, so errors do not compound across layers)."""
    inputs = moe_layer_inputs(original, input_ids, attention_mask)
    errors = []
    for h, a, b in zip(inputs, original.moe_layers(), merged.moe_layers()):
        ya, _ = a(h)
        yb, _ = b(h)
        if attention_mask is not None:
            keep = attention_mask.bool().reshape(-1)
            ya, yb = ya.reshape(-1, ya.shape[-1])[keep], yb.reshape(-1, yb.shape[-1])[keep]
        errors.append(float((yb.float() - ya.float()).norm() / ya.float().norm().clamp_min(1e-30)))
    return errors
