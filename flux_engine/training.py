"""One client's local training for a round (FLUX_DESIGN.md section 5, "Local tuning" and "Utility (Eq. 3)").

The model is the client's compact (merged) model. Only the tuning experts train, either through LoRA factors
(``mode="lora"``, the default) or at full size (``mode="full"``, the paper's mode); everything else is frozen, so the
optimizer state and gradients exist for the tuning experts only and the frozen expert stacks never get a gradient
buffer. While training, the round also yields what the server needs: the trained tensors of each tuning expert,
the tokens routed to it (aggregation weights) and its Eq. 3 utility.

Experts are named by ``ExpertKey = (MoE layer index in model.moe_layers() order, ORIGINAL expert id)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from flux_engine import ops
from flux_engine.models.moe import (
    EXPERT_BIASES,
    LORA_TARGETS,
    ExpertLoRAAdapter,
    Experts,
    check_lora_settings,
    load_balancing_loss,
)
from flux_engine.roles import routed_samples, utility_from

ExpertKey = Tuple[int, int]
ExpertState = Dict[ExpertKey, Dict[str, torch.Tensor]]
MODES = ("lora", "full")
FULL_NAMES = ("gate_up", "down")
FULL_BIASES = ("gate_up_bias", "down_bias")


@dataclass
class TrainConfig:
    """Local training settings. ``steps=None``: ``epochs`` passes over the data; otherwise exactly ``steps``
    optimizer steps, cycling over the data. One optimizer step = ``grad_accum_steps`` micro-batches of
    ``micro_batch_size`` sequences; the loss of a step is the mean over all its target tokens, so accumulation does
    not change the gradient. ``rank``/``alpha``/``targets`` apply to LoRA mode (scale ``alpha / rank``)."""

    mode: str = "lora"
    # Expert biases (gpt-oss) stay frozen unless asked: then LoRA trains per-expert bias deltas (``gate_up_bias``,
    # ``down_bias`` in ``TrainResult.trained``), full mode the tuned experts' biases themselves. The federated
    # aggregation carries weights and LoRA factors only, so runs through the server keep this off.
    train_biases: bool = False
    rank: int = 8
    alpha: float = 16.0
    targets: Tuple[str, ...] = LORA_TARGETS
    lr: float = 1e-3
    weight_decay: float = 0.0
    steps: Optional[int] = None
    epochs: int = 1
    micro_batch_size: int = 4
    grad_accum_steps: int = 1
    max_grad_norm: Optional[float] = 1.0
    activation_checkpointing: bool = False
    aux_loss_coef: float = 0.0
    seed: int = 0

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"TrainConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "lora":
            check_lora_settings(self.rank, self.targets)
        for name in ("epochs", "micro_batch_size", "grad_accum_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"TrainConfig.steps must be None or >= 1, got {self.steps}")
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")


@dataclass
class TrainResult:
    """``trained``: fp32 CPU tensors per tuning expert (full: ``gate_up [2I, H]``, ``down [H, I]``, with
    ``train_biases`` also ``gate_up_bias [2I]``, ``down_bias [H]`` (LoRA: those are deltas); LoRA:
    ``gate_up_A [r, H]``, ``gate_up_B [2I, r]``, ``down_A [r, I]``, ``down_B [H, r]`` for the targets present);
    ``token_counts``: non-padding tokens routed to each tuning expert over the round; ``utilities``: ``[L, E_orig]``
    float64 Eq. 3 (micro-batch form, first pass over the data) for tuning experts, NaN elsewhere; ``losses``: the
    mean loss of every optimizer step; ``tokens``: non-padding tokens forwarded; ``routed``: int64 ``[L, E_orig]``
    non-padding (token, slot) pairs the routers sent to each original expert over the round, trained or not (a
    merged expert serves those of its group: the routers are remapped, not retrained), so ``routed[k] ==
    token_counts[k]`` for the tuning experts."""

    trained: ExpertState
    token_counts: Dict[ExpertKey, int]
    utilities: torch.Tensor
    losses: List[float]
    steps: int
    tokens: int
    seconds: float
    routed: torch.Tensor


# ----------------------------------------------------------------------------------------------------------------
# Attaching the tuning experts


def check_owns(model: nn.Module, layer: int, expert: int) -> None:
    """A trained expert must own its physical expert alone: a merged expert is frozen (and shared)."""
    emap = model.moe_layers()[layer].experts.expert_map.long().cpu()
    sharing = torch.nonzero(emap == emap[expert]).flatten().tolist()
    if sharing != [expert]:
        raise ValueError(
            f"MoE layer {layer}: tuning expert {expert} does not own its physical expert {int(emap[expert])} (shared "
            f"with original experts {sharing}); merge with it as a tuning expert first (merging.merge)"
        )


def _normalise_tuning(model: nn.Module, tuning: Sequence[Sequence[int]]) -> List[List[int]]:
    """Per MoE layer, the tuning experts' original ids (validated: in range, distinct, each owning its physical
    expert)."""
    L, E = len(model.moe_layers()), model.config.num_experts
    if len(tuning) != L:
        raise ValueError(f"tuning needs one list per MoE layer ({L}), got {len(tuning)}")
    out = []
    for l, ids in enumerate(tuning):
        ids = [int(e) for e in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
        if any(not 0 <= e < E for e in ids) or len(set(ids)) != len(ids):
            raise ValueError(f"MoE layer {l}: tuning experts {ids} must be distinct ids in [0, {E})")
        for e in ids:
            check_owns(model, l, e)
        out.append(ids)
    return out


def _tuned_layers(model: nn.Module, tuning: Sequence[Sequence[int]]) -> List[Tuple[int, Experts, List[int]]]:
    return [(l, mlp.experts, ids) for l, (mlp, ids) in enumerate(zip(model.moe_layers(), tuning)) if ids]


def _expert_generator(seed: int, layer: int, expert: int) -> torch.Generator:
    # Keyed by the expert, not its slot: every client starts an expert from the same factors for a given seed.
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(layer)) * 1_000_003 + int(expert))


def initial_adapters(seed: int, key: ExpertKey, hidden: int, intermediate: int, rank: int) -> Dict[str, torch.Tensor]:
    """The LoRA factors every client starts expert ``key`` from (``attach_tuning`` with ``TrainConfig.seed`` =
    ``seed``, default targets, before any step), by ``TrainResult.trained`` names: what each client holds for an
    expert no round has trained yet (the server's average over users, ``aggregation.aggregate``)."""
    lora = ExpertLoRAAdapter(torch.zeros(1, dtype=torch.int32), hidden, intermediate, rank, alpha=float(rank))
    lora.reset_slot(0, _expert_generator(seed, *key))
    return {f"{t}_{f}": getattr(lora, f"{t}_{f}")[0].detach().clone() for t in lora.targets for f in "AB"}


def attach_tuning(
    model: nn.Module, tuning: Sequence[Sequence[int]], config: TrainConfig, init: Optional[ExpertState] = None
) -> List[nn.Parameter]:
    """Freeze the model and make the tuning experts trainable; returns the trainable parameters.

    ``tuning``: per MoE layer, ORIGINAL expert ids; each must own its physical expert. LoRA mode adds an
    ``ExpertLoRAAdapter`` (``S`` slots in the order of ``tuning[l]``) to each layer with tuning experts; full mode
    splits their physical weights off into ``tuned_*`` stacks. ``init`` (as in ``TrainResult.trained``) sets the
    starting factors / weights of the tuning experts it names (entries for other experts are ignored: a server may
    send its whole global state); tuning experts without an entry start from PEFT's init (LoRA) or their current
    weights (full).
    """
    config.validate()
    tuning = _normalise_tuning(model, tuning)
    if any(mlp.experts.has_tuning for mlp in model.moe_layers()):
        raise ValueError("tuning experts are already attached: call detach_tuning(model) first")
    if config.train_biases and not model.config.expert_bias:
        raise ValueError("TrainConfig.train_biases: this model's experts have no biases")
    model.requires_grad_(False)
    H, I = model.config.hidden_size, model.config.moe_intermediate_size
    for l, ex, ids in _tuned_layers(model, tuning):
        if config.mode == "full":
            ex.split_tuned([int(ex.expert_map[e]) for e in ids])
            for name in EXPERT_BIASES:  # split off frozen; trained only when asked
                bias = getattr(ex, f"tuned_{name}", None)
                if bias is not None:
                    bias.requires_grad_(config.train_biases)
            continue
        slots = torch.full((ex.expert_map.numel(),), -1, dtype=torch.int32)
        slots[ids] = torch.arange(len(ids), dtype=torch.int32)
        ex.lora = ExpertLoRAAdapter(slots.to(ex.expert_map.device), H, I, config.rank, config.alpha, config.targets,
                                    biases=config.train_biases)  # fmt: skip
        for s, e in enumerate(ids):
            ex.lora.reset_slot(s, _expert_generator(config.seed, l, e))
    if init:
        _load_state(model, {(l, e): v for (l, e), v in init.items() if 0 <= l < len(tuning) and e in tuning[l]})
    return trainable_parameters(model)


def _layer_parameters(ex: Experts) -> List[nn.Parameter]:
    """One layer's attached tuning tensors; dim 0 of each is the slot (LoRA) or tuned expert, in ``tuning`` order."""
    if ex.lora is not None:
        return list(ex.lora.parameters())
    tuned = (getattr(ex, f"tuned_{name}") for name in ex.stacks)
    return [p for p in tuned if p is not None and p.requires_grad]


# Full mode: ``TrainResult.trained`` names -> the expert's stacks (the biases only when they train).
_FULL_STACKS = {"gate_up": "gate_up_proj", "down": "down_proj", "gate_up_bias": "gate_up_proj_bias",
                "down_bias": "down_proj_bias"}  # fmt: skip


def _full_views(ex: Experts, p: int, names: Sequence[str]) -> Dict[str, torch.Tensor]:
    """Views of physical expert ``p``'s tensors by ``TrainResult.trained`` names."""
    views = ex.physical_tensors(p)
    return {name: views[_FULL_STACKS[name]] for name in names}


def trainable_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The attached tuning tensors (LoRA factors or tuned stacks), in ``moe_layers()`` order."""
    return [p for mlp in model.moe_layers() for p in _layer_parameters(mlp.experts)]


def detach_tuning(model: nn.Module) -> None:
    """Back to a plain model: tuned stacks are folded back into the expert stacks (original physical order),
    LoRA adapters are dropped (fold them first with ``adapters.merge_lora`` to keep them). Parameters stay frozen."""
    for mlp in model.moe_layers():
        mlp.experts.fold_tuned()
        mlp.experts.lora = None


def _slot_tensors(ex: Experts, slot: int, e: int) -> Dict[str, torch.Tensor]:
    """The trainable tensors of one tuning expert (views), by ``TrainResult.trained`` names."""
    if ex.lora is not None:
        out = {f"{t}_{f}": getattr(ex.lora, f"{t}_{f}")[slot] for t in ex.lora.targets for f in "AB"}
        return {**out, **{name: getattr(ex.lora, name)[slot] for name in ex.lora.bias_names}}
    trained_biases = ex.tuned_gate_up_proj_bias is not None and ex.tuned_gate_up_proj_bias.requires_grad
    return _full_views(ex, int(ex.expert_map[e]), FULL_NAMES + (FULL_BIASES if trained_biases else ()))


def _attached_slots(model: nn.Module) -> Iterator[Tuple[int, Experts, int, int]]:
    """``(layer, experts, slot, original id)`` of every attached tuning expert."""
    for l, mlp in enumerate(model.moe_layers()):
        ex = mlp.experts
        if ex.lora is not None:
            for e, s in enumerate(ex.lora.slots.tolist()):
                if s >= 0:
                    yield l, ex, s, e
        elif ex.tuned_gate_up_proj is not None:
            emap = ex.expert_map.tolist()
            for e, p in enumerate(emap):
                if p < ex.num_tuned:
                    yield l, ex, p, e


def tuning_state(model: nn.Module) -> ExpertState:
    """fp32 CPU copies of the attached tuning experts' trainable tensors (the format of ``TrainResult.trained``)."""
    return {
        (l, e): {k: v.detach().float().cpu().clone() for k, v in _slot_tensors(ex, s, e).items()}
        for l, ex, s, e in _attached_slots(model)
    }


def _copy_expert(key: ExpertKey, src: Dict[str, torch.Tensor], dst: Dict[str, torch.Tensor]) -> None:
    """Copy one expert's named tensors into ``dst``'s views after checking names and shapes."""
    if set(src) != set(dst):
        raise ValueError(f"expert {key}: expected tensors {sorted(dst)}, got {sorted(src)}")
    for name, t in src.items():
        if tuple(t.shape) != tuple(dst[name].shape):
            raise ValueError(f"expert {key}: {name} has shape {tuple(t.shape)}, expected {tuple(dst[name].shape)}")
        dst[name].copy_(t)


@torch.no_grad()
def _load_state(model: nn.Module, state: ExpertState) -> None:
    """Copy ``state`` into the attached tuning experts it names."""
    slots = {(l, e): (ex, s) for l, ex, s, e in _attached_slots(model)}
    for key, tensors in state.items():
        if key not in slots:
            raise ValueError(f"expert {key} is not an attached tuning expert")
        _copy_expert(key, tensors, _slot_tensors(*slots[key], key[1]))


@torch.no_grad()
def load_expert_weights(model: nn.Module, weights: ExpertState) -> None:
    """Set full-size expert weights (``{"gate_up": [2I, H], "down": [H, I]}`` per ``ExpertKey``, plus
    ``gate_up_bias`` / ``down_bias`` when biases were trained; e.g. the global weights after full-mode aggregation)
    on a model's physical experts; each expert must own its physical one."""
    layers = model.moe_layers()
    for (l, e), tensors in weights.items():
        check_owns(model, l, e)
        ex = layers[l].experts
        names = FULL_NAMES + tuple(n for n in FULL_BIASES if n in tensors)
        _copy_expert((l, e), tensors, _full_views(ex, int(ex.expert_map[e]), names))


# ----------------------------------------------------------------------------------------------------------------
# Data


Batch = Union[torch.Tensor, Dict[str, torch.Tensor]]


MicroBatch = Dict[str, Optional[torch.Tensor]]


def _micro_batches(data: Sequence[Batch], size: int, device: torch.device) -> Iterator[MicroBatch]:
    """``{"input_ids", "attention_mask", "labels"}`` slices of at most ``size`` rows (labels -100 on padding)."""
    for batch in data:
        if isinstance(batch, torch.Tensor):
            batch = {"input_ids": batch}
        if "input_ids" not in batch:
            raise ValueError("a data batch must be a [B, T] tensor of token ids or a dict with 'input_ids'")
        ids = batch["input_ids"]
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(ids.shape)}")
        mask, labels = batch.get("attention_mask"), batch.get("labels")
        labels = ids if labels is None else labels
        if mask is not None:
            labels = labels.masked_fill(~mask.bool(), -100)
        for s in range(0, ids.shape[0], size):
            yield {
                "input_ids": ids[s : s + size].to(device),
                "attention_mask": None if mask is None else mask[s : s + size].to(device),
                "labels": labels[s : s + size].to(device),
            }


