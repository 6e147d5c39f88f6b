"""Issue 11's memory goal: a 24 GB client runs Flux profiling and a training round on the real MoE shapes.

    python3 bench/gpu_memory.py --out gpu_memory.md                  # GPU: deepseek-moe-16b and llama-moe-3.5b
    python3 bench/gpu_memory.py --out /tmp/gpu_memory_cpu.md --dry-run   # CPU: the same pipeline, shrunk shapes

Goal (issue 11): with ``torch.cuda.set_per_process_memory_fraction`` capping the process at 24 GiB, a client of
the ``deepseek-moe-16b`` preset (random weights, real shapes, bf16, seq 2048, micro-batch 1) runs profiling and a
Flux training round step (merged non-tuning experts + sparse LoRA on the tuning experts) with default settings;
report peak memory and tokens/s of both and the largest number of tuning experts that fits. Same for
``llama-moe-3.5b``. The full bf16 model (32.8 GB for deepseek-moe-16b) must not be needed at any point.

Per preset, phases (each phase's GPU peak is measured from a reset of the allocator's peak statistics):

1. checkpoint: the model is built on the meta device and a random-weight checkpoint folder (safetensors shards,
   one per decoder layer, in the preset's source layout: ``deepseek`` / ``llama_moe`` per-expert keys) is written
   under ``--workdir`` one layer at a time; each tensor is drawn from a seeded generator (on the GPU when there is
   one, copied to CPU, saved). Never more than one layer's tensors exist at a time.
2. profile: ``profiling.prepare(folder, bits=4, device)`` streams the folder onto the device (experts int4,
   dense weights int8: the defaults), then the profiling forward runs over ``--profile-seqs`` sequences.
3. plan: ``budget.plan_budget`` (cap bytes, ``TrainSettings`` defaults but bf16, batch 1, seq ``--seq-len``) gives
   ``B_tune`` / ``B_non``; round-1 roles (``roles.assign_roles`` on the frequency utility) pick the tuning experts;
   ``merging.layer_budgets`` (Eq. 1) the merged experts per layer.
4. compact: the folder is streamed again; non-expert tensors go straight to the device; each MoE layer's full
   expert stacks are assembled on the device (one layer at a time), merged there with ``merging.merge`` (Eq. 2,
   tuning experts first, PCA + cosine k-means of that layer alone) and dropped, so at most one layer's unmerged
   experts exist. The compact model is the client's training model.
5. train: ``training.train_round`` (LoRA r 8, alpha 16, AdamW, micro-batch 1, activation checkpointing off:
   the ``TrainConfig`` defaults) on random tokens: one warm-up step (kernel compilation), then ``--steps`` timed
   steps.
6. search: the largest ``B_tune`` that trains one step under the cap, with the planned ``B_non`` merged experts
   (clamped per layer by Eq. 1 as tuning experts grow): a binary search; each try reuses the compact model's
   non-expert weights and installs freshly drawn expert stacks of the try's shapes (memory depends on shapes and
   on the real routers' routing, not on expert values), catches ``torch.cuda.OutOfMemoryError`` and empties the
   cache. It stops at ``--time-limit-s`` and then reports the bracket it reached.

Without CUDA (or with ``--dry-run``) the presets are shrunk (4 layers, H 64, up to 16 experts; same layouts,
dense first layer, shared experts) and run on the CPU with a short sequence; there is no memory cap there and
every GPU figure is "not measured". What lives in CPU RAM: one layer's tensors while writing, one checkpoint
tensor while streaming (the OS page cache holds the folder); the peak RSS is reported per phase.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import resource
import shlex
import shutil
import sys
import time
import types
from collections import OrderedDict
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import _RELEVANT_ENV, _commit, _device, _versions  # noqa: E402

GiB = 1 << 30
DTYPE = torch.bfloat16
MARKER = "gpu_memory.json"


# ---------------------------------------------------------------------------------------------- pure helpers


def shrink(config):
    """A small config of the same family (layout, dense first layer, shared experts, router) for CPU runs."""
    L = 4
    moe_layers = None if config.moe_layers is None else [i for i in range(L) if config.is_moe_layer(i)]
    E = min(config.num_experts, 16)
    return config.replace(
        vocab_size=512, hidden_size=64, num_layers=L, num_heads=4,
        num_kv_heads=4 if config.num_kv_heads == config.num_heads else 2, head_dim=None, intermediate_size=128,
        max_position_embeddings=512, num_experts=E, num_experts_per_tok=min(config.num_experts_per_tok, E),
        moe_intermediate_size=32, moe_layers=moe_layers, physical_experts=None,
        shared_expert_intermediate_size=64 if config.shared_expert_intermediate_size else 0,
        metadata={**config.metadata, "shrunk": True},
    )  # fmt: skip


def split_groups(ids: Sequence[int], k: int) -> List[List[int]]:
    """``ids`` in ``k`` contiguous, nearly equal, non-empty groups (``k`` clamped to ``[1, len(ids)]``; [] if none)."""
    ids = list(ids)
    if not ids:
        return []
    k = max(1, min(int(k), len(ids)))
    q, r = divmod(len(ids), k)
    out, i = [], 0
    for j in range(k):
        n = q + (1 if j < r else 0)
        out.append(ids[i : i + n])
        i += n
    return out


def largest_fitting(
    lo_fit: int, hi_fail: int, fits: Callable[[int], Optional[bool]]
) -> Tuple[int, int, List[Tuple[int, Any]]]:
    """Binary search for the largest ``n`` with ``fits(n)``, given ``fits(lo_fit)`` (or ``lo_fit = -1``: none known)
    and ``not fits(hi_fail)`` (``hi_fail`` may be one past the largest candidate). ``fits`` returns None to stop
    (time limit). Returns ``(largest known fit, smallest known failure, tries)``; equal-plus-one when resolved."""
    tries = []
    while hi_fail - lo_fit > 1:
        mid = (lo_fit + hi_fail) // 2
        ok = fits(mid)
        tries.append((mid, ok))
        if ok is None:
            break
        if ok:
            lo_fit = mid
        else:
            hi_fail = mid
    return lo_fit, hi_fail, tries


def human(n: Optional[float]) -> str:
    if n is None:
        return "not measured"
    if abs(n) < GiB:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n / GiB:.2f} GiB"


# ------------------------------------------------------------------------------------------ memory bookkeeping


class Meter:
    """Peak GPU memory (allocator statistics) and peak process RSS around a phase."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return time.perf_counter()

    def stop(self, t0: float) -> Dict[str, Any]:
        if self.cuda:
            torch.cuda.synchronize()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        out = {"seconds": time.perf_counter() - t0, "rss_peak": rss}
        if self.cuda:
            out["allocated_peak"] = torch.cuda.max_memory_allocated()
            out["reserved_peak"] = torch.cuda.max_memory_reserved()
            out["allocated_now"] = torch.cuda.memory_allocated()
        return out


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- 1. checkpoint


