"""The time-to-accuracy experiment (``flux-engine experiment --config FILE``; FLUX_DESIGN.md sections 7 and 8).

One config file holds the run keys shared by every method (``federated.config.RunConfig``: model, data, partition,
seeds, local training, evaluation) at the top level and an ``[experiment]`` table (``ExperimentConfig``): the
methods, Flux's ablations, the TTA target rule, the time model's bandwidths and the outputs. For each preset and
each method, the federation runs in this process (``simulation.run_local``, the same ServerApp / ClientApp as a
deployment) with its own state folder. The server's history carries every round's measured terms (per client:
download and upload bytes, profiling, merge, training and exploration seconds, PCIe bytes; the aggregation
seconds); ``timemodel.TimeModel`` turns them into simulated wall-clock, and the held-out evaluation after each round
gives the accuracy curve. Outputs: a CSV of the curves, a PNG of accuracy vs simulated time and a markdown report
(time-to-target table with speedups, per-method round-time breakdown, memory, the time model's assumptions and the
provenance).

With ``regimes`` the experiment is the two-factor one (``flux_engine.tta``): many learning runs, trained in chunks
by ``--resume`` calls that may run side by side (each holds the runs it trains with a file lock), every finished
run kept as a JSON record (``records``) from which the report is rebuilt.

Ablations of Flux, each an extra method when switched on: ``flux-no-stale`` (profiling on the critical path),
``flux-uniform-budgets`` (equal merged experts per layer instead of Eq. 1), ``flux-freq-merge`` (Eq. 2 with
``alpha_e = f_e``), ``flux-fixed-eps`` (eps fixed), ``flux-no-exploration`` (eps = 1: every tuning slot by
utility) and ``flux-trainer-average`` (each expert averaged over the clients that trained it, the paper's rule,
instead of over those that route tokens to it: ``average-over``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from flux_engine import baselines, provenance, timemodel
from flux_engine.federated.config import METHODS, ConfigError, RunConfig, load_config_file
from flux_engine.fileio import atomic_write

if TYPE_CHECKING:
    from flux_engine import tta

ABLATIONS = ("flux-no-stale", "flux-uniform-budgets", "flux-freq-merge", "flux-fixed-eps", "flux-no-exploration",
             "flux-trainer-average")  # fmt: skip


@dataclass
class ExperimentConfig:
    """The ``[experiment]`` table (keys hyphenated in the file)."""

    methods: List[str] = field(default_factory=lambda: list(METHODS))
    reference: str = "flux"  # the method whose speedups are reported
    target_rule: str = "best_final"  # timemodel.tta_target: "best_final" or "best_any"
    target_fraction: float = 0.95
    network_gbps: float = 1.0  # each client's link, both directions
    pcie_gbytes_per_s: float = 16.0  # host -> GPU (FMD's fetches)
    # Flux's ablations.
    no_stale_profiling: bool = False
    uniform_merge_budgets: bool = False
    frequency_only_merge: bool = False
    fixed_eps: float = -1.0  # >= 0: the flux-fixed-eps ablation with eps fixed at this value
    no_exploration: bool = False
    trainer_average: bool = False
    # Models: presets to run (default: the run's own), and per preset the run keys that differ.
    presets: List[str] = field(default_factory=list)
    preset_overrides: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    # With an empty run ``checkpoint``: fine-tune the preset warm-started by ``pretrain.warm_start`` (prepared and
    # cached on first use) instead of seeded random weights, whose accuracy does not move.
    warm_start: bool = True
    # Outputs ("" = none); with several presets each file name gets "-<preset>" before its extension.
    csv: str = ""
    png: str = ""  # "": the CSV's path with .png
    markdown: str = ""
    # Two-factor TTA (flux_engine.tta): with ``regimes`` ("PRESET@<n>GiB:device", e.g.
    # "deepseek-moe-16b@24GiB:rtx4090"), every method runs once per seed with the regime's structure
    # (``structure-from``; FedAvg-LoRA and FMQ need none and are shared by the regimes, FMD takes FedAvg-LoRA's
    # curve), rounds to the target are measured and round seconds modelled (flux_engine.hardware).
    regimes: List[str] = field(default_factory=list)
    seeds: List[int] = field(default_factory=list)  # [] = the run's own seed
    # The regimes ("PRESET@<n>GiB", as in ``regimes``) whose Flux ablations run; [] = every regime.
    ablation_regimes: List[str] = field(default_factory=list)
    target_gain: float = 0.8  # target = start + gain x (final - start) of FedAvg-LoRA
    chunk_minutes: float = 9.0  # wall-clock one invocation trains for before it writes the report and stops
    # Folder of finished runs' records (RunRecord, JSON; "" = none): commit it and the runs survive the state-dir.
    records: str = ""

    def __post_init__(self) -> None:
        known = set(METHODS)
        for m in self.methods:
            if m not in known:
                raise ConfigError(f"[experiment] methods: unknown method {m!r}; valid: {', '.join(METHODS)}")
        if not self.methods:
            raise ConfigError("[experiment] methods: at least one method is needed")
        if self.target_rule not in ("best_final", "best_any"):
            raise ConfigError(f"[experiment] target-rule must be 'best_final' or 'best_any', got {self.target_rule!r}")
        if not 0.0 < self.target_fraction <= 1.0:
            raise ConfigError(f"[experiment] target-fraction must lie in (0, 1], got {self.target_fraction}")
        if not (self.network_gbps > 0 and self.pcie_gbytes_per_s > 0):
            raise ConfigError("[experiment] network-gbps and pcie-gbytes-per-s must be > 0")
        if self.fixed_eps > 1.0:
            raise ConfigError(f"[experiment] fixed-eps must be <= 1 (or < 0: off), got {self.fixed_eps}")
        for spec in self.regimes:
            from flux_engine import hardware, structure

            reg, _, dev = spec.partition(":")
            try:
                structure.parse_regime(reg)
                hardware.device(dev)
            except ValueError as e:
                raise ConfigError(f"[experiment] regimes: {spec!r}: {e} (form PRESET@<n>GiB:device)") from None
        if self.regimes and not {"flux", "fedavg-lora"} <= set(self.methods):
            raise ConfigError("[experiment] regimes need the methods flux and fedavg-lora (the target's reference)")
        if not (0.0 < self.target_gain < 1.0 and self.chunk_minutes > 0):
            raise ConfigError("[experiment] target-gain must lie in (0, 1) and chunk-minutes be > 0")
        unknown = sorted(set(self.ablation_regimes) - {spec.partition(":")[0] for spec in self.regimes})
        if unknown:
            raise ConfigError(f"[experiment] ablation-regimes: {unknown} are not among the regimes {self.regimes}")
        if any(s < 0 for s in self.seeds) or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"[experiment] seeds must be distinct and >= 0, got {self.seeds}")
        if self.reference not in self.method_names():
            names = self.method_names()
            raise ConfigError(f"[experiment] reference {self.reference!r} is not among the methods {names}")

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> "ExperimentConfig":
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in raw.items():
            name = str(key).replace("-", "_")
            if name not in fields:
                valid = ", ".join(f.replace("_", "-") for f in fields)
                raise ConfigError(f"[experiment]: unknown key {key!r}; valid keys: {valid}")
            f = fields[name]
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            ok = isinstance(value, type(default)) or (isinstance(default, float) and isinstance(value, int))
            if not ok or (isinstance(default, (int, float)) and isinstance(value, bool) != isinstance(default, bool)):
                raise ConfigError(f"[experiment] {key}: expected {type(default).__name__}, got {value!r}")
            kwargs[name] = float(value) if isinstance(default, float) else value
        if "preset_overrides" in kwargs:
            kwargs["preset_overrides"] = {p: dict(v) for p, v in kwargs["preset_overrides"].items()}
        return cls(**kwargs)

    def method_names(self) -> List[str]:
        """The methods to run, then the ablations switched on."""
        switches = (self.no_stale_profiling, self.uniform_merge_budgets, self.frequency_only_merge,
                    self.fixed_eps >= 0, self.no_exploration, self.trainer_average)  # fmt: skip
        return list(self.methods) + [name for name, on in zip(ABLATIONS, switches) if on]

    def regime_methods(self, regime: str) -> List[str]:
        """``method_names`` in ``regime`` ("PRESET@<n>GiB"): its ablations only where ``ablation-regimes`` allows."""
        ablated = not self.ablation_regimes or regime in self.ablation_regimes
        return [m for m in self.method_names() if ablated or m not in ABLATIONS]

    def time_model(self) -> timemodel.TimeModel:
        return timemodel.TimeModel(network_bps=self.network_gbps * timemodel.GBIT,
                                   pcie_bytes_per_s=self.pcie_gbytes_per_s * 1e9)  # fmt: skip

    def outputs(self, preset: str, several: bool) -> Tuple[str, str]:
        """``(csv, png)`` paths of a preset ("" = not written)."""
        png = self.png or (os.path.splitext(self.csv)[0] + ".png" if self.csv else "")
        if not several:
            return self.csv, png
        return tuple(f"{os.path.splitext(p)[0]}-{preset}{os.path.splitext(p)[1]}" if p else "" for p in (self.csv, png))


def load(path: str) -> Tuple[Dict[str, Any], ExperimentConfig]:
    """``(run keys, experiment config)`` of an experiment file (TOML or JSON)."""
    raw = load_config_file(path, keep_experiment=True)
    exp = ExperimentConfig.from_mapping(raw.pop("experiment", {}))
    RunConfig.from_mapping(raw)  # fail on a bad run key before anything runs
    return raw, exp


def method_run(run: RunConfig, name: str, exp: ExperimentConfig, state_dir: str) -> RunConfig:
    """The run of one method: the shared keys, the method (Flux for its ablations) and the ablation's switch.
    Profiling runs inline, timed apart (``profile-in-background = false``): in a one-process simulation a
    background thread would steal cores from the training being timed, and the time model accounts the overlap."""
    changes: Dict[str, Any] = {"state_dir": state_dir, "resume": False, "profile_in_background": False}
    if name in METHODS:
        changes["method"] = name
    else:
        changes["method"] = "flux"
        changes.update({
            "flux-no-stale": {"stale_profile": False},
            "flux-uniform-budgets": {"merge_budgets": "uniform"},
            "flux-freq-merge": {"merge_weighting": "freq"},
            "flux-fixed-eps": {"eps_fixed": exp.fixed_eps},
            "flux-no-exploration": {"eps_fixed": 1.0},
            "flux-trainer-average": {"average_over": "trainers"},
        }[name])  # fmt: skip
    return dataclasses.replace(run, **changes)


# ------------------------------------------------------------------------------------------------ from histories


def client_rounds(state: Any) -> List[Tuple[List[timemodel.ClientRound], float]]:
    """Per completed round of a server state: the accepted clients' ``ClientRound`` (the terms ``FluxStrategy``
    recorded; exploration seconds count as local training) and the aggregation seconds."""
    out = []
    for h in state.history:
        clients = []
        for c, t in sorted(h.get("clients", {}).items()):
            clients.append(timemodel.ClientRound(
                client=c, download_bytes=int(t["download_bytes"]), upload_bytes=int(t["upload_bytes"]),
                profile_seconds=float(t["profile_seconds"]), merge_seconds=float(t["merge_seconds"]),
                train_seconds=float(t["train_seconds"]) + float(t["explore_seconds"]),
                pcie_bytes=int(t["pcie_bytes"]), stale=bool(t["profile_stale"]),
            ))  # fmt: skip
        out.append((clients, float(h["aggregate_seconds"])))
    return out


def curve(method: str, state: Any, rounds: Sequence[timemodel.RoundTime]) -> List[timemodel.CurvePoint]:
    """The accuracy curve: round 0 (the model before training) at time 0, then every evaluated round at the end of
    its simulated time."""
    b = state.baseline
    return timemodel.curve(
        method, rounds, [h.get("accuracy") or None for h in state.history], b.get("accuracy") or None,
        [float(h.get("eval_loss", math.nan)) for h in state.history], float(b.get("eval_loss", math.nan)),
    )  # fmt: skip


def breakdown(rounds: Sequence[timemodel.RoundTime]) -> Dict[str, float]:
    """Mean seconds per round of each term on the critical path (the slowest client), the aggregation, the hidden
    profiling, and the round total."""
    n = max(len(rounds), 1)
    out: Dict[str, float] = {}
    for rt in rounds:
        s = rt.slowest
        terms = dict(s.terms()) if s is not None else {}
        terms["profiling hidden"] = s.profile_hidden if s is not None else 0.0
        terms["aggregation"] = rt.aggregation
        terms["round"] = rt.duration
        for k, v in terms.items():
            out[k] = out.get(k, 0.0) + v / n
    return out


def memory_line(run: RunConfig, method: str) -> str:
    """What the method holds against a client's budget (``budget`` / ``baselines`` memory models)."""
    from flux_engine import budget
    from flux_engine.federated.client import model_config, train_settings

    config, settings = model_config(run), train_settings(run)
    need = run.budget_for(0, {})
    if method == "fedavg-lora":
        m = baselines.fedavg_lora_memory(config, settings, need)
    elif method == "fmq":
        m = baselines.fmq_memory(config, settings, need, run.fmq_bits)
    elif method in ("fmd", "fmes"):
        what = "resident experts" if method == "fmd" else "kept experts"
        return f"within {budget._human(need)} by construction ({what} chosen to fit)"
    else:
        plan = budget.plan_budget(config, need, settings)
        return f"{budget._human(plan.used_bytes)} of {budget._human(need)} (B_tune {plan.B_tune}, B_non {plan.B_non})"
    verdict = "fits" if m.fits else "does NOT fit (assumed to, as the baseline's definition says)"
    return f"{budget._human(m.total)} of {budget._human(need)}: {verdict}"


