"""The hardware model of the time-to-accuracy experiment (FLUX_DESIGN.md section 8): seconds of one federated round
of each method (``flux``, ``fmd``, ``fmq``, ``fmes``, ``fedavg-lora``) for a REAL model shape on a DECLARED device.
Rounds to the target are measured elsewhere (``flux_engine.experiment``, small presets on a CPU); this module only
models the round time ``t_m(r)``. Nothing here is measured: every number is a vendor figure fixed below or a
declared parameter (``HardwareParams``), and ``HardwareParams.describe()`` prints all of them beside every result.

Devices (``DEVICES``, vendor spec sheets; dense bf16 tensor-core peak with fp32 accumulate, no sparsity; DRAM
bandwidth), host link PCIe 4.0 x16 (``PCIE4_X16_GBYTES_PER_S``: 16 GT/s x 16 lanes x 128/130 / 8 bits = 31.5 GB/s
per direction) and client networks of 100 Mbit/s and 1 Gbit/s (``NETWORKS``).

FLOPs of the real shape (per token; ``S`` sequence length, ``H`` hidden, ``nh`` / ``nkv`` heads, ``D`` head dim,
``I_d`` dense intermediate, ``E`` / ``k`` / ``I`` routed experts, per token, intermediate, ``I_s`` shared expert,
``V`` vocabulary, ``r`` LoRA rank; a multiply-add is 2 FLOPs)::

    attention projections = 2 H D (2 nh + 2 nkv)                    per layer
    attention core        = 2 nh D (S + 1)                          per layer (QK^T and PV, causal: mean context (S+1)/2)
    dense MLP             = 6 H I_d                                 per dense layer
    router                = 2 H E                                   per MoE layer
    routed experts        = 6 k H I                                 per MoE layer
    shared experts        = 6 H I_s                                 per MoE layer
    LM head               = 2 H V
    LoRA                  = 2 r (2H + 3I) x k x lora_share          per MoE layer (gate_up [2I, H] and down [H, I])
    forward(tokens)       = tokens x (linear + attention core)      (linear = every term but the core and LoRA)
    train step(tokens)    = tokens x (2 linear + 3 core + 3 LoRA)

In a train step the frozen base weights cost a forward and an input-gradient pass (no weight gradient: 2x), the
attention core a forward and two backward products (3x), the LoRA factors forward, input and weight gradients
(3x). ``lora_share``: the share of routed rows that land on a LoRA'd (tuning) expert: 1 for every baseline, and
``B_tune / (L E)`` for Flux (uniform routing).

Compute seconds = FLOPs / (peak x ``utilisation``), or tokens / ``measured_tokens_per_s`` where a GPU measured it
(``bench/memory.py --device cuda``); memory-bound work = bytes / (DRAM bandwidth x ``mem_efficiency``); host -> GPU copies
= bytes / (PCIe x ``pcie_efficiency``); network = 8 x bytes / bits per second.

Memory feasibility comes from the project's own plans on the real config (``structure.method_plans``:
``budget.plan_budget`` for Flux, whose int4 profiling copy time-shares the card with training,
``baselines.fedavg_lora_memory`` / ``plan_residency`` / ``fmq_memory`` / ``plan_kept``): a method whose plan does
not fit the budget is **infeasible** and gets no round time. FedAvg-LoRA is the unconstrained upper bound: its time
is shown even where it does not fit, marked infeasible, and never ranked.

Per method, one client's round (``t_e`` = bytes of one expert's weights in the weight dtype, ``N = L E``, ``steps``
local steps of ``batch x S`` tokens, ``P = 1 - (1 - k/E)^(batch S)`` the chance a micro-batch touches an expert
under uniform routing)::

    all methods   train   = steps x train step(batch S);  upload = trained experts x r(2H + 3I) x 4 B (fp32);
                  download = experts changed since the client's last sync x r(2H + 3I) x 4 B
    fedavg-lora   setup (round 1) = N t_e over PCIe
    fmd           setup (round 1) = resident t_e over PCIe + first profile;
                  PCIe per step = 2 x (N - resident) x P x t_e (forward and backward fetch);
                  visible PCIe = steps x PCIe step (no overlap) or max(0, PCIe - train) (prefetch overlap)
    fmq           setup (round 1) = N t_e over PCIe + quantise (N t_e read, N q_e written, DRAM);
                  dequant per step: fused 0 (packed weights read inside the GEMM), unfused
                  2 x N x P x (q_e + t_e) DRAM bytes (each pass writes the bf16 weights it then reads)
    fmes          setup (round 1) = kept t_e over PCIe + first profile
    flux          setup (round 1) = first profile + building the int4 copy (N t_e over PCIe, quantised) + the
                  copy to host memory (C bytes over PCIe: it is on the card in the profile phase only, ``budget``);
                  merge each round = every expert's base weights over PCIe (N t_e: the tuning ones stay, the others
                  are folded with their global adapters and averaged into B_non) + (N + B_non) t_e DRAM;
                  profiling each round (stale: hidden in the client's idle window, ``timemodel``) = the copy from
                  host (C over PCIe) + changed experts' base weights over PCIe and their new codes back (q_e each)
                  + forward(profile rows x S) on the int4 copy
    first profile = N t_e over PCIe (the full model streamed) + forward(profile rows x S)
    C = ``budget.profiling_copy_bytes`` (int4 experts, int8 dense weights, bf16 norms and routers)

Rounds are assembled by ``timemodel.TimeModel.simulate`` (max over clients + aggregation; aggregation is not
modelled: 0 s) from one ``timemodel.ClientRound`` per client, whose network bytes come from the learning run's
measured per-round structure (``NetworkStructure``: experts each client sent and received), scaled to the real
shape's experts; without a measurement, the structural bound (every trained expert is sent, every expert changed
since the last sync is received).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from flux_engine import budget, timemodel
from flux_engine.models.config import MoEConfig
from flux_engine.structure import MethodPlan, method_plans

GiB = 1 << 30
METHODS = ("flux", "fedavg-lora", "fmd", "fmq", "fmes")
BASELINES_RANKED = ("fmd", "fmq", "fmes")  # fedavg-lora: the unconstrained bound, never ranked


@dataclass(frozen=True)
class Device:
    """A GPU as its vendor's spec sheet states it."""

    key: str
    name: str
    memory_gib: float
    bf16_tflops: float  # dense tensor-core peak, bf16 inputs, fp32 accumulate, without sparsity
    dram_gbytes_per_s: float
    source: str


