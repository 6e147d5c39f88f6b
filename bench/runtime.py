"""The results of the "MoE runtime" issue for the SmolLM2 MoE presets, written as markdown with their provenance.

    python bench/runtime.py                                   # everything, ~30-40 min on a 2-core CPU
    python bench/runtime.py --steps 10 --recipes split upcycle drop-upcycle --mc-models dense llama-moe

Measured here, with the library code of ``flux_engine.pretrain`` (corpus, recipes, ``prepare`` and its cache,
``measure``, ``split_report``/``oracle_routing``) and ``flux_engine.data`` (BIG-bench tasks, seeded splits,
``multiple_choice_accuracy``), on the CPU-sized ``-mini`` presets (5 MoE layers of 30):

- parameter counts, total and active per token (also of the full presets: computed from their configs);
- held-out perplexity of the dense model, of neuron splits (16 experts, oracle router, k experts kept), and of
  the MoE recipes (dense control, upcycle, Drop-Upcycle, Branch-Train-MiX, DeepSeek-style fine-grained) before
  and after continued pre-training;
- per MoE layer: expert weight cosine, expert output difference, routing entropy, load entropy, and the
  routing/domain mutual information (definitions: the ``flux_engine.pretrain`` docstring);
- multiple-choice accuracy of the prepared (continued-pre-trained) preset models and of dense SmolLM2 on a fixed
  seeded subset of each domain's test split.

The full presets (``smollm2-llama-moe``, ``smollm2-deepseek-moe``) need a GPU; their rows say "not measured".
The markdown is replaced atomically, only once every measurement is done; ``--json`` also keeps the raw numbers
and ``--render-only JSON`` re-renders them without measuring anything.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.util
import json
import math
import os
import random
import shlex
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from flux_engine import presets
from flux_engine.data import load_tasks, multiple_choice_accuracy, train_test_split
from flux_engine.fileio import atomic_write
from flux_engine.models.from_dense import from_dense
from flux_engine.models.moe import MoEForCausalLM
from flux_engine.pretrain import DOMAINS, Recipe, load_corpus, measure, prepare, set_trainable, split_report, train
from flux_engine.smollm2 import build_preset, load_smollm2_dense, load_tokenizer

REPO = Path(__file__).resolve().parent.parent


def _load_report_helpers():
    """bench/report.py (a script, not a package module): its device/commit/version helpers."""
    spec = importlib.util.spec_from_file_location("_bench_report", Path(__file__).resolve().parent / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report_helpers = _load_report_helpers()

MINI = {"llama-moe": "smollm2-llama-moe-mini", "deepseek-moe": "smollm2-deepseek-moe-mini"}
FULL = {"llama-moe": "smollm2-llama-moe", "deepseek-moe": "smollm2-deepseek-moe"}
RECIPES = ("split", "dense-control", "upcycle", "drop-upcycle", "btx", "deepseek")
MC_MODELS = ("dense", "dense-control", "llama-moe", "deepseek-moe")
MC_DOMAINS = ("vitaminc_fact_verification", "goal_step_wikihow", "social_iqa", "winowhy")
STAT_KEYS = ("weight_cosine", "output_difference", "route_entropy", "load_entropy", "domain_mi")
PHASES = ("step0", "branched", "trained")


def log(msg: str) -> None:
    print(f"[runtime {datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ provenance


def git_state() -> Dict[str, Any]:
    """The commit string of bench/report.py plus what is uncommitted (tracked changes; this script's status)."""
    with contextlib.chdir(REPO):
        commit = report_helpers._commit()
        try:
            status = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            status = ""
    changed = [line[3:] for line in status.splitlines() if line[:2] != "??"]
    untracked = [line[3:] for line in status.splitlines() if line[:2] == "??"]
    script = "bench/runtime.py"
    script_state = "untracked (not in the commit)" if script in untracked else (
        "modified (differs from the commit)" if script in changed else "as committed")
    return {"commit": commit, "modified_tracked": changed, "script": script_state}


def provenance(argv: Sequence[str]) -> Dict[str, Any]:
    import transformers

    env = getattr(report_helpers, "_RELEVANT_ENV", ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES"))
    command = " ".join([f"{k}={shlex.quote(os.environ[k])}" for k in env if k in os.environ]
                       + [shlex.quote(a) for a in ["python", "bench/runtime.py", *argv]])
    return {
        "device": report_helpers._device(),
        **git_state(),
        **report_helpers._versions(),
        "transformers": transformers.__version__,
        "command": command,
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
    }


class LoadMonitor:
    """The 1-minute load average, sampled every ``every`` seconds in a daemon thread: on a shared machine the
    times in the results mean little when other jobs ran beside this one."""

    def __init__(self, every: float = 15.0):
        self.samples: List[float] = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> Dict[str, float]:
        self._stop.set()
        self.samples.append(os.getloadavg()[0])
        return {"start": self.samples[0], "max": max(self.samples), "mean": sum(self.samples) / len(self.samples),
                "end": self.samples[-1], "cores": os.cpu_count()}


# -------------------------------------------------------------------------------------------------- counts


def parameter_counts(config) -> Dict[str, int]:
    """Total parameters (tied embeddings once) and those a token uses: all but the ``E - k`` routed experts a
    token skips in each MoE layer (routers, shared experts, attention, embeddings included). Built on the meta
    device, so no weights are needed."""
    with torch.device("meta"):
        model = MoEForCausalLM(config)
    total = model.num_parameters()
    inactive = 0
    for mlp in model.moe_layers():
        e = mlp.experts
        per_expert = e.gate_up_proj[0].numel() + e.down_proj[0].numel()
        inactive += (e.num_physical - config.num_experts_per_tok) * per_expert
    embed = model.model.embed_tokens.weight.numel()
    return {"total": total, "active": total - inactive, "embedding": embed}


# ----------------------------------------------------------------------------------------------- measuring


def heldout_tokens(corpus) -> int:
    return sum(rows.numel() - rows.shape[0] for rows in corpus.heldout.values())


def slim(m: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """A ``measure`` result as JSON-ready data (layer keys as strings)."""
    if m is None:
        return None
    out = {"perplexity": m["perplexity"], "tokens": m["tokens"]}
    if "layers" in m:
        out["mean"] = m["mean"]
        out["layers"] = {str(k): v for k, v in m["layers"].items()}
    return out


def run_recipe(recipe: Recipe, corpus, label: str) -> Dict[str, Any]:
    """``prepare`` the recipe (cached or trained now) and collect its measurements on ``corpus``. A cached model
    whose report was measured on another held-out set is measured again (step 0: the preset rebuilt)."""
    cached = recipe.cache_folder().is_dir()
    log(f"{label}: {'loading cached' if cached else 'preparing'} {recipe}")
    start = time.time()
    model, report = prepare(recipe, corpus)
    seconds = time.time() - start
    tokens = heldout_tokens(corpus)
    phases = {p: report.get(p) for p in PHASES}
    remeasured = False
    if any(m is not None and m["tokens"] != tokens for m in phases.values()):
        log(f"{label}: cached report measured on {report['step0']['tokens']} tokens, not {tokens}: measuring again")
        remeasured = True
        phases["trained"] = measure(model, corpus) if recipe.steps else None
        fresh, _ = build_preset(recipe.preset, seed=recipe.seed, noise=recipe.noise, drop_fraction=recipe.drop_fraction)
        phases["step0"] = measure(fresh, corpus)
        phases["branched"] = None  # the branched state is not kept
        del fresh
    losses = report.get("losses") or []
    result = {
        "label": label,
        "recipe": dataclasses.asdict(recipe),
        "cached": cached,
        "remeasured": remeasured,
        "seconds": seconds,
        "loss_first5": sum(losses[:5]) / len(losses[:5]) if losses else None,
        "loss_last5": sum(losses[-5:]) / len(losses[-5:]) if losses else None,
        "num_experts": model.config.num_experts,
        **{p: slim(m) for p, m in phases.items()},
    }
    return {"result": result, "model": model}


def run_dense_control(dense: MoEForCausalLM, corpus, recipe: Recipe) -> Dict[str, Any]:
    """The dense model trained like the MoE recipes: the same FFN layers (as 1-expert MoE layers, equal to the
    dense FFNs), data, batches, steps and learning rate."""
    log(f"dense control: {recipe.steps} steps")
    start = time.time()
    moe_layers = presets.get(recipe.preset).moe_layers
    model = from_dense(dense.state_dict(), dense.config, 1, 1, moe_layers=moe_layers, seed=recipe.seed)
    before = measure(model, corpus)["perplexity"]
    gen = torch.Generator().manual_seed(recipe.seed)  # the generator prepare() draws its mix batches from
    params = set_trainable(model, recipe.train)
    losses = train(model, corpus.train, recipe.steps, params, recipe, gen, "dense control")
    after = measure(model, corpus)["perplexity"] if recipe.steps else None
    result = {
        "label": "dense control",
        "recipe": dataclasses.asdict(recipe),
        "seconds": time.time() - start,
        "loss_first5": sum(losses[:5]) / len(losses[:5]) if losses else None,
        "loss_last5": sum(losses[-5:]) / len(losses[-5:]) if losses else None,
        "step0": {"perplexity": before},
        "trained": {"perplexity": after} if after is not None else None,
        "trainable": sum(p.numel() for p in params),
    }
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return {"result": result, "model": model}


def mc_records(domains: Sequence[str], n: int, seed: int) -> Dict[str, List[Any]]:
    """``n`` records per domain drawn (seeded) from the test part of ``train_test_split(test_size=0.2, seed=0)``,
    the split the continued pre-training learns from the train part of; checked disjoint from that train part."""
    pretrain_train, _ = train_test_split(load_tasks(list(DOMAINS)), test_size=0.2, seed=0)
    seen = {r.id for r in pretrain_train}
    out = {}
    for d in domains:
        _, test = train_test_split(load_tasks([d]), test_size=0.2, seed=0)
        test = [r for r in test if r.is_multiple_choice]
        if not test:
            raise ValueError(f"domain {d!r} has no multiple-choice records")
        picked = random.Random(f"runtime-mc:{seed}:{d}").sample(test, min(n, len(test)))
        leaked = [r.id for r in picked if r.id in seen]
        if leaked:
            raise RuntimeError(f"{len(leaked)} evaluation records of {d} are in the pre-training train split: {leaked[:3]}")
        out[d] = picked
    return out


def run_mc(model, tokenizer, records: Dict[str, List[Any]], args, label: str) -> Dict[str, Any]:
    log(f"MC accuracy: {label}")
    start = time.time()
    acc = {d: multiple_choice_accuracy(model, tokenizer, recs, batch_size=args.mc_batch_size, normalize=args.mc_normalize)
           for d, recs in records.items()}
    return {"accuracy": acc, "mean": sum(acc.values()) / len(acc), "seconds": time.time() - start}


# --------------------------------------------------------------------------------------------------- notes


def _close(a: float, b: float, rel: float = 1e-4) -> bool:
    return abs(a - b) <= rel * abs(b)


def anomalies(data: Dict[str, Any]) -> List[str]:
    """Plain statements of what the numbers show that is unexpected or a limitation (derived from the data)."""
    notes = []
    dense = data.get("dense_perplexity")
    split = data.get("split")
    if split and dense is not None:
        full = split["ppl"].get(str(split["num_experts"]))
        if full is not None and not _close(full, dense):
            notes.append(f"Neuron split with all {split['num_experts']} experts: perplexity {full:.3f}, not the dense {dense:.3f}.")
        worst = {k: v for k, v in split["ppl"].items() if int(k) < split["num_experts"]}
        if worst:
            notes.append("Neuron split without training is lossy even with the oracle router: perplexity "
                         + ", ".join(f"{v:.1f} at k={k}" for k, v in worst.items()) + f" vs dense {dense:.2f}.")
    control = data["recipes"].get("dense-control")
    control_ppl = control["trained"]["perplexity"] if control and control.get("trained") else None
    for name, r in data["recipes"].items():
        if name == "dense-control":
            if dense is not None and not _close(r["step0"]["perplexity"], dense):
                notes.append(f"Dense control at step 0: perplexity {r['step0']['perplexity']:.3f}, not the dense {dense:.3f}.")
            continue
        label, s0, tr = r["label"], r.get("step0"), r.get("trained")
        if s0 and dense is not None and r["recipe"]["drop_fraction"] in (0.0, None) and r["recipe"]["noise"] == 0 \
                and not _close(s0["perplexity"], dense):
            notes.append(f"{label}: step-0 perplexity {s0['perplexity']:.3f} differs from the dense {dense:.3f} "
                         "(the construction should equal the dense model).")
        if s0 and tr and tr["perplexity"] > s0["perplexity"]:
            notes.append(f"{label}: perplexity REGRESSED with continued pre-training ({s0['perplexity']:.2f} -> {tr['perplexity']:.2f}).")
        if tr and control_ppl is not None and tr["perplexity"] > control_ppl:
            notes.append(f"{label}: after training, perplexity {tr['perplexity']:.2f} is worse than the dense control's "
                         f"{control_ppl:.2f} (same data and steps, a fraction of the trainable parameters).")
        if s0 and tr and "mean" in tr:
            E = r["num_experts"]
            m0, m1 = s0["mean"], tr["mean"]
            if m1["route_entropy"] > 0.99 * math.log2(E):
                notes.append(f"{label}: routers stay near uniform: mean routing entropy {m0['route_entropy']:.4f} -> "
                             f"{m1['route_entropy']:.4f} bits (log2 {E} = {math.log2(E):.3f}); the top-k choices rest "
                             "on small logit differences.")
            if abs(m1["domain_mi"] - m0["domain_mi"]) < 0.05 and m1["domain_mi"] < 0.1:
                notes.append(f"{label}: routing barely depends on the domain: I(domain; expert) {m0['domain_mi']:.3f} -> "
                             f"{m1['domain_mi']:.3f} bits (at most 2 bits for 4 domains).")
            if m0["weight_cosine"] > 0.5 and abs(m1["weight_cosine"] - m0["weight_cosine"]) < 1e-3:
                notes.append(f"{label}: expert weights barely move: mean pairwise cosine {m0['weight_cosine']:.5f} -> "
                             f"{m1['weight_cosine']:.5f}.")
            if m1["output_difference"] < 0.2:
                notes.append(f"{label}: experts stay close to copies after training: mean output difference "
                             f"{m1['output_difference']:.3f}.")
        if r.get("remeasured"):
            notes.append(f"{label}: the cached model was measured again on this held-out set; its after-branching "
                         "state is not kept, so that column is empty.")
    mc = data.get("mc")
    if mc:
        chance = mc["chance"]
        for model, res in mc["models"].items():
            low = [d for d, a in res["accuracy"].items() if a <= chance[d] + 1e-9]
            if low:
                notes.append(f"MC accuracy of {model} is at or below chance on " + ", ".join(
                    f"{d} ({res['accuracy'][d]:.3f} vs {chance[d]:.3f})" for d in low) + ".")
    return notes


# -------------------------------------------------------------------------------------------------- render


def _f(x: Optional[float], fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def _m(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def render(data: Dict[str, Any]) -> str:
    h, a = data["header"], data["args"]
    L: List[str] = ["# MoE runtime: SmolLM2 MoE presets", ""]
    L += [f"- device: {h['device']}"]
    commit = h["commit"]
    if h["modified_tracked"]:
        commit += "; modified tracked files: " + ", ".join(h["modified_tracked"])
    L += [f"- commit: {commit}", f"- bench/runtime.py: {h['script']}"]
    L += [f"- python {h['python']}, torch {h['torch']}, transformers {h['transformers']}, triton {h['triton']}"]
    L += [f"- command: `{h['command']}`", f"- date: {h['date']}; runtime {data['runtime_s'] / 60:.1f} min"]
    if data.get("load"):
        ld = data["load"]
        cores = ld.get("cores") or os.cpu_count() or 1
        L += [f"- CPU load during the run (1-min load average, {cores} cores): start {ld['start']:.1f}, mean "
              f"{ld['mean']:.1f}, max {ld['max']:.1f}, end {ld['end']:.1f}"
              + (" -- more runnable threads than cores: other jobs shared the cores, so the times here are inflated"
                 if ld["mean"] > cores + 0.5 else "")]
    if data.get("rendered_by"):
        L += [f"- markdown rendered again from the raw results by: `{data['rendered_by']}`"]
    c = data["corpus"]
    L += [
        f"- corpus (`flux_engine.pretrain.load_corpus`): BIG-bench {', '.join(c['domains'])}; `context + answer` packed "
        f"into rows of {c['seq_len']} tokens; `train_test_split(test_size=0.2, seed=0)`, at most {c['max_records']} "
        f"records per domain; train rows per domain: " + ", ".join(f"{d} {n}" for d, n in c["train_rows"].items()),
        f"- perplexity and expert/routing statistics (`flux_engine.pretrain.measure`): the first {c['heldout_rows']} "
        f"held-out rows of each domain's test part ({c['heldout_tokens']} predicted tokens); expert outputs "
        f"compared on {c['max_tokens']} of those tokens per layer",
        f"- continued pre-training (`flux_engine.pretrain.Recipe`): {a['steps']} steps on the domain mix, batch "
        f"{c['batch_size']} x {c['seq_len']} tokens, AdamW lr {c['lr']}, experts and routers trained (`train=\"moe\"`), "
        f"load-balancing loss at the preset's weight (0.01), seed {a['seed']}; Branch-Train-MiX: {a['branch_steps']} "
        "steps per expert on one domain first",
    ]
    if data.get("mc"):
        mc = data["mc"]
        L += [f"- multiple choice (`flux_engine.data.multiple_choice_accuracy`, normalize=\"{a['mc_normalize']}\"): "
              f"{mc['records_per_domain']} records per domain drawn (seeded, `random.Random(\"runtime-mc:{a['seed']}:<domain>\")`) "
              "from the test part of `train_test_split(test_size=0.2, seed=0)`; checked disjoint from the "
              "pre-training train part"]

    # Parameters.
    L += ["", "## Parameters", "",
          "Active per token: everything but the routed experts a token skips (E - k per MoE layer); the tied "
          "embedding (counted once) and routers included. Counts come from the preset configs.", "",
          "| model | MoE layers | experts (k of E) | total | active per token | total w/o embedding |",
          "| --- | --- | --- | --- | --- | --- |"]
    for name, p in data["params"].items():
        L.append(f"| {name} | {p['moe_layers']} | {p['experts']} | {_m(p['total'])} | {_m(p['active'])} | "
                 f"{_m(p['total'] - p['embedding'])} |")

    # Perplexity.
    dense = data.get("dense_perplexity")
    L += ["", "## Held-out perplexity", "",
          f"Mini MoE layers {data['mini_layers']}. \"after\": after {a['steps']} steps of continued pre-training "
          "(the dense control: the dense model's FFNs of those layers trained the same way). Train time: wall "
          "clock of `prepare` (\"cached\": loaded from the cache, trained earlier with the same recipe).", "",
          "| model | construction | step 0 | after branching | after training | vs dense control after training "
          "| train loss first/last 5 steps (incl. 0.01 x aux) | time |",
          "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    if dense is not None:
        L.append(f"| SmolLM2-135M-Instruct (dense) | - | {dense:.2f} | - | - | - | - | - |")
    split = data.get("split")
    if split:
        for k, v in split["ppl"].items():
            L.append(f"| neuron split, {split['num_experts']} experts, oracle top-{k} | `from_dense(method=\"split\")`, "
                     f"random groups, unit weights | {v:.2f} | - | not measured (no training recipe for splits) | - | - | - |")
    descriptions = {
        "dense-control": "1-expert MoE layers = the dense FFNs",
        "upcycle": "8 full copies, top-2, drop 0",
        "drop-upcycle": "8 copies, top-2, Drop-Upcycling",
        "btx": "8 copies (drop 0), top-2, Branch-Train-MiX",
        "deepseek": "shared FFN + 16 quarter-width experts (zero down proj.), top-4",
    }
    control = data["recipes"].get("dense-control")
    control_ppl = control["trained"]["perplexity"] if control and control.get("trained") else None
    for name, r in data["recipes"].items():
        rec = r["recipe"]
        desc = descriptions.get(name, "")
        if name == "drop-upcycle":
            desc += f" {rec['drop_fraction']} (preset default)"
        when = "cached" if r.get("cached") else f"{r['seconds'] / 60:.1f} min"
        losses = f"{_f(r['loss_first5'], '.3f')} / {_f(r['loss_last5'], '.3f')}"
        br = r.get("branched")
        tr = r.get("trained")
        vs = (f"{100 * (tr['perplexity'] / control_ppl - 1):+.1f}%" if tr and control_ppl and name != "dense-control"
              else "-")
        L.append(f"| {r['label']} | {desc} | {r['step0']['perplexity']:.2f} | {_f(br['perplexity']) if br else '-'} | "
                 f"{_f(tr['perplexity']) if tr else '-'} | {vs} | {losses} | {when} |")
    for full in FULL.values():
        L.append(f"| {full} | full preset (15 MoE layers) | not measured (needs an H100; no GPU here) | - | not measured | - | - | - |")

    # Per-layer statistics.
    L += ["", "## Expert similarity and routing, per MoE layer", "",
          "weight cos: mean pairwise cosine of the experts' flattened weights (1 = copies); out diff: mean pairwise "
          "|y_a - y_b| / mean(|y_a|, |y_b|) of expert outputs on held-out tokens (0 = copies); route H: mean per-token "
          "entropy of the router softmax (bits; log2 E = undecided); load H: entropy of the expert choice frequencies "
          "(log2 E = balanced); MI: I(domain; chosen expert), bits (0 = routing ignores the domain, at most 2).", ""]
    for name, r in data["recipes"].items():
        if name == "dense-control" or not (r.get("step0") or {}).get("layers"):
            continue
        E = r["num_experts"]
        L += [f"### {r['label']} (E = {E}, log2 E = {math.log2(E):.3f})", "",
              "| layer | phase | weight cos | out diff | route H | load H | MI |", "| --- | --- | --- | --- | --- | --- | --- |"]
        phases = [p for p in PHASES if r.get(p) and r[p].get("layers")]
        for layer in list(r["step0"]["layers"]) + ["mean"]:
            for p in phases:
                s = r[p]["mean"] if layer == "mean" else r[p]["layers"][layer]
                name_p = {"step0": "step 0", "branched": "branched", "trained": f"after {a['steps']} steps"}[p]
                cells = " | ".join(f"{s[k]:.4f}" for k in STAT_KEYS)
                L.append(f"| {'**mean**' if layer == 'mean' else layer} | {name_p} | {cells} |")
        L.append("")
    for full in FULL.values():
        L.append(f"{full}: not measured (needs an H100; no GPU here).")

    # Multiple choice.
    mc = data.get("mc")
    if mc:
        domains = list(mc["chance"])
        L += ["", "## Multiple-choice accuracy", "",
              f"{mc['records_per_domain']} test records per domain (fewer where the test part is smaller: "
              + ", ".join(f"{d} {n}" for d, n in mc["counts"].items()) + "). Chance: mean of 1/(number of choices). "
              f"{', '.join(d for d in domains if d not in DOMAINS) or 'No domain'} was not in the continued pre-training "
              "mix; the other domains' train parts were.", "",
              "| model | " + " | ".join(domains) + " | mean | time |", "| --- |" + " --- |" * (len(domains) + 2)]
        L.append("| chance | " + " | ".join(f"{mc['chance'][d]:.3f}" for d in domains)
                 + f" | {sum(mc['chance'].values()) / len(domains):.3f} | - |")
        for model, res in mc["models"].items():
            L.append(f"| {model} | " + " | ".join(f"{res['accuracy'][d]:.3f}" for d in domains)
                     + f" | {res['mean']:.3f} | {res['seconds'] / 60:.1f} min |")
        for full in FULL.values():
            L.append(f"| {full} | " + " | ".join("not measured" for _ in domains) + " | - | - |")

    L += ["", "## Notes", ""]
    notes = data.get("notes") or []
    notes = notes + list(data.get("extra_notes") or [])
    L += [f"- {n}" for n in notes] if notes else ["- none"]
    return "\n".join(L) + "\n"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(text))


# ---------------------------------------------------------------------------------------------------- main


def collect(args, argv: Sequence[str]) -> Dict[str, Any]:
    start = time.time()
    load = LoadMonitor()
    header = provenance(argv)
    mini = MINI["llama-moe"]
    base = Recipe(preset=mini, steps=args.steps, seed=args.seed)
    tokenizer = load_tokenizer()
    log(f"corpus: {args.heldout_rows} held-out rows of {base.seq_len} tokens per domain")
    corpus = load_corpus(tokenizer, base.seq_len, heldout_rows=args.heldout_rows)
    data: Dict[str, Any] = {
        "header": header,
        "args": vars(args),
        "mini_layers": presets.get(mini).moe_layers,
        "corpus": {
            "domains": list(corpus.train), "seq_len": base.seq_len, "heldout_rows": args.heldout_rows,
            "heldout_tokens": heldout_tokens(corpus), "max_tokens": 512, "max_records": 4000,
            "train_rows": {d: len(r) for d, r in corpus.train.items()}, "batch_size": base.batch_size, "lr": base.lr,
        },
        "recipes": {},
    }

    dense, _ = load_smollm2_dense()
    data["params"] = {"SmolLM2-135M-Instruct (dense)": {**parameter_counts(dense.config), "moe_layers": 0, "experts": "-"}}
    for name in [*MINI.values(), *FULL.values()]:
        cfg = presets.get(name)
        data["params"][name] = {**parameter_counts(cfg), "moe_layers": len(cfg.moe_layers),
                                "experts": f"{cfg.num_experts_per_tok} of {cfg.num_experts}"
                                + (" + shared" if cfg.shared_expert_intermediate_size else "")}

    mc_recs = None
    if args.mc_models:
        mc_recs = mc_records(args.mc_domains, args.mc_records, args.seed)
        data["mc"] = {
            "records_per_domain": args.mc_records,
            "counts": {d: len(r) for d, r in mc_recs.items()},
            "chance": {d: sum(1 / len(r.choices) for r in recs) / len(recs) for d, recs in mc_recs.items()},
            "models": {},
        }

    def mc(model, key: str, label: str) -> None:
        if mc_recs is not None and key in args.mc_models:
            data["mc"]["models"][label] = run_mc(model, tokenizer, mc_recs, args, label)

    if "split" in args.recipes:
        log(f"neuron split: {args.split_experts} experts, oracle top-k {args.split_ks}")
        t = time.time()
        rep = split_report(mini, args.split_experts, args.split_ks, corpus, seed=args.seed)
        data["dense_perplexity"] = rep["dense"]
        data["split"] = {"num_experts": args.split_experts, "ppl": {str(k): v for k, v in rep["split"].items()},
                         "seconds": time.time() - t}
    else:
        data["dense_perplexity"] = measure(dense, corpus)["perplexity"]
    mc(dense, "dense", "SmolLM2-135M-Instruct (dense)")

    if "dense-control" in args.recipes or "dense-control" in args.mc_models:
        out = run_dense_control(dense, corpus, base)
        data["recipes"]["dense-control"] = out["result"]
        mc(out["model"], "dense-control", f"dense control ({args.steps} steps)")
        del out
        gc.collect()

    drop = presets.get(mini).metadata["drop_fraction"]
    recipes = {
        "upcycle": ("upcycle (drop 0)", dataclasses.replace(base, drop_fraction=0.0)),
        "drop-upcycle": (f"Drop-Upcycle {drop}", dataclasses.replace(base, drop_fraction=drop)),
        "btx": ("Branch-Train-MiX", dataclasses.replace(base, drop_fraction=0.0, branch_steps=args.branch_steps)),
        "deepseek": (MINI["deepseek-moe"], dataclasses.replace(base, preset=MINI["deepseek-moe"])),
    }
    # The MC models are the preset recipes: prepared even when their perplexity rows are not asked for.
    mc_of = {"drop-upcycle": ("llama-moe", f"{mini} (Drop-Upcycle {drop}, {args.steps} steps)"),
             "deepseek": ("deepseek-moe", f"{MINI['deepseek-moe']} ({args.steps} steps)")}
    for name, (label, recipe) in recipes.items():
        wanted_mc = name in mc_of and mc_of[name][0] in args.mc_models
        if name not in args.recipes and not wanted_mc:
            continue
        out = run_recipe(recipe, corpus, label)
        if name in args.recipes:
            data["recipes"][name] = out["result"]
        if wanted_mc:
            mc(out["model"], mc_of[name][0], mc_of[name][1])
        del out
        gc.collect()

    data["runtime_s"] = time.time() - start
    data["load"] = load.stop()
    data["notes"] = anomalies(data)
    return data


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "runtime.md")
    p.add_argument("--steps", type=int, default=30, help="continued pre-training steps on the domain mix")
    p.add_argument("--branch-steps", type=int, default=6, help="Branch-Train-MiX: steps per expert on its domain")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recipes", nargs="*", choices=RECIPES, default=list(RECIPES))
    p.add_argument("--heldout-rows", type=int, default=16, help="held-out rows per domain for perplexity/statistics")
    p.add_argument("--split-experts", type=int, default=16)
    p.add_argument("--split-ks", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--mc-models", nargs="*", choices=MC_MODELS, default=["dense", "llama-moe", "deepseek-moe"])
    p.add_argument("--mc-domains", nargs="+", default=list(MC_DOMAINS))
    p.add_argument("--mc-records", type=int, default=200, help="records per domain")
    p.add_argument("--mc-normalize", choices=("sum", "mean"), default="mean")
    p.add_argument("--mc-batch-size", type=int, default=16)
    p.add_argument("--json", type=Path, help="also write the raw results here")
    p.add_argument("--render-only", type=Path, metavar="JSON", help="re-render the markdown from a --json file")
    p.add_argument("--note", action="append", default=[], help="a sentence for the notes section (repeatable)")
    args = p.parse_args(argv)
    if args.render_only:
        data = json.loads(args.render_only.read_text())
        data["notes"] = anomalies(data)
        data["extra_notes"] = list(data.get("extra_notes") or []) + args.note
        data["rendered_by"] = " ".join(shlex.quote(a) for a in ["python", "bench/runtime.py", *argv])
    else:
        data = collect(args, argv)
        data["extra_notes"] = args.note
        data["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in data["args"].items()}
        if args.json:
            write_atomic(args.json, json.dumps(data, indent=1))
    write_atomic(args.out, render(data))
    log(f"wrote {args.out} ({data['runtime_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
