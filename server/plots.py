"""The run's figures, as PNG files in the run folder (matplotlib, no screen needed).

Every curve is a ``PooledCurve``: built from score histograms, the same way the
banks' pooled validation curve is built from what they send.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from common.metrics import MAX_FPR, PooledCurve

ROC_FILE, PR_FILE = "roc.png", "pr.png"
ROUNDS_FILE, BANKS_FILE = "rounds.png", "banks.png"


def _figure(width: float = 6.0, height: float = 4.2, columns: int = 1) -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    return plt.subplots(1, columns, figsize=(width, height), constrained_layout=True)


def _save(figure: Any, path: Path) -> str:
    import matplotlib.pyplot as plt

    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path.name


def roc_figure(path: Path, curves: dict[str, PooledCurve]) -> str:
    """ROC with a log false-positive axis: fraud teams live at FPR <= 1 %."""
    figure, axis = _figure()
    for label, curve in curves.items():
        fpr = curve.fp / max(curve.negatives, 1)
        axis.plot(np.maximum(fpr, 1e-5), curve.tp / max(curve.positives, 1),
                  label=f"{label} (AUC {curve.auc():.3f})")
    axis.axvline(MAX_FPR, color="grey", linestyle=":", label="1 % false positives")
    axis.set(xscale="log", xlim=(1e-4, 1), ylim=(0, 1.01), xlabel="false-positive rate",
             ylabel="recall (true-positive rate)", title="ROC, pooled over rows")
    axis.legend(loc="lower right", fontsize=8)
    return _save(figure, path)


def pr_figure(path: Path, curves: dict[str, PooledCurve]) -> str:
    figure, axis = _figure()
    for label, curve in curves.items():
        axis.plot(curve.tp / max(curve.positives, 1), curve.precisions(),
                  label=f"{label} (AP {curve.average_precision():.3f})")
    axis.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="recall", ylabel="precision",
             title="Precision-recall, pooled over rows")
    axis.legend(loc="lower left", fontsize=8)
    return _save(figure, path)


def rounds_figure(path: Path, metrics: dict[str, Any]) -> str:
    figure, axis = _figure()
    rows = metrics["history"]
    rounds = [row["round"] for row in rows]
    for key, name in (("auc", "AUC"), ("ap", "AP")):
        line, = axis.plot(rounds, [row[key] for row in rows], marker="o",
                          label=f"{name}, test set")
        validation = [row.get("validation", {}).get(key) for row in rows]
        validation = [np.nan if value is None else value for value in validation]
        axis.plot(rounds, validation, marker=".", linestyle="--", color=line.get_color(),
                  alpha=0.6, label=f"{name}, banks' pooled validation")
        if metrics.get("baselines"):
            axis.axhline(metrics["baselines"]["centralized"][key], color=line.get_color(),
                         linestyle=":", label=f"{name}, centralized (test set)")
    axis.set(xlabel="round", ylabel="score", ylim=(0, 1.01), xticks=rounds,
             title="Federated model per round")
    axis.legend(loc="lower right", fontsize=8)
    return _save(figure, path)


def banks_figure(path: Path, metrics: dict[str, Any]) -> str:
    """Each bank's own validation data: its local-only model vs the federated one."""
    figure, axes = _figure(width=10.0, columns=2)
    comparisons = metrics["baselines"]["local_only"]
    banks = np.array([entry["bank"] for entry in comparisons])
    for axis, (key, name) in zip(axes, (("auc", "AUC"), ("ap", "AP"))):
        for shift, model in ((-0.2, "local_only"), (0.2, "federated")):
            values = [(entry["own_validation"][model] or {}).get(key) for entry in comparisons]
            axis.bar(banks + shift, [np.nan if v is None else v for v in values], width=0.4,
                     label=model.replace("_", "-"))
        axis.set(xlabel="bank (no bar: no fraud in its validation rows)", ylabel=name,
                 ylim=(0, 1.18), xticks=banks,
                 title=f"{name} on each bank's own validation data")
        axis.legend(loc="upper center", ncols=2, fontsize=8)
    return _save(figure, path)


def draw_figures(run_dir: Path, metrics: dict[str, Any],
                 curves: dict[str, PooledCurve]) -> dict[str, str]:
    """Write every figure the run has data for; returns {caption: file name}."""
    figures = {
        "ROC curves": roc_figure(run_dir / ROC_FILE, curves),
        "Precision-recall curves": pr_figure(run_dir / PR_FILE, curves),
        "AUC and AP per round": rounds_figure(run_dir / ROUNDS_FILE, metrics),
    }
    if metrics.get("baselines"):
        figures["Local-only vs federated, per bank"] = banks_figure(
            run_dir / BANKS_FILE, metrics)
    return figures
