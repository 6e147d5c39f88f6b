"""The short performance table of ``scripts/gpu_validate.sh``: one expert layer, a few seconds per row.

    python3 bench/gpu_perf.py --out perf.md              # GPU: real shapes, bf16
    python3 bench/gpu_perf.py --out perf.md --rehearse   # CPU: tiny shapes, Triton interpreted (plumbing only)

Rows: the expert layers of DeepSeek-MoE-16B and Qwen3-30B-A3B (``flux_engine.presets``: E, H, I, k) at
T = 2048 and 8192 tokens, uniform top-k routing (distinct experts per token), bf16. Columns, each a median time
and its useful TFLOP/s (``6 * T * k * H * I`` forward, 3x that forward+backward):

- ``dense``: the same FLOPs as two dense bf16 matmuls, ``[Tk, H] @ [H, 2I]`` and ``[Tk, I] @ [I, H]``: the bound;
- ``torch._grouped_mm``: the same two GEMMs grouped by expert over rows already sorted by expert (no gather,
  scatter or activation): what the GPU's grouped GEMM library reaches;
- ``ours fwd`` / ``ours fwd+bwd``: ``ops.grouped_mlp`` on the triton tier (gradients of x, both stacks and the
  routing weights);
- ``int4 fwd``: ``ops.quantized_grouped_mlp`` on int4 weights (group 128, symmetric), the profiling path;
- errors: norm-relative error of ``ours fwd`` (bf16) against the fp32 reference on the same bf16 inputs, and of
  the int4 path against the fp32 reference on the dequantised weights.

Times are ``triton.testing.do_bench`` medians on a GPU (CUDA events). The table is rewritten (atomically) after
every row, so a run stopped by its time limit still leaves the rows it finished. On CPU (``--rehearse``) the shapes
are shrunk and the times are the interpreter's: they prove the script runs, they measure nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import _commit, _device, _versions, command_line  # noqa: E402

from flux_engine import ops  # noqa: E402
from flux_engine.backend import ENV_VAR  # noqa: E402
from flux_engine.fileio import atomic_write  # noqa: E402
from flux_engine.ops.grouped_mlp import grouped_mlp_reference  # noqa: E402
from flux_engine.presets import get as preset  # noqa: E402

MODELS = ("deepseek-moe-16b", "qwen3-30b-a3b")
TOKENS = (2048, 8192)
REHEARSE_TOKENS = (8,)
COLUMNS = ("dense", "grouped_mm", "fwd", "fwd_bwd", "int4")


def layer(model: str, rehearse: bool):
    """``(E, H, I, k)`` of ``model``'s expert layer (rehearsal: 4 experts, top-2, H 64, I 32)."""
    c = preset(model)
    E, H, I, k = c.num_experts, c.hidden_size, c.moe_intermediate_size, c.num_experts_per_tok
    return (4, 64, 32, 2) if rehearse else (E, H, I, k)


def median_seconds(fn: Callable[[], object], cuda: bool) -> float:
    """Median time of ``fn``: CUDA events through ``triton.testing.do_bench`` on a GPU; on CPU (the rehearsal,
    Triton interpreted: nothing worth timing) the wall clock of one call."""
    if cuda:
        from triton.testing import do_bench

        return do_bench(fn, warmup=10, rep=60, return_mode="median") / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def measure(model: str, T: int, device: torch.device, rehearse: bool) -> Dict[str, object]:
    """One row: times (s) of every column, FLOPs and the two errors."""
    cuda = device.type == "cuda"
    E, H, I, k = layer(model, rehearse)
    g = torch.Generator(device=device).manual_seed(0)
    dt = torch.bfloat16
    x = torch.randn(T, H, generator=g, device=device).to(dt)
    gate_up = (torch.randn(E, 2 * I, H, generator=g, device=device) / H**0.5).to(dt)
    down = (torch.randn(E, H, I, generator=g, device=device) / I**0.5).to(dt)
    ids = torch.rand(T, E, generator=g, device=device).topk(k, dim=1).indices.to(torch.int32)
    weights = torch.rand(T, k, generator=g, device=device)
    weights = weights / weights.sum(dim=1, keepdim=True)
    rows = T * k
    row = {"model": model, "E": E, "H": H, "I": I, "k": k, "T": T, "flops": 6 * rows * H * I, "times": {}}
    times: Dict[str, Optional[float]] = row["times"]

    a1, w1 = torch.randn(rows, H, device=device).to(dt), torch.randn(H, 2 * I, device=device).to(dt)
    a2, w2 = torch.randn(rows, I, device=device).to(dt), torch.randn(I, H, device=device).to(dt)
    times["dense"] = median_seconds(lambda: (a1 @ w1, a2 @ w2), cuda)

    # Rows sorted by expert, every expert's count from the routing: offs are the cumulative row ends.
    counts = torch.bincount(ids.flatten().long(), minlength=E)
    offs = counts.cumsum(0).to(torch.int32)
    w1_t, w2_t = gate_up.transpose(1, 2), down.transpose(1, 2)  # [E, H, 2I], [E, I, H]: column-major B operands
    try:
        times["grouped_mm"] = median_seconds(
            lambda: (torch._grouped_mm(a1, w1_t, offs=offs), torch._grouped_mm(a2, w2_t, offs=offs)), cuda
        )
    except (RuntimeError, AttributeError) as e:  # no kernel for this device / dtype / layout
        row["grouped_mm_error"] = str(e).splitlines()[0][:160]
        times["grouped_mm"] = None

    with torch.no_grad():
        out = ops.grouped_mlp(x, gate_up, down, weights, ids)
        times["fwd"] = median_seconds(lambda: ops.grouped_mlp(x, gate_up, down, weights, ids), cuda)
        ref = grouped_mlp_reference(x.float(), gate_up.float(), down.float(), weights, ids, None, None)
    row["err_bf16"] = rel_err(out, ref)

    params = [t.detach().clone().requires_grad_(True) for t in (x, gate_up, down, weights)]
    cotangent = torch.randn(T, H, generator=g, device=device).to(dt)

    def fwd_bwd():
        y = ops.grouped_mlp(params[0], params[1], params[2], params[3], ids)
        return torch.autograd.grad(y, params, cotangent)

    times["fwd_bwd"] = median_seconds(fwd_bwd, cuda)

    q_gate_up = ops.quantize(gate_up.float(), 4, min(128, H))
    q_down = ops.quantize(down.float(), 4, min(128, I))
    out4 = ops.quantized_grouped_mlp(x, q_gate_up, q_down, weights, ids)
    times["int4"] = median_seconds(lambda: ops.quantized_grouped_mlp(x, q_gate_up, q_down, weights, ids), cuda)
    with torch.no_grad():
        ref4 = grouped_mlp_reference(
            x.float(), ops.dequantize(q_gate_up), ops.dequantize(q_down), weights, ids, None, None
        )
    row["err_int4"] = rel_err(out4, ref4)
    return row


