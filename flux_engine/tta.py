"""Time to accuracy as two factors (FLUX_DESIGN.md section 8): rounds to the target MEASURED on small presets (several
seeds, structure matched to a regime, ``flux_engine.structure``) x round seconds MODELLED for the real shape on a
declared card (``flux_engine.hardware``).

Per regime (``PRESET@<n>GiB`` on a device) and seed ``s``:

- target: ``start + gain x (final - start)`` of the unconstrained reference (FedAvg-LoRA; ``gain`` 0.8), with
  ``start`` its mean held-out accuracy before training (round 0) and ``final`` after its last round; a reference
  that did not learn (``final <= start``) gives no target for that seed;
- ``R_m``: the first round >= 1 whose mean accuracy reaches the target (FMD: FedAvg-LoRA's, the same math);
- ``TTA_m = sum_{r <= R_m} t_m(r)``, ``t_m`` modelled with the network bytes the run measured;
- speedup of Flux over ``b``: ``TTA_b / TTA_flux = (round-time ratio) x (rounds ratio)`` with round-time ratio
  ``(TTA_b / R_b) / (TTA_flux / R_flux)`` and rounds ratio ``R_b / R_flux``; break-even: Flux still wins while
  ``R_flux / R_b`` stays below the round-time ratio.

The report gives per method the spread of ``R_m`` over seeds, the factors, their product (medians over seeds), the
break-even ratio, an infeasible method's reason, each speedup against its goal (:data:`GOALS`; where one falls short,
which factor and the modelled terms or rounds behind it), and a tornado table: each speedup at the nominal parameters
and with one parameter at a time moved low / high, the measured ``R_m`` held fixed.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from flux_engine import hardware, structure
from flux_engine.models.config import MoEConfig

REFERENCE = "fedavg-lora"
RANKED = ("fmd", "fmq", "fmes")


def mean_accuracy(entry: Mapping[str, Any]) -> float:
    acc = entry.get("accuracy") or {}
    return sum(acc.values()) / len(acc) if acc else math.nan


def accuracy_curve(state: Any) -> List[float]:
    """Mean held-out accuracy at round 0, 1, ... of a server state (NaN where a round was not evaluated)."""
    return [mean_accuracy(state.baseline)] + [mean_accuracy(h) for h in state.history]


def target(reference: Sequence[float], gain: float = 0.8) -> Optional[float]:
    """``start + gain x (final - start)`` of the reference's curve; None when it did not learn."""
    start, final = reference[0], reference[-1]
    if len(reference) < 2 or math.isnan(start) or math.isnan(final) or final <= start:
        return None
    return start + gain * (final - start)


def rounds_to(curve: Sequence[float], tgt: float) -> Optional[int]:
    """First round >= 1 whose accuracy reaches ``tgt``."""
    return next((r for r, a in enumerate(curve) if r >= 1 and not math.isnan(a) and a >= tgt), None)


@dataclass
class Run:
    """One finished (or partial) learning run: its curve, rounds done of planned, and network structure."""

    method: str
    seed: int
    curve: List[float]
    rounds_done: int
    rounds_planned: int
    net: Optional[hardware.NetworkStructure] = None
    train_seconds: float = 0.0  # measured CPU seconds of local training, mean per client-round (calibration)
    tokens: int = 0  # training tokens per client-round
    band: float = math.nan  # 95% half-width of its last mean accuracy (evaluation.mean_band): the sampling noise

    @property
    def finished(self) -> bool:
        return self.rounds_done >= self.rounds_planned


@dataclass
class SeedResult:
    seed: int
    target: Optional[float]
    rounds: Dict[str, Optional[int]]  # R_m (None: a finished run that did not reach it; absent: not measured)
    tta: Dict[str, Optional[float]]  # modelled seconds to the target
    note: str = ""


@dataclass
class Regime:
    spec: str  # PRESET@<n>GiB
    device: str
    params: hardware.HardwareParams
    config: MoEConfig
    plans: Dict[str, structure.MethodPlan] = field(default_factory=dict)


