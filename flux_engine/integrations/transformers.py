"""flux-engine inside transformers v5: the ``"flux"`` experts implementation and the Flux mechanisms on HF models.

transformers v5 decorates each MoE family's experts class with ``transformers.integrations.moe.
use_experts_implementation``: the class keeps its 3-D stacks (``gate_up_proj``, ``down_proj``) and its
``forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`` looks up
``config._experts_implementation`` in ``ExpertsInterface``. Importing this module (or calling ``register()``) adds
``"flux"`` there, so

    AutoModelForCausalLM.from_pretrained(path, experts_implementation="flux")
    model.set_experts_implementation("flux")

run every experts module through ``flux_engine.ops.grouped_mlp`` (its dispatch picks the reference or Triton
tier; ``FLUX_ENGINE_BACKEND`` forces one). The router, attention and shared experts stay transformers' own.

Layouts and forms. The decorator's per-class flags say how the stacks are stored, and each module maps to an
``ops.ExpertForm`` (``expert_form``): ``is_transposed`` either way (``[E, H, 2I]`` / ``[E, I, H]`` stacks are read
through a transposed copy, autograd flows back); ``has_gate`` (``gate_up_proj``) or not (``up_proj``, ``act(up)``);
``has_bias`` (``gate_up_proj_bias`` / ``up_proj_bias`` and ``down_proj_bias``, passed to the op); the activation
from the module's ``act_fn`` (silu/swish, gelu, the tanh gelus, relu, relu2). The gate/up split is ``_apply_gate``'s, as
in transformers' batched and grouped backends: the default one chunks (gate rows first, ``act(gate) * up``); a
custom one is accepted only when it computes a form its flags and attributes suggest (interleaved first when
``is_concatenated=False``; gpt-oss's clamped SwiGLU with the module's ``limit`` and ``alpha``), checked once per
class and form on a probe, outside tracing. Refused with ``UnsupportedExpertsLayout`` naming the class and what
the op lacks: ``has_post_expert_norm=True``, other activations (quick_gelu, relu6, ...), other custom gates,
expert parallelism. Checked: mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3 (the experts of its MoE block),
granitemoe, gpt_oss, and the testers' default ``hidden_act="gelu"`` configs.

Flux state on an HF experts module (plain attributes of the transformers module, so ``.to()``, ``parameters()``
and optimizers see them):
- ``expert_map``: non-persistent int32 buffer ``[E_orig]`` -> physical expert, installed by ``merge_hf``; the
  router keeps its ``E_orig`` logits. Only ``"flux"`` reads it: a merged model must not run other backends.
- ``lora``: the runtime's ``ExpertLoRAAdapter`` (``attach_sparse_lora``), passed to the op as an ``ExpertLoRA``.
The expert maps also live in the config (``config.flux_expert_maps``), so ``save_pretrained`` writes them into
``config.json`` and ``load_merged_hf`` rebuilds the merged shapes on reload.

Conversions (``to_runtime`` / ``from_runtime``) go through ``flux_engine.checkpoint``: the layouts of mixtral,
qwen2_moe, qwen3_moe, olmoe; the runtime's tensor names are transformers v5's in-memory names, so the HF state
dict is read with the stacked ``KeyLayout()`` of the checkpoint key map.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers import activations
from transformers.initialization import no_init_weights
from transformers.integrations.moe import ExpertsInterface, _default_apply_gate
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from flux_engine import merging, ops
from flux_engine.checkpoint import SOURCE_MODEL_TYPE, CheckpointError, get_layout
from flux_engine.checkpoint import copy_into, layout_config_json, load_plan, read_config
from flux_engine.checkpoint.keymap import KeyLayout, entries, model_tensors
from flux_engine.checkpoint.safetensors_io import TensorInfo
from flux_engine.models import MoEForCausalLM
from flux_engine.models.moe import LORA_TARGETS, ExpertLoRAAdapter, Experts
from flux_engine.profiling import ExpertProfile, ProfileAccumulator, sample_id_key, batch_sample_ids

IMPLEMENTATION = "flux"
EXPERT_MAPS = "flux_expert_maps"  # config attribute: {"<layer>": [E_orig physical ids]}
_CAPTURE = "flux_capture"  # attention implementation used while profiling
# The activation modules transformers' ACT2FN builds, by class name -> ExpertForm.activation (exact classes only:
# subclasses such as ClippedGELUActivation compute something else). Names differ between transformers versions.
_ACTIVATIONS = {
    "SiLU": "silu",
    "SiLUActivation": "silu",
    "GELUActivation": "gelu",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "NewGELUActivation": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh",
    "AccurateGELUActivation": "gelu_tanh",
    "ReLU": "relu",
    "ReLUSquaredActivation": "relu2",
}
_ACTIVATION_CLASSES = {
    cls: name
    for cls_name, name in _ACTIVATIONS.items()
    for cls in (getattr(activations, cls_name, None), getattr(nn, cls_name, None))
    if cls is not None
}
_LORA = ".experts.lora."  # state-dict infix of LoRA factors: carried as modules, not as checkpoint tensors
# The HF state dict uses the runtime's own (stacked) names: no per-expert keys, no renames.
_IN_MEMORY = KeyLayout()


class UnsupportedExpertsLayout(ValueError):
    """An experts class whose layout or math ``grouped_mlp`` cannot express."""


# ------------------------------------------------------------------------------------------ the MoE layers


@dataclass
class MoELayer:
    """One MoE layer of an HF model: its decoder layer index and its experts module."""

    layer: int
    experts: nn.Module

    @property
    def num_original(self) -> int:
        """``E_orig``: the router's logits (the expert map's length once merged)."""
        emap = getattr(self.experts, "expert_map", None)
        return emap.numel() if emap is not None else self.experts.num_experts


_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _is_experts(module: nn.Module) -> bool:
    # Attributes set by use_experts_implementation's __init__.
    return hasattr(module, "has_gate") and hasattr(module, "is_transposed") and hasattr(module, "is_concatenated")


def moe_layers(model: nn.Module) -> List[MoELayer]:
    """The MoE layers of an HF model in depth order (experts modules decorated by ``use_experts_implementation``)."""
    out = []
    for name, module in model.named_modules():
        if not _is_experts(module):
            continue
        match = _LAYER_INDEX.search(name + ".")
        if match is None:
            raise UnsupportedExpertsLayout(f"{type(module).__name__} at {name!r} is not inside a decoder layer")
        out.append(MoELayer(int(match[1]), module))
    if not out:
        raise UnsupportedExpertsLayout(
            f"{type(model).__name__} has no experts module using transformers' use_experts_implementation"
        )
    return out


# ------------------------------------------------------------------------------ the "flux" experts backend


def _activation(experts: nn.Module) -> Optional[str]:
    """The ``ExpertForm.activation`` of the module's ``act_fn`` (or ``config.hidden_act``), None when none fits."""
    act = getattr(experts, "act_fn", None)
    if act is not None:
        return _ACTIVATION_CLASSES.get(type(act))
    name = str(getattr(experts.config, "hidden_act", "silu")).lower()
    return {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
            "relu": "relu", "relu2": "relu2"}.get(name)  # fmt: skip


