"""The server's strategy: one of Flower's, plus what fedfraud needs around it.

``make_strategy`` picks Flower's FedAvg, FedProx, FedMedian, FedTrimmedAvg or Krum
(the ``strategy`` setting) and adds ``BankGuard`` in front of it:

- the federated evaluate step only after the last round: banks evaluate each
  incoming model inside their train message, so only the final model needs evaluate
  messages (in deployment each message is a fresh ClientApp process);
- a reply that is not in the form the bank's app sends (other records, arrays of
  another shape or type, implausible weights, a dishonest FedAvg weight, metrics
  missing, out of bounds or half of a pair) is refused before aggregation, with a
  logged reason, and recorded. Flower's FedAvg raises on one such reply and ends the
  run: any one bank could stop the federation;
- a reply stating another bank's id is refused: a node is the bank the operator
  registered it for (``bank-nodes``); without registrations, a bank id that two nodes
  state in one round is refused;
- Flower's strategies aggregate the weights only; the guard aggregates the banks'
  metrics from every kept reply. Banks may withhold some by their own policy
  (membership audit, personalization, an evaluation allowance spent), and Flower's
  FedAvg raises on metric records with different keys (Krum keeps the one it picks);
- a ledger of what each bank sent, record by record, with its size on the wire;
- the final model's metrics as each bank sent them, for per-bank results.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
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
from common.model import MAX_WEIGHT, implausible, shifted_output, weights_of
from common.task import fraud_log_odds
from server.evaluation import aggregate_bank_metrics

STRATEGY_CLASSES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg, "fedprox": FedProx, "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg, "krum": Krum, "fedavgm": FedAvgM, "fedadam": FedAdam,
    "fedyogi": FedYogi,
}


# Metrics the server sums or lists as whole numbers (server/evaluation.py).
COUNTED = (keys.BANK_ID, keys.NUM_EXAMPLES, keys.VOTE, *keys.SIZE_KEYS, *keys.COUNT_KEYS,
           keys.PERSONAL_KEPT)
MOST = 2**40  # the largest count or histogram bin a reply may state (no overflow when summed)
# The most the final model's logits are shifted by: fraud log-odds of 6 in a million,
# below any fraud rate a card portfolio has, and well inside SCORE_EDGES' +-16.
MAX_PRIOR_SHIFT = 12.0
# What every bank's reply says (client/bank.py) and the results read: a train reply
# its sizes, an evaluate reply (the final model's) its validation histograms; both
# the FedAvg weight (``weighted_by_key``), which Flower requires of every reply.
REQUIRED = {"train": (keys.BANK_ID, keys.NUM_EXAMPLES, *keys.SIZE_KEYS),
            "evaluate": (keys.BANK_ID, keys.NUM_EXAMPLES, keys.N_VAL, keys.HIST_LEGIT,
                         keys.HIST_FRAUD)}
# Metrics a bank sends all or none of (its policy may withhold a group).
TOGETHER = ((keys.HIST_LEGIT, keys.HIST_FRAUD), (keys.HIST_MEMBER, keys.HIST_NONMEMBER),
            keys.PERSONAL_KEYS, (keys.DP_EPSILON, keys.DP_NOISE), keys.COUNT_KEYS)
# Counts over the bank's validation rows: each group adds up to its n-val (a histogram
# at a coarser resolution keeps its sum). A bank's numbers that do not add up could
# move the pooled curve and threshold far beyond its rows.
VALIDATION_ROWS = ((keys.HIST_LEGIT, keys.HIST_FRAUD),
                   (keys.HIST_LEGIT_PERSONAL, keys.HIST_FRAUD_PERSONAL),
                   (keys.HIST_NONMEMBER,), keys.COUNT_KEYS)


def bank_of(content: RecordDict) -> int | None:
    """The bank id a reply states, if it states one."""
    metrics = content.get(keys.METRICS)
    bank = metrics.get(keys.BANK_ID) if isinstance(metrics, MetricRecord) else None
    return bank if isinstance(bank, int) else None


def wrong_metrics(metrics: MetricRecord, required: Iterable[str]) -> str | None:
    """Why a reply's metrics are not what the bank's app sends, if they are not: the
    required keys and no other than ``keys.REPLY_KEYS``, groups sent whole, whole
    counts from 0 to MOST, histograms of SCORE_EDGES' bins, every other value one
    finite, non-negative number; validation counts that add up to n-val, frauds no more
    than the rows. The reason names only fedfraud's own keys (it reaches metrics.json
    and the report)."""
    for key in required:
        if key not in metrics:
            return f"no {key}"
    if not keys.REPLY_KEYS.issuperset(metrics):
        return "a metric the bank's app does not send"
    for group in TOGETHER:
        if 0 < sum(key in metrics for key in group) < len(group):
            return f"{', '.join(group)} not all together"
    bins = len(SCORE_EDGES) - 1
    for key, value in metrics.items():
        if key in keys.HIST_KEYS:
            if not (isinstance(value, list) and len(value) == bins
                    and all(isinstance(n, int) and 0 <= n <= MOST for n in value)):
                return f"{key} is not {bins} counts from 0 to {MOST}"
        elif isinstance(value, list):
            return "a metric other than the histograms is a list"
        elif key in COUNTED and not (isinstance(value, int) and 0 <= value <= MOST):
            return f"{key} {value!r} is not a count from 0 to {MOST}"
        elif not (math.isfinite(value) and value >= 0):
            return "a metric is negative or not finite"
    if metrics.get(keys.PERSONAL_KEPT, 0) not in (0, 1):
        return f"{keys.PERSONAL_KEPT} is not 0 or 1"
    rows = metrics.get(keys.N_VAL)
    for group in VALIDATION_ROWS:
        if group[0] in metrics and rows != sum(
                sum(value) if isinstance(value := metrics[key], list) else value
                for key in group):
            return f"{', '.join(group)} do not add up to its {keys.N_VAL}"
    if keys.N_FRAUD in metrics and metrics[keys.N_FRAUD] > (
            metrics.get(keys.N_TRAIN, 0) + metrics.get(keys.N_VAL, 0)):
        return f"{keys.N_FRAUD} above its {keys.N_TRAIN} and {keys.N_VAL}"
    return None


def wrong_weights(record: ArrayRecord, sent: dict[str, tuple[int, ...]]) -> str | None:
    """Why a reply's arrays are not the model the round sent, trained, if they are
    not: other names or shapes, not float32 or float64 numpy arrays, or weights that
    are NaN, infinite or beyond ``MAX_WEIGHT`` (also once cast to float32)."""
    if set(record.keys()) != set(sent):
        return f"arrays other than the model's {sorted(sent)}"
    for name, array in record.items():
        try:
            weights = weights_of(array, most=math.prod(sent[name]))
        except ValueError as err:
            return str(err)
        if weights.shape != sent[name]:
            return f"{name} not of the model's shape {sent[name]}"
        if implausible(weights):
            return f"non-finite values or values beyond {MAX_WEIGHT:g} in {name}"
    return None


def malformed(content: RecordDict, sent: dict[str, tuple[int, ...]] | None,
              weight_key: str) -> str | None:
    """Why a reply is not in the form the bank's app sends, if it is not. ``sent``: the
    shapes of the model the round sent (a train reply returns arrays of the same
    names and shapes); None for an evaluate reply, which carries metrics only."""
    names = {keys.METRICS} if sent is None else {keys.ARRAYS, keys.METRICS}
    if set(content.keys()) != names:
        return f"records other than {sorted(names)}"
    metrics = content[keys.METRICS]
    if not isinstance(metrics, MetricRecord):
        return f"{keys.METRICS} is not a metric record"
    required = (*REQUIRED["evaluate" if sent is None else "train"], weight_key)
    why = wrong_metrics(metrics, required)
    if why or sent is None:
        return why
    record = content[keys.ARRAYS]
    if not isinstance(record, ArrayRecord):
        return f"{keys.ARRAYS} is not an array record"
    return wrong_weights(record, sent)


def weight_only(replies: list[Message], weight_key: str) -> list[Message]:
    """The replies as Flower's strategies need them: the weights and FedAvg's weight
    key. Flower raises on metric records with different keys (and Krum aggregates the
    metrics of the one reply it picks); the guard aggregates the banks' metrics."""
    return [Message(RecordDict({**reply.content, keys.METRICS: MetricRecord(
                {weight_key: reply.content[keys.METRICS][weight_key]})}),
                    metadata=reply.metadata)
            if reply.has_content() else reply for reply in replies]


