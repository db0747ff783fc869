"""metrics.json and the model file of one run, built from FedAvg's ``Result``."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import MetricRecord
from flwr.serverapp.strategy import Result

from common import keys
from common.config import Config
from common.metrics import PooledCurve, summarize, without_nan
from server.evaluation import TestSetEvaluation
from server.strategy import BankGuard


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
    validation data chose for that round's model (never chosen on the test set).
    Without a test set the row holds the pooled validation metrics themselves."""
    rows, threshold = [], fallback_threshold
    for server_round in sorted(r for r in evaluation.seconds if r > 0):
        train = result.train_metrics_clientapp.get(server_round)
        validation = validation_record(result, server_round)
        curve = None
        if validation is not None:
            curve = PooledCurve.from_histograms(validation[keys.HIST_LEGIT],
                                                validation[keys.HIST_FRAUD])
            threshold = curve.best_f1_threshold()
        if server_round in evaluation.logits:
            headline = summarize(evaluation.y, evaluation.logits[server_round], threshold)
        elif curve is not None:
            headline = curve.summary(threshold)
        else:  # no test set and no validation histograms (SecAgg+): nothing to show
            headline = {}
        row = {
            "round": server_round,
            **headline,
            "seconds": evaluation.seconds[server_round],
            "banks_trained": list(train[keys.BANK_IDS]) if train else [],
            "banks_evaluated": list(validation[keys.EVALUATED_IDS]) if validation else [],
        }
        if curve is not None:  # the banks' pooled validation data
            row["validation"] = curve.summary(threshold)
        rows.append(row)
    return rows


def initial_model(config: Config, result: Result,
                  evaluation: TestSetEvaluation) -> dict[str, Any] | None:
    """The model the run started from (``initial-model``: the one in production), scored
    like each round's model: on the test set if the server has one, and on the banks'
    pooled validation rows (their round-1 replies evaluate it), at the threshold those
    rows choose for it."""
    if not config.initial_model:
        return None
    record: dict[str, Any] = {"run": config.initial_model}
    validation = validation_record(result, 0)
    threshold = config.decision_threshold
    if validation is not None:
        curve = PooledCurve.from_histograms(validation[keys.HIST_LEGIT],
                                            validation[keys.HIST_FRAUD])
        threshold = curve.best_f1_threshold()
        record["validation"] = curve.summary(threshold)
    if 0 in evaluation.logits and evaluation.y is not None:
        record["test"] = summarize(evaluation.y, evaluation.logits[0], threshold)
    return record


def bank_table(result: Result, final_bank_metrics: dict[int, MetricRecord],
               threshold: float) -> list[dict[str, Any]]:
    """Each bank's sizes as it last reported them (none with SecAgg+), and the final
    model's metrics on its own validation data at the run's threshold (from its counts
    and histograms)."""
    banks: dict[int, dict[str, Any]] = {}
    for server_round in sorted(result.train_metrics_clientapp):
        record = result.train_metrics_clientapp[server_round]
        for i, bank in enumerate(record[keys.BANK_IDS]):
            banks[int(bank)] = {"id": int(bank)}
            if keys.N_TRAIN in record:
                banks[int(bank)].update({
                    "n_train": int(record[keys.N_TRAIN][i]),
                    "n_val": int(record[keys.N_VAL][i]),
                    "n_fraud": int(record[keys.N_FRAUD][i]),
                })
    for bank, record in final_bank_metrics.items():
        curve = PooledCurve.from_histograms(record[keys.HIST_LEGIT], record[keys.HIST_FRAUD])
        entry = banks.setdefault(bank, {"id": bank})
        entry["federated_own_validation"] = curve.summary(threshold)
        if keys.HIST_LEGIT_PERSONAL in record:  # at the bank's own threshold
            personal = PooledCurve.from_histograms(record[keys.HIST_LEGIT_PERSONAL],
                                                   record[keys.HIST_FRAUD_PERSONAL])
            entry["personalized_own_validation"] = personal.summary(
                personal.best_f1_threshold())
            entry["kept"] = "personalized" if record[keys.PERSONAL_KEPT] else "federated"
    return [banks[bank] for bank in sorted(banks)]


