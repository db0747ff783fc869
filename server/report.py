"""The risk report: asked of OpenAI's Responses API, built offline when that fails.

Only aggregates go out by default; ``report-share-bank-details`` adds everything per
bank (sizes, fraud rates, local-only vs federated, epsilon, attack AUC, refusals). The
exact request is saved beside report.md before it is sent. The report never fails a
run: any problem yields the offline report, which says so.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Collection
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from flwr.common import log
from logging import WARNING

from common.config import Config

INSTRUCTIONS = (
    "You are a senior fraud-risk analyst writing for a bank's risk committee. Write a "
    "concise internal report in Markdown with exactly these sections: Executive summary, "
    "Metric interpretation, Risks, Next steps. Use only the numbers given; do not invent "
    "figures. Fraud is rare, so judge the model by AUC, average precision, recall at 1 % "
    "false-positive rate and precision/recall at the chosen threshold, not by accuracy."
)
REQUEST_FILE = "report_request.json"
# refused_updates' "message" of a secure round that ended without an update, no one
# reply refused (server/secure.py): the report says so, not "a bank's update".
SECURE_ROUND_FAILED = "train (SecAgg+)"
REPORT_FILE, HTML_FILE = "report.md", "report.html"


def report_facts(metrics: dict[str, Any], share_bank_details: bool) -> dict[str, Any]:
    """What the report may say: aggregates only, unless ``share_bank_details``.

    Per-bank numbers can identify a bank or reveal its size to the language model's
    provider: a bank's local-only AUC/AP, its spent epsilon and noise multiplier (which
    follow from its row count), its membership-attack AUC, which bank's update was
    refused. Without the flag only counts, maxima and pooled values go out, picked by
    an allow-list so that a field added to metrics.json later stays home by default.
    """
    final = metrics["final"]
    keep = ("auc", "ap", "recall_at_1pct_fpr", "precision", "recall", "f1", "threshold",
            "tp", "fp", "fn", "tn", "loss")
    facts: dict[str, Any] = {
        "setting": "federated fraud detection, FedAvg across banks; no transaction "
                   "left any bank",
        "mode": metrics["mode"],
        "rounds": len(metrics["history"]),
        "banks": len(metrics["banks"]),
        "training_rows_total": sum(bank.get("n_train", 0) for bank in metrics["banks"]),
        "test_set": metrics["test_set"],
        "evaluated_on": evaluated_on(metrics),
        "final_test_metrics": {key: final[key] for key in keep if key in final},
        "threshold_chosen_on": "pooled validation data of the banks (max F1)",
        "auc_ap_by_round": [
            {"round": row["round"], "auc": round(row["auc"], 4), "ap": round(row["ap"], 4)}
            for row in metrics["history"]
        ],
    }
    start = metrics.get("initial_model") or {}
    if start.get("test") or start.get("validation"):
        facts["model_in_production_metrics"] = {
            key: value for key, value in (start.get("test") or start["validation"]).items()
            if key in keep}
    baselines = metrics.get("baselines")
    if baselines:
        central = baselines["centralized"]
        facts["centralized_reference_test_metrics"] = {
            key: central[key] for key in keep if key in central}
        facts["federated_vs_local_only_bank_counts"] = federation_counts(
            baselines["local_only"])
    if personal := metrics.get("personalization"):  # pooled and counted: no one bank
        facts["personalization"] = {key: personal[key] for key in (
            "about", "banks", "banks_kept_personalized", "federated", "kept")}
    privacy, audit = metrics.get("privacy"), metrics.get("membership_audit")
    strategy = metrics.get("strategy")
    if share_bank_details:
        facts["per_bank"] = [
            {"bank": bank["id"], "n_train": bank["n_train"],
             "fraud_rate": bank["n_fraud"] / max(1, bank["n_train"] + bank["n_val"])}
            for bank in metrics["banks"] if "n_train" in bank
        ]
        if baselines:
            facts["local_only_vs_federated_per_bank"] = [
                {"bank": entry["bank"], **{
                    f"{model}_{where}_{key}": round(metrics_[key], 4)
                    for where, models in (("own_validation", entry["own_validation"]),
                                          ("test", entry["test"]))
                    for model, metrics_ in models.items() if metrics_
                    for key in ("auc", "ap") if metrics_[key] is not None}}
                for entry in baselines["local_only"]
            ]
        for key, value in (("strategy", strategy), ("privacy", privacy),
                           ("membership_audit", audit)):
            if value:
                facts[key] = value
        return facts
    if strategy:
        refused = strategy.get("refused_updates", [])
        failed = sum(1 for entry in refused if entry.get("message") == SECURE_ROUND_FAILED)
        facts["strategy"] = {
            "name": strategy["name"], "attack": strategy["attack"],
            "attacking_banks": len(strategy.get("attackers", [])),
            "refused_updates": len(refused) - failed}
        if failed:
            facts["strategy"]["secure_rounds_without_update"] = failed
    if privacy:
        facts["privacy"] = {key: privacy[key] for key in PRIVACY_AGGREGATES if key in privacy}
    if audit:
        facts["membership_audit"] = {key: audit[key] for key in ("attack", "attack_auc")
                                     if key in audit}
    return facts


# The privacy record's run-wide settings and maxima: nothing about any one bank.
PRIVACY_AGGREGATES = ("secure_aggregation", "differential_privacy", "mechanism",
                      "target_epsilon", "delta", "max_grad_norm", "max_epsilon_spent",
                      "scope")


def federation_counts(local_only: list[dict[str, Any]]) -> dict[str, Any]:
    """At how many banks the federated model beat, tied (to 4 decimals) or lost to the
    bank's local-only model, per data set and metric: whether federation paid, without
    any one bank's numbers. A bank is counted only where both values are defined."""
    counts: dict[str, Any] = {}
    for where in ("own_validation", "test"):
        for key in ("auc", "ap"):
            pairs = []
            for entry in local_only:
                local = entry[where]["local_only"] or {}
                federated = entry[where]["federated"] or {}
                if local.get(key) is not None and federated.get(key) is not None:
                    pairs.append((round(local[key], 4), round(federated[key], 4)))
            counts[f"{where}_{key}"] = {
                "banks_compared": len(pairs),
                "federated_better": sum(1 for local, fed in pairs if fed > local),
                "tied": sum(1 for local, fed in pairs if fed == local),
                "local_only_better": sum(1 for local, fed in pairs if fed < local)}
    return counts