def _random(name: str, like: torch.Tensor, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    if name.endswith("expert_map"):
        return torch.arange(like.numel(), dtype=like.dtype, device=device)
    if name.endswith("norm.weight"):
        return torch.ones(like.shape, dtype=like.dtype, device=device)
    if name.endswith(".bias"):
        return torch.zeros(like.shape, dtype=like.dtype, device=device)
    return torch.randn(like.shape, generator=gen, dtype=like.dtype, device=device).mul_(0.02)


def layout_name(config) -> str:
    from flux_engine.checkpoint import LAYOUTS, NATIVE

    source = config.metadata.get("source_model_type")
    return source if source in LAYOUTS else NATIVE


def full_model_bytes(config) -> int:
    from flux_engine.models import MoEForCausalLM

    with torch.device("meta"):
        model = MoEForCausalLM(config)
    return sum(p.numel() for p in model.parameters()) * torch.finfo(DTYPE).bits // 8


def param_bytes(model) -> int:
    """Bytes of a model's parameters and buffers (each tensor once, meta tensors excluded)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen and not t.is_meta:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def write_checkpoint(config, folder: str, seed: int, device: torch.device, reuse: bool) -> Dict[str, Any]:
    """A random-weight checkpoint folder of ``config`` in its source layout, one shard per decoder layer."""
    from safetensors.torch import save_file

    from flux_engine import checkpoint as ck
    from flux_engine.checkpoint.keymap import entries, model_tensors
    from flux_engine.checkpoint.safetensors_io import CONFIG_FILE, INDEX_FILE, write_json
    from flux_engine.models import MoEForCausalLM

    layout = ck.get_layout(layout_name(config), "gpu_memory")
    marker = {"config": config.to_dict(), "seed": seed, "layout": layout.model_type}
    marker_path = os.path.join(folder, MARKER)
    if reuse and os.path.exists(marker_path):
        with open(marker_path) as f:
            if json.load(f) == json.loads(json.dumps(marker)):
                return {"layout": layout.model_type, "reused": True, "bytes": _folder_bytes(folder)}
    with torch.device("meta"):
        model = MoEForCausalLM(config)
    model.to(DTYPE)
    need = full_model_bytes(config)
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.makedirs(folder)
    free = shutil.disk_usage(folder).free
    if free < need + GiB:
        raise RuntimeError(
            f"{folder}: {free / GiB:.1f} GiB free on disk, the checkpoint needs {need / GiB:.1f} GiB + 1 (--workdir)"
        )
    tensors = model_tensors(model)
    groups: "OrderedDict[str, list]" = OrderedDict()
    for entry in entries(model, layout.keys):
        m = re.match(r"model\.layers\.(\d+)\.", entry.param)
        groups.setdefault(f"layer{int(m[1]):04d}" if m else "zz_other", []).append(entry)
    names = sorted(groups)
    files = {g: f"model-{i + 1:05d}-of-{len(names):05d}.safetensors" for i, g in enumerate(names)}
    gen = torch.Generator(device=device).manual_seed(seed)
    weight_map, total = {}, 0
    for g in names:
        cache: Dict[str, torch.Tensor] = {}
        shard = {}
        for entry in groups[g]:
            if entry.param not in cache:
                cache[entry.param] = _random(entry.param, tensors[entry.param], gen, device)
            shard[entry.key] = cache[entry.param][entry.index].contiguous().cpu()
            total += shard[entry.key].numel() * shard[entry.key].element_size()
            weight_map[entry.key] = files[g]
        del cache
        save_file(shard, os.path.join(folder, files[g]), metadata={"format": "pt"})
        del shard
    write_json(os.path.join(folder, INDEX_FILE), {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_json(os.path.join(folder, CONFIG_FILE), ck.layout_config_json(layout, model.config, DTYPE))
    with open(marker_path, "w") as f:
        json.dump(marker, f)
    return {"layout": layout.model_type, "reused": False, "bytes": total, "shards": len(names)}


def _folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder))


# ------------------------------------------------------------------------------------------------- 4. compact


class _OneLayer:
    """What ``merging.merge`` needs of a model, for one MoE layer: ``moe_layers()`` and ``config``."""

    def __init__(self, mlp, num_experts: int):
        self._mlp = mlp
        self.config = types.SimpleNamespace(num_experts=num_experts, physical_experts=None)

    def moe_layers(self):
        return [self._mlp]


@torch.no_grad()
def build_compact(folder: str, prof, tuning: List[List[int]], budgets: List[int], device: torch.device, seed: int):
    """The client's compact model, streamed from ``folder``: each MoE layer is merged on ``device`` as soon as its
    expert stacks are complete (one layer's unmerged experts at a time)."""
    from flux_engine import checkpoint as ck
    from flux_engine import merging
    from flux_engine.checkpoint.keymap import model_tensors
    from flux_engine.checkpoint.safetensors_io import CONFIG_FILE, read_json, scan, stream
    from flux_engine.models import MoEForCausalLM
    from flux_engine.models.moe import materialize
    from flux_engine.profiling import is_expert_stack

    config_path = os.path.join(folder, CONFIG_FILE)
    raw = read_json(config_path)
    layout = ck.get_layout(raw.get("model_type"), config_path)
    config = ck.read_config(layout, raw, config_path)
    found = scan(folder)
    with torch.device("meta"):
        model = MoEForCausalLM(config)
    plan = ck.load_plan(model, layout, layout.keys_for(found), found, folder)
    model.to(DTYPE)
    materialize(model, device, skip=is_expert_stack)
    model.tie_weights()
    layers = {mlp.layer: (i, mlp) for i, mlp in enumerate(model.moe_layers())}
    for _, mlp in layers.values():
        mlp.experts.reset_expert_map()
    tensors = model_tensors(model)
    remaining: Dict[str, int] = {}
    for entry in plan.values():
        if is_expert_stack(entry.param):
            remaining[entry.param] = remaining.get(entry.param, 0) + 1
    pending: Dict[str, torch.Tensor] = {}
    freq, attn = prof.frequency, prof.importance
    E = config.num_experts
    for key, source in stream(found, list(plan)):
        entry = plan[key]
        name = entry.param
        if name.endswith("expert_map"):
            continue
        if not is_expert_stack(name):
            tensors[name][entry.index].copy_(source)
            continue
        buf = pending.get(name)
        if buf is None:
            buf = pending[name] = torch.empty(tensors[name].shape, dtype=DTYPE, device=device)
        buf[entry.index].copy_(source)
        del source
        remaining[name] -= 1
        layer = int(name.split(".")[2])
        prefix = f"model.layers.{layer}.mlp.experts."
        if all(remaining[prefix + s] == 0 for s in ("gate_up_proj", "down_proj") if prefix + s in remaining):
            li, mlp = layers[layer]
            ex = mlp.experts
            ex.gate_up_proj = nn.Parameter(pending.pop(prefix + "gate_up_proj"), requires_grad=False)
            ex.down_proj = nn.Parameter(pending.pop(prefix + "down_proj"), requires_grad=False)
            ex.reset_expert_map()
            one = merging.FrequencyProfile(freq=freq[li : li + 1], attn=attn[li : li + 1])
            merging.merge(_OneLayer(mlp, E), one, [tuning[li]], [budgets[li]], seed=seed, inplace=True)
    if pending:
        raise ValueError(f"incomplete expert stacks: {sorted(pending)}")
    model.config.physical_experts = [mlp.experts.num_physical for mlp in model.moe_layers()]
    return model


@torch.no_grad()
def install_experts(model, tuning: List[List[int]], budgets: List[int], gen: torch.Generator) -> None:
    """Replace every MoE layer's expert stacks by freshly drawn ones of ``len(tuning[l]) + merged`` physical experts:
    tuning experts first (one each), the non-tuning experts in ``budgets[l]`` contiguous groups."""
    E = model.config.num_experts
    counts = []
    for mlp, ids, k in zip(model.moe_layers(), tuning, budgets):
        ex = mlp.experts
        shape_gu, shape_dn = tuple(ex.gate_up_proj.shape[1:]), tuple(ex.down_proj.shape[1:])
        dev = ex.expert_map.device
        ex.gate_up_proj = nn.Parameter(torch.empty((0,) + shape_gu, dtype=DTYPE, device=dev), requires_grad=False)
        ex.down_proj = nn.Parameter(torch.empty((0,) + shape_dn, dtype=DTYPE, device=dev), requires_grad=False)
        rest = [e for e in range(E) if e not in set(ids)]
        groups = [[e] for e in ids] + split_groups(rest, k)
        emap = torch.empty(E, dtype=torch.int32)
        for p, members in enumerate(groups):
            emap[members] = p
        n = len(groups)
        ex.gate_up_proj = nn.Parameter(
            torch.randn((n,) + shape_gu, generator=gen, dtype=DTYPE, device=dev).mul_(0.02), requires_grad=False
        )
        ex.down_proj = nn.Parameter(
            torch.randn((n,) + shape_dn, generator=gen, dtype=DTYPE, device=dev).mul_(0.02), requires_grad=False
        )
        ex.expert_map = emap.to(dev)
        counts.append(n)
    model.config.physical_experts = counts


# ------------------------------------------------------------------------------------------------- a preset


def tuning_for(prof, B_tune: int, seed: int) -> List[List[int]]:
    from flux_engine import roles

    return roles.assign_roles(roles.frequency_utility(prof.frequency), [B_tune], round_t=0, seed=seed)[0].tuning_lists()


def run_preset(name: str, args, device: torch.device, deadline: float) -> Dict[str, Any]:
    from flux_engine import budget, merging, presets, profiling, training

    cuda = device.type == "cuda"
    config = presets.get(name)
    if not cuda:
        config = shrink(config)
    seq = args.seq_len
    res: Dict[str, Any] = {"preset": name, "shrunk": not cuda, "seq_len": seq, "phases": OrderedDict()}
    L, E = len(config.moe_layer_indices), config.num_experts
    res["full_model_bytes"] = full_model_bytes(config)
    res["shape"] = (
        f"{config.num_layers} layers ({L} MoE), H {config.hidden_size}, {E} experts of I "
        f"{config.moe_intermediate_size}, top-{config.num_experts_per_tok}, vocab {config.vocab_size}"
    )
    meter = Meter(device)
    folder = os.path.join(args.workdir, name + ("-shrunk" if not cuda else ""))
    g = torch.Generator().manual_seed(args.seed)
    n_seqs = max(args.steps, args.profile_seqs)
    data = [torch.randint(0, config.vocab_size, (1, seq), generator=g) for _ in range(n_seqs)]

    # 1. checkpoint
    t0 = meter.start()
    res["checkpoint"] = write_checkpoint(config, folder, args.seed, device, args.reuse_checkpoint)
    res["phases"]["checkpoint (write random weights)"] = meter.stop(t0)
    say(f"{name}: checkpoint {res['checkpoint']}")
    free_memory(device)

    # 2. profile
    t0 = meter.start()
    low = profiling.prepare(folder, bits=4, device=device)  # defaults: int4 g128 experts, int8 dense weights
    res["phases"]["profile: stream + quantize"] = meter.stop(t0)
    res["profile_copy_bytes"] = low.nbytes()
    say(f"{name}: profiling copy {human(res['profile_copy_bytes'])}")
    t0 = meter.start()
    batches = [{"input_ids": data[i]} for i in range(args.profile_seqs)]
    prof = profiling._run(low, batches, profiling._meta(4, None, True, profiling.DEFAULT_DENSE_BITS))
    ph = res["phases"]["profile: forward"] = meter.stop(t0)
    ph["tokens_per_s"] = args.profile_seqs * seq / ph["seconds"]
    say(f"{name}: profiled {args.profile_seqs} x {seq} tokens in {ph['seconds']:.1f} s")
    del low
    free_memory(device)

    # 3. plan
    settings = budget.TrainSettings(dtype="bfloat16", batch_size=1, seq_len=seq,
                                    activation_checkpointing=args.activation_checkpointing)
    if cuda:
        budget_bytes = int(args.cap_gib * GiB)
    else:  # no cap on CPU: a budget that forces merging on the shrunk model
        settings.workspace_bytes = 0
        fixed = budget.memory_breakdown(config, settings, 0, 0, 0)
        experts = L * E * budget.merged_expert_bytes(config, settings)
        budget_bytes = int((sum(fixed.values()) + 0.6 * experts) / (1 - settings.workspace_fraction))
    plan = budget.plan_budget(config, budget_bytes, settings)
    res["plan"] = plan.describe()
    res["B_tune"], res["B_non"], res["total_experts"] = plan.B_tune, plan.B_non, L * E
    tuning = tuning_for(prof, plan.B_tune, args.seed)
    budgets = merging.layer_budgets(prof.frequency, plan.B_non, [E - len(t) for t in tuning])
    say(f"{name}: plan B_tune {plan.B_tune}, B_non {plan.B_non}")

    # 4. compact model
    t0 = meter.start()
    model = build_compact(folder, prof, tuning, budgets, device, args.seed)
    res["phases"]["compact: stream + merge per layer"] = meter.stop(t0)
    res["physical_experts"] = sum(model.config.physical_experts)
    res["compact_bytes"] = param_bytes(model)
    layer_experts = 3 * E * config.hidden_size * config.moe_intermediate_size * torch.finfo(DTYPE).bits // 8
    res["merge_weights_peak"] = res["compact_bytes"] + layer_experts  # upper bound: one layer unmerged at a time
    say(f"{name}: compact model {human(res['compact_bytes'])}")

    # 5. train (an OOM here is a result: the search then starts below the plan)
    tcfg = dict(mode="lora", rank=8, alpha=16.0, lr=1e-4, micro_batch_size=1, seed=args.seed,
                activation_checkpointing=args.activation_checkpointing)
    res["train_oom"] = None
    try:
        t0 = meter.start()
        training.train_round(model, tuning, data[:1], training.TrainConfig(steps=1, **tcfg))
        res["phases"]["train: warm-up step"] = meter.stop(t0)
        training.detach_tuning(model)
        free_memory(device)
        t0 = meter.start()
        result = training.train_round(model, tuning, data[: args.steps], training.TrainConfig(steps=args.steps, **tcfg))
        ph = res["phases"][f"train: {args.steps} steps"] = meter.stop(t0)
        ph["tokens_per_s"] = result.tokens / ph["seconds"]
        res["losses"] = [round(x, 4) for x in result.losses]
    except torch.cuda.OutOfMemoryError as e:
        res["train_oom"] = str(e)[:300]
        res["losses"] = []
    training.detach_tuning(model)
    free_memory(device)
    say(f"{name}: trained (OOM: {res['train_oom']})")

    # 6. search
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    log: List[str] = []
    last = [0.0]

    def fits(B: int) -> Optional[bool]:
        if time.monotonic() + last[0] > deadline:
            return None
        t = tuning_for(prof, B, args.seed)
        b = merging.layer_budgets(prof.frequency, plan.B_non, [E - len(x) for x in t])
        ok, note = True, ""
        t1 = meter.start()
        try:
            install_experts(model, t, b, gen)
            training.train_round(model, t, data[:1], training.TrainConfig(steps=args.search_steps, **tcfg))
        except torch.cuda.OutOfMemoryError as e:
            ok, note = False, str(e).split(".")[0]
        training.detach_tuning(model)
        stats = meter.stop(t1)
        last[0] = stats["seconds"]
        free_memory(device)
        say(f"{name}: search B_tune {B}: {'fits' if ok else 'OOM'} ({stats['seconds']:.1f} s)")
        log.append(f"B_tune {B} (merged {sum(b)}): {'fits' if ok else 'OOM'}, peak allocated "
                   f"{human(stats.get('allocated_peak'))}, reserved {human(stats.get('reserved_peak'))}, "
                   f"{stats['seconds']:.1f} s{' - ' + note if note else ''}")  # fmt: skip
        return ok

    top = L * E  # on the CPU nothing runs out of memory: the search just climbs to the top
    if res["train_oom"] is None:
        lo, hi, _ = largest_fitting(plan.B_tune, top + 1, fits)
    else:
        lo, hi, _ = largest_fitting(-1, plan.B_tune, fits)
    res["search"] = {"largest_fit": lo, "smallest_oom": hi if hi <= top else None, "resolved": hi - lo == 1, "log": log}
    del model
    free_memory(device)
    if not args.keep_checkpoints and not args.reuse_checkpoint:
        shutil.rmtree(folder, ignore_errors=True)
    return res


# --------------------------------------------------------------------------------------------------- report


def render(results: List[Dict[str, Any]], header: Dict[str, str], cuda: bool, cap_gib: float) -> str:
    lines = ["# GPU memory: 24 GB client (issue 11)", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += ["", "## What is measured", "", "```text", (__doc__ or "").strip(), "```"]
    goals = []
    for r in results:
        name = r["preset"] + (" (shrunk, CPU)" if r.get("shrunk") else "")
        lines += ["", f"## {name}", ""]
        if "error" in r:
            lines += [f"FAILED: `{r['error']}`"]
            goals.append((f"{name}: pipeline completes", "failed", "not met"))
            continue
        lines += [f"- shape: {r['shape']}; bf16 full model {r['full_model_bytes'] / 1e9:.1f} GB "
                  f"({human(r['full_model_bytes'])}); seq {r['seq_len']}, micro-batch 1",
                  f"- checkpoint: layout `{r['checkpoint']['layout']}`, {human(r['checkpoint']['bytes'])}"
                  f"{' (reused)' if r['checkpoint']['reused'] else ''}",
                  f"- profiling copy (int4 experts, int8 dense): {human(r['profile_copy_bytes'])}",
                  f"- plan: B_tune {r['B_tune']}, B_non {r['B_non']} of {r['total_experts']} experts; compact model "
                  f"holds {r['physical_experts']} physical experts",
                  f"- weights resident: profiling copy {human(r['profile_copy_bytes'])}, compact model "
                  f"{human(r['compact_bytes'])}, while merging at most {human(r['merge_weights_peak'])} (compact + "
                  f"one layer's unmerged experts)",
                  f"- training losses: {r['losses']}"
                  + (f"; training OOM at the planned B_tune: `{r['train_oom']}`" if r.get("train_oom") else ""), ""]
        # fmt: skip
        lines += ["| phase | seconds | GPU peak allocated | GPU peak reserved | tokens/s | process peak RSS |",
                  "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for phase, p in r["phases"].items():
            tps = f"{p['tokens_per_s']:.0f}" if "tokens_per_s" in p else "-"
            lines.append(f"| {phase} | {p['seconds']:.2f} | {human(p.get('allocated_peak'))} | "
                         f"{human(p.get('reserved_peak'))} | {tps} | {human(p['rss_peak'])} |")  # fmt: skip
        lines += ["", "Budget plan:", "", "```text", r["plan"], "```", "", "Search for the largest B_tune:", ""]
        lines += [f"- {x}" for x in r["search"]["log"]] or ["- (no tries)"]
        s = r["search"]
        cpu_note = "" if cuda else " (CPU: no cap, every try fits)"
        lines += ["", f"Largest B_tune that fits: {s['largest_fit']}{cpu_note}" + ("" if s["resolved"] else
                  f" (unresolved: smallest OOM seen {s['smallest_oom']}; time limit)")]  # fmt: skip
        ph = r["phases"]
        prof_keys = [k for k in ph if k.startswith("profile")]
        train_keys = [k for k in ph if k.startswith("train")]
        full = r["full_model_bytes"]
        weights = max(r["profile_copy_bytes"], r["merge_weights_peak"])
        if cuda:
            cap = cap_gib * GiB
            pk = max(ph[k]["reserved_peak"] for k in prof_keys)
            if r.get("train_oom") or not train_keys:
                train_goal = ("OOM: " + (r.get("train_oom") or "")[:120], "not met")
            else:
                tk = max(ph[k]["reserved_peak"] for k in train_keys)
                train_goal = (f"peak reserved {human(tk)}, {ph[train_keys[-1]]['tokens_per_s']:.0f} tokens/s",
                              "met" if tk <= cap else "not met")  # fmt: skip
            allk = max(p.get("reserved_peak", 0) for p in ph.values())
            whole = "met" if weights < full else "not met"
            if weights >= full and r["B_non"] == 0:
                whole = "met (B_non = 0: the budget holds every expert; the compact model is the whole model by choice)"
            goals += [
                (f"{name}: profiling under the {cap_gib:g} GiB cap", f"peak reserved {human(pk)}, "
                 f"{ph['profile: forward']['tokens_per_s']:.0f} tokens/s", "met" if pk <= cap else "not met"),
                (f"{name}: Flux training step (B_tune {r['B_tune']}, B_non {r['B_non']}) under the cap", *train_goal),
                (f"{name}: full bf16 model ({human(full)}) never needed on the GPU",
                 f"weights resident at most {human(weights)}; largest phase peak reserved {human(allk)}", whole),
                (f"{name}: largest B_tune that fits",
                 f"{s['largest_fit']}" + ("" if s["resolved"] else " (unresolved)"), "met (reported)"),
            ]  # fmt: skip
        else:
            for what in ("profiling under the cap", "Flux training step under the cap",
                         "full bf16 model never needed on the GPU", "largest B_tune that fits"):  # fmt: skip
                goals.append((f"{r['preset']}: {what}", "not measured (no GPU; shrunk shapes on CPU)", "not measured"))
        rss = max(p["rss_peak"] for p in ph.values())
        goals.append((f"{name}: full bf16 model never in CPU RAM", f"peak RSS {human(rss)} vs model {human(full)}",
                      ("met" if rss < full else "not met") if cuda else "not measured (shrunk model)"))  # fmt: skip
    lines += ["", "## Goals", "", "| goal | measured | verdict |", "| --- | --- | --- |"]
    lines += [f"| {g} | {m} | {v} |" for g, m, v in goals]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--presets", nargs="+", default=["deepseek-moe-16b", "llama-moe-3.5b"])
    ap.add_argument("--out", required=True, help="markdown results file")
    ap.add_argument("--workdir", default="/tmp/flux_gpu_memory", help="checkpoint folders (deleted after use)")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps (after one warm-up step)")
    ap.add_argument("--search-steps", type=int, default=1, help="training steps per search try")
    ap.add_argument("--profile-seqs", type=int, default=4, help="sequences of --seq-len profiled")
    ap.add_argument("--seq-len", type=int, default=None, help="default 2048 on GPU, 64 on CPU")
    ap.add_argument("--cap-gib", type=float, default=24.0)
    ap.add_argument("--time-limit-s", type=float, default=540.0, help="whole run; searches stop to respect it")
    ap.add_argument("--reserve-s", type=float, default=150.0, help="time kept per preset still to run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dry-run", action="store_true", help="CPU, shrunk shapes (the default without CUDA)")
    ap.add_argument("--activation-checkpointing", action="store_true", help="not the default; off by default")
    ap.add_argument("--keep-checkpoints", action="store_true")
    ap.add_argument("--reuse-checkpoint", action="store_true", help="reuse (and keep) matching checkpoint folders")
    args = ap.parse_args(argv)
    start = time.monotonic()
    cuda = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda" if cuda else "cpu")
    args.seq_len = args.seq_len or (2048 if cuda else 64)
    if cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * GiB / total))
    header = {
        "device": _device() if cuda else _device() + " (CPU mode: shrunk shapes, no memory cap)",
        "commit": _commit(),
        **_versions(),
        "command": " ".join([f"{k}={shlex.quote(os.environ[k])}" for k in _RELEVANT_ENV if k in os.environ]
                            + [shlex.quote(a) for a in ["python3", "bench/gpu_memory.py", *sys.argv[1:]]]),
        "memory cap": (f"{args.cap_gib:g} GiB via torch.cuda.set_per_process_memory_fraction "
                       f"({args.cap_gib * GiB / total:.4f} of {total / GiB:.1f} GiB; the CUDA context is outside it)")
        if cuda else "none (CPU)",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }  # fmt: skip
    results = []
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def write() -> str:  # after every preset: a run killed later still leaves the presets done so far
        header["wall time"] = f"{time.monotonic() - start:.0f} s"
        text = render(results, header, cuda, args.cap_gib)
        with open(args.out, "w") as f:
            f.write(text)
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump({"header": header, "results": results}, f, indent=1, default=str)
        return text

    for i, name in enumerate(args.presets):
        deadline = start + args.time_limit_s - args.reserve_s * (len(args.presets) - i - 1)
        t0 = time.monotonic()
        if t0 > start + args.time_limit_s:
            r = {"preset": name, "shrunk": not cuda, "error": "not run: --time-limit-s reached"}
        else:
            try:
                r = run_preset(name, args, device, deadline)
            except Exception as e:  # noqa: BLE001 - recorded in the report, the next preset still runs
                r = {"preset": name, "shrunk": not cuda, "error": f"{type(e).__name__}: {e}"[:500]}
            free_memory(device)
        r["wall_s"] = time.monotonic() - t0
        say(f"{name}: {'FAILED ' + r['error'] if 'error' in r else 'done'} in {r['wall_s']:.0f} s")
        results.append(r)
        write()
    print(write())
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
