"""The server's strategy: one of Flower's, plus what fedfraud needs around it.

``make_strategy`` picks Flower's FedAvg, FedProx, FedMedian, FedTrimmedAvg or Krum
(the ``strategy`` setting) and adds ``BankGuard`` in front of it:

- the federated evaluate step only after the last round: banks evaluate each
  incoming model inside their train message, so only the final model needs evaluate
  messages (in deployment each message is a fresh ClientApp process);
- an update with a non-finite weight (NaN, inf) is refused before aggregation, with a
  logged reason, and recorded;
- a ledger of what each bank sent, record by record, with its size on the wire;
- the final model's metrics as each bank sent them, for per-bank results.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common.serde import (
    array_record_to_proto, config_record_to_proto, metric_record_to_proto,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg, FedYogi, Krum,
)

from common import keys
from common.config import Config
from server.evaluation import aggregate_bank_metrics

STRATEGY_CLASSES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg, "fedprox": FedProx, "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg, "krum": Krum, "fedavgm": FedAvgM, "fedadam": FedAdam,
    "fedyogi": FedYogi,
}


def bank_of(content: RecordDict) -> int:
    return int(next(iter(content.metric_records.values()))[keys.BANK_ID])


def non_finite(content: RecordDict) -> list[str]:
    """Names of the arrays in a reply that hold NaN or infinite values, also once cast
    to the model's float32 (1e300 in float64 is finite, and inf in the average)."""
    return [f"{record_name}/{name}"
            for record_name, record in content.array_records.items()
            for name, array in record.items()
            if not np.isfinite(array.numpy().astype(np.float32, copy=False)).all()]


def wrong_weight(content: RecordDict, weight_key: str) -> str | None:
    """Why a reply's FedAvg weight is not one an honest bank sends, if it is not. Each
    bank states its own weight: with equal weighting it must be 1 (a bank claiming
    1e9 would replace the global model with its own), else its training rows, a
    positive count that matches the ``n-train`` it reports."""
    metrics = next(iter(content.metric_records.values()), MetricRecord())
    weight = metrics.get(weight_key)
    if weight_key == keys.VOTE:
        honest = weight == 1
    else:
        honest = isinstance(weight, int) and weight >= 1 and weight == metrics.get(keys.N_TRAIN)
    return None if honest else f"{weight_key} {weight!r} is not an honest bank's weight"


def fingerprint(record: ArrayRecord) -> str:
    """A short hash of a record's arrays: equal fingerprints, equal weights."""
    return hashlib.sha256(b"".join(array.data for array in record.values())).hexdigest()[:16]


def ledger_entry(message: str, server_round: int, content: RecordDict,
                 bank: int | None = None) -> dict[str, Any]:
    """What one reply carried: each record's kind, keys and serialized size (and a
    fingerprint of any weights)."""
    records = []
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            kind, size = "weights", array_record_to_proto(record).ByteSize()
            items = {key: list(array.shape) for key, array in record.items()}
            if items:
                items = {**items, "sha256": fingerprint(record)}
        elif isinstance(record, MetricRecord):
            kind, size = "metrics", metric_record_to_proto(record).ByteSize()
            items = {key: len(value) if isinstance(value, list) else 1
                     for key, value in record.items()}
        else:  # SecAgg+'s record: public keys, encrypted shares or masked weights
            kind = "secagg" if name == RECORD_KEY_CONFIGS else "config"
            size = config_record_to_proto(record).ByteSize()
            items = {key: len(value) if isinstance(value, list) else 1
                     for key, value in record.items()}
        records.append({"record": name, "kind": kind, "bytes": size, "items": items})
    return {"round": server_round, "bank": bank_of(content) if bank is None else bank,
            "message": message,
            "bytes": sum(record["bytes"] for record in records), "records": records}


class BankGuard:
    """Mixed in before one of Flower's strategies (see the module docstring)."""

    def __init__(self, num_rounds: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_rounds = num_rounds
        self.final_bank_metrics: dict[int, MetricRecord] = {}
        self.refused: list[dict[str, Any]] = []
        self.ledger: list[dict[str, Any]] = []

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if server_round < self.num_rounds:
            return []
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        kept = []
        for reply in replies:
            if reply.has_content():
                self.ledger.append(ledger_entry("train", server_round, reply.content))
                bad = non_finite(reply.content)
                why = (f"non-finite values in {', '.join(bad)}" if bad
                       else wrong_weight(reply.content, self.weighted_by_key))
                if why:
                    bank = bank_of(reply.content)
                    log(WARNING, "fedfraud: refused bank %d's update in round %d: %s",
                        bank, server_round, why)
                    self.refused.append({"round": server_round, "bank": bank, "why": why})
                    continue
            kept.append(reply)
        return super().aggregate_train(server_round, kept)

    def aggregate_evaluate(self, server_round: int,
                           replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        answered = [reply.content for reply in replies if reply.has_content()]
        for content in answered:
            self.ledger.append(ledger_entry("evaluate", server_round, content))
        if answered:
            self.final_bank_metrics = {bank_of(content): next(iter(
                content.metric_records.values())) for content in answered}
        return super().aggregate_evaluate(server_round, replies)


def make_strategy(config: Config) -> FedAvg:
    """The ``strategy`` setting as a Flower strategy with ``BankGuard`` in front."""
    base = STRATEGY_CLASSES[config.strategy]
    options: dict[str, Any] = {
        "fedprox": {"proximal_mu": config.proximal_mu},
        "fedtrimmedavg": {"beta": config.trim_fraction},
        "krum": {"num_malicious_nodes": config.krum_malicious},
        "fedavgm": {"server_learning_rate": config.server_learning_rate,
                    "server_momentum": config.server_momentum},
        "fedadam": {"eta": config.server_learning_rate, "beta_1": config.server_momentum},
        "fedyogi": {"eta": config.server_learning_rate, "beta_1": config.server_momentum},
    }.get(config.strategy, {})
    guarded = type(f"Guarded{base.__name__}", (BankGuard, base), {})
    return guarded(
        num_rounds=config.num_server_rounds,
        weighted_by_key=keys.VOTE if config.bank_weighting == "equal" else keys.NUM_EXAMPLES,
        min_train_nodes=config.min_banks,
        min_evaluate_nodes=config.min_banks,
        min_available_nodes=config.min_banks,
        train_metrics_aggr_fn=aggregate_bank_metrics,
        evaluate_metrics_aggr_fn=aggregate_bank_metrics,
        **options,
    )
