from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import MetricRecord, RecordDict
from sklearn.metrics import average_precision_score, roc_auc_score

from common import keys
from common.metrics import (
    SCORE_EDGES, Confusion, PooledCurve, auc_difference, bce_loss, confusion,
    recall_at_fpr, score_histograms, summarize, weighted_auc,
)
from server.evaluation import aggregate_bank_metrics


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_confusion_by_hand() -> None:
    # Prepare: scores 0.9, 0.6, 0.4, 0.2 for labels 1, 0, 1, 0
    y = np.array([1, 0, 1, 0])
    logits = np.array([logit(0.9), logit(0.6), logit(0.4), logit(0.2)])

    # Execute
    counts = confusion(y, logits, threshold=0.5)

    # Assert: flagged 0.9 (fraud) and 0.6 (legit)
    assert counts == Confusion(tp=1, fp=1, fn=1, tn=1)
    assert (counts.precision, counts.recall, counts.f1) == (0.5, 0.5, 0.5)


def test_ratios_of_nothing_are_zero_not_errors() -> None:
    counts = Confusion(tp=0, fp=0, fn=3, tn=10)
    assert (counts.precision, counts.recall, counts.f1) == (0.0, 0.0, 0.0)


def test_recall_at_one_percent_fpr_by_hand() -> None:
    # 200 legit with scores 0..199, 4 frauds at 198.5, 150, 300, 10.
    y = np.array([0] * 200 + [1] * 4)
    scores = np.concatenate([np.arange(200.0), [198.5, 150.0, 300.0, 10.0]])
    # At most 2 false positives (1 % of 200): threshold 198 flags legit 198, 199 and
    # frauds 198.5 and 300 -> recall 2/4.
    assert recall_at_fpr(y, scores) == 0.5


def test_bce_loss_matches_formula() -> None:
    y = np.array([1, 0])
    logits = np.array([0.0, 2.0])
    expected = (math.log(2) + math.log(1 + math.exp(2))) / 2
    assert bce_loss(y, logits) == pytest.approx(expected)


def test_histograms_count_every_row_in_its_bin() -> None:
    y = np.array([0, 0, 1, 1, 1])
    logits = np.array([-100.0, 0.01, 0.01, 0.07, 100.0])

    legit, fraud = score_histograms(y, logits)

    assert sum(legit) == 2 and sum(fraud) == 3
    assert legit[0] == 1 and fraud[-1] == 1  # out of range -> end bins
    zero_bin = int(np.searchsorted(SCORE_EDGES, 0.0))  # [0.00, 0.05)
    assert legit[zero_bin] == 1 and fraud[zero_bin] == 1 and fraud[zero_bin + 1] == 1
    # A diverged model's NaN scores still count (the server refuses counts that do not
    # add up to a bank's validation rows): in the lowest bin.
    legit, fraud = score_histograms(y, np.array([np.nan, 0.01, np.nan, np.inf, -np.inf]))
    assert (legit[0], fraud[0], fraud[-1], sum(legit), sum(fraud)) == (1, 2, 1, 2, 3)


def test_pooled_curve_equals_exact_metrics_on_pooled_rows() -> None:
    # Two banks; scores on bin centres so binning loses nothing.
    rng = np.random.default_rng(0)
    centres = (SCORE_EDGES[:-1] + SCORE_EDGES[1:]) / 2
    banks = []
    for n, rate in ((3000, 0.01), (800, 0.2)):
        y = (rng.random(n) < rate).astype(int)
        logits = rng.choice(centres[200:440], n) + 2.0 * y
        logits = centres[np.searchsorted(SCORE_EDGES, logits) - 1]
        banks.append((y, logits))
    histograms = [score_histograms(y, s) for y, s in banks]
    legit = np.sum([h[0] for h in histograms], axis=0).tolist()
    fraud = np.sum([h[1] for h in histograms], axis=0).tolist()
    y_all = np.concatenate([y for y, _ in banks])
    s_all = np.concatenate([s for _, s in banks])

    curve = PooledCurve.from_histograms(legit, fraud)
    best = curve.best_f1_index()

    assert curve.auc() == pytest.approx(roc_auc_score(y_all, s_all), abs=1e-9)
    assert curve.average_precision() == pytest.approx(
        average_precision_score(y_all, s_all), abs=1e-9)
    assert curve.confusion_at(best) == confusion(y_all, s_all, curve.thresholds[best])
    f1s = [confusion(y_all, s_all, t).f1 for t in curve.thresholds]
    assert curve.confusion_at(best).f1 == pytest.approx(max(f1s))


def reply(**metrics: object) -> RecordDict:
    return RecordDict({keys.METRICS: MetricRecord(metrics)})


