"""Poisoned updates, for testing the server's defences (``attack``/``attackers``).

An update is the difference between the weights a bank trained and the global weights
it received. An attacking bank sends, instead of its trained weights:
- "scale": global + attack-scale x update (boosts its own update),
- "sign-flip": global - attack-scale x update (pushes the model the wrong way),
- "nan" / "inf": weights that are not numbers (a broken or hostile bank).
"""

from __future__ import annotations

import numpy as np

Arrays = dict[str, np.ndarray]


def poison(incoming: Arrays, trained: Arrays, attack: str, scale: float) -> Arrays:
    if attack == "scale":
        return {k: incoming[k] + scale * (trained[k] - incoming[k]) for k in trained}
    if attack == "sign-flip":
        return {k: incoming[k] - scale * (trained[k] - incoming[k]) for k in trained}
    if attack in ("nan", "inf"):
        return {k: np.full_like(v, np.nan if attack == "nan" else np.inf)
                for k, v in trained.items()}
    raise ValueError(f"unknown attack {attack!r}")
