from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest

import pandas as pd

from common.data import (
    ACCOUNT_TAKEOVER, CARD_TESTING, CARDS_COLUMNS, LEGIT, MANIFEST, TEST_FILE,
    BankDataError, bank_file, dirichlet_partition, fit_scaler, hold_out, load_transactions,
    make_cards, make_synthetic, prepare, prepared_bank, split_bank, standardize,
    time_order,
)
from common.schema import CATEGORICAL, NUMERIC, SCHEMA_FILE, Column, Schema, summarize
from common.model import FraudNet, ModelSpec
from common.task import train
from tests.conftest import APP_DIR, app_config, fresh_python

LABELS = np.array([0] * 9_850 + [1] * 150)  # 1.5 % fraud, like the product's data


@pytest.mark.parametrize("seed", range(1, 51))
def test_partition_uses_every_row_once_and_never_crashes(seed: int) -> None:
    parts = dirichlet_partition(LABELS, num_banks=10, alpha=0.35, seed=seed)

    joined = np.concatenate(parts)
    assert len(parts) == 10
    assert sorted(joined.tolist()) == list(range(len(LABELS)))  # disjoint and complete
    assert min(len(part) for part in parts) >= 20


def test_partition_is_non_iid_but_gives_every_bank_two_frauds() -> None:
    parts = [dirichlet_partition(LABELS, 10, 0.35, seed) for seed in range(1, 51)]
    rates = [[LABELS[part].mean() for part in per_seed] for per_seed in parts]

    assert min(LABELS[part].sum() for per_seed in parts for part in per_seed) == 2
    assert min((LABELS[part] == 0).sum() for per_seed in parts for part in per_seed) >= 2
    assert np.mean([max(r) - min(r) for r in rates]) > 0.05  # far from IID


def test_partition_never_gives_a_bank_only_frauds() -> None:
    # Seed 8's first draw gave bank 7 its fraud floor plus 20+ frauds and no legit row.
    _, y = make_synthetic(8)
    _, y_banks, _, _ = hold_out(np.arange(len(y)), y, 0.2, seed=8)
    parts = dirichlet_partition(y_banks, num_banks=10, alpha=0.35, seed=8)
    assert min(np.sum(y_banks[part] == 0) for part in parts) >= 2


def test_partition_refuses_impossible_settings() -> None:
    with pytest.raises(ValueError, match="cannot give"):
        dirichlet_partition(np.zeros(50, int), num_banks=10, alpha=0.35, seed=1)
    with pytest.raises(ValueError, match="19 frauds"):
        dirichlet_partition(np.array([1] * 19 + [0] * 500), num_banks=10, alpha=1, seed=1)


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


@pytest.mark.parametrize("local_optimizer", ["adam", "sgd"])
def test_training_steps_as_torch_s_optimizer_and_imports_no_torch_compile_machinery(
        local_optimizer: str) -> None:
    """common/task.py's way around torch.optim's torch._dynamo imports: it must step
    exactly as ``Adam.step()`` / ``SGD.step()`` does, and a process that trains must not
    import torch._dynamo (a torch upgrade that moves the wrappers fails here)."""
    import torch

    from common.task import SGD_MOMENTUM, step

    x, y = torch.randn(64, 4), (torch.arange(64) % 2).float()
    models = [FraudNet(ModelSpec(in_features=4)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    for model, ours in zip(models, (False, True)):
        optimizer = (torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
                     if local_optimizer == "adam" else
                     torch.optim.SGD(model.parameters(), lr=1e-1, momentum=SGD_MOMENTUM))
        for _ in range(5):
            optimizer.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(model.eval()(x), y).backward()
            step(optimizer) if ours else optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(*(m.parameters() for m in models)))

    code = ("import sys, numpy as np; from common.task import train; "
            "from common.model import FraudNet, ModelSpec; "
            "train(FraudNet(ModelSpec(in_features=4)), np.ones((64, 4), np.float32), "
            "np.arange(64) % 2, epochs=2, batch_size=16, learning_rate=1e-2, "
            f"pos_weight=1.0, seed=0, local_optimizer={local_optimizer!r}); "
            "print('torch._dynamo' in sys.modules)")
    out = fresh_python(code)
    assert out.strip() == "False"


def test_local_optimizer_picks_the_banks_optimizer(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    made = []
    monkeypatch.setattr("common.task.step", lambda optimizer: made.append(optimizer))
    for name in ("adam", "sgd"):
        train(FraudNet(ModelSpec(in_features=4)), np.ones((8, 4), np.float32),
              np.arange(8) % 2, epochs=1, batch_size=8, learning_rate=0.1, pos_weight=1.0,
              seed=0, local_optimizer=name)
    assert [type(o) for o in made] == [torch.optim.Adam, torch.optim.SGD]
    assert made[1].defaults["momentum"] == 0.9
    with pytest.raises(ValueError, match="local-optimizer must be one of"):
        app_config(local_optimizer="rmsprop")


def test_under_dp_a_bank_trains_with_adam_whatever_local_optimizer_says() -> None:
    # DP-SGD's batch size and learning rate were measured with Adam (pyproject.toml).
    assert app_config(local_optimizer="sgd").optimizer == "sgd"
    assert app_config(local_optimizer="sgd", dp_epsilon=3.0).optimizer == "adam"
    assert app_config(local_optimizer="adam").optimizer == "adam"


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


SCHEMA = Schema("Class", (Column("amount", NUMERIC),
                          Column("channel", CATEGORICAL, ("pos", "web"))))


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("a,b\n1,2\n", "no label column 'Class'"),
        ("a,Class\n", "no rows"),
        ("a,Class\n1,yes\n", "must be 0/1"),
        ("a,Class\n1,\n2,0\n", "must be 0/1 with no gaps"),
        ("a,Class\n1,2\n", "other than 0 and 1"),
        ("a,Class\n1,0\n2,0\n", "holds only 0s"),
        ("a,Class\nx,1\ny,0\n", "non-numeric feature columns ['a'] and no schema.json"),
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


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("amount,Class\n1,0\n2,1\n", "missing ['channel'], unexpected []"),
        ("amount,channel,extra,Class\n1,pos,3,0\n2,web,4,1\n", "unexpected ['extra']"),
        ("amount,channel,Class\n1,pos,0\nabc,web,1\n", "'amount' must be numeric (row 2: 'abc')"),
    ],
)
def test_loader_refuses_files_that_break_the_shared_schema(
    tmp_path: Path, content: str, why: str
) -> None:
    path = write(tmp_path / "transactions.csv", content)
    with pytest.raises(BankDataError, match=f"bank 4: {path}: .*") as err:
        load_transactions(path, "Class", "bank 4", SCHEMA)
    assert why in str(err.value)


