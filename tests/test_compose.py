"""docker-compose.yml gives every service exactly what its party needs, no more.

Run by pytest on the file as written, and by docker/e2e.sh on what `docker-compose
config` resolved (``python tests/test_compose.py CONFIG.yml``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

COMPOSE_FILE = Path(__file__).resolve().parents[1] / "docker-compose.yml"
BANKS = range(10)


def targets(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> "host source[:ro]" of a service's mounts (short or long form)."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
        else:
            source, target = volume["source"], volume["target"]
            mode = ["ro"] if volume.get("read_only") else []
        mounts[target] = Path(source).name + (":ro" if mode == ["ro"] else "")
    return mounts


def check(config: dict[str, Any]) -> None:
    services = config["services"]
    for bank in BANKS:
        service = services[f"bank-{bank}"]
        models = {"/state/models": "bank-00-models"} if bank == 0 else {}
        assert targets(service) == {
            "/bank": f"bank_{bank:02d}:ro", "/ca.crt": "ca.crt:ro",
            "/outbox": f"bank_{bank:02d}", "/state": f"bank-{bank:02d}", **models,
        }, (bank, service.get("volumes"))
        assert list(service["networks"]) == ["fleet"]
        assert "OPENAI_API_KEY" not in (service.get("environment") or {})
    # A bank's scoring service: that bank's kept models, read-only (not its key pair or
    # ledger), off the fleet network.
    scoring = services["scoring-0"]
    assert targets(scoring) == {"/models": "bank-00-models:ro"}
    assert list(scoring["networks"]) == ["scoring"]
    assert all(str(port).startswith("127.0.0.1:") or (isinstance(port, dict) and
               port.get("host_ip") == "127.0.0.1") for port in scoring["ports"])
    # The operator's one-shots: public keys and the CA certificate, nothing private.
    assert targets(services["register"]) == {"/public/banks": "banks:ro",
                                             "/certs/server/ca.crt": "ca.crt:ro"}
    assert targets(services["submit"]) == {"/public/banks": "banks:ro",
                                           "/certs/server/ca.crt": "ca.crt:ro",
                                           "/app/runs": "runs:ro",
                                           "/registrations": "registrations"}
    submit = services["submit"]["command"]  # binds each node to its key's bank
    assert submit[submit.index("--keys") + 1] == "/public/banks"
    assert submit[submit.index("--bank-nodes") + 1] == "/registrations/bank-nodes.json"
    for name in ("register", "submit"):  # the control API is on the SuperLink's loopback
        assert services[name]["network_mode"] == "service:superlink"
    superlink = services["superlink"]
    command = superlink["command"]
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert command[command.index("--fleet-api-address") + 1] == "0.0.0.0:9092"
    assert "--enable-supernode-auth" in command
    assert targets(superlink) == {"/certs/server": "server:ro",
                                  "/app/data/synthetic/server": "server:ro",
                                  "/app/runs": "runs",
                                  "/registrations": "registrations:ro"}
    assert list(superlink["networks"]) == ["fleet"]
    # Only the operator's side holds the language model's key.
    holders = [name for name, service in services.items()
               if "OPENAI_API_KEY" in (service.get("environment") or {})]
    assert holders == ["superlink"]


def test_every_service_mounts_only_what_its_party_needs() -> None:
    check(yaml.safe_load(COMPOSE_FILE.read_text()))


def test_the_check_catches_a_bank_that_mounts_the_certificates() -> None:
    config = yaml.safe_load(COMPOSE_FILE.read_text())
    config["services"]["bank-3"]["volumes"].append("./certs:/certs:ro")
    try:
        check(config)
    except AssertionError:
        return
    raise AssertionError("a bank mounting ./certs went unnoticed")


if __name__ == "__main__":
    check(yaml.safe_load(Path(sys.argv[1]).read_text()))
    print("compose-e2e: every service mounts only what its party needs")
