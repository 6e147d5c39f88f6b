"""Expert profiling on a low-bit copy of the global model (Flux section 5, "Profiling").

``profile(model_or_checkpoint, batches, bits=4)`` runs the model forward over a client's batches on a low-bit copy
(int4 group-wise by default, int8 per-channel, or ``bits=None`` for full precision) and records per MoE layer and
ORIGINAL expert e:

- ``counts[l, e]``: routed (token, slot) pairs that chose e (padding excluded); ``frequency = counts / sum``;
- ``attn_sums[l, e]``: the sum over those pairs of the token's received attention (``ops.received_attention`` of
  the layer's own attention: mean over heads and over the T queries of the probability the token receives;
  each sequence's scores sum to 1); ``importance = attn_sums / counts`` is the paper's ``a_e``;
- ``samples[l][e]``: ids of the samples (sequences) with at least one token routed to e (``D_e``).

What is low-bit. The routed expert stacks are stored at ``bits`` (group size / symmetry as given); every other
large weight at ``dense_bits`` (default 8, per-channel): attention q/k/v/o, dense MLPs (e.g. DeepSeek's first
layers) and shared experts, the embedding (quantized along H, so a lookup dequantizes only the gathered rows) and
the LM head (a tied LM head shares the embedding's quantized table). Kept in full precision: norms, biases and the
routers (small, and they make the very decisions profiling counts; see ``dense_weight_names``). ``dense_bits=None``
quantizes the routed experts only (the behaviour before issue #5). Why int8 for the dense weights by default:
measured on the SmolLM2 -mini presets (bench/results/profiling.md), int4 attention v/o and dense MLPs move the
routing itself (frequency error 15-17%, top-k Jaccard 0.6-0.7 against full precision), int8 ones do not (about
2%), while experts stay int4; the dense weights are the small part of an MoE model.

Memory. A checkpoint folder is streamed (``flux_engine.checkpoint``): the model skeleton is built on the meta
device and only the full-precision tensors (norms, routers, biases) are materialised; every other tensor is
quantized as soon as it is complete (a whole tensor straight from the file, an expert stack stored one key per
expert through one full-precision buffer), in row chunks so quantization temporaries stay small. Peak memory is
about the int4 model + one tensor in full precision, never the full-precision model. An in-memory model is
snapshotted the same way, tensor by tensor, so the caller may keep training it while ``profile_async`` runs. The
forward dequantizes one linear's weight just before use and drops it after (``_QLinear``), so at most one layer's
weights exist in full precision at a time.

Per-layer compute: attention (capturing q/k after RoPE), received attention, the router with in-place per-expert
accumulation (``ops.route_and_count``: one fused kernel on GPU, no host sync), the quantized grouped MLP
(``ops.quantized_grouped_mlp``: packed weights read directly by the Triton tier). Sample sets are gathered on the
device per batch and read back once at the end. Layers after the last MoE layer, the final norm and the LM head
cannot change a profile and are not run.

Kept between rounds. ``prepare`` returns the copy (``LowBitModel``); ``profile`` / ``profile_async`` accept it
in place of a model, and ``LowBitModel.set_expert`` re-quantises one expert whose weights changed (a Flux client
folds the new global adapters of the experts that changed and re-quantises those alone, ``flux_engine.flux_round``).

Padding (``attention_mask`` 0) is neither counted nor part of received attention (padded queries are dropped
and the mean over queries divides by the row's real tokens), and a batch's trailing columns of padding are cut
before the forward (``_trim_padding``). Limitation: received attention assumes plain causal
attention (a sliding window and attention sinks, gpt-oss, are ignored there; the forward itself uses both).

MXFP4 checkpoints (gpt-oss): each expert stack is read packed and repacked to ``bits`` one row chunk at a time
(``checkpoint.mxfp4.MXFP4Weight.rows``), never decoded whole; the result equals quantizing the dequantised model.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Set, Union

import torch
import torch.nn as nn

from flux_engine import ops
from flux_engine.checkpoint.mxfp4 import MXFP4Weight
from flux_engine.fileio import atomic_write
from flux_engine.models import MoEForCausalLM
from flux_engine.models.moe import Attention, DenseMLP, MoEMLP, layer_masks, materialize, rope_cos_sin
from flux_engine.ops.quantize import QuantizedTensor
from flux_engine.ops.quantized_grouped_mlp import quantized_grouped_mlp
from flux_engine.ops.received_attention import received_attention
from flux_engine.ops.route_and_count import route_and_count

_STACKS = ("gate_up_proj", "down_proj")
DEFAULT_DENSE_BITS = 8
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------- the profile


@dataclass
class ExpertProfile:
    """Per MoE layer (``layers``, model layer indices) and original expert: see the module docstring.

    ``counts``: int64 ``[L, E]``; ``attn_sums``: float64 ``[L, E]``; ``samples[l][e]``: sorted sample ids;
    ``num_tokens``: counted tokens per layer (equal across layers); ``meta``: how it was computed.
    """

    layers: List[int]
    counts: torch.Tensor
    attn_sums: torch.Tensor
    samples: List[List[List[Any]]]
    num_tokens: int = 0
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def num_experts(self) -> int:
        return self.counts.shape[1]

    @property
    def frequency(self) -> torch.Tensor:
        """``[L, E]`` float64 share of routed (token, slot) pairs; each row sums to 1 (0 for an unseen layer)."""
        c = self.counts.double()
        return c / c.sum(dim=1, keepdim=True).clamp(min=1)

    @property
    def importance(self) -> torch.Tensor:
        """``[L, E]`` float64 mean received attention of the tokens routed to e (0 when none were)."""
        return self.attn_sums / self.counts.double().clamp(min=1)

    def layer_index(self, layer: int) -> int:
        return self.layers.index(layer)

    def merge(self, other: "ExpertProfile") -> "ExpertProfile":
        """The profile of both sets of batches (sample ids are unioned)."""
        if self.layers != other.layers or self.counts.shape != other.counts.shape:
            raise ValueError("profiles of different models cannot be merged")
        samples = [
            [sorted(set(a) | set(b), key=sample_id_key) for a, b in zip(la, lb)] for la, lb in zip(self.samples, other.samples)
        ]
        meta = dict(self.meta)
        meta["merged"] = int(meta.get("merged", 1)) + int(other.meta.get("merged", 1))
        return ExpertProfile(
            list(self.layers), self.counts + other.counts, self.attn_sums + other.attn_sums, samples,
            self.num_tokens + other.num_tokens, meta,
        )  # fmt: skip

    def to_dict(self) -> Dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "layers": self.layers,
            "counts": self.counts.tolist(),
            "attn_sums": self.attn_sums.tolist(),
            "samples": self.samples,
            "num_tokens": self.num_tokens,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ExpertProfile":
        if d.get("format") != FORMAT_VERSION:
            raise ValueError(f"unknown profile format {d.get('format')!r}")
        return cls(
            list(d["layers"]), torch.tensor(d["counts"], dtype=torch.int64),
            torch.tensor(d["attn_sums"], dtype=torch.float64), d["samples"], int(d["num_tokens"]), dict(d["meta"]),
        )  # fmt: skip

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write JSON atomically (temporary file in the same folder, fsync, rename)."""
        atomic_write(path, lambda f: json.dump(self.to_dict(), f))

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "ExpertProfile":
        with open(path) as f:
            return cls.from_dict(json.load(f))


