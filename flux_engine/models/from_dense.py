"""Build an MoE from a dense Llama-architecture model (FLUX_DESIGN.md section 2).

A SwiGLU FFN is a sum over its I neurons, ``down[:, n] * silu(gate[n] . x) * up[n] . x``, so experts are made
from sets of neurons. With the dense weights ``gate, up: [I, H]`` and ``down: [H, I]``:

- ``"split"`` (LLaMA-MoE): the neurons are partitioned into E disjoint groups of I/E (random or balanced
  k-means); expert e owns its group's rows of gate/up and columns of down. All E experts with unit weights sum
  back to the dense FFN exactly (``scoring="ones"``, k = E); with k < E the model is lossy until long continued
  pre-training.
- ``"upcycle"`` (sparse upcycling): every expert is a full copy of the FFN. Renormalised top-k weights sum to
  1, so the MoE equals the dense model for any k and any router. Drop-Upcycling re-initialises a different
  random ``drop_fraction`` of each copy's neurons so the experts start apart (then step-0 equality is lost).
- ``"fine_grained"`` (DeepSeek-MoE style): the FFN becomes the shared expert; E routed experts of width
  ``expert_size`` take gate/up rows from random neuron groups of the FFN and start with zero down projections,
  so they add nothing at step 0 and the MoE equals the dense model.

Dense layers outside ``moe_layers``, attention, norms and embeddings are copied unchanged.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from flux_engine.models.config import MoEConfig
from flux_engine.models.moe import INIT_STD, MoEForCausalLM

METHODS = ("split", "upcycle", "fine_grained")
SPLITS = ("random", "kmeans")
# MoEConfig fields a caller may set on the result; the construction decides every other one.
ROUTING_FIELDS = ("scoring", "norm_topk_prob", "routed_scaling_factor", "router_aux_loss_coef", "metadata")
# Buffers some Llama checkpoints carry that the runtime recomputes.
_DERIVED_SUFFIXES = ("rotary_emb.inv_freq",)

Tensor = torch.Tensor


def llama_config(hf: Mapping[str, Any]) -> MoEConfig:
    """A dense ``MoEConfig`` (no MoE layers) from a transformers ``LlamaConfig`` dict (``config.to_dict()``)."""
    if hf.get("model_type") != "llama":
        raise ValueError(f"only Llama-architecture dense models are supported, got model_type={hf.get('model_type')!r}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"only SwiGLU (hidden_act='silu') FFNs are supported, got {hf['hidden_act']!r}")
    if hf.get("mlp_bias"):
        raise ValueError("mlp_bias=True is not supported: the runtime's FFNs and experts have no biases")
    rope = dict(hf.get("rope_parameters") or {})
    if hf.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        raise ValueError(f"RoPE scaling is not supported (rope_scaling={hf.get('rope_scaling')}, rope_parameters={rope})")
    heads = hf["num_attention_heads"]
    return MoEConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim"),
        intermediate_size=hf["intermediate_size"],
        rms_norm_eps=hf["rms_norm_eps"],
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        max_position_embeddings=hf["max_position_embeddings"],
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", False)),
        moe_layers=[],
        metadata={"source_model_type": "llama"},
    )


def _dense_config(config: Union[MoEConfig, Mapping[str, Any]]) -> MoEConfig:
    if isinstance(config, Mapping):
        config = llama_config(config) if "model_type" in config else MoEConfig.from_dict(dict(config))
    if not isinstance(config, MoEConfig):
        raise TypeError(f"dense_config must be a MoEConfig or a dict, got {type(config).__name__}")
    if config.moe_layer_indices:
        raise ValueError(f"dense_config has MoE layers {config.moe_layer_indices}; expected a dense model (moe_layers=[])")
    return config


def _checked_state(state: Mapping[str, Tensor], config: MoEConfig) -> Dict[str, Tensor]:
    """``state`` minus derived buffers, validated against the dense runtime model's names and shapes and cloned
    (the MoE must not share storage with the dense model)."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in MoEForCausalLM(config).state_dict().items()}
    state = {k: v for k, v in state.items() if not k.endswith(_DERIVED_SUFFIXES)}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"dense state dict does not match the Llama layout of dense_config: missing {missing[:6]}"
            f"{' ...' if len(missing) > 6 else ''}, unsupported {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}"
        )
    for k, v in state.items():
        if not torch.is_tensor(v) or not v.is_floating_point():
            raise TypeError(f"dense state {k!r} must be a floating-point tensor")
        if v.shape != expected[k]:
            raise ValueError(f"dense state {k!r} has shape {tuple(v.shape)}, dense_config implies {tuple(expected[k])}")
    return {k: v.detach().clone() for k, v in state.items()}


def random_groups(I: int, num_groups: int, size: int, gen: torch.Generator) -> Tensor:
    """``[num_groups, size]`` neuron ids: consecutive chunks of fresh random permutations of ``range(I)``, so the
    groups partition the neurons when ``num_groups * size == I`` and use every neuron about equally often otherwise."""
    perms = torch.cat([torch.randperm(I, generator=gen) for _ in range(math.ceil(num_groups * size / I))])
    return perms[: num_groups * size].view(num_groups, size)


