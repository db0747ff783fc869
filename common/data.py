"""Transaction data: the synthetic generator, bank partitioning, shard files, loading.

Data flow: ``prepare`` generates the tutorial's data set once, holds out the server's
test set, splits the rest into one shard per bank (Dirichlet non-IID, every row used
exactly once, no bank ever gets another bank's rows) and writes one CSV per bank plus
a manifest. A bank only ever reads its own CSV with ``load_transactions``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.config import Config

# One folder per party, so that each can be given (mounted) only its own files.
MANIFEST = "manifest.json"
TEST_FILE = "server/test.csv"
SCALER_FILE = "scaler.json"

# The tutorial's generator, unchanged, so results compare with its numbers.
SYNTHETIC = dict(
    n_samples=60_000,
    n_features=30,
    n_informative=18,
    n_redundant=8,
    weights=[0.985, 0.015],  # 1.5 % fraud
    class_sep=1.5,
    flip_y=0.01,
)
# A bank needs enough rows for a train and a validation split; redraw below this.
MIN_BANK_ROWS = 20
MAX_PARTITION_DRAWS = 1000


class BankDataError(ValueError):
    """A bank's data file cannot be used; the message names the bank and the file."""


@dataclass(frozen=True)
class BankSplit:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


def bank_file(bank: int) -> str:
    return f"bank_{bank:02d}/transactions.csv"


