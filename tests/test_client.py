"""The bank's handlers called in-process with real Flower messages."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import Metadata

from client.app import app
from common import keys
from common.config import Config
from common.data import BankDataError, bank_file, load_transactions, split_bank, standardize
from common.metrics import SCORE_EDGES, PooledCurve
from common.model import FraudNet, ModelSpec, packed, unpacked
from tests.conftest import app_config


def message(kind: str, content: RecordDict) -> Message:
    metadata = Metadata(
        run_id=1, message_id="m1", src_node_id=0, dst_node_id=5, reply_to_message_id="",
        group_id="1", created_at=time.time(), ttl=600.0, message_type=kind,
    )
    return Message(content=content, metadata=metadata)


def bank_context(config: Config, bank: int = 5) -> Context:
    return Context(run_id=1, node_id=5, node_config={"partition-id": bank},
                   state=RecordDict(), run_config=config.as_run_config())


def global_arrays() -> ArrayRecord:
    """The model as the server sends it: one vector of weights."""
    torch.manual_seed(0)
    return ArrayRecord({keys.WEIGHTS: Array(packed(
        FraudNet(ModelSpec(in_features=30)).state_dict()))})


def evaluate_message(server_round: int = 1) -> Message:
    return message("evaluate", RecordDict({
        keys.ARRAYS: global_arrays(),
        keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: server_round})}))


def train_message() -> Message:
    settings = ConfigRecord({keys.SERVER_ROUND: 1, keys.EVALUATE_INCOMING: True})
    return message("train", RecordDict({keys.ARRAYS: global_arrays(), keys.CONFIG: settings}))


def test_the_model_travels_as_one_vector_of_weights_and_unpacks_to_the_same_model() -> None:
    """Flower sends each Array of a message as objects of their own, each by its own
    call at every hop: the model as one vector keeps a message at 7 objects, not 17."""
    state = FraudNet(ModelSpec(in_features=30)).state_dict()
    back = unpacked(packed(state), FraudNet(ModelSpec(in_features=30)))
    assert list(back) == list(state)
    assert all(torch.equal(back[name], tensor) for name, tensor in state.items())

    def objects(node) -> int:
        return 1 + sum(objects(child) for child in (node.children or {}).values())

    content = RecordDict({keys.ARRAYS: global_arrays(),
                          keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: 1})})
    assert objects(content) == 5  # RecordDict, ArrayRecord, Array, its chunk, ConfigRecord


def test_train_replies_weights_and_sample_count_but_not_the_scaler(prepared) -> None:
    context = bank_context(prepared)

    reply = app(train_message(), context)

    metrics = reply.content[keys.METRICS]
    x, y, _ = load_transactions(Path(prepared.data_dir) / bank_file(5), "Class", "bank 5")
    split = split_bank(x, y, prepared.val_fraction, prepared.seed + 5)
    assert metrics[keys.NUM_EXAMPLES] == len(split.y_train)  # samples, not batches
    assert metrics[keys.N_FRAUD] == int(y.sum()) and metrics[keys.BANK_ID] == 5
    # Only the model's weights travel; they changed; the scaler stays in the state.
    arrays = reply.content[keys.ARRAYS]
    assert list(arrays.keys()) == [keys.WEIGHTS]
    assert arrays[keys.WEIGHTS].shape == global_arrays()[keys.WEIGHTS].shape
    assert not np.allclose(arrays[keys.WEIGHTS].numpy(), global_arrays()[keys.WEIGHTS].numpy())
    assert list(reply.content.keys()) == [keys.ARRAYS, keys.METRICS]
    mean, scale = context.state[keys.SCALER].to_numpy_ndarrays()
    np.testing.assert_allclose(mean, split.x_train.mean(axis=0), rtol=1e-5, atol=1e-5)
    assert not any(a.shape == mean.shape for a in arrays.to_numpy_ndarrays())


def test_scaler_is_fitted_once_and_reused(prepared) -> None:
    context = bank_context(prepared)
    app(train_message(), context)
    marker = ArrayRecord([np.zeros(30), np.ones(30)])  # identity scaler
    context.state[keys.SCALER] = marker

    app(train_message(), context)

    assert context.state[keys.SCALER] is marker


def test_evaluate_replies_counts_and_histograms_only(prepared) -> None:
    reply = app(evaluate_message(), bank_context(prepared, bank=2))

    metrics = reply.content[keys.METRICS]
    n_val = metrics[keys.NUM_EXAMPLES]
    assert sum(int(metrics[k]) for k in keys.COUNT_KEYS) == n_val
    assert sum(metrics[keys.HIST_LEGIT]) + sum(metrics[keys.HIST_FRAUD]) == n_val
    assert len(metrics[keys.HIST_LEGIT]) == len(SCORE_EDGES) - 1
    assert metrics[keys.LOSS] > 0
    assert list(reply.content.keys()) == [keys.METRICS]  # no arrays, no scores


def final_evaluate(config: Config, state: Path, bank: int = 5) -> RecordDict:
    context = Context(run_id=1, node_id=5, node_config={"partition-id": bank,
                                                        "state": str(state)},
                      state=RecordDict(), run_config=config.as_run_config())
    return app(evaluate_message(server_round=10), context).content[keys.METRICS]


def test_a_bank_personalizes_the_final_model_and_keeps_the_better_one_for_scoring(
        prepared, tmp_path: Path) -> None:
    from client.score import Scorer

    metrics = final_evaluate(prepared, tmp_path)

    personal = (metrics[keys.HIST_LEGIT_PERSONAL], metrics[keys.HIST_FRAUD_PERSONAL])
    assert sum(map(sum, personal)) == metrics[keys.N_VAL]
    # An untrained global model against itself fine-tuned on the bank's rows: kept.
    assert metrics[keys.PERSONAL_KEPT] == 1
    assert (PooledCurve.from_histograms(*personal).average_precision()
            > PooledCurve.from_histograms(metrics[keys.HIST_LEGIT],
                                          metrics[keys.HIST_FRAUD]).average_precision())
    # ... and saved in the bank's own state folder, in the form `score` takes.
    kept = tmp_path / "models" / "latest"
    scorer = Scorer.load(kept, kept / "scaler.json")
    assert scorer.threshold != 0.5  # bank 5 has 50 validation frauds: its own threshold
    x, y, _ = load_transactions(Path(prepared.data_dir) / bank_file(5), "Class", "bank 5")
    split = split_bank(x, y, prepared.val_fraction, prepared.seed + 5)
    p = scorer.probabilities(split.x_val).astype(np.float64)
    rescored = PooledCurve.from_scores(split.y_val, np.log(p) - np.log1p(-p))
    assert rescored.average_precision() == pytest.approx(
        PooledCurve.from_histograms(*personal).average_precision(), abs=2e-3)
    assert scorer.version == "1-bank5"
    # A second evaluate request in the same run (a server sending another model) keeps
    # nothing new: the bank's kept model for the run stays as it was.
    card = (kept / "model_card.json").read_bytes()
    assert keys.PERSONAL_KEPT not in final_evaluate(prepared, tmp_path)
    assert (kept / "model_card.json").read_bytes() == card


def test_under_logit_adjustment_a_bank_trains_without_its_own_fraud_rate(
        prepared, tmp_path: Path) -> None:
    """With its fraud log-odds added in the loss, the bank's model no longer learns
    how rare fraud is at the bank: its logits sit well above a plain model's."""
    from dataclasses import replace

    from client.bank import Bank
    from common.task import score

    bank = Bank(5, Path(prepared.data_dir) / bank_file(5), prepared, state_dir=tmp_path)
    mean_logit = {}
    for adjusted in (False, True):
        config = replace(prepared, logit_adjustment=adjusted)
        sent = {keys.WEIGHTS: global_arrays()[keys.WEIGHTS].numpy()}
        trained, _ = bank.train(sent, config, server_round=1,
                                evaluate_incoming=False)
        model = FraudNet(bank.spec(config))
        model.load_state_dict(unpacked(trained[keys.WEIGHTS], model))
        mean_logit[adjusted] = float(np.median(score(model, bank.x_train)))

    assert mean_logit[True] > mean_logit[False] + 1.0, mean_logit


