"""Secure aggregation: the server learns only the sum of the banks' models (SecAgg+).

Flower 1.39 runs SecAgg+ only on its legacy path: ``SecAggPlusWorkflow`` inside a
``DefaultWorkflow`` with the legacy FedAvg; each bank's ClientApp answers through
``secaggplus_mod`` (client/app.py), which masks the bank's weights before they leave.
The banks train as in the plain run and the server evaluates its test set every
round; but nothing per bank travels in the clear: a bank's reply names the bank beside
its masked weights and holds no loss, size, epsilon or histogram, and there is no
per-bank final evaluate step. So a SecAgg+ run has no pooled validation curve (the
threshold is ``decision-threshold``) and no per-bank table. The result comes back in
the plain strategy's ``Result`` shape so that metrics.json, the model and the report
are built the same way.

Flower's workflow trusts every reply's form: one bank's malformed reply (a key that is
no key, lists that do not pair, a masked vector of another shape, thousands of shares
to combine) raised inside it, in the other banks, or kept the server busy for hours.
``RecordingGrid`` checks each reply's form for its stage against what that bank was
asked (``malformed``) and drops a malformed one, so the workflow treats that bank as
one that dropped out, which SecAgg+ is built to survive (``GuardedSecAggPlus`` makes
Flower's workflow survive it at the first two stages too). A round whose unmasking
still raises, or whose sum is no model's (``CheckedFedAvg``), ends with the global
model unchanged, not the run. Neither makes SecAgg+ robust to a malicious bank: a bank
can still add whatever it likes to the sum, directly or with wrong shares (README,
"Threat model").
"""

from __future__ import annotations

from collections import Counter
from functools import cache
from logging import WARNING
from typing import Any

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import (
    Metrics, Scalar, log, ndarrays_to_parameters, parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS, Key, Stage,
)
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result

from common import keys
from common.config import Config
from common.model import implausible, npy_array, packed
from server.evaluation import TestSetEvaluation
from server.report import SECURE_ROUND_FAILED
from server.strategy import BankGuard, ledger_entry


# The masked vector Flower's secaggplus_mod sends: its quantization factor, then the
# model's one vector, in int64.
MASKED_DTYPES = (np.dtype(np.int64),)


class RecordingGrid:
    """The grid, passed to Flower's workflow, noting what every bank's reply held (its
    ledger entry: its records' sizes, not the reply) and dropping a reply whose
    form is not its stage's (``malformed``), or whose fit result states another bank's
    id than its node's (``guard``'s check, as in the plain run): to the workflow that
    bank has dropped out."""

    def __init__(self, grid: Grid, model_size: int, guard: BankGuard) -> None:
        self.grid = grid
        self.model_size = model_size
        self.guard = guard
        self.replies: list[tuple[int, int, dict[str, Any]]] = []  # (round, node, entry)
        self.refused: list[tuple[int, int, str, str]] = []  # (round, node, stage, why)
        # (round, node) -> the bank that round's kept fit result of the node states
        self.banks: dict[tuple[int, int], int] = {}

    def send_and_receive(self, messages: Any, timeout: float | None = None) -> Any:
        messages = list(messages)
        stage = stage_of(messages)
        # The round Flower's workflow asks about (its messages' group id); a reply's own
        # group id is the bank's to set, and Flower's SuperLink does not check it.
        server_round = int(messages[0].metadata.group_id or 0) if messages else 0
        asked = {message.metadata.dst_node_id:
                 message.content.config_records.get(RECORD_KEY_CONFIGS)
                 for message in messages}
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        keys_seen = Counter(key for reply in replies if stage == Stage.SETUP and
                            reply.has_content() for key in public_keys(reply.content))
        # The bank each collect-stage fit result states (None at other stages).
        stated = [stated_bank(reply.content) if stage == Stage.COLLECT_MASKED_VECTORS
                  and reply.has_content() else None for reply in replies]
        stating = Counter(stated) if stage == Stage.COLLECT_MASKED_VECTORS else Counter()
        kept = []
        for reply, bank in zip(replies, stated):
            node = reply.metadata.src_node_id
            if reply.has_error():  # the reason's tail holds the exception
                reason = reply.error.reason[-900:].replace("\n", " | ")
                log(WARNING, "fedfraud: SecAgg+ reply from node %d failed: %s", node,
                    reason)
            if reply.has_content():  # to the ledger, refused or not
                self.replies.append((server_round, node, ledger_entry(
                    "train (SecAgg+)", server_round, reply.content, bank=None)))
                why = malformed(stage, reply.content, asked.get(node), node,
                                self.model_size)
                if not why and any(keys_seen[key] > 1 for key in public_keys(reply.content)):
                    why = "another bank's reply holds the same public key"
                if not why and stage == Stage.COLLECT_MASKED_VECTORS:
                    why = self.wrong_sender(server_round, node, bank, stating)
                if why:
                    log(WARNING, "fedfraud: SecAgg+ %s reply from node %d refused: %s; "
                        "the round goes on as if that bank had dropped out", stage, node,
                        why)
                    self.refused.append((server_round, node, str(stage), why))
                    continue
            kept.append(reply)
        return kept

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def wrong_sender(self, server_round: int, node: int, stated: int | None,
                     stating: Counter[int | None]) -> str | None:
        """Why a collect reply's fit result is not from the bank it states (None: it
        is, and ``banks`` notes it): the bank the operator registered its node for, or
        without registrations the bank no other reply of the round states (the plain
        run's ``BankGuard``). Each round's metrics list the banks summed by these ids."""
        if stated is None:
            return "its fit result states no bank-id"
        if why := self.guard.wrong_bank(stated, self.guard.sender(node, stated, stating),
                                        stating):
            return why
        self.banks[server_round, node] = stated
        return None

    def bank(self, server_round: int, node: int) -> int | None:
        """The bank a node's replies of a round are from, as far as the server knows
        (``BankGuard.sender``): its registered bank. Without registrations, the bank
        its kept fit result of that round states; for a round it sent none (it
        dropped out or was refused first), the one bank its kept fit results of the
        other rounds state, if they agree (None otherwise): all a node says."""
        if self.guard.registered:
            return self.guard.node_banks.get(node)
        if (server_round, node) in self.banks:
            return self.banks[server_round, node]
        stated = {bank for (_, other), bank in self.banks.items() if other == node}
        return stated.pop() if len(stated) == 1 else None

    def ledger(self) -> list[dict[str, Any]]:
        return [{**entry, "bank": self.bank(server_round, node)}
                for server_round, node, entry in self.replies]