@pytest.mark.parametrize(("cell", "shown"), [
    ("inf", "'inf'"), ("-inf", "'-inf'"), ("-Infinity", "'-inf'"),
    ("1e39", "'1e+39'"),  # a float64, but beyond float32: it would become inf
])
def test_loader_refuses_values_that_are_not_finite(
    tmp_path: Path, cell: str, shown: str,
) -> None:
    path = write(tmp_path / "transactions.csv",
                 f"amount,channel,Class\n1,pos,0\n2,web,1\n{cell},web,0\n")
    with pytest.raises(BankDataError) as err:
        load_transactions(path, "Class", "bank 5", SCHEMA)
    assert str(err.value) == (f"bank 5: {path}: column 'amount' holds a value that is not "
                              f"a finite float32 number (row 3: {shown})")


def test_loader_keeps_a_blank_cell_missing_and_large_finite_values(tmp_path: Path) -> None:
    path = write(tmp_path / "transactions.csv", "amount,Class\n1,0\n,1\n3.4e38,0\n")
    x, _, _ = load_transactions(path, "Class", "bank 5")
    assert x[0, 0] == 1 and np.isnan(x[1, 0])
    assert x[2, 0] == np.float32(3.4e38)  # just below float32's largest, 3.4028235e38


def test_prepare_refuses_a_source_with_infinite_values_before_writing(
    tmp_path: Path,
) -> None:
    source = tmp_path / "pooled.csv"
    amount = np.arange(1, 201, dtype=float)
    amount[[3, 150]] = [np.nan, np.inf]  # a gap is fine; the inf is not
    pd.DataFrame({"amount": amount, "fraud": [0, 1] * 100}).to_csv(source, index=False)

    with pytest.raises(BankDataError) as err:
        prepare(tmp_path / "data", str(source), seed=1, num_banks=2, alpha=1.0,
                test_fraction=0.2, label_column="fraud")

    assert str(err.value) == (f"data source: {source}: column 'amount' holds a value "
                              "that is not a finite float32 number (row 151: 'inf')")
    assert not (tmp_path / "data").exists()  # no shard, schema or manifest written


def test_loader_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BankDataError, match="bank 7: .*nope.csv: file not found"):
        load_transactions(tmp_path / "nope.csv", "Class", "bank 7")


def test_loader_reads_features_and_labels(tmp_path: Path) -> None:
    path = write(tmp_path / "b.csv", "f1,Class,f2\n1.5,0,2\n3,1,4\n")
    x, y, schema = load_transactions(path, "Class", "bank 0")
    assert schema.features == ["f1", "f2"]
    assert x.tolist() == [[1.5, 2.0], [3.0, 4.0]] and x.dtype == np.float32
    assert y.tolist() == [0, 1]


def test_a_bank_s_file_is_prepared_once_while_unchanged(tmp_path: Path) -> None:
    """The executor gets the bank's file prepared before forking its tasks; a task gets
    the same rows and scaler, read-only, and a changed file (even with its old mtime)
    or other split settings prepare it again."""
    import os
    from dataclasses import replace

    rows = "".join(f"{value}.5,{value % 2}\n" for value in range(20))
    path = write(tmp_path / "b.csv", "f1,Class\n" + rows)
    config = app_config()
    first = prepared_bank(0, path, config)
    assert prepared_bank(0, path, config) is first
    with pytest.raises(ValueError, match="read-only"):
        first.split.x_train[0, 0] = 9.0
    with pytest.raises(ValueError, match="read-only"):
        first.scaler[0][0] = 9.0
    assert prepared_bank(0, path, replace(config, seed=config.seed + 1)) is not first
    stat = path.stat()
    write(path, "f1,Class\n" + rows.replace(".5,", ".7,"))  # the same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = prepared_bank(0, path, config)
    assert np.allclose(again.split.x_train[:, 0] % 1, 0.7) and again.split.x_train.shape[0] > 10


def test_categories_use_the_shared_schema_and_gaps_become_the_banks_mean(
    tmp_path: Path,
) -> None:
    # This bank has never seen "pos" and has a gap in each column; the shared schema
    # still gives it the same features, in the same order, as every other bank.
    SCHEMA.save(tmp_path / SCHEMA_FILE)
    path = write(tmp_path / "b.csv", "amount,channel,Class\n10,web,0\n,web,1\n30,,0\n"
                 "20,atm,0\n")
    x, y, schema = load_transactions(path, "Class", "bank 2")

    assert schema.features == ["amount", "channel=pos", "channel=web"]
    assert np.isnan(x[1, 0]) and x[[0, 2, 3], 0].tolist() == [10, 30, 20]
    assert x[:, 1:].tolist() == [[0, 1], [0, 1], [0, 0], [0, 0]]  # gap, unknown: none
    scaled = standardize(x, *fit_scaler(x))
    assert np.isfinite(scaled).all() and scaled[1, 0] == 0.0  # the gap: the mean


