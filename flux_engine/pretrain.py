"""Continued pre-training of the SmolLM2 MoE presets, and the measurements that say whether their experts differ
(FLUX_DESIGN.md section 2).

    python -m flux_engine.pretrain --preset smollm2-llama-moe-mini --drop-fraction 0.1 --steps 30
    python -m flux_engine.pretrain --split 16 --top-k 4 8 16      # neuron-split perplexities, oracle router

Text: BIG-bench records of four domains (``flux_engine.data``), ``context + answer`` packed into rows of
``seq_len`` tokens. Training uses the train part of ``train_test_split(test_size=0.2, seed=0)``; every held-out
measurement uses the same first rows of its test part. Experiments that test on that split's test part therefore
never test on text the prepared model was trained on.

Recipes: an upcycled preset (optionally Drop-Upcycled) trained on batches mixing all domains with the preset's
load-balancing loss (the model adds it in training mode); optionally Branch-Train-MiX first: expert e alone is
tuned on domain ``e mod D`` (all of the router's choices mapped onto it via the expert map), then the router and
experts are trained on the mix. A prepared model is cached in the native checkpoint layout, keyed by its recipe.

Measurements (``measure``), per MoE layer and averaged: mean pairwise cosine similarity of the experts' flattened
weights; mean pairwise relative difference of expert outputs ``|y_a - y_b| / mean(|y_a|, |y_b|)`` on held-out
tokens (copies: 0); routing entropy (mean per-token entropy of the router's softmax, bits; log2 E = undecided);
load entropy (entropy of how often each expert is chosen, bits; log2 E = balanced); routing/domain mutual
information ``I(domain; chosen expert)`` in bits; plus the held-out perplexity of the whole model.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from flux_engine import presets
from flux_engine.checkpoint import load_pretrained, save_pretrained
from flux_engine.cache import cache_root
from flux_engine.data import lm_batches, load_tasks, train_test_split
from flux_engine.models.from_dense import from_dense
from flux_engine.models.moe import MoEForCausalLM, MoEMLP
from flux_engine.smollm2 import build_preset, load_smollm2_dense, load_tokenizer

DOMAINS = ("squad_shifts", "vitaminc_fact_verification", "goal_step_wikihow", "social_iqa")
TRAINABLE = ("moe", "router", "all")

Tensor = torch.Tensor


@dataclass(frozen=True)
class Recipe:
    """How a prepared model is made; its ``key()`` names the cache entry."""

    preset: str = "smollm2-llama-moe-mini"
    drop_fraction: Optional[float] = None  # None: the preset's (see smollm2.build_preset)
    noise: float = 0.0
    branch_steps: int = 0  # Branch-Train-MiX: steps for each expert alone on its domain (0 = none)
    steps: int = 0  # steps on the domain mix
    train: str = "moe"  # "moe": experts and routers; "router": routers only; "all": every parameter
    lr: float = 3e-4
    batch_size: int = 4
    seq_len: int = 128
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def cache_folder(self) -> Path:
        """Where ``prepare`` caches this recipe's model (a checkpoint folder once prepared)."""
        return cache_root() / "pretrain" / f"{self.preset}-{self.key()}"


# ------------------------------------------------------------------------------------------------------- data


@dataclass
class Corpus:
    """Full token rows ``[N, seq_len]`` per domain: ``train`` to learn from, ``heldout`` to measure on."""

    train: Dict[str, Tensor]
    heldout: Dict[str, Tensor]


def _rows(records, tokenizer, seq_len: int, seed: int) -> Tensor:
    """Packed ``[N, seq_len]`` rows; the padded last row of the stream is dropped, so no attention mask is needed."""
    batches = lm_batches(records, tokenizer, seq_len, batch_size=256, seed=seed)
    return torch.cat([b["input_ids"][b["attention_mask"].all(1)] for b in batches])