def make_synthetic(seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_classification

    x, y = make_classification(random_state=seed, **SYNTHETIC)
    return x.astype(np.float32), y.astype(np.int64)


def hold_out(
    x: np.ndarray, y: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split off ``fraction`` of the rows, stratified by label when possible.

    Returns (x_keep, y_keep, x_out, y_out). Stratification needs two rows of each
    class; a smaller class makes this fall back to a plain shuffled split rather than
    crash (the tutorial crashed here on fraud-poor banks).
    """
    from sklearn.model_selection import train_test_split

    _, class_counts = np.unique(y, return_counts=True)
    stratify = y if len(class_counts) == 2 and class_counts.min() >= 2 else None
    n_out = max(1, round(fraction * len(y)))
    x_keep, x_out, y_keep, y_out = train_test_split(
        x, y, test_size=n_out, stratify=stratify, random_state=seed
    )
    return x_keep, y_keep, x_out, y_out


def dirichlet_partition(
    y: np.ndarray, num_banks: int, alpha: float, seed: int, min_rows: int = MIN_BANK_ROWS
) -> list[np.ndarray]:
    """Row indices per bank: each class is spread over banks by a Dirichlet(alpha) draw.

    Every row lands in exactly one bank. A draw that leaves a bank with fewer than
    ``min_rows`` rows is redrawn; a bank may end up with no fraud at all, which is
    real life and must be handled by training, not by borrowing other banks' rows.
    """
    if num_banks < 1 or alpha <= 0:
        raise ValueError("num_banks must be >= 1 and alpha > 0")
    if len(y) < num_banks * min_rows:
        raise ValueError(f"{len(y)} rows cannot give {num_banks} banks {min_rows} rows each")
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(y == label) for label in np.unique(y)]
    for _ in range(MAX_PARTITION_DRAWS):
        banks: list[list[np.ndarray]] = [[] for _ in range(num_banks)]
        for rows in by_class:
            rows = rng.permutation(rows)
            shares = rng.dirichlet(np.full(num_banks, alpha))
            cuts = np.round(np.cumsum(shares)[:-1] * len(rows)).astype(int)
            for bank, part in enumerate(np.split(rows, cuts)):
                banks[bank].append(part)
        parts = [np.sort(np.concatenate(bank)) for bank in banks]
        if min(len(part) for part in parts) >= min_rows:
            return parts
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) draw gave all {num_banks} banks {min_rows} rows"
        f" in {MAX_PARTITION_DRAWS} tries; raise alpha or lower the number of banks"
    )


def feature_names(n_features: int) -> list[str]:
    return [f"f{i:02d}" for i in range(n_features)]


def write_csv(path: Path, x: np.ndarray, y: np.ndarray, label_column: str) -> None:
    import pandas as pd

    frame = pd.DataFrame(x, columns=feature_names(x.shape[1]))
    frame[label_column] = y
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False, float_format="%.9g")  # float32 round-trips exactly


def data_settings(config: Config) -> dict[str, Any]:
    """The settings that decide the prepared data (recorded in its manifest)."""
    return {"seed": config.seed, "num_banks": config.num_banks, "alpha": config.alpha,
            "test_fraction": config.test_fraction, "label_column": config.label_column}


def prepare_synthetic(
    out_dir: Path, seed: int, num_banks: int, alpha: float, test_fraction: float,
    label_column: str,
) -> dict[str, Any]:
    """Write one shard per bank, the server's test set and a manifest; return it."""
    x, y = make_synthetic(seed)
    x_banks, y_banks, x_test, y_test = hold_out(x, y, test_fraction, seed)
    parts = dirichlet_partition(y_banks, num_banks, alpha, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    banks = []
    for bank, rows in enumerate(parts):
        write_csv(out_dir / bank_file(bank), x_banks[rows], y_banks[rows], label_column)
        banks.append(
            {"bank": bank, "file": bank_file(bank), "rows": len(rows),
             "frauds": int(y_banks[rows].sum())}
        )
    write_csv(out_dir / TEST_FILE, x_test, y_test, label_column)
    manifest = {
        "source": "synthetic",
        "generator": {**SYNTHETIC, "random_state": seed},
        "settings": {"seed": seed, "num_banks": num_banks, "alpha": alpha,
                     "test_fraction": test_fraction, "label_column": label_column},
        "banks": banks,
        "test": {"file": TEST_FILE, "rows": len(y_test), "frauds": int(y_test.sum())},
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_transactions(
    path: Path, label_column: str, owner: str
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read labelled transactions: (features float32, labels 0/1, feature names).

    Every problem is a ``BankDataError`` naming the owner (e.g. "bank 3") and file.
    """
    import pandas as pd

    def fail(why: str) -> BankDataError:
        return BankDataError(f"{owner}: {path}: {why}")

    try:
        frame = pd.read_csv(path)
    except FileNotFoundError:
        raise fail("file not found") from None
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise fail(f"not a readable CSV ({err})") from None
    if label_column not in frame.columns:
        raise fail(f"no label column {label_column!r} (columns: {list(frame.columns)})")
    if frame.empty:
        raise fail("no rows")
    labels = frame.pop(label_column)
    if not pd.api.types.is_numeric_dtype(labels) or labels.isna().any():
        raise fail(f"label column {label_column!r} must be 0/1 with no gaps")
    if not labels.isin([0, 1]).all():
        raise fail(f"label column {label_column!r} holds values other than 0 and 1")
    bad = [name for name in frame.columns if not pd.api.types.is_numeric_dtype(frame[name])]
    if bad:
        raise fail(f"non-numeric feature columns {bad}")
    if frame.isna().any().any():
        missing = [name for name in frame.columns if frame[name].isna().any()]
        raise fail(f"missing values in columns {missing}")
    return frame.to_numpy(np.float32), labels.to_numpy(np.int64), list(frame.columns)


def split_bank(x: np.ndarray, y: np.ndarray, val_fraction: float, seed: int) -> BankSplit:
    """A bank's own train/validation split (stratified when its fraud count allows)."""
    x_train, y_train, x_val, y_val = hold_out(x, y, val_fraction, seed)
    return BankSplit(x_train, y_train, x_val, y_val)


def fit_scaler(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) of a StandardScaler fitted on ``x``: all a party needs to keep."""
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x)
    return scaler.mean_, scaler.scale_


def standardize(x: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return ((x - mean) / scale).astype(np.float32)


def scaler_file(state_dir: Path) -> Path:
    """Where a bank keeps its fitted scaler: its own folder (by default its shard's)."""
    return state_dir / SCALER_FILE


def save_scaler(path: Path, mean: np.ndarray, scale: np.ndarray,
                features: list[str]) -> None:
    path.write_text(json.dumps({"features": features, "mean": mean.tolist(),
                                "scale": scale.tolist()}, indent=1) + "\n")


def load_scaler(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    try:
        saved = json.loads(path.read_text())
        return np.asarray(saved["mean"]), np.asarray(saved["scale"]), list(saved["features"])
    except (OSError, ValueError, KeyError) as err:
        raise BankDataError(f"{path}: not a usable scaler file ({err})") from None


def describe_data(data_dir: Path) -> str:
    """One line on where the training data came from (from the prepared manifest)."""
    try:
        manifest = json.loads((data_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return "the banks' own data"
    settings = manifest["settings"]
    return (f"{manifest['source']} data (seed {settings['seed']}), {settings['num_banks']} "
            f"banks, Dirichlet alpha {settings['alpha']}")
