"""A bank scores its own transactions with the exported model and its own scaler.

    fedfraud score --run runs/latest --scaler data/synthetic/bank_03/scaler.json \\
                   --input new.csv --output scores.csv [--threshold 0.3] [--id-column id]

Nothing leaves the bank: the model comes to the data. The input's columns are read
with the bank's preprocessing (the federation's schema and the bank's scaler, both in
its scaler.json), exactly as in training: a missing value becomes the bank's mean. A
missing or unexpected column, text in a numeric column, a value that is not a finite
float32 number (inf, or 1e39, which overflows it), or an empty file stops with an error
naming the file and the column, rather than a score that saturates without a word.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.data import BankDataError, load_scaler, standardize
from common.model import CARD_JSON_FILE, TORCHSCRIPT_FILE
from common.schema import Schema


class ScoreInputError(BankDataError):
    """The transactions to score cannot be used; the message names file and column."""


@dataclass
class Scorer:
    """The exported model plus the bank's scaler, warm in memory."""

    model: torch.jit.ScriptModule
    mean: np.ndarray
    scale: np.ndarray
    schema: Schema
    threshold: float

    @property
    def features(self) -> list[str]:
        return self.schema.features

    @classmethod
    def load(cls, run_dir: Path, scaler: Path) -> Scorer:
        card = json.loads((run_dir / CARD_JSON_FILE).read_text())
        mean, scale, schema = load_scaler(scaler)
        if schema.features != card["features"]:
            raise BankDataError(f"{scaler}: scaler features {schema.features} do not match "
                                f"the model card's {card['features']}")
        model = torch.jit.load(str(run_dir / TORCHSCRIPT_FILE))
        model.eval()
        return cls(model, mean.astype(np.float32), scale.astype(np.float32), schema,
                   float(card["threshold"]))

    @torch.inference_mode()
    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """Fraud probability per row of encoded, unscaled features (NaN: missing)."""
        scaled = standardize(np.asarray(x, np.float32), self.mean, self.scale)
        return self.model(torch.from_numpy(scaled)).numpy()


def read_transactions(path: Path) -> Any:
    import pandas as pd

    try:
        frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except FileNotFoundError:
        raise ScoreInputError(f"{path}: file not found") from None
    except pd.errors.EmptyDataError:
        raise ScoreInputError(f"{path}: empty file") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as err:
        raise ScoreInputError(f"{path}: not a readable table ({err})") from None
    if frame.empty:
        raise ScoreInputError(f"{path}: no rows")
    return frame


def feature_matrix(frame: Any, path: Path, schema: Schema, id_column: str) -> np.ndarray:
    """The input's columns (all but the id) encoded with the bank's schema."""
    columns = frame.drop(columns=[id_column]) if id_column in frame.columns else frame
    return schema.encode(columns, lambda why: ScoreInputError(f"{path}: {why}"))


def score_file(scorer: Scorer, input_path: Path, output_path: Path,
               threshold: float | None = None, id_column: str = "id") -> dict[str, Any]:
    """Score every row of ``input_path``; write id, probability and flag."""
    import pandas as pd

    frame = read_transactions(input_path)
    x = feature_matrix(frame, input_path, scorer.schema, id_column)
    probabilities = scorer.probabilities(x)
    cut = scorer.threshold if threshold is None else threshold
    ids = frame[id_column] if id_column in frame.columns else pd.RangeIndex(len(frame))
    out = pd.DataFrame({id_column: ids, "fraud_probability": probabilities,
                        "flagged": (probabilities >= cut).astype(int)})
    out.to_csv(output_path, index=False)
    return {"rows": len(out), "flagged": int(out["flagged"].sum()), "threshold": cut,
            "output": str(output_path)}
