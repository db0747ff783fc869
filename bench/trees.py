"""Is the MLP the model to beat? Gradient-boosted trees on the same split, beside it.

    .venv/bin/python bench/trees.py --seeds 1-3 [--data-source cards] [--banks 100]

Per seed: the product's simulation (federated MLP with its centralized and local-only MLP
references, as ``bench/quality.py`` runs it), then, on the very same banks' training
rows and the same test set, scikit-learn's ``HistGradientBoostingClassifier``:

- trees, centralized: one model on all banks' pooled training rows;
- trees, best bank alone: each bank's own model on its own training rows, the best
  by test AUC (as the goals pick "best local");
- trees, one-shot ensemble: the mean fraud probability of the banks' own models,
  weighted by their training rows (bagging the banks' models once; a bank's trees hold
  split values of its rows, so this is not a privacy-preserving federation). Not their
  mean log-odds: a large bank with a few dozen frauds fits log-odds of -5,000 (cards,
  seed 1), and that one bank then ranks the mix (AUC 0.41).

A bank's own model in practice is often such a tree model: "better than going alone"
should hold against it too. This measures; it gates nothing and changes no default.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from runs import APP_DIR, runs_per_seed, seed_range
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import average_precision_score, roc_auc_score

from common.config import Config
from common.data import TEST_FILE, BankSplit, bank_file, load_transactions, prepared_bank
from server.cli import settings as run_settings

MIN_CLASS_ROWS = 5  # a bank with fewer frauds (or legitimate rows) trains no tree model


def trees(x: np.ndarray, y: np.ndarray, seed: int) -> HistGradientBoostingClassifier:
    """Scikit-learn's defaults, early stopping on a tenth of the rows."""
    return HistGradientBoostingClassifier(early_stopping=True, random_state=seed).fit(x, y)


def scored(y: np.ndarray, logits: np.ndarray) -> str:
    return f"AUC {roc_auc_score(y, logits):.3f} AP {average_precision_score(y, logits):.3f}"


def tree_models(config: Config) -> dict[str, str]:
    """The three tree models' test AUC and AP on the run's split."""
    data = Path(config.data_dir)
    x_test, y_test, _ = load_transactions(data / TEST_FILE, config.label_column, "test set")
    splits = [prepared_bank(bank, data / bank_file(bank), config).split
              for bank in range(config.num_banks)]
    pooled = BankSplit.pooled(splits)
    out = {"trees, centralized": scored(y_test, trees(
        pooled.x_train, pooled.y_train, config.seed).decision_function(x_test))}
    best, mix, rows = (-1.0, ""), np.zeros(len(y_test)), 0
    for bank, split in enumerate(splits):
        if min(split.y_train.sum(), (split.y_train == 0).sum()) < MIN_CLASS_ROWS:
            continue
        model = trees(split.x_train, split.y_train, config.seed)
        logits = model.decision_function(x_test)
        mix = mix + len(split.y_train) * model.predict_proba(x_test)[:, 1]
        rows += len(split.y_train)
        auc = roc_auc_score(y_test, logits)
        if auc > best[0]:
            best = (auc, f"{scored(y_test, logits)} (bank {bank}, "
                         f"{len(split.y_train):,} rows, {int(split.y_train.sum())} frauds)")
    if not rows:  # no bank has MIN_CLASS_ROWS of each class: nothing to compare
        return {**out, "trees, best bank alone": f"no bank has {MIN_CLASS_ROWS} rows of "
                "each class"}
    out["trees, best bank alone"] = best[1]
    out["trees, one-shot ensemble of the banks' own"] = scored(y_test, mix / rows)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=seed_range, default=seed_range("1-3"))
    parser.add_argument("--data-source", default="synthetic")
    parser.add_argument("--banks", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    started = time.monotonic()
    print(f"data: {args.data_source}, {args.banks} banks, {args.rounds} rounds", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for seed, settings, metrics in runs_per_seed(work, "mlp", args.seeds,
                                                     args.data_source, args.banks,
                                                     args.rounds):
            baselines = metrics["baselines"]
            best = max((bank for bank in baselines["local_only"]
                        if bank["test"]["local_only"]["auc"] is not None),
                       key=lambda bank: bank["test"]["local_only"]["auc"])
            rows = {
                "MLP, federated": metrics["final"],
                "MLP, centralized": baselines["centralized"],
                f"MLP, best bank alone (bank {best['bank']})": best["test"]["local_only"],
            }
            print(f"seed {seed} [{time.monotonic() - started:.0f} s]", flush=True)
            for name, final in rows.items():
                print(f"  {name:44} AUC {final['auc']:.3f} AP {final['ap']:.3f}")
            for name, text in tree_models(run_settings(APP_DIR, settings)).items():
                print(f"  {name:44} {text}", flush=True)


if __name__ == "__main__":
    main()
