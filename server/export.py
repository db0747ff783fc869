"""The run's model in forms a bank can use without this repository.

- ``model.ts``: TorchScript, standardized features in, fraud probability out; loads with
  plain ``torch.jit.load`` (or libtorch) and none of fedfraud's code.
- ``model.pt``: the state dict and ``ModelSpec`` (to rebuild ``FraudNet`` here).
- ``model_card.json`` / ``model_card.md``: what the model expects and how it was made.

The model takes features standardized with the scoring bank's *own* scaler, which
stays in the bank's folder and never enters the run folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from common.model import (
    CARD_JSON_FILE, CARD_MD_FILE, STATE_DICT_FILE, TORCHSCRIPT_FILE, ModelSpec, save_model,
)


def model_card(metrics: dict[str, Any], spec: ModelSpec, features: list[str],
               data_source: str) -> dict[str, Any]:
    final = metrics["final"]
    return {
        "name": "fedfraud FraudNet",
        "run_id": metrics["run_id"],
        "format": {"torchscript": TORCHSCRIPT_FILE, "state_dict": STATE_DICT_FILE,
                   "input": "float32 (batch, features), each feature standardized with "
                            "the scoring bank's own scaler (scaler.json in its folder)",
                   "output": "fraud probability per row"},
        "features": features,
        "architecture": spec.as_dict(),
        "threshold": final["threshold"],
        "threshold_chosen_on": "banks' pooled validation data (max F1)",
        "training": {"mode": metrics["mode"], "rounds": len(metrics["history"]),
                     "banks": len(metrics["banks"]), "config": metrics["config"],
                     "data": data_source, "versions": metrics["versions"]},
        "final_test_metrics": {key: final[key] for key in (
            "auc", "ap", "recall_at_1pct_fpr", "precision", "recall", "f1",
            "tp", "fp", "fn", "tn")},
        "privacy": {"raw_data_shared": False,
                    "differential_privacy": dp_summary(metrics.get("privacy") or {}),
                    "secure_aggregation": "on (SecAgg+)" if (metrics.get("privacy") or {})
                    .get("secure_aggregation") else "off",
                    "sent_by_banks": "model weights, sample counts, confusion counts, "
                                     "score and loss histograms (sent_by_banks.json)"},
    }


def dp_summary(privacy: dict[str, Any]) -> str:
    if not privacy.get("differential_privacy"):
        return "off"
    if privacy.get("max_epsilon_spent") is None:  # SecAgg+: no bank reports it
        return (f"DP-SGD per bank, target epsilon {privacy['target_epsilon']:g} at delta "
                f"{privacy['delta']:g} (spent: in each bank's own ledger)")
    return (f"DP-SGD per bank, epsilon <= {privacy['max_epsilon_spent']:.2f} at delta "
            f"{privacy['delta']:g} (each bank's in metrics.json)")


def card_markdown(card: dict[str, Any]) -> str:
    final, training = card["final_test_metrics"], card["training"]
    lines = [
        f"# Model card: {card['name']} (run {card['run_id']})",
        "",
        f"Trained by {training['banks']} banks over {training['rounds']} FedAvg rounds "
        f"({training['mode']}) on {training['data']}; no transaction left any bank.",
        "",
        "## Use",
        f"- Load `{card['format']['torchscript']}` with `torch.jit.load`; input "
        f"{card['format']['input']}; output {card['format']['output']}.",
        f"- Flag a transaction when its probability is >= {card['threshold']:.4f} "
        f"({card['threshold_chosen_on']}).",
        f"- Features, in this order: {', '.join(card['features'])}.",
        "",
        "## Test-set performance",
        "| AUC | AP | recall @ 1 % FPR | precision | recall | F1 |",
        "|---|---|---|---|---|---|",
        f"| {final['auc']:.3f} | {final['ap']:.3f} | {final['recall_at_1pct_fpr']:.3f} "
        f"| {final['precision']:.3f} | {final['recall']:.3f} | {final['f1']:.3f} |",
        "",
        "## Privacy",
        *[f"- {key.replace('_', ' ')}: {value}" for key, value in card["privacy"].items()],
    ]
    return "\n".join(lines) + "\n"


def export_model(run_dir: Path, state_dict: dict[str, torch.Tensor], spec: ModelSpec,
                 features: list[str], metrics: dict[str, Any], data_source: str) -> None:
    save_model(run_dir, state_dict, spec, features, metrics["final"]["threshold"])
    card = model_card(metrics, spec, features, data_source)
    (run_dir / CARD_JSON_FILE).write_text(json.dumps(card, indent=2) + "\n")
    (run_dir / CARD_MD_FILE).write_text(card_markdown(card))
