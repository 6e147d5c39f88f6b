"""Measurements for budgets / merging / roles (issue #6) on ``smollm2-llama-moe-mini`` (or ``tiny``).

    python bench/flux_mechanisms.py [--preset smollm2-llama-moe-mini] [--tokens 256]

Prints: merge output error (per-layer relative error of the MoE layer output on held-out tokens) for adaptive
(Eq. 1) vs uniform per-layer budgets vs one merged expert per layer, for the three Eq. 2 weightings; batched vs
per-layer clustering time; SPSA vs true-gradient cosine for one expert.
"""

from __future__ import annotations

import argparse
import pydoc
import time

import torch

from flux_engine import presets
from flux_engine.merging import (
    FrequencyProfile,
    cluster_layers,
    cluster_layers_loop,
    layer_budgets,
    merge,
    merge_output_error,
    plan_merge,
)
from flux_engine.models import MoEForCausalLM
from flux_engine.models.moe import apply_rope
from flux_engine.roles import spsa_gradient


def received_attention_profile(model, ids):
    """freq [L, E], attn [L, E] (mean received attention of the tokens routed to e, from the same layer's
    attention), tokens [L, E]."""
    captured = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        if layer.is_moe:
            hooks.append(layer.self_attn.register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__(i, a)))
    with torch.no_grad():
        out = model(ids, return_routers=True)
    for h in hooks:
        h.remove()
    E = model.config.num_experts
    freqs, attns, toks = [], [], []
    for r in out.routers:
        attn_mod = model.model.layers[r.layer].self_attn
        x, cos, sin, _ = captured[r.layer]
        B, T, _ = x.shape
        with torch.no_grad():
            q = attn_mod.q_proj(x).view(B, T, attn_mod.num_heads, -1).transpose(1, 2)
            k = attn_mod.k_proj(x).view(B, T, attn_mod.num_kv_heads, -1).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            k = k.repeat_interleave(attn_mod.num_heads // attn_mod.num_kv_heads, dim=1)
            s = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
            s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -float("inf")).softmax(-1)
            received = s.mean(1).sum(1) / torch.arange(T, 0, -1)  # mean over heads and the queries that see it
        ids_ = r.ids.view(B * T, -1).long()
        recv = received.reshape(-1, 1).expand_as(ids_).double()
        cnt = torch.bincount(ids_.flatten(), minlength=E).double()
        a = torch.zeros(E, dtype=torch.float64).index_add_(0, ids_.flatten(), recv.flatten()) / cnt.clamp_min(1)
        freqs.append(cnt / cnt.sum())
        attns.append(a)
        toks.append(cnt)
    return FrequencyProfile(torch.stack(freqs), torch.stack(attns), torch.stack(toks))


def timing(feats, ks, what):
    best = {}
    for fn in (cluster_layers, cluster_layers_loop) * 3:
        t0 = time.time()
        labels = fn(feats, ks)
        best[fn.__name__] = min(best.get(fn.__name__, 1e9), time.time() - t0)
        best[fn.__name__ + "_labels"] = labels
    same = all(torch.equal(a, b) for a, b in zip(best["cluster_layers_labels"], best["cluster_layers_loop_labels"]))
    print(
        f"clustering {what}: batched {best['cluster_layers']:.3f}s, per-layer loop {best['cluster_layers_loop']:.3f}s "
        f"(best of 3), same labels: {same}"
    )


