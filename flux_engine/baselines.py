"""The baselines of the time-to-accuracy experiment (FLUX_DESIGN.md sections 7 and 8): what a client trains in a
round under each baseline, with the memory each needs and the extra bytes the time model charges (Flux's own round
is ``flux_engine.flux_round``). Pure functions over the runtime model (``MoEForCausalLM``) and a profile (``profiling.ExpertProfile`` or
``merging.FrequencyProfile``); no federated code. Every method shares the data, the local training
(``training.train_round``), the evaluation and the time model (``flux_engine.timemodel``).

Baselines (``BASELINES``), each a function returning a ``Policy``:

- ``fedavg-lora``: every expert of every layer is a tuning expert (LoRA), nothing merged. The model is assumed to
  fit; ``Policy.memory`` reports what it would need against the budget (no error when it does not fit).
- ``fmd`` (offloading): the full model, LoRA on every expert. From the budget, the most frequent experts (by the
  profile, ranked over all layers) stay resident on the GPU; the others live in host memory and are fetched over
  PCIe when tokens route to them, once per forward pass per layer and again for its backward pass
  (``fetch_bytes`` for one forward pass, ``FetchCounter`` while training). The math is FedAvg-LoRA's; only the
  time differs.
- ``fmq``: every expert int4 (packed, group-wise symmetric, ``ops.quantize``), LoRA on every expert trained through
  the frozen quantized weights (QLoRA style). ``QuantizedExperts`` is a subclass of ``models.moe.Experts`` whose
  ``gate_up_proj`` / ``down_proj`` are ``ops.QuantizedTensor`` views of packed buffers: ``Experts.forward`` hands
  them to ``ops.grouped_mlp`` unchanged (the op accepts packed bases with LoRA), so no model change is needed.
- ``fmes`` (expert dropping): keep the most frequent experts that fit the budget as tuning experts, drop the rest.
  The compact model keeps only the kept experts' weights; a forward hook on each router sets the dropped experts'
  logits to -inf before top-k, so their tokens are re-routed among the kept experts (routing weights renormalised
  over the kept ones when the model renormalises). The router keeps its ``E_orig`` logits (profiles and expert keys
  stay in original ids). Implementation artefact: the runtime requires every original id to map to a physical
  expert and a LoRA'd expert to own its physical expert alone, so the dropped ids map to one zero-weight "sink"
  expert per layer that never receives a token; its bytes are reported in ``Policy.memory.notes``, not charged to
  the budget (an implementation slicing the router rows would not need it).

Memory models come from ``budget.py`` (same terms, same ``TrainSettings``). Bytes and seconds for the time model:
``Policy.prepare_seconds`` (merge / quantize / drop: the "merge" term), ``Policy.pcie_bytes()`` (FMD fetches
counted while training), and ``upload_bytes(TrainResult.trained)`` / ``timemodel.tensor_bytes``; ``client_round``
assembles them into a ``timemodel.ClientRound``.
"""

from __future__ import annotations

import copy
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from flux_engine import merging, ops
from flux_engine.budget import (
    BudgetError,
    TrainSettings,
    _human,
    dtype_bytes,
    expert_parameters,
    memory_breakdown,
    quantized_expert_bytes,
    tuning_expert_terms,
)
from flux_engine.models.config import MoEConfig
from flux_engine.models.moe import EXPERT_BIASES, Experts, MoEMLP
from flux_engine.ops.quantize import QuantizedTensor
from flux_engine.profiling import group_for

if TYPE_CHECKING:
    from flux_engine.timemodel import ClientRound

BASELINES = ("fedavg-lora", "fmd", "fmq", "fmes")
ALLOCATIONS = ("global", "uniform")


# ----------------------------------------------------------------------------------------------------------------
# Common results


