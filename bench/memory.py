"""A 24 GB participant fine-tunes a model it cannot hold: Flux profiling and training at the real MoE shapes.

    python3 bench/memory.py --out bench/results/memory_cpu.md            # CPU: real shapes, each preset under a hard
                                                                          #   cap (deepseek-moe-16b:20 llama-moe-3.5b:8)
    python3 bench/memory.py --out gpu_memory.md --device cuda            # GPU: the same presets capped at --cap-gib 24
    python3 bench/memory.py --out /tmp/memory.md --dry-run               # CPU: shrunk shapes, one process, no cap

The full bf16 model (32.8 GB for deepseek-moe-16b) must not be needed at any point. Per preset, phases:

1. checkpoint: the model is built on the meta device and a random-weight checkpoint folder (safetensors shards,
   one per decoder layer, in the preset's source layout: ``deepseek`` / ``llama_moe`` per-expert keys) is written
   under ``--workdir`` one layer at a time; each tensor is drawn from a seeded generator. Never more than one
   layer's tensors exist at a time. The folder is reused by later runs (a marker records config, seed and layout)
   and removed only with ``--remove-checkpoints``.
2. profile: ``profiling.prepare(folder, bits=4)`` streams the folder into the low-bit copy (experts int4, dense
   weights int8: the defaults), then the profiling forward runs over ``--profile-seqs`` sequences.
3. plan: ``budget.plan_budget`` (the cap, ``TrainSettings`` defaults but bf16, micro-batch 1, seq ``--seq-len``)
   gives ``B_tune`` / ``B_non``; activation checkpointing is on when it lets more experts tune (the plan is made
   both ways); round-1 roles (``roles.assign_roles`` on the frequency utility) pick the tuning experts;
   ``merging.layer_budgets`` (Eq. 1) the merged experts per layer.
4. compact: the folder is streamed again; non-expert tensors go straight to their place; each MoE layer's full
   expert stacks are assembled (one layer at a time), merged with ``merging.merge`` (Eq. 2, tuning experts first,
   PCA + cosine k-means of that layer alone) and dropped, so at most one layer's unmerged experts exist.
5. train: ``training.train_round`` (LoRA r 8, alpha 16, AdamW, micro-batch 1) on random tokens, ``--steps`` steps.
6. search: the largest ``B_tune`` that trains one step under the cap, with the planned ``B_non`` merged experts
   (clamped per layer by Eq. 1 as tuning experts grow): a binary search from the plan; each try installs freshly
   drawn expert stacks of the try's shapes next to the checkpoint's non-expert weights (memory depends on shapes
   and on the real routers' routing, not on expert values). It stops at ``--time-limit-s`` and reports the
   bracket it reached.

CPU mode (the default without CUDA): every phase runs in a fresh process under a hard memory cap the kernel
enforces (a memory cgroup, v2 or v1, where the machine allows one, else ``RLIMIT_AS``): a phase that exceeds it is
killed and reported, never swapped. Peak RSS per phase is the process's ``ru_maxrss`` (phases sharing a process
are split by a sampler of ``/proc/self/status`` VmRSS every 10 ms); it includes the file pages of the shard being
read (``safetensors`` maps it) and the interpreter and libraries (the ``baseline`` row). The budget model
(``budget.phase_peaks``) predicts each phase's peak for the same settings. Profiling computes in fp32 (the low-bit
copy dequantises to fp32); training keeps bf16 weights and activations, and its bf16 matrix products run in fp32
one call at a time (``fp32_matmul``: this AVX2 CPU multiplies bf16 about 5x slower than fp32), saving only the bf16
operands for the backward pass. Tokens/s are CPU figures.

GPU mode (``--device cuda``): one process, ``torch.cuda.set_per_process_memory_fraction`` caps it at
``--cap-gib``; each phase's GPU peak is measured from a reset of the allocator's peak statistics and an out-of-
memory error in the search is caught. ``--dry-run``: shrunk presets (4 layers, H 64, up to 16 experts; same
layouts, dense first layer, shared experts) in one CPU process, no cap: the pipeline, not its memory.
"""

from __future__ import annotations

import argparse
import contextlib
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
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import _RELEVANT_ENV, _commit, _device, _versions  # noqa: E402

GiB = 1 << 30
DTYPE = torch.bfloat16
MARKER = "memory_bench.json"


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

    layout = ck.get_layout(layout_name(config), "memory bench")
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


def skeleton(folder: str, device: torch.device):
    """The checkpoint's model with every tensor but the expert stacks allocated on ``device`` (uninitialised) and
    the expert stacks left on meta. Returns ``(model, load plan {key: entry}, scanned shards)``."""
    from flux_engine import checkpoint as ck
    from flux_engine.checkpoint.safetensors_io import CONFIG_FILE, read_json, scan
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
    for mlp in model.moe_layers():
        mlp.experts.reset_expert_map()
    return model, plan, found


