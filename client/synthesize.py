"""A synthetic copy of a bank's transactions, made on the bank's own machine
(``fedfraud-bank synthesize``), so a federation can be tried end to end (schema,
``prepare``, ``simulate``, a deployment) on copies before any real row moves.

SDV's Gaussian copula (the synthesizer of AWS's article), fitted once per class: the
fraud rows and the legitimate rows each get their own marginals and correlations, so
the copy keeps what tells them apart (one copula over both kept the fraud rate but a
model trained on the copy ranked real fraud no better than chance). Each class gets as
many rows in the copy as its share of the file.

What the copy carries from the bank's file (README, "A synthetic copy of a bank's
file"): each column's distribution within each class, clipped to its smallest and
largest value, and the correlations between columns. What it does not: no row of the
file (rows are drawn from the fitted copulas), no id (fresh ones, 1, 2, ...), no text
value seen in fewer than ``SUPPRESS_BELOW`` of the bank's rows (those become
``RARE``), no column the federation drops. It is no differential privacy: a small
class is fitted on few rows, and its copy says much about them.

SDV needs pandas < 3, so it lives in its own virtual environment (``make synth``).
"""

from __future__ import annotations

from typing import Any

from common.schema import SUPPRESS_BELOW, BankDataError

RARE = "<other>"  # a text value the bank's file holds in fewer than SUPPRESS_BELOW rows
TABLE = "transactions"  # SDV names the (single) table of its metadata
NO_SDV = ("synthesize needs SDV, which needs pandas < 3: `make synth` installs both in "
          ".venv-synth; then run .venv-synth/bin/fedfraud-bank synthesize")


def synthetic_copy(frame: Any, label_column: str, ids: tuple[str, ...], time_column: str,
                   ignored: tuple[str, ...], rows: int, where: str) -> Any:
    """``rows`` synthetic transactions with ``frame``'s columns (but ``ignored``) in
    its order: ids numbered afresh, rare text values as ``RARE``, each class drawn
    from its own copula in its share of ``frame``'s rows. A time column of dates is
    modelled as seconds and written back as ISO 8601 dates."""
    import pandas as pd

    from common.data import time_order

    if rows < 1:
        raise BankDataError(f"{where}: --rows must be at least 1, not {rows}")

    try:
        from sdv.metadata import Metadata
        from sdv.single_table import GaussianCopulaSynthesizer
    except ImportError:
        raise BankDataError(NO_SDV) from None

    modelled = [c for c in frame.columns if c not in (*ids, *ignored)]
    data = frame[modelled].copy()
    dates = bool(time_column) and not pd.api.types.is_numeric_dtype(data[time_column])
    if time_column:
        data[time_column] = time_order(data[time_column],
                                       lambda why: BankDataError(f"{where}: {why}"))
    kinds = {}
    for column in modelled:
        numeric = column != label_column and pd.api.types.is_numeric_dtype(data[column])
        kinds[column] = {"sdtype": "numerical" if numeric else "categorical"}
        if not numeric and column != label_column:
            counts = data[column].value_counts()
            data[column] = data[column].mask(
                data[column].isin(counts.index[counts < SUPPRESS_BELOW]), RARE)
    classes = data.groupby(label_column)
    small = {label: len(group) for label, group in classes if len(group) < SUPPRESS_BELOW}
    if small:
        raise BankDataError(f"{where}: label column {label_column!r} has "
                            + ", ".join(f"{n} rows of class {label}"
                                        for label, n in small.items())
                            + f"; a synthetic copy needs at least {SUPPRESS_BELOW} of each")
    metadata = Metadata.load_from_dict({"tables": {TABLE: {"columns": kinds}}})
    parts = []
    for _, group in classes:
        # truncnorm within each column's range: no negative count or amount appears.
        synthesizer = GaussianCopulaSynthesizer(
            metadata, enforce_min_max_values=True, default_distribution="truncnorm")
        synthesizer.fit({TABLE: group})
        share = max(1, round(rows * len(group) / len(data)))
        parts.append(synthesizer.sample(share)[TABLE])
    copy = pd.concat(parts, ignore_index=True).sample(frac=1, random_state=0)
    copy = copy.reset_index(drop=True)
    for column in ids:
        copy[column] = range(1, len(copy) + 1)
    if dates:
        copy[time_column] = pd.to_datetime(copy[time_column], unit="s", utc=True).map(
            lambda stamp: stamp.isoformat())
    return copy[[c for c in frame.columns if c in copy.columns]]