@dataclass
class MemoryEstimate:
    """``terms``: bytes charged against the client's ``budget_bytes``; ``notes``: bytes reported but not charged
    (host memory, implementation artefacts)."""

    budget_bytes: int
    terms: Dict[str, int]
    notes: Dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return int(sum(self.terms.values()))

    @property
    def fits(self) -> bool:
        return self.total <= self.budget_bytes

    def describe(self) -> str:
        lines = [f"memory budget {_human(self.budget_bytes)} ({self.budget_bytes} B)"]
        for name, v in self.terms.items():
            lines.append(f"  {name:<48} {_human(v):>12}  ({v} B)")
        verdict = "fits" if self.fits else f"EXCEEDS the budget by {_human(self.total - self.budget_bytes)}"
        lines.append(f"  {'total':<48} {_human(self.total):>12}  ({self.total} B): {verdict}")
        for name, v in self.notes.items():
            lines.append(f"  not charged: {name:<35} {_human(v):>12}  ({v} B)")
        return "\n".join(lines)

    __str__ = describe


@dataclass
class Policy:
    """What a client trains this round under ``method``.

    ``model``: the model to pass to ``training.train_round``; ``tuning``: per MoE layer, the ORIGINAL ids of the
    tuning experts (``train_round``'s ``tuning``); ``memory``: the memory estimate; ``prepare_seconds``: measured
    seconds to build ``model`` (merge, quantize or drop: the time model's "merge" term); ``info``: method details
    (resident / kept sets, bytes saved, ...); ``fetch``: FMD's ``FetchCounter`` (attach it around training)."""

    method: str
    model: nn.Module
    tuning: List[List[int]]
    memory: MemoryEstimate
    prepare_seconds: float = 0.0
    info: Dict[str, Any] = field(default_factory=dict)
    fetch: Optional["FetchCounter"] = None

    def tuning_mask(self) -> torch.Tensor:
        """Bool ``[L, E_orig]`` of the tuning experts."""
        L, E = len(self.tuning), self.model.config.num_experts
        mask = torch.zeros(L, E, dtype=torch.bool)
        for l, ids in enumerate(self.tuning):
            mask[l, ids] = True
        return mask

    def pcie_bytes(self) -> int:
        """Host -> GPU bytes counted by ``fetch`` so far (0 for methods without offloading)."""
        return 0 if self.fetch is None else self.fetch.bytes

    def describe(self) -> str:
        n = sum(len(t) for t in self.tuning)
        lines = [f"{self.method}: {n} tuning experts ({', '.join(str(len(t)) for t in self.tuning)} per MoE layer), "
                 f"prepared in {self.prepare_seconds:.3f} s"]  # fmt: skip
        for k, v in self.info.items():
            if isinstance(v, (int, float, str)):
                lines.append(f"  {k}: {v}")
        lines.append(self.memory.describe())
        return "\n".join(lines)


def upload_bytes(trained: Any) -> int:
    """Bytes a client uploads: the tensors it trained, in fp32 (``TrainResult.trained``)."""
    from flux_engine.timemodel import tensor_bytes

    return tensor_bytes(trained, dtype_bytes=4)


def client_round(
    policy: Policy,
    result: Any,
    download_bytes: int,
    client: Union[int, str] = 0,
    profile_seconds: float = 0.0,
    stale: Optional[bool] = None,
) -> "ClientRound":
    """The time model's record of one client's round (``timemodel.ClientRound``): ``result`` a
    ``training.TrainResult`` (its ``seconds`` are the local-train term, its ``trained`` tensors the upload, fp32);
    ``policy.prepare_seconds`` the merge term; ``policy.pcie_bytes()`` FMD's fetches; ``download_bytes`` what the
    server sent (``timemodel.tensor_bytes`` of it); ``profile_seconds`` measured profiling (0 for methods that do not
    profile), ``stale`` whether it may hide behind the previous aggregation."""
    from flux_engine.timemodel import ClientRound

    return ClientRound(client=client, download_bytes=int(download_bytes), upload_bytes=upload_bytes(result.trained),
                       profile_seconds=float(profile_seconds), merge_seconds=float(policy.prepare_seconds),
                       train_seconds=float(result.seconds), pcie_bytes=policy.pcie_bytes(), stale=stale)  # fmt: skip


def all_experts(config: MoEConfig) -> List[List[int]]:
    """Every original expert of every MoE layer."""
    return [list(range(config.num_experts)) for _ in config.moe_layer_indices]


def _freq(profile: Any, L: int, E: int) -> torch.Tensor:
    f = merging.profile_freq(profile)
    if tuple(f.shape) != (L, E):
        raise ValueError(f"profile frequencies must be [L={L}, E={E}], got {tuple(f.shape)}")
    return f