def test_prepare_splits_any_labelled_csv_with_one_schema(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 2_000
    source = tmp_path / "pooled.csv"
    pd.DataFrame({
        "amount": np.where(rng.random(n) < 0.05, np.nan, rng.exponential(50, n)),
        "channel": rng.choice(["pos", "web", "atm"], n),
        "fraud": (rng.random(n) < 0.05).astype(int),
    }).to_csv(source, index=False)

    manifest = prepare(tmp_path / "data", str(source), seed=1, num_banks=5, alpha=0.5,
                       test_fraction=0.2, label_column="fraud")

    # amount has 5 % gaps: it also gets a 0/1 "amount missing" feature.
    assert manifest["features"] == ["amount", "amount missing", "channel=atm",
                                    "channel=pos", "channel=web"]
    assert sum(b["rows"] for b in manifest["banks"]) + manifest["test"]["rows"] == n
    assert min(b["frauds"] for b in manifest["banks"]) >= 2
    schemas = {(tmp_path / "data" / bank_file(b)).parent.joinpath(SCHEMA_FILE).read_text()
               for b in range(5)}
    assert len(schemas) == 1  # every bank got the same schema
    for bank in range(5):
        x, y, schema = load_transactions(tmp_path / "data" / bank_file(bank), "fraud",
                                         f"bank {bank}")
        assert schema.features == manifest["features"]
        assert len(y) == manifest["banks"][bank]["rows"]


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
    with pytest.raises(ValueError, match="strategy must be one of"):
        app_config(strategy="fedsgd")
    with pytest.raises(ValueError, match="attackers must be bank ids"):
        app_config(attackers="bank three")
    with pytest.raises(ValueError, match="fedprox with dp-epsilon"):
        app_config(strategy="fedprox", dp_epsilon=3.0)
    with pytest.raises(ValueError, match="secagg-malformed.*needs secure-aggregation"):
        app_config(attack="secagg-malformed")  # would silently attack nothing
    assert app_config(attack="secagg-malformed", secure_aggregation=True)


def test_the_model_uses_dp_activation_under_dp_and_activation_without() -> None:
    assert app_config().model_activation == "relu"
    assert app_config(dp_epsilon=3.0).model_activation == "tanh"
    assert app_config(activation="tanh").model_activation == "tanh"
    with pytest.raises(ValueError, match="dp-activation must be one of"):
        app_config(dp_activation="gelu")


def pooled_table(n: int = 3_000, seed: int = 0) -> pd.DataFrame:
    """A small labelled table with an id, a time, a free-text and the usual columns."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "tx_id": np.arange(100_000, 100_000 + n),
        "amount": rng.exponential(50, n),
        "ts": rng.permutation(n) * 60.0,  # seconds, rows not in time order
        "channel": rng.choice(["pos", "web", "atm"], n),
        "note": [f"free text {i}" for i in range(n)],
        "copy_of_ts": np.zeros(n),  # filled below: lets a test see the time in x
        "fraud": (rng.random(n) < 0.05).astype(int),
    }).assign(copy_of_ts=lambda f: f["ts"])


def test_id_time_and_dropped_columns_never_become_features(tmp_path: Path) -> None:
    source = tmp_path / "pooled.csv"
    pooled_table().to_csv(source, index=False)

    manifest = prepare(tmp_path / "data", str(source), seed=1, num_banks=4, alpha=1.0,
                       test_fraction=0.2, label_column="fraud", id_columns="tx_id",
                       time_column="ts", drop_columns="note")

    assert manifest["features"] == ["amount", "channel=atm", "channel=pos", "channel=web",
                                    "copy_of_ts"]
    shard = tmp_path / "data" / bank_file(2)
    schema = Schema.load(shard.parent / SCHEMA_FILE)
    assert (schema.ids, schema.time, schema.dropped) == (("tx_id",), "ts", ("note",))
    written = pd.read_csv(shard)
    assert "note" not in written.columns and {"tx_id", "ts"} <= set(written.columns)
    x, _, _ = load_transactions(shard, "fraud", "bank 2")
    assert x.shape[1] == 5
    # Scoring input may carry the id, the time and the dropped column, or not.
    frame = written.drop(columns=["fraud"]).assign(note="anything")
    fail = BankDataError
    np.testing.assert_array_equal(schema.encode(frame, fail), x)
    np.testing.assert_array_equal(schema.encode(frame[["amount", "channel", "copy_of_ts"]],
                                                fail), x)


def test_out_of_time_split_holds_out_the_latest_rows(tmp_path: Path) -> None:
    source = tmp_path / "pooled.csv"
    pooled_table().to_csv(source, index=False)
    data_dir = tmp_path / "data"
    prepare(data_dir, str(source), seed=1, num_banks=4, alpha=1.0, test_fraction=0.2,
            label_column="fraud", id_columns="tx_id", time_column="ts",
            drop_columns="note")

    test = pd.read_csv(data_dir / TEST_FILE)
    banks = [pd.read_csv(data_dir / bank_file(b)) for b in range(4)]
    assert len(test) == 600
    assert test["ts"].min() > max(bank["ts"].max() for bank in banks)  # latest 20 %
    config = app_config(label_column="fraud", val_fraction=0.15)
    for bank in range(4):
        bank_rows = prepared_bank(bank, data_dir / bank_file(bank), config)
        split = bank_rows.split
        t = bank_rows.schema.features.index("copy_of_ts")
        assert split.x_val[:, t].min() > split.x_train[:, t].max()  # its latest rows
        assert len(split.y_val) == round(0.15 * len(banks[bank]))


def test_without_a_time_column_the_bank_split_stays_random() -> None:
    x = np.arange(200, dtype=np.float32)[:, None]
    y = np.array([0, 1] * 100)
    random = split_bank(x, y, 0.15, seed=3)
    latest = split_bank(x, y, 0.15, seed=3, times=x[:, 0].astype(float))
    assert random.x_val[:, 0].min() < 170
    assert latest.x_val[:, 0].tolist() == list(range(170, 200))


def test_time_column_may_hold_dates_and_names_row_and_column_when_not(tmp_path) -> None:
    frame = pd.DataFrame({"when": ["2024-01-02 10:00", "2024-01-01", "2024-01-03T00:00:01"]})
    order = time_order(frame["when"], BankDataError)
    assert np.argsort(order).tolist() == [1, 0, 2]
    with pytest.raises(BankDataError, match=r"time column 'when': row 2: 'soon' is neither"):
        time_order(pd.Series(["2024-01-01", "soon"], name="when"), BankDataError)
    with pytest.raises(BankDataError, match=r"time column 'when': row 1 has no time"):
        time_order(pd.Series([None, 3.0], name="when"), BankDataError)


@pytest.mark.parametrize(
    ("settings", "why"),
    [
        ({"id_columns": "nope"}, "id-columns: no column 'nope'"),
        ({"time_column": "fraud"}, "column 'fraud' is in time-column and label-column"),
        ({"id_columns": "tx_id", "drop_columns": "tx_id"},
         "column 'tx_id' is in drop-columns and id-columns"),
        ({"time_column": "note"}, "time column 'note': row 1: 'free text 0' is neither"),
    ],
)
def test_special_column_settings_are_checked_against_the_file(
    tmp_path: Path, settings: dict, why: str
) -> None:
    source = tmp_path / "pooled.csv"
    pooled_table(200).to_csv(source, index=False)
    with pytest.raises(BankDataError) as err:
        prepare(tmp_path / "data", str(source), seed=1, num_banks=2, alpha=1.0,
                test_fraction=0.2, label_column="fraud", **settings)
    assert str(err.value).startswith(f"data source: {source}: ")
    assert why in str(err.value)


def zipf_values(rng: np.random.Generator, n: int, distinct: int, prefix: str) -> np.ndarray:
    weights = 1.0 / np.arange(1, distinct + 1) ** 1.1
    values = np.array([f"{prefix}{i:04d}.example" for i in range(distinct)], dtype=object)
    return values[rng.choice(distinct, n, p=weights / weights.sum())]


def test_a_1200_value_text_column_is_top_k_other_and_missing_at_every_bank(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(3)
    n = 20_000
    domains = zipf_values(rng, n, 1_200, "mail")
    domains[rng.random(n) < 0.02] = None
    source = tmp_path / "pooled.csv"
    pd.DataFrame({"amount": rng.exponential(50, n), "email": domains,
                  "fraud": (rng.random(n) < 0.04).astype(int)}).to_csv(source, index=False)
    assert pd.read_csv(source)["email"].nunique() > 1_000

    manifest = prepare(tmp_path / "data", str(source), seed=1, num_banks=5, alpha=0.5,
                       test_fraction=0.2, label_column="fraud")

    email = [f for f in manifest["features"] if f.startswith("email=")]
    assert len(email) == 52 and email[-2:] == ["email=<other>", "email=<missing>"]
    assert "email=mail0000.example" in email  # the most common ones
    for bank in range(5):
        shard = tmp_path / "data" / bank_file(bank)
        x, _, schema = load_transactions(shard, "fraud", f"bank {bank}")
        block = x[:, [schema.features.index(f) for f in email]]
        assert (block.sum(axis=1) == 1).all()  # each row: exactly one of the 52
        raw = pd.read_csv(shard)["email"]
        np.testing.assert_array_equal(block[:, -1], raw.isna())
        top = set(f.removeprefix("email=") for f in email[:-2])
        np.testing.assert_array_equal(block[:, -2], raw.notna() & ~raw.isin(top))


def test_a_value_no_bank_had_sets_other_and_never_fails() -> None:
    frame = pd.DataFrame({"email": [f"d{i % 80}" for i in range(800)] + [None] * 20})
    schema = Schema.infer(frame.assign(Class=0), "Class", max_categories=10)
    assert len(schema.features) == 12

    x = schema.encode(pd.DataFrame({"email": ["d0", "never.seen", None]}), BankDataError)

    other, missing = schema.features.index("email=<other>"), -1
    assert x[0, schema.features.index("email=d0")] == 1 and x[0].sum() == 1
    assert x[1, other] == 1 and x[1].sum() == 1
    assert x[2, missing] == 1 and x[2].sum() == 1


def test_a_value_seen_in_fewer_than_five_rows_gets_no_feature_of_its_own() -> None:
    frame = pd.DataFrame({"v": [f"c{i}" for i in range(60)] * 5 + ["rare"] * 4})
    schema = Schema.infer(frame.assign(Class=0), "Class", max_categories=100)
    assert "v=rare" in schema.features  # up to max-categories values: all of them
    schema = Schema.infer(frame.assign(Class=0), "Class", max_categories=50)
    assert "v=rare" not in schema.features and len(schema.features) == 52


def test_numeric_columns_with_gaps_get_a_missing_indicator() -> None:
    n = 1_000
    frame = pd.DataFrame({"gappy": np.where(np.arange(n) % 3 == 0, np.nan, 1.5),
                          "rare_gap": np.where(np.arange(n) < 5, np.nan, 2.0),  # 0.5 %
                          "full": np.ones(n), "Class": 0})
    schema = Schema.infer(frame, "Class")
    assert schema.features == ["gappy", "gappy missing", "rare_gap", "full"]

    x = schema.encode(frame.drop(columns="Class"), BankDataError)
    np.testing.assert_array_equal(x[:, 1], frame["gappy"].isna())
    assert np.isnan(x[:, 0]).sum() == 334  # the value itself stays a gap for the scaler


def test_schema_file_round_trips_and_old_schema_files_still_load(tmp_path: Path) -> None:
    schema = Schema("Class", (Column("amount", NUMERIC, missing=True),
                              Column("email", CATEGORICAL, ("a", "b"), True, True)),
                    ids=("id",), time="t", dropped=("note",))
    schema.save(tmp_path / SCHEMA_FILE)
    assert Schema.load(tmp_path / SCHEMA_FILE) == schema
    old = {"label": "Class", "columns": [{"name": "a", "kind": NUMERIC, "categories": []}]}
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert Schema.load(tmp_path / "old.json") == Schema("Class", (Column("a", NUMERIC),))


def test_feature_names_that_collide_are_refused_naming_the_column() -> None:
    frame = pd.DataFrame({"a": [np.nan, 1.0] * 10, "a missing": 1.0, "Class": 0})
    with pytest.raises(BankDataError, match="column 'a missing': its feature 'a missing'"):
        Schema.infer(frame, "Class")


def prepared_parties(tmp_path: Path) -> tuple[Schema, list[pd.DataFrame]]:
    """A pooled CSV prepared into 6 banks: the pooled path's schema and every party's
    rows (the banks' and the server's), as each would read its own file."""
    rng = np.random.default_rng(5)
    n = 12_000
    frame = pooled_table(n, seed=5)
    frame["channel"] = rng.choice(["pos", "web", "atm", "phone"], n, p=[.5, .3, .199, .001])
    frame.loc[rng.choice(n, 3, replace=False), "channel"] = "kiosk"  # 3 rows in all
    frame["email"] = zipf_values(rng, n, 1_200, "mail")
    frame["device_score"] = np.where(rng.random(n) < 0.4, np.nan, rng.normal(size=n))
    source = tmp_path / "pooled.csv"
    frame.to_csv(source, index=False)
    prepare(tmp_path / "data", str(source), seed=2, num_banks=6, alpha=0.5,
            test_fraction=0.2, label_column="fraud", id_columns="tx_id", time_column="ts",
            drop_columns="note")
    data_dir = tmp_path / "data"
    files = [data_dir / bank_file(b) for b in range(6)] + [data_dir / TEST_FILE]
    return Schema.load(files[0].parent / SCHEMA_FILE), [pd.read_csv(f) for f in files]


def agree(parties: list[pd.DataFrame], min_count: int) -> Schema:
    """Each party summarizes its own rows; the summaries travel as JSON; merged."""
    ignore = ("tx_id", "ts", "note")
    summaries = [json.loads(json.dumps(summarize(rows, "fraud", ignore, f"bank {b}",
                                                 min_count)))
                 for b, rows in enumerate(parties)]
    return Schema.merge(summaries, "fraud", ("tx_id",), "ts", ("note",), max_categories=50)


def test_schema_from_bank_summaries_equals_the_pooled_schema(tmp_path: Path) -> None:
    pooled, parties = prepared_parties(tmp_path)
    assert [c.name for c in pooled.columns] == ["amount", "channel", "copy_of_ts", "email",
                                               "device_score"]

    assert agree(parties, min_count=1) == pooled  # nothing suppressed: the same schema


def test_the_summaries_exchange_by_command_gives_the_agreed_schema(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each bank runs `fedfraud-bank summarize` on its own file, the operator runs
    `fedfraud schema` on the summaries it received: the schema the merge agrees."""
    from client.cli import main as bank_main
    from server.cli import main as operator_main

    _, parties = prepared_parties(tmp_path)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for bank, rows in enumerate(parties[:-1]):  # the banks, not the server's test set
        own = tmp_path / f"bank{bank}.csv"
        rows.to_csv(own, index=False)
        assert bank_main(["summarize", "--transactions", str(own), "--name",
                          f"bank {bank}", "--out", str(inbox / f"bank{bank}.json"),
                          "--label-column", "fraud", "--id-columns", "tx_id",
                          "--time-column", "ts", "--drop-columns", "note"]) == 0
    sent = json.loads((inbox / "bank0.json").read_text())
    assert "fraud" not in sent["stats"] and "tx_id" not in sent["stats"]
    settings = ["--app-dir", str(APP_DIR), "--set", "label-column='fraud'",
                "--set", "id-columns='tx_id'", "--set", "time-column='ts'",
                "--set", "drop-columns='note'"]
    out = tmp_path / "schema.json"

    assert operator_main([*settings, "schema", "--summaries", str(inbox),
                          "--out", str(out)]) == 0

    summaries = [json.loads(p.read_text()) for p in sorted(inbox.glob("*.json"))]
    agreed = Schema.load(out)
    assert agreed == Schema.merge(summaries, "fraud", ("tx_id",), "ts", ("note",),
                                  max_categories=50, log_skewed=True)  # the defaults
    assert [c.name for c in agreed.columns if c.log] == ["amount"]
    # A bank that leaves out its log-skewed answers: every column as it is, and the
    # operator is told which bank.
    capsys.readouterr()
    assert bank_main(["summarize", "--transactions", str(tmp_path / "bank0.csv"),
                      "--name", "bank 5", "--out", str(inbox / "bank5.json"),
                      "--no-log-skewed", "--label-column", "fraud", "--id-columns",
                      "tx_id", "--time-column", "ts", "--drop-columns", "note"]) == 0
    assert "skewed" not in json.loads((inbox / "bank5.json").read_text())["stats"]["amount"]
    capsys.readouterr()
    assert operator_main([*settings, "schema", "--summaries", str(inbox),
                          "--out", str(out)]) == 0
    assert not any(c.log for c in Schema.load(out).columns)
    assert "bank 5 sent no log-skewed answers" in capsys.readouterr().err
    (inbox / "bank5.json").unlink()
    # A bank whose columns differ: one line naming it, exit 1, no schema written.
    parties[0].drop(columns=["amount"]).to_csv(tmp_path / "odd.csv", index=False)
    bank_main(["summarize", "--transactions", str(tmp_path / "odd.csv"), "--name",
               "bank 9", "--out", str(inbox / "odd.json"), "--label-column", "fraud",
               "--id-columns", "tx_id", "--time-column", "ts", "--drop-columns", "note"])
    capsys.readouterr()
    assert operator_main([*settings, "schema", "--summaries", str(inbox), "--out",
                          str(tmp_path / "other.json")]) == 1
    error = capsys.readouterr().err
    assert "bank 9" in error and "amount" in error and len(error.splitlines()) == 1
    assert not (tmp_path / "other.json").exists()


@pytest.mark.parametrize("content", [
    "not json", "[1, 2]", '{"owner": "x", "rows": 1, "columns": [], "stats": []}',
    '{"owner": "x", "rows": 1, "columns": ["a"]}',
    '{"owner": "x", "rows": 1, "columns": ["a"], "stats": {"a": 3}}'])
def test_a_file_that_is_not_a_banks_summary_is_one_line_naming_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str) -> None:
    from server.cli import main as operator_main

    (tmp_path / "inbox").mkdir()
    (tmp_path / "inbox" / "odd.json").write_text(content)

    assert operator_main(["--app-dir", str(APP_DIR), "schema", "--summaries",
                          str(tmp_path / "inbox"), "--out", str(tmp_path / "s.json")]) == 1
    error = capsys.readouterr().err
    assert "odd.json" in error and len(error.splitlines()) == 1, error
    assert not (tmp_path / "s.json").exists()


