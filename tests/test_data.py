from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.data import (
    MANIFEST, TEST_FILE, BankDataError, bank_file, dirichlet_partition, hold_out,
    load_transactions, split_bank,
)
from common.model import FraudNet, ModelSpec
from common.task import train
from tests.conftest import app_config

LABELS = np.array([0] * 9_850 + [1] * 150)  # 1.5 % fraud, like the product's data


@pytest.mark.parametrize("seed", range(1, 51))
def test_partition_uses_every_row_once_and_never_crashes(seed: int) -> None:
    parts = dirichlet_partition(LABELS, num_banks=10, alpha=0.35, seed=seed)

    joined = np.concatenate(parts)
    assert len(parts) == 10
    assert sorted(joined.tolist()) == list(range(len(LABELS)))  # disjoint and complete
    assert min(len(part) for part in parts) >= 20


def test_partition_is_non_iid_and_can_leave_a_bank_without_fraud() -> None:
    rates = [
        [LABELS[part].mean() for part in dirichlet_partition(LABELS, 10, 0.35, seed)]
        for seed in range(1, 51)
    ]
    assert any(0.0 in per_bank for per_bank in rates)  # some bank has no fraud
    assert np.mean([max(r) - min(r) for r in rates]) > 0.05  # far from IID


def test_partition_refuses_impossible_settings() -> None:
    with pytest.raises(ValueError, match="cannot give"):
        dirichlet_partition(np.zeros(50, int), num_banks=10, alpha=0.35, seed=1)


@pytest.mark.parametrize("frauds", [0, 1, 2])
def test_bank_split_survives_fraud_poor_banks(frauds: int) -> None:
    y = np.array([1] * frauds + [0] * 40)
    x = np.arange(len(y) * 3, dtype=np.float32).reshape(len(y), 3)

    split = split_bank(x, y, val_fraction=0.15, seed=3)

    assert len(split.y_train) + len(split.y_val) == len(y)
    assert split.y_train.sum() + split.y_val.sum() == frauds
    assert len(split.y_val) == 6


def test_a_bank_without_fraud_still_trains() -> None:
    x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    y = np.zeros(64, dtype=np.int64)
    model = FraudNet(ModelSpec(in_features=4))
    before = [p.clone() for p in model.parameters()]

    loss = train(model, x, y, epochs=1, batch_size=16, learning_rate=1e-2,
                 pos_weight=1.0, seed=0)

    assert np.isfinite(loss)
    assert any(not (a == b).all() for a, b in zip(before, model.parameters()))


def test_hold_out_is_stratified() -> None:
    x = np.zeros((len(LABELS), 1), np.float32)
    _, y_keep, _, y_out = hold_out(x, LABELS, 0.2, seed=1)
    assert len(y_out) == 2000 and y_out.sum() == 30 and y_keep.sum() == 120


def test_prepare_writes_only_each_banks_rows(prepared) -> None:
    data_dir = Path(prepared.data_dir)
    manifest = json.loads((data_dir / MANIFEST).read_text())
    frames = [np.loadtxt(data_dir / bank_file(b), delimiter=",", skiprows=1)
              for b in range(prepared.num_banks)]
    test = np.loadtxt(data_dir / TEST_FILE, delimiter=",", skiprows=1)

    rows = np.concatenate(frames + [test])
    assert len(rows) == 60_000
    assert len(np.unique(rows, axis=0)) == 60_000  # no row in two files
    assert [b["rows"] for b in manifest["banks"]] == [len(f) for f in frames]
    assert manifest["test"]["rows"] == 12_000 and manifest["test"]["frauds"] == 237


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("a,b\n1,2\n", "no label column 'Class'"),
        ("a,Class\n", "no rows"),
        ("a,Class\n1,yes\n", "must be 0/1"),
        ("a,Class\n1,2\n", "other than 0 and 1"),
        ("a,Class\nx,1\n", "non-numeric feature columns ['a']"),
        ("a,Class\n,1\n2,0\n", "missing values in columns ['a']"),
        ("", "not a readable CSV"),
    ],
)
def test_loader_errors_name_the_bank_and_the_file(
    tmp_path: Path, content: str, why: str
) -> None:
    path = write(tmp_path / "transactions.csv", content)
    with pytest.raises(BankDataError) as err:
        load_transactions(path, "Class", "bank 3")
    assert str(err.value).startswith(f"bank 3: {path}: ")
    assert why in str(err.value)


def test_loader_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BankDataError, match="bank 7: .*nope.csv: file not found"):
        load_transactions(tmp_path / "nope.csv", "Class", "bank 7")


def test_loader_reads_features_and_labels(tmp_path: Path) -> None:
    path = write(tmp_path / "b.csv", "f1,Class,f2\n1.5,0,2\n3,1,4\n")
    x, y, names = load_transactions(path, "Class", "bank 0")
    assert names == ["f1", "f2"]
    assert x.tolist() == [[1.5, 2.0], [3.0, 4.0]] and x.dtype == np.float32
    assert y.tolist() == [0, 1]


def test_config_has_a_reason_for_every_default() -> None:
    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    section = text.split("[tool.flwr.app.config]")[1].split("\n[")[0]
    previous = ""
    for line in section.strip().splitlines():
        if "=" in line and not line.startswith("#"):
            assert previous.startswith("#") or previous.count("=") == 1, line
        previous = line
    assert app_config().num_server_rounds == 10


def test_config_rejects_unknown_and_wrongly_typed_keys() -> None:
    with pytest.raises(ValueError, match="unknown keys"):
        app_config(rounds=3)
    with pytest.raises(ValueError, match="num-server-rounds must be int"):
        app_config(num_server_rounds="3")
