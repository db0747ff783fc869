"""Honest metrics for rare fraud: ranking quality, counts at a threshold, pooled curves.

Scores are logits. Banks never send per-row scores: they send confusion counts and
per-class score histograms over fixed logit bins (``SCORE_EDGES``). Summed over banks
those give pooled ROC/PR curves and let the server choose a threshold on pooled
validation data. Ratios (precision, recall, F1) are always computed from summed
counts, never averaged across banks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# Logit bins of width 0.05 over [-16, 16] (probabilities 1e-7 .. 1 - 1e-7); scores
# outside are counted in the end bins. Threshold candidates are the bin edges.
SCORE_EDGES = np.linspace(-16.0, 16.0, 641)
MAX_FPR = 0.01  # "recall at 1 % FPR": what a fraud team can afford to review


@dataclass(frozen=True)
class Confusion:
    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "precision": self.precision, "recall": self.recall,
                "f1": self.f1}


def probability_to_logit(probability: float) -> float:
    probability = min(max(probability, 1e-12), 1 - 1e-12)
    return math.log(probability / (1 - probability))


def logit_to_probability(logit: float) -> float:
    return 1.0 / (1.0 + math.exp(-logit))


def confusion(y: np.ndarray, logits: np.ndarray, threshold: float) -> Confusion:
    """Counts when flagging rows with probability >= ``threshold``."""
    flagged = logits >= probability_to_logit(threshold)
    fraud = y == 1
    return Confusion(
        tp=int(np.sum(flagged & fraud)), fp=int(np.sum(flagged & ~fraud)),
        fn=int(np.sum(~flagged & fraud)), tn=int(np.sum(~flagged & ~fraud)),
    )


BIN_WIDTH = float(SCORE_EDGES[1] - SCORE_EDGES[0])  # 0.05 logit


def coarsen(histogram: list[int], width: float) -> list[int]:
    """The same histogram at a coarser resolution (a multiple of ``BIN_WIDTH``): each
    group of bins is counted in its first bin, so the length (and every consumer of
    ``SCORE_EDGES``) stays as it is, and sums over banks stay exact."""
    group = max(1, round(width / BIN_WIDTH))
    counts = np.asarray(histogram, dtype=np.int64)
    coarse = np.zeros_like(counts)
    coarse[::group] = np.add.reduceat(counts, np.arange(0, len(counts), group))
    return coarse.tolist()


def score_histograms(y: np.ndarray, logits: np.ndarray) -> tuple[list[int], list[int]]:
    """Per-class counts of logits in the ``SCORE_EDGES`` bins: (legit, fraud). Every
    row is counted (the counts add up to the rows, as the server checks): a NaN score
    (a diverged model) in the lowest bin."""
    clipped = np.clip(np.nan_to_num(logits, nan=SCORE_EDGES[0]), SCORE_EDGES[0],
                      np.nextafter(SCORE_EDGES[-1], -np.inf))
    legit, _ = np.histogram(clipped[y == 0], bins=SCORE_EDGES)
    fraud, _ = np.histogram(clipped[y == 1], bins=SCORE_EDGES)
    return legit.tolist(), fraud.tolist()


@dataclass(frozen=True)
class PooledCurve:
    """ROC/PR points of pooled histograms, one per threshold edge (high to low)."""

    thresholds: np.ndarray  # probabilities, descending
    tp: np.ndarray
    fp: np.ndarray
    positives: int
    negatives: int

    @classmethod
    def from_histograms(cls, legit: list[int], fraud: list[int]) -> PooledCurve:
        legit_a, fraud_a = np.asarray(legit, np.int64), np.asarray(fraud, np.int64)
        # Flagging at edge i flags bins i.. ; cumulate from the top bin down.
        tp = np.cumsum(fraud_a[::-1])[::-1]
        fp = np.cumsum(legit_a[::-1])[::-1]
        edges = SCORE_EDGES[:-1]
        probs = 1.0 / (1.0 + np.exp(-edges))
        return cls(probs[::-1], tp[::-1], fp[::-1], int(fraud_a.sum()), int(legit_a.sum()))

    @classmethod
    def from_scores(cls, y: np.ndarray, logits: np.ndarray) -> PooledCurve:
        """The curve of rows one party holds, built the way banks' histograms are."""
        return cls.from_histograms(*score_histograms(y, logits))

    def precisions(self) -> np.ndarray:
        """Precision at each threshold (1 where nothing is flagged)."""
        flagged = self.tp + self.fp
        return np.divide(self.tp, flagged, out=np.ones(len(flagged)), where=flagged > 0)

    def confusion_at(self, index: int) -> Confusion:
        tp, fp = int(self.tp[index]), int(self.fp[index])
        return Confusion(tp, fp, self.positives - tp, self.negatives - fp)

    def auc(self) -> float:
        if not self.positives or not self.negatives:
            return float("nan")
        tpr = np.concatenate([[0.0], self.tp / self.positives])
        fpr = np.concatenate([[0.0], self.fp / self.negatives])
        return float(np.trapezoid(tpr, fpr))

    def average_precision(self) -> float:
        if not self.positives:
            return float("nan")
        recall = np.concatenate([[0.0], self.tp / self.positives])
        return float(np.sum(np.diff(recall) * self.precisions()))

    def recall_at_fpr(self, max_fpr: float = MAX_FPR) -> float:
        """Highest recall at any threshold edge whose false-positive rate <= ``max_fpr``."""
        if not self.positives or not self.negatives:
            return float("nan")
        allowed = self.fp <= max_fpr * self.negatives
        return float(self.tp[allowed].max() / self.positives) if allowed.any() else 0.0

    def index_of(self, threshold: float) -> int:
        """The threshold edge nearest to ``threshold`` (a probability)."""
        return int(np.argmin(np.abs(self.thresholds - threshold)))

    def summary(self, threshold: float) -> dict[str, float]:
        """The headline metrics of these pooled rows at ``threshold``."""
        index = self.index_of(threshold)
        return {"auc": self.auc(), "ap": self.average_precision(),
                "recall_at_1pct_fpr": self.recall_at_fpr(),
                "threshold": float(self.thresholds[index]),
                **self.confusion_at(index).as_dict()}

    def best_f1_index(self) -> int:
        """Index of the threshold with the highest F1; ties go to the higher threshold."""
        return int(np.argmax([self.confusion_at(i).f1 for i in range(len(self.thresholds))]))

    def best_f1_threshold(self) -> float:
        """The probability threshold with the highest F1 (how runs choose theirs)."""
        return float(self.thresholds[self.best_f1_index()])


