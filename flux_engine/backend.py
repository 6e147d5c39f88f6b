"""Tier dispatch: one public function per op, several implementations behind it.

Tiers:
- ``reference``: pure torch, runs anywhere; the oracle every other tier is tested against.
- ``cpu``: C++ kernels of ``flux_engine._C`` on CPU tensors.
- ``triton``: Triton kernels; CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1``.
- ``cuda``: CUDA kernels of ``flux_engine._C`` on CUDA tensors.

By default an op runs the first tier in its preference list that can run on the inputs' device.
``FLUX_ENGINE_BACKEND=reference|cpu|triton|cuda`` forces one tier for every op; an op that has no
such tier, or whose tier cannot run here, raises ``BackendUnavailableError`` instead of silently
falling back, so a forced run really measures what it says.

Under ``torch.compile`` (``torch.compiler.is_compiling()``) every op runs its reference: plain torch that dynamo
traces and the compiler's backend fuses, never a graph break on a native or Triton launcher (the grouped MLP
instead becomes one opaque custom op that dispatches as usual; see ``ops.grouped_mlp``). The forced tier applies to
eager calls.

A tier may also handle only some calls of its op (the triton grouped MLP has no LoRA yet): it registers an
``unsupported`` check, and dispatch with the call's arguments (``Op.run``) skips it for those calls, or raises
``BackendUnavailableError`` naming what it lacks when that tier is forced.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

TIERS = ("reference", "cpu", "triton", "cuda")
ENV_VAR = "FLUX_ENGINE_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A forced tier cannot run this op on these inputs."""


def forced_tier() -> Optional[str]:
    """The tier named by ``FLUX_ENGINE_BACKEND``, or None. Read on every call so tests can change it."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if not value:
        return None
    if value not in TIERS:
        raise BackendUnavailableError(f"{ENV_VAR}={value!r} is not one of {', '.join(TIERS)}")
    return value


@functools.lru_cache(maxsize=None)
def native_extension():
    """``flux_engine._C`` or None when the extension was not built."""
    try:
        return importlib.import_module("flux_engine._C")
    except ImportError:
        return None


@functools.lru_cache(maxsize=None)
def _native_has_cuda() -> bool:
    ext = native_extension()
    return bool(ext is not None and ext.has_cuda())


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def tier_unavailable_reason(tier: str, device: torch.device) -> Optional[str]:
    """Why ``tier`` cannot run on ``device`` in this process, or None when it can."""
    if tier == "reference":
        return None
    if tier == "cpu":
        if device.type != "cpu":
            return f"the cpu tier runs on CPU tensors, got {device.type} tensors"
        if native_extension() is None:
            return "flux_engine._C is not built (pip install --no-build-isolation -e .)"
        return None
    if tier == "cuda":
        if device.type != "cuda":
            return f"the cuda tier runs on CUDA tensors, got {device.type} tensors"
        if not _native_has_cuda():
            return "flux_engine._C was built without CUDA kernels (torch without CUDA or no nvcc at build time)"
        return None
    if tier == "triton":
        if not _triton_importable():
            return "triton is not installed"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreting():
            return None
        return f"the triton tier needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 (got {device.type})"
    raise BackendUnavailableError(f"unknown tier {tier!r}")


class Op:
    """A public op: a reference implementation plus optional faster tiers.

    ``preference`` orders the tiers tried by default, fastest first; ``reference`` is always last.
    """

    def __init__(self, name: str, reference: Callable, preference: Sequence[str] = ("cuda", "triton", "cpu")):
        self.name = name
        self.impls: Dict[str, Callable] = {"reference": reference}
        self.unsupported: Dict[str, Callable[..., Optional[str]]] = {}
        self.preference = tuple(preference) + ("reference",)

    def register(
        self, tier: str, unsupported: Optional[Callable[..., Optional[str]]] = None
    ) -> Callable[[Callable], Callable]:
        """Decorator registering ``fn`` as ``tier``.

        ``unsupported``, when given, takes the op's arguments and returns None for calls the tier handles,
        else what it lacks, completing "the <tier> tier does not support ..." (e.g. ``"lora yet"``).
        """
        if tier not in TIERS:
            raise ValueError(f"unknown tier {tier!r}")

        def decorator(fn: Callable) -> Callable:
            self.impls[tier] = fn
            if unsupported is not None:
                self.unsupported[tier] = unsupported
            return fn

        return decorator

    def _lacks(self, tier: str, call: Optional[Tuple[tuple, dict]]) -> Optional[str]:
        check = self.unsupported.get(tier)
        if check is None or call is None:
            return None
        args, kwargs = call
        return check(*args, **kwargs)

    def select(self, device: torch.device, call: Optional[Tuple[tuple, dict]] = None) -> Callable:
        """The implementation to run for inputs on ``device``.

        With ``call = (args, kwargs)`` of the op, tiers whose ``unsupported`` check rejects that call are
        skipped (forced: raise); without it only the device decides. While dynamo traces: the reference.
        """
        if torch.compiler.is_compiling():
            return self.impls["reference"]
        tier = forced_tier()
        if tier is not None:
            if tier not in self.impls:
                have = ", ".join(t for t in TIERS if t in self.impls)
                raise BackendUnavailableError(f"{self.name}: no {tier} tier (available tiers: {have})")
            reason = tier_unavailable_reason(tier, device)
            if reason is not None:
                raise BackendUnavailableError(f"{self.name}: {ENV_VAR}={tier} cannot run: {reason}")
            lacking = self._lacks(tier, call)
            if lacking is not None:
                raise BackendUnavailableError(f"{self.name}: the {tier} tier does not support {lacking}")
            return self.impls[tier]
        for tier in self.preference:
            if tier in self.impls and tier_unavailable_reason(tier, device) is None and self._lacks(tier, call) is None:
                # The interpreter is for testing kernels, never a default: it is orders slower than torch.
                if tier == "triton" and device.type != "cuda":
                    continue
                return self.impls[tier]
        return self.impls["reference"]

    def run(self, device: torch.device, *args, **kwargs):
        """Run the call on the tier chosen for ``device`` and these arguments."""
        return self.select(device, (args, kwargs))(*args, **kwargs)

    def tier(self, device: torch.device) -> str:
        """Name of the tier ``select`` would pick (for logs and benchmarks)."""
        fn = self.select(device)
        return next(t for t, f in self.impls.items() if f is fn)