def build_request(metrics: dict[str, Any], config: Config) -> dict[str, Any]:
    facts = report_facts(metrics, config.report_share_bank_details)
    return {
        "model": config.report_model,
        "instructions": INSTRUCTIONS,
        "input": "Results of this run (JSON):\n" + json.dumps(facts, indent=2),
    }


def ask_openai(request: dict[str, Any], config: Config) -> str:
    """Send ``request`` with the OpenAI SDK (key and base URL from the environment)."""
    from openai import OpenAI

    client = OpenAI(  # an empty OPENAI_BASE_URL (e.g. from compose) means the default
        base_url=os.environ.get("OPENAI_BASE_URL") or None,
        timeout=config.report_timeout_s, max_retries=config.report_max_retries,
    )
    text = client.responses.create(**request).output_text
    if not text.strip():
        raise ValueError("the model returned an empty report")
    return text


def offline_report(metrics: dict[str, Any], reason: str) -> str:
    """A plain report from the same numbers, saying that it is offline and why."""
    final, banks = metrics["final"], metrics["banks"]
    first, last = metrics["history"][0], metrics["history"][-1]
    flagged = final["tp"] + final["fp"]
    risks = [
        f"At the chosen threshold {final['fn']} of {final['fn'] + final['tp']} frauds are "
        f"missed and {final['fp']} legitimate transactions are flagged.",
        "The threshold was chosen on the banks' pooled validation data; a bank whose "
        "fraud mix differs from the pool may see other precision and recall.",
        *privacy_lines(metrics),
    ]
    lines = [
        f"> Offline report: written without the language model ({reason}). Every number "
        "comes from metrics.json.",
        "",
        "## Executive summary",
        f"{len(banks)} banks trained one fraud model together for {len(metrics['history'])} "
        f"rounds without sharing transactions. On {evaluated_on(metrics)} the model "
        f"reaches AUC {final['auc']:.3f} and average precision {final['ap']:.3f}; at a 1 % "
        f"false-positive rate it catches {final['recall_at_1pct_fpr']:.0%} of frauds.",
        "",
        "## Metric interpretation",
        f"- Ranking: AUC went from {first['auc']:.3f} after round 1 to {last['auc']:.3f}; "
        f"AP from {first['ap']:.3f} to {last['ap']:.3f}.",
        f"- At threshold {final['threshold']:.3f} the model flags {flagged} transactions: "
        f"precision {final['precision']:.3f}, recall {final['recall']:.3f}, "
        f"F1 {final['f1']:.3f} (TP {final['tp']}, FP {final['fp']}, FN {final['fn']}, "
        f"TN {final['tn']}).",
        *[f"- {line}" for line in federation_gains(metrics)],
        "- Accuracy is not reported: with this little fraud, flagging nothing would "
        "already look accurate.",
        "",
        "## Risks",
        *[f"- {risk}" for risk in risks],
        "",
        "## Next steps",
        "- Review the flagged volume with the fraud operations team before go-live.",
        "- Re-run with more rounds or banks and compare AP; monitor drift per bank.",
        "- Generate the narrative report with a language model once a key is configured.",
    ]
    return "\n".join(lines) + "\n"


