"""``flux-engine``: the command line.

    flux-engine demo                       # 4 clients x 3 rounds: SmolLM2-MoE, one domain each, accuracy curve
    flux-engine run --config run.toml      # a federation from a config file (keys: federated.config.RunConfig)
    flux-engine run --config run.toml --resume
    flux-engine experiment --config bench/configs/tta_cpu.toml   # Flux vs baselines: time-to-accuracy report
    flux-engine profile --preset tiny      # routing frequencies / importance of one client's data
    flux-engine merge --preset tiny --tune 2 --merged 6    # merge plan and its output error
    flux-engine plan --preset gpt-oss-20b --budget 24GiB   # a client's memory plan: B_tune, B_non, every term
    flux-engine bench --preset tiny        # one client round, timed by phase
    flux-engine probe --task olmo:piqa     # does the demo's model learn a task? (bench/results/tasks.md)

Errors (unknown preset, config typo, budget too small, malformed data, damaged checkpoint) print one line and exit
with status 2. A federation that ran rounds but applied none of them (every client failed or was rejected) exits
with status 1.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence, Tuple

import torch

from flux_engine.evaluation import PRECISIONS, resolve_precision
from flux_engine.federated.config import load_config_file
from flux_engine.federated.runner import RunFailed, federate, round_rows, table

if TYPE_CHECKING:
    from flux_engine.federated.state import ServerState

EXIT_ERROR = 2
EXIT_FAILED = 1


# ------------------------------------------------------------------------------------------------ federation


# The demo: one domain per client, chosen from bench/results/tasks.md (flux-engine probe) among the tasks the
# warm-started model learns in a few LoRA steps, each with enough test records for a 128-record sample.
DEMO_PRESET = "smollm2-llama-moe-mini"
DEMO_DOMAINS = ("intent_recognition", "sst2", "mrpc", "arc_easy")
DEMO_DATA = "bigbench:intent_recognition+olmo:sst2,mrpc,arc_easy"


def demo_settings() -> Dict[str, Any]:
    """The demo's defaults (its command-line options), sized for < 5 min on 2 CPU cores (bench/results/demo.md)."""
    return {"rounds": 3, "local_steps": 4, "lr": 1e-2, "seq_len": 64, "samples": 32, "eval_records": 128,
            "evaluate_every": None, "eval_precision": "auto", "budgets": "982MiB,1005MiB,1028MiB,1050MiB"}  # fmt: skip


def demo_model() -> str:
    """The checkpoint folder of the demo's model: ``DEMO_PRESET`` warm-started (``pretrain.warm_start``)."""
    from flux_engine.pretrain import warm_start

    return warm_start(DEMO_PRESET)


def mean_accuracy_line(state: "ServerState") -> Tuple[str, str]:
    """``mean accuracy: round 0 A -> round N B (95% band +-C)`` (the mean over domains before training and after
    the last evaluated round, with the 95% binomial band of round 0's mean, ``evaluation.mean_band``) and a sentence
    saying whether the change is larger than the band."""
    from flux_engine.evaluation import mean_band

    first = state.baseline
    last = next(h for h in reversed(state.history) if "accuracy" in h)
    band = mean_band({d: (a, first["eval_records"][d]) for d, a in first["accuracy"].items()})
    a, b = first["accuracy_mean"], last["accuracy_mean"]
    line = f"mean accuracy: round 0 {a:.3f} -> round {last['round']} {b:.3f} (95% band +-{band:.3f})"
    verdict = (f"The mean changed by {b - a:+.3f}: "
               + ("more than the band, learning shows." if b - a > band else "not more than the band."))  # fmt: skip
    return line, verdict


