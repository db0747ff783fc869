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
no key, lists that do not pair, a masked vector of another shape, shares of banks
outside the round) raised inside it and ended the run. ``RecordingGrid`` checks each
reply's form for its stage (``malformed``) and drops a malformed one, so the workflow
treats that bank as one that dropped out, which SecAgg+ is built to survive; what
still raises in a round (a well-formed share that is wrong only fails when combined)
ends that round with the global model unchanged (``GuardedSecAggPlus``), not the run.
Neither makes SecAgg+ robust to a malicious bank: any bank can still add whatever it
likes to the masked sum (README, "Threat model").
"""

from __future__ import annotations

from logging import WARNING
from typing import Any

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import Metrics, Scalar, log, ndarrays_to_parameters
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
from common.model import npy_array, packed
from server.evaluation import TestSetEvaluation
from server.strategy import BankGuard, ledger_entry


# The masked vector Flower's secaggplus_mod sends: its quantization factor, then the
# model's one vector, in int64.
MASKED_DTYPES = (np.dtype(np.int64),)


class RecordingGrid:
    """The grid, passed to Flower's workflow, noting what every bank's reply held and
    dropping a reply whose form is not its stage's (``malformed``): to the workflow
    that bank has dropped out."""

    def __init__(self, grid: Grid, model_size: int) -> None:
        self.grid = grid
        self.model_size = model_size
        self.replies: list[tuple[int, int, RecordDict]] = []  # (round, node, content)
        self.refused: list[tuple[int, int, str, str]] = []  # (round, node, stage, why)
        self.sampled: set[int] = set()  # the nodes the round's setup stage went to

    def send_and_receive(self, messages: Any, timeout: float | None = None) -> Any:
        messages = list(messages)
        stage = stage_of(messages)
        if stage == Stage.SETUP:
            self.sampled = {message.metadata.dst_node_id for message in messages}
        kept = []
        for reply in self.grid.send_and_receive(messages, timeout=timeout):
            node, server_round = reply.metadata.src_node_id, int(
                reply.metadata.group_id or 0)
            if reply.has_error():  # the reason's tail holds the exception
                reason = reply.error.reason[-900:].replace("\n", " | ")
                log(WARNING, "fedfraud: SecAgg+ reply from node %d failed: %s", node,
                    reason)
            if reply.has_content():  # to the ledger, refused or not
                self.replies.append((server_round, node, reply.content))
                if why := malformed(stage, reply.content, self.sampled, self.model_size):
                    log(WARNING, "fedfraud: SecAgg+ %s reply from node %d refused: %s; "
                        "the round goes on as if that bank had dropped out", stage, node,
                        why)
                    self.refused.append((server_round, node, str(stage), why))
                    continue
            kept.append(reply)
        return kept

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def ledger(self, node_to_bank: dict[int, int]) -> list[dict[str, Any]]:
        return [ledger_entry("train (SecAgg+)", server_round, content,
                             bank=node_to_bank.get(node, -1))
                for server_round, node, content in self.replies]


def stage_of(messages: list[Message]) -> str | None:
    """The SecAgg+ stage the workflow's messages ask for (one per call)."""
    for message in messages:
        record = message.content.config_records.get(RECORD_KEY_CONFIGS)
        if record is not None:
            return str(record.get(Key.STAGE))
    return None


