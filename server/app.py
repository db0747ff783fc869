"""The federation's ServerApp: config -> FedAvg -> baselines -> results -> report."""

from __future__ import annotations

import time
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from common import keys
from common.config import Config
from common.data import (
    TEST_FILE, BankDataError, describe_data, fit_scaler, load_transactions, standardize,
)
from common.metrics import PooledCurve
from common.model import STATE_DICT_FILE, FraudNet, ModelSpec, packed, unpacked
from common.schema import SCHEMA_FILE, Schema
from server.baselines import compute_baselines
from server.evaluation import TestSetEvaluation
from server.export import export_model
from server.grid import PromptGrid
from server.plots import draw_figures
from server.report import write_report
from server.results import (
    build_metrics, new_run_dir, point_latest, validation_record, write_ledger, write_metrics,
)
from server.secure import run_secure
from server.strategy import make_strategy

app = ServerApp()
# How long a run waits for its banks (simulation: min-banks; deployment: num-banks) to
# connect: Flower's simulation has its SuperNodes at once (a plain `flwr run .` with too
# few fails fast); deployed banks start their own processes (ten on this 2-core
# machine: about a minute) and may join after the run was submitted.
BANKS_DEADLINE_S = {"simulation": 60.0, "deployment": 600.0}


@app.main()
def main(grid: Grid, context: Context) -> None:
    started = time.monotonic()
    config = Config.from_run_config(context.run_config)
    mode = run_mode(grid)
    x_test, y_test = None, None
    if config.server_test_set == "always" or (config.server_test_set == "simulation"
                                              and mode == "simulation"):
        x_test, y_test, schema = load_transactions(
            Path(config.data_dir) / TEST_FILE, config.label_column, "server test set")
        # The server standardizes its held-out data with its own scaler, as banks do.
        x_test = standardize(x_test, *fit_scaler(x_test))
    elif config.secure_aggregation:
        raise ValueError("fedfraud: with secure-aggregation no bank sends validation "
                         "histograms, so the server needs its test set: set "
                         "server-test-set = 'always'")
    else:  # the federation's agreed schema only: no row at the operator
        schema = Schema.load((Path(config.data_dir) / TEST_FILE).with_name(SCHEMA_FILE))
    features = schema.features
    spec = ModelSpec(in_features=len(features), activation=config.model_activation)
    torch.manual_seed(config.seed)
    fresh = FraudNet(spec).state_dict()  # also the references' start: "alone" is alone
    initial = (load_initial(Path(config.initial_model), spec, features)
               if config.initial_model else fresh)
    evaluation = TestSetEvaluation(x_test, y_test, spec, config.num_server_rounds)

    strategy = make_strategy(config)
    # A deployment starts with every bank it was given (they start while the run waits);
    # min-banks is how many may remain when banks drop out later.
    wanted = config.num_banks if mode == "deployment" else config.min_banks
    log(INFO, "fedfraud: %d banks connected",
        wait_for_banks(grid, wanted, BANKS_DEADLINE_S[mode]))
    if config.secure_aggregation:
        result = run_secure(PromptGrid(grid), context, config, initial, evaluation,
                            strategy)
    else:
        result = strategy.start(
            grid=PromptGrid(grid),
            initial_arrays=ArrayRecord({keys.WEIGHTS: Array(packed(initial))}),
            num_rounds=config.num_server_rounds,
            timeout=config.round_timeout_s,
            train_config=ConfigRecord({keys.EVALUATE_INCOMING: True}),
            evaluate_fn=evaluation,
        )

    federation_s = time.monotonic() - started
    last = max(evaluation.seconds)
    curves = {}
    if y_test is not None:
        curves["federated, test set"] = PooledCurve.from_scores(y_test,
                                                                evaluation.logits[last])
    validation = validation_record(result, last)
    if validation is not None:
        curves["federated, banks' pooled validation"] = PooledCurve.from_histograms(
            validation[keys.HIST_LEGIT], validation[keys.HIST_FRAUD])
    baselines, why_not = None, "baselines = false"
    if config.baselines and mode == "simulation" and y_test is not None:
        log(INFO, "fedfraud: training the centralized and local-only references")
        try:
            baselines, central_logits = compute_baselines(
                config, spec, fresh, x_test, y_test, evaluation.logits[last])
            curves["centralized, test set"] = PooledCurve.from_scores(y_test, central_logits)
        except BankDataError as err:  # keep the federated results all the same
            log(WARNING, "fedfraud: no baselines: %s", err)
            why_not = str(err)
    elif config.baselines:
        why_not = ("deployment: no party holds every bank's rows" if mode != "simulation"
                   else "no server test set (server-test-set)")

    run_dir = new_run_dir(Path(config.runs_dir), context.run_id)
    metrics = build_metrics(str(context.run_id), mode, config, result, evaluation,
                            strategy, baselines, federation_s)
    metrics["timing"]["baselines_s"] = time.monotonic() - started - federation_s
    if baselines is None:
        metrics["baselines_skipped"] = why_not
    write_metrics(run_dir, metrics)
    write_ledger(run_dir, strategy.ledger)
    export_model(run_dir, unpacked(result.arrays[keys.WEIGHTS].numpy(), FraudNet(spec)),
                 spec, features, metrics, describe_data(Path(config.data_dir)))
    figures = draw_figures(run_dir, metrics, curves)
    point_latest(run_dir)
    write_report(run_dir, metrics, config, figures)
    log(INFO, "fedfraud run folder: %s", run_dir)