def evaluated_on(metrics: dict[str, Any]) -> str:
    test = metrics["test_set"]
    if test is None:
        return "the banks' pooled validation rows (no row is held at the server)"
    return (f"the server's held-out test set ({test['rows']} transactions, "
            f"{test['frauds']} frauds)")


def privacy_lines(metrics: dict[str, Any]) -> list[str]:
    """What the run says about privacy and bad banks, in plain sentences."""
    lines = []
    privacy = metrics.get("privacy") or {}
    if privacy.get("secure_aggregation"):
        lines.append("Secure aggregation (SecAgg+): the server saw only the sum of the "
                     "banks' models, never one bank's.")
    if privacy.get("differential_privacy") and privacy.get("max_epsilon_spent") is None:
        lines.append(
            f"Differential privacy: each bank trained with DP-SGD at a target epsilon of "
            f"{privacy['target_epsilon']:g} (delta {privacy['delta']:g}); with SecAgg+ no "
            "bank reported what it spent: each keeps it in its own ledger.")
    elif privacy.get("differential_privacy"):
        lines.append(
            f"Differential privacy: each bank trained with DP-SGD; the most any bank spent "
            f"is epsilon {privacy['max_epsilon_spent']:.2f} at delta {privacy['delta']:g} "
            f"(target {privacy['target_epsilon']:g}); validation counts are not noised.")
    else:
        lines.append("No differential privacy in this run: the weights each bank sends "
                     "are not noised.")
    audit = metrics.get("membership_audit")
    if audit and audit["attack_auc"] is not None:
        lines.append(f"Membership audit: a loss-threshold attack tells training rows from "
                     f"held-out rows with AUC {audit['attack_auc']:.3f} (0.5 = chance).")
    for refused in (metrics.get("strategy") or {}).get("refused_updates", []):
        if refused.get("message") == SECURE_ROUND_FAILED:  # no one reply was refused
            lines.append(f"Round {refused['round']}'s secure aggregation ended without an "
                         f"update, the global model staying as it was: {refused['why']}.")
            continue
        who = "A bank" if refused["bank"] is None else f"Bank {refused['bank']}"
        what = "evaluation" if refused.get("message") == "evaluate" else "update"
        lines.append(f"{who}'s {what} of round {refused['round']} was refused: "
                     f"{refused['why']}.")
    return lines


