"""The time model of the time-to-accuracy experiment (FLUX_DESIGN.md section 8) and the TTA report.

Simulated wall-clock of one round::

    round = max over sampled clients c of client(c) + aggregation
    client(c) = download + profiling not hidden + merge + local train + PCIe fetches + upload

- **measured** (seconds passed in, measured on the machine that ran the round): profiling, merge, local train and
  the server's aggregation;
- **modelled** from bytes and declared bandwidths: download (bytes of the experts/adapters the server sends the
  client: those changed since its last sync), upload (the tensors it trained, fp32) over the network
  (default 1 Gbit/s, both directions, no latency term), and for FMD the bytes of non-resident experts fetched
  from host memory over PCIe (default 16 GB/s, on the critical path: the routing that decides a fetch is known
  only once the router has run, so no prefetch overlap is assumed);
- **stale profiling** (Flux): the profile used in round r is of round r-1's global model, computed in the client's
  idle window after its round r-1 upload (it starts as the upload starts and must be done when the client's round
  r download ends). The window is measured, per client: its upload + its wait for the slowest client + the
  aggregation + its round-r download (+ whole rounds it sat out), i.e. ``start(r) + download_c(r) - (start(s) +
  client_c(s) - upload_c(s))`` with s the last round c took part in. Only ``max(0, profiling - window)`` counts in
  round r (round 1, or a client's first round: nothing hides it, it counts in full). ``stale=False`` (the
  ablation, and methods that profile on the critical path) counts all of it.

Every term and assumption is listed by ``TimeModel.describe()`` and ``RoundTime.describe()``.

Time-to-accuracy: per method a series of ``CurvePoint`` (round, cumulative simulated time, held-out accuracy per
domain, bytes sent); ``tta_target`` states the target (default: 95% of the best final accuracy any method
reached), ``time_to_accuracy`` finds the first time a series reaches it, ``speedups`` divides each baseline's TTA
by Flux's, ``tta_table`` writes the markdown table, ``write_csv`` / ``read_csv`` the curves and ``plot_curves`` a
PNG of them.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

GBIT = 1e9
NETWORK_BPS = 1.0 * GBIT  # bits per second
PCIE_BYTES_PER_S = 16e9  # bytes per second (PCIe 4.0 x16, one direction, effective)

Tensors = Mapping[Any, Any]


def tensor_bytes(tensors: Any, dtype_bytes: Optional[int] = None) -> int:
    """Bytes of a (nested) collection of tensors: a tensor, a mapping (e.g. ``{(layer, expert): {name: tensor}}``,
    the format of ``TrainResult.trained``) or a sequence. ``dtype_bytes`` overrides the element size (e.g. 4: what
    fp32 transport of the tensors would cost)."""
    if tensors is None:
        return 0
    if isinstance(tensors, torch.Tensor):
        return int(tensors.numel() * (dtype_bytes or tensors.element_size()))
    if isinstance(tensors, Mapping):
        return sum(tensor_bytes(v, dtype_bytes) for v in tensors.values())
    if isinstance(tensors, (list, tuple)):
        return sum(tensor_bytes(v, dtype_bytes) for v in tensors)
    raise TypeError(f"cannot count the bytes of a {type(tensors).__name__}")


def _human_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


# ----------------------------------------------------------------------------------------------------------------
# Per-round inputs and the model


@dataclass
class ClientRound:
    """What one sampled client did in one round. Seconds are measured; bytes are counted.

    ``download_bytes``: the experts/adapters the server sent it (changed since its last sync);
    ``upload_bytes``: what it trained, as sent (fp32); ``pcie_bytes``: host -> GPU expert fetches (FMD);
    ``stale``: whether its profiling may hide in its idle window since its previous round (None: the model's
    default);
    ``network_bps``: this client's own link in bits/s (None: the model's)."""

    client: Union[int, str] = 0
    download_bytes: int = 0
    upload_bytes: int = 0
    profile_seconds: float = 0.0
    merge_seconds: float = 0.0
    train_seconds: float = 0.0
    pcie_bytes: int = 0
    stale: Optional[bool] = None
    network_bps: Optional[float] = None


@dataclass
class ClientTime:
    """One client's simulated seconds in a round, by term."""

    client: Union[int, str]
    download: float
    profile: float  # visible part only
    profile_hidden: float
    merge: float
    train: float
    pcie: float
    upload: float

    @property
    def total(self) -> float:
        return self.download + self.profile + self.merge + self.train + self.pcie + self.upload

    def terms(self) -> Dict[str, float]:
        return {"download": self.download, "profiling (not hidden)": self.profile, "merge": self.merge,
                "local train": self.train, "PCIe fetches": self.pcie, "upload": self.upload}  # fmt: skip


