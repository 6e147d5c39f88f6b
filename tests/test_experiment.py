"""``flux-engine experiment``: Flux, the four baselines and the ablations through the same Flower apps on the tiny
model (two clients, two multiple-choice domains), the time model fed from the server's history, and the CSV / PNG /
markdown outputs. The measured experiment (SmolLM2, an hour) is bench/results/tta.md."""

import csv
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("flwr")  # the federated layer runs on Flower; the GPU image has none

from flux_engine import experiment, timemodel  # noqa: E402
from flux_engine.data import encode_continuation, lm_batches, write_jsonl  # noqa: E402
from flux_engine.federated.client import ByteTokenizer  # noqa: E402
from flux_engine.federated.config import ConfigError, RunConfig  # noqa: E402
from test_demo import _records  # noqa: E402  (two multiple-choice domains a byte-level model can learn)

pytest.importorskip("flux_engine.training")

BASE = """
preset = "tiny"
num-clients = 2
min-clients = 2
num-rounds = 2
budgets = "2400KiB,2560KiB"
workspace = "0"
lora-rank = 4
batch-size = 4
seq-len = 32
samples-per-client = 8
local-steps = 2
lr = 1e-2
data = "jsonl:{data}"
partition = "domain"
eval-records = 4
loss-on = "answer"
fmd-staging-experts = 2
state-dir = "{state}"
"""


@pytest.fixture
def config(tmp_path):
    data = tmp_path / "mc.jsonl"
    write_jsonl(data, _records())

    def make(experiment: str) -> str:
        path = tmp_path / "exp.toml"
        text = BASE.format(data=data, state=tmp_path / "state") + "\n[experiment]\n" + experiment
        path.write_text(text)
        return str(path)

    return make


def test_answer_only_labels_cover_the_answer_and_eos():
    tok = ByteTokenizer()
    recs = _records(4)
    batch = next(lm_batches(recs, tok, seq_len=32, batch_size=4, seed=0, packed=False, answer_only=True))
    full = next(lm_batches(recs, tok, seq_len=32, batch_size=4, seed=0, packed=False))
    for row in range(4):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        n = int(batch["attention_mask"][row].sum())
        targets = [int(t) for t in labels[:n] if t != -100]
        # The record this row holds: the one whose context + answer tokens it is.
        head = ids[: n - len(targets)].tolist()
        rec = next(r for r in recs if encode_continuation(tok, r.context, r.answer)[0] == head)
        ctx, ans = encode_continuation(tok, rec.context, rec.answer)
        assert targets == ans + [tok.eos_token_id] and ids[:n].tolist() == ctx + ans + [tok.eos_token_id]
        assert int((full["labels"][row] != -100).sum()) == n  # the default loss covers every token