def cmd_demo(args) -> int:
    from flux_engine import provenance
    from flux_engine.federated.config import RunConfig
    from flux_engine.fileio import atomic_write

    start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    state_dir = args.state_dir or tempfile.mkdtemp(prefix="flux-demo-")
    # Scoring 4 x 128 records takes about as long as a training round on 2 cores: by default round 0 and the last.
    every = args.rounds if args.evaluate_every is None else args.evaluate_every
    # Short sequences (evaluation cuts records to seq-len too), a few LoRA steps per round, int8 profiling of the
    # first 16 training rows (routing statistics of 1k tokens; the stale profiles share the 2 cores with training
    # in this one-machine simulation). The default budgets give the clients 4, 6, 8 and 10 tuning experts (B_tune)
    # of 40 and merge the others into 5 (B_non), by the memory model of flux_engine.budget (the int8 profiling copy
    # time-shares the memory with training: it is checked in the profile phase, not counted in the training plan).
    run = RunConfig(
        checkpoint=demo_model(), tokenizer="smollm2", data=DEMO_DATA, partition="domain",
        num_rounds=args.rounds, num_clients=len(DEMO_DOMAINS), min_clients=3, mode="lora", lora_rank=8,
        lora_alpha=16.0, lr=args.lr, local_steps=args.local_steps, batch_size=4, seq_len=args.seq_len,
        samples_per_client=args.samples, eval_fraction=0.25, eval_records=args.eval_records,
        evaluate_every=every, eval_precision=args.eval_precision, profile_bits=8, profile_samples=16,
        budgets=args.budgets, workspace="0", state_dir=state_dir,
    )  # fmt: skip
    state = federate(run, args.verbose)
    rows = round_rows(state)
    paths = {k: os.path.join(args.out, f"demo.{k}") for k in ("csv", "png", "md")}
    write_csv(paths["csv"], rows)
    domains = [d for d in DEMO_DOMAINS if d in rows[0]]
    plot_accuracy(paths["png"], rows, domains, state.baseline.get("eval_records", {}))
    train = sum(h["train_seconds"] for h in state.history)
    evaluate = state.baseline.get("eval_seconds", 0.0) + sum(h.get("eval_seconds", 0.0) for h in state.history)
    timing = (f"demo: {len(DEMO_DOMAINS)} clients x {state.round} rounds in {time.perf_counter() - start:.1f} s "
              f"(training rounds {train:.1f} s, evaluations {evaluate:.1f} s), torch threads {torch.get_num_threads()}")
    summary, verdict = mean_accuracy_line(state) if state.baseline.get("accuracy") else ("mean accuracy: not evaluated", "")
    report = [
        "# `make demo`: Flux on SmolLM2-MoE, 4 clients, one learnable domain each, CPU", "",
        f"- command: `{provenance.command_line(sys.argv)}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- commit: {provenance.commit()}", f"- device: {provenance.device()}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in provenance.versions().items())}",
        f"- data: `{DEMO_DATA}`, one domain per client; {args.eval_records} held-out test records per domain "
        f"scored before training and every {every} round(s) (cut to seq-len {args.seq_len}; "
        f"{resolve_precision(args.eval_precision, torch.device('cpu'))}, eval precision {args.eval_precision})",
        f"- settings: {args.rounds} rounds, {args.local_steps} LoRA steps per client and round (rank 8, lr {args.lr}), "
        f"batch 4 x seq-len {args.seq_len}, {args.samples} training records per client, budgets {args.budgets}",
        "- outputs: demo.csv, demo.png (accuracy per domain and mean vs round, 95% band of round 0's mean shaded)",
        "", "```", table(rows, list(rows[0])), timing, "```", "",
        "`mean_soft`: soft accuracy, the probability on the right choice (softmax over a record's choices of the "
        "per-token mean log-likelihoods), averaged over records and domains.", "", verdict, "", summary,
    ]  # fmt: skip
    atomic_write(Path(paths["md"]), lambda f: f.write("\n".join(report) + "\n"))
    print(f"wrote {paths['csv']}, {paths['png']} and {paths['md']}")
    print(timing)
    print(f"{summary}. {verdict}")
    return 0


