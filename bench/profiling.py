"""Low-bit profiling vs full precision: profile agreement and peak memory, written as markdown with provenance.

    python bench/profiling.py bench/results/profiling.md [--presets tiny smollm2-llama-moe-mini] [--per-domain 16]
    python bench/profiling.py bench/results/profiling.md --render-only   # rewrite the markdown from the .json

For each preset: save the model as a checkpoint folder, profile it at full precision and in each of ``FORMATS``:
routed experts at int4 (group 128 symmetric, group 64 asymmetric) or int8 (per-channel), the dense weights
(attention, dense and shared-expert MLPs, embedding, LM head) at int8 (the default), at int4 too, or kept in full
precision (``dense_bits=None``: experts only), and compare each with the full-precision profile (top-k Jaccard,
relative L1 frequency error, Spearman rank correlation of frequencies and of attention importance). Peak memory:
the peak RSS and peak anonymous RSS of a fresh subprocess that (a) loads the checkpoint and runs one
full-precision forward over the same batches, (b) profiles the checkpoint folder at int4 (streamed) in each
``MEMORY_MODES`` format, (c) only imports torch + flux_engine (baseline); the size of the profiling copy
(``prepare(...).nbytes()``) with it.
``tiny``: random token batches (4 "domains" of random sequences). SmolLM2 presets: records of 4 BIG-bench domains
(``flux_engine.pretrain.DOMAINS``), one record per row (unpacked), sample id = record id.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from typing import Dict, List, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import _commit, _device, _versions  # noqa: E402

# (label, bits, group size, symmetric, dense_bits)
FORMATS = [
    ("int4 g128 sym experts, int8 dense (default)", 4, 128, True, 8),
    ("int8 per-channel sym, whole model", 8, None, True, 8),
    ("int4 g128 sym, whole model", 4, 128, True, 4),
    ("int4 g64 asym, whole model", 4, 64, False, 4),
    ("int4 g128 sym, experts only", 4, 128, True, None),
    ("int8 per-channel sym, experts only", 8, None, True, None),
]
# memory mode: (description, dense_bits of an int4 g128 profile; None for the non-profiling modes)
MEMORY_MODES = (
    ("baseline", "imports only"),
    ("full-forward", "load_pretrained + fp32 forward"),
    ("profile-int4", "profile(folder, bits=4) (streamed; experts int4, dense weights int8: the default)"),
    ("profile-int4-all", "profile(folder, bits=4, dense_bits=4) (streamed, whole model int4)"),
    ("profile-int4-experts", "profile(folder, bits=4, dense_bits=None) (streamed, int4 experts only)"),
)
PROFILE_DENSE_BITS = {"profile-int4": 8, "profile-int4-all": 4, "profile-int4-experts": None}


def _model_and_batches(preset: str, per_domain: int, seq_len: int, batch_size: int):
    from flux_engine import presets
    from flux_engine.models import MoEForCausalLM

    if preset == "tiny":
        torch.manual_seed(0)
        model = MoEForCausalLM(presets.get("tiny")).eval()
        g = torch.Generator().manual_seed(1)
        n = 4 * per_domain
        ids = torch.randint(0, 256, (n, seq_len), generator=g)
        batches = [
            {"input_ids": ids[i : i + batch_size], "sample_ids": [f"rand/{j}" for j in range(i, min(n, i + batch_size))]}
            for i in range(0, n, batch_size)
        ]
        return model, batches, f"{n} random sequences x {seq_len} tokens"
    import numpy as np

    from flux_engine.data import lm_batches, load_tasks
    from flux_engine.pretrain import DOMAINS
    from flux_engine.smollm2 import build_preset

    model, tok = build_preset(preset)
    model = model.eval()
    records = []
    for domain in DOMAINS:
        records += load_tasks([domain])[:per_domain]
    order = np.random.default_rng(0).permutation(len(records))  # lm_batches' row order with packed=False, seed 0
    batches = []
    for b, batch in enumerate(lm_batches(records, tok, seq_len, batch_size, seed=0, packed=False)):
        rows = order[b * batch_size : b * batch_size + batch["input_ids"].shape[0]]
        batch["sample_ids"] = [records[i].id for i in rows]
        batches.append(batch)
    return model, batches, f"{len(records)} BIG-bench records ({per_domain} per domain: {', '.join(DOMAINS)}), <= {seq_len} tokens each"


def _peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM: per address space, so unlike ru_maxrss not inherited from the parent)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _AnonPeak:
    """Peak anonymous RSS (RssAnon, sampled every 5 ms): excludes the checkpoint's mmap'd file pages, which
    safetensors maps and VmHWM counts."""

    def __init__(self):
        import threading

        self.peak, self._stop = 0.0, False
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _read(self) -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def _poll(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, self._read())
            time.sleep(0.005)

    def stop(self) -> float:
        self._stop = True
        self._thread.join()
        return max(self.peak, self._read())


def _memory_child(mode: str, folder: str, batches_path: str) -> None:
    """Runs in a fresh process; prints its peak RSS and peak anonymous RSS in MiB."""
    anon = _AnonPeak()
    import flux_engine.profiling as prof
    from flux_engine.checkpoint import load_pretrained

    batches = torch.load(batches_path)
    out = {}
    if mode == "full-forward":
        model = load_pretrained(folder)
        with torch.no_grad():
            for b in batches:
                model(b["input_ids"], attention_mask=b.get("attention_mask"))
    elif mode in PROFILE_DENSE_BITS:
        # = prof.profile(folder, batches, bits=4, group_size=128, dense_bits=...), split to report the copy's size
        dense_bits = PROFILE_DENSE_BITS[mode]
        low = prof.prepare(folder, 4, 128, dense_bits=dense_bits)
        out["copy_mib"] = low.nbytes() / 2**20
        prof._run(low, batches, prof._meta(4, 128, True, dense_bits))
    print(json.dumps({"peak_rss_mib": _peak_rss_mib(), "peak_anon_mib": anon.stop(), **out}))


def _memory(mode: str, folder: str, batches_path: str) -> Dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", mode, folder, batches_path], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_preset(preset: str, per_domain: int, seq_len: int, batch_size: int) -> Tuple[List[str], Dict]:
    import flux_engine.profiling as prof
    from flux_engine import save_pretrained

    model, batches, data_desc = _model_and_batches(preset, per_domain, seq_len, batch_size)
    cfg = model.config
    lines = [f"## {preset}", "", f"- data: {data_desc}", f"- MoE layers {cfg.moe_layers or 'all'}, "
             f"{cfg.num_experts} experts, top-{cfg.num_experts_per_tok}, H={cfg.hidden_size}, I={cfg.moe_intermediate_size}"]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "ck")
        save_pretrained(model, folder)
        t0 = time.perf_counter()
        full = prof.profile(folder, batches, bits=None)
        times = {"full precision": time.perf_counter() - t0}
        rows, results = [], {}
        for name, bits, group, sym, dense in FORMATS:
            t0 = time.perf_counter()
            p = prof.profile(folder, batches, bits=bits, group_size=group, symmetric=sym, dense_bits=dense)
            times[name] = time.perf_counter() - t0
            c = prof.compare(p, full)
            results[name] = c
            m = c["mean"]
            worst = max(row["freq_error"] for row in c["layers"])
            rows.append(
                f"| {name} | {m['jaccard']:.3f} | {100 * m['freq_error']:.2f}% (max {100 * worst:.2f}%) | "
                f"{m['spearman']:.3f} | {m['importance_spearman']:.3f} | {times[name]:.1f} s |"
            )
        lines += [f"- tokens profiled: {full.num_tokens}; full-precision profile {times['full precision']:.1f} s", "",
                  f"Agreement with the full-precision profile (mean over MoE layers; top-k Jaccard with k = {results[FORMATS[0][0]]['k']}):", "",
                  "| format | top-k Jaccard | frequency rel. L1 error | Spearman (freq) | Spearman (importance) | wall time (shared 2-core CPU) |",
                  "| --- | --- | --- | --- | --- | --- |", *rows]  # fmt: skip
        batches_path = os.path.join(tmp, "batches.pt")
        torch.save(batches, batches_path)
        del model
        mem = {mode: _memory(mode, folder, batches_path) for mode, _ in MEMORY_MODES}
        ck_mib = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) / 2**20
    lines += ["", f"Peak memory of a fresh process (checkpoint {ck_mib:.1f} MiB on disk, fp32). RSS (VmHWM) includes the "
              "checkpoint's mmap'd file pages; anonymous RSS (RssAnon, sampled every 5 ms) is the process's own memory:", "",
              "| run | peak RSS | peak anonymous RSS | anonymous above baseline | profiling copy (`nbytes()`) |",
              "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for mode, label in MEMORY_MODES:
        m, base = mem[mode], mem["baseline"]["peak_anon_mib"]
        copy = f"{m['copy_mib']:.1f} MiB" if "copy_mib" in m else "-"
        lines.append(f"| {label} | {m['peak_rss_mib']:.0f} MiB | {m['peak_anon_mib']:.0f} MiB | "
                     f"{m['peak_anon_mib'] - base:.0f} MiB | {copy} |")  # fmt: skip
    return lines, {"compare": results, "memory_mib": mem, "times_s": times, "checkpoint_mib": ck_mib, "markdown": lines}


def _commit_detail() -> str:
    """HEAD plus the tracked files that differ from it (the code measured may not be committed yet)."""
    head = _commit().split(" ")[0]
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout
    except OSError:
        return _commit()
    files = sorted(line[3:].strip() for line in out.splitlines() if line.strip())
    return head + (f" + uncommitted changes to {', '.join(files)}" if files else "")


def _render(header: Dict, raw: Dict) -> List[str]:
    lines = ["# Low-bit expert profiling vs full precision", ""] + [f"- {k}: {v}" for k, v in header.items()]
    lines += ["- GPU rows: not measured (CPU-only machine; kernels tested under TRITON_INTERPRET=1)",
              "- profiles use the default CPU tiers (reference: dequantise per layer, then grouped MLP; quantized "
              "dense linears dequantise one weight at a time just before use)", ""]  # fmt: skip
    for section in raw.values():
        lines += [""] + section["markdown"]
    return lines


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
        mode, folder, batches_path = sys.argv[2:5]
        if mode == "baseline":
            import flux_engine.profiling  # noqa: F401
            import flux_engine.checkpoint  # noqa: F401

            anon = _AnonPeak()
            print(json.dumps({"peak_rss_mib": _peak_rss_mib(), "peak_anon_mib": anon.stop()}))
        else:
            _memory_child(mode, folder, batches_path)
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--presets", nargs="+", default=["tiny", "smollm2-llama-moe-mini"])
    ap.add_argument("--per-domain", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--render-only", action="store_true", help="rewrite the markdown from <out>.json, no run")
    args = ap.parse_args()
    json_path = os.path.splitext(args.out)[0] + ".json"
    if args.render_only:
        with open(json_path) as f:
            saved = json.load(f)
        header = dict(saved["header"])
        now = _commit_detail()
        if now != header["commit"]:
            header["rendered at"] = f"{now} (numbers measured at the commit above)"
        with open(args.out, "w") as f:
            f.write("\n".join(_render(header, saved["results"])) + "\n")
        return 0
    header = {
        "device": _device(),
        "commit": _commit_detail(),
        **_versions(),
        "command": " ".join(shlex.quote(a) for a in ["python", "bench/profiling.py", *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    raw = {}
    for preset in args.presets:
        section, raw[preset] = run_preset(preset, args.per_domain, args.seq_len, args.batch_size)
        print("\n".join(section), flush=True)
    with open(args.out, "w") as f:
        f.write("\n".join(_render(header, raw)) + "\n")
    with open(json_path, "w") as f:
        json.dump({"header": header, "results": raw}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
