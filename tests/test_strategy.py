"""The server's guard around Flower's strategies, the attacks, FedProx's term, DP
accounting and the membership audit: pure parts, no processes."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict

from client.attack import poison
from common import keys
from common.metrics import SCORE_EDGES, PooledCurve, membership_histograms
from common.model import FraudNet, ModelSpec, packed, shifted_output, unpacked
from common.privacy import epsilon_spent, privacy_for
from common.task import fraud_log_odds, score, train
from server.strategy import fingerprint, make_strategy
from tests.conftest import app_config

HONEST = [np.array([1.0, 2.0], np.float32), np.array([1.2, 2.2], np.float32),
          np.array([0.8, 1.8], np.float32), np.array([1.0, 2.0], np.float32)]


def reply(bank: int, weights: np.ndarray, node: int | None = None) -> Message:
    """Bank ``bank``'s train reply, from node ``bank + 1`` unless ``node``."""
    content = RecordDict({
        keys.ARRAYS: ArrayRecord({"w": Array(weights)}),
        keys.METRICS: MetricRecord({keys.BANK_ID: bank, keys.VOTE: 1,
                                    keys.NUM_EXAMPLES: 100, keys.N_TRAIN: 100,
                                    keys.N_VAL: 20, keys.N_FRAUD: 3}),
    })
    metadata = Metadata(run_id=1, message_id="", src_node_id=node or bank + 1, dst_node_id=0,
                        reply_to_message_id=f"m{bank}", group_id="1",
                        created_at=time.time(), ttl=60, message_type="train")
    return Message(content=content, metadata=metadata)


def guarded(**settings):
    """The server's strategy, as after it sent the round's model (two float32 weights
    named "w", the form of ``reply``)."""
    strategy = make_strategy(app_config(min_banks=1, **settings))
    strategy.sent = {"w": (2,)}
    return strategy


def aggregate(strategy_name: str, replies: list[Message]):
    strategy = guarded(strategy=strategy_name)
    arrays, metrics = strategy.aggregate_train(1, replies)
    return strategy, arrays["w"].numpy(), metrics


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_updates_are_refused_and_recorded(bad: float) -> None:
    poisoned = np.array([bad, 1.0], np.float32)
    replies = [reply(bank, w) for bank, w in enumerate(HONEST)] + [reply(7, poisoned)]

    strategy, weights, metrics = aggregate("fedavg", replies)

    np.testing.assert_allclose(weights, np.mean(HONEST, axis=0), rtol=1e-6)
    assert strategy.refused == [{"round": 1, "bank": 7, "message": "train",
                                 "why": "non-finite values or values beyond 1e+06 in w"}]
    assert list(metrics[keys.BANK_IDS]) == [0, 1, 2, 3]
    # The ledger still shows what bank 7 sent: the refused update is accounted for.
    assert [entry["bank"] for entry in strategy.ledger] == [0, 1, 2, 3, 7]


def test_the_banks_models_are_combined_in_bank_order_whatever_order_they_arrive_in() -> None:
    # Weights whose float32 sum depends on the order it is taken in.
    weights = [np.array([9e5, 1.0], np.float32), np.array([0.013, 3.0], np.float32),
               np.array([-9e5, 7.0], np.float32), np.array([0.011, 0.1], np.float32)]
    orders = [[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]]

    results = [aggregate("fedavg", [reply(bank, weights[bank]) for bank in order])
               for order in orders]

    for _, combined, metrics in results[1:]:
        assert combined.tobytes() == results[0][1].tobytes()
        assert list(metrics[keys.BANK_IDS]) == [0, 1, 2, 3]


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
    strategy = guarded(bank_weighting=weighting)

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


