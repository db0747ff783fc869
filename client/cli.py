"""``fedfraud-bank``: what a bank runs, on its own machine, next to its own data.

    fedfraud-bank init      its policy (policy.toml, from the documented default) and
                            its key pair; prints the public key to hand the operator
    fedfraud-bank policy    its policy alone (``run`` makes the key pair if missing)
    fedfraud-bank approve   add an app bundle (.fab) the bank reviewed to its policy
    fedfraud-bank run       its SuperNode and task executor (approved apps only)
    fedfraud-bank summarize what the bank sends to agree the federation's schema: per
                            column its kind, gaps and text-value counts (rare values
                            left out), two yes/no answers per numeric column (none
                            below 0; skewed: --no-log-skewed leaves them out); no row,
                            no number, no label count
    fedfraud-bank synthesize a synthetic copy of its file (SDV, per class; rare text
                            values and ids left out), to try a federation before any
                            real row moves
    fedfraud-bank score     score its own transactions with a run's exported model
    fedfraud-bank serve     the scoring service: POST /score, GET /health, GET /model
    fedfraud-bank executor  the task executor alone (``run`` starts it)

The bank's folder (``--bank-dir``) holds its transactions (transactions.csv), the
federation's schema.json and its policy.toml; ``--state`` (default: the bank's folder)
is where it writes its scaler, its privacy ledger and its key pair (keys/).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.policy import DEFAULT_POLICY, POLICY_FILE, Policy, PolicyError, fab_digest
from common.schema import BankDataError

if TYPE_CHECKING:
    from client.node import BankFiles
    from common.config import Config


def bank_files(args: argparse.Namespace) -> BankFiles:
    from client.node import BankFiles

    bank_dir = args.bank_dir.resolve()
    return BankFiles(args.bank_id, bank_dir, (args.state or bank_dir).resolve(),
                     args.app_dir.resolve())


def policy(args: argparse.Namespace) -> int:
    bank = bank_files(args)
    bank.bank_dir.mkdir(parents=True, exist_ok=True)
    if not bank.policy.exists():
        bank.policy.write_text(DEFAULT_POLICY)
    Policy.load(bank.policy)  # an existing policy must still be valid
    return 0


def init(args: argparse.Namespace) -> int:
    from client.identity import ensure_key_pair

    policy(args)
    bank = bank_files(args)
    public = ensure_key_pair(bank.key_dir, bank.bank_id)
    print(f"fedfraud-bank: {bank.name}: policy {bank.policy}; give the operator only "
          f"the public key {public}")
    return 0


def approve(args: argparse.Namespace) -> int:
    path = args.bank_dir / POLICY_FILE
    policy = Policy.load(path)
    digests = [fab_digest(fab.read_bytes()) for fab in args.fab]
    added = [d for d in digests if d not in policy.approved_apps]
    approved = [*policy.approved_apps, *added]
    text = path.read_text()
    lines = [line for line in text.splitlines() if not line.startswith("approved-apps")]
    lines.insert(0, "approved-apps = [" + ", ".join(f'"{d}"' for d in approved) + "]")
    path.write_text("\n".join(lines) + "\n")
    Policy.load(path)
    print(f"fedfraud-bank: approved {', '.join(added) or 'nothing new'} in {path}")
    return 0


def run(args: argparse.Namespace) -> int:
    from client.node import run as run_bank

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop children on the way out
    bank = bank_files(args)
    Policy.load(bank.policy)  # refuse to start on a bad policy (the executor hashes the app)
    ca = None if args.insecure else args.ca
    if ca is None and not args.insecure:
        raise PolicyError("--ca (the operator's CA certificate) or --insecure is needed")
    return run_bank(bank, args.superlink, ca, args.flwr_home.resolve(), args.outbox)


def default_config(bank: BankFiles) -> Config:
    """The bank's app's default settings, with the label column its schema names: what
    the executor prepares the bank's file with before the first task."""
    from dataclasses import replace

    from common.config import Config, read_app_config
    from common.schema import SCHEMA_FILE, Schema

    config = Config.from_run_config(read_app_config(bank.app_dir))
    try:
        return replace(config, label_column=Schema.load(bank.shard.parent / SCHEMA_FILE).label)
    except BankDataError:  # the first task reports it
        return config