def test_a_crafted_final_model_with_nan_weights_is_not_kept(prepared,
                                                            tmp_path: Path) -> None:
    from client.bank import Bank

    bank = Bank(5, Path(prepared.data_dir) / bank_file(5), prepared, state_dir=tmp_path)
    arrays = {keys.WEIGHTS: global_arrays()[keys.WEIGHTS].numpy().copy()}
    arrays[keys.WEIGHTS][0] = np.nan
    with pytest.raises(BankDataError, match="non-finite"):
        bank.keep_final(arrays, prepared, "1")
    assert not (tmp_path / "models").exists()


def test_a_crafted_model_with_nan_or_inf_weights_is_neither_trained_nor_evaluated(
        prepared, tmp_path: Path) -> None:
    """A malicious server's model mid-run: refused before it touches a row."""
    from client.bank import Bank

    bank = Bank(5, Path(prepared.data_dir) / bank_file(5), prepared, state_dir=tmp_path)
    # 1e300: finite in float64, inf in float32; 1e20: finite, and NaN scores
    for value in (np.nan, np.inf, 1e300, 1e20):
        arrays = {keys.WEIGHTS: global_arrays()[keys.WEIGHTS].numpy().astype(np.float64)}
        arrays[keys.WEIGHTS][-1] = value
        with pytest.raises(BankDataError, match="non-finite"):
            bank.train(arrays, prepared, server_round=2, evaluate_incoming=False)
        with pytest.raises(BankDataError, match="non-finite"):
            bank.evaluate(arrays, prepared)


