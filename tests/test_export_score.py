"""The exported model and a bank scoring its own transactions with it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from client.bank import Bank
from client.score import ScoreInputError, Scorer, score_file
from common.data import TEST_FILE, bank_file, load_transactions, scaler_file, standardize
from common.model import CARD_JSON_FILE, TORCHSCRIPT_FILE, FraudNet, ModelSpec
from common.task import score
from server.export import export_model
from tests.test_report import sample_metrics


@pytest.fixture(scope="module")
def exported(prepared, tmp_path_factory: pytest.TempPathFactory):
    """A bank trains a model once; the run folder gets it exported."""
    bank = Bank(3, Path(prepared.data_dir) / bank_file(3), prepared)
    torch.manual_seed(0)
    model = FraudNet(ModelSpec(in_features=30))
    arrays = {k: v.numpy() for k, v in model.state_dict().items()}
    trained, _ = bank.train(arrays, prepared, server_round=1, evaluate_incoming=False)
    run_dir = tmp_path_factory.mktemp("run")
    metrics = {**sample_metrics(), "config": prepared.as_run_config(),
               "versions": {"torch": torch.__version__}}
    state = {k: torch.from_numpy(v) for k, v in trained.items()}
    export_model(run_dir, state, ModelSpec(in_features=30), bank.features, metrics, "test data")
    model.load_state_dict(state)
    return run_dir, model, bank


def test_torchscript_reproduces_the_training_time_model(prepared, exported) -> None:
    run_dir, model, bank = exported
    x, _, _ = load_transactions(Path(prepared.data_dir) / TEST_FILE, "Class", "server")
    x = standardize(x, *bank.scaler)

    expected = torch.sigmoid(torch.from_numpy(score(model, x))).numpy()
    scripted = torch.jit.load(str(run_dir / TORCHSCRIPT_FILE))
    with torch.no_grad():
        got = scripted(torch.from_numpy(x)).numpy()

    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert len(got) == 12_000


def test_torchscript_loads_without_this_repository(exported) -> None:
    run_dir, _, _ = exported
    code = (
        "import sys\n"
        "for name in ('common', 'client', 'server'): sys.modules[name] = None\n"
        "import torch\n"
        f"m = torch.jit.load({str(run_dir / TORCHSCRIPT_FILE)!r})\n"
        "p = m(torch.zeros(3, 30))\n"
        "assert p.shape == (3,) and bool(((p > 0) & (p < 1)).all())\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd="/", timeout=120)
    assert done.stdout.strip() == "ok", done.stderr


def test_model_card_describes_the_model(exported) -> None:
    run_dir, _, bank = exported
    card = json.loads((run_dir / CARD_JSON_FILE).read_text())
    assert card["features"] == bank.features == [f"f{i:02d}" for i in range(30)]
    assert card["threshold"] == sample_metrics()["final"]["threshold"]
    assert card["privacy"]["raw_data_shared"] is False
    assert card["training"]["config"]["num-server-rounds"] == 10
    assert "Flag a transaction" in (run_dir / "model_card.md").read_text()


@pytest.fixture
def scorer(exported, tmp_path: Path) -> Scorer:
    run_dir, _, bank = exported
    path = bank.keep_scaler()
    assert path == scaler_file(Path(bank.state_dir)) == bank.state_dir / "scaler.json"
    return Scorer.load(run_dir, path)


def transactions(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.normal(size=(n, 30)), columns=[f"f{i:02d}" for i in range(30)])
    frame.insert(0, "id", [f"tx-{i}" for i in range(n)])
    return frame


def test_score_file_writes_ids_probabilities_and_flags(scorer: Scorer, tmp_path: Path) -> None:
    frame = transactions(50)
    frame.to_csv(tmp_path / "in.csv", index=False)

    summary = score_file(scorer, tmp_path / "in.csv", tmp_path / "out.csv", threshold=0.5)

    out = pd.read_csv(tmp_path / "out.csv")
    assert list(out.columns) == ["id", "fraud_probability", "flagged"]
    assert out["id"].tolist() == frame["id"].tolist()
    expected = scorer.probabilities(frame.drop(columns="id").to_numpy())
    np.testing.assert_allclose(out["fraud_probability"], expected, atol=1e-6)
    assert out["flagged"].tolist() == (expected >= 0.5).astype(int).tolist()
    assert summary["rows"] == 50 and summary["threshold"] == 0.5


def test_parquet_and_the_runs_threshold(scorer: Scorer, tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    transactions(10).to_parquet(tmp_path / "in.parquet")
    summary = score_file(scorer, tmp_path / "in.parquet", tmp_path / "out.csv")
    assert summary["rows"] == 10 and summary["threshold"] == scorer.threshold


@pytest.mark.parametrize(("change", "message"), [
    (lambda f: f.drop(columns="f07"), "missing ['f07']"),
    (lambda f: f.assign(amount=1.0), "unexpected ['amount']"),
    (lambda f: f.assign(f03=["x"] + [1.0] * 4), "column 'f03' must be numeric (row 1: 'x')"),
    (lambda f: f.iloc[:0], "no rows"),
    # Not finite as float32 (1e39 overflows it): refused, not scored as 0 or 1.
    (lambda f: f.assign(f03=[1.0, 2.0, float("inf"), 1.0, 1.0]),
     "column 'f03' holds a value that is not a finite float32 number (row 3: 'inf')"),
    (lambda f: f.assign(f11=[1.0, 2.0, 3.0, 4.0, -float("inf")]),
     "column 'f11' holds a value that is not a finite float32 number (row 5: '-inf')"),
    (lambda f: f.assign(f03=[1e39, 2.0, 3.0, 4.0, 5.0]),
     "column 'f03' holds a value that is not a finite float32 number (row 1: '1e+39')"),
])
def test_bad_input_names_the_file_and_the_column(scorer: Scorer, tmp_path: Path,
                                                 change, message: str) -> None:
    path = tmp_path / "bank_tx.csv"
    change(transactions(5)).to_csv(path, index=False)
    with pytest.raises(ScoreInputError) as err:
        score_file(scorer, path, tmp_path / "out.csv")
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)
    assert "\n" not in str(err.value) and not (tmp_path / "out.csv").exists()


def test_a_missing_value_is_scored_as_the_banks_mean(scorer: Scorer, tmp_path: Path) -> None:
    frame = transactions(3)
    frame.loc[1, "f05"] = None
    frame.to_csv(tmp_path / "gap.csv", index=False)

    score_file(scorer, tmp_path / "gap.csv", tmp_path / "out.csv")

    filled = frame.drop(columns="id").fillna({"f05": float(scorer.mean[5])})
    expected = scorer.probabilities(filled.to_numpy(np.float32))
    out = pd.read_csv(tmp_path / "out.csv")
    np.testing.assert_allclose(out["fraud_probability"], expected, atol=1e-6)


def test_empty_file(scorer: Scorer, tmp_path: Path) -> None:
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ScoreInputError, match="empty.csv: empty file"):
        score_file(scorer, tmp_path / "empty.csv", tmp_path / "out.csv")


def test_the_score_command_refuses_an_infinite_value_in_one_line(
    exported, scorer: Scorer, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    from client.cli import main

    run_dir, _, bank = exported  # the scorer fixture has written the bank's scaler.json
    path = tmp_path / "new.csv"
    transactions(4).assign(f07=[1.0, 1e39, 1.0, 1.0]).to_csv(path, index=False)
    code = main(["score", "--run", str(run_dir), "--scaler",
                 str(scaler_file(bank.state_dir)), "--input", str(path),
                 "--output", str(tmp_path / "out.csv")])
    assert code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"fedfraud-bank: {path}: column 'f07' holds a value that is not a finite "
        "float32 number (row 2: '1e+39')"]
    assert not (tmp_path / "out.csv").exists()