# Custom _apply_gate forms already checked on a probe, by (class, form): tracing never runs the probe again.
_VERIFIED_GATES: Dict[tuple, bool] = {}


def _gate_computes(experts: nn.Module, form: ops.ExpertForm) -> bool:
    """Whether the module's own ``_apply_gate`` computes ``form`` (on a probe spanning the clamps, float64)."""
    key = (type(experts), form)
    if key not in _VERIFIED_GATES:
        if torch.compiler.is_compiling():
            return True  # checked by the first eager call or use_flux(); a probe here would break the graph
        probe = torch.linspace(-12.0, 12.0, 2 * 33, dtype=torch.float64).reshape(2, 33)
        probe = torch.cat((probe, probe.flip(1)), dim=1)  # [2, 66]: gate and up both sweep the range
        with torch.no_grad():
            got = experts._apply_gate(probe)
        _VERIFIED_GATES[key] = got.shape == (2, 33) and torch.allclose(got, form.apply(probe), rtol=1e-12, atol=1e-12)
    return _VERIFIED_GATES[key]


def _form_and_problem(experts: nn.Module):
    """``(form, None)`` when ``grouped_mlp`` computes this experts module exactly, else ``(None, why)``.

    The gate/up split is ``_apply_gate``'s, as in transformers' own batched and grouped backends: the default one
    chunks (gate rows first, whatever ``is_concatenated`` says); a custom one must compute one of the forms its
    flags and attributes suggest (``is_concatenated=False``: interleaved first; ``limit`` / ``alpha``: gpt-oss's
    clamped SwiGLU), checked on a probe."""
    if experts.has_post_expert_norm:
        return None, "has_post_expert_norm=True (no norm after each expert)"
    if experts._is_expert_parallel:
        return None, "expert parallelism (sentinel expert ids)"
    activation = _activation(experts)
    custom_gate = experts.has_gate and type(experts)._apply_gate is not _default_apply_gate
    if not custom_gate:
        if activation is None:
            act = getattr(experts, "act_fn", None)
            what = type(act).__name__ if act is not None else repr(getattr(experts.config, "hidden_act", None))
            return None, f"the activation {what} (only silu, gelu, gelu_tanh, relu and relu2)"
        return ops.ExpertForm(activation, gated=experts.has_gate), None
    layouts = (True, False) if not experts.is_concatenated else (False, True)
    limit, alpha = getattr(experts, "limit", None), getattr(experts, "alpha", None)
    candidates = []
    if isinstance(limit, (int, float)) and isinstance(alpha, (int, float)):
        candidates += [ops.ExpertForm(interleaved=i, limit=float(limit), alpha=float(alpha)) for i in layouts]
    if activation is not None:
        candidates += [ops.ExpertForm(activation, interleaved=i) for i in layouts]
    form = next((f for f in candidates if _gate_computes(experts, f)), None)
    if form is None:
        return None, "a custom _apply_gate computing neither act(gate) * up nor gpt-oss's clamped SwiGLU"
    return form, None