@dataclass
class RoundTime:
    """A simulated round: every sampled client's time, the slowest one, the aggregation and the running total."""

    round: int
    clients: List[ClientTime]
    aggregation: float
    # Per client: seconds of idle time since its previous round that its stale profiling may hide in.
    idle_windows: Dict[Union[int, str], float] = field(default_factory=dict)
    start: float = 0.0  # cumulative simulated time when the round began
    bytes_sent: int = 0  # network bytes of the round, down + up, all sampled clients

    @property
    def slowest(self) -> Optional[ClientTime]:
        return max(self.clients, key=lambda c: c.total) if self.clients else None

    @property
    def duration(self) -> float:
        s = self.slowest
        return (s.total if s is not None else 0.0) + self.aggregation

    @property
    def end(self) -> float:
        return self.start + self.duration

    def describe(self) -> str:
        s = self.slowest
        lines = [f"round {self.round}: {self.duration:.3f} s (from {self.start:.3f} s to {self.end:.3f} s), "
                 f"{_human_bytes(self.bytes_sent)} over the network"]  # fmt: skip
        for c in self.clients:
            mark = " <- slowest" if c is s else ""
            parts = ", ".join(f"{k} {v:.3f}" for k, v in c.terms().items())
            lines.append(f"  client {c.client}: {c.total:.3f} s = {parts}; profiling hidden {c.profile_hidden:.3f} "
                         f"of an idle window of {self.idle_windows.get(c.client, 0.0):.3f}{mark}")  # fmt: skip
        lines.append(f"  + aggregation {self.aggregation:.3f} s")
        return "\n".join(lines)


