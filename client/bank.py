"""One bank: its own data (read once), its own scaler, and what it does in a round.

Plain numpy in, plain numpy and numbers out: the model arrives and leaves as one
vector of weights (``keys.WEIGHTS``). This is the only client module that trains or
scores (through common/task.py).
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import keys
from common.config import Config
from common.data import (
    SCALER_FILE, prepared_bank, save_scaler, scaler_file, standardize,
)
from common.metrics import (
    PooledCurve, bce_loss, confusion, membership_histograms, row_losses, score_histograms,
    without_nan,
)
from common.model import (
    CARD_JSON_FILE, FLOATS, MAX_WEIGHT, FraudNet, ModelSpec, implausible, packed, save_model,
    unpacked,
)
from common.schema import BankDataError
from common.privacy import epsilon_spent, privacy_for
from common.task import fraud_log_odds, score, train
from client.attack import POISONS, poison

Arrays = dict[str, np.ndarray]  # as the model travels: {keys.WEIGHTS: one vector}
MODELS_DIR = "models"  # in the bank's state folder: <run id>/ per kept model, and latest
MIN_THRESHOLD_FRAUDS = 20  # validation frauds a bank needs to choose its own threshold
Scaler = tuple[np.ndarray, np.ndarray]  # (mean, scale), fitted on the bank's train split


def point_at(folder: Path) -> None:
    """``latest`` beside ``folder`` points at it (an atomic replace of the link)."""
    link = folder.parent / "latest"
    tmp = folder.parent / f".latest-{secrets.token_hex(4)}"
    tmp.symlink_to(folder.name)
    tmp.replace(link)


class Bank:
    """``secret_randomness``: a deployed bank training with DP draws its randomness
    (DP-SGD noise, Poisson sampling, dropout) from the OS and never sends it, so the
    server cannot replay or cancel its noise. Otherwise training is seeded from the run
    config, so a run reproduces (and a deployment gives the simulation's numbers)."""

    def __init__(self, bank_id: int, shard: Path, config: Config,
                 scaler: Scaler | None = None, state_dir: Path | None = None,
                 secret_randomness: bool = False) -> None:
        prepared = prepared_bank(bank_id, shard, config)
        split, self.schema = prepared.split, prepared.schema
        self.features = self.schema.features
        self.state_dir = state_dir or shard.parent  # the bank's own, writable folder
        self.id = bank_id
        self.secret_randomness = secret_randomness
        self.scaler: Scaler = scaler or prepared.scaler
        self.x_train, self.y_train = standardize(split.x_train, *self.scaler), split.y_train
        self.x_val, self.y_val = standardize(split.x_val, *self.scaler), split.y_val

    def keep_scaler(self) -> Path:
        """Write the fitted scaler into the bank's own folder, for scoring later."""
        path = scaler_file(self.state_dir)
        save_scaler(path, *self.scaler, self.schema)
        return path

    def spec(self, config: Config) -> ModelSpec:
        return ModelSpec(in_features=self.x_train.shape[1],
                         activation=config.model_activation)

    def _model(self, arrays: Arrays, config: Config) -> FraudNet:
        """The model the server sent (``keys.WEIGHTS``, one vector), refused unless it
        fits the bank's own architecture (the layers and shapes its schema and settings
        give; a crafted model cannot choose them) with finite float weights (an honest
        server refuses non-finite updates itself: server/strategy.py)."""
        model = FraudNet(self.spec(config))
        if set(arrays) != {keys.WEIGHTS}:
            raise BankDataError(f"bank {self.id}: the model the server sent has arrays "
                                f"{sorted(arrays)}, not the one {keys.WEIGHTS!r}; not used")
        weights = arrays[keys.WEIGHTS]
        if weights.dtype not in FLOATS:
            raise BankDataError(f"bank {self.id}: the model the server sent holds "
                                f"weights that are not float32 or float64 numbers "
                                f"({weights.dtype.str}); not used")
        try:
            state = unpacked(weights, model)
        except ValueError as err:
            raise BankDataError(f"bank {self.id}: the model the server sent does not fit "
                                f"the bank's model ({err}); not used") from None
        if implausible(weights):
            raise BankDataError(f"bank {self.id}: the model the server sent holds "
                                f"non-finite weights or weights beyond {MAX_WEIGHT:g}; "
                                "not used")
        model.load_state_dict(state)
        return model

    def evaluate(self, arrays: Arrays, config: Config, audit: bool = False,
                 ) -> dict[str, Any]:
        """Loss, confusion counts and score histograms on the bank's validation split;
        with ``audit``, also the membership audit's histograms (training vs
        validation rows' losses)."""
        model = self._model(arrays, config)
        logits = score(model, self.x_val)
        counts = confusion(self.y_val, logits, config.decision_threshold)
        legit, fraud = score_histograms(self.y_val, logits)
        metrics = {
            keys.NUM_EXAMPLES: len(self.y_val), keys.VOTE: 1, keys.BANK_ID: self.id,
            keys.N_VAL: len(self.y_val), keys.LOSS: bce_loss(self.y_val, logits),
            keys.TP: counts.tp, keys.FP: counts.fp, keys.FN: counts.fn, keys.TN: counts.tn,
            keys.HIST_LEGIT: legit, keys.HIST_FRAUD: fraud,
        }
        if audit:
            trained_on = row_losses(self.y_train, score(model, self.x_train))
            outside, inside = membership_histograms(trained_on,
                                                    row_losses(self.y_val, logits))
            metrics.update({keys.HIST_NONMEMBER: outside, keys.HIST_MEMBER: inside})
        return metrics

    def keep_final(self, arrays: Arrays, config: Config, run_id: str) -> dict[str, Any]:
        """The bank's own copy of the run's result, for its production scoring.

        With personalization (``config.personalization``) the bank first fine-tunes the
        federated model on its own training rows (``personalize-epochs``, at least
        ``min-local-steps`` steps, the run's batch size and learning rate) and keeps whichever of the two has the higher AP
        on its own validation rows; otherwise it keeps the federated model. The kept
        model goes to the bank's state folder as ``models/<run id>/`` (model.ts,
        model.pt, model_card.json with a threshold chosen on the bank's validation
        rows, scaler.json), and ``models/latest`` points at it: ``fedfraud-bank
        score``/``serve --run <state>/models/latest --scaler <that>/scaler.json`` need
        nothing from the operator. One model per run (a repeated evaluate request
        changes nothing). Returns what the bank reports: the fine-tuned model's
        validation histograms and ``PERSONAL_KEPT`` (nothing without personalization).

        The choice and both APs are on the same validation rows, so the kept model's AP
        there is slightly optimistic (README, "Personalization")."""
        folder = self.state_dir / MODELS_DIR / run_id
        if folder.exists():  # one per run: a later evaluate request changes nothing
            return {}
        model = self._model(arrays, config)
        federated = PooledCurve.from_scores(self.y_val, score(model, self.x_val))
        reported: dict[str, Any] = {}
        kept, curve = "federated", federated
        if config.personalization:
            tuned = self._model(arrays, config)
            train(tuned, self.x_train, self.y_train,
                  epochs=config.personalize_epochs_for(len(self.y_train)),
                  batch_size=config.batch_size, learning_rate=config.learning_rate,
                  pos_weight=config.pos_weight, seed=config.seed + 1000 * (
                      config.num_server_rounds + 1) + self.id,
                  local_optimizer=config.local_optimizer)
            legit, fraud = score_histograms(self.y_val, score(tuned, self.x_val))
            personal = PooledCurve.from_histograms(legit, fraud)
            # NaN AP (no validation fraud) compares False: the federated model stays.
            if personal.average_precision() > federated.average_precision():
                model, kept, curve = tuned, "personalized", personal
            reported = {keys.HIST_LEGIT_PERSONAL: legit, keys.HIST_FRAUD_PERSONAL: fraud,
                        keys.PERSONAL_KEPT: int(kept == "personalized")}
        # A threshold fitted to a handful of validation frauds is noise (with none it
        # flags nothing): below MIN_THRESHOLD_FRAUDS the run's decision-threshold.
        own = curve.positives >= MIN_THRESHOLD_FRAUDS
        threshold = curve.best_f1_threshold() if own else config.decision_threshold
        partial = folder.with_name(f".{run_id}-{secrets.token_hex(4)}")
        partial.mkdir(parents=True)
        save_model(partial, {k: t.detach() for k, t in model.state_dict().items()},
                   self.spec(config), self.features, threshold)
        # The scaler it was trained with, beside it: the next run may refit the bank's.
        save_scaler(partial / SCALER_FILE, *self.scaler, self.schema)
        (partial / CARD_JSON_FILE).write_text(json.dumps({
            "name": f"fedfraud FraudNet, {kept}, kept by bank {self.id}",
            "run_id": run_id if kept == "federated" else f"{run_id}-bank{self.id}",
            "federated_run": run_id, "kept": kept,
            "features": self.features, "threshold": threshold,
            "threshold_chosen_on": "the bank's own validation rows (max F1)" if own else
            f"decision-threshold (fewer than {MIN_THRESHOLD_FRAUDS} validation frauds)",
            "own_validation": without_nan({"federated": federated.summary(threshold),
                                           kept: curve.summary(threshold)}),
        }, indent=2) + "\n")
        partial.rename(folder)  # complete, then visible
        point_at(folder)
        return reported

    def epsilon_after(self, config: Config, rounds: int) -> float:
        """Epsilon this bank has spent after ``rounds`` rounds of DP-SGD in a run."""
        rows = len(self.y_train)
        return epsilon_spent(config, rows, privacy_for(config, rows), rounds)

    def train(self, arrays: Arrays, config: Config, server_round: int,
              evaluate_incoming: bool, proximal_mu: float = 0.0,
              rounds_before: int | None = None) -> tuple[Arrays, dict[str, Any]]:
        """Train the global model locally (with DP-SGD when ``dp-epsilon`` > 0, with
        FedProx's term when the server sends ``proximal_mu``). With
        ``evaluate_incoming`` the reply also carries the incoming model's validation
        metrics, which saves the separate evaluate message of the round.
        ``rounds_before``: the rounds this bank itself trained in the run so far (its
        ledger's count), for its epsilon; a simulation takes the server's round."""
        metrics = self.evaluate(arrays, config) if evaluate_incoming else {}
        model = self._model(arrays, config)
        rows = len(self.y_train)
        privacy = privacy_for(config, rows) if config.differential_privacy else None
        batch_size, learning_rate = config.steps
        loss = train(
            model, self.x_train, self.y_train,
            epochs=config.local_epochs_for(rows), batch_size=batch_size,
            learning_rate=learning_rate, pos_weight=config.pos_weight,
            seed=(secrets.randbits(63) if self.secret_randomness and privacy
                  else config.seed + 1000 * server_round + self.id),
            proximal_mu=proximal_mu,
            privacy=privacy,
            local_optimizer=config.optimizer,
            logit_offset=(fraud_log_odds(self.y_train.sum(), rows)
                          if config.logit_adjusted else 0.0),
        )
        metrics.update({
            keys.NUM_EXAMPLES: rows, keys.VOTE: 1, keys.BANK_ID: self.id,
            keys.N_TRAIN: rows, keys.N_VAL: len(self.y_val),
            keys.N_FRAUD: int(self.y_train.sum() + self.y_val.sum()),
        })
        if privacy is None:
            metrics[keys.TRAIN_LOSS] = loss
        else:  # the loss of the protected rows, without noise: it stays with the bank
            rounds = (server_round - 1 if rounds_before is None else rounds_before) + 1
            metrics[keys.DP_EPSILON] = epsilon_spent(config, rows, privacy, rounds)
            metrics[keys.DP_NOISE] = privacy.noise_multiplier
        trained = {keys.WEIGHTS: packed(model.state_dict())}
        if self.id in config.attacker_ids and config.attack in POISONS:
            trained = poison(arrays, trained, config.attack, config.attack_scale)
        return trained, metrics