def write_csv(path: str, rows: Sequence[Dict[str, Any]]) -> None:
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_accuracy(path: str, rows: Sequence[Dict[str, Any]], domains: Sequence[str],
                  records: Optional[Dict[str, int]] = None) -> None:
    """Accuracy vs round (one line per domain, the mean over domains in bold; with ``records`` per domain, the 95%
    binomial band of round 0's mean shaded) beside the held-out loss vs round."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    from flux_engine.evaluation import mean_band

    fig, (acc, loss) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    scored = [r for r in rows if not math.isnan(r["mean_acc"])]  # rounds without an evaluation leave no gap
    for d in domains:
        acc.plot([r["round"] for r in scored], [r[d] for r in scored], marker="o", label=d)
    acc.plot([r["round"] for r in scored], [r["mean_acc"] for r in scored], marker="s", color="black", linewidth=2.5,
             label="mean")  # fmt: skip
    rounds = [r["round"] for r in rows]
    if records and rows[0]["round"] == 0:
        a0 = rows[0]["mean_acc"]
        band = mean_band({d: (rows[0][d], records[d]) for d in domains})
        acc.axhspan(a0 - band, a0 + band, color="gray", alpha=0.25, label=f"round 0 mean, 95% band (+-{band:.3f})")
    acc.set_ylabel("multiple-choice accuracy (held-out test records)")
    acc.legend(fontsize=8)
    losses = [r for r in rows if not math.isnan(r["eval_loss"])]
    loss.plot([r["round"] for r in losses], [r["eval_loss"] for r in losses], marker="o", color="tab:red")
    loss.set_ylabel("held-out LM loss (clients' held-out rows)")
    for ax in (acc, loss):
        ax.set_xlabel("round (0: before federated training)")
        ax.set_xticks(rounds)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Flux on {DEMO_PRESET}: {len(domains)} clients, one domain each")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_probe(args) -> int:
    from flux_engine import probe

    if args.report:
        print(probe.report(args.report, followed_up=args.followed_up), end="")
        return 0
    if args.follow_up:  # each suggestive task again, its own settings on the next --test-records held-out records
        jobs = [(r["task"], probe.follow_up_settings(r, args.test_records)) for r in probe.suggestive(args.follow_up)]
        probe.run(jobs, args.out, args.checkpoint or demo_model())
        return 0
    if not args.task:
        raise ValueError("probe needs --task SPEC (e.g. olmo:piqa), --follow-up FOLDER or --report FOLDER")
    settings = probe.ProbeSettings(steps=args.steps, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
                                   test_records=args.test_records, train_records=args.train_records)  # fmt: skip
    probe.run([(task, settings) for task in args.task], args.out, args.checkpoint or demo_model())
    return 0


def cmd_run(args) -> int:
    from flux_engine.federated.config import RunConfig

    raw = load_config_file(args.config)
    if args.resume:
        raw = {**raw, "resume": True}
    federate(RunConfig.from_mapping(raw), args.verbose)
    return 0


def cmd_experiment(args) -> int:
    from flux_engine.experiment import run_experiment

    if not args.verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    argv = ["experiment", "--config", args.config] + (["--resume"] if args.resume else [])
    run_experiment(args.config, resume=args.resume, verbose=args.verbose, argv=argv)
    return 0


# ------------------------------------------------------------------------------------------------ single client


def _client(args):
    """Model, run config and batches of one client, from the ``--config`` file and command-line overrides."""
    from flux_engine.federated.client import build_model, client_batches, model_config
    from flux_engine.federated.config import RunConfig

    raw = load_config_file(args.config) if args.config else {}
    raw.update({k: v for k, v in (("preset", args.preset), ("data", args.data)) if v is not None})
    run = RunConfig.from_mapping(raw)
    model_config(run)  # unknown preset / bad checkpoint: fail before building anything
    model = build_model(run)
    train, _ = client_batches(run, 0, 1, model.config.vocab_size)
    return run, model, train


def _profile(model, batches, bits: int):
    from flux_engine import profiling

    return profiling.profile(model, batches, bits=bits or None)


def cmd_profile(args) -> int:
    run, model, batches = _client(args)
    t0 = time.perf_counter()
    p = _profile(model, batches, args.bits)
    seconds = time.perf_counter() - t0
    rows = [
        {
            "layer": layer,
            "expert": e,
            "frequency": float(p.frequency[l, e]),
            "importance": float(p.importance[l, e]),
            "samples": len(p.samples[l][e]),
        }
        for l, layer in enumerate(p.layers)
        for e in range(p.num_experts)
    ]
    print(table(rows, ["layer", "expert", "frequency", "importance", "samples"]))
    print(
        f"{p.num_tokens} tokens profiled in {seconds:.2f} s ({'int%d' % args.bits if args.bits else 'full precision'})"
    )
    if args.out:
        p.save(args.out)
        print(f"profile written to {args.out}")
    return 0


def cmd_merge(args) -> int:
    from flux_engine import merging

    run, model, batches = _client(args)
    p = _profile(model, batches, args.bits)
    # The most frequent experts of each layer tune (an assignment without a server); the rest merge.
    per_layer = max(1, args.tune // len(p.layers))
    tuning = [torch.argsort(p.frequency[l], descending=True)[:per_layer].tolist() for l in range(len(p.layers))]
    t0 = time.perf_counter()
    merged = merging.merge(model, p, tuning, args.merged, seed=run.seed)
    seconds = time.perf_counter() - t0
    errors = merging.merge_output_error(model, merged, batches[0]["input_ids"], batches[0]["attention_mask"])
    rows = [
        {
            "layer": layer,
            "tuning": len(tuning[l]),
            "physical": mlp.experts.num_physical,
            "groups": merged.merge_plan.groups[l],
            "output_error": errors[l],
        }
        for l, (layer, mlp) in enumerate(zip(p.layers, merged.moe_layers()))
    ]
    print(table(rows, ["layer", "tuning", "physical", "output_error", "groups"]))
    print(f"merged in {seconds:.2f} s")
    return 0


def cmd_bench(args) -> int:
    """One client round on synthetic data, timed by phase (profile, merge, train)."""
    from flux_engine import budget, merging, roles
    from flux_engine.federated.client import train_config, train_settings
    from flux_engine.training import train_round

    run, model, batches = _client(args)
    plan = budget.plan_budget(model.config, run.budget_for(0, {}), train_settings(run))
    times = {}
    t0 = time.perf_counter()
    p = _profile(model, batches, run.profile_bits)
    times["profile"] = time.perf_counter() - t0
    r = roles.assign_roles(roles.frequency_utility(p.frequency), [plan.B_tune])[0]
    t0 = time.perf_counter()
    merged = merging.merge(model, p, r.tuning_lists(), plan.B_non, seed=run.seed)
    times["merge"] = time.perf_counter() - t0
    result = train_round(merged, r.tuning_lists(), batches, train_config(run))
    times["train"] = result.seconds
    print(plan.describe())
    rows = [{"phase": k, "seconds": v} for k, v in times.items()]
    rows.append({"phase": "train tokens/s", "seconds": result.tokens / max(result.seconds, 1e-9)})
    print(table(rows, ["phase", "seconds"]))
    return 0


def cmd_plan(args) -> int:
    """A client's memory plan (``budget.plan_budget``): B_tune, B_non and every term, for a preset or a checkpoint's
    config, without building the model."""
    from flux_engine import budget, presets
    from flux_engine.checkpoint.safetensors_io import parse_size

    if (args.preset is None) == (args.checkpoint is None):
        raise ValueError("plan needs exactly one of --preset or --checkpoint")
    if args.preset is not None:
        config = presets.get(args.preset)
    else:
        from flux_engine.checkpoint import get_layout, read_config
        from flux_engine.checkpoint.safetensors_io import CONFIG_FILE, read_json

        path = os.path.join(args.checkpoint, CONFIG_FILE)
        raw = read_json(path)
        config = read_config(get_layout(raw.get("model_type"), path), raw, path)
    settings = budget.TrainSettings(
        dtype=args.dtype, lora_rank=args.lora_rank if args.mode == "lora" else 0, batch_size=args.batch_size,
        seq_len=args.seq_len, activation_checkpointing=args.activation_checkpointing,
        profile_bits=None if args.profile_bits < 0 else args.profile_bits, frozen_experts=args.frozen_experts,
    )  # fmt: skip
    name = args.preset or args.checkpoint
    print(f"{name}: {len(config.moe_layer_indices)} MoE layers x {config.num_experts} experts, "
          f"{settings.frozen_experts} frozen experts, {args.mode} tuning")  # fmt: skip
    print(budget.plan_budget(config, parse_size(args.budget), settings).describe())
    return 0


# ------------------------------------------------------------------------------------------------ main


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="flux-engine", description="Federated fine-tuning of MoE LLMs (Flux).")
    sub = ap.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="4 clients (one learnable domain each) fine-tune the SmolLM2 MoE preset; accuracy per round"
    )
    d = demo_settings()
    demo.add_argument("--rounds", type=int, default=d["rounds"])
    demo.add_argument("--local-steps", type=int, default=d["local_steps"], help="LoRA steps per client and round")
    demo.add_argument("--lr", type=float, default=d["lr"])
    demo.add_argument("--seq-len", type=int, default=d["seq_len"], help="tokens per training row and scored record")
    demo.add_argument("--samples", type=int, default=d["samples"], help="training records per client")
    demo.add_argument("--eval-records", type=int, default=d["eval_records"], help="test records per domain, each round")
    demo.add_argument("--evaluate-every", type=int, default=d["evaluate_every"],
                      help="rounds between held-out evaluations (round 0 is always scored; default: the number of "
                      "rounds, so round 0 and the last)")
    demo.add_argument("--eval-precision", choices=PRECISIONS, default=d["eval_precision"],
                      help="scoring precision: fp32, bf16 (autocast), auto (bf16 where the CPU/GPU has bf16 matmuls)")
    demo.add_argument("--budgets", default=d["budgets"], help="memory budget per client")
    demo.add_argument("--out", default="bench/results", help="folder for demo.csv, demo.png and demo.md")
    demo.add_argument("--state-dir", default=None, help="server checkpoints (default: a temp dir)")
    demo.set_defaults(func=cmd_demo)

    pr = sub.add_parser("probe", help="which tasks the demo's model learns: accuracy before / after LoRA steps")
    pr.add_argument("--task", action="append", default=[], help="data spec of one task (repeatable): olmo:piqa, "
                    "bigbench:intent_recognition, olmo:mmlu/anatomy")  # fmt: skip
    pr.add_argument("--out", default="bench/results/probe", help="folder of the per-task JSON results")
    pr.add_argument("--report", metavar="FOLDER", help="print the markdown table of the results in FOLDER instead")
    pr.add_argument("--followed-up", metavar="FOLDER", help="with --report: the follow-up results to add")
    pr.add_argument("--follow-up", metavar="FOLDER", help="probe again, on --test-records fresh held-out records, "
                    "every task of FOLDER whose gain was suggestive (0.01 <= p < 0.1)")  # fmt: skip
    pr.add_argument("--checkpoint", default=None, help="model folder (default: the demo's warm-started model)")
    pr.add_argument("--steps", type=int, default=16, help="LoRA steps (every expert)")
    pr.add_argument("--lr", type=float, default=5e-3)
    pr.add_argument("--batch-size", type=int, default=8)
    pr.add_argument("--seq-len", type=int, default=128, help="training rows and scored records cut to this")
    pr.add_argument("--test-records", type=int, default=200, help="held-out records per task / subtask")
    pr.add_argument("--train-records", type=int, default=512)
    pr.set_defaults(func=cmd_probe)

    run = sub.add_parser("run", help="a federation from a config file (TOML or JSON)")
    run.add_argument("--config", required=True)
    run.add_argument("--resume", action="store_true", help="continue from the last complete round in state-dir")
    run.set_defaults(func=cmd_run)

    exp = sub.add_parser("experiment", help="time to accuracy: Flux vs the baselines (a config with [experiment])")
    exp.add_argument("--config", required=True)
    exp.add_argument("--resume", action="store_true", help="reuse finished methods, continue unfinished ones")
    exp.set_defaults(func=cmd_experiment)

    pl = sub.add_parser("plan", help="a client's memory plan: B_tune and B_non for a memory budget")
    pl.add_argument("--preset", default=None)
    pl.add_argument("--checkpoint", default=None, help="model folder (its config.json only is read)")
    pl.add_argument("--budget", required=True, help="client memory, e.g. 24GiB")
    pl.add_argument("--mode", choices=("lora", "full"), default="lora")
    pl.add_argument("--lora-rank", type=int, default=8)
    pl.add_argument("--dtype", default="bfloat16")
    pl.add_argument("--batch-size", type=int, default=1)
    pl.add_argument("--seq-len", type=int, default=1024)
    pl.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    pl.add_argument("--frozen-experts", choices=("dtype", "int4", "mxfp4"), default="dtype",
                    help="storage of merged experts and of LoRA's frozen base weights")  # fmt: skip
    pl.add_argument("--profile-bits", type=int, default=4, help="bits of the profiling copy, resident in the "
                    "profile phase only (checked to fit): 4, 8, 0 = full, -1 = none")  # fmt: skip
    pl.set_defaults(func=cmd_plan)

    for name, func, help_ in (
        ("profile", cmd_profile, "profile one client's data"),
        ("merge", cmd_merge, "merge the non-tuning experts and report the output error"),
        ("bench", cmd_bench, "time one client round by phase"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", default=None, help="run config file (model, data, budgets)")
        p.add_argument("--preset", default=None)
        p.add_argument("--data", default=None, help="synthetic | jsonl:PATH | bigbench:TASK,... | olmo:TASK,... (joined by +)")
        if name != "bench":
            p.add_argument("--bits", type=int, default=4, help="profiling precision: 4, 8, 0 = full")
        if name == "profile":
            p.add_argument("--out", default=None, help="write the profile (JSON)")
        if name == "merge":
            p.add_argument("--tune", type=int, default=2, help="tuning experts in total")
            p.add_argument("--merged", type=int, default=4, help="merged experts in total (B_non)")
        p.set_defaults(func=func)
    for p in sub.choices.values():
        p.add_argument("-v", "--verbose", action="store_true", help="Flower's logs and full tracebacks")
    return ap


def _user_errors() -> tuple:
    from flux_engine.budget import BudgetError
    from flux_engine.checkpoint.errors import CheckpointError
    from flux_engine.federated.config import ConfigError
    from flux_engine.federated.state import StateError

    # ValueError covers unknown presets and malformed data records (both name what is wrong).
    return (BudgetError, CheckpointError, ConfigError, StateError, ValueError, FileNotFoundError)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except RunFailed as e:
        print(f"flux-engine {args.command}: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except _user_errors() as e:
        if args.verbose:
            raise
        print(f"flux-engine {args.command}: error: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
