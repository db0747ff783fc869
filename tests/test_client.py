"""The bank's handlers called in-process with real Flower messages."""

from __future__ import annotations

import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import Metadata

from client.app import app
from common import keys
from common.config import Config
from common.data import BankDataError, bank_file, load_transactions, split_bank
from common.metrics import SCORE_EDGES
from common.model import FraudNet, ModelSpec


def message(kind: str, content: RecordDict) -> Message:
    metadata = Metadata(
        run_id=1, message_id="m1", src_node_id=0, dst_node_id=5, reply_to_message_id="",
        group_id="1", created_at=time.time(), ttl=600.0, message_type=kind,
    )
    return Message(content=content, metadata=metadata)


def bank_context(config: Config, bank: int = 5) -> Context:
    return Context(run_id=1, node_id=5, node_config={"partition-id": bank},
                   state=RecordDict(), run_config=config.as_run_config())


def global_arrays() -> ArrayRecord:
    torch.manual_seed(0)
    return ArrayRecord(FraudNet(ModelSpec(in_features=30)).state_dict())


def train_message() -> Message:
    settings = ConfigRecord({keys.SERVER_ROUND: 1, keys.EVALUATE_INCOMING: True})
    return message("train", RecordDict({keys.ARRAYS: global_arrays(), keys.CONFIG: settings}))


def test_train_replies_weights_and_sample_count_but_not_the_scaler(prepared) -> None:
    context = bank_context(prepared)

    reply = app(train_message(), context)

    metrics = reply.content[keys.METRICS]
    x, y, _ = load_transactions(Path(prepared.data_dir) / bank_file(5), "Class", "bank 5")
    split = split_bank(x, y, prepared.val_fraction, prepared.seed + 5)
    assert metrics[keys.NUM_EXAMPLES] == len(split.y_train)  # samples, not batches
    assert metrics[keys.N_FRAUD] == int(y.sum()) and metrics[keys.BANK_ID] == 5
    # Only the model's weights travel; they changed; the scaler stays in the state.
    arrays = reply.content[keys.ARRAYS]
    assert list(arrays.keys()) == list(global_arrays().keys())
    assert not np.allclose(arrays["net.0.weight"].numpy(),
                           global_arrays()["net.0.weight"].numpy())
    assert list(reply.content.keys()) == [keys.ARRAYS, keys.METRICS]
    mean, scale = context.state[keys.SCALER].to_numpy_ndarrays()
    np.testing.assert_allclose(mean, split.x_train.mean(axis=0), rtol=1e-5, atol=1e-5)
    assert not any(a.shape == mean.shape for a in arrays.to_numpy_ndarrays())


def test_scaler_is_fitted_once_and_reused(prepared) -> None:
    context = bank_context(prepared)
    app(train_message(), context)
    marker = ArrayRecord([np.zeros(30), np.ones(30)])  # identity scaler
    context.state[keys.SCALER] = marker

    app(train_message(), context)

    assert context.state[keys.SCALER] is marker


def test_evaluate_replies_counts_and_histograms_only(prepared) -> None:
    reply = app(message("evaluate", RecordDict({
        keys.ARRAYS: global_arrays(), keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: 1}),
    })), bank_context(prepared, bank=2))

    metrics = reply.content[keys.METRICS]
    n_val = metrics[keys.NUM_EXAMPLES]
    assert sum(int(metrics[k]) for k in keys.COUNT_KEYS) == n_val
    assert sum(metrics[keys.HIST_LEGIT]) + sum(metrics[keys.HIST_FRAUD]) == n_val
    assert len(metrics[keys.HIST_LEGIT]) == len(SCORE_EDGES) - 1
    assert metrics[keys.LOSS] > 0
    assert list(reply.content.keys()) == [keys.METRICS]  # no arrays, no scores


def test_missing_shard_error_names_bank_and_file(prepared, tmp_path: Path) -> None:
    config = Config.from_run_config({**prepared.as_run_config(), "data-dir": str(tmp_path)})
    with pytest.raises(BankDataError, match=f"bank 5: .*{bank_file(5)}: file not found"):
        app(train_message(), bank_context(config))


def test_warm_worker_replies_exactly_what_the_bank_computes_in_process(
    prepared, tmp_path: Path
) -> None:
    from server.launch import Services, flower_env, start_worker, stop

    started = Services(flower_env(tmp_path), tmp_path, [])
    try:
        socket = start_worker(started, 5, Path(prepared.data_dir) / bank_file(5), tmp_path)
        warm_context = Context(run_id=1, node_id=5, node_config={"worker": str(socket)},
                               state=RecordDict(), run_config=prepared.as_run_config())

        with pytest.raises(AuthenticationError):  # without the bank's key: refused
            Client(str(socket), family="AF_UNIX", authkey=b"not the bank's key")
        warm = app(train_message(), warm_context)  # and the worker still serves
        local = app(train_message(), bank_context(prepared))
    finally:
        stop(*started.processes)

    assert list(warm.content.keys()) == list(local.content.keys())
    for name, array in local.content[keys.ARRAYS].items():
        np.testing.assert_allclose(warm.content[keys.ARRAYS][name].numpy(), array.numpy(),
                                   rtol=1e-5, atol=1e-6)
    warm_metrics, local_metrics = warm.content[keys.METRICS], local.content[keys.METRICS]
    assert sorted(warm_metrics.keys()) == sorted(local_metrics.keys())
    assert warm_metrics[keys.HIST_FRAUD] == local_metrics[keys.HIST_FRAUD]
    assert warm_context.state.get(keys.SCALER) is None  # the scaler stays in the worker
    assert all(p.poll() is not None for p in started.processes)


def test_worker_errors_reach_the_clientapp_naming_bank_and_file(prepared, tmp_path) -> None:
    from client.worker import WorkerError
    from server.launch import Services, flower_env, start_worker, stop

    started = Services(flower_env(tmp_path), tmp_path, [])
    try:
        socket = start_worker(started, 4, tmp_path / "missing.csv", tmp_path)
        context = Context(run_id=1, node_id=4, node_config={"worker": str(socket)},
                          state=RecordDict(), run_config=prepared.as_run_config())
        with pytest.raises(WorkerError, match="bank 4: .*missing.csv: file not found"):
            app(train_message(), context)
    finally:
        stop(*started.processes)
