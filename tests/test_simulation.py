"""A real Flower simulation: SuperLink process, ``flwr run``, ten banks, two rounds."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.processes import processes_with_env
from tests.conftest import APP_DIR

BIN = Path(sys.executable).parent


def test_ten_bank_two_round_simulation(tmp_path: Path) -> None:
    pyproject = hashlib.sha256((APP_DIR / "pyproject.toml").read_bytes()).hexdigest()
    flwr_home = tmp_path / "flwr-home"
    command = [
        str(BIN / "fedfraud"), "--app-dir", str(APP_DIR), "--flwr-home", str(flwr_home),
        "--set", "num-server-rounds=2",
        "--set", f"data-dir='{tmp_path / 'data'}'",
        "--set", f"runs-dir='{tmp_path / 'runs'}'",
        "simulate",
    ]
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}

    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "fedfraud round 2/2" in done.stdout  # progress, one line per round
    # Not the header of Flower's packaging warnings without its lines (server/launch.py).
    assert "configuration warnings" not in done.stdout
    metrics = json.loads((tmp_path / "runs" / "latest" / "metrics.json").read_text(),
                         parse_constant=pytest.fail)  # strict JSON: no NaN
    assert metrics["mode"] == "simulation"
    assert [bank["id"] for bank in metrics["banks"]] == list(range(10))
    assert [row["round"] for row in metrics["history"]] == [1, 2]
    assert all(row["banks_trained"] == list(range(10)) for row in metrics["history"])
    final = metrics["final"]
    assert final["tp"] + final["fp"] + final["fn"] + final["tn"] == 12_000
    assert 0.5 < final["auc"] <= 1.0 and 0.0 < final["threshold"] < 1.0
    assert len(metrics["timing"]["round_s"]) == 2
    # Fair evaluation: every bank's own validation metrics, from its histograms.
    assert all("federated_own_validation" in bank for bank in metrics["banks"])
    # The references, with the same keys as the federated result.
    baselines = metrics["baselines"]
    assert set(baselines["centralized"]) == set(final)
    assert baselines["centralized"]["tp"] + baselines["centralized"]["fn"] == 237
    assert [entry["bank"] for entry in baselines["local_only"]] == list(range(10))
    for entry in baselines["local_only"]:
        assert set(entry["test"]) == {"local_only", "federated"}
        assert set(entry["own_validation"]) == {"local_only", "federated", "personalized"}
        assert entry["test"]["federated"]["auc"] == final["auc"]
    # ...and whether the test set can tell the federated model from them (AUC).
    best = max(baselines["local_only"], key=lambda entry: entry["test"]["local_only"]["auc"])
    for name, other in (("centralized", baselines["centralized"]),
                        ("best_local_only", best["test"]["local_only"])):
        minus = baselines["federated_minus"][name]
        assert minus["auc_difference"] == pytest.approx(final["auc"] - other["auc"])
        assert minus["ci95"][0] <= minus["auc_difference"] <= minus["ci95"][1]
    assert baselines["federated_minus"]["best_local_only"]["bank"] == best["bank"]
    # Each bank personalized the final model and says which one it keeps.
    assert all(bank["kept"] in ("federated", "personalized") for bank in metrics["banks"])
    personal = metrics["personalization"]
    assert personal["banks"] == 10 and 0.5 < personal["kept"]["auc"] <= 1.0
    run_dir = (tmp_path / "runs" / "latest").resolve()
    outputs = {p.name for p in run_dir.iterdir()}
    assert {"model.pt", "model.ts", "model_card.json", "model_card.md", "report.md",
            "report.html", "report_request.json", "roc.png", "pr.png", "rounds.png",
            "banks.png"} <= outputs
    assert all((run_dir / name).read_bytes()[:4] == b"\x89PNG" for name in outputs
               if name.endswith(".png"))
    # Each bank's scaler stays beside its own shard, never in the server's run folder.
    assert not any("scaler" in name for name in outputs)
    assert all((tmp_path / "data" / f"bank_{b:02d}" / "scaler.json").exists() for b in range(10))
    assert "Offline report" in (run_dir / "report.md").read_text()
    # Nothing left running, nothing in the repo rewritten.
    assert processes_with_env(f"FLWR_HOME={flwr_home}") == []
    assert hashlib.sha256((APP_DIR / "pyproject.toml").read_bytes()).hexdigest() == pyproject


def simulate(tmp_path: Path, name: str, *settings: str) -> Path:
    return simulated(tmp_path, name, *settings)[0]


def simulated(tmp_path: Path, name: str, *settings: str) -> tuple[Path, str]:
    """A one-round simulation's run folder, and what ``fedfraud simulate`` printed."""
    command = [
        str(BIN / "fedfraud"), "--app-dir", str(APP_DIR),
        "--flwr-home", str(tmp_path / f"flwr-{name}"),
        "--set", "num-server-rounds=1", "--set", "baselines=false",
        "--set", f"data-dir='{tmp_path / 'data'}'",
        "--set", f"runs-dir='{tmp_path / name}'", *settings, "simulate",
    ]
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return (tmp_path / name / "latest").resolve(), done.stdout + done.stderr


