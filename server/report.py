"""The risk report: asked of OpenAI's Responses API, built offline when that fails.

Only aggregates go out by default; ``report-share-bank-details`` adds per-bank sizes
and fraud rates. The exact request is saved beside report.md before it is sent. The
report never fails a run: any problem yields the offline report, which says so.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from flwr.common import log
from logging import WARNING

from common.config import Config

INSTRUCTIONS = (
    "You are a senior fraud-risk analyst writing for a bank's risk committee. Write a "
    "concise internal report in Markdown with exactly these sections: Executive summary, "
    "Metric interpretation, Risks, Next steps. Use only the numbers given; do not invent "
    "figures. Fraud is rare, so judge the model by AUC, average precision, recall at 1 % "
    "false-positive rate and precision/recall at the chosen threshold, not by accuracy."
)
REQUEST_FILE = "report_request.json"
REPORT_FILE = "report.md"


def report_facts(metrics: dict[str, Any], share_bank_details: bool) -> dict[str, Any]:
    """What the report may say: aggregates, plus per-bank details only if allowed."""
    final = metrics["final"]
    keep = ("auc", "ap", "recall_at_1pct_fpr", "precision", "recall", "f1", "threshold",
            "tp", "fp", "fn", "tn", "loss")
    facts: dict[str, Any] = {
        "setting": "federated fraud detection, FedAvg across banks; no transaction "
                   "left any bank",
        "mode": metrics["mode"],
        "rounds": len(metrics["history"]),
        "banks": len(metrics["banks"]),
        "training_rows_total": sum(bank["n_train"] for bank in metrics["banks"]),
        "banks_without_fraud": sum(1 for bank in metrics["banks"] if bank["n_fraud"] == 0),
        "test_set": metrics["test_set"],
        "final_test_metrics": {key: final[key] for key in keep if key in final},
        "threshold_chosen_on": "pooled validation data of the banks (max F1)",
        "auc_ap_by_round": [
            {"round": row["round"], "auc": round(row["auc"], 4), "ap": round(row["ap"], 4)}
            for row in metrics["history"]
        ],
    }
    if share_bank_details:
        facts["per_bank"] = [
            {"bank": bank["id"], "n_train": bank["n_train"],
             "fraud_rate": bank["n_fraud"] / max(1, bank["n_train"] + bank["n_val"])}
            for bank in metrics["banks"]
        ]
    return facts


def build_request(metrics: dict[str, Any], config: Config) -> dict[str, Any]:
    facts = report_facts(metrics, config.report_share_bank_details)
    return {
        "model": config.report_model,
        "instructions": INSTRUCTIONS,
        "input": "Results of this run (JSON):\n" + json.dumps(facts, indent=2),
    }


def ask_openai(request: dict[str, Any], config: Config) -> str:
    """Send ``request`` with the OpenAI SDK (key and base URL from the environment)."""
    from openai import OpenAI

    client = OpenAI(  # an empty OPENAI_BASE_URL (e.g. from compose) means the default
        base_url=os.environ.get("OPENAI_BASE_URL") or None,
        timeout=config.report_timeout_s, max_retries=config.report_max_retries,
    )
    text = client.responses.create(**request).output_text
    if not text.strip():
        raise ValueError("the model returned an empty report")
    return text


def offline_report(metrics: dict[str, Any], reason: str) -> str:
    """A plain report from the same numbers, saying that it is offline and why."""
    final, banks, test = metrics["final"], metrics["banks"], metrics["test_set"]
    first, last = metrics["history"][0], metrics["history"][-1]
    no_fraud = [str(bank["id"]) for bank in banks if bank["n_fraud"] == 0]
    flagged = final["tp"] + final["fp"]
    risks = [
        f"At the chosen threshold {final['fn']} of {test['frauds']} test frauds are missed "
        f"and {final['fp']} legitimate transactions are flagged.",
        "The threshold was chosen on the banks' pooled validation data; a bank whose "
        "fraud mix differs from the pool may see other precision and recall.",
    ]
    if no_fraud:
        risks.append(f"Banks without any fraud in their data: {', '.join(no_fraud)}; they "
                     "contribute legitimate behaviour only.")
    lines = [
        f"> Offline report: written without the language model ({reason}). Every number "
        "comes from metrics.json.",
        "",
        "## Executive summary",
        f"{len(banks)} banks trained one fraud model together for {len(metrics['history'])} "
        f"rounds without sharing transactions. On the server's held-out test set "
        f"({test['rows']} transactions, {test['frauds']} frauds) the model reaches "
        f"AUC {final['auc']:.3f} and average precision {final['ap']:.3f}; at a 1 % "
        f"false-positive rate it catches {final['recall_at_1pct_fpr']:.0%} of frauds.",
        "",
        "## Metric interpretation",
        f"- Ranking: AUC went from {first['auc']:.3f} after round 1 to {last['auc']:.3f}; "
        f"AP from {first['ap']:.3f} to {last['ap']:.3f}.",
        f"- At threshold {final['threshold']:.3f} the model flags {flagged} transactions: "
        f"precision {final['precision']:.3f}, recall {final['recall']:.3f}, "
        f"F1 {final['f1']:.3f} (TP {final['tp']}, FP {final['fp']}, FN {final['fn']}, "
        f"TN {final['tn']}).",
        "- Accuracy is not reported: with this little fraud, flagging nothing would "
        "already look accurate.",
        "",
        "## Risks",
        *[f"- {risk}" for risk in risks],
        "",
        "## Next steps",
        "- Review the flagged volume with the fraud operations team before go-live.",
        "- Re-run with more rounds or banks and compare AP; monitor drift per bank.",
        "- Generate the narrative report with a language model once a key is configured.",
    ]
    return "\n".join(lines) + "\n"


def write_report(run_dir: Path, metrics: dict[str, Any], config: Config) -> Path:
    """Write report.md (and the exact request) into ``run_dir``; never raises on
    an unreachable or failing API."""
    request = build_request(metrics, config)
    (run_dir / REQUEST_FILE).write_text(json.dumps(request, indent=2) + "\n")
    if not os.environ.get("OPENAI_API_KEY"):
        body = offline_report(metrics, "no OPENAI_API_KEY set")
    else:
        try:
            body = f"_Written by {config.report_model} from the facts in {REQUEST_FILE}._\n\n"
            body += ask_openai(request, config)
        except Exception as err:  # noqa: BLE001 - a report must never sink the run
            log(WARNING, "fedfraud report: OpenAI request failed, writing offline: %r", err)
            body = offline_report(metrics, f"OpenAI request failed: {type(err).__name__}")
    path = run_dir / REPORT_FILE
    path.write_text(f"# Fraud-risk report, run {metrics['run_id']}\n\n{body}")
    return path
