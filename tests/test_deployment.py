"""Real processes: a SuperLink and bank SuperNodes on 127.0.0.1, over gRPC with TLS.

Every process starts in its own session; teardown kills whole process groups (and the
groups of their descendants) and the tests assert that nothing is left running.
"""

from __future__ import annotations

import json
import os
import shutil
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

from common.data import TEST_FILE, bank_file, data_settings, prepare
from common.processes import (
    Services, descendants, free_port, processes_with_env, services, stop,
)
from server.certs import CA_CERT, make_certificates
from server.launch import (
    Tls, bank_nodes, flwr_json, register_banks, start_deployment_superlink,
    submit_and_wait, write_connection,
)
from tests.conftest import APP_DIR, app_config

BIN = Path(sys.executable).parent
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_SETTINGS_EMPTY = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # length 0, type SETTINGS
SETTINGS_FRAME = 0x4


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certificates(tmp_path_factory.mktemp("certs"))


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


def bank_folder(prepared, tmp_path: Path, bank: int) -> Path:
    """A bank's own folder: a copy of its prepared shard and schema, its policy and
    key pair made by the bank's own command."""
    folder = tmp_path / f"bank_{bank:02d}"
    folder.mkdir()
    source = Path(prepared.data_dir) / bank_file(bank)
    for name in (source.name, "schema.json"):
        (folder / name).write_bytes((source.parent / name).read_bytes())
    subprocess.run([str(BIN / "fedfraud-bank"), "init", "--bank-id", str(bank),
                    "--bank-dir", str(folder), "--app-dir", str(APP_DIR)], check=True,
                   capture_output=True)
    return folder


def start_bank(started: Services, tmp_path: Path, folder: Path, bank: int,
               fleet_port: int, tls: Tls, calls_itself: int | None = None) -> Path:
    """``fedfraud-bank run`` for one bank (stating the bank id ``calls_itself`` if
    given); returns the folder of its own logs."""
    home = tmp_path / f"bank-home-{bank}"
    stated = bank if calls_itself is None else calls_itself
    started.start(f"bank_{bank:02d}", [
        str(BIN / "fedfraud-bank"), "run", "--bank-id", str(stated), "--bank-dir",
        str(folder), "--app-dir", str(APP_DIR), "--superlink", f"127.0.0.1:{fleet_port}",
        "--ca", str(tls.certs / CA_CERT), "--flwr-home", str(home)])
    return home / "logs"


def wait_for(predicate, deadline_s: float, what: str) -> None:
    deadline = time.monotonic() + deadline_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def online(started: Services) -> int:
    nodes = flwr_json(started.env, "supernode", "list", "test").get("nodes", [])
    return sum(node["status"] == "online" for node in nodes)


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


def test_unregistered_bank_is_refused_and_registered_bank_joins(superlink, prepared,
                                                               tmp_path: Path) -> None:
    started, fleet_port, tls = superlink
    folders = [bank_folder(prepared, tmp_path, bank) for bank in (0, 1)]
    # Each bank made its own pair; the operator registers bank 0's public key only.
    register_banks(Path(started.env["FLWR_HOME"]), "test",
                   [folders[0] / "keys" / "bank.key.pub"])

    start_bank(started, tmp_path, folders[0], 0, fleet_port, tls)
    refused_logs = start_bank(started, tmp_path, folders[1], 1, fleet_port, tls)

    wait_for(lambda: "Failed to activate" in (refused_logs / "supernode.log").read_text(
        errors="replace") if (refused_logs / "supernode.log").exists() else False, 120,
        "bank 1's SuperNode to be refused")
    wait_for(lambda: online(started) == 1, 120, "bank 0 online")
    time.sleep(3)
    nodes = flwr_json(started.env, "supernode", "list", "test")["nodes"]
    assert [node["status"] for node in nodes] == ["online"]


def test_a_bank_stating_another_banks_id_is_refused_in_every_round(
    superlink, prepared, tmp_path: Path,
) -> None:
    """Bank 2 joins with its own registered key but calls itself bank 1 (the bank sets
    its node config), to have its update and its metrics taken for bank 1's. The run
    knows which bank each registered node is (``bank-nodes``: the operator's file, as
    ``fedfraud submit --keys`` and ``deploy`` write it): every reply of the impostor is
    refused, bank 1's own are kept, and the run goes on."""
    started, fleet_port, tls = superlink
    flwr_home = Path(started.env["FLWR_HOME"])
    folders = [bank_folder(prepared, tmp_path, bank) for bank in range(3)]
    keys = [folder / "keys" / "bank.key.pub" for folder in folders]
    register_banks(flwr_home, "test", keys)
    for bank, folder in enumerate(folders):
        start_bank(started, tmp_path, folder, bank, fleet_port, tls,
                   calls_itself=1 if bank == 2 else None)
    wait_for(lambda: online(started) == 3, 180, "three banks online")

    nodes = bank_nodes(flwr_home, "test", keys)  # as fedfraud submit --keys writes it
    assert sorted(nodes.values()) == [0, 1, 2]
    (tmp_path / "bank-nodes.json").write_text(json.dumps({str(n): b for n, b in nodes.items()}))
    run_config = {**prepared.as_run_config(), "num-banks": 3, "min-banks": 2,
                  "num-server-rounds": 2, "baselines": False,
                  "runs-dir": str(tmp_path / "runs"),
                  "bank-nodes": str(tmp_path / "bank-nodes.json")}
    _, status = submit_and_wait(APP_DIR, "test", started.env, run_config, timeout_s=300)

    assert status == "finished:completed"
    metrics = json.loads((tmp_path / "runs" / "latest" / "metrics.json").read_text())
    assert [row["banks_trained"] for row in metrics["history"]] == [[0, 1], [0, 1]]
    assert [bank["id"] for bank in metrics["banks"]] == [0, 1]
    refused = metrics["strategy"]["refused_updates"]
    assert [(r["round"], r["message"]) for r in refused] == [
        (1, "train"), (2, "train"), (2, "evaluate")]
    assert {(r["bank"], r["why"]) for r in refused} == {
        (2, "it states bank-id 1, but its node is bank 2")}