def plan_key(method: str) -> str:
    """The memory plan a method runs under (``Regime.plans``): Flux's for its ablations."""
    return "flux" if method.startswith("flux") else method


def regime(spec: str, device: str, base: hardware.HardwareParams) -> Regime:
    from flux_engine import presets

    name, gib = structure.parse_regime(spec)
    p = hardware.params_from(base, device=device, budget_gib=gib)
    config = presets.get(name)
    return Regime(spec, device, p, config, structure.method_plans(config, p.budget_bytes, p.settings()))


def modelled_tta(reg: Regime, method: str, R: Optional[int], net: hardware.NetworkStructure,
                 params: Optional[hardware.HardwareParams] = None,
                 plans: Optional[Mapping[str, structure.MethodPlan]] = None) -> Optional[float]:  # fmt: skip
    """``sum_{r <= R} t_m(r)`` (None: not reached, or the method infeasible)."""
    p = params or reg.params
    plan = (plans or reg.plans)[plan_key(method)]
    if R is None or not plan.feasible:
        return None
    return hardware.round_times(reg.config, plan.method, plan, p, net, R)[-1].end


def seed_result(reg: Regime, seed: int, runs: Mapping[str, Run], gain: float,
                params: Optional[hardware.HardwareParams] = None,
                plans: Optional[Mapping[str, structure.MethodPlan]] = None) -> SeedResult:  # fmt: skip
    """R_m and TTA_m of every method of one seed (FMD takes FedAvg-LoRA's curve and network)."""
    runs = dict(runs)
    if REFERENCE in runs and "fmd" not in runs:
        runs["fmd"] = Run("fmd", seed, **{k: getattr(runs[REFERENCE], k) for k in
                                          ("curve", "rounds_done", "rounds_planned", "net")})  # fmt: skip
    ref = runs.get(REFERENCE)
    if ref is None or not ref.finished:
        return SeedResult(seed, None, {}, {}, f"{REFERENCE} not finished: no target")
    tgt = target(ref.curve, gain)
    if tgt is None:
        return SeedResult(seed, None, {}, {}, f"{REFERENCE} did not learn (final <= start): no target")
    rounds, ttas = {}, {}
    for m, run in runs.items():
        R = rounds_to(run.curve, tgt)
        if R is None and not run.finished:  # not reached yet: not measured, rather than not reached
            continue
        rounds[m] = R
        ttas[m] = modelled_tta(reg, m, R, run.net, params, plans) if run.net is not None else None
    return SeedResult(seed, tgt, rounds, ttas)


@dataclass
class Factors:
    """Flux over one baseline, medians over the seeds where both reached the target."""

    baseline: str
    round_time_ratio: Optional[float]
    rounds_ratio: Optional[float]
    speedup: Optional[float]
    seeds: int
    reason: str = ""

    def text(self) -> str:
        return "not measured" if self.speedup is None else f"{self.speedup:.2f}"


def factors(results: Sequence[SeedResult], baseline: str, flux: str = "flux") -> Factors:
    rt, rr, sp = [], [], []
    for s in results:
        Rf, Rb = s.rounds.get(flux), s.rounds.get(baseline)
        Tf, Tb = s.tta.get(flux), s.tta.get(baseline)
        if None in (Rf, Rb, Tf, Tb) or not Tf:
            continue
        rt.append((Tb / Rb) / (Tf / Rf))
        rr.append(Rb / Rf)
        sp.append(Tb / Tf)
    if not sp:
        why = [s.note for s in results if s.note] or ["no seed where both reached the target with a feasible plan"]
        return Factors(baseline, None, None, None, 0, why[0])
    med = statistics.median
    return Factors(baseline, med(rt), med(rr), med(sp), len(sp))