def text_ids(tokenizer, modules, n):
    text = "\n".join(pydoc.render_doc(m, renderer=pydoc.plaintext) for m in modules)
    ids = tokenizer(text)["input_ids"]
    return torch.tensor(ids[: n * 2]).view(2, n)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="smollm2-llama-moe-mini")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--tuning-per-layer", type=int, default=2)
    ap.add_argument("--spsa-samples", type=int, default=16)
    ap.add_argument("--parts", default="merge,cluster,spsa,utility", help="comma-separated subset to run")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    torch.manual_seed(0)
    if args.preset == "tiny":
        model = MoEForCausalLM(presets.get("tiny")).eval()
        calib = torch.randint(0, 256, (2, args.tokens))
        held = torch.randint(0, 256, (2, args.tokens))
    else:
        from flux_engine.smollm2 import build_preset

        model, tok = build_preset(args.preset)
        model.eval()
        calib = text_ids(tok, ["json", "textwrap"], args.tokens)
        held = text_ids(tok, ["csv"], args.tokens)
    E = model.config.num_experts
    L = len(model.moe_layers())
    t0 = time.time()
    prof = received_attention_profile(model, calib)
    print(f"profile ({time.time() - t0:.1f}s); freq variance per layer: {[f'{v:.4f}' for v in prof.freq.var(1, unbiased=False).tolist()]}")
    tuning = [prof.freq[l].argsort(descending=True)[: args.tuning_per_layer].sort().values.tolist() for l in range(L)]
    n_non = [E - len(t) for t in tuning]
    total = sum(n_non) // 2
    budgets = {
        "adaptive (Eq.1)": layer_budgets(prof.freq, total, n_non),
        "uniform": [total // L + (1 if l < total % L else 0) for l in range(L)],
        "one per layer": [1] * L,
    }
    with torch.no_grad():
        base_loss = float(model(held, labels=held).loss)
    print(f"held-out loss unmerged {base_loss:.4f}; non-tuning per layer {n_non}, B_non total {total}")
    for name, b in budgets.items() if "merge" in parts else []:
        for weighting in ("freq_attn", "freq", "uniform"):
            compact = merge(model, prof, tuning, b, weighting=weighting, seed=0)
            err = merge_output_error(model, compact, held)
            with torch.no_grad():
                loss = float(compact(held, labels=held).loss)
            print(
                f"{name:<16} budgets {b}  weighting {weighting:<9} mean rel err {sum(err) / L:.4f}  "
                f"per layer {[round(e, 4) for e in err]}  held-out loss {loss:.4f}"
            )
            del compact

    # Clustering time: batched vs per-layer loop on the real expert weights.
    feats = []
    with torch.no_grad():
        for mlp in model.moe_layers():
            ex = mlp.experts
            feats.append(torch.cat([ex.gate_up_proj.flatten(1), ex.down_proj.flatten(1)], 1).float())
    ks = budgets["adaptive (Eq.1)"]
    if "cluster" in parts:
        timing(feats, ks, f"real experts {L} layers x {E} x {feats[0].shape[1]}")
        g = torch.Generator().manual_seed(0)
        timing([torch.randn(128, 64, generator=g) for _ in range(48)], [32] * 48, "synthetic 48 layers x 128 x 64, k=32")
    del feats
    if "utility" in parts:
        from flux_engine.roles import utility_exact, utility_microbatch

        uids = calib[:, :64].reshape(8, 16)
        t0 = time.time()
        exact = utility_exact(model, uids)
        t1 = time.time()
        cheap = utility_microbatch(model, uids, micro_batch=4)
        t2 = time.time()
        rank = lambda x: x.flatten().argsort().argsort().double()
        rho = float(torch.corrcoef(torch.stack([rank(exact), rank(cheap)]))[0, 1])
        top = lambda x: set(x.flatten().argsort(descending=True)[:10].tolist())
        print(
            f"utility on 8 samples x 16 tokens: exact {t1 - t0:.1f}s, micro-batch(4) {t2 - t1:.1f}s, Spearman {rho:.3f}, "
            f"top-10 overlap {len(top(exact) & top(cheap))}/10, median ratio cheap/exact "
            f"{float((cheap[exact > 0] / exact[exact > 0]).median()):.3f}"
        )
    if "spsa" not in parts:
        return

    # SPSA vs true gradient for one expert of the middle MoE layer.
    layer = model.moe_layers()[L // 2]
    e = int(prof.freq[L // 2].argmax())
    p = int(layer.experts.expert_map[e])
    gu, dn = layer.experts.gate_up_proj, layer.experts.down_proj
    out = model(calib, labels=calib)
    g_gu, g_dn = torch.autograd.grad(out.loss, [gu, dn])
    true = torch.cat([g_gu[p].flatten(), g_dn[p].flatten()])
    views = [gu.data[p], dn.data[p]]

    def loss_fn():
        with torch.no_grad():
            return model(calib, labels=calib).loss

    gen = torch.Generator().manual_seed(0)
    sums = torch.zeros_like(true)
    cos1, dd_all = [], []
    t0 = time.time()
    for i in range(args.spsa_samples):
        (a, b), dd = spsa_gradient(loss_fn, views, c=1e-3, generator=gen)
        est = torch.cat([a.flatten(), b.flatten()])
        sums += est
        dd_all += dd
        cos1.append(float(torch.nn.functional.cosine_similarity(est, true, dim=0)))
    cos_avg = float(torch.nn.functional.cosine_similarity(sums, true, dim=0))
    ms = sum(x * x for x in dd_all) / len(dd_all)
    print(
        f"SPSA layer {model.moe_layers()[L // 2].layer} expert {e} ({true.numel()} params, {time.time() - t0:.1f}s): "
        f"single-direction cosine mean {sum(cos1) / len(cos1):.5f} (cosine distance {1 - sum(cos1) / len(cos1):.5f}); "
        f"{args.spsa_samples}-direction average cosine {cos_avg:.5f}; sqrt(mean d^2) {ms ** 0.5:.4e} vs true norm {float(true.norm()):.4e}"
    )


if __name__ == "__main__":
    main()
