"""Router scoring: softmax or sigmoid over expert logits, top-k, optional renormalisation and scale."""

from __future__ import annotations

from typing import Tuple

import torch

from flux_engine.backend import Op
from flux_engine.ops._checks import check_floating, check_positive_int, check_tensor

SCORINGS = ("softmax", "sigmoid")


def _scores(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    logits = logits.float()
    return torch.softmax(logits, dim=-1) if scoring == "softmax" else torch.sigmoid(logits)


def _weights(scores: torch.Tensor, ids: torch.Tensor, renormalize: bool, scaling_factor: float) -> torch.Tensor:
    weights = scores.gather(1, ids.long())
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * scaling_factor


def route_reference(
    logits: torch.Tensor, k: int, scoring: str, renormalize: bool, scaling_factor: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    scores = _scores(logits, scoring)
    ids = torch.topk(scores, k, dim=-1).indices
    return _weights(scores, ids, renormalize, scaling_factor), ids.to(torch.int32)


_op = Op("route", route_reference, preference=("triton",))


@_op.register("triton")
def _route_triton(logits, k, scoring, renormalize, scaling_factor):
    from flux_engine.triton_kernels.route import route as kernel

    return kernel(logits, k, scoring, renormalize, scaling_factor)


def route(
    logits: torch.Tensor,
    k: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = True,
    scaling_factor: float = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pick ``k`` experts per token.

    Args:
        logits: ``[T, E]`` router logits (any float dtype; scored in fp32).
        k: experts per token, ``1 <= k <= E``.
        scoring: ``"softmax"`` over the E logits or elementwise ``"sigmoid"``.
        renormalize: divide the k selected scores by their sum.
        scaling_factor: multiply the final weights (DeepSeek's routed scaling factor).

    Returns:
        ``topk_weights: [T, k]`` float32 (differentiable in ``logits``), ``topk_ids: [T, k]`` int32, ordered by
        descending score.
    """
    check_tensor("logits", logits, ndim=2)
    check_floating("logits", logits)
    check_positive_int("k", k)
    if k > logits.shape[1]:
        raise ValueError(f"k={k} exceeds the number of experts E={logits.shape[1]} in logits")
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    impl = _op.select(logits.device)
    weights, ids = impl(logits, k, scoring, bool(renormalize), float(scaling_factor))
    if impl is not route_reference and logits.requires_grad and torch.is_grad_enabled():
        # Kernels pick the experts; the weights are recomputed from those ids so the router gets gradients.
        weights = _weights(_scores(logits, scoring), ids, bool(renormalize), float(scaling_factor))
    return weights, ids


route.op = _op