def wrong_weight(content: RecordDict, weight_key: str, rows_key: str) -> str | None:
    """Why a reply's FedAvg weight is not one an honest bank sends, if it is not. Each
    bank states its own weight: with equal weighting it must be 1 (a bank claiming
    1e9 would replace the global model with its own), else its rows (``rows_key``: its
    training rows for a train reply, validation rows for an evaluate reply), a
    positive count that matches the size it reports."""
    metrics = content[keys.METRICS]
    weight = metrics.get(weight_key)
    if weight_key == keys.VOTE:
        honest = weight == 1
    else:
        honest = isinstance(weight, int) and weight >= 1 and weight == metrics.get(rows_key)
    return None if honest else f"{weight_key} {weight!r} is not an honest bank's weight"


def fingerprint(record: ArrayRecord) -> str:
    """A short hash of a record's arrays: equal fingerprints, equal weights."""
    return hashlib.sha256(b"".join(array.data for array in record.values())).hexdigest()[:16]


def ledger_entry(message: str, server_round: int, content: RecordDict,
                 bank: int | None) -> dict[str, Any]:
    """What one reply carried (``bank``: its sender, as far as the server knows): each
    record's kind, keys and serialized size (and a fingerprint of any weights)."""
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
    return {"round": server_round, "bank": bank,
            "message": message,
            "bytes": sum(record["bytes"] for record in records), "records": records}


