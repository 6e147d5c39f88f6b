"""Checkpoint folders (``config.json`` + safetensors shards) <-> ``MoEForCausalLM``.

Layouts: the transformers families mixtral, qwen2_moe, qwen3_moe, olmoe, gpt_oss (bf16 or MXFP4 experts; MXFP4 is
dequantised on load, or repacked straight to int4 by ``profiling``; saved unquantized), the remote-code families deepseek
(deepseek-moe-16b) and llama_moe (LLaMA-MoE v1), and ``flux_moe``, our own names plus ``expert_map`` buffers,
the only layout that can hold merged models (fewer physical than original experts).

Loading builds the model on the meta device, checks every shard header against the layout's key plan (unknown
and missing keys, shapes) before reading any tensor data, then materialises the model once and streams the
tensors into it one by one, so peak memory is one model plus one tensor. Saving writes into a hidden sibling
folder that replaces the target by rename only once complete.

``config.metadata`` after loading: ``source_model_type`` (the transformers family the weights came from, kept
through native saves), ``checkpoint_layout`` (the layout of the folder loaded, the default layout for saving)
and ``source_config`` (that family's config.json, the base of configs written back in its layout, so keys the
runtime does not model, such as token ids or ``auto_map``, survive a round trip).
"""

from __future__ import annotations

import os
import re
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import torch
from safetensors import SafetensorError

from flux_engine.checkpoint.errors import CheckpointError
from flux_engine.checkpoint.hf_config import flux_to_json
from flux_engine.checkpoint.keymap import Entry, KeyLayout, entries, model_tensors, scales_key
from flux_engine.checkpoint.mxfp4 import GROUP as MXFP4_GROUP
from flux_engine.checkpoint.mxfp4 import MXFP4Weight
from flux_engine.checkpoint.layouts import LAYOUTS, NATIVE, Layout, get_layout
from flux_engine.checkpoint.safetensors_io import (
    CONFIG_FILE,
    TensorInfo,
    atomic_directory,
    parse_size,
    read_json,
    scan,
    stream,
    weights_file,
    write_json,
    write_shards,
)
from flux_engine.models import MoEConfig, MoEForCausalLM

__all__ = ["load_pretrained", "save_pretrained", "CheckpointError", "LAYOUTS", "NATIVE"]

SOURCE_MODEL_TYPE = "source_model_type"
CHECKPOINT_LAYOUT = "checkpoint_layout"
SOURCE_CONFIG = "source_config"

PathLike = Union[str, os.PathLike]


def load_pretrained(
    path: PathLike, dtype: Optional[torch.dtype] = None, device: Union[str, torch.device] = "cpu"
) -> MoEForCausalLM:
    """Load a checkpoint folder of any supported layout.

    Args:
        path: folder with ``config.json`` and ``model.safetensors`` or ``model.safetensors.index.json`` + shards.
        dtype: floating dtype of the parameters; default the config's ``dtype`` (``torch_dtype``), else float32.
        device: where the parameters are allocated.

    Raises:
        CheckpointError: unsupported ``model_type`` or config feature, corrupt or truncated shard, missing,
            unexpected or misshapen tensor; the message names the file and the key.
    """
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    folder = os.fspath(path)
    config_path = os.path.join(folder, CONFIG_FILE)
    raw = read_json(config_path)
    layout = get_layout(raw.get("model_type"), config_path)
    config = read_config(layout, raw, config_path)
    found = scan(folder)
    try:
        with torch.device("meta"):
            model = MoEForCausalLM(config)
        keys = layout.keys_for(found)
        plan = load_plan(model, layout, keys, found, folder)
        model.to(dtype=dtype or config_dtype(raw, config_path))
        model.to_empty(device=device)
        model.tie_weights()
        if not keys.expert_map:
            for mlp in model.moe_layers():
                mlp.experts.reset_expert_map()
        tensors = model_tensors(model)
        for key, source in read_tensors(found, plan):
            if isinstance(source, MXFP4Weight):
                source = source.to(dtype=tensors[plan[key].param].dtype).dequantize()
            check_finite(key, source, found[key].file)
            copy_into(tensors, plan[key], source)
            del source  # one source tensor alive at a time
    except CheckpointError:
        raise
    except (RuntimeError, ValueError, TypeError, OverflowError, MemoryError, OSError, AssertionError,
            SafetensorError) as e:  # fmt: skip
        # torch's and safetensors' own errors (allocation, dtype, a device torch lacks: AssertionError, a shard
        # truncated after its header was read): one CheckpointError naming the folder, like every other problem.
        raise CheckpointError(f"{folder}: cannot load the checkpoint ({type(e).__name__}: {e})") from e
    # Loaded models are for inference until the caller says otherwise, as with transformers.
    return model.eval()


def check_finite(key: str, tensor: torch.Tensor, file: str) -> None:
    """NaN or Inf in a checkpoint tensor: a model that computes NaN from the first token. Named at load instead."""
    if tensor.is_floating_point():
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise CheckpointError(f"{file}: key {key!r} holds {bad} non-finite values (NaN/Inf) of {tensor.numel()}")