def federation_gains(metrics: dict[str, Any]) -> list[str]:
    """What the baselines say about joining, in plain sentences."""
    baselines = metrics.get("baselines")
    if not baselines:
        return ["No centralized or local-only reference was trained in this run (they "
                "need every bank's rows on one machine: simulation only)."]
    final, central = metrics["final"], baselines["centralized"]
    pairs = [(entry["own_validation"]["local_only"], entry["own_validation"]["federated"])
             for entry in baselines["local_only"]
             if (entry["own_validation"]["federated"] or {}).get("ap") is not None]
    better = sum(1 for local, fed in pairs if fed["ap"] >= local["ap"])
    local_test_auc = [entry["test"]["local_only"]["auc"] for entry in baselines["local_only"]]
    kept = {bank["id"]: bank.get("kept") for bank in metrics["banks"]}
    chosen = [(entry["own_validation"]["local_only"],
               entry["own_validation"][kept.get(entry["bank"]) or "federated"])
              for entry in baselines["local_only"]
              if (entry["own_validation"]["federated"] or {}).get("ap") is not None]
    personal = metrics.get("personalization")
    personal_lines = [] if not personal else [
        f"With personalization (each bank fine-tunes the final model on its own rows and "
        f"keeps whichever model has the higher AP on its own validation rows; "
        f"{personal['banks_kept_personalized']} of {personal['banks']} kept their own): "
        f"the kept model matches or beats local-only in AP at "
        f"{sum(1 for local, model in chosen if model['ap'] >= local['ap'])} of "
        f"{len(chosen)} banks; pooled validation AP {personal['federated']['ap']:.3f} "
        f"(federated) -> {personal['kept']['ap']:.3f} (kept; chosen on the same rows)."]
    minus = baselines.get("federated_minus") or {}
    return [
        f"Against the centralized reference (all banks' rows pooled, same model and "
        f"budget): AUC {final['auc']:.3f} vs {central['auc']:.3f} "
        f"({final['auc'] - central['auc']:+.3f}{interval(minus.get('centralized'))}), "
        f"AP {final['ap']:.3f} vs {central['ap']:.3f} ({final['ap'] - central['ap']:+.3f}).",
        f"On its own validation data the federated model matches or beats the bank's "
        f"local-only model in AP at {better} of {len(pairs)} banks with fraud in their "
        f"validation rows; on the test set the "
        f"local-only models reach AUC {min(local_test_auc):.3f} to {max(local_test_auc):.3f} "
        f"against the federated {final['auc']:.3f} (federated minus the best: "
        f"{final['auc'] - max(local_test_auc):+.3f}"
        f"{interval(minus.get('best_local_only'))}).",
        *personal_lines,
    ]


def interval(difference: dict[str, Any] | None) -> str:
    """'; 95 % interval -0.021 to +0.004' for an AUC difference's bootstrap interval
    (``common.metrics.auc_difference``): a difference inside it may be test-set noise."""
    if not difference:
        return ""
    low, high = difference["ci95"]
    return f"; 95 % interval {low:+.3f} to {high:+.3f}"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _row(name: str, values: dict[str, Any] | None) -> str:
    if not values:
        return f"| {name} |" + " |" * 11
    ratios = ("auc", "ap", "recall_at_1pct_fpr", "threshold", "precision", "recall", "f1")
    return (f"| {name} | " + " | ".join(_number(values[key]) for key in ratios) +
            f" | {values['tp']} | {values['fp']} | {values['fn']} | {values['tn']} |")