def test_a_crafted_model_of_another_shape_or_type_is_refused_with_a_clear_error(
        prepared, tmp_path: Path) -> None:
    """A malicious server's model that is not the bank's architecture (more or fewer
    weights, another shape, other or more arrays) or not float32 or float64 numbers: a
    one-line data error naming the bank, before any row is touched."""
    from client.bank import Bank

    bank = Bank(5, Path(prepared.data_dir) / bank_file(5), prepared, state_dir=tmp_path)
    weights = global_arrays()[keys.WEIGHTS].numpy()
    more = {keys.WEIGHTS: np.zeros(weights.size + 30, np.float32)}
    fewer = {keys.WEIGHTS: weights[:-1]}
    square = {keys.WEIGHTS: np.zeros((1, weights.size), np.float32)}
    named = {"net.0.weight": np.zeros((64, 30), np.float32)}
    extra = {keys.WEIGHTS: weights, "net.9.weight": np.zeros((1, 1), np.float32)}
    text = {keys.WEIGHTS: np.array(["1"] * weights.size)}
    long_double = {keys.WEIGHTS: weights.astype(np.longdouble)}
    for arrays, why in ((more, f"{weights.size + 30} weights .* model of {weights.size}"),
                        (fewer, f"{weights.size - 1} weights .* model of {weights.size}"),
                        (square, rf"shape \(1, {weights.size}\)"),
                        (named, r"arrays \['net.0.weight'\], not the one 'weights'"),
                        (extra, r"arrays \['net.9.weight', 'weights'\]"),
                        (text, "not float32 or float64"),
                        (long_double, "not float32 or float64")):
        for use in (lambda: bank.train(arrays, prepared, server_round=2,
                                       evaluate_incoming=False),
                    lambda: bank.evaluate(arrays, prepared),
                    lambda: bank.keep_final(arrays, prepared, "1")):
            with pytest.raises(BankDataError, match=f"^bank 5: .*{why}"):
                use()
    assert not (tmp_path / "models").exists()



@pytest.mark.parametrize("model", ["none", "another serialization", "broken bytes",
                                   "a forged header", "a header of 2**64 x 0"])
@pytest.mark.parametrize("make", [train_message, evaluate_message])
def test_a_message_without_a_loadable_model_is_a_one_line_data_error(
    prepared, tmp_path: Path, caplog: pytest.LogCaptureFixture, make, model: str,
) -> None:
    """A server's message with no model, or with an array numpy cannot load: the
    bank's log says so in one line naming the bank (no traceback), the server hears
    "data error", and no row is read."""
    from client.app import BankRefused

    message = make()
    if model == "none":
        del message.content[keys.ARRAYS]
    elif model.startswith("a "):  # np.load would allocate 2**45 floats, or raise
        from tests.test_strategy import forged

        data = forged() if model == "a forged header" else forged(
            "(18446744073709551616, 0)", values=0)
        message.content[keys.ARRAYS] = ArrayRecord({keys.WEIGHTS: Array(
            dtype="float32", shape=(3,), stype="numpy.ndarray", data=data)})
    else:
        stype, data = (("torch", b"xx") if model == "another serialization"
                       else ("numpy.ndarray", b"\x93NUMPY garbage"))
        message.content[keys.ARRAYS] = ArrayRecord({keys.WEIGHTS: Array(
            dtype="float32", shape=(3,), stype=stype, data=data)})
    shard = tmp_path / "transactions.csv"  # not even a file: no row may be read first
    with pytest.raises(BankRefused, match="^bank 5: data error, see the bank's log$"):
        app(message, deployed_context(prepared, tmp_path, shard))
    errors = [record for record in caplog.records if record.levelname == "ERROR"]
    assert [record.getMessage().split(": ")[:2] for record in errors] == [
        ["bank 5", "data error"]]
    assert "the server" in errors[0].getMessage() and errors[0].exc_info is None