def curves(reg: Regime, per_seed: Mapping[int, Mapping[str, Run]]) -> Dict[str, List[Tuple[float, float]]]:
    """Per feasible method, ``(modelled seconds, mean accuracy)`` after round 0, 1, ...: the median accuracy over
    the seeds that evaluated that round, at the cumulative modelled time of the method's rounds (the network of the
    first seed that ran it; FMD: FedAvg-LoRA's curve at FMD's round times). Infeasible methods have no curve, but
    for FedAvg-LoRA, the unconstrained bound (as in ``hardware.table``)."""
    out: Dict[str, List[Tuple[float, float]]] = {}
    methods = sorted({m for rs in per_seed.values() for m in rs} | ({"fmd"} if any(REFERENCE in rs for rs in
                     per_seed.values()) else set()))  # fmt: skip
    for m in methods:
        runs = [rs.get(m) or (rs.get(REFERENCE) if m == "fmd" else None) for _, rs in sorted(per_seed.items())]
        runs = [r for r in runs if r is not None and r.net is not None]
        plan = reg.plans[plan_key(m)]
        if not runs or not (plan.feasible or m == REFERENCE):  # the reference: the unconstrained bound
            continue
        R = max(len(r.curve) for r in runs) - 1
        modelled = hardware.round_times(reg.config, plan.method, plan, reg.params, runs[0].net, R) if R else []
        ends = [0.0] + [rt.end for rt in modelled]
        points = []
        for r in range(R + 1):
            vals = [run.curve[r] for run in runs if r < len(run.curve) and not math.isnan(run.curve[r])]
            if vals:
                points.append((ends[r], statistics.median(vals)))
        out[m] = points
    return out


def plot(reg: Regime, per_seed: Mapping[int, Mapping[str, Run]], results: Sequence[SeedResult], path: str) -> None:
    """PNG of :func:`curves` (mean held-out accuracy vs modelled seconds) with the median target as a dashed
    line."""
    from flux_engine import timemodel

    series = {}
    for m, pts in curves(reg, per_seed).items():
        label = m + (" (does not fit: unconstrained bound)" if not reg.plans[plan_key(m)].feasible else "")
        series[label] = [timemodel.CurvePoint(m, r, t, {"mean": a}) for r, (t, a) in enumerate(pts)]
    targets = [s.target for s in results if s.target is not None]
    tgt = (timemodel.Target(statistics.median(targets), "reference", "median target over seeds")
           if targets else None)  # fmt: skip
    timemodel.plot_curves(series, path, tgt, f"{reg.spec} on {hardware.device(reg.device).name}: modelled time")


def spread(results: Sequence[SeedResult], method: str) -> str:
    vals = [s.rounds[method] for s in results if s.target is not None and method in s.rounds]
    if not vals:
        return "not measured"
    got = sorted(v for v in vals if v is not None)
    miss = len(vals) - len(got)
    core = (f"median {statistics.median(got):g}, {got[0]}-{got[-1]}" if got else "none reached")
    return core + (f", {miss} of {len(vals)} seeds not reached" if miss else "")


# ------------------------------------------------------------------------------------------------ the goals

# The goals the experiment is judged by: Flux at least 5x faster to the target than offloading (FMD), faster than
# int4 fine-tuning (FMQ) and expert dropping (FMES), and its final accuracy within a point of the reference's.
GOALS = {"fmd": (">=", 5.0), "fmq": (">", 1.0), "fmes": (">", 1.0)}
ACCURACY_POINTS = 1.0


def _largest_terms(terms: Mapping[str, float], k: int = 2) -> str:
    top = sorted(((v, n) for n, v in terms.items() if n != "round" and v > 0), reverse=True)[:k]
    return ", ".join(f"{n} {v:.2f} s" for v, n in top)


