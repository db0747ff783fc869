"""Flower's SuperNode, as ``flower-supernode`` runs it, without its fixed idle waits.

Flower 1.39's SuperNode loop (``flwr.supernode.start_client_internal``) sleeps a
hard-coded 3 s whenever its pull from the SuperLink comes back empty, and waits for a
ClientApp's reply in 0.5 s steps: the last of ten banks picks a message up ~2.7 s
late on average, every exchange. This entry point runs Flower's unchanged SuperNode
with that one module's ``time.sleep`` capped at ``PROMPT_S``; everything else (gRPC,
TLS, authentication, heartbeats, retries) is Flower's as it ships.
``tests/test_bank_boundary.py`` fails if a Flower upgrade changes those sleeps.

    python -m client.supernode <flower-supernode arguments>
"""

from __future__ import annotations

import sys
import time
from types import SimpleNamespace

PROMPT_S = 0.1  # ten banks polling: ~100 small gRPC calls a second at the SuperLink


def prompt_time() -> SimpleNamespace:
    """The ``time`` module as the SuperNode loop sees it: its sleeps capped."""
    names = {name: getattr(time, name) for name in dir(time) if not name.startswith("__")}
    names["sleep"] = lambda seconds: time.sleep(min(seconds, PROMPT_S))
    return SimpleNamespace(**names)


def main() -> None:
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    start_client_internal.time = prompt_time()  # type: ignore[assignment]
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
