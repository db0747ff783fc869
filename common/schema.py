"""The one column schema every bank's transaction file is read with.

Banks never fit their own encoders: the federation agrees on one schema (written by
``prepare`` into every party's folder as ``schema.json``) so that feature i means the
same thing at every bank. Numeric columns are taken as they are, missing values kept
as NaN for the bank's scaler to fill; a categorical column becomes one 0/1 feature per
agreed category (a missing or unknown category sets none of them).

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
MAX_CATEGORIES = 50  # more distinct values than this is an id or free text, not a category


class BankDataError(ValueError):
    """A bank's data file cannot be used; the message names the bank and the file."""


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # NUMERIC or CATEGORICAL
    categories: tuple[str, ...] = ()


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

    @property
    def features(self) -> list[str]:
        """The model's input features, in order (one per category of a categorical)."""
        names: list[str] = []
        for column in self.columns:
            if column.kind == NUMERIC:
                names.append(column.name)
            else:
                names += [f"{column.name}={category}" for category in column.categories]
        return names

    @classmethod
    def infer(cls, frame: Any, label: str, ids: tuple[str, ...] = (), time: str = "",
              dropped: tuple[str, ...] = ()) -> Schema:
        """The schema of a pooled table (run once, by whoever prepares the shards)."""
        import pandas as pd

        columns = []
        skip = {label, *ids, time, *dropped}
        for name in frame.columns:
            if name in skip:
                continue
            values = frame[name]
            if pd.api.types.is_numeric_dtype(values):
                columns.append(Column(str(name), NUMERIC))
                continue
            categories = sorted(str(v) for v in values.dropna().unique())
            if len(categories) > MAX_CATEGORIES:
                raise ValueError(f"column {name!r} has {len(categories)} distinct text "
                                 f"values; a category column may have {MAX_CATEGORIES}")
            columns.append(Column(str(name), CATEGORICAL, tuple(categories)))
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
            if column.kind == NUMERIC:
                numbers = pd.to_numeric(values, errors="coerce")
                bad = numbers.isna() & values.notna()
                if bad.any():
                    row = int(bad.to_numpy().argmax())
                    raise fail(f"column {column.name!r} must be numeric (row {row + 1}: "
                               f"{values.iloc[row]!r})")
                parts.append(numbers.to_numpy(np.float32)[:, None])
            else:
                text = values.astype("string")
                parts.append(np.stack(
                    [(text == category).fillna(False).to_numpy(np.float32)
                     for category in column.categories], axis=1,
                ) if column.categories else np.empty((len(frame), 0), np.float32))
        return np.concatenate(parts, axis=1) if parts else np.empty((len(frame), 0))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> Schema:
        columns = tuple(Column(c["name"], c["kind"], tuple(c["categories"]))
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