class BankGuard:
    """Mixed in before one of Flower's strategies (see the module docstring)."""

    def __init__(self, num_rounds: int, registered: dict[int, int] | None = None,
                 logit_adjusted: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_rounds = num_rounds
        self.logit_adjusted = logit_adjusted
        self.prior_shift: float | None = None  # what the final model was shifted by
        self.node_banks: dict[int, int] = dict(registered or {})  # node id -> bank id
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

    @property
    def registered(self) -> bool:
        """Whether the operator said which bank each node is (``bank-nodes``)."""
        return bool(self.node_banks)

    def sender(self, node: int, stated: int | None, stating: Counter[int | None],
               ) -> int | None:
        """The bank a reply comes from, as far as the server knows: the bank the operator
        registered its node for (``bank-nodes``); without registrations, the bank it
        states, unless another reply of the round states it too."""
        if self.registered:
            return self.node_banks.get(node)
        return stated if stating[stated] == 1 else None

    def wrong_bank(self, stated: int, bank: int | None, stating: Counter[int | None],
                   ) -> str | None:
        """Why a reply stating bank id ``stated`` is not from that bank, if it is not
        (``bank``: its ``sender``): a bank sending as another, to have its update or its
        metrics taken for the other's."""
        if bank == stated:
            return None
        if bank is not None:
            return f"it states bank-id {stated}, but its node is bank {bank}"
        return (f"it states bank-id {stated}; its node is no registered bank's"
                if self.registered else f"{stating[stated]} replies state bank-id {stated}")

    def refuse(self, message: str, server_round: int,
               replies: Iterable[Message]) -> list[Message]:
        """The replies in the form the bank's app sends, with an honest weight and their
        own node's bank id; the others refused, logged and recorded. Every reply with
        content goes to the ledger, refused or not, under its node's bank when known."""
        replies = list(replies)
        stating = Counter(bank_of(reply.content) for reply in replies if reply.has_content())
        kept = []
        for reply in replies:
            if reply.has_content():
                content, node = reply.content, reply.metadata.src_node_id
                stated = bank_of(content)
                bank = self.sender(node, stated, stating)
                sent = self.sent if message == "train" else None
                why = malformed(content, sent, self.weighted_by_key) or wrong_weight(
                    content, self.weighted_by_key,
                    keys.N_TRAIN if message == "train" else keys.N_VAL
                ) or self.wrong_bank(stated, bank, stating)  # type: ignore[arg-type]
                self.ledger.append(ledger_entry(message, server_round, content, bank))
                if why:
                    log(WARNING, "fedfraud: refused the %s reply of bank %s (node %d) in "
                        "round %d: %s", message, bank, node, server_round, why)
                    self.refused.append({"round": server_round, "bank": bank,
                                         "message": message, "why": why})
                    continue
            kept.append(reply)
        # In bank order, not arrival order (which differs between deployments): a float
        # sum depends on its order, so the same replies would give different last bits.
        return sorted(kept, key=lambda reply: (0, bank_of(reply.content))
                      if reply.has_content() else (1, reply.metadata.src_node_id))

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        kept = self.refuse("train", server_round, replies)
        arrays, _ = super().aggregate_train(server_round,
                                            weight_only(kept, self.weighted_by_key))
        if arrays is not None and self.logit_adjusted and server_round == self.num_rounds:
            arrays = self.calibrated(arrays, kept)
        return arrays, self.bank_metrics(kept)

    def calibrated(self, arrays: ArrayRecord, kept: list[Message]) -> ArrayRecord:
        """The final model shifted by the banks' pooled fraud log-odds. Under logit
        adjustment the banks trained its logit without their own fraud rates; shifted,
        its probabilities are the federation's again. The counts are what the banks
        state: a false count moves the probabilities (the shift stays within
        ±``MAX_PRIOR_SHIFT``, up to twice that from the honest one), never how
        transactions rank."""
        counts = [reply.content[keys.METRICS] for reply in kept if reply.has_content()]
        frauds = sum(float(metrics[keys.N_FRAUD]) for metrics in counts)
        rows = sum(float(metrics[keys.N_TRAIN]) + float(metrics[keys.N_VAL])
                   for metrics in counts)
        self.prior_shift = min(max(fraud_log_odds(frauds, rows), -MAX_PRIOR_SHIFT),
                               MAX_PRIOR_SHIFT)
        log(INFO, "fedfraud: the final model's logits shifted by %.3f, the banks' pooled "
            "fraud log-odds (logit adjustment)", self.prior_shift)
        return ArrayRecord({keys.WEIGHTS: Array(shifted_output(
            arrays[keys.WEIGHTS].numpy(), self.prior_shift))})

    def aggregate_evaluate(self, server_round: int,
                           replies: Iterable[Message]) -> MetricRecord | None:
        kept = self.refuse("evaluate", server_round, replies)
        answered = [reply.content for reply in kept if reply.has_content()]
        if answered:
            self.final_bank_metrics = {bank_of(content): content[keys.METRICS]
                                       for content in answered}
        super().aggregate_evaluate(server_round, weight_only(kept, self.weighted_by_key))
        return self.bank_metrics(kept)

    def bank_metrics(self, kept: list[Message]) -> MetricRecord | None:
        """The banks' metrics of one round, from every kept reply as the bank sent it."""
        answered = [reply.content for reply in kept if reply.has_content()]
        return aggregate_bank_metrics(answered, self.weighted_by_key) if answered else None


def no_metrics(replies: list[RecordDict], weight_key: str) -> None:
    """Flower's ``*_metrics_aggr_fn``: nothing, for ``BankGuard.bank_metrics`` does it."""


def registered_banks(path: str) -> dict[int, int]:
    """The operator's ``bank-nodes`` file (``fedfraud submit --keys`` writes it): which
    bank each registered node is, {node id: bank id}; {} for no file."""
    if not path:
        return {}
    try:
        banks = {int(node): bank for node, bank in json.loads(Path(path).read_text()).items()}
        one_each = 0 < len(banks) == len(set(banks.values())) and all(
            type(bank) is int and bank >= 0 for bank in banks.values())
    except (OSError, ValueError, AttributeError):
        one_each = False
    if not one_each:
        raise ValueError(f"bank-nodes: {path} is not the operator's file of which bank "
                         'each node is ({"node id": bank id}, one node per bank)')
    return banks


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
        registered=registered_banks(config.bank_nodes),
        logit_adjusted=config.logit_adjusted,
        weighted_by_key=keys.VOTE if config.bank_weighting == "equal" else keys.NUM_EXAMPLES,
        min_train_nodes=config.min_banks,
        min_evaluate_nodes=config.min_banks,
        min_available_nodes=config.min_banks,
        train_metrics_aggr_fn=no_metrics,
        evaluate_metrics_aggr_fn=no_metrics,
        **options,
    )
