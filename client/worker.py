"""A bank's warm worker: the bank's data and torch stay loaded between messages.

Flower's deployment engine starts a fresh ClientApp process for every message; with
torch, scikit-learn and the bank's data to load, that costs seconds per message. The
bank runs this worker beside its SuperNode instead: it reads only that bank's shard,
keeps its scaler in memory, and serves the thin ClientApp over a Unix socket that only
processes holding the bank's key file (0600, beside the socket) can use. What it
returns is exactly what the ClientApp would have computed itself: weights and counts.

    fedfraud bank-worker --bank-id 3 --shard data/bank_03.csv --socket /run/bank_03.sock
"""

from __future__ import annotations

import os
import secrets
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.config import Config

if TYPE_CHECKING:
    from client.bank import Arrays, Bank


class WorkerError(RuntimeError):
    """The worker failed a request; the message is the worker's error."""


def key_file(socket: Path) -> Path:
    return socket.with_name(socket.name + ".key")


class WorkerBank:
    """The ClientApp's handle on a warm worker: the same calls as ``Bank``."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket

    def _call(self, method: str, *args: Any) -> Any:
        with Client(str(self.socket), family="AF_UNIX",
                    authkey=key_file(self.socket).read_bytes()) as conn:
            conn.send((method, *args))
            ok, value = conn.recv()
        if not ok:
            raise WorkerError(value)
        return value

    def train(self, arrays: Arrays, config: Config, server_round: int,
              evaluate_incoming: bool, proximal_mu: float = 0.0,
              ) -> tuple[Arrays, dict[str, Any]]:
        return self._call("train", arrays, config.as_run_config(), server_round,
                          evaluate_incoming, proximal_mu)

    def evaluate(self, arrays: Arrays, config: Config, audit: bool = False,
                 ) -> dict[str, Any]:
        return self._call("evaluate", arrays, config.as_run_config(), audit)


def serve(bank_id: int, shard: Path, socket: Path, state_dir: Path | None = None) -> None:
    """Answer the bank's ClientApps until killed."""
    socket.unlink(missing_ok=True)
    old_umask = os.umask(0o077)  # socket and key readable by the bank's user only
    try:
        key_file(socket).write_bytes(secrets.token_bytes(32))
        listener = Listener(str(socket), family="AF_UNIX",
                            authkey=key_file(socket).read_bytes())
    finally:
        os.umask(old_umask)
    from client.bank import Bank  # after listening: requests queue while torch loads

    bank: Bank | None = None

    def answer(method: str, arrays: Arrays, run_config: dict[str, Any], *rest: Any) -> Any:
        nonlocal bank
        config = Config.from_run_config(run_config)
        if bank is None or not bank.serves(config):  # first run, or new settings
            bank = Bank(bank_id, shard, config, state_dir=state_dir)
            bank.keep_scaler()
        if method == "train":
            return bank.train(arrays, config, *rest)
        if method == "evaluate":
            return bank.evaluate(arrays, config, *rest)
        raise ValueError(f"unknown request {method!r}")

    print(f"bank {bank_id}: worker ready on {socket}", flush=True)
    with listener:
        while True:
            try:
                conn = listener.accept()
            except (AuthenticationError, EOFError, OSError):
                continue  # a caller without the bank's key, or one that hung up
            with conn:
                try:
                    request = conn.recv()
                except (EOFError, OSError):
                    continue
                try:
                    reply = (True, answer(*request))
                except Exception as err:  # noqa: BLE001 - reported to the ClientApp
                    reply = (False, f"{type(err).__name__}: {err}")
                try:
                    conn.send(reply)
                except OSError:
                    pass  # the ClientApp went away; Flower reports its failure