@pytest.mark.parametrize("change", ["no settings", "no round", "round 0", "round 2**64",
                                    "a text round", "another proximal-mu"])
def test_a_train_message_with_settings_no_run_sends_is_a_one_line_data_error(
    prepared, tmp_path: Path, caplog: pytest.LogCaptureFixture, change: str,
) -> None:
    """A server's message settings outside the run (a round it does not have, which
    also seeds the bank's shuffling; FedProx's mu other than the run config's, also
    under DP where the run config forbids it) are refused in one line, before a row."""
    from client.app import BankRefused

    message = train_message()
    settings = message.content[keys.CONFIG]
    if change == "no settings":
        del message.content[keys.CONFIG]
    elif change == "no round":
        del settings[keys.SERVER_ROUND]
    else:
        settings.update({"round 0": {keys.SERVER_ROUND: 0},
                         "round 2**64": {keys.SERVER_ROUND: 2**64 - 1},
                         "a text round": {keys.SERVER_ROUND: "1"},
                         "another proximal-mu": {keys.PROXIMAL_MU: float("nan")}}[change])
    with pytest.raises(BankRefused, match="^bank 5: data error, see the bank's log$"):
        app(message, deployed_context(prepared, tmp_path, tmp_path / "not-read.csv"))
    errors = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert len(errors) == 1 and "the server's message" in errors[0]


def test_a_deployed_bank_trains_at_most_the_run_s_rounds(prepared, tmp_path: Path) -> None:
    """A server may send any number of train messages in one run; without DP nothing
    was counted. The bank's ledger counts every run's rounds."""
    from client.app import BankRefused

    config = Config.from_run_config({**prepared.as_run_config(), "num-server-rounds": 2})
    context = deployed_context(config, tmp_path, Path(prepared.data_dir) / bank_file(5))
    for _ in range(2):
        assert app(train_message(), context).content[keys.METRICS][keys.BANK_ID] == 5
    with pytest.raises(BankRefused, match="^bank 5: this run's rounds are trained$"):
        app(train_message(), context)

def test_without_personalization_a_bank_keeps_the_federated_model(
        prepared, tmp_path: Path) -> None:
    from client.score import Scorer

    for config in (app_config(data_dir=prepared.data_dir, personalize_epochs=0),
                   app_config(data_dir=prepared.data_dir, dp_epsilon=3.0)):
        state = tmp_path / f"dp-{config.differential_privacy}"
        state.mkdir()
        metrics = final_evaluate(config, state)
        assert keys.PERSONAL_KEPT not in metrics
        assert keys.HIST_LEGIT_PERSONAL not in metrics
        scorer = Scorer.load(state / "models" / "latest", state / "models" / "latest" /
                             "scaler.json")
        assert scorer.card["kept"] == "federated" and scorer.version == "1"
        # It is the model the server sent: the same scores as the reported histograms.
        p = scorer.probabilities(scorer_rows(prepared)).astype(np.float64)
        torch.manual_seed(0)
        spec = ModelSpec(30, activation=config.model_activation)  # tanh under DP
        expected = torch.sigmoid(FraudNet(spec).eval()(torch.from_numpy(
            standardize(scorer_rows(prepared), scorer.mean, scorer.scale))))
        np.testing.assert_allclose(p, expected.detach().numpy(), atol=1e-6)


def scorer_rows(config: Config) -> np.ndarray:
    x, _, _ = load_transactions(Path(config.data_dir) / bank_file(5), "Class", "bank 5")
    return x[:50]


def test_missing_shard_error_names_bank_and_file(prepared, tmp_path: Path) -> None:
    config = Config.from_run_config({**prepared.as_run_config(), "data-dir": str(tmp_path)})
    with pytest.raises(BankDataError, match=f"bank 5: .*{bank_file(5)}: file not found"):
        app(train_message(), bank_context(config))


def deployed_context(config: Config, bank_dir: Path, shard: Path, bank: int = 5,
                     policy: str = "") -> Context:
    """A bank as ``fedfraud-bank run`` configures its SuperNode: its own files."""
    (bank_dir / "policy.toml").write_text(policy)
    return Context(run_id=1, node_id=5, node_config={
        "bank-id": bank, "shard": str(shard), "state": str(bank_dir),
        "policy": str(bank_dir / "policy.toml")}, state=RecordDict(),
        run_config=config.as_run_config())


