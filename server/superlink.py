"""Flower's SuperLink, as ``flower-superlink`` runs it, refusing a reply pushed in
another node's name.

With bank authentication (``--enable-supernode-auth``) Flower 1.39's SuperLink checks
that each Fleet request's node id is the one registered for the key that signed it.
It then stores a pushed reply if the reply names, as its sender, the node its
instruction went to (``store_message_res``), but it does not check that this is the
node that pushed it. A bank that knew another bank's node id and the creation time of
that bank's instruction (its message id is a hash over both and content every bank
receives alike) could answer in the other bank's name, and the honest answer would
then be rejected as a duplicate. The ServerApp reads a reply from its uploaded message
object, whose metadata the request's copy need not match. ``sent_by_its_sender``
refuses a push whose reply names another sender than the pushing node, or whose
message id (the object the ServerApp will read) is not the object of the request's own
metadata; the ServerApp's guard then binds each reply's bank id to that node
(server/strategy.py).

Everything else is Flower's as it ships. ``tests/test_operator.py`` fails if a Flower
upgrade moves what this relies on.

    python -m server.superlink <flower-superlink arguments>
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class NotTheSender(ValueError):
    """A pushed reply is not in its pushing node's own name (its metadata, or the
    message object the ServerApp will read)."""


def message_object_id(message: Any, tree: Any) -> str:
    """The id of the message object a pushed reply's ``message`` (its proto, content
    removed, as a SuperNode pushes it) and object ``tree`` stand for: Flower's own
    ``Message.deflate`` of it, with the header naming the tree's children (the content
    the SuperNode removed before pushing)."""
    from flwr.common.serde import message_from_proto
    from flwr.supercore.constant import HEAD_BODY_DIVIDER, HEAD_VALUE_DIVIDER
    from flwr.supercore.inflatable.inflatable_object import get_object_body, get_object_id

    reply = message_from_proto(message)
    body = get_object_body(reply.deflate(), type(reply))
    children = ",".join(child.object_id for child in tree.children)
    header = f"Message{HEAD_VALUE_DIVIDER}{children}{HEAD_VALUE_DIVIDER}{len(body)}"
    return get_object_id(header.encode() + HEAD_BODY_DIVIDER + body)


def sent_by_its_sender(push: Callable[..., Any]) -> Callable[..., Any]:
    """Flower's Fleet ``push_messages`` handler, refusing a request whose replies name
    another sender than the request's (authenticated) node, or whose message object is
    not the one their metadata describe."""

    def push_messages(request: Any, state: Any) -> Any:
        if len(request.messages_list) != len(request.message_object_trees):
            raise NotTheSender("a push whose replies and object trees do not pair up")
        for message, tree in zip(request.messages_list, request.message_object_trees):
            if message.metadata.src_node_id != request.node.node_id:
                raise NotTheSender(f"node {request.node.node_id} pushed a reply in the "
                                   f"name of node {message.metadata.src_node_id}")
            if not message.metadata.message_id == tree.object_id == message_object_id(
                    message, tree):
                raise NotTheSender(f"node {request.node.node_id} pushed a reply whose "
                                   "message object is not the one its metadata describe")
        return push(request=request, state=state)

    return push_messages


def main() -> None:
    from flwr.server.superlink.fleet.message_handler import message_handler
    from flwr.superlink.cli.flower_superlink import flower_superlink

    message_handler.push_messages = sent_by_its_sender(message_handler.push_messages)
    flower_superlink()


if __name__ == "__main__":
    main()
