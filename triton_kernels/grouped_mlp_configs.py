"""Block configs of the grouped MLP kernels: checked-in defaults per GPU architecture, opt-in autotuning
persisted on disk.

A config is chosen per (kernel kind, N, K, rows-per-expert bucket, dtype). The bucket is the next power of two
of the mean rows per expert ``T * k / E``: known on the host, so choosing a config never reads the GPU. Lookup:

1. under ``TRITON_INTERPRET=1``: ``INTERPRETER`` (16-wide blocks, the smallest ``tl.dot`` accepts), no tuning;
2. the on-disk cache ``cache_root()/triton/grouped_mlp/<gpu>-triton<version>.json``;
3. with ``FLUX_ENGINE_AUTOTUNE=1``, a miss times every candidate of the architecture's table on the real
   arguments (the launcher passes a ``tune`` callback running the kernel on scratch outputs), and stores the
   fastest in the cache. Off by default: timing synchronises with the GPU and stalls the first step of every
   new shape, which a training loop should opt into, not discover;
4. ``DEFAULTS[arch][family]``: the first entry whose ``rows`` bound covers the bucket.

Kinds and the family of tables they use:
- ``row_gemm``: ``down`` (rows x H, K = I) and ``dx`` (rows x H, K = 2I).
- ``swiglu_gemm``: the two kernels with SwiGLU in the epilogue, which hold about three ``[BLOCK_M, BLOCK_N]``
  fp32 tiles there: ``gate_up`` (its accumulator is ``2 * BLOCK_N`` wide, gate and up) and ``down_bwd``
  (accumulator, gate and up). Half the ``BLOCK_N`` of ``row_gemm``: at 128 x 128 the ``down_bwd`` epilogue
  spills hundreds of bytes per thread on sm_80 and sm_90 (checked by compiling with ptxas).
- ``weight_grad``: ``BLOCK_M x BLOCK_N`` tiles of one expert's weight gradient, ``BLOCK_K`` rows per step of
  the sweep over the expert's rows.
The tables are written for 2-byte dtypes; fp32 halves ``BLOCK_K`` (same shared memory per stage).
A kind over packed int4/int8 weights is named ``<kind>@int4`` / ``<kind>@int8`` (its own cache entries): it uses
its family's table with ``BLOCK_K <= 32``, since the fp32 dequantised weight tile and its integer temporaries
live in registers next to the accumulator (at ``BLOCK_K = 64`` the int4 gate_up kernel spills on sm_90 with
Triton 3.6, checked with ptxas).
"""

from __future__ import annotations

import functools
import json
import os
import re
import threading
from dataclasses import asdict, dataclass, replace
from typing import Callable, Dict, List, Optional

import torch
import triton

from flux_engine.backend import triton_interpreting
from flux_engine.cache import cache_root

AUTOTUNE_ENV = "FLUX_ENGINE_AUTOTUNE"
KIND_FAMILY = {
    "down": "row_gemm",
    "dx": "row_gemm",
    "gate_up": "swiglu_gemm",
    "down_bwd": "swiglu_gemm",
    "weight_grad": "weight_grad",
}


@dataclass(frozen=True)
class BlockConfig:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 3


INTERPRETER = BlockConfig(16, 16, 16, GROUP_M=4, num_warps=1, num_stages=1)

_INF = 1 << 30


def _table(rows_to_config: List[tuple]) -> List[tuple]:
    return [(rows, BlockConfig(*cfg)) for rows, cfg in rows_to_config]


# (max rows per expert, (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)). Small experts get short
# row blocks (little padding waste) and long K steps; from 33 rows per expert on, BLOCK_M >= 64, the M of a
# Hopper wgmma (a 32-row block compiles to mma.sync), and large experts 128x128 tiles. Stages follow shared
# memory: sm_80 164 KiB, sm_86/89 100 KiB, sm_90 228 KiB; bf16 128x128x64 is 32 KiB per stage.
_BIG_SMEM_ROW_GEMM = [(16, (16, 64, 128, 8, 4, 4)), (32, (32, 128, 64, 8, 4, 4)), (256, (64, 128, 64, 8, 4, 4))]
_SMALL_SMEM_ROW_GEMM = [(16, (16, 64, 64, 8, 4, 3)), (32, (32, 64, 64, 8, 4, 3)), (256, (64, 128, 32, 8, 4, 3))]


