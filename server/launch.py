"""Start Flower's own processes, submit a run with ``flwr run``, wait, tear down.

Every process starts in its own session and is stopped by killing its whole process
group, so nothing is left behind. ``FLWR_HOME`` is project-local, telemetry, the
update check and runtime dependency installation are off, and nothing here ever
writes into the app folder except the run outputs the app itself writes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent  # flwr, flower-superlink, ... of this environment
STOP_GRACE_S = 10.0


def flower_env(flwr_home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PYTHONUNBUFFERED": "1",
    }


def free_port() -> int:
    """A port nobody listens on now, so two runs on one machine do not collide."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, deadline_s: float, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with code {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {deadline_s} s")


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, SIGKILL it if it lingers."""
    try:
        pgid = os.getpgid(process.pid)
    except ProcessLookupError:
        return
    for sig, wait_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, STOP_GRACE_S)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            # The leader is gone; make sure its children are too.
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


@dataclass
class Services:
    """Processes started for one run, stopped together."""

    env: dict[str, str]
    log_dir: Path
    processes: list[subprocess.Popen[bytes]]

    def start(self, name: str, command: Sequence[str]) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - owned by the child
        process = subprocess.Popen(
            list(command), env=self.env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        log.close()
        self.processes.append(process)
        return process


@contextmanager
def services(flwr_home: Path) -> Iterator[Services]:
    log_dir = flwr_home / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    started = Services(flower_env(flwr_home), log_dir, [])
    try:
        yield started
    finally:
        for process in reversed(started.processes):
            stop(process)


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


def write_connection(flwr_home: Path, name: str, address: str, insecure: bool = True,
                     root_certificates: Path | None = None) -> None:
    """The only Flower CLI config this project uses, in its own FLWR_HOME."""
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]",
             f'address = "{address}"']
    if insecure:
        lines.append("insecure = true")
    if root_certificates is not None:
        lines.append(f'root-certificates = "{root_certificates}"')
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
    out = subprocess.run(
        [str(BIN / "flwr"), "ls", connection, "--run-id", str(run_id), "--format", "json"],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    runs = json.loads(out[out.index("{"):])["runs"]
    return str(runs[0]["status"])
