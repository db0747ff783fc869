"""The federation's ServerApp: config -> FedAvg -> results -> report."""

from __future__ import annotations

import time
from logging import INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from common import keys
from common.config import Config
from common.data import (
    TEST_FILE, describe_data, fit_scaler, load_transactions, standardize,
)
from common.model import FraudNet, ModelSpec
from server.evaluation import FedAvgEvaluateLast, TestSetEvaluation, aggregate_bank_metrics
from server.report import write_report
from server.export import export_model
from server.results import build_metrics, new_run_dir, point_latest, write_metrics

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    started = time.monotonic()
    config = Config.from_run_config(context.run_config)
    x_test, y_test, features = load_transactions(
        Path(config.data_dir) / TEST_FILE, config.label_column, "server test set"
    )
    # The server standardizes its own held-out data with its own scaler, as each bank does.
    x_test = standardize(x_test, *fit_scaler(x_test))
    spec = ModelSpec(in_features=len(features))
    torch.manual_seed(config.seed)
    evaluation = TestSetEvaluation(x_test, y_test, spec, config.num_server_rounds)

    strategy = FedAvgEvaluateLast(
        num_rounds=config.num_server_rounds,
        weighted_by_key=keys.VOTE if config.bank_weighting == "equal" else keys.NUM_EXAMPLES,
        min_train_nodes=config.min_banks,
        min_evaluate_nodes=config.min_banks,
        min_available_nodes=config.min_banks,
        train_metrics_aggr_fn=aggregate_bank_metrics,
        evaluate_metrics_aggr_fn=aggregate_bank_metrics,
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(FraudNet(spec).state_dict()),
        num_rounds=config.num_server_rounds,
        train_config=ConfigRecord({keys.EVALUATE_INCOMING: True}),
        evaluate_fn=evaluation,
    )

    run_dir = new_run_dir(Path(config.runs_dir), context.run_id)
    metrics = build_metrics(
        str(context.run_id), run_mode(grid), config, result, evaluation,
        total_s=time.monotonic() - started,
    )
    write_metrics(run_dir, metrics)
    export_model(run_dir, result.arrays.to_torch_state_dict(), spec, features, metrics,
                 describe_data(Path(config.data_dir)))
    point_latest(run_dir)
    write_report(run_dir, metrics, config)
    log(INFO, "fedfraud run folder: %s", run_dir)


def run_mode(grid: Grid) -> str:
    """"simulation" when Flower runs the banks in-memory, else "deployment"."""
    return "simulation" if type(grid).__name__ == "InMemoryGrid" else "deployment"
