"""Every Triton kernel of flux-engine compiled for an H100/H200 (sm_90) without a GPU: registers, spills, shared
memory and which matrix instructions the compiler chose, per kernel and per config bucket.

    python tests/sm90_compile.py [--quick] [--out FILE] [--jobs N]     # not under TRITON_INTERPRET=1

The launchers run on CPU tensors with every ``kernel[grid](...)`` captured instead of launched; each distinct
launch is then compiled by Triton's ahead-of-time path (``triton.compile`` with ``GPUTarget("cuda", 90, 32)``:
compute capability 9.0, warp size 32) through ptxas, and ``cuobjdump --dump-resource-usage`` reads the cubin.
Grouped-MLP launches use the sm_90 default config of each rows bucket (``grouped_mlp_configs.DEFAULTS``), in
bf16, fp32 (TF32 on a GPU), int4 and int8 weights, with LoRA and tuned experts, and in the other expert forms
(gpt-oss's interleaved clamped SwiGLU with biases, ungated gelu with biases; int4 gpt-oss).

Checks (raised as one ``AssertionError`` listing every problem; the table is printed either way):
- no spills: ``STACK`` and ``LOCAL`` are 0 (a spill shows as stack-frame bytes);
- shared memory within sm_90's 227 KiB per block;
- every launch with a dot and ``BLOCK_M >= 64`` (4 or 8 warps) uses ``wgmma``; no dot ever runs on the FMA path
  (a dot kernel's PTX has ``wgmma`` or ``mma.sync``);
- packed int4/int8 weight tiles of symmetric stacks are loaded as vectors: no single-byte global load in the
  PTX (asymmetric stacks add their zero points, one byte per row of codes);
- ``received_attention`` runs its dots on bf16 operands for bf16 inputs, and no constexpr depends on the
  sequence length (T is a run-time argument: one compiled kernel per 16-divisibility of T, Triton's usual
  integer specialisation, serves every length).
``--quick`` compiles one launch per kernel (CI's rehearsal of scripts/gpu_validate.sh).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("tests/sm90_compile.py compiles kernels: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402
import triton  # noqa: E402

import flux_engine.triton_kernels.expert_counts as expert_counts_mod  # noqa: E402
import flux_engine.triton_kernels.grouped_mlp as gm  # noqa: E402
import flux_engine.triton_kernels.permute as permute_mod  # noqa: E402
import flux_engine.triton_kernels.quantize as quantize_mod  # noqa: E402
import flux_engine.triton_kernels.received_attention as ra_mod  # noqa: E402
import flux_engine.triton_kernels.route as route_mod  # noqa: E402
import flux_engine.triton_kernels.route_and_count as rc_mod  # noqa: E402
from flux_engine.ops.expert_form import SILU, ExpertForm  # noqa: E402
from flux_engine.ops.permute import permute_reference  # noqa: E402
from flux_engine.ops.quantize import quantize_reference  # noqa: E402
from flux_engine.triton_kernels import grouped_mlp_configs as configs  # noqa: E402
from flux_engine.triton_kernels.grouped_mlp import Expand, Stack  # noqa: E402

SM90_SHARED = 227 * 1024
MODULES = (gm, permute_mod, expert_counts_mod, quantize_mod, ra_mod, route_mod, rc_mod)
# Mean rows per expert: one bucket inside every entry of the sm_90 tables (and 1 for decode-like batches).
BUCKETS = (1, 16, 32, 64, 256, 4096)
# Expert forms other than SwiGLU: name -> form (every one with biases).
FORMS = {"gpt-oss": ExpertForm(interleaved=True, limit=7.0), "gelu-ungated": ExpertForm("gelu", gated=False)}


@dataclass
class Launch:
    kernel: object
    args: tuple
    kwargs: dict
    label: str

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else self.kernel.__name__


class _Capture:
    """Stands in for a kernel: records ``kernel[grid](*args, **kwargs)`` instead of launching it."""

    def __init__(self, kernel, sink: List[Launch], label: List[str]):
        self.kernel, self.sink, self.label = kernel, sink, label

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.sink.append(Launch(self.kernel, args, kwargs, self.label[0]))


def compile_launch(launch: Launch):
    """ptxas-compiled kernel for sm_90, specialised like a JIT launch (ints equal to 1 constant, 16-divisibility)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    kernel, kwargs = launch.kernel, dict(launch.kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    values = {**dict(zip(kernel.arg_names, launch.args)), **kwargs}
    signature, constants, attrs = {}, {}, {}
    for i, param in enumerate(kernel.params):
        value = values[param.name]
        if param.is_constexpr:
            kind, key = "constexpr", ""
        else:
            kind, key = native_specialize_impl(BaseBackend, value, False, True, True)[:2]
        signature[param.name] = kind
        if kind == "constexpr":
            constants[param.name] = value
        elif isinstance(key, str) and BaseBackend.parse_attr(key):  # floats carry no attribute
            attrs[(i,)] = BaseBackend.parse_attr(key)
    source = ASTSource(kernel, signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def resource_usage(cubin: bytes) -> Dict[str, int]:
    """``REG``, ``STACK``, ``SHARED``, ``LOCAL`` of the cubin's kernel, from the cuobjdump that ships with Triton."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    return {key: int(v) for key, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def matrix_path(ptx: str) -> str:
    if "wgmma" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma.sync"
    return "-"


# ------------------------------------------------------------------------------------------------ the launches


def _topk_ids(T: int, E: int, k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(T, E, generator=g).topk(k, dim=1).indices.to(torch.int32)


def grouped_mlp_launches(bucket: int, dtype: torch.dtype, weights: str, form_name: Optional[str] = None) -> None:
    """Forward and backward of one expert layer (plain / LoRA + tuned / packed weights) at ``bucket`` rows, in
    SwiGLU or ``FORMS[form_name]`` (with biases)."""
    E, H, I, k, r = 8, 512, 256, 2, 16
    form = FORMS[form_name] if form_name else SILU
    rows = form.gate_up_rows(I)
    T = max(1, bucket * E // k)
    x, w = torch.empty(T, H, dtype=dtype), torch.rand(T, k)
    plan = permute_reference(_topk_ids(T, E, k), E, None)
    row_w = torch.empty(T * k)
    experts = torch.arange(E, dtype=torch.int32)
    gate_up, down = torch.empty(E, rows, H, dtype=dtype), torch.empty(E, H, I, dtype=dtype)
    biases = (torch.empty(E, rows, dtype=dtype), torch.empty(E, H, dtype=dtype)) if form_name else (None, None)
    expand = None
    if weights == "plain":
        gu_stack, d_stack = Stack(gate_up, bias=biases[0]), Stack(down, bias=biases[1])
    elif weights == "lora+tuned":
        slots = torch.full((E,), -1, dtype=torch.int32)
        lora_rows = torch.empty(T * k, r, dtype=dtype)
        B = torch.empty(2, 2 * I, r, dtype=dtype)
        gu_stack, d_stack = Stack(gate_up, gate_up[:2]), Stack(down, down[:2])
        expand = Expand(slots, lora_rows, B, False)
    else:  # "int4" / "int8": symmetric, int4 in groups of 128, int8 per channel; "-asym": zero points, groups of 64
        bits, symmetric = int(weights[3]), not weights.endswith("-asym")
        group = 64 if not symmetric else 128 if bits == 4 else None
        gu_stack = Stack(quantize_reference(torch.zeros(E, rows, H), bits, group or H, symmetric), bias=biases[0])
        d_stack = Stack(quantize_reference(torch.zeros(E, H, I), bits, group or I, symmetric), bias=biases[1])
    h, gu = gm.gate_up_forward(x, gu_stack, plan, form, store_h=True, store_gu=True, expand=expand)
    gm.combine(gm.rows_matmul(h, d_stack, False, plan, kind="down", expand=expand), plan, w, x.dtype)
    if weights.startswith("int"):
        return  # packed weights are frozen: forward only (profiling)
    dgu, _ = gm.down_backward(x, d_stack, plan, gu, row_w, form, store_dgu=True, store_partial=True, expand=expand)
    gm.combine(gm.rows_matmul(dgu, gu_stack, True, plan, kind="dx", expand=expand), plan, None, x.dtype)
    gm.weight_grad(dgu, x, plan, experts, (rows, H), a_by_token=False, b_by_token=True)
    gm.weight_grad(x, gu, plan, experts, (H, I), a_by_token=True, b_by_token=False, row_weights=row_w, b_form=form)
    if form_name:
        ones = torch.ones(1, 1, dtype=dtype).expand(T * k, 1)  # the bias gradients: column sums
        gm.weight_grad(dgu, ones, plan, experts, (rows, 1), a_by_token=False, b_by_token=False)
    gm.row_weights(plan, w)
    if expand is not None:
        A = torch.empty(2, r, H, dtype=dtype)
        gm.lora_shrink(x, A, False, expand.slots, plan, by_token=True, scale=2.0)
        gm.lora_shrink(dgu, expand.factor, True, expand.slots, plan, by_token=False, scale=2.0)
        gm.weight_grad(dgu, expand.rows, plan, experts[:2], (2 * I, r), a_by_token=False, b_by_token=False)


def other_launches(dtype: torch.dtype) -> None:
    """The router, counting, permutation, quantisation and received-attention kernels on realistic shapes."""
    T, E, k, H = 4096, 128, 8, 2048
    ids = _topk_ids(T, E, k)
    permute_mod.permute(ids, E, None)
    expert_counts_mod.expert_counts(ids, E, torch.empty(T), torch.zeros(E))
    route_mod.route(torch.empty(T, E, dtype=dtype), k, "softmax", True, 1.0)
    rc_mod.route_and_count(
        torch.empty(T, H, dtype=dtype), torch.empty(E, H, dtype=dtype), k, "softmax", True, 1.0,
        torch.zeros(E, dtype=torch.int64), torch.zeros(E), torch.empty(T), torch.ones(T, dtype=torch.bool), False,
    )  # fmt: skip
    w = torch.empty(64, 2048, dtype=dtype)
    for bits, symmetric in ((4, True), (8, False)):
        data, scales, zeros = quantize_mod.quantize(w, bits, 128, symmetric)
        quantize_mod.dequantize(data, scales, zeros, bits, 128, w.shape, dtype)
    for Tq in (2048, 4096):  # two lengths: the same constexprs, so one compiled kernel serves both
        q4 = torch.empty(1, 16, Tq, 128, dtype=dtype)
        ra_mod.received_attention(q4, torch.empty(1, 4, Tq, 128, dtype=dtype), True, None)


def capture_all(quick: bool) -> List[Launch]:
    launches: List[Launch] = []
    label = [""]
    saved = {}
    for mod in MODULES:
        for name in dir(mod):
            if name.endswith("_kernel") and hasattr(getattr(mod, name), "params"):
                saved[(mod, name)] = getattr(mod, name)
                setattr(mod, name, _Capture(getattr(mod, name), launches, label))
    bucket_of = [0]
    real_config_for = gm.config_for
    gm.config_for = lambda kind, N, K, bucket, dtype, *_, **__: configs.default_config("sm_90", kind, bucket_of[0], dtype)
    try:
        cases = [(b, torch.bfloat16, "plain") for b in BUCKETS]
        cases += [(b, torch.float32, "plain") for b in (16, 4096)]
        cases += [(b, torch.bfloat16, "lora+tuned") for b in (16, 4096)]
        cases += [(b, torch.bfloat16, w) for b in BUCKETS for w in ("int4", "int8")]
        cases += [(b, torch.bfloat16, w) for b in (16, 4096) for w in ("int4-asym", "int8-asym")]
        cases = [case + (None,) for case in cases]
        cases += [(b, torch.bfloat16, "plain", f) for b in (1, 16, 4096) for f in FORMS]
        cases += [(b, torch.bfloat16, "int4", "gpt-oss") for b in (16, 4096)]
        if quick:
            cases = [(4096, torch.bfloat16, "plain", None), (4096, torch.bfloat16, "int4", None)]
            cases += [(4096, torch.bfloat16, "plain", f) for f in FORMS]
        for bucket, dtype, weights, form_name in cases:
            bucket_of[0] = bucket
            label[0] = f"{weights}{'/' + form_name if form_name else ''} {str(dtype)[6:]} rows~{bucket}"
            grouped_mlp_launches(bucket, dtype, weights, form_name)
        for dtype in (torch.bfloat16,) if quick else (torch.bfloat16, torch.float32):
            label[0] = str(dtype)[6:]
            other_launches(dtype)
    finally:
        gm.config_for = real_config_for
        for (mod, name), kernel in saved.items():
            setattr(mod, name, kernel)
    return launches


def _key(launch: Launch) -> Tuple:
    """What decides the compiled code: the kernel, constexprs, options and the specialisation of the arguments."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    spec = []
    for value in launch.args:
        if isinstance(value, (torch.Tensor, int, float, bool)) or value is None:
            spec.append(native_specialize_impl(BaseBackend, value, False, True, True)[:2])
        else:
            spec.append(repr(value))
    return (launch.name, tuple(spec), tuple(sorted(launch.kwargs.items())))


def _config_text(kwargs: dict) -> str:
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_T", "BLOCK_H", "num_warps", "num_stages")
    return " ".join(f"{k.replace('BLOCK_', '')}={kwargs[k]}" for k in keys if k in kwargs)


_TO_COMPILE: List[Launch] = []  # read by the forked compile workers


def _inspect(i: int) -> dict:
    """What the checks need of launch ``_TO_COMPILE[i]`` compiled for sm_90 (picklable: runs in a worker)."""
    compiled = compile_launch(_TO_COMPILE[i])
    ptx = compiled.asm["ptx"]
    return dict(
        usage=resource_usage(compiled.asm["cubin"]), shared=compiled.metadata.shared, path=matrix_path(ptx),
        has_dot="tt.dot" in compiled.asm["ttir"], byte_loads=len(re.findall(r"ld\.global[\w.]*\.[bus]8\b", ptx)),
        bf16_mma=bool(re.search(r"(wgmma|mma\.sync)\S*\.bf16", ptx)),
    )  # fmt: skip


def check(quick: bool = False, out: Optional[str] = None, jobs: int = 1) -> List[str]:
    """Compiles every distinct launch (``jobs`` processes), prints the table (and writes it to ``out``); returns
    the problems found."""
    launches = capture_all(quick)
    seen, todo, problems = set(), [], []
    attention_kernels = {}
    for launch in launches:
        if launch.name in ("_row_lse_kernel", "_col_sum_kernel"):
            attention_kernels.setdefault((launch.name, launch.label), set()).add(tuple(sorted(launch.kwargs.items())))
        key = _key(launch)
        if key in seen:
            continue
        seen.add(key)
        if quick and any(t.name == launch.name and t.label.split()[0] == launch.label.split()[0] for t in todo):
            continue  # one launch per kernel and weight format
        todo.append(launch)
    _TO_COMPILE[:] = todo
    if jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(_inspect, range(len(todo))))
    else:
        results = [_inspect(i) for i in range(len(todo))]
    rows = []
    for launch, r in zip(todo, results):
        usage, path, has_dot, byte_loads = r["usage"], r["path"], r["has_dot"], r["byte_loads"]
        row = (launch.name, launch.label, _config_text(launch.kwargs), usage.get("REG", -1), usage.get("STACK", -1),
               usage.get("LOCAL", -1), r["shared"], path if has_dot else "no dot", byte_loads)  # fmt: skip
        rows.append(row)
        where = f"{launch.name} [{launch.label}; {row[2]}]"
        if usage.get("STACK", 1) or usage.get("LOCAL", 1):
            problems.append(f"{where}: spills (STACK {usage.get('STACK')}, LOCAL {usage.get('LOCAL')})")
        if r["shared"] > SM90_SHARED:
            problems.append(f"{where}: {r['shared']} bytes of shared memory > {SM90_SHARED}")
        if has_dot and path == "-":
            problems.append(f"{where}: its dots run on the FMA path (no mma in the PTX)")
        if has_dot and launch.kwargs.get("BLOCK_M", 0) >= 64 and launch.kwargs.get("num_warps", 4) % 4 == 0 and path != "wgmma":
            problems.append(f"{where}: BLOCK_M >= 64 but {path}, not wgmma")
        symmetric_codes = launch.label.split()[0].split("/")[0] in ("int4", "int8") or (
            launch.name == "_dequantize_kernel" and launch.kwargs.get("SYMMETRIC")
        )
        if symmetric_codes and byte_loads:
            # Symmetric stacks: codes come as vectors (cp.async / ld.v*), so no single-byte load is left. (An
            # asymmetric stack's zero points are one byte per row of codes: "-asym" rows may show byte loads.)
            problems.append(f"{where}: {byte_loads} single-byte global loads: packed tiles not vectorised")
        if launch.name in ("_row_lse_kernel", "_col_sum_kernel") and launch.args[0].dtype == torch.bfloat16:
            if not r["bf16_mma"]:
                problems.append(f"{where}: bf16 inputs but no bf16 tensor-core dot")
    for (name, label), variants in attention_kernels.items():
        if len(variants) > 1:
            problems.append(f"{name} [{label}]: a constexpr depends on the sequence length ({len(variants)} variants)")
    header = ("kernel", "case", "config", "regs", "stack", "local", "shared", "matrix", "byte loads")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [header] + rows]
    from flux_engine.provenance import command_line, commit, versions

    prov = [f"commit {commit()}", ", ".join(f"{k} {v}" for k, v in versions().items()),
            "command: " + command_line([sys.executable] + sys.argv),
            f"triton from {os.path.dirname(triton.__file__)}", "target: GPUTarget('cuda', 90, 32) (sm_90)", ""]  # fmt: skip
    text = "\n".join(prov + lines) + f"\n\ntriton {triton.__version__}: {len(rows)} distinct launches compiled for sm_90, " \
        f"{len(problems)} problems\n" + "".join(f"PROBLEM {p}\n" for p in problems)  # fmt: skip
    print(text, flush=True)
    if out:
        from flux_engine.fileio import atomic_write

        atomic_write(out, lambda f: f.write(text))
    return problems


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one launch per kernel")
    ap.add_argument("--out", help="also write the table to this file")
    ap.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="compile processes")
    args = ap.parse_args(argv)
    return 1 if check(args.quick, args.out, args.jobs) else 0


if __name__ == "__main__":
    sys.exit(main())