def results_tables(metrics: dict[str, Any]) -> str:
    """The run's numbers as Markdown tables (from metrics.json only)."""
    final, baselines = metrics["final"], metrics.get("baselines")
    lines = [
        "| model, data | AUC | AP | recall @ 1 % FPR | threshold | precision | recall "
        "| F1 | TP | FP | FN | TN |",  # n/a: no fraud in those rows
        "|---|" + "---|" * 11,
        _row("federated, test set" if metrics["test_set"] else
             "federated, banks' pooled validation", final),
        _row("federated, banks' pooled validation", final.get("validation")),
    ]
    start = metrics.get("initial_model") or {}
    if start:  # next month's run: the model in production it started from
        lines.append(_row("model in production (initial-model), "
                          + ("test set" if "test" in start else "pooled validation"),
                          start.get("test", start.get("validation"))))
    if baselines:
        lines.append(_row("centralized reference, test set", baselines["centralized"]))
        lines += ["", "Per bank, local-only vs federated (AUC / AP):", "",
                  "| bank | rows | frauds | own validation: local-only | own validation: "
                  "federated | own validation: personalized | test set: local-only | "
                  "test set: federated |", "|---|---|---|---|---|---|---|---|"]
        sizes = {bank["id"]: bank for bank in metrics["banks"]}
        for entry in baselines["local_only"]:
            size = sizes.get(entry["bank"], {})
            cells = [f"{_number(m['auc'])} / {_number(m['ap'])}" if m else "-" for m in (
                entry["own_validation"]["local_only"], entry["own_validation"]["federated"],
                entry["own_validation"].get("personalized"),
                entry["test"]["local_only"], entry["test"]["federated"])]
            if size.get("kept") == "personalized":
                cells[2] += " (kept)"
            lines.append(f"| {entry['bank']} | {size.get('n_train', 0) + size.get('n_val', 0)}"
                         f" | {size.get('n_fraud', '-')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(run_dir: Path, metrics: dict[str, Any], config: Config,
                 figures: dict[str, str]) -> Path:
    """Write report.md and report.html (numbers, figures, the analyst's text) and the
    exact request into ``run_dir``; never raises on an unreachable or failing API."""
    request = build_request(metrics, config)
    (run_dir / REQUEST_FILE).write_text(json.dumps(request, indent=2) + "\n")
    if not os.environ.get("OPENAI_API_KEY"):
        body = offline_report(metrics, "no OPENAI_API_KEY set")
    else:
        try:
            body = f"_Written by {config.report_model} from the facts in {REQUEST_FILE}._\n\n"
            body += ask_openai(request, config)
        except Exception as err:  # noqa: BLE001 - a report must never sink the run
            log(WARNING, "fedfraud report: OpenAI request failed, writing offline: %r", err)
            body = offline_report(metrics, f"OpenAI request failed: {type(err).__name__}")
    title = f"Fraud-risk report, run {metrics['run_id']}"
    head = "\n".join([
        f"# {title}", "",
        f"{len(metrics['banks'])} banks, {len(metrics['history'])} rounds, "
        f"{metrics['mode']}; evaluated on {evaluated_on(metrics)}. All numbers: "
        "metrics.json.", "",
        "## Results", "", results_tables(metrics),
        *[f"![{caption}]({name})\n" for caption, name in figures.items()],
        "## Analysis", "", "",
    ])
    path = run_dir / REPORT_FILE
    path.write_text(head + body)
    write_html(run_dir / HTML_FILE, title, head, body, figures.values())
    return path


def write_html(path: Path, title: str, head: str, analysis: str,
               images: Collection[str] = ()) -> None:
    """The report as one page (figures by relative path). The analyst's text may come
    from a model: any HTML in it is shown as text, never run, and the rendered page
    keeps only allow-listed tags, attributes, link schemes and the run's own
    ``images`` (see ``sanitize_html``)."""
    import markdown

    body = sanitize_html(markdown.markdown(head + analysis.replace("<", "&lt;"),
                                           extensions=["tables"]), images)
    path.write_text(
        f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n"
        f"<body>\n{body}\n</body></html>\n")


# What Markdown (with tables) renders from text without raw HTML; anything else goes.
ALLOWED_TAGS = frozenset({
    "a", "blockquote", "br", "code", "em", "h1", "h2", "h3", "h4", "h5", "h6", "hr",
    "img", "li", "ol", "p", "pre", "strong", "table", "tbody", "td", "th", "thead", "tr",
    "ul"})