def test_with_its_fraud_log_odds_as_offset_a_bank_learns_ranking_not_its_fraud_rate(
        ) -> None:
    """Features without signal and 2 % fraud: trained plainly the model's logit settles
    near the bank's log-odds (-3.9); with them as the offset, near 0 (nothing to rank)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3_000, 4)).astype(np.float32)
    y = (rng.random(3_000) < 0.02).astype(np.int64)
    offset = fraud_log_odds(y.sum(), len(y))
    logits = {}
    for name, shift in (("plain", 0.0), ("adjusted", offset)):
        torch.manual_seed(0)
        model = FraudNet(ModelSpec(4))
        train(model, x, y, epochs=5, batch_size=128, learning_rate=0.2, pos_weight=1.0,
              seed=0, local_optimizer="sgd", logit_offset=shift)
        logits[name] = float(score(model, x).mean())

    assert offset < -3.5 and abs(logits["plain"] - offset) < 1.0
    assert abs(logits["adjusted"]) < 1.0


def test_a_shifted_output_moves_every_logit_by_the_shift() -> None:
    torch.manual_seed(0)
    model = FraudNet(ModelSpec(5, activation="tanh"))
    x = np.random.default_rng(1).normal(size=(8, 5)).astype(np.float32)
    before = score(model, x)
    shifted = FraudNet(ModelSpec(5, activation="tanh"))
    shifted.load_state_dict(unpacked(shifted_output(packed(model.state_dict()), -2.5),
                                     shifted))

    np.testing.assert_allclose(score(shifted, x), before - 2.5, atol=1e-5)


def test_under_logit_adjustment_the_final_model_is_shifted_by_the_pooled_log_odds() -> None:
    """Each reply states 3 frauds in 120 rows: the last round's model (and only it) is
    shifted by log(12.5 / 468.5); a bank stating absurd counts moves it at most 12."""
    def replies(**stated: int) -> list[Message]:
        made = [reply(bank, w) for bank, w in enumerate(HONEST)]
        for message in made:
            weights = message.content[keys.ARRAYS]["w"].numpy()
            message.content[keys.ARRAYS] = ArrayRecord({keys.WEIGHTS: Array(weights)})
            for key, value in stated.items():
                message.content[keys.METRICS][key] = value
        return made

    def combined(server_round: int, **settings: Any) -> np.ndarray:
        strategy = make_strategy(app_config(min_banks=1, **settings))
        strategy.sent = {keys.WEIGHTS: (2,)}
        arrays, _ = strategy.aggregate_train(server_round, replies())
        return arrays[keys.WEIGHTS].numpy()

    mean = np.mean(HONEST, axis=0)
    on = {"num_server_rounds": 10, "logit_adjustment": True}
    final = combined(10, **on)
    np.testing.assert_allclose(final, mean + [0.0, np.log(12.5 / 468.5)], rtol=1e-6)
    np.testing.assert_allclose(combined(9, **on), mean, rtol=1e-6)
    for off in ({"logit_adjustment": False}, {"dp_epsilon": 3.0}):
        np.testing.assert_allclose(combined(10, **{**on, **off}), mean, rtol=1e-6)
    strategy = make_strategy(app_config(min_banks=1, logit_adjustment=True))
    strategy.sent = {keys.WEIGHTS: (2,)}
    absurd = replies(**{keys.N_FRAUD: 0, keys.N_TRAIN: 2**40})
    strategy.aggregate_train(strategy.num_rounds, absurd)
    assert strategy.prior_shift == -12.0


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


def test_weights_beyond_float32_or_max_weight_are_implausible() -> None:
    """1e300 is finite in float64 and inf in the model's float32 average; 1e20 is finite
    in float32 and overflows the model's activations (NaN scores) and FedAdam's squares."""
    from common.model import implausible

    assert implausible(np.array([1.0, 1e300])) and implausible(np.float32([1e20, 1.0]))
    assert not implausible(np.float32([1.0, -3.5]))


def forged(shape: str = "(35184372088832,)", values: int = 1) -> bytes:
    """An npy file of ``values`` float32 zeros whose header claims ``shape`` (by
    default 2**45 of them)."""
    stream = io.BytesIO()
    np.save(stream, np.zeros(values, np.float32))
    data = stream.getvalue()
    header = data[10:].split(b"}")[0].replace(f"({values},)".encode(), shape.encode())
    return (data[:8] + (len(header) + 1 + 8).to_bytes(2, "little") + header + b"}"
            + b" " * 7 + b"\n" + data[len(data) - 4 * values:])


def crafted(change: str) -> Message:
    """Bank 7's reply, changed in one way no bank's app sends."""
    message = reply(7, np.array([5.0, 5.0], np.float32))
    content, metrics = message.content, message.content[keys.METRICS]
    if change == "one weight":  # would be broadcast into the average
        content[keys.ARRAYS] = ArrayRecord({"w": Array(np.array([1e3], np.float32))})
    elif change == "three weights":  # stops the sum
        content[keys.ARRAYS] = ArrayRecord({"w": Array(np.ones(3, np.float32))})
    elif change == "2-D":
        content[keys.ARRAYS] = ArrayRecord({"w": Array(np.ones((1, 2), np.float32))})
    elif change == "another name":  # Flower raises: keys differ between replies
        content[keys.ARRAYS] = ArrayRecord({"v": Array(np.ones(2, np.float32))})
    elif change == "an extra array":
        content[keys.ARRAYS]["x"] = Array(np.ones(2, np.float32))
    elif change == "integers":
        content[keys.ARRAYS] = ArrayRecord({"w": Array(np.ones(2, np.int64))})
    elif change == "text":
        content[keys.ARRAYS] = ArrayRecord({"w": Array(np.array(["a", "b"]))})
    elif change == "another serialization":
        content[keys.ARRAYS] = ArrayRecord({"w": Array(
            dtype="float32", shape=(2,), stype="torch", data=b"xx")})
    elif change == "broken bytes":
        content[keys.ARRAYS] = ArrayRecord({"w": Array(
            dtype="float32", shape=(2,), stype="numpy.ndarray", data=b"\x93NUMPY garbage")})
    elif change == "no arrays":
        del content[keys.ARRAYS]
    elif change == "a second array record":
        content["more"] = ArrayRecord({"w": Array(np.ones(2, np.float32))})
    elif change == "no metrics":  # Flower raises: one MetricRecord per reply
        del content[keys.METRICS]
    elif change == "no bank id":
        del metrics[keys.BANK_ID]
    elif change == "no num-examples":  # our metrics aggregation sums it
        del metrics[keys.NUM_EXAMPLES]
    elif change == "a short histogram":  # our metrics aggregation sums histograms
        metrics[keys.HIST_FRAUD] = [1, 2, 3]
    elif change == "no sizes":  # the results read them
        del metrics[keys.N_VAL]
    elif change == "half a histogram pair":
        metrics[keys.HIST_LEGIT] = [0] * (len(SCORE_EDGES) - 1)
    elif change == "a forged header":  # np.load would allocate 2**45 floats
        content[keys.ARRAYS] = ArrayRecord({"w": Array(dtype="float32", shape=(2,),
                                                       stype="numpy.ndarray", data=forged())})
    elif change == "a header of 2**64 x 0":  # numpy raises OverflowError loading it
        content[keys.ARRAYS] = ArrayRecord({"w": Array(
            dtype="float32", shape=(2,), stype="numpy.ndarray",
            data=forged("(18446744073709551616, 0)", values=0))})
    elif change == "a header of True x 2":  # numpy raises TypeError loading it
        content[keys.ARRAYS] = ArrayRecord({"w": Array(
            dtype="float32", shape=(2,), stype="numpy.ndarray",
            data=forged("(True, 2)", values=2))})
    elif change == "huge weights":  # finite, and NaN scores once averaged in
        content[keys.ARRAYS] = ArrayRecord({"w": Array(np.float32([1e20, -1e20]))})
    elif change == "no vote":  # Flower raises without the weight key
        del metrics[keys.VOTE]
    elif change == "negative counts":  # would move the pooled threshold, AUC above 1
        metrics[keys.HIST_FRAUD] = [-5] * (len(SCORE_EDGES) - 1)
        metrics[keys.HIST_LEGIT] = [0] * (len(SCORE_EDGES) - 1)
    elif change == "a count past 2**64":  # overflows the sum
        metrics[keys.TP] = 2**64 - 1
    elif change == "personal-kept NaN":  # the results take int() of it
        metrics.update({keys.HIST_LEGIT_PERSONAL: [0] * (len(SCORE_EDGES) - 1),
                        keys.HIST_FRAUD_PERSONAL: [0] * (len(SCORE_EDGES) - 1),
                        keys.PERSONAL_KEPT: float("nan")})
    elif change == "epsilon inf":  # metrics.json cannot hold it
        metrics.update({keys.DP_EPSILON: float("inf"), keys.DP_NOISE: 1.0})
    elif change == "a link for a key":  # would reach the report as a live link
        metrics["[fix](https://evil.example)"] = [1.0, 2.0]
    elif change == "histograms beyond its rows":  # would set the pooled curve alone
        metrics[keys.HIST_LEGIT] = [0] * (len(SCORE_EDGES) - 1)
        metrics[keys.HIST_FRAUD] = [2**40] + [0] * (len(SCORE_EDGES) - 2)
    elif change == "counts beyond its rows":
        metrics.update({keys.TP: 2**40, keys.FP: 0, keys.FN: 0, keys.TN: 2**40})
    elif change == "more frauds than rows":
        metrics[keys.N_FRAUD] = 10**6
    elif change == "a metric no bank sends":  # reaches the ledger, under its name
        metrics["note"] = 1.0
    elif change == "a count that is a list":
        metrics[keys.N_TRAIN] = [1, 2]
    elif change == "a count that is NaN":
        metrics[keys.TP] = float("nan")
    return message


@pytest.mark.parametrize("change", [
    "one weight", "three weights", "2-D", "another name", "an extra array", "integers",
    "text", "another serialization", "broken bytes", "no arrays", "a second array record",
    "no metrics", "no bank id", "no num-examples", "a short histogram",
    "no sizes", "half a histogram pair", "a count that is a list", "a count that is NaN",
    "a forged header", "a header of 2**64 x 0", "a header of True x 2", "huge weights", "no vote", "negative counts", "a count past 2**64",
    "personal-kept NaN", "epsilon inf", "a link for a key", "histograms beyond its rows",
    "counts beyond its rows", "more frauds than rows", "a metric no bank sends"])
@pytest.mark.parametrize("strategy_name", ["fedavg", "krum"])
def test_a_train_reply_in_a_form_no_bank_sends_is_refused_and_the_round_goes_on(
    strategy_name: str, change: str,
) -> None:
    """Flower's FedAvg raises on one reply of another form (and the run ends with all
    it computed: one malicious bank could stop the federation), or averages it in (a
    one-element vector is broadcast). The guard refuses it and records why."""
    replies = [reply(bank, w) for bank, w in enumerate(HONEST)] + [crafted(change)]

    strategy, weights, metrics = aggregate(strategy_name, replies)

    honest = (np.mean(HONEST, axis=0) if strategy_name == "fedavg" else HONEST[0])
    np.testing.assert_allclose(weights, honest, rtol=1e-6)
    assert 7 not in metrics[keys.BANK_IDS]
    assert [(r["round"], r["message"]) for r in strategy.refused] == [(1, "train")]
    assert strategy.refused[0]["bank"] == (None if change in ("no metrics", "no bank id")
                                           else 7)
    assert "evil" not in strategy.refused[0]["why"]  # nothing the bank named is quoted
    assert len(strategy.ledger) == 5  # what it sent is still accounted for


def test_a_reply_stating_another_banks_id_is_refused(tmp_path) -> None:
    """A bank sending as another (to have its update or its metrics taken for the
    other's) is refused. In a deployment its node is the bank the operator registered
    it for (the ``bank-nodes`` file ``fedfraud submit --keys`` writes); without
    registrations a bank id that two replies of a round state is refused in both."""
    impostor = np.array([9.0, 9.0], np.float32)
    honest = [reply(bank, w) for bank, w in enumerate(HONEST)]  # nodes 1 to 4

    nodes = tmp_path / "bank-nodes.json"
    nodes.write_text(json.dumps({"1": 0, "2": 1, "3": 2, "4": 3, "8": 7}))
    registered = guarded(bank_nodes=str(nodes))
    arrays, metrics = registered.aggregate_train(1, [
        *honest, reply(1, impostor, node=8), reply(9, impostor, node=9)])
    np.testing.assert_allclose(arrays["w"].numpy(), np.mean(HONEST, axis=0), rtol=1e-6)
    assert list(metrics[keys.BANK_IDS]) == [0, 1, 2, 3]
    assert [(r["bank"], r["why"]) for r in registered.refused] == [
        (7, "it states bank-id 1, but its node is bank 7"),
        (None, "it states bank-id 9; its node is no registered bank's")]
    assert [entry["bank"] for entry in registered.ledger] == [0, 1, 2, 3, 7, None]

    unregistered = guarded()
    _, metrics = unregistered.aggregate_train(1, [*honest, reply(1, impostor, node=8)])
    assert list(metrics[keys.BANK_IDS]) == [0, 2, 3]
    assert [(r["bank"], r["why"]) for r in unregistered.refused] == [
        (None, "2 replies state bank-id 1"), (None, "2 replies state bank-id 1")]
    _, metrics = unregistered.aggregate_train(2, [reply(1, HONEST[1], node=11)])
    assert list(metrics[keys.BANK_IDS]) == [1]  # e.g. bank 1's SuperNode, restarted


@pytest.mark.parametrize("nodes", ['{"1": 0, "2": 0}', '{"x": 0}', '{"1": -1}', '{"1": 1.5}',
                                   '{"1": true}', "[1, 2]", "{}", "not json", None])
def test_a_bank_nodes_file_that_is_not_one_node_per_bank_is_refused(tmp_path,
                                                                     nodes) -> None:
    from server.strategy import registered_banks

    path = tmp_path / "bank-nodes.json"
    if nodes is not None:  # None: no such file
        path.write_text(nodes)
    with pytest.raises(ValueError, match=f"bank-nodes: {path} is not"):
        registered_banks(str(path))
    path.write_text('{"12": 0, "34": 1}')
    assert registered_banks(str(path)) == {12: 0, 34: 1} and registered_banks("") == {}


def test_banks_that_withhold_different_metrics_by_policy_still_aggregate() -> None:
    """A bank's policy decides what it tells (membership audit, its personalized copy,
    histograms once its evaluations are spent): replies with different metric keys.
    Flower's FedAvg raises on those (and Krum keeps the metrics of the one reply it
    picks). The guard sums each histogram over the banks that sent it, naming them,
    and keeps each bank's own metrics as it sent them."""
    hist = [1] * (len(SCORE_EDGES) - 1)
    # Validation counts add up to the bank's validation rows.
    told = {keys.HIST_LEGIT: hist, keys.HIST_FRAUD: hist, keys.N_VAL: 2 * len(hist)}
    audit = {keys.HIST_MEMBER: hist, keys.HIST_NONMEMBER: [2] * len(hist)}
    personal = {keys.HIST_LEGIT_PERSONAL: hist, keys.HIST_FRAUD_PERSONAL: hist,
                keys.PERSONAL_KEPT: 1}

    def evaluate_reply(bank: int, **extra: Any) -> Message:
        message = reply(bank, HONEST[0])
        del message.content[keys.ARRAYS]
        message.content[keys.METRICS].update(told, **extra)
        return message

    for name in ("fedavg", "krum"):
        strategy = guarded(strategy=name)
        metrics = strategy.aggregate_evaluate(10, [
            evaluate_reply(0), evaluate_reply(1, **audit), evaluate_reply(2, **personal)])
        assert strategy.refused == []
        assert metrics[keys.HIST_FRAUD] == [3] * len(hist)
        assert metrics[keys.HIST_MEMBER] == hist  # bank 1's alone
        assert keys.PERSONAL_KEPT not in metrics  # a per-bank list needs every bank
        assert keys.HIST_MEMBER in strategy.final_bank_metrics[1]
        assert strategy.final_bank_metrics[2][keys.PERSONAL_KEPT] == 1

        replies = [reply(0, HONEST[0]), reply(1, HONEST[1]), reply(2, HONEST[2])]
        for told_by in (0, 2):  # bank 1's evaluations are spent
            replies[told_by].content[keys.METRICS].update(told)
        arrays, metrics = strategy.aggregate_train(1, replies)
        assert list(metrics[keys.BANK_IDS]) == [0, 1, 2]
        assert list(metrics[keys.EVALUATED_IDS]) == [0, 2]
        assert metrics[keys.HIST_FRAUD] == [2] * len(hist)
    np.testing.assert_allclose(arrays["w"].numpy(), HONEST[0])  # Krum's pick