@dataclass
class TimeModel:
    """Declared bandwidths and switches; see the module docstring for the formula.

    ``network_bps``: bits/s of each client's link (download and upload unless ``uplink_bps`` is set);
    ``pcie_bytes_per_s``: host -> GPU bytes/s for offloaded experts; ``stale_profiling``: default for clients whose
    ``ClientRound.stale`` is None (False: the "no stale profiling" ablation); ``pcie_overlap``: fetches overlap the
    local training (prefetch of the next layer's experts), so only ``max(0, PCIe - train)`` counts."""

    network_bps: float = NETWORK_BPS
    uplink_bps: Optional[float] = None
    pcie_bytes_per_s: float = PCIE_BYTES_PER_S
    stale_profiling: bool = True
    pcie_overlap: bool = False

    def __post_init__(self) -> None:
        for name in ("network_bps", "pcie_bytes_per_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TimeModel.{name} must be > 0, got {getattr(self, name)}")
        if self.uplink_bps is not None and not self.uplink_bps > 0:
            raise ValueError(f"TimeModel.uplink_bps must be > 0 or None, got {self.uplink_bps}")

    # -- transfers

    def download_seconds(self, nbytes: int, network_bps: Optional[float] = None) -> float:
        return 8.0 * nbytes / (network_bps or self.network_bps)

    def upload_seconds(self, nbytes: int, network_bps: Optional[float] = None) -> float:
        return 8.0 * nbytes / (network_bps or self.uplink_bps or self.network_bps)

    def pcie_seconds(self, nbytes: int) -> float:
        return nbytes / self.pcie_bytes_per_s

    # -- rounds

    def client_time(self, c: ClientRound, idle_window: float = 0.0) -> ClientTime:
        """``c``'s simulated seconds; ``idle_window``: its idle seconds stale profiling may hide in."""
        for name in ("download_bytes", "upload_bytes", "pcie_bytes", "profile_seconds", "merge_seconds",
                     "train_seconds"):
            if getattr(c, name) < 0:
                raise ValueError(f"ClientRound.{name} must be >= 0, got {getattr(c, name)}")
        stale = self.stale_profiling if c.stale is None else c.stale
        hidden = min(c.profile_seconds, max(idle_window, 0.0)) if stale else 0.0
        return ClientTime(
            client=c.client,
            download=self.download_seconds(c.download_bytes, c.network_bps),
            profile=c.profile_seconds - hidden,
            profile_hidden=hidden,
            merge=c.merge_seconds,
            train=c.train_seconds,
            pcie=max(0.0, self.pcie_seconds(c.pcie_bytes) - (c.train_seconds if self.pcie_overlap else 0.0)),
            upload=self.upload_seconds(c.upload_bytes, c.network_bps),
        )

    def round_time(self, round: int, clients: Sequence[ClientRound], aggregation_seconds: float,
                   idle_windows: Optional[Mapping[Union[int, str], float]] = None,
                   start: float = 0.0) -> RoundTime:  # fmt: skip
        """One round: ``max`` over ``clients`` (the sampled ones that replied) ``+ aggregation_seconds``;
        ``idle_windows``: per client, the idle seconds its stale profiling may hide in (absent: none)."""
        if aggregation_seconds < 0:
            raise ValueError(f"aggregation_seconds must be >= 0, got {aggregation_seconds}")
        windows = dict(idle_windows or {})
        times = [self.client_time(c, windows.get(c.client, 0.0)) for c in clients]
        sent = sum(int(c.download_bytes) + int(c.upload_bytes) for c in clients)
        return RoundTime(round, times, float(aggregation_seconds), windows, float(start), sent)

    def simulate(self, rounds: Iterable[Tuple[Sequence[ClientRound], float]], first_round: int = 1) -> List[RoundTime]:
        """Rounds in order, each ``(clients, aggregation_seconds)``: cumulative times, with each client's idle
        window measured from the start of its upload in the last round it took part in to the end of its download
        in this one (module docstring); a client's first round has none."""
        out: List[RoundTime] = []
        start = 0.0
        idle_from: Dict[Union[int, str], float] = {}  # client -> simulated time its last upload started
        for i, (clients, agg) in enumerate(rounds):
            windows = {c.client: start + self.download_seconds(c.download_bytes, c.network_bps) - idle_from[c.client]
                       for c in clients if c.client in idle_from}  # fmt: skip
            rt = self.round_time(first_round + i, clients, agg, windows, start)
            out.append(rt)
            for t in rt.clients:
                idle_from[t.client] = start + t.total - t.upload
            start = rt.end
        return out

    def describe(self) -> str:
        up = self.uplink_bps or self.network_bps
        return "\n".join([
            "time model (FLUX_DESIGN.md section 8):",
            "  round time = max over sampled clients of (download + profiling not hidden + merge + local train"
            " + PCIe fetches + upload) + aggregation",
            "  measured: profiling, merge, local train, aggregation (seconds on the machine that ran the round)",
            f"  download = bytes sent to the client (experts/adapters changed since its last sync) * 8 / "
            f"{self.network_bps / 1e9:g} Gbit/s",
            f"  upload = bytes the client trained, fp32 * 8 / {up / 1e9:g} Gbit/s",
            "  PCIe fetches (offloading, FMD) = bytes of non-resident routed experts / "
            f"{self.pcie_bytes_per_s / 1e9:g} GB/s, once per forward and once per backward pass per layer, "
            + ("overlapping the local training (prefetch): only max(0, PCIe - train) counts" if self.pcie_overlap
               else "on the critical path (no prefetch overlap)"),
            ("  stale profiling ON: only max(0, profiling - the client's idle window) counts, the window running from "
             "the start of its previous upload to the end of this round's download (upload + wait for the slowest "
             "client + aggregation + download); a client's first round counts it all"
             if self.stale_profiling else "  stale profiling OFF (ablation): all profiling seconds count"),
            "  not modelled: network latency, server downlink contention (clients' links are independent), "
            "client start-up, evaluation time",
        ])  # fmt: skip

    __str__ = describe


