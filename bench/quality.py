"""Model quality of the product's defaults over many seeds, through the real simulation.

    .venv/bin/python bench/quality.py --seeds 1-10

Each seed prepares its own data (generator, test split and partition all follow the
seed) and runs `fedfraud simulate`; a seed whose run fails is reported, not hidden.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

APP_DIR = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COLUMNS = ("auc", "ap", "recall_at_1pct_fpr", "precision", "recall", "f1")


def seed_range(text: str) -> list[int]:
    first, _, last = text.partition("-")
    return list(range(int(first), int(last or first) + 1))


def run_seed(seed: int, work: Path) -> dict | None:
    command = [
        str(BIN / "fedfraud"), "--app-dir", str(APP_DIR), "--flwr-home", str(work / "flwr"),
        "--set", f"seed={seed}", "--set", f"data-dir='{work / f'data-{seed}'}'",
        "--set", f"runs-dir='{work / f'runs-{seed}'}'", "simulate",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        print(done.stdout[-2000:], done.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads((work / f"runs-{seed}" / "latest" / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=seed_range, default=seed_range("1-10"))
    args = parser.parse_args()
    rows, failed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            metrics = run_seed(seed, Path(tmp))
            if metrics is None:
                failed.append(seed)
                print(f"seed {seed:3d}  FAILED", flush=True)
                continue
            final = metrics["final"]
            rows.append([final[c] for c in COLUMNS])
            print(f"seed {seed:3d}  " + "  ".join(f"{c} {final[c]:.3f}" for c in COLUMNS),
                  flush=True)
    if rows:
        table = np.array(rows)
        print("mean ± std over", len(rows), "seeds:  " + "  ".join(
            f"{c} {m:.3f} ± {s:.3f}" for c, m, s in zip(COLUMNS, table.mean(0), table.std(0))))
    print(f"failed seeds: {failed or 'none'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