# ------------------------------------------------------------------------------------------------ running


@dataclass
class PresetResult:
    preset: str
    run: RunConfig
    series: Dict[str, List[timemodel.CurvePoint]]
    rounds: Dict[str, List[timemodel.RoundTime]]
    target: Optional[timemodel.Target]  # accuracy (the headline)
    loss_target: Optional[timemodel.Target]  # held-out loss (secondary: it moves where a small test sample does not)
    seconds: Dict[str, float]  # wall-clock of each method's rounds and evaluations where it ran (server history)
    memory: Dict[str, str]


def run_method(run: RunConfig, resume: bool, verbose: bool = False) -> Any:
    """One method's federation -> its final server state; with ``resume``, a state folder that already holds the
    last round is read back and one that stopped earlier continues."""
    from flux_engine.federated.state import ServerState

    if os.path.exists(os.path.join(run.state_dir, "latest.json")):
        if not resume:
            raise ConfigError(f"{run.state_dir} already holds a server checkpoint: pass --resume, or remove it")
        state = ServerState.load(run.state_dir)
        if state.round >= run.num_rounds:
            return state
        run = dataclasses.replace(run, resume=True)
    from flux_engine.federated.runner import federate

    return federate(run, verbose)


def run_preset(run: RunConfig, exp: ExperimentConfig, resume: bool = False, verbose: bool = False,
               log=print) -> PresetResult:  # fmt: skip
    tm = exp.time_model()
    series, rounds, seconds, memory = {}, {}, {}, {}
    for name in exp.method_names():
        mrun = method_run(run, name, exp, os.path.join(run.state_dir, run.preset, name))
        log(f"== {run.preset}: {name} ({mrun.num_rounds} rounds, {mrun.num_clients} clients) ==")
        state = run_method(mrun, resume, verbose)
        seconds[name] = state.baseline.get("eval_seconds", 0.0) + sum(h.get("seconds", 0.0) for h in state.history)
        failures = [f"round {h.get('round', 0)}: {what} {c}: {why}" for h in [state.baseline, *state.history]
                    for what, key in (("client", "dropped"), ("evaluation on client", "eval_failed"))
                    for c, why in h.get(key, {}).items()]  # fmt: skip
        if failures:
            # A curve with clients missing compares nothing: stop, and say why.
            raise RuntimeError(f"{name}: " + "; ".join(failures[:4]) + (" ..." if len(failures) > 4 else ""))
        rounds[name] = tm.simulate(client_rounds(state))
        series[name] = curve(name, state, rounds[name])
        memory[name] = memory_line(mrun, mrun.method)
    targets = {}
    for metric in timemodel.METRICS:
        if any(not math.isnan(p.value(metric)) for pts in series.values() for p in pts):
            targets[metric] = timemodel.tta_target(series, exp.target_fraction, exp.target_rule, metric)
    return PresetResult(run.preset, run, series, rounds, targets.get("accuracy"), targets.get("loss"), seconds, memory)