def test_a_loss_is_averaged_per_row_over_the_banks_that_sent_it_with_their_rows() -> None:
    from server.evaluation import aggregate_bank_metrics

    replies = [reply(bank, w).content for bank, w in enumerate(HONEST[:2])]
    replies[0][keys.METRICS][keys.TRAIN_LOSS] = 0.25
    replies[1][keys.METRICS].update({keys.TRAIN_LOSS: 0.5, keys.N_TRAIN: 300})
    assert aggregate_bank_metrics(replies, keys.VOTE)[keys.TRAIN_LOSS] == 0.4375
    del replies[1][keys.METRICS][keys.N_TRAIN]
    assert aggregate_bank_metrics(replies, keys.VOTE)[keys.TRAIN_LOSS] == 0.25


def test_one_bank_withholding_its_epsilon_does_not_hide_the_others() -> None:
    """Each DP bank reports the epsilon it has spent; a bank that leaves the pair out
    (a policy may) is listed as not saying, and the others' are still reported."""
    from flwr.serverapp.strategy import Result

    from server.results import privacy_record

    replies = [reply(bank, HONEST[bank]) for bank in range(3)]
    for bank in (0, 2):
        replies[bank].content[keys.METRICS].update({keys.DP_EPSILON: 1.0 + bank,
                                                   keys.DP_NOISE: 0.9})
    _, metrics = guarded().aggregate_train(1, replies)
    assert metrics[keys.DP_EPSILON][::2] == [1.0, 3.0] and np.isnan(metrics[keys.DP_EPSILON][1])

    config = app_config(dp_epsilon=3.0)
    record = privacy_record(config, Result(train_metrics_clientapp={1: metrics}),
                            "deployment")
    assert [(b["bank"], b["epsilon"]) for b in record["banks"]] == [(0, 1.0), (2, 3.0)]
    assert record["max_epsilon_spent"] == 3.0