def test_evaluate_aggregation_sums_counts_instead_of_averaging_ratios() -> None:
    # Bank 1: 2 frauds, both caught with 8 false alarms (precision 0.2).
    # Bank 0: 100 frauds, 50 caught, no false alarm (precision 1.0).
    # Averaged precision would be 0.6; summed counts give 52 / 60.
    small = reply(**{keys.NUM_EXAMPLES: 100, keys.N_VAL: 100, keys.LOSS: 0.5, keys.BANK_ID: 1,
                     keys.TP: 2, keys.FP: 8, keys.FN: 0, keys.TN: 90,
                     keys.HIST_LEGIT: [1, 2], keys.HIST_FRAUD: [0, 2]})
    large = reply(**{keys.NUM_EXAMPLES: 300, keys.N_VAL: 300, keys.LOSS: 0.1, keys.BANK_ID: 0,
                     keys.TP: 50, keys.FP: 0, keys.FN: 50, keys.TN: 200,
                     keys.HIST_LEGIT: [3, 4], keys.HIST_FRAUD: [5, 6]})

    record = aggregate_bank_metrics([small, large], keys.VOTE)  # FedAvg weights

    counts = Confusion(*(int(record[k]) for k in keys.COUNT_KEYS))
    assert counts == Confusion(tp=52, fp=8, fn=50, tn=290)
    assert counts.precision == pytest.approx(52 / 60)
    assert record[keys.LOSS] == pytest.approx((100 * 0.5 + 300 * 0.1) / 400)
    assert record[keys.HIST_LEGIT] == [4, 6] and record[keys.HIST_FRAUD] == [5, 8]
    assert record[keys.BANK_IDS] == [0, 1]


def test_train_aggregation_keeps_each_banks_sizes() -> None:
    replies = [
        reply(**{keys.NUM_EXAMPLES: 30, keys.TRAIN_LOSS: 1.0, keys.BANK_ID: 4,
                 keys.N_TRAIN: 30, keys.N_VAL: 5, keys.N_FRAUD: 0}),
        reply(**{keys.NUM_EXAMPLES: 10, keys.TRAIN_LOSS: 3.0, keys.BANK_ID: 2,
                 keys.N_TRAIN: 10, keys.N_VAL: 2, keys.N_FRAUD: 1}),
    ]
    record = aggregate_bank_metrics(replies, keys.VOTE)
    assert record[keys.BANK_IDS] == [2, 4]
    assert record[keys.N_TRAIN] == [10, 30] and record[keys.N_FRAUD] == [1, 0]
    assert record[keys.TRAIN_LOSS] == pytest.approx(1.5)  # per row: (30 * 1 + 10 * 3) / 40
    assert keys.TP not in record and keys.HIST_LEGIT not in record


def test_summarize_reports_honest_metrics() -> None:
    y = np.array([0] * 98 + [1] * 2)
    logits = np.full(100, -5.0)  # "never fraud": accurate and useless
    result = summarize(y, logits, threshold=0.5)
    assert result["recall"] == 0.0 and result["tp"] == 0 and result["fn"] == 2
    assert result["auc"] == 0.5


def test_pooled_metrics_of_two_banks_by_hand() -> None:
    # Bank A: frauds at logits 2 and 0, legit at 0, -2, -2.
    # Bank B: a fraud at 2, legit at 2, -2, -2, -2.
    # Pooled: frauds {2, 2, 0} (P = 3), legit {2, 0, -2 x 5} (N = 7). By hand:
    #   flag logit >= 2: TP 2, FP 1;  >= 0: TP 3, FP 2;  >= -2: TP 3, FP 7.
    #   AUC = P(fraud above legit) + ties / 2 = (6.5 + 6.5 + 5.5) / 21 = 37/42
    #   AP  = 2/3 * 2/3 + 1/3 * 3/5 = 29/45
    #   best F1 at p = 0.5 (logit 0): P 3/5, R 1, F1 0.75
    banks = {
        0: (np.array([1, 1, 0, 0, 0]), np.array([2.0, 0.0, 0.0, -2.0, -2.0])),
        1: (np.array([1, 0, 0, 0, 0]), np.array([2.0, 2.0, -2.0, -2.0, -2.0])),
    }
    replies = []
    for bank, (y, logits) in banks.items():
        legit, fraud = score_histograms(y, logits)
        replies.append(reply(**{keys.BANK_ID: bank, keys.NUM_EXAMPLES: len(y),
                                keys.HIST_LEGIT: legit, keys.HIST_FRAUD: fraud}))
    pooled = aggregate_bank_metrics(replies, keys.VOTE)

    curve = PooledCurve.from_histograms(pooled[keys.HIST_LEGIT], pooled[keys.HIST_FRAUD])
    summary = curve.summary(curve.thresholds[curve.best_f1_index()])

    assert (curve.positives, curve.negatives) == (3, 7)
    assert curve.auc() == pytest.approx(37 / 42)
    assert curve.average_precision() == pytest.approx(29 / 45)
    assert curve.recall_at_fpr(0.01) == 0.0 and curve.recall_at_fpr(1 / 7) == pytest.approx(2 / 3)
    assert summary["threshold"] == pytest.approx(0.5)
    assert (summary["tp"], summary["fp"], summary["fn"], summary["tn"]) == (3, 2, 0, 5)
    assert summary["precision"] == pytest.approx(0.6) and summary["f1"] == pytest.approx(0.75)
    # One bank alone (bank B): its fraud ties one legit row and beats three.
    alone = PooledCurve.from_histograms(*score_histograms(*banks[1]))
    assert alone.auc() == pytest.approx(3.5 / 4)
    # A bank without fraud rows has no AUC or AP, not a made-up number.
    none = PooledCurve.from_histograms(*score_histograms(np.zeros(3, int), np.zeros(3)))
    assert math.isnan(none.auc()) and math.isnan(none.summary(0.5)["ap"])