@torch.no_grad()
def load_non_experts(folder: str, device: torch.device):
    """The checkpoint's model with its non-expert weights loaded and its expert stacks left on meta, for
    ``install_experts``."""
    from flux_engine.checkpoint.keymap import model_tensors
    from flux_engine.checkpoint.safetensors_io import stream
    from flux_engine.profiling import is_expert_stack

    model, plan, found = skeleton(folder, device)
    tensors = model_tensors(model)
    wanted = [k for k, e in plan.items() if not is_expert_stack(e.param) and not e.param.endswith("expert_map")]
    for key, source in stream(found, wanted):
        entry = plan[key]
        tensors[entry.param][entry.index].copy_(source)
    return model


@torch.no_grad()
def build_compact(folder: str, prof, tuning: List[List[int]], budgets: List[int], device: torch.device, seed: int):
    """The client's compact model, streamed from ``folder``: each MoE layer is merged on ``device`` as soon as its
    expert stacks are complete (one layer's unmerged experts at a time)."""
    from flux_engine import merging
    from flux_engine.checkpoint.keymap import model_tensors
    from flux_engine.checkpoint.safetensors_io import stream
    from flux_engine.profiling import is_expert_stack

    model, plan, found = skeleton(folder, device)
    config = model.config
    layers = {mlp.layer: (i, mlp) for i, mlp in enumerate(model.moe_layers())}
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
    res["checkpoint"] = write_checkpoint(config, folder, args.seed, device, reuse=True)
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
    if args.remove_checkpoints:
        shutil.rmtree(folder, ignore_errors=True)
    return res


# ------------------------------------------------------------------------------- CPU mode: a cap the kernel enforces


class Cap:
    """A hard memory limit on child processes: a memory cgroup (v2, else v1) where this machine lets us make one,
    else ``RLIMIT_AS`` (address space, which over-counts mapped files and reserved-but-untouched memory). A child
    over the cap is killed by the kernel (cgroup) or fails to allocate (rlimit)."""

    V2, V1 = "/sys/fs/cgroup", "/sys/fs/cgroup/memory"

    def __init__(self, limit_bytes: int, name: str):
        self.limit = int(limit_bytes)
        self.path: Optional[str] = None
        self.files: Dict[str, str] = {}
        for root, files in ((self.V2, {"limit": "memory.max", "swap": "memory.swap.max", "events": "memory.events"}),
                            (self.V1, {"limit": "memory.limit_in_bytes", "swap": "memory.memsw.limit_in_bytes",
                                       "events": "memory.oom_control", "peak": "memory.max_usage_in_bytes"})):  # fmt: skip
            if not os.path.exists(os.path.join(root, "cgroup.procs")) or (
                root == self.V2 and not os.path.exists(os.path.join(root, "cgroup.controllers"))
            ):
                continue
            path = os.path.join(root, f"flux_memory_{name}_{os.getpid()}")
            try:
                os.makedirs(path, exist_ok=True)
                with open(os.path.join(path, files["limit"]), "w") as f:
                    f.write(str(self.limit))
            except OSError:
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else None
                continue
            swap = os.path.join(path, files["swap"])
            if os.path.exists(swap):  # v2: no swap; v1: memory+swap = memory
                try:
                    with open(swap, "w") as f:
                        f.write("0" if root == self.V2 else str(self.limit))
                except OSError:
                    pass
            self.path, self.files = path, files
            self.mechanism = f"memory cgroup {'v2' if root == self.V2 else 'v1'} ({path}, {files['limit']} = {self.limit})"
            break
        else:
            self.mechanism = f"RLIMIT_AS = {self.limit} (no writable memory cgroup on this machine)"

    def _enter(self) -> None:  # runs in the child between fork and exec
        if self.path:
            with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        else:
            resource.setrlimit(resource.RLIMIT_AS, (self.limit, self.limit))

    def _event(self, name: str) -> int:
        with open(os.path.join(self.path, self.files["events"])) as f:
            for line in f:
                if line.startswith(name + " "):
                    return int(line.split()[1])
        return 0

    def _reset_peak(self) -> None:
        if "peak" in self.files:
            with open(os.path.join(self.path, self.files["peak"]), "w") as f:
                f.write("0")

    def _hit_limit(self, ooms_before: int) -> bool:
        """Whether the group reached its own limit since the last reset: v2 counts its limit's OOMs in
        ``memory.events``; v1's ``oom_kill`` counts any kill of a member, the machine's own OOM killer included, so
        there the group's peak usage must have reached the limit."""
        if "peak" in self.files:
            with open(os.path.join(self.path, self.files["peak"])) as f:
                return int(f.read()) >= self.limit - (16 << 20)
        return self._event("oom") > ooms_before

    def run(self, cmd: List[str], log_path: str) -> Tuple[int, bool]:
        """Run ``cmd`` under the cap; ``(return code, killed for memory)``. A child killed by the machine's OOM
        killer below the cap (other processes filled the machine) raises: that says nothing about the cap."""
        import subprocess

        if self.path:
            self._reset_peak()
            ooms = self._event("oom")
        with open(log_path, "a") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=self._enter)
            rc = proc.wait()
        if rc == CAP_EXIT:
            return rc, True
        if rc == -9 and self.path:
            if (_oom_constraint(proc.pid) or ("MEMCG" if self._hit_limit(ooms) else "NONE")) == "MEMCG":
                return rc, True
            raise OutsideKill(f"{cmd[-2]} was killed (SIGKILL) below the {self.limit / GiB:g} GiB cap: the machine ran "
                              "out of memory for other reasons (other processes); its result says nothing about the cap")
        return rc, False

    def close(self) -> None:
        if self.path:
            try:
                os.rmdir(self.path)
            except OSError:
                pass