# Fixed before any run, from the vendors' published figures.
DEVICES: Dict[str, Device] = {
    d.key: d
    for d in (
        Device("rtx4090", "NVIDIA GeForce RTX 4090 24 GB", 24, 165.2, 1008,
               "NVIDIA Ada GPU architecture whitepaper (RTX 4090: 165.2 bf16 TFLOPS with fp32 accumulate, "
               "330.4 with sparsity; 24 GB GDDR6X, 1008 GB/s)"),
        Device("rtx3090", "NVIDIA GeForce RTX 3090 24 GB", 24, 71.0, 936,
               "NVIDIA Ampere GA102 GPU architecture whitepaper (RTX 3090: 71 bf16 TFLOPS with fp32 accumulate, "
               "142 with sparsity; 24 GB GDDR6X, 936 GB/s)"),
        Device("l20", "NVIDIA L20 48 GB", 48, 119.5, 864,
               "NVIDIA L20 datasheet (119.5 bf16 tensor TFLOPS dense, 239 with sparsity; 48 GB GDDR6, 864 GB/s)"),
        Device("h100", "NVIDIA H100 SXM5 80 GB", 80, 989.4, 3350,
               "NVIDIA H100 Tensor Core GPU datasheet (SXM5: 989.4 bf16 TFLOPS dense, 1979 with sparsity; 80 GB "
               "HBM3, 3.35 TB/s)"),
    )
}  # fmt: skip
PCIE4_X16_GBYTES_PER_S = 16 * 16 * (128 / 130) / 8  # 31.51 GB/s per direction (PCIe 4.0 base specification)
NETWORKS = {"100 Mbit/s": 100e6, "1 Gbit/s": 1e9}  # bits per second


def device(key: str) -> Device:
    try:
        return DEVICES[key]
    except KeyError:
        raise ValueError(f"unknown device {key!r}; known: {', '.join(DEVICES)}") from None


# ----------------------------------------------------------------------------------------------------------------
# Parameters