def run_experiment(path: str, resume: bool = False, verbose: bool = False, argv: Sequence[str] = (),
                   log=print) -> List[PresetResult]:  # fmt: skip
    """Run the experiment of ``path`` and write its outputs; returns one result per preset."""
    raw, exp = load(path)
    if exp.regimes:
        return run_regimes(path, raw, exp, resume, verbose, argv, log)
    presets = exp.presets or [raw.get("preset", RunConfig.preset)]
    results = []
    started = datetime.now().astimezone().isoformat(timespec="seconds")
    log(exp.time_model().describe())
    for preset in presets:
        keys = {**raw, "preset": preset, **exp.preset_overrides.get(preset, {})}
        run = RunConfig.from_mapping(keys)
        if not run.checkpoint and exp.warm_start:
            from flux_engine.pretrain import warm_start

            run = dataclasses.replace(run, checkpoint=warm_start(preset))
        res = run_preset(run, exp, resume, verbose, log)
        results.append(res)
        csv_path, png_path = exp.outputs(preset, len(presets) > 1)
        points = [p for pts in res.series.values() for p in pts]
        if csv_path:
            timemodel.write_csv(csv_path, points)
            log(f"wrote {csv_path}")
        if png_path and res.target is not None:
            timemodel.plot_curves(res.series, png_path, res.target, f"time to accuracy: {preset}", res.loss_target)
            log(f"wrote {png_path}")
        log(report_section(res, exp, csv_path, png_path))
    if exp.markdown:
        text = report(results, exp, path, argv, started)
        atomic_write(exp.markdown, lambda f: f.write(text))
        log(f"wrote {exp.markdown}")
    return results


