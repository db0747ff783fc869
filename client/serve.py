"""The bank's scoring service: the federated model in production, over HTTP (uvicorn).

    fedfraud-bank serve --run runs/approved --scaler /bank/scaler.json \\
        [--host 127.0.0.1] [--port 8080] [--admin-token-file /bank/serve.token]
    (the same: python -m client.serve --run ... --scaler ...)

It scores with ``client/score.py``, the path ``fedfraud score`` uses: the same checks
(``Schema.encode``), the same model call, the same reason codes.

API
- ``POST /score``, a JSON body, either one transaction (an object: the schema's columns
  plus an ``id``, a string or an integer; ``null`` is a missing value, scored as the
  bank's mean)::

      {"id": "tx-1", "f00": 0.12, ..., "f29": -1.7}
      -> {"id": "tx-1", "fraud_probability": 0.93, "flagged": true, "model_version": "42",
          "reasons": [{"feature": "f07", "direction": "raises", "contribution": 0.41},
                      ... three, largest first]}

  or a batch, an object whose only key is ``transactions`` (results in the same order)::

      {"transactions": [transaction, ...]}
      -> {"model_version": "42", "threshold": 0.2, "results": [result, ...]}

  ``flagged`` is probability >= the run's threshold (model card; ``--threshold``
  overrides); ``model_version`` is the run id from the model card of the model that
  scored the request (one model per request, even across a switch). ``reasons`` (flagged
  transactions only): the three features that contributed most, with the direction they
  pushed the fraud probability and their contribution in probability units: Integrated
  Gradients from the bank's mean transaction (``client/score.py`` describes the method).
- ``GET /health``: ``{"status": "ok", "model_version", "run", "loaded_at"}``.
- ``GET /model``: the serving model's ``model_card.json``.

Bad input never reaches the model and never stops the service: 400 body is not JSON,
413 body over ``--max-body-mb`` (10 MB) or more than ``--max-transactions`` (10,000)
transactions, 422 anything ``Schema.encode`` refuses or a missing id, an empty batch,
NaN/Infinity/non-finite numbers — ``{"detail": "..."}`` names the column and the row
(1-based position in the batch), e.g. ``transactions: column 'f03' must be numeric
(row 2: 'abc')``.

Model updates without downtime. The service loads a run folder completely (card, its
weights into the bank's own FraudNet, warm-up calls), checks that the card's features
equal the bank's schema (from its own ``scaler.json``, re-read), and only then swaps
one reference. A request
takes that reference once when it starts, so requests in flight finish on the old
model. A run that cannot be loaded or does not fit the bank's schema is refused and
the old model keeps serving. Two ways to ask for it:
- ``kill -HUP <pid>`` on the bank's machine: reload whatever ``--run`` points at now
  (e.g. the bank re-points its ``runs/approved`` symlink after approving a run). Only
  the service's owner (or root) can signal it; nothing to configure.
- ``POST /admin/reload`` with ``Authorization: Bearer <token>`` and an optional body
  ``{"run": "/path/to/run"}`` (default: what ``--run`` points at now) -> 200 with the
  new ``model_version``; 409 when the run is refused; 403 for a run folder outside
  ``--runs-root`` (default: the folder holding ``--run``'s target). The endpoint exists
  only when ``--admin-token-file`` is given (a file only its owner may read: mode 600),
  so by default the network can score but never change the model; the service binds
  127.0.0.1 unless ``--host`` says otherwise, and TLS belongs in front of it (the
  bank's reverse proxy) when it does.

Performance: one process (an in-memory swap excludes ``--workers``), uvloop and
httptools when installed, no access log, one torch thread, the start-up objects frozen
out of the garbage collector's reach. Small requests are scored
on the event loop (no thread hop); bodies over 64 KB go to one scoring thread, so that
the event loop keeps answering single transactions between a large batch's steps
(parsing a 1,000-transaction body still holds the GIL for ~2.6 ms, with orjson). ``bench/serve.py`` measures it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hmac
import json
import signal
import stat
import sys
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

from client.score import Scorer, reason_codes, records_matrix, score_matrix
from common.data import BankDataError

MAX_BODY_BYTES = 10 * 1024 * 1024
MAX_TRANSACTIONS = 10_000
INLINE_BYTES = 64 * 1024  # bodies up to this are scored on the event loop
ADMIN_BODY_BYTES = 64 * 1024
MAX_INT_DIGITS = 308  # a longer JSON integer is beyond float64


class RequestError(Exception):
    """A request the service refuses: its HTTP status and what to tell the client."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