def _steps(data: Sequence[Batch], config: TrainConfig, device: torch.device):
    """Groups of ``grad_accum_steps`` micro-batches, each tagged with whether it belongs to the first pass."""
    group, epoch = [], 0
    while config.steps is not None or epoch < config.epochs:
        for mb in _micro_batches(data, config.micro_batch_size, device):
            group.append((mb, epoch == 0))
            if len(group) == config.grad_accum_steps:
                yield group
                group = []
        epoch += 1
    if group:
        yield group


# ----------------------------------------------------------------------------------------------------------------
# Training


def train_round(
    model: nn.Module,
    tuning: Sequence[Sequence[int]],
    data: Sequence[Batch],
    config: TrainConfig,
    init: Optional[ExpertState] = None,
) -> TrainResult:
    """Train the tuning experts of ``model`` on ``data`` (``[B, T]`` token-id tensors or ``lm_batches`` dicts with
    ``input_ids`` / ``attention_mask`` / ``labels``, used in order) with AdamW over the tuning tensors only.

    Attaches the tuning (``attach_tuning``) and leaves it attached, so the model computes with the trained
    experts afterwards; ``detach_tuning`` (full mode: folds them in) or ``adapters.merge_lora`` end that.

    Eq. 3 (micro-batch form, as ``roles.utility_microbatch``): ``u_e = |D_e| sqrt(sum_j ||G_j||^2 / |D_e|)`` over the
    first pass, ``G_j`` the gradient w.r.t. e's trainable tensors of micro-batch j's summed per-sequence mean losses.
    It is recovered from the training gradient (mean over the step's target tokens) by the factor
    ``step tokens / (micro-batch tokens / micro-batch sequences)``: exact when the sequences of a micro-batch have
    equal token counts (packed ``lm_batches``), an approximation otherwise.
    """
    start = time.perf_counter()
    data = list(data)  # may be a generator (lm_batches); epochs re-read it
    if not data:
        raise ValueError("train_round needs at least one batch of data")
    tuning = _normalise_tuning(model, tuning)
    params = attach_tuning(model, tuning, config, init)
    device = next(model.parameters()).device
    E = model.config.num_experts
    L = len(model.moe_layers())
    # Per layer with tuning experts: its trainable tensors (dim 0 = slot) and the original id of each slot.
    layers = [(l, _layer_parameters(ex), torch.tensor(ids)) for l, ex, ids in _tuned_layers(model, tuning)]
    counts = torch.zeros(L, E + 1, dtype=torch.long, device=device)  # bucket E: padding
    sum_sq = torch.zeros(L, E, dtype=torch.float64)
    samples = torch.zeros(L, E, dtype=torch.float64)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay) if params else None
    losses: List[float] = []
    tokens = 0
    was_training, was_checkpointing = model.training, model.gradient_checkpointing
    model.train()
    model.gradient_checkpointing = config.activation_checkpointing
    try:
        for group in _steps(data, config, device):
            step_targets = sum(int((mb["labels"][:, 1:] != -100).sum()) for mb, _ in group)
            step_loss = 0.0
            for mb, first_pass in group:
                loss, routers, mb_targets = _micro_batch_loss(model, mb, step_targets, config.aux_loss_coef)
                step_loss += float(loss.detach())
                mask = mb["attention_mask"]
                tokens += int(mb["input_ids"].numel() if mask is None else mask.sum())
                _count_tokens(routers, mask, counts)
                if opt is None:
                    continue
                grads = dict(zip(params, torch.autograd.grad(loss, params, allow_unused=True)))
                for p, g in grads.items():
                    if g is not None:
                        p.grad = g if p.grad is None else p.grad.add_(g)
                if first_pass and mb_targets:
                    B = mb["input_ids"].shape[0]
                    hit = routed_samples(routers, B, E, mask)  # [L, B, E]
                    touched = hit.any(1)
                    factor = step_targets * B / mb_targets
                    for l, ps, experts in layers:
                        sq = sum(grads[p].double().pow(2).flatten(1).sum(1) for p in ps if grads[p] is not None)
                        sq = torch.as_tensor(sq, dtype=torch.float64).cpu() * factor**2
                        sum_sq[l, experts] += torch.where(touched[l, experts], sq, torch.zeros(()))
                    samples += hit.sum(1).double()
            losses.append(step_loss)
            if opt is not None:
                if config.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
            if config.steps is not None and len(losses) == config.steps:
                break
    finally:
        model.train(was_training)
        model.gradient_checkpointing = was_checkpointing
    utilities = torch.full((L, E), float("nan"), dtype=torch.float64)
    all_util = utility_from(sum_sq, samples)
    counts = counts[:, :E].cpu()
    token_counts = {}
    for l, _, experts in layers:
        utilities[l, experts] = all_util[l, experts]
        token_counts.update({(l, int(e)): int(counts[l, e]) for e in experts})
    return TrainResult(tuning_state(model), token_counts, utilities, losses, len(losses), tokens,
                       time.perf_counter() - start, counts.to(torch.int64))  # fmt: skip