# ------------------------------------------------------------------------------------------------ report


def _link(path: str, base: str) -> str:
    return os.path.relpath(path, os.path.dirname(os.path.abspath(base)) or ".") if path else ""


def _start_note(res: PresetResult, target: timemodel.Target) -> List[str]:
    """A warning when the models before training already meet ``target``: the metric did not move beyond where it
    started, so its times to target are 0 and say nothing."""
    start = [p for pts in res.series.values() for p in pts if p.round == 0]
    met = [p.method for p in start if timemodel.time_to_accuracy([p], target.value, target.metric) is not None]
    if not met:
        return []
    return [f"**Note:** the model before training (round 0) already meets this target for {', '.join(met)}: the "
            f"{target.metric} did not rise clearly above where it started, so these times to target are 0 and "
            "compare nothing.", ""]  # fmt: skip


def report_section(res: PresetResult, exp: ExperimentConfig, csv_path: str = "", png_path: str = "",
                   markdown_path: str = "") -> str:  # fmt: skip
    """The markdown of one preset: TTA table, round-time breakdown, memory, outputs."""
    lines = [f"## {res.preset}", ""]
    if res.target is None:
        lines += ["No method has an accuracy (eval-records = 0?): no time-to-accuracy.", ""]
    else:
        lines += [timemodel.tta_table(res.series, res.target, exp.reference), ""] + _start_note(res, res.target)
    if res.loss_target is not None:
        lines += ["Secondary metric, time to a held-out LM loss target (the clients' held-out rows, token-weighted; "
                  "the same rule on the loss):", "", timemodel.tta_table(res.series, res.loss_target, exp.reference),
                  ""] + _start_note(res, res.loss_target)  # fmt: skip
    terms = ["download", "profiling (not hidden)", "profiling hidden", "merge", "local train", "PCIe fetches",
             "upload", "aggregation", "round"]  # fmt: skip
    lines += ["Mean simulated seconds per round on the critical path (the slowest client each round; profiling "
              "hidden = the part stale profiling spends in the client's idle window, not counted), final "
              "held-out LM loss, and the wall-clock of the method's rounds and evaluations where it ran (server "
              "history):",
              "", "| method | " + " | ".join(terms) + " | final eval loss | wall-clock here |",
              "| --- |" + " ---: |" * (len(terms) + 2)]  # fmt: skip
    for name, rounds in res.rounds.items():
        b = breakdown(rounds)
        pts = res.series[name]
        loss = pts[-1].loss if pts else math.nan
        cells = [f"{b.get(t, 0.0):.3f}" for t in terms]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {loss:.4f} | {res.seconds[name] / 60:.1f} min |")
    lines += ["", "Memory per client (budget.py / baselines.py memory models):", ""]
    lines += [f"- {name}: {text}" for name, text in res.memory.items()]
    if csv_path or png_path:
        lines += ["", "Curves: " + ", ".join(f"[`{os.path.basename(p)}`]({_link(p, markdown_path or p)})"
                                              for p in (csv_path, png_path) if p)]  # fmt: skip
    return "\n".join(lines)


