"""The bank's scoring service, over real HTTP (uvicorn on a free 127.0.0.1 port)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import torch
import uvicorn

from client.score import Scorer, format_reasons, reason_codes, records_matrix, score_file
from client.serve import ScoringService, create_app
from common.model import CARD_JSON_FILE, FraudNet, ModelSpec
from common.processes import stop
from common.schema import CATEGORICAL, NUMERIC, Column, Schema
from server.export import export_model
from tests.test_export_score import exported, tiny_run, transactions  # noqa: F401 (fixture)
from tests.test_report import sample_metrics

TOKEN = "test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
START_DEADLINE_S = 30.0


@pytest.fixture(scope="module")
def runs(exported, prepared, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A bank's runs folder: run "42" (trained), run "43" (other weights, same features),
    a run for another schema, ``approved`` -> run 42, and the bank's scaler outside."""
    run_dir, _, bank = exported
    root = tmp_path_factory.mktemp("bank") / "runs"
    shutil.copytree(run_dir, root / "run-42")
    torch.manual_seed(5)
    other = FraudNet(ModelSpec(in_features=30)).state_dict()
    metrics = {**sample_metrics(), "run_id": "43", "config": prepared.as_run_config(),
               "versions": {"torch": torch.__version__}}
    (root / "run-43").mkdir()
    export_model(root / "run-43", other, ModelSpec(in_features=30), bank.features, metrics,
                 "test data")
    tiny_run(root / "run-other-schema", [1.0, 2.0, 3.0], run_id="99")
    (root / "approved").symlink_to(root / "run-42")
    outside, _ = tiny_run(root.parent / "elsewhere", [0.0] * 30, run_id="77")
    return {"root": root, "42": root / "run-42", "43": root / "run-43",
            "other-schema": root / "run-other-schema", "approved": root / "approved",
            "outside": outside, "scaler": bank.keep_scaler()}