def test_suppressing_rare_values_changes_only_those(tmp_path: Path) -> None:
    pooled, parties = prepared_parties(tmp_path)

    agreed = agree(parties, min_count=5)

    def suppressed_somewhere(column: str, value: str) -> bool:
        return any(0 < (rows[column] == value).sum() < 5 for rows in parties)

    by_name = {c.name: c for c in pooled.columns}
    assert [c.name for c in agreed.columns] == list(by_name)
    for column in agreed.columns:
        if column.kind == NUMERIC:
            assert column == by_name[column.name]  # kinds and gap indicators: the same
    # Few values: one feature for each value some party holds 5 times.
    channel = by_name["channel"]
    kept = {v for v in channel.categories
            if max((rows["channel"] == v).sum() for rows in parties) >= 5}
    assert "kiosk" not in kept and {"pos", "web", "atm"} <= kept
    assert set(agreed.columns[1].categories) == kept
    # Many values: the same 50 + <other> + <missing>, except that a value whose count
    # was cut at some party may give its place to the next one.
    email, pooled_email = agreed.columns[3], by_name["email"]
    assert (email.other, email.missing, len(email.categories)) == (True, True, 50)
    lost = set(pooled_email.categories) - set(email.categories)
    assert len(lost) < 10 and all(suppressed_somewhere("email", v) for v in lost)
    assert {f"mail{i:04d}.example" for i in range(20)} <= set(email.categories)


