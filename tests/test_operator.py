"""The operator's side: the prompt grid, the wait for banks, failing flwr commands."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from server.app import wait_for_banks
from server.grid import POLL_S, PromptGrid


class ScriptedGrid:
    """Replies to pushed messages arrive at set times after the push."""

    def __init__(self, delays: dict[str, float], nodes: int = 10) -> None:
        self.delays, self.nodes, self.pulls = delays, nodes, 0

    def push_messages(self, messages: list[str]) -> list[str]:
        self.pushed = time.monotonic()
        return list(messages)

    def pull_messages(self, ids: set[str]) -> list[SimpleNamespace]:
        self.pulls += 1
        now = time.monotonic() - self.pushed
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i))
                for i in sorted(ids) if self.delays[i] <= now]

    def get_node_ids(self) -> list[int]:
        return list(range(self.nodes))


def test_replies_are_collected_as_soon_as_they_arrive() -> None:
    grid = ScriptedGrid({"a": 0.0, "b": 0.2, "c": 0.35})
    started = time.monotonic()

    replies = PromptGrid(grid).send_and_receive(["a", "b", "c"], timeout=10)

    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b", "c"]
    assert time.monotonic() - started < 0.35 + 2 * POLL_S + 0.2  # not Flower's 3 s steps


def test_a_missing_reply_ends_at_the_timeout_with_the_others() -> None:
    replies = PromptGrid(ScriptedGrid({"a": 0.0, "b": 99.0})).send_and_receive(
        ["a", "b"], timeout=0.3)
    assert [r.metadata.reply_to_message_id for r in replies] == ["a"]


def test_a_deployment_s_grid_pulls_a_half_uploaded_reply_again_promptly(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Only around Flower's HttpGrid (a deployment), not a simulation's grid."""
    from flwr.superlink.grid import http_grid

    from common.processes import OBJECT_RETRY_S

    monkeypatch.setattr(http_grid, "pull_objects", http_grid.pull_objects)
    PromptGrid(ScriptedGrid({}))
    assert not hasattr(http_grid.pull_objects, "keywords")
    PromptGrid(http_grid.HttpGrid.__new__(http_grid.HttpGrid))
    assert http_grid.pull_objects.keywords == {"initial_backoff": OBJECT_RETRY_S}


def test_too_few_banks_fail_fast_with_the_fix_in_the_message() -> None:
    with pytest.raises(RuntimeError, match='only 2 of the 10 banks .*num-supernodes=10'):
        wait_for_banks(ScriptedGrid({}, nodes=2), 10, 0.2)
    assert wait_for_banks(ScriptedGrid({}, nodes=10), 10, 0.2) == 10


def test_a_flwr_command_that_reports_failure_raises(tmp_path) -> None:
    """``flwr`` exits 0 with {"success": false} when the SuperLink is unreachable: a
    bank's registration must not look like it succeeded."""
    from common.processes import flower_env, free_port
    from server.launch import FlowerCommandError, flwr_json, write_connection

    from client.identity import ensure_key_pair

    write_connection(tmp_path, "nowhere", f"127.0.0.1:{free_port()}")
    public = ensure_key_pair(tmp_path / "keys", 0)
    with pytest.raises(FlowerCommandError, match="unavailable"):
        flwr_json(flower_env(tmp_path), "supernode", "register", str(public), "nowhere")


def test_a_bank_registration_that_fails_is_one_line_naming_the_key(tmp_path) -> None:
    """The operator registers the banks' keys in-process with Flower's CLI functions:
    an unreachable SuperLink or a file that is no bank's public key is one error naming
    the key (Flower's own check would ``flwr_exit``, and end the operator's process
    seconds later, also when caught), and FLWR_HOME is as before."""
    import os
    import threading

    from common.processes import free_port
    from server.launch import FlowerCommandError, register_banks, write_connection

    from client.identity import ensure_key_pair

    write_connection(tmp_path, "nowhere", f"127.0.0.1:{free_port()}")
    public = ensure_key_pair(tmp_path / "keys", 0)
    before, threads = os.environ.get("FLWR_HOME"), threading.active_count()
    with pytest.raises(FlowerCommandError, match=f"{public}: .*refused"):
        register_banks(tmp_path, "nowhere", [public])
    (tmp_path / "not-a-key.pub").write_text("ssh-rsa nonsense\n")
    with pytest.raises(FlowerCommandError, match="not-a-key.pub: not a bank's public key"):
        register_banks(tmp_path, "nowhere", [tmp_path / "not-a-key.pub"])
    assert os.environ.get("FLWR_HOME") == before
    assert threading.active_count() == threads  # no flwr_exit timer counting down


