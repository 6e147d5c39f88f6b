"""Diagnosis of Flux's accuracy gap in bench/configs/tta.toml: one Flux learning run of the experiment with one
mechanism changed, beside the experiment's records of Flux with the paper's average over trainers
(``flux-trainer-average``: Flux's rule when the gap was found) and FedAvg-LoRA for the same seed. Not an ablation
of the report (no record, no time model): a question about where the gap comes from.

Variants (each changes one thing of ``flux-trainer-average``, in this process only):

- ``no-merge``: ``B_non = L x E``, so no non-tuning expert is merged (the compact model is the global model; not a
  plan that fits the card). Tests whether the merge is the cause.
- ``shared-roles``: every client gets the first client's roles (``roles.assign_roles``), so each tuning expert is
  averaged over all clients, as in FedAvg-LoRA and FMES, instead of over the few clients whose roles hold it.
  Merging unchanged. Tests whether the per-client roles are the cause.

The report also keeps the runs of a third variant, ``user-weighted`` (commits 89f803a to e4bdbdd): a prototype of
the fix that became ``average-over = "users"``, Flux's default (README, "Averaging over users"). It averaged each
expert over the clients that use it, the others' routed tokens estimated from their first-contact routing
frequencies (the run key measures them), and left an expert's first training (round 1) undamped (the run key
damps it toward the seeded start every client holds).

    OMP_NUM_THREADS=1 python bench/flux_diagnostics.py --variant shared-roles --seed 2   # ~30 min on one core
    python bench/flux_diagnostics.py --report     # bench/results/flux_diagnostics.md from the runs' JSON files

A run evaluates every ``--evaluate-every`` rounds (default 2: evaluation is half of a CPU round) and writes
``bench/results/flux_diagnostics/<variant>-<regime>-seed<k>.json`` (history, run keys, provenance).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import statistics
import sys
from typing import Any, Dict, List

from flux_engine import experiment, provenance, tta
from flux_engine.fileio import atomic_write

CONFIG = "bench/configs/tta.toml"
OUT = "bench/results/flux_diagnostics"
VARIANTS = ("no-merge", "shared-roles")
BASE = "flux-trainer-average"  # the experiment's run the variants change one thing of


def _patch(variant: str) -> None:
    """Change the one mechanism ``variant`` names, for this process."""
    if variant == "no-merge":
        from flux_engine.federated import client

        plan_of = client.client_plan

        def client_plan(run, config, budget_bytes):
            return dataclasses.replace(plan_of(run, config, budget_bytes),
                                       B_non=config.num_experts * len(config.moe_layers))  # fmt: skip

        client.client_plan = client_plan
    else:  # shared-roles
        from flux_engine.federated import strategy

        assign = strategy.assign_roles

        def assign_roles(*args, **kwargs):
            roles = assign(*args, **kwargs)
            return [roles[0]] * len(roles)

        strategy.assign_roles = assign_roles


def _learning_run(runs: List[Any], regime: str, seed: int, method: str) -> Any:
    """The experiment's learning run of ``method`` (shared methods run once per seed for every regime)."""
    lr = next((r for r in runs if r.seed == seed and r.method == method and r.regime in (regime, "")), None)
    if lr is None:
        raise SystemExit(f"{CONFIG} has no {method} run for regime {regime!r} and seed {seed}")
    return lr


def run_variant(variant: str, seed: int, regime: str, evaluate_every: int, state_root: str) -> str:
    from flux_engine.federated.simulation import run_local

    raw, exp = experiment.load(CONFIG)
    lr = _learning_run(experiment.learning_runs(raw, exp), regime, seed, BASE)
    state_dir = os.path.join(state_root, f"{variant}-{regime}-seed{seed}")
    run = dataclasses.replace(lr.run, state_dir=state_dir, evaluate_every=evaluate_every,
                              resume=os.path.exists(os.path.join(state_dir, "latest.json")))  # fmt: skip
    _patch(variant)
    state = run_local(run)
    import torch

    out = {"variant": variant, "regime": regime, "seed": seed, "evaluate_every": evaluate_every,
           "baseline": state.baseline, "history": state.history,
           "provenance": {"device": provenance.device(), "commit": provenance.commit(),
                          "versions": provenance.versions(), "torch_threads": torch.get_num_threads(),
                          "command": provenance.command_line(["python", *sys.argv])}}  # fmt: skip
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, f"{variant}-{regime}-seed{seed}.json")
    atomic_write(path, lambda f: json.dump(out, f, indent=1, sort_keys=True))
    return path


def _points(history: List[Dict[str, Any]]) -> Dict[int, Any]:
    """``{round: (mean accuracy, eval loss)}`` of the evaluated rounds."""
    return {h["round"]: (tta.mean_accuracy(h), h["eval_loss"]) for h in history if h.get("accuracy")}


def report() -> str:
    raw, exp = experiment.load(CONFIG)
    runs = experiment.learning_runs(raw, exp)
    lines = ["# Where Flux's accuracy gap comes from: one mechanism changed at a time", "",
             f"Runs of `bench/flux_diagnostics.py` (its docstring defines the variants) beside the records of "
             f"`{CONFIG}` (`{exp.records}`) for the same seed; the same model, data, structure and keys as the "
             f"experiment's `{BASE}` run. Mean held-out accuracy / held-out loss at the rounds the variant evaluated.",
             ""]  # fmt: skip
    for path in sorted(glob.glob(os.path.join(OUT, "*.json"))):
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        p = d["provenance"]
        rows = {d["variant"]: _points(d["history"])}
        for method in (BASE, "fedavg-lora"):
            lr = _learning_run(runs, d["regime"], d["seed"], method)
            rows[method] = _points(experiment.RunRecord.read(experiment.record_path(exp, lr), lr.run).history)
        rounds = sorted(rows[d["variant"]])
        late = [r for r in rounds if r in tta.late_rounds(rounds[-1])]
        lines += [f"## {d['variant']}, {d['regime']}, seed {d['seed']}", "",
                  f"- command: `{p['command']}`; {sum(h['seconds'] for h in d['history']) / 60:.0f} min of rounds "
                  "(the commit below is that of the call that finished it)",
                  f"- device: {p['device']}; commit {p['commit']}; versions "
                  + ", ".join(f"{k} {v}" for k, v in sorted(p["versions"].items())), "",
                  "| run | " + " | ".join(f"round {r}" for r in rounds) + f" | mean of rounds {late[0]}-{late[-1]} |",
                  "| --- |" + " ---: |" * (len(rounds) + 1)]  # fmt: skip
        for name, pts in rows.items():
            cells = [f"{pts[r][0]:.3f} / {pts[r][1]:.3f}" for r in rounds]
            mean = statistics.mean(pts[r][0] for r in late)
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean:.3f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", choices=VARIANTS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--regime", default="deepseek-moe-16b@24GiB")
    ap.add_argument("--evaluate-every", type=int, default=2)
    ap.add_argument("--state-dir", default="flux-state/diagnostics")
    ap.add_argument("--report", action="store_true", help="write bench/results/flux_diagnostics.md and stop")
    a = ap.parse_args()
    if a.report:
        text = report()
        atomic_write("bench/results/flux_diagnostics.md", lambda f: f.write(text))
        print("wrote bench/results/flux_diagnostics.md")
        return 0
    if not a.variant:
        ap.error("--variant is required (or --report)")
    print("wrote", run_variant(a.variant, a.seed, a.regime, a.evaluate_every, a.state_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