EVIL_CLIENTAPP = """
from pathlib import Path
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def steal(msg: Message, context: Context) -> Message:
    rows = Path(str(context.node_config["shard"])).read_text()
    Path({loot!r}).joinpath(str(context.node_config["bank-id"])).write_text(rows)
    return Message(RecordDict({{"metrics": MetricRecord({{"rows": len(rows)}})}}),
                   reply_to=msg)
"""


def test_an_app_that_is_not_the_approved_one_reads_no_row_at_any_bank(
    superlink, prepared, tmp_path: Path,
) -> None:
    started, fleet_port, tls = superlink
    loot = tmp_path / "loot"
    loot.mkdir()
    # The submitter's own app: fedfraud's, with a ClientApp that reads the bank's shard
    # and sends it back (and drops a copy where this test can see it).
    evil = tmp_path / "evil-app"
    for part in ("common", "client", "server"):
        shutil.copytree(APP_DIR / part, evil / part,
                        ignore=shutil.ignore_patterns("__pycache__"))
    (evil / "evil.py").write_text(EVIL_CLIENTAPP.format(loot=str(loot)))
    (evil / "pyproject.toml").write_text(
        (APP_DIR / "pyproject.toml").read_text()
        .replace('clientapp = "client.app:app"', 'clientapp = "evil:app"')
        .replace('fab-include = [', 'fab-include = ["evil.py", '))
    logs = []
    for bank in (0, 1):
        folder = bank_folder(prepared, tmp_path, bank)
        register_banks(Path(started.env["FLWR_HOME"]), "test",
                       [folder / "keys" / "bank.key.pub"])
        logs.append(start_bank(started, tmp_path, folder, bank, fleet_port, tls))
    wait_for(lambda: online(started) == 2, 180, "two banks online")

    run_config = {**prepared.as_run_config(), "num-banks": 2, "min-banks": 2,
                  "num-server-rounds": 1, "baselines": False,
                  "runs-dir": str(tmp_path / "runs")}
    submit_and_wait(evil, "test", started.env, run_config, timeout_s=300)

    assert list(loot.iterdir()) == []  # no bank ran the submitted ClientApp
    from client.policy import app_digest

    digest = app_digest(evil)
    for bank, log_dir in enumerate(logs):
        text = (log_dir / "executor.log").read_text(errors="replace")
        assert f"bank {bank}: refused app bundle sha256 {digest}" in text, text[-3000:]
        assert not (log_dir.parent / "apps").exists() or not any(
            digest[:8] in path.name for path in (log_dir.parent / "apps").iterdir())