def load_corpus(
    tokenizer: Any, seq_len: int = 128, heldout_rows: int = 4, max_records: int = 4000, domains: Sequence[str] = DOMAINS
) -> Corpus:
    """Rows of each domain; at most ``max_records`` records per domain are tokenised (the tasks are large)."""
    train_records, test_records = train_test_split(load_tasks(list(domains)), test_size=0.2, seed=0)
    corpus = Corpus({}, {})
    for d in domains:
        train = [r for r in train_records if r.domain == d][:max_records]
        test = [r for r in test_records if r.domain == d][:max_records // 4]
        corpus.train[d] = _rows(train, tokenizer, seq_len, seed=0)
        corpus.heldout[d] = _rows(test, tokenizer, seq_len, seed=0)[:heldout_rows]
        if len(corpus.heldout[d]) < heldout_rows:
            raise ValueError(f"domain {d!r} has only {len(corpus.heldout[d])} held-out rows of {seq_len} tokens")
    return corpus


# ---------------------------------------------------------------------------------------------- measurement


def _pairs_mean(matrix: Tensor) -> float:
    """Mean of the off-diagonal entries of a square ``[E, E]`` matrix."""
    E = matrix.shape[0]
    return float((matrix.sum() - matrix.diagonal().sum()) / (E * (E - 1)))


def expert_outputs(mlp: MoEMLP, x: Tensor) -> Tensor:
    """Every physical expert's SwiGLU output for tokens ``x: [N, H]`` -> ``[E, N, H]`` (unweighted)."""
    gate, up = torch.einsum("nh,eih->eni", x, mlp.experts.gate_up_proj).chunk(2, dim=-1)
    return torch.einsum("eni,ehi->enh", F.silu(gate) * up, mlp.experts.down_proj)


def weight_cosine(mlp: MoEMLP) -> float:
    """Mean pairwise cosine similarity of the experts' flattened ``gate_up`` and ``down`` weights."""
    e = mlp.experts
    # float64: in fp32 the rounding of millions-long dot products (~1e-4) hides how far copies have drifted.
    flat = F.normalize(torch.cat([e.gate_up_proj.flatten(1), e.down_proj.flatten(1)], dim=1).double(), dim=1)
    return _pairs_mean(flat @ flat.t())


def output_difference(outputs: Tensor) -> float:
    """Mean over token and expert pairs of ``|y_a - y_b| / mean(|y_a|, |y_b|)`` for ``outputs: [E, N, H]``."""
    norms = outputs.norm(dim=-1)  # [E, N]
    diff = torch.cdist(outputs.transpose(0, 1), outputs.transpose(0, 1))  # [N, E, E]
    scale = (norms.t()[:, :, None] + norms.t()[:, None, :]) / 2
    return _pairs_mean((diff / scale.clamp_min(1e-12)).mean(0))


def entropy_bits(p: Tensor, dim: int = -1) -> Tensor:
    return -(p * torch.log2(p.clamp_min(1e-30))).sum(dim)


def routing_stats(logits: Tensor, ids: Tensor, domains: Tensor, num_domains: int) -> Dict[str, float]:
    """``logits: [N, E]``, chosen ``ids: [N, k]``, ``domains: [N]`` -> routing entropy, load entropy and
    routing/domain mutual information, in bits."""
    E = logits.shape[1]
    counts = torch.zeros(num_domains, E)
    counts.index_put_((domains[:, None].expand_as(ids), ids.long()), torch.ones(ids.shape), accumulate=True)
    joint = counts / counts.sum()
    p_domain, p_expert = joint.sum(1), joint.sum(0)
    conditional = (p_domain * entropy_bits(joint / p_domain[:, None].clamp_min(1e-30), dim=1)).sum()
    return {
        "route_entropy": float(entropy_bits(torch.softmax(logits.float(), -1)).mean()),
        "load_entropy": float(entropy_bits(p_expert)),
        "domain_mi": float(entropy_bits(p_expert) - conditional),
    }


@torch.no_grad()
def measure(model: MoEForCausalLM, corpus: Corpus, max_tokens: int = 512) -> Dict[str, Any]:
    """Held-out perplexity and, per MoE layer (and their mean), the expert and routing statistics of the module
    docstring. Expert outputs are compared on ``max_tokens`` held-out tokens per layer."""
    model.eval()
    inputs: Dict[int, List[Tensor]] = {}
    hooks = [
        mlp.register_forward_hook(lambda m, args, out: inputs.setdefault(m.layer, []).append(args[0].flatten(0, 1)))
        for mlp in model.moe_layers()
    ]
    nll, tokens, routers, domains = 0.0, 0, {}, []
    try:
        for d, rows in enumerate(corpus.heldout.values()):
            out = model(rows, labels=rows, return_routers=True)
            n = rows.numel() - rows.shape[0]
            nll, tokens = nll + float(out.loss) * n, tokens + n
            domains.append(torch.full((rows.numel(),), d))
            for r in out.routers:
                routers.setdefault(r.layer, []).append((r.logits, r.ids))
    finally:
        for h in hooks:
            h.remove()
    domains = torch.cat(domains)
    sample = torch.randperm(len(domains), generator=torch.Generator().manual_seed(0))[:max_tokens]
    layers = {}
    for mlp in model.moe_layers():
        logits = torch.cat([lg for lg, _ in routers[mlp.layer]])
        ids = torch.cat([i for _, i in routers[mlp.layer]])
        stats = routing_stats(logits, ids, domains, len(corpus.heldout))
        stats["weight_cosine"] = weight_cosine(mlp)
        stats["output_difference"] = output_difference(expert_outputs(mlp, torch.cat(inputs[mlp.layer])[sample]))
        layers[mlp.layer] = stats
    result: Dict[str, Any] = {"perplexity": math.exp(nll / tokens), "tokens": tokens}
    if layers:
        result["mean"] = {k: sum(s[k] for s in layers.values()) / len(layers) for k in next(iter(layers.values()))}
        result["layers"] = layers
    return result


@contextlib.contextmanager
def oracle_routing(model: MoEForCausalLM, k: int) -> Iterator[None]:
    """Within the block, every MoE layer keeps per token the ``k`` experts with the largest output norm, each
    with weight 1: the best any router can do for a neuron split (FLUX_DESIGN.md section 2)."""

    def oracle(mlp: MoEMLP, args, out):
        x = args[0].flatten(0, 1)
        y = expert_outputs(mlp, x)  # [E, N, H]
        top = y.norm(dim=-1).topk(k, dim=0).indices  # [k, N]
        return y.gather(0, top[..., None].expand(-1, -1, y.shape[-1])).sum(0).view_as(args[0]), out[1]

    hooks = [mlp.register_forward_hook(oracle) for mlp in model.moe_layers()]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


# ------------------------------------------------------------------------------------------------- training


def set_trainable(model: MoEForCausalLM, which: str) -> List[torch.nn.Parameter]:
    """Freeze all but ``which`` (see ``TRAINABLE``) and return the trainable parameters."""
    if which not in TRAINABLE:
        raise ValueError(f"train must be one of {TRAINABLE}, got {which!r}")
    for name, p in model.named_parameters():
        in_moe = ".mlp.gate." in name or ".mlp.experts." in name or ".mlp.shared_expert." in name
        p.requires_grad_(which == "all" or (in_moe and (which == "moe" or ".mlp.gate." in name)))
    return [p for p in model.parameters() if p.requires_grad]


def train(model: MoEForCausalLM, rows: Dict[str, Tensor], steps: int, params: List[torch.nn.Parameter],
          recipe: Recipe, gen: torch.Generator, label: str) -> List[float]:
    """``steps`` of AdamW on batches of ``recipe.batch_size`` rows drawn at random from all of ``rows`` (so a
    batch mixes the domains given) -> the training losses (cross-entropy plus the weighted aux loss)."""
    pool = torch.cat(list(rows.values()))
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    model.train()
    losses = []
    start = time.time()
    for step in range(steps):
        batch = pool[torch.randint(len(pool), (recipe.batch_size,), generator=gen)]
        loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % 10 == 9 or step == steps - 1:
            print(f"{label} step {step + 1}/{steps} loss {sum(losses[-10:]) / len(losses[-10:]):.3f} "
                  f"({(time.time() - start) / (step + 1):.1f} s/step)", file=sys.stderr, flush=True)
    model.eval()
    return losses


def branch_train_mix(model: MoEForCausalLM, corpus: Corpus, recipe: Recipe, gen: torch.Generator) -> None:
    """Tune expert e alone on domain ``e mod D`` for ``recipe.branch_steps`` (in place): every original expert is
    mapped onto physical expert e, so each MoE layer computes exactly that expert (renormalised weights)."""
    if not model.config.norm_topk_prob or model.config.shared_expert_intermediate_size:
        raise ValueError("branch-train-mix needs an upcycled preset (renormalised weights, no shared expert)")
    domains = list(corpus.train)
    experts = [p for mlp in model.moe_layers() for p in mlp.experts.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in experts:
        p.requires_grad_(True)
    for e in range(model.config.num_experts):
        d = domains[e % len(domains)]
        for mlp in model.moe_layers():
            mlp.experts.expert_map.fill_(e)
        # Adam's moments must not carry over: a fresh optimizer per branch leaves the other experts untouched.
        train(model, {d: corpus.train[d]}, recipe.branch_steps, experts, recipe, gen, f"branch {e} ({d})")
    for mlp in model.moe_layers():
        mlp.experts.reset_expert_map()


def warm_start(preset: str, steps: int = 30) -> str:
    """The checkpoint folder of ``preset`` after a short continued pre-training (router warm-up; bench/runtime.py's
    recipe: Drop-Upcycle at the preset's fraction, ``steps`` steps on the domain mix), prepared on first use (SmolLM2
    and BIG-bench fetched, the preset built and trained: ~5 min for a mini preset on 2 cores) and cached. The model
    the demo and the time-to-accuracy experiment fine-tune."""
    from flux_engine import presets

    recipe = Recipe(preset=preset, steps=steps, drop_fraction=presets.get(preset).metadata["drop_fraction"])
    # prepare()'s cache entry; asking for the folder only spares loading the model here (the clients load it).
    folder = recipe.cache_folder()
    if not folder.is_dir():
        prepare(recipe)
    return str(folder)


def prepare(recipe: Recipe, corpus: Optional[Corpus] = None) -> Tuple[MoEForCausalLM, Dict[str, Any]]:
    """The model of ``recipe`` (from the cache when prepared before) and its report: the recipe, measurements at
    step 0, after branching and after training, and the training losses (kept in the config metadata, so a cached
    model comes with its report)."""
    folder = recipe.cache_folder()
    if folder.is_dir():
        model = load_pretrained(folder)
        return model, model.config.metadata["pretrain"]
    model, tokenizer = build_preset(recipe.preset, seed=recipe.seed, noise=recipe.noise, drop_fraction=recipe.drop_fraction)
    corpus = corpus or load_corpus(tokenizer, recipe.seq_len)
    gen = torch.Generator().manual_seed(recipe.seed)
    report: Dict[str, Any] = {"recipe": dataclasses.asdict(recipe), "step0": measure(model, corpus)}
    if recipe.branch_steps:
        branch_train_mix(model, corpus, recipe, gen)
        report["branched"] = measure(model, corpus)
    if recipe.steps:
        report["losses"] = train(model, corpus.train, recipe.steps, set_trainable(model, recipe.train), recipe, gen, "mix")
        report["trained"] = measure(model, corpus)
    for p in model.parameters():
        p.requires_grad_(True)
    model.config.metadata["pretrain"] = report
    save_pretrained(model, folder, layout="flux_moe")
    return model, report


def split_report(preset: str, num_experts: int, ks: Sequence[int], corpus: Corpus, seed: int = 0) -> Dict[str, Any]:
    """Held-out perplexity of the dense model and of random neuron splits of the preset's MoE layers into
    ``num_experts`` groups, keeping ``k`` groups per token by the oracle router (and all of them for k = E)."""
    dense, _ = load_smollm2_dense()
    layers = presets.get(preset).moe_layers
    moe = from_dense(dense.state_dict(), dense.config, num_experts, num_experts, method="split", moe_layers=layers,
                     seed=seed, scoring="ones")
    report: Dict[str, Any] = {"dense": measure(dense, corpus)["perplexity"], "moe_layers": layers, "split": {}}
    for k in ks:
        with oracle_routing(moe, k):
            report["split"][k] = measure(moe, corpus)["perplexity"]
    return report


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m flux_engine.pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=Recipe.preset)
    p.add_argument("--drop-fraction", type=float, help="default: the preset's")
    p.add_argument("--noise", type=float, default=0.0)
    p.add_argument("--branch-steps", type=int, default=0)
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--train", choices=TRAINABLE, default=Recipe.train)
    p.add_argument("--lr", type=float, default=Recipe.lr)
    p.add_argument("--batch-size", type=int, default=Recipe.batch_size)
    p.add_argument("--seq-len", type=int, default=Recipe.seq_len)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", type=int, metavar="E", help="measure neuron splits into E experts instead")
    p.add_argument("--top-k", type=int, nargs="+", default=[2, 4, 8], help="with --split: experts kept per token")
    args = p.parse_args(argv)
    if args.split:
        report = split_report(args.preset, args.split, args.top_k, load_corpus(load_tokenizer(), args.seq_len), args.seed)
    else:
        recipe = Recipe(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe)})
        report = prepare(recipe)[1]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