# ----------------------------------------------------------------------------------------------------------------
# Curves and time-to-accuracy


@dataclass
class CurvePoint:
    """One evaluation of a method's global model: after ``round`` (0: the initial model), at cumulative simulated
    ``time`` seconds; held-out ``accuracy`` per domain; ``bytes_sent`` over the network in that round; held-out
    ``loss``."""

    method: str
    round: int
    time: float
    accuracy: Dict[str, float] = field(default_factory=dict)
    bytes_sent: int = 0
    loss: float = math.nan  # held-out LM loss (a secondary metric; NaN when not measured)

    @property
    def mean_accuracy(self) -> float:
        """Unweighted mean over domains (NaN without any)."""
        return sum(self.accuracy.values()) / len(self.accuracy) if self.accuracy else float("nan")

    def value(self, metric: str) -> float:
        """The point's ``metric``: ``"accuracy"`` (mean over domains) or ``"loss"`` (held-out LM loss)."""
        return self.mean_accuracy if metric == "accuracy" else self.loss


METRICS = ("accuracy", "loss")  # higher is better / lower is better


def _better(a: float, b: float, metric: str) -> bool:
    """``a`` at least as good as ``b``."""
    return a >= b if metric == "accuracy" else a <= b


Series = Mapping[str, Sequence[CurvePoint]]


def curve(method: str, rounds: Sequence[RoundTime], accuracies: Sequence[Optional[Mapping[str, float]]],
          initial: Optional[Mapping[str, float]] = None, losses: Optional[Sequence[float]] = None,
          initial_loss: float = math.nan) -> List[CurvePoint]:  # fmt: skip
    """A method's curve from its simulated rounds and the accuracy after each (None: the round was not evaluated,
    no point), ``losses`` the held-out loss after each; ``initial`` (with ``initial_loss``): round 0 at time 0."""
    losses = [math.nan] * len(rounds) if losses is None else losses
    if not len(rounds) == len(accuracies) == len(losses):
        raise ValueError(f"{len(rounds)} rounds but {len(accuracies)} accuracies and {len(losses)} losses")
    out = [] if initial is None else [CurvePoint(method, 0, 0.0, dict(initial), 0, initial_loss)]
    for rt, acc, loss in zip(rounds, accuracies, losses):
        if acc is not None:
            out.append(CurvePoint(method, rt.round, rt.end, dict(acc), rt.bytes_sent, loss))
    return out


@dataclass
class Target:
    """The target of a metric (``METRICS``) and the sentence that states how it was chosen."""

    value: float
    rule: str
    statement: str
    metric: str = "accuracy"


