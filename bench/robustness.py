"""One malicious bank against each strategy, through the real simulation on the
default data: AUC of the final model with no attack and under each attack.

    .venv/bin/python bench/robustness.py [--attacker 3] [--attacks none,scale,sign-flip,nan]

Goal: a robust strategy keeps AUC >= 0.85 with one scaled-update attacker.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from runs import simulate

STRATEGIES = ("fedavg", "fedprox", "fedmedian", "fedtrimmedavg", "krum")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--attacker", default="3")
    parser.add_argument("--attacks", default="none,scale,sign-flip,nan")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="extra setting for every run, e.g. attack-scale=100")
    args = parser.parse_args()
    attacks = args.attacks.split(",")
    print(f"AUC (AP) with bank {args.attacker} attacking {args.overrides or ''}; "
          "rN: N updates refused")
    print(f"{'strategy':>14}  " + "  ".join(f"{a:>18}" for a in attacks), flush=True)
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in args.strategies.split(","):
            cells = []
            for attack in attacks:
                metrics = simulate(Path(tmp), f"{strategy}-{attack}", [
                    f"strategy='{strategy}'", f"attack='{attack}'",
                    f"attackers='{args.attacker}'", "baselines=false",
                    f"data-dir='{Path(tmp) / 'data'}'", *args.overrides])
                if metrics is None:
                    failed.append(f"{strategy}/{attack}")
                    cells.append(f"{'FAILED':>18}")
                    continue
                final = metrics["final"]
                refused = len(metrics["strategy"]["refused_updates"])
                note = f" r{refused}" if refused else ""
                cells.append(f"{final['auc']:.3f} ({final['ap']:.3f}){note}".rjust(18))
            print(f"{strategy:>14}  " + "  ".join(cells), flush=True)
    print(f"failed: {failed or 'none'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
