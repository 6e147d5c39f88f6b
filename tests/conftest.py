"""Shared fixtures. Sets TRITON_INTERPRET=1 before anything imports triton when no GPU is present, so every
Triton kernel runs on CPU tensors through Triton's interpreter."""

import os
import sys

import torch

_HAS_CUDA = torch.cuda.is_available()
if not _HAS_CUDA:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from flux_engine.backend import ENV_VAR, tier_unavailable_reason  # noqa: E402


@pytest.fixture
def device() -> torch.device:
    """The device kernels under test run on: the GPU when present, else the CPU (Triton interpreted)."""
    return torch.device("cuda" if _HAS_CUDA else "cpu")


@pytest.fixture
def force_tier(monkeypatch):
    """``force_tier("triton", device)`` forces a tier for the rest of the test, skipping when it cannot run."""

    def force(tier: str, device: torch.device) -> None:
        reason = tier_unavailable_reason(tier, device)
        if reason is not None:
            pytest.skip(f"{tier} tier unavailable: {reason}")
        monkeypatch.setenv(ENV_VAR, tier)

    return force


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