def report(results: Sequence[PresetResult], exp: ExperimentConfig, config_path: str, argv: Sequence[str],
           started: str) -> str:  # fmt: skip
    import torch

    first = results[0].run if results else RunConfig()
    budgets = first.budgets or first.memory_budget
    head = [
        f"# Time to accuracy: {', '.join(exp.method_names())}",
        "",
        f"- command: `{provenance.command_line(['flux-engine', *argv])}`",
        f"- config: `{config_path}`",
        f"- started: {started}; finished: {datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- device: {provenance.device()}; commit: {provenance.commit()}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in provenance.versions().items()),
        "- model: " + ", ".join(f"{r.preset} ({r.run.checkpoint or 'seeded random weights'})" for r in results),
        f"- federation: {first.num_clients} clients, {first.num_rounds} rounds, partition {first.partition}, data "
        f"`{first.data}`, {first.samples_per_client} training records per client, loss on {first.loss_on}, "
        f"{first.local_steps} local steps of batch {first.batch_size} x {first.seq_len}, lr {first.lr}, LoRA r "
        f"{first.lora_rank}; memory budget per client {budgets}; torch threads {torch.get_num_threads()}",
        f"- accuracy: multiple-choice accuracy (log-likelihood ranking) on {first.eval_records} held-out test records "
        "per domain, scored by the clients holding the domain; the mean is unweighted over domains",
        "",
        "```",
        exp.time_model().describe(),
        "```",
        "",
    ]
    body = []
    for r in results:
        csv_path, png_path = exp.outputs(r.preset, len(results) > 1)
        body += [report_section(r, exp, csv_path, png_path, exp.markdown), ""]
    return "\n".join(head + body)


# ------------------------------------------------------------------------------------------------ two-factor TTA


@dataclass
class LearningRun:
    """One learning run of the two-factor experiment: which regime it serves ("" = shared), seed, method, run;
    ``key`` ("<preset>/<regime or shared>/seed<k>/<method>") names its folder under the state-dir and its
    record under ``records``."""

    regime: str
    seed: int
    method: str
    run: RunConfig
    key: str


# Run keys that do not change what a run learns: where it keeps its state and how it was cut into chunks.
_NOT_LEARNING = ("state-dir", "resume", "stop-after")
# Run keys added with a default other than what the code did before them: a record without one was trained with
# the value here, not with today's default.
_BEFORE_KEY = {"average-over": "trainers"}


def _learning_keys(run: RunConfig) -> Dict[str, Any]:
    """The run keys a record must share with the config that reads it (the warm-start checkpoint by its file name,
    which carries its content hash, since the cache folder differs between machines)."""
    keys = {k: v for k, v in run.to_flower().items() if k not in _NOT_LEARNING}
    if run.method != "flux":
        # A baseline's client routes only to experts it trains (FMES masks the dropped ones out of the router), so
        # its users are its trainers and average-over changes nothing.
        keys.pop("average-over")
    keys["checkpoint"] = os.path.basename(os.path.normpath(keys["checkpoint"])) if keys["checkpoint"] else ""
    return keys