def recall_at_fpr(y: np.ndarray, logits: np.ndarray, max_fpr: float = MAX_FPR) -> float:
    """Highest recall at any threshold whose false-positive rate is <= ``max_fpr``."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(y, logits)
    return float(tpr[fpr <= max_fpr].max())


def row_losses(y: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Binary cross-entropy of each row's logit (numerically stable form)."""
    return np.logaddexp(0.0, logits) - y * logits


def bce_loss(y: np.ndarray, logits: np.ndarray) -> float:
    """Mean binary cross-entropy of logits."""
    return float(np.mean(row_losses(y, logits)))


def membership_histograms(losses_in: np.ndarray, losses_out: np.ndarray,
                          ) -> tuple[list[int], list[int]]:
    """A loss-threshold membership attack's evidence, as counts only: histograms of
    -log(loss) for rows the model trained on (members) and rows it did not.
    Returns (non-members, members), the (negative, positive) order of
    ``score_histograms``; the pooled curve's AUC is the attack's AUC (0.5: the
    model's losses do not tell members apart)."""
    scores = -np.log(np.maximum(np.concatenate([losses_in, losses_out]), 1e-30))
    member = np.concatenate([np.ones(len(losses_in), int), np.zeros(len(losses_out), int)])
    return score_histograms(member, scores)


def summarize(y: np.ndarray, logits: np.ndarray, threshold: float) -> dict[str, float]:
    """Every headline metric of one labelled score set at one threshold."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    return {
        "auc": float(roc_auc_score(y, logits)),
        "ap": float(average_precision_score(y, logits)),
        "loss": bce_loss(y, logits),
        "recall_at_1pct_fpr": recall_at_fpr(y, logits),
        "threshold": threshold,
        **confusion(y, logits, threshold).as_dict(),
    }


def auc_difference(y: np.ndarray, a: np.ndarray, b: np.ndarray, resamples: int = 1000,
                   seed: int = 0) -> dict[str, Any]:
    """AUC of scores ``a`` minus AUC of scores ``b`` on the same rows, with a 95 %
    paired bootstrap interval: is a test-set difference bigger than the test set's
    noise (a few hundred frauds make AUC move by ~0.01)? Each resample draws every row
    Poisson(1) times (the Poisson bootstrap; the same draw for ``a`` and ``b``) and
    computes both AUCs from those counts: one sort per score vector, not one per
    resample. Ties count a half, as in ``roc_auc_score``."""
    rng = np.random.default_rng(seed)
    differences = []
    for begin in range(0, resamples, 50):  # 50 resamples at a time bounds the memory
        counts = rng.poisson(1.0, size=(min(50, resamples - begin), len(y)))
        differences.append(weighted_auc(y, a, counts) - weighted_auc(y, b, counts))
    low, high = np.percentile(np.concatenate(differences), [2.5, 97.5])
    every_row_once = np.ones((1, len(y)))
    difference = weighted_auc(y, a, every_row_once) - weighted_auc(y, b, every_row_once)
    return {"auc_difference": float(difference[0]), "ci95": [float(low), float(high)],
            "resamples": resamples}


def weighted_auc(y: np.ndarray, scores: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The AUC of ``scores`` for each row of ``counts`` (how often each transaction is
    drawn): P(a drawn fraud scores above a drawn legitimate one), ties a half."""
    values, bins = np.unique(scores, return_inverse=True)
    fraud = np.asarray(y) == 1
    offsets = np.arange(len(counts))[:, None] * len(values)

    def per_bin(rows: np.ndarray) -> np.ndarray:  # (resamples, distinct scores) counts
        flat = (offsets + bins[rows]).ravel()
        return np.bincount(flat, weights=counts[:, rows].ravel(),
                           minlength=len(counts) * len(values)).reshape(len(counts), -1)

    legit_at, fraud_at = per_bin(~fraud), per_bin(fraud)
    legit_below = np.cumsum(legit_at, axis=1) - legit_at
    pairs = fraud_at.sum(axis=1) * legit_at.sum(axis=1)
    return (fraud_at * (legit_below + legit_at / 2)).sum(axis=1) / pairs


def without_nan(value: Any) -> Any:
    """NaN (e.g. AUC of a bank whose validation rows hold no fraud) becomes None, so
    a JSON file (metrics.json, a model card) is strict JSON and says "undefined" instead of a number."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: without_nan(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_nan(item) for item in value]
    return value
