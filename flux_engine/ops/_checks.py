"""Argument validation shared by the public ops.

Shape, dtype and device errors are raised eagerly. Value checks (ids in range) need the values: on
CPU they raise ``ValueError`` at once; on CUDA, and under ``torch.compile`` on any device, they are
device-side asserts (``torch._assert_async``), so the MoE layer never synchronises with the host and
dynamo traces them without a graph break (a violation raises ``RuntimeError`` with the same message
when the assert runs: at once on CPU, at the next sync on CUDA).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_tensor(name: str, t, ndim: Optional[int] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def check_floating(name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def check_integer(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")


def check_same_device(**tensors: Optional[torch.Tensor]) -> torch.device:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {k: v.device for k, v in present.items()}
    first_name, first = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(f"{name} is on {dev} but {first_name} is on {first}: all inputs must share one device")
    return first


def check_dim(name: str, t: torch.Tensor, dim: int, expected: int, what: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(f"{name} has size {t.shape[dim]} in dim {dim}, expected {expected} ({what}); shape {tuple(t.shape)}")


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def device_side(t: torch.Tensor) -> bool:
    """Whether value checks on ``t`` must stay on the device: CUDA tensors, or any tensor while dynamo traces."""
    return t.device.type == "cuda" or torch.compiler.is_compiling()


def check_value(ok: torch.Tensor, message: str) -> None:
    """``ok`` (a bool tensor) holds: a device-side assert (``device_side``), else ``ValueError(message)``."""
    if device_side(ok):
        torch._assert_async(ok, message)
    elif not bool(ok):
        raise ValueError(message)


def check_ids_in_range(name: str, ids: torch.Tensor, upper: int) -> None:
    """All of ``ids`` in ``[0, upper)``."""
    if ids.numel() == 0:
        return
    if device_side(ids):
        torch._assert_async(((ids >= 0) & (ids < upper)).all(), f"{name} out of range [0, {upper})")
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= upper:
        raise ValueError(f"{name} must lie in [0, {upper}), found values in [{lo}, {hi}]")


def check_shape(name: str, t: torch.Tensor, shape: Sequence[int], what: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} ({what}), got {tuple(t.shape)}")