def _start_weights(run: RunConfig) -> str:
    """The first 16 hex digits of the SHA-256 of the start checkpoint's weight files (sorted by name; "" without a
    checkpoint folder). The cache key names the warm-start recipe, not its result: the same recipe trained on
    another machine or with another thread count gives slightly other weights, and records say which they began
    from."""
    folder = run.checkpoint
    if not folder or not os.path.isdir(folder):
        return ""
    h = hashlib.sha256()
    for name in sorted(n for n in os.listdir(folder) if n.endswith(".safetensors")):
        with open(os.path.join(folder, name), "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()[:16]


_STRUCTURES: Dict[str, Dict[str, int]] = {}  # run keys (JSON) -> _structure: the plans take seconds


_STRUCTURE_KEYS = {"flux": ("B_tune", "B_non"), "fmes": ("kept",)}  # the counts each method trains with


def _structure(run: RunConfig) -> Dict[str, int]:
    """The small model's counts a run's ``structure-from`` gives its method (``structure.match``: Flux's B_tune /
    B_non, FMES's kept experts); {} without one. Derived by code (the memory plans), so a record keeps them: a change
    of the plans changes what a run with the same keys trains."""
    keys = _STRUCTURE_KEYS.get(run.method, ())
    if not run.structure_from or not keys:
        return {}
    key = json.dumps(_learning_keys(run), sort_keys=True)
    if key not in _STRUCTURES:
        from flux_engine import structure
        from flux_engine.federated.client import model_config, train_settings

        m = structure.match(run.structure_from, model_config(run), train_settings(run), run.fmq_bits)
        _STRUCTURES[key] = {k: getattr(m, k) for k in keys}
    return _STRUCTURES[key]


@dataclass
class RunRecord:
    """A finished learning run as the report reads it: the server state's ``round``, ``history`` (every round's
    report) and ``baseline`` (round 0's evaluation), the run keys and the structure (:func:`_structure`) it was
    trained with, and where (device, commit, versions, torch threads). Written as JSON under ``[experiment]
    records`` when a run finishes; committed, it keeps the run across machines: a run with a record is not trained
    again, and ``--resume`` rebuilds the report from records alone."""

    round: int
    history: List[Dict[str, Any]]
    baseline: Dict[str, Any]
    run: Dict[str, Any]
    structure: Dict[str, int]
    provenance: Dict[str, Any]

    @classmethod
    def of(cls, state: Any, run: RunConfig) -> "RunRecord":
        import torch

        where = {"device": provenance.device(), "commit": provenance.commit(), "versions": provenance.versions(),
                 "torch_threads": torch.get_num_threads(), "start_weights": _start_weights(run),
                 "written": datetime.now().astimezone().isoformat(timespec="seconds")}  # fmt: skip
        return cls(state.round, state.history, state.baseline, _learning_keys(run), _structure(run), where)

    def write(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        atomic_write(path, lambda f: json.dump(dataclasses.asdict(self), f, indent=1, sort_keys=True))

    @classmethod
    def read(cls, path: str, run: RunConfig) -> "RunRecord":
        """The record at ``path``; ``ConfigError`` when it cannot be read or was trained with other run keys than
        ``run``'s (naming them: a record never stands for a run it was not; a key newer than the record counts as
        its default)."""
        try:
            with open(path, encoding="utf-8") as f:
                rec = cls(**json.load(f))
        except (OSError, ValueError, TypeError) as e:
            raise ConfigError(f"run record {path} cannot be read: {e}") from None
        want = _learning_keys(run)
        # A key the record lacks was added to the run keys after it was written: its default is what the run had
        # (a new key changes nothing until it is set), unless the key came with a new behaviour as its default.
        default = {**_learning_keys(RunConfig()), **_BEFORE_KEY}
        changed = sorted(k for k in set(want) | set(rec.run) if want.get(k) != rec.run.get(k, default.get(k)))
        if changed:
            diff = ", ".join(f"{k} {rec.run.get(k, default.get(k))!r} there, {want.get(k)!r} here" for k in changed)
            raise ConfigError(f"run record {path} was trained with other run keys ({diff}): restore them, or remove "
                              "the record to train the run again")  # fmt: skip
        # Records written before the structure was per method hold every method's counts: their method's decide.
        if {k: rec.structure.get(k) for k in _structure(run)} != _structure(run):
            raise ConfigError(f"run record {path} was trained with the structure {rec.structure}, and this code "
                              f"derives {_structure(run)} from structure-from {run.structure_from!r} (the memory "
                              "plans changed): remove the record to train the run again")  # fmt: skip
        return rec


def learning_runs(raw: Mapping[str, Any], exp: ExperimentConfig) -> List[LearningRun]:
    """Every run, in the order they are worked through: regime by regime, the methods of every seed before the
    ablations of every seed, method by method. Methods
    without a structure (FedAvg-LoRA, FMQ) run once per seed for every regime; FMD is not run (FedAvg-LoRA's
    curve)."""
    base = RunConfig.from_mapping(raw)
    if not base.checkpoint and exp.warm_start:
        from flux_engine.pretrain import warm_start

        base = dataclasses.replace(base, checkpoint=warm_start(base.preset))
    out, seen = [], set()
    names = [n for n in exp.method_names() if n != "fmd"]
    groups = ([n for n in names if n not in ABLATIONS], [n for n in names if n in ABLATIONS])
    for spec in exp.regimes:
        reg = spec.partition(":")[0]
        here = exp.regime_methods(reg)
        for group, seed in [(g, s) for g in groups for s in exp.seeds or [base.seed]]:
            for name in [n for n in group if n in here]:
                shared = name in ("fedavg-lora", "fmq")
                key = "/".join((base.preset, "shared" if shared else reg, f"seed{seed}", name))
                if key in seen:
                    continue
                seen.add(key)
                run = method_run(dataclasses.replace(base, seed=seed, structure_from="" if shared else reg), name,
                                 exp, os.path.join(base.state_dir, *key.split("/")))  # fmt: skip
                out.append(LearningRun("" if shared else reg, seed, name, run, key))
    return out


def record_path(exp: ExperimentConfig, lr: LearningRun) -> str:
    """Where ``lr``'s record lives ("" without ``records``)."""
    return os.path.join(exp.records, *lr.key.split("/")) + ".json" if exp.records else ""


def _state(lr: LearningRun, exp: ExperimentConfig) -> Any:
    """``lr``'s record, else its server state (None before its first round); a finished state without a record
    gets one written."""
    from flux_engine.federated.state import ServerState

    path = record_path(exp, lr)
    if path and os.path.exists(path):
        return RunRecord.read(path, lr.run)
    if not os.path.exists(os.path.join(lr.run.state_dir, "latest.json")):
        return None
    state = ServerState.load(lr.run.state_dir)
    if path and state.round >= lr.run.num_rounds:
        RunRecord.of(state, lr.run).write(path)
        return RunRecord.read(path, lr.run)  # as every later call reads it (the report counts it among the records)
    return state


@contextlib.contextmanager
def _claim(lr: LearningRun) -> Iterator[bool]:
    """Whether this process holds ``lr`` (an exclusive ``flock`` on ``<state folder>.lock``, dropped when the
    process ends, however it ends): several ``--resume`` workers may advance one experiment, each taking runs the
    others do not hold."""
    import fcntl

    path = lr.run.state_dir.rstrip(os.sep) + ".lock"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def advance(runs: Sequence[LearningRun], exp: ExperimentConfig, minutes: float, verbose: bool = False,
            log=print) -> int:
    """Train unfinished runs in order for about ``minutes`` of wall-clock (a run continues from its checkpoint;
    rounds per call are what the time left holds at the run's slowest round so far, at least one). Returns the
    rounds trained."""
    from flux_engine.federated.runner import federate

    deadline = time.monotonic() + 60.0 * minutes
    done = 0
    for lr in runs:
        if isinstance(_state(lr, exp), RunRecord):  # finished, kept by its record
            continue
        with _claim(lr) as mine:
            if not mine:  # another worker trains it
                continue
            while True:
                state = _state(lr, exp)
                have = state.round if state is not None else 0
                if have >= lr.run.num_rounds:
                    break
                left = deadline - time.monotonic()
                per = max((h.get("seconds", 0.0) for h in state.history), default=0.0) if state is not None else 0.0
                if done and (left <= 0 or (per and left < per)):  # every call trains at least one round
                    return done
                n = max(1, int(left // per)) if per else 1
                stop = min(lr.run.num_rounds, have + n)
                log(f"== {lr.regime or 'shared'} seed {lr.seed} {lr.method}: rounds {have + 1}..{stop} of "
                    f"{lr.run.num_rounds} ==")  # fmt: skip
                federate(dataclasses.replace(lr.run, resume=state is not None, stop_after=stop), verbose)
                done += stop - have
    return done


def _tta_run(lr: LearningRun, state: Any, small: Any) -> "tta.Run":
    from flux_engine import evaluation, hardware, tta

    run = lr.run
    n = len(small.moe_layer_indices) * small.num_experts
    net = hardware.NetworkStructure.from_history(state.history, hardware.lora_expert_bytes(small, run.lora_rank), n)
    secs = [float(t["train_seconds"]) + float(t["explore_seconds"]) for h in state.history
            for t in h.get("clients", {}).values()]  # fmt: skip
    last = next((h for h in reversed(state.history) if h.get("accuracy")), state.baseline)
    band = evaluation.mean_band({d: (a, last["eval_records"][d]) for d, a in last.get("accuracy", {}).items()})
    return tta.Run(lr.method, lr.seed, tta.accuracy_curve(state), state.round, run.num_rounds,
                   net if state.history else None, sum(secs) / len(secs) if secs else 0.0,
                   run.local_steps * run.batch_size * run.seq_len, band)  # fmt: skip


def run_regimes(path: str, raw: Mapping[str, Any], exp: ExperimentConfig, resume: bool, verbose: bool,
                argv: Sequence[str], log=print) -> List[Any]:  # fmt: skip
    """Train for ``chunk-minutes`` (``--resume``: continue; without it the first chunk must find no run started),
    then write the report from whatever has finished."""
    runs = learning_runs(raw, exp)
    started = datetime.now().astimezone().isoformat(timespec="seconds")
    if not resume and any(_state(lr, exp) is not None for lr in runs):
        raise ConfigError(f"{runs[0].run.state_dir}: runs already started here: pass --resume to continue them")
    done = advance(runs, exp, exp.chunk_minutes, verbose, log)
    log(f"trained {done} rounds in this call")  # 0 with runs left: other workers hold them all
    text = regimes_report(runs, exp, path, argv, started)
    if exp.markdown:
        atomic_write(exp.markdown, lambda f: f.write(text))
        log(f"wrote {exp.markdown}")
    else:
        log(text)
    return []


def regime_png(exp: ExperimentConfig, spec: str) -> str:
    """The PNG of a regime's curves: ``png`` (else the markdown's path) with ``-<preset>.png``; "" without
    either."""
    base = exp.png or exp.markdown
    return f"{os.path.splitext(base)[0]}-{spec.partition('@')[0]}.png" if base else ""


def regimes_report(runs: Sequence[LearningRun], exp: ExperimentConfig, config_path: str, argv: Sequence[str],
                   started: str) -> str:  # fmt: skip
    """The two-factor report (flux_engine.tta), from the runs' checkpoints."""
    import torch

    from flux_engine import hardware, structure, tta
    from flux_engine.federated.client import model_config, train_settings

    first = runs[0].run
    small = model_config(first)
    base = hardware.HardwareParams(local_steps=first.local_steps, batch_size=first.batch_size,
                                   seq_len=first.seq_len, profile_rows=first.profile_samples,
                                   lora_rank=first.lora_rank, clients=first.num_clients)  # fmt: skip
    loaded, where = {}, collections.Counter()
    for lr in runs:
        state = _state(lr, exp)
        if state is not None:
            loaded[(lr.regime, lr.seed, lr.method)] = (lr, _tta_run(lr, state, small))
        if isinstance(state, RunRecord):
            p = state.provenance
            where[(p["device"], p["commit"], p.get("start_weights", ""))] += 1
    cmd = provenance.command_line(["flux-engine", *argv])
    finished = [f"- finished runs (records in `{exp.records}`): " + ("; ".join(
        f"{n} on {dev}, commit {c}, start weights {w or 'not recorded'}" for (dev, c, w), n in sorted(where.items()))
        or "none yet")
    ] if exp.records else []  # fmt: skip
    lines = [
        "# Time to accuracy in the regime Flux is for: measured rounds x modelled round time",
        "",
        f"- command: `{cmd}` (repeated until every run has finished; each call trains about "
        f"{exp.chunk_minutes:g} min, then rewrites this report)",
        f"- config: `{config_path}`",
        f"- started: {started}; finished: {datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- device (this report): {provenance.device()}; commit: {provenance.commit()}",
        *finished,
        "- versions: " + ", ".join(f"{k} {v}" for k, v in provenance.versions().items()),
        f"- learning runs: {first.preset} ({first.checkpoint or 'seeded random weights'}), data `{first.data}`, "
        f"partition {first.partition}, {first.num_clients} clients, {first.num_rounds} rounds, {first.local_steps} "
        f"local steps of {first.batch_size} x {first.seq_len}, lr {first.lr}, LoRA r {first.lora_rank}, "
        f"{first.eval_records} test records per domain, seeds {exp.seeds or [first.seed]}; torch threads "
        f"{torch.get_num_threads()}",
        f"- target per seed: start + {exp.target_gain:g} x (final - start) of FedAvg-LoRA's mean held-out "
        "accuracy (the unconstrained reference); R_m = first round >= 1 at or above it; FMD = FedAvg-LoRA's curve",
        "- rounds are **measured** (CPU, small preset, structure matched); round seconds are **modelled** "
        "(flux_engine.hardware: the formulas are in its docstring, every parameter is printed below)",
        "",
    ]
    for spec in exp.regimes:
        reg_spec, _, dev = spec.partition(":")
        reg = tta.regime(reg_spec, dev, base)
        per_seed: Dict[int, Dict[str, Any]] = {}
        missing = []
        for lr in runs:
            if lr.regime not in ("", reg_spec):
                continue
            got = loaded.get((lr.regime, lr.seed, lr.method))
            if got is None or not got[1].finished:
                missing.append(f"{lr.method} seed {lr.seed}" + ("" if got is None else
                                                                  f" ({got[1].rounds_done}/{lr.run.num_rounds})"))
            if got is not None:
                per_seed.setdefault(lr.seed, {})[lr.method] = got[1]
        results = [tta.seed_result(reg, s, rs, exp.target_gain) for s, rs in sorted(per_seed.items())]
        m = structure.match(reg_spec, small, train_settings(first), first.fmq_bits)
        nets = {k: v.net for k, v in per_seed.get(min(per_seed), {}).items()} if per_seed else {}
        if "fedavg-lora" in nets:
            nets["fmd"] = nets["fedavg-lora"]
        lines += [f"## {reg_spec} on {hardware.device(dev).name}", "", "```", reg.params.describe(), "",
                  m.describe(), "```", "",
                  f"Modelled seconds per client-round by term (mean over {first.num_rounds} rounds; network from the "
                  "first seed's measured runs where they exist):", "",
                  hardware.table(reg.config, reg.params, first.num_rounds, nets), ""]  # fmt: skip
        methods = exp.regime_methods(reg_spec)
        lines += ["Rounds to the target per seed (- : not reached in the rounds run; blank: not measured):", "",
                  "| seed | target | " + " | ".join(methods) + " | note |",
                  "| --- | ---: |" + " ---: |" * len(methods) + " --- |"]  # fmt: skip
        for r in results:
            cells = [("-" if r.target is not None and m_ in r.rounds and r.rounds[m_] is None
                      else str(r.rounds.get(m_, ""))) for m_ in methods]  # fmt: skip
            t = f"{r.target:.4f}" if r.target is not None else "-"
            lines.append(f"| {r.seed} | {t} | " + " | ".join(c if c != "None" else "" for c in cells) + f" | {r.note} |")
        lines += ["", "Spread of R_m over seeds: " + "; ".join(f"{m_} {tta.spread(results, m_)}" for m_ in methods),
                  ""]  # fmt: skip
        lines += ["| Flux vs | round-time ratio | rounds ratio | speedup (product) | break-even R_flux / R_b | "
                  "seeds | plan |", "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
        versus = [b for b in ("fmd", "fmq", "fmes", "fedavg-lora") if b in methods] + \
            [a for a in methods if a.startswith("flux-")]
        for b in versus:
            f = tta.factors(results, b) if not b.startswith("flux-") else tta.factors(results, "flux", flux=b)
            plan = reg.plans["flux" if b.startswith("flux") else b]
            label = b + (" (unranked: the unconstrained bound)" if b == "fedavg-lora" else "")
            if b.startswith("flux-"):
                label = f"{b} (ablation: its speedup over flux)"
            fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
            lines.append(f"| {label} | {fmt(f.round_time_ratio)} | {fmt(f.rounds_ratio)} | {fmt(f.speedup)} | "
                         f"{fmt(f.round_time_ratio)} | {f.seeds} | {plan.text() if not plan.feasible else 'fits'} |")
        lines.append("")
        for b in ("fmd", "fmq", "fmes"):
            lines.append(f"speedup vs {b}: {tta.factors(results, b).text()}")
        lines += ["", "Against the goals:", "", tta.verdict(reg, per_seed, results, nets, first.num_rounds)]
        done = {m_: [rs[m_].curve for rs in per_seed.values() if m_ in rs and rs[m_].finished] for m_ in methods}
        late = tta.late_rounds(first.num_rounds)
        for title, stat in (("Final mean accuracy", lambda c: c[-1]),
                            (f"Mean accuracy over rounds {late[0]}-{late[-1]}", tta.late_accuracy)):
            lines += ["", f"{title}, median over finished seeds: " + (", ".join(
                f"{m_} {statistics.median(stat(c) for c in v):.4f}" for m_, v in done.items() if v) or "not measured")]
        lines.append("")
        png = regime_png(exp, reg_spec)
        if per_seed and png:
            tta.plot(reg, per_seed, results, png)
            lines += [f"![mean held-out accuracy vs modelled time]({os.path.relpath(png, os.path.dirname(exp.markdown) or '.')})"
                      if exp.markdown else f"accuracy vs modelled time: {png}", ""]  # fmt: skip
        if per_seed:
            lines += ["Sensitivity (tornado): the speedups (median over seeds) with one parameter moved, R_m held "
                      "at the measured values:", "", tta.tornado(reg, per_seed, exp.target_gain), ""]
        if missing:
            lines += [f"**Not measured yet** ({len(missing)} runs): " + ", ".join(missing) + ". Resume with "
                      f"`flux-engine experiment --config {config_path} --resume` (repeat until none is left).", ""]
    lines += ["## FLOP model vs measured CPU step times (sanity check)", "",
              tta.calibration(small, [r for _, r in loaded.values()], first.seq_len, first.lora_rank, {}), ""]
    return "\n".join(lines)
