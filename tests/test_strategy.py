"""The server's guard around Flower's strategies, the attacks, FedProx's term, DP
accounting and the membership audit: pure parts, no processes."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict

from client.attack import poison
from common import keys
from common.metrics import PooledCurve, membership_histograms
from common.model import FraudNet, ModelSpec
from common.privacy import epsilon_spent, privacy_for
from common.task import train
from server.strategy import fingerprint, make_strategy
from tests.conftest import app_config

HONEST = [np.array([1.0, 2.0], np.float32), np.array([1.2, 2.2], np.float32),
          np.array([0.8, 1.8], np.float32), np.array([1.0, 2.0], np.float32)]


def reply(bank: int, weights: np.ndarray) -> Message:
    content = RecordDict({
        keys.ARRAYS: ArrayRecord({"w": Array(weights)}),
        keys.METRICS: MetricRecord({keys.BANK_ID: bank, keys.VOTE: 1,
                                    keys.NUM_EXAMPLES: 100, keys.N_TRAIN: 100,
                                    keys.N_VAL: 20, keys.N_FRAUD: 3}),
    })
    metadata = Metadata(run_id=1, message_id="", src_node_id=bank + 1, dst_node_id=0,
                        reply_to_message_id=f"m{bank}", group_id="1",
                        created_at=time.time(), ttl=60, message_type="train")
    return Message(content=content, metadata=metadata)


def aggregate(strategy_name: str, replies: list[Message]):
    strategy = make_strategy(app_config(strategy=strategy_name, min_banks=1))
    arrays, metrics = strategy.aggregate_train(1, replies)
    return strategy, arrays["w"].numpy(), metrics


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_updates_are_refused_and_recorded(bad: float) -> None:
    poisoned = np.array([bad, 1.0], np.float32)
    replies = [reply(bank, w) for bank, w in enumerate(HONEST)] + [reply(7, poisoned)]

    strategy, weights, metrics = aggregate("fedavg", replies)

    np.testing.assert_allclose(weights, np.mean(HONEST, axis=0), rtol=1e-6)
    assert strategy.refused == [{"round": 1, "bank": 7, "why": "non-finite values in arrays/w"}]
    assert list(metrics[keys.BANK_IDS]) == [0, 1, 2, 3]
    # The ledger still shows what bank 7 sent: the refused update is accounted for.
    assert [entry["bank"] for entry in strategy.ledger] == [0, 1, 2, 3, 7]


@pytest.mark.parametrize(("weighting", "key", "claim"), [
    ("equal", keys.VOTE, 1e9), ("equal", keys.VOTE, -3), ("equal", keys.VOTE, 0),
    ("samples", keys.NUM_EXAMPLES, 10**9), ("samples", keys.NUM_EXAMPLES, -100),
    ("samples", keys.NUM_EXAMPLES, 0.5)])
def test_a_bank_claiming_a_weight_no_honest_bank_sends_is_refused(weighting, key,
                                                                  claim) -> None:
    """FedAvg weights each update by what its bank says: a bank that says 1e9 (or a
    negative weight that nearly cancels the others) would make the global model its
    own. Its update is refused and recorded; the honest banks' average stands."""
    malicious = reply(7, np.array([1e3, -1e3], np.float32))
    malicious.content[keys.METRICS][key] = claim
    replies = [reply(bank, w) for bank, w in enumerate(HONEST)] + [malicious]
    strategy = make_strategy(app_config(bank_weighting=weighting, min_banks=1))

    arrays, _ = strategy.aggregate_train(1, replies)

    np.testing.assert_allclose(arrays["w"].numpy(), np.mean(HONEST, axis=0), rtol=1e-6)
    assert [(r["bank"], r["why"].split()[0]) for r in strategy.refused] == [(7, key)]


def test_ledger_lists_each_record_with_its_size_and_no_rows() -> None:
    strategy, _, _ = aggregate("fedavg", [reply(0, HONEST[0])])
    entry = strategy.ledger[0]

    assert (entry["round"], entry["bank"], entry["message"]) == (1, 0, "train")
    kinds = {record["kind"]: record for record in entry["records"]}
    assert kinds["weights"]["items"] == {"w": [2],
                                         "sha256": fingerprint(ArrayRecord({"w": Array(HONEST[0])}))}
    assert kinds["weights"]["bytes"] >= 8  # two float32 values, plus framing
    assert set(kinds["metrics"]["items"]) == {keys.BANK_ID, keys.VOTE, keys.NUM_EXAMPLES,
                                              keys.N_TRAIN, keys.N_VAL, keys.N_FRAUD}
    assert entry["bytes"] == sum(record["bytes"] for record in entry["records"])


@pytest.mark.parametrize("strategy_name", ["fedmedian", "fedtrimmedavg", "krum"])
def test_robust_strategies_shrug_off_one_scaled_update(strategy_name: str) -> None:
    start = np.array([1.0, 2.0], np.float32)
    attacker = poison({"w": start}, {"w": np.array([1.1, 2.1], np.float32)}, "scale",
                      100.0)["w"]
    def replies() -> list[Message]:  # fresh each time: strategies consume them
        return [reply(bank, w) for bank, w in enumerate(HONEST)] + [reply(9, attacker)]

    _, robust, _ = aggregate(strategy_name, replies())
    _, plain, _ = aggregate("fedavg", replies())

    assert np.abs(plain - start).max() > 1.5  # FedAvg is dragged far away
    assert np.abs(robust - start).max() < 0.25  # the robust rule is not


