"""Poisoned updates, for testing the server's defences (``attack``/``attackers``).

An update is the difference between the weights a bank trained and the global weights
it received. An attacking bank sends, instead of its trained weights:
- "scale": global + attack-scale x update (boosts its own update),
- "sign-flip": global - attack-scale x update (pushes the model the wrong way),
- "nan" / "inf": weights that are not numbers (a broken or hostile bank);
- "secagg-malformed" (with secure-aggregation): SecAgg+ replies in a form Flower's
  workflow does not expect, one stage per round (``malformed_secagg``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from flwr.app import Message

Arrays = dict[str, np.ndarray]
POISONS = ("scale", "sign-flip", "nan", "inf")  # the attacks on a bank's update


def poison(incoming: Arrays, trained: Arrays, attack: str, scale: float) -> Arrays:
    if attack == "scale":
        return {k: incoming[k] + scale * (trained[k] - incoming[k]) for k in trained}
    if attack == "sign-flip":
        return {k: incoming[k] - scale * (trained[k] - incoming[k]) for k in trained}
    if attack in ("nan", "inf"):
        return {k: np.full_like(v, np.nan if attack == "nan" else np.inf)
                for k, v in trained.items()}
    raise ValueError(f"unknown attack {attack!r}")


def malformed_secagg(reply: Message) -> Message:
    """The bank's SecAgg+ reply broken in round r's form: round 1 a public key that is
    no key, round 2 one ciphertext short of its destinations, round 3 a masked vector of
    another shape, round 4 shares that are not Shamir shares; later rounds cycle."""
    from flwr.common import ndarray_to_bytes
    from flwr.common.secure_aggregation.secaggplus_constants import (
        RECORD_KEY_CONFIGS, Key, Stage,
    )

    record = reply.content.config_records[RECORD_KEY_CONFIGS]
    stage = Stage.all()[(int(reply.metadata.group_id) - 1) % 4]
    if stage == Stage.SETUP and Key.PUBLIC_KEY_1 in record:
        record[Key.PUBLIC_KEY_1] = b"not a key"
    elif stage == Stage.SHARE_KEYS and Key.CIPHERTEXT_LIST in record:
        record[Key.CIPHERTEXT_LIST] = list(record[Key.CIPHERTEXT_LIST])[:-1]
    elif stage == Stage.COLLECT_MASKED_VECTORS and Key.MASKED_PARAMETERS in record:
        factor = list(record[Key.MASKED_PARAMETERS])[0]
        record[Key.MASKED_PARAMETERS] = [factor, ndarray_to_bytes(np.zeros(3, np.int64))]
    elif stage == Stage.UNMASK and Key.SHARE_LIST in record:
        record[Key.SHARE_LIST] = [b"\0" * 5 for _ in record[Key.SHARE_LIST]]
    return reply
