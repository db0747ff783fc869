"""Does federation pay? Model quality over seeds, through the real simulation, with the
goals of issue 14 checked per seed.

    .venv/bin/python bench/quality.py --seeds 1-3 [--data-source cards] [--banks 100]
                                      [--set "strategy='fedavgm'"] [--tutorial]

Each seed prepares its own data (generator, test split and partition all follow the
seed) and runs the product's defaults (plus ``--set`` overrides), which also train the
centralized and local-only references on the same split. ``--tutorial`` adds the
tutorial's configuration on the same shards. Per seed, the goals:

- central: federated test AUC >= centralized reference - 0.01;
- banks: every bank with at least 20 frauds in its validation rows gets a model from
  the federation (the federated one, or its personalized copy when the bank kept it) at
  least as good in AP on those rows as its local-only model;
- best-local: the federated model beats the best local-only model on the test set (AUC).

Beside central and best-local: the AUC difference with its 95 % paired bootstrap
interval over the test rows (metrics.json ``baselines.federated_minus``), so a miss or
a win smaller than the test set's noise reads as such.

A seed whose run fails is reported, not hidden; the exit code is 1 if any run failed.
Goals not met are printed, not turned into an exit code: this measures, it does not gate.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from runs import data_overrides, seed_range, simulate

COLUMNS = ("auc", "ap", "recall_at_1pct_fpr", "f1")
# The tutorial (../shared/tutorial-baseline.md): FedAvg weighted by samples, one local
# epoch (no floor of steps), batch 512, Adam 5e-4.
TUTORIAL = ["bank-weighting='samples'", "local-epochs=1", "min-local-steps=0",
            "batch-size=512", "local-optimizer='adam'", "learning-rate=0.0005",
            "baselines=false", "personalize-epochs=0"]
MIN_VAL_FRAUDS = 20  # a bank's validation AP is compared only with this many frauds
CENTRAL_MARGIN = 0.01


def goals(metrics: dict[str, Any]) -> dict[str, str]:
    """The three goals of one run, each "ok" or what fell short."""
    final, baselines = metrics["final"], metrics["baselines"]
    central = baselines["centralized"]
    kept = {bank["id"]: bank.get("kept") or "federated" for bank in metrics["banks"]}
    short = []
    compared = 0
    for entry in baselines["local_only"]:
        own = entry["own_validation"]
        local = own["local_only"]
        if local is None or local["tp"] + local["fn"] < MIN_VAL_FRAUDS:
            continue
        compared += 1
        # A bank that sent no final evaluation (it dropped out) has no kept model here.
        model = own.get(kept.get(entry["bank"], "federated")) or own.get("federated")
        if model is None:
            short.append(f"bank {entry['bank']} no federated result")
        elif model["ap"] < local["ap"]:
            # AP on a bank that is nearly all fraud ranks its few legitimate rows: say how
            # many, so a miss that rests on two of them reads as such.
            short.append(f"bank {entry['bank']} {model['ap']:.3f}<{local['ap']:.3f} "
                         f"({local['tp'] + local['fn']} frauds, "
                         f"{local['tn'] + local['fp']} legitimate)")
    best_local = max(entry["test"]["local_only"]["auc"] for entry in baselines["local_only"]
                     if entry["test"]["local_only"]["auc"] is not None)
    gap = final["auc"] - central["auc"]
    minus = baselines["federated_minus"]
    return {
        "central": ("ok" if gap >= -CENTRAL_MARGIN else f"{gap:+.3f}")
                   + interval(minus["centralized"]),
        "banks": (f"ok ({compared})" if not short else
                  f"{compared - len(short)}/{compared}: " + ", ".join(short)),
        "best-local": ("ok" if final["auc"] > best_local else
                       f"{final['auc']:.3f}<={best_local:.3f}")
                      + interval(minus["best_local_only"]),
    }


def interval(difference: dict[str, Any]) -> str:
    """The federated model's test AUC minus the other's, with its 95 % bootstrap
    interval: an interval that holds 0 says the test set cannot tell the two apart."""
    low, high = difference["ci95"]
    return f" (AUC {difference['auc_difference']:+.3f}, 95 % {low:+.3f}..{high:+.3f})"


def cells(result: dict | None) -> str:
    if result is None:
        return "  ".join(f"{'FAILED':>6}" for _ in COLUMNS)
    return "  ".join(f"{result[c]:6.3f}" for c in COLUMNS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=seed_range, default=seed_range("1-3"))
    parser.add_argument("--data-source", default="synthetic",
                        help="'synthetic', 'cards' or a labelled CSV "
                             "(e.g. data/raw/creditcard.csv)")
    parser.add_argument("--banks", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--set", action="append", default=[], dest="overrides",
                        help="a run-config override for the product's run, e.g. "
                             "\"strategy='fedavgm'\" (repeatable)")
    parser.add_argument("--tutorial", action="store_true",
                        help="also run the tutorial's configuration")
    args = parser.parse_args()
    common = data_overrides(args.data_source, args.banks, args.rounds)
    systems = (("tutorial",) if args.tutorial else ()) + ("federated", "centralized",
                                                          "best local")
    print(f"data: {args.data_source}, {args.banks} banks, {args.rounds} rounds, "
          f"settings: {args.overrides or 'defaults'}", flush=True)
    header = "  ".join(f"{c[:6]:>6}" for c in COLUMNS)
    print(f"{'seed':>4}  " + "  |  ".join(f"{s:^{len(header)}}" for s in systems))
    print(f"{'':>4}  " + "  |  ".join(header for _ in systems), flush=True)
    table: dict[str, list[list[float]]] = {system: [] for system in systems}
    failed, started = [], time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for seed in args.seeds:
            data = [f"seed={seed}", f"data-dir='{work / f'data-{seed}'}'", *common]
            results: dict[str, dict | None] = {}
            if args.tutorial:
                run = simulate(work, f"tutorial-{seed}", [*data, *TUTORIAL])
                results["tutorial"] = run and run["final"]
            metrics = simulate(work, f"federated-{seed}", [*data, *args.overrides])
            baselines = (metrics or {}).get("baselines") or {}
            results["federated"] = metrics and metrics["final"]
            results["centralized"] = baselines.get("centralized")
            results["best local"] = max(
                (entry["test"]["local_only"] for entry in baselines.get("local_only", [])),
                key=lambda m: m["auc"] or 0.0, default=None)
            for system, result in results.items():
                if result is None:
                    failed.append(f"{system} seed {seed}")
                else:
                    table[system].append([result[c] for c in COLUMNS])
            print(f"{seed:4d}  " + "  |  ".join(cells(results[s]) for s in systems),
                  f"  [{time.monotonic() - started:.0f} s]", flush=True)
            if baselines:
                personal = metrics.get("personalization") or {}
                print("      goals: " + "; ".join(f"{k} {v}" for k, v in
                                                  goals(metrics).items())
                      + (f"; personalized kept by {personal['banks_kept_personalized']} "
                         f"of {personal['banks']} banks" if personal else ""), flush=True)
    for name, reduce in (("mean", np.mean), ("std", np.std)):
        print(f"{name:>4}  " + "  |  ".join(
            "  ".join(f"{m:6.3f}" for m in reduce(table[s], axis=0)) if table[s] else "-"
            for s in systems))
    print(f"failed: {failed or 'none'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
