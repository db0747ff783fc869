"""Flower's SuperLink, as ``flower-superlink`` runs it, refusing a reply pushed in
another node's name.

With bank authentication (``--enable-supernode-auth``) Flower 1.39's SuperLink checks
that each Fleet request's node id is the one registered for the key that signed it.
It then stores a pushed reply if the reply names, as its sender, the node its
instruction went to (``store_message_res``), but it does not check that this is the
node that pushed it. A bank that knew another bank's node id and the creation time of
that bank's instruction (its message id is a hash over both and content every bank
receives alike) could answer in the other bank's name, and the honest answer would
then be rejected as a duplicate. ``sent_by_its_sender`` refuses a push whose replies
name another sender than the pushing node; the ServerApp's guard then binds each
reply's bank id to that node (server/strategy.py).

Everything else is Flower's as it ships. ``tests/test_operator.py`` fails if a Flower
upgrade moves what this relies on.

    python -m server.superlink <flower-superlink arguments>
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class NotTheSender(ValueError):
    """A pushed reply names another node than the one that pushed it."""


def sent_by_its_sender(push: Callable[..., Any]) -> Callable[..., Any]:
    """Flower's Fleet ``push_messages`` handler, refusing a request whose replies name
    another sender than the request's (authenticated) node."""

    def push_messages(request: Any, state: Any) -> Any:
        for message in request.messages_list:
            if message.metadata.src_node_id != request.node.node_id:
                raise NotTheSender(f"node {request.node.node_id} pushed a reply in the "
                                   f"name of node {message.metadata.src_node_id}")
        return push(request=request, state=state)

    return push_messages


def main() -> None:
    from flwr.server.superlink.fleet.message_handler import message_handler
    from flwr.superlink.cli.flower_superlink import flower_superlink

    message_handler.push_messages = sent_by_its_sender(message_handler.push_messages)
    flower_superlink()


if __name__ == "__main__":
    main()