def _balanced_assign(similarity: Tensor, size: int) -> Tensor:
    """Each of ``I`` rows of ``similarity: [I, E]`` to a column, exactly ``size`` rows per column, greedily in
    order of decreasing similarity -> ``[I]`` column ids."""
    I, E = similarity.shape
    assign, fill, left = [-1] * I, [0] * E, I
    for pair in torch.argsort(similarity.flatten(), descending=True).tolist():
        n, e = divmod(pair, E)
        if assign[n] < 0 and fill[e] < size:
            assign[n], fill[e], left = e, fill[e] + 1, left - 1
            if not left:
                break
    return torch.tensor(assign)


def kmeans_groups(features: Tensor, num_groups: int, gen: torch.Generator, iters: int = 10) -> Tensor:
    """Balanced spherical k-means of ``features: [I, D]`` (one row per neuron) -> ``[num_groups, I/num_groups]``
    neuron ids, each row one cluster in increasing neuron order."""
    I = features.shape[0]
    x = F.normalize(features.float(), dim=1)
    centroids = x[torch.randperm(I, generator=gen)[:num_groups]]
    for _ in range(iters):
        assign = _balanced_assign(x @ centroids.t(), I // num_groups)
        centroids = F.normalize(torch.zeros_like(centroids).index_add_(0, assign, x), dim=1)
    return torch.argsort(assign, stable=True).view(num_groups, I // num_groups)


def gather_experts(gate: Tensor, up: Tensor, down: Tensor, groups: Tensor):
    """Expert stacks from neuron groups: ``gate, up: [I, H]``, ``down: [H, I]``, ``groups: [E, m]`` ->
    ``gate_up: [E, 2m, H]`` (gate rows first), ``down: [E, H, m]``."""
    groups = groups.to(gate.device)
    return torch.cat([gate[groups], up[groups]], dim=1), down[:, groups].permute(1, 0, 2).contiguous()


def drop_upcycle_(gate_up: Tensor, down: Tensor, fraction: float, gen: torch.Generator) -> Tensor:
    """Re-initialise, in place, a random ``fraction`` of each expert's neurons (a different set per expert): their
    gate/up rows and down columns are redrawn from a normal with the mean and std of the whole stack (Drop-Upcycling).
    ``gate_up: [E, 2I, H]``, ``down: [E, H, I]`` -> the dropped neuron ids ``[E, round(fraction * I)]``."""
    E, H, I = down.shape
    k = round(fraction * I)
    dropped = torch.stack([torch.randperm(I, generator=gen)[:k] for _ in range(E)])
    # All three stacks as [E, I, H] views, so a neuron is one row of each.
    for w in (gate_up[:, :I], gate_up[:, I:], down.transpose(1, 2)):
        mean, std = w.mean().item(), w.std().item()
        for e in range(E):
            w[e, dropped[e]] = (torch.randn(k, H, generator=gen) * std + mean).to(w)
    return dropped


def _moe_mlp(
    gate: Tensor, up: Tensor, down: Tensor, method: str, num_experts: int, expert_size: int, split: str,
    noise: float, drop_fraction: float, router_std: float, gen: torch.Generator,
) -> Dict[str, Tensor]:
    """The ``mlp.*`` tensors of one MoE layer built from one dense FFN."""
    I, H = gate.shape
    if method == "split" and split == "kmeans":
        # A neuron is described by everything it touches: its gate and up rows and its down column.
        groups = kmeans_groups(torch.cat([gate, up, down.t()], dim=1), num_experts, gen)
    elif method == "upcycle":
        groups = torch.arange(I).expand(num_experts, I)
    else:
        groups = random_groups(I, num_experts, expert_size, gen)
    gate_up, down_e = gather_experts(gate, up, down, groups)
    out = {"gate.weight": (torch.randn(num_experts, H, generator=gen) * router_std).to(gate)}
    if method == "upcycle":
        if drop_fraction:
            drop_upcycle_(gate_up, down_e, drop_fraction, gen)
        if noise:
            gate_up += torch.randn(gate_up.shape, generator=gen).to(gate_up) * noise * gate_up.std()
            down_e += torch.randn(down_e.shape, generator=gen).to(down_e) * noise * down_e.std()
    if method == "fine_grained":
        down_e.zero_()
        out.update({"shared_expert.gate_proj.weight": gate, "shared_expert.up_proj.weight": up, "shared_expert.down_proj.weight": down})
    out["experts.gate_up_proj"], out["experts.down_proj"] = gate_up, down_e
    out["experts.expert_map"] = torch.arange(num_experts, dtype=torch.int32, device=gate.device)
    return out


def from_dense(
    dense_state: Mapping[str, Tensor],
    dense_config: Union[MoEConfig, Mapping[str, Any]],
    num_experts: int,
    top_k: int,
    *,
    method: str = "upcycle",
    moe_layers: Optional[Sequence[int]] = None,
    expert_size: Optional[int] = None,
    split: str = "random",
    noise: float = 0.0,
    drop_fraction: float = 0.0,
    router_std: float = INIT_STD,
    seed: int = 0,
    **routing: Any,
) -> MoEForCausalLM:
    """An ``MoEForCausalLM`` whose MoE layers are built from the dense FFNs (see the module docstring).

    Args:
        dense_state: the dense model's tensors under transformers Llama names (``model.layers.{i}.mlp.gate_proj.weight``
            ...; ``lm_head.weight`` may be absent when embeddings are tied). Not modified; the MoE gets copies.
        dense_config: the dense model as a ``MoEConfig`` with ``moe_layers=[]``, its dict, or a transformers
            ``LlamaConfig`` dict (recognised by its ``model_type``).
        num_experts: routed experts E per MoE layer; top_k: experts per token.
        method: ``"split"``, ``"upcycle"`` or ``"fine_grained"``.
        moe_layers: decoder layers that become MoE (None = all).
        expert_size: routed expert width for ``"fine_grained"`` (default I // 4); the other methods fix it
            (split: I / E, upcycle: I) and reject a different value.
        split: ``"random"`` or ``"kmeans"`` neuron partition (``"split"`` only).
        noise: upcycle only: Gaussian noise added to the copies, relative to each stack's std.
        drop_fraction: upcycle only: fraction of each copy's neurons re-initialised (Drop-Upcycling).
        router_std: std of the random router init; seed: seeds the partition, router, noise and drops.
        **routing: MoEConfig fields of the result among ``ROUTING_FIELDS``. Defaults: softmax with
            renormalised top-k for split and upcycle (split also scales the weights by k, so each chosen group
            keeps about the unit weight it has in the dense FFN; not with ``scoring="ones"``), softmax without
            renormalisation for fine_grained (DeepSeek-MoE). ``metadata`` is merged with the recipe.

    Returns:
        The MoE in the dense state's dtype, in training mode like a fresh module.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"need 1 <= top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    unknown = sorted(set(routing) - set(ROUTING_FIELDS))
    if unknown:
        raise ValueError(f"from_dense sets {unknown} itself; only {ROUTING_FIELDS} may be given")
    if method != "upcycle" and (noise or drop_fraction):
        raise ValueError(f"noise and drop_fraction apply to method='upcycle' only, not {method!r}")
    if not 0.0 <= drop_fraction <= 1.0 or noise < 0:
        raise ValueError(f"need 0 <= drop_fraction <= 1 and noise >= 0, got {drop_fraction}, {noise}")
    config = _dense_config(dense_config)
    state = _checked_state(dense_state, config)
    I = config.intermediate_size
    if method == "split" and I % num_experts:
        raise ValueError(f"split needs num_experts={num_experts} to divide intermediate_size={I}")
    natural = {"split": I // num_experts, "upcycle": I, "fine_grained": I // 4}[method]
    if expert_size is not None and method != "fine_grained" and expert_size != natural:
        raise ValueError(f"method={method!r} makes experts of width {natural}, not expert_size={expert_size}")
    expert_size = natural if expert_size is None else expert_size
    if not 1 <= expert_size <= I:
        raise ValueError(f"expert_size={expert_size} must lie in [1, intermediate_size={I}]")

    layers = list(range(config.num_layers)) if moe_layers is None else sorted(int(i) for i in moe_layers)
    ones = routing.get("scoring") == "ones"
    defaults = {
        "scoring": "softmax",
        "norm_topk_prob": method != "fine_grained",
        "routed_scaling_factor": float(top_k) if method == "split" and not ones else 1.0,
        "router_aux_loss_coef": 0.0,
    }
    recipe = dict(method=method, num_experts=num_experts, top_k=top_k, split=split, noise=noise,
                  drop_fraction=drop_fraction, router_std=router_std, seed=seed)
    moe_config = config.replace(
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=expert_size,
        moe_layers=layers,
        physical_experts=None,
        shared_expert_intermediate_size=I if method == "fine_grained" else 0,
        shared_expert_gate=False,
        **{**defaults, **{k: v for k, v in routing.items() if k != "metadata"}},
        metadata={**config.metadata, **routing.get("metadata", {}), "from_dense": recipe},
    )

    gen = torch.Generator().manual_seed(seed)
    for i in layers:
        prefix = f"model.layers.{i}.mlp."
        gate, up, down = (state.pop(f"{prefix}{name}_proj.weight") for name in ("gate", "up", "down"))
        mlp = _moe_mlp(gate, up, down, method, num_experts, expert_size, split, noise, drop_fraction, router_std, gen)
        state.update({prefix + k: v for k, v in mlp.items()})
    return from_state(moe_config, state)


def from_state(config: MoEConfig, state: Dict[str, Tensor]) -> MoEForCausalLM:
    """The model of ``config`` holding exactly the tensors of ``state`` (no random init, no copy);
    ``lm_head.weight`` may be absent when embeddings are tied."""
    if config.tie_word_embeddings:
        state = {**state, "lm_head.weight": state["model.embed_tokens.weight"]}
    with torch.device("meta"):
        model = MoEForCausalLM(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    return model