CAP_EXIT = 3  # a child that failed to allocate under RLIMIT_AS exits with this code


class OutsideKill(RuntimeError):
    """A capped child killed by the kernel below its cap."""


def _oom_constraint(pid: int) -> Optional[str]:
    """What the kernel log says killed ``pid``: ``"MEMCG"`` (its group's limit) or ``"NONE"`` (the machine ran out);
    None where the log is unreadable or silent."""
    import subprocess

    try:
        log = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in reversed(log.splitlines()):
        if "oom-kill:constraint=CONSTRAINT_" in line and f",pid={pid}," in line:
            return line.split("constraint=CONSTRAINT_")[1].split(",")[0]
    return None


class PeakSampler:
    """Peak RSS between marks, from ``/proc/self/status`` VmRSS sampled every 10 ms by a thread (the process's
    ``ru_maxrss`` gives the peak since it started)."""

    def __init__(self):
        import threading

        self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    @staticmethod
    def now() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _loop(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.now())

    def mark(self) -> int:
        """The peak since the last mark; the next interval starts from the current RSS."""
        peak, self.peak = max(self.peak, self.now()), self.now()
        return peak


class _Fp32Linear(torch.autograd.Function):
    """``F.linear`` of bf16 CPU tensors computed in fp32; saves the bf16 operands, so no fp32 copy of a weight
    outlives the call (the backward pass recasts)."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float()).to(x.dtype)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        g = gy.float()
        gx = (g @ w.float()).to(x.dtype) if ctx.needs_input_grad[0] else None
        g2 = g.reshape(-1, g.shape[-1])
        gw = (g2.t() @ x.reshape(-1, x.shape[-1]).float()).to(w.dtype) if ctx.needs_input_grad[1] else None
        gb = g2.sum(0).to(w.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


@contextlib.contextmanager
def fp32_matmul() -> Iterator[None]:
    """Inside this block, ``F.linear`` on bf16 CPU tensors runs as ``_Fp32Linear`` (the grouped MLP's reference tier
    already computes in fp32). The function itself is swapped, not intercepted by a ``TorchFunctionMode``: a mode
    is off while its handler runs ``torch.autograd.grad``, so activation checkpointing would recompute the forward
    with the other ``F.linear`` and find different saved tensors."""
    native = torch.nn.functional.linear

    def linear(x, w, b=None):
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and w.dtype == torch.bfloat16:
            return _Fp32Linear.apply(x, w, b)
        return native(x, w, b)

    torch.nn.functional.linear = linear
    try:
        yield
    finally:
        torch.nn.functional.linear = native


def _random_tokens(vocab: int, seq: int, n: int, seed: int) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, seq), generator=g) for _ in range(n)]


def _train_config(spec: Dict[str, Any], steps: int):
    from flux_engine import training

    return training.TrainConfig(mode="lora", rank=8, alpha=16.0, lr=1e-4, micro_batch_size=1, seed=spec["seed"],
                                activation_checkpointing=spec["activation_checkpointing"], steps=steps)  # fmt: skip


def preset_config(spec: Dict[str, Any]):
    from flux_engine import presets

    config = presets.get(spec["preset"])
    return shrink(config) if spec.get("shrink") else config


def child_phase(phase: str, spec: Dict[str, Any]) -> Dict[str, Any]:
    """One phase in this (fresh, capped) process; returns its measurements."""
    from flux_engine import merging, profiling, training
    from flux_engine.profiling import ExpertProfile

    cpu = torch.device("cpu")
    sampler = PeakSampler()
    out: Dict[str, Any] = {"phase": phase, "baseline_rss": sampler.now(), "threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    folder, seq = spec["folder"], spec["seq_len"]
    if phase == "baseline":
        pass
    elif phase == "checkpoint":
        out["checkpoint"] = write_checkpoint(preset_config(spec), folder, spec["seed"], cpu, reuse=True)
    elif phase == "profile":
        low = profiling.prepare(folder, bits=4, device=cpu, dtype=torch.float32)
        out["copy_bytes"] = low.nbytes()
        out["stream_peak"], out["stream_s"] = sampler.mark(), time.perf_counter() - t0
        t1 = time.perf_counter()
        data = _random_tokens(low.config.vocab_size, seq, spec["profile_seqs"], spec["seed"])
        meta = profiling._meta(4, None, True, profiling.DEFAULT_DENSE_BITS)
        prof = profiling._run(low, [{"input_ids": d} for d in data], meta)
        out["forward_peak"], out["forward_s"] = sampler.mark(), time.perf_counter() - t1
        out["tokens_per_s"] = len(data) * seq / out["forward_s"]
        prof.save(spec["profile_path"])
    elif phase in ("train", "try"):
        prof = ExpertProfile.load(spec["profile_path"])
        E = preset_config(spec).num_experts
        tuning = tuning_for(prof, spec["B_tune"], spec["seed"])
        budgets = merging.layer_budgets(prof.frequency, spec["B_non"], [E - len(t) for t in tuning])
        if phase == "train":
            model = build_compact(folder, prof, tuning, budgets, cpu, spec["seed"])
        else:  # the search: real non-expert weights and routers, freshly drawn expert stacks of the try's shapes
            model = load_non_experts(folder, cpu)
            install_experts(model, tuning, budgets, torch.Generator().manual_seed(spec["seed"] + 1))
        out["physical_experts"] = sum(model.config.physical_experts)
        out["model_bytes"] = param_bytes(model)
        out["build_peak"], out["build_s"] = sampler.mark(), time.perf_counter() - t0
        say(f"{phase}: built in {out['build_s']:.0f} s, peak RSS {human(out['build_peak'])}")  # in the log if killed later
        data = _random_tokens(model.config.vocab_size, seq, spec["steps"], spec["seed"])
        t1 = time.perf_counter()
        with fp32_matmul():
            result = training.train_round(model, tuning, data, _train_config(spec, spec["steps"]))
        out["train_peak"], out["train_s"] = sampler.mark(), time.perf_counter() - t1
        out["tokens_per_s"] = result.tokens / out["train_s"]
        out["losses"] = [round(x, 4) for x in result.losses]
    else:
        raise ValueError(f"unknown phase {phase!r}")
    out["seconds"] = time.perf_counter() - t0
    out["rss_peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return out


def _child_main(phase: str, spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    try:
        res = child_phase(phase, spec)
    except MemoryError as e:  # RLIMIT_AS: an allocation refused
        say(f"{phase}: MemoryError {e}")
        return CAP_EXIT
    except RuntimeError as e:
        if "allocate" in str(e) or "memory" in str(e).lower():
            say(f"{phase}: {e}")
            return CAP_EXIT
        raise
    from flux_engine.fileio import atomic_write

    atomic_write(spec_path + ".result", lambda f: json.dump(res, f))
    return 0


def run_phase(cap: Cap, phase: str, spec: Dict[str, Any], workdir: str, tag: str) -> Dict[str, Any]:
    """``phase`` in a fresh process under ``cap``; its measurements, or ``{"over_cap": True}`` / an error."""
    spec_path = os.path.join(workdir, f"{tag}.spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    if os.path.exists(spec_path + ".result"):
        os.remove(spec_path + ".result")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", phase, spec_path]
    t0 = time.perf_counter()
    try:
        rc, killed = cap.run(cmd, os.path.join(workdir, f"{tag}.log"))
    except OutsideKill as e:  # once more: another process may have made the machine short of memory
        say(f"{tag}: {e}; running it again")
        rc, killed = cap.run(cmd, os.path.join(workdir, f"{tag}.log"))
    wall = time.perf_counter() - t0
    if rc == 0:
        with open(spec_path + ".result") as f:
            res = json.load(f)
        res["wall_s"] = wall
        return res
    if killed:
        return {"phase": phase, "over_cap": True, "wall_s": wall, "rc": rc}
    raise RuntimeError(f"{phase} ({tag}) failed with exit code {rc}; see {os.path.join(workdir, tag + '.log')}")


def plan_for_cap(config, cap_bytes: int, seq: int):
    """The budget plan for the cap, with activation checkpointing where it lets more experts tune."""
    from flux_engine import budget

    plans = []
    for ckpt in (False, True):
        settings = budget.TrainSettings(dtype="bfloat16", batch_size=1, seq_len=seq, activation_checkpointing=ckpt)
        plans.append((budget.plan_budget(config, cap_bytes, settings), settings))
    return plans[1] if plans[1][0].B_tune > plans[0][0].B_tune else plans[0]


def run_preset_capped(name: str, cap_gib: float, args, deadline: float) -> Dict[str, Any]:
    """CPU mode: every phase of ``name`` at its real shape in a fresh process under a ``cap_gib`` hard cap."""
    from flux_engine import budget
    from flux_engine.profiling import ExpertProfile

    config = preset_config({"preset": name, "shrink": args.shrink})
    cap_bytes = int(cap_gib * GiB)
    L, E = len(config.moe_layer_indices), config.num_experts
    seq = args.seq_len
    folder = os.path.join(args.workdir, name + ("-shrunk" if args.shrink else ""))
    os.makedirs(args.workdir, exist_ok=True)
    cap = Cap(cap_bytes, name)
    res: Dict[str, Any] = {"preset": name, "cap_gib": cap_gib, "cap": cap.mechanism, "seq_len": seq,
                           "full_model_bytes": full_model_bytes(config), "phases": OrderedDict()}  # fmt: skip
    res["shape"] = (
        f"{config.num_layers} layers ({L} MoE), H {config.hidden_size}, {E} experts of I "
        f"{config.moe_intermediate_size}, top-{config.num_experts_per_tok}, vocab {config.vocab_size}"
    )
    spec = {"preset": name, "shrink": args.shrink, "folder": folder, "seed": args.seed, "seq_len": seq, "steps": args.steps,
            "profile_seqs": args.profile_seqs, "profile_path": os.path.join(args.workdir, f"{name}.profile.json")}
    try:
        for phase in ("baseline", "checkpoint", "profile"):
            say(f"{name}: {phase} under {cap.mechanism}")
            r = res["phases"][phase] = run_phase(cap, phase, spec, args.workdir, f"{name}.{phase}")
            if r.get("over_cap"):
                res["error"] = f"{phase} exceeded the {cap_gib:g} GiB cap"
                return res
        res["checkpoint"] = res["phases"]["checkpoint"]["checkpoint"]
        plan, settings = plan_for_cap(config, cap_bytes, seq)
        res["plan"], res["B_tune"], res["B_non"], res["total_experts"] = plan.describe(), plan.B_tune, plan.B_non, L * E
        res["activation_checkpointing"] = settings.activation_checkpointing
        prof_settings = budget.TrainSettings(dtype="float32", batch_size=1, seq_len=seq, profile_bits=4)
        res["predicted"] = budget.phase_peaks(config, settings, plan.B_tune, plan.B_non, cap_bytes, prof_settings)
        say(f"{name}: plan B_tune {plan.B_tune}, B_non {plan.B_non}, checkpointing {settings.activation_checkpointing}")
        spec.update(B_tune=plan.B_tune, B_non=plan.B_non, activation_checkpointing=settings.activation_checkpointing)
        r = res["phases"]["train"] = run_phase(cap, "train", spec, args.workdir, f"{name}.train")
        say(f"{name}: compact + train: {'over the cap' if r.get('over_cap') else r.get('losses')}")

        log: List[Dict[str, Any]] = []

        # Time kept for compact + train again at the search's result when the plan's B_tune did not fit.
        keep = 2 * res["phases"]["train"]["wall_s"] if res["phases"]["train"].get("over_cap") else 0.0

        def fits(B: int) -> Optional[bool]:
            last = log[-1]["wall_s"] if log else res["phases"]["train"]["wall_s"]
            if time.monotonic() + last > deadline - keep:
                return None
            t = dict(spec, B_tune=B, steps=1)
            r = run_phase(cap, "try", t, args.workdir, f"{name}.try{B}")
            r["B_tune"] = B
            log.append(r)
            say(f"{name}: search B_tune {B}: {'over the cap' if r.get('over_cap') else 'fits'} ({r['wall_s']:.0f} s)")
            return not r.get("over_cap")

        top = L * E
        if res["phases"]["train"].get("over_cap"):
            lo, hi, _ = largest_fitting(-1, plan.B_tune, fits)
        else:
            lo, hi, _ = largest_fitting(plan.B_tune, top + 1, fits)
        res["search"] = {"largest_fit": lo, "smallest_over": hi if hi <= top else None, "resolved": hi - lo == 1,
                         "log": log}  # fmt: skip
        B = lo
        while res["phases"]["train"].get("over_cap") and B > 0:
            # The plan's B_tune did not fit: compact + train again at the largest B_tune the search found, so every
            # phase has a measured peak beside its prediction for the same settings. A try skips the merge, whose
            # leftovers can still push the full pipeline over: then one layer's experts fewer, while time lasts.
            spec.update(B_tune=B)
            say(f"{name}: compact + train at B_tune {B}")
            r = res["phases"]["train_at_fit"] = run_phase(cap, "train", spec, args.workdir, f"{name}.train{B}")
            res["fit_B"] = B
            res["predicted_at_fit"] = budget.phase_peaks(config, settings, B, plan.B_non, cap_bytes, prof_settings)
            say(f"{name}: compact + train at {B}: {'over the cap' if r.get('over_cap') else r.get('losses')}")
            if not r.get("over_cap") or time.monotonic() + r["wall_s"] > deadline:
                break
            res.setdefault("train_over_cap_at", []).append({"B_tune": B, "wall_s": r["wall_s"]})
            B -= E
        prof = ExpertProfile.load(spec["profile_path"])
        res["profile_tokens"] = prof.num_tokens
    finally:
        cap.close()
        if args.remove_checkpoints:
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


def render_capped(results: List[Dict[str, Any]], header: Dict[str, str]) -> str:
    """The CPU-mode report: per preset, phases (measured peak vs the budget model's prediction), plan, search."""
    lines = ["# Memory: a 24 GB participant at the real MoE shapes, under a hard cap (CPU)", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += ["", "## What is measured", "", "```text", (__doc__ or "").strip(), "```"]
    summary = []
    for r in results:
        name = r["preset"]
        lines += ["", f"## {name} under a {r.get('cap_gib', 0):g} GiB cap", ""]
        if "error" in r and "phases" not in r:
            lines += [f"FAILED: `{r['error']}`"]
            continue
        lines += [f"- shape: {r['shape']}; full bf16 model {r['full_model_bytes'] / 1e9:.1f} GB "
                  f"({human(r['full_model_bytes'])}); seq {r['seq_len']}, micro-batch 1",
                  f"- cap: {r['cap']}"]  # fmt: skip
        if "error" in r:
            lines += [f"- FAILED: `{r['error']}`"]
        ph = r["phases"]
        if "checkpoint" in r:
            c = r["checkpoint"]
            lines.append(f"- checkpoint: layout `{c['layout']}`, {human(c['bytes'])}{' (reused)' if c['reused'] else ''}")
        if "plan" in r:
            lines.append(f"- plan: B_tune {r['B_tune']}, B_non {r['B_non']} of {r['total_experts']} experts, "
                         f"activation checkpointing {'on' if r['activation_checkpointing'] else 'off'}")  # fmt: skip
        for key in ("train", "train_at_fit"):
            tr = ph.get(key, {})
            if "losses" in tr:
                lines.append(f"- compact model ({key}): {tr['physical_experts']} physical experts, "
                             f"{human(tr['model_bytes'])} of weights; training losses {tr['losses']}")  # fmt: skip
        pred = r.get("predicted", {})
        rows = []  # (phase, seconds, measured peak, predicted, tokens/s)
        if "baseline" in ph:
            rows.append(("baseline (python + torch + flux_engine imported)", ph["baseline"], ph["baseline"]["rss_peak"], None, None))
        if "checkpoint" in ph:
            rows.append(("checkpoint (write random weights, one layer at a time)", ph["checkpoint"],
                         ph["checkpoint"]["rss_peak"], None, None))  # fmt: skip
        p = ph.get("profile", {})
        if "stream_peak" in p:
            rows.append(("profile: stream + quantize (int4 experts, int8 dense)", {"seconds": p["stream_s"]},
                         p["stream_peak"], None, None))  # fmt: skip
            rows.append(("profile: forward (fp32 compute)", {"seconds": p["forward_s"]}, max(p["stream_peak"], p["forward_peak"]),
                         pred.get("profile"), p["tokens_per_s"]))  # fmt: skip
        fit_pred = r.get("predicted_at_fit", {})
        over = [(f"compact + train at B_tune {t['B_tune']}", {"seconds": t["wall_s"]}, None, None, None)
                for t in r.get("train_over_cap_at", [])]  # fmt: skip
        for key, B, terms in (("train", r.get("B_tune"), pred), ("train_at_fit", r.get("fit_B"), fit_pred)):
            if key == "train_at_fit":
                rows += over
            tr = ph.get(key, {})
            if "build_peak" in tr:
                rows.append((f"compact at B_tune {B}: stream + merge one layer at a time", {"seconds": tr["build_s"]},
                             tr["build_peak"], terms.get("compact"), None))  # fmt: skip
                rows.append((f"train at B_tune {B}: {len(tr['losses'])} LoRA step(s)", {"seconds": tr["train_s"]},
                             tr["train_peak"], terms.get("train"), tr["tokens_per_s"]))  # fmt: skip
            elif tr.get("over_cap"):
                rows.append((f"compact + train at B_tune {B}", {"seconds": tr["wall_s"]}, None, terms.get("train"), None))
        lines += ["", "| phase | seconds | measured peak RSS | predicted peak | measured / predicted | tokens/s |",
                  "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        gaps = []
        for label, t, peak, terms, tps in rows:
            total = sum(terms.values()) if terms else None
            ratio = f"{peak / total:.2f}" if (peak and total) else "-"
            if peak and total and abs(peak / total - 1) > 0.15:
                gaps.append(label)
            lines.append(f"| {label} | {t['seconds']:.1f} | {human(peak) if peak else 'over the cap (killed)'} | "
                         f"{human(total) if total else '-'} | {ratio} | {f'{tps:.1f}' if tps else '-'} |")  # fmt: skip
        predicted = [(phase, terms, r.get("B_tune")) for phase, terms in pred.items()]
        predicted += [(phase, terms, r["fit_B"]) for phase, terms in fit_pred.items() if phase != "profile"]
        for phase, terms, B in predicted:
            lines += ["", f"Predicted `{phase}` peak at B_tune {B} (budget.phase_peaks):", "", "```text"]
            lines += [f"  {k:<48} {human(v):>12}" for k, v in terms.items()]
            lines += [f"  {'total':<48} {human(sum(terms.values())):>12}", "```"]
        if gaps:
            lines += ["", "Gaps over 15% between measured and predicted: " + "; ".join(gaps) + " (explained below)."]
        if "plan" in r:
            lines += ["", "Budget plan:", "", "```text", r["plan"], "```"]
        if "search" in r:
            s = r["search"]
            lines += ["", "Search for the largest B_tune that trains one step under the cap:", ""]
            for t in s["log"]:
                what = "over the cap (killed)" if t.get("over_cap") else (
                    f"fits, peak {human(t['rss_peak'])} (model {human(t['model_bytes'])}, "
                    f"{t['physical_experts']} physical experts), {t['tokens_per_s']:.1f} tokens/s")
                lines.append(f"- B_tune {t['B_tune']}: {what}, {t['wall_s']:.0f} s")
            if not s["log"]:
                lines.append("- (no tries: " + ("the plan already tunes every expert)" if s["largest_fit"] == r["total_experts"]
                                                else "time limit)"))
            lines.append("")
            lines.append(f"Largest B_tune that trains one step: {s['largest_fit']}" + ("" if s["resolved"] else
                         f" (unresolved: smallest over the cap {s['smallest_over']}; time limit)"))  # fmt: skip
            fit = ph.get("train_at_fit", {})
            if fit:
                over = [r["B_tune"]] + [t["B_tune"] for t in r.get("train_over_cap_at", [])]
                over += [r["fit_B"]] if fit.get("over_cap") else []
                lines.append("Compact + train, the merge included: "
                             + (f"fits at B_tune {r['fit_B']}; " if not fit.get("over_cap") else "")
                             + "over the cap at B_tune " + ", ".join(map(str, over)))  # fmt: skip
            peaks = [x["rss_peak"] for x in ph.values() if "rss_peak" in x]
            peaks += [t["rss_peak"] for t in s["log"] if "rss_peak" in t]
            summary.append(f"{name}: peak {max(peaks) / GiB:.1f} GiB under a {r['cap_gib']:g} GiB cap (full bf16 "
                           f"model {r['full_model_bytes'] / 1e9:.1f} GB), B_tune {s['largest_fit']}")  # fmt: skip
    lines += ["", "## Summary", ""] + summary
    return "\n".join(lines) + "\n"


def parse_preset(spec: str, default_cap: float) -> Tuple[str, float]:
    """``NAME`` or ``NAME:CAP_GIB``."""
    name, _, cap = spec.partition(":")
    try:
        return name, float(cap) if cap else default_cap
    except ValueError:
        raise SystemExit(f"--presets: {spec!r}: the cap after ':' must be a number of GiB") from None


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:  # a phase of CPU mode, started by run_phase under the cap
        return _child_main(argv[1], argv[2])
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--presets", nargs="+", default=None,
                    help="NAME[:CAP_GIB]; default deepseek-moe-16b:20 llama-moe-3.5b:8 on CPU, both at --cap-gib on GPU")
    ap.add_argument("--out", required=True, help="markdown results file")
    ap.add_argument("--workdir", default="/tmp/flux_memory", help="checkpoint folders (kept and reused)")
    ap.add_argument("--remove-checkpoints", action="store_true", help="delete the checkpoint folders at the end")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 3 on GPU, 1 on CPU)")
    ap.add_argument("--search-steps", type=int, default=1, help="training steps per search try (GPU)")
    ap.add_argument("--profile-seqs", type=int, default=None, help="sequences profiled (default 4 on GPU, 2 on CPU)")
    ap.add_argument("--seq-len", type=int, default=None, help="default 2048 on GPU, 512 on CPU, 64 with --dry-run")
    ap.add_argument("--cap-gib", type=float, default=24.0, help="GPU cap, and CPU caps not given in --presets")
    ap.add_argument("--time-limit-s", type=float, default=540.0, help="whole run; searches stop to respect it")
    ap.add_argument("--reserve-s", type=float, default=150.0, help="time kept per preset still to run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dry-run", action="store_true", help="the GPU pipeline on the CPU: shrunk shapes, one process, no cap")
    ap.add_argument("--shrink", action="store_true", help="CPU mode on shrunk shapes (a quick check of the capped pipeline)")
    ap.add_argument("--activation-checkpointing", action="store_true", help="GPU and --dry-run; CPU: the plan decides")
    args = ap.parse_args(argv)
    start = time.monotonic()
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available() and not args.dry_run)
    capped = not cuda and not args.dry_run
    device = torch.device("cuda" if cuda else "cpu")
    args.seq_len = args.seq_len or (2048 if cuda else 64 if args.dry_run or args.shrink else 512)
    args.steps = args.steps or (1 if capped else 3)
    args.profile_seqs = args.profile_seqs or (2 if capped else 4)
    presets = args.presets or (["deepseek-moe-16b:20", "llama-moe-3.5b:8"] if capped else
                               ["deepseek-moe-16b", "llama-moe-3.5b"])  # fmt: skip
    presets = [parse_preset(p, args.cap_gib) for p in presets]
    if cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * GiB / total))
    mode = ("real shapes, each phase a fresh process under its preset's cap" if capped else
            "shrunk shapes, no memory cap" if not cuda else "")  # fmt: skip
    header = {
        "device": _device() + (f" (CPU mode: {mode})" if mode else ""),
        "commit": _commit(),
        **_versions(),
        "command": " ".join([f"{k}={shlex.quote(os.environ[k])}" for k in _RELEVANT_ENV if k in os.environ]
                            + [shlex.quote(a) for a in ["python3", "bench/memory.py", *argv]]),
        "memory cap": (f"{args.cap_gib:g} GiB via torch.cuda.set_per_process_memory_fraction "
                       f"({args.cap_gib * GiB / total:.4f} of {total / GiB:.1f} GiB; the CUDA context is outside it)")
        if cuda else "per preset, enforced by the kernel (see each preset)" if capped else "none (CPU)",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }  # fmt: skip
    results = []
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def write() -> str:  # after every preset: a run killed later still leaves the presets done so far
        from flux_engine.fileio import atomic_write

        header["wall time"] = f"{time.monotonic() - start:.0f} s"
        text = render_capped(results, header) if capped else render(results, header, cuda, args.cap_gib)
        atomic_write(args.out, lambda f: f.write(text))
        atomic_write(os.path.splitext(args.out)[0] + ".json",
                     lambda f: json.dump({"header": header, "results": results}, f, indent=1, default=str))
        return text

    for i, (name, cap_gib) in enumerate(presets):
        deadline = start + args.time_limit_s - args.reserve_s * (len(presets) - i - 1)
        t0 = time.monotonic()
        if t0 > start + args.time_limit_s:
            r = {"preset": name, "shrunk": not cuda, "error": "not run: --time-limit-s reached"}
        else:
            try:
                if capped:
                    r = run_preset_capped(name, cap_gib, args, deadline)
                else:
                    r = run_preset(name, args, device, deadline)
            except Exception as e:  # noqa: BLE001 - recorded in the report, the next preset still runs
                r = {"preset": name, "shrunk": not cuda, "cap_gib": cap_gib, "error": f"{type(e).__name__}: {e}"[:500]}
            free_memory(device)
        r["wall_s"] = time.monotonic() - t0
        say(f"{name}: {'FAILED ' + r['error'] if 'error' in r else 'done'} in {r['wall_s']:.0f} s")
        results.append(r)
        write()
    print(write())
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
