"""Server state, checkpointed atomically after every round so a restarted server resumes from the last complete one.

On disk (``state_dir``): ``state-r{round:05d}.safetensors`` holds the tensors (global trainable tensors, per-client
utilities, the RNG state) and, in its metadata, everything else as JSON; ``latest.json`` names the newest complete
file with its size and sha256. Both are written to a temp file, fsynced and ``os.replace``d (the folder fsynced
after), the manifest last, so a crash at any point leaves the previous round loadable; the server removes temp files
a killed run left (``fileio.remove_stale_temps``) when it starts. A file that does not match its manifest
(truncated, edited) raises ``StateError`` naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from flux_engine.aggregation import ExpertKey, Update, UtilityTable, flat_tensors, nested_tensors
from flux_engine.fileio import atomic_write, fsync_dir

MANIFEST = "latest.json"


class StateError(RuntimeError):
    """A server checkpoint that cannot be used; the message names the file and what is wrong."""


@dataclass
class ServerState:
    """Everything the server needs to continue after round ``round``.

    ``global_tensors``: current value of every expert trained so far (experts absent here are still the base
    checkpoint's, or fresh adapters); ``updated_round[key]``: the round that last changed it, so a client that synced
    at round s is sent only keys with ``updated_round > s`` (``last_sync[client] = s``). ``budgets[client]``:
    ``B_tune`` as the client reported it. ``history``: one report per completed round; ``baseline``: the evaluation
    of the model before any training (round 0), empty when there was none.
    """

    num_layers: int
    num_experts: int
    round: int = 0
    global_tensors: Update = field(default_factory=dict)
    updated_round: Dict[ExpertKey, int] = field(default_factory=dict)
    utilities: Optional[UtilityTable] = None
    budgets: Dict[str, int] = field(default_factory=dict)
    last_sync: Dict[str, int] = field(default_factory=dict)
    rng: torch.Generator = field(default_factory=torch.Generator)
    config: Dict[str, Any] = field(default_factory=dict)
    history: List[Dict[str, Any]] = field(default_factory=list)
    baseline: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.utilities is None:
            self.utilities = UtilityTable(self.num_layers, self.num_experts)

    # ------------------------------------------------------------------------------------------ (de)serialise

    def to_bytes(self) -> bytes:
        tensors = flat_tensors(self.global_tensors, "global/")
        clients = sorted(self.utilities.tables)
        for i, c in enumerate(clients):
            tensors[f"utility/{i}"] = self.utilities.tables[c]
        prior_clients = sorted(self.utilities.priors)
        for i, c in enumerate(prior_clients):
            tensors[f"prior/{i}"] = self.utilities.priors[c]
        tensors["rng"] = self.rng.get_state()
        meta = {
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "round": self.round,
            "updated_round": [[l, e, r] for (l, e), r in sorted(self.updated_round.items())],
            "utility_clients": clients,
            "prior_clients": prior_clients,
            "budgets": self.budgets,
            "last_sync": self.last_sync,
            "config": self.config,
            "history": self.history,
            "baseline": self.baseline,
        }
        return st_save(tensors, metadata={"flux_server_state": json.dumps(meta)})

    @classmethod
    def from_bytes(cls, data: bytes) -> "ServerState":
        tensors = st_load(data)
        # safetensors.torch.load drops the metadata: read it from the header (8-byte length, then JSON).
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(json.loads(data[8 : 8 + header_len])["__metadata__"]["flux_server_state"])
        state = cls(meta["num_layers"], meta["num_experts"], round=meta["round"], config=meta["config"])
        state.global_tensors = nested_tensors(tensors, "global/")
        state.updated_round = {(l, e): r for l, e, r in meta["updated_round"]}
        for i, c in enumerate(meta["utility_clients"]):
            state.utilities.tables[c] = tensors[f"utility/{i}"]
        for i, c in enumerate(meta.get("prior_clients", [])):  # absent before utilities had one scale
            state.utilities.priors[c] = tensors[f"prior/{i}"]
        state.rng.set_state(tensors["rng"])
        state.budgets = {k: int(v) for k, v in meta["budgets"].items()}
        state.last_sync = {k: int(v) for k, v in meta["last_sync"].items()}
        state.history = meta["history"]
        state.baseline = meta.get("baseline", {})  # absent in checkpoints written before round-0 evaluations
        return state

    # ------------------------------------------------------------------------------------------ disk

    def save(self, state_dir: str) -> str:
        """Write this state as the newest complete round of ``state_dir``; returns the file's path."""
        os.makedirs(state_dir, exist_ok=True)
        data = self.to_bytes()
        name = f"state-r{self.round:05d}.safetensors"
        atomic_write(os.path.join(state_dir, name), lambda f: f.write(data), binary=True)
        manifest = {"round": self.round, "file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        atomic_write(os.path.join(state_dir, MANIFEST), lambda f: json.dump(manifest, f, indent=1))
        # Older rounds are superseded only once the manifest points past them.
        superseded = [old for old in os.listdir(state_dir) if old.startswith("state-r") and old != name]
        for old in superseded:
            os.remove(os.path.join(state_dir, old))
        if superseded:
            fsync_dir(state_dir)
        return os.path.join(state_dir, name)

    @classmethod
    def load(cls, state_dir: str) -> "ServerState":
        """The last complete round saved in ``state_dir`` (``StateError`` when there is none or it is damaged)."""
        mpath = os.path.join(state_dir, MANIFEST)
        try:
            with open(mpath, "rb") as f:
                manifest = json.loads(f.read())
            path = os.path.join(state_dir, manifest["file"])
        except FileNotFoundError:
            raise StateError(f"no server checkpoint in {state_dir} ({MANIFEST} missing): nothing to resume") from None
        except (ValueError, KeyError) as e:
            raise StateError(f"{mpath} is not a valid manifest ({e})") from None
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise StateError(f"{path} (round {manifest['round']}) named by {mpath} is missing") from None
        if len(data) != manifest["bytes"] or hashlib.sha256(data).hexdigest() != manifest["sha256"]:
            raise StateError(
                f"{path} is damaged: {len(data)} bytes with sha256 {hashlib.sha256(data).hexdigest()[:12]}..., "
                f"manifest says {manifest['bytes']} bytes, {manifest['sha256'][:12]}... (truncated copy?)"
            )
        return cls.from_bytes(data)


