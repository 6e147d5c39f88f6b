"""Run a pytest-benchmark file and write its results as markdown with their provenance.

    python bench/report.py bench/bench_native_cpu.py bench/results/native_cpu.md [-- extra pytest args]

The results file records the device, the commit, the torch/triton/Python versions and the exact command,
and per benchmark group the median time of each case and its speedup over the group's ``reference`` case.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from collections import defaultdict
from typing import Dict, List


# Environment variables that change what a benchmark measures; recorded in the command line.
_RELEVANT_ENV = (
    "OMP_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES",
    "FLUX_ENGINE_BACKEND",
    "TRITON_INTERPRET",
    "FLUX_ENGINE_ATOMIC_SCATTER",
    "FLUX_ENGINE_MOE_RECOMPUTE",
    "FLUX_ENGINE_AUTOTUNE",
)


def _versions() -> Dict[str, str]:
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = "not installed"
    return versions


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU: {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout
        return sha + (" (with uncommitted changes)" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _format_seconds(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.3f} s"


def render(benchmarks: List[dict], header: Dict[str, str]) -> str:
    lines = ["# Benchmark results", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    groups: Dict[str, List[dict]] = defaultdict(list)
    for b in benchmarks:
        groups[b["group"] or b["name"]].append(b)
    for group, cases in groups.items():
        # Cases that record their useful FLOPs in extra_info["tflops"] also get their share of the group's
        # "dense" case (the same FLOPs as one dense GEMM chain: the upper bound).
        rates = any("tflops" in c.get("extra_info", {}) for c in cases)
        extra_head, extra_rule = (" TFLOP/s | % of dense |", " --- | --- |") if rates else ("", "")
        lines += ["", f"## {group}", "", "| case | median | min | rounds | speedup vs reference |" + extra_head, "| --- | --- | --- | --- | --- |" + extra_rule]
        ref = next((c for c in cases if c["params"].get("tier") == "reference"), None)
        dense = next((c for c in cases if c["params"].get("tier") == "dense"), None)
        for c in sorted(cases, key=lambda c: c["stats"]["median"], reverse=True):
            st = c["stats"]
            speedup = f"{ref['stats']['median'] / st['median']:.2f}x" if ref else "-"
            case = c["params"].get("tier", c["name"])
            row = f"| {case} | {_format_seconds(st['median'])} | {_format_seconds(st['min'])} | {st['rounds']} | {speedup} |"
            if rates:
                tflops = c.get("extra_info", {}).get("tflops")
                share = f"{100 * dense['stats']['median'] / st['median']:.0f}%" if dense else "-"
                row += f" {tflops:.3g} | {share} |" if tflops is not None else " - | - |"
            lines.append(row)
    return "\n".join(lines) + "\n"


def main(argv: List[str]) -> int:
    if "--" in argv:
        split = argv.index("--")
        argv, extra = argv[:split], argv[split + 1 :]
    else:
        extra = []
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    bench_file, out_path = argv
    with tempfile.TemporaryDirectory() as tmp:
        json_path = os.path.join(tmp, "bench.json")
        cmd = [sys.executable, "-m", "pytest", bench_file, "--benchmark-only", "--benchmark-enable", "-q", f"--benchmark-json={json_path}", *extra]
        code = subprocess.call(cmd)
        if code != 0:
            print(f"benchmark run failed with exit code {code}; {out_path} left unchanged", file=sys.stderr)
            return code
        with open(json_path) as f:
            data = json.load(f)
    header = {
        "device": _device(),
        "commit": _commit(),
        **_versions(),
        "command": " ".join(
            [f"{k}={shlex.quote(os.environ[k])}" for k in _RELEVANT_ENV if k in os.environ]
            + [shlex.quote(a) for a in ["python", "bench/report.py", *sys.argv[1:]]]
        ),
        "date": data.get("datetime", "unknown"),
    }
    text = render(data["benchmarks"], header)
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    tmp_out = out_path + ".tmp"
    with open(tmp_out, "w") as f:
        f.write(text)
    os.replace(tmp_out, out_path)
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