def save_pretrained(
    model: MoEForCausalLM,
    path: PathLike,
    layout: Optional[str] = None,
    max_shard_size: Union[int, str] = "5GB",
    overwrite: bool = False,
) -> None:
    """Write ``model`` as a checkpoint folder, atomically.

    Args:
        layout: a ``model_type`` of ``LAYOUTS``; default the layout the model was loaded from, else ``flux_moe``.
            A merged model, or one using a feature the layout's modelling code lacks, raises instead of being
            written differently.
        max_shard_size: bytes per shard (int, or a string such as ``"5GB"``); above it the tensors are split into
            numbered shards plus ``model.safetensors.index.json``.
        overwrite: replace a non-empty ``path``; otherwise that raises.

    A model with tuning experts attached (LoRA factors or split-off tuned stacks) raises: fold them in first
    (``flux_engine.adapters.merge_lora`` or ``flux_engine.training.detach_tuning``), or export the adapters with
    ``flux_engine.adapters.save_peft_adapter``.
    """
    attached = [mlp.layer for mlp in model.moe_layers() if mlp.experts.has_tuning]
    if attached:
        raise ValueError(
            f"save_pretrained: MoE layers {attached} have tuning experts attached; fold them in with "
            "adapters.merge_lora / training.detach_tuning first, or save the adapters with adapters.save_peft_adapter"
        )
    name = layout or model.config.metadata.get(CHECKPOINT_LAYOUT, NATIVE)
    target = get_layout(name, "save_pretrained")
    if not target.keys.expert_map:
        _check_unmerged(model, name)
    config_json = layout_config_json(target, model.config, model.model.embed_tokens.weight.dtype)
    max_bytes = parse_size(max_shard_size)
    tensors = model_tensors(model)
    items = [
        (entry.key, tensors[entry.param][entry.index].transpose(-1, -2) if entry.transposed else tensors[entry.param][entry.index])
        for entry in entries(model, target.keys)
    ]
    with atomic_directory(os.fspath(path), overwrite) as staging:
        write_json(os.path.join(staging, CONFIG_FILE), config_json)
        write_shards(staging, items, max_bytes)


# -- loading ---------------------------------------------------------------------------------------------------


def read_config(layout: Layout, raw: Dict[str, Any], config_path: str) -> MoEConfig:
    """The ``MoEConfig`` of a checkpoint's parsed ``config.json`` (``raw``) in ``layout``; errors name ``config_path``."""
    try:
        config = layout.from_hf(raw)
    except (CheckpointError, ValueError, TypeError) as e:
        raise CheckpointError(f"{config_path}: {e}") from None
    if layout.model_type == NATIVE:
        config.metadata[CHECKPOINT_LAYOUT] = NATIVE
    else:
        config.metadata.update(
            {SOURCE_MODEL_TYPE: layout.model_type, CHECKPOINT_LAYOUT: layout.model_type, SOURCE_CONFIG: raw}
        )
    return config


def config_dtype(raw: Dict[str, Any], config_path: str) -> torch.dtype:
    """The floating-point dtype a ``config.json`` declares (``dtype`` / ``torch_dtype``; float32 if none)."""
    name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CheckpointError(f"{config_path}: config key dtype={name!r} is not a floating-point torch dtype")
    return dtype


