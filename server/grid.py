"""The ServerApp's grid, collecting the banks' replies as soon as they arrive.

Flower 1.39's ``HttpGrid.send_and_receive`` (what every strategy calls) sleeps a fixed
3 s between polls for replies; a round whose last bank answers just after a poll waits
up to 3 s more, every exchange. ``PromptGrid`` does the same through the grid's public
``push_messages``/``pull_messages``, polling every ``POLL_S``. It wraps whichever grid
Flower hands the ServerApp (deployment or simulation) and changes nothing else, but,
for a deployment's ``HttpGrid``, how soon a reply polled while its objects were still
being uploaded is pulled again (``common.processes.retry_object_pulls_promptly``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from common.processes import retry_object_pulls_promptly

POLL_S = 0.05  # one cheap local HTTP call per poll


class PromptGrid(Grid):
    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        # A deployment's grid is an HttpGrid, so its module is imported already.
        http_grid = sys.modules.get("flwr.superlink.grid.http_grid")
        if http_grid is not None and isinstance(grid, http_grid.HttpGrid):
            retry_object_pulls_promptly(http_grid)

    @property
    def run(self) -> Any:
        return self.grid.run

    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Push, then pull until every reply is in or ``timeout`` has passed."""
        waiting = set(self.grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting and (deadline is None or time.monotonic() < deadline):
            arrived = list(self.grid.pull_messages(waiting))
            replies += arrived
            waiting -= {reply.metadata.reply_to_message_id for reply in arrived}
            if waiting:
                time.sleep(POLL_S)
        return replies