def personalization(final_bank_metrics: dict[int, MetricRecord]) -> dict[str, Any] | None:
    """The banks' pooled validation rows, each scored by the model its bank kept (the
    federated one or its personalized one), beside the federated model alone."""
    records = [r for r in final_bank_metrics.values() if keys.HIST_LEGIT_PERSONAL in r]
    if not records:
        return None

    def pooled(legit: str, fraud: str, personal: bool | None = None) -> dict[str, Any]:
        chosen = [r for r in records if personal is None or bool(r[keys.PERSONAL_KEPT])
                  == personal]
        return {"legit": np.sum([r[legit] for r in chosen], axis=0),
                "fraud": np.sum([r[fraud] for r in chosen], axis=0)}

    federated = pooled(keys.HIST_LEGIT, keys.HIST_FRAUD)
    kept_personal = pooled(keys.HIST_LEGIT_PERSONAL, keys.HIST_FRAUD_PERSONAL, True)
    kept_federated = pooled(keys.HIST_LEGIT, keys.HIST_FRAUD, False)
    kept = {side: kept_personal[side] + kept_federated[side] for side in ("legit", "fraud")}
    curves = {"federated": PooledCurve.from_histograms(federated["legit"],
                                                       federated["fraud"]),
              "kept": PooledCurve.from_histograms(kept["legit"], kept["fraud"])}
    return {
        "about": "each bank fine-tuned the final model on its own training rows and kept "
                 "the one with the higher AP on its own validation rows; 'kept' scores "
                 "the pooled validation rows with each bank's choice (chosen on those "
                 "same rows: slightly optimistic)",
        "banks_kept_personalized": sum(int(r[keys.PERSONAL_KEPT]) for r in records),
        "banks": len(records),
        **{name: {key: curve.summary(curve.best_f1_threshold())[key]
                  for key in ("auc", "ap", "recall_at_1pct_fpr")}
           for name, curve in curves.items()},
    }


HEADLINE = ("auc", "ap", "recall_at_1pct_fpr", "threshold", "precision", "recall", "f1",
            "tp", "fp", "fn", "tn")


def compare_banks(local_only: list[dict[str, Any]], banks: list[dict[str, Any]],
                  final: dict[str, Any]) -> list[dict[str, Any]]:
    """Per bank: its local-only model vs the federated model, on its own validation
    data and on the test set."""
    federated = {bank["id"]: bank.get("federated_own_validation") for bank in banks}
    personal = {bank["id"]: bank.get("personalized_own_validation") for bank in banks}
    return [{
        "bank": entry["bank"],
        "own_validation": {"local_only": entry["own_validation"],
                           "federated": federated.get(entry["bank"]),
                           "personalized": personal.get(entry["bank"])},
        "test": {"local_only": {key: entry["test"][key] for key in HEADLINE},
                 "federated": {key: final[key] for key in HEADLINE if key in final}},
    } for entry in local_only]


def privacy_record(config: Config, result: Result, mode: str) -> dict[str, Any]:
    """The DP settings and each bank's spent epsilon, as it last reported it."""
    record: dict[str, Any] = {"secure_aggregation": config.secure_aggregation,
                              "differential_privacy": config.differential_privacy}
    if not config.differential_privacy:
        return record
    spent: dict[int, dict[str, float]] = {}
    for server_round in sorted(result.train_metrics_clientapp):
        metrics = result.train_metrics_clientapp[server_round]
        for i, bank in enumerate(metrics.get(keys.BANK_IDS, [])):
            if keys.DP_EPSILON in metrics and math.isfinite(metrics[keys.DP_EPSILON][i]):
                spent[int(bank)] = {"bank": int(bank), "round": server_round,
                                    "epsilon": metrics[keys.DP_EPSILON][i],
                                    "delta": config.dp_delta,
                                    "noise_multiplier": metrics[keys.DP_NOISE][i]}
    if config.secure_aggregation:
        record["banks_note"] = ("with SecAgg+ no bank reports its epsilon in the clear; "
                                "each keeps it in its own ledger")
    return {**record, "mechanism": "DP-SGD per bank, per transaction (Opacus, RDP "
            "accountant)", "target_epsilon": config.dp_epsilon, "delta": config.dp_delta,
            "max_grad_norm": config.dp_max_grad_norm,
            "noise": ("secret: each bank draws its DP-SGD noise and sampling from its own "
                      "OS randomness and never sends it" if mode == "deployment" else
                      "reproducible: seeded from the run config (simulation only; the "
                      "server knows the seed, so this noise protects nothing against "
                      "it)"),
            "max_epsilon_spent": max((b["epsilon"] for b in spent.values()), default=None),
            "banks": [spent[bank] for bank in sorted(spent)],
            "scope": "the banks' training rows; validation counts and histograms are "
                     "not noised"}


