"""Tier selection: defaults by device, forcing through FLUX_ENGINE_BACKEND, clear errors."""

import pytest
import torch

from flux_engine import BackendUnavailableError
from flux_engine.backend import native_extension
from flux_engine.ops import grouped_mlp, permute, quantize, route


def test_default_cpu_tiers():
    cpu = torch.device("cpu")
    assert route.op.tier(cpu) == "reference"  # the interpreter is never a default
    expected = "cpu" if native_extension() is not None else "reference"
    assert permute.op.tier(cpu) == expected
    assert quantize.op.tier(cpu) == expected


def test_forced_reference_everywhere(monkeypatch):
    monkeypatch.setenv("FLUX_ENGINE_BACKEND", "reference")
    for op in (route, permute, quantize, grouped_mlp):
        assert op.op.tier(torch.device("cpu")) == "reference"


def test_forced_cuda_on_cpu_tensors_errors(monkeypatch):
    monkeypatch.setenv("FLUX_ENGINE_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="permute: FLUX_ENGINE_BACKEND=cuda cannot run: the cuda tier runs on CUDA"):
        permute(torch.zeros(2, 1, dtype=torch.int32), 2)
    with pytest.raises(BackendUnavailableError, match="route: no cuda tier"):
        route(torch.randn(2, 3), 1)


def test_forced_triton_without_interpreter_errors(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("on a GPU the triton tier runs")
    monkeypatch.setenv("FLUX_ENGINE_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        route(torch.randn(2, 3), 1)


def test_unknown_backend_value(monkeypatch):
    monkeypatch.setenv("FLUX_ENGINE_BACKEND", "fastest")
    with pytest.raises(BackendUnavailableError, match="'fastest' is not one of"):
        route(torch.randn(2, 3), 1)


def test_public_ops_run_triton_tier_on_cpu_under_interpreter():
    """A fresh process with only the two variables set runs the Triton kernels on CPU tensors."""
    import os
    import subprocess
    import sys

    code = (
        "import torch, flux_engine.ops as ops\n"
        "from flux_engine.ops.route import route_reference\n"
        "cpu = torch.device('cpu')\n"
        "assert ops.route.op.tier(cpu) == 'triton', ops.route.op.tier(cpu)\n"
        "logits = torch.randn(5, 8)\n"
        "w, ids = ops.route(logits, 2)\n"
        "rw, rids = route_reference(logits, 2, 'softmax', True, 1.0)\n"
        "assert torch.equal(ids, rids) and torch.allclose(w, rw)\n"
        "assert ops.expert_counts.op.tier(cpu) == 'triton'\n"
        "assert torch.equal(ops.expert_counts(ids, 8), torch.bincount(ids.flatten().long(), minlength=8))\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1", FLUX_ENGINE_BACKEND="triton", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_int8_dequantize_on_a_gpu_takes_triton_not_the_reference(monkeypatch):
    """The cuda tier has int4 only: on a CUDA device int8 goes on to the Triton kernel; forcing cuda names why."""
    from flux_engine import backend
    from flux_engine.ops.quantize import dequantize, quantize_reference

    monkeypatch.setattr(backend, "tier_unavailable_reason", lambda tier, device: None)  # as on a GPU with triton
    op, cuda = dequantize.op, torch.device("cuda")
    for bits, tier in ((4, "cuda"), (8, "triton")):
        q = quantize_reference(torch.randn(4, 32), bits, 16, True)
        assert op.select(cuda, ((q, torch.bfloat16), {})) is op.impls[tier], bits
    monkeypatch.setenv("FLUX_ENGINE_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="dequantize: the cuda tier does not support int8"):
        op.select(cuda, ((q, torch.bfloat16), {}))
