"""The bank's own privacy ledger: epsilon spent per run and in total, across runs, and
the evaluations it answered per run.

Kept in the bank's state folder (``privacy_ledger.json``), written by the bank only.
Epsilon is computed from the rounds of DP-SGD the bank itself trained in a run (its
own count, never the round number the server sends); runs compose by adding their
epsilons (basic composition: an upper bound). Runs without DP are not in the ledger:
whether the bank takes part in them at all is its policy's ``require-dp``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LEDGER_FILE = "privacy_ledger.json"


@dataclass
class PrivacyLedger:
    path: Path
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)

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
