"""metrics.json and the model file of one run, built from FedAvg's ``Result``."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from flwr.app import MetricRecord
from flwr.serverapp.strategy import Result

from common import keys
from common.config import Config
from common.metrics import PooledCurve, summarize
from server.evaluation import TestSetEvaluation


def new_run_dir(runs_dir: Path, run_id: int) -> Path:
    run_dir = runs_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{run_id}"
    run_dir.mkdir(parents=True)
    return run_dir


def point_latest(run_dir: Path) -> None:
    """Make ``runs/latest`` point at ``run_dir`` (atomic replace of the link)."""
    link = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name)
    os.replace(tmp, link)


def validation_record(result: Result, server_round: int) -> MetricRecord | None:
    """The banks' summed validation metrics of round ``server_round``'s model: from the
    evaluate step, or from the next round's train replies (which evaluate it first)."""
    for record in (result.evaluate_metrics_clientapp.get(server_round),
                   result.train_metrics_clientapp.get(server_round + 1)):
        if record is not None and keys.HIST_LEGIT in record:
            return record
    return None


def history(result: Result, evaluation: TestSetEvaluation,
            fallback_threshold: float) -> list[dict[str, Any]]:
    """One row per round: test-set metrics at the threshold the banks' pooled
    validation data chose for that round's model (never chosen on the test set)."""
    rows, threshold = [], fallback_threshold
    for server_round in sorted(r for r in evaluation.logits if r > 0):
        train = result.train_metrics_clientapp.get(server_round)
        validation = validation_record(result, server_round)
        curve = None
        if validation is not None:
            curve = PooledCurve.from_histograms(validation[keys.HIST_LEGIT],
                                                validation[keys.HIST_FRAUD])
            best = curve.best_f1_index()
            threshold = float(curve.thresholds[best])
        row = {
            "round": server_round,
            **summarize(evaluation.y, evaluation.logits[server_round], threshold),
            "seconds": evaluation.seconds[server_round],
            "banks_trained": list(train[keys.BANK_IDS]) if train else [],
            "banks_evaluated": list(validation[keys.BANK_IDS]) if validation else [],
        }
        if curve is not None:
            row["validation"] = {"auc": curve.auc(), "ap": curve.average_precision(),
                                 **curve.confusion_at(best).as_dict()}
        rows.append(row)
    return rows


def bank_table(result: Result) -> list[dict[str, int]]:
    """Each bank's sizes as it last reported them (counts only)."""
    banks: dict[int, dict[str, int]] = {}
    for server_round in sorted(result.train_metrics_clientapp):
        record = result.train_metrics_clientapp[server_round]
        for i, bank in enumerate(record[keys.BANK_IDS]):
            banks[int(bank)] = {
                "id": int(bank),
                "n_train": int(record[keys.N_TRAIN][i]),
                "n_val": int(record[keys.N_VAL][i]),
                "n_fraud": int(record[keys.N_FRAUD][i]),
            }
    return [banks[bank] for bank in sorted(banks)]


def build_metrics(
    run_id: str, mode: str, config: Config, result: Result,
    evaluation: TestSetEvaluation, total_s: float,
) -> dict[str, Any]:
    import flwr
    import torch

    rows = history(result, evaluation, config.decision_threshold)
    final = {key: value for key, value in rows[-1].items() if key != "seconds"} if rows else {}
    return {
        "run_id": run_id,
        "mode": mode,
        "config": config.as_run_config(),
        "versions": {"flwr": flwr.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "banks": bank_table(result),
        "test_set": {"rows": int(len(evaluation.y)), "frauds": int(evaluation.y.sum())},
        "history": rows,
        "final": final,
        "timing": {"total_s": total_s, "round_s": [row["seconds"] for row in rows]},
    }


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> Path:
    path = run_dir / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    return path