def _halve_n(table: List[tuple]) -> List[tuple]:
    return [(rows, (m, n // 2, *rest)) for rows, (m, n, *rest) in table]


_SM90 = {
    "row_gemm": _BIG_SMEM_ROW_GEMM + [(_INF, (128, 128, 64, 8, 8, 4))],
    "weight_grad": [(64, (64, 64, 32, 1, 4, 3)), (_INF, (128, 128, 32, 1, 8, 4))],
}
_SM80 = {
    "row_gemm": _BIG_SMEM_ROW_GEMM + [(_INF, (128, 128, 64, 8, 8, 3))],
    "weight_grad": [(64, (64, 64, 32, 1, 4, 3)), (_INF, (128, 128, 32, 1, 8, 3))],
}
_SM86 = {
    "row_gemm": _SMALL_SMEM_ROW_GEMM + [(_INF, (128, 128, 32, 8, 8, 3))],
    "weight_grad": [(64, (64, 64, 32, 1, 4, 2)), (_INF, (128, 64, 32, 1, 4, 3))],
}
DEFAULTS: Dict[str, Dict[str, List[tuple]]] = {
    arch: {
        "row_gemm": _table(t["row_gemm"]),
        "swiglu_gemm": _table(_halve_n(t["row_gemm"])),
        "weight_grad": _table(t["weight_grad"]),
    }
    for arch, t in (("sm_90", _SM90), ("sm_80", _SM80), ("sm_86", _SM86), ("sm_89", _SM86))
}


def arch_of(device: torch.device) -> str:
    """The ``DEFAULTS`` table for ``device``: the closest architecture with at most its shared memory."""
    major, minor = torch.cuda.get_device_capability(device)
    if major in (9, 10):
        return "sm_90"
    if (major, minor) == (8, 0):
        return "sm_80"
    if (major, minor) == (8, 9) or major >= 11:
        return "sm_89"
    return "sm_86"


def rows_bucket(rows: int, num_experts: int) -> int:
    """Next power of two of the mean rows per expert (at least 1)."""
    return triton.next_power_of_2(max(1, -(-rows // max(num_experts, 1))))


PACKED_BLOCK_K = 32


def _for_kind(cfg: BlockConfig, kind: str, dtype: torch.dtype) -> BlockConfig:
    if dtype.itemsize == 4:
        cfg = replace(cfg, BLOCK_K=max(16, cfg.BLOCK_K // 2))
    if "@" in kind:
        cfg = replace(cfg, BLOCK_K=min(cfg.BLOCK_K, PACKED_BLOCK_K))
    return cfg


def _family(kind: str) -> str:
    return KIND_FAMILY[kind.split("@")[0]]


def default_config(arch: str, kind: str, bucket: int, dtype: torch.dtype) -> BlockConfig:
    table = DEFAULTS[arch][_family(kind)]
    cfg = next(cfg for rows, cfg in table if bucket <= rows)
    return _for_kind(cfg, kind, dtype)


def _key(kind: str, N: int, K: int, bucket: int, dtype: torch.dtype) -> str:
    return f"{kind}|N={N}|K={K}|rows={bucket}|{str(dtype).replace('torch.', '')}"


class _DiskCache:
    """Tuned configs of one GPU model and Triton version, in one JSON file."""

    def __init__(self, path):
        self.path = path
        self.lock = threading.Lock()
        self.entries: Optional[Dict[str, dict]] = None

    def _load(self) -> Dict[str, dict]:
        try:
            with open(self.path, encoding="utf-8") as f:
                return json.load(f)["entries"]
        except (OSError, ValueError, KeyError):
            return {}

    def get(self, key: str) -> Optional[BlockConfig]:
        with self.lock:
            if self.entries is None:
                self.entries = self._load()
            entry = self.entries.get(key)
        return None if entry is None else BlockConfig(**entry)

    def put(self, key: str, cfg: BlockConfig) -> None:
        from flux_engine.data.records import atomic_write

        with self.lock:
            # Merge with what other processes wrote since this one loaded the file.
            self.entries = {**self._load(), **(self.entries or {}), key: asdict(cfg)}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            payload = {"version": 1, "entries": self.entries}
            atomic_write(self.path, lambda f: json.dump(payload, f, indent=1, sort_keys=True))


@functools.lru_cache(maxsize=None)
def _disk_cache(device_name: str) -> _DiskCache:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-")
    return _DiskCache(cache_root() / "triton" / "grouped_mlp" / f"{slug}-triton{triton.__version__}.json")


def _candidates(arch: str, kind: str, dtype: torch.dtype) -> List[BlockConfig]:
    seen: List[BlockConfig] = []
    for _, cfg in DEFAULTS[arch][_family(kind)]:
        for variant in (cfg, replace(cfg, num_warps=8 if cfg.num_warps == 4 else 4)):
            variant = _for_kind(variant, kind, dtype)
            if variant not in seen:
                seen.append(variant)
    return seen


def _autotune(candidates: List[BlockConfig], tune: Callable[[BlockConfig], None]) -> Optional[BlockConfig]:
    """The fastest candidate by ``triton.testing.do_bench``, or None when none fits this GPU."""
    from triton.runtime.errors import OutOfResources
    from triton.testing import do_bench

    timings = {}
    for cfg in candidates:
        try:
            timings[cfg] = do_bench(lambda: tune(cfg), warmup=5, rep=25)
        except OutOfResources:
            continue  # shared memory or registers exceeded on this GPU
    return min(timings, key=timings.get) if timings else None


def config_for(
    kind: str,
    N: int,
    K: int,
    bucket: int,
    dtype: torch.dtype,
    device: torch.device,
    tune: Optional[Callable[[BlockConfig], None]] = None,
) -> BlockConfig:
    """Block config of a ``kind`` launch (see the module docstring for the lookup order).

    Args:
        kind: one of ``KIND_FAMILY``, with ``@int4``/``@int8`` for packed weights.
        N, K: the launch's output width and reduction length (for ``weight_grad``: the weight's two dims).
        bucket: ``rows_bucket(rows, E)``.
        dtype: element type of the GEMM operands.
        device: where the kernel runs.
        tune: runs the kernel once with a given config on scratch outputs; used only when autotuning.
    """
    if device.type != "cuda" or triton_interpreting():
        return INTERPRETER
    cache = _disk_cache(torch.cuda.get_device_name(device))
    key = _key(kind, N, K, bucket, dtype)
    cfg = cache.get(key)
    if cfg is not None:
        return cfg
    arch = arch_of(device)
    if tune is not None and os.environ.get(AUTOTUNE_ENV) == "1":
        cfg = _autotune(_candidates(arch, kind, dtype), tune)
        if cfg is not None:
            cache.put(key, cfg)
            return cfg
    return default_config(arch, kind, bucket, dtype)
