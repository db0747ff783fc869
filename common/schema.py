"""The one column schema every bank's transaction file is read with.

Banks never fit their own encoders: the federation agrees on one schema (written by
``prepare`` into every party's folder as ``schema.json``) so that feature i means the
same thing at every bank. Numeric columns are taken as they are, missing values kept as
NaN for the bank's scaler to fill; a numeric column with gaps (more than 1 % of the
agreed rows) also gets a 0/1 "<column> missing" feature, since a gap is often a signal
itself (no device fingerprint, no address check). With ``log-skewed`` (the default;
README), a numeric column that has no value below 0 at any bank and is right-skewed
(sample skewness above ``SKEWED``) at some bank (amounts, ages, distances, days since
the last transaction) is read as log(1 + x) (a later value below 0, a refund, as
-log1p(|x|)): a standard scaler leaves a lognormal amount a few huge values and a crowd
near 0, which the MLP reads badly (cards, seed 1, centralized for 10 epochs: test AP
0.88 raw, 0.94 with log1p, 0.97 for gradient-boosted trees; `bench/trees.py`). A text
column with at most ``max-categories`` values becomes one 0/1 feature per agreed
category (a missing or unknown value sets none of them); one with more becomes one
feature per each of its ``max-categories`` most frequent values, plus "<other>" (any
other value, including one no bank had when the schema was agreed) and "<missing>": a
1,200-value column is 52 features, never an error.

The schema is agreed once, for every bank, from counts. ``prepare`` takes them from the
pooled table (the demo, where one party holds all rows). Without pooling, each bank
runs ``summarize`` on its own file (column kinds, gap counts, per-value counts with
values seen in fewer than 5 of its rows left out before the summary leaves the bank)
and the operator runs ``Schema.merge`` on the summaries: the same schema, bar values
that are rare at every bank.

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
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

SCHEMA_FILE = "schema.json"
NUMERIC, CATEGORICAL = "numeric", "categorical"
MAX_CATEGORIES = 50  # the default of max-categories: one-hot up to this many values
MISSING_RATE = 0.01  # a numeric column missing more often than this gets an indicator
MIN_CATEGORY_ROWS = 5  # a many-valued column's value needs this many rows for a feature
SKEWED = 1.0  # a non-negative numeric column this skewed at some bank is read as log1p
MIN_SKEW_ROWS = 20  # a bank calls a column skewed only from at least this many values
OTHER, MISSING = "<other>", "<missing>"
SUPPRESS_BELOW = 5  # a bank's summary leaves out text values seen in fewer of its rows
EMPTY = "empty"  # a column with no value at a bank (read as numbers): either kind
TEXT = "text"


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
    # NUMERIC only: the feature is log(1 + value) (no value below 0 anywhere, skewed).
    log: bool = False

    @property
    def as_is(self) -> bool:
        """One feature holding the column's number unchanged: numeric, not log1p, no
        gap indicator (what a reader may build without ``Schema.encode``)."""
        return self.kind == NUMERIC and not self.log and not self.missing

    @property
    def features(self) -> list[str]:
        if self.kind == NUMERIC:
            return [self.name] + ([f"{self.name} missing"] if self.missing else [])
        return ([f"{self.name}={category}" for category in self.categories]
                + ([f"{self.name}={OTHER}"] if self.other else [])
                + ([f"{self.name}={MISSING}"] if self.missing else []))

    @classmethod
    def from_counts(cls, name: str, rows: int, missing: int,
                    counts: dict[str, int] | None, max_categories: int,
                    log: bool = False) -> Column:
        """The column agreed from counts over all banks: ``counts`` per text value
        (None: a numeric column, read as log1p with ``log``), ``missing`` gaps among
        ``rows``."""
        if counts is None:
            return cls(name, NUMERIC, missing=missing > MISSING_RATE * rows, log=log)
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
              log_skewed: bool = False) -> Schema:
        """The schema of a pooled table (run once, by whoever prepares the shards):
        ``merge`` of one summary of every row, nothing suppressed."""
        summary = summarize(frame, label, (*ids, time, *dropped), "the pooled data",
                            min_count=1, log_skewed=log_skewed)
        return cls.merge([summary], label, ids, time, dropped, max_categories, log_skewed)

    @classmethod
    def merge(cls, summaries: Sequence[dict[str, Any]], label: str,
              ids: tuple[str, ...] = (), time: str = "", dropped: tuple[str, ...] = (),
              max_categories: int = MAX_CATEGORIES, log_skewed: bool = False) -> Schema:
        """The operator's side: one schema from the banks' ``summarize`` results, their
        counts summed. Every bank must have the same columns, and a column must be
        numbers at every bank or text at every bank (a bank with no value in it agrees
        with either); a dropped column may be missing anywhere. Problems are
        ``BankDataError``s naming the bank and the column. Values each bank left out
        get no feature of their own, and a column they took to ``max_categories`` or
        fewer known values is one-hot encoded. With ``log_skewed`` a numeric column is
        read as log1p when every bank with values in it says none is below 0 and some
        bank says they are skewed (summaries without these two answers: as it is)."""
        if not summaries:
            raise BankDataError("no bank summaries to agree a schema from")
        first = summaries[0]
        # A dropped column may already be gone at some banks; every other must be there.
        names = [c for c in first["columns"] if c not in dropped]
        for summary in summaries[1:]:
            own = [c for c in summary["columns"] if c not in dropped]
            missing = [c for c in names if c not in own]
            extra = [c for c in own if c not in names]
            if missing or extra:
                raise BankDataError(f"{summary['owner']}: columns differ from "
                                    f"{first['owner']}'s: missing {missing}, unexpected "
                                    f"{extra}")
        check_special_columns([*names, *dropped], label, ids, time, dropped,
                              "the banks' summaries")
        skip = {*ids, time}
        columns = []
        for name in names:
            if name in skip:
                continue
            try:
                stats = [(s["owner"], s["rows"], s["stats"][name]) for s in summaries]
            except KeyError:
                raise BankDataError(f"column {name!r}: a summary has no counts for it "
                                    "(summarized with other id/time/drop columns?)"
                                    ) from None
            kinds = {kind: [owner for owner, _, st in stats if st["kind"] == kind]
                     for kind in (NUMERIC, TEXT)}
            if kinds[NUMERIC] and kinds[TEXT]:
                raise BankDataError(f"column {name!r} holds numbers at "
                                    f"{', '.join(kinds[NUMERIC])} but text at "
                                    f"{', '.join(kinds[TEXT])}; fix it or drop it "
                                    "(drop-columns)")
            counts: dict[str, int] | None = None
            if kinds[TEXT]:
                counts = {}
                for _, _, st in stats:
                    for value, count in st.get("counts", {}).items():
                        counts[value] = counts.get(value, 0) + int(count)
            numbers = [st for _, _, st in stats if st["kind"] == NUMERIC]
            log = (log_skewed and counts is None and bool(numbers)
                   and all(st.get("nonnegative", False) for st in numbers)
                   and any(st.get("skewed", False) for st in numbers))
            columns.append(Column.from_counts(
                name, sum(rows for _, rows, _ in stats),
                sum(int(st["missing"]) for _, _, st in stats), counts, max_categories,
                log))
        return cls(label, tuple(columns), tuple(ids), time, tuple(dropped))

    def encode(self, frame: Any, fail: Any) -> np.ndarray:
        """Features as float32 (NaN where a numeric value is missing).

        Id, time and dropped columns are ignored where present. ``fail(why)`` builds the
        error to raise; it names the bank and the file. A value that is not finite as
        float32 (inf, -inf, or 1e39, which overflows) is refused here, the one place
        every reader passes: otherwise training fails far from the cause and a score
        saturates without a word. An empty cell stays NaN: a missing value, which the
        bank's scaler fills. A log1p column's value below 0 (which no bank had when
        the schema was agreed: a later refund) is read as -log(1 + |value|).
        """
        import numpy as np  # here: a bank's long-lived supervisor imports this module
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
                with np.errstate(over="ignore"):  # beyond float32: inf, refused below
                    floats = numbers.to_numpy(np.float32)
                infinite = ~np.isfinite(floats) & ~gaps
                if infinite.any():
                    row = int(infinite.argmax())
                    raise fail(f"column {column.name!r} holds a value that is not a finite "
                               f"float32 number (row {row + 1}: {str(values.iloc[row])!r})")
                if column.log:  # log1p mirrored below 0: a later refund still scores
                    floats = np.sign(floats) * np.log1p(np.abs(floats))
                parts.append(floats[:, None])
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
        # Schemas written before log1p columns existed have none.
        columns = tuple(Column(c["name"], c["kind"], tuple(c["categories"]),
                               bool(c.get("missing", False)), bool(c.get("other", False)),
                               bool(c.get("log", False)))
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


def summarize(frame: Any, label: str, ignore: Sequence[str] = (), owner: str = "",
              min_count: int = SUPPRESS_BELOW, log_skewed: bool = False) -> dict[str, Any]:
    """The bank's side of agreeing a schema: what it sends the operator about its file.

    Per feature column: its kind (numbers, text, or no value at all), how many values
    are missing; for text, how many rows hold each value, leaving out values seen in
    fewer than ``min_count`` rows before the summary leaves the bank; only with
    ``log_skewed`` (the federation reads skewed columns as log1p), for numbers, whether
    none is below 0 and whether they are skewed (sample skewness above ``SKEWED``, from
    at least ``MIN_SKEW_ROWS`` values): two yes/no answers. No row, no numeric value, no
    label count. ``ignore``: the agreed id, time and dropped columns (named, never
    summarized). A plain JSON-able dict; ``Schema.merge`` sums them.
    """
    import pandas as pd

    stats: dict[str, dict[str, Any]] = {}
    for name in frame.columns:
        if name == label or name in ignore:
            continue
        values = frame[name]
        gaps = int(values.isna().sum())
        if gaps == len(values):
            stats[str(name)] = {"kind": EMPTY, "missing": gaps}
        elif pd.api.types.is_numeric_dtype(values):
            stats[str(name)] = {"kind": NUMERIC, "missing": gaps}
            if log_skewed:
                skewed = len(values) - gaps >= MIN_SKEW_ROWS and values.skew() > SKEWED
                stats[str(name)].update(nonnegative=bool(values.min() >= 0),
                                        skewed=bool(skewed))
        else:
            counts = values.dropna().astype(str).value_counts()
            stats[str(name)] = {"kind": TEXT, "missing": gaps, "counts": {
                str(value): int(count) for value, count in counts.items()
                if count >= min_count}}
    return {"owner": owner, "rows": len(frame),
            "columns": [str(name) for name in frame.columns if name != label],
            "stats": stats}


def check_special_columns(columns: Sequence[str], label: str, ids: Sequence[str],
                          time: str, dropped: Sequence[str], where: str) -> None:
    """Id, time and dropped columns must exist, differ from the label and each other."""
    seen: dict[str, str] = {label: "label-column"}
    for setting, names in (("id-columns", ids), ("time-column", (time,) if time else ()),
                           ("drop-columns", dropped)):
        for name in names:
            if name not in columns:
                raise BankDataError(f"{where}: {setting}: no column {name!r} (columns: "
                                    f"{', '.join(map(str, columns))})")
            if name in seen:
                raise BankDataError(f"{where}: column {name!r} is in {setting} and "
                                    f"{seen[name]}; a column can be only one of them")
            seen[name] = setting