def test_secure_aggregation_matches_fedavg_and_never_shows_a_banks_weights(
    tmp_path: Path,
) -> None:
    import torch
    from flwr.app import Array, ArrayRecord

    from client.bank import Bank
    from common.data import bank_file
    from common import keys
    from common.model import FraudNet, ModelSpec, packed
    from server.strategy import fingerprint
    from tests.conftest import app_config

    plain = simulate(tmp_path, "plain")
    secure = simulate(tmp_path, "secure", "--set", "secure-aggregation=true")

    # One round: the server's sum of masked updates is FedAvg's average, up to SecAgg+'s
    # quantization (16 / 2**22 per value). (Later rounds train from those slightly
    # different weights, and training amplifies the difference.)
    plain_model = torch.load(plain / "model.pt", weights_only=False)["state_dict"]
    secure_model = torch.load(secure / "model.pt", weights_only=False)["state_dict"]
    for name, weights in plain_model.items():
        torch.testing.assert_close(secure_model[name], weights, atol=2e-5, rtol=0)
    plain_final = json.loads((plain / "metrics.json").read_text())["final"]
    secure_final = json.loads((secure / "metrics.json").read_text())["final"]
    assert abs(secure_final["auc"] - plain_final["auc"]) < 1e-4

    # Bank 0's round-1 weights, recomputed here: the plain server received exactly
    # them; the secure server received no weights from any bank, only masked vectors.
    config = app_config(data_dir=str(tmp_path / "data"))
    torch.set_num_threads(1)  # as the banks run (client/executor.py): same float sums
    torch.manual_seed(config.seed)
    initial = {keys.WEIGHTS: packed(FraudNet(ModelSpec(30)).state_dict())}
    trained, _ = Bank(0, tmp_path / "data" / bank_file(0), config).train(
        initial, config, server_round=1, evaluate_incoming=False)
    own = fingerprint(ArrayRecord({k: Array(v) for k, v in trained.items()}))

    def received(run_dir: Path) -> list[dict]:
        return json.loads((run_dir / "sent_by_banks.json").read_text())["messages"]

    def weights_seen(run_dir: Path) -> set[str]:
        return {record["items"].get("sha256") for entry in received(run_dir)
                for record in entry["records"] if record["kind"] == "weights"}

    assert own in weights_seen(plain)
    assert weights_seen(secure) == {None}  # weight records arrive empty
    masked = [entry for entry in received(secure) if entry["bank"] == 0 and any(
        "masked_params" in record["items"] for record in entry["records"])]
    assert [entry["round"] for entry in masked] == [1]


def test_next_months_run_starts_from_the_model_in_production(tmp_path: Path) -> None:
    first = simulate(tmp_path, "first")
    second = simulate(tmp_path, "second", "--set", f"initial-model='{first}'")

    # Round 0 of the second run is the first run's model, scored on the same test set.
    before = json.loads((first / "metrics.json").read_text())["final"]
    start = json.loads((second / "metrics.json").read_text())["initial_model"]
    assert start["run"] == str(first)
    assert start["test"]["auc"] == pytest.approx(before["auc"], abs=1e-9)
    assert start["validation"]["ap"] is not None  # the banks' round-1 replies
    assert "model in production (initial-model), test set" in (
        second / "report.md").read_text()


def test_an_initial_model_of_other_features_is_refused(tmp_path: Path) -> None:
    import torch

    from common.model import STATE_DICT_FILE, ModelSpec
    from server.app import load_initial

    spec = ModelSpec(in_features=1)
    torch.save({"state_dict": {}, "features": ["a", "b"]}, tmp_path / STATE_DICT_FILE)
    with pytest.raises(ValueError, match="other features"):
        load_initial(tmp_path, ModelSpec(in_features=3), ["a", "b", "c"])
    (tmp_path / STATE_DICT_FILE).write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a fedfraud model"):
        load_initial(tmp_path, spec, ["a"])
    torch.save(torch.zeros(3), tmp_path / STATE_DICT_FILE)  # a bare tensor
    with pytest.raises(ValueError, match="not a fedfraud model"):
        load_initial(tmp_path, spec, ["a"])
    torch.save({"state_dict": {"net.0.weight": torch.zeros(2, 2)}, "features": ["a"]},
               tmp_path / STATE_DICT_FILE)  # the right features, the wrong weights
    with pytest.raises(ValueError, match="model shape"):
        load_initial(tmp_path, spec, ["a"])


def test_an_initial_model_saved_in_another_order_starts_the_run_from_its_own_weights(
        tmp_path: Path) -> None:
    """The model travels as one vector in FraudNet's order (common/model.py: packed): a
    file whose tensors another tool re-saved in another order, or in float64, still
    starts the run from the same model."""
    import numpy as np
    import torch

    from common.model import STATE_DICT_FILE, FraudNet, ModelSpec, packed, save_model
    from server.app import load_initial

    spec = ModelSpec(in_features=2)
    model = FraudNet(spec)
    save_model(tmp_path, model.state_dict(), spec, ["a", "b"], 0.5)
    saved = torch.load(tmp_path / STATE_DICT_FILE, weights_only=True)
    saved["state_dict"] = {name: saved["state_dict"][name].double()
                           for name in sorted(saved["state_dict"], reverse=True)}
    torch.save(saved, tmp_path / STATE_DICT_FILE)

    initial = load_initial(tmp_path, spec, ["a", "b"])
    assert np.array_equal(packed(initial), packed(model.state_dict()))
    assert packed(initial).dtype == np.float32


