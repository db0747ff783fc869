"""A bank's synthetic copy of its file: `fedfraud-bank synthesize`, run for real in its
own environment (.venv-synth, `make synth`: SDV needs pandas < 3), read back here."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import roc_auc_score

from client.cli import main as bank_main
from client.synthesize import RARE
from common.data import make_cards
from tests.conftest import APP_DIR

SYNTH_BANK = Path(os.environ.get("FEDFRAUD_SYNTH_VENV", APP_DIR / ".venv-synth")) / "bin" / \
    "fedfraud-bank"
needs_synth = pytest.mark.skipif(not SYNTH_BANK.exists(),
                                 reason="no .venv-synth (make synth; make test makes it)")
RARE_DOMAIN = "only-two.example"  # in two of the bank's rows: it must not be copied
CARDS = ["--id-columns", "TransactionID", "--time-column", "TransactionDT"]


def synthesize(source: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SYNTH_BANK), "synthesize", "--transactions", str(source),
                           "--name", "bank 3", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=180)


def features(rows: pd.DataFrame, categories: dict[str, list[str]]) -> pd.DataFrame:
    """The copy's columns for a quick scikit-learn model: text as the copy's categories."""
    x = rows.drop(columns=["Class", "TransactionID", "TransactionDT"])
    for column, values in categories.items():
        x[column] = pd.Categorical(x[column].where(x[column].isin(values)),
                                   categories=values)
    return x


@needs_synth
def test_a_synthetic_copy_keeps_the_columns_and_what_tells_fraud_apart_but_no_id_or_rare_value(
        tmp_path: Path) -> None:
    cards, _ = make_cards(3, rows=6000)
    own, held_out = cards.iloc[:4000].copy(), cards.iloc[4000:]
    own.loc[own.index[:2], "email_domain"] = RARE_DOMAIN
    own.to_csv(tmp_path / "bank3.csv", index=False)

    done = synthesize(tmp_path / "bank3.csv", tmp_path / "copy.csv", *CARDS)

    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip().splitlines()) == 1
    copy = pd.read_csv(tmp_path / "copy.csv")
    assert list(copy.columns) == list(own.columns)
    assert len(copy) == len(own)
    assert abs(int(copy["Class"].sum()) - int(own["Class"].sum())) <= 1  # its share
    assert copy["TransactionID"].tolist() == list(range(1, len(own) + 1))  # fresh ids
    assert RARE_DOMAIN not in set(copy["email_domain"])
    assert RARE in set(copy["email_domain"])
    numeric = own.select_dtypes("number").columns.drop(["TransactionID", "Class"])
    assert (copy[numeric].min() >= own[numeric].min()).all()  # within each column's range
    assert (copy[numeric].max() <= own[numeric].max()).all()
    assert not copy.merge(own, how="inner").shape[0]  # no row of the file
    # Trained on the copy, a model still ranks the bank's real fraud (one copula over
    # both classes gave 0.43 here: the fraud rate, but nothing that tells fraud apart).
    text = ["merchant_category", "device", "email_domain", "country"]
    categories = {c: sorted(copy[c].dropna().unique()) for c in text}
    model = HistGradientBoostingClassifier(categorical_features="from_dtype",
                                           random_state=0)
    model.fit(features(copy, categories), copy["Class"])
    scores = model.predict_proba(features(held_out, categories))[:, 1]
    auc = roc_auc_score(held_out["Class"], scores)
    print(f"trained on the copy, AUC on the bank's real held-out rows: {auc:.3f}")
    assert auc > 0.85
    # The copy goes through the bank's own data path, as its real file would.
    assert bank_main(["summarize", "--transactions", str(tmp_path / "copy.csv"),
                      "--name", "bank 3", "--out", str(tmp_path / "summary.json"),
                      *CARDS]) == 0


@needs_synth
def test_a_class_too_small_to_copy_is_one_line_naming_the_bank_file_and_column(
        tmp_path: Path) -> None:
    cards, _ = make_cards(3, rows=2000)
    few = pd.concat([cards[cards["Class"] == 0], cards[cards["Class"] == 1].head(3)])
    few.to_csv(tmp_path / "bank3.csv", index=False)

    done = synthesize(tmp_path / "bank3.csv", tmp_path / "copy.csv", *CARDS)

    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "bank 3" in done.stderr and "bank3.csv" in done.stderr
    assert "'Class'" in done.stderr and "3 rows of class 1" in done.stderr
    assert not (tmp_path / "copy.csv").exists()


@needs_synth
def test_a_time_column_of_dates_comes_back_as_dates_the_bank_s_data_path_reads(
        tmp_path: Path) -> None:
    cards, _ = make_cards(3, rows=2000)
    start = pd.Timestamp("2026-01-01", tz="UTC")
    cards["TransactionDT"] = (start + pd.to_timedelta(cards["TransactionDT"], unit="s")
                              ).map(lambda stamp: stamp.isoformat())
    cards.to_csv(tmp_path / "bank3.csv", index=False)

    done = synthesize(tmp_path / "bank3.csv", tmp_path / "copy.csv", "--rows", "500", *CARDS)

    assert done.returncode == 0, done.stderr
    copy = pd.read_csv(tmp_path / "copy.csv")
    assert len(copy) == 500
    stamps = pd.to_datetime(copy["TransactionDT"], utc=True, format="ISO8601")
    assert stamps.min() >= start and stamps.max() <= start + pd.Timedelta(days=200)
    assert bank_main(["summarize", "--transactions", str(tmp_path / "copy.csv"),
                      "--name", "bank 3", "--out", str(tmp_path / "summary.json"),
                      *CARDS]) == 0


@pytest.mark.skipif(importlib.util.find_spec("sdv") is not None,
                    reason="SDV is installed here")
def test_without_sdv_synthesize_says_in_one_line_how_to_get_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = pd.DataFrame({"amount": np.arange(40.0), "Class": [0, 1] * 20})
    rows.to_csv(tmp_path / "bank3.csv", index=False)

    code = bank_main(["synthesize", "--transactions", str(tmp_path / "bank3.csv"),
                      "--name", "bank 3", "--out", str(tmp_path / "copy.csv")])

    assert code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "make synth" in error