@pytest.mark.parametrize("overrides, policy, reason", [
    ({"attack": "scale", "attackers": "5"}, "", "attack settings are for simulations"),
    ({"attackers": "1"}, "", "attack settings are for simulations"),
    ({"dp-epsilon": 20.0}, "", "dp-epsilon 20.0 > max-epsilon-per-run 8.0"),
    ({}, "require-dp = true", "requires differential privacy"),
    ({"val-fraction": 0.99}, "", "val-fraction 0.99 outside [0.05, 0.3]"),
    ({"num-server-rounds": 500}, "", "num-server-rounds 500 > max-rounds 50"),
    ({"dp-epsilon": 1.0, "dp-delta": 0.01}, "", "dp-delta 0.01 > max-delta"),
    ({}, "require-secure-aggregation = true", "requires secure aggregation"),
])
def test_a_deployed_bank_refuses_a_run_its_policy_does_not_allow(
    prepared, tmp_path: Path, overrides: dict, policy: str, reason: str,
) -> None:
    from client.app import BankRefused

    config = Config.from_run_config({**prepared.as_run_config(), **overrides})
    shard = tmp_path / "never-read.csv"  # refused before any row is read
    context = deployed_context(config, tmp_path, shard, policy=policy)

    with pytest.raises(BankRefused, match=f"bank 5 refuses this run: .*{re.escape(reason)}"):
        app(train_message(), context)
    assert not shard.exists() and not (tmp_path / "scaler.json").exists()


@pytest.mark.parametrize("make", [train_message, evaluate_message])
@pytest.mark.parametrize("overrides", [{"batch-size": 1, "local-epochs": 100},
                                       {"batch-size": 1, "personalize-epochs": 100}])
def test_a_deployed_bank_refuses_rounds_longer_than_its_policy_allows(
    prepared, tmp_path: Path, make, overrides: dict, caplog: pytest.LogCaptureFixture,
) -> None:
    """A server's run config that would hold the bank's CPU for hours (batch-size 1,
    100 epochs: ~100 x the bank's rows in steps, a round or the final fine-tuning) is
    refused before any step, naming the settings and the policy's bound."""
    from client.app import BankRefused

    config = Config.from_run_config({**prepared.as_run_config(), **overrides})
    shard = Path(prepared.data_dir) / bank_file(5)
    context = deployed_context(config, tmp_path, shard)
    started = time.process_time()
    with caplog.at_level("ERROR"), pytest.raises(BankRefused) as refused:
        app(make(), context)
    assert time.process_time() - started < 10  # refused, not trained
    assert not (tmp_path / "models").exists()
    # The server learns the reason but not the number: with batch-size 1 it is the
    # bank's rows times the epochs. The bank's log has it.
    assert str(refused.value) == (
        "bank 5 refuses this run: more training steps a round (local-epochs, "
        "personalize-epochs, batch-size) than its max-steps-per-round")
    assert re.search(r"the run asks for \d+ training steps a round .* max-steps-per-round "
                     r"20000$", caplog.records[-1].getMessage())


def legacy_train_message() -> Message:
    """A train message in the legacy FitIns shape SecAgg+ uses, but without SecAgg+."""
    import flwr.compat.common.recorddict_compat as compat
    from flwr.common import FitIns, ndarrays_to_parameters

    weights = global_arrays()[keys.WEIGHTS].numpy()
    fitins = FitIns(ndarrays_to_parameters([weights]), {keys.SERVER_ROUND: 1})
    return message("train", compat.fitins_to_recorddict(fitins, keep_input=True))


