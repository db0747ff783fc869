"""One frozen run configuration, built from Flower's run config.

The defaults live in one place only: ``[tool.flwr.app.config]`` in pyproject.toml,
each with the reason it was chosen. This module turns that mapping (kebab-case keys,
as Flower hands it to both apps) into typed attributes.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


BANK_WEIGHTINGS = ("equal", "samples")
OPTIMIZERS = ("adam", "sgd")  # a bank's local optimizer (common/task.py)
STRATEGIES = ("fedavg", "fedprox", "fedmedian", "fedtrimmedavg", "krum", "fedavgm",
              "fedadam", "fedyogi")
ATTACKS = ("none", "scale", "sign-flip", "nan", "inf", "secagg-malformed")
SERVER_TEST_SETS = ("simulation", "always", "never")
ACTIVATIONS = ("relu", "tanh")  # FraudNet's hidden-layer activations (common/model.py)
# A bank's round must end: a run config asking a small bank for more steps a round than
# this (~1.5 s of CPU here; the default is 60) is refused at every bank.
MAX_LOCAL_STEPS = 2_000
MAX_EPOCHS = 100  # likewise for local-epochs and personalize-epochs (defaults 3)


@dataclass(frozen=True)
class Config:
    num_server_rounds: int
    min_banks: int
    round_timeout_s: float
    bank_nodes: str
    strategy: str
    bank_weighting: str
    proximal_mu: float
    trim_fraction: float
    krum_malicious: int
    server_learning_rate: float
    server_momentum: float
    attack: str
    attackers: str
    attack_scale: float
    dp_epsilon: float
    dp_delta: float
    dp_max_grad_norm: float
    dp_batch_size: int
    dp_learning_rate: float
    dp_activation: str
    secure_aggregation: bool
    secagg_shares: int
    secagg_threshold: int
    local_epochs: int
    min_local_steps: int
    personalize_epochs: int
    logit_adjustment: bool
    batch_size: int
    learning_rate: float
    local_optimizer: str
    activation: str
    pos_weight: float
    decision_threshold: float
    seed: int
    num_banks: int
    alpha: float
    val_fraction: float
    test_fraction: float
    server_test_set: str
    label_column: str
    id_columns: str
    time_column: str
    drop_columns: str
    max_categories: int
    log_skewed: bool
    data_source: str
    data_dir: str
    runs_dir: str
    initial_model: str
    baselines: bool
    report_model: str
    report_timeout_s: float
    report_max_retries: int
    report_share_bank_details: bool

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> Config:
        """Build from Flower's run config; unknown or missing keys are errors."""
        values = {key.replace("-", "_"): value for key, value in run_config.items()}
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        missing = sorted(names - set(values))
        if unknown or missing:
            raise ValueError("run config: " + "; ".join(
                f"{what} keys: {', '.join(key.replace('_', '-') for key in keys)}"
                for what, keys in (("unknown", unknown), ("missing", missing)) if keys))
        typed = {f.name: _coerce(f.name, f.type, values[f.name]) for f in fields(cls)}
        return cls(**typed)

    def __post_init__(self) -> None:
        for key, value, allowed in (("bank-weighting", self.bank_weighting, BANK_WEIGHTINGS),
                                    ("local-optimizer", self.local_optimizer, OPTIMIZERS),
                                    ("strategy", self.strategy, STRATEGIES),
                                    ("attack", self.attack, ATTACKS),
                                    ("server-test-set", self.server_test_set,
                                     SERVER_TEST_SETS),
                                    ("activation", self.activation, ACTIVATIONS),
                                    ("dp-activation", self.dp_activation, ACTIVATIONS)):
            if value not in allowed:
                raise ValueError(f"run config: {key} must be one of {allowed}")
        self.attacker_ids  # noqa: B018 - validates the list
        if self.num_server_rounds < 1:
            raise ValueError("run config: num-server-rounds must be at least 1")
        if not 0 < self.round_timeout_s < math.inf:
            raise ValueError("run config: round-timeout-s must be a number above 0")
        for key, epochs, least in (("local-epochs", self.local_epochs, 1),
                                   ("personalize-epochs", self.personalize_epochs, 0)):
            if not least <= epochs <= MAX_EPOCHS:
                raise ValueError(f"run config: {key} must be {least} to {MAX_EPOCHS}")
        if not 0 <= self.seed < 2**31:  # seeds numpy, scikit-learn and torch (+ rounds)
            raise ValueError("run config: seed must be 0 to 2**31 - 1")
        if not 0 <= self.proximal_mu < math.inf:
            raise ValueError("run config: proximal-mu must be a number from 0")
        for key, size in (("batch-size", self.batch_size),
                          ("dp-batch-size", self.dp_batch_size)):
            if size < 1:
                raise ValueError(f"run config: {key} must be at least 1")
        if not 0 <= self.min_local_steps <= MAX_LOCAL_STEPS:
            raise ValueError(f"run config: min-local-steps must be 0 to {MAX_LOCAL_STEPS}")
        if self.differential_privacy and not 0 < self.dp_delta < 1:
            raise ValueError("run config: dp-delta must be above 0 and below 1")
        if self.max_categories < 1:
            raise ValueError("run config: max-categories must be at least 1")
        if self.secure_aggregation and (self.strategy, self.bank_weighting) != (
                "fedavg", "equal"):
            raise ValueError("run config: secure-aggregation works with strategy 'fedavg' "
                             "and bank-weighting 'equal' only: the server never sees one "
                             "bank's update, so it cannot weigh, rank or refuse it")
        if self.attack == "secagg-malformed" and not self.secure_aggregation:
            raise ValueError("run config: attack 'secagg-malformed' breaks SecAgg+ replies: "
                             "it needs secure-aggregation = true")
        if self.strategy == "fedprox" and self.differential_privacy:
            raise ValueError("run config: fedprox with dp-epsilon > 0 is not supported: "
                             "DP-SGD noises per-transaction gradients and FedProx's term "
                             "has none, so it would be silently dropped")

    @property
    def attacker_ids(self) -> frozenset[int]:
        """The banks that send poisoned updates (``attackers``: "3" or "1,4")."""
        try:
            return frozenset(int(b) for b in self.attackers.split(",") if b.strip())
        except ValueError:
            raise ValueError("run config: attackers must be bank ids like '3' or '1,4'"
                             ) from None

    @property
    def differential_privacy(self) -> bool:
        return self.dp_epsilon > 0

    @property
    def personalization(self) -> bool:
        """Banks fine-tune the final model (not with DP: fine-tuning without noise would
        make what the bank reports about it escape its epsilon)."""
        return self.personalize_epochs > 0 and not self.differential_privacy

    @property
    def logit_adjusted(self) -> bool:
        """Banks train with their fraud log-odds added to the logits and the server
        shifts the final model by the banks' pooled log-odds. Not with DP (the offset
        comes from the bank's labels outside DP-SGD's noise) nor SecAgg+ (the server
        sees no bank's counts to shift by)."""
        return (self.logit_adjustment and not self.differential_privacy
                and not self.secure_aggregation)

    @property
    def steps(self) -> tuple[int, float]:
        """(batch size, learning rate) of the banks' training: DP-SGD's when DP is on."""
        if self.differential_privacy:
            return self.dp_batch_size, self.dp_learning_rate
        return self.batch_size, self.learning_rate

    @property
    def optimizer(self) -> str:
        """The banks' optimizer in a round: local-optimizer, but Adam under DP (its
        dp-batch-size and dp-learning-rate were measured with Adam)."""
        return "adam" if self.differential_privacy else self.local_optimizer

    def local_epochs_for(self, rows: int) -> int:
        """The epochs a bank with ``rows`` training rows trains per round: local-epochs,
        or more for a small bank, so that it takes at least min-local-steps optimizer
        steps. Not under DP, whose noise is set for local-epochs epochs."""
        if self.differential_privacy:
            return self.local_epochs
        return self.at_least_min_steps(self.local_epochs, rows)

    def personalize_epochs_for(self, rows: int) -> int:
        """The epochs a bank with ``rows`` training rows fine-tunes the final model:
        personalize-epochs, with the same floor of min-local-steps steps (a 300-row
        bank would otherwise fine-tune 12 steps). 0 when personalization is off."""
        if not self.personalization:
            return 0
        return self.at_least_min_steps(self.personalize_epochs, rows)

    def most_steps(self, rows: int) -> int:
        """The most optimizer steps one round, or the final fine-tuning, takes at a bank
        with ``rows`` training rows (DP-SGD's Poisson batches: as many on average)."""
        batch_size, _ = self.steps
        return steps_per_epoch(rows, batch_size) * max(self.local_epochs_for(rows),
                                                       self.personalize_epochs_for(rows))

    def at_least_min_steps(self, epochs: int, rows: int) -> int:
        per_epoch = steps_per_epoch(rows, self.batch_size)
        return max(epochs, math.ceil(self.min_local_steps / per_epoch))

    @property
    def model_activation(self) -> str:
        """FraudNet's hidden-layer activation in this run: DP-SGD's when DP is on."""
        return self.dp_activation if self.differential_privacy else self.activation

    def as_run_config(self) -> dict[str, Any]:
        """The kebab-case mapping Flower uses (inverse of ``from_run_config``)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}


def steps_per_epoch(rows: int, batch_size: int) -> int:
    """Optimizer steps in one pass over ``rows`` rows (at least one)."""
    return max(1, math.ceil(rows / batch_size))


def column_names(text: str) -> tuple[str, ...]:
    """A comma-separated list of column names ("" is none), blanks around names dropped."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _coerce(name: str, type_name: Any, value: Any) -> Any:
    # TOML gives `5` for a float key written without a dot; accept ints as floats,
    # refuse anything else that does not match.
    kind = {"int": int, "float": float, "str": str, "bool": bool}[str(type_name)]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"run config: {name.replace('_', '-')} must be {kind.__name__}")
    return value


def read_app_config(app_dir: Path) -> dict[str, Any]:
    """The ``[tool.flwr.app.config]`` table of the app in ``app_dir``."""
    path = app_dir / "pyproject.toml"
    with open(path, "rb") as file:
        try:
            return dict(tomllib.load(file)["tool"]["flwr"]["app"]["config"])
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path}: not TOML ({err})") from None