@dataclass(frozen=True)
class HardwareParams:
    """Every declared parameter of the model (``describe`` prints them). ``budget_gib`` 0: the device's memory."""

    device: str = "rtx4090"
    budget_gib: float = 0.0
    utilisation: float = 0.4  # share of the bf16 peak a LoRA training step reaches
    mem_efficiency: float = 0.8  # share of DRAM bandwidth a memory-bound kernel reaches
    pcie_gbytes_per_s: float = PCIE4_X16_GBYTES_PER_S
    pcie_efficiency: float = 0.8  # share of the PCIe peak pinned host -> GPU copies reach
    network_bps: float = NETWORKS["1 Gbit/s"]
    fmd_overlap: bool = True  # FMD prefetches the next layer's experts while this one computes
    fmq_fused: bool = True  # FMQ dequantises inside the GEMM (no extra DRAM traffic)
    local_steps: int = 4
    batch_size: int = 4
    seq_len: int = 64
    profile_rows: int = 16
    lora_rank: int = 8
    clients: int = 4
    measured_tokens_per_s: float = 0.0  # > 0: a GPU's measured training tokens/s replace the modelled compute

    def __post_init__(self) -> None:
        device(self.device)
        positive = ("utilisation", "mem_efficiency", "pcie_gbytes_per_s", "pcie_efficiency", "network_bps")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"HardwareParams.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("utilisation", "mem_efficiency", "pcie_efficiency"):
            if getattr(self, name) > 1:
                raise ValueError(f"HardwareParams.{name} must be <= 1, got {getattr(self, name)!r}")
        for name in ("local_steps", "batch_size", "seq_len", "lora_rank", "clients"):
            if getattr(self, name) < 1:
                raise ValueError(f"HardwareParams.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.profile_rows < 0 or self.budget_gib < 0 or self.measured_tokens_per_s < 0:
            raise ValueError("HardwareParams.profile_rows, budget_gib and measured_tokens_per_s must be >= 0")

    @property
    def dev(self) -> Device:
        return device(self.device)

    @property
    def budget_bytes(self) -> int:
        return int((self.budget_gib or self.dev.memory_gib) * GiB)

    @property
    def flops_per_s(self) -> float:
        return self.dev.bf16_tflops * 1e12 * self.utilisation

    @property
    def dram_bytes_per_s(self) -> float:
        return self.dev.dram_gbytes_per_s * 1e9 * self.mem_efficiency

    @property
    def pcie_bytes_per_s(self) -> float:
        return self.pcie_gbytes_per_s * 1e9 * self.pcie_efficiency

    def settings(self) -> budget.TrainSettings:
        """The memory model's settings on the GPU: bf16 weights, LoRA, AdamW, this batch."""
        return budget.TrainSettings(dtype="bfloat16", lora_rank=self.lora_rank, batch_size=self.batch_size,
                                    seq_len=self.seq_len)  # fmt: skip

    def describe(self) -> str:
        d = self.dev
        compute = (f"measured {self.measured_tokens_per_s:.0f} training tokens/s (replaces the FLOP model)"
                   if self.measured_tokens_per_s else
                   f"{d.bf16_tflops:g} TFLOPS bf16 dense peak x utilisation {self.utilisation:g} = "
                   f"{self.flops_per_s / 1e12:.1f} TFLOPS")  # fmt: skip
        return "\n".join([
            f"device: {d.name} ({d.source})",
            f"  memory budget {self.budget_bytes / GiB:g} GiB; compute {compute}",
            f"  DRAM {d.dram_gbytes_per_s:g} GB/s x efficiency {self.mem_efficiency:g} = "
            f"{self.dram_bytes_per_s / 1e9:.0f} GB/s",
            f"  PCIe {self.pcie_gbytes_per_s:.1f} GB/s x efficiency {self.pcie_efficiency:g} = "
            f"{self.pcie_bytes_per_s / 1e9:.1f} GB/s host -> GPU",
            f"  network {self.network_bps / 1e6:g} Mbit/s per client, both directions",
            f"  FMD prefetch overlap {'on' if self.fmd_overlap else 'off'}; FMQ dequantisation "
            f"{'fused' if self.fmq_fused else 'unfused'}",
            f"  round: {self.clients} clients x {self.local_steps} local steps of {self.batch_size} x {self.seq_len} "
            f"tokens, LoRA r {self.lora_rank}, {self.profile_rows} profiled rows; aggregation not modelled (0 s)",
        ])  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# FLOPs


def forward_flops_per_token(config: MoEConfig, seq_len: int) -> Dict[str, float]:
    """Forward FLOPs per token of the base model by term (module docstring), LoRA excluded."""
    c = config
    H, D = c.hidden_size, c.head_dim
    n_moe = len(c.moe_layer_indices)
    n_dense = c.num_layers - n_moe
    return {
        "attention projections": c.num_layers * 2 * H * D * (2 * c.num_heads + 2 * c.num_kv_heads),
        "attention core": c.num_layers * 2 * c.num_heads * D * (seq_len + 1),
        "dense MLP": n_dense * 6 * H * c.intermediate_size,
        "router": n_moe * 2 * H * c.num_experts,
        "routed experts": n_moe * 6 * c.num_experts_per_tok * H * c.moe_intermediate_size,
        "shared experts": n_moe * 6 * H * c.shared_expert_intermediate_size,
        "LM head": 2 * H * c.vocab_size,
    }


def lora_flops_per_token(config: MoEConfig, rank: int, lora_share: float = 1.0) -> float:
    """Forward FLOPs per token of the LoRA factors on the routed rows that reach a LoRA'd expert."""
    c = config
    return len(c.moe_layer_indices) * c.num_experts_per_tok * lora_share * 2 * rank * (
        2 * c.hidden_size + 3 * c.moe_intermediate_size)  # fmt: skip


def forward_flops(config: MoEConfig, tokens: int, seq_len: int) -> float:
    return tokens * sum(forward_flops_per_token(config, seq_len).values())


def train_flops(config: MoEConfig, tokens: int, seq_len: int, rank: int, lora_share: float = 1.0) -> float:
    """``tokens x (2 linear + 3 attention core + 3 LoRA)`` (module docstring)."""
    f = forward_flops_per_token(config, seq_len)
    core = f.pop("attention core")
    return tokens * (2 * sum(f.values()) + 3 * core + 3 * lora_flops_per_token(config, rank, lora_share))


def p_touched(config: MoEConfig, tokens: int) -> float:
    """Chance that ``tokens`` tokens, each routed to ``k`` of ``E`` experts uniformly, touch a given expert."""
    return 1.0 - (1.0 - config.num_experts_per_tok / config.num_experts) ** tokens


# ----------------------------------------------------------------------------------------------------------------
# Network structure measured in the learning runs


@dataclass
class NetworkStructure:
    """Per round, per client: the experts' worth of adapters it received and sent (``(down, up)``), and the
    experts the global model changed that round; measured on the small model (``from_history``) as shares of its
    ``L E`` experts, so they carry over to the real shape."""

    rounds: List[Dict[str, Tuple[float, float]]]  # share of L E received / sent, per client
    changed: List[float]  # share of L E the round's aggregation changed

    @classmethod
    def from_history(cls, history: Sequence[Mapping], expert_lora_bytes: int, num_experts: int) -> "NetworkStructure":
        """From a server history (``ServerState.history``): per client ``download_bytes`` / ``upload_bytes`` over
        the small model's fp32 adapter bytes per expert, over its ``num_experts`` (= L E)."""
        rounds, changed = [], []
        for h in history:
            per = {}
            for c, t in h.get("clients", {}).items():
                per[str(c)] = (t["download_bytes"] / expert_lora_bytes / num_experts,
                               t["upload_bytes"] / expert_lora_bytes / num_experts)  # fmt: skip
            rounds.append(per)
            changed.append(float(h.get("experts_changed", 0)) / num_experts)
        return cls(rounds, changed)


def lora_expert_bytes(config: MoEConfig, rank: int) -> int:
    """fp32 bytes of one expert's LoRA factors (what travels): ``r (2H + 3I) x 4``."""
    return rank * (2 * config.hidden_size + 3 * config.moe_intermediate_size) * 4


def structural_network(method: str, plan: MethodPlan, clients: int, rounds: int) -> NetworkStructure:
    """The bound without a measurement: each client sends what it trains (Flux ``B_tune``, FMES ``kept``, the
    others every expert) and receives every expert the clients trained the round before (all of them in round 1)."""
    N = plan.structure.get("experts", 1)
    trained = {"flux": plan.structure.get("B_tune", N), "fmes": plan.structure.get("kept", N)}.get(method, N) / N
    union = min(1.0, clients * trained) if method == "flux" else trained
    per = [{str(c): (1.0 if r == 0 else union, trained) for c in range(clients)} for r in range(rounds)]
    return NetworkStructure(per, [union] * rounds)


# ----------------------------------------------------------------------------------------------------------------
# Round time


@dataclass
class RoundTerms:
    """Seconds of one client's round by term (before the round assembly), and the bytes behind them."""

    setup: float = 0.0  # round 1 only: loading, quantising, the first profile (on the critical path)
    train: float = 0.0
    pcie: float = 0.0  # FMD's fetches, all of them (the time model hides what the overlap hides)
    dequant: float = 0.0  # FMQ unfused
    merge: float = 0.0
    profile: float = 0.0  # Flux's stale profile (hidden in the idle window where it fits)
    info: Dict[str, float] = field(default_factory=dict)


def _compute_seconds(config: MoEConfig, p: HardwareParams, tokens: int, flops: float) -> float:
    return tokens / p.measured_tokens_per_s if p.measured_tokens_per_s else flops / p.flops_per_s


def round_terms(config: MoEConfig, method: str, plan: MethodPlan, p: HardwareParams,
                changed_share: float = 1.0) -> Tuple[RoundTerms, RoundTerms]:  # fmt: skip
    """``(round 1, later rounds)`` terms of one client (module docstring); ``changed_share``: share of ``L E``
    the previous aggregation changed (Flux's profile refresh)."""
    c = config
    N = len(c.moe_layer_indices) * c.num_experts
    t_e = budget.expert_parameters(c) * 2  # bf16
    q_e = budget.quantized_expert_bytes(c, plan.structure.get("bits", 4))
    tokens_step = p.batch_size * p.seq_len
    tokens = p.local_steps * tokens_step
    share = plan.structure.get("B_tune", N) / N if method == "flux" else 1.0
    train = _compute_seconds(c, p, tokens, train_flops(c, tokens, p.seq_len, p.lora_rank, share))
    prof_tokens = p.profile_rows * p.seq_len
    if p.measured_tokens_per_s:
        prof_fwd = prof_tokens / p.measured_tokens_per_s / 3  # a forward is about a third of a train step
    else:
        prof_fwd = forward_flops(c, prof_tokens, p.seq_len) / p.flops_per_s
    stream_all = N * t_e / p.pcie_bytes_per_s
    first_profile = stream_all + prof_fwd
    P = p_touched(c, tokens_step)
    later = RoundTerms(train=train, info={"p_touched": P, "tokens": tokens})
    first = RoundTerms(train=train, info=dict(later.info))
    if method == "fedavg-lora":
        first.setup = stream_all
    elif method == "fmd":
        res = plan.structure.get("resident", N)
        fetch = p.local_steps * 2 * (N - res) * P * t_e
        later.pcie = first.pcie = fetch / p.pcie_bytes_per_s
        later.info["pcie_bytes"] = first.info["pcie_bytes"] = fetch
        first.setup = res * t_e / p.pcie_bytes_per_s + first_profile
    elif method == "fmq":
        first.setup = stream_all + N * (t_e + q_e) / p.dram_bytes_per_s
        if not p.fmq_fused:
            later.dequant = first.dequant = p.local_steps * 2 * N * P * (q_e + t_e) / p.dram_bytes_per_s
    elif method == "fmes":
        first.setup = plan.structure.get("kept", N) * t_e / p.pcie_bytes_per_s + first_profile
    elif method == "flux":
        b_non = plan.structure.get("B_non", 0)
        merge = stream_all + (N + b_non) * t_e / p.dram_bytes_per_s
        later.merge = first.merge = merge
        copy = budget.profiling_copy_bytes(c, budget.TrainSettings(dtype="bfloat16", profile_bits=4))
        first.setup = first_profile + N * (t_e + q_e) / p.dram_bytes_per_s + copy / p.pcie_bytes_per_s
        later.profile = (copy + changed_share * N * (t_e + q_e)) / p.pcie_bytes_per_s + prof_fwd
    else:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    return first, later


def client_rounds(config: MoEConfig, method: str, plan: MethodPlan, p: HardwareParams, net: NetworkStructure,
                  rounds: int) -> List[Tuple[List[timemodel.ClientRound], float]]:  # fmt: skip
    """The ``timemodel`` input of ``rounds`` rounds: one ``ClientRound`` per client per round (network bytes from
    ``net``, its last round repeated beyond what it measured), aggregation 0 s."""
    N = len(config.moe_layer_indices) * config.num_experts
    e_bytes = lora_expert_bytes(config, p.lora_rank)
    out = []
    for r in range(rounds):
        i = min(r, len(net.rounds) - 1)
        changed = net.changed[min(max(r - 1, 0), len(net.changed) - 1)] if net.changed else 1.0
        first, later = round_terms(config, method, plan, p, changed)
        t = first if r == 0 else later
        clients = []
        for c, (down, up) in sorted(net.rounds[i].items()):
            clients.append(timemodel.ClientRound(
                client=c, download_bytes=int(down * N * e_bytes), upload_bytes=int(up * N * e_bytes),
                profile_seconds=t.setup if r == 0 else t.profile, merge_seconds=t.merge,
                train_seconds=t.train + t.dequant, pcie_bytes=int(t.pcie * p.pcie_bytes_per_s),
                stale=r > 0,
            ))  # fmt: skip
        out.append((clients, 0.0))
    return out


def time_model(p: HardwareParams) -> timemodel.TimeModel:
    return timemodel.TimeModel(network_bps=p.network_bps, pcie_bytes_per_s=p.pcie_bytes_per_s,
                               pcie_overlap=p.fmd_overlap)  # fmt: skip


def round_times(config: MoEConfig, method: str, plan: MethodPlan, p: HardwareParams, net: NetworkStructure,
                rounds: int) -> List[timemodel.RoundTime]:  # fmt: skip
    """Modelled rounds 1..``rounds`` of ``method`` (cumulative times in ``RoundTime.end``)."""
    return time_model(p).simulate(client_rounds(config, method, plan, p, net, rounds))


def params_from(p: HardwareParams, **changes) -> HardwareParams:
    """``p`` with ``changes`` (names checked)."""
    names = {f.name for f in fields(HardwareParams)}
    bad = sorted(set(changes) - names)
    if bad:
        raise ValueError(f"unknown hardware parameters {bad}; known: {sorted(names)}")
    return replace(p, **changes)


def mean_terms(config: MoEConfig, method: str, plan: MethodPlan, p: HardwareParams, net: NetworkStructure,
               rounds: int) -> Dict[str, float]:  # fmt: skip
    """Mean modelled seconds per round over rounds 1..``rounds``: of the slowest client by visible term ("train"
    with any unfused dequantisation, "PCIe", "merge", "setup, profiling", "network" down + up) and of the whole
    round ("round", aggregation included)."""
    rts = round_times(config, method, plan, p, net, rounds)
    slow = [rt.slowest for rt in rts]
    terms = {"train": lambda s: s.train, "PCIe": lambda s: s.pcie, "merge": lambda s: s.merge,
             "setup, profiling": lambda s: s.profile, "network": lambda s: s.download + s.upload}  # fmt: skip
    out = {k: sum(f(s) for s in slow) / len(slow) for k, f in terms.items()}
    out["round"] = rts[-1].end / len(rts)
    return out


def table(config: MoEConfig, p: HardwareParams, rounds: int = 10,
          nets: Optional[Mapping[str, NetworkStructure]] = None) -> str:  # fmt: skip
    """Markdown: per method its plan and the mean modelled seconds per round over ``rounds`` rounds by term."""
    plans = method_plans(config, p.budget_bytes, p.settings())
    lines = ["| method | memory plan | train | PCIe (all / visible) | dequant | merge | setup, profiling (visible) | "
             "network (down + up) | mean round (s) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for m in METHODS:
        plan = plans[m]
        if not plan.feasible and m != "fedavg-lora":
            lines.append(f"| {m} | {plan.text()} | - | - | - | - | - | - | infeasible |")
            continue
        net = (nets or {}).get(m) or structural_network(m, plan, p.clients, rounds)
        t = mean_terms(config, m, plan, p, net, rounds)
        _, later = round_terms(config, m, plan, p)
        label = m if plan.feasible else f"{m} (unranked)"
        lines.append(
            f"| {label} | {plan.text()} | {t['train']:.3f} | {later.pcie:.3f} / {t['PCIe']:.3f} | "
            f"{later.dequant:.3f} | {t['merge']:.3f} | {t['setup, profiling']:.3f} | {t['network']:.3f} | "
            f"{t['round']:.3f} |"
        )
    return "\n".join(lines)
