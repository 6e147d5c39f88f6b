"""Expert LoRA adapters: PEFT's on-disk format, and folding adapters into expert weights.

On disk (``adapter_config.json`` + ``adapter_model.safetensors``, ``peft_type: "LORA"``) every adapted expert is a
set of per-expert modules ``model.layers.{i}.mlp.experts.{e}.gate_proj / up_proj / down_proj``, the per-expert
layout of qwen2_moe / olmoe / deepseek in transformers < 5, keyed as PEFT writes them
(``base_model.model.<module>.lora_A.weight``). Our gate_up LoRA shares one ``A`` between gate and up, so it is
written as ``gate_proj: (A, B[:I])`` and ``up_proj: (A, B[I:])`` and read back exactly; adapters with different gate
and up ``A``s (or only one of them) are read as one gate_up LoRA of concatenated rank (``A = [A_g; A_u]``,
``B = blockdiag(B_g, B_u)``), still exact. gpt-oss interleaves gate and up rows (row ``2i`` gate, ``2i + 1`` up): its
``gate_proj`` / ``up_proj`` factors are ``B``'s even / odd rows (``gate_up_rows``).

gpt-oss has no per-expert modules in transformers (only the stacked ``mlp.experts.gate_up_proj [E, H, 2I]`` and
``down_proj [E, I, H]``), so its adapters are written as PEFT adapts those: ``target_parameters`` LoRA, one
``lora_A [E r, in]`` / ``lora_B [out, r E]`` pair per MoE layer and target with zeros for experts without an
adapter (``_stacked_tensors``); ``PeftModel.from_pretrained`` puts them on ``GptOssForCausalLM`` as they are.

In memory adapters are ``Dict[ExpertKey, Dict[str, Tensor]]`` as in ``training.TrainResult.trained``
(``gate_up_A [r, H]``, ``gate_up_B [2I, r]``, ``down_A [r, I]``, ``down_B [H, r]``), applied with one ``scale``;
trained bias deltas (``gate_up_bias``, ``down_bias``: ``training.TrainConfig.train_biases``) fold into the model
(``merge_adapters``) but have no PEFT LoRA equivalent and are refused by ``save_peft_adapter``.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from flux_engine.checkpoint.errors import CheckpointError
from flux_engine.checkpoint.safetensors_io import atomic_directory, read_json, write_json
from flux_engine.models.config import MoEConfig
from flux_engine.models.moe import LORA_TARGETS
from flux_engine.training import ExpertKey, ExpertState, check_owns, tuning_state

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_KEY = re.compile(
    r"base_model\.model\.model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.lora_([AB])\.weight"
)

PathLike = Union[str, os.PathLike]


@dataclass
class PeftAdapter:
    """Adapters read from a PEFT folder; ``scale`` = ``alpha / rank`` (``alpha / sqrt(rank)`` with rsLoRA)."""

    adapters: ExpertState
    rank: int
    alpha: float
    scale: float


def expert_module(config: MoEConfig, layer: int, expert: int, proj: str) -> str:
    """PEFT module name of projection ``proj`` of original expert ``expert`` in MoE layer ``layer``."""
    return f"model.layers.{config.moe_layer_indices[layer]}.mlp.experts.{expert}.{proj}"


def _peft_key(module: str, factor: str) -> str:
    return f"base_model.model.{module}.lora_{factor}.weight"


def _adapter_rank(key: ExpertKey, tensors: Dict[str, torch.Tensor]) -> int:
    ranks = {t.shape[0] for name, t in tensors.items() if name.endswith("_A")}
    ranks |= {t.shape[1] for name, t in tensors.items() if name.endswith("_B")}
    if len(ranks) != 1:
        raise ValueError(f"expert {key}: LoRA factors of inconsistent ranks {sorted(ranks)}")
    return ranks.pop()


def save_peft_adapter(
    path: PathLike,
    adapters: ExpertState,
    config: MoEConfig,
    alpha: float,
    overwrite: bool = False,
    base_model_name_or_path: Optional[str] = None,
) -> None:
    """Write ``adapters`` (all of one rank ``r``, applied with scale ``alpha / r``) as a PEFT LoRA folder,
    atomically (a staging folder renamed into place). ``target_modules`` lists exactly the exported modules."""
    if not adapters:
        raise ValueError("no adapters to save")
    biased = sorted(key for key, t in adapters.items() if set(t) & {"gate_up_bias", "down_bias"})
    if biased:
        raise ValueError(f"experts {biased[:3]} carry trained bias deltas, which PEFT's LoRA format cannot hold; fold "
                         "them into the model (merge_adapters) and save it with checkpoint.save_pretrained")  # fmt: skip
    ranks = {_adapter_rank(key, t) for key, t in adapters.items()}
    if len(ranks) != 1:
        raise ValueError(f"PEFT's adapter_config has one rank r; these adapters have ranks {sorted(ranks)}")
    r = ranks.pop()
    if stacked_experts(config):
        tensors, targets = _stacked_tensors(adapters, config, r)
        modules: list = []
    else:
        tensors, targets = _per_expert_tensors(adapters, config), []
        modules = sorted({k[len("base_model.model.") : -len(".lora_A.weight")] for k in tensors if ".lora_A." in k})
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": modules,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    if targets:
        adapter_config["target_parameters"] = targets
    with atomic_directory(os.fspath(path), overwrite) as staging:
        write_json(os.path.join(staging, ADAPTER_CONFIG), adapter_config)
        save_file(tensors, os.path.join(staging, ADAPTER_WEIGHTS), metadata={"format": "pt"})


def _per_expert_tensors(adapters: ExpertState, config: MoEConfig) -> Dict[str, torch.Tensor]:
    gate_rows, up_rows = gate_up_rows(config)
    tensors: Dict[str, torch.Tensor] = {}
    for (l, e), t in sorted(adapters.items()):
        pairs = []
        if "gate_up_A" in t:
            A, B = t["gate_up_A"], t["gate_up_B"]
            pairs += [("gate_proj", A, B[gate_rows]), ("up_proj", A, B[up_rows])]
        if "down_A" in t:
            pairs.append(("down_proj", t["down_A"], t["down_B"]))
        if not pairs:
            raise ValueError(f"expert {(l, e)}: no LoRA factors (expected gate_up_A/B and/or down_A/B)")
        for proj, A, B in pairs:
            module = expert_module(config, l, e, proj)
            # clone: safetensors refuses tensors that share storage (gate and up share A, B's halves share B).
            tensors[_peft_key(module, "A")] = A.detach().to("cpu").contiguous().clone()
            tensors[_peft_key(module, "B")] = B.detach().to("cpu").contiguous().clone()
    return tensors


def stacked_experts(config: MoEConfig) -> bool:
    """Whether PEFT adapts this family's experts as stacked parameters (``target_parameters``) rather than
    per-expert modules: gpt-oss, whose experts exist only as ``mlp.experts.gate_up_proj [E, H, 2I]`` /
    ``down_proj [E, I, H]`` in transformers."""
    return config.metadata.get("source_model_type") == "gpt_oss"


# PEFT's stacked-parameter LoRA (``ParamWrapper``): per MoE layer and target, ``lora_A [E r, in]`` (expert-major:
# rows ``e r .. e r + r - 1`` are expert e's A) and ``lora_B [out, r E]`` (rank-major: column ``j E + e`` is column j
# of expert e's B); in/out are the stacked parameter's (gpt-oss: gate_up H -> 2I, down I -> H). Several targets on
# one module nest, the first listed innermost: its keys gain one ``base_layer.`` per wrapper around it.
_STACKED_PARAMS = {"gate_up": "mlp.experts.gate_up_proj", "down": "mlp.experts.down_proj"}
_STACKED_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.mlp\.experts\.((?:base_layer\.)*)lora_([AB])\.weight")


def _fans(config: MoEConfig) -> Dict[str, Tuple[int, int]]:
    """``(in, out)`` of each LoRA target of one expert."""
    H, I = config.hidden_size, config.moe_intermediate_size
    return {"gate_up": (H, 2 * I), "down": (I, H)}


def _stacked_tensors(adapters: ExpertState, config: MoEConfig, r: int):
    """PEFT ``target_parameters`` tensors of ``adapters`` (experts without an adapter get zero factors: no update)
    and the target list; only MoE layers with an adapter are written."""
    E, fans = config.num_experts, _fans(config)
    targets = [t for t in LORA_TARGETS if any(f"{t}_A" in a for a in adapters.values())]
    if not targets:
        raise ValueError("no LoRA factors to save (expected gate_up_A/B and/or down_A/B)")
    tensors: Dict[str, torch.Tensor] = {}
    for l in sorted({l for l, _ in adapters}):
        layer = config.moe_layer_indices[l]
        for depth, t in enumerate(targets):
            fan_in, fan_out = fans[t]
            A, B = torch.zeros(E, r, fan_in), torch.zeros(fan_out, r, E)
            for (al, e), a in adapters.items():
                if al == l and f"{t}_A" in a:
                    A[e], B[:, :, e] = a[f"{t}_A"].detach().float().cpu(), a[f"{t}_B"].detach().float().cpu()
            prefix = f"base_model.model.model.layers.{layer}.mlp.experts." + "base_layer." * (len(targets) - 1 - depth)
            tensors[prefix + "lora_A.weight"] = A.reshape(E * r, fan_in)
            tensors[prefix + "lora_B.weight"] = B.reshape(fan_out, r * E)
    return tensors, [_STACKED_PARAMS[t] for t in targets]


def read_config(path: str) -> Tuple[int, float, float, List[str]]:
    """``(r, lora_alpha, scale, target_parameters)`` of an adapter_config.json, rejecting what has no equivalent
    here."""
    cfg = read_json(path)
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type must be 'LORA', got {cfg.get('peft_type')!r}")
    for key, ok in (("fan_in_fan_out", False), ("bias", "none")):
        if cfg.get(key, ok) != ok:
            raise CheckpointError(f"{path}: {key}={cfg[key]!r} is not supported (only {ok!r})")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise CheckpointError(f"{path}: per-module {key} is not supported")
    try:
        r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: needs integer 'r' and numeric 'lora_alpha'") from None
    if r < 1:
        raise CheckpointError(f"{path}: r must be >= 1, got {r}")
    targets = list(cfg.get("target_parameters") or [])
    if any(t not in _STACKED_PARAMS.values() for t in targets) or len(set(targets)) != len(targets):
        raise CheckpointError(f"{path}: target_parameters {targets}: only distinct {sorted(_STACKED_PARAMS.values())}")
    return r, alpha, alpha / (math.sqrt(r) if cfg.get("use_rslora") else r), targets


def _read_keys(path: str, pattern: "re.Pattern[str]", what: str) -> Dict[Tuple[str, ...], torch.Tensor]:
    """Every tensor of a PEFT safetensors file (float32) by the groups of ``pattern``; any other key is an error."""
    out: Dict[Tuple[str, ...], torch.Tensor] = {}
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():
                m = pattern.fullmatch(key)
                if m is None:
                    raise CheckpointError(f"{path}: unsupported key {key!r} (only {what})")
                out[m.groups()] = f.get_tensor(key).float()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except SafetensorError as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    return out


def _read_factors(path: str, config: MoEConfig) -> Dict[ExpertKey, Dict[str, Dict[str, torch.Tensor]]]:
    """``{(layer, expert): {proj: {"A": [r, in], "B": [out, r]}}}`` from a PEFT safetensors file, shapes checked."""
    H, I = config.hidden_size, config.moe_intermediate_size
    fans = {"gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}
    moe_layers = config.moe_layer_indices
    found: Dict[ExpertKey, Dict[str, Dict[str, torch.Tensor]]] = {}
    for (i, e, proj, factor), tensor in _read_keys(path, _KEY, "routed-expert LoRA of gate/up/down_proj").items():
        i, e = int(i), int(e)
        if i not in moe_layers or not 0 <= e < config.num_experts:
            raise CheckpointError(f"{path}: LoRA of layer {i} expert {e} names no routed expert of this model")
        found.setdefault((moe_layers.index(i), e), {}).setdefault(proj, {})[factor] = tensor
    for key, projs in found.items():
        for proj, f in projs.items():
            if set(f) != {"A", "B"}:
                raise CheckpointError(f"{path}: expert {key} {proj} has lora_{''.join(f)} without its partner")
            fan_in, fan_out = fans[proj]
            r = f["A"].shape[0]
            if f["A"].shape != (r, fan_in) or f["B"].shape != (fan_out, r):
                raise CheckpointError(
                    f"{path}: expert {key} {proj}: lora_A {list(f['A'].shape)}, lora_B {list(f['B'].shape)}, expected "
                    f"[r, {fan_in}] and [{fan_out}, r]"
                )
    return found


def _read_stacked(path: str, config: MoEConfig, r: int, target_parameters: List[str]) -> ExpertState:
    """The per-expert adapters of a PEFT ``target_parameters`` file (see ``_stacked_tensors``); experts whose
    factors are all zero have none."""
    by_param = {param: t for t, param in _STACKED_PARAMS.items()}
    targets = [by_param[p] for p in target_parameters]
    raw = _read_keys(path, _STACKED_KEY, "LoRA of mlp.experts.gate_up_proj / down_proj")
    depth_of = {"base_layer." * (len(targets) - 1 - d): t for d, t in enumerate(targets)}
    moe_layers, E, fans = config.moe_layer_indices, config.num_experts, _fans(config)
    factors: Dict[Tuple[int, str], Dict[str, torch.Tensor]] = {}
    for (i, nest, factor), tensor in raw.items():
        if int(i) not in moe_layers or nest not in depth_of:
            raise CheckpointError(f"{path}: LoRA {factor} of layer {i} ({nest or 'outermost'}) matches no target of "
                                  f"{target_parameters} in a MoE layer of this model")  # fmt: skip
        factors.setdefault((moe_layers.index(int(i)), depth_of[nest]), {})[factor] = tensor
    adapters: ExpertState = {}
    for (l, t), f in sorted(factors.items()):
        fan_in, fan_out = fans[t]
        if set(f) != {"A", "B"} or f["A"].shape != (E * r, fan_in) or f["B"].shape != (fan_out, r * E):
            shapes = {k: list(v.shape) for k, v in f.items()}
            raise CheckpointError(f"{path}: layer {moe_layers[l]} {t}: LoRA factors {shapes}, expected A "
                                  f"[{E * r}, {fan_in}] and B [{fan_out}, {r * E}]")  # fmt: skip
        A, B = f["A"].view(E, r, fan_in), f["B"].view(fan_out, r, E)
        for e in range(E):
            if bool(A[e].any()) or bool(B[:, :, e].any()):
                adapters.setdefault((l, e), {}).update({f"{t}_A": A[e].clone(), f"{t}_B": B[:, :, e].clone()})
    return adapters


def gate_up_rows(config: MoEConfig) -> Tuple[slice, slice]:
    """The rows of an expert's gate_up ``[2I, .]`` holding the gate and the up projection: the halves, or the even
    and odd rows when they are interleaved (gpt-oss)."""
    I = config.moe_intermediate_size
    if config.expert_interleaved:
        return slice(0, 2 * I, 2), slice(1, 2 * I, 2)
    return slice(0, I), slice(I, 2 * I)


def _gate_up(gate: Optional[Dict[str, torch.Tensor]], up: Optional[Dict[str, torch.Tensor]], config: MoEConfig):
    """One gate_up LoRA ``(A [r, H], B [2I, r])`` equal to separate gate and up LoRAs (either may be absent)."""
    rows = gate_up_rows(config)
    if gate is not None and up is not None and torch.equal(gate["A"], up["A"]):
        B = torch.empty(2 * config.moe_intermediate_size, gate["A"].shape[0])
        B[rows[0]], B[rows[1]] = gate["B"], up["B"]
        return gate["A"], B
    parts = [(p, r) for p, r in zip((gate, up), rows) if p is not None]
    A = torch.cat([p["A"] for p, _ in parts])
    B = torch.zeros(2 * config.moe_intermediate_size, A.shape[0])
    col = 0
    for p, r in parts:
        rank = p["A"].shape[0]
        B[r, col : col + rank] = p["B"]
        col += rank
    return A, B


def load_peft_adapter(path: PathLike, config: MoEConfig) -> PeftAdapter:
    """Read a PEFT LoRA folder (as ``save_peft_adapter`` writes: per-expert modules, or stacked
    ``target_parameters`` for gpt-oss) for a model of ``config``."""
    folder = os.fspath(path)
    config_path = os.path.join(folder, ADAPTER_CONFIG)
    r, alpha, scale, targets = read_config(config_path)
    if targets:
        if not stacked_experts(config):
            raise CheckpointError(f"{config_path}: target_parameters adapters are read for gpt-oss models only")
        return PeftAdapter(_read_stacked(os.path.join(folder, ADAPTER_WEIGHTS), config, r, targets), r, alpha, scale)
    found = _read_factors(os.path.join(folder, ADAPTER_WEIGHTS), config)
    adapters: ExpertState = {}
    for key, projs in sorted(found.items()):
        t: Dict[str, torch.Tensor] = {}
        if "gate_proj" in projs or "up_proj" in projs:
            t["gate_up_A"], t["gate_up_B"] = _gate_up(projs.get("gate_proj"), projs.get("up_proj"), config)
        if "down_proj" in projs:
            t["down_A"], t["down_B"] = projs["down_proj"]["A"], projs["down_proj"]["B"]
        adapters[key] = t
    return PeftAdapter(adapters, r, alpha, scale)


def fold_lora(W: torch.Tensor, tensors: Dict[str, torch.Tensor], target: str, scale: float) -> torch.Tensor:
    """``W + scale * B A`` in ``W``'s dtype (the sum in fp32) for projection ``target`` ("gate_up" or "down") of one
    expert's adapter ``tensors``; ``W`` itself when the adapter does not cover ``target``. ``W``: ``[out, in]``."""
    if f"{target}_A" not in tensors:
        return W
    A = tensors[f"{target}_A"].to(W.device, torch.float32)
    B = tensors[f"{target}_B"].to(W.device, torch.float32)
    return (W.float() + scale * (B @ A)).to(W.dtype)


