"""The operator's processes: a SuperLink, bank registration, ``flwr run``, its outcome.

Banks start their own processes (client/node.py); ``fedfraud deploy`` starts each bank
as the bank's own command, ``fedfraud-bank run``, and never holds a bank's private key.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.files import bundle_files
from common.processes import BIN, Services, free_port, stop, wait_for_port
from server.certs import SERVER_CA, SERVER_CERT, SERVER_KEY

SHOWN = re.compile(r"\bfedfraud[ :]|ERROR|Traceback")  # what a run's stream shows


def start_simulation_superlink(started: Services) -> str:
    """A SuperLink in simulation mode on a free port; returns its control address."""
    port = free_port()
    process = started.start("superlink", [
        str(BIN / "flower-superlink"), "--insecure", "--simulation",
        "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
        "--port", str(port),
    ])
    wait_for_port(port, 30.0, process)
    return f"127.0.0.1:{port}"


@dataclass(frozen=True)
class Tls:
    """TLS on every SuperLink API plus bank authentication (``fedfraud certs``)."""

    certs: Path

    def superlink_args(self) -> list[str]:
        return ["--ssl-ca-certfile", str(self.certs / SERVER_CA),
                "--ssl-certfile", str(self.certs / SERVER_CERT),
                "--ssl-keyfile", str(self.certs / SERVER_KEY), "--enable-supernode-auth"]



def transport_args(tls: Tls | None) -> list[str]:
    return ["--insecure"] if tls is None else tls.superlink_args()


def start_deployment_superlink(started: Services, tls: Tls | None, fleet_port: int,
                               control_port: int, *, wait: bool = True,
                               ) -> subprocess.Popen[bytes]:
    """A SuperLink whose Fleet API (the banks' link) is gRPC on ``fleet_port``: Flower's,
    refusing a reply pushed in another node's name (server/superlink.py). Without
    ``wait`` it returns as soon as the process is started (``superlink_up`` waits)."""
    process = started.start("superlink", [
        sys.executable, "-m", "server.superlink", *transport_args(tls),
        "--disable-runtime-dependency-installation",
        "--fleet-api-address", f"127.0.0.1:{fleet_port}",
        "--host", "127.0.0.1", "--port", str(control_port),
    ])
    if wait:
        superlink_up(process, fleet_port, control_port)
    return process


def superlink_up(process: subprocess.Popen[bytes], fleet_port: int, control_port: int,
                 ) -> None:
    """Wait until the SuperLink serves both its APIs (RuntimeError if it exits)."""
    wait_for_port(control_port, 30.0, process)
    wait_for_port(fleet_port, 30.0, process)


def flwr_json(env: dict[str, str], *args: str) -> dict[str, Any]:
    """A ``flwr`` command's JSON answer; raises when it reports a failure (``flwr``
    exits 0 with ``"success": false``, e.g. when the SuperLink cannot be reached)."""
    out = subprocess.run([str(BIN / "flwr"), *args, "--format", "json"], env=env,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    answer = dict(json.loads(out[out.index("{"):]))
    if answer.get("success") is False:
        raise FlowerCommandError(f"flwr {args[0]} {args[1]}: "
                                 f"{answer.get('error-message', 'failed').strip()}")
    return answer


class FlowerCommandError(RuntimeError):
    """A ``flwr`` command reported a failure."""


@contextmanager
def control_client(flwr_home: Path, connection: str) -> Iterator[Any]:
    """Flower's Control API client for ``connection`` as ``flwr`` makes it (Flower's CLI
    reads the connection from ``FLWR_HOME``, set for the call and restored after)."""
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.cli.utils import init_http_client_from_connection

    before = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = str(flwr_home)
    try:
        control = init_http_client_from_connection(read_superlink_connection(connection))
        try:
            yield control
        finally:
            control.close()
    finally:
        if before is None:
            del os.environ["FLWR_HOME"]
        else:
            os.environ["FLWR_HOME"] = before


def register_banks(flwr_home: Path, connection: str, public_keys: list[Path]) -> None:
    """Allow exactly these banks' public keys (each bank made its own pair; only the
    .pub is here). What ``flwr supernode register KEY CONNECTION`` does, with Flower's
    own functions, for every key through one Control API client: a ``flwr`` process
    per key costs ~0.8 s of CPU (its imports), ten of them ~4 s of a deployment's
    start."""
    from flwr.proto.control_pb2 import RegisterNodeRequest

    keys = {key: public_key_bytes(key) for key in public_keys}  # all valid, or none sent
    with control_client(flwr_home, connection) as control:
        for key, public_key in keys.items():
            try:
                node = control.RegisterNode(RegisterNodeRequest(public_key=public_key)).node_id
            except Exception as err:  # noqa: BLE001 - one line, as flwr says it
                raise FlowerCommandError(f"flwr supernode register {key}: "
                                         f"{str(err).strip() or type(err).__name__}"
                                         ) from None
            if not node:
                raise FlowerCommandError(f"flwr supernode register {key}: not registered")


def bank_nodes(flwr_home: Path, connection: str, public_keys: list[Path]) -> dict[int, int]:
    """Which bank each registered SuperNode is: {node id: bank id}, from the node ids
    the SuperLink holds for the banks' public keys (``flwr supernode list``) and the
    bank each key is for (``key_bank``). With bank authentication a node id is its
    key's for good (a restarted SuperNode gets it back by its key). The ServerApp
    refuses a reply that states another bank's id (server/strategy.py)."""
    from flwr.proto.control_pb2 import ListNodesRequest
    from flwr.supercore.constant import NodeStatus

    banks = {public_key_bytes(key): key_bank(key) for key in public_keys}
    if len(set(banks.values())) < len(public_keys):
        raise FlowerCommandError("two of the banks' public keys are for the same bank, "
                                 f"or the same: {', '.join(str(key) for key in public_keys)}")
    with control_client(flwr_home, connection) as control:
        try:
            nodes = control.ListNodes(ListNodesRequest()).nodes_info
        except Exception as err:  # noqa: BLE001 - one line, as flwr says it
            raise FlowerCommandError(f"flwr supernode list: "
                                     f"{str(err).strip() or type(err).__name__}") from None
    found = {banks[node.public_key]: node.node_id for node in nodes
             if node.public_key in banks and node.status != NodeStatus.UNREGISTERED}
    if missing := sorted(set(banks.values()) - set(found)):
        raise FlowerCommandError(f"banks {missing}: their public keys are not registered "
                                 "with the SuperLink (fedfraud register-banks)")
    return {node: bank for bank, node in found.items()}