def sample_id_key(x: Any):
    """Sort key putting numeric sample ids first (numerically), then the others as strings."""
    return (0, x, "") if isinstance(x, (int, float)) else (1, 0, str(x))


# ------------------------------------------------------------------------------------------- the low-bit model


@dataclass
class _LayerExperts:
    gate_up: Union[QuantizedTensor, torch.Tensor]
    down: Union[QuantizedTensor, torch.Tensor]


def group_for(K: int, bits: int, group_size: Optional[int]) -> int:
    """The group size used for a reduction length K: ``group_size`` when it divides K (int8 default: K, i.e.
    per-channel), else the largest divisor of K below it (even for int4), so odd widths still quantize."""
    want = group_size if group_size is not None else (128 if bits == 4 else K)
    want = min(want, K)
    for g in range(want, 0, -1):
        if K % g == 0 and (bits != 4 or g % 2 == 0):
            return g
    raise ValueError(f"no int{bits} group size divides K={K}")


# Rows quantized per call: bounds quantize's float32 temporaries (a few copies of the chunk) to ~16 MiB each
# whatever the tensor's size (an embedding [V, H] is often the model's largest tensor).
_CHUNK_ELEMENTS = 1 << 22


def _quantize(w: Union[torch.Tensor, MXFP4Weight], bits: int, group_size: Optional[int], symmetric: bool) -> QuantizedTensor:
    """``ops.quantize(w, bits, group_for(K, ...))``, computed in row chunks into preallocated storage (groups
    run along the last dimension, so rows are independent and the result is identical). An MXFP4 ``w`` is decoded
    one row chunk at a time (to its ``dtype``), never as a whole."""
    K = w.shape[-1]
    g = group_for(K, bits, group_size)
    R = math.prod(w.shape[:-1])
    rows = w.rows if isinstance(w, MXFP4Weight) else lambda i, j: w.reshape(-1, K)[i:j]
    step = max(1, _CHUNK_ELEMENTS // K)
    if R <= step:
        return ops.quantize(rows(0, R).view(w.shape), bits, g, symmetric=symmetric)
    data = scales = zeros = None
    for i in range(0, R, step):
        part = ops.quantize(rows(i, min(i + step, R)), bits, g, symmetric=symmetric)
        if data is None:
            data = torch.empty((R, part.data.shape[-1]), dtype=part.data.dtype, device=w.device)
            scales = torch.empty((R, part.scales.shape[-1]), dtype=part.scales.dtype, device=w.device)
            if part.zeros is not None:
                zeros = torch.empty((R, part.zeros.shape[-1]), dtype=part.zeros.dtype, device=w.device)
        n = part.data.shape[0]
        data[i : i + n].copy_(part.data)
        scales[i : i + n].copy_(part.scales)
        if zeros is not None:
            zeros[i : i + n].copy_(part.zeros)
        del part
    lead = tuple(w.shape[:-1])
    return QuantizedTensor(
        data.view(*lead, -1), scales.view(*lead, -1), None if zeros is None else zeros.view(*lead, -1),
        bits, g, w.shape, w.dtype,
    )  # fmt: skip


def _compress(w: Union[torch.Tensor, MXFP4Weight], bits: Optional[int], group_size: Optional[int], symmetric: bool):
    if bits is None:
        return w.dequantize() if isinstance(w, MXFP4Weight) else w
    return _quantize(w, bits, group_size, symmetric)


class _QLinear(nn.Module):
    """A linear layer with a quantized weight ``[N, K]`` (groups along K): each call dequantizes the weight just
    before use and drops it after (one linear in full precision at a time); the bias stays full precision."""

    def __init__(self, weight: QuantizedTensor, bias: Optional[torch.Tensor]):
        super().__init__()
        self.qweight = weight
        self.register_buffer("bias", None if bias is None else bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, ops.dequantize(self.qweight, x.dtype), self.bias)


class _QEmbedding(nn.Module):
    """An embedding table ``[V, H]`` quantized along H (row-wise groups): a lookup gathers the packed rows of the
    requested ids and dequantizes only those."""

    def __init__(self, weight: QuantizedTensor):
        super().__init__()
        self.qweight = weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        q, flat = self.qweight, ids.reshape(-1)
        rows = QuantizedTensor(
            q.data[flat], q.scales[flat], None if q.zeros is None else q.zeros[flat], q.bits, q.group_size,
            torch.Size((flat.numel(), q.shape[-1])), q.dtype,
        )  # fmt: skip
        return ops.dequantize(rows).view(*ids.shape, q.shape[-1])


class LowBitModel:
    """A profiling copy of the model: the skeleton (norms, routers, biases and, with ``dense_bits=None``, the
    dense weights as real tensors; quantized linears / embedding as ``_QLinear`` / ``_QEmbedding``) + per-layer
    routed experts."""

    def __init__(
        self, skeleton: MoEForCausalLM, experts: Dict[int, _LayerExperts], expert_maps: Dict[int, torch.Tensor],
        device: torch.device, meta: Optional[Dict[str, Any]] = None,
    ):  # fmt: skip
        self.skeleton, self.experts, self.expert_maps, self.device = skeleton, experts, expert_maps, device
        self.meta = meta or {}  # the format (``_meta``): what the profile records, and how set_expert quantizes

    def set_expert(self, moe_layer: int, expert: int, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        """Replace one routed expert's weights (``gate_up [2I, H]``, ``down [H, I]``, full precision) by their
        low-bit form: the copy follows a model whose experts changed (e.g. global adapters folded in) without being
        rebuilt. Groups run along rows, so the result equals quantizing the whole stack again."""
        layer = self.skeleton.moe_layers()[moe_layer].layer
        le = self.experts[layer]
        bits, g, sym = self.meta.get("bits"), self.meta.get("group_size"), self.meta.get("symmetric", True)
        for stack, w in ((le.gate_up, gate_up), (le.down, down)):
            if tuple(w.shape) != tuple(stack.shape[1:]):
                raise ValueError(f"expert ({moe_layer}, {expert}): weight {tuple(w.shape)}, copy holds "
                                 f"{tuple(stack.shape[1:])}")  # fmt: skip
            q = _compress(w.to(self.device), bits, g, sym)
            with torch.no_grad():
                if isinstance(stack, QuantizedTensor):
                    for mine, new in ((stack.data, q.data), (stack.scales, q.scales), (stack.zeros, q.zeros)):
                        if mine is not None:
                            mine[expert].copy_(new)
                else:
                    stack[expert].copy_(q)

    @property
    def config(self):
        return self.skeleton.config

    def nbytes(self) -> int:
        """Bytes held by the copy: real skeleton tensors, quantized weights (a tied embedding / LM head once)
        and the expert stacks."""
        seen, total = set(), 0

        def add(t) -> None:
            nonlocal total
            if t is None or id(t) in seen:
                return
            seen.add(id(t))
            if isinstance(t, QuantizedTensor):
                total += t.nbytes()
            elif not t.is_meta:
                total += t.numel() * t.element_size()

        for t in self.skeleton.state_dict(keep_vars=True).values():
            add(t)
        for module in self.skeleton.modules():
            if isinstance(module, (_QLinear, _QEmbedding)):
                add(module.qweight)
        for le in self.experts.values():
            add(le.gate_up)
            add(le.down)
        return total


def is_expert_stack(name: str) -> bool:
    return ".mlp.experts." in name and name.rsplit(".", 1)[-1] in _STACKS


def _layer_of(name: str) -> int:
    return int(name.split(".")[2])


def dense_weight_names(model: MoEForCausalLM) -> Set[str]:
    """Names of the weights ``dense_bits`` stores low-bit: attention q/k/v/o, dense MLPs and shared experts
    (``DenseMLP``), the embedding and the LM head (listed once, as the embedding, when tied).

    Kept in full precision: norms, biases, and the routers (``mlp.gate``, ``shared_expert_gate``): they are tiny
    ([E, H]) and decide which experts are counted, the very thing profiling measures; quantization noise there
    flips near-tied top-k choices directly, while noise elsewhere only perturbs the hidden states."""
    out = {"model.embed_tokens.weight"}
    if not model.config.tie_word_embeddings:
        out.add("lm_head.weight")
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            out.update(f"{name}.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
        elif isinstance(module, DenseMLP):
            out.update(f"{name}.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj"))
    return out


def _skeleton(config, dtype: torch.dtype, device: torch.device, quantize_dense: bool):
    """The model on the meta device with every tensor materialised (uninitialised) but the expert stacks and,
    with ``quantize_dense``, the dense weights that will be stored quantized; returns it and those names."""
    with torch.device("meta"):
        model = MoEForCausalLM(config)
    model.to(dtype=dtype)
    dense = dense_weight_names(model) if quantize_dense else set()
    materialize(model, device, skip=lambda name: is_expert_stack(name) or name in dense)
    for mlp in model.moe_layers():
        mlp.experts.reset_expert_map()
    model.tie_weights()
    return model.eval(), dense


def _install(skeleton: MoEForCausalLM, name: str, q: QuantizedTensor) -> None:
    """Replace the module owning weight ``name`` by its quantized counterpart (bias kept as it is)."""
    path = name[: -len(".weight")]
    parent_path, _, attr = path.rpartition(".")
    parent = skeleton.get_submodule(parent_path) if parent_path else skeleton
    module = getattr(parent, attr)
    if isinstance(module, nn.Embedding):
        setattr(parent, attr, _QEmbedding(q))
    else:
        setattr(parent, attr, _QLinear(q, module.bias))


def _build(
    tensors: Iterable, plan: Dict[str, Any], skeleton: MoEForCausalLM, dense: Set[str], bits, group_size,
    symmetric, device, dense_bits,
) -> LowBitModel:  # fmt: skip
    """Fill ``skeleton`` from ``(key, tensor)`` pairs (``plan[key]``: ``Entry`` with param and index). Expert
    stacks (at ``bits``) and the ``dense`` weights (at ``dense_bits``) are stored as soon as complete: a whole tensor is
    quantized straight from its source, a split one (per-expert keys) goes through one full-precision buffer."""
    from flux_engine.checkpoint.keymap import model_tensors

    targets = model_tensors(skeleton)
    dense = dense if bits is not None else set()
    remaining: Dict[str, int] = {}
    for entry in plan.values():
        if is_expert_stack(entry.param) or entry.param in dense:
            remaining[entry.param] = remaining.get(entry.param, 0) + 1
    pending: Dict[str, torch.Tensor] = {}
    stored: Dict[str, Any] = {}
    with torch.no_grad():
        for key, source in tensors:
            entry = plan[key]
            name = entry.param
            if name not in remaining:
                targets[name][entry.index].copy_(source)
                continue
            target = targets[name]
            if isinstance(source, MXFP4Weight):  # a whole expert stack, still packed: decoded by _compress
                w = source.to(device=device, dtype=target.dtype)
            elif bits is not None and entry.index == () and remaining[name] == 1:
                w = source.to(device=device, dtype=target.dtype)  # no copy when it already matches
            else:
                buf = pending.get(name)
                if buf is None:
                    buf = pending[name] = torch.empty(target.shape, dtype=target.dtype, device=device)
                buf[entry.index].copy_(source)
                w = None
            del source
            remaining[name] -= 1
            if remaining[name] == 0:
                if w is None:
                    w = pending.pop(name)
                if is_expert_stack(name):
                    stored[name] = _compress(w, bits, group_size, symmetric)
                else:  # the expert group size only where the dense weights share the experts' format
                    stored[name] = _compress(w, dense_bits, group_size if dense_bits == bits else None, symmetric)
                del w
    if pending:
        raise ValueError(f"incomplete tensors: {sorted(pending)}")
    done: Dict[int, Dict[str, Any]] = {}
    for name, t in stored.items():
        if is_expert_stack(name):
            done.setdefault(_layer_of(name), {})[name.rsplit(".", 1)[-1]] = t
        else:
            _install(skeleton, name, t)
    if "model.embed_tokens.weight" in stored and skeleton.config.tie_word_embeddings:
        skeleton.lm_head = _QLinear(stored["model.embed_tokens.weight"], None)  # tied: quantized once, shared
    experts = {layer: _LayerExperts(d["gate_up_proj"], d["down_proj"]) for layer, d in done.items()}
    maps = {mlp.layer: mlp.experts.expert_map for mlp in skeleton.moe_layers()}
    return LowBitModel(skeleton, experts, maps, device, _meta(bits, group_size, symmetric, dense_bits))


def _from_model(model: MoEForCausalLM, bits, group_size, symmetric, device, dense_bits) -> LowBitModel:
    from flux_engine.checkpoint.keymap import Entry, model_tensors

    param = next(model.parameters())
    skeleton, dense = _skeleton(model.config, param.dtype, device, dense_bits is not None and bits is not None)
    sources = model_tensors(model)
    plan = {name: Entry(name, name) for name in model_tensors(skeleton)}
    pairs = ((name, sources[name].detach()) for name in plan)
    return _build(pairs, plan, skeleton, dense, bits, group_size, symmetric, device, dense_bits)


def _from_checkpoint(path, dtype, bits, group_size, symmetric, device, dense_bits) -> LowBitModel:
    from flux_engine import checkpoint as ck
    from flux_engine.checkpoint.safetensors_io import CONFIG_FILE, read_json, scan

    folder = os.fspath(path)
    config_path = os.path.join(folder, CONFIG_FILE)
    raw = read_json(config_path)
    layout = ck.get_layout(raw.get("model_type"), config_path)
    config = ck.read_config(layout, raw, config_path)
    found = scan(folder)
    keys = layout.keys_for(found)
    skeleton, dense = _skeleton(
        config, dtype or ck.config_dtype(raw, config_path), device, dense_bits is not None and bits is not None
    )
    with torch.device("meta"):
        meta_model = MoEForCausalLM(config)
    plan = ck.load_plan(meta_model, layout, keys, found, folder)
    return _build(ck.read_tensors(found, plan), plan, skeleton, dense, bits, group_size, symmetric, device, dense_bits)


def prepare(
    model_or_checkpoint, bits: Optional[int] = 4, group_size: Optional[int] = None, *, symmetric: bool = True,
    dtype: Optional[torch.dtype] = None, device=None, dense_bits: Optional[int] = DEFAULT_DENSE_BITS,
) -> LowBitModel:  # fmt: skip
    """The profiling copy (see the module docstring); ``profile`` calls this, ``profile_async`` before its thread."""
    if bits not in (None, 4, 8):
        raise ValueError(f"bits must be 4, 8 or None (full precision), got {bits!r}")
    if dense_bits not in (None, 4, 8):
        raise ValueError(f"dense_bits must be 4, 8 or None (dense weights in full precision), got {dense_bits!r}")
    if isinstance(model_or_checkpoint, MoEForCausalLM):
        dev = torch.device(device) if device is not None else next(model_or_checkpoint.parameters()).device
        return _from_model(model_or_checkpoint, bits, group_size, symmetric, dev, dense_bits)
    return _from_checkpoint(
        model_or_checkpoint, dtype, bits, group_size, symmetric, torch.device(device or "cpu"), dense_bits
    )


# ------------------------------------------------------------------------------------------------- profiling


def batch_sample_ids(batch: Dict[str, Any], B: int, seen: int) -> List[Any]:
    """The ``B`` sample ids of a batch: its ``sample_ids``, else running row numbers from ``seen``."""
    ids = batch.get("sample_ids")
    if ids is None:
        return list(range(seen, seen + B))
    ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
    if len(ids) != B:
        raise ValueError(f"batch has {B} rows but {len(ids)} sample_ids")
    return ids


class ProfileAccumulator:
    """Per-layer counts ``[L, E]``, attention sums, per-batch hit masks and sample ids, accumulated on the device."""

    def __init__(self, layers: List[int], E: int, device: torch.device):
        self.layers = layers
        self.counts = torch.zeros(len(layers), E, dtype=torch.int64, device=device)
        self.attn = torch.zeros(len(layers), E, dtype=torch.float32, device=device)
        self.hits: List[List[torch.Tensor]] = [[] for _ in layers]  # per layer: [B, E] bool per batch
        self.batch_ids: List[List[Any]] = []
        self.tokens = torch.zeros((), dtype=torch.int64, device=device)


@torch.no_grad()
def _moe_step(low: LowBitModel, mlp: MoEMLP, li: int, h: torch.Tensor, ra: torch.Tensor, mask: torch.Tensor, acc):
    B, T, H = h.shape
    c = low.config
    flat = h.reshape(-1, H)
    E = c.num_experts
    keep = mask.reshape(-1)
    tok_w = ra.reshape(-1)
    counts, attn = acc.counts[li], acc.attn[li]
    if isinstance(mlp.gate, nn.Linear) and c.scoring != "ones" and mlp.gate.bias is None:
        weights, ids, _ = route_and_count(
            flat, mlp.gate.weight, c.num_experts_per_tok, counts_out=counts, attn_sums_out=attn, token_weights=tok_w,
            token_mask=keep, scoring=c.scoring, renormalize=c.norm_topk_prob, scaling_factor=c.routed_scaling_factor,
        )  # fmt: skip
    else:
        logits = mlp.gate(flat)
        if c.scoring == "ones":
            _, ids = ops.route(logits, c.num_experts_per_tok, scoring="softmax", renormalize=False)
            weights = torch.full(ids.shape, c.routed_scaling_factor, dtype=torch.float32, device=ids.device)
        else:
            weights, ids = ops.route(
                logits, c.num_experts_per_tok, scoring=c.scoring, renormalize=c.norm_topk_prob,
                scaling_factor=c.routed_scaling_factor,
            )  # fmt: skip
        counts += ops.expert_counts(ids, E, keep.float()).round().long()
        ops.expert_counts(ids, E, tok_w.float() * keep.float(), out=attn)
    # Which sample reached which expert: [B, E] on the device, read back once at the end.
    onehot = torch.zeros(B * T, E, dtype=torch.bool, device=h.device)
    onehot.scatter_(1, ids.long(), True)
    acc.hits[li].append((onehot & keep.bool()[:, None]).view(B, T, E).any(dim=1))
    le = low.experts[mlp.layer]
    run = quantized_grouped_mlp if isinstance(le.gate_up, QuantizedTensor) else ops.grouped_mlp
    y = run(flat, le.gate_up, le.down, weights, ids, low.expert_maps[mlp.layer], **mlp.experts.form_kwargs())
    if mlp.shared_expert is not None:
        shared = mlp.shared_expert(flat)
        if mlp.shared_expert_gate is not None:
            shared = torch.sigmoid(mlp.shared_expert_gate(flat)) * shared
        y = y + shared
    return y.view(B, T, H)


def _trim_padding(batch: Dict[str, Any]) -> Dict[str, Any]:
    """The batch without its trailing columns of padding (right-padded rows: nothing after the longest row is a
    token). Counts never include padding (masked); this saves computing it. Only a mask on the host is read, so
    no device synchronisation."""
    am = batch.get("attention_mask")
    if am is None or am.device.type != "cpu" or am.dim() != 2:
        return batch
    cols = torch.nonzero(am.any(0)).flatten()
    T = int(cols[-1]) + 1 if cols.numel() else 1
    if T == am.shape[1]:
        return batch
    return {k: (v[:, :T] if torch.is_tensor(v) and v.dim() == 2 and v.shape == am.shape else v) for k, v in batch.items()}


@torch.no_grad()
def _run(low: LowBitModel, batches: Iterable[Dict[str, Any]], meta: Dict[str, Any]) -> ExpertProfile:
    model = low.skeleton
    config = model.config
    layers = [mlp.layer for mlp in model.moe_layers()]
    device = low.device
    # Layers after the last MoE layer cannot change the profile (nor can the final norm / LM head): skipped.
    last = max((i for i, layer in enumerate(model.model.layers) if layer.is_moe), default=-1)
    acc = ProfileAccumulator(layers, config.num_experts, device)
    seen = 0
    for batch in batches:
        batch = _trim_padding(batch)
        input_ids = batch["input_ids"].to(device)
        B, T = input_ids.shape
        am = batch.get("attention_mask")
        am = am.to(device) if am is not None else None
        mask = am.bool() if am is not None else torch.ones(B, T, dtype=torch.bool, device=device)
        acc.batch_ids.append(batch_sample_ids(batch, B, seen))
        seen += B
        acc.tokens += mask.sum()
        x = model.model.embed_tokens(input_ids)
        positions = torch.arange(T, device=device).expand(B, T)
        cos, sin = rope_cos_sin(positions, config, x.dtype)
        masks = layer_masks(config, am, T, device)
        for layer, attn_mask in zip(model.model.layers[: last + 1], masks):
            attn = layer.self_attn
            attn.capture_qk = layer.is_moe
            try:
                x = x + attn(layer.input_layernorm(x), cos, sin, attn_mask)
                qk, attn.last_qk = attn.last_qk, None
            finally:
                attn.capture_qk = False
            h = layer.post_attention_layernorm(x)
            if layer.is_moe:
                ra = received_attention(qk[0], qk[1], causal=True, mask=am)
                del qk
                x = x + _moe_step(low, layer.mlp, layers.index(layer.mlp.layer), h, ra, mask, acc)
            else:
                x = x + layer.mlp(h)
    samples: List[List[List[Any]]] = []
    flat_ids = [sid for ids in acc.batch_ids for sid in ids]
    for li in range(len(layers)):
        per_expert: List[List[Any]] = [[] for _ in range(config.num_experts)]
        if acc.hits[li]:
            rows, experts = torch.cat(acc.hits[li]).nonzero(as_tuple=True)
            for r, e in zip(rows.tolist(), experts.tolist()):
                per_expert[e].append(flat_ids[r])
        samples.append([sorted(set(s), key=sample_id_key) for s in per_expert])
    return ExpertProfile(layers, acc.counts.cpu(), acc.attn.double().cpu(), samples, int(acc.tokens), meta)


def profile(
    model_or_checkpoint: Union[MoEForCausalLM, str, os.PathLike],
    batches: Iterable[Dict[str, Any]],
    bits: Optional[int] = 4,
    group_size: Optional[int] = None,
    *,
    symmetric: bool = True,
    dtype: Optional[torch.dtype] = None,
    device=None,
    dense_bits: Optional[int] = DEFAULT_DENSE_BITS,
) -> ExpertProfile:
    """Profile routed experts on a low-bit copy of a model (see the module docstring).

    Args:
        model_or_checkpoint: an in-memory ``MoEForCausalLM`` or a checkpoint folder (streamed).
        batches: dicts with ``input_ids [B, T]``, optional ``attention_mask [B, T]`` (1 = token) and optional
            ``sample_ids`` (B ids, e.g. record ids; default: running row numbers over all batches).
        bits: 4 (group-wise), 8 (per-channel by default), or None for full precision.
        group_size: columns per scale (default 128 for int4, per-channel for int8); reduced to a divisor of a
            stack's reduction width where needed (``group_for``).
        symmetric: symmetric quantization (else per-group zero points).
        dtype: checkpoint loading dtype (default: the config's); device: where to run (default: the model's, or CPU).
        dense_bits: format of attention, dense / shared-expert MLPs, the embedding and the LM head: 8
            (per-channel, default), 4 (group-wise) or None (kept in full precision). Ignored when ``bits`` is None.
    """
    if isinstance(model_or_checkpoint, LowBitModel):
        return _run(model_or_checkpoint, batches, model_or_checkpoint.meta)
    low = prepare(
        model_or_checkpoint, bits, group_size, symmetric=symmetric, dtype=dtype, device=device,
        dense_bits=dense_bits,
    )  # fmt: skip
    return _run(low, batches, low.meta)


def _meta(bits, group_size, symmetric, dense_bits) -> Dict[str, Any]:
    return {
        "bits": bits, "group_size": group_size, "symmetric": bool(symmetric),
        "dense_bits": dense_bits if bits is not None else None,
    }  # fmt: skip


class ProfileHandle:
    """A profile computing in the background: ``done()``, ``result(timeout=None)`` (re-raises its error).
    ``seconds``: wall-clock of the work once done, plus ``setup_seconds`` spent before it started (the snapshot)."""

    def __init__(self, target, setup_seconds: float = 0.0):
        self._result: Optional[ExpertProfile] = None
        self._error: Optional[BaseException] = None
        self.seconds = float(setup_seconds)
        self._thread = threading.Thread(target=self._work, args=(target,), daemon=True, name="flux-profile")
        self._thread.start()

    def _work(self, target) -> None:
        t0 = time.perf_counter()
        try:
            self._result = target()
        except BaseException as e:  # noqa: BLE001 - handed to the caller by result()
            self._error = e
        self.seconds += time.perf_counter() - t0

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self, timeout: Optional[float] = None) -> ExpertProfile:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("profile still running")
        if self._error is not None:
            raise self._error
        return self._result


def profile_async(
    model_or_checkpoint, batches: Iterable[Dict[str, Any]], bits: Optional[int] = 4, group_size: Optional[int] = None,
    *, symmetric: bool = True, dtype: Optional[torch.dtype] = None, device=None,
    dense_bits: Optional[int] = DEFAULT_DENSE_BITS,
) -> ProfileHandle:  # fmt: skip
    """``profile`` in a background thread (on a side CUDA stream for GPU models): stale profiling.

    The low-bit copy is taken before returning (for an in-memory model: a snapshot of the weights as they are
    now), so the caller may go on training; the result equals ``profile`` on that snapshot. ``batches`` is
    materialised into a list first.
    """
    t0 = time.perf_counter()
    if isinstance(model_or_checkpoint, LowBitModel):
        low = model_or_checkpoint  # a prepared copy: the caller leaves it alone until the result is taken
    else:
        low = prepare(
            model_or_checkpoint, bits, group_size, symmetric=symmetric, dtype=dtype, device=device,
            dense_bits=dense_bits,
        )  # fmt: skip
    batches = list(batches)
    meta = low.meta
    dev = low.device
    if dev.type == "cuda":
        # The copy was made on the caller's stream; the side stream waits for it, then runs independently.
        stream = torch.cuda.Stream(device=dev)
        stream.wait_stream(torch.cuda.current_stream(dev))

        def target():
            with torch.cuda.stream(stream):
                out = _run(low, batches, meta)
            stream.synchronize()
            return out

        return ProfileHandle(target, time.perf_counter() - t0)
    return ProfileHandle(lambda: _run(low, batches, meta), time.perf_counter() - t0)


# -------------------------------------------------------------------------------------------------- comparison


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share the mean rank), float64."""
    x = x.double()
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    out = ranks.clone()
    for v in torch.unique(x):
        tie = x == v
        if int(tie.sum()) > 1:
            out[tie] = ranks[tie].mean()
    return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D vectors (1.0 when both are constant, 0.0 when only one is)."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra * ra).sum()) * float((rb * rb).sum()))
    if den == 0:
        return 1.0 if float((ra * ra).sum()) == float((rb * rb).sum()) else 0.0
    return float((ra * rb).sum()) / den


def top_k_jaccard(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """Jaccard index of the k largest entries of a and of b (ties broken by the lower index)."""
    ta = set(torch.argsort(-a.double(), stable=True)[:k].tolist())
    tb = set(torch.argsort(-b.double(), stable=True)[:k].tolist())
    return len(ta & tb) / len(ta | tb)


def compare(p_quant: ExpertProfile, p_full: ExpertProfile, k: Optional[int] = None) -> Dict[str, Any]:
    """How well a (quantized) profile matches the full-precision one, per layer and on average.

    - ``jaccard``: top-k Jaccard of the expert sets by frequency (``k`` default: a quarter of the experts, >= 1);
    - ``freq_error``: relative L1 error of the frequencies, ``sum|f_q - f| / sum f`` (= L1, as f sums to 1);
    - ``spearman``: rank correlation of the frequencies;
    - ``importance_spearman``: rank correlation of the attention-weighted importance ``a_e``.
    """
    if p_quant.layers != p_full.layers or p_quant.counts.shape != p_full.counts.shape:
        raise ValueError("profiles of different models")
    E = p_full.num_experts
    k = k or max(1, E // 4)
    fq, ff = p_quant.frequency, p_full.frequency
    iq, i_f = p_quant.importance, p_full.importance
    per_layer = []
    for li, layer in enumerate(p_full.layers):
        per_layer.append(
            {
                "layer": layer,
                "jaccard": top_k_jaccard(fq[li], ff[li], k),
                "freq_error": float((fq[li] - ff[li]).abs().sum() / ff[li].sum().clamp(min=1e-30)),
                "spearman": spearman(fq[li], ff[li]),
                "importance_spearman": spearman(iq[li], i_f[li]),
            }
        )
    mean = {key: sum(row[key] for row in per_layer) / len(per_layer) for key in per_layer[0] if key != "layer"}
    return {"k": k, "layers": per_layer, "mean": mean}


__all__ = [
    "ExpertProfile",
    "ProfileHandle",
    "profile",
    "profile_async",
    "prepare",
    "compare",
    "spearman",
    "top_k_jaccard",
    "group_for",
]
