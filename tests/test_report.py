"""The risk report through the real openai client against a local Responses API."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from server.report import (
    HTML_FILE, REPORT_FILE, REQUEST_FILE, link_is_safe, sanitize_html, write_report,
)
from tests.conftest import app_config

REPORT_TEXT = "## Executive summary\nThe federated model works."


def responses_body(text: str) -> dict:
    return {
        "id": "resp_1", "object": "response", "created_at": 1_700_000_000,
        "status": "completed", "model": "gpt-5.2", "error": None,
        "incomplete_details": None, "instructions": None, "metadata": {},
        "parallel_tool_calls": True, "temperature": 1.0, "top_p": 1.0,
        "tool_choice": "auto", "tools": [],
        "output": [{
            "type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }],
        "usage": {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15,
                  "input_tokens_details": {"cached_tokens": 0},
                  "output_tokens_details": {"reasoning_tokens": 0}},
    }


class FakeResponsesAPI:
    """A real HTTP server on 127.0.0.1: answers POST /v1/responses with the queued
    statuses (then 200), after an optional delay; records every request."""

    def __init__(self, statuses: list[int], delay_s: float = 0.0,
                 text: str = REPORT_TEXT) -> None:
        self.statuses, self.delay_s, self.text = list(statuses), delay_s, text
        self.requests: list[dict] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                api.requests.append({"path": self.path, "body": body,
                                     "auth": self.headers.get("Authorization")})
                time.sleep(api.delay_s)
                status = api.statuses.pop(0) if api.statuses else 200
                payload = (responses_body(api.text) if status == 200
                           else {"error": {"message": "nope", "type": "server_error"}})
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.send_header("retry-after-ms", "10")
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> FakeResponsesAPI:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def sample_metrics() -> dict:
    final = {"round": 2, "auc": 0.88, "ap": 0.74, "loss": 0.06, "recall_at_1pct_fpr": 0.72,
             "threshold": 0.2, "tp": 150, "fp": 5, "fn": 87, "tn": 11758,
             "precision": 0.968, "recall": 0.633, "f1": 0.765}
    central = {**final, "auc": 0.89, "ap": 0.76}
    bank_val = {"auc": 0.9, "ap": 0.8, "recall_at_1pct_fpr": 0.7, "threshold": 0.2,
                "tp": 20, "fp": 1, "fn": 3, "tn": 130, "precision": 0.952, "recall": 0.87,
                "f1": 0.909}
    no_fraud = {**bank_val, "auc": None, "ap": None, "recall_at_1pct_fpr": None}
    return {
        "run_id": "42", "mode": "simulation",
        "banks": [{"id": 0, "n_train": 900, "n_val": 160, "n_fraud": 31},
                  {"id": 1, "n_train": 300, "n_val": 53, "n_fraud": 2}],
        "test_set": {"rows": 12000, "frauds": 237},
        "history": [{**final, "round": 1, "auc": 0.8, "ap": 0.5}, final],
        "final": final,
        "baselines": {"centralized": central, "local_only": [
            {"bank": 0, "own_validation": {"local_only": {**bank_val, "ap": 0.6},
                                           "federated": bank_val},
             "test": {"local_only": {**final, "auc": 0.81, "ap": 0.41}, "federated": final}},
            {"bank": 1, "own_validation": {"local_only": no_fraud, "federated": no_fraud},
             "test": {"local_only": {**final, "auc": 0.6, "ap": 0.05}, "federated": final}},
        ], "federated_minus": {
            "centralized": {"auc_difference": -0.01, "ci95": [-0.031, 0.012]},
            "best_local_only": {"bank": 0, "auc_difference": 0.07, "ci95": [0.041, 0.1]}}},
    }


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    yield


def run_report(tmp_path: Path, url: str | None, monkeypatch, **settings) -> str:
    if url:
        monkeypatch.setenv("OPENAI_BASE_URL", url)
    config = app_config(**settings)
    write_report(tmp_path, sample_metrics(), config, {"ROC curves": "roc.png"})
    return (tmp_path / REPORT_FILE).read_text()


def test_report_from_the_responses_api(tmp_path: Path, monkeypatch, key) -> None:
    with FakeResponsesAPI([]) as api:
        report = run_report(tmp_path, api.url, monkeypatch)

    assert REPORT_TEXT in report and "Offline" not in report
    assert len(api.requests) == 1
    sent = api.requests[0]
    assert sent["path"] == "/v1/responses" and sent["auth"] == "Bearer sk-test"
    assert sent["body"] == json.loads((tmp_path / REQUEST_FILE).read_text())
    assert sent["body"]["model"] == "gpt-5.2"
    for section in ("Executive summary", "Metric interpretation", "Risks", "Next steps"):
        assert section in sent["body"]["instructions"]


def test_bank_details_stay_out_unless_allowed(tmp_path: Path, monkeypatch, key) -> None:
    with FakeResponsesAPI([]) as api:
        run_report(tmp_path, api.url, monkeypatch)
        run_report(tmp_path, api.url, monkeypatch, report_share_bank_details=True)
    default, shared = (json.loads(r["body"]["input"].split("\n", 1)[1]) for r in api.requests)
    assert "per_bank" not in default and "n_train" not in json.dumps(default)
    assert shared["per_bank"][0] == {"bank": 0, "n_train": 900, "fraud_rate": 31 / 1060}
    # Whether federation paid is always in the facts, as counts; per bank only if
    # allowed, where undefined metrics are left out.
    assert default["centralized_reference_test_metrics"]["auc"] == 0.89
    assert default["federated_vs_local_only_bank_counts"]["own_validation_ap"] == {
        "banks_compared": 1, "federated_better": 1, "tied": 0, "local_only_better": 0}
    assert "local_only_vs_federated_per_bank" not in default
    assert shared["local_only_vs_federated_per_bank"][0]["local_only_own_validation_ap"] == 0.6
    assert "local_only_own_validation_auc" not in shared["local_only_vs_federated_per_bank"][1]


def metrics_with_bank_numbers() -> dict:
    """sample_metrics() with a distinctive number for everything said about one bank
    (none of them occurs elsewhere in the facts) and the run's privacy records."""
    metrics = sample_metrics()
    fed_val = {**metrics["baselines"]["local_only"][0]["own_validation"]["federated"],
               "auc": 0.9071, "ap": 0.8029}
    metrics["baselines"]["local_only"][0]["own_validation"] = {
        "local_only": {**fed_val, "auc": 0.9317, "ap": 0.6143}, "federated": fed_val}
    metrics["baselines"]["local_only"][0]["test"]["local_only"].update(auc=0.8123, ap=0.4177)
    metrics["baselines"]["local_only"][1]["test"]["local_only"].update(auc=0.88, ap=0.0537)
    metrics["strategy"] = {"name": "fedavg", "attack": "nan", "attackers": [1],
                           "refused_updates": [{"round": 2, "bank": 1, "message": "train",
                                                "why": "non-finite values in weights"}]}
    metrics["privacy"] = {
        "secure_aggregation": False, "differential_privacy": True,
        "mechanism": "DP-SGD", "target_epsilon": 3.0, "delta": 1e-5, "max_grad_norm": 1.0,
        "max_epsilon_spent": 2.9871,
        "banks": [{"bank": 0, "round": 2, "epsilon": 2.9871, "delta": 1e-5,
                   "noise_multiplier": 1.2345},
                  {"bank": 1, "round": 2, "epsilon": 2.6543, "delta": 1e-5,
                   "noise_multiplier": 4.3219}],
        "scope": "the banks' training rows"}
    metrics["membership_audit"] = {"attack": "loss threshold", "attack_auc": 0.5031,
                                   "banks": [{"bank": 0, "attack_auc": 0.5123},
                                             {"bank": 1, "attack_auc": 0.5467}]}
    return metrics