def layout_problem(experts: nn.Module) -> Optional[str]:
    """None when ``grouped_mlp`` computes this experts module exactly, else what prevents it."""
    return _form_and_problem(experts)[1]


def expert_form(experts: nn.Module) -> ops.ExpertForm:
    """The ``ExpertForm`` of an HF experts module; raises ``UnsupportedExpertsLayout`` naming the class and what
    the op cannot express."""
    form, problem = _form_and_problem(experts)
    if problem is not None:
        raise UnsupportedExpertsLayout(
            f"experts_implementation={IMPLEMENTATION!r} cannot run {type(experts).__name__}: {problem}; "
            "use 'eager' or 'grouped_mm' for this model"
        )
    return form


def check_layout(experts: nn.Module) -> None:
    """Raise ``UnsupportedExpertsLayout`` naming the class and flag when ``"flux"`` cannot run ``experts``."""
    expert_form(experts)


def _stacks(experts: nn.Module):
    """``(gate_up [E, 2I, H] (ungated: the up projection [E, I, H]), down [E, H, I])`` in the op's layout."""
    first = experts.gate_up_proj if experts.has_gate else experts.up_proj
    if experts.is_transposed:
        # [E, H, 2I] / [E, I, H]: one copy per call; the op's kernels want the reduction dim contiguous.
        return first.transpose(1, 2).contiguous(), experts.down_proj.transpose(1, 2).contiguous()
    return first, experts.down_proj


def _biases(experts: nn.Module):
    """``(gate_up_bias [E, 2I] or [E, I], down_bias [E, H])``, or Nones without biases."""
    if not experts.has_bias:
        return None, None
    first = experts.gate_up_proj_bias if experts.has_gate else experts.up_proj_bias
    return first, experts.down_proj_bias


def flux_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The ``"flux"`` entry of ``ExpertsInterface``: ``hidden_states [T, H]``, ``top_k_index [T, k]`` (original
    expert ids), ``top_k_weights [T, k]`` -> ``[T, H]`` in ``hidden_states``' dtype, via ``ops.grouped_mlp`` with
    the module's ``expert_map`` and ``lora`` when present."""
    form = expert_form(self)
    gate_up, down = _stacks(self)
    gate_up_bias, down_bias = _biases(self)
    lora = getattr(self, "lora", None)
    return ops.grouped_mlp(
        hidden_states,
        gate_up,
        down,
        top_k_weights,
        top_k_index,
        getattr(self, "expert_map", None),
        lora=lora.as_op() if lora is not None else None,
        form=form,
        gate_up_bias=gate_up_bias,
        down_bias=down_bias,
    )


