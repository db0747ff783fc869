"""Flower's SuperNode, as ``flower-supernode`` runs it, without its fixed idle waits.

Flower 1.39's SuperNode loop (``flwr.supernode.start_client_internal``) sleeps a
hard-coded 3 s whenever its pull from the SuperLink comes back empty, and waits for a
ClientApp's reply in 0.5 s steps: the last of ten banks picks a message up ~2.7 s
late on average, every exchange. This entry point runs Flower's unchanged SuperNode
with that one module's ``time.sleep`` replaced: a reply wait takes ``REPLY_S``; an idle
pull waits 0.05 s after a message, doubling while none comes, up to 0.4 s (``main``: a
message that comes within ~0.3 s of the last is picked up within 0.05-0.2 s, a later one
within 0.4 s, Flower's 3 s otherwise; an idle bank pulls ~2.5 times a second, not ten).
Everything else (gRPC, TLS, authentication, heartbeats, retries) is Flower's as
it ships.
``tests/test_bank_boundary.py`` fails if a Flower upgrade changes those sleeps.

    python -m client.supernode <flower-supernode arguments>
"""

from __future__ import annotations

import sys
import time
from types import SimpleNamespace

from common.processes import Backoff

FLOWER_IDLE_S = 3  # Flower's wait after an empty pull; its reply waits are 0.5 s
# Between checks of the SuperNode's own state for a task's reply: at 0.02 s the ten
# banks' SuperNodes took 3.2 CPU-seconds a round, at 0.1 s 2.7 (make bench-deploy).
REPLY_S = 0.1


def prompt_time(idle_wait: Backoff) -> SimpleNamespace:
    """The ``time`` module as the SuperNode loop sees it: its sleeps shortened."""

    def sleep(seconds: float) -> None:
        if seconds >= FLOWER_IDLE_S:
            idle_wait.sleep()
        else:  # a message is being answered: the next pull comes soon after
            idle_wait.active()
            time.sleep(min(seconds, REPLY_S))

    names = {name: getattr(time, name) for name in dir(time) if not name.startswith("__")}
    return SimpleNamespace(**{**names, "sleep": sleep})


def main() -> None:
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    # Each pull is a signed gRPC call the SuperLink verifies.
    idle_wait = Backoff(busy_s=0.05, idle_s=0.4)
    start_client_internal.time = prompt_time(idle_wait)  # type: ignore[assignment]
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