# Everything above that belongs to one bank (bank 0's epsilon is also the maximum).
BANK_NUMBERS = ("0.9071", "0.8029", "0.9317", "0.6143", "0.8123", "0.4177", "0.0537",
                "2.6543", "1.2345", "4.3219", "0.5123", "0.5467", "values in weights",
                "noise_multiplier", "local_only_vs_federated_per_bank", "per_bank")


@pytest.mark.parametrize("share", [False, True])
def test_per_bank_numbers_reach_the_model_only_if_allowed(
    tmp_path: Path, monkeypatch, share: bool,
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # the request is saved anyway
    config = app_config(report_share_bank_details=share)
    write_report(tmp_path, metrics_with_bank_numbers(), config, {"ROC curves": "roc.png"})
    text = (tmp_path / REQUEST_FILE).read_text()

    for number in BANK_NUMBERS:
        assert (number in text) is share, number
    facts = json.loads(json.loads(text)["input"].split("\n", 1)[1])
    if share:
        assert facts["privacy"]["banks"][1]["noise_multiplier"] == 4.3219
        assert facts["strategy"]["refused_updates"][0]["bank"] == 1
        return
    # The aggregates: counted by hand from metrics_with_bank_numbers().
    assert facts["federated_vs_local_only_bank_counts"] == {
        "own_validation_auc": {"banks_compared": 1, "federated_better": 0, "tied": 0,
                               "local_only_better": 1},
        "own_validation_ap": {"banks_compared": 1, "federated_better": 1, "tied": 0,
                              "local_only_better": 0},
        "test_auc": {"banks_compared": 2, "federated_better": 1, "tied": 1,
                     "local_only_better": 0},
        "test_ap": {"banks_compared": 2, "federated_better": 2, "tied": 0,
                    "local_only_better": 0},
    }
    assert facts["privacy"] == {
        "secure_aggregation": False, "differential_privacy": True, "mechanism": "DP-SGD",
        "target_epsilon": 3.0, "delta": 1e-5, "max_grad_norm": 1.0,
        "max_epsilon_spent": 2.9871, "scope": "the banks' training rows"}
    assert facts["membership_audit"] == {"attack": "loss threshold", "attack_auc": 0.5031}
    assert facts["strategy"] == {"name": "fedavg", "attack": "nan", "attacking_banks": 1,
                                 "refused_updates": 1}


@pytest.mark.parametrize("status", [429, 500])
def test_api_errors_give_the_offline_report(tmp_path: Path, monkeypatch, key,
                                            status: int) -> None:
    with FakeResponsesAPI([status] * 10) as api:
        report = run_report(tmp_path, api.url, monkeypatch, report_max_retries=1)

    assert len(api.requests) == 2  # first try + one retry
    assert "Offline report" in report and "OpenAI request failed" in report
    assert "AUC 0.880" in report and "Risks" in report


def test_timeout_gives_the_offline_report(tmp_path: Path, monkeypatch, key) -> None:
    with FakeResponsesAPI([], delay_s=3.0) as api:
        started = time.monotonic()
        report = run_report(tmp_path, api.url, monkeypatch, report_timeout_s=0.5,
                            report_max_retries=0)
    assert time.monotonic() - started < 3.0
    assert "Offline report" in report and "APITimeoutError" in report


def test_html_report_shows_tables_figures_and_the_text_but_runs_no_html(
    tmp_path: Path, monkeypatch, key,
) -> None:
    with FakeResponsesAPI([], text="## Risks\n<script>x()</script>") as api:
        report = run_report(tmp_path, api.url, monkeypatch)
    page = (tmp_path / HTML_FILE).read_text()

    assert "<script>x()</script>" in report  # the Markdown keeps the text as written
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert '<img alt="ROC curves" src="roc.png"' in page
    assert "<td>centralized reference, test set</td>" in page
    assert "<td>0.890</td>" in page and "n/a / n/a" in page  # bank 1: no fraud in val


def test_offline_report_says_whether_federation_paid(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    report = run_report(tmp_path, None, monkeypatch)
    assert ("AUC 0.880 vs 0.890 (-0.010; 95 % interval -0.031 to +0.012), "
            "AP 0.740 vs 0.760 (-0.020)") in report
    assert "in AP at 1 of 1 banks with fraud in their validation rows" in report
    assert ("local-only models reach AUC 0.600 to 0.810 against the federated 0.880 "
            "(federated minus the best: +0.070; 95 % interval +0.041 to +0.100)") in report


def test_a_report_of_a_run_without_intervals_still_compares(tmp_path: Path,
                                                            monkeypatch) -> None:
    """metrics.json written before the bootstrap intervals existed."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    metrics = sample_metrics()
    del metrics["baselines"]["federated_minus"]
    write_report(tmp_path, metrics, app_config(), {})
    report = (tmp_path / REPORT_FILE).read_text()
    assert "AUC 0.880 vs 0.890 (-0.010), AP 0.740 vs 0.760 (-0.020)" in report
    assert "(federated minus the best: +0.070)" in report


def test_no_key_means_offline_without_any_request(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with FakeResponsesAPI([]) as api:
        report = run_report(tmp_path, api.url, monkeypatch)
    assert api.requests == []
    assert "no OPENAI_API_KEY set" in report
    assert (tmp_path / REQUEST_FILE).exists()  # what would have been sent


class Elements(HTMLParser):
    """Every element of a page with its attributes, as a browser's parser sees them
    (entities decoded)."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.found: list[tuple[str, dict[str, str | None]]] = []
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.append((tag, dict(attrs)))


ACTIVE_TEXT = "\n".join([
    "## Risks",
    "[plain js](javascript:alert(1)) [mixed case](JaVaScRiPt:alert(2))",
    "[entity](&#106;avascript:alert(3)) [hex tab](java&#x09;script:alert(4))",
    "[spaced]( java\tscript:alert(5)) [data link](data:text/html;base64,PHNjcmlwdD4=)",
    "[vb](vbscript:msgbox(6)) [file](file:///etc/passwd)",
    "![remote](https://remote.example/img.png) ![data img](data:image/png;base64,AAAA)",
    '![quote](roc.png" onerror="alert(7)) <img src=x onerror=alert(8)>',
    "",
    "[the guide](https://example.com/guide) [top](#risks) ![our roc](roc.png)",
])


def test_html_report_keeps_only_safe_links_and_the_runs_own_figures(
    tmp_path: Path, monkeypatch, key,
) -> None:
    with FakeResponsesAPI([], text=ACTIVE_TEXT) as api:
        report = run_report(tmp_path, api.url, monkeypatch)
    page = (tmp_path / HTML_FILE).read_text()
    elements = Elements(page).found

    assert "javascript:alert(1)" in report  # report.md keeps the text as written
    hrefs = [attrs.get("href") for tag, attrs in elements if tag == "a"]
    assert hrefs == ["https://example.com/guide", "#risks"]
    images = [attrs.get("src") for tag, attrs in elements if tag == "img"]
    assert images == ["roc.png", "roc.png"]  # the run's figure and the model's use of it
    assert not [name for _, attrs in elements for name in attrs if name.startswith("on")]
    for gone in ("javascript", "vbscript", "data:", "file:", "remote.example", "<img src=x"):
        assert gone not in page.lower(), gone
    # The text of a refused link stays, as text.
    assert "plain js" in page and "data link" in page and "the guide</a>" in page


@pytest.mark.parametrize(("href", "safe"), [
    ("https://example.com/a?b=c:d", True), ("HTTP://example.com", True),
    ("mailto:risk@bank.example", True), ("figures/roc.png", True), ("#top", True),
    ("?q=a:b", True), ("//cdn.example/x", True),
    ("javascript:alert(1)", False), ("JaVaScRiPt:alert(1)", False),
    ("\x00javascript:x", False), ("java\nscript:x", False), (" \tjavascript:x", False),
    ("\xa0javascript:x", False), ("data:text/html,x", False), ("vbscript:x", False),
    ("file:///etc/passwd", False), ("blob:https://x/1", False),
])
def test_link_schemes_are_allow_listed(href: str, safe: bool) -> None:
    assert link_is_safe(href) is safe


def test_sanitizer_drops_markup_outside_the_allow_lists() -> None:
    fragment = ('<p onclick="x()">a<script>bad()</script><iframe src="https://x">b'
                '</iframe><img src="roc.png" onerror="x()"><img src="other.png">'
                '<a href="&#106;avascript:x" onmouseover="y()">c</a>'
                '<td style="background:url(x)">d</td><th style="text-align: right;">e</th>'
                '&lt;b&gt;</p>')
    assert sanitize_html(fragment, ["roc.png"]) == (
        '<p>ab<img src="roc.png" />c<td>d</td><th style="text-align: right;">e</th>'
        '&lt;b&gt;</p>')


def test_a_secure_dp_deployment_without_test_set_reports_what_it_knows(
    tmp_path: Path, monkeypatch,
) -> None:
    """SecAgg+ with DP in a deployment: no server test set, no bank reports its size
    or epsilon. The report and the model card say what the run was evaluated on and
    where each bank's epsilon is, and invent nothing."""
    from server.export import dp_summary

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    metrics = {**sample_metrics(), "mode": "deployment", "test_set": None,
               "baselines": None, "banks": [{"id": 0}, {"id": 1}],
               "privacy": {"secure_aggregation": True, "differential_privacy": True,
                           "target_epsilon": 3.0, "delta": 1e-5, "max_epsilon_spent": None,
                           "banks": [], "banks_note": "each keeps it in its own ledger"}}
    write_report(tmp_path, metrics, app_config(), {})

    report = (tmp_path / REPORT_FILE).read_text()
    assert "banks' pooled validation rows" in report and "test set (" not in report
    assert "target epsilon of 3" in report and "own ledger" in report
    assert "own ledger" in dp_summary(metrics["privacy"])


def test_the_report_names_each_refused_reply_and_its_reason() -> None:
    """...and says of a secure round that failed as a whole that it did, not that a
    bank's update was refused (no one reply was)."""
    from server.report import SECURE_ROUND_FAILED, privacy_lines, report_facts

    refused = [{"round": 2, "bank": 1, "message": "train", "why": "non-finite values in weights"},
               {"round": 10, "bank": None, "message": "evaluate", "why": "no bank-id"},
               {"round": 3, "bank": 4, "message": "train (SecAgg+ unmask)",
                "why": "shares of nodes it was not asked about"},
               {"round": 4, "bank": None, "message": SECURE_ROUND_FAILED,
                "why": "unmasking the sum failed (ValueError)"}]
    lines = privacy_lines({"strategy": {"refused_updates": refused}})
    assert lines[-4:] == [
        "Bank 1's update of round 2 was refused: non-finite values in weights.",
        "A bank's evaluation of round 10 was refused: no bank-id.",
        "Bank 4's update of round 3 was refused: shares of nodes it was not asked about.",
        "Round 4's secure aggregation ended without an update, the global model staying "
        "as it was: unmasking the sum failed (ValueError)."]
    facts = report_facts({**sample_metrics(), "strategy": {
        "name": "fedavg", "attack": "none", "refused_updates": refused}}, False)
    assert facts["strategy"]["refused_updates"] == 3  # replies, not the failed round
    assert facts["strategy"]["secure_rounds_without_update"] == 1
