"""The server's strategy: one of Flower's, plus what fedfraud needs around it.

``make_strategy`` picks Flower's FedAvg, FedProx, FedMedian, FedTrimmedAvg or Krum
(the ``strategy`` setting) and adds ``BankGuard`` in front of it:

- the federated evaluate step only after the last round: banks evaluate each
  incoming model inside their train message, so only the final model needs evaluate
  messages (in deployment each message is a fresh ClientApp process);
- a reply that is not in the form the bank's app sends (other records, arrays of
  another shape or type, non-finite weights, a dishonest FedAvg weight, metrics
  without the bank's id or with histograms of other lengths) is refused before
  aggregation, with a logged reason, and recorded. Flower's FedAvg raises on one
  such reply and ends the run: any one bank could stop the federation;
- the banks' metrics reach Flower's aggregation with the keys they all sent: banks
  may withhold some by their own policy (membership audit, personalization, an
  evaluation allowance spent), and Flower's FedAvg raises on metric records with
  different keys (server/evaluation.py sums only what every bank sent anyway);
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
from common.metrics import SCORE_EDGES
from server.evaluation import aggregate_bank_metrics

STRATEGY_CLASSES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg, "fedprox": FedProx, "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg, "krum": Krum, "fedavgm": FedAvgM, "fedadam": FedAdam,
    "fedyogi": FedYogi,
}


# Metrics the server sums or lists as whole numbers (server/evaluation.py).
COUNTED = (keys.BANK_ID, keys.NUM_EXAMPLES, *keys.SIZE_KEYS, *keys.COUNT_KEYS)
# What every bank's reply says (client/bank.py), which the results read: a train reply
# its sizes, an evaluate reply (the final model's) its validation histograms.
REQUIRED = {"train": (keys.BANK_ID, keys.NUM_EXAMPLES, *keys.SIZE_KEYS),
            "evaluate": (keys.BANK_ID, keys.NUM_EXAMPLES, keys.N_VAL, keys.HIST_LEGIT,
                         keys.HIST_FRAUD)}
# Metrics a bank sends all or none of (its policy may withhold a group).
TOGETHER = ((keys.HIST_LEGIT, keys.HIST_FRAUD), (keys.HIST_MEMBER, keys.HIST_NONMEMBER),
            keys.PERSONAL_KEYS, (keys.DP_EPSILON, keys.DP_NOISE))


def bank_of(content: RecordDict) -> int | None:
    """The bank id a reply states, if it states one."""
    metrics = content.get(keys.METRICS)
    bank = metrics.get(keys.BANK_ID) if isinstance(metrics, MetricRecord) else None
    return bank if isinstance(bank, int) else None


def floats(record: ArrayRecord) -> dict[str, np.ndarray] | str:
    """A reply's arrays as float32/float64 numpy arrays, or why they are not."""
    arrays = {}
    for name, array in record.items():
        try:
            arrays[name] = array.numpy()
        except (TypeError, ValueError, EOFError) as err:  # another stype, broken bytes
            return f"array {name!r} does not load: {err}"
        if arrays[name].dtype not in (np.float32, np.float64):
            return f"array {name!r} is {arrays[name].dtype}, not float32 or float64"
    return arrays


def non_finite(arrays: dict[str, np.ndarray]) -> list[str]:
    """Names of the arrays that hold NaN or infinite values, also once cast to the
    model's float32 (1e300 in float64 is finite, and inf in the average)."""
    with np.errstate(over="ignore"):
        return [name for name, array in arrays.items()
                if not np.isfinite(array.astype(np.float32, copy=False)).all()]