def register() -> None:
    """Add ``"flux"`` to transformers' ``ExpertsInterface`` (and the profiling capture to ``AttentionInterface``).
    Idempotent; runs on import of this module."""
    ExpertsInterface.register(IMPLEMENTATION, flux_experts_forward)
    AttentionInterface.register(_CAPTURE, _capturing_attention)
    AttentionMaskInterface.register(_CAPTURE, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def use_flux(model: PreTrainedModel) -> PreTrainedModel:
    """Check every experts module, then ``model.set_experts_implementation("flux")``; returns ``model``."""
    for moe in moe_layers(model):
        check_layout(moe.experts)
    model.set_experts_implementation(IMPLEMENTATION)
    return model


# ----------------------------------------------------------------------------------------------- profiling


class _Capture:
    """Profiling state of one forward: the padding mask ``[B, T]`` and each layer's received attention."""

    def __init__(self, mask: Optional[torch.Tensor]):
        self.mask = mask
        self.received: Dict[int, torch.Tensor] = {}


def _capturing_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, *args, **kwargs):
    """sdpa attention that also records ``ops.received_attention(q, k)`` (``[B, T]``; ``q [B, Hq, T, D]``,
    ``k [B, Hkv, T, D]`` after RoPE and q/k norms) for ``module.layer_idx``. Always sdpa: the mask format is
    chosen per implementation name (registered as sdpa's), and modelling files' eager functions are private."""
    capture: _Capture = module._flux_capture
    # received_attention scales scores by 1/sqrt(D); the module's own scale (GraniteMoe's attention_multiplier,
    # MLA's softmax scale) is folded into q instead.
    q = query * (module.scaling * query.shape[-1] ** 0.5) if getattr(module, "scaling", None) else query
    capture.received[module.layer_idx] = ops.received_attention(q, key, causal=True, mask=capture.mask)
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, *args, **kwargs)


