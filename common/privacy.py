"""Differential-privacy accounting for one bank's DP-SGD (Opacus's RDP accountant).

Each bank protects its own transactions (sample-level DP): over the whole run it takes
``num-server-rounds x local-epochs`` epochs of Poisson-sampled DP-SGD steps, and the
noise is chosen up front so that the run as a whole spends at most the target epsilon.
The epsilon spent after a round is recomputed from the steps taken so far, so no
accountant state has to survive between messages.
"""

from __future__ import annotations

from functools import lru_cache

from common.config import Config, steps_per_epoch
from common.task import Privacy


@lru_cache(maxsize=64)
def _noise(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    return get_noise_multiplier(target_epsilon=epsilon, target_delta=delta,
                                sample_rate=sample_rate, steps=steps, accountant="rdp")


def privacy_for(config: Config, rows: int) -> Privacy:
    """The DP-SGD noise that makes the whole run cost ``dp-epsilon`` for a bank with
    ``rows`` training rows."""
    per_epoch = steps_per_epoch(rows, config.steps[0])
    steps = config.num_server_rounds * config.local_epochs * per_epoch
    return Privacy(_noise(config.dp_epsilon, config.dp_delta, 1 / per_epoch, steps),
                   config.dp_max_grad_norm)


def epsilon_spent(config: Config, rows: int, privacy: Privacy, rounds: int) -> float:
    """Epsilon spent after ``rounds`` rounds of training (at the run's delta); an upper
    bound for a bank that skipped a round."""
    from opacus.accountants import RDPAccountant

    per_epoch = steps_per_epoch(rows, config.steps[0])
    accountant = RDPAccountant()
    accountant.history = [(privacy.noise_multiplier, 1 / per_epoch,
                           rounds * config.local_epochs * per_epoch)]
    return float(accountant.get_epsilon(config.dp_delta))