def test_a_summary_leaves_rare_values_and_all_numbers_at_the_bank() -> None:
    rows = pd.DataFrame({"amount": [123.25, 7.5] * 10, "channel": ["pos"] * 19 + ["kiosk"],
                         "id": range(20), "Class": [0, 1] * 10})

    summary = summarize(rows, "Class", ignore=("id",), owner="bank 1")

    assert summary == {"owner": "bank 1", "rows": 20,
                       "columns": ["amount", "channel", "id"],
                       "stats": {"amount": {"kind": NUMERIC, "missing": 0},
                                 "channel": {"kind": "text", "missing": 0,
                                             "counts": {"pos": 19}}}}
    # With log-skewed, two yes/no answers per numeric column; skewed only from 20 values.
    asked = summarize(rows, "Class", ignore=("id",), owner="bank 1", log_skewed=True)
    assert asked["stats"]["amount"] == {"kind": NUMERIC, "missing": 0,
                                        "nonnegative": True, "skewed": False}
    few = summarize(pd.DataFrame({"amount": [1.0, 1.0, 1000.0], "Class": [0, 1, 0]}),
                    "Class", log_skewed=True)
    assert few["stats"]["amount"]["skewed"] is False


def test_a_non_negative_column_skewed_at_some_bank_is_read_as_log1p(tmp_path) -> None:
    """Two yes/no answers per numeric column leave the bank; with log-skewed the merge
    reads a column as log(1 + x) only if no bank has a value below 0 and some bank's
    are skewed; without it, or from summaries without those answers, as it is."""
    rng = np.random.default_rng(0)
    lognormal = np.exp(rng.normal(3, 1.5, 400))
    def bank(amount, balance, owner: str) -> dict:
        rows = pd.DataFrame({"amount": amount, "balance": balance, "hour": rng.integers(
            0, 24, len(amount)), "Class": [0, 1] * (len(amount) // 2)})
        return summarize(rows, "Class", owner=owner, min_count=1, log_skewed=True)

    even = rng.uniform(0, 100, 400)
    first = bank(lognormal, lognormal, "bank 0")
    assert first["stats"]["amount"] == {"kind": NUMERIC, "missing": 0,
                                        "nonnegative": True, "skewed": True}
    assert first["stats"]["hour"]["skewed"] is False
    # bank 1: amounts not skewed, a balance below 0 once
    second = bank(even, np.where(np.arange(400) == 7, -5.0, even), "bank 1")
    assert not any(c.log for c in Schema.merge([first, second], "Class").columns)
    schema = Schema.merge([first, second], "Class", log_skewed=True)  # log-skewed = true
    assert {c.name: c.log for c in schema.columns} == {
        "amount": True, "balance": False, "hour": False}
    old = [{**summary, "stats": {name: {k: v for k, v in st.items()
                                        if k not in ("nonnegative", "skewed")}
                                 for name, st in summary["stats"].items()}}
           for summary in (first, second)]
    assert not any(c.log for c in Schema.merge(old, "Class", log_skewed=True).columns)

    frame = pd.DataFrame({"amount": [0.0, np.e - 1, None], "balance": [-3.0, 1.0, 2.0],
                          "hour": [1, 2, 3]})
    fail = lambda why: BankDataError(f"bank 0 (own.csv): {why}")  # noqa: E731
    encoded = schema.encode(frame, fail)
    assert np.allclose(encoded[:2, 0], [0.0, 1.0]) and np.isnan(encoded[2, 0])
    assert list(encoded[:, 1]) == [-3.0, 1.0, 2.0]  # as it is
    # A later value below 0 (a refund) is scored, mirrored: -log(1 + |value|).
    refund = schema.encode(frame.assign(amount=[1.0, -(np.e - 1), 2.0]), fail)
    assert np.allclose(refund[:, 0], [np.log(2), -1.0, np.log(3)])
    schema.save(tmp_path / SCHEMA_FILE)
    assert Schema.load(tmp_path / SCHEMA_FILE) == schema


def test_merge_refuses_banks_that_disagree_naming_bank_and_column() -> None:
    a = pd.DataFrame({"amount": [1.0, 2.0], "channel": ["pos", "web"], "Class": [0, 1]})
    def summary(rows: pd.DataFrame, owner: str) -> dict:
        return summarize(rows, "Class", owner=owner, min_count=1, log_skewed=True)

    with pytest.raises(BankDataError, match=r"bank 1: columns differ from bank 0's: "
                                            r"missing \['channel'\]"):
        Schema.merge([summary(a, "bank 0"), summary(a[["amount", "Class"]], "bank 1")],
                     "Class")
    text = a.assign(amount=["1.0", "two"])
    with pytest.raises(BankDataError, match="column 'amount' holds numbers at bank 0 but "
                                            "text at bank 1"):
        Schema.merge([summary(a, "bank 0"), summary(text, "bank 1")], "Class")
    # A bank with no value in a text column (read as numbers) agrees with the others.
    empty = a.assign(channel=np.nan)
    merged = Schema.merge([summary(a, "bank 0"), summary(empty, "bank 1")], "Class")
    assert merged.features == ["amount", "channel=pos", "channel=web"]


def test_cards_are_deterministic_per_seed_and_look_like_a_banks_table() -> None:
    started = time.monotonic()
    cards, kinds = make_cards(seed=3)
    seconds = time.monotonic() - started

    assert seconds < 10
    assert tuple(cards.columns) == (*CARDS_COLUMNS, "Class") and len(cards) == 200_000
    again, kinds_again = make_cards(seed=3)
    pd.testing.assert_frame_equal(cards, again)
    np.testing.assert_array_equal(kinds, kinds_again)
    assert not cards.equals(make_cards(seed=4)[0])
    assert abs(cards["Class"].mean() - 0.03) < 0.005
    np.testing.assert_array_equal(cards["Class"], kinds != LEGIT)
    assert cards["TransactionID"].is_unique
    assert cards["TransactionDT"].is_monotonic_increasing
    assert 150 < np.ptp(cards["TransactionDT"]) / 86_400 < 200  # about six months
    amount = cards["amount"]
    assert (amount > 0).all() and amount.mean() > 2 * amount.median()  # skewed
    distinct = cards.nunique()
    assert distinct["merchant_category"] == 20 and 25 <= distinct["country"] <= 30
    assert distinct["device"] >= 400 and distinct["email_domain"] >= 900
    gaps = cards.isna().mean()
    assert 0.3 <= gaps["dist_home_km"] <= 0.6 and 0.3 <= gaps["device_age_days"] <= 0.6
    assert (gaps[["amount", "device", "email_domain", "card_tx_1h", "Class"]] == 0).all()
    assert (cards["hour"] == (cards["TransactionDT"] // 3_600) % 24).all()
    # Card testing is fast and small; account takeover large and from new devices.
    frauds = cards.groupby(kinds)
    assert frauds["card_tx_1h"].mean()[CARD_TESTING] > 5 * frauds["card_tx_1h"].mean()[LEGIT]
    assert frauds["amount"].median()[CARD_TESTING] < 10 < frauds["amount"].median()[LEGIT]
    assert frauds["amount"].median()[ACCOUNT_TAKEOVER] > 4 * frauds["amount"].median()[LEGIT]


def test_cards_banks_see_different_fraud_kinds() -> None:
    cards, kinds = make_cards(seed=7)
    y = cards["Class"].to_numpy()

    parts = dirichlet_partition(y, num_banks=10, alpha=0.35, seed=7, strata=kinds)

    assert sorted(np.concatenate(parts).tolist()) == list(range(len(y)))
    sizes = [len(part) for part in parts]
    assert max(sizes) > 10 * min(sizes)  # banks of very unequal size
    dominant = {}
    for bank, part in enumerate(parts):
        fraud_kinds = kinds[part][kinds[part] != LEGIT]
        if len(fraud_kinds) >= 20:
            testing = np.mean(fraud_kinds == CARD_TESTING)
            dominant[bank] = (CARD_TESTING if testing > 0.8 else ACCOUNT_TAKEOVER
                              if testing < 0.2 else None)
            # Visible in the data too: the fraud's amounts and card velocity.
            fraud = cards.iloc[part][cards.iloc[part]["Class"] == 1]
            if dominant[bank] == CARD_TESTING:
                assert fraud["amount"].median() < 10 and fraud["card_tx_1h"].mean() > 1
            if dominant[bank] == ACCOUNT_TAKEOVER:
                assert fraud["amount"].median() > 50 and fraud["card_tx_1h"].mean() < 1
    assert {CARD_TESTING, ACCOUNT_TAKEOVER} <= set(dominant.values())


def test_prepare_cards_marks_its_id_and_time_and_every_bank_loads_it(tmp_path: Path) -> None:
    data_dir = tmp_path / "cards"
    manifest = prepare(data_dir, "cards", seed=7, num_banks=10, alpha=0.35,
                       test_fraction=0.2, label_column="Class")

    schema = Schema.load(data_dir / "server" / SCHEMA_FILE)
    assert (schema.ids, schema.time) == (("TransactionID",), "TransactionDT")
    features = manifest["features"]
    assert not any(f.startswith(("TransactionID", "TransactionDT")) for f in features)
    assert sum(f.startswith("email_domain=") for f in features) == 52
    assert sum(f.startswith("device=") for f in features) == 52
    assert sum(f.startswith("merchant_category=") for f in features) == 20
    assert {"dist_home_km missing", "device_age_days missing",
            "account_age_days missing"} <= set(features)
    assert manifest["test"]["split"] == "latest rows by 'TransactionDT'"
    kinds = [bank["fraud_kinds"] for bank in manifest["banks"]]
    assert sum(k["card testing"] + k["account takeover"] for k in kinds) == sum(
        bank["frauds"] for bank in manifest["banks"])
    test_start = pd.read_csv(data_dir / TEST_FILE, usecols=["TransactionDT"]).min().item()
    config = app_config(data_dir=str(data_dir))
    for bank in (0, 9):
        split = prepared_bank(bank, data_dir / bank_file(bank), config).split
        assert split.x_train.shape[1] == len(features)
        shard = pd.read_csv(data_dir / bank_file(bank), usecols=["TransactionDT"])
        assert shard["TransactionDT"].max() < test_start


def test_built_in_sources_are_names_not_paths() -> None:
    from server.cli import settings
    from tests.conftest import APP_DIR

    assert settings(APP_DIR, ["data-source = 'cards'"]).data_source == "cards"
    assert settings(APP_DIR, ["data-source = 'x.csv'"]).data_source == str(APP_DIR / "x.csv")


def test_100_banks_at_alpha_035_get_a_dealt_floor_instead_of_a_traceback() -> None:
    _, y = make_synthetic(7)
    _, y_banks, _, _ = hold_out(np.arange(len(y)), y, 0.2, seed=7)

    parts = dirichlet_partition(y_banks, num_banks=100, alpha=0.35, seed=7)

    assert len(parts) == 100
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(y_banks)))
    assert min(len(part) for part in parts) >= 20
    assert min(y_banks[part].sum() for part in parts) >= 2
    assert min((y_banks[part] == 0).sum() for part in parts) >= 2
    sizes = sorted(len(part) for part in parts)
    assert sizes[-1] > 50 * sizes[0]  # still far from IID
    assert dirichlet_partition(y_banks, 100, 0.35, seed=7)[5].tolist() == parts[5].tolist()


def test_partition_that_no_floor_can_meet_says_which_setting_to_change() -> None:
    y = np.array([1] * 300 + [0] * 1_000)  # 100 banks x 18 legitimate rows: too few
    with pytest.raises(BankDataError, match="lower num-banks or raise alpha"):
        dirichlet_partition(y, num_banks=60, alpha=0.05, seed=1)
    with pytest.raises(BankDataError, match="cannot give 100 banks.*lower num-banks"):
        dirichlet_partition(y, num_banks=100, alpha=0.35, seed=1)


def run_prepare(tmp_path: Path, frame: pd.DataFrame, *settings: str,
                action: tuple[str, ...] = ("prepare",)):
    import subprocess
    import sys

    from tests.conftest import APP_DIR

    source = tmp_path / "bad.csv"
    frame.to_csv(source, index=False)
    overrides = [f"data-source='{source}'", f"data-dir='{tmp_path / 'data'}'",
                 "label-column='fraud'", "num-banks=2", *settings]
    command = [sys.executable, "-m", "server.cli", "--app-dir", str(APP_DIR),
               "--flwr-home", str(tmp_path / "flwr")]
    for item in overrides:
        command += ["--set", item]
    done = subprocess.run([*command, *action], cwd=APP_DIR, capture_output=True,
                          text=True, timeout=120)
    return source, done


@pytest.mark.parametrize("action", [("simulate",), ("deploy", "--insecure")])
def test_simulate_and_deploy_on_bad_data_print_one_line_and_leave_nothing_running(
        tmp_path: Path, action: tuple[str, ...]) -> None:
    """They prepare the data first (deploy while its SuperLink starts): a data problem
    ends them as it ends ``prepare``, in one line, with no process left behind. A text
    cell in the label column names that cell, not a "0" the text made a string."""
    from common.processes import processes_with_env

    frame = pooled_table(500).astype({"fraud": object})
    frame.loc[3, "fraud"] = "yes"
    source, done = run_prepare(tmp_path, frame, action=action)

    assert done.returncode == 1
    assert "Traceback" not in done.stderr + done.stdout
    assert done.stderr == (f"fedfraud: data source: {source}: label column 'fraud' must "
                           "be 0/1 (row 4: 'yes')\n")
    assert not processes_with_env(f"FLWR_HOME={tmp_path / 'flwr'}")


@pytest.mark.parametrize(
    ("change", "settings", "why"),
    [
        (lambda f: f.assign(amount=f["amount"].astype(object)).assign(
            amount=lambda g: g["amount"].where(g.index != 6, "unknown")), (),
         "column 'amount' holds numbers but 1 text values (row 7: 'unknown')"),
        (lambda f: f.assign(fraud=f["fraud"].where(f.index != 3, 2)), (),
         "label column 'fraud' must be 0/1 (row 4: 2)"),
        (lambda f: f, ("time-column='when'",), "time-column: no column 'when'"),
    ],
)
def test_prepare_on_a_bad_column_prints_one_line_naming_file_and_column(
    tmp_path: Path, change, settings: tuple[str, ...], why: str
) -> None:
    source, done = run_prepare(tmp_path, change(pooled_table(500)), *settings)

    assert done.returncode == 1
    assert "Traceback" not in done.stderr + done.stdout
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith(f"fedfraud: data source: {source}: ")
    assert why in done.stderr


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"\xff\xfe\x00\x81amount\n\x93\n", "not a readable CSV"),
        (b"amount,Class\n1,0\n", "no label column 'fraud' (label-column; columns: amount, "),
        (b"amount,fraud\n" + b"1.5,0\n2.5,1\n" * 10, "cannot give 2 banks 20 rows"),
        (b"", "not a readable CSV"),
    ],
)
def test_prepare_data_problems_are_one_line_errors(tmp_path: Path, content: bytes,
                                                   why: str) -> None:
    source = tmp_path / "pooled.csv"
    source.write_bytes(content)
    with pytest.raises(BankDataError) as err:
        prepare(tmp_path / "data", str(source), seed=1, num_banks=2, alpha=1.0,
                test_fraction=0.2, label_column="fraud")
    assert str(err.value).startswith(f"data source: {source}: ")
    assert why in str(err.value) and "\n" not in str(err.value)


