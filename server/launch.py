"""The operator's processes: a SuperLink, bank registration, ``flwr run``, its outcome.

Banks start their own processes (client/node.py); ``fedfraud deploy`` starts each bank
as the bank's own command, ``fedfraud-bank run``, and never holds a bank's private key.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.files import bundle_files
from common.processes import BIN, Services, free_port, stop, wait_for_port
from server.certs import SERVER_CA, SERVER_CERT, SERVER_KEY


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
                               control_port: int) -> subprocess.Popen[bytes]:
    """A SuperLink whose Fleet API (the banks' link) is gRPC on ``fleet_port``."""
    process = started.start("superlink", [
        str(BIN / "flower-superlink"), *transport_args(tls),
        "--disable-runtime-dependency-installation",
        "--fleet-api-address", f"127.0.0.1:{fleet_port}",
        "--host", "127.0.0.1", "--port", str(control_port),
    ])
    wait_for_port(control_port, 30.0, process)
    wait_for_port(fleet_port, 30.0, process)
    return process


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


def register_bank(env: dict[str, str], connection: str, public_key: Path) -> None:
    """Allow one bank's public key (the bank made its pair; only the .pub is here)."""
    flwr_json(env, "supernode", "register", str(public_key), connection)


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
            if "fedfraud" in line or "ERROR" in line or "Traceback" in line:
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
    runs = flwr_json(env, "ls", connection, "--run-id", str(run_id))["runs"]
    return str(runs[0]["status"])