@torch.no_grad()
def merge_adapters(model: nn.Module, adapters: ExpertState, scale: float, skip: Iterable[ExpertKey] = ()) -> None:
    """Fold LoRA adapters into the experts' weights: ``W_e += scale * B A`` on each adapted expert's physical
    weights (which it must own). ``skip``: experts left as they are, e.g. this round's tuning experts, whose
    global factors ``training.train_round(init=...)`` resumes instead (folding them too would count them twice)."""
    skip = set(skip)
    layers = model.moe_layers()
    for (l, e), t in adapters.items():
        if (l, e) in skip:
            continue
        if not 0 <= l < len(layers):
            raise ValueError(f"adapter for expert {(l, e)}: the model has {len(layers)} MoE layers")
        check_owns(model, l, e)
        ex = layers[l].experts
        p = int(ex.expert_map[e])
        for W, target in zip(ex.physical_weights(p), LORA_TARGETS):
            if f"{target}_A" in t:
                W.copy_(fold_lora(W, t, target, scale))
        for target in LORA_TARGETS:
            if f"{target}_bias" in t:  # a trained bias delta (TrainConfig.train_biases)
                b = ex.physical_tensors(p)[f"{target}_proj_bias"]
                b.copy_((b.float() + t[f"{target}_bias"].to(b.device, torch.float32)).to(b.dtype))


def merge_lora(model: nn.Module) -> None:
    """Fold every attached LoRA adapter into its experts' weights (for serving) and drop the adapters."""
    state = tuning_state(model)
    for l, mlp in enumerate(model.moe_layers()):
        lora = mlp.experts.lora
        if lora is not None:
            merge_adapters(model, {key: t for key, t in state.items() if key[0] == l}, lora.scale)
            mlp.experts.lora = None