def test_attacks_poison_the_update_not_the_bank() -> None:
    incoming = {"w": np.array([1.0, 1.0])}
    trained = {"w": np.array([1.5, 0.5])}
    assert poison(incoming, trained, "scale", 10.0)["w"].tolist() == [6.0, -4.0]
    assert poison(incoming, trained, "sign-flip", 1.0)["w"].tolist() == [0.5, 1.5]
    assert np.isnan(poison(incoming, trained, "nan", 1.0)["w"]).all()
    assert np.isinf(poison(incoming, trained, "inf", 1.0)["w"]).all()


def fit(mu: float, privacy=None) -> tuple[float, FraudNet]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 6)).astype(np.float32)
    y = (x[:, 0] + 0.3 * rng.normal(size=512) > 1.2).astype(np.int64)
    torch.manual_seed(0)
    model = FraudNet(ModelSpec(in_features=6))
    start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    train(model, x, y, epochs=3, batch_size=64, learning_rate=0.01, pos_weight=1.0,
          seed=3, proximal_mu=mu, privacy=privacy)
    moved = torch.cat([p.detach().flatten() for p in model.parameters()]) - start
    return float(moved.norm()), model


def test_fedprox_term_keeps_the_bank_near_the_global_model() -> None:
    assert fit(mu=10.0)[0] < 0.5 * fit(mu=0.0)[0]


def test_a_small_bank_trains_and_fine_tunes_at_least_min_local_steps_but_not_under_dp() -> None:
    config = app_config(local_epochs=3, min_local_steps=60, batch_size=64)

    assert config.local_epochs_for(20_000) == 3  # 313 steps an epoch
    assert config.local_epochs_for(150) == 20  # 3 steps an epoch: 60 steps
    assert config.local_epochs_for(100) == 30  # 2 steps an epoch
    assert app_config(min_local_steps=0).local_epochs_for(150) == 3
    assert app_config(dp_epsilon=3.0, min_local_steps=60).local_epochs_for(150) == 3
    # ...and fine-tunes the final model at least as many steps (off: none at all)
    assert config.personalize_epochs_for(20_000) == 3
    assert config.personalize_epochs_for(300) == 12  # 5 steps an epoch: 60 steps
    assert app_config(personalize_epochs=0).personalize_epochs_for(300) == 0
    assert app_config(dp_epsilon=3.0).personalize_epochs_for(300) == 0
    for steps in (-1, 10**15):  # a server cannot make a bank train forever
        with pytest.raises(ValueError, match="min-local-steps"):
            app_config(min_local_steps=steps)


@pytest.mark.parametrize("setting", [{"num_server_rounds": 0}, {"num_server_rounds": -1},
                                     {"dp_delta": float("nan")}, {"dp_delta": 0.0},
                                     {"local_epochs": 0}, {"local_epochs": 10**9},
                                     {"personalize_epochs": 10**9}])
def test_a_run_config_that_would_hang_or_void_dp_accounting_is_refused(setting) -> None:
    with pytest.raises(ValueError, match="run config"):
        app_config(dp_epsilon=3.0, **setting)


def test_dp_noise_meets_the_target_epsilon_over_the_run() -> None:
    config = app_config(dp_epsilon=3.0, num_server_rounds=10, local_epochs=3)
    privacy = privacy_for(config, rows=5_000)
    spent = [epsilon_spent(config, 5_000, privacy, rounds) for rounds in (1, 5, 10)]

    assert spent[0] < spent[1] < spent[2] <= 3.0 + 1e-6
    assert spent[2] > 2.9  # the budget is used, not wasted
    # A smaller bank needs more noise for the same epsilon.
    assert privacy_for(config, rows=500).noise_multiplier > privacy.noise_multiplier


def test_dp_training_is_noisy_but_reproducible() -> None:
    config = app_config(dp_epsilon=1.0)
    privacy = privacy_for(config, rows=512)
    _, first = fit(0.0, privacy)
    _, again = fit(0.0, privacy)
    _, plain = fit(0.0)

    for a, b, c in zip(first.parameters(), again.parameters(), plain.parameters()):
        assert torch.equal(a, b)  # same seed, same noise
    assert any(not torch.allclose(a, c) for a, c in zip(first.parameters(),
                                                        plain.parameters()))


def test_membership_audit_sees_memorized_rows_and_not_unseen_ones() -> None:
    rng = np.random.default_rng(0)
    same = PooledCurve.from_histograms(*membership_histograms(
        rng.exponential(0.1, 4000), rng.exponential(0.1, 1000)))
    memorized = PooledCurve.from_histograms(*membership_histograms(
        rng.exponential(0.01, 4000), rng.exponential(0.1, 1000)))

    assert abs(same.auc() - 0.5) < 0.03
    assert memorized.auc() > 0.85


def test_a_reply_finite_only_in_float64_is_refused_as_non_finite() -> None:
    """1e300 is finite in float64 and inf in the model's float32 average."""
    from server.strategy import non_finite

    huge = np.array([1.0, 1e300], np.float64)
    content = RecordDict({keys.ARRAYS: ArrayRecord({keys.WEIGHTS: Array(huge)})})
    assert non_finite(content) == [f"{keys.ARRAYS}/{keys.WEIGHTS}"]
    content = RecordDict({keys.ARRAYS: ArrayRecord({keys.WEIGHTS: Array(huge[:1])})})
    assert non_finite(content) == []
