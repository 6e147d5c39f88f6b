"""Structure matching (FLUX_DESIGN.md section 8): the memory plans of a REAL model shape on a declared card, and
the same fractions carried over to the small model a learning run trains.

A regime is written ``PRESET@<budget>GiB`` (``"deepseek-moe-16b@24GiB"``: the real shape's preset and the card's
memory budget). ``method_plans`` runs the project's own plans on the real config (bf16 weights, the learning run's
LoRA rank and ``batch x seq``): ``budget.plan_budget`` for Flux (its int4 profiling copy in the profile phase,
which must fit too), ``baselines.fedavg_lora_memory`` / ``plan_residency`` / ``fmq_memory`` / ``plan_kept`` for the
baselines; a plan that does not fit is **infeasible** (``MethodPlan.feasible``), never assumed to fit.

``Matched`` carries the fractions over (``N = L E`` experts of the real shape, ``n = L' E'`` of the small one)::

    Flux   B_tune' = clamp(round(B_tune / N x n), 1, n - 1)
           B_non'  = clamp(round(B_non / N x n), L', n - B_tune')   (at least one merged expert per layer)
    FMES   kept'   = clamp(round(kept / N x n), L' k', n)           (top-k never needs a dropped expert)
    FMQ    the bits the real plan uses (int4: ``fmq-bits``)
    FMD    the math of FedAvg-LoRA (every expert tuned): its rounds are FedAvg-LoRA's, only its time differs
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Dict, Tuple

import torch

from flux_engine import baselines, budget, presets
from flux_engine.models.config import MoEConfig

GiB = 1 << 30
REGIME = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*@\s*([0-9.]+)\s*GiB\s*$")


def parse_regime(spec: str) -> Tuple[str, float]:
    """``"deepseek-moe-16b@24GiB"`` -> ``("deepseek-moe-16b", 24.0)``; the preset must exist."""
    m = REGIME.match(spec)
    if m is None:
        raise ValueError(f"{spec!r} is not of the form PRESET@<budget>GiB (e.g. deepseek-moe-16b@24GiB)")
    presets.get(m[1])
    gib = float(m[2])
    if not gib > 0:
        raise ValueError(f"{spec!r}: the budget must be > 0 GiB")
    return m[1], gib


@dataclass
class MethodPlan:
    """A method's memory plan for the real shape on the card: feasible or not (``reason``), bytes used, and the
    structure it implies (``B_tune`` / ``B_non`` for Flux, ``resident`` for FMD, ``kept`` for FMES, ``bits``;
    ``experts`` = ``L E``)."""

    method: str
    feasible: bool
    used_bytes: int
    budget_bytes: int
    reason: str = ""
    structure: Dict[str, int] = field(default_factory=dict)

    def text(self) -> str:
        s = ", ".join(f"{k} {v}" for k, v in self.structure.items())
        used = f"{self.used_bytes / GiB:.2f} of {self.budget_bytes / GiB:.2f} GiB"
        return f"{used}{'; ' + s if s else ''}" if self.feasible else f"INFEASIBLE: {self.reason}"


def _uniform_profile(config: MoEConfig) -> SimpleNamespace:
    """A routing-frequency profile that ranks nothing (the counts FMD / FMES keep do not depend on it)."""
    return SimpleNamespace(freq=torch.ones(len(config.moe_layer_indices), config.num_experts))


def method_plans(config: MoEConfig, budget_bytes: int, settings: budget.TrainSettings,
                 fmq_bits: int = 4) -> Dict[str, MethodPlan]:  # fmt: skip
    """Every method's plan for ``config`` in ``budget_bytes`` (module docstring)."""
    s, B = replace(settings, profile_bits=None), int(budget_bytes)
    N = len(config.moe_layer_indices) * config.num_experts
    short = lambda e: f"{e.missing_bytes / GiB:.2f} GiB short"  # noqa: E731
    out: Dict[str, MethodPlan] = {}
    try:
        plan = budget.plan_budget(config, B, replace(s, profile_bits=4))
        out["flux"] = MethodPlan("flux", True, plan.used_bytes, B,
                                 structure={"B_tune": plan.B_tune, "B_non": plan.B_non, "experts": N})  # fmt: skip
    except budget.BudgetError as e:
        out["flux"] = MethodPlan("flux", False, B + e.missing_bytes, B, short(e))
    m = baselines.fedavg_lora_memory(config, s, B)
    out["fedavg-lora"] = MethodPlan("fedavg-lora", m.fits, m.total, B,
                                    "" if m.fits else f"needs {m.total / GiB:.2f} GiB", {"experts": N})  # fmt: skip
    try:
        r = baselines.plan_residency(config, _uniform_profile(config), B, s)
        out["fmd"] = MethodPlan("fmd", True, r.memory.total, B, structure={"resident": r.num_resident, "experts": N})
    except budget.BudgetError as e:
        out["fmd"] = MethodPlan("fmd", False, B + e.missing_bytes, B, short(e))
    m = baselines.fmq_memory(config, s, B, fmq_bits)
    out["fmq"] = MethodPlan("fmq", m.fits, m.total, B, "" if m.fits else f"int{fmq_bits} needs {m.total / GiB:.2f} GiB",
                            {"bits": fmq_bits, "experts": N})  # fmt: skip
    try:
        k = baselines.plan_kept(config, _uniform_profile(config), B, s)
        out["fmes"] = MethodPlan("fmes", True, k.memory.total, B, structure={"kept": k.num_kept, "experts": N})
    except budget.BudgetError as e:
        out["fmes"] = MethodPlan("fmes", False, B + e.missing_bytes, B, short(e))
    return out