def test_bank_keys_for_no_bank_or_one_bank_twice_are_one_line(tmp_path) -> None:
    """The run learns which bank each registered node is from the folder each key came
    in (``bank_NN``: the operator's record, not the bank's word): a key outside such a
    folder, or two keys for one bank, is an error naming the files, before the
    SuperLink is asked."""
    from common.processes import free_port
    from server.launch import FlowerCommandError, bank_nodes, write_connection

    from client.identity import ensure_key_pair

    write_connection(tmp_path, "nowhere", f"127.0.0.1:{free_port()}")
    first, second = (ensure_key_pair(tmp_path / outbox / "bank_03" / "keys", 3)
                     for outbox in ("a", "b"))
    with pytest.raises(FlowerCommandError, match="for the same bank"):
        bank_nodes(tmp_path, "nowhere", [first, second])
    stray = ensure_key_pair(tmp_path / "stray", 4)  # its comment says bank-4: not enough
    with pytest.raises(FlowerCommandError, match=f"{stray}: no folder bank_NN"):
        bank_nodes(tmp_path, "nowhere", [first, stray])
    with pytest.raises(FlowerCommandError, match="flwr supernode list: .*"):
        bank_nodes(tmp_path, "nowhere", [first])


def test_the_superlink_refuses_a_reply_pushed_in_another_nodes_name(monkeypatch) -> None:
    """Flower 1.39 stores a pushed reply that names, as its sender, the node its
    instruction went to, without checking that node pushed it, and the ServerApp reads
    the reply from the message object the request names, whose metadata the request's
    copy need not match. So node A could answer B's instruction in B's name, or answer
    its own with an object saying it comes from B. fedfraud's SuperLink
    (server/superlink.py) refuses both; honest replies, with content or an error, go
    through. Run against Flower's own Fleet handler and in-memory state; fails if a
    Flower upgrade moves the handler the servicer calls or how a message's id is made."""
    import inspect

    from flwr.app import Error, Message, Metadata, MetricRecord, RecordDict
    from flwr.app.message.message import remove_content_from_message
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.common.serde import message_to_proto
    from flwr.proto.fleet_pb2 import PushMessagesRequest
    from flwr.proto.node_pb2 import Node
    from flwr.server.superlink.fleet.grpc_rere.fleet_servicer import FleetServicer
    from flwr.server.superlink.fleet.message_handler import message_handler
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
    from flwr.supercore.date import now
    from flwr.supercore.inflatable.inflatable_object import get_object_tree
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation.noop_federation_manager import NoOpFederationManager

    from server.superlink import NotTheSender, sent_by_its_sender

    # What the servicer calls, looked up on the module at each push: what main() swaps.
    assert "message_handler.push_messages(" in inspect.getsource(FleetServicer.PushMessages)
    state = InMemoryLinkState(NoOpFederationManager(), ObjectStoreFactory().store())
    a, b = (state.create_node("x", "x", key * 97, 30.0) for key in (b"A", b"B"))
    for node in (a, b):
        state.activate_node(node, 30.0)
    run_id = state.create_run(None, None, None, {}, "@none/default", None, None, "serverapp")
    monkeypatch.setattr(message_handler, "check_abort", lambda *args, **kwargs: None)

    def instruction(to: int) -> tuple[Message, str]:
        message = Message(metadata=Metadata(
            run_id=run_id, message_id="", src_node_id=SUPERLINK_NODE_ID, dst_node_id=to,
            reply_to_message_id="", group_id="1", created_at=now().timestamp(), ttl=3600,
            message_type="train"), content=RecordDict({"config": MetricRecord({"x": 1})}))
        message.metadata.__dict__["_message_id"] = message.object_id
        return message, state.store_message_ins(message)

    def reply(to: Message, content: RecordDict | Error, sender: int | None = None) -> Message:
        message = Message(content, reply_to=to)  # as a SuperNode makes it
        if sender is not None:
            message.metadata.__dict__["_src_node_id"] = sender
        message.metadata.__dict__["_message_id"] = message.object_id
        return message

    def push(by: int, message: Message, tree_of: Message | None = None) -> None:
        sent_by_its_sender(message_handler.push_messages)(PushMessagesRequest(
            node=Node(node_id=by), messages_list=[message_to_proto(
                remove_content_from_message(message))],
            message_object_trees=[get_object_tree(tree_of or message)]), state)

    to_b, b_id = instruction(b)
    with pytest.raises(NotTheSender, match=f"node {a} pushed a reply in the name of node {b}"):
        push(a, reply(to_b, RecordDict({"metrics": MetricRecord({"bank-id": 7})})))
    to_a, _ = instruction(a)
    in_bs_name = reply(to_a, RecordDict({"metrics": MetricRecord({"bank-id": 7})}), sender=b)
    own = reply(to_a, RecordDict({"metrics": MetricRecord({"bank-id": 7})}))
    own.metadata.__dict__["_message_id"] = in_bs_name.object_id  # what the ServerApp reads
    with pytest.raises(NotTheSender, match="message object is not the one its metadata"):
        push(a, own, tree_of=in_bs_name)

    honest = reply(to_b, RecordDict({"metrics": MetricRecord({"bank-id": 2})}))
    push(b, honest)
    [stored] = state.get_message_res({b_id}, run_id)  # its objects follow by PushObject
    assert (stored.metadata.src_node_id, stored.metadata.message_id) == (b, honest.object_id)
    push(a, reply(to_a, Error(code=0, reason="the bank refused")))  # an error reply