def malformed(content: RecordDict, sent: dict[str, tuple[int, ...]] | None) -> str | None:
    """Why a reply is not in the form the bank's app sends, if it is not. ``sent``: the
    shapes of the model the round sent (a train reply returns arrays of the same
    names and shapes); None for an evaluate reply, which carries metrics only."""
    names = {keys.METRICS} if sent is None else {keys.ARRAYS, keys.METRICS}
    if set(content.keys()) != names:
        return f"records {sorted(content.keys())}, not {sorted(names)}"
    metrics = content[keys.METRICS]
    if not isinstance(metrics, MetricRecord):
        return f"{keys.METRICS} is not a metric record"
    for key in REQUIRED["evaluate" if sent is None else "train"]:
        if key not in metrics:
            return f"no {key}"
    for group in TOGETHER:
        if 0 < sum(key in metrics for key in group) < len(group):
            return f"{', '.join(group)} not all together"
    bins = len(SCORE_EDGES) - 1
    for key, value in metrics.items():
        if key in COUNTED and not isinstance(value, int):
            return f"{key} {value!r} is not a count"
        if key in keys.HIST_KEYS and not (isinstance(value, list) and len(value) == bins
                                          and all(isinstance(n, int) for n in value)):
            return f"{key} is not {bins} counts"
        if key not in keys.HIST_KEYS and isinstance(value, list):
            return f"{key} is a list"
    if sent is None:
        return None
    record = content[keys.ARRAYS]
    if not isinstance(record, ArrayRecord):
        return f"{keys.ARRAYS} is not an array record"
    arrays = floats(record)
    if isinstance(arrays, str):
        return arrays
    shapes = {name: array.shape for name, array in arrays.items()}
    if shapes != sent:
        return f"arrays {shapes}, not the model's {sent}"
    bad = non_finite(arrays)
    return f"non-finite values in {', '.join(bad)}" if bad else None


def shared_metrics(replies: list[Message]) -> list[Message]:
    """The replies with their metrics cut to the keys every one of them sent."""
    answered = [reply.content[keys.METRICS] for reply in replies if reply.has_content()]
    if not answered:
        return replies
    shared = set.intersection(*(set(record.keys()) for record in answered))
    return [Message(RecordDict({**reply.content, keys.METRICS: MetricRecord(
                {key: value for key, value in reply.content[keys.METRICS].items()
                 if key in shared})}), metadata=reply.metadata)
            if reply.has_content() else reply for reply in replies]


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
        self.sent: dict[str, tuple[int, ...]] | None = None  # the round's model shapes
        self.refused: list[dict[str, Any]] = []
        self.ledger: list[dict[str, Any]] = []

    def configure_train(self, server_round: int, arrays: ArrayRecord,
                        config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.sent = {name: tuple(array.shape) for name, array in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if server_round < self.num_rounds:
            return []
        return super().configure_evaluate(server_round, arrays, config, grid)

    def refuse(self, message: str, server_round: int,
               replies: Iterable[Message]) -> list[Message]:
        """The replies in the form the bank's app sends (and, for training, with an
        honest weight); the others refused, logged and recorded. Every reply with
        content goes to the ledger, refused or not."""
        kept = []
        for reply in replies:
            if reply.has_content():
                content = reply.content
                bank = bank_of(content)
                self.ledger.append(ledger_entry(message, server_round, content, bank))
                why = malformed(content, self.sent if message == "train" else None)
                if why is None and message == "train":
                    why = wrong_weight(content, self.weighted_by_key)
                if why:
                    log(WARNING, "fedfraud: refused the %s reply of bank %s (node %d) in "
                        "round %d: %s", message, bank, reply.metadata.src_node_id,
                        server_round, why)
                    self.refused.append({"round": server_round, "bank": bank,
                                         "message": message, "why": why})
                    continue
            kept.append(reply)
        return kept

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        kept = self.refuse("train", server_round, replies)
        return super().aggregate_train(server_round, shared_metrics(kept))

    def aggregate_evaluate(self, server_round: int,
                           replies: Iterable[Message]) -> MetricRecord | None:
        kept = self.refuse("evaluate", server_round, replies)
        answered = [reply.content for reply in kept if reply.has_content()]
        if answered:
            self.final_bank_metrics = {bank_of(content): content[keys.METRICS]
                                       for content in answered}
        return super().aggregate_evaluate(server_round, shared_metrics(kept))


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