def verdict(reg: Regime, per_seed: Mapping[int, Mapping[str, Run]], results: Sequence[SeedResult],
            nets: Mapping[str, hardware.NetworkStructure], rounds: int) -> str:  # fmt: skip
    """Markdown list: each speedup (nominal parameters) against its goal (:data:`GOALS`); where one falls short,
    which factor and what makes it (the largest modelled terms of both rounds, or the rounds each method needed);
    then Flux's final accuracy against the reference's, beside the sampling band of one evaluation, and their mean
    accuracies over the run's second half per seed (``late_accuracy``)."""
    lines = []
    for b, (op, goal) in GOALS.items():
        f = factors(results, b)
        if f.speedup is None:
            lines.append(f"- vs {b}: not measured ({f.reason})")
            continue
        head = (f"- vs {b}: {f.speedup:.2f} = round-time ratio {f.round_time_ratio:.2f} x rounds ratio "
                f"{f.rounds_ratio:.2f}; goal {op} {goal:g}: ")  # fmt: skip
        if f.speedup > goal or (op == ">=" and f.speedup == goal):
            lines.append(head + "met")
            continue
        why = []
        if f.rounds_ratio < 1:
            why.append(f"the rounds factor falls short: Flux needed more rounds to the target than {b} (R over "
                       f"seeds: flux {spread(results, 'flux')}; {b} {spread(results, b)})")  # fmt: skip
        if f.round_time_ratio <= goal:
            t = {m: hardware.mean_terms(reg.config, m, reg.plans[m], reg.params, nets.get(m) or
                                        hardware.structural_network(m, reg.plans[m], reg.params.clients, rounds),
                                        rounds) for m in ("flux", b)}  # fmt: skip
            why.append(f"the round-time factor falls short ({f.round_time_ratio:.2f}; the goal needs "
                       f"{goal / f.rounds_ratio:.2f} at this rounds ratio): a modelled {b} round takes "
                       f"{t[b]['round']:.2f} s ({_largest_terms(t[b])}), a Flux round {t['flux']['round']:.2f} s "
                       f"({_largest_terms(t['flux'])})")  # fmt: skip
        lines.append(head + "not met; " + "; ".join(why))
    # Paired: the seeds both finished (a median over other seed sets would compare other partitions).
    both = {s: rs for s, rs in sorted(per_seed.items()) if all(m in rs and rs[m].finished for m in ("flux", REFERENCE))}
    if both:
        a, r = (statistics.median(rs[m].curve[-1] for rs in both.values()) for m in ("flux", REFERENCE))
        band = statistics.median(rs[REFERENCE].band for rs in both.values())
        d = 100 * (a - r)
        lines.append(f"- final mean accuracy (median over the seeds both finished, {sorted(both)}): flux {a:.4f}, "
                     f"{REFERENCE} {r:.4f}: {d:+.1f} points; goal at most {ACCURACY_POINTS:g} point below: "
                     f"{'met' if round(d, 9) >= -ACCURACY_POINTS else 'not met'} (one evaluation's 95% band: "
                     f"+-{100 * band:.1f} points)")  # fmt: skip
        pairs = {s: (late_accuracy(rs["flux"].curve), late_accuracy(rs[REFERENCE].curve)) for s, rs in both.items()}
        late = late_rounds(rounds)
        lines.append(f"- mean accuracy over rounds {late[0]}-{late[-1]} (the second half of the run: a round's "
                     f"accuracy moves by more than one evaluation's band from round to round), flux minus {REFERENCE}: "
                     + ", ".join(f"seed {s} {100 * (a - r):+.1f}" for s, (a, r) in pairs.items())
                     + f" points; median flux {statistics.median(a for a, _ in pairs.values()):.4f}, {REFERENCE} "
                     f"{statistics.median(r for _, r in pairs.values()):.4f}")  # fmt: skip
    else:
        lines.append(f"- final mean accuracy: not measured (flux and {REFERENCE} need a finished seed)")
    return "\n".join(lines)


