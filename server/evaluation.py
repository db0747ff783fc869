"""What the server does with the banks' replies and with its own held-out test set.

FedAvg's default would average every reply metric; for fraud that is wrong (averaged
precision of a bank with 2 frauds weighs as much as one with 500). Here counts and
score histograms are summed, and only losses are weighted means.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.common import log
from logging import INFO

from common import keys
from common.metrics import bce_loss
from common.model import FraudNet, ModelSpec
from common.task import score


def _reply_metrics(replies: list[RecordDict]) -> list[MetricRecord]:
    """Each reply's single MetricRecord, ordered by bank id."""
    records = [next(iter(reply.metric_records.values())) for reply in replies]
    return sorted(records, key=lambda record: int(record[keys.BANK_ID]))


def _mean_per_sample(records: list[MetricRecord], key: str) -> float:
    weights = np.array([record[keys.NUM_EXAMPLES] for record in records], dtype=float)
    values = np.array([record[key] for record in records], dtype=float)
    return float(np.dot(weights, values) / weights.sum()) if weights.sum() else float("nan")


def aggregate_train_metrics(replies: list[RecordDict], weight_key: str) -> MetricRecord:
    """Per-sample train loss, plus who took part and each bank's sizes (counts only).

    ``weight_key`` (FedAvg's weights for the model) does not apply to metrics: losses
    are always averaged per sample and counts are summed.
    """
    records = _reply_metrics(replies)
    per_bank = {
        key: [int(record[key]) for record in records]
        for key in (keys.N_TRAIN, keys.N_VAL, keys.N_FRAUD)
    }
    return MetricRecord({
        keys.NUM_EXAMPLES: sum(int(record[keys.NUM_EXAMPLES]) for record in records),
        keys.TRAIN_LOSS: _mean_per_sample(records, keys.TRAIN_LOSS),
        keys.BANK_IDS: [int(record[keys.BANK_ID]) for record in records],
        **per_bank,
    })


def aggregate_evaluate_metrics(replies: list[RecordDict], weight_key: str) -> MetricRecord:
    """Summed confusion counts and score histograms over the banks' validation data."""
    records = _reply_metrics(replies)
    sums = {key: sum(int(record[key]) for record in records) for key in keys.COUNT_KEYS}
    histograms = {
        key: np.sum([record[key] for record in records], axis=0).astype(int).tolist()
        for key in (keys.HIST_LEGIT, keys.HIST_FRAUD)
    }
    return MetricRecord({
        keys.NUM_EXAMPLES: sum(int(record[keys.NUM_EXAMPLES]) for record in records),
        keys.LOSS: _mean_per_sample(records, keys.LOSS),
        keys.BANK_IDS: [int(record[keys.BANK_ID]) for record in records],
        **sums,
        **histograms,
    })


@dataclass
class TestSetEvaluation:
    """FedAvg's ``evaluate_fn``: scores the server's held-out test set every round.

    Keeps each round's logits and wall time so that thresholded metrics can be
    computed once the banks' pooled validation data has chosen the threshold.
    """

    x: np.ndarray
    y: np.ndarray
    spec: ModelSpec
    num_rounds: int
    logits: dict[int, np.ndarray] = field(default_factory=dict)
    seconds: dict[int, float] = field(default_factory=dict)
    _clock: float = field(default_factory=time.monotonic)

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        from sklearn.metrics import average_precision_score, roc_auc_score

        model = FraudNet(self.spec)
        model.load_state_dict(arrays.to_torch_state_dict())
        logits = score(model, self.x)
        now = time.monotonic()
        self.logits[server_round] = logits
        self.seconds[server_round] = now - self._clock
        self._clock = now
        auc, ap = roc_auc_score(self.y, logits), average_precision_score(self.y, logits)
        if server_round:
            log(INFO, "fedfraud round %d/%d: AUC %.3f  AP %.3f  %.1f s", server_round,
                self.num_rounds, auc, ap, self.seconds[server_round])
        return MetricRecord({"auc": float(auc), "ap": float(ap),
                             "loss": bce_loss(self.y, logits)})
