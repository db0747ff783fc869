"""The one column schema every bank's transaction file is read with.

Banks never fit their own encoders: the federation agrees on one schema (written by
``prepare`` into every party's folder as ``schema.json``) so that feature i means the
same thing at every bank. Numeric columns are taken as they are, missing values kept
as NaN for the bank's scaler to fill; a numeric column with gaps (more than 1 % of the
agreed rows) also gets a 0/1 "<column> missing" feature, since a gap is often a signal
itself (no device fingerprint, no address check). A text column with at most
``max-categories`` values becomes one 0/1 feature per agreed category (a missing or
unknown value sets none of them); one with more becomes one feature per each of its
``max-categories`` most frequent values, plus "<other>" (any other value, including
one no bank had when the schema was agreed) and "<missing>": a 1,200-value column is 52
features, never an error.

Why top-k + other and no frequency encoding (a numeric feature holding each value's
share of the agreed counts): a frequency feature would need every value and its count
in the schema that goes to every bank, telling each bank the other banks' customers'
rare e-mail domains or devices; a value rare at every bank could not be encoded at
all once small counts are suppressed (``summarize``); and its meaning drifts as the
federation grows. Top-k names only values that are common across the federation, and
"<other>" already says "a rare value".

Some columns are never features: id columns (they name a transaction), the time column
(it orders transactions; the splits use it) and dropped columns. The schema records
them so that a bank's loader and the scorer ignore them wherever they appear.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_FILE = "schema.json"
NUMERIC, CATEGORICAL = "numeric", "categorical"
MAX_CATEGORIES = 50  # the default of max-categories: one-hot up to this many values
MISSING_RATE = 0.01  # a numeric column missing more often than this gets an indicator
MIN_CATEGORY_ROWS = 5  # a many-valued column's value needs this many rows for a feature
OTHER, MISSING = "<other>", "<missing>"


class BankDataError(ValueError):
    """A bank's data file cannot be used; the message names the bank and the file."""


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # NUMERIC or CATEGORICAL
    categories: tuple[str, ...] = ()
    # NUMERIC: a "<name> missing" 0/1 feature; CATEGORICAL: a "<name>=<missing>" one.
    missing: bool = False
    # CATEGORICAL only: a "<name>=<other>" feature for any value not in ``categories``.
    other: bool = False

    @property
    def features(self) -> list[str]:
        if self.kind == NUMERIC:
            return [self.name] + ([f"{self.name} missing"] if self.missing else [])
        return ([f"{self.name}={category}" for category in self.categories]
                + ([f"{self.name}={OTHER}"] if self.other else [])
                + ([f"{self.name}={MISSING}"] if self.missing else []))

    @classmethod
    def from_counts(cls, name: str, rows: int, missing: int,
                    counts: dict[str, int] | None, max_categories: int) -> Column:
        """The column agreed from counts over all banks: ``counts`` per text value
        (None: a numeric column), ``missing`` gaps among ``rows``."""
        if counts is None:
            return cls(name, NUMERIC, missing=missing > MISSING_RATE * rows)
        if len(counts) <= max_categories:
            return cls(name, CATEGORICAL, tuple(sorted(counts)))
        common = sorted((value for value, count in counts.items()
                         if count >= MIN_CATEGORY_ROWS), key=lambda v: (-counts[v], v))
        return cls(name, CATEGORICAL, tuple(sorted(common[:max_categories])),
                   missing=True, other=True)


@dataclass(frozen=True)
class Schema:
    label: str
    columns: tuple[Column, ...]
    ids: tuple[str, ...] = ()  # id columns: kept in the files, never features
    time: str = ""  # the time column ("" none): orders the out-of-time splits
    dropped: tuple[str, ...] = ()  # columns no bank uses

    @property
    def ignored(self) -> tuple[str, ...]:
        """Columns a file may carry that are never features."""
        return (*self.ids, *((self.time,) if self.time else ()), *self.dropped)

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for column in self.columns:
            for feature in column.features:
                if feature in seen:
                    raise BankDataError(f"column {column.name!r}: its feature {feature!r} "
                                        f"is also column {seen[feature]!r}'s; rename one")
                seen[feature] = column.name

    @property
    def features(self) -> list[str]:
        """The model's input features, in order (see the module's docstring)."""
        return [feature for column in self.columns for feature in column.features]

    @classmethod
    def infer(cls, frame: Any, label: str, ids: tuple[str, ...] = (), time: str = "",
              dropped: tuple[str, ...] = (), max_categories: int = MAX_CATEGORIES,
              ) -> Schema:
        """The schema of a pooled table (run once, by whoever prepares the shards)."""
        import pandas as pd

        columns = []
        skip = {label, *ids, time, *dropped}
        for name in frame.columns:
            if name in skip:
                continue
            values = frame[name]
            counts = None
            if not pd.api.types.is_numeric_dtype(values):
                counts = {str(value): int(count) for value, count in
                          values.dropna().astype(str).value_counts().items()}
            columns.append(Column.from_counts(str(name), len(values),
                                              int(values.isna().sum()), counts,
                                              max_categories))
        return cls(label, tuple(columns), tuple(ids), time, tuple(dropped))

    def encode(self, frame: Any, fail: Any) -> np.ndarray:
        """Features as float32 (NaN where a numeric value is missing).

        Id, time and dropped columns are ignored where present. ``fail(why)`` builds the
        error to raise; it names the bank and the file.
        """
        import pandas as pd

        expected = [column.name for column in self.columns]
        missing = [name for name in expected if name not in frame.columns]
        extra = [name for name in frame.columns
                 if name not in expected and name not in self.ignored]
        if missing or extra:
            raise fail(f"columns differ from the federation's schema: missing {missing}, "
                       f"unexpected {extra}")
        parts = []
        for column in self.columns:
            values = frame[column.name]
            gaps = values.isna().to_numpy()
            if column.kind == NUMERIC:
                numbers = pd.to_numeric(values, errors="coerce")
                bad = numbers.isna().to_numpy() & ~gaps
                if bad.any():
                    row = int(bad.argmax())
                    raise fail(f"column {column.name!r} must be numeric (row {row + 1}: "
                               f"{values.iloc[row]!r})")
                parts.append(numbers.to_numpy(np.float32)[:, None])
                if column.missing:
                    parts.append(gaps.astype(np.float32)[:, None])
                continue
            codes = pd.Index(column.categories, dtype=object).get_indexer(
                values.astype("string").astype(object))
            onehot = np.zeros((len(frame), len(column.categories)), np.float32)
            known = np.flatnonzero(codes >= 0)
            onehot[known, codes[known]] = 1.0
            parts.append(onehot)
            if column.other:
                parts.append(((codes < 0) & ~gaps).astype(np.float32)[:, None])
            if column.missing:
                parts.append(gaps.astype(np.float32)[:, None])
        return (np.concatenate(parts, axis=1) if parts
                else np.empty((len(frame), 0), np.float32))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> Schema:
        # Schemas written before indicators and "<other>" existed have neither.
        columns = tuple(Column(c["name"], c["kind"], tuple(c["categories"]),
                               bool(c.get("missing", False)), bool(c.get("other", False)))
                        for c in saved["columns"])
        if any(c.kind not in (NUMERIC, CATEGORICAL) for c in columns):
            raise ValueError("unknown column kind")
        # Schemas written before id/time/dropped columns existed have none.
        return cls(saved["label"], columns, tuple(saved.get("ids", ())),
                   saved.get("time", ""), tuple(saved.get("dropped", ())))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> Schema:
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise BankDataError(f"{path}: not a usable schema file ({err})") from None