def executor(args: argparse.Namespace) -> int:
    from client.executor import serve

    bank = bank_files(args)
    policy = Policy.load(bank.policy)
    serve(args.runtime, args.secret_file.read_bytes(), policy.approved(bank.app_dir),
          bank.name, bank.shard, bank.bank_id, dp=policy.require_dp, bells=args.bells,
          config=default_config(bank))
    return 0


def bank_table(args: argparse.Namespace) -> tuple[Any, tuple[str, ...], tuple[str, ...]]:
    """The bank's labelled file for ``summarize`` and ``synthesize``, checked as the
    federation will read it: (table, its id columns, the columns no feature comes from:
    ids, time, dropped)."""
    from common.config import column_names
    from common.data import check_numbers_read_as_text, read_pooled_csv
    from common.schema import check_special_columns

    where = f"{args.name}: {args.transactions}"
    frame = read_pooled_csv(args.transactions, args.label_column, args.name)
    ids = tuple(column_names(args.id_columns))
    # A column the federation drops may already be gone from the bank's file.
    dropped = tuple(c for c in column_names(args.drop_columns) if c in frame.columns)
    check_special_columns(list(frame.columns), args.label_column, list(ids),
                          args.time_column, dropped, where)
    ignore = (*ids, *((args.time_column,) if args.time_column else ()), *dropped)
    check_numbers_read_as_text(frame, {args.label_column, *ignore}, args.max_categories,
                               where)
    return frame, ids, ignore


def summarize(args: argparse.Namespace) -> int:
    import json

    from common.schema import SUPPRESS_BELOW
    from common.schema import summarize as summary_of

    frame, _, ignore = bank_table(args)
    summary = summary_of(frame, args.label_column, ignore, args.name,
                         log_skewed=args.log_skewed)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    values = sum(len(stats.get("counts", {})) for stats in summary["stats"].values())
    print(f"fedfraud-bank: {args.name}: summary of {len(summary['stats'])} columns and "
          f"{values} text values (values in fewer than {SUPPRESS_BELOW} rows left out) "
          f"-> {args.out}; read it, then send it to the operator")
    return 0


def synthesize(args: argparse.Namespace) -> int:
    import time

    from client.synthesize import synthetic_copy

    started = time.monotonic()
    frame, ids, ignore = bank_table(args)
    # The time column is modelled like any number; dropped columns are left out.
    dropped = tuple(c for c in ignore if c not in (*ids, args.time_column))
    copy = synthetic_copy(frame, args.label_column, ids, args.time_column, dropped,
                          len(frame) if args.rows is None else args.rows,
                          f"{args.name}: {args.transactions}")
    copy.to_csv(args.out, index=False)
    print(f"fedfraud-bank: {args.name}: synthetic copy of {len(frame)} rows: {len(copy)} "
          f"rows, {int(copy[args.label_column].sum())} fraud, {time.monotonic() - started:.0f} s "
          f"-> {args.out}; read README (\"A synthetic copy\") before it leaves the bank")
    return 0


