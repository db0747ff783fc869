"""Flower's SuperNode, as ``flower-supernode`` runs it, without its fixed waits.

Flower 1.39's SuperNode loop (``flwr.supernode.start_client_internal``) sleeps a
hard-coded 3 s whenever its pull from the SuperLink comes back empty, and waits for a
ClientApp's reply in 0.5 s steps: the last of ten banks picks a message up ~2.7 s
late on average, every exchange. This entry point runs Flower's unchanged SuperNode
with that one module's ``time.sleep`` replaced:

- an idle pull waits 0.05 s after a message, doubling while none comes, up to 0.4 s (a
  message that comes within ~0.3 s of the last is picked up within 0.05-0.2 s, a later
  one within 0.4 s, Flower's 3 s otherwise; an idle bank pulls ~2.5 times a second);
- a reply wait (the loop has just stored a message as a task) rings the executor's
  doorbell once, so the executor takes the task at once instead of polling for it, and
  waits on the SuperNode's own doorbell, which the executor rings when a task ends:
  the reply goes out the moment it is there, with no polling on either side.

A message pulled before all its objects were uploaded is pulled again after 0.05 s,
doubling, instead of Flower's 1 s (``common.processes.retry_object_pulls_promptly``).
Everything else (gRPC, TLS, authentication, heartbeats, retries, the Runtime API the
executor takes the task from) is Flower's as it ships.
``tests/test_bank_boundary.py`` fails if a Flower upgrade changes those sleeps.

    python -m client.supernode --bells DIR <flower-supernode arguments>
"""

from __future__ import annotations

import os
import select
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from common.processes import Backoff, retry_object_pulls_promptly

FLOWER_IDLE_S = 3  # Flower's wait after an empty pull; its reply waits are 0.5 s
TASK_BELL = "task.bell"  # the SuperNode rings it: a task waits for the executor
REPLY_BELL = "reply.bell"  # the executor rings it: a task ended, its reply is stored


class Doorbell:
    """A named pipe (in the bank's private folder) one process rings and another
    waits on. Both ends open it read-write and non-blocking, so neither waits for the
    other to exist, and either may restart; a ring nobody waits for is kept (one
    byte) and ends the next wait at once."""

    def __init__(self, path: Path) -> None:
        try:
            os.mkfifo(path, 0o600)
        except FileExistsError:
            pass
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)

    def ring(self) -> None:
        try:
            os.write(self.fd, b"\0")
        except BlockingIOError:  # the pipe is full of rings: it rings already
            pass

    def wait(self, timeout_s: float, *also: int) -> bool:
        """Wait until rung (or one of the file descriptors ``also`` is readable) or
        ``timeout_s`` passes; whether the bell rang. Clears the bell."""
        ready, _, _ = select.select([self.fd, *also], [], [], timeout_s)
        rang = self.fd in ready
        if rang:
            try:
                while os.read(self.fd, 4096):
                    pass
            except BlockingIOError:
                pass
        return rang


def prompt_time(idle_wait: Backoff, tasks: Doorbell, replies: Doorbell) -> SimpleNamespace:
    """The ``time`` module as the SuperNode loop sees it: its sleeps shortened."""
    told = False  # the executor was told of the message being answered

    def sleep(seconds: float) -> None:
        nonlocal told
        if seconds >= FLOWER_IDLE_S:
            told = False
            idle_wait.sleep()
        else:  # a message is being answered: the next pull comes soon after
            idle_wait.active()
            if not told:  # once a message: each ring costs the executor a Runtime API call
                tasks.ring()
                told = True
            if replies.wait(seconds):  # a task ended: the next message rings anew
                told = False

    names = {name: getattr(time, name) for name in dir(time) if not name.startswith("__")}
    return SimpleNamespace(**{**names, "sleep": sleep})


def main() -> None:
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    if sys.argv[1:2] != ["--bells"]:
        raise SystemExit("usage: python -m client.supernode --bells DIR "
                         "<flower-supernode arguments>")
    bells = Path(sys.argv[2])
    # Each pull is a signed gRPC call the SuperLink verifies.
    idle_wait = Backoff(busy_s=0.05, idle_s=0.4)
    start_client_internal.time = prompt_time(  # type: ignore[assignment]
        idle_wait, Doorbell(bells / TASK_BELL), Doorbell(bells / REPLY_BELL))
    retry_object_pulls_promptly(start_client_internal)
    sys.argv[:3] = ["flower-supernode"]
    flower_supernode()


if __name__ == "__main__":
    main()
