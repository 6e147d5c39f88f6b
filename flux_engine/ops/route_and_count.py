"""Profiling's router step in one op: router GEMM, scoring, top-k, and in-place per-expert accumulation."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from flux_engine.backend import Op
from flux_engine.ops._checks import check_floating, check_positive_int, check_shape, check_tensor
from flux_engine.ops.expert_counts import expert_counts
from flux_engine.ops.route import SCORINGS, route


def route_and_count_reference(
    x, router_weight, k, scoring, renormalize, scaling_factor, counts_out, attn_sums_out, token_weights, token_mask,
    return_logits,
):  # fmt: skip
    logits = torch.nn.functional.linear(x, router_weight)
    weights, ids = route(logits, k, scoring=scoring, renormalize=renormalize, scaling_factor=scaling_factor)
    E = router_weight.shape[0]
    keep = None if token_mask is None else (token_mask != 0).to(torch.float32)
    if keep is None:
        expert_counts(ids, E, out=counts_out)
    else:
        # Masked tokens weigh 0: exact integer counts from a float histogram of 0/1 weights.
        counts_out += expert_counts(ids, E, keep).round().to(torch.int64)
    if attn_sums_out is not None and token_weights is not None:
        tw = token_weights.float() if keep is None else token_weights.float() * keep
        expert_counts(ids, E, tw, out=attn_sums_out)
    return weights, ids, logits if return_logits else None


_op = Op("route_and_count", route_and_count_reference, preference=("triton",))


@_op.register("triton")
def _route_and_count_triton(*args):
    from flux_engine.triton_kernels.route_and_count import route_and_count as kernel

    return kernel(*args)


def route_and_count(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    k: int,
    *,
    counts_out: torch.Tensor,
    attn_sums_out: Optional[torch.Tensor] = None,
    token_weights: Optional[torch.Tensor] = None,
    token_mask: Optional[torch.Tensor] = None,
    scoring: str = "softmax",
    renormalize: bool = True,
    scaling_factor: float = 1.0,
    return_logits: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Route ``x`` through a linear router and accumulate per-expert statistics in place (no host sync).

    Args:
        x: ``[T, H]`` hidden states; router_weight: ``[E, H]`` (``logits = x @ router_weight^T``).
        k: experts per token.
        counts_out: ``[E]`` int64, ``counts_out[e] += `` number of counted tokens that chose ``e``.
        attn_sums_out: optional ``[E]`` float32, ``+= `` sum of ``token_weights`` of the counted tokens that chose e.
        token_weights: ``[T]`` float weights (e.g. received attention), required with ``attn_sums_out``.
        token_mask: optional ``[T]`` (bool or int): tokens with 0 are routed but not counted (padding).
        scoring, renormalize, scaling_factor: as ``flux_engine.ops.route``.
        return_logits: also return the ``[T, E]`` logits (x's dtype).

    Returns:
        ``(topk_weights [T, k] float32, topk_ids [T, k] int32, logits or None)``. The Triton tier fuses everything
        into one kernel (logits accumulated in fp32, so near-ties may pick differently from the reference's
        x-dtype logits for 16-bit inputs).
    """
    check_tensor("x", x, ndim=2)
    check_tensor("router_weight", router_weight, ndim=2)
    check_floating("x", x)
    check_floating("router_weight", router_weight)
    if router_weight.dtype != x.dtype:
        # One GEMM dtype: a bf16 x against fp32 router weights has no single tensor-core dot.
        raise TypeError(
            f"router_weight ({router_weight.dtype}) must have x's dtype ({x.dtype}): cast one, e.g. "
            "router_weight.to(x.dtype)"
        )
    check_positive_int("k", k)
    T, H = x.shape
    E = router_weight.shape[0]
    if router_weight.shape[1] != H:
        raise ValueError(f"router_weight must be [E, H={H}], got {tuple(router_weight.shape)}")
    if k > E:
        raise ValueError(f"k={k} exceeds the number of experts E={E}")
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    check_tensor("counts_out", counts_out, ndim=1)
    check_shape("counts_out", counts_out, (E,), "one count per expert")
    if counts_out.dtype != torch.int64:
        raise TypeError(f"counts_out must be int64, got {counts_out.dtype}")
    if attn_sums_out is not None:
        check_shape("attn_sums_out", attn_sums_out, (E,), "one sum per expert")
        if attn_sums_out.dtype != torch.float32:
            raise TypeError(f"attn_sums_out must be float32, got {attn_sums_out.dtype}")
        if token_weights is None:
            raise ValueError("attn_sums_out needs token_weights")
    if token_weights is not None:
        check_shape("token_weights", token_weights, (T,), "one weight per token")
        token_weights = token_weights.contiguous()
    if token_mask is not None:
        check_shape("token_mask", token_mask, (T,), "one flag per token")
        token_mask = token_mask.contiguous()
    for name, t in (("router_weight", router_weight), ("counts_out", counts_out), ("attn_sums_out", attn_sums_out),
                    ("token_weights", token_weights), ("token_mask", token_mask)):  # fmt: skip
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} must be on {x.device}, got {t.device}")
    impl = _op.select(x.device)
    return impl(
        x, router_weight, k, scoring, bool(renormalize), float(scaling_factor), counts_out, attn_sums_out,
        token_weights, token_mask, bool(return_logits),
    )  # fmt: skip


route_and_count.op = _op