def load_plan(
    model: MoEForCausalLM, layout: Layout, keys: KeyLayout, found: Dict[str, TensorInfo], folder: str
) -> Dict[str, Entry]:
    """Checkpoint key -> model slice, after checking that the checkpoint has exactly these keys, shaped right."""
    plan = {entry.key: entry for entry in entries(model, keys)}
    ignored = [re.compile(pattern) for pattern in layout.ignored]
    if model.config.tie_word_embeddings:
        ignored.append(re.compile(r"lm_head\.weight"))  # the embedding is the head
    companions = {scales_key(key) for key, entry in plan.items() if entry.mxfp4}
    unexpected = [
        key for key in found if key not in plan and key not in companions and not any(p.fullmatch(key) for p in ignored)
    ]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(
            f"{found[unexpected[0]].file}: unexpected key {unexpected[0]!r}{more} for model_type {layout.model_type!r}"
        )
    missing = [key for key in plan if key not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(
            f"{weights_file(folder)}: missing key {missing[0]!r}{more} for model_type {layout.model_type!r}"
        )
    tensors = model_tensors(model)
    for key, entry in plan.items():
        expected = list(tensors[entry.param][entry.index].shape)
        if entry.transposed:
            expected[-2:] = expected[:-3:-1]
        if entry.mxfp4:
            _check_mxfp4(key, expected, found)
        elif list(found[key].shape) != expected:
            raise CheckpointError(f"{found[key].file}: key {key!r} has shape {list(found[key].shape)}, expected {expected}")
    return plan


def _check_mxfp4(key: str, expected: List[int], found: Dict[str, TensorInfo]) -> None:
    """The blocks ``key`` and its scales encode a weight of shape ``expected`` (uint8, groups of 32)."""
    *lead, K = expected
    if K % MXFP4_GROUP:
        raise CheckpointError(f"{found[key].file}: key {key!r}: MXFP4 needs a width divisible by {MXFP4_GROUP}, got {K}")
    scales = scales_key(key)
    if scales not in found:
        raise CheckpointError(f"{found[key].file}: key {key!r} has no MXFP4 scales {scales!r}")
    want = {key: [*lead, K // MXFP4_GROUP, MXFP4_GROUP // 2], scales: [*lead, K // MXFP4_GROUP]}
    for k, shape in want.items():
        info = found[k]
        if list(info.shape) != shape or info.dtype != "U8":
            raise CheckpointError(f"{info.file}: key {k!r} is {info.dtype} {list(info.shape)}, expected U8 {shape}")


def read_tensors(found: Dict[str, TensorInfo], plan: Dict[str, Entry]) -> Iterator[Tuple[str, Any]]:
    """``(key, tensor)`` for every key of ``plan``, in the model's orientation (transposed stacks turned back),
    one source tensor at a time; an MXFP4 pair comes once, under its blocks key, as an ``MXFP4Weight`` (still
    packed: the caller dequantises it or repacks it, ``profiling``)."""
    wanted: List[str] = []
    for key, entry in plan.items():
        wanted += [key, scales_key(key)] if entry.mxfp4 else [key]
    blocks_of = {scales_key(key): key for key, entry in plan.items() if entry.mxfp4}
    held: Dict[str, torch.Tensor] = {}  # the first half of an MXFP4 pair until the other is read
    for key, tensor in stream(found, wanted):
        blocks_key = blocks_of.get(key, key)
        entry = plan[blocks_key]
        if entry.mxfp4 and blocks_key not in held:
            held[blocks_key] = tensor
            del tensor
            continue
        if entry.mxfp4:
            other = held.pop(blocks_key)
            out = MXFP4Weight(*((tensor, other) if key == blocks_key else (other, tensor)))
            del other
        else:
            out = tensor.transpose(-1, -2) if entry.transposed else tensor
        del tensor  # the caller's copy is the only reference: one source tensor alive at a time
        yield blocks_key, out
        del out


@torch.no_grad()
def copy_into(tensors: Dict[str, torch.Tensor], entry: Entry, source: torch.Tensor) -> None:
    """Copy one checkpoint tensor into the model slice ``entry`` names (``tensors``: ``model_tensors(model)``)."""
    tensors[entry.param][entry.index].copy_(source)


# -- saving ----------------------------------------------------------------------------------------------------


def _check_unmerged(model: MoEForCausalLM, layout_name: str) -> None:
    num_experts = model.config.num_experts
    for mlp in model.moe_layers():
        experts = mlp.experts
        identity = torch.arange(num_experts, dtype=experts.expert_map.dtype, device=experts.expert_map.device)
        if experts.num_physical != num_experts or not torch.equal(experts.expert_map, identity):
            raise CheckpointError(
                f"save_pretrained: layer {mlp.layer} is merged ({experts.num_physical} physical experts for {num_experts}); "
                f"a merged model can only be saved with layout={NATIVE!r}, not {layout_name!r}"
            )


def layout_config_json(layout: Layout, config: MoEConfig, dtype: torch.dtype) -> Dict[str, Any]:
    """The ``config.json`` of ``config`` written in ``layout`` (raises where the layout cannot express it)."""
    dtype_name = str(dtype).removeprefix("torch.")
    header = {"model_type": layout.model_type, "architectures": [layout.architecture], "dtype": dtype_name}
    if layout.model_type == NATIVE:
        return {**flux_to_json(config), **header}
    source = config.metadata.get(SOURCE_CONFIG) or {}
    source = {k: v for k, v in source.items() if k not in layout.dropped} if source.get("model_type") == layout.model_type else {}
    out = {**source, **layout.to_hf(config), **header}
    if "torch_dtype" in out:
        out["torch_dtype"] = dtype_name
    _check_expressible(layout, config, out)
    return out


def _comparable(config: MoEConfig) -> Dict[str, Any]:
    """The fields that decide what the model computes, with layer lists spelled out."""
    fields = config.to_dict()
    del fields["metadata"]
    fields["moe_layers"] = config.moe_layer_indices
    fields["physical_experts"] = [config.physical_experts_of(i) for i in config.moe_layer_indices]
    if len(config.moe_layer_indices) == config.num_layers:
        del fields["intermediate_size"]  # only dense layers use it
    return fields


def _check_expressible(layout: Layout, config: MoEConfig, config_json: Dict[str, Any]) -> None:
    """Reading ``config_json`` back must give ``config``: otherwise the layout cannot carry the model."""
    where = f"save_pretrained: cannot save as {layout.model_type!r}"
    try:
        written = _comparable(layout.from_hf(config_json))
    except (CheckpointError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None
    wanted = _comparable(config)
    lost = [f"{key}={value!r}" for key, value in wanted.items() if written.get(key) != value]
    if lost:
        raise CheckpointError(f"{where}: its config has no equivalent for {', '.join(lost)}")