def score(args: argparse.Namespace) -> int:
    from client.score import Scorer, score_file

    summary = score_file(Scorer.load(args.run, args.scaler), args.input, args.output,
                         args.threshold, args.id_column)
    print(f"fedfraud-bank: scored {summary['rows']} rows, flagged {summary['flagged']} "
          f"at {summary['threshold']:.4f} -> {summary['output']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedfraud-bank", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def bank(name: str, help_text: str) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--bank-id", type=int, required=True)
        command.add_argument("--bank-dir", type=Path, required=True,
                             help="the bank's folder: transactions.csv, schema.json, "
                                  "policy.toml")
        command.add_argument("--state", type=Path, default=None,
                             help="where the bank writes its scaler, privacy ledger and "
                                  "keys (default: the bank's folder)")
        command.add_argument("--app-dir", type=Path, default=Path.cwd(),
                             help="the app the bank installed (policy: 'installed')")
        return command

    bank("init", "write the bank's policy and key pair")
    bank("policy", "write the bank's policy (the documented default) if missing")
    approve_cmd = commands.add_parser("approve", help="approve app bundles (.fab)")
    approve_cmd.add_argument("--bank-dir", type=Path, required=True)
    approve_cmd.add_argument("fab", type=Path, nargs="+")
    run_cmd = bank("run", "serve the bank: its SuperNode and executor")
    run_cmd.add_argument("--superlink", required=True, help="the Fleet API, HOST:PORT")
    run_cmd.add_argument("--ca", type=Path, default=None,
                         help="the operator's CA certificate (TLS)")
    run_cmd.add_argument("--insecure", action="store_true",
                         help="development only: no TLS, no bank authentication")
    run_cmd.add_argument("--outbox", type=Path, default=None,
                         help="copy the bank's public key here for the operator")
    run_cmd.add_argument("--flwr-home", type=Path, default=Path(".flwr"))
    executor_cmd = bank("executor", "the task executor alone (run starts it)")
    executor_cmd.add_argument("--runtime", required=True, help="SuperNode Runtime API")
    executor_cmd.add_argument("--secret-file", type=Path, required=True)
    executor_cmd.add_argument("--bells", type=Path, required=True,
                              help="the folder of the SuperNode's and executor's doorbells")
    summary_cmd = commands.add_parser(
        "summarize", help="the bank's summary for agreeing the federation's schema")
    summary_cmd.add_argument("--log-skewed", action=argparse.BooleanOptionalAction,
                             default=True,
                             help="say per numeric column whether no value is below 0 "
                                  "and whether they are skewed (two yes/no answers; the "
                                  "federation reads such columns as log(1 + x)); "
                                  "--no-log-skewed: leave them out, and no column is")
    synth_cmd = commands.add_parser(
        "synthesize", help="a synthetic copy of the bank's file (SDV; make synth)")
    synth_cmd.add_argument("--rows", type=int, default=None,
                           help="rows in the copy (default: as many as the file)")
    for command in (summary_cmd, synth_cmd):
        command.add_argument("--transactions", type=Path, required=True,
                             help="the bank's labelled transactions (CSV)")
        command.add_argument("--name", required=True, help="the bank, as the operator "
                             "knows it (named in the output and in errors)")
        command.add_argument("--out", type=Path, required=True)
        command.add_argument("--label-column", default="Class")
        for setting in ("id-columns", "time-column", "drop-columns"):
            command.add_argument(f"--{setting}", default="",
                                 help="as agreed in the federation's run config")
        command.add_argument("--max-categories", type=int, default=50)
    score_cmd = commands.add_parser("score", help="score transactions (CSV/Parquet)")
    score_cmd.add_argument("--run", type=Path, default=Path("runs/latest"),
                           help="run folder with model.ts and model_card.json")
    score_cmd.add_argument("--scaler", type=Path, required=True,
                           help="the bank's own scaler (scaler.json in its folder)")
    score_cmd.add_argument("--input", type=Path, required=True)
    score_cmd.add_argument("--output", type=Path, required=True)
    score_cmd.add_argument("--threshold", type=float, default=None,
                           help="flag at this probability (default: the run's threshold)")
    score_cmd.add_argument("--id-column", default="id")
    # Listed here; parsed by client/serve.py (which imports torch and FastAPI: only
    # the service pays for them, not every bank command).
    commands.add_parser("serve", add_help=False,
                        help="the scoring service (fedfraud-bank serve --help)")
    return parser


COMMANDS = {"init": init, "policy": policy, "approve": approve, "run": run, "executor": executor,
            "summarize": summarize, "synthesize": synthesize, "score": score}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        from client.serve import main as serve

        return serve(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (BankDataError, PolicyError) as err:  # one line, never a traceback
        print(f"fedfraud-bank: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