def secagg_reply(stage: str, bank: int | None = 0, **items: Any) -> RecordDict:
    """A bank's SecAgg+ reply at ``stage`` as Flower's secaggplus_mod builds it, with
    ``items`` in its configs record (a collect-stage reply also carries its fit
    result, stating ``bank``)."""
    import flwr.compat.common.recorddict_compat as compat
    from flwr.app import ConfigRecord
    from flwr.common import Code, FitRes, Parameters, Status
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    content = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(items)})
    if stage == "collect_masked_vectors":
        fit = compat.fitres_to_recorddict(FitRes(
            Status(Code.OK, ""), Parameters([], ""), 1,
            {} if bank is None else {keys.BANK_ID: bank}), True)
        for name, record in fit.items():
            content[name] = record
    return content


def grid_message(node: int, content: RecordDict, sender: int = 0,
                 server_round: int | str = 1) -> Any:
    """What a grid's message (to ``node``) or reply (from ``sender``) shows
    RecordingGrid."""
    from types import SimpleNamespace

    return SimpleNamespace(
        content=content, has_error=lambda: False, has_content=lambda: True,
        metadata=SimpleNamespace(dst_node_id=node, src_node_id=sender,
                                 group_id=str(server_round)))


class AnsweringGrid:
    """A grid whose every node answers its message with ``answer(node)``."""

    def __init__(self, answer: Any, server_round: int | str = 1) -> None:
        self.answer, self.server_round = answer, server_round

    def send_and_receive(self, messages: Any, timeout: float | None = None) -> Any:
        return [grid_message(0, self.answer(m.metadata.dst_node_id),
                             sender=m.metadata.dst_node_id, server_round=self.server_round)
                for m in messages]