def _rank_pairs(freq: torch.Tensor, exclude: Optional[torch.Tensor] = None) -> List[Tuple[int, int]]:
    """``(layer, expert)`` pairs by decreasing frequency (ties: shallower layer, then lower id)."""
    L, E = freq.shape
    pairs = [(l, e) for l in range(L) for e in range(E) if exclude is None or not bool(exclude[l, e])]
    return sorted(pairs, key=lambda p: (-float(freq[p[0], p[1]]), p[0], p[1]))


def _fixed_terms(config: MoEConfig, settings: TrainSettings, budget_bytes: int) -> "OrderedDict[str, int]":
    """Non-expert weights, activations and workspace (``budget.memory_breakdown`` with no experts)."""
    return OrderedDict((k, v) for k, v in memory_breakdown(config, settings, 0, 0, budget_bytes).items() if v)


def _lora_state_bytes(config: MoEConfig, settings: TrainSettings) -> int:
    """Per tuning expert: everything but its base weights (LoRA factors, grads, optimizer state)."""
    terms = tuning_expert_terms(config, settings)
    return int(sum(terms.values()) - terms["weights"])


def _require_lora(settings: TrainSettings, method: str) -> None:
    if not settings.lora:
        raise ValueError(f"{method} trains LoRA adapters: TrainSettings.lora_rank must be > 0")


# ----------------------------------------------------------------------------------------------------------------
# FedAvg-LoRA


def fedavg_lora_memory(config: MoEConfig, settings: TrainSettings, budget_bytes: int) -> MemoryEstimate:
    """Every expert a LoRA tuning expert, nothing merged (``budget.memory_breakdown`` with ``B_tune = L * E``)."""
    L, E = len(config.moe_layer_indices), config.num_experts
    terms = {k: v for k, v in memory_breakdown(config, settings, L * E, 0, budget_bytes).items() if v}
    return MemoryEstimate(int(budget_bytes), terms)


def fedavg_lora(model: nn.Module, budget_bytes: int, settings: Optional[TrainSettings] = None) -> Policy:
    """The model as it is, every expert tuned through LoRA; memory reported, never enforced."""
    settings = settings or TrainSettings()
    _require_lora(settings, "fedavg-lora")
    memory = fedavg_lora_memory(model.config, settings, budget_bytes)
    return Policy("fedavg-lora", model, all_experts(model.config), memory, 0.0, {"fits_budget": memory.fits})


# ----------------------------------------------------------------------------------------------------------------
# FMD: offloading


@dataclass
class Residency:
    """FMD's placement: ``resident [L, E]`` bool (True: weights on the GPU), bytes of one expert's weights, and the
    memory estimate."""

    resident: torch.Tensor
    expert_bytes: int
    memory: MemoryEstimate

    @property
    def num_resident(self) -> int:
        return int(self.resident.sum())

    def nonresident(self) -> List[List[int]]:
        return [torch.nonzero(~row).flatten().tolist() for row in self.resident]