def load_initial(run_dir: Path, spec: ModelSpec, features: list[str],
                 ) -> dict[str, torch.Tensor]:
    """The weights of an earlier run's model (``initial-model``), if it is a FraudNet of
    this run's ``spec`` and federation's features with finite weights; tensors only
    (``weights_only``: a crafted file runs no code). Anything else is one ValueError
    naming the file."""
    path = run_dir / STATE_DICT_FILE

    def refuse(why: str) -> ValueError:
        return ValueError(f"fedfraud: initial-model: {path}: {why}")

    try:
        saved = torch.load(path, weights_only=True)
        state, trained_on = dict(saved["state_dict"]), list(saved["features"])
        activation = dict(saved.get("spec") or {}).get("activation", "relu")  # older: relu
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same answer
        raise refuse(f"not a fedfraud model ({type(err).__name__}: {err})") from None
    if trained_on != features:
        raise refuse(f"trained on other features ({len(trained_on)}) than this "
                     f"federation's schema ({len(features)}): start fresh "
                     "(initial-model = '')")
    if activation != spec.activation:
        raise refuse(f"its hidden layers use {activation}, this run's model "
                     f"{spec.activation} (activation / dp-activation): start fresh "
                     "(initial-model = '') or run with the same setting")
    net = FraudNet(spec)
    try:
        net.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise refuse(f"not this federation's model shape ({str(err).splitlines()[0]})"
                     ) from None
    # The model's own order and float32 (what ``packed`` sends), not the file's.
    state = net.state_dict()
    if not all(torch.isfinite(tensor).all() for tensor in state.values()):
        raise refuse("holds non-finite weights")
    return state


def wait_for_banks(grid: Grid, count: int, deadline_s: float) -> int:
    """Until ``count`` banks are connected; else fail with the fix in the message
    (Flower's strategies would wait forever, e.g. in a plain ``flwr run .``, whose
    local simulation has two SuperNodes)."""
    deadline = time.monotonic() + deadline_s
    while (connected := len(list(grid.get_node_ids()))) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"fedfraud: only {connected} of the {count} banks connected after "
                f"{deadline_s:.0f} s. In Flower's local simulation ask for them: "
                f'flwr run . --federation-config "num-supernodes={count}" (or make '
                "demo), or lower min-banks; in a deployment, start the banks or lower "
                "num-banks")
        time.sleep(0.5)
    return connected


def run_mode(grid: Grid) -> str:
    """"simulation" when Flower runs the banks in-memory, else "deployment"."""
    return "simulation" if type(grid).__name__ == "InMemoryGrid" else "deployment"