def test_a_secagg_reply_in_a_form_its_stage_does_not_have_is_refused() -> None:
    """Flower's SecAgg+ workflow reads each reply unchecked: every form here raised
    inside it, in the other banks, or (many shares) kept the server combining them for
    hours, or (a NaN weight) ended the run in the evaluation. The guard refuses them;
    the honest form of each stage passes."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from flwr.app import ConfigRecord
    from flwr.common import ndarray_to_bytes
    from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage
    from flwr.supercore.primitives.asymmetric import (
        generate_key_pairs, public_key_to_bytes,
    )

    from server.secure import malformed, share_lengths

    size, node = 7, 11

    def pem(key: Any) -> bytes:
        return key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    key, other = (public_key_to_bytes(generate_key_pairs()[1]) for _ in range(2))
    masked = [ndarray_to_bytes(np.array([3])), ndarray_to_bytes(np.zeros(size, np.int64))]
    bomb = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        bomb, {"descr": "<i8", "fortran_order": False, "shape": (2**40,)})
    seed_len, key_len = share_lengths()
    seed, dead = b"\1" * seed_len, b"\2" * key_len
    asked = {
        Stage.SETUP: ConfigRecord({Key.STAGE: Stage.SETUP}),
        Stage.SHARE_KEYS: ConfigRecord({"11": [key, other], "12": [key, other],
                                        "13": [key, other], Key.STAGE: Stage.SHARE_KEYS}),
        Stage.COLLECT_MASKED_VECTORS: ConfigRecord({Key.STAGE: "collect_masked_vectors"}),
        Stage.UNMASK: ConfigRecord({Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: [11, 13],
                                    Key.DEAD_NODE_ID_LIST: [12]}),
    }
    honest = {
        Stage.SETUP: {Key.PUBLIC_KEY_1: key, Key.PUBLIC_KEY_2: other},
        Stage.SHARE_KEYS: {Key.DESTINATION_LIST: [12, 13], Key.CIPHERTEXT_LIST: [b"a", b"b"]},
        Stage.COLLECT_MASKED_VECTORS: {Key.MASKED_PARAMETERS: masked},
        Stage.UNMASK: {Key.NODE_ID_LIST: [11, 13, 12], Key.SHARE_LIST: [seed, seed, dead]},
    }
    crafted = [
        (Stage.SETUP, {Key.PUBLIC_KEY_1: b"not a key", Key.PUBLIC_KEY_2: key}),
        (Stage.SETUP, {Key.PUBLIC_KEY_1: key}),
        (Stage.SETUP, {Key.PUBLIC_KEY_1: key, Key.PUBLIC_KEY_2: key}),  # neighbours raise
        (Stage.SETUP, {Key.PUBLIC_KEY_1: key, Key.PUBLIC_KEY_2: pem(
            rsa.generate_private_key(public_exponent=65537, key_size=1024))}),
        (Stage.SETUP, {Key.PUBLIC_KEY_1: key, Key.PUBLIC_KEY_2: pem(
            ec.generate_private_key(ec.SECP256R1()))}),  # another curve
        (Stage.SHARE_KEYS, {Key.DESTINATION_LIST: [12, 13], Key.CIPHERTEXT_LIST: [b"a"]}),
        (Stage.SHARE_KEYS, {Key.DESTINATION_LIST: [12, True],
                            Key.CIPHERTEXT_LIST: [b"a", b"b"]}),
        (Stage.SHARE_KEYS, {Key.CIPHERTEXT_LIST: [b"a"]}),
        (Stage.SHARE_KEYS, {Key.DESTINATION_LIST: [], Key.CIPHERTEXT_LIST: []}),
        (Stage.SHARE_KEYS, {Key.DESTINATION_LIST: [12, 12], Key.CIPHERTEXT_LIST: [b"a", b"b"]}),
        (Stage.SHARE_KEYS, {Key.DESTINATION_LIST: [12, 13, 14],
                            Key.CIPHERTEXT_LIST: [b"a", b"b", b"c"]}),
        (Stage.COLLECT_MASKED_VECTORS, {Key.MASKED_PARAMETERS: masked[:1]}),
        (Stage.COLLECT_MASKED_VECTORS, {Key.MASKED_PARAMETERS: [
            masked[0], ndarray_to_bytes(np.zeros(size + 1, np.int64))]}),
        (Stage.COLLECT_MASKED_VECTORS, {Key.MASKED_PARAMETERS: [
            masked[0], ndarray_to_bytes(np.zeros(size, np.float64))]}),
        (Stage.COLLECT_MASKED_VECTORS, {Key.MASKED_PARAMETERS: [
            masked[0], bomb.getvalue() + b"\0" * 8]}),
        (Stage.COLLECT_MASKED_VECTORS, {Key.MASKED_PARAMETERS: [masked[0], b"junk"]}),
        (Stage.UNMASK, {Key.NODE_ID_LIST: [11, 99, 12], Key.SHARE_LIST: [seed, seed, dead]}),
        (Stage.UNMASK, {Key.NODE_ID_LIST: [11, 13, 12], Key.SHARE_LIST: [seed, seed]}),
        (Stage.UNMASK, {Key.NODE_ID_LIST: [11, 13, 12], Key.SHARE_LIST: [seed, seed, seed]}),
        (Stage.UNMASK, {Key.NODE_ID_LIST: [11, 13, 12] + [13] * 250,
                        Key.SHARE_LIST: [seed, seed, dead] + [seed] * 250}),  # O(K^2)
        (Stage.UNMASK, {Key.NODE_ID_LIST: [11, 13, 12],
                        Key.SHARE_LIST: [seed + b"\3" * 16, seed, dead]}),
    ]
    for stage, items in honest.items():
        reply = secagg_reply(stage, **items)
        assert malformed(stage, reply, asked[stage], node, size) is None, stage
    for stage, items in crafted:
        reply = secagg_reply(stage, **items)
        assert malformed(stage, reply, asked[stage], node, size), (stage, items)
    for examples in (float("nan"), 2):  # a NaN or heavier vote: a NaN or skewed sum
        reply = secagg_reply(Stage.COLLECT_MASKED_VECTORS,
                             **honest[Stage.COLLECT_MASKED_VECTORS])
        reply["fitres.num_examples"] = MetricRecord({"num_examples": examples})
        assert malformed(Stage.COLLECT_MASKED_VECTORS, reply, asked[
            Stage.COLLECT_MASKED_VECTORS], node, size), examples
    assert malformed(Stage.SETUP, RecordDict(), asked[Stage.SETUP], node, size)
    assert malformed(Stage.SETUP, secagg_reply(Stage.SETUP, **honest[Stage.SETUP]), None,
                     node, size)  # a node the stage did not ask
    # A collect-stage reply without its fit result (Flower's compat layer raised).
    bare = secagg_reply(Stage.SETUP, **honest[Stage.COLLECT_MASKED_VECTORS])
    assert malformed(Stage.COLLECT_MASKED_VECTORS, bare, asked[
        Stage.COLLECT_MASKED_VECTORS], node, size)


def test_two_secagg_replies_with_one_public_key_are_both_refused() -> None:
    """A bank copying another's public key would make its neighbours raise ("Some
    public keys are identical"): both replies go, the other banks' round goes on."""
    from flwr.app import ConfigRecord
    from flwr.common.secure_aggregation.secaggplus_constants import (
        RECORD_KEY_CONFIGS, Key, Stage,
    )
    from flwr.supercore.primitives.asymmetric import (
        generate_key_pairs, public_key_to_bytes,
    )

    from server.secure import RecordingGrid

    keys_of = {node: [public_key_to_bytes(generate_key_pairs()[1]) for _ in range(2)]
               for node in (1, 2, 3)}
    keys_of[3][0] = keys_of[1][0]  # bank 3 copies bank 1's first key

    asked = [grid_message(node, RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(
        {Key.STAGE: Stage.SETUP})})) for node in (1, 2, 3)]
    answering = AnsweringGrid(lambda node: secagg_reply(Stage.SETUP, **{
        Key.PUBLIC_KEY_1: keys_of[node][0], Key.PUBLIC_KEY_2: keys_of[node][1]}))
    grid = RecordingGrid(answering, model_size=7,  # type: ignore[arg-type]
                         guard=make_strategy(app_config()))
    kept = grid.send_and_receive(asked)
    assert [reply.metadata.src_node_id for reply in kept] == [2]
    assert [(node, why) for _, node, _, why in grid.refused] == [
        (1, "another bank's reply holds the same public key"),
        (3, "another bank's reply holds the same public key")]