def _cell(seconds: Optional[float], flops: float) -> str:
    if seconds is None:
        return "not measured"
    return f"{seconds * 1e3:.3f} ms, {flops / seconds / 1e12:.1f} TF/s"


def render(rows: List[dict], header: Dict[str, str], failures: List[str]) -> str:
    lines = ["# Expert-layer performance table (scripts/gpu_validate.sh)", ""]
    lines += [f"- {key}: {value}" for key, value in header.items()]
    lines += [
        "",
        "Median time and useful TFLOP/s per column (fwd+bwd counts 3x the forward FLOPs); errors are norm-relative"
        " against the fp32 reference. `ours fwd / dense` is the forward's share of the dense bound.",
        "",
        "| model | E | H | I | k | T | dense bf16 | torch._grouped_mm | ours fwd | ours fwd+bwd | int4 fwd |"
        " ours fwd / dense | err bf16 | err int4 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t, f = r["times"], r["flops"]
        share = f"{t['dense'] / t['fwd']:.2f}" if t.get("fwd") and t.get("dense") else "not measured"
        cells = [
            _cell(t.get("dense"), f), _cell(t.get("grouped_mm"), f), _cell(t.get("fwd"), f),
            _cell(t.get("fwd_bwd"), 3 * f), _cell(t.get("int4"), f), share,
            f"{r['err_bf16']:.2e}", f"{r['err_int4']:.2e}",
        ]  # fmt: skip
        lines.append(f"| {r['model']} | {r['E']} | {r['H']} | {r['I']} | {r['k']} | {r['T']} | " + " | ".join(cells) + " |")
    notes = [f"- {r['model']} T={r['T']}: torch._grouped_mm {r['grouped_mm_error']}" for r in rows if "grouped_mm_error" in r]
    if notes or failures:
        lines += ["", "## Not measured", ""] + notes + [f"- {f}" for f in failures]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="markdown table, rewritten after every row")
    ap.add_argument("--rehearse", action="store_true", help="CPU, tiny shapes, Triton interpreted")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.rehearse
    if args.rehearse:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is first imported, below
    if not cuda and not args.rehearse:
        ap.error("no GPU: the table measures GPU kernels (use --rehearse to run it on CPU with tiny shapes)")
    # Every row runs our kernels: the triton tier is forced, so a tier that cannot run fails loudly instead of
    # timing the reference.
    os.environ[ENV_VAR] = "triton"
    device = torch.device("cuda" if cuda else "cpu")
    header = {
        "device": _device(),
        "commit": _commit(),
        "versions": ", ".join(f"{k} {v}" for k, v in _versions().items()),
        "command": command_line([sys.executable] + sys.argv),
        "shapes": "rehearsal (tiny, CPU interpreter: times measure nothing)" if args.rehearse else "real, bf16",
    }
    rows: List[dict] = []
    failures: List[str] = []
    for model in args.models:
        for T in REHEARSE_TOKENS if args.rehearse else TOKENS:
            t0 = time.perf_counter()
            try:
                rows.append(measure(model, T, device, args.rehearse))
                print(f"{model} T={T}: {rows[-1]['times']} ({time.perf_counter() - t0:.1f} s)", flush=True)
            except Exception as e:  # noqa: BLE001 -- one failing row must not hide the others
                failures.append(f"{model} T={T}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                print(f"FAILED {failures[-1]}", flush=True)
            if cuda:
                torch.cuda.empty_cache()
            text = render(rows, header, failures)
            atomic_write(args.out, lambda f: f.write(text))
    print(render(rows, header, failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
