"""The ops contract: each public function validates its inputs and dispatches to a tier (see backend.py)."""

from flux_engine.ops.expert_counts import expert_counts
from flux_engine.ops.expert_form import SILU, ExpertForm
from flux_engine.ops.grouped_mlp import ExpertLoRA, TunedExperts, grouped_mlp
from flux_engine.ops.permute import RoutingPlan, permute
from flux_engine.ops.quantize import QuantizedTensor, dequantize, quantize
from flux_engine.ops.quantized_grouped_mlp import quantized_grouped_mlp
from flux_engine.ops.received_attention import received_attention
from flux_engine.ops.route import route
from flux_engine.ops.route_and_count import route_and_count

__all__ = [
    "route",
    "expert_counts",
    "permute",
    "RoutingPlan",
    "grouped_mlp",
    "ExpertLoRA",
    "TunedExperts",
    "ExpertForm",
    "SILU",
    "quantize",
    "dequantize",
    "QuantizedTensor",
    "quantized_grouped_mlp",
    "received_attention",
    "route_and_count",
]
