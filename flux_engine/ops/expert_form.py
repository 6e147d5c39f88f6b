"""How one expert turns its gate_up output into the down projection's input: the activation, gating and the
gate/up row layout of the expert forms transformers runs.

``gu = x W1^T (+ b1)`` has ``2I`` columns (gated) or ``I`` (ungated); ``h = form(gu): [., I]`` feeds ``down``.

- gated, concatenated (Mixtral, Qwen, OLMoE, DeepSeek): rows ``[0, I)`` are the gate, ``[I, 2I)`` the up;
  ``h = act(gate) * up``.
- gated, interleaved (gpt-oss): row ``2i`` is gate ``i``, row ``2i + 1`` up ``i``.
- ungated (Nemotron-H's experts, ``has_gate=False``, relu2): ``W1`` is the up projection ``[E, I, H]``;
  ``h = act(up)``.
- clamped SwiGLU (gpt-oss, ``limit`` set): ``gate = min(gate, limit)``, ``up = clamp(up, -limit, limit)``,
  ``h = (up + 1) * gate * sigmoid(alpha * gate)``.

A form is frozen and hashable: the Triton kernels take it as compile-time constants (one kernel for every form).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "relu2")


@dataclass(frozen=True)
class ExpertForm:
    """How one expert turns its gate_up output into the down projection's input.

    Attributes:
        activation: ``"silu"`` | ``"gelu"`` (exact, erf) | ``"gelu_tanh"`` (tanh approximation) | ``"relu"`` |
            ``"relu2"`` (``relu(v)^2``, Nemotron-H).
        gated: True: ``gate_up [E, 2I, H]``, ``h = act(gate) * up``; False: ``gate_up [E, I, H]`` is the up
            projection, ``h = act(up)``.
        interleaved: gate/up rows interleaved (row ``2i`` gate, ``2i + 1`` up: gpt-oss) instead of gate rows first.
        limit: gpt-oss's clamped SwiGLU when set (activation "silu", gated): ``gate.clamp(max=limit)``,
            ``up.clamp(-limit, limit)``, ``h = (up + 1) * gate * sigmoid(alpha * gate)``.
        alpha: the sigmoid's slope of the clamped SwiGLU (only with ``limit``).
    """

    activation: str = "silu"
    gated: bool = True
    interleaved: bool = False
    limit: Optional[float] = None
    alpha: float = 1.702

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"ExpertForm.activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        for name in ("gated", "interleaved"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"ExpertForm.{name} must be a bool, got {getattr(self, name)!r}")
        if self.interleaved and not self.gated:
            raise ValueError("ExpertForm.interleaved needs gated=True (an ungated expert has no gate rows)")
        if not _is_real(self.alpha) or self.alpha <= 0:
            raise ValueError(f"ExpertForm.alpha must be a positive finite number, got {self.alpha!r}")
        if self.limit is not None:
            if not _is_real(self.limit) or self.limit <= 0:
                raise ValueError(f"ExpertForm.limit must be a positive finite number or None, got {self.limit!r}")
            if self.activation != "silu" or not self.gated:
                raise ValueError(
                    "ExpertForm.limit (clamped SwiGLU) needs activation='silu' and gated=True, got "
                    f"activation={self.activation!r}, gated={self.gated}"
                )
            object.__setattr__(self, "limit", float(self.limit))
        object.__setattr__(self, "alpha", float(self.alpha))

    def gate_up_rows(self, intermediate: int) -> int:
        """Rows of one expert's gate_up for intermediate size ``I``: ``2I`` gated, ``I`` ungated."""
        return 2 * intermediate if self.gated else intermediate

    def split(self, gu: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(gate, up)`` ``[..., I]`` views of gated pre-activations ``gu: [..., 2I]`` in this form's row layout."""
        if self.interleaved:
            return gu[..., 0::2], gu[..., 1::2]
        return gu.chunk(2, dim=-1)

    def apply(self, gu: torch.Tensor) -> torch.Tensor:
        """``h: [..., I]`` from ``gu: [..., 2I]`` (or ``[..., I]`` ungated); differentiable, in gu's dtype."""
        if not self.gated:
            return activate(self.activation, gu)
        gate, up = self.split(gu)
        if self.limit is not None:
            gate = gate.clamp(max=self.limit)
            up = up.clamp(-self.limit, self.limit)
            return (up + 1) * gate * torch.sigmoid(self.alpha * gate)
        return activate(self.activation, gate) * up


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def activate(activation: str, v: torch.Tensor) -> torch.Tensor:
    """One of ``ACTIVATIONS`` applied elementwise (torch's definitions: the oracle of the kernels)."""
    if activation == "silu":
        return F.silu(v)
    if activation == "gelu":
        return F.gelu(v)
    if activation == "gelu_tanh":
        return F.gelu(v, approximate="tanh")
    if activation == "relu2":
        return F.relu(v).square()
    return F.relu(v)


SILU = ExpertForm()