@contextmanager
def serving(app, deadline_s: float = START_DEADLINE_S) -> Iterator[str]:
    """uvicorn in a thread on a free port; stopped (and joined) on the way out."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + deadline_s
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        assert not thread.is_alive()


@pytest.fixture
def service(runs) -> ScoringService:
    return ScoringService(runs["approved"], runs["scaler"], max_body_bytes=256 * 1024,
                          max_transactions=100)


@pytest.fixture
def url(service: ScoringService) -> Iterator[str]:
    with serving(create_app(service, TOKEN)) as base:
        yield base


def records(frame: pd.DataFrame) -> list[dict]:
    return frame.to_dict(orient="records")


def test_scores_equal_the_score_command(runs, tmp_path: Path) -> None:
    frame = transactions(100, seed=4)
    frame.to_csv(tmp_path / "in.csv", index=False)
    scorer = Scorer.load(runs["42"], runs["scaler"])
    score_file(scorer, tmp_path / "in.csv", tmp_path / "out.csv", threshold=0.5)
    expected = pd.read_csv(tmp_path / "out.csv", keep_default_na=False)

    service = ScoringService(runs["approved"], runs["scaler"], threshold=0.5)
    with serving(create_app(service)) as url, httpx.Client(base_url=url) as client:
        batch = client.post("/score", json={"transactions": records(frame)})
        single = client.post("/score", json=records(frame)[7])

    assert batch.status_code == 200, batch.text
    body = batch.json()
    assert body["model_version"] == "42" and body["threshold"] == 0.5
    results = body["results"]
    assert [r["id"] for r in results] == expected["id"].tolist()
    got = np.array([r["fraud_probability"] for r in results])
    np.testing.assert_allclose(got, expected["fraud_probability"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(got, scorer.probabilities(
        frame.drop(columns="id").to_numpy(np.float32)), atol=1e-6, rtol=0)
    flagged = np.array([r["flagged"] for r in results])
    assert flagged.astype(int).tolist() == expected["flagged"].tolist()
    assert 0 < flagged.sum() < len(frame)
    assert all(r["model_version"] == "42" for r in results)
    # Reason codes: flagged rows only, the same as `fedfraud score` writes.
    assert all(("reasons" in r) == r["flagged"] for r in results)
    assert [format_reasons(r["reasons"]) if r["flagged"] else "" for r in results] == \
        expected["reasons"].tolist()
    assert single.status_code == 200 and single.json() == results[7]


def test_reasons_come_from_the_one_reason_function(url: str, runs) -> None:
    frame = transactions(100, seed=9)
    scorer = Scorer.load(runs["42"], runs["scaler"])
    x = frame.drop(columns="id").to_numpy(np.float32)
    with httpx.Client(base_url=url) as client:
        results = client.post("/score", json={"transactions": records(frame)}).json()["results"]
    rows = [i for i, r in enumerate(results) if r["flagged"]]
    assert rows
    assert [results[i]["reasons"] for i in rows] == reason_codes(scorer, x[rows])
    assert all(len(results[i]["reasons"]) == 3 for i in rows)


def test_a_null_is_a_missing_value_scored_as_the_banks_mean(url: str, runs) -> None:
    transaction = records(transactions(1))[0]
    scorer = Scorer.load(runs["42"], runs["scaler"])
    x = np.array([[transaction[f] for f in scorer.features]], np.float32)
    x[0, 5] = scorer.mean[5]
    transaction["f05"] = None
    with httpx.Client(base_url=url) as client:
        got = client.post("/score", json=transaction).json()["fraud_probability"]
    assert got == pytest.approx(float(scorer.probabilities(x)[0]), abs=1e-6)


def test_health_and_model_card(url: str, runs) -> None:
    with httpx.Client(base_url=url) as client:
        health = client.get("/health").json()
        card = client.get("/model").json()
    assert health["status"] == "ok" and health["model_version"] == "42"
    assert health["run"] == str(runs["42"].resolve())
    assert card == json.loads((runs["42"] / CARD_JSON_FILE).read_text())
    with httpx.Client(base_url=url) as client:  # flags at the run's own threshold
        batch = client.post("/score", json={"transactions": [_one()]}).json()
    assert batch["threshold"] == card["threshold"] == 0.2


def _one(**change) -> dict:
    transaction = records(transactions(1))[0]
    transaction.update(change)
    return transaction


BAD_INPUTS = {
    "missing column": ({"transactions": [_one(), {k: v for k, v in _one().items()
                                                  if k != "f07"}]},
                       422, "row 2: columns differ from the federation's schema: missing "
                            "['f07']"),
    "extra column": (_one(amount=3.0), 422, "unexpected ['amount']"),
    "renamed column": ({k.replace("f07", "f7"): v for k, v in _one().items()}, 422,
                       "missing ['f07'], unexpected ['f7']"),
    "id renamed": ({k.replace("id", "ID"): v for k, v in _one().items()}, 422,
                   "no 'id' field"),
    "text": ({"transactions": [_one(), _one(f03="abc")]}, 422,
             "transactions: column 'f03' must be numeric (row 2: 'abc')"),
    "NaN": ('{"id": 1, ' + ", ".join(f'"f{i:02d}": {"NaN" if i == 4 else 0.5}'
                                     for i in range(30)) + "}",
            422, "column 'f04' must be numeric (row 1: NaN)"),
    "Infinity": (json.dumps(_one(f09=0.0)).replace('"f09": 0.0', '"f09": -Infinity'),
                 422, "column 'f09' must be numeric (row 1: -Infinity)"),
    "overflow": (json.dumps(_one(f10=0.0)).replace('"f10": 0.0', '"f10": 1e400'),
                 422, "column 'f10' holds a value that is not a finite float32 number (row 1: 'inf')"),
    "beyond float32": (_one(f12=1e39), 422,
                       "column 'f12' holds a value that is not a finite float32 number"),
    "huge integer": (json.dumps(_one(f13=0)).replace('"f13": 0', '"f13": 1' + "0" * 400),
                     422, "column 'f13' must be numeric (row 1: 10000000000000000000"),
    "empty batch": ({"transactions": []}, 422, "no transactions (an empty batch)"),
    "batch not a list": ({"transactions": {"id": 1}}, 422, "a JSON array of transactions"),
    "not an object": ({"transactions": [_one(), [1, 2]]}, 422,
                      "row 2: a transaction is a JSON object"),
    "no id": ({k: v for k, v in _one().items() if k != "id"}, 422, "no 'id' field"),
    "bad id": (_one(id=[1]), 422, "column 'id' must be a string or an integer"),
    "nested value": (_one(f01={"a": 1}), 422, "column 'f01' must be numeric"),
    "not JSON": ("{'id': 1", 400, "body is not JSON"),
    "not UTF-8": (b"\xff\xfe{", 400, "body is not JSON"),
    "deep nesting": ("[" * 100_000 + "]" * 100_000, 400, "body is not JSON"),
    "too many": ({"transactions": [_one()] * 101}, 413, "at most 100 per request"),
    "too large": ({"transactions": [_one(pad="x" * 300_000)]}, 413, "at most 262144"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gets_a_4xx_naming_the_column_and_the_service_goes_on(url: str,
                                                                        case: str) -> None:
    body, status, detail = BAD_INPUTS[case]
    content = body if isinstance(body, bytes) else (
        body.encode() if isinstance(body, str) else json.dumps(body).encode())
    with httpx.Client(base_url=url) as client:
        answer = client.post("/score", content=content,
                             headers={"content-type": "application/json"})
        assert answer.status_code == status, answer.text
        assert detail in answer.json()["detail"]
        assert client.post("/score", json=_one()).status_code == 200


def test_ids_come_back_as_they_were_sent_also_beyond_64_bits(url: str) -> None:
    """The fast JSON parser reads an integer beyond 64 bits as a float; such a body is
    parsed again by the standard library, so the id stays the integer it was."""
    ids = ["tx-1", 7, 2**64 + 1, -(2**70)]
    body = json.dumps({"transactions": [_one(id=i) for i in ids]})
    with httpx.Client(base_url=url) as client:
        answer = client.post("/score", content=body,
                             headers={"content-type": "application/json"})
    assert answer.status_code == 200, answer.text
    assert [result["id"] for result in json.loads(answer.text)["results"]] == ids


def test_a_streamed_body_over_the_limit_is_cut_off(url: str) -> None:
    def chunks():  # no Content-Length: the service counts what arrives
        for _ in range(100):
            yield b" " * 8192

    with httpx.Client(base_url=url) as client:
        answer = client.post("/score", content=chunks())
        assert answer.status_code == 413 and "body over 262144 bytes" in answer.text
        assert client.get("/health").status_code == 200


def test_a_switch_under_concurrent_requests_loses_none(url: str, runs) -> None:
    frame = transactions(5, seed=2)
    x = frame.drop(columns="id").to_numpy(np.float32)
    expected = {version: Scorer.load(runs[version], runs["scaler"]).probabilities(x)
                for version in ("42", "43")}
    assert not np.allclose(expected["42"], expected["43"], atol=1e-3)
    failures: list[str] = []
    seen: dict[str, int] = {"42": 0, "43": 0}
    stop = threading.Event()

    def hammer() -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            while not stop.is_set():
                try:
                    answer = client.post("/score", json={"transactions": records(frame)})
                except httpx.HTTPError as err:
                    failures.append(repr(err))
                    continue
                if answer.status_code != 200:
                    failures.append(answer.text)
                    continue
                body = answer.json()
                version = body["model_version"]
                got = [r["fraud_probability"] for r in body["results"]]
                # One model per request: all rows and the version agree.
                if {r["model_version"] for r in body["results"]} != {version} or not \
                        np.allclose(got, expected[version], atol=1e-6):
                    failures.append(f"mixed answer {body}")
                seen[version] += 1

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    with httpx.Client(base_url=url, timeout=60) as admin:
        for version in ("43", "42", "43", "42", "43"):
            time.sleep(0.15)
            switched = admin.post("/admin/reload", headers=AUTH,
                                  json={"run": str(runs[version])})
            assert switched.status_code == 200, switched.text
            assert switched.json()["model_version"] == version
        time.sleep(0.15)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    assert failures == []
    assert seen["42"] > 0 and seen["43"] > 0
    with httpx.Client(base_url=url) as client:
        assert client.get("/health").json()["model_version"] == "43"


def test_a_mismatched_model_is_refused_and_the_old_one_serves(url: str, runs) -> None:
    with httpx.Client(base_url=url) as client:
        refused = client.post("/admin/reload", headers=AUTH,
                              json={"run": str(runs["other-schema"])})
        assert refused.status_code == 409
        assert "do not match the model card" in refused.json()["detail"]
        assert "still serving model 42" in refused.json()["detail"]
        missing = client.post("/admin/reload", headers=AUTH,
                              json={"run": str(runs["root"] / "no-such-run")})
        assert missing.status_code == 409
        outside = client.post("/admin/reload", headers=AUTH,
                              json={"run": str(runs["outside"])})
        assert outside.status_code == 403 and "not inside the runs folder" in outside.text
        assert client.post("/admin/reload", json={}).status_code == 401
        assert client.post("/admin/reload", headers=AUTH, json=[1]).status_code == 400
        assert client.post("/admin/reload", headers=AUTH,
                           json={"run": 3}).status_code == 400
        assert client.post("/admin/reload", headers={"Authorization": "Bearer nope"},
                           json={}).status_code == 401
        answer = client.post("/score", json=_one())
        assert answer.status_code == 200 and answer.json()["model_version"] == "42"
        # With no run named, reload re-reads what --run (the approved symlink) points at.
        again = client.post("/admin/reload", headers=AUTH)
        assert again.status_code == 200 and again.json()["model_version"] == "42"


def test_no_admin_endpoint_without_a_token(service: ScoringService) -> None:
    with serving(create_app(service)) as base, httpx.Client(base_url=base) as client:
        assert client.post("/admin/reload", json={}).status_code in (404, 405)
        assert client.post("/score", json=_one()).status_code == 200


def test_records_are_encoded_as_schema_encode_does() -> None:
    rng = np.random.default_rng(0)
    numeric = Schema("Class", tuple(Column(f"f{i}", NUMERIC) for i in range(4)))
    rows = [{"id": i, **{f"f{j}": (int(v) if j == 2 else float(v))
                         for j, v in enumerate(rng.normal(scale=1e3, size=4))}}
            for i in range(50)]

    def fail(why: str) -> ValueError:
        return ValueError(why)

    ids, fast = records_matrix(rows, numeric, "id", fail)
    frame = pd.DataFrame(rows).drop(columns="id")
    assert ids == list(range(50))
    np.testing.assert_array_equal(fast, numeric.encode(frame.astype(object), fail))
    # Odd numbers take whichever path; the result is always Schema.encode's.
    for odd in (True, 2**60 + 1, 10**20, -0.0, 1e-320, None, "7.5", 3):
        rows = [{"id": "a", "f0": odd, "f1": 1.5, "f2": 2**53 + 1, "f3": 0.1},
                {"id": 7, "f0": 2.0, "f1": odd, "f2": 4, "f3": 0.2}]
        _, x = records_matrix(rows, numeric, "id", fail)
        expected = numeric.encode(pd.DataFrame(rows).drop(columns="id").astype(object),
                                  fail)
        np.testing.assert_array_equal(x, expected, err_msg=repr(odd))
    # Text, nulls and categories go through Schema.encode itself.
    mixed = Schema("Class", (Column("amount", NUMERIC),
                             Column("channel", CATEGORICAL, ("atm", "web"))))
    rows = [{"id": "a", "amount": "12.5", "channel": "web"},
            {"id": "b", "amount": None, "channel": "branch"}]
    _, x = records_matrix(rows, mixed, "id", fail)
    np.testing.assert_array_equal(x, mixed.encode(pd.DataFrame(rows).drop(columns="id"),
                                                  fail))
    assert x[0].tolist() == [12.5, 0.0, 1.0] and np.isnan(x[1, 0])


def test_records_of_a_schema_with_log1p_or_gap_columns_are_encoded_as_schema_encode_does(
        ) -> None:
    def fail(why: str) -> ValueError:
        return ValueError(why)

    schema = Schema("Class", (Column("amount", NUMERIC, log=True),
                              Column("age", NUMERIC, missing=True), Column("v", NUMERIC)))
    rows = [{"id": 1, "amount": 100.0, "age": 30.0, "v": -1.5},
            {"id": 2, "amount": 0.0, "age": 41.0, "v": 2.0}]
    _, x = records_matrix(rows, schema, "id", fail)
    expected = schema.encode(pd.DataFrame(rows).drop(columns="id").astype(object), fail)
    np.testing.assert_array_equal(x, expected)
    assert x.shape == (2, 4) and x[0, 0] == np.float32(np.log1p(100.0))
    _, refund = records_matrix([{"id": 3, "amount": -5.0, "age": 1.0, "v": 0.0}], schema,
                               "id", fail)  # a refund: mirrored, scored
    assert refund[0, 0] == np.float32(-np.log1p(5.0))


def _wait_for(condition, deadline_s: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            if condition():
                return
        except httpx.HTTPError:
            pass
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "deadline passed"
        time.sleep(0.1)


def test_the_command_serves_and_reloads_on_sighup(runs, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    shutil.copytree(runs["root"], root, symlinks=True)
    approved = root / "approved"
    approved.unlink()
    approved.symlink_to(root / "run-42")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "client.serve", "--run", str(approved), "--scaler",
         str(runs["scaler"]), "--port", str(port)],
        cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True)
    try:
        def version() -> str:
            return httpx.get(f"{base}/health", timeout=2).json()["model_version"]

        _wait_for(lambda: version() == "42", START_DEADLINE_S, process)
        assert httpx.post(f"{base}/score", json=_one()).json()["model_version"] == "42"
        assert httpx.post(f"{base}/admin/reload", json={}).status_code in (404, 405)

        approved.unlink()
        approved.symlink_to(root / "run-43")
        process.send_signal(signal.SIGHUP)
        _wait_for(lambda: version() == "43", 20, process)

        approved.unlink()
        approved.symlink_to(root / "run-other-schema")
        process.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert version() == "43"
        assert httpx.post(f"{base}/score", json=_one()).json()["model_version"] == "43"
    finally:  # the whole process group, whatever happened
        stop(process)
    log = process.stderr.read().decode()
    assert "SIGHUP: now serving model 43" in log
    assert "do not match the model card" in log


def test_the_service_names_the_dominant_feature(tmp_path: Path) -> None:
    # logit = 0.2 f00 - 0.4 f01 + 4 f02: f02 decides, f01 pulls the other way.
    run, scaler = tiny_run(tmp_path / "runs" / "tiny", [0.2, -0.4, 4.0], threshold=0.6,
                           run_id="tiny")
    service = ScoringService(run, scaler)
    with serving(create_app(service)) as url, httpx.Client(base_url=url) as client:
        flagged = client.post("/score", json={"id": 1, "f00": 1.0, "f01": 1.0,
                                              "f02": 1.0}).json()
        passed = client.post("/score", json={"id": 2, "f00": 1.0, "f01": 1.0,
                                             "f02": -1.0}).json()
    assert flagged["flagged"] and flagged["model_version"] == "tiny"
    assert [(r["feature"], r["direction"]) for r in flagged["reasons"]] == [
        ("f02", "raises"), ("f01", "lowers"), ("f00", "raises")]
    assert not passed["flagged"] and "reasons" not in passed
