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
from client.score import (
    ScoreInputError, Scorer, format_reasons, reason_codes, score_file, score_matrix,
)
from common import keys
from common.data import (
    TEST_FILE, bank_file, load_transactions, save_scaler, scaler_file, standardize,
)
from common.model import (
    CARD_JSON_FILE, STATE_DICT_FILE, TORCHSCRIPT_FILE, FraudNet, ModelSpec, packed,
    save_model, unpacked,
)
from common.schema import NUMERIC, BankDataError, Column, Schema
from common.task import score
from server.export import export_model
from tests.test_report import sample_metrics


@pytest.fixture(scope="module")
def exported(prepared, tmp_path_factory: pytest.TempPathFactory):
    """A bank trains a model once; the run folder gets it exported."""
    bank = Bank(3, Path(prepared.data_dir) / bank_file(3), prepared)
    torch.manual_seed(0)
    model = FraudNet(ModelSpec(in_features=30))
    arrays = {keys.WEIGHTS: packed(model.state_dict())}
    trained, _ = bank.train(arrays, prepared, server_round=1, evaluate_incoming=False)
    run_dir = tmp_path_factory.mktemp("run")
    metrics = {**sample_metrics(), "config": prepared.as_run_config(),
               "versions": {"torch": torch.__version__}}
    state = unpacked(trained[keys.WEIGHTS], model)
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

    out = pd.read_csv(tmp_path / "out.csv", keep_default_na=False)
    assert list(out.columns) == ["id", "fraud_probability", "flagged", "reasons"]
    assert out["id"].tolist() == frame["id"].tolist()
    x = frame.drop(columns="id").to_numpy(np.float32)
    expected = scorer.probabilities(x)
    np.testing.assert_allclose(out["fraud_probability"], expected, atol=1e-6)
    flagged = expected >= 0.5
    assert out["flagged"].tolist() == flagged.astype(int).tolist()
    assert summary["rows"] == 50 and summary["threshold"] == 0.5
    assert 0 < flagged.sum() < 50
    # Flagged rows carry their three reason codes, from the one reason-code function.
    codes = reason_codes(scorer, x[flagged])
    assert out["reasons"][flagged].tolist() == [format_reasons(c) for c in codes]
    assert all(len(c) == 3 for c in codes)
    assert (out["reasons"][~flagged] == "").all()


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


def tiny_run(path: Path, weights: list[float], threshold: float = 0.5, run_id: str = "7",
             mean: list[float] | None = None, scale: list[float] | None = None,
             hidden: tuple[int, ...] = ()) -> tuple[Path, Path]:
    """A hand-built run folder (a logistic model, or an MLP) and a bank's scaler for it."""
    features = [f"f{i:02d}" for i in range(len(weights))]
    torch.manual_seed(1)
    net = FraudNet(ModelSpec(in_features=len(weights), hidden=hidden))
    if not hidden:
        with torch.no_grad():
            net.net[0].weight.copy_(torch.tensor([weights]))
            net.net[0].bias.zero_()
    net.eval()
    path.mkdir(parents=True)
    save_model(path, net.state_dict(), ModelSpec(in_features=len(weights), hidden=hidden),
               features, threshold)
    (path / CARD_JSON_FILE).write_text(json.dumps(
        {"run_id": run_id, "features": features, "threshold": threshold}))
    scaler = path.parent / f"{path.name}-scaler.json"
    schema = Schema("Class", tuple(Column(name, NUMERIC) for name in features))
    save_scaler(scaler, np.array(mean or [0.0] * len(weights)),
                np.array(scale or [1.0] * len(weights)), schema)
    return path, scaler


