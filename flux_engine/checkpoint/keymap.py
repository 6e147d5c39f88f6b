"""Key mapping: which checkpoint key holds which slice of which model tensor.

The model's own names are the transformers v5 names (see ``flux_engine.models.moe``). A layout differs from
them only inside MoE blocks: the block may be named differently (``block_sparse_moe``), some sub-modules renamed
(``shared_experts``), and the stacked experts ``experts.gate_up_proj [E, 2I, H]`` / ``experts.down_proj
[E, H, I]`` split into one key per expert and projection. ``entries`` turns a ``KeyLayout`` into the full list
of ``Entry`` objects, which drives both loading (file key -> model slice) and saving (model slice -> file key),
so the two directions cannot drift apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from flux_engine.models import MoEForCausalLM

Index = Tuple[Union[int, slice], ...]

_MLP_NAME = re.compile(r"model\.layers\.(\d+)\.mlp\.(.+)")
_STACKS = ("experts.gate_up_proj", "experts.down_proj")
EXPERT_MAP = "experts.expert_map"


@dataclass(frozen=True)
class ExpertKeys:
    """File keys of routed expert ``{e}``'s projections, relative to the MoE block: ``gate``/``up`` ``[I, H]``,
    ``down`` ``[H, I]``."""

    gate: str
    up: str
    down: str


@dataclass(frozen=True)
class KeyLayout:
    """How a layout names the model's tensors.

    Attributes:
        block: the name of an MoE layer's ``mlp`` module in the file (``model.layers.{i}.<block>.``).
        renames: ``(model prefix, file prefix)`` pairs for names inside the MoE block; the first match applies.
        experts: per-expert keys, or None to store the stacks ``experts.gate_up_proj`` / ``experts.down_proj``
            as they are.
        expert_map: whether the file carries the ``experts.expert_map`` buffers (only the native layout does;
            the others imply the identity map).
        transposed: stacked experts are stored ``[E, in, out]`` (gpt-oss: ``gate_up_proj [E, H, 2I]``,
            ``down_proj [E, I, H]``), the transpose of the model's ``[E, out, in]``.
        mxfp4: stacked experts are stored as MXFP4 ``<stack>_blocks`` / ``<stack>_scales`` pairs
            (``checkpoint.mxfp4``, in the model's orientation); the entry names the blocks key.
    """

    block: str = "mlp"
    renames: Tuple[Tuple[str, str], ...] = ()
    experts: Optional[ExpertKeys] = None
    expert_map: bool = False
    transposed: bool = False
    mxfp4: bool = False

    def rename(self, inner: str) -> str:
        for ours, theirs in self.renames:
            if inner.startswith(ours):
                return theirs + inner[len(ours) :]
        return inner


@dataclass(frozen=True)
class Entry:
    """Checkpoint tensor ``key`` holds ``model_tensors(model)[param][index]`` (``index == ()``: the whole tensor;
    otherwise one expert's slice of a stack); ``transposed``: stored with its last two dimensions swapped;
    ``mxfp4``: ``key`` is the MXFP4 blocks, ``scales_key(key)`` the scales."""

    key: str
    param: str
    index: Index = ()
    transposed: bool = False
    mxfp4: bool = False


MXFP4_BLOCKS, MXFP4_SCALES = "_blocks", "_scales"


def scales_key(blocks_key: str) -> str:
    return blocks_key[: -len(MXFP4_BLOCKS)] + MXFP4_SCALES


def model_tensors(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Parameters and persistent buffers by name, each tensor once (a tied LM head is listed as the embedding)."""
    seen, out = set(), {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out[name] = tensor
    return out


def entries(model: MoEForCausalLM, keys: KeyLayout) -> List[Entry]:
    """Every checkpoint tensor of ``model`` in layout ``keys``; together they cover each model tensor exactly once
    (bar the expert maps of layouts that imply them)."""
    out: List[Entry] = []
    for name, tensor in model_tensors(model).items():
        match = _MLP_NAME.fullmatch(name)
        if match is None or not model.config.is_moe_layer(int(match[1])):
            out.append(Entry(name, name))
            continue
        prefix, inner = f"model.layers.{match[1]}.{keys.block}.", match[2]
        if inner == EXPERT_MAP:
            if keys.expert_map:
                out.append(Entry(prefix + inner, name))
        elif inner in _STACKS and keys.experts is not None:
            out.extend(_expert_entries(prefix, name, inner, tensor.shape, keys.experts))
        elif inner in _STACKS and keys.mxfp4:
            out.append(Entry(prefix + inner + MXFP4_BLOCKS, name, mxfp4=True))
        elif inner in _STACKS:
            out.append(Entry(prefix + inner, name, transposed=keys.transposed))
        else:
            out.append(Entry(prefix + keys.rename(inner), name))
    return out


def _expert_entries(prefix: str, name: str, inner: str, shape: torch.Size, keys: ExpertKeys) -> List[Entry]:
    num_experts = shape[0]
    if inner == "experts.down_proj":
        return [Entry(prefix + keys.down.format(e=e), name, (e,)) for e in range(num_experts)]
    # gate_up_proj stacks gate rows first, then up rows.
    size = shape[1] // 2
    out = []
    for e in range(num_experts):
        out.append(Entry(prefix + keys.gate.format(e=e), name, (e, slice(0, size))))
        out.append(Entry(prefix + keys.up.format(e=e), name, (e, slice(size, 2 * size))))
    return out
