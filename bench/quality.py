"""Model quality over many seeds, through the real simulation: the tutorial's
configuration vs the product's defaults vs the centralized reference.

    .venv/bin/python bench/quality.py --seeds 1-10 [--data-source synthetic]

Each seed prepares its own data (generator, test split and partition all follow the
seed); both configurations train on the same shards, and the defaults' run also
trains the centralized reference on the same split. A seed whose run fails is
reported, not hidden.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from runs import simulate

COLUMNS = ("auc", "ap", "recall_at_1pct_fpr", "f1")
# The tutorial (../shared/tutorial-baseline.md): FedAvg weighted by samples, one local
# epoch, batch 512, Adam 5e-4.
TUTORIAL = ["bank-weighting='samples'", "local-epochs=1", "batch-size=512",
            "learning-rate=0.0005", "baselines=false"]
SYSTEMS = ("tutorial", "defaults", "centralized")


def seed_range(text: str) -> list[int]:
    first, _, last = text.partition("-")
    return list(range(int(first), int(last or first) + 1))


def run(seed: int, name: str, overrides: list[str], data_source: str,
        work: Path) -> dict | None:
    return simulate(work, f"{name}-{seed}", [
        f"seed={seed}", f"data-source='{data_source}'",
        f"data-dir='{work / f'data-{seed}'}'", *overrides])


def cells(result: dict | None) -> str:
    if result is None:
        return "  ".join(f"{'FAILED':>6}" for _ in COLUMNS)
    return "  ".join(f"{result[c]:6.3f}" for c in COLUMNS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=seed_range, default=seed_range("1-10"))
    parser.add_argument("--data-source", default="synthetic",
                        help="'synthetic' or a labelled CSV (e.g. data/raw/creditcard.csv)")
    args = parser.parse_args()
    source = args.data_source
    if source != "synthetic":
        source = str(Path(source).resolve())
    header = "  ".join(f"{c[:6]:>6}" for c in COLUMNS)
    print(f"{'seed':>4}  " + "  |  ".join(f"{s:^{len(header)}}" for s in SYSTEMS))
    print(f"{'':>4}  " + "  |  ".join(header for _ in SYSTEMS), flush=True)
    table: dict[str, list[list[float]]] = {system: [] for system in SYSTEMS}
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            tutorial = run(seed, "tutorial", TUTORIAL, source, Path(tmp))
            defaults = run(seed, "defaults", [], source, Path(tmp))
            results = {"tutorial": tutorial and tutorial["final"],
                       "defaults": defaults and defaults["final"],
                       "centralized": defaults and (defaults["baselines"] or {}).get(
                           "centralized")}
            for system, result in results.items():
                if result is None:
                    failed.append(f"{system} seed {seed}")
                else:
                    table[system].append([result[c] for c in COLUMNS])
            print(f"{seed:4d}  " + "  |  ".join(cells(results[s]) for s in SYSTEMS),
                  flush=True)
    print(f"{'mean':>4}  " + "  |  ".join(
        "  ".join(f"{m:6.3f}" for m in np.mean(table[s], axis=0)) if table[s] else "-"
        for s in SYSTEMS))
    print(f"{'std':>4}  " + "  |  ".join(
        "  ".join(f"{m:6.3f}" for m in np.std(table[s], axis=0)) if table[s] else "-"
        for s in SYSTEMS))
    print(f"failed: {failed or 'none'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
