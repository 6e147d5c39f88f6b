"""What a Flux round costs beside FedAvg-LoRA's (issue #16): the CPU time-to-accuracy config run with every method
for a few rounds (evaluation off: it is outside the time model), then per method the mean measured seconds of each
term of a client's round and the simulated round time of the time model (``flux_engine.timemodel``).

    python bench/flux_round.py --config bench/configs/tta_cpu.toml --rounds 3 [--resume]

Writes ``bench/results/flux_round.md`` whose last line is ``round-time ratio flux/fedavg-lora: X``: the mean
simulated round of Flux over FedAvg-LoRA's (goal: X <= 1.10). Every method runs in its own state folder under
``--state-dir``; ``--resume`` reads finished methods back (the report can be regenerated without training).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from datetime import datetime
from typing import Dict, List, Sequence

from flux_engine import experiment, provenance
from flux_engine.federated.config import RunConfig
from flux_engine.fileio import atomic_write

# Measured client terms (server history, seconds) averaged over rounds and clients.
TERMS = (("train_seconds", "train"), ("explore_seconds", "explore (SPSA, zo only)"), ("merge_seconds", "merge"),
         ("profile_seconds", "profile (measured)"))  # fmt: skip


def measured_means(state) -> Dict[str, float]:
    """Mean per client-round of every measured term."""
    rows = [t for h in state.history for t in h.get("clients", {}).values()]
    n = max(len(rows), 1)
    return {label: sum(float(t[key]) for t in rows) / n for key, label in TERMS}


def run_methods(config: str, rounds: int, state_dir: str, resume: bool) -> Dict[str, tuple]:
    raw, exp = experiment.load(config)
    run = RunConfig.from_mapping({**raw, "num-rounds": rounds, "evaluate-every": 0, "eval-records": 0})
    if not run.checkpoint and exp.warm_start:
        from flux_engine.pretrain import warm_start

        run = dataclasses.replace(run, checkpoint=warm_start(run.preset))
    tm = exp.time_model()
    out = {}
    for name in exp.methods:
        mrun = experiment.method_run(run, name, exp, os.path.join(state_dir, name))
        print(f"== {name}: {mrun.num_rounds} rounds, {mrun.num_clients} clients ==", flush=True)
        state = experiment.run_method(mrun, resume)
        out[name] = (state, tm.simulate(experiment.client_rounds(state)))
    return out


def report(results: Dict[str, tuple], config: str, rounds: int, argv: Sequence[str], started: str) -> str:
    lines = ["# A Flux round beside the baselines' (issue #16)", "",
             f"{config} with every method for {rounds} rounds, evaluation off (outside the time model).", "",
             f"- command: `{provenance.command_line(['python', 'bench/flux_round.py', *argv])}`",
             f"- started: {started}",
             f"- device: {provenance.device()}; commit: {provenance.commit()}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in provenance.versions().items()), "",
             "## Measured terms (mean seconds per client-round)", "",
             "| method | " + " | ".join(label for _, label in TERMS) + " |",
             "|---|" + "---|" * len(TERMS)]  # fmt: skip
    for name, (state, _) in results.items():
        m = measured_means(state)
        lines.append(f"| {name} | " + " | ".join(f"{m[label]:.2f}" for _, label in TERMS) + " |")
    lines += ["", "## Simulated round (time model, mean over rounds; the slowest client's terms)", ""]
    cols: List[str] = []
    table = {}
    for name, (_, rts) in results.items():
        table[name] = experiment.breakdown(rts)
        cols += [k for k in table[name] if k not in cols]
    lines += ["| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, b in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{b.get(c, 0.0):.2f}" for c in cols) + " |")
    lines += ["", "Profiling shown is the part the client's idle window (its upload + wait for the slowest client + "
              "aggregation + its next download) does not hide; round 1's first-contact profile is always shown.", ""]
    per_round = {n: [rt.duration for rt in rts] for n, (_, rts) in results.items()}
    for n, ds in per_round.items():
        lines.append(f"- {n}: rounds " + ", ".join(f"{d:.2f}" for d in ds) + " s")
    lines.append("")
    if "flux" in table and "fedavg-lora" in table:
        ratio = table["flux"]["round"] / table["fedavg-lora"]["round"]
        lines.append(f"round-time ratio flux/fedavg-lora: {ratio:.3f}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="bench/configs/tta_cpu.toml")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--state-dir", default="flux-state/flux-round")
    p.add_argument("--out", default="bench/results/flux_round.md")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)
    started = datetime.now().astimezone().isoformat(timespec="seconds")
    results = run_methods(args.config, args.rounds, args.state_dir, args.resume)
    text = report(results, args.config, args.rounds, argv, started)
    atomic_write(args.out, lambda f: f.write(text))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