def key_bank(path: Path) -> int:
    """The bank a public key is for: the folder ``bank_NN`` it came in (the operator's
    record: ``fedfraud deploy``'s bank folders, compose's ``public/banks/bank_NN``, one
    per bank's outbox), not anything the bank wrote into the key."""
    for folder in path.parents:
        if folder.name.startswith("bank_") and folder.name[5:].isdigit():
            return int(folder.name[5:])
    raise FlowerCommandError(f"{path}: no folder bank_NN names the bank this key is for")


def public_key_bytes(path: Path) -> bytes:
    """A bank's public key as Flower registers it: the checks of ``flwr supernode
    register`` (an OpenSSH EC key on a NIST curve), as an error instead of Flower's
    ``flwr_exit``, which would end the operator's process a few seconds later."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, uses_nist_ec_curve

    try:
        key = load_ssh_public_key(path.read_bytes())
    except (OSError, ValueError) as err:
        raise FlowerCommandError(f"{path}: not a bank's public key ({err})") from None
    if not (isinstance(key, ec.EllipticCurvePublicKey) and uses_nist_ec_curve(key)):
        raise FlowerCommandError(f"{path}: not a bank's public key (it must be an "
                                 "elliptic-curve key on a NIST curve, e.g. P-384)")
    return public_key_to_bytes(key)


def write_connection(flwr_home: Path, name: str, address: str,
                     tls: Tls | None = None) -> None:
    """The only Flower CLI config this project uses, in its own FLWR_HOME."""
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]",
             f'address = "{address}"']
    if tls is None:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {json.dumps(str(tls.certs / SERVER_CA))}")
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def submit_and_wait(
    app_dir: Path, connection: str, env: dict[str, str], run_config: dict[str, Any],
    federation_config: dict[str, Any] | None = None, timeout_s: float = 3600.0,
) -> tuple[int, str]:
    """``flwr run --stream`` the app; return (run id, final status from ``flwr ls``).

    ``--stream`` exits 0 even when a run failed, so the status is read separately.
    """
    with tempfile.TemporaryDirectory(prefix="fedfraud-app-") as staged:
        return run_staged(stage_app(app_dir, Path(staged)), connection, env, run_config,
                          federation_config, timeout_s)


def stage_app(app_dir: Path, staged: Path) -> Path:
    """A copy of just the files the app bundle is built from: ``flwr run`` builds the
    same bundle (same digest) without walking the app folder's environment and data."""
    for name, path in bundle_files(app_dir).items():
        (staged / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, staged / name)
    return staged


def run_staged(
    app_dir: Path, connection: str, env: dict[str, str], run_config: dict[str, Any],
    federation_config: dict[str, Any] | None, timeout_s: float,
) -> tuple[int, str]:
    command = [str(BIN / "flwr"), "run", str(app_dir), connection, "--stream",
               "--run-config", " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())]
    if federation_config:
        command += ["--federation-config",
                    " ".join(f"{k}={toml_value(v)}" for k, v in federation_config.items())]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    run_id = None
    deadline = time.monotonic() + timeout_s
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if run_id is None and "Successfully started run" in line:
                run_id = int(line.split("Successfully started run")[1].split()[0])
            # The run's own lines ("fedfraud: ...", "fedfraud round ..."), not the
            # staged folder's name in Flower's packaging-metadata warnings header.
            if SHOWN.search(line):
                print(line.rstrip(), flush=True)
            if time.monotonic() > deadline:
                raise TimeoutError(f"run did not finish within {timeout_s} s")
        process.wait(timeout=30)
    finally:
        stop(process)
    if run_id is None:
        raise RuntimeError("flwr run did not start a run (see the output above)")
    return run_id, run_status(connection, env, run_id)


def run_status(connection: str, env: dict[str, str], run_id: int) -> str:
    """The run's status as ``flwr ls --run-id`` shows it (``finished:completed``), with
    Flower's own client and formatting: a ``flwr`` process would add ~0.8 s of CPU
    (its imports) to the end of every run."""
    from flwr.cli.run_utils import format_runs
    from flwr.common.serde import run_from_proto
    from flwr.proto.control_pb2 import ListRunsRequest

    if "FLWR_HOME" not in env:
        raise FlowerCommandError("flwr ls: no FLWR_HOME to read the connection from")
    try:
        with control_client(Path(env["FLWR_HOME"]), connection) as control:
            answer = control.ListRuns(ListRunsRequest(run_id=run_id))
    except Exception as err:  # noqa: BLE001 - one line, as flwr says it
        raise FlowerCommandError(f"flwr ls: {str(err).strip() or type(err).__name__}"
                                 ) from None
    runs = format_runs([run_from_proto(run) for run in answer.run_dict.values()],
                       answer.now)
    if not runs:
        raise FlowerCommandError(f"flwr ls: run {run_id} not found")
    return runs[0].status_text