def test_weighted_auc_is_sklearns_auc_with_those_row_weights_ties_included() -> None:
    rng = np.random.default_rng(3)
    y = (rng.random(2000) < 0.05).astype(int)
    scores = np.round(rng.normal(size=2000) + y, 1)  # rounded: many ties
    counts = rng.poisson(1.0, size=(4, 2000))
    expected = [roc_auc_score(y, scores, sample_weight=row) for row in counts]
    np.testing.assert_allclose(weighted_auc(y, scores, counts), expected, rtol=1e-12)


def test_auc_difference_tells_a_real_gap_from_test_set_noise() -> None:
    rng = np.random.default_rng(4)
    y = (rng.random(5000) < 0.03).astype(int)
    good = rng.normal(size=5000) + 2.0 * y
    noisy = good + rng.normal(size=5000)  # the same model with noise added: worse
    gap = auc_difference(y, good, noisy)
    assert gap["auc_difference"] == pytest.approx(
        roc_auc_score(y, good) - roc_auc_score(y, noisy), abs=1e-12)
    assert 0 < gap["ci95"][0] < gap["auc_difference"] < gap["ci95"][1]
    same = auc_difference(y, good, good)
    assert same["auc_difference"] == 0 and same["ci95"] == [0, 0]
    # Two equally good but different models: the interval holds 0.
    other = rng.normal(size=5000) + 2.0 * y
    tie = auc_difference(y, good, other)
    assert tie["ci95"][0] < 0 < tie["ci95"][1]
    assert auc_difference(y, good, other, seed=1) != tie  # resamples follow the seed


def test_the_references_log_their_progress_with_elapsed_time(
        prepared, monkeypatch: pytest.MonkeyPatch) -> None:
    """The references took minutes in silence on a large table: each tenth of the
    banks' local-only models, then the centralized one, is logged as it is done."""
    from dataclasses import replace
    from pathlib import Path

    import torch

    import server.baselines as baselines
    from common.data import TEST_FILE, fit_scaler, load_transactions, standardize
    from common.model import FraudNet, ModelSpec

    lines: list[str] = []
    monkeypatch.setattr(baselines, "log", lambda _level, text, *args: lines.append(
        text % args))
    config = replace(prepared, num_server_rounds=1)
    x_test, y_test, schema = load_transactions(Path(config.data_dir) / TEST_FILE,
                                               config.label_column, "test set")
    x_test = standardize(x_test, *fit_scaler(x_test))
    spec = ModelSpec(in_features=len(schema.features))
    torch.manual_seed(0)
    result, _ = baselines.compute_baselines(config, spec, FraudNet(spec).state_dict(),
                                            x_test, y_test, np.zeros(len(y_test)))

    assert len(result["local_only"]) == config.num_banks
    assert [line.split(" [")[0] for line in lines] == [
        *(f"fedfraud: references: local-only models of {n} of {config.num_banks} banks "
          "trained" for n in range(1, config.num_banks + 1)),
        lines[config.num_banks].split(" [")[0],
        "fedfraud: references: centralized model trained; bootstrapping the test AUC "
        "differences",
        "fedfraud: references: done"]
    assert "training the centralized model on " in lines[config.num_banks]
    seconds = [float(line.rsplit("[", 1)[1].removesuffix(" s]")) for line in lines]
    assert seconds == sorted(seconds)