def membership_audit(final_bank_metrics: dict[int, MetricRecord]) -> dict[str, Any] | None:
    """A loss-threshold membership attack on the final model: AUC of telling a bank's
    training rows from its validation rows by the model's loss (0.5: no better than a
    coin), pooled and per bank, from the histograms the banks sent."""
    records = {bank: r for bank, r in final_bank_metrics.items() if keys.HIST_MEMBER in r}
    if not records:
        return None

    def attack_auc(outside: Any, inside: Any) -> float:
        return PooledCurve.from_histograms(outside, inside).auc()

    pooled = [np.sum([r[key] for r in records.values()], axis=0).tolist()
              for key in (keys.HIST_NONMEMBER, keys.HIST_MEMBER)]
    return {"attack": "loss threshold: lower loss -> 'was trained on'",
            "attack_auc": attack_auc(*pooled),
            "banks": [{"bank": bank, "attack_auc": attack_auc(r[keys.HIST_NONMEMBER],
                                                              r[keys.HIST_MEMBER])}
                      for bank, r in sorted(records.items())]}


def build_metrics(
    run_id: str, mode: str, config: Config, result: Result,
    evaluation: TestSetEvaluation, strategy: BankGuard,
    baselines: dict[str, Any] | None, total_s: float,
) -> dict[str, Any]:
    import flwr
    import torch

    rows = history(result, evaluation, config.decision_threshold)
    final = {key: value for key, value in rows[-1].items() if key != "seconds"} if rows else {}
    banks = bank_table(result, strategy.final_bank_metrics,
                       final.get("threshold", config.decision_threshold))
    if baselines is not None:
        baselines = {"centralized": baselines["centralized"],
                     "local_only": compare_banks(baselines["local_only"], banks, final),
                     "federated_minus": baselines["federated_minus"]}
    return without_nan({
        "run_id": run_id,
        "mode": mode,
        "config": config.as_run_config(),
        "versions": {"flwr": flwr.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "banks": banks,
        "test_set": ({"rows": int(len(evaluation.y)), "frauds": int(evaluation.y.sum())}
                     if evaluation.y is not None else None),
        "evaluated_on": ("the server's held-out test set" if evaluation.y is not None
                         else "the banks' pooled validation rows (the threshold is "
                              "chosen on the same rows: precision, recall and F1 there "
                              "are optimistic)"),
        "history": rows,
        "final": final,
        "initial_model": initial_model(config, result, evaluation),
        "baselines": baselines,
        "strategy": {"name": config.strategy, "attack": config.attack,
                     "attackers": sorted(config.attacker_ids),
                     "refused_updates": strategy.refused,
                     # logit adjustment: what the final model's logits were shifted by
                     "logit_shift": strategy.prior_shift},
        "privacy": privacy_record(config, result, mode),
        "membership_audit": membership_audit(strategy.final_bank_metrics),
        "personalization": personalization(strategy.final_bank_metrics),
        "sent_by_banks": ledger_summary(strategy.ledger),
        "timing": {"total_s": total_s, "round_s": [row["seconds"] for row in rows]},
    })


LEDGER_FILE = "sent_by_banks.json"


def ledger_summary(ledger: list[dict[str, Any]]) -> dict[str, Any]:
    """What left the banks, in short (the whole ledger is in LEDGER_FILE)."""
    lists = [size for entry in ledger for record in entry["records"]
             if record["kind"] == "metrics" for size in record["items"].values()]
    return {"file": LEDGER_FILE, "messages": len(ledger),
            "bytes": sum(entry["bytes"] for entry in ledger),
            "kinds": sorted({r["kind"] for entry in ledger for r in entry["records"]}),
            "longest_metric_list": max(lists, default=0)}


def write_ledger(run_dir: Path, ledger: list[dict[str, Any]]) -> Path:
    """Every record every bank sent, per round: kind, keys and size on the wire."""
    path = run_dir / LEDGER_FILE
    path.write_text(json.dumps({
        "about": "Everything each bank sent the server, per round and message: model "
                 "weights (array shapes), metrics (key: number of values; lists are "
                 "640-bin histograms, never rows or per-row scores), with serialized "
                 "bytes.",
        "messages": ledger}, indent=1) + "\n")
    return path


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> Path:
    path = run_dir / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    return path