def stated_bank(content: RecordDict) -> int | None:
    """The bank id a collect-stage reply's fit result states (None: none, or no int)."""
    try:
        bank = compat.recorddict_to_fitres(content, keep_input=True).metrics.get(keys.BANK_ID)
    except Exception:  # noqa: BLE001 - what Flower's compat layer makes of a bank's reply
        return None
    return bank if type(bank) is int else None


def stage_of(messages: list[Message]) -> str | None:
    """The SecAgg+ stage the workflow's messages ask for (one per call)."""
    for message in messages:
        record = message.content.config_records.get(RECORD_KEY_CONFIGS)
        if record is not None:
            return str(record.get(Key.STAGE))
    return None


def malformed(stage: str | None, content: RecordDict, asked: Any, node: int,
              model_size: int) -> str | None:
    """Why bank ``node``'s reply at ``stage`` is not in the form Flower's workflow
    reads unchecked (None: it is); ``asked`` is the configs record the workflow sent
    that node. The reasons quote nothing the bank chose."""
    record = content.config_records.get(RECORD_KEY_CONFIGS)
    if record is None or asked is None:
        return "it holds no SecAgg+ record, or answers nothing the node was asked"

    def listed(key: str, kind: type) -> list[Any] | None:
        value = record.get(key)
        if isinstance(value, list) and all(type(item) is kind for item in value):
            return value
        return None

    if stage == Stage.SETUP:
        pair = public_keys(content)
        if len(set(pair)) != 2 or not all(map(is_public_key, pair)):
            return "its public keys are not two distinct SecAgg+ keys"
    elif stage == Stage.SHARE_KEYS:
        destinations, texts = listed(Key.DESTINATION_LIST, int), listed(
            Key.CIPHERTEXT_LIST, bytes)
        neighbours = {int(name) for name in asked.keys() if name.isdigit()} - {node}
        if destinations is None or texts is None or len(destinations) != len(texts) or \
                len(set(destinations)) != len(destinations) or \
                set(destinations) != neighbours:
            return "its ciphertexts are not one for each of its neighbours"
    elif stage == Stage.COLLECT_MASKED_VECTORS:
        vectors = listed(Key.MASKED_PARAMETERS, bytes)
        if vectors is None or len(vectors) != 2:
            return "its masked vector is not a factor and one model vector"
        try:
            shapes = [npy_array(vector, model_size, MASKED_DTYPES, "a masked vector "
                                "that is not int64").shape for vector in vectors]
        except ValueError as err:  # its texts quote nothing the bank chose
            return str(err)
        if shapes != [(1,), (model_size,)]:
            return "its masked vector is not the model's shape"
        try:
            fit = compat.recorddict_to_fitres(content, keep_input=True)
        except Exception:  # noqa: BLE001 - what Flower's compat layer makes of it
            return "it holds no fit result"
        if type(fit.num_examples) is not int or fit.num_examples != 1:
            return "its fit result weighs it other than one vote"  # client/app.py: 1
    elif stage == Stage.UNMASK:
        owners, shares = listed(Key.NODE_ID_LIST, int), listed(Key.SHARE_LIST, bytes)
        active = list(asked.get(Key.ACTIVE_NODE_ID_LIST) or [])
        dead = list(asked.get(Key.DEAD_NODE_ID_LIST) or [])
        if owners is None or shares is None or owners != active + dead or \
                len(shares) != len(owners):
            return "its shares are not one for each node it was asked about"
        # Shamir shares of a 32-byte mask seed (active) and of a key (dead), as the
        # banks' secaggplus_mod makes them: combining costs the square of their number
        # and grows with their length.
        seed, key = share_lengths()
        if any(len(share) != seed for share in shares[:len(active)]) or \
                any(len(share) != key for share in shares[len(active):]):
            return "its shares are not the length of SecAgg+'s shares"
    return None


