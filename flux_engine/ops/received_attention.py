"""Received attention: how much attention probability each token receives, averaged over heads and queries.

``out[b, j] = 1 / (Hq * T) * sum_h sum_i P[b, h, i, j]`` with ``P = softmax(q k^T / sqrt(D))`` over keys (causal:
query ``i`` sees keys ``j <= i``). The mean over queries divides by ``T`` (all queries, also those that cannot see
``j`` under causality), so every row sums to 1 over its ``T`` tokens; under causal masking early tokens receive
more (token 0 is seen by every query). Profiling's attention-weighted importance is this score averaged over the
tokens routed to an expert.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from flux_engine.backend import Op
from flux_engine.ops._checks import check_floating, check_tensor


def received_attention_reference(q: torch.Tensor, k: torch.Tensor, causal: bool, mask=None) -> torch.Tensor:
    """Materialises ``[B, Hq, T, T]``: for small T and tests."""
    B, HQ, T, D = q.shape
    k = k.float().repeat_interleave(HQ // k.shape[1], dim=1)
    s = torch.matmul(q.float(), k.transpose(-1, -2)) / math.sqrt(D)
    visible = torch.ones(T, T, dtype=torch.bool, device=q.device)
    if causal:
        visible = visible.tril()
    visible = visible[None, None].expand(B, 1, T, T)
    queries = torch.full((B, 1), float(T), device=q.device)
    if mask is not None:
        valid = mask != 0
        visible = visible & valid[:, None, :, None] & valid[:, None, None, :]
        queries = valid.sum(dim=1, keepdim=True).clamp(min=1).float()
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
    return p.sum(dim=(1, 2)) / (HQ * queries)


_op = Op("received_attention", received_attention_reference, preference=("triton",))


@_op.register("triton")
def _received_attention_triton(q, k, causal, mask):
    from flux_engine.triton_kernels.received_attention import received_attention as kernel

    return kernel(q, k, causal, mask)


def received_attention(
    q: torch.Tensor, k: torch.Tensor, causal: bool = True, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Mean attention probability each key token receives, over query heads and queries.

    Args:
        q: ``[B, Hq, T, D]`` queries (after RoPE).
        k: ``[B, Hkv, T, D]`` keys (after RoPE); ``Hq`` must be a multiple of ``Hkv`` (GQA).
        causal: query ``i`` attends keys ``j <= i``.
        mask: optional ``[B, T]`` (1 = token, 0 = padding): padded tokens neither attend nor are attended, and
            the mean over queries divides by the number of real tokens ``n_b`` instead of ``T``.

    Returns:
        ``[B, T]`` float32; ``out[b, j] = sum_{h, i} P[b, h, i, j] / (Hq * T)``, scale ``1/sqrt(D)``; each row
        sums to 1 (with ``mask``: sums over real queries, divided by ``Hq * n_b``; padded keys get 0).
        The Triton tier never materialises the ``T x T`` probabilities.
    """
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4)
    check_floating("q", q)
    check_floating("k", k)
    B, HQ, T, D = q.shape
    if k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(f"k must be [B={B}, Hkv, T={T}, D={D}], got {tuple(k.shape)}")
    if k.shape[1] == 0 or HQ % k.shape[1]:
        raise ValueError(f"query heads Hq={HQ} must be a multiple of key heads Hkv={k.shape[1]}")
    if q.device != k.device:
        raise ValueError(f"q and k must be on one device, got {q.device} and {k.device}")
    if mask is not None:
        check_tensor("mask", mask, ndim=2)
        if tuple(mask.shape) != (B, T) or mask.device != q.device:
            raise ValueError(f"mask must be [B={B}, T={T}] on {q.device}, got {tuple(mask.shape)} on {mask.device}")
    return _op.select(q.device)(q, k, bool(causal), mask)


received_attention.op = _op