VOID_TAGS = frozenset({"br", "hr", "img"})
ALLOWED_ATTRIBUTES = {"a": ("href", "title"), "img": ("src", "alt", "title"),
                      "td": ("style",), "th": ("style",)}
CELL_STYLES = frozenset({"text-align: left;", "text-align: center;", "text-align: right;"})
LINK_SCHEMES = frozenset({"http", "https", "mailto"})
DROP_CONTENT_TAGS = frozenset({"script", "style"})  # their text is code, not prose


def link_is_safe(url: str) -> bool:
    """http, https, mailto or relative. Judged on the decoded value (the parser
    has already turned entities like ``&#106;`` into characters) with every space and
    control character removed, as browsers drop some of them inside a scheme; whatever
    precedes the first ``:`` that comes before any ``/``, ``?`` or ``#`` is a scheme and
    must be one of LINK_SCHEMES, so an obfuscated scheme fails rather than slips by."""
    squeezed = "".join(ch for ch in url if ch.isprintable() and not ch.isspace())
    head = squeezed.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    return ":" not in head or head.split(":", 1)[0].lower() in LINK_SCHEMES


class _Sanitizer(HTMLParser):
    """Rebuilds HTML from the allow-lists above: other tags are dropped (their text
    kept, escaped), other attributes (e.g. ``onerror``) dropped, a link with another
    scheme loses its tag, an image other than the run's own figures disappears."""

    def __init__(self, images: Collection[str]) -> None:
        super().__init__(convert_charrefs=True)
        self.images = frozenset(images)
        self.out: list[str] = []
        self.links: list[bool] = []  # per open <a>: was its tag kept
        self.dropping = 0  # inside <script> or <style>

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in DROP_CONTENT_TAGS:
            self.dropping += 1
        if tag not in ALLOWED_TAGS:
            return
        allowed = ALLOWED_ATTRIBUTES.get(tag, ())
        kept = [(name, value) for name, value in attrs
                if name in allowed and value is not None]
        if tag in ("td", "th"):
            kept = [(n, v) for n, v in kept if n != "style" or v.strip() in CELL_STYLES]
        values = dict(kept)
        if tag == "img" and values.get("src") not in self.images:
            return
        if tag == "a":
            safe = "href" not in values or link_is_safe(values["href"])
            self.links.append(safe)
            if not safe:
                return
        text = "".join(f' {name}="{html.escape(value)}"' for name, value in kept)
        self.out.append(f"<{tag}{text}{' /' if tag in VOID_TAGS else ''}>")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in VOID_TAGS:
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in DROP_CONTENT_TAGS:
            self.dropping = max(0, self.dropping - 1)
        if tag not in ALLOWED_TAGS or tag in VOID_TAGS:
            return
        if tag == "a" and not (self.links.pop() if self.links else False):
            return
        self.out.append(f"</{tag}>")

    def handle_data(self, data: str) -> None:
        if not self.dropping:
            self.out.append(html.escape(data, quote=False))

    # Comments, doctypes and processing instructions: HTMLParser's defaults drop them.


def sanitize_html(fragment: str, images: Collection[str]) -> str:
    """``fragment`` with only allow-listed markup left (stdlib parser: no bleach or nh3
    in the environment, and a regex over Markdown would miss what Markdown renders)."""
    sanitizer = _Sanitizer(images)
    sanitizer.feed(fragment)
    sanitizer.close()
    return "".join(sanitizer.out)


STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
    "line-height:1.45;color:#222}table{border-collapse:collapse;margin:1em 0;"
    "font-size:.9em}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}"
    "th:first-child,td:first-child{text-align:left}img{max-width:100%;display:block;"
    "margin:1em 0}blockquote{color:#555;border-left:3px solid #ccc;margin-left:0;"
    "padding-left:1em}"
)