@pytest.mark.parametrize("registered", [True, False])
def test_a_secagg_fit_result_in_another_bank_s_name_is_refused(
        tmp_path: Path, registered: bool) -> None:
    """The round's metrics list the banks whose masked vectors were summed, by the bank
    id each fit result states: a bank stating another's id, or none, is refused as in
    the plain run, and the round goes on without it (SecAgg+ unmasks around it). With
    registrations the id must be the node's bank; without, one no other reply states."""
    from flwr.app import ConfigRecord
    from flwr.common import ndarray_to_bytes
    from flwr.common.secure_aggregation.secaggplus_constants import (
        RECORD_KEY_CONFIGS, Key, Stage,
    )

    from server.secure import RecordingGrid

    nodes = {11: 1, 12: 2, 13: 3, 14: 4}  # node id -> its bank
    stated = {11: 1, 12: 1, 13: 3, 14: None}  # node 12 states bank 1; node 14 none
    masked = [ndarray_to_bytes(np.array([3])), ndarray_to_bytes(np.zeros(7, np.int64))]

    answering = AnsweringGrid(lambda node: secagg_reply(
        Stage.COLLECT_MASKED_VECTORS, bank=stated[node], **{Key.MASKED_PARAMETERS: masked}),
        server_round="x")  # a reply's group id is the bank's to set: not read

    bank_nodes = tmp_path / "bank-nodes.json"
    bank_nodes.write_text(json.dumps({str(node): bank for node, bank in nodes.items()}))
    guard = make_strategy(app_config(bank_nodes=str(bank_nodes) if registered else ""))
    grid = RecordingGrid(answering, model_size=7, guard=guard)  # type: ignore[arg-type]
    kept = grid.send_and_receive([grid_message(node, RecordDict({
        RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: Stage.COLLECT_MASKED_VECTORS})}),
        server_round=2) for node in nodes])
    refused = {node: why for _, node, _, why in grid.refused}
    assert {server_round for server_round, *_ in grid.refused} == {2}  # Flower's round
    assert refused[14] == "its fit result states no bank-id"
    ledger = grid.ledger()
    assert len(ledger) == 4  # every reply, refused or not
    if registered:  # node 11 is bank 1: only node 12 lies
        assert [reply.metadata.src_node_id for reply in kept] == [11, 13]
        assert refused[12] == "it states bank-id 1, but its node is bank 2"
        assert [entry["bank"] for entry in ledger] == [1, 2, 3, 4]  # the registered
    else:  # two replies state bank 1: neither is taken for bank 1's
        assert [reply.metadata.src_node_id for reply in kept] == [13]
        assert refused[11] == refused[12] == "2 replies state bank-id 1"
        assert grid.banks == {(2, 13): 3}
        assert [entry["bank"] for entry in ledger] == [None, None, 3, None]