@torch.no_grad()
def profile_hf(model: PreTrainedModel, batches: Iterable[Dict[str, Any]]) -> ExpertProfile:
    """Flux's expert profile (``flux_engine.profiling``) of an HF model, from the model's own forward.

    Captured per MoE layer and ORIGINAL expert (``ExpertProfile.layers`` = decoder layer indices):
    - routing: what each experts module receives (``top_k_index``; a forward pre-hook), so the router's own
      scoring, grouping and bias corrections are what is counted; padding (``attention_mask`` 0) is excluded;
    - received attention of the same decoder layer's attention: q/k (after RoPE and q/k norms, the module's
      softmax scale folded in) are captured inside the attention call (a temporary ``AttentionInterface`` entry
      that runs sdpa) and reduced by ``ops.received_attention`` without the ``T x T`` matrix;
    - the sample ids reaching each expert (``batches[i]["sample_ids"]``, default running row numbers).

    Limitations: the model runs as given (full precision unless it was loaded quantized; ``profiling.profile``
    quantizes the runtime model itself); received attention assumes plain causal attention over the batch (a
    sliding window, chunked or bidirectional attention is ignored there); attention runs as ``sdpa`` while
    profiled (``set_attn_implementation`` is restored after); one decoder layer = one attention + one MoE block.

    Args:
        batches: dicts with ``input_ids [B, T]``, optional ``attention_mask [B, T]`` and ``sample_ids`` (B ids).
    """
    layers = moe_layers(model)
    device = model.get_input_embeddings().weight.device
    acc = ProfileAccumulator([m.layer for m in layers], layers[0].num_original, device)
    attention = [m for m in model.modules() if hasattr(m, "layer_idx")]  # attention modules (and harmless others)
    previous = model.config._attn_implementation
    step: Dict[str, Any] = {}

    def count(li: int, moe: MoELayer):
        def hook(module, args):
            _, ids, _ = args[:3]
            keep = step["mask"].reshape(-1)
            counts = ops.expert_counts(ids, moe.num_original, keep.float())
            acc.counts[li] += counts.round().long()
            received = step["capture"].received.pop(moe.layer).reshape(-1)
            ops.expert_counts(ids, moe.num_original, received.float() * keep.float(), out=acc.attn[li])
            hits = torch.zeros(ids.shape[0], moe.num_original, dtype=torch.bool, device=ids.device)
            hits.scatter_(1, ids.long(), True)
            acc.hits[li].append((hits & keep[:, None]).view(*step["mask"].shape, -1).any(dim=1))

        return hook

    hooks = [m.experts.register_forward_pre_hook(count(li, m)) for li, m in enumerate(layers)]
    model.set_attn_implementation(_CAPTURE)
    seen = 0
    try:
        for batch in batches:
            input_ids = batch["input_ids"].to(device)
            B, T = input_ids.shape
            am = batch.get("attention_mask")
            am = am.to(device) if am is not None else None
            step["mask"] = am.bool() if am is not None else torch.ones(B, T, dtype=torch.bool, device=device)
            step["capture"] = capture = _Capture(am)
            for module in attention:
                module._flux_capture = capture
            acc.batch_ids.append(batch_sample_ids(batch, B, seen))
            seen += B
            acc.tokens += step["mask"].sum()
            model(input_ids=input_ids, attention_mask=am, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        for module in attention:
            module.__dict__.pop("_flux_capture", None)
        model.set_attn_implementation(previous)
    flat_ids = [sid for ids in acc.batch_ids for sid in ids]
    samples = []
    for li in range(len(layers)):
        per_expert: List[set] = [set() for _ in range(layers[li].num_original)]
        if acc.hits[li]:
            rows, experts = torch.cat(acc.hits[li]).nonzero(as_tuple=True)
            for r, e in zip(rows.tolist(), experts.tolist()):
                per_expert[e].add(flat_ids[r])
        samples.append([sorted(s, key=sample_id_key) for s in per_expert])
    meta = {"bits": None, "source": "transformers", "model_type": model.config.model_type}
    return ExpertProfile(acc.layers, acc.counts.cpu(), acc.attn.double().cpu(), samples, int(acc.tokens), meta)


# ------------------------------------------------------------------------------------------------- merging


def _install_expert_map(experts: nn.Module, expert_map: torch.Tensor) -> None:
    """Set the ``expert_map`` buffer (non-persistent: transformers' checkpoint keys stay as they are; the config
    carries the maps)."""
    emap = expert_map.to(device=experts.gate_up_proj.device, dtype=torch.int32)
    if "expert_map" in experts._buffers:
        experts.expert_map = emap
    else:
        experts.register_buffer("expert_map", emap, persistent=False)


def _runtime_experts(moe: MoELayer) -> Experts:
    """A runtime ``Experts`` holding the HF module's own stacks (no copy) and expert map: what
    ``flux_engine.merging`` operates on. Transposed stacks are fine: Gram matrices and Eq. 2 ignore the layout."""
    with torch.device("meta"):
        ex = Experts(moe.num_original, 1, 1, 1)  # placeholder sizes: every tensor is replaced next
    ex.gate_up_proj, ex.down_proj = moe.experts.gate_up_proj, moe.experts.down_proj
    emap = getattr(moe.experts, "expert_map", None)
    ex.expert_map = emap if emap is not None else torch.arange(moe.num_original, dtype=torch.int32)
    return ex


def _resize(experts: nn.Module, num_physical: int) -> None:
    """Replace the stacks by uninitialised ``[num_physical, ...]`` ones (same dtype/device: meta while loading)."""
    for name in ("gate_up_proj", "down_proj"):
        old = getattr(experts, name)
        new = torch.empty((num_physical,) + tuple(old.shape[1:]), dtype=old.dtype, device=old.device)
        setattr(experts, name, nn.Parameter(new, requires_grad=old.requires_grad))


def _config_maps(config) -> Dict[int, torch.Tensor]:
    """``{decoder layer: expert map [E_orig]}`` from ``config.flux_expert_maps`` (empty when not merged)."""
    maps = getattr(config, EXPERT_MAPS, None) or {}
    return {int(layer): torch.tensor(m, dtype=torch.int32) for layer, m in maps.items()}


def merge_hf(
    model: PreTrainedModel,
    profile: Any,
    tuning_experts: Any,
    budgets: Union[int, Sequence[int]],
    weighting: str = "freq_attn",
    pca_dim: int = 16,
    seed: int = 0,
    iters: int = 50,
) -> merging.MergePlan:
    """Flux's merge (``flux_engine.merging.merge``, Eq. 1 budgets, PCA + cosine k-means, Eq. 2 weights) applied in
    place to an HF model: each MoE layer's 3-D stacks become ``[E_phys, ...]`` (tuning experts first, untouched),
    the router keeps its ``E_orig`` logits and an ``expert_map`` buffer remaps them; the maps go to
    ``config.flux_expert_maps`` and the model is switched to ``"flux"`` (the only backend that reads the map).

    Args:
        profile: ``ExpertProfile`` (e.g. from ``profile_hf``; its layers must be the model's MoE layers) or any
            profile ``merging`` accepts; rows in MoE-layer order.
        tuning_experts: per MoE layer the original ids kept unmerged, or a bool ``[L, E]`` mask.
        budgets: merged experts per MoE layer, or a total split by Eq. 1.
    Returns:
        the ``MergePlan`` (physical experts as lists of original ids, expert maps).
    """
    layers = moe_layers(model)
    for moe in layers:
        check_layout(moe.experts)
        if moe.experts.has_bias or not moe.experts.has_gate:
            raise UnsupportedExpertsLayout(
                f"merge_hf: {type(moe.experts).__name__} has expert biases or no gate; merge its runtime model "
                "(to_runtime) instead"
            )
        if getattr(moe.experts, "lora", None) is not None:
            raise ValueError(f"layer {moe.layer}: merge before attach_sparse_lora (LoRA slots would change)")
    profiled, ours = getattr(profile, "layers", None), [m.layer for m in layers]
    if profiled is not None and list(profiled) != ours:
        raise ValueError(f"the profile covers layers {list(profiled)}, the model's MoE layers are {ours}")
    # What merging reads of a runtime model: moe_layers() with .layer/.experts, config.num_experts.
    runtime = [SimpleNamespace(layer=m.layer, experts=_runtime_experts(m)) for m in layers]
    view = SimpleNamespace(moe_layers=lambda: runtime, config=SimpleNamespace(num_experts=layers[0].num_original))
    merging.merge(
        view, profile, tuning_experts, budgets, weighting=weighting, pca_dim=pca_dim, seed=seed, iters=iters,
        inplace=True,
    )  # fmt: skip
    for moe, merged in zip(layers, runtime):
        moe.experts.gate_up_proj, moe.experts.down_proj = merged.experts.gate_up_proj, merged.experts.down_proj
        _install_expert_map(moe.experts, merged.experts.expert_map)
    setattr(model.config, EXPERT_MAPS, {str(m.layer): m.experts.expert_map.tolist() for m in layers})
    model.set_experts_implementation(IMPLEMENTATION)
    return view.merge_plan


def _merged_class(cls: type, maps: Mapping[int, torch.Tensor]) -> type:
    """A subclass of the HF class whose ``__init__`` builds the merged stack shapes, so transformers'
    ``from_pretrained`` (key conversion, shape checks, dtype, device map) loads merged checkpoints as usual."""

    def __init__(self, config, *args, **kwargs):
        cls.__init__(self, config, *args, **kwargs)
        for moe in moe_layers(self):
            if moe.layer in maps:
                _resize(moe.experts, int(maps[moe.layer].max()) + 1)

    # Same name and module: transformers inspects the class's module source and names architectures after it.
    names = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
    return type(cls.__name__, (cls,), {"__init__": __init__, **names})


def _finish_merged(model: PreTrainedModel, cls: type, maps: Mapping[int, torch.Tensor]) -> PreTrainedModel:
    model.__class__ = cls  # the returned object is the plain transformers class again
    for moe in moe_layers(model):
        if moe.layer in maps:
            _install_expert_map(moe.experts, maps[moe.layer])
    if maps:
        setattr(model.config, EXPERT_MAPS, {str(layer): m.tolist() for layer, m in maps.items()})
    return model


def load_merged_hf(path: str, **kwargs: Any) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained(path, experts_implementation="flux", **kwargs)`` for a folder saved
    by ``save_pretrained`` after ``merge_hf``: the merged stack shapes and expert maps come from
    ``config.flux_expert_maps`` (an unmerged folder loads as usual, on ``"flux"``)."""
    if kwargs.setdefault("experts_implementation", IMPLEMENTATION) != IMPLEMENTATION:
        raise ValueError(f"a merged model runs only with experts_implementation={IMPLEMENTATION!r}")
    config = kwargs.pop("config", None) or AutoConfig.from_pretrained(path)
    maps = _config_maps(config)
    cls = AutoModelForCausalLM._model_mapping[type(config)]
    model = _merged_class(cls, maps).from_pretrained(path, config=config, **kwargs)
    return _finish_merged(model, cls, maps)


# --------------------------------------------------------------------------------------------- sparse LoRA


def attach_sparse_lora(
    model: PreTrainedModel,
    tuning: Union[Mapping[int, Sequence[int]], Sequence[Sequence[int]]],
    r: int = 8,
    alpha: float = 16.0,
    targets: Sequence[str] = LORA_TARGETS,
    freeze_base: bool = True,
    generator: Optional[torch.Generator] = None,
) -> Dict[int, ExpertLoRAAdapter]:
    """Attach LoRA to the chosen original experts of each MoE layer, run through ``"flux"``.

    Each layer with tuning experts gets ``experts.lora``: the runtime's ``ExpertLoRAAdapter`` (fp32 factors
    ``gate_up_A [S, r, H]``, ``gate_up_B [S, 2I, r]``, ``down_A [S, r, I]``, ``down_B [S, H, r]`` for the ``S``
    tuning experts only; PEFT's init, B = 0, so the model is unchanged until trained), handed to
    ``ops.grouped_mlp`` as its ``ExpertLoRA``. The factors are submodule parameters: ``model.parameters()`` and
    optimizers see them, and HF ``save_pretrained`` writes them under ``...experts.lora.*``.

    Args:
        tuning: per MoE layer (a list in MoE-layer order, or ``{decoder layer: ids}``) the original expert ids
            that get LoRA; on a merged model each must own its physical expert (``ExpertLoRA`` checks).
        r, alpha: LoRA rank and scale numerator (``scale = alpha / r``); targets: ``gate_up`` and/or ``down``.
        freeze_base: ``requires_grad=False`` on every other parameter of the model, as PEFT does.
    Returns:
        ``{decoder layer: adapter}`` for the layers that got any.
    """
    layers = moe_layers(model)
    if not isinstance(tuning, Mapping):
        if len(tuning) != len(layers):
            raise ValueError(f"tuning needs one entry per MoE layer ({len(layers)}), got {len(tuning)}")
        tuning = {moe.layer: ids for moe, ids in zip(layers, tuning)}
    if freeze_base:
        model.requires_grad_(False)
    out = {}
    for moe in layers:
        check_layout(moe.experts)
        if not moe.experts.has_gate:
            raise UnsupportedExpertsLayout(
                f"attach_sparse_lora: {type(moe.experts).__name__} has no gate (the adapter's gate_up_B is [S, 2I, r])"
            )
        ids = sorted({int(e) for e in tuning.get(moe.layer, ())})
        if not ids:
            continue
        if any(not 0 <= e < moe.num_original for e in ids):
            raise ValueError(f"layer {moe.layer}: tuning ids {ids} outside [0, {moe.num_original})")
        slots = torch.full((moe.num_original,), -1, dtype=torch.int32)
        slots[ids] = torch.arange(len(ids), dtype=torch.int32)
        _, down = _stacks(moe.experts)
        adapter = ExpertLoRAAdapter(slots, down.shape[1], down.shape[2], r, alpha, targets)
        for slot in range(len(ids)):
            adapter.reset_slot(slot, generator)
        moe.experts.lora = out[moe.layer] = adapter.to(down.device)
    model.set_experts_implementation(IMPLEMENTATION)
    return out


# ----------------------------------------------------------------------------------------------- conversion


def to_runtime(hf_model: PreTrainedModel, device: Union[str, torch.device, None] = None) -> MoEForCausalLM:
    """The runtime ``MoEForCausalLM`` computing what ``hf_model`` computes (merged models and sparse LoRA
    included: same physical experts, expert maps and adapters). Families: the transformers layouts of
    ``flux_engine.checkpoint`` (mixtral, qwen2_moe, qwen3_moe, olmoe); others raise ``CheckpointError``.
    Tensors are copied."""
    where = f"to_runtime({type(hf_model).__name__})"
    layout = get_layout(hf_model.config.model_type, where)
    # The maps are read from the modules; kept out of source_config so configs written back never hold stale ones.
    raw = {key: value for key, value in hf_model.config.to_dict().items() if key != EXPERT_MAPS}
    config = read_config(layout, raw, where)
    layers = moe_layers(hf_model)
    maps = {m.layer: m.experts.expert_map for m in layers if getattr(m.experts, "expert_map", None) is not None}
    if maps:
        config = config.with_physical_experts([m.experts.gate_up_proj.shape[0] for m in layers])
    state = {key: t for key, t in hf_model.state_dict().items() if _LORA not in key}
    found = {key: TensorInfo(where, tuple(t.shape), str(t.dtype)) for key, t in state.items()}
    with torch.device("meta"):
        model = MoEForCausalLM(config)
    plan = load_plan(model, layout, _IN_MEMORY, found, where)
    first = next(iter(hf_model.parameters()))
    model.to(dtype=first.dtype)
    model.to_empty(device=device or first.device)
    model.tie_weights()
    tensors = model_tensors(model)
    for key, entry in plan.items():
        copy_into(tensors, entry, state[key])
    loras = {m.layer: m.experts.lora for m in layers if getattr(m.experts, "lora", None) is not None}
    for mlp in model.moe_layers():
        if mlp.layer in maps:
            mlp.experts.expert_map.copy_(maps[mlp.layer])
        else:
            mlp.experts.reset_expert_map()
        if mlp.layer in loras:
            mlp.experts.lora = copy.deepcopy(loras[mlp.layer]).to(mlp.experts.gate_up_proj.device)
    return model.train(hf_model.training)


def from_runtime(model: MoEForCausalLM, model_type: Optional[str] = None) -> PreTrainedModel:
    """The transformers model of ``model`` (its source family, or ``model_type``), on ``"flux"`` experts; a merged
    runtime model gives a merged HF model (expert maps installed and in ``config.flux_expert_maps``), LoRA
    adapters are copied. Raises ``CheckpointError`` when the family's config cannot express the model (full-size
    tuned experts: ``fold_tuned`` first)."""
    name = model_type or model.config.metadata.get(SOURCE_MODEL_TYPE)
    if name is None:
        raise CheckpointError("from_runtime: the model has no source family; pass model_type= (e.g. 'qwen3_moe')")
    layout = get_layout(name, "from_runtime")
    dtype = model.model.embed_tokens.weight.dtype
    config_json = layout_config_json(layout, model.config.replace(physical_experts=None), dtype)
    config_json.pop("architectures")
    hf_config = AutoConfig.for_model(config_json.pop("model_type"), **config_json)
    hf_config._experts_implementation = IMPLEMENTATION
    merged = model.config.physical_experts is not None
    maps = {mlp.layer: mlp.experts.expert_map.cpu() for mlp in model.moe_layers()} if merged else {}
    cls = AutoModelForCausalLM._model_mapping[type(hf_config)]
    with no_init_weights():  # every tensor is overwritten below
        hf_model = _merged_class(cls, maps)(hf_config)
    tensors = model_tensors(model)
    state = {e.key: tensors[e.param][e.index] for e in entries(model, _IN_MEMORY) if _LORA not in e.key}
    hf_model.to(dtype=dtype)
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    missing = set(missing) - ({"lm_head.weight"} if model.config.tie_word_embeddings else set())
    if unexpected or missing:
        raise CheckpointError(
            f"from_runtime: {name} has no {sorted(unexpected)}; the runtime model has no {sorted(missing)}"
        )
    hf_model = _finish_merged(hf_model, cls, maps)
    for moe, mlp in zip(moe_layers(hf_model), model.moe_layers()):
        if mlp.experts.lora is not None:
            moe.experts.lora = copy.deepcopy(mlp.experts.lora)
    return hf_model.to(model.model.embed_tokens.weight.device).train(model.training)


register()

__all__ = [
    "IMPLEMENTATION",
    "EXPERT_MAPS",
    "UnsupportedExpertsLayout",
    "MoELayer",
    "moe_layers",
    "layout_problem",
    "expert_form",
    "check_layout",
    "flux_experts_forward",
    "register",
    "use_flux",
    "profile_hf",
    "merge_hf",
    "load_merged_hf",
    "attach_sparse_lora",
    "to_runtime",
    "from_runtime",
]
