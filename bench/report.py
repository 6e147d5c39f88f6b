"""Run a pytest-benchmark file and write its results as markdown with their provenance.

    python bench/report.py bench/bench_native_cpu.py bench/results/native_cpu.md [-- extra pytest args]

The results file records the device, the commit, the torch/triton/Python versions and the exact command,
per benchmark group the median time of each case and its speedup over the group's baseline (the case with
``extra_info["baseline"]`` set, else the ``tier=reference`` case), and a "Not measured" section listing every
skipped case with pytest's skip reason (e.g. GPU-only rows on a machine without a GPU).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from typing import Dict, List, Optional


# Provenance helpers live in the package (the experiment command records the same); the other bench scripts import
# them from here under these names.
from flux_engine.provenance import RELEVANT_ENV as _RELEVANT_ENV  # noqa: E402
from flux_engine.provenance import command_line  # noqa: E402
from flux_engine.provenance import commit as _commit  # noqa: E402
from flux_engine.provenance import device as _device  # noqa: E402
from flux_engine.provenance import versions as _versions  # noqa: E402


def _format_seconds(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.3f} s"


def skipped_cases(junit_path: str) -> Dict[str, List[str]]:
    """``{skip reason: [test ids]}`` from a pytest junit XML report."""
    out: Dict[str, List[str]] = defaultdict(list)
    for case in ET.parse(junit_path).getroot().iter("testcase"):
        skip = case.find("skipped")
        if skip is not None:
            reason = (skip.get("message") or "skipped").removeprefix("Skipped: ")
            out[reason].append(case.get("name", "?"))
    return out


def render(
    benchmarks: List[dict], header: Dict[str, str], skipped: Optional[Dict[str, List[str]]] = None, about: str = ""
) -> str:
    lines = ["# Benchmark results", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    if about:
        lines += ["", "## What is measured", "", "From the benchmark file's docstring:", "", "```text", about.strip(), "```"]
    groups: Dict[str, List[dict]] = defaultdict(list)
    for b in benchmarks:
        groups[b["group"] or b["name"]].append(b)
    for group, cases in groups.items():
        # Cases that record their useful FLOPs in extra_info["tflops"] also get their share of the group's
        # "dense" case (the same FLOPs as one dense GEMM chain: the upper bound).
        rates = any("tflops" in c.get("extra_info", {}) for c in cases)
        extra_head, extra_rule = (" TFLOP/s | % of dense |", " --- | --- |") if rates else ("", "")
        lines += ["", f"## {group}", "", "| case | median | min | rounds | speedup vs baseline |" + extra_head, "| --- | --- | --- | --- | --- |" + extra_rule]
        ref = next((c for c in cases if c.get("extra_info", {}).get("baseline")), None)
        ref = ref or next((c for c in cases if c["params"].get("tier") == "reference"), None)
        dense = next((c for c in cases if c["params"].get("tier") == "dense"), None)
        for c in sorted(cases, key=lambda c: c["stats"]["median"], reverse=True):
            st = c["stats"]
            speedup = f"{ref['stats']['median'] / st['median']:.2f}x" if ref else "-"
            case = c["params"].get("case") or c["params"].get("tier") or c["name"]
            row = f"| {case} | {_format_seconds(st['median'])} | {_format_seconds(st['min'])} | {st['rounds']} | {speedup} |"
            if rates:
                tflops = c.get("extra_info", {}).get("tflops")
                share = f"{100 * dense['stats']['median'] / st['median']:.0f}%" if dense else "-"
                row += f" {tflops:.3g} | {share} |" if tflops is not None else " - | - |"
            lines.append(row)
            notes = c.get("extra_info", {}).get("notes")
            if notes:
                lines.append(f"|  ↳ {notes} | | | | |" + (" | |" if rates else ""))
    if skipped:
        lines += ["", "## Not measured", "", "Skipped cases of this run, by reason:", ""]
        for reason, ids in sorted(skipped.items()):
            shown = ", ".join(f"`{i}`" for i in ids[:6]) + (f" and {len(ids) - 6} more" if len(ids) > 6 else "")
            lines.append(f"- {reason} ({len(ids)} cases): {shown}")
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
        junit_path = os.path.join(tmp, "junit.xml")
        cmd = [sys.executable, "-m", "pytest", bench_file, "--benchmark-only", "--benchmark-enable", "-q",
               f"--benchmark-json={json_path}", f"--junitxml={junit_path}", *extra]  # fmt: skip
        code = subprocess.call(cmd)
        if code != 0:
            print(f"benchmark run failed with exit code {code}; {out_path} left unchanged", file=sys.stderr)
            return code
        with open(json_path) as f:
            data = json.load(f)
        skipped = skipped_cases(junit_path)
    header = {
        "device": _device(),
        "commit": _commit(),
        **_versions(),
        "command": command_line(["python", "bench/report.py", *sys.argv[1:]]),
        "date": data.get("datetime", "unknown"),
    }
    with open(bench_file) as f:
        about = ast.get_docstring(ast.parse(f.read())) or ""
    text = render(data["benchmarks"], header, skipped, about)
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    tmp_out = out_path + ".tmp"
    with open(tmp_out, "w") as f:
        f.write(text)
    os.replace(tmp_out, out_path)
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
