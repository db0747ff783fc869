"""A bank's own policy: which code may touch its rows, and what a run may ask of it.

The policy is a TOML file in the bank's own folder (``policy.toml``), written once by
``fedfraud-bank init`` from ``DEFAULT_POLICY`` below and edited by the bank, never
taken from the server. Two places enforce it, both on the bank's side:

- the bank's task executor (client/executor.py) runs a task only if the run's app
  bundle (FAB) hashes to an approved app: an altered or unknown app reads no row;
- the approved ClientApp refuses a run config that asks for less privacy than the
  policy allows (``Policy.refusals``), before it reads the bank's file.
"""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from common.config import Config

POLICY_FILE = "policy.toml"
INSTALLED = "installed"  # an approved-apps entry: the app installed beside this bank

DEFAULT_POLICY = '''\
# This bank's policy. The bank owns this file; the server never sets any of it.

# App bundles (FABs) this bank runs, as SHA-256 hex digests. "installed" means the app
# built from this bank's own installed copy of the code (the bank reviewed what it
# installed): any other bundle, altered by one byte, is refused before it runs.
# `fedfraud-bank approve FILE.fab` adds another bundle's digest.
approved-apps = ["installed"]

# Refuse runs without differential privacy. Off by default: a bank that joins for
# model quality may accept the risk; a bank whose rules demand DP sets it to true.
require-dp = false

# Refuse runs without secure aggregation (SecAgg+: the server sees only the sum of the
# banks' weights). In a run with it the bank answers only SecAgg+ train messages: no
# plain train or evaluate message, whatever the server sends. Off by default: SecAgg+
# needs the server's own test set at the operator and has no per-bank results.
require-secure-aggregation = false

# The largest epsilon one run may spend on this bank's rows (at most max-delta).
max-epsilon-per-run = 8.0

# The largest epsilon all runs together may spend over the bank's lifetime. The bank
# keeps its own ledger (privacy_ledger.json in its state folder) and stops training
# when the next round would cross this.
max-epsilon-total = 30.0

# delta must stay well below 1 / the bank's number of rows.
max-delta = 1e-5

# The most rounds one run may ask for: every round is another look at the bank's data.
max-rounds = 50

# The most optimizer steps one round (or the final fine-tuning) may take at this bank:
# epochs x training rows / batch size. Without a bound a run config with batch-size 1
# and 100 epochs holds the bank's CPU for hours. 20,000 steps are ~15 s of CPU on a
# 2-core machine; the default run takes at most ~500 at a 24,000-row bank.
max-steps-per-round = 20000

# Bounds for the validation share: a run that moves most rows out of (DP) training
# into un-noised validation counts is refused.
min-val-fraction = 0.05
max-val-fraction = 0.3

# What a bank's validation histograms may say: their bins' width in logits (a
# multiple of 0.05). Every evaluation reply carries histograms of the bank's validation
# scores for the model the server sent; the finer they are, the more a crafted model
# can read back about single rows. 0.25 still places the threshold well.
histogram-resolution = 0.25

# The membership audit (loss histograms of training vs validation rows) tells the
# server how well the final model remembers members; opt in only if the bank wants it.
membership-audit = false

# With the run's personalization on, after the last round the bank fine-tunes the final
# model on its own rows and keeps the better copy for its own scoring. true: it also
# tells the server how that copy scores its validation rows (histograms at
# histogram-resolution) and which model it kept, for the report; false: it keeps both
# to itself. Either way the server never sees the copy's weights (and in a DP run
# there is no copy: fine-tuning without noise would escape the bank's epsilon).
personalization-report = true
'''


