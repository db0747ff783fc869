"""What differential privacy costs: AUC and AP at several epsilons, through the real
simulation on the default data, with each run's spent epsilon and membership audit.

    .venv/bin/python bench/privacy.py [--epsilons 0.5,1,3,8,0]

0 means no DP (the product's defaults). Goal: at epsilon <= 3 the AUC loss versus no
DP is <= 0.02.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from runs import simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epsilons", default="0.5,1,3,8,0")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="extra setting for every run, e.g. num-server-rounds=5")
    args = parser.parse_args()
    epsilons = [float(e) for e in args.epsilons.split(",")]
    print(f"{'epsilon':>8}  {'AUC':>6}  {'AP':>6}  {'R@1%':>6}  {'spent':>6}  "
          f"{'attack':>6}   (spent: max over banks at delta 1e-5; attack: membership "
          "audit AUC)", flush=True)
    results, failed = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for epsilon in epsilons:
            metrics = simulate(Path(tmp), f"eps-{epsilon}", [
                f"dp-epsilon={epsilon}", "baselines=false",
                f"data-dir='{Path(tmp) / 'data'}'", *args.overrides])
            if metrics is None:
                failed.append(epsilon)
                print(f"{epsilon:8g}  FAILED", flush=True)
                continue
            final, privacy = metrics["final"], metrics["privacy"]
            spent = privacy.get("max_epsilon_spent") or float("nan")
            audit = (metrics["membership_audit"] or {}).get("attack_auc") or float("nan")
            results[epsilon] = final["auc"]
            label = f"{epsilon:g}" if epsilon else "no DP"
            print(f"{label:>8}  {final['auc']:6.3f}  {final['ap']:6.3f}  "
                  f"{final['recall_at_1pct_fpr']:6.3f}  {spent:6.2f}  {audit:6.3f}",
                  flush=True)
    if 0.0 in results:
        for epsilon, auc in sorted(results.items()):
            if epsilon:
                print(f"AUC loss at epsilon {epsilon:g}: {results[0.0] - auc:+.3f}")
    print(f"failed: {failed or 'none'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
