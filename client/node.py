"""One bank's processes: Flower's SuperNode and the bank's own task executor.

The SuperNode (Flower's, started as ``client.supernode``: without its fixed idle
waits; ``--isolation process``) keeps the bank's gRPC link to the SuperLink
(TLS, the bank's own key) and serves its Runtime API on 127.0.0.1 only, behind a
SuperExec auth secret made here (0600, in a private temporary folder); the executor
(client/executor.py) is the only process that takes tasks from it, and it runs only
apps the bank's policy approves. The two ring each other's doorbell (named pipes in
the same private folder) instead of polling each other. The SuperNode is told its bank's files through its
node config (set here, by the bank; never by the server).
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from client.identity import PRIVATE_KEY, ensure_key_pair
from client.policy import POLICY_FILE
from common.files import write_private
from common.processes import BIN, Services, free_port, port_in_use, services, stop

RESTART_S = 3.0  # a SuperNode that stopped (e.g. its key is not registered yet) retries


@dataclass(frozen=True)
class BankFiles:
    """Where a bank keeps its things: its folder (transactions, schema, policy), its
    writable state (scaler, privacy ledger, key pair) and the app it installed."""

    bank_id: int
    bank_dir: Path
    state_dir: Path
    app_dir: Path

    @property
    def shard(self) -> Path:
        return self.bank_dir / "transactions.csv"

    @property
    def policy(self) -> Path:
        return self.bank_dir / POLICY_FILE

    @property
    def key_dir(self) -> Path:
        return self.state_dir / "keys"

    @property
    def name(self) -> str:
        return f"bank {self.bank_id}"

    def node_config(self) -> str:
        values = {"bank-id": self.bank_id, "shard": str(self.shard),
                  "state": str(self.state_dir), "policy": str(self.policy)}
        return " ".join(f"{key}={json.dumps(value)}" for key, value in values.items())


def supernode_command(bank: BankFiles, superlink: str, ca: Path | None,
                      runtime_port: int, secret: Path) -> list[str]:
    transport = (["--insecure"] if ca is None else
                 ["--root-certificates", str(ca),
                  "--auth-supernode-private-key", str(bank.key_dir / PRIVATE_KEY)])
    return [sys.executable, "-m", "client.supernode", "--bells", str(secret.parent),
            *transport, "--superlink", superlink,
            "--isolation", "process", "--host", "127.0.0.1", "--port", str(runtime_port),
            "--superexec-auth-secret-file", str(secret),
            "--node-config", bank.node_config()]


def start_executor(started: Services, bank: BankFiles, runtime_port: int,
                   secret: Path) -> subprocess.Popen[bytes]:
    return started.start("executor", [
        str(BIN / "fedfraud-bank"), "executor", "--bank-id", str(bank.bank_id),
        "--bank-dir", str(bank.bank_dir), "--app-dir", str(bank.app_dir),
        "--runtime", f"127.0.0.1:{runtime_port}", "--secret-file", str(secret),
        "--bells", str(secret.parent)])


def run(bank: BankFiles, superlink: str, ca: Path | None, flwr_home: Path,
        outbox: Path | None = None) -> int:
    """Serve the bank until killed: its key pair (made here if missing; the public key
    copied to ``outbox`` for the operator), its SuperNode and its executor."""
    public = ensure_key_pair(bank.key_dir, bank.bank_id)
    if outbox is not None:
        outbox.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(public, outbox / public.name)
    with services(flwr_home) as started, tempfile.TemporaryDirectory(
            prefix="fedfraud-bank-") as private:
        secret = Path(private) / "superexec.secret"
        write_private(secret, secrets.token_bytes(32))
        runtime_port = free_port()
        node = started.start("supernode", supernode_command(bank, superlink, ca,
                                                            runtime_port, secret))
        executor = start_executor(started, bank, runtime_port, secret)
        print(f"fedfraud-bank: {bank.name} serving {bank.shard} via {superlink} "
              f"(logs in {started.log_dir})", flush=True)
        while True:
            if node.poll() is not None:  # e.g. not registered yet: try again
                print(f"fedfraud-bank: {bank.name}: SuperNode stopped "
                      f"(code {node.returncode}); retrying", flush=True)
                started.processes.remove(node)
                if port_in_use(runtime_port):
                    # Another process took the Runtime API's port between free_port()
                    # and the SuperNode's bind (any outgoing connection may): a new
                    # port, and an executor that talks to it, not to the stranger.
                    stop(executor)
                    started.processes.remove(executor)
                    runtime_port = free_port()
                    executor = start_executor(started, bank, runtime_port, secret)
                time.sleep(RESTART_S)
                node = started.start("supernode", supernode_command(
                    bank, superlink, ca, runtime_port, secret))
            elif executor.poll() is not None:
                break
            time.sleep(0.5)
        print(f"fedfraud-bank: {bank.name}: executor stopped; see {started.log_dir}",
              file=sys.stderr, flush=True)
        return 1