def run_deploy(tmp_path: Path, certs: Path | None, rounds: int, *extra: str,
               on_line=None, data_dir: Path | None = None) -> tuple[int, str]:
    flwr_home = tmp_path / "flwr-home"
    data_dir = data_dir or tmp_path.parent / "shared-data"
    command = [
        str(BIN / "fedfraud"), "--app-dir", str(APP_DIR), "--flwr-home", str(flwr_home),
        "--set", f"num-server-rounds={rounds}",
        "--set", f"data-dir='{data_dir}'",
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
        if process.poll() is None:  # the whole tree: banks run in sessions of their own
            stop(process)
    assert wait_until_gone(f"FLWR_HOME={flwr_home}"), "processes left running"
    return code, "".join(output)


def test_ten_banks_over_tls_with_secure_aggregation_and_dp_complete_two_rounds(
    tmp_path: Path,
) -> None:
    certs = make_certificates(tmp_path / "certs")

    code, output = run_deploy(tmp_path, certs, 2, "--set", "secure-aggregation=true",
                              "--set", "dp-epsilon=3.0",
                              "--set", "server-test-set='always'")

    assert code == 0, output
    assert "TLS + bank authentication" in output
    run_dir = tmp_path / "runs" / "latest"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["mode"] == "deployment"
    assert [bank["id"] for bank in metrics["banks"]] == list(range(10))
    assert [row["banks_trained"] for row in metrics["history"]] == [list(range(10))] * 2
    # Nothing per bank in the clear: the server holds masked vectors (no weights) and
    # each reply names its bank, nothing more; each bank's epsilon is in its own ledger.
    assert not any("federated_own_validation" in bank or "n_train" in bank
                   for bank in metrics["banks"])
    assert metrics["privacy"]["banks"] == [] and "ledger" in metrics["privacy"]["banks_note"]
    ledger = json.loads((run_dir / "sent_by_banks.json").read_text())["messages"]
    assert not any(record["items"] for entry in ledger for record in entry["records"]
                   if record["kind"] == "weights")
    assert {entry["bank"] for entry in ledger if any(
        "masked_params" in record["items"] for record in entry["records"])} == set(range(10))
    assert not any(entry["message"] == "evaluate" for entry in ledger)
    for bank in range(10):
        spent = json.loads((tmp_path.parent / "shared-data" / f"bank_{bank:02d}" /
                            "privacy_ledger.json").read_text())
        assert 2.9 < spent["total_epsilon"] <= 3.0 + 1e-6
    # The references need every bank's rows: never in a deployment, and it says why.
    assert metrics["baselines"] is None and "deployment" in metrics["baselines_skipped"]
    assert (run_dir / "report.html").exists()


def bank_processes(flwr_home: Path, bank: int, command: bytes) -> list[int]:
    """The deployment's ``fedfraud-bank <command> --bank-id <bank>`` processes."""
    found = []
    for pid in processes_with_env(f"FLWR_HOME={flwr_home}"):
        try:
            words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:  # it ended since it was listed
            continue
        if any(w.endswith(b"fedfraud-bank") for w in words[:2]) and command in words \
                and b"--bank-id" in words \
                and words[words.index(b"--bank-id") + 1] == str(bank).encode():
            found.append(pid)
    return found


def test_a_deployment_without_a_server_test_set_survives_a_bank_dying(tmp_path: Path) -> None:
    victim = 3
    killed: list[int] = []

    def kill_bank_in_round_two(line: str, flwr_home: Path) -> None:
        if "round 1/" in line and not killed:  # round 2 has just started
            for pid in bank_processes(flwr_home, victim, b"run"):
                # The whole bank: its command, SuperNode, executor and tasks.
                for member in (pid, *descendants(pid)):
                    try:
                        os.killpg(os.getpgid(member), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                killed.append(pid)

    # The operator holds no real row: its test set is not even on disk.
    data_dir = tmp_path / "data"
    prepare(data_dir, **data_settings(app_config(data_dir=str(data_dir))))
    (data_dir / TEST_FILE).unlink()

    code, output = run_deploy(tmp_path, None, 3, "--set", "min-banks=5",
                              on_line=kill_bank_in_round_two, data_dir=data_dir)

    assert killed, output
    assert code == 0, output
    metrics = json.loads((tmp_path / "runs" / "latest" / "metrics.json").read_text())
    assert metrics["test_set"] is None and "pooled validation" in metrics["evaluated_on"]
    assert all(0.5 < row["auc"] <= 1 for row in metrics["history"])
    trained = [row["banks_trained"] for row in metrics["history"]]
    assert trained[0] == list(range(10))
    assert victim not in trained[2] and len(trained[2]) == 9
    assert [bank["id"] for bank in metrics["banks"]] == list(range(10))


def test_a_bank_that_never_answers_holds_a_round_only_round_timeout_s(tmp_path: Path) -> None:
    """A bank that stays connected (its SuperNode still heartbeats, so Flower sees it
    online) but answers nothing more: its executor and tasks stopped (SIGSTOP) once
    round 1 is done (round 3 at the latest misses it), as a bank whose training hangs
    or that holds its replies back on purpose. Each message then waits round-timeout-s
    for it, not Flower's hour, and the run ends with the others."""
    victim = 3
    stopped: list[int] = []

    def stop_executor_after_round_one(line: str, flwr_home: Path) -> None:
        if "round 1/" not in line or stopped:
            return
        for pid in bank_processes(flwr_home, victim, b"executor"):
            for member in (pid, *descendants(pid)):
                try:
                    os.kill(member, signal.SIGSTOP)
                except ProcessLookupError:
                    pass
            stopped.append(pid)

    code, output = run_deploy(tmp_path, None, 3, "--set", "min-banks=5",
                              "--set", "round-timeout-s=20.0",
                              on_line=stop_executor_after_round_one)

    assert stopped, output
    assert code == 0, output
    metrics = json.loads((tmp_path / "runs" / "latest" / "metrics.json").read_text())
    trained = [row["banks_trained"] for row in metrics["history"]]
    # Round 2 may have been answered before the stop (a round takes ~1 s); round 3 not.
    assert trained[0] == list(range(10))
    assert trained[2] == [bank for bank in range(10) if bank != victim]
    assert 19 < metrics["timing"]["round_s"][2] < 120  # waited for it, then went on
