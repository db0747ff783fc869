"""Scoring speed of the exported model with a bank's own scaler (warm process).

    .venv/bin/python bench/score.py [--run runs/latest] [--rows 1000000]

Batch: rows/s of scaling + model on an in-memory batch (best of 5), and the whole
`score_file` path (CSV read, checks, scoring, CSV write) for comparison. Single
transaction: p50/p99 latency of one row at a time over 20,000 calls.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from client.score import Scorer, score_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", type=Path, default=Path("runs/latest"))
    parser.add_argument("--scaler", type=Path, default=Path("data/synthetic/bank_00/scaler.json"))
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--single", type=int, default=20_000)
    args = parser.parse_args()
    scorer = Scorer.load(args.run, args.scaler)
    x = np.random.default_rng(0).normal(size=(args.rows, len(scorer.features)))
    x = x.astype(np.float32)

    scorer.probabilities(x[:1000])  # warm up
    best = min(_timed(lambda: scorer.probabilities(x)) for _ in range(5))
    print(f"batch, in memory: {args.rows:,} rows in {best:.3f} s = {args.rows / best:,.0f} rows/s")

    with tempfile.TemporaryDirectory() as tmp:
        n = min(args.rows, 200_000)
        frame = pd.DataFrame(x[:n], columns=scorer.features)
        frame.to_csv(Path(tmp) / "tx.csv", index_label="id")
        took = _timed(lambda: score_file(scorer, Path(tmp) / "tx.csv", Path(tmp) / "out.csv"))
        print(f"batch, CSV file to CSV file: {n:,} rows in {took:.2f} s = {n / took:,.0f} rows/s")

    rows = x[: args.single]
    latencies = np.empty(args.single)
    for i in range(args.single):
        started = time.perf_counter()
        scorer.probabilities(rows[i : i + 1])
        latencies[i] = time.perf_counter() - started
    p50, p99 = np.percentile(latencies, [50, 99]) * 1000
    print(f"single transaction: p50 {p50:.3f} ms, p99 {p99:.3f} ms over {args.single:,} calls")


def _timed(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