def test_an_initial_model_with_another_activation_is_refused(tmp_path: Path) -> None:
    """A DP run's model (tanh, dp-activation) cannot continue from a ReLU model: the
    weights would load but mean something else."""
    import torch

    from common.model import STATE_DICT_FILE, FraudNet, ModelSpec, save_model
    from server.app import load_initial

    relu, tanh = ModelSpec(in_features=2), ModelSpec(in_features=2, activation="tanh")
    save_model(tmp_path, FraudNet(relu).state_dict(), relu, ["a", "b"], 0.5)
    assert load_initial(tmp_path, relu, ["a", "b"]).keys() == FraudNet(relu).state_dict().keys()
    with pytest.raises(ValueError, match="hidden layers use relu, this run's model tanh"):
        load_initial(tmp_path, tanh, ["a", "b"])
    saved = torch.load(tmp_path / STATE_DICT_FILE, weights_only=True)
    del saved["spec"]["activation"]  # a model saved before the setting existed: ReLU
    torch.save(saved, tmp_path / STATE_DICT_FILE)
    with pytest.raises(ValueError, match="hidden layers use relu"):
        load_initial(tmp_path, tanh, ["a", "b"])


class Payload:
    """A pickle that runs a command when loaded the unsafe way."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_initial_model_runs_no_code_at_the_server(tmp_path: Path) -> None:
    import torch

    from common.model import STATE_DICT_FILE, ModelSpec
    from server.app import load_initial

    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "features": ["a"], "spec": Payload(marker)},
               tmp_path / STATE_DICT_FILE)
    with pytest.raises(ValueError, match="not a fedfraud model"):
        load_initial(tmp_path, ModelSpec(in_features=1), ["a"])
    assert not marker.exists()


def test_a_stopped_simulation_leaves_no_flower_process_behind(tmp_path: Path) -> None:
    import signal
    import time

    flwr_home = tmp_path / "flwr-home"
    marker = f"FLWR_HOME={flwr_home}"
    process = subprocess.Popen(
        [str(BIN / "fedfraud"), "--app-dir", str(APP_DIR), "--flwr-home", str(flwr_home),
         "--set", f"data-dir='{tmp_path / 'data'}'", "--set",
         f"runs-dir='{tmp_path / 'runs'}'", "simulate"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(processes_with_env(marker)) < 2:  # the SuperLink and `flwr run`
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.5)
        process.send_signal(signal.SIGTERM)  # the supervisor alone, as a service manager
        assert process.wait(timeout=60) != 0
        deadline = time.monotonic() + 20
        while processes_with_env(marker) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert processes_with_env(marker) == []
    finally:  # whatever happened, nothing of this test keeps running
        for pid in processes_with_env(marker):
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def test_a_bank_sending_malformed_secagg_replies_drops_out_and_the_run_goes_on(
    tmp_path: Path,
) -> None:
    """Bank 3 breaks one SecAgg+ stage's reply per round (client/attack.py): a key that
    is no key, lists that do not pair, a masked vector of another shape, shares that are
    not shares. Each used to raise inside Flower's workflow and end the run (or, for
    the first two, stop every round: Flower's own dropout handling then asks the others
    for shares they never got). Now the reply is refused and the round goes on as for a
    bank that dropped out."""
    run_dir, output = simulated(tmp_path, "attacked", "--set", "secure-aggregation=true",
                       "--set", "num-server-rounds=4", "--set", "attackers='3'",
                       "--set", "attack='secagg-malformed'")

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [row["round"] for row in metrics["history"]] == [1, 2, 3, 4]
    # Rounds 1-3 aggregate the nine others. In round 4 bank 3's masked vector was
    # well-formed and is in the sum: the other banks' shares remove its masks.
    others = [b for b in range(10) if b != 3]
    assert [row["banks_trained"] for row in metrics["history"]] == [others] * 3 + [
        list(range(10))]
    for stage in ("setup", "share_keys", "collect_masked_vectors", "unmask"):
        assert f"SecAgg+ {stage} reply from node" in output, stage
    assert "secure aggregation stopped" not in output
    refused = metrics["strategy"]["refused_updates"]
    assert [(r["round"], r["bank"], r["message"]) for r in refused] == [
        (1, 3, "train (SecAgg+ setup)"), (2, 3, "train (SecAgg+ share_keys)"),
        (3, 3, "train (SecAgg+ collect_masked_vectors)"), (4, 3, "train (SecAgg+ unmask)")]
    assert 0.5 < metrics["final"]["auc"] <= 1.0