class ReloadRefused(RequestError):
    """A run folder the service will not switch to; the old model keeps serving."""


class NotANumber:
    """What the JSON parser makes of NaN, Infinity and integers beyond float64, so that
    ``Schema.encode`` refuses them as non-numeric, naming the column and the row."""

    def __init__(self, literal: str) -> None:
        self.literal = literal if len(literal) <= 24 else literal[:20] + "..."

    def __repr__(self) -> str:
        return self.literal


def _integer(literal: str) -> int | NotANumber:
    return NotANumber(literal) if len(literal.lstrip("-")) > MAX_INT_DIGITS else int(literal)


def parse_json(body: bytes, id_column: str) -> Any:
    """The request's JSON. orjson parses a batch in half the time of the standard
    library and to the same values, except that it refuses NaN, Infinity and numbers
    beyond float64, and reads integers beyond 64 bits as floats (an id must stay the
    integer it was): those bodies are parsed again by the standard library, whose hooks
    make NaN, Infinity and integers beyond float64 values ``Schema.encode`` refuses by
    name (1e400 becomes inf, which ``check_finite`` refuses by name)."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    else:
        records = (payload["transactions"] if type(payload) is dict
                   and payload.keys() == {"transactions"} else [payload])
        if type(records) is not list or not any(
                type(record) is dict and type(record.get(id_column)) is float
                for record in records):
            return payload
    try:
        return json.loads(body, parse_constant=NotANumber, parse_int=_integer)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError
        raise RequestError(400, f"body is not JSON ({str(err)[:200]})") from None


class ScoringService:
    """The serving model (one reference, swapped whole) and what scoring needs."""

    def __init__(self, run: Path, scaler: Path, *, threshold: float | None = None,
                 id_column: str = "id", runs_root: Path | None = None,
                 max_body_bytes: int = MAX_BODY_BYTES,
                 max_transactions: int = MAX_TRANSACTIONS) -> None:
        self.run, self.scaler = Path(run), Path(scaler)
        self.runs_root = Path(runs_root or self.run.resolve().parent).resolve()
        self.threshold, self.id_column = threshold, id_column
        self.max_body_bytes, self.max_transactions = max_body_bytes, max_transactions
        self._reloading = threading.Lock()
        self.scorer = load_warm(self.run.resolve(), self.scaler)
        self.loaded_at = time.time()

    def reload(self, run: Path | str | None = None) -> Scorer:
        """Load ``run`` (default: what ``--run`` points at now) fully, check it fits the
        bank's schema, then swap. Raises ``ReloadRefused``; the old model then stays."""
        with self._reloading:
            target = Path(run).resolve() if run else self.run.resolve()
            if not target.is_relative_to(self.runs_root):
                raise ReloadRefused(403, f"{target}: not inside the runs folder "
                                         f"{self.runs_root}")
            try:
                scorer = load_warm(target, self.scaler)
            except Exception as err:  # noqa: BLE001 - whatever it is, keep the old model
                raise ReloadRefused(409, f"{target}: refused, still serving model "
                                         f"{self.scorer.version}: {err}") from None
            self.scorer, self.loaded_at = scorer, time.time()  # the one atomic swap
            return scorer

    def score(self, body: bytes) -> bytes:
        """The JSON response to a ``POST /score`` body; ``RequestError`` if refused."""
        scorer = self.scorer  # this request's model, start to finish
        payload = parse_json(body, self.id_column)
        batch = type(payload) is dict and payload.keys() == {"transactions"}
        records = payload["transactions"] if batch else [payload]
        if type(records) is list and len(records) > self.max_transactions:
            raise RequestError(413, f"{len(records)} transactions; at most "
                                    f"{self.max_transactions} per request")

        def fail(why: str) -> RequestError:
            return RequestError(422, f"transactions: {why}" if batch else why)

        ids, x = records_matrix(records, scorer.schema, self.id_column, fail)
        scores = score_matrix(scorer, x, self.threshold)
        version = scorer.version
        results = []
        for identifier, probability, flagged, reasons in zip(
                ids, scores.probabilities.tolist(), scores.flagged.tolist(), scores.reasons):
            result = {self.id_column: identifier, "fraud_probability": probability,
                      "flagged": flagged, "model_version": version}
            if flagged:
                result["reasons"] = reasons
            results.append(result)
        out = ({"model_version": version, "threshold": scores.threshold, "results": results}
               if batch else results[0])
        try:
            return orjson.dumps(out)
        except TypeError:  # an integer id beyond 64 bits
            return json.dumps(out, separators=(",", ":")).encode()


