"""The bank's ClientApp: thin Flower handlers in front of ``client.bank.Bank``.

Where the bank's work runs depends on the node config:
- ``worker=<socket>`` (deployment): the bank's warm worker process, started beside its
  SuperNode, already holds its data and torch; this module then never imports torch,
  so the per-message ClientApp process Flower starts stays cheap.
- otherwise (simulation, or ``shard=<path>`` alone): in this process, with the bank's
  fitted scaler kept in ``context.state``.

Either way a reply holds only model weights and counts: no row, no per-row score. With
secure aggregation on, Flower's ``secaggplus_mod`` masks the weights before they leave.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import flwr.compat.common.recorddict_compat as compat
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (
    Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from common import keys
from common.config import Config
from common.data import bank_file

LEGACY_PARAMETERS = "fitins.parameters"

if TYPE_CHECKING:
    from client.bank import Arrays, Bank
    from client.worker import WorkerBank

app = ClientApp()


def secure_only(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """SecAgg+ messages go through Flower's ``secaggplus_mod`` (it masks the bank's
    weights before they leave); plain ones straight to the handler."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        from flwr.client.mod import secaggplus_mod  # ~0.1 s of imports: only when used

        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


@app.train(mods=[secure_only])
def train_handler(msg: Message, context: Context) -> Message:
    config = Config.from_run_config(context.run_config)
    if LEGACY_PARAMETERS in msg.content.array_records:  # SecAgg+ speaks Flower's legacy
        return legacy_train(msg, context, config)
    settings = msg.content[keys.CONFIG]
    arrays, metrics = bank_for(context, config).train(
        numpy_arrays(msg), config, int(settings[keys.SERVER_ROUND]),
        bool(settings.get(keys.EVALUATE_INCOMING, False)),
        float(settings.get(keys.PROXIMAL_MU, 0.0)),
    )
    record = ArrayRecord({name: Array(value) for name, value in arrays.items()})
    return reply(msg, {keys.ARRAYS: record, keys.METRICS: MetricRecord(metrics)})


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    config = Config.from_run_config(context.run_config)
    # Evaluate messages carry only the final model (server/strategy.py): audit it too.
    metrics = bank_for(context, config).evaluate(numpy_arrays(msg), config, True)
    return reply(msg, {keys.METRICS: MetricRecord(metrics)})


def legacy_train(msg: Message, context: Context, config: Config) -> Message:
    """The same training, in the legacy FitIns/FitRes shape SecAgg+ needs. One vote per
    bank (``num_examples`` 1); the reply's metrics are scalars only."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    names = str(fitins.config[keys.ARRAY_NAMES]).split(",")
    arrays = dict(zip(names, parameters_to_ndarrays(fitins.parameters)))
    trained, metrics = bank_for(context, config).train(
        arrays, config, int(fitins.config[keys.SERVER_ROUND]), False)
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(
        [trained[name] for name in names]), num_examples=1, metrics=metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def numpy_arrays(msg: Message) -> Arrays:
    return {name: array.numpy() for name, array in msg.content[keys.ARRAYS].items()}


def reply(msg: Message, records: dict[str, Any]) -> Message:
    return Message(content=RecordDict(records), reply_to=msg)


def bank_for(context: Context, config: Config) -> Bank | WorkerBank:
    """The bank this node serves: its warm worker if it has one, else built here."""
    node = context.node_config
    if "worker" in node:
        from client.worker import WorkerBank

        return WorkerBank(Path(str(node["worker"])))
    from client.bank import Bank

    if "shard" in node:
        bank_id, shard = int(node["bank-id"]), Path(str(node["shard"]))
    else:  # simulation: one virtual node per partition
        bank_id = int(node["partition-id"])
        shard = Path(config.data_dir) / bank_file(bank_id)
    state_dir = Path(str(node["state"])) if "state" in node else None
    stored = context.state.get(keys.SCALER)
    scaler = tuple(stored.to_numpy_ndarrays()) if stored is not None else None
    bank = Bank(bank_id, shard, config, scaler, state_dir)  # type: ignore[arg-type]
    if stored is None:  # fitted just now
        context.state[keys.SCALER] = ArrayRecord(list(bank.scaler))
        bank.keep_scaler()
    return bank
