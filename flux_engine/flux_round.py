"""The Flux client round (FLUX_DESIGN.md section 5): profile -> merge -> train on one participant, with what a
round can reuse kept from the last one. No federated code: ``flux_engine.federated.client`` calls it.

A ``FluxClient`` holds the base model (never modified), the budget plan, the low-bit profiling copy
(``profiling.prepare``, built once; afterwards only the experts whose global weights changed are re-quantised:
``LowBitModel.set_expert`` with the global adapters folded in, ``adapters.fold_lora``), the profile the next round
uses and the global tensors it was computed from, and the last compact model.

Round r (``train``), given the global tensors, the tuning experts the server assigned (exploitation and
exploration alike) and this round's batches:

1. **Profile.** Round 1 uses the first-contact profile of the base (``first_profile``, charged to round 1, which
   nothing hides). Later rounds use the profile of round r-1's global model, computed in the client's idle window
   after its round r-1 upload (``profile_next``: stale by one round, as in the paper). A global model that did not
   change is never profiled twice. With stale profiling off, the round's own global model is profiled first, on
   the critical path. A restarted client (no profile in memory) recomputes the one it needs from the global
   tensors it saved when it was due (``state_dir``: the profile is deterministic, so a resumed run equals an
   uninterrupted one).
2. **Compact model.** One copy of the base's expert stacks (``round_copy``: attention, embeddings and routers are
   shared, never modified), the global state applied (LoRA: every non-tuning expert's global adapter folded in;
   tuning experts keep their base weights and resume from their global factors; full mode: the global weights),
   the non-tuning experts merged within ``B_non`` (``merging.merge``: Eq. 1 layer budgets or the uniform ablation,
   Eq. 2 weights). When the global tensors, the profile and the roles are those of the last round, its compact
   model is reused as it is (LoRA mode: training leaves the merged experts untouched).
3. **Exploration.** Exploration experts are tuning experts (``explore-mode = "train"``, the default): trained in
   the same backward pass, their Eq. 3 utility read from it. ``"zo"``: they are kept unmerged but not trained, and
   their utility is a forward-only SPSA estimate (``roles.explore_experts``: fp32, on the sequences routed to each).
4. **Train** (``training.train_round``): the tuning experts on the round's batches; the result carries the trained
   tensors, routed-token counts and Eq. 3 utilities (NaN for experts not measured).

Every term the time model needs is measured and returned (``FluxRound.times``): profile seconds (those of the
profile this round used, and whether it was stale, i.e. computed in the previous idle window), merge seconds
(copy + global state + merge), exploration seconds (``zo`` only).
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from flux_engine import adapters, merging, profiling, roles
from flux_engine.aggregation import Update, flat_tensors, nested_tensors
from flux_engine.budget import BudgetPlan
from flux_engine.fileio import atomic_write
from flux_engine.models.moe import MoEForCausalLM
from flux_engine.training import TrainConfig, TrainResult, detach_tuning, load_expert_weights, train_round

LAYER_BUDGET_RULES = ("eq1", "uniform")  # merged experts per layer: Eq. 1, or equal shares (ablation)
EXPLORE_MODES = ("train", "zo")


# ----------------------------------------------------------------------------------------------------------------
# The global model and the compact model


def round_copy(base: MoEForCausalLM) -> MoEForCausalLM:
    """A copy of the base model for one round's work. Only the routed experts' tensors (``mlp.experts.*``: stacks
    and expert maps) are copied, since merging, training and folding adapters in change only those; attention,
    embeddings, routers and dense MLPs are shared with the base, which must stay frozen."""
    shared = {
        id(t): t
        for name, t in [*base.named_parameters(), *base.named_buffers()]
        if ".mlp.experts." not in name
    }
    # deepcopy takes memo entries as objects already copied: the shared tensors are reused as they are.
    return copy.deepcopy(base, memo=shared)


def apply_global(model: MoEForCausalLM, tensors: Update, mode: str, lora_scale: float, skip=()) -> None:
    """Put the global state into an unmerged model: full mode sets the experts' weights, LoRA mode folds the
    adapters in (``skip``: this round's tuning experts, which resume from their factors through ``init``)."""
    if mode == "full":
        load_expert_weights(model, tensors)
    else:
        adapters.merge_adapters(model, tensors, lora_scale, skip=skip)


def compact_model(
    model: nn.Module,
    profile: Any,
    kept: Sequence[Sequence[int]],
    B_non: int,
    weighting: str = "freq_attn",
    layer_budgets: str = "eq1",
    seed: int = 0,
    inplace: bool = False,
) -> nn.Module:
    """Flux's compact model (``merging.merge``): the ``kept`` experts (per MoE layer: tuning, and with
    ``explore-mode = "zo"`` exploration experts) keep their own physical experts, the others merge into ``B_non``
    experts spread over the layers by Eq. 1 (``layer_budgets="eq1"``) or equally (``"uniform"``, ablation);
    ``weighting="freq"`` is the frequency-only merge ablation."""
    if layer_budgets not in LAYER_BUDGET_RULES:
        raise ValueError(f"layer_budgets must be one of {LAYER_BUDGET_RULES}, got {layer_budgets!r}")
    E = model.config.num_experts
    kept = [sorted(int(e) for e in ids) for ids in kept]
    budgets: Union[int, List[int]] = int(B_non)
    if layer_budgets == "uniform":
        budgets = merging.uniform_layer_budgets(B_non, [E - len(t) for t in kept])
    return merging.merge(model, profile, kept, budgets, weighting=weighting, seed=seed, inplace=inplace)


def _same_tensors(a: Optional[Update], b: Optional[Update]) -> bool:
    """Whether two global states hold the same values (unchanged entries are the same objects: cheap)."""
    if a is None or b is None or a.keys() != b.keys():
        return False
    for key, ta in a.items():
        tb = b[key]
        if ta is tb:
            continue
        if ta.keys() != tb.keys() or not all(torch.equal(ta[n], tb[n]) for n in ta):
            return False
    return True


# ----------------------------------------------------------------------------------------------------------------
# One client's rounds


@dataclass
class FluxSettings:
    """What a Flux client needs of the run configuration (``federated.config.RunConfig`` keys of the same names).

    ``lora_scale``: ``lora-alpha / lora-rank`` (folding global adapters); ``profile_bits``: 4, 8 or None (full
    precision); ``state_dir``: where the client saves the global tensors of each profile it owes a later round
    ("": nowhere; a restarted client then profiles its current global model instead)."""

    mode: str = "lora"
    lora_scale: float = 2.0
    profile_bits: Optional[int] = 4
    stale_profile: bool = True
    profile_in_background: bool = False
    merge_weighting: str = "freq_attn"
    merge_budgets: str = "eq1"
    explore_mode: str = "train"
    seed: int = 0
    state_dir: str = ""

    def __post_init__(self) -> None:
        if self.explore_mode not in EXPLORE_MODES:
            raise ValueError(f"explore_mode must be one of {EXPLORE_MODES}, got {self.explore_mode!r}")
        if self.merge_budgets not in LAYER_BUDGET_RULES:
            raise ValueError(f"merge_budgets must be one of {LAYER_BUDGET_RULES}, got {self.merge_budgets!r}")


@dataclass
class FluxRound:
    """One round's outcome: ``result`` (trained tensors, token counts, losses), ``utilities [L, E]`` (Eq. 3 from
    training; SPSA estimates for ``zo`` exploration experts; NaN elsewhere) and the measured ``times``
    (``profile-seconds``, ``profile-stale``, ``merge-seconds``, ``explore-seconds``)."""

    result: TrainResult
    utilities: torch.Tensor
    times: Dict[str, float] = field(default_factory=dict)


class FluxClient:
    """A participant's Flux rounds (module docstring). ``profile_batches``: the rows profiling reads."""

    def __init__(self, base: MoEForCausalLM, plan: BudgetPlan, settings: FluxSettings, train_config: TrainConfig,
                 profile_batches: Sequence[Dict[str, torch.Tensor]]):  # fmt: skip
        if train_config.mode != settings.mode:
            raise ValueError(f"FluxSettings.mode {settings.mode!r} and TrainConfig.mode {train_config.mode!r} differ")
        self.base, self.plan, self.settings, self.train_config = base, plan, settings, train_config
        self.profile_batches = list(profile_batches)
        self._low: Optional[profiling.LowBitModel] = None
        self._low_tensors: Update = {}  # the global tensors folded into the low-bit copy
        # The profile the next round uses (or a ProfileHandle computing it), the global tensors it is of, its
        # measured seconds (charged once, to the round that uses it) and whether it was computed in an idle window.
        self._next: Any = None
        self._next_tensors: Optional[Update] = None
        self._next_seconds = 0.0
        self._next_stale = False
        self._compact: Optional[Tuple[Any, nn.Module]] = None  # (key, model) of the last round

    # -- profiles

    def _refresh_low(self, tensors: Update) -> None:
        """Bring the low-bit copy to the global model ``tensors`` describe: re-quantise the changed experts only."""
        if self._low is None:
            self._low = profiling.prepare(self.base, bits=self.settings.profile_bits)
        layers = self.base.moe_layers()
        changed = [k for k in set(tensors) | set(self._low_tensors)
                   if k not in tensors or k not in self._low_tensors
                   or not _same_tensors({k: tensors[k]}, {k: self._low_tensors[k]})]  # fmt: skip
        for l, e in sorted(changed):
            gu, dn = layers[l].experts.physical_weights(e)  # the base: identity expert map
            t = tensors.get((l, e), {})
            if self.settings.mode == "full":
                gu, dn = t.get("gate_up", gu), t.get("down", dn)
            else:
                gu = adapters.fold_lora(gu, t, "gate_up", self.settings.lora_scale)
                dn = adapters.fold_lora(dn, t, "down", self.settings.lora_scale)
            self._low.set_expert(l, e, gu, dn)
        self._low_tensors = dict(tensors)

    def _join(self) -> None:
        """Wait for a profile computing in the background (its seconds are known once it is done)."""
        if isinstance(self._next, profiling.ProfileHandle):
            handle = self._next
            self._next = handle.result()
            self._next_seconds = handle.seconds

    def _profile_now(self, tensors: Update, stale: bool) -> None:
        """Profile the global model ``tensors`` describe, on this thread, as the next profile."""
        self._join()
        t0 = time.perf_counter()
        self._refresh_low(tensors)
        self._next = profiling.profile(self._low, self.profile_batches)
        self._next_tensors, self._next_seconds, self._next_stale = dict(tensors), time.perf_counter() - t0, stale

    def first_profile(self) -> profiling.ExpertProfile:
        """The base model's profile (first contact; round 1 uses it and is charged its seconds)."""
        if self._next is None:
            self._profile_now({}, stale=False)
        self._join()
        return self._next

    def _source_path(self, round_: int) -> str:
        return os.path.join(self.settings.state_dir, f"profile-source-r{round_:05d}.safetensors")

    def _save_source(self, tensors: Update, round_: int) -> None:
        """Keep the global tensors of the profile round ``round_`` will use (atomic; the two newest are kept)."""
        if not self.settings.state_dir:
            return
        os.makedirs(self.settings.state_dir, exist_ok=True)
        data = st_save(flat_tensors(tensors), metadata={"keys": json.dumps(sorted([l, e] for l, e in tensors))})
        atomic_write(self._source_path(round_), lambda f: f.write(data), binary=True)
        for old in os.listdir(self.settings.state_dir):
            if old.startswith("profile-source-r") and old < os.path.basename(self._source_path(round_ - 1)):
                os.remove(os.path.join(self.settings.state_dir, old))

    def _load_source(self, round_: int) -> Optional[Update]:
        path = self._source_path(round_)
        if not self.settings.state_dir or not os.path.exists(path):
            return None
        with open(path, "rb") as f:
            return nested_tensors(st_load(f.read()))

    def _take_profile(self, tensors: Update, round_: int) -> Tuple[profiling.ExpertProfile, float, bool]:
        """``(profile, its seconds, stale)`` for round ``round_`` (module docstring, step 1)."""
        if not self.settings.stale_profile:
            if not _same_tensors(self._next_tensors, tensors):
                self._profile_now(tensors, stale=False)
        elif self._next is None:
            # A restarted client: the profile this round is owed is of the global tensors saved when it was due.
            source = self._load_source(round_)
            self._profile_now(source if source is not None else tensors, stale=False)
        self._join()
        out = (self._next, self._next_seconds, self._next_stale)
        self._next_seconds = 0.0
        return out

    def profile_next(self, tensors: Update, round_: int, last: bool = False) -> None:
        """The client's idle window after its round ``round_`` upload: profile this round's global model for round
        ``round_ + 1`` (stale profiling), in a background thread or here (timed); nothing when that model was
        profiled already. ``last``: no round follows in this process (the run's last round, or a chunk's): only the
        model's tensors are kept, and a resumed client profiles them when round ``round_ + 1`` comes."""
        if not self.settings.stale_profile:
            return
        self._save_source(tensors, round_ + 1)
        if last:
            self._join()
            self._next, self._next_tensors, self._next_seconds = None, None, 0.0
            return
        if _same_tensors(self._next_tensors, tensors):
            self._next_stale = True  # the same profile serves again; nothing more to charge
            return
        if not self.settings.profile_in_background:
            self._profile_now(tensors, stale=True)
            return
        self._join()
        t0 = time.perf_counter()
        self._refresh_low(tensors)
        self._next = profiling.profile_async(self._low, self.profile_batches)
        self._next.seconds += time.perf_counter() - t0  # the refresh is part of the profiling work
        self._next_tensors, self._next_stale = dict(tensors), True

    # -- the round

    def _compact_for(self, tensors: Update, profile: Any, tuning: List[List[int]], kept: List[List[int]]):
        """The round's compact model: the last round's when nothing it depends on changed (module docstring, step
        2)."""
        key = (id(profile), [sorted(t) for t in tuning], [sorted(k) for k in kept])
        s = self.settings
        if self._compact is not None and s.mode == "lora":
            (last_tensors, last_key), model = self._compact
            if last_key == key and _same_tensors(last_tensors, tensors):
                return model
        tuning_keys = {(l, e) for l, ids in enumerate(tuning) for e in ids}
        model = round_copy(self.base)
        apply_global(model, tensors, s.mode, s.lora_scale, skip=tuning_keys if s.mode == "lora" else ())
        model = compact_model(model, profile, kept, self.plan.B_non, s.merge_weighting, s.merge_budgets, s.seed,
                              inplace=True)  # fmt: skip
        self._compact = ((dict(tensors), key), model)
        return model

    def train(
        self,
        tensors: Update,
        tuning: torch.Tensor,
        explore: torch.Tensor,
        batches: Sequence[Dict[str, torch.Tensor]],
        round_: int,
    ) -> FluxRound:
        """Round ``round_`` (from 1) on ``batches``: ``tensors`` the global state, ``tuning`` bool ``[L, E]`` the
        experts to train, ``explore`` bool ``[L, E]`` the ``zo`` exploration experts (empty in ``train`` mode,
        where the server puts them among ``tuning``)."""
        profile, profile_seconds, profile_stale = self._take_profile(tensors, round_)
        t_merge = time.perf_counter()
        tuning_lists = [torch.nonzero(row).flatten().tolist() for row in tuning]
        # zo exploration experts keep a physical expert of their own, so that their estimate is theirs and not a
        # merged group's.
        kept = [torch.nonzero(row).flatten().tolist() for row in tuning | explore]
        model = self._compact_for(tensors, profile, tuning_lists, kept)
        merge_seconds = time.perf_counter() - t_merge
        t_explore = time.perf_counter()
        explored = self._explore(model, explore, batches, round_)
        explore_seconds = time.perf_counter() - t_explore
        init = {k: v for k, v in tensors.items() if bool(tuning[k[0], k[1]])}
        try:
            result = train_round(model, tuning_lists, batches, self.train_config, init)
        finally:
            detach_tuning(model)  # the trained tensors travel in the result; the compact model stays reusable
        utilities = result.utilities
        utilities[explore] = explored[explore]
        if self.settings.mode == "full":
            self._compact = None  # training changed the tuning experts' weights in place
        times = {"profile-seconds": profile_seconds, "profile-stale": int(profile_stale),
                 "merge-seconds": merge_seconds, "explore-seconds": explore_seconds}  # fmt: skip
        return FluxRound(result, utilities, times)

    def _explore(self, model: nn.Module, explore: torch.Tensor, batches: Sequence[Dict[str, torch.Tensor]],
                 round_: int) -> torch.Tensor:  # fmt: skip
        """``[L, E]`` SPSA utilities of the ``zo`` exploration experts on the round's first batch (NaN elsewhere)."""
        if not bool(explore.any()):
            return torch.full(explore.shape, float("nan"), dtype=torch.float64)
        rows = batches[0]
        pairs = [tuple(k) for k in torch.nonzero(explore).tolist()]
        # A fresh perturbation direction every round (and the same on a rerun of the round: resumable runs).
        zo = roles.ZerothOrderConfig(seed=self.settings.seed * 1_000_003 + round_)
        with torch.no_grad():
            return roles.explore_experts(model, rows["input_ids"], pairs, zo, rows["labels"], rows["attention_mask"])