def secagg_shaped_message(kind: str) -> Message:
    """A legacy train message with SecAgg+'s config record at its masking stage, of
    message type ``kind``: Flower's ``secaggplus_mod`` masks only type "train"."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    content = legacy_train_message().content
    content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(
        {"stage": "collect_masked_vectors"})
    return message(kind, content)


@pytest.mark.parametrize("kind, make", [
    ("train", train_message), ("train", legacy_train_message),
    ("evaluate", evaluate_message),
    # Flower hands "train.default" to the train handler, but its SecAgg+ mod passes it
    # through unmasked: a bank that took SecAgg+'s record at its word sent its weights.
    pytest.param("train", lambda: secagg_shaped_message("train.default"),
                 id="train-secagg-shaped-train.default"),
])
@pytest.mark.parametrize("policy", ["", "require-secure-aggregation = true"])
def test_in_a_secure_aggregation_run_a_bank_answers_nothing_outside_secagg(
    prepared, tmp_path: Path, kind: str, make: Callable[[], Message], policy: str,
) -> None:
    """A malicious server runs a secure-aggregation run (the bank's policy may require
    one) but sends plain train messages, a legacy one without SecAgg+'s stages, or an
    evaluate message: each would bring the bank's weights or validation histograms
    back in the clear. The bank refuses them before it reads a row."""
    from client.app import BankRefused

    config = Config.from_run_config({**prepared.as_run_config(),
                                     "secure-aggregation": True,
                                     "server-test-set": "always"})
    context = deployed_context(config, tmp_path, tmp_path / "no-such-file.csv",
                               policy=policy)
    with pytest.raises(BankRefused, match=f"^bank 5: this run is secure-aggregated; a "
                                          f"{kind} message outside SecAgg\\+ is refused$"):
        app(make(), context)


@pytest.mark.parametrize("dead", [[5], []])
def test_secagg_s_unmask_stage_never_hands_the_server_both_masks_of_a_node(
    prepared, tmp_path: Path, dead: list[int],
) -> None:
    """A malicious server runs SecAgg+'s stages with the bank (its policy requires
    secure aggregation), then asks at unmask for the shares of both its masks: listed
    as active (the private mask's seed) and as dropped (its pairwise key). With a
    threshold of 1 those shares are the masks: the bank's weights in the clear (a
    review recovered all of them). The bank refuses; asked honestly, it answers."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    from client.app import BankRefused

    config = Config.from_run_config({**prepared.as_run_config(), "secure-aggregation": True,
                                     "server-test-set": "always"})
    context = deployed_context(config, tmp_path, Path(prepared.data_dir) / bank_file(5),
                               policy="require-secure-aggregation = true")

    def stage(settings: dict, content: RecordDict | None = None) -> ConfigRecord:
        content = content or RecordDict()
        content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(settings)
        return app(message("train", content), context).content.config_records[
            RECORD_KEY_CONFIGS]

    keys_ = stage({"stage": "setup", "sample_num": 1, "share_num": 1, "threshold": 1,
                   "clipping_range": 8.0, "target_range": 2**22, "mod_range": 2**32,
                   "max_weight": 1.0})
    stage({"stage": "share_keys", "5": [keys_["pk1"], keys_["pk2"]]})
    masked = stage({"stage": "collect_masked_vectors", "ctxts": [], "srcs": []},
                   legacy_train_message().content)
    assert masked["masked_params"]  # the bank trained and sent its masked vector

    unmask = {"stage": "unmask", "active_nids": [5], "dead_nids": dead}
    if dead:
        with pytest.raises(BankRefused, match="^bank 5: SecAgg\\+'s unmask stage lists a "
                                              "node both as active and as dropped"):
            stage(unmask)
    else:
        assert list(stage(unmask)["nids"]) == [5]


def test_a_deployed_bank_trains_when_its_policy_allows_the_run(prepared, tmp_path) -> None:
    shard = Path(prepared.data_dir) / bank_file(5)
    reply = app(train_message(), deployed_context(prepared, tmp_path, shard))
    assert reply.content[keys.METRICS][keys.BANK_ID] == 5
    assert (tmp_path / "scaler.json").exists()  # kept in the bank's own state folder


def test_a_deployed_bank_keeps_the_membership_audit_unless_its_policy_opts_in(
    prepared, tmp_path: Path,
) -> None:
    shard, evaluate = Path(prepared.data_dir) / bank_file(5), evaluate_message()

    default = app(evaluate, deployed_context(prepared, tmp_path, shard))
    opted_in = app(evaluate, deployed_context(prepared, tmp_path, shard,
                                              policy="membership-audit = true"))

    assert keys.HIST_MEMBER not in default.content[keys.METRICS]
    assert keys.HIST_MEMBER in opted_in.content[keys.METRICS]


def test_a_deployed_bank_keeps_what_it_says_of_its_personalized_copy_if_its_policy_says_so(
    prepared, tmp_path: Path,
) -> None:
    shard, evaluate = Path(prepared.data_dir) / bank_file(5), evaluate_message()

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    told = app(evaluate, deployed_context(prepared, tmp_path / "a", shard))
    kept = app(evaluate, deployed_context(prepared, tmp_path / "b", shard,
                                          policy="personalization-report = false"))

    assert set(keys.PERSONAL_KEYS) <= set(told.content[keys.METRICS])
    assert not set(keys.PERSONAL_KEYS) & set(kept.content[keys.METRICS])
    assert keys.HIST_FRAUD in kept.content[keys.METRICS]  # the federated model's, as ever
    # The bank still fine-tuned and kept the better copy for its own scoring.
    card = json.loads((tmp_path / "b" / "models" / "latest" / "model_card.json").read_text())
    assert card["kept"] == "personalized"