def test_experiment_runs_every_method_and_writes_the_report(config, tmp_path):
    pytest.importorskip("matplotlib")
    from flux_engine.cli import main
    from flux_engine.federated.state import ServerState

    path = config(f"""
methods = ["flux", "fedavg-lora", "fmd", "fmq", "fmes"]
no-stale-profiling = true
no-exploration = true
warm-start = false
network-gbps = 0.001
csv = "{tmp_path / 'tta.csv'}"
markdown = "{tmp_path / 'tta.md'}"
""")
    assert main(["experiment", "--config", path]) == 0
    names = ["flux", "fedavg-lora", "fmd", "fmq", "fmes", "flux-no-stale", "flux-no-exploration"]
    points = timemodel.read_csv(tmp_path / "tta.csv")
    assert sorted({p.method for p in points}) == sorted(names)
    for name in names:
        mine = sorted((p for p in points if p.method == name), key=lambda p: p.round)
        assert [p.round for p in mine] == [0, 1, 2] and mine[0].time == 0.0 < mine[1].time < mine[2].time
        assert set(mine[2].accuracy) == {"alpha", "beta"} and mine[2].loss > 0
    assert (tmp_path / "tta.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (tmp_path / "tta.md").read_text()
    assert "target = 95% of the best final mean held-out accuracy" in text and "time model" in text
    assert "time to a held-out LM loss target" in text and "target = held-out loss <=" in text
    for name in names:
        assert f"| {name} |" in text

    state = {n: ServerState.load(str(tmp_path / "state" / "tiny" / n)) for n in names}
    clients = {n: [h["clients"] for h in state[n].history] for n in names}
    for n in names:
        for rnd in clients[n]:
            assert sorted(rnd) == ["1", "2"]
            for t in rnd.values():
                assert t["train_seconds"] > 0 and t["upload_bytes"] > 0
    # Downloads: nothing trained before round 1; round 2 sends what round 1 changed (fp32 LoRA factors).
    for n in names:
        assert all(t["download_bytes"] == 0 for t in clients[n][0].values())
        changed = [v for v in state[n].global_tensors.values()]
        assert all(0 < t["download_bytes"] <= timemodel.tensor_bytes(changed, 4) for t in clients[n][1].values())
    # Profiling: Flux charges the first-contact profile to round 1 (nothing to hide behind); round 2's stale profile
    # is of round 1's global model, the base itself, so it is that profile again and costs nothing; without stale
    # profiling each new global model is profiled on the critical path; FedAvg-LoRA and FMQ never profile, FMD and
    # FMES once (round 1).
    for t in clients["flux"][0].values():
        assert t["profile_seconds"] > 0 and not t["profile_stale"]
    for t in clients["flux"][1].values():
        assert t["profile_seconds"] == 0 and t["profile_stale"]
    no_stale = [t for r in clients["flux-no-stale"] for t in r.values()]
    assert all(t["profile_seconds"] > 0 and not t["profile_stale"] for t in no_stale)
    for n in ("fedavg-lora", "fmq"):
        assert all(t["profile_seconds"] == 0 for r in clients[n] for t in r.values())
    for n in ("fmd", "fmes"):
        assert all(t["profile_seconds"] > 0 for t in clients[n][0].values())
        assert all(t["profile_seconds"] == 0 for t in clients[n][1].values())
    # Only FMD moves experts over PCIe (the tiny model does not fit these budgets whole).
    assert all(t["pcie_bytes"] > 0 for r in clients["fmd"] for t in r.values())
    assert all(t["pcie_bytes"] == 0 for n in names if n != "fmd" for r in clients[n] for t in r.values())
    # FedAvg-LoRA trains (and uploads) every expert its data reaches; Flux only its tuning experts.
    flux_up = max(t["upload_bytes"] for r in clients["flux"] for t in r.values())
    assert flux_up < min(t["upload_bytes"] for r in clients["fedavg-lora"] for t in r.values())

    # The simulated round is the slowest client's sum of terms plus the aggregation (the time model), and the CSV's
    # times are those rounds' ends.
    from flux_engine.experiment import client_rounds

    tm = timemodel.TimeModel(network_bps=0.001 * timemodel.GBIT)
    rounds = tm.simulate(client_rounds(state["flux"]))
    mine = sorted((p for p in points if p.method == "flux"), key=lambda p: p.round)
    assert [p.time for p in mine[1:]] == pytest.approx([r.end for r in rounds])
    slow = max(rounds[1].clients, key=lambda c: c.total)
    assert rounds[1].duration == pytest.approx(slow.total + rounds[1].aggregation)
    assert slow.download == pytest.approx(8 * clients["flux"][1][str(slow.client)]["download_bytes"] / 1e6)

    # Reruns need --resume, which reads finished methods back instead of training again.
    assert main(["experiment", "--config", path]) == 2
    before = (tmp_path / "tta.csv").read_text()
    assert main(["experiment", "--config", path, "--resume"]) == 0
    assert (tmp_path / "tta.csv").read_text() == before


def test_regimes_report_lines_and_png(config, tmp_path):
    pytest.importorskip("matplotlib")
    from flux_engine.cli import main

    path = config(f"""
methods = ["flux", "fedavg-lora", "fmq", "fmes"]
regimes = ["deepseek-moe-16b@24GiB:rtx4090"]
seeds = [0]
warm-start = false
markdown = "{tmp_path / 'tta.md'}"
records = "{tmp_path / 'runs'}"
""")
    assert main(["experiment", "--config", path]) == 0
    text = (tmp_path / "tta.md").read_text()
    # The runs that finished in this call are counted among the records it wrote.
    assert re.search(r"^- finished runs \(records in `.*`\): 4 on ", text, re.M), text
    lines = re.findall(r"^speedup vs (?:fmd|fmq|fmes): (?:not measured|\d+\.\d\d)$", text, re.M)
    assert len(lines) == 3, text
    assert "](tta-deepseek-moe-16b.png)" in text and "Not measured yet" not in text
    # Two rounds: the second half is round 2, so both summaries of a method hold its last accuracy.
    finals = re.search(r"^Final mean accuracy, median over finished seeds: (.*)$", text, re.M)
    late = re.search(r"^Mean accuracy over rounds 2-2, median over finished seeds: (.*)$", text, re.M)
    assert late.group(1) == finals.group(1)
    assert re.search(r"^- mean accuracy over rounds 2-2 .*flux minus fedavg-lora: seed 0 [-+]\d+\.\d points", text,
                     re.M)
    assert (tmp_path / "tta-deepseek-moe-16b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Every finished run left a record; from the records alone (no state-dir: nothing is trained) --resume
    # writes the same figures.
    records = sorted(p.relative_to(tmp_path / "runs").as_posix() for p in (tmp_path / "runs").rglob("*.json"))
    assert records == ["tiny/deepseek-moe-16b@24GiB/seed0/flux.json", "tiny/deepseek-moe-16b@24GiB/seed0/fmes.json",
                       "tiny/shared/seed0/fedavg-lora.json", "tiny/shared/seed0/fmq.json"]  # fmt: skip
    shutil.rmtree(tmp_path / "state")
    assert main(["experiment", "--config", path, "--resume"]) == 0
    again = (tmp_path / "tta.md").read_text()
    assert re.findall(r"^speedup vs .*$", again, re.M) == lines and not (tmp_path / "state").exists()

    # A run key newer than a record reads as its default there: the record still stands while the key is unset.
    for p in (tmp_path / "runs").rglob("*.json"):
        rec = json.loads(p.read_text())
        p.write_text(json.dumps(dict(rec, run={k: v for k, v in rec["run"].items() if k != "eval-precision"})))
    assert main(["experiment", "--config", path, "--resume"]) == 0
    assert re.findall(r"^speedup vs .*$", (tmp_path / "tta.md").read_text(), re.M) == lines
    (tmp_path / "exp.toml").write_text((tmp_path / "exp.toml").read_text().replace("lr = 1e-2", "lr = 1e-2\n"
                                                                                   "eval-precision = \"bf16\""))
    with pytest.raises(ConfigError, match=r"other run keys \(eval-precision 'fp32' there, 'bf16' here\)"):
        experiment.run_experiment(path, resume=True)
    (tmp_path / "exp.toml").write_text((tmp_path / "exp.toml").read_text().replace("\neval-precision = \"bf16\"", ""))
    # A record never stands for a run with other learning keys.
    (tmp_path / "exp.toml").write_text((tmp_path / "exp.toml").read_text().replace("lr = 1e-2", "lr = 2e-2"))
    with pytest.raises(ConfigError, match=r"flux\.json was trained with other run keys \(lr 0\.01 there, 0\.02 here\)"):
        experiment.run_experiment(path, resume=True)
    # Nor one trained with another structure than the memory plans now derive from its structure-from.
    (tmp_path / "exp.toml").write_text((tmp_path / "exp.toml").read_text().replace("lr = 2e-2", "lr = 1e-2"))
    record = tmp_path / "runs" / "tiny" / "deepseek-moe-16b@24GiB" / "seed0" / "flux.json"
    kept = json.loads(record.read_text())
    assert kept["structure"] and kept["structure"]["B_tune"] >= 1
    # A record holds its own method's counts; one written with every method's counts is read by its method's.
    fmes_path = record.parent / "fmes.json"
    fmes = json.loads(fmes_path.read_text())
    assert set(kept["structure"]) == {"B_tune", "B_non"} and set(fmes["structure"]) == {"kept"}
    fmes_path.write_text(json.dumps(dict(fmes, structure=dict(kept["structure"], B_tune=999, **fmes["structure"]))))
    experiment.run_experiment(path, resume=True)
    record.write_text(json.dumps(dict(kept, structure=dict(kept["structure"], B_tune=kept["structure"]["B_tune"] + 1))))
    with pytest.raises(ConfigError, match=r"flux\.json was trained with the structure .* \(the memory plans changed\)"):
        experiment.run_experiment(path, resume=True)


def test_workers_skip_runs_another_holds(config, tmp_path):
    """A run whose lock another worker holds is left to it: this worker trains nothing of it."""
    path = config("""
methods = ["flux", "fedavg-lora"]
regimes = ["deepseek-moe-16b@24GiB:rtx4090"]
seeds = [0]
warm-start = false
""")
    raw, exp = experiment.load(path)
    runs = experiment.learning_runs(raw, exp)
    held = []
    for lr in runs[1:]:
        os.makedirs(os.path.dirname(lr.run.state_dir), exist_ok=True)
        f = open(lr.run.state_dir + ".lock", "a")
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.append(f)
    assert experiment.advance(runs, exp, minutes=60.0) == 2  # the first run's two rounds, no more
    assert [os.path.exists(lr.run.state_dir) for lr in runs] == [True] + [False] * (len(runs) - 1)
    for f in held:
        f.close()


def test_baseline_global_models(config, tmp_path):
    """FMQ evaluates its adapters on the int4 experts and FMES on its kept experts: their round-0 held-out loss
    differs from the full-precision model's, which FedAvg-LoRA and FMD share with Flux."""
    from flux_engine.experiment import load, method_run
    from flux_engine.federated.simulation import run_local

    raw, exp = load(config("warm-start = false\nmethods = [\"flux\", \"fedavg-lora\", \"fmd\", \"fmq\", \"fmes\"]\n"))
    run = RunConfig.from_mapping({**raw, "num-rounds": 1})
    loss = {}
    for m in exp.method_names():
        state = run_local(method_run(run, m, exp, str(tmp_path / "s0" / m)))
        loss[m] = state.baseline["eval_loss"]
    assert loss["fedavg-lora"] == pytest.approx(loss["flux"]) and loss["fmd"] == pytest.approx(loss["flux"])
    assert loss["fmq"] != pytest.approx(loss["flux"]) and loss["fmes"] != pytest.approx(loss["flux"])


def test_flux_tuning_every_expert_is_fedavg_lora(config, tmp_path):
    """With a budget that tunes every expert (nothing left to merge), Flux's round is FedAvg-LoRA's: the same losses
    and the same global adapters, round for round. What Flux changes is only what its budget and roles change."""
    from flux_engine.experiment import load, method_run
    from flux_engine.federated.simulation import run_local

    raw, exp = load(config("warm-start = false\nmethods = [\"flux\", \"fedavg-lora\"]\n"))
    run = RunConfig.from_mapping({**raw, "num-rounds": 3, "budgets": "64MiB,64MiB"})
    flux, ref = (run_local(method_run(run, m, exp, str(tmp_path / m))) for m in ("flux", "fedavg-lora"))
    assert flux.budgets == {"1": 16, "2": 16}  # B_tune = L x E of the tiny model
    assert [h["train_loss"] for h in flux.history] == [h["train_loss"] for h in ref.history]
    # The evaluation may fold the adapters in or keep them attached: equal up to float rounding.
    assert [h["eval_loss"] for h in flux.history] == pytest.approx([h["eval_loss"] for h in ref.history], rel=1e-6)
    assert flux.global_tensors.keys() == ref.global_tensors.keys()
    for key, tensors in flux.global_tensors.items():
        assert all(torch.equal(t, ref.global_tensors[key][name]) for name, t in tensors.items()), key


def test_config_errors(config, tmp_path):
    from flux_engine.cli import load_config_file, main
    from flux_engine.experiment import ExperimentConfig, load

    path = config('methods = ["flux"]\n')
    # run --config reads the run keys of an experiment file and ignores its [experiment] table.
    assert "experiment" not in load_config_file(path) and RunConfig.from_mapping(load_config_file(path))
    assert load(path)[1].methods == ["flux"]
    with pytest.raises(ConfigError, match="unknown key 'method'; valid keys: methods"):
        ExperimentConfig.from_mapping({"method": ["flux"]})
    with pytest.raises(ConfigError, match="methods: expected list, got 'flux'"):
        ExperimentConfig.from_mapping({"methods": "flux"})
    with pytest.raises(ConfigError, match="no-exploration: expected bool"):
        ExperimentConfig.from_mapping({"no-exploration": 1})
    assert ExperimentConfig.from_mapping({"network-gbps": 10}).network_gbps == 10.0
    with pytest.raises(ConfigError, match="unknown method 'fedavg'"):
        ExperimentConfig.from_mapping({"methods": ["flux", "fedavg"]})
    with pytest.raises(ConfigError, match="reference 'fmd' is not among"):
        ExperimentConfig.from_mapping({"methods": ["flux"], "reference": "fmd"})
    with pytest.raises(ConfigError, match="method 'fmq' trains LoRA adapters"):
        RunConfig(method="fmq", mode="full")
    with pytest.raises(ConfigError, match="merge-budgets must be one of"):
        RunConfig(merge_budgets="eq2")
    bad = config('methods = ["flux"]\nnetwork-gbps = 0\n')
    assert main(["experiment", "--config", bad]) == 2
    # Ablations in the regimes ablation-regimes names only; a regime it names must be one of the regimes.
    two = {"methods": ["flux", "fedavg-lora"], "no-exploration": True, "seeds": [0],
           "regimes": ["deepseek-moe-16b@24GiB:rtx4090", "llama-moe-3.5b@12GiB:rtx3090"]}  # fmt: skip
    with pytest.raises(ConfigError, match=r"ablation-regimes: \['llama-moe-3.5b@24GiB'\] are not among the regimes"):
        ExperimentConfig.from_mapping({**two, "ablation-regimes": ["llama-moe-3.5b@24GiB"]})
    exp = ExperimentConfig.from_mapping({**two, "ablation-regimes": ["deepseek-moe-16b@24GiB"], "warm-start": False})
    assert exp.regime_methods("llama-moe-3.5b@12GiB") == ["flux", "fedavg-lora"]
    runs = experiment.learning_runs(load_config_file(path), exp)
    assert [(r.regime, r.method) for r in runs] == [
        ("deepseek-moe-16b@24GiB", "flux"), ("", "fedavg-lora"), ("deepseek-moe-16b@24GiB", "flux-no-exploration"),
        ("llama-moe-3.5b@12GiB", "flux")]  # fmt: skip


def test_time_model_inputs_round_trip_through_csv(tmp_path):
    pts = [timemodel.CurvePoint("flux", 0, 0.0, {"a": 0.5}, 0, 2.5),
           timemodel.CurvePoint("flux", 1, 3.25, {"a": 0.75}, 1024, 2.0)]  # fmt: skip
    timemodel.write_csv(tmp_path / "c.csv", pts)
    assert timemodel.read_csv(tmp_path / "c.csv") == pts
    with open(tmp_path / "c.csv") as f:
        assert next(csv.reader(f))[:6] == ["method", "round", "time_s", "bytes_sent", "eval_loss", "acc_mean"]
    assert torch.isfinite(torch.tensor([p.loss for p in pts])).all()


def test_commit_notes_changed_code_not_changed_results(tmp_path):
    """A record's commit says "with uncommitted changes" when code differs from HEAD; rewritten results do not
    count (every chunk of the experiment rewrites bench/results/)."""
    from flux_engine import provenance

    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "tta.md").write_text("a\n")
    (tmp_path / "code.py").write_text("a = 1\n")
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    sha = subprocess.run([*git, "rev-parse", "--short", "HEAD"], check=True, capture_output=True, text=True).stdout
    (tmp_path / "bench" / "results" / "tta.md").write_text("b\n")
    assert provenance.commit(str(tmp_path)) == sha.strip()
    (tmp_path / "code.py").write_text("a = 2\n")
    assert provenance.commit(str(tmp_path)) == sha.strip() + " (with uncommitted changes)"


def test_experiment_workers_script_runs_an_experiment_to_the_end(config, tmp_path):
    """scripts/experiment_workers.sh: two workers, chunks of one round each, until the report lists no run left."""
    pytest.importorskip("matplotlib")
    path = config(f"""
methods = ["flux", "fedavg-lora"]
regimes = ["deepseek-moe-16b@24GiB:rtx4090"]
seeds = [0]
warm-start = false
chunk-minutes = 0.01
markdown = "{tmp_path / 'tta.md'}"
records = "{tmp_path / 'runs'}"
""")
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "experiment_workers.sh")
    env = dict(os.environ, PYTHON=sys.executable, LOGS=str(tmp_path / "logs"), STAGGER="1")
    done = subprocess.run(["bash", script, path, "2"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    logs = [(tmp_path / "logs" / f"worker-{i}.log").read_text() for i in (1, 2)]
    assert all("exit 0" in log and "exit 1" not in log for log in logs), logs
    assert "Not measured yet" not in (tmp_path / "tta.md").read_text()
    assert len(list((tmp_path / "runs").rglob("*.json"))) == 2
    bad = subprocess.run(["bash", script, str(tmp_path / "none.toml")], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "no such config" in bad.stderr


def test_records_name_the_start_weights(tmp_path):
    """A record names the weights its run began from: the SHA-256 of the checkpoint's weight files (the cache key
    names only the warm-start recipe, whose result differs between machines)."""
    import hashlib

    from flux_engine.federated.config import RunConfig

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model-2.safetensors").write_bytes(b"second")
    (folder / "model-1.safetensors").write_bytes(b"first")
    (folder / "config.json").write_text("{}")
    run = RunConfig.from_mapping({"checkpoint": str(folder)})
    assert experiment._start_weights(run) == hashlib.sha256(b"firstsecond").hexdigest()[:16]
    assert experiment._start_weights(RunConfig.from_mapping({"preset": "tiny"})) == ""


def test_records_before_average_over_were_trained_over_trainers(tmp_path):
    """``average-over`` came with a new default ("users"): a Flux record without the key was trained over
    trainers, so it stands for the flux-trainer-average ablation and not for Flux; a baseline's users are its
    trainers, so its records stand either way."""
    exp = experiment.ExperimentConfig(methods=["flux", "fedavg-lora", "fmes"], trainer_average=True)
    base = RunConfig.from_mapping({"preset": "tiny"})
    runs = {m: experiment.method_run(base, m, exp, str(tmp_path / m)) for m in exp.method_names()}
    assert (runs["flux"].average_over, runs["flux-trainer-average"].average_over) == ("users", "trainers")
    for method, run in runs.items():
        keys = experiment._learning_keys(run)
        assert ("average-over" in keys) == (method.startswith("flux"))
        old = {k: v for k, v in keys.items() if k != "average-over"}  # as written before the key existed
        path = str(tmp_path / f"{method}.json")
        experiment.RunRecord(1, [], {}, old, {}, {}).write(path)
        if method == "flux":
            with pytest.raises(ConfigError, match=r"other run keys \(average-over 'trainers' there, 'users' here\)"):
                experiment.RunRecord.read(path, run)
        else:
            assert experiment.RunRecord.read(path, run).run == old