def _clamp(x: float, lo: int, hi: int) -> int:
    return max(lo, min(hi, int(round(x))))


@dataclass
class Matched:
    """The real shape's plans (``real``) and the counts they give the small model (module docstring)."""

    spec: str
    real: Dict[str, MethodPlan]
    small_experts: int
    B_tune: int
    B_non: int
    kept: int
    fmq_bits: int

    def describe(self) -> str:
        r = self.real
        N = r["flux"].structure.get("experts") or r["fedavg-lora"].structure["experts"]
        n = self.small_experts
        lines = [f"structure from {self.spec} (the real shape's plans; fractions of its {N} experts):"]
        lines += [f"  {m}: {p.text()}" for m, p in r.items()]
        f = r["flux"].structure
        if r["flux"].feasible:
            lines.append(f"  flux: B_tune {f['B_tune']}/{N} = {f['B_tune'] / N:.3f} -> {self.B_tune}/{n}; B_non "
                         f"{f['B_non']}/{N} = {f['B_non'] / N:.3f} -> {self.B_non}/{n} (at least one per layer)")  # fmt: skip
        if r["fmes"].feasible:
            k = r["fmes"].structure["kept"]
            lines.append(f"  fmes: kept {k}/{N} = {k / N:.3f} -> {self.kept}/{n}")
        lines.append(f"  fmq: int{self.fmq_bits} experts; fmd: FedAvg-LoRA's learning curve (same math)")
        return "\n".join(lines)


def match(spec: str, small: MoEConfig, settings: budget.TrainSettings, fmq_bits: int = 4) -> Matched:
    """The counts for ``small`` from the regime ``spec``; the real plans use bf16, ``settings``' LoRA rank and
    batch and the default workspace. A method infeasible in the regime keeps the count of its unconstrained form (every expert)."""
    name, gib = parse_regime(spec)
    real = presets.get(name)
    # The card's settings: bf16, the run's LoRA rank and batch, the default workspace (hardware.HardwareParams).
    card = budget.TrainSettings(dtype="bfloat16", lora_rank=settings.lora_rank, batch_size=settings.batch_size,
                                seq_len=settings.seq_len)  # fmt: skip
    plans = method_plans(real, int(gib * GiB), card, fmq_bits)
    N = len(real.moe_layer_indices) * real.num_experts
    L, E, k = len(small.moe_layer_indices), small.num_experts, small.num_experts_per_tok
    n = L * E
    f, kp = plans["flux"].structure, plans["fmes"].structure
    b_tune = _clamp(f["B_tune"] / N * n, 1, n - 1) if plans["flux"].feasible else n - L
    b_non = _clamp(f["B_non"] / N * n, L, n - b_tune) if plans["flux"].feasible else L
    kept = _clamp(kp["kept"] / N * n, L * k, n) if plans["fmes"].feasible else n
    return Matched(spec, plans, n, b_tune, b_non, kept, fmq_bits)


def matched_budget_plan(small: MoEConfig, m: Matched, settings: budget.TrainSettings) -> budget.BudgetPlan:
    """A ``budget.BudgetPlan`` of the small model with the matched ``B_tune`` / ``B_non`` (its budget: the bytes
    they use, so the plan fits by construction)."""
    breakdown = budget.memory_breakdown(small, settings, m.B_tune, m.B_non, 0)
    terms = budget.tuning_expert_terms(small, settings)
    used = sum(breakdown.values())
    return budget.BudgetPlan(
        B_tune=m.B_tune, B_non=m.B_non, budget_bytes=used, breakdown=breakdown,
        tuning_expert_bytes=sum(terms.values()), merged_expert_bytes=budget.merged_expert_bytes(small, settings),
        tuning_terms=dict(terms), arithmetic=m.describe().splitlines(),
    )  # fmt: skip
