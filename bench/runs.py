"""One real simulation run for the benchmarks: `fedfraud simulate` with overrides."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

APP_DIR = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def simulate(work: Path, name: str, overrides: list[str]) -> dict | None:
    """metrics.json of a run in ``work`` (``name`` keeps its runs apart), or None if the
    run failed (its output's tail goes to stderr)."""
    runs = work / f"runs-{name}"
    command = [
        str(BIN / "fedfraud"), "--app-dir", str(APP_DIR), "--flwr-home", str(work / "flwr"),
        "--set", f"runs-dir='{runs}'",
        *[arg for item in overrides for arg in ("--set", item)], "simulate",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        print(done.stdout[-2000:], done.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads((runs / "latest" / "metrics.json").read_text())


def runs_per_seed(work: Path, name: str, seeds: list[int], source: str, banks: int,
                  rounds: int) -> Iterator[tuple[int, list[str], dict]]:
    """Per seed, the product's simulation on that seed's data in ``work``: the seed, the
    settings it ran with and its metrics.json. A seed whose run failed is said and
    skipped."""
    for seed in seeds:
        settings = [f"seed={seed}", f"data-dir='{work / f'data-{seed}'}'",
                    *data_overrides(source, banks, rounds)]
        metrics = simulate(work, f"{name}-{seed}", settings)
        if metrics is None:
            print(f"seed {seed}: the simulation failed (its output above)", flush=True)
            continue
        yield seed, settings, metrics


def seed_range(text: str) -> list[int]:
    """"1-3" -> [1, 2, 3]; "7" -> [7]; "3,9" -> [3, 9]."""
    seeds = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        seeds.extend(range(int(first), int(last or first) + 1))
    return seeds


def data_overrides(source: str, banks: int, rounds: int) -> list[str]:
    """The --set overrides for a bench's data: a built-in source by name, a file by
    its absolute path; ``banks`` banks, all of them needed; ``rounds`` rounds."""
    if source not in ("synthetic", "cards"):
        source = str(Path(source).resolve())
    return [f"data-source='{source}'", f"num-banks={banks}", f"min-banks={banks}",
            f"num-server-rounds={rounds}"]