def malformed(stage: str | None, content: RecordDict, sampled: set[int],
              model_size: int) -> str | None:
    """Why a bank's reply at ``stage`` is not in the form Flower's workflow reads
    unchecked (None: it is). The reasons quote nothing the bank chose."""
    record = content.config_records.get(RECORD_KEY_CONFIGS)
    if record is None:
        return "it holds no SecAgg+ record"

    def listed(key: str, kind: type) -> list[Any] | None:
        value = record.get(key)
        if isinstance(value, list) and all(type(item) is kind for item in value):
            return value
        return None

    if stage == Stage.SETUP:
        if not all(is_public_key(record.get(key))
                   for key in (Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2)):
            return "its public keys are not SecAgg+ keys"
    elif stage == Stage.SHARE_KEYS:
        destinations, texts = listed(Key.DESTINATION_LIST, int), listed(
            Key.CIPHERTEXT_LIST, bytes)
        if destinations is None or texts is None or len(destinations) != len(texts):
            return "its destinations and ciphertexts do not pair"
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
            compat.recorddict_to_fitres(content, keep_input=True)
        except Exception:  # noqa: BLE001 - what Flower's compat layer makes of it
            return "it holds no fit result"
    elif stage == Stage.UNMASK:
        owners, shares = listed(Key.NODE_ID_LIST, int), listed(Key.SHARE_LIST, bytes)
        if owners is None or shares is None or len(owners) != len(shares):
            return "its node ids and shares do not pair"
        if not set(owners) <= sampled:
            return "it holds shares of nodes outside the round"
        # Flower's Shamir shares: a 4-byte index, then 16 bytes per chunk of the secret.
        if any(len(share) < 20 or (len(share) - 4) % 16 for share in shares):
            return "its shares are not Shamir shares"
    return None


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
    - a round that raises (what a well-formed but wrong share does when combined) ends
      with the global model as it was, logged, instead of ending the run."""

    def share_keys_stage(self, grid: Grid, context: LegacyContext,
                         state: WorkflowState) -> bool:
        going_on = super().share_keys_stage(grid, context, state)
        shared = set(state.active_node_ids)  # whose key shares reached their neighbours
        state.sampled_node_ids = state.sampled_node_ids & shared
        state.nid_to_neighbours = {node: neighbours & shared for node, neighbours
                                   in state.nid_to_neighbours.items() if node in shared}
        return going_on

    def __call__(self, grid: Grid, context: Context) -> None:
        try:
            super().__call__(grid, context)
        except Exception as err:  # noqa: BLE001 - one round's failure, not the run's
            current = context.state.config_records[MAIN_CONFIGS_RECORD].get(
                WorkflowKey.CURRENT_ROUND)
            log(WARNING, "fedfraud: round %s: secure aggregation stopped (%s); the "
                "global model stays as it was", current, type(err).__name__)


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

    strategy = LegacyFedAvg(
        fraction_fit=1.0, fraction_evaluate=0.0,
        min_fit_clients=config.min_banks, min_available_clients=config.min_banks,
        initial_parameters=ndarrays_to_parameters([packed(initial)]),
        on_fit_config_fn=lambda server_round: {keys.SERVER_ROUND: server_round},
        evaluate_fn=evaluate,
        fit_metrics_aggregation_fn=aggregate_fit_metrics,
    )
    legacy = LegacyContext(context=context,
                           config=ServerConfig(num_rounds=config.num_server_rounds),
                           strategy=strategy)
    recording = RecordingGrid(grid, model_size=len(packed(initial)))
    workflow = DefaultWorkflow(fit_workflow=GuardedSecAggPlus(
        num_shares=config.secagg_shares, reconstruction_threshold=config.secagg_threshold,
        max_weight=1.0))  # every bank one vote (bank-weighting "equal")
    workflow(recording, legacy)  # type: ignore[arg-type]

    final = legacy.state.array_records[MAIN_PARAMS_RECORD]
    arrays = as_record([array.numpy() for array in final.values()])
    node_to_bank = dict(guard.node_banks)  # the registered banks', if given
    for _, node, content in recording.replies if not guard.registered else ():
        for record in content.config_records.values():
            if isinstance(record.get(keys.BANK_ID), int):
                node_to_bank[node] = record[keys.BANK_ID]
    guard.ledger[:0] = recording.ledger(node_to_bank)
    guard.refused[:0] = [{"round": server_round, "bank": node_to_bank.get(node),
                          "message": f"train (SecAgg+ {stage})", "why": why}
                         for server_round, node, stage, why in recording.refused]

    fit_history = legacy.history.metrics_distributed_fit
    rounds = sorted({r for values in fit_history.values() for r, _ in values})
    return Result(
        arrays=arrays,
        train_metrics_clientapp={r: MetricRecord({
            key: value for key, values in fit_history.items() for rr, value in values
            if rr == r}) for r in rounds},
        evaluate_metrics_clientapp={},
    )