def public_keys(content: RecordDict) -> list[bytes]:
    """The public keys (bytes) a setup-stage reply holds under Flower's two names."""
    record = content.config_records.get(RECORD_KEY_CONFIGS)
    if record is None:
        return []
    return [value for value in (record.get(Key.PUBLIC_KEY_1), record.get(Key.PUBLIC_KEY_2))
            if isinstance(value, bytes)]


@cache
def share_lengths() -> tuple[int, int]:
    """The length of a Shamir share of a mask seed and of a private key, as Flower's
    secaggplus_mod shares them (os.urandom(32); private_key_to_bytes of a SECP384R1
    key)."""
    from flwr.common.secure_aggregation.crypto.shamir import create_shares
    from flwr.supercore.primitives.asymmetric import (
        generate_key_pairs, private_key_to_bytes,
    )

    seed = create_shares(bytes(32), 2, 3)[0]
    key = create_shares(private_key_to_bytes(generate_key_pairs()[0]), 2, 3)[0]
    return len(seed), len(key)


def is_public_key(value: Any) -> bool:
    """A PEM public key on the curve Flower's SecAgg+ keys are on."""
    if not isinstance(value, bytes):
        return False
    try:
        key = load_pem_public_key(value)
    except (ValueError, TypeError):
        return False
    return isinstance(key, ec.EllipticCurvePublicKey) and \
        isinstance(key.curve, ec.SECP384R1)


class GuardedSecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, with two changes:

    - a bank that drops out before its key shares went round (setup or share-keys
      stage) leaves the round. Flower 1.39 keeps it among the round's banks: in the
      unmask stage it asks the others for shares of that bank's key, which they never
      received (they raise KeyError), and would remove masks nobody added. So one
      bank's dropout there, or a reply refused as malformed, stopped the round;
    - a round whose unmasking raises (what wrong shares mostly do when combined: any
      exception of the unmask stage, or a bank-caused one of the others) ends with the
      global model as it was, logged and recorded in ``failed``, instead of ending the
      run. Other errors still end it."""

    def share_keys_stage(self, grid: Grid, context: LegacyContext,
                         state: WorkflowState) -> bool:
        super().share_keys_stage(grid, context, state)
        shared = set(state.active_node_ids)  # whose key shares reached their neighbours
        state.sampled_node_ids = state.sampled_node_ids & shared
        state.nid_to_neighbours = {node: neighbours & shared for node, neighbours
                                   in state.nid_to_neighbours.items() if node in shared}
        return self._check_threshold(state)  # Flower's, on the round as it now is

    def unmask_stage(self, grid: Grid, context: LegacyContext,
                     state: WorkflowState) -> bool:
        """Flower's unmask stage; whatever it raises ends the round, not the run: it
        rebuilds secrets the banks chose (a 33-byte seed fails an assert, an Ed25519
        key has no ECDH exchange: a review's two ways through the form checks)."""
        try:
            self.settled = super().unmask_stage(grid, context, state)
        except Exception as err:  # noqa: BLE001 - secrets a bank chose
            self.round_failed(context, err)
            return False
        return self.settled

    def __init__(self, failed: list[tuple[int, str]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.failed = failed  # (round, why) of each round that ended without an update
        self.settled = False  # this round summed, or its failure is in ``failed``

    def __call__(self, grid: Grid, context: Context) -> None:
        self.settled = False
        try:
            super().__call__(grid, context)
        # What a bank's well-formed but wrong share raises when combined (padding,
        # key bytes, interpolation); any other error ends the run as before.
        except (ValueError, KeyError, TypeError, ZeroDivisionError) as err:
            self.round_failed(context, err)
        if not self.settled:
            # A stage found fewer banks than secagg-threshold left (dropped out or
            # refused): Flower logs "Secure aggregation halted" and skips the round.
            current = current_round(context)
            log(WARNING, "fedfraud: round %d: too few banks left to sum securely; the "
                "global model stays as it was", current)
            self.failed.append((current, "too few banks were left to unmask the sum"))

    def round_failed(self, context: Context, err: Exception) -> None:
        current = current_round(context)
        log(WARNING, "fedfraud: round %d: secure aggregation stopped; the global model "
            "stays as it was", current, exc_info=err)
        self.failed.append((current, f"unmasking the sum failed ({type(err).__name__})"))
        self.settled = True


def current_round(context: Context) -> int:
    """The round the legacy workflow is in."""
    return int(context.state.config_records[MAIN_CONFIGS_RECORD].get(
        WorkflowKey.CURRENT_ROUND, 0))


class CheckedFedAvg(LegacyFedAvg):
    """The legacy FedAvg SecAgg+ hands the unmasked sum to, refusing a sum that is not
    a model's (NaN, infinite or beyond MAX_WEIGHT: a bank's factor or weight of its
    choosing can make it so): the round ends without an update."""

    def __init__(self, failed: list[tuple[int, str]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.failed = failed

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
        parameters, metrics = super().aggregate_fit(server_round, results, failures)
        if parameters is not None and any(
                implausible(weights) for weights in parameters_to_ndarrays(parameters)):
            log(WARNING, "fedfraud: round %d: the unmasked sum is no model's (NaN, "
                "infinite or huge weights); the global model stays as it was",
                server_round)
            self.failed.append((server_round, "the unmasked sum is no model's"))
            return None, {}
        return parameters, metrics


def aggregate_fit_metrics(results: list[tuple[int, Metrics]]) -> dict[str, Scalar]:
    """The legacy strategy's metric hook: which banks took part (all a reply says)."""
    return {keys.BANK_IDS: sorted(metrics[keys.BANK_ID]  # type: ignore[misc]
                                  for _, metrics in results
                                  if isinstance(metrics.get(keys.BANK_ID), int))}


def run_secure(grid: Grid, context: Context, config: Config,
               initial: dict[str, Any], evaluation: TestSetEvaluation,
               guard: BankGuard) -> Result:
    """The run with SecAgg+; ``guard`` (the plain strategy) keeps the ledger."""
    def as_record(arrays: list[np.ndarray]) -> ArrayRecord:
        """The model's one vector, as the plain run sends it, in float32 (SecAgg+
        dequantizes to float64)."""
        [weights] = arrays
        return ArrayRecord({keys.WEIGHTS: Array(np.asarray(weights, np.float32))})

    def evaluate(server_round: int, arrays: list[np.ndarray],
                 _: dict[str, Scalar]) -> tuple[float, dict[str, Scalar]]:
        metrics = evaluation(server_round, as_record(arrays))
        return float(metrics["loss"]), dict(metrics)

    failed: list[tuple[int, str]] = []
    strategy = CheckedFedAvg(
        failed, fraction_fit=1.0, fraction_evaluate=0.0,
        min_fit_clients=config.min_banks, min_available_clients=config.min_banks,
        initial_parameters=ndarrays_to_parameters([packed(initial)]),
        on_fit_config_fn=lambda server_round: {keys.SERVER_ROUND: server_round},
        evaluate_fn=evaluate,
        fit_metrics_aggregation_fn=aggregate_fit_metrics,
    )
    legacy = LegacyContext(context=context,
                           config=ServerConfig(num_rounds=config.num_server_rounds,
                                               round_timeout=config.round_timeout_s),
                           strategy=strategy)
    recording = RecordingGrid(grid, model_size=len(packed(initial)), guard=guard)
    workflow = DefaultWorkflow(fit_workflow=GuardedSecAggPlus(
        failed, num_shares=config.secagg_shares, reconstruction_threshold=config.secagg_threshold,
        max_weight=1.0,  # every bank one vote (bank-weighting "equal")
        timeout=config.round_timeout_s))
    workflow(recording, legacy)  # type: ignore[arg-type]

    final = legacy.state.array_records[MAIN_PARAMS_RECORD]
    arrays = as_record([array.numpy() for array in final.values()])
    guard.ledger[:0] = recording.ledger()
    guard.refused[:0] = [{"round": server_round, "bank": recording.bank(server_round, node),
                          "message": f"train (SecAgg+ {stage})", "why": why}
                         for server_round, node, stage, why in recording.refused]
    guard.refused += [{"round": server_round, "bank": None, "message": SECURE_ROUND_FAILED,
                       "why": why} for server_round, why in failed]

    fit_history = legacy.history.metrics_distributed_fit
    rounds = sorted({r for values in fit_history.values() for r, _ in values})
    return Result(
        arrays=arrays,
        train_metrics_clientapp={r: MetricRecord({
            key: value for key, values in fit_history.items() for rr, value in values
            if rr == r}) for r in rounds},
        evaluate_metrics_clientapp={},
    )