def tta_target(series: Series, fraction: float = 0.95, rule: str = "best_final", metric: str = "accuracy") -> Target:
    """The TTA target: ``fraction`` x the best FINAL mean accuracy any method reached (``rule="best_final"``,
    default), or x the best accuracy seen at any round (``rule="best_any"``). ``metric="loss"``: the held-out loss
    instead, best = lowest, target = best / ``fraction`` (reached at or below it)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    best, who = None, None
    for method, points in series.items():
        if not points:
            continue
        if rule == "best_final":
            cands = [max(points, key=lambda p: (p.round, p.time))]
        elif rule == "best_any":
            cands = list(points)
        else:
            raise ValueError(f"rule must be 'best_final' or 'best_any', got {rule!r}")
        for p in cands:
            v = p.value(metric)
            if not math.isnan(v) and (best is None or (v != best and _better(v, best, metric))):
                best, who = v, (method, p.round)
    if who is None:
        raise ValueError(f"no method has a {metric}")
    what = "final" if rule == "best_final" else "any-round"
    if metric == "accuracy":
        value = fraction * best
        statement = (f"target = {fraction:.0%} of the best {what} mean held-out accuracy any method reached "
                     f"({who[0]}, round {who[1]}: {best:.4f}) = {value:.4f}")  # fmt: skip
    else:
        value = best / fraction
        statement = (f"target = held-out loss <= the best (lowest) {what} held-out loss any method reached "
                     f"({who[0]}, round {who[1]}: {best:.4f}) / {fraction:.2f} = {value:.4f}")  # fmt: skip
    return Target(value, rule, statement, metric)


def time_to_accuracy(points: Sequence[CurvePoint], target: float,
                     metric: str = "accuracy") -> Optional[Tuple[float, int]]:  # fmt: skip
    """``(time, round)`` of the first point whose mean accuracy reaches ``target`` (>=; ``metric="loss"``: whose
    held-out loss is <= ``target``), None if none does."""
    for p in sorted(points, key=lambda p: (p.time, p.round)):
        v = p.value(metric)
        if not math.isnan(v) and _better(v, target, metric):
            return p.time, p.round
    return None


@dataclass
class Speedup:
    """Flux's speedup over one baseline: ``value = TTA(baseline) / TTA(flux)``; when the baseline never reached
    the target, ``value`` is inf and ``lower_bound`` = its last simulated time / TTA(flux)."""

    baseline: str
    value: Optional[float]
    lower_bound: Optional[float] = None
    reason: str = "reference did not reach the target"  # why ``value`` is None

    def text(self) -> str:
        if self.value is None:
            return f"n/a ({self.reason})"
        if math.isinf(self.value):
            return "not reached" if self.lower_bound is None else f"> {self.lower_bound:.2f}x (not reached)"
        return f"{self.value:.2f}x"


def speedups(series: Series, target: float, reference: str = "flux", metric: str = "accuracy") -> Dict[str, Speedup]:
    """Speedup of ``reference`` over every other method of ``series``."""
    if reference not in series:
        raise ValueError(f"reference method {reference!r} not in {sorted(series)}")
    ref = time_to_accuracy(series[reference], target, metric)
    out = {}
    for method, points in series.items():
        if method == reference:
            continue
        if ref is None or ref[0] <= 0:
            why = "reference did not reach the target" if ref is None else "reference met the target before training"
            out[method] = Speedup(method, None, reason=why)
            continue
        t = time_to_accuracy(points, target, metric)
        if t is None:
            last = max((p.time for p in points), default=None)
            out[method] = Speedup(method, math.inf, None if last is None else last / ref[0])
        else:
            out[method] = Speedup(method, t[0] / ref[0])
    return out


def tta_table(series: Series, target: Target, reference: str = "flux") -> str:
    """Markdown: per method its final and best mean accuracy (or held-out loss: ``target.metric``), time to the
    target (seconds, round), total bytes sent, and the speedup of ``reference`` over it; the target's statement
    above the table."""
    m = target.metric
    ups = speedups(series, target.value, reference, m) if reference in series else {}
    short = "acc" if m == "accuracy" else "loss"
    lines = [target.statement, "",
             f"| method | final {short} | best {short} | time to target (s) | rounds to target | total sent "
             f"| speedup of {reference} |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    pick = max if m == "accuracy" else min
    for method, points in series.items():
        pts = sorted(points, key=lambda p: (p.round, p.time))
        final = pts[-1].value(m) if pts else float("nan")
        best = pick((p.value(m) for p in pts), default=float("nan"))
        t = time_to_accuracy(pts, target.value, m)
        tta = "not reached" if t is None else f"{t[0]:.1f}"
        rounds = "-" if t is None else str(t[1])
        sent = _human_bytes(sum(p.bytes_sent for p in pts))
        sp = "(reference)" if method == reference else (ups[method].text() if method in ups else "-")
        lines.append(f"| {method} | {final:.4f} | {best:.4f} | {tta} | {rounds} | {sent} | {sp} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# CSV

CSV_FIXED = ("method", "round", "time_s", "bytes_sent", "eval_loss", "acc_mean")
ACC_PREFIX = "acc:"


def write_csv(path: Union[str, os.PathLike], points: Iterable[CurvePoint]) -> None:
    """One row per point: method, round, simulated time (s), bytes sent in that round, held-out loss, mean
    accuracy, then one ``acc:<domain>`` column per domain seen (empty where a point lacks it). Written atomically."""
    from flux_engine.fileio import atomic_write

    points = list(points)
    domains = sorted({d for p in points for d in p.accuracy})

    def write(f) -> None:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(list(CSV_FIXED) + [ACC_PREFIX + d for d in domains])
        for p in points:
            w.writerow([p.method, p.round, repr(float(p.time)), int(p.bytes_sent), repr(float(p.loss)),
                        repr(float(p.mean_accuracy))]
                       + [repr(float(p.accuracy[d])) if d in p.accuracy else "" for d in domains])  # fmt: skip

    atomic_write(path, write)


def read_csv(path: Union[str, os.PathLike]) -> List[CurvePoint]:
    """The points ``write_csv`` wrote (the mean column is derived, not read back)."""
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            acc = {k[len(ACC_PREFIX):]: float(v) for k, v in row.items() if k.startswith(ACC_PREFIX) and v != ""}
            loss = float(row.get("eval_loss") or "nan")
            out.append(CurvePoint(row["method"], int(row["round"]), float(row["time_s"]), acc, int(row["bytes_sent"]),
                                  loss))  # fmt: skip
    return out


def plot_curves(series: Series, path: Union[str, os.PathLike], target: Optional[Target] = None,
                title: str = "time to accuracy", loss_target: Optional[Target] = None) -> None:  # fmt: skip
    """PNG of mean held-out accuracy vs simulated time, one line per method, the target as a dashed line; beside
    it the held-out loss vs simulated time when the points have one (``loss_target`` dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flux_engine.fileio import atomic_write

    metrics = ["accuracy"] + (["loss"] if any(not math.isnan(p.loss) for pts in series.values() for p in pts) else [])
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.4 * len(metrics), 4.0), dpi=120, squeeze=False)
    try:
        for ax, metric, tgt in zip(axes[0], metrics, (target, loss_target)):
            for method, points in series.items():
                pts = sorted(points, key=lambda p: (p.time, p.round))
                ax.plot([p.time for p in pts], [p.value(metric) for p in pts], marker="o", markersize=3, label=method)
            if tgt is not None:
                ax.axhline(tgt.value, linestyle="--", color="grey", linewidth=1, label=f"target {tgt.value:.3f}")
            ax.set_xlabel("simulated wall-clock (s)")
            ax.set_ylabel("mean held-out accuracy" if metric == "accuracy" else "held-out LM loss")
            ax.set_title(title if metric == "accuracy" else "held-out loss")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        atomic_write(path, lambda f: fig.savefig(f, format="png"), binary=True)
    finally:
        plt.close(fig)


def group_by_method(points: Iterable[CurvePoint]) -> Dict[str, List[CurvePoint]]:
    out: Dict[str, List[CurvePoint]] = {}
    for p in points:
        out.setdefault(p.method, []).append(p)
    return out
