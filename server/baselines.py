"""The references that say whether federation pays: centralized and local-only models.

Both use the banks' own splits and scalers (``prepared_bank``), the same model, the
same initial weights, the same train loop and the same training budget as the federation
(``num-server-rounds`` rounds of the epochs a bank of that size trains in a round), and
are scored like the federated model: on the server's test set, with the threshold
chosen on validation data.

- centralized: one model on all banks' pooled training rows. It needs every bank's
  rows in one place, so only a simulation, where every shard is on one disk, computes it.
- local-only: each bank alone on its own rows, threshold chosen on its own validation
  data; compared with the federated model on that same validation data.

``federated_minus`` says whether the federated model's test AUC differs from the
centralized one's and the best bank's alone (by test AUC, as the goals pick it) by more
than the test set's noise: the difference with a 95 % paired bootstrap interval.
"""

from __future__ import annotations

import time
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.common import log

from common.config import Config
from common.data import BankSplit, bank_file, fit_scaler, prepared_bank, standardize
from common.metrics import PooledCurve, auc_difference, summarize
from common.model import FraudNet, ModelSpec
from common.task import score, train

Scaler = tuple[np.ndarray, np.ndarray]


def fit_alone(split: BankSplit, scaler: Scaler, spec: ModelSpec,
              initial: dict[str, torch.Tensor], config: Config, seed: int) -> FraudNet:
    """One model trained on ``split`` alone, for the federation's whole budget: the
    run's rounds times the epochs a bank with these rows trains in a round."""
    model = FraudNet(spec)
    model.load_state_dict(initial)
    train(model, standardize(split.x_train, *scaler), split.y_train,
          epochs=config.num_server_rounds * config.local_epochs_for(len(split.y_train)),
          batch_size=config.batch_size, learning_rate=config.learning_rate,
          pos_weight=config.pos_weight, seed=seed, local_optimizer=config.local_optimizer)
    return model


def validation_curve(model: FraudNet, x_val: np.ndarray, y_val: np.ndarray) -> PooledCurve:
    """The same histogram curve the banks build for the federated model."""
    return PooledCurve.from_scores(y_val, score(model, x_val))


def tested(logits: np.ndarray, y_test: np.ndarray, curve: PooledCurve) -> dict[str, Any]:
    """Test-set metrics at the threshold ``curve`` (validation data) chooses."""
    threshold = curve.best_f1_threshold()
    return {**summarize(y_test, logits, threshold), "validation": curve.summary(threshold)}


def compute_baselines(
    config: Config, spec: ModelSpec, initial: dict[str, torch.Tensor],
    x_test: np.ndarray, y_test: np.ndarray, federated_logits: np.ndarray,
) -> tuple[dict[str, Any], np.ndarray]:
    """``{"centralized": ..., "local_only": [...], "federated_minus": ...}`` and the
    centralized test logits. Logs its progress: every tenth of the banks' local-only
    models, then the centralized one, with the seconds since it began."""
    started = time.monotonic()

    def progress(done: str) -> None:
        log(INFO, "fedfraud: references: %s [%.1f s]", done, time.monotonic() - started)

    banks = range(config.num_banks)
    prepared = [prepared_bank(bank, Path(config.data_dir) / bank_file(bank), config)
                for bank in banks]
    splits = [rows.split for rows in prepared]
    every = -(-len(banks) // 10)  # a tenth of the banks, rounded up: at most ten lines
    local_only, best = [], (-1.0, 0, np.empty(0))  # the best bank's (AUC, id, logits)
    for bank, rows in zip(banks, prepared):
        split, scaler = rows.split, rows.scaler
        model = fit_alone(split, scaler, spec, initial, config, config.seed + bank)
        curve = validation_curve(model, standardize(split.x_val, *scaler), split.y_val)
        logits = score(model, x_test)
        result = tested(logits, y_test, curve)
        local_only.append({"bank": bank, "own_validation": result.pop("validation"),
                           "test": result})
        if result["auc"] > best[0]:
            best = (result["auc"], bank, logits)
        if (bank + 1) % every == 0 or bank + 1 == len(banks):
            progress(f"local-only models of {bank + 1} of {len(banks)} banks trained")
    pooled = BankSplit.pooled(splits)
    scaler = fit_scaler(pooled.x_train)
    progress(f"training the centralized model on {len(pooled.y_train):,} pooled training "
             "rows")
    model = fit_alone(pooled, scaler, spec, initial, config, config.seed)
    curve = validation_curve(model, standardize(pooled.x_val, *scaler), pooled.y_val)
    logits = score(model, x_test)
    centralized = {
        "round": config.num_server_rounds,  # the same budget, as epochs over pooled data
        **tested(logits, y_test, curve),
        "banks_trained": list(banks), "banks_evaluated": list(banks),
    }
    progress("centralized model trained; bootstrapping the test AUC differences")
    federated_minus = {
        "centralized": auc_difference(y_test, federated_logits, logits),
        "best_local_only": {"bank": best[1],
                            **auc_difference(y_test, federated_logits, best[2])},
    }
    progress("done")
    return {"centralized": centralized, "local_only": local_only,
            "federated_minus": federated_minus}, logits
