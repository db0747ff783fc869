"""How much does the centralized reference move with its own starting point?

    .venv/bin/python bench/references.py --seeds 3,9 --banks 100 [--starts 4]

The goals compare the federated model with one centralized model per seed, trained from
the run's initial weights and batch order (``seed``). Per seed this runs the product's
simulation (``bench/quality.py``'s run: federated model and references), then trains
the centralized reference again on the very same pooled rows from ``--starts`` - 1 other
starting points (initial weights and batch order from seeds 1001, 1002, ...), and
prints each one's test AUC beside the federated model's. A federated model inside that
spread is as good as centralized training as far as this split can tell; a miss of
"federated >= centralized - 0.01" by less than the spread is the reference's luck.
It measures; it gates nothing and changes no default.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from runs import APP_DIR, runs_per_seed, seed_range
from sklearn.metrics import roc_auc_score

from common.config import Config
from common.data import (
    TEST_FILE, BankSplit, bank_file, fit_scaler, load_transactions, prepared_bank,
    standardize,
)
from common.model import FraudNet, ModelSpec
from common.task import score
from server.baselines import fit_alone
from server.cli import settings as run_settings

OTHER_STARTS = 1001  # the first other starting point's seed (far from the data seeds)


def centralized_aucs(config: Config, starts: int) -> list[float]:
    """Test AUC of the centralized reference from the run's own start (first), then
    from ``starts`` - 1 others, on the run's pooled training rows and test set."""
    data = Path(config.data_dir)
    x_test, y_test, _ = load_transactions(data / TEST_FILE, config.label_column, "test set")
    x_test = standardize(x_test, *fit_scaler(x_test))  # as the server scores it
    pooled = BankSplit.pooled([prepared_bank(bank, data / bank_file(bank), config).split
                               for bank in range(config.num_banks)])
    scaler = fit_scaler(pooled.x_train)
    spec = ModelSpec(in_features=x_test.shape[1], activation=config.model_activation)
    aucs = []
    for start in [config.seed, *range(OTHER_STARTS, OTHER_STARTS + starts - 1)]:
        torch.manual_seed(start)
        initial = FraudNet(spec).state_dict()
        model = fit_alone(pooled, scaler, spec, initial, config, start)
        aucs.append(float(roc_auc_score(y_test, score(model, x_test))))
    return aucs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=seed_range, default=seed_range("3,9"))
    parser.add_argument("--data-source", default="synthetic")
    parser.add_argument("--banks", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--starts", type=int, default=4,
                        help="centralized models per seed, the run's own included")
    args = parser.parse_args()
    started = time.monotonic()
    print(f"data: {args.data_source}, {args.banks} banks, {args.rounds} rounds, "
          f"{args.starts} centralized starting points", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for seed, settings, metrics in runs_per_seed(work, "run", args.seeds,
                                                     args.data_source, args.banks,
                                                     args.rounds):
            federated = metrics["final"]["auc"]
            aucs = centralized_aucs(run_settings(APP_DIR, settings), args.starts)
            below = sum(auc < federated for auc in aucs)
            print(f"seed {seed} [{time.monotonic() - started:.0f} s]: federated AUC "
                  f"{federated:.3f}; centralized {aucs[0]:.3f} from the run's start, "
                  f"{', '.join(f'{auc:.3f}' for auc in aucs[1:])} from others "
                  f"(mean {np.mean(aucs):.3f}, range {min(aucs):.3f}-{max(aucs):.3f}); "
                  f"federated above {below} of {len(aucs)}", flush=True)


if __name__ == "__main__":
    main()