def _micro_batch_loss(model: nn.Module, mb: MicroBatch, step_targets: int, aux_coef: float):
    """``(loss, routers, targets)``: the micro-batch's share of the step loss (summed token cross-entropy over the
    step's target tokens, plus its share of the auxiliary loss), its routers and its target-token count."""
    out = model(mb["input_ids"], attention_mask=mb["attention_mask"], return_routers=True)
    logits = out.logits[:, :-1].float()
    targets = mb["labels"][:, 1:]
    n = int((targets != -100).sum())
    summed = F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1), ignore_index=-100, reduction="sum")
    loss = summed / max(step_targets, 1)
    if aux_coef > 0 and out.routers:
        aux = torch.stack([load_balancing_loss(r, model.config.num_experts) for r in out.routers]).mean()
        loss = loss + aux_coef * aux * n / max(step_targets, 1)
    return loss, out.routers, n


def _count_tokens(routers, attention_mask: Optional[torch.Tensor], counts: torch.Tensor) -> None:
    """Add each layer's routed (non-padding token, slot) pairs per original expert to ``counts [L, E + 1]``."""
    E = counts.shape[1] - 1
    for l, r in enumerate(routers):
        ids = r.ids.long()
        if attention_mask is not None:
            ids = ids.masked_fill(~attention_mask.bool().reshape(-1, 1), E)
        ops.expert_counts(ids, E + 1, out=counts[l])


# ----------------------------------------------------------------------------------------------------------------
# The routed subset


def routed_subset(samples: Any, tuning: Sequence[Sequence[int]], sample_ids: Sequence[Any]) -> List[Any]:
    """The ``sample_ids`` (in their order) that reached at least one tuning expert: the data a client trains on.

    ``samples``: ``samples[l][e]`` = ids of the samples routed to original expert e of MoE layer l (``D_e``), or an
    ``ExpertProfile`` (its ``.samples``)."""
    per_layer = getattr(samples, "samples", samples)
    if len(per_layer) != len(tuning):
        raise ValueError(f"samples has {len(per_layer)} MoE layers, tuning {len(tuning)}")
    reached: Set[Any] = set()
    for layer, ids in zip(per_layer, tuning):
        for e in ids:
            reached.update(layer[int(e)])
    return [s for s in sample_ids if s in reached]
