"""Real processes: a SuperLink and bank SuperNodes on 127.0.0.1, over gRPC with TLS.

Every process starts in its own session; teardown kills whole process groups (and the
groups of their descendants) and the tests assert that nothing is left running.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from server.certs import CA_CERT, make_certificates
from server.launch import (
    Services, Tls, flwr_json, free_port, processes_with_env, register_bank, services,
    start_bank, start_deployment_superlink, write_connection,
)
from tests.conftest import APP_DIR

BIN = Path(sys.executable).parent
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_SETTINGS_EMPTY = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # length 0, type SETTINGS
SETTINGS_FRAME = 0x4


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certificates(tmp_path_factory.mktemp("certs"), num_banks=2)


@pytest.fixture
def superlink(certs: Path, tmp_path: Path) -> Iterator[tuple[Services, int, Tls]]:
    """A TLS SuperLink with bank authentication, torn down after the test."""
    flwr_home = tmp_path / "flwr-home"
    tls = Tls(certs)
    with services(flwr_home) as started:
        fleet_port, control_port = free_port(), free_port()
        start_deployment_superlink(started, tls, fleet_port, control_port)
        write_connection(flwr_home, "test", f"127.0.0.1:{control_port}", tls)
        yield started, fleet_port, tls
    assert wait_until_gone(f"FLWR_HOME={flwr_home}")


def wait_until_gone(marker: str, deadline_s: float = 15.0) -> bool:
    deadline = time.monotonic() + deadline_s
    while processes_with_env(marker):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def read_frame_header(sock: socket.socket) -> tuple[int, int]:
    header = b""
    while len(header) < 9:
        chunk = sock.recv(9 - len(header))
        if not chunk:
            raise ConnectionError("closed")
        header += chunk
    return int.from_bytes(header[:3], "big"), header[3]


def test_fleet_api_is_grpc_over_tls_http2(superlink) -> None:
    _, fleet_port, tls = superlink
    context = ssl.create_default_context(cafile=str(tls.certs / CA_CERT))
    context.set_alpn_protocols(["h2"])

    with socket.create_connection(("127.0.0.1", fleet_port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as sock:
            assert sock.selected_alpn_protocol() == "h2"  # HTTP/2 negotiated in TLS
            sock.sendall(H2_PREFACE + H2_SETTINGS_EMPTY)
            _, frame_type = read_frame_header(sock)
    assert frame_type == SETTINGS_FRAME  # the server speaks HTTP/2

    # And it is gRPC: a Fleet call gets a gRPC status back (refused: no bank key).
    credentials = grpc.ssl_channel_credentials((tls.certs / CA_CERT).read_bytes())
    with grpc.secure_channel(f"localhost:{fleet_port}", credentials) as channel:
        call = channel.unary_unary("/flwr.proto.Fleet/SendNodeHeartbeat")
        with pytest.raises(grpc.RpcError) as err:
            call(b"", timeout=10)
    assert err.value.code() not in (grpc.StatusCode.UNAVAILABLE,
                                    grpc.StatusCode.DEADLINE_EXCEEDED)


def test_plaintext_client_gets_nothing_from_the_tls_port(superlink) -> None:
    _, fleet_port, _ = superlink
    with socket.create_connection(("127.0.0.1", fleet_port), timeout=5) as sock:
        sock.sendall(H2_PREFACE + H2_SETTINGS_EMPTY)
        try:
            answer = sock.recv(64)
        except (ConnectionResetError, TimeoutError):
            answer = b""
    # No HTTP/2 frame comes back: at most a TLS alert record (content type 0x15).
    assert answer == b"" or answer[0] == 0x15

    with grpc.insecure_channel(f"127.0.0.1:{fleet_port}") as channel:
        call = channel.unary_unary("/flwr.proto.Fleet/SendNodeHeartbeat")
        with pytest.raises(grpc.RpcError) as err:
            call(b"", timeout=5)
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE,
                                grpc.StatusCode.DEADLINE_EXCEEDED)


def test_unregistered_bank_is_refused_and_registered_bank_joins(superlink, prepared) -> None:
    started, fleet_port, tls = superlink
    shard = Path(prepared.data_dir) / "bank_00.csv"
    register_bank(started.env, "test", tls, 0)  # bank 1's key is never registered

    good = start_bank(started, 0, shard, f"127.0.0.1:{fleet_port}", tls)
    bad = start_bank(started, 1, shard, f"127.0.0.1:{fleet_port}", tls)

    assert bad.wait(timeout=120) != 0
    log = (started.log_dir / "bank_01.log").read_text()
    assert "Failed to activate" in log or "UNAUTHENTICATED" in log or "PERMISSION" in log
    nodes = flwr_json(started.env, "supernode", "list", "test")["nodes"]
    assert [node["status"] for node in nodes] == ["online"]
    assert good.poll() is None


def run_deploy(tmp_path: Path, certs: Path | None, rounds: int, *extra: str,
               on_line=None) -> tuple[int, str]:
    flwr_home = tmp_path / "flwr-home"
    command = [
        str(BIN / "fedfraud"), "--app-dir", str(APP_DIR), "--flwr-home", str(flwr_home),
        "--set", f"num-server-rounds={rounds}",
        "--set", f"data-dir='{tmp_path.parent / 'shared-data'}'",
        "--set", f"runs-dir='{tmp_path / 'runs'}'", *extra,
        "deploy", *(["--certs", str(certs)] if certs else ["--insecure"]),
    ]
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output = []
    deadline = time.monotonic() + 1500
    try:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            if on_line:
                on_line(line, flwr_home)
            assert time.monotonic() < deadline, "deploy took too long"
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert wait_until_gone(f"FLWR_HOME={flwr_home}"), "processes left running"
    return code, "".join(output)


def test_ten_banks_over_tls_with_secure_aggregation_and_dp_complete_two_rounds(
    tmp_path: Path,
) -> None:
    certs = make_certificates(tmp_path / "certs", num_banks=10)

    code, output = run_deploy(tmp_path, certs, 2, "--set", "secure-aggregation=true",
                              "--set", "dp-epsilon=3.0")

    assert code == 0, output
    assert "TLS + bank authentication" in output
    run_dir = tmp_path / "runs" / "latest"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["mode"] == "deployment"
    assert [bank["id"] for bank in metrics["banks"]] == list(range(10))
    assert [row["banks_trained"] for row in metrics["history"]] == [list(range(10))] * 2
    assert all("federated_own_validation" in bank for bank in metrics["banks"])
    # Each bank spent (at most) its epsilon; the server saw masked vectors, no weights.
    privacy = metrics["privacy"]
    assert [bank["bank"] for bank in privacy["banks"]] == list(range(10))
    assert all(2.9 < bank["epsilon"] <= 3.0 + 1e-6 for bank in privacy["banks"])
    ledger = json.loads((run_dir / "sent_by_banks.json").read_text())["messages"]
    assert not any(record["items"] for entry in ledger for record in entry["records"]
                   if record["kind"] == "weights")
    assert {entry["bank"] for entry in ledger if any(
        "masked_params" in record["items"] for record in entry["records"])} == set(range(10))
    # The references need every bank's rows: never in a deployment, and it says why.
    assert metrics["baselines"] is None and "deployment" in metrics["baselines_skipped"]
    assert (run_dir / "report.html").exists()


def test_a_bank_dying_mid_run_does_not_sink_it(tmp_path: Path) -> None:
    victim = 3
    killed: list[int] = []

    def kill_bank_in_round_two(line: str, flwr_home: Path) -> None:
        if "round 1/" in line and not killed:  # round 2 has just started
            for pid in processes_with_env(f"FLWR_HOME={flwr_home}"):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                if b"flower-supernode" in cmdline and f"bank-id={victim} ".encode() in cmdline:
                    os.killpg(os.getpgid(pid), signal.SIGKILL)
                    killed.append(pid)

    code, output = run_deploy(tmp_path, None, 3, "--set", "min-banks=5",
                              on_line=kill_bank_in_round_two)

    assert killed, output
    assert code == 0, output
    metrics = json.loads((tmp_path / "runs" / "latest" / "metrics.json").read_text())
    trained = [row["banks_trained"] for row in metrics["history"]]
    assert trained[0] == list(range(10))
    assert victim not in trained[2] and len(trained[2]) == 9
    assert [bank["id"] for bank in metrics["banks"]] == list(range(10))