def plan_residency(
    config: MoEConfig,
    profile: Any,
    budget_bytes: int,
    settings: Optional[TrainSettings] = None,
    staging_experts: Optional[int] = None,
) -> Residency:
    """Which experts FMD keeps on the GPU.

    GPU memory: the fixed terms (non-expert weights, activations, workspace), the LoRA state of EVERY expert
    (factors, grads, optimizer: small, kept resident), a staging buffer for fetched experts (``staging_experts``
    expert weights, default ``E``: a whole layer's worth, the worst case of one forward pass of one layer; none when
    everything is resident) and the resident experts' weights. The rest of the budget buys resident experts, chosen
    by profile frequency over all layers (ties: shallower layer, lower id). Raises ``BudgetError`` when the fixed
    terms, the LoRA state and the staging buffer do not fit.
    """
    settings = settings or TrainSettings()
    L, E = len(config.moe_layer_indices), config.num_experts
    total = L * E
    w = expert_parameters(config) * dtype_bytes(settings.dtype)
    lora = _lora_state_bytes(config, settings)
    fixed = _fixed_terms(config, settings, budget_bytes)
    avail = int(budget_bytes) - sum(fixed.values()) - total * lora
    staging = E if staging_experts is None else int(staging_experts)
    if avail >= total * w:
        R, staging = total, 0
    else:
        R = max(0, min(total, avail // w - staging))
        if avail < staging * w:
            missing = staging * w - avail
            raise BudgetError(
                f"FMD: memory budget {_human(budget_bytes)} is {_human(missing)} short of the fixed terms, the LoRA "
                f"state of all {total} experts and a staging buffer of {staging} experts", missing,
            )  # fmt: skip
    freq = _freq(profile, L, E)
    resident = torch.zeros(L, E, dtype=torch.bool)
    for l, e in _rank_pairs(freq)[:R]:
        resident[l, e] = True
    terms = OrderedDict(fixed)
    terms[f"LoRA state, all {total} experts"] = total * lora
    terms[f"resident expert weights ({R})"] = R * w
    if staging:
        terms[f"staging buffer ({staging} experts)"] = staging * w
    notes = {f"host memory: non-resident expert weights ({total - R})": (total - R) * w}
    return Residency(resident, w, MemoryEstimate(int(budget_bytes), dict(terms), notes))


def _routed_mask(routing: Any, L: int, E: int) -> List[torch.Tensor]:
    """Per layer, bool ``[E]`` of the experts at least one token routes to. ``routing``: a sequence of
    ``RouterOutput`` (``model(..., return_routers=True).routers``) or of ``[N, k]`` id tensors, or ``[L, E]``
    counts."""
    if isinstance(routing, torch.Tensor):
        if tuple(routing.shape) != (L, E):
            raise ValueError(f"routing counts must be [L={L}, E={E}], got {tuple(routing.shape)}")
        return [row.cpu() > 0 for row in routing]
    routing = list(routing)
    if len(routing) != L:
        raise ValueError(f"routing has {len(routing)} layers, the model {L}")
    out = []
    for r in routing:
        ids = getattr(r, "ids", r)
        out.append(torch.bincount(ids.reshape(-1).long().cpu(), minlength=E)[:E] > 0)
    return out


@dataclass
class FetchBytes:
    """Host -> GPU traffic of one forward pass: per layer the fetched (non-resident, routed) experts and bytes."""

    experts: List[List[int]]
    per_layer: List[int]

    @property
    def total(self) -> int:
        return int(sum(self.per_layer))


def fetch_bytes(residency: Residency, routing: Any) -> FetchBytes:
    """Bytes FMD fetches for one forward pass with ``routing`` (see ``_routed_mask``): every non-resident expert
    that at least one token routes to, once per layer."""
    L, E = residency.resident.shape
    experts, per = [], []
    for l, routed in enumerate(_routed_mask(routing, L, E)):
        ids = torch.nonzero(routed & ~residency.resident[l]).flatten().tolist()
        experts.append(ids)
        per.append(len(ids) * residency.expert_bytes)
    return FetchBytes(experts, per)


class FetchCounter:
    """Counts FMD's fetches while a model runs: forward hooks on the MoE layers add, per forward pass and layer,
    the non-resident experts its tokens route to (one fetch each, two when the pass will be backpropagated: the
    backward pass fetches them again). Use as a context manager around ``train_round`` (activation
    checkpointing's recomputation is a second forward pass, whose fetch the backward then uses). Counts accumulate
    on the model's device; ``bytes`` synchronises once."""

    def __init__(self, model: nn.Module, residency: Residency):
        self.model, self.residency = model, residency
        self._handles: List[Any] = []
        self._fetched: Optional[torch.Tensor] = None  # [L] expert fetches
        self.passes = 0

    def attach(self) -> "FetchCounter":
        if self._handles:
            return self
        layers = self.model.moe_layers()
        dev = layers[0].experts.expert_map.device if layers else torch.device("cpu")
        if self._fetched is None:
            self._fetched = torch.zeros(len(layers), dtype=torch.long, device=dev)
        nonres = (~self.residency.resident).to(dev)
        E = self.residency.resident.shape[1]

        def hook(l: int):
            def fn(module, args, output):
                ids = output[1].ids.reshape(-1).long()
                routed = torch.zeros(E, dtype=torch.bool, device=ids.device).index_fill_(0, ids, True)
                # The backward pass needs the weights again (dX = dY W), and by then the staging buffer holds
                # other layers' experts; under activation checkpointing the recompute's fetch serves it.
                backward = output[0].requires_grad and not getattr(self.model, "gradient_checkpointing", False)
                self._fetched[l] += (routed & nonres[l]).sum() * (2 if backward else 1)
                if l == 0:
                    self.passes += 1

            return fn

        self._handles = [mlp.register_forward_hook(hook(l)) for l, mlp in enumerate(layers)]
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "FetchCounter":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    @property
    def fetches(self) -> List[int]:
        return [] if self._fetched is None else [int(x) for x in self._fetched.cpu()]

    @property
    def bytes(self) -> int:
        return sum(self.fetches) * self.residency.expert_bytes

    def reset(self) -> None:
        if self._fetched is not None:
            self._fetched.zero_()
        self.passes = 0


def fmd(
    model: nn.Module,
    profile: Any,
    budget_bytes: int,
    settings: Optional[TrainSettings] = None,
    staging_experts: Optional[int] = None,
) -> Policy:
    """The full model with every expert tuned through LoRA; residency from the budget and the profile
    (``plan_residency``); ``Policy.fetch`` counts PCIe bytes while attached
    (``with policy.fetch: train_round(...)``)."""
    settings = settings or TrainSettings()
    _require_lora(settings, "fmd")
    t0 = time.perf_counter()
    res = plan_residency(model.config, profile, budget_bytes, settings, staging_experts)
    info = {"resident_experts": res.num_resident, "expert_bytes": res.expert_bytes, "residency": res}
    pol = Policy("fmd", model, all_experts(model.config), res.memory, time.perf_counter() - t0, info)
    pol.fetch = FetchCounter(model, res)
    return pol


# ----------------------------------------------------------------------------------------------------------------
# FMQ: int4 experts, LoRA through the quantized weights


class QuantizedExperts(Experts):
    """An ``Experts`` whose stacks are packed (``ops.QuantizedTensor``, frozen): ``gate_up_proj`` / ``down_proj``
    are properties building QuantizedTensors over buffers (``{gate_up,down}_qdata``, ``_qscales``, ``_qzeros``),
    which the inherited ``forward`` passes to ``ops.grouped_mlp`` as they are. LoRA (``training.attach_tuning``,
    mode ``"lora"``) works unchanged; full-size tuning (``split_tuned``) is refused. The expert form and the biases
    are kept (frozen, unquantised)."""

    def __init__(self, source: Experts, bits: int = 4, group_size: Optional[int] = None):
        nn.Module.__init__(self)
        if source.has_tuning:
            raise ValueError("quantize experts without tuning attached (detach_tuning first)")
        self._qmeta: Dict[str, Tuple[int, int, torch.Size, torch.dtype]] = {}
        for name in ("gate_up", "down"):
            w = getattr(source, f"{name}_proj").detach()
            K = w.shape[-1]
            q = ops.quantize(w.contiguous(), bits, group_for(K, bits, group_size))
            self.register_buffer(f"{name}_qdata", q.data)
            self.register_buffer(f"{name}_qscales", q.scales)
            self.register_buffer(f"{name}_qzeros", q.zeros)
            self._qmeta[name] = (q.bits, q.group_size, q.shape, q.dtype)
        # The form and the biases (gpt-oss) stay as they were: frozen, unquantised (they are small).
        self.form = source.form
        for name in EXPERT_BIASES:
            b = getattr(source, name, None)
            self.register_buffer(name, None if b is None else b.detach().clone())
        self.register_buffer("expert_map", source.expert_map.detach().clone())
        self.lora = None
        self.register_parameter("tuned_gate_up_proj", None)
        self.register_parameter("tuned_down_proj", None)
        self.tuned_order = None

    def _packed(self, name: str) -> QuantizedTensor:
        bits, g, shape, dtype = self._qmeta[name]
        # Scales stay float32 (the packed format's contract) even after a model-wide ``.to(dtype)``.
        return QuantizedTensor(getattr(self, f"{name}_qdata"), getattr(self, f"{name}_qscales").float(),
                               getattr(self, f"{name}_qzeros"), bits, g, shape, dtype)  # fmt: skip

    @property
    def gate_up_proj(self) -> QuantizedTensor:  # type: ignore[override]
        return self._packed("gate_up")

    @property
    def down_proj(self) -> QuantizedTensor:  # type: ignore[override]
        return self._packed("down")

    def packed_bytes(self) -> int:
        return self.gate_up_proj.nbytes() + self.down_proj.nbytes()

    def physical_weights(self, p: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Dequantised copies (not views: the packed weights are frozen)."""
        return ops.dequantize(self.gate_up_proj)[p], ops.dequantize(self.down_proj)[p]

    def split_tuned(self, physical: Sequence[int]) -> None:
        raise NotImplementedError("QuantizedExperts train through LoRA only (TrainConfig.mode='lora')")


@dataclass
class QuantizationReport:
    bits: int
    fp_bytes: int  # expert stacks before
    packed_bytes: int  # after

    @property
    def saved_bytes(self) -> int:
        return self.fp_bytes - self.packed_bytes


@torch.no_grad()
def quantize_experts(
    model: nn.Module, bits: int = 4, group_size: Optional[int] = None, inplace: bool = False
) -> Tuple[nn.Module, QuantizationReport]:
    """Replace every MoE layer's ``Experts`` by a ``QuantizedExperts`` (all experts packed); returns the model
    (a deep copy unless ``inplace``) and the bytes before and after."""
    if not inplace:
        model = copy.deepcopy(model)
    fp = packed = 0
    for mlp in model.moe_layers():
        ex = mlp.experts
        if isinstance(ex, QuantizedExperts):
            raise ValueError("the experts are already quantized")
        fp += sum(t.numel() * t.element_size() for t in (ex.gate_up_proj, ex.down_proj))
        mlp.experts = QuantizedExperts(ex, bits, group_size)
        packed += mlp.experts.packed_bytes()
    return model, QuantizationReport(int(bits), int(fp), int(packed))


def fmq_memory(
    config: MoEConfig, settings: TrainSettings, budget_bytes: int, bits: int = 4, group_size: Optional[int] = None
) -> MemoryEstimate:
    """Fixed terms + every expert packed + the LoRA state of every expert. Assumes a kernel that reads packed
    weights (the Triton tier); the reference tier also dequantises one layer's stacks per forward pass (and keeps
    them for the backward pass), which is not charged."""
    L, E = len(config.moe_layer_indices), config.num_experts
    packed = L * E * quantized_expert_bytes(config, bits, group_size)
    terms = OrderedDict(_fixed_terms(config, settings, budget_bytes))
    terms[f"packed int{bits} experts ({L * E})"] = packed
    terms[f"LoRA state, all {L * E} experts"] = L * E * _lora_state_bytes(config, settings)
    fp = L * E * expert_parameters(config) * dtype_bytes(settings.dtype)
    return MemoryEstimate(int(budget_bytes), dict(terms), {f"saved vs {settings.dtype} experts": fp - packed})


def fmq(
    model: nn.Module,
    budget_bytes: int,
    settings: Optional[TrainSettings] = None,
    bits: int = 4,
    group_size: Optional[int] = None,
    inplace: bool = False,
) -> Policy:
    """Every expert packed int``bits``, every expert tuned through LoRA on the packed weights. The model must not
    be quantized already; memory reported, never enforced."""
    settings = settings or TrainSettings()
    _require_lora(settings, "fmq")
    t0 = time.perf_counter()
    qmodel, report = quantize_experts(model, bits, group_size, inplace)
    seconds = time.perf_counter() - t0
    memory = fmq_memory(model.config, settings, budget_bytes, bits, group_size)
    info = {"bits": bits, "fp_expert_bytes": report.fp_bytes, "packed_expert_bytes": report.packed_bytes,
            "saved_bytes": report.saved_bytes, "fits_budget": memory.fits}  # fmt: skip
    return Policy("fmq", qmodel, all_experts(model.config), memory, seconds, info)


# ----------------------------------------------------------------------------------------------------------------
# FMES: expert dropping


@dataclass
class KeptPlan:
    """FMES's choice: per MoE layer the kept original ids (ascending) and the memory estimate."""

    kept: List[List[int]]
    memory: MemoryEstimate
    allocation: str

    @property
    def num_kept(self) -> int:
        return sum(len(k) for k in self.kept)

    def dropped(self, num_experts: int) -> List[List[int]]:
        return [[e for e in range(num_experts) if e not in set(k)] for k in self.kept]


def plan_kept(
    config: MoEConfig,
    profile: Any,
    budget_bytes: int,
    settings: Optional[TrainSettings] = None,
    allocation: str = "global",
    num_kept: Optional[int] = None,
) -> KeptPlan:
    """The experts FMES keeps: as many LoRA tuning experts as the budget holds after the fixed terms
    (``B = (budget - fixed) // per tuning expert``, at most ``L * E``), at least ``k`` (experts per token) in every
    layer so top-k never needs a dropped expert. ``allocation="global"``: each layer's top-``k`` by frequency, then
    the most frequent remaining ``(layer, expert)`` pairs over all layers (maximises the routed share kept);
    ``"uniform"``: ``B / L`` per layer (remainder to the shallowest layers), each layer's most frequent ones. Either
    way a layer keeps its most frequent experts. ``BudgetError`` when ``L * k`` tuning experts do not fit.
    ``num_kept``: keep this many instead of what the budget holds (structure matching, ``flux_engine.structure``;
    at least ``L * k``, at most ``L * E``), the memory still reported against ``budget_bytes``."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    settings = settings or TrainSettings()
    L, E, k = len(config.moe_layer_indices), config.num_experts, config.num_experts_per_tok
    c_t = sum(tuning_expert_terms(config, settings).values())
    fixed = _fixed_terms(config, settings, budget_bytes)
    avail = int(budget_bytes) - sum(fixed.values())
    B = min(L * E, max(avail, 0) // c_t) if num_kept is None else min(L * E, max(int(num_kept), L * k))
    if B < L * k:
        missing = L * k * c_t - avail
        raise BudgetError(
            f"FMES: memory budget {_human(budget_bytes)} is {_human(missing)} short of the fixed terms plus {k} "
            f"tuning experts (experts per token) in each of the {L} MoE layers", missing,
        )  # fmt: skip
    freq = _freq(profile, L, E)
    order = [sorted(range(E), key=lambda e: (-float(freq[l, e]), e)) for l in range(L)]
    if allocation == "global":
        keep = torch.zeros(L, E, dtype=torch.bool)
        for l in range(L):
            keep[l, order[l][:k]] = True
        for l, e in _rank_pairs(freq, exclude=keep)[: B - L * k]:
            keep[l, e] = True
        kept = [torch.nonzero(row).flatten().tolist() for row in keep]
    else:
        counts = merging.uniform_layer_budgets(B, [E] * L)
        counts = [max(c, k) for c in counts]
        kept = [sorted(order[l][: counts[l]]) for l in range(L)]
    n = sum(len(x) for x in kept)
    w = expert_parameters(config) * dtype_bytes(settings.dtype)
    terms = OrderedDict(fixed)
    mode = f"LoRA r={settings.lora_rank}" if settings.lora else "full"
    terms[f"kept experts ({n}, weights)"] = n * w
    terms[f"kept experts' grads+optimizer ({mode}, {settings.optimizer})"] = n * (c_t - w)
    sinks = sum(1 for x in kept if len(x) < E)
    notes = {f"zero 'sink' experts for dropped ids ({sinks}, runtime artefact)": sinks * w}
    return KeptPlan(kept, MemoryEstimate(int(budget_bytes), dict(terms), notes), allocation)


def _mask_dropped_logits(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    """Forward hook on a router: the dropped experts' logits become -inf, so top-k never picks them."""
    return output.masked_fill(module.fmes_dropped, float("-inf"))


@torch.no_grad()
def drop_experts(model: nn.Module, kept: Sequence[Sequence[int]], inplace: bool = False) -> nn.Module:
    """The FMES compact model: per MoE layer only the ``kept[l]`` experts' weights (physical ``0..K-1`` in ascending
    original id) plus, when some are dropped, one zero "sink" expert (physical ``K``) that the dropped ids map to;
    the router's dropped logits are masked to -inf (forward hook ``_mask_dropped_logits``, mask in the router's
    non-persistent buffer ``fmes_dropped``), so the sink never gets a token. ``config.physical_experts`` is
    updated. A deep copy unless ``inplace``."""
    if not inplace:
        model = copy.deepcopy(model)
    layers: List[MoEMLP] = model.moe_layers()
    E, k = model.config.num_experts, model.config.num_experts_per_tok
    if len(kept) != len(layers):
        raise ValueError(f"kept needs one list per MoE layer ({len(layers)}), got {len(kept)}")
    physical = []
    for l, (mlp, ids) in enumerate(zip(layers, kept)):
        ids = sorted({int(e) for e in ids})
        if any(not 0 <= e < E for e in ids) or len(ids) < k:
            raise ValueError(f"MoE layer {l}: kept experts {ids} must be >= {k} distinct ids in [0, {E})")
        ex = mlp.experts
        if ex.has_tuning or isinstance(ex, QuantizedExperts):
            raise ValueError("drop experts of a plain model (no tuning attached, not quantized)")
        if hasattr(mlp.gate, "fmes_dropped"):
            raise ValueError(f"MoE layer {l}: experts were dropped already")
        emap = ex.expert_map.long()
        phys = emap[torch.tensor(ids, device=emap.device)]
        if phys.unique().numel() != len(ids):
            raise ValueError(f"MoE layer {l}: kept experts share physical experts (a merged model?)")
        dropped = torch.ones(E, dtype=torch.bool, device=emap.device)
        dropped[ids] = False
        gu, dn = ex.gate_up_proj.index_select(0, phys), ex.down_proj.index_select(0, phys)
        new_map = torch.full((E,), len(ids), dtype=ex.expert_map.dtype, device=emap.device)
        new_map[ids] = torch.arange(len(ids), dtype=ex.expert_map.dtype, device=emap.device)
        if bool(dropped.any()):
            gu = torch.cat([gu, gu.new_zeros((1,) + tuple(gu.shape[1:]))])
            dn = torch.cat([dn, dn.new_zeros((1,) + tuple(dn.shape[1:]))])
        ex.gate_up_proj = nn.Parameter(gu, requires_grad=ex.gate_up_proj.requires_grad)
        ex.down_proj = nn.Parameter(dn, requires_grad=ex.down_proj.requires_grad)
        ex.expert_map = new_map
        mlp.gate.register_buffer("fmes_dropped", dropped, persistent=False)
        mlp.gate.register_forward_hook(_mask_dropped_logits)
        physical.append(gu.shape[0])
    model.config.physical_experts = physical
    model.fmes_kept = [sorted({int(e) for e in ids}) for ids in kept]
    return model


def fmes(
    model: nn.Module,
    profile: Any,
    budget_bytes: int,
    settings: Optional[TrainSettings] = None,
    allocation: str = "global",
    inplace: bool = False,
    num_kept: Optional[int] = None,
) -> Policy:
    """Keep the most frequent experts the budget holds (``plan_kept``; ``num_kept`` overrides the count), drop the
    rest (``drop_experts``); every kept expert is a tuning expert."""
    settings = settings or TrainSettings()
    t0 = time.perf_counter()
    plan = plan_kept(model.config, profile, budget_bytes, settings, allocation, num_kept)
    compact = drop_experts(model, plan.kept, inplace)
    seconds = time.perf_counter() - t0
    info = {"kept_experts": plan.num_kept, "allocation": allocation, "kept": plan.kept}
    return Policy("fmes", compact, [list(k) for k in plan.kept], plan.memory, seconds, info)


# ----------------------------------------------------------------------------------------------------------------
# Dispatch


def make_policy(
    method: str,
    model: nn.Module,
    *,
    budget_bytes: int,
    settings: Optional[TrainSettings] = None,
    profile: Any = None,
    **options: Any,
) -> Policy:
    """One entry point for a baseline client: ``method`` in ``BASELINES``. ``fmd`` and ``fmes`` need ``profile``
    (options: ``staging_experts`` / ``allocation``, ``inplace``, ``num_kept``); ``fmq`` options ``bits``, ``group_size``,
    ``inplace``. (Flux's round is ``flux_engine.flux_round``.)"""
    if method not in BASELINES:
        raise ValueError(f"method must be one of {BASELINES}, got {method!r}")
    if method in ("fmd", "fmes") and profile is None:
        raise ValueError(f"{method} needs a profile")
    if method == "fedavg-lora":
        return fedavg_lora(model, budget_bytes, settings)
    if method == "fmd":
        return fmd(model, profile, budget_bytes, settings, **options)
    if method == "fmq":
        return fmq(model, budget_bytes, settings, **options)
    return fmes(model, profile, budget_bytes, settings, **options)
