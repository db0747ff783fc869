"""A real Flower simulation: SuperLink process, ``flwr run``, ten banks, two rounds."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.launch import processes_with_env
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
        assert set(entry["own_validation"]) == set(entry["test"]) == {"local_only", "federated"}
        assert entry["test"]["federated"]["auc"] == final["auc"]
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
