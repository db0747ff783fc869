"""The bank's own privacy ledger: epsilon spent per run and in total, across runs, and
the evaluations it answered per run.

Kept in the bank's state folder (``privacy_ledger.json``), written by the bank only.
Epsilon is computed from the rounds of DP-SGD the bank itself trained in a run (its
own count, never the round number the server sends); runs compose by adding their
epsilons (basic composition: an upper bound). Runs without DP are not in the ledger:
whether the bank takes part in them at all is its policy's ``require-dp``.

A bank's tasks run side by side (its executor starts one process per message), so a
server may send many train messages of one round at once. Every check against the
ledger and the record that follows it happen under one exclusive lock
(``PrivacyLedger.held``), and a round is recorded before it trains: the second message
reads the first one's round, not the count before it.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LEDGER_FILE = "privacy_ledger.json"
LOCK_FILE = "privacy_ledger.lock"  # held while a task checks and records (flock)


@dataclass
class PrivacyLedger:
    path: Path
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    @contextmanager
    def held(cls, state_dir: Path) -> Iterator[PrivacyLedger]:
        """The ledger, with no other task of this bank reading or writing it until the
        block ends (an exclusive ``flock``, released when the block ends or the
        process dies)."""
        with (state_dir / LOCK_FILE).open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield cls.load(state_dir)

    @classmethod
    def load(cls, state_dir: Path) -> PrivacyLedger:
        path = state_dir / LEDGER_FILE
        if not path.exists():
            return cls(path)
        return cls(path, dict(json.loads(path.read_text())["runs"]))

    def rounds(self, run_id: int) -> int:
        """DP rounds this bank has trained in run ``run_id`` so far."""
        return int(self.runs.get(str(run_id), {}).get("rounds", 0))

    def evaluations(self, run_id: int) -> int:
        """Evaluation replies this bank has sent in run ``run_id``."""
        return int(self.runs.get(str(run_id), {}).get("evaluations", 0))

    def spent_elsewhere(self, run_id: int) -> float:
        """Epsilon spent by every other run."""
        return sum(float(run.get("epsilon", 0.0)) for key, run in self.runs.items()
                   if key != str(run_id))

    def record(self, run_id: int, **totals: float) -> None:
        """Write the run's new totals (``rounds``, ``epsilon``, ``delta``,
        ``evaluations``), atomically: a crash leaves the old ledger."""
        self.runs.setdefault(str(run_id), {}).update(totals)
        total = sum(float(run.get("epsilon", 0.0)) for run in self.runs.values())
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"total_epsilon": total, "runs": self.runs}, indent=1))
        os.replace(tmp, self.path)