def test_a_deployed_banks_data_error_reaches_the_server_as_a_category_only(
    prepared, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    from client.app import BankRefused

    shard = tmp_path / "transactions.csv"
    shard.write_text("f00,secret_column,Class\n1.5,ACCT-991-PIN-4411,1\n2.5,7,0\n")

    with pytest.raises(BankRefused) as refused:
        app(train_message(), deployed_context(prepared, tmp_path, shard))

    # What Flower sends the server is the exception's type and text: nothing of the file.
    sent = str(type(refused.value)) + str(refused.value)
    assert "bank 5: data error, see the bank's log" in sent
    for secret in ("secret_column", "ACCT-991", "f00", str(shard), "Class"):
        assert secret not in sent
    assert "secret_column" in caplog.text  # the details stay in the bank's own log


def test_a_deployed_bank_s_dp_noise_is_secret_and_a_simulated_bank_s_reproducible(
    prepared, tmp_path: Path,
) -> None:
    config = Config.from_run_config({**prepared.as_run_config(), "dp-epsilon": 3.0})
    shard = Path(prepared.data_dir) / bank_file(5)

    def weights(context: Context) -> np.ndarray:
        return app(train_message(), context).content[keys.ARRAYS][keys.WEIGHTS].numpy()

    deployed = [weights(deployed_context(config, tmp_path, shard)) for _ in range(2)]
    simulated = [weights(bank_context(config)) for _ in range(2)]

    # The same run config twice: a deployed bank's noise differs (the server cannot
    # replay or cancel it); a simulation reproduces bit for bit.
    assert np.abs(deployed[0] - deployed[1]).max() > 1e-3
    np.testing.assert_array_equal(simulated[0], simulated[1])


def test_a_bank_training_with_dp_keeps_its_training_loss(prepared, tmp_path: Path) -> None:
    """The training loss is computed on the rows DP-SGD protects, without noise: with
    a learning rate of 0 and one batch, it would hand the server those rows' losses
    outside the epsilon the bank counts. Under DP it does not leave the bank."""
    dp = Config.from_run_config({**prepared.as_run_config(), "dp-epsilon": 3.0})
    shard = Path(prepared.data_dir) / bank_file(5)

    for config, context in ((dp, deployed_context(dp, tmp_path, shard)),
                            (dp, bank_context(dp)), (prepared, bank_context(prepared))):
        sent = app(train_message(), context).content[keys.METRICS]
        assert (keys.TRAIN_LOSS in sent) == (not config.differential_privacy)


def dp_train_message(server_round: int) -> Message:
    settings = ConfigRecord({keys.SERVER_ROUND: server_round, keys.EVALUATE_INCOMING: False})
    return message("train", RecordDict({keys.ARRAYS: global_arrays(), keys.CONFIG: settings}))


def test_a_deployed_bank_counts_its_own_dp_rounds_and_stops_at_the_run_s_budget(
    prepared, tmp_path: Path,
) -> None:
    from client.app import BankRefused
    from client.ledger import PrivacyLedger

    config = Config.from_run_config({**prepared.as_run_config(), "dp-epsilon": 3.0,
                                     "num-server-rounds": 2})
    context = deployed_context(config, tmp_path, Path(prepared.data_dir) / bank_file(5))

    # The server claims round 1 three times: the bank counts what it trained itself,
    # and a third round would take the run past its epsilon.
    spent = [app(dp_train_message(1), context).content[keys.METRICS][keys.DP_EPSILON]
             for _ in range(2)]
    with pytest.raises(BankRefused, match="bank 5: this run's rounds are trained"):
        app(dp_train_message(1), context)

    assert spent[0] < spent[1] <= 3.0 + 1e-6 and spent[1] > 2.9
    ledger = PrivacyLedger.load(tmp_path)
    assert ledger.rounds(1) == 2 and ledger.runs["1"]["epsilon"] == pytest.approx(spent[1])


def train_when_all_are_ready(run_config: dict, node_config: dict, ready: Any,
                             results: Any) -> None:
    """One of a bank's task processes (its executor forks one per message): waits
    until every other one is ready, then handles a DP train message of round 1."""
    from client.app import BankRefused

    context = Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(),
                      run_config=run_config)
    train = dp_train_message(1)
    ready.wait()
    try:
        results.put(app(train, context).content[keys.METRICS][keys.DP_EPSILON])
    except BankRefused as refused:
        results.put(str(refused))


