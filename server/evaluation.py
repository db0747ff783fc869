"""What the server does with the banks' replies and with its own held-out test set.

FedAvg's default would average every reply metric; for fraud that is wrong (averaged
precision of a bank with 2 frauds weighs as much as one with 500). Here counts and
score histograms are summed, and only losses are weighted means.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.common import log

from common import keys
from common.metrics import bce_loss
from common.model import FraudNet, ModelSpec, unpacked
from common.task import score


def _reply_metrics(replies: list[RecordDict]) -> list[MetricRecord]:
    """Each reply's single MetricRecord, ordered by bank id."""
    records = [next(iter(reply.metric_records.values())) for reply in replies]
    return sorted(records, key=lambda record: int(record[keys.BANK_ID]))


def _mean_per_row(records: list[MetricRecord], key: str, rows_key: str) -> float:
    rows = np.array([record[rows_key] for record in records], dtype=float)
    values = np.array([record[key] for record in records], dtype=float)
    return float(np.dot(rows, values) / rows.sum()) if rows.sum() else float("nan")


def aggregate_bank_metrics(replies: list[RecordDict], weight_key: str) -> MetricRecord:
    """The banks' metrics of one round's train or evaluate replies.

    Who took part and each bank's sizes are listed; confusion counts and score
    histograms are summed, and losses averaged per row, over the banks that sent them
    (a bank's policy may withhold some, or its evaluations be spent:
    ``evaluated-bank-ids`` lists whose validation histograms are summed). ``weight_key``
    (FedAvg's weights for the model) does not apply to metrics.
    """
    records = _reply_metrics(replies)
    out: dict[str, Any] = {
        keys.NUM_EXAMPLES: sum(int(record[keys.NUM_EXAMPLES]) for record in records),
        keys.BANK_IDS: [int(record[keys.BANK_ID]) for record in records],
    }
    for key in keys.SIZE_KEYS + keys.PER_BANK_KEYS:
        if all(key in record for record in records):
            out[key] = [(int if key in keys.SIZE_KEYS else float)(record[key])
                        for record in records]
        elif key in (keys.DP_EPSILON, keys.DP_NOISE) and any(key in r for r in records):
            # NaN for a bank that did not say: one bank cannot hide the others' epsilon.
            out[key] = [float(record.get(key, float("nan"))) for record in records]
    for key in keys.COUNT_KEYS + keys.HIST_KEYS:
        sent = [record[key] for record in records if key in record]
        if sent and key in keys.COUNT_KEYS:
            out[key] = sum(int(value) for value in sent)
        elif sent:
            out[key] = np.sum(sent, axis=0).astype(int).tolist()
    if keys.HIST_LEGIT in out:
        out[keys.EVALUATED_IDS] = [int(record[keys.BANK_ID]) for record in records
                                   if keys.HIST_LEGIT in record]
    for loss, rows in ((keys.TRAIN_LOSS, keys.N_TRAIN), (keys.LOSS, keys.N_VAL)):
        sent = [record for record in records if loss in record and rows in record]
        if sent:
            out[loss] = _mean_per_row(sent, loss, rows)
    return MetricRecord(out)


@dataclass
class TestSetEvaluation:
    """FedAvg's ``evaluate_fn``: scores the server's held-out test set every round.

    Keeps each round's logits and wall time so that thresholded metrics can be
    computed once the banks' pooled validation data has chosen the threshold. Without
    a test set (``x`` None: a deployment, see ``server-test-set``) it only keeps time.
    """

    x: np.ndarray | None
    y: np.ndarray | None
    spec: ModelSpec
    num_rounds: int
    logits: dict[int, np.ndarray] = field(default_factory=dict)
    seconds: dict[int, float] = field(default_factory=dict)
    _clock: float = field(default_factory=time.monotonic)

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        from sklearn.metrics import average_precision_score, roc_auc_score

        now = time.monotonic()
        self.seconds[server_round] = now - self._clock
        self._clock = now
        if self.x is None or self.y is None:
            if server_round:
                log(INFO, "fedfraud round %d/%d: %.1f s", server_round, self.num_rounds,
                    self.seconds[server_round])
            return MetricRecord({})
        model = FraudNet(self.spec)
        model.load_state_dict(unpacked(arrays[keys.WEIGHTS].numpy(), model))
        logits = score(model, self.x)
        self.logits[server_round] = logits
        auc, ap = roc_auc_score(self.y, logits), average_precision_score(self.y, logits)
        if server_round:
            log(INFO, "fedfraud round %d/%d: AUC %.3f  AP %.3f  %.1f s", server_round,
                self.num_rounds, auc, ap, self.seconds[server_round])
        return MetricRecord({"auc": float(auc), "ap": float(ap),
                             "loss": bce_loss(self.y, logits)})