class PolicyError(ValueError):
    """The policy file cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Policy:
    approved_apps: tuple[str, ...]
    require_dp: bool
    require_secure_aggregation: bool
    max_epsilon_per_run: float
    max_epsilon_total: float
    max_delta: float
    max_rounds: int
    max_steps_per_round: int
    min_val_fraction: float
    max_val_fraction: float
    histogram_resolution: float
    membership_audit: bool
    personalization_report: bool

    @classmethod
    def from_toml(cls, text: str, source: str) -> Policy:
        """Keys missing from ``text`` take ``DEFAULT_POLICY``'s values; unknown keys,
        wrong types and impossible bounds are errors naming ``source``."""
        try:
            values = {**tomllib.loads(DEFAULT_POLICY), **tomllib.loads(text)}
        except tomllib.TOMLDecodeError as err:
            raise PolicyError(f"{source}: not valid TOML ({err})") from None
        names = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise PolicyError(f"{source}: unknown keys {unknown}")
        typed: dict[str, Any] = {}
        for key, field in names.items():
            value = values[key]
            kind = {"bool": bool, "int": int, "float": (int, float),
                    "tuple[str, ...]": list}[str(field.type)]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise PolicyError(f"{source}: {key} has the wrong type ({value!r})")
            typed[field.name] = (tuple(str(v) for v in value) if isinstance(value, list)
                                 else float(value) if kind == (int, float) else value)
        policy = cls(**typed)
        if not 0 < policy.min_val_fraction <= policy.max_val_fraction < 1:
            raise PolicyError(f"{source}: need 0 < min-val-fraction <= max-val-fraction < 1")
        if not 0.05 <= policy.histogram_resolution <= 32:
            raise PolicyError(f"{source}: histogram-resolution must be 0.05 to 32 logits")
        return policy

    @classmethod
    def load(cls, path: Path) -> Policy:
        try:
            return cls.from_toml(path.read_text(), str(path))
        except OSError as err:
            raise PolicyError(f"{path}: cannot read the bank's policy ({err.strerror})"
                              ) from None

    def approved(self, installed_app: Path | None) -> frozenset[str]:
        """The approved app digests, with "installed" resolved to the digest of the app
        in ``installed_app`` (this bank's own copy)."""
        digests = {digest.lower() for digest in self.approved_apps if digest != INSTALLED}
        if INSTALLED in self.approved_apps and installed_app is not None:
            digests.add(app_digest(installed_app))
        return frozenset(digests)

    def refusals(self, config: Config) -> list[str]:
        """Why this bank will not take part in a run with ``config`` (empty: it will).

        The reasons name only settings and bounds, never the bank's data."""
        why = []
        if config.attack != "none" or config.attacker_ids:
            why.append("attack settings are for simulations only")
        if config.num_server_rounds > self.max_rounds:
            why.append(f"num-server-rounds {config.num_server_rounds} > max-rounds "
                       f"{self.max_rounds}")
        if not self.min_val_fraction <= config.val_fraction <= self.max_val_fraction:
            why.append(f"val-fraction {config.val_fraction} outside "
                       f"[{self.min_val_fraction}, {self.max_val_fraction}]")
        if self.require_dp and not config.differential_privacy:
            why.append("the bank requires differential privacy (dp-epsilon > 0)")
        if self.require_secure_aggregation and not config.secure_aggregation:
            why.append("the bank requires secure aggregation (secure-aggregation = true)")
        if config.differential_privacy:
            if config.dp_epsilon > self.max_epsilon_per_run:
                why.append(f"dp-epsilon {config.dp_epsilon} > max-epsilon-per-run "
                           f"{self.max_epsilon_per_run}")
            if config.dp_delta > self.max_delta:
                why.append(f"dp-delta {config.dp_delta} > max-delta {self.max_delta}")
        return why


    def steps_refusal(self, config: Config, rows: int) -> str | None:
        """Why this bank will not train ``config``'s rounds on its ``rows`` training
        rows, if it will not: too many steps (the text names settings and bounds)."""
        steps = config.most_steps(rows)
        if steps <= self.max_steps_per_round:
            return None
        return (f"the run asks for {steps} training steps a round (local-epochs, "
                f"personalize-epochs, batch-size), more than max-steps-per-round "
                f"{self.max_steps_per_round}")


def app_digest(app_dir: Path) -> str:
    """SHA-256 of the app bundle Flower builds from ``app_dir`` (what ``flwr run``
    sends; the build is deterministic)."""
    from flwr.cli.build import build_fab_from_files

    from common.files import bundle_files

    return fab_digest(build_fab_from_files(bundle_files(app_dir))[0])


def fab_digest(fab: bytes) -> str:
    return hashlib.sha256(fab).hexdigest()
