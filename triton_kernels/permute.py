"""Routing plan (layout: ``flux_engine.ops.permute``) as a counting sort over token blocks, no host sync.

Tokens are cut into blocks of ``BLOCK_T``. A block's routing is a 0/1 ``[BLOCK_T, E_PAD]`` tile ``used[t, e]``
("token t has a row on physical expert e"): setting a bit once per slot collapses duplicate (token, expert)
pairs by construction. Three launches, every grid sized from ``T`` alone:

1. ``_count_kernel``: per block, ``counts[b, e] = sum_t used[t, e]``.
2. ``_scan_kernel``: per tile of experts, the exclusive scan of ``counts`` over blocks (in place) and the
   expert totals.
3. ``_place_kernel``: ``expert_offsets`` = exclusive scan of the totals; the row of (t, e) is
   ``offsets[e] + counts[b, e] + (earlier tokens of block b using e)``. Rows of expert e from block b follow
   those of earlier blocks and tokens ascend inside a block, so tokens ascend within each expert: the
   reference's order, bit for bit, with no atomics anywhere.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from flux_engine.ops.permute import RoutingPlan

# Elements of the [BLOCK_T, E_PAD] membership tile a program holds.
_TILE = 4096
_MAX_BLOCK_T = 64
# Blocks per step of the scan kernel's sweep, and experts per scan program.
_SCAN_CHUNK = 64
_SCAN_EXPERTS = 64


@triton.jit
def _membership(
    ids_ptr,
    map_ptr,
    tokens,
    token_ok,
    experts,
    stride_t,
    stride_k,
    K: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    HAS_MAP: tl.constexpr,
):
    """``used: [BLOCK_T, E_PAD]`` int32, 1 where the token has a slot on that physical expert."""
    used = tl.zeros((BLOCK_T, E_PAD), dtype=tl.int32)
    for j in range(K):
        phys = _physical(ids_ptr, map_ptr, tokens, token_ok, j, stride_t, stride_k, HAS_MAP)
        used = tl.where((phys[:, None] == experts[None, :]) & token_ok[:, None], 1, used)
    return used


@triton.jit
def _physical(ids_ptr, map_ptr, tokens, token_ok, j, stride_t, stride_k, HAS_MAP: tl.constexpr):
    """``[BLOCK_T]`` int32 physical expert of slot ``j`` of each token."""
    ids = tl.load(ids_ptr + tokens.to(tl.int64) * stride_t + j * stride_k, mask=token_ok, other=0).to(tl.int32)
    if HAS_MAP:
        ids = tl.load(map_ptr + ids, mask=token_ok, other=0).to(tl.int32)
    return ids


@triton.jit
def _count_kernel(
    ids_ptr,
    map_ptr,
    counts_ptr,
    T,
    E,
    stride_t,
    stride_k,
    K: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    HAS_MAP: tl.constexpr,
):
    """``counts: [NB, E]`` int32 rows per (token block, expert); grid ``NB = cdiv(T, BLOCK_T)``."""
    block = tl.program_id(0)
    tokens = block * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.arange(0, E_PAD)
    used = _membership(ids_ptr, map_ptr, tokens, tokens < T, experts, stride_t, stride_k, K, E_PAD, BLOCK_T, HAS_MAP)
    tl.store(counts_ptr + block * E + experts, tl.sum(used, axis=0), mask=experts < E)


@triton.jit
def _scan_kernel(counts_ptr, totals_ptr, NB, E, CHUNK: tl.constexpr, BLOCK_E: tl.constexpr):
    """``counts: [NB, E]`` -> exclusive prefix over blocks (in place), ``totals: [E]``; grid ``cdiv(E, BLOCK_E)``."""
    experts = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    expert_ok = experts < E
    lanes = tl.arange(0, CHUNK)
    running = tl.zeros((BLOCK_E,), dtype=tl.int32)
    # A while loop: NB is a runtime value, and Triton 3.6's interpreter rejects runtime range() bounds.
    b0 = 0
    while b0 < NB:
        blocks = b0 + lanes
        ptrs = counts_ptr + blocks[:, None] * E + experts[None, :]
        mask = (blocks[:, None] < NB) & expert_ok[None, :]
        c = tl.load(ptrs, mask=mask, other=0)
        tl.store(ptrs, tl.cumsum(c, axis=0) - c + running[None, :], mask=mask)
        running += tl.sum(c, axis=0)
        b0 += CHUNK
    tl.store(totals_ptr + experts, running, mask=expert_ok)


@triton.jit
def _place_kernel(
    ids_ptr,
    map_ptr,
    prefix_ptr,
    totals_ptr,
    sorted_token_ids_ptr,
    expert_offsets_ptr,
    slot_rows_ptr,
    T,
    E,
    stride_t,
    stride_k,
    K: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    HAS_MAP: tl.constexpr,
):
    """Rows of every (token, expert) of one block: ``sorted_token_ids[row] = t``, ``slot_rows[t, j] = row``."""
    block = tl.program_id(0)
    tokens = block * BLOCK_T + tl.arange(0, BLOCK_T)
    token_ok = tokens < T
    experts = tl.arange(0, E_PAD)
    expert_ok = experts < E
    used = _membership(ids_ptr, map_ptr, tokens, token_ok, experts, stride_t, stride_k, K, E_PAD, BLOCK_T, HAS_MAP)

    totals = tl.load(totals_ptr + experts, mask=expert_ok, other=0)
    offsets = tl.cumsum(totals, axis=0) - totals
    if block == 0:
        tl.store(expert_offsets_ptr + experts, offsets, mask=expert_ok)
        tl.store(expert_offsets_ptr + E, tl.sum(totals, axis=0))
    base = offsets + tl.load(prefix_ptr + block * E + experts, mask=expert_ok, other=0)
    rows = base[None, :] + tl.cumsum(used, axis=0) - used

    token_tile = tl.broadcast_to(tokens[:, None], (BLOCK_T, E_PAD))
    tl.store(sorted_token_ids_ptr + rows, token_tile, mask=used != 0)
    for j in range(K):
        phys = _physical(ids_ptr, map_ptr, tokens, token_ok, j, stride_t, stride_k, HAS_MAP)
        row = tl.sum(tl.where(experts[None, :] == phys[:, None], rows, 0), axis=1)
        tl.store(slot_rows_ptr + tokens.to(tl.int64) * K + j, row, mask=token_ok)


def permute(topk_ids: torch.Tensor, num_experts: int, expert_map: Optional[torch.Tensor]) -> RoutingPlan:
    """Triton tier of ``flux_engine.ops.permute``; same arguments as ``permute_reference``.

    Args:
        topk_ids: ``[T, k]`` integer original expert ids (validated by the op).
        num_experts: ``E`` physical experts.
        expert_map: optional ``[E_orig]`` integer map to physical ids.

    Returns:
        A ``RoutingPlan`` identical to the reference's, bit for bit.
    """
    T, k = topk_ids.shape
    device = topk_ids.device
    E = num_experts
    sorted_token_ids = torch.full((T * k,), T, dtype=torch.int32, device=device)
    slot_rows = torch.empty((T, k), dtype=torch.int32, device=device)
    if T == 0 or k == 0:
        return RoutingPlan(sorted_token_ids, torch.zeros(E + 1, dtype=torch.int32, device=device), slot_rows, T, E)
    expert_offsets = torch.empty(E + 1, dtype=torch.int32, device=device)
    e_pad = triton.next_power_of_2(E)
    block_t = max(1, min(_MAX_BLOCK_T, _TILE // e_pad, triton.next_power_of_2(T)))
    num_blocks = triton.cdiv(T, block_t)
    counts = torch.empty((num_blocks, E), dtype=torch.int32, device=device)
    totals = torch.empty(E, dtype=torch.int32, device=device)
    emap = topk_ids if expert_map is None else expert_map  # never read without HAS_MAP
    common = dict(K=k, E_PAD=e_pad, BLOCK_T=block_t, HAS_MAP=expert_map is not None)
    strides = (topk_ids.stride(0), topk_ids.stride(1))
    _count_kernel[(num_blocks,)](topk_ids, emap, counts, T, E, *strides, **common)
    block_e = min(_SCAN_EXPERTS, e_pad)
    _scan_kernel[(triton.cdiv(E, block_e),)](counts, totals, num_blocks, E, CHUNK=_SCAN_CHUNK, BLOCK_E=block_e)
    _place_kernel[(num_blocks,)](
        topk_ids, emap, counts, totals, sorted_token_ids, expert_offsets, slot_rows, T, E, *strides, **common
    )
    return RoutingPlan(sorted_token_ids, expert_offsets, slot_rows, T, E)
