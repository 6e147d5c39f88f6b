"""How expert tensors, token counts and masks travel in Flower records.

- expert tensors: one ``ArrayRecord``, keys ``"{layer}/{expert}/{name}"`` (layer = MoE layer index);
- token counts: a ``ConfigRecord``, keys ``"{layer}/{expert}"``;
- expert sets (tuning, exploration): a ``ConfigRecord`` entry, a list of flat ids ``layer * E + expert``.
"""

from __future__ import annotations

from typing import Dict, Iterable, List

import torch
from flwr.app import ArrayRecord, ConfigRecord

from flux_engine.aggregation import ExpertKey, Update, UpdateError


def pack_tensors(tensors: Update) -> ArrayRecord:
    return ArrayRecord(
        {f"{l}/{e}/{name}": t.detach().cpu() for (l, e), ts in sorted(tensors.items()) for name, t in ts.items()}
    )


def unpack_tensors(record: ArrayRecord, client: str = "?") -> Update:
    out: Update = {}
    for key, t in record.to_torch_state_dict().items():
        parts = key.split("/")
        if len(parts) != 3 or not (parts[0].isdigit() and parts[1].isdigit()):
            raise UpdateError(f"client {client}: malformed tensor key {key!r} (expected layer/expert/name)")
        out.setdefault((int(parts[0]), int(parts[1])), {})[parts[2]] = t
    return out


def pack_counts(counts: Dict[ExpertKey, int]) -> ConfigRecord:
    return ConfigRecord({f"{l}/{e}": int(n) for (l, e), n in sorted(counts.items())})


def unpack_counts(record: ConfigRecord, client: str = "?") -> Dict[ExpertKey, int]:
    out = {}
    for key, n in record.items():
        l, _, e = key.partition("/")
        if not (l.isdigit() and e.isdigit()):
            raise UpdateError(f"client {client}: malformed token-count key {key!r}")
        out[(int(l), int(e))] = n
    return out


def mask_to_ids(mask: torch.Tensor) -> List[int]:
    """Flat ids of the True entries of a bool ``[L, E]`` mask."""
    return torch.nonzero(mask.reshape(-1)).flatten().tolist()


def ids_to_mask(ids: Iterable[int], num_layers: int, num_experts: int) -> torch.Tensor:
    mask = torch.zeros(num_layers * num_experts, dtype=torch.bool)
    mask[list(ids)] = True
    return mask.view(num_layers, num_experts)
