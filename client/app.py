"""The bank's ClientApp: thin Flower handlers in front of ``client.bank.Bank``.

The node config says which bank this is; the bank sets it, never the server:
- deployment (``shard``, ``state``, ``policy``): the bank's own files. The bank's
  policy is checked before any row is read (a run asking for less privacy than it
  allows is refused with the reason), and a failure reaches the server only as a
  category ("bank 3: data error, see the bank's log"); the details stay in the log.
- simulation (``partition-id``): the partition's shard under ``data-dir``.
The fitted scaler is kept in ``context.state`` between messages.

A reply holds only model weights and counts: no row, no per-row score. With secure
aggregation on, Flower's ``secaggplus_mod`` masks the weights before they leave, and
the bank answers no message outside SecAgg+ (``refuse_outside_secagg``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from logging import ERROR
from pathlib import Path
from typing import TYPE_CHECKING, Any

import flwr.compat.common.recorddict_compat as compat
from flwr.app import (
    Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, MessageType, Status, log, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS, Key, Stage,
)

from common import keys
from common.config import Config
from common.data import bank_file
from common.schema import BankDataError

if TYPE_CHECKING:
    from client.bank import Arrays, Bank
    from client.policy import Policy

app = ClientApp()


class BankRefused(RuntimeError):
    """What the server learns when a deployed bank does not answer: the bank and a
    category (or the policy's reasons, which name settings only)."""


Handler = Callable[[Message, Context], Message]


def errors_stay_home(handler: Handler) -> Handler:
    """A deployed bank's failure goes to its own log in full and to the server only as
    a category: error texts can hold cell values and column names."""

    @wraps(handler)
    def guarded(msg: Message, context: Context) -> Message:
        if "policy" not in context.node_config:  # simulation: one party's machine
            return handler(msg, context)
        bank = f"bank {context.node_config.get('bank-id', '?')}"
        try:
            return handler(msg, context)
        except BankRefused:
            raise
        except BankDataError as err:
            log(ERROR, "%s: data error: %s", bank, err)
            raise BankRefused(f"{bank}: data error, see the bank's log") from None
        except Exception as err:  # noqa: BLE001 - same rule for any failure
            log(ERROR, "%s: %s", bank, err, exc_info=err)
            raise BankRefused(f"{bank}: failed ({type(err).__name__}), see the bank's "
                              "log") from None

    return guarded


def inside_secagg(msg: Message) -> bool:
    """Whether Flower's ``secaggplus_mod`` takes ``msg`` through its stages and masks
    the reply: SecAgg+'s config record in a message of type exactly "train". The mod
    passes any other type straight through, though a "train.<action>" message reaches
    the train handler too (Flower 1.39; tests/test_client.py checks both)."""
    return (RECORD_KEY_CONFIGS in msg.content.config_records
            and msg.metadata.message_type == MessageType.TRAIN)


def refuse_live_and_dropped(msg: Message, context: Context) -> None:
    """SecAgg+'s last stage asks a bank for its share of the private mask seed of each
    node the server calls active and of the pairwise key of each it calls dropped. Both
    for one node hand the server both of that node's masks, so its weights in the
    clear; an honest server never asks it, and Flower 1.39's ``secaggplus_mod`` does
    not check it."""
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    if configs.get(Key.STAGE) != Stage.UNMASK:
        return
    both = set(configs.get(Key.ACTIVE_NODE_ID_LIST, [])) & set(  # type: ignore[arg-type]
        configs.get(Key.DEAD_NODE_ID_LIST, []))  # type: ignore[arg-type]
    if both:
        log(ERROR, "%s: refused SecAgg+'s unmask stage: nodes %s are listed both as active "
            "and as dropped", bank_name(context), sorted(both))
        raise BankRefused(f"{bank_name(context)}: SecAgg+'s unmask stage lists a node both "
                          "as active and as dropped; refused")


def secure_only(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """SecAgg+ messages go through Flower's ``secaggplus_mod`` (it masks the bank's
    weights before they leave); plain ones straight to the handler."""
    if inside_secagg(msg):
        from flwr.client.mod import secaggplus_mod  # ~0.1 s of imports: only when used

        refuse_live_and_dropped(msg, context)

        reply = secaggplus_mod(msg, context, call_next)
        # Attack settings: simulations only (a deployed bank's policy refuses them).
        if "policy" not in context.node_config and \
                context.run_config.get("attack") == "secagg-malformed" and int(
                    context.node_config["partition-id"]) in Config.from_run_config(
                        context.run_config).attacker_ids:
            from client.attack import malformed_secagg

            reply = malformed_secagg(reply)
        return reply
    return call_next(msg, context)


@app.train(mods=[secure_only])
@errors_stay_home
def train_handler(msg: Message, context: Context) -> Message:
    config, policy = allowed_config(context)
    if inside_secagg(msg):  # SecAgg+ speaks Flower's legacy FitIns/FitRes
        return legacy_train(msg, context, config, policy)
    refuse_outside_secagg(context, config, "train")
    server_round, evaluate_incoming, proximal_mu = round_settings(
        msg.content.get(keys.CONFIG), context, config)
    arrays = numpy_arrays(msg, context)
    evaluate_incoming = evaluate_incoming and may_evaluate(context, config, policy)
    arrays, metrics = train_within_budget(context, config, policy, arrays, server_round,
                                          evaluate_incoming, proximal_mu)
    metrics = disclosed(metrics, policy)
    record = ArrayRecord({name: Array(value) for name, value in arrays.items()})
    return reply(msg, {keys.ARRAYS: record, keys.METRICS: MetricRecord(metrics)})


@app.evaluate()
@errors_stay_home
def evaluate_handler(msg: Message, context: Context) -> Message:
    config, policy = allowed_config(context)
    refuse_outside_secagg(context, config, "evaluate")  # a SecAgg+ run sends none
    # Evaluate messages carry only the final model (server/strategy.py): audit it too,
    # unless the bank's policy keeps the membership audit to itself; and keep a copy
    # (personalized if that is better) for the bank's own scoring.
    audit = policy is None or policy.membership_audit
    arrays = numpy_arrays(msg, context)  # before the bank reads a row or counts it
    if not may_evaluate(context, config, policy):
        raise BankRefused(f"{bank_name(context)}: this run's evaluations are spent")
    bank = bank_for(context, config)
    refuse_long_rounds(bank.id, config, policy, len(bank.y_train))  # fine-tuning's steps
    metrics = bank.evaluate(arrays, config, audit)
    metrics.update(bank.keep_final(arrays, config, str(context.run_id)))
    metrics = disclosed(metrics, policy)
    return reply(msg, {keys.METRICS: MetricRecord(metrics)})


def refuse_outside_secagg(context: Context, config: Config, kind: str) -> None:
    """In a run whose config says ``secure-aggregation`` (which the bank's policy may
    require), a bank answers only SecAgg+ train messages: a plain train or an evaluate
    message would have it send its weights or its validation histograms in the clear,
    and an honest SecAgg+ run sends neither (server/secure.py)."""
    if config.secure_aggregation:
        log(ERROR, "%s: refused a %s message outside SecAgg+ in a secure-aggregation run",
            bank_name(context), kind)
        raise BankRefused(f"{bank_name(context)}: this run is secure-aggregated; a "
                          f"{kind} message outside SecAgg+ is refused")


def may_evaluate(context: Context, config: Config, policy: Policy | None) -> bool:
    """A deployed bank answers at most ``num-server-rounds`` + 1 evaluations per run
    (one per round and the final model's), counted in its own ledger: every answer
    shows the server how the model it chose scores the bank's validation rows."""
    if policy is None:
        return True
    from client.ledger import PrivacyLedger

    with PrivacyLedger.held(Path(str(context.node_config["state"]))) as ledger:
        answered = ledger.evaluations(context.run_id)
        if answered > config.num_server_rounds:
            log(ERROR, "bank %s: refused evaluation %d of run %d (allowance %d)",
                context.node_config["bank-id"], answered + 1, context.run_id,
                config.num_server_rounds + 1)
            return False
        ledger.record(context.run_id, evaluations=answered + 1)
    return True


def disclosed(metrics: dict[str, Any], policy: Policy | None) -> dict[str, Any]:
    """What a deployed bank's policy lets leave: histograms at its resolution, and what
    it says about its personalized copy only if it reports personalization."""
    if policy is None:
        return metrics
    from common.metrics import coarsen

    withheld = () if policy.personalization_report else keys.PERSONAL_KEYS
    return {key: coarsen(value, policy.histogram_resolution) if key in keys.HIST_KEYS
            else value for key, value in metrics.items() if key not in withheld}


def train_within_budget(context: Context, config: Config, policy: Policy | None,
                        arrays: Arrays, server_round: int, evaluate_incoming: bool,
                        proximal_mu: float = 0.0) -> tuple[Arrays, dict[str, Any]]:
    """The bank trains. A deployed bank first checks its own ledger: it trains at most
    ``num-server-rounds`` rounds of a run (a server may send any number of train
    messages), and with DP it refuses a round that would take this run past its epsilon
    (the run's target, capped by the policy) or the bank's lifetime past
    ``max-epsilon-total``."""
    bank = bank_for(context, config)
    refuse_long_rounds(bank.id, config, policy, len(bank.y_train))
    if policy is None:
        return bank.train(arrays, config, server_round, evaluate_incoming, proximal_mu)
    from client.ledger import PrivacyLedger

    with PrivacyLedger.held(bank.state_dir) as ledger:
        before = ledger.rounds(context.run_id)
        if before >= config.num_server_rounds:
            log(ERROR, "bank %d: refused training round %d of run %d: its %d rounds are "
                "trained", bank.id, before + 1, context.run_id, config.num_server_rounds)
            raise BankRefused(f"bank {bank.id}: this run's rounds are trained")
        spent: dict[str, float] = {}
        if config.differential_privacy:
            after = bank.epsilon_after(config, before + 1)
            run_budget = min(config.dp_epsilon, policy.max_epsilon_per_run)
            lifetime = ledger.spent_elsewhere(context.run_id) + after
            if after > run_budget * (1 + 1e-6) or lifetime > policy.max_epsilon_total:
                log(ERROR, "bank %d: privacy budget spent: epsilon %.3f after round %d of "
                    "this run (budget %.3f), %.3f over its lifetime (max %.3f)", bank.id,
                    after, before + 1, run_budget, lifetime, policy.max_epsilon_total)
                raise BankRefused(f"bank {bank.id}: privacy budget spent")
            spent = {"epsilon": after, "delta": config.dp_delta}
        # Recorded before it trains (a round that then fails still counts): another
        # task of this bank, sent at the same time, waits for the lock and then reads
        # this round as trained (client/ledger.py).
        ledger.record(context.run_id, rounds=before + 1, **spent)
    return bank.train(arrays, config, server_round, evaluate_incoming, proximal_mu,
                      rounds_before=before)


def refuse_long_rounds(bank_id: int, config: Config, policy: Policy | None,
                       rows: int) -> None:
    """A deployed bank refuses a run whose rounds would take more steps than its policy
    allows, before it trains (the number of steps follows from its row count, which it
    reports anyway)."""
    why = None if policy is None else policy.steps_refusal(config, rows)
    if why:
        log(ERROR, "bank %d: refused the run: %s", bank_id, why)
        # Not the number of steps: with batch-size 1 it is the bank's rows times the
        # epochs, a count a SecAgg+ run keeps from the server.
        raise BankRefused(f"bank {bank_id} refuses this run: more training steps a "
                          "round (local-epochs, personalize-epochs, batch-size) than its "
                          "max-steps-per-round")


def legacy_train(msg: Message, context: Context, config: Config,
                 policy: Policy | None) -> Message:
    """The same training, in the legacy FitIns/FitRes shape SecAgg+ needs. One vote per
    bank (``num_examples`` 1). Beside the masked weights the reply names the bank and
    nothing else: no loss, sizes or epsilon in the clear (the bank's ledger keeps it)."""
    from common.model import weights_of

    try:
        fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        sent = [weights_of(Array(dtype="", shape=(), stype=fitins.parameters.tensor_type,
                                 data=tensor)) for tensor in fitins.parameters.tensors]
    except (KeyError, TypeError, ValueError) as err:
        raise BankDataError(f"{bank_name(context)}: the server's SecAgg+ message holds no "
                            f"model the bank can load ({err}); not used") from None
    server_round, _, _ = round_settings(fitins.config, context, config)
    # The one vector of weights, as in a plain run; the bank refuses anything else.
    arrays = ({keys.WEIGHTS: sent[0]} if len(sent) == 1 else
              {f"parameters-{i}": array for i, array in enumerate(sent)})
    trained, metrics = train_within_budget(context, config, policy, arrays, server_round,
                                           False)
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(
        [trained[keys.WEIGHTS]]), num_examples=1,
        metrics={keys.BANK_ID: metrics[keys.BANK_ID]})
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def bank_name(context: Context) -> str:
    node = context.node_config
    return f"bank {node.get('bank-id', node.get('partition-id', '?'))}"


def round_settings(settings: Any, context: Context, config: Config,
                   ) -> tuple[int, bool, float]:
    """(server round, whether to evaluate the incoming model first, FedProx's mu) of a
    train message's settings; a one-line data error unless the round is one of the
    run's. FedProx's mu is the run config's (Flower's FedProx sends it as well; a
    message asking for another is refused)."""
    bank = bank_name(context)
    if not isinstance(settings, ConfigRecord | dict):
        raise BankDataError(f"{bank}: the server's message holds no settings; not used")
    server_round = settings.get(keys.SERVER_ROUND)
    if not (isinstance(server_round, int) and 1 <= server_round <= config.num_server_rounds):
        raise BankDataError(f"{bank}: the server's message is for round {server_round!r}, "
                            f"not one of this run's 1 to {config.num_server_rounds}")
    proximal_mu = config.proximal_mu if config.strategy == "fedprox" else 0.0
    if settings.get(keys.PROXIMAL_MU, proximal_mu) != proximal_mu:
        raise BankDataError(f"{bank}: the server's message asks for proximal-mu "
                            f"{settings.get(keys.PROXIMAL_MU)!r}, not the run's "
                            f"{proximal_mu}; not used")
    return server_round, bool(settings.get(keys.EVALUATE_INCOMING, False)), proximal_mu


def numpy_arrays(msg: Message, context: Context) -> Arrays:
    """The model the server sent, as numpy arrays (``Bank._model`` then checks that it
    fits the bank's own model); a one-line data error if it is not even that."""
    bank = bank_name(context)
    record = msg.content.get(keys.ARRAYS)
    if not isinstance(record, ArrayRecord):
        raise BankDataError(f"{bank}: the server's message holds no model "
                            f"(no {keys.ARRAYS!r} array record); not used")
    from common.model import weights_of

    try:
        return {name: weights_of(array) for name, array in record.items()}
    except ValueError as err:
        raise BankDataError(f"{bank}: the model the server sent holds {err}; not used"
                            ) from None


def reply(msg: Message, records: dict[str, Any]) -> Message:
    return Message(content=RecordDict(records), reply_to=msg)


def bank_policy(context: Context) -> Policy | None:
    """The deployed bank's own policy (its path set by the bank's node config)."""
    if "policy" not in context.node_config:
        return None
    from client.policy import Policy

    return Policy.load(Path(str(context.node_config["policy"])))


def allowed_config(context: Context) -> tuple[Config, Policy | None]:
    """The run's config and the bank's policy, if the policy allows the config
    (checked before any row is read); else the run is refused with its reasons."""
    config = Config.from_run_config(context.run_config)
    policy = bank_policy(context)
    if policy is not None and (why := policy.refusals(config)):
        bank = f"bank {context.node_config.get('bank-id', '?')}"
        log(ERROR, "%s refuses this run: %s", bank, "; ".join(why))
        raise BankRefused(f"{bank} refuses this run: {'; '.join(why)}")
    return config, policy


def bank_for(context: Context, config: Config) -> Bank:
    """The bank this node serves, with its scaler from ``context.state`` if fitted."""
    from client.bank import Bank

    node = context.node_config
    if "shard" in node:
        bank_id, shard = int(node["bank-id"]), Path(str(node["shard"]))
    else:  # simulation: one virtual node per partition
        bank_id = int(node["partition-id"])
        shard = Path(config.data_dir) / bank_file(bank_id)
    state_dir = Path(str(node["state"])) if "state" in node else None
    stored = context.state.get(keys.SCALER)
    scaler = tuple(stored.to_numpy_ndarrays()) if stored is not None else None
    bank = Bank(bank_id, shard, config, scaler, state_dir,  # type: ignore[arg-type]
                secret_randomness="policy" in node)
    if stored is None:  # fitted just now
        context.state[keys.SCALER] = ArrayRecord(list(bank.scaler))
        bank.keep_scaler()
    return bank
