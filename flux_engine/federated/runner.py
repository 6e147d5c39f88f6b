"""The in-process federation as a command runs it: checks before anything starts (``preflight``), the Flower
simulation with a progress bar, and the per-round table (``federate``); ``flux-engine run`` / ``demo`` and the
time-to-accuracy experiment (``flux_engine.experiment``) share it."""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, Any, Dict, List, Sequence

import torch

if TYPE_CHECKING:
    from flux_engine.federated.state import ServerState


class RunFailed(RuntimeError):
    """A federation that ran rounds and applied none: its output is the model it started from."""


class _Progress:
    """``tqdm`` when installed, else one line per step."""

    def __init__(self, total: int, desc: str):
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="round")
        except ImportError:
            self._bar, self._n, self._total, self._desc = None, 0, total, desc

    def update(self, postfix: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(postfix)
            self._bar.update(1)
        else:
            self._n += 1
            print(f"{self._desc}: {self._n}/{self._total} {postfix}", file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def table(rows: Sequence[Dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain text table of ``rows`` (floats to 4 significant digits)."""

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def preflight(run) -> List[Any]:
    """Fail before starting anything: the model config (unknown preset, bad checkpoint), every client's budget
    (``BudgetError``), the data (client 0's partition) and, with ``resume``, the server checkpoint. Returns the
    budget plans."""
    from flux_engine import budget
    from flux_engine.federated.client import client_batches, client_plan, model_config, train_settings
    from flux_engine.federated.config import ConfigError
    from flux_engine.federated.state import ServerState

    from flux_engine import baselines
    from flux_engine.merging import FrequencyProfile

    config = model_config(run)
    # FMD's and FMES's plans fail on the budget alone (what they keep depends on the profile, whether they fit
    # does not): any profile tells.
    L, E = len(config.moe_layer_indices), config.num_experts
    uniform = FrequencyProfile(torch.full((L, E), 1.0 / E))
    plans = []
    for pid in range(run.num_clients):
        need, settings = run.budget_for(pid, {}), train_settings(run)
        try:
            plans.append(client_plan(run, config, need))
            if run.structure_from:
                continue  # the real shape's fractions, not the budget, set what FMD / FMES keep
            if run.method == "fmd":
                baselines.plan_residency(config, uniform, need, settings, run.fmd_staging_experts or None)
            elif run.method == "fmes":
                baselines.plan_kept(config, uniform, need, settings, run.fmes_allocation)
        except budget.BudgetError as e:
            raise budget.BudgetError(f"client {pid}: {e}", e.missing_bytes) from None
    client_batches(run, 0, run.num_clients, config.vocab_size)
    if run.resume:
        ServerState.load(run.state_dir)
    elif os.path.exists(os.path.join(run.state_dir, "latest.json")):
        raise ConfigError(
            f"{run.state_dir} already holds a server checkpoint: pass --resume, or choose another state-dir"
        )
    return plans


def federate(run, verbose: bool = False) -> "ServerState":
    """Run the federation in this process, printing the budget plans, progress and one row per round; returns the
    final ``ServerState``."""
    from flux_engine.federated.simulation import run_local

    plans = preflight(run)
    rows = [{"client": i, "B_tune": p.B_tune, "B_non": p.B_non, "budget": p.budget_bytes} for i, p in enumerate(plans)]
    print(table(rows, ["client", "B_tune", "B_non", "budget"]))
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    start = 0
    if run.resume:
        from flux_engine.federated.state import ServerState

        start = ServerState.load(run.state_dir).round
    bar = _Progress(max(run.last_round - start, 0), "rounds")

    def on_round(report: Dict[str, Any]) -> None:
        bar.update(f"round {report['round']} accepted {len(report['accepted'])} dropped {len(report['dropped'])}")

    try:
        state = run_local(run, on_round=on_round)
    finally:
        bar.close()
    rows = round_rows(state)
    print(table(rows, list(rows[0]) if rows else []))
    for h in state.history:
        for client, reason in sorted(h["dropped"].items()):
            print(f"round {h['round']}: client {client} dropped: {reason}")
        for client, reason in sorted(h.get("eval_failed", {}).items()):
            print(f"round {h['round']}: client {client} failed to evaluate: {reason}")
    print(f"server state: {run.state_dir} (round {state.round})")
    ran = [h for h in state.history if h["round"] > start]
    if ran and not any(h["applied"] for h in ran):
        raise RunFailed(f"none of rounds {ran[0]['round']}..{ran[-1]['round']} was applied (see the reasons above)")
    return state


def round_rows(state: "ServerState") -> List[Dict[str, Any]]:
    """One row per round (round 0: the model before training, when evaluated): clients accepted / dropped, experts
    changed, mean train loss, held-out loss, accuracy per domain and their mean, the mean soft accuracy
    (probability on the right choice; when evaluated), seconds."""
    reports = ([{"round": 0, **state.baseline}] if state.baseline else []) + state.history
    domains = sorted({d for h in reports for d in h.get("accuracy", {})})
    nan = float("nan")
    rows = []
    for h in reports:
        losses = list(h.get("train_loss", {}).values())
        row = {
            "round": h["round"],
            "accepted": len(h["accepted"]) if "accepted" in h else "-",
            "dropped": len(h["dropped"]) if "dropped" in h else "-",
            "applied": h.get("applied", "-"),
            "experts": h.get("experts_changed", "-"),
            "train_loss": sum(losses) / len(losses) if losses else nan,
            "eval_loss": h.get("eval_loss", nan),
        }
        row.update({d: h.get("accuracy", {}).get(d, nan) for d in domains})
        if domains:
            row["mean_acc"] = h.get("accuracy_mean", nan)
            row["mean_soft"] = h.get("soft_accuracy_mean", nan)
        row["seconds"] = h.get("seconds", h.get("eval_seconds", nan))
        rows.append(row)
    return rows
