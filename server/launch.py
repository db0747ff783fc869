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

from server.certs import SERVER_CA, SERVER_CERT, SERVER_KEY, bank_ca, bank_key

BIN = Path(sys.executable).parent  # flwr, flower-superlink, ... of this environment
STOP_GRACE_S = 10.0
WORKER_START_S = 300.0  # ten banks importing torch at once on two cores take a while


def flower_env(flwr_home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PYTHONUNBUFFERED": "1",
        # Ten banks share this machine's cores: one torch thread each, or they thrash.
        "OMP_NUM_THREADS": "1",
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


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (Flower's SuperExec starts its own session,
    so killing the parent's process group alone would leave it behind)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def processes_with_env(marker: str) -> list[int]:
    """PIDs of live processes whose environment contains ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _signal_groups(groups: set[int], sig: signal.Signals) -> None:
    for pgid in groups:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass


def stop(*processes: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    """SIGTERM the processes' groups and their descendants' groups, all at once;
    SIGKILL whatever still lives after the grace period."""
    tree = [pid for process in processes for pid in (process.pid, *descendants(process.pid))]
    groups: set[int] = set()
    for pid in tree:
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    groups.discard(os.getpgid(0))  # never our own group
    _signal_groups(groups, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline and any(_alive(pid) for pid in tree):
        time.sleep(0.1)
    _signal_groups(groups, signal.SIGKILL)
    for process in processes:
        process.wait()


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


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
        stop(*started.processes)


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

    def supernode_args(self, bank: int) -> list[str]:
        return ["--root-certificates", str(self.certs / bank_ca(bank)),
                "--auth-supernode-private-key", str(self.certs / bank_key(bank))]


def transport_args(tls: Tls | None, bank: int | None = None) -> list[str]:
    if tls is None:
        return ["--insecure"]
    return tls.superlink_args() if bank is None else tls.supernode_args(bank)


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


def start_worker(started: Services, bank: int, shard: Path, socket_dir: Path,
                 state_dir: Path | None = None) -> Path:
    """The bank's warm worker (client/worker.py); returns its socket once it listens."""
    socket = socket_dir / f"bank_{bank:02d}.sock"
    process = started.start(f"worker_{bank:02d}", [
        str(BIN / "fedfraud"), "bank-worker", "--bank-id", str(bank),
        "--shard", str(shard), "--socket", str(socket),
        *(["--state", str(state_dir)] if state_dir else []),
    ])
    deadline = time.monotonic() + WORKER_START_S
    while not socket.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            log = (started.log_dir / f"worker_{bank:02d}.log").read_text()[-2000:]
            raise RuntimeError(f"bank {bank}: worker did not start:\n{log}")
        time.sleep(0.05)
    return socket


def start_bank(started: Services, bank: int, shard: Path, superlink: str,
               tls: Tls | None, worker: Path | None = None,
               state_dir: Path | None = None) -> subprocess.Popen[bytes]:
    """One bank's SuperNode, told only where its own shard (worker, folder) is."""
    node_config = f"bank-id={bank} shard={json.dumps(str(shard))}"
    for key, value in (("worker", worker), ("state", state_dir)):
        if value is not None:
            node_config += f" {key}={json.dumps(str(value))}"
    return started.start(f"bank_{bank:02d}", [
        str(BIN / "flower-supernode"), *transport_args(tls, bank),
        "--superlink", superlink, "--port", str(free_port()),
        "--node-config", node_config,
    ])


def flwr_json(env: dict[str, str], *args: str) -> dict[str, Any]:
    out = subprocess.run([str(BIN / "flwr"), *args, "--format", "json"], env=env,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return dict(json.loads(out[out.index("{"):]))


def register_bank(env: dict[str, str], connection: str, tls: Tls, bank: int) -> None:
    flwr_json(env, "supernode", "register", str(tls.certs / f"{bank_key(bank)}.pub"),
              connection)


def wait_for_banks(env: dict[str, str], connection: str, count: int,
                   deadline_s: float) -> None:
    """Until ``count`` SuperNodes are online (so round 1 has every bank)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        nodes = flwr_json(env, "supernode", "list", connection).get("nodes", [])
        if sum(node["status"] == "online" for node in nodes) >= count:
            return
        time.sleep(0.5)
    raise TimeoutError(f"fewer than {count} banks online after {deadline_s} s")


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