def test_without_registrations_a_secagg_reply_is_named_by_what_its_node_states() -> None:
    """A SecAgg+ reply states no bank but at the collect stage: a node's replies of a
    round are its kept fit result's bank, else the one bank its other rounds' kept fit
    results agree on; a node stating two banks is named by neither elsewhere."""
    from server.secure import RecordingGrid

    grid = RecordingGrid(None, model_size=7,  # type: ignore[arg-type]
                         guard=make_strategy(app_config()))
    grid.banks = {(2, 11): 1, (3, 11): 1, (2, 12): 3, (3, 12): 2}
    assert grid.bank(2, 11) == grid.bank(1, 11) == 1  # refused in round 1, bank 1 later
    assert (grid.bank(2, 12), grid.bank(3, 12), grid.bank(1, 12)) == (3, 2, None)
    assert grid.bank(1, 13) is None  # never kept


def test_a_secure_round_that_raises_or_sums_to_no_model_ends_without_an_update(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.app import ConfigRecord, Context
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg as LegacyFedAvg
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key as WorkflowKey

    from flwr.server.workflow import SecAggPlusWorkflow

    from server.secure import CheckedFedAvg, GuardedSecAggPlus

    context = LegacyContext(
        context=Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                        run_config={}),
        config=ServerConfig(num_rounds=1), strategy=LegacyFedAvg())
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: 2})
    failed: list[tuple[int, str]] = []
    workflow = GuardedSecAggPlus(failed, num_shares=3, reconstruction_threshold=2)

    def combine_fails(*_: Any) -> bool:
        raise ValueError("Padding is incorrect.")  # what a wrong share ends in

    monkeypatch.setattr(workflow, "setup_stage", combine_fails)
    workflow(None, context)  # type: ignore[arg-type]  # logged, not raised
    assert failed == [(2, "unmasking the sum failed (ValueError)")]

    # Whole rounds, each stage as Flower's workflow calls it: one that sums changes
    # nothing here; one whose unmasking raises is recorded once; one a stage halts
    # (fewer banks than the threshold left, refused or dropped out: Flower logs
    # "Secure aggregation halted" and skips the round) is recorded too, once.
    configs = context.state.config_records[MAIN_CONFIGS_RECORD]
    for stage in ("setup_stage", "share_keys_stage", "collect_masked_vectors_stage"):
        monkeypatch.setattr(workflow, stage, lambda *_: True)
    for round_, unmask, expected in (
            (4, lambda *_: True, []),
            (5, combine_fails, [(5, "unmasking the sum failed (ValueError)")]),
            (6, lambda *_: False, [(6, "too few banks were left to unmask the sum")])):
        configs[WorkflowKey.CURRENT_ROUND] = round_
        monkeypatch.setattr(SecAggPlusWorkflow, "unmask_stage", unmask)
        workflow(None, context)  # type: ignore[arg-type]
        assert failed[1:] == expected, round_
        del failed[1:]
    monkeypatch.setattr(SecAggPlusWorkflow, "unmask_stage", lambda *_: True)
    workflow(None, context)  # type: ignore[arg-type]  # round 6 again, summed this time
    monkeypatch.setattr(workflow, "setup_stage", lambda *_: False)  # the next, halted
    configs[WorkflowKey.CURRENT_ROUND] = 7
    workflow(None, context)  # type: ignore[arg-type]
    assert failed[1:] == [(7, "too few banks were left to unmask the sum")]
    failed.pop()
    configs[WorkflowKey.CURRENT_ROUND] = 2

    def seed_of_33_bytes(*_: Any) -> bool:  # Flower's pseudo_rand_gen asserts
        raise AssertionError

    monkeypatch.setattr(SecAggPlusWorkflow, "unmask_stage", seed_of_33_bytes)
    assert workflow.unmask_stage(None, context, None) is False  # type: ignore[arg-type]
    assert failed[-1] == (2, "unmasking the sum failed (AssertionError)")
    failed.pop()

    def broken(*_: Any) -> bool:
        raise RuntimeError("the grid is gone")  # not a bank's doing: the run ends

    monkeypatch.setattr(workflow, "setup_stage", broken)
    with pytest.raises(RuntimeError):
        workflow(None, context)  # type: ignore[arg-type]

    strategy = CheckedFedAvg(failed)
    for weights, kept in ((np.full(3, 0.5), True), (np.full(3, np.nan), False),
                          (np.full(3, 1e9), False)):
        result = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([weights]), 1, {})
        parameters, _ = strategy.aggregate_fit(3, [(None, result)], [])
        assert (parameters is not None) is kept, weights
    assert failed[1:] == [(3, "the unmasked sum is no model's")] * 2
