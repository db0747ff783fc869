"""The bank's ClientApp: thin handlers over common.task.

A bank reads only its own shard, standardizes with a scaler fitted on its own train
split (kept in ``context.state``, never sent), trains or evaluates the global model,
and replies with weights and counts. No row and no per-row score leaves the bank.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common import keys
from common.config import Config
from common.data import (
    BankSplit, bank_file, fit_scaler, load_transactions, split_bank, standardize,
)
from common.metrics import bce_loss, confusion, score_histograms
from common.model import FraudNet, ModelSpec
from common.task import score, train

app = ClientApp()


@dataclass(frozen=True)
class Bank:
    id: int
    data: BankSplit  # standardized with the bank's own scaler


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    config = Config.from_run_config(context.run_config)
    bank = load_bank(context, config)
    model = global_model(msg, bank)
    server_round = int(msg.content[keys.CONFIG][keys.SERVER_ROUND])
    loss = train(
        model, bank.data.x_train, bank.data.y_train,
        epochs=config.local_epochs, batch_size=config.batch_size,
        learning_rate=config.learning_rate, pos_weight=config.pos_weight,
        seed=config.seed + 1000 * server_round + bank.id,
    )
    metrics = MetricRecord({
        keys.NUM_EXAMPLES: len(bank.data.y_train),
        keys.VOTE: 1,
        keys.TRAIN_LOSS: loss,
        keys.BANK_ID: bank.id,
        keys.N_TRAIN: len(bank.data.y_train),
        keys.N_VAL: len(bank.data.y_val),
        keys.N_FRAUD: int(bank.data.y_train.sum() + bank.data.y_val.sum()),
    })
    content = RecordDict({keys.ARRAYS: ArrayRecord(model.state_dict()), keys.METRICS: metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    config = Config.from_run_config(context.run_config)
    bank = load_bank(context, config)
    model = global_model(msg, bank)
    y, logits = bank.data.y_val, score(model, bank.data.x_val)
    threshold = float(msg.content[keys.CONFIG].get(keys.THRESHOLD, 0.5))
    counts = confusion(y, logits, threshold)
    legit, fraud = score_histograms(y, logits)
    metrics = MetricRecord({
        keys.NUM_EXAMPLES: len(y),
        keys.VOTE: 1,
        keys.LOSS: bce_loss(y, logits),
        keys.BANK_ID: bank.id,
        keys.TP: counts.tp, keys.FP: counts.fp, keys.FN: counts.fn, keys.TN: counts.tn,
        keys.HIST_LEGIT: legit,
        keys.HIST_FRAUD: fraud,
    })
    return Message(content=RecordDict({keys.METRICS: metrics}), reply_to=msg)


def bank_source(context: Context, config: Config) -> tuple[int, Path]:
    """(bank id, shard path): from node config in deployment, else the partition id."""
    node = context.node_config
    if "shard" in node:
        return int(node["bank-id"]), Path(str(node["shard"]))
    bank = int(node["partition-id"])
    return bank, Path(config.data_dir) / bank_file(bank)


def load_bank(context: Context, config: Config) -> Bank:
    """The bank's own data, split, standardized with its own (stored) scaler."""
    bank, path = bank_source(context, config)
    x, y, _ = load_transactions(path, config.label_column, f"bank {bank}")
    split = split_bank(x, y, config.val_fraction, config.seed + bank)
    if keys.SCALER not in context.state:
        context.state[keys.SCALER] = ArrayRecord(list(fit_scaler(split.x_train)))
    mean, scale = context.state[keys.SCALER].to_numpy_ndarrays()
    scaled = BankSplit(
        standardize(split.x_train, mean, scale), split.y_train,
        standardize(split.x_val, mean, scale), split.y_val,
    )
    return Bank(bank, scaled)


def global_model(msg: Message, bank: Bank) -> FraudNet:
    model = FraudNet(ModelSpec(in_features=bank.data.x_train.shape[1]))
    model.load_state_dict(msg.content[keys.ARRAYS].to_torch_state_dict())
    return model
