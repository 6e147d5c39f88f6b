"""The federated layer: server checkpoints, run config, FluxStrategy with fake clients, and a real 3-client x 2-round
run on the tiny model through the in-process Flower grid."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("flwr")  # the federated layer runs on Flower; the GPU image has none

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from flux_engine.aggregation import expert_shapes  # noqa: E402
from flux_engine.federated import wire  # noqa: E402
from flux_engine.federated.config import ConfigError, RunConfig  # noqa: E402
from flux_engine.federated.simulation import run_local  # noqa: E402
from flux_engine.federated.state import ServerState, StateError  # noqa: E402
from flux_engine.presets import get  # noqa: E402

TINY = get("tiny")
L, E = len(TINY.moe_layer_indices), TINY.num_experts
RANK = 2
SHAPES = expert_shapes(TINY.hidden_size, TINY.moe_intermediate_size, RANK)


# ------------------------------------------------------------------------------------------------ state


def _state() -> ServerState:
    s = ServerState(L, E, round=3, config={"preset": "tiny"})
    s.global_tensors = {
        (0, 1): {n: torch.randn(sh) for n, sh in SHAPES.items()},
        (1, 7): {n: torch.randn(sh) for n, sh in SHAPES.items()},
    }
    s.updated_round = {(0, 1): 2, (1, 7): 3}
    s.utilities.update("5", torch.rand(L, E, dtype=torch.float64))
    s.budgets = {"5": 3, "9": 4}
    s.last_sync = {"5": 2}
    s.rng.manual_seed(11)
    torch.randperm(10, generator=s.rng)
    s.history = [{"round": 3, "dropped": {"9": "no reply"}}]
    return s


def test_state_roundtrip(tmp_path):
    s = _state()
    s.save(str(tmp_path))
    t = ServerState.load(str(tmp_path))
    assert (t.round, t.budgets, t.last_sync, t.history, t.config) == (3, s.budgets, s.last_sync, s.history, s.config)
    assert t.updated_round == s.updated_round
    for key, ts in s.global_tensors.items():
        for n in SHAPES:
            assert torch.equal(t.global_tensors[key][n], ts[n])
    assert torch.equal(t.utilities.tables["5"], s.utilities.tables["5"])
    # The RNG continues where it stopped.
    assert torch.equal(torch.randperm(10, generator=t.rng), torch.randperm(10, generator=s.rng))


def test_state_save_is_atomic_and_keeps_only_the_latest(tmp_path, monkeypatch):
    s = _state()
    s.save(str(tmp_path))
    s.round = 4
    s.save(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["latest.json", "state-r00004.safetensors"]
    # A crash while writing round 5's manifest leaves round 4 loadable and no temp files behind.
    real_replace = os.replace

    def crash(src, dst):
        if dst.endswith("latest.json"):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    s.round = 5
    with pytest.raises(OSError, match="disk full"):
        s.save(str(tmp_path))
    monkeypatch.setattr(os, "replace", real_replace)
    assert ServerState.load(str(tmp_path)).round == 4
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_a_write_killed_midway_leaves_a_temp_file_that_startup_removes(tmp_path):
    """SIGKILL-like death inside ``atomic_write`` (no cleanup runs) used to leave ``.latest.json.XXXXXXXX.tmp``
    behind for good. The next server start removes it, and only files of that form."""
    state_dir = tmp_path / "state"
    app, _ = _fake_client({})
    run_local(_run_cfg(tmp_path, **{"num-rounds": 1, "evaluate-every": 0}), client_app=app)
    code = (
        "import os, sys; from flux_engine.fileio import atomic_write\n"
        "def die(f):\n    f.write('{\"round\": 9'); f.flush(); os._exit(9)\n"
        f"atomic_write({str(state_dir / 'latest.json')!r}, die)\n"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    stale = [n for n in os.listdir(state_dir) if n.endswith(".tmp")]
    assert len(stale) == 1 and stale[0].startswith(".latest.json.")
    assert ServerState.load(str(state_dir)).round == 1  # the old manifest is intact
    (state_dir / "notes.tmp").write_text("mine")  # not atomic_write's: kept
    run_local(_run_cfg(tmp_path, resume=True, **{"num-rounds": 2, "evaluate-every": 0}), client_app=app)
    assert sorted(os.listdir(state_dir)) == ["latest.json", "notes.tmp", "state-r00002.safetensors"]


def test_state_directory_is_fsynced_after_renames(tmp_path, monkeypatch):
    """A rename is durable only once its folder is fsynced: that used to be skipped."""
    real_fsync, real_replace, events = os.fsync, os.replace, []
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.fstat(fd).st_ino)), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", b)), real_replace(a, b))[1])
    _state().save(str(tmp_path))
    folder = os.stat(tmp_path).st_ino
    manifest = events.index(("replace", os.path.join(str(tmp_path), "latest.json")))
    assert ("fsync", folder) in events[manifest + 1 :]


def test_truncated_state_is_one_clear_error(tmp_path):
    path = _state().save(str(tmp_path))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(StateError, match=r"state-r00003.safetensors is damaged: .* \(truncated copy\?\)"):
        ServerState.load(str(tmp_path))


def test_missing_or_broken_manifest(tmp_path):
    with pytest.raises(StateError, match="nothing to resume"):
        ServerState.load(str(tmp_path))
    (tmp_path / "latest.json").write_text("{not json")
    with pytest.raises(StateError, match="not a valid manifest"):
        ServerState.load(str(tmp_path))
    (tmp_path / "latest.json").write_text(
        json.dumps({"round": 2, "file": "state-r00002.safetensors", "bytes": 1, "sha256": "0"})
    )
    with pytest.raises(StateError, match="round 2.* is missing"):
        ServerState.load(str(tmp_path))


# ------------------------------------------------------------------------------------------------ config


def test_config_rejects_typos_and_lists_valid_keys():
    with pytest.raises(
        ConfigError, match=r"unknown config key 'num-round'; valid keys: method, preset, checkpoint, .*num-rounds"
    ):
        RunConfig.from_mapping({"num-round": 3})
    with pytest.raises(ConfigError, match="'lora-rank': expected int"):
        RunConfig.from_mapping({"lora_rank": "eight"})
    with pytest.raises(ConfigError, match="memory-budget: cannot read"):
        RunConfig.from_mapping({"memory-budget": "lots"})
    cfg = RunConfig.from_mapping({"num_rounds": "4", "stale-profile": "false", "budgets": "1GiB,2GiB"})
    assert (cfg.num_rounds, cfg.stale_profile) == (4, False)
    assert cfg.budget_for(1, {}) == 2 << 30
    assert cfg.budget_for(1, {"memory-budget": "3GiB"}) == 3 << 30
    assert RunConfig.from_mapping(cfg.to_flower()) == cfg


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("local-steps", 0, "local-steps must lie in [1, inf), got 0"),
        ("lr", float("nan"), "lr must lie in (0.0, inf), got nan"),
        ("lr", float("inf"), "lr must lie in (0.0, inf), got inf"),
        ("lora-rank", 0, "lora-rank must lie in [1, inf), got 0"),
        ("profile-bits", 3, "profile-bits must be one of (0, 4, 8), got 3"),
        ("eval-fraction", 1.5, "eval-fraction must lie in [0.0, 1.0), got 1.5"),
        ("eval-fraction", 1.0, "eval-fraction must lie in [0.0, 1.0), got 1.0"),
        ("num-clients", 0, "num-clients must lie in [1, inf), got 0"),
        ("samples-per-client", 0, "samples-per-client must lie in [1, inf), got 0"),
        ("batch-size", -1, "batch-size must lie in [1, inf), got -1"),
        ("seq-len", 1, "seq-len must lie in [2, inf), got 1"),
        ("round-timeout", 0, "round-timeout must lie in (0.0, inf), got 0.0"),
        ("eps-max", 1.5, "eps-max must lie in [0.0, 1.0], got 1.5"),
        ("eps-fixed", float("nan"), "eps-fixed must lie in [0, 1] (or be negative: off), got nan"),
        ("alpha", 0, "alpha must lie in (0.0, inf), got 0.0"),
        ("seed", -1, "seed must lie in [0, 9223372036854775807], got -1"),
        ("dtype", "int8", "dtype must name a floating-point torch dtype"),
        ("tokenizer", "gpt2", "tokenizer must be one of ('bytes', 'smollm2'), got 'gpt2'"),
        ("partition", "random", "partition must be one of ('domain', 'dirichlet', 'natural'), got 'random'"),
        ("data", "csv:x.csv", "data: data spec part 'csv:x.csv' of 'csv:x.csv' is not one of 'jsonl:PATH'"),
        ("budgets", "1GiB,lots", "budgets: cannot read 'lots' as a size"),
        ("aggregation", "median", "aggregation must be one of ('weighted', 'trimmed-mean', 'norm-clip')"),
        ("trim-fraction", 0.5, "trim-fraction must lie in [0.0, 0.5), got 0.5"),
        ("update-norm-bound", -1, "update-norm-bound must lie in [0.0, inf), got -1.0"),
    ],
)
def test_every_run_key_is_range_checked_before_anything_is_built(key, value, message):
    """These used to pass start-up; clients then failed every round (ZeroDivisionError, IndexError, ...)."""
    with pytest.raises(ConfigError) as e:
        RunConfig.from_mapping({key: value})
    assert message in str(e.value)


def test_seq_len_beyond_the_models_positions_fails_at_start(tmp_path, capsys):
    from flux_engine.federated.client import model_config

    with pytest.raises(ConfigError, match="seq-len 513 exceeds the model's max_position_embeddings 512"):
        model_config(RunConfig(seq_len=513))
    code, out = _cli(tmp_path, capsys, GOOD.replace("seq-len = 32", "seq-len = 4096"))
    assert code == 2 and "seq-len 4096 exceeds the model's max_position_embeddings 512" in out.err
    assert not (tmp_path / "flux-state").exists()


def test_cli_exits_nonzero_when_no_round_was_applied(tmp_path, capsys, monkeypatch):
    """Every client failing every round used to end ``flux-engine run`` with status 0."""
    from flux_engine.federated import client

    def broken(*args):
        raise RuntimeError("injected")

    monkeypatch.setattr(client, "handle_train", broken)
    code, out = _cli(tmp_path, capsys, GOOD + f'num-rounds = 2\nstate-dir = "{tmp_path / "st"}"\n')
    assert code == 1
    assert out.err.strip().endswith("\nflux-engine run: error: none of rounds 1..2 was applied (see the reasons above)")
    assert "client 1 dropped: failed: RuntimeError: injected" in out.out


# ---------------------------------------------------------------------------------------- strategy, fake clients


# Malformed train replies: how the fake client spoils its reply, and what the round report must say.
MALFORMED = {
    "update-not-arrays": (lambda c: c.__setitem__("update", ConfigRecord({"0/0/down_A": 1})), "record 'update' is a "
                          "ConfigRecord, not a ArrayRecord"),
    "count-string": (lambda c: c.__setitem__("token_counts", ConfigRecord({k: "many" for k in c["token_counts"]})),
                     "token count must be a non-negative int, got 'many'"),
    "count-bool": (lambda c: c.__setitem__("token_counts", ConfigRecord({k: True for k in c["token_counts"]})),
                   "token count must be a non-negative int, got True"),
    "metric-list": (lambda c: c.__setitem__("metrics", MetricRecord({"train-seconds": [1.0, 2.0]})),
                    "metric 'train-seconds' must be a number, got [1.0, 2.0]"),
    "metric-negative": (lambda c: c.__setitem__("metrics", MetricRecord({"merge-seconds": -1.0})),
                        "metric 'merge-seconds' must be finite and >= 0"),
    "utility-inf": (lambda c: c.__setitem__("utilities", ArrayRecord({"utilities": torch.full((L, E), float("inf"),
                    dtype=torch.float64)})), "utilities must be finite and >= 0"),
    "int-tensors": (lambda c: c.__setitem__("update", ArrayRecord({k: t.long() for k, t in
                    c["update"].to_torch_state_dict().items()})), "expected floating point"),
}  # fmt: skip


def _fake_client(behaviour, release=None):
    """A ClientApp answering like the real one; ``behaviour[partition]`` picks how its replies go wrong ("hang":
    train waits for the ``release`` event)."""
    app = ClientApp()
    seen = {}

    @app.query("profile")
    def query(msg, ctx):
        pid = int(ctx.node_config["partition-id"])
        u = torch.arange(L * E, dtype=torch.float64).view(L, E) * (pid + 1)
        content = RecordDict({"plan": ConfigRecord({"B_tune": pid + 2}), "utilities": ArrayRecord({"utilities": u})})
        if behaviour.get(pid) == "no-plan":
            del content["plan"]
        elif behaviour.get(pid) == "bad-budget":
            content["plan"] = ConfigRecord({"B_tune": "lots"})
        elif behaviour.get(pid) == "inf-utility":
            content["utilities"] = ArrayRecord({"utilities": torch.full((L, E), float("inf"), dtype=torch.float64)})
        return Message(content, reply_to=msg)

    @app.train()
    def train(msg, ctx):
        pid = int(ctx.node_config["partition-id"])
        kind = behaviour.get(pid, "good")
        keys = [tuple(k) for k in torch.nonzero(wire.ids_to_mask(msg.content["config"]["tuning"], L, E)).tolist()]
        seen.setdefault(pid, []).append((keys, sorted(wire.unpack_tensors(msg.content["global"]))))
        if kind == "raise":
            raise RuntimeError("out of memory")
        if kind == "hang":
            release.wait(60)  # a client that never answers in time (released at the end of the test)
        tensors = {k: {n: torch.full(sh, float(pid + 1)) for n, sh in SHAPES.items()} for k in keys}
        if kind == "wrong-shape":
            tensors[keys[0]]["down_A"] = torch.zeros(RANK + 1, TINY.moe_intermediate_size)
        elif kind == "missing":
            del tensors[keys[0]]["gate_up_B"]
        elif kind == "unassigned":
            free = next((l, e) for l in range(L) for e in range(E) if (l, e) not in keys)
            tensors[free] = {n: torch.zeros(sh) for n, sh in SHAPES.items()}
        counts = {k: 10 * (pid + 1) for k in tensors}
        u = torch.full((L, E), float("nan"), dtype=torch.float64)
        content = RecordDict(
            {
                "update": wire.pack_tensors(tensors),
                "token_counts": wire.pack_counts(counts),
                "utilities": ArrayRecord({"utilities": u}),
                "metrics": MetricRecord({"train-loss": 1.0 + pid}),
            }
        )
        if kind in MALFORMED:
            MALFORMED[kind][0](content)
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg, ctx):
        return Message(RecordDict({"metrics": MetricRecord({"eval-loss": 2.0, "num-tokens": 10})}), reply_to=msg)

    return app, seen


def _run_cfg(tmp_path, **kw):
    base = {
        "preset": "tiny",
        "num-rounds": 2,
        "num-clients": 4,
        "min-clients": 2,
        "lora-rank": RANK,
        "state-dir": str(tmp_path / "state"),
    }
    return RunConfig.from_mapping({**base, **kw})


def test_strategy_assigns_budgets_and_syncs_only_changes(tmp_path):
    app, seen = _fake_client({})
    # No evaluation: it would sync the clients between the rounds.
    state = run_local(_run_cfg(tmp_path, **{"eps-fixed": 1.0, "evaluate-every": 0}), client_app=app)
    for pid, rounds in seen.items():
        assert all(len(keys) == pid + 2 for keys, _ in rounds)  # B_tune = pid + 2 from the profile query
    # eps = 1: pure exploitation of the per-client utilities (largest last: layer 1, experts 7, 6, ...).
    assert seen[0][0][0] == [(1, 6), (1, 7)]
    assert seen[3][0][0] == [(1, 3), (1, 4), (1, 5), (1, 6), (1, 7)]
    # Round 1: nothing trained yet, nothing sent. Round 2: only what round 1 changed, and no more.
    assert all(rounds[0][1] == [] for rounds in seen.values())
    assert seen[0][1][1] == [(1, k) for k in range(3, 8)]
    # (1, 7): trained by all four clients, weights 10, 20, 30, 40 -> (1*10 + 2*20 + 3*30 + 4*40) / 100 = 3.
    assert torch.allclose(state.global_tensors[(1, 7)]["down_B"], torch.tensor(3.0))
    assert state.round == 2 and all(h["applied"] and not h["dropped"] for h in state.history)


def test_strategy_rejects_bad_updates_and_drops_failed_clients(tmp_path):
    app, _ = _fake_client({0: "good", 1: "wrong-shape", 2: "unassigned", 3: "raise"})
    state = run_local(_run_cfg(tmp_path, **{"num-rounds": 1, "min-clients": 1, "evaluate-every": 0}), client_app=app)
    report = state.history[0]
    assert report["accepted"] == ["1"] and report["applied"]
    dropped = report["dropped"]
    assert (
        dropped["2"].startswith("rejected, not averaged: client 2, expert")
        and "down_A has shape (3, 48)" in dropped["2"]
    )
    assert "trained experts it was not assigned" in dropped["3"]
    assert dropped["4"] == "failed: RuntimeError: out of memory"
    # Only client 1's experts moved, to its values.
    assert all(torch.all(ts["down_B"] == 1.0) for ts in state.global_tensors.values())
    # Dropped clients get the full state again next time.
    assert set(state.last_sync) == {"1"}


def test_strategy_min_clients_guard(tmp_path):
    app, _ = _fake_client({1: "missing", 2: "raise", 3: "raise"})
    state = run_local(_run_cfg(tmp_path, **{"num-rounds": 1, "min-clients": 2}), client_app=app)
    report = state.history[0]
    assert report["accepted"] == ["1"] and not report["applied"]
    assert "missing tensors ['gate_up_B']" in report["dropped"]["2"]
    assert state.global_tensors == {}


@pytest.mark.parametrize("kind", ["no-plan", "bad-budget", "inf-utility"])
def test_a_bad_first_reply_drops_that_client_only(tmp_path, kind):
    """A profile reply without its plan (or with a bad one) used to crash the server (KeyError: 'plan')."""
    app, seen = _fake_client({2: kind})
    state = run_local(_run_cfg(tmp_path, **{"num-rounds": 2, "evaluate-every": 0}), client_app=app)
    reason = {"no-plan": "lacks 'plan'", "bad-budget": "plan 'B_tune' must be an int, got 'lots'",
              "inf-utility": "utilities must be finite and >= 0"}[kind]  # fmt: skip
    for h in state.history:
        assert h["applied"] and h["accepted"] == ["1", "2", "4"]
        assert list(h["dropped"]) == ["3"] and h["dropped"]["3"].startswith("profile reply rejected: ")
        assert reason in h["dropped"]["3"]
    assert 2 not in seen and "3" not in state.budgets  # never trained; asked again each round


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_every_reply_field_is_validated_before_use(tmp_path, kind):
    app, _ = _fake_client({1: kind})
    state = run_local(_run_cfg(tmp_path, **{"num-rounds": 1, "evaluate-every": 0}), client_app=app)
    report = state.history[0]
    assert report["applied"] and report["accepted"] == ["1", "3", "4"]
    assert list(report["dropped"]) == ["2"] and report["dropped"]["2"].startswith("rejected, not averaged: client 2")
    assert MALFORMED[kind][1] in report["dropped"]["2"]
    assert all(torch.isfinite(t).all() for ts in state.global_tensors.values() for t in ts.values())


def test_round_timeout_leaves_a_hanging_client_behind(tmp_path):
    """``round-timeout`` holds in the in-process grid (``flux-engine run`` / ``demo``): it used to wait forever."""
    import threading

    release = threading.Event()
    app, _ = _fake_client({1: "hang"}, release)
    t0 = time.monotonic()
    try:
        run = _run_cfg(tmp_path, **{"num-rounds": 2, "round-timeout": 1.0, "evaluate-every": 1})
        state = run_local(run, client_app=app)
    finally:
        release.set()
    assert time.monotonic() - t0 < 30
    for h in state.history:
        assert h["applied"] and h["accepted"] == ["1", "3", "4"] and "eval_loss" in h
        assert h["dropped"] == {"2": "no reply before the round timeout"}


def test_a_lost_supernode_is_dropped_once_and_the_run_goes_on(tmp_path, monkeypatch):
    """Deployment: for a lost SuperNode the SuperLink replies an error of its own (source: the SuperLink's node id,
    1 here as in Flower; ``reply_to`` the lost node's message). It used to count as a phantom client "1" next to the
    lost one, and a round with fewer than ``min-clients`` connected ended the run. Now: the error is the lost node's,
    a round without enough clients changes nothing, and the run continues once the node is back."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

    from flux_engine.federated import simulation

    assert SUPERLINK_NODE_ID == 1
    lost, gone = set(), set()

    class Deployment(simulation.LocalGrid):
        def get_node_ids(self):
            return [n for n in self.contexts if n not in gone]

    app, _ = _fake_client({})

    def superlink(msg, ctx):
        if ctx.node_id in lost:
            return create_message_error_unavailable_res_message(msg.metadata, "node_unavail")
        return app(msg, ctx)

    def on_round(report):
        # Node 4 is lost during round 2, unlisted in round 3, back for round 4.
        {1: lambda: lost.add(4), 2: lambda: gone.add(4), 3: lambda: (lost.clear(), gone.clear()),
         4: lambda: None}[report["round"]]()  # fmt: skip

    monkeypatch.setattr(simulation, "LocalGrid", Deployment)
    run = _run_cfg(tmp_path, **{"num-rounds": 4, "min-clients": 3, "round-timeout": 1.0})
    state = run_local(run, client_app=superlink, on_round=on_round)
    h = {r["round"]: r for r in state.history}
    assert h[1]["accepted"] == ["1", "2", "3", "4"] and h[1]["dropped"] == {}
    assert h[2]["applied"] and h[2]["accepted"] == ["1", "2", "3"]
    assert list(h[2]["dropped"]) == ["4"] and h[2]["dropped"]["4"].startswith("failed: ")
    assert h[2]["eval_failed"].keys() == {"4"}
    assert h[3]["applied"] and h[3]["accepted"] == ["1", "2", "3"]  # min-clients still met without node 4
    assert h[4]["applied"] and h[4]["accepted"] == ["1", "2", "3", "4"]
    assert state.round == 4


def test_a_round_with_too_few_clients_changes_nothing_and_the_run_goes_on(tmp_path, monkeypatch):
    from flux_engine.federated import simulation

    class TwoLeft(simulation.LocalGrid):
        def get_node_ids(self):
            return [1, 2] if self.rounds_seen == 1 else list(self.contexts)

    TwoLeft.rounds_seen = 0

    def on_round(report):
        TwoLeft.rounds_seen += 1

    app, _ = _fake_client({})
    monkeypatch.setattr(simulation, "LocalGrid", TwoLeft)
    run = _run_cfg(tmp_path, **{"num-rounds": 3, "min-clients": 3, "round-timeout": 0.5, "evaluate-every": 0})
    state = run_local(run, client_app=app, on_round=on_round)
    assert [h["applied"] for h in state.history] == [True, False, True]
    assert state.history[1]["skipped"] == "only 2 clients connected, min-clients is 3"


# ------------------------------------------------------------------------------------------------ end to end


# Budgets for the tiny model giving B_tune 2 / 4 / 5 (with 3 merged experts each; see
# budget.plan_budget): full tuning costs more per expert.
BUDGETS = {"lora": "2250KiB,2365KiB,2420KiB", "full": "2450KiB,2755KiB,2910KiB"}


def _tiny_run(tmp_path, mode, **kw):
    cfg = {
        "preset": "tiny", "mode": mode, "num-clients": 3, "min-clients": 2, "budgets": BUDGETS[mode], "workspace": "0",
        "lora-rank": 4, "batch-size": 4, "seq-len": 32, "samples-per-client": 12, "local-steps": 2,
        "lr": 1e-2, "state-dir": str(tmp_path / "state"),
    }  # fmt: skip
    return RunConfig.from_mapping({**cfg, **kw})


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_three_clients_two_rounds_and_resume(tmp_path, mode):
    pytest.importorskip("flux_engine.training")
    state = run_local(_tiny_run(tmp_path, mode, **{"num-rounds": 2}))
    assert state.round == 2
    assert [h["accepted"] for h in state.history] == [["1", "2", "3"]] * 2
    assert all(h["applied"] and h["experts_changed"] > 0 and "eval_loss" in h for h in state.history)
    names = set(expert_shapes(TINY.hidden_size, TINY.moe_intermediate_size, 4 if mode == "lora" else None))
    assert state.global_tensors and all(set(ts) == names for ts in state.global_tensors.values())
    assert state.budgets == {"1": 2, "2": 4, "3": 5}
    # Utilities measured in training replaced the round-1 frequencies for trained experts.
    assert len(state.utilities.tables) == 3
    # A restarted server continues after round 2; restarted clients get the full state.
    resumed = run_local(_tiny_run(tmp_path, mode, resume=True, **{"num-rounds": 3}))
    assert resumed.round == 3 and len(resumed.history) == 3
    assert resumed.history[-1]["accepted"] == ["1", "2", "3"]


# ------------------------------------------------------------------------------------------------ app config and CLI


def test_pyproject_flower_config_matches_run_config():
    import tomllib

    from flwr.common.config import validate_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    ok, errors, _ = validate_config(project, check_module=True, project_dir=root)
    assert ok, errors
    assert RunConfig.from_mapping(project["tool"]["flwr"]["app"]["config"]) == RunConfig()
    assert project["project"]["scripts"]["flux-engine"] == "flux_engine.cli:main"


def _cli(tmp_path, capsys, text, *extra):
    from flux_engine.cli import main

    path = tmp_path / "run.toml"
    path.write_text(text)
    code = main(["run", "--config", str(path), *extra])
    return code, capsys.readouterr()


GOOD = (
    'budgets = "2250KiB,2365KiB,2420KiB"\nworkspace = "0"\nseq-len = 32\nlora-rank = 4\nlocal-steps = 1\n'
    "samples-per-client = 8\n"
)


@pytest.mark.parametrize(
    "text, message",
    [
        ('preset = "nope"\n', "unknown preset 'nope'; known presets: "),
        ("num-round = 3\n", "unknown config key 'num-round'; valid keys: "),
        ('memory-budget = "1MiB"\n', "client 0: memory budget 1.00 MiB is "),
        ('data = "jsonl:{bad}"\n' + GOOD, "line 1: field 'domain' is missing or not a string"),
        ("x = [", "not valid TOML"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, capsys, text, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "task": "t"}\n')
    # A checkpoint already in the state dir, as when a run is resumed with a broken config: it must survive.
    state_dir = tmp_path / "flux-state"
    _state().save(str(state_dir))
    before = _tree(tmp_path)
    with_state = text if text == "x = [" else text + f'state-dir = "{state_dir}"\n'
    path = tmp_path / "run.toml"
    for args in ([], ["--resume"]):
        code, out = _cli(tmp_path, capsys, with_state.replace("{bad}", str(bad)), *args)
        assert code == 2
        assert out.err.count("\n") == 1 and out.err.startswith("flux-engine run: error: ") and message in out.err
        assert _tree(tmp_path) == {**before, path.relative_to(tmp_path): path.read_bytes()}


def test_cli_run_resume_and_truncated_checkpoint(tmp_path, capsys):
    pytest.importorskip("flux_engine.training")
    text = GOOD + f'num-rounds = 1\nstate-dir = "{tmp_path / "st"}"\n'
    code, out = _cli(tmp_path, capsys, text)
    assert code == 0 and "round" in out.out and "server state:" in out.out
    code, out = _cli(tmp_path, capsys, text)
    assert code == 2 and "already holds a server checkpoint: pass --resume" in out.err
    code, out = _cli(tmp_path, capsys, text.replace("num-rounds = 1", "num-rounds = 2"), "--resume")
    assert code == 0 and "(round 2)" in out.out
    state = tmp_path / "st" / "state-r00002.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    before = _tree(tmp_path / "st")
    code, out = _cli(tmp_path, capsys, text, "--resume")
    assert code == 2 and out.err.count("\n") == 1 and "state-r00002.safetensors is damaged" in out.err
    assert _tree(tmp_path / "st") == before  # the damaged file is kept as it was (for a post-mortem), nothing new


def test_clients_restarted_every_message_keep_their_global_copy(tmp_path):
    """Under flower-supernode each message runs in a fresh ClientApp process: only the Flower context survives."""
    pytest.importorskip("flux_engine.training")
    from flux_engine.federated import client

    real = client.make_client_app()

    def fresh_process(msg, ctx):
        client._RUNTIMES.clear()
        return real(msg, ctx)

    state = run_local(_tiny_run(tmp_path, "lora", **{"num-rounds": 3, "evaluate-every": 2}), client_app=fresh_process)
    assert [h["accepted"] for h in state.history] == [["1", "2", "3"]] * 3


@pytest.mark.slow
def test_flower_ray_simulation_runtime(tmp_path):
    """The same apps under Flower's Simulation Runtime (Ray backend, ``flwr[simulation]``; ~20 s on 2 cores)."""
    pytest.importorskip("ray")
    pytest.importorskip("flux_engine.training")
    from flux_engine.federated.simulation import run_ray

    cfg = _tiny_run(tmp_path, "lora", **{"num-rounds": 2, "round-timeout": 300})
    run_ray(
        cfg,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": 2, "include_dashboard": False},
        },
    )
    state = ServerState.load(cfg.state_dir)
    # Flower's simulation gives nodes random ids: three distinct clients, all accepted in both rounds.
    assert [len(h["accepted"]) for h in state.history] == [3, 3] and len(state.budgets) == 3
    assert all(h["applied"] and not h["dropped"] and "eval_loss" in h for h in state.history)


# ------------------------------------------------------------------------------------------------ reliability


# Four tiny-model clients with B_tune 2 / 4 / 5 / 2 (the BUDGETS above, the first repeated).
KILL_RUN = (
    GOOD.replace('"2250KiB,2365KiB,2420KiB"', '"2250KiB,2365KiB,2420KiB,2250KiB"')
    .replace("local-steps = 1", "local-steps = 3")
    + "num-clients = 4\nnum-rounds = 4\n"
)


def _cli_process(config, *extra) -> subprocess.Popen:
    # One thread in every run: the reference and the resumed run must compute alike, bit for bit.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "flux_engine.cli", "run", "--config", str(config), *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_server_killed_after_round_2_resumes_to_the_same_weights(tmp_path):
    """SIGKILL the whole federation (server and in-process clients) once round 2's checkpoint exists; ``--resume``
    ends with exactly the weights of an uninterrupted run with the same seed.

    Exact because every round's randomness comes from the checkpointed state (client sampling RNG) or from
    (seed, round, expert) (roles, LoRA init, merge clustering), a restarted client is sent the full global state,
    and, with the default settings (stale profiling in the background), a restarted client recomputes the profile
    it owes the next round from the global tensors it saved when that profile was due (``flux_round``)."""
    pytest.importorskip("flux_engine.training")
    ref_cfg, cfg = tmp_path / "ref.toml", tmp_path / "run.toml"
    ref_cfg.write_text(KILL_RUN + f'state-dir = "{tmp_path / "ref"}"\n')
    cfg.write_text(KILL_RUN + f'state-dir = "{tmp_path / "st"}"\n')
    reference = _cli_process(ref_cfg)
    victim = _cli_process(cfg)
    manifest = tmp_path / "st" / "latest.json"
    deadline = time.monotonic() + 120
    while not (manifest.exists() and json.loads(manifest.read_text())["round"] >= 2):
        assert victim.poll() is None, f"the run ended before round 2: {victim.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    killed_at = ServerState.load(str(tmp_path / "st")).round
    assert killed_at in (2, 3), "killed too late to test anything"
    out, err = reference.communicate(timeout=120)
    assert reference.returncode == 0, err[-2000:]
    resumed = _cli_process(cfg, "--resume")
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err[-2000:]
    assert "(round 4)" in out
    a, b = ServerState.load(str(tmp_path / "ref")), ServerState.load(str(tmp_path / "st"))
    assert a.round == b.round == 4 and len(b.history) == 4
    assert sorted(a.global_tensors) == sorted(b.global_tensors)
    for key, tensors in a.global_tensors.items():
        for name, t in tensors.items():
            assert torch.equal(t, b.global_tensors[key][name]), (key, name)
    assert [h["accepted"] for h in a.history] == [h["accepted"] for h in b.history]


def test_a_client_failing_every_round_is_dropped_and_reported(tmp_path):
    """One of four real clients raises in every training round: each round completes with the other three, and
    every round's report names the failed client and its error."""
    pytest.importorskip("flux_engine.training")
    from flux_engine.federated.client import make_client_app

    real = make_client_app()

    def flaky_node(msg, ctx):
        # A ClientApp that fails on partition 2, as a node whose training runs out of memory would.
        if ctx.node_config["partition-id"] == 2 and msg.metadata.message_type == "train":
            raise MemoryError("CUDA out of memory (injected)")
        return real(msg, ctx)

    reports = []
    budgets = BUDGETS["lora"] + ",2250KiB"
    run = _tiny_run(tmp_path, "lora", **{"num-clients": 4, "num-rounds": 3, "budgets": budgets})
    state = run_local(run, client_app=flaky_node, on_round=reports.append)
    assert [r["round"] for r in reports] == [1, 2, 3]
    for h in state.history:
        assert h["applied"] and h["accepted"] == ["1", "2", "4"]
        assert h["dropped"] == {"3": "failed: MemoryError: CUDA out of memory (injected)"}
        assert "eval_loss" in h  # evaluation still runs on every client, the failed one included
    assert state.global_tensors


@pytest.mark.parametrize("attack", ["huge-values", "huge-token-count"])
def test_one_hostile_client_of_four_cannot_break_the_federation(tmp_path, attack):
    """Client 4 trains honestly but sends finite, huge values (1e30) or claims 2**62 tokens for every expert. Both
    used to be averaged in: the global model went NaN (every later update then rejected) or became client 4's. Its
    update is rejected with the reason, and the run ends exactly where the three honest clients take it: the same
    global tensors and held-out losses as a run where client 4's training fails."""
    pytest.importorskip("flux_engine.training")
    from flux_engine.federated.client import make_client_app

    real = make_client_app()

    def federation(fourth):
        def app(msg, ctx):
            if ctx.node_config["partition-id"] == 3 and msg.metadata.message_type == "train":
                return fourth(msg, ctx)
            return real(msg, ctx)

        return app

    def hostile(msg, ctx):
        reply = real(msg, ctx)
        if attack == "huge-values":
            tensors = reply.content["update"].to_torch_state_dict()
            reply.content["update"] = ArrayRecord({k: torch.full_like(t, 1e30) for k, t in tensors.items()})
        else:
            reply.content["token_counts"] = ConfigRecord({k: 2**62 for k in reply.content["token_counts"]})
        return reply

    def absent(msg, ctx):
        raise RuntimeError("offline")

    runs = {}
    for name, fourth in (("hostile", hostile), ("honest", absent)):
        cfg = _tiny_run(tmp_path / name, "lora", **{"num-clients": 4, "num-rounds": 3,
                                                     "budgets": BUDGETS["lora"] + ",2360KiB"})  # fmt: skip
        runs[name] = run_local(cfg, client_app=federation(fourth))
    hostile_run, honest = runs["hostile"], runs["honest"]
    reason = "over 10x its reference" if attack == "huge-values" else "token count 4611686018427387904"
    for h in hostile_run.history:
        assert h["applied"] and h["accepted"] == ["1", "2", "3"]
        assert list(h["dropped"]) == ["4"] and reason in h["dropped"]["4"], h["dropped"]
        assert math.isfinite(h["eval_loss"])
    assert [h["eval_loss"] for h in hostile_run.history] == [h["eval_loss"] for h in honest.history]
    assert sorted(hostile_run.global_tensors) == sorted(honest.global_tensors)
    for key, tensors in honest.global_tensors.items():
        for name, t in tensors.items():
            assert torch.equal(hostile_run.global_tensors[key][name], t), (key, name)


def _tree(path) -> dict:
    """Every file under ``path`` with its bytes (to check that a failed command changed nothing)."""
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("explore_mode", ["zo", "train"])
def test_exploration_experts_zeroth_order_or_trained(tmp_path, explore_mode):
    """"zo": exploration experts are not trained, and the client reports their forward-only (SPSA) utility with the
    trained experts' Eq. 3 utilities; "train": they are trained with the exploitation experts."""
    pytest.importorskip("flux_engine.training")
    from flux_engine.federated.client import make_client_app

    real = make_client_app()
    seen = []

    def spy(msg, ctx):
        reply = real(msg, ctx)
        if msg.metadata.message_type == "train":
            seen.append((msg.content["config"], reply.content))
        return reply

    run = _tiny_run(tmp_path, "lora", **{"num-rounds": 1, "eps-fixed": 0.5, "explore-mode": explore_mode})
    state = run_local(run, client_app=spy)
    assert len(seen) == 3 and state.history[0]["accepted"] == ["1", "2", "3"]
    for cfg, reply in seen:
        tuning, explore = list(cfg["tuning"]), list(cfg["explore"])
        trained = sorted(l * E + e for l, e in wire.unpack_tensors(reply["update"]))
        u = reply["utilities"].to_torch_state_dict()["utilities"].flatten()
        assert trained == sorted(tuning) and torch.isfinite(u[tuning]).all()
        if explore_mode == "train":
            assert explore == []
            continue
        # B_tune 2 / 4 / 5 at eps 0.5: 1 / 2 / 3 trained and 1 / 2 / 2 exploration experts, disjoint.
        assert len(explore) == {1: 1, 2: 2, 3: 2}[len(tuning)] and not set(explore) & set(tuning)
        assert torch.isfinite(u[explore]).all() and (u[explore] >= 0).all()
        assert torch.isnan(u[[i for i in range(L * E) if i not in tuning + explore]]).all()


def test_six_rounds_train_every_expert(tmp_path):
    """4 clients x B_tune 4 on the tiny preset's 2 x 8 experts: with exploration experts trained like the others
    (every slot learns), every expert of every MoE layer is trained at least once within 6 rounds."""
    budget = BUDGETS["lora"].split(",")[1]  # B_tune 4
    run = _tiny_run(tmp_path, "lora", **{"num-clients": 4, "min-clients": 4, "num-rounds": 6, "budgets": budget,
                                         "evaluate-every": 0, "local-steps": 1})  # fmt: skip
    state = run_local(run)
    assert state.budgets == {c: 4 for c in ("1", "2", "3", "4")}
    assert all(h["applied"] for h in state.history)
    assert sorted(state.global_tensors) == [(l, e) for l in range(L) for e in range(E)]