def load_warm(run_dir: Path, scaler: Path) -> Scorer:
    """A run's model, loaded and called a few times (torch's first calls allocate and
    pick their kernels), so that the first requests after a switch are not slow."""
    scorer = Scorer.load(run_dir, scaler)
    x = np.zeros((64, len(scorer.features)), np.float32)
    for _ in range(3):
        for n in (1, 2, 64):
            probabilities = scorer.probabilities(x[:n])
            if probabilities.shape != (n,) or not np.isfinite(probabilities).all():
                raise ValueError(f"{run_dir}: the model gives {probabilities.shape} "
                                 f"for {n} rows")
        reason_codes(scorer, x[:2])
    return scorer


async def read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise RequestError(413, f"body of {int(length)} bytes; at most {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def read_token(path: Path) -> str:
    """The admin token; its file must be readable by its owner only (like an SSH key)."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SystemExit(f"fedfraud serve: {path} is readable by others "
                         f"(mode {stat.filemode(mode)}); chmod 600 it")
    token = path.read_text().strip()
    if len(token) < 16:
        raise SystemExit(f"fedfraud serve: {path}: the token must have >= 16 characters")
    return token


def log(message: str) -> None:
    print(f"fedfraud serve: {message}", file=sys.stderr, flush=True)


def create_app(service: ScoringService, admin_token: str | None = None,
               reload_on_sighup: bool = False) -> FastAPI:
    """The ASGI app. ``/admin/reload`` exists only with an ``admin_token``."""
    # One scoring thread: JSON parsing and building the answer hold the GIL, so a
    # second thread would only contend with the first (and with the event loop).
    threads = anyio.CapacityLimiter(1)

    def json_response(content: Any, status: int = 200) -> Response:
        body = content if isinstance(content, bytes) else json.dumps(content).encode()
        return Response(body, status, media_type="application/json")

    async def sighup_reload() -> None:
        try:
            scorer = await anyio.to_thread.run_sync(service.reload)
            log(f"SIGHUP: now serving model {scorer.version} from {scorer.run_dir}")
        except RequestError as err:
            log(f"SIGHUP: {err.detail}")

    @asynccontextmanager
    async def lifespan(_: Any):
        loop = asyncio.get_running_loop()
        hup = reload_on_sighup and threading.current_thread() is threading.main_thread()
        if hup:
            loop.add_signal_handler(signal.SIGHUP,
                                    lambda: loop.create_task(sighup_reload()))
        log(f"serving model {service.scorer.version} from {service.scorer.run_dir}"
            f"{'' if admin_token else ' (no /admin/reload: no --admin-token-file)'}")
        yield
        if hup:
            loop.remove_signal_handler(signal.SIGHUP)

    app = FastAPI(title="fedfraud scoring", lifespan=lifespan, openapi_url=None)

    @app.exception_handler(RequestError)
    async def refused(_: Request, err: RequestError) -> Response:
        return json_response({"detail": err.detail}, err.status)

    @app.post("/score")
    async def score(request: Request) -> Response:
        body = await read_body(request, service.max_body_bytes)
        try:
            if len(body) <= INLINE_BYTES:
                return json_response(service.score(body))
            return json_response(await anyio.to_thread.run_sync(
                service.score, body, limiter=threads))
        except RequestError:
            raise
        except Exception as err:  # noqa: BLE001 - answer, log, keep serving
            log(f"scoring failed: {err!r}")
            return json_response({"detail": "internal error while scoring"}, 500)

    @app.get("/health")
    async def health() -> Response:
        scorer = service.scorer
        return json_response({"status": "ok", "model_version": scorer.version,
                              "run": str(scorer.run_dir), "loaded_at": service.loaded_at})

    @app.get("/model")
    async def model() -> Response:
        return json_response(service.scorer.card)

    if admin_token is not None:
        expected = f"Bearer {admin_token}".encode()

        @app.post("/admin/reload")
        async def reload(request: Request) -> Response:
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return json_response({"detail": "a valid admin bearer token is needed"},
                                     401)
            body = await read_body(request, ADMIN_BODY_BYTES)
            payload = parse_json(body, service.id_column) if body.strip() else {}
            run = payload.get("run") if type(payload) is dict else payload
            if type(payload) is not dict or (run is not None and type(run) is not str):
                raise RequestError(400, 'body: {"run": "<run folder>"}, {} or nothing')
            previous = service.scorer.version
            scorer = await anyio.to_thread.run_sync(service.reload, run)
            log(f"reloaded: model {previous} -> {scorer.version} ({scorer.run_dir})")
            return json_response({"model_version": scorer.version, "previous": previous,
                                  "run": str(scorer.run_dir)})

    return app


def add_serve_parser(subparsers: Any, name: str = "serve") -> argparse.ArgumentParser:
    """The ``serve`` command's options on an argparse subparsers object; the parsed
    arguments go to ``run(args)`` (also set as the ``handler`` default)."""
    parser = subparsers.add_parser(name, help="serve the run's model to score "
                                              "transactions over HTTP",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(handler=run)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", type=Path, default=Path("runs/latest"),
                        help="run folder (or a symlink to one) with model.ts and "
                             "model_card.json; SIGHUP reloads what it points at")
    parser.add_argument("--scaler", type=Path, required=True,
                        help="the bank's own scaler (scaler.json in its folder)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--threshold", type=float, default=None,
                        help="flag at this probability (default: each run's threshold)")
    parser.add_argument("--id-column", default="id")
    parser.add_argument("--admin-token-file", type=Path, default=None,
                        help="enable POST /admin/reload for this bearer token (a mode "
                             "600 file); without it, only SIGHUP reloads")
    parser.add_argument("--runs-root", type=Path, default=None,
                        help="/admin/reload only loads run folders inside this one "
                             "(default: the folder holding --run's target)")
    parser.add_argument("--max-body-mb", type=float, default=MAX_BODY_BYTES / 2**20)
    parser.add_argument("--max-transactions", type=int, default=MAX_TRANSACTIONS)
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch's intra-op threads (default 1: requests are small)")


def run(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    torch.set_num_threads(args.torch_threads)
    try:
        service = ScoringService(args.run, args.scaler, threshold=args.threshold,
                                 id_column=args.id_column, runs_root=args.runs_root,
                                 max_body_bytes=int(args.max_body_mb * 2**20),
                                 max_transactions=args.max_transactions)
    except (BankDataError, OSError, RuntimeError, ValueError) as err:
        raise SystemExit(f"fedfraud serve: cannot serve {args.run}: {err}") from None
    token = read_token(args.admin_token_file) if args.admin_token_file else None
    app = create_app(service, token, reload_on_sighup=True)
    # torch, pandas and FastAPI leave ~200,000 long-lived objects: a full collection
    # of them takes ~0.2 s. Frozen, the collector never walks them again.
    gc.collect()
    gc.freeze()
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="info",
                loop="auto", http="auto", lifespan="on", server_header=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedfraud-bank serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