def test_a_server_sending_a_round_s_train_messages_at_once_gets_no_uncounted_rounds(
    prepared, tmp_path: Path,
) -> None:
    """Four train messages of one round, handled at the same moment by four processes
    (as the bank's executor runs them): averaging their replies would cut the DP noise
    by half. The ledger counts every round that trains, so at most the run's two do,
    and its epsilon is what two rounds spend."""
    import multiprocessing

    from client.ledger import PrivacyLedger

    config = Config.from_run_config({**prepared.as_run_config(), "dp-epsilon": 3.0,
                                     "num-server-rounds": 2})
    node = deployed_context(config, tmp_path, Path(prepared.data_dir) / bank_file(5)
                            ).node_config
    spawn = multiprocessing.get_context("spawn")
    ready, results = spawn.Barrier(4), spawn.Queue()
    tasks = [spawn.Process(target=train_when_all_are_ready,
                           args=(config.as_run_config(), dict(node), ready, results))
             for _ in range(4)]
    for task in tasks:
        task.start()
    replies = [results.get(timeout=300) for _ in tasks]
    for task in tasks:
        task.join(timeout=60)

    trained = sorted(reply for reply in replies if isinstance(reply, float))
    assert len(trained) == 2, replies
    assert replies.count("bank 5: this run's rounds are trained") == 2, replies
    ledger = PrivacyLedger.load(tmp_path)
    assert ledger.rounds(1) == 2
    assert ledger.runs["1"]["epsilon"] == pytest.approx(trained[1]) and trained[0] < trained[1]


def test_a_deployed_bank_refuses_training_past_its_lifetime_budget(
    prepared, tmp_path: Path,
) -> None:
    from client.app import BankRefused
    from client.ledger import PrivacyLedger

    PrivacyLedger.load(tmp_path).record(run_id=41, rounds=10, epsilon=28.0, delta=1e-5)
    config = Config.from_run_config({**prepared.as_run_config(), "dp-epsilon": 3.0})
    context = deployed_context(config, tmp_path, Path(prepared.data_dir) / bank_file(5),
                               policy="max-epsilon-total = 30.0")

    app(dp_train_message(1), context)  # round 1 of 10 costs well under 2
    for _ in range(9):  # ... but the rounds add up past 30 before the run's 3 are spent
        try:
            app(dp_train_message(1), context)
        except BankRefused as refused:
            assert "privacy budget spent" in str(refused)
            break
    else:
        raise AssertionError("the bank trained past its lifetime budget")
    ledger = PrivacyLedger.load(tmp_path)
    assert ledger.spent_elsewhere(run_id=99) <= 30.0


def test_a_deployed_bank_answers_at_most_rounds_plus_one_evaluations_per_run(
    prepared, tmp_path: Path,
) -> None:
    from client.app import BankRefused

    config = Config.from_run_config({**prepared.as_run_config(), "num-server-rounds": 2})
    context = deployed_context(config, tmp_path, Path(prepared.data_dir) / bank_file(5))
    evaluate = evaluate_message(server_round=2)

    first = app(train_message(), context)  # evaluates the incoming model first: 1 of 3
    app(evaluate, context)
    app(evaluate, context)  # the third of 2 + 1
    with pytest.raises(BankRefused, match="bank 5: this run's evaluations are spent"):
        app(evaluate, context)
    late = app(train_message(), context)  # round 2 trains, without evaluating

    assert keys.HIST_FRAUD in first.content[keys.METRICS]
    assert keys.HIST_FRAUD not in late.content[keys.METRICS]


def test_a_deployed_bank_s_histograms_have_its_policy_s_resolution(prepared,
                                                                    tmp_path: Path) -> None:
    shard = Path(prepared.data_dir) / bank_file(5)
    fine = app(train_message(), bank_context(prepared)).content[keys.METRICS]
    coarse = app(train_message(), deployed_context(
        prepared, tmp_path, shard, policy="histogram-resolution = 0.5")).content[keys.METRICS]

    for key in (keys.HIST_LEGIT, keys.HIST_FRAUD):
        assert sum(coarse[key]) == sum(fine[key]) and len(coarse[key]) == len(fine[key])
        assert all(count == 0 for i, count in enumerate(coarse[key]) if i % 10)
        assert coarse[key][::10] == [sum(fine[key][i:i + 10])
                                     for i in range(0, len(fine[key]), 10)]