def test_prepare_reports_each_step_with_elapsed_time(tmp_path: Path) -> None:
    source = tmp_path / "pooled.csv"
    pooled_table(3_000).to_csv(source, index=False)
    lines: list[str] = []

    prepare(tmp_path / "data", str(source), seed=1, num_banks=12, alpha=1.0,
            test_fraction=0.2, label_column="fraud", id_columns="tx_id", time_column="ts",
            drop_columns="note", progress=lines.append)

    assert all(re.fullmatch(r".+ \[\d+\.\d s\]", line) for line in lines), lines
    steps = [line.rsplit(" [", 1)[0] for line in lines]
    assert steps[0] == f"reading {source}"
    assert steps[1].startswith(f"{source}: 3,000 rows, 7 columns, ")
    assert steps[2] == "schema: 5 features from 3 columns"
    assert steps[3].startswith("test set: 600 rows") and "the latest by 'ts'" in steps[3]
    assert steps[4].startswith("partition: 12 banks of ")
    manifest = tmp_path / "data" / MANIFEST
    assert steps[5:] == ["wrote 10 of 12 banks' files", "wrote 12 of 12 banks' files",
                         f"wrote the server's test set; manifest in {manifest}"]


@pytest.mark.parametrize(("setting", "said"), [
    ("dirichlet-alpha=0.3", "fedfraud: run config: unknown keys: dirichlet-alpha"),
    ("seed='1'", "fedfraud: run config: seed must be int"),
    ("data-source=cards", "fedfraud: --set 'data-source=cards' is not key=value in TOML"),
])
def test_a_bad_setting_is_one_line_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture,
                                             setting: str, said: str) -> None:
    from server.cli import main as operator_main

    assert operator_main(["--set", f"data-dir='{tmp_path}'", "--set", setting,
                          "prepare"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(said) and error.count("\n") == 1, error
    assert not any(tmp_path.iterdir())  # nothing prepared


def test_fedfraud_prepare_prints_its_progress(tmp_path: Path) -> None:
    _, done = run_prepare(tmp_path, pooled_table(500), "drop-columns='note'")

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("fedfraud: preparing 2 banks in ")
    assert any(line.startswith("fedfraud: prepare: schema: ") for line in lines)
    assert lines[-1] == f"fedfraud: banks' data in {tmp_path / 'data'}"


@pytest.mark.parametrize("log_skewed", [False, True])
def test_prepare_reads_skewed_amounts_as_log1p_only_with_log_skewed(
        tmp_path: Path, log_skewed: bool) -> None:
    rng = np.random.default_rng(3)
    rows = pd.DataFrame({"amount": np.round(np.exp(rng.normal(3, 1.5, 600)), 2),
                         "score": rng.normal(size=600), "Class": [0] * 570 + [1] * 30})
    rows.to_csv(tmp_path / "source.csv", index=False)

    prepare(tmp_path / "data", str(tmp_path / "source.csv"), seed=1, num_banks=2,
            alpha=100.0, test_fraction=0.2, label_column="Class", log_skewed=log_skewed)

    schema = Schema.load((tmp_path / "data" / bank_file(0)).parent / SCHEMA_FILE)
    assert {c.name: c.log for c in schema.columns} == {"amount": log_skewed,
                                                       "score": False}