class Payload:
    """What a crafted model file could carry: code that runs when it is unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def test_a_bank_scores_with_the_run_s_weights_never_with_its_torchscript(
        tmp_path: Path) -> None:
    """A run folder comes from the operator: its model.ts is a program that would run
    on the bank's rows outside the apps the bank approved. The bank rebuilds its own
    FraudNet from model.pt's tensors instead: a different model.ts changes nothing, a
    spec that would allocate terabytes is refused, and a model.pt carrying code is
    refused in one line, its code not run."""
    run, scaler = tiny_run(tmp_path / "run", [0.1, -0.5, 3.0, 0.05])
    x = np.array([[1.0, 2.0, 0.5, -1.0]], np.float32)
    honest = Scorer.load(run, scaler).probabilities(x)
    always_fraud = torch.jit.trace(lambda rows: torch.ones(rows.shape[0]), torch.zeros(2, 4))
    always_fraud.save(str(run / TORCHSCRIPT_FILE))

    assert Scorer.load(run, scaler).probabilities(x) == pytest.approx(honest)
    assert honest[0] == pytest.approx(1 / (1 + np.exp(-(0.1 - 1.0 + 1.5 - 0.05))), abs=1e-6)

    # A spec whose hidden layer would take terabytes: refused, nothing allocated; one
    # with more layers than the file holds tensors for: refused before building any.
    mlp, mlp_scaler = tiny_run(tmp_path / "mlp", [0.1, -0.5, 3.0, 0.05], hidden=(3,))
    saved = torch.load(mlp / STATE_DICT_FILE, weights_only=True)
    for hidden, why in (([2**40], "loading state_dict"), ([1] * 20_000, "hidden layers named")):
        torch.save({**saved, "spec": {**saved["spec"], "hidden": hidden}}, mlp / STATE_DICT_FILE)
        with pytest.raises(BankDataError, match=why):
            Scorer.load(mlp, mlp_scaler)

    marker = tmp_path / "payload-ran"
    torch.save({"state_dict": {}, "spec": Payload(marker), "features": []},
               run / STATE_DICT_FILE)
    with pytest.raises(BankDataError, match="not a usable fedfraud model") as refused:
        Scorer.load(run, scaler)
    assert "\n" not in str(refused.value) and not marker.exists()


def test_reason_codes_name_the_dominant_feature(tmp_path: Path) -> None:
    # logit = 0.1 f00 - 0.5 f01 + 3 f02 + 0.05 f03; the bank's mean is (1, 0, 0, 0).
    run, scaler = tiny_run(tmp_path / "run", [0.1, -0.5, 3.0, 0.05],
                           mean=[1.0, 0.0, 0.0, 0.0], scale=[2.0, 1.0, 1.0, 1.0])
    scorer = Scorer.load(run, scaler)
    x = np.array([[5.0, 1.0, 1.0, 1.0],      # f02 dominates, f01 lowers, f00 raises
                  [1.0, -4.0, 0.2, np.nan],  # f01 (negative weight, negative value) raises
                  [1.0, 0.0, -2.0, 0.0]],    # nothing raises: f02 lowers
                 np.float32)

    codes = reason_codes(scorer, x)

    assert [(c["feature"], c["direction"]) for c in codes[0]] == [
        ("f02", "raises"), ("f01", "lowers"), ("f00", "raises")]
    assert [(c["feature"], c["direction"]) for c in codes[1]] == [
        ("f01", "raises"), ("f02", "raises")]  # f00 at the mean, f03 missing: no share
    assert [(c["feature"], c["direction"]) for c in codes[2]] == [("f02", "lowers")]
    # Integrated Gradients: the shares add up to p(x) - p(the bank's mean transaction).
    gap = scorer.probabilities(x) - scorer.probabilities(np.array([[1.0, 0, 0, 0]]))
    np.testing.assert_allclose(scorer.attributions(x).sum(axis=1), gap, atol=2e-3)
    # For a logistic model each share is proportional to weight x standardized value.
    shares = scorer.attributions(x[:1])[0]
    np.testing.assert_allclose(shares / shares[2], [0.1 * 2 / 3, -0.5 / 3, 1, 0.05 / 3],
                               rtol=1e-4)


def test_reason_codes_of_an_mlp_add_up(tmp_path: Path) -> None:
    run, scaler = tiny_run(tmp_path / "run", [0.0] * 6, hidden=(16, 8), threshold=0.0)
    scorer = Scorer.load(run, scaler)
    x = np.random.default_rng(3).normal(scale=3, size=(300, 6)).astype(np.float32)
    gap = scorer.probabilities(x) - scorer.probabilities(np.zeros((1, 6), np.float32))
    np.testing.assert_allclose(scorer.attributions(x).sum(axis=1), gap, atol=5e-3)
    # The midpoint rule's error (ReLU kinks on the path) shrinks with more points.
    np.testing.assert_allclose(scorer.attributions(x, steps=1024).sum(axis=1), gap,
                               atol=5e-4)
    scores = score_matrix(scorer, x)  # threshold 0: every row flagged, with reasons
    assert scores.flagged.all() and all(len(r) == 3 for r in scores.reasons)
    assert scores.reasons == reason_codes(scorer, x)


def test_an_infinite_value_names_the_column(scorer: Scorer, tmp_path: Path) -> None:
    frame = transactions(4)
    frame["f11"] = frame["f11"].astype(object)
    frame.loc[2, "f11"] = "inf"
    frame.to_csv(tmp_path / "inf.csv", index=False)
    with pytest.raises(ScoreInputError,
                       match=r"column 'f11' holds a value that is not a finite float32 "
                             r"number \(row 3"):
        score_file(scorer, tmp_path / "inf.csv", tmp_path / "out.csv")