def late_rounds(rounds: int) -> range:
    """The second half of a run of ``rounds`` rounds: ``rounds // 2 + 1 .. rounds``."""
    return range(rounds // 2 + 1, rounds + 1)


def late_accuracy(curve: Sequence[float]) -> float:
    """Mean of the evaluated accuracies of ``late_rounds(n)`` of a curve over rounds ``0 .. n`` (NaN when none of
    them was evaluated)."""
    late = [a for a in (curve[r] for r in late_rounds(len(curve) - 1)) if not math.isnan(a)]
    return sum(late) / len(late) if late else math.nan


# ------------------------------------------------------------------------------------------------ sensitivity


def tornado_cases(p: hardware.HardwareParams) -> List[Tuple[str, Dict[str, Any], Dict[str, Any]]]:
    """``(parameter, low changes, high changes)``: at least 8 parameters, each moved on its own."""
    return [
        ("utilisation", {"utilisation": 0.2}, {"utilisation": 0.6}),
        ("PCIe efficiency", {"pcie_efficiency": 0.6}, {"pcie_efficiency": 0.95}),
        ("network", {"network_bps": 100e6}, {"network_bps": 10e9}),
        ("DRAM efficiency", {"mem_efficiency": 0.6}, {"mem_efficiency": 0.95}),
        ("FMD prefetch overlap", {"fmd_overlap": False}, {"fmd_overlap": True}),
        ("FMQ dequantisation", {"fmq_fused": False}, {"fmq_fused": True}),
        ("local steps", {"local_steps": max(1, p.local_steps // 2)}, {"local_steps": p.local_steps * 4}),
        ("profiled rows", {"profile_rows": max(1, p.profile_rows // 2)}, {"profile_rows": p.profile_rows * 8}),
        ("budget (GiB)", {"budget_gib": 16.0}, {"budget_gib": 32.0}),
        ("batch", {"batch_size": max(1, p.batch_size // 2)}, {"batch_size": p.batch_size * 4}),
    ]


def _fmt(changes: Mapping[str, Any]) -> str:
    def one(k: str, v: Any) -> str:
        if k == "network_bps":
            return f"{v / 1e6:g} Mbit/s"
        if isinstance(v, bool):
            return {"fmd_overlap": "overlap" if v else "no overlap", "fmq_fused": "fused" if v else "unfused"}[k]
        return f"{v:g}"

    return ", ".join(one(k, v) for k, v in changes.items())


def tornado(reg: Regime, per_seed_runs: Mapping[int, Mapping[str, Run]], gain: float,
            baselines: Sequence[str] = RANKED) -> str:  # fmt: skip
    """Markdown: each speedup (median over seeds) at nominal and with one parameter moved; R_m held."""
    def speedups(p: hardware.HardwareParams) -> List[str]:
        plans = reg.plans
        if (p.budget_gib, p.batch_size) != (reg.params.budget_gib, reg.params.batch_size):
            plans = structure.method_plans(reg.config, p.budget_bytes, p.settings())
        res = [seed_result(reg, s, runs, gain, p, plans) for s, runs in per_seed_runs.items()]
        return [factors(res, b).text() for b in baselines]

    head = "| parameter | low | high | " + " | ".join(f"vs {b} low / high" for b in baselines) + " |"
    lines = [head, "| --- | --- | --- |" + " --- |" * len(baselines)]
    nominal = speedups(reg.params)
    lines.append("| (nominal) | - | - | " + " | ".join(nominal) + " |")
    for name, lo, hi in tornado_cases(reg.params):
        a = speedups(hardware.params_from(reg.params, **lo))
        b = speedups(hardware.params_from(reg.params, **hi))
        lines.append(f"| {name} | {_fmt(lo)} | {_fmt(hi)} | " + " | ".join(f"{x} / {y}" for x, y in zip(a, b)) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ calibration


def calibration(small: MoEConfig, runs: Sequence[Run], seq_len: int, rank: int,
                lora_share: Mapping[str, float]) -> str:  # fmt: skip
    """Markdown: per method the FLOP model's train FLOPs of a client-round on the small model, the measured CPU
    seconds, and the implied FLOP/s: one machine, one FLOP/s if the FLOP model counts the work right."""
    lines = ["| method | tokens per client-round | modelled train FLOPs | measured CPU s | implied GFLOP/s |",
             "| --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    by: Dict[str, List[Run]] = {}
    for r in runs:
        if r.train_seconds > 0 and r.tokens > 0:
            by.setdefault(r.method, []).append(r)
    for m, rs in by.items():
        tokens = statistics.median(r.tokens for r in rs)
        secs = statistics.median(r.train_seconds for r in rs)
        fl = hardware.train_flops(small, int(tokens), seq_len, rank, lora_share.get(m, 1.0))
        lines.append(f"| {m} | {tokens:.0f} | {fl:.3g} | {secs:.2f} | {fl / secs / 1e9:.1f} |")
    return "\n".join(lines) if by else "not measured (no finished learning run)"
