"""Secure aggregation: the server learns only the sum of the banks' models (SecAgg+).

Flower 1.39 runs SecAgg+ only on its legacy path: ``SecAggPlusWorkflow`` inside a
``DefaultWorkflow`` with the legacy FedAvg; each bank's ClientApp answers through
``secaggplus_mod`` (client/app.py), which masks the bank's weights before they leave.
The banks train as in the plain run and the server evaluates its test set every
round; but nothing per bank travels in the clear: a bank's reply names the bank beside
its masked weights and holds no loss, size, epsilon or histogram, and there is no
per-bank final evaluate step. So a SecAgg+ run has no pooled validation curve (the
threshold is ``decision-threshold``) and no per-bank table. The result comes back in
the plain strategy's ``Result`` shape so that metrics.json, the model and the report
are built the same way.
"""

from __future__ import annotations

from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, MetricRecord, RecordDict
from flwr.common import Metrics, Scalar, log, ndarrays_to_parameters
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result

from common import keys
from common.config import Config
from common.model import packed
from server.evaluation import TestSetEvaluation
from server.strategy import BankGuard, ledger_entry


class RecordingGrid:
    """The grid, passed to Flower's workflow, noting what every bank's reply held."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.replies: list[tuple[int, int, RecordDict]] = []  # (round, node, content)

    def send_and_receive(self, messages: Any, timeout: float | None = None) -> Any:
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if reply.has_error():  # the reason's tail holds the exception
                reason = reply.error.reason[-900:].replace("\n", " | ")
                log(WARNING, "fedfraud: SecAgg+ reply from node %d failed: %s",
                    reply.metadata.src_node_id, reason)
            if reply.has_content():
                self.replies.append((int(reply.metadata.group_id or 0),
                                     reply.metadata.src_node_id, reply.content))
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def ledger(self, node_to_bank: dict[int, int]) -> list[dict[str, Any]]:
        return [ledger_entry("train (SecAgg+)", server_round, content,
                             bank=node_to_bank.get(node, -1))
                for server_round, node, content in self.replies]


def aggregate_fit_metrics(results: list[tuple[int, Metrics]]) -> dict[str, Scalar]:
    """The legacy strategy's metric hook: which banks took part (all a reply says)."""
    return {keys.BANK_IDS: sorted(metrics[keys.BANK_ID]  # type: ignore[misc]
                                  for _, metrics in results
                                  if isinstance(metrics.get(keys.BANK_ID), int))}


def run_secure(grid: Grid, context: Context, config: Config,
               initial: dict[str, Any], evaluation: TestSetEvaluation,
               guard: BankGuard) -> Result:
    """The run with SecAgg+; ``guard`` (the plain strategy) keeps the ledger."""
    def as_record(arrays: list[np.ndarray]) -> ArrayRecord:
        """The model's one vector, as the plain run sends it, in float32 (SecAgg+
        dequantizes to float64)."""
        [weights] = arrays
        return ArrayRecord({keys.WEIGHTS: Array(np.asarray(weights, np.float32))})

    def evaluate(server_round: int, arrays: list[np.ndarray],
                 _: dict[str, Scalar]) -> tuple[float, dict[str, Scalar]]:
        metrics = evaluation(server_round, as_record(arrays))
        return float(metrics["loss"]), dict(metrics)

    strategy = LegacyFedAvg(
        fraction_fit=1.0, fraction_evaluate=0.0,
        min_fit_clients=config.min_banks, min_available_clients=config.min_banks,
        initial_parameters=ndarrays_to_parameters([packed(initial)]),
        on_fit_config_fn=lambda server_round: {keys.SERVER_ROUND: server_round},
        evaluate_fn=evaluate,
        fit_metrics_aggregation_fn=aggregate_fit_metrics,
    )
    legacy = LegacyContext(context=context,
                           config=ServerConfig(num_rounds=config.num_server_rounds),
                           strategy=strategy)
    recording = RecordingGrid(grid)
    workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(
        num_shares=config.secagg_shares, reconstruction_threshold=config.secagg_threshold,
        max_weight=1.0))  # every bank one vote (bank-weighting "equal")
    workflow(recording, legacy)  # type: ignore[arg-type]

    final = legacy.state.array_records[MAIN_PARAMS_RECORD]
    arrays = as_record([array.numpy() for array in final.values()])
    node_to_bank = dict(guard.node_banks)  # the registered banks', if given
    for _, node, content in recording.replies if not guard.registered else ():
        for record in content.config_records.values():
            if isinstance(record.get(keys.BANK_ID), int):
                node_to_bank[node] = record[keys.BANK_ID]
    guard.ledger[:0] = recording.ledger(node_to_bank)

    fit_history = legacy.history.metrics_distributed_fit
    rounds = sorted({r for values in fit_history.values() for r, _ in values})
    return Result(
        arrays=arrays,
        train_metrics_clientapp={r: MetricRecord({
            key: value for key, values in fit_history.items() for rr, value in values
            if rr == r}) for r in rounds},
        evaluate_metrics_clientapp={},
    )
