"""``fedfraud``: prepare the banks' data and run the federation.

    fedfraud prepare            write one shard per bank + the server's test set
    fedfraud fetch-ulb          download the ULB credit-card data (a CSV, from PyPI)
    fedfraud simulate           the ten-bank network in Flower's simulation engine
    fedfraud certs              a CA, the SuperLink's certificate, one key per bank
    fedfraud deploy             a SuperLink and one SuperNode (+ warm worker) per bank
                                as real processes on this machine, gRPC + TLS + auth
    fedfraud bank               one bank (SuperNode + warm worker), e.g. in a container
    fedfraud register-banks     allow the banks' public keys on a SuperLink
    fedfraud submit             wait for the banks, run the app, check it completed
    fedfraud bank-worker        one bank's warm worker (bank and deploy start these)
    fedfraud score              a bank scores its own transactions with a run's model

Settings default to the app's ``[tool.flwr.app.config]``; ``--set key=value`` (TOML
values, repeatable) overrides any of them for one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path

from typing import TYPE_CHECKING

from common.config import Config, read_app_config
from common.data import BUILT_IN_SOURCES, MANIFEST, bank_file, data_settings, prepare

if TYPE_CHECKING:
    from server.launch import Tls

FLWR_HOME = ".flwr"  # project-local Flower home: config, logs, nothing global
CONNECTION = "fedfraud"  # the one SuperLink connection in that home
BANKS_ONLINE_DEADLINE_S = 300.0


def settings(app_dir: Path, overrides: list[str]) -> Config:
    values = read_app_config(app_dir)
    for item in overrides:
        values.update(tomllib.loads(item))
    config = Config.from_run_config(values)
    # Runs may start from any working directory: make paths absolute once, here.
    source = config.data_source
    return Config.from_run_config({
        **config.as_run_config(),
        "data-source": source if source in BUILT_IN_SOURCES else str(
            (app_dir / source).resolve()),
        "data-dir": str((app_dir / config.data_dir).resolve()),
        "runs-dir": str((app_dir / config.runs_dir).resolve()),
    })


def ensure_prepared(config: Config) -> Path:
    """Write the shards unless a manifest for the same settings is already there."""
    data_dir = Path(config.data_dir)
    manifest_path = data_dir / MANIFEST
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest["settings"] == data_settings(config):
            return data_dir
    print(f"fedfraud: preparing {config.num_banks} banks in {data_dir}", flush=True)
    prepare(data_dir, **data_settings(config),
            progress=lambda line: print(f"fedfraud: prepare: {line}", flush=True))
    return data_dir


def simulate(app_dir: Path, config: Config, flwr_home: Path) -> int:
    from server.launch import (
        services, start_simulation_superlink, submit_and_wait, write_connection,
    )

    ensure_prepared(config)
    with services(flwr_home) as started:
        address = start_simulation_superlink(started)
        write_connection(flwr_home, CONNECTION, address)
        run_id, status = submit_and_wait(
            app_dir, CONNECTION, started.env, config.as_run_config(),
            federation_config={"num-supernodes": config.num_banks},
        )
    return report_outcome(run_id, status, Path(config.runs_dir))


def deploy(app_dir: Path, config: Config, flwr_home: Path, certs: Path | None,
           fleet_port: int, control_port: int, warm: bool) -> int:
    """SuperLink + one SuperNode (and warm worker) per bank on 127.0.0.1, then a run."""
    import tempfile

    from server.launch import (
        free_port, services, start_bank, start_deployment_superlink, start_worker,
    )

    data_dir = ensure_prepared(config)
    tls = ensure_certificates(certs, config.num_banks)
    # Unix socket paths must stay short (108 bytes): a fresh folder under /tmp.
    with services(flwr_home) as started, tempfile.TemporaryDirectory(
        prefix="fedfraud-") as socket_dir:
        fleet_port, control_port = fleet_port or free_port(), control_port or free_port()
        start_deployment_superlink(started, tls, fleet_port, control_port)
        print(f"fedfraud: SuperLink up (Fleet gRPC on 127.0.0.1:{fleet_port}, "
              f"{'TLS + bank authentication' if tls else 'INSECURE'})", flush=True)
        control = f"127.0.0.1:{control_port}"
        register_banks(started.env, flwr_home, control, tls, config.num_banks)
        for bank in range(config.num_banks):
            shard = data_dir / bank_file(bank)
            worker = start_worker(started, bank, shard, Path(socket_dir)) if warm else None
            start_bank(started, bank, shard, f"127.0.0.1:{fleet_port}", tls, worker)
        return submit(app_dir, config, started.env, flwr_home, control, tls,
                      config.num_banks)


def ensure_certificates(certs: Path | None, num_banks: int) -> Tls | None:
    from server.certs import CA_CERT, make_certificates
    from server.launch import Tls

    if certs is None:
        return None
    if not (certs / CA_CERT).exists():
        print(f"fedfraud: writing certificates and bank keys to {certs}", flush=True)
        make_certificates(certs, num_banks)
    return Tls(certs)


def register_banks(env: dict[str, str], flwr_home: Path, control: str, tls: Tls | None,
                   num_banks: int) -> None:
    """Let exactly these banks' keys join (with TLS; without, anyone may join)."""
    from server.launch import register_bank, write_connection

    write_connection(flwr_home, CONNECTION, control, tls)
    if tls is not None:
        for bank in range(num_banks):
            register_bank(env, CONNECTION, tls, bank)


def submit(app_dir: Path, config: Config, env: dict[str, str], flwr_home: Path,
           control: str, tls: Tls | None, wait_banks: int) -> int:
    """Wait until ``wait_banks`` banks are online, run the app, report its outcome."""
    from server.launch import submit_and_wait, wait_for_banks, write_connection

    write_connection(flwr_home, CONNECTION, control, tls)
    wait_for_banks(env, CONNECTION, wait_banks, BANKS_ONLINE_DEADLINE_S)
    print(f"fedfraud: {wait_banks} banks online; submitting the run", flush=True)
    run_id, status = submit_and_wait(app_dir, CONNECTION, env, config.as_run_config())
    return report_outcome(run_id, status, Path(config.runs_dir))


def run_bank(bank: int, shard: Path, superlink: str, tls: Tls | None,
             state_dir: Path | None, flwr_home: Path) -> int:
    """One bank on its own machine or container: its warm worker and its SuperNode."""
    import signal
    import tempfile
    import time

    from server.launch import services, start_bank, start_worker

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop children on the way out
    with services(flwr_home) as started, tempfile.TemporaryDirectory(
        prefix="fedfraud-") as socket_dir:
        worker = start_worker(started, bank, shard, Path(socket_dir), state_dir)
        start_bank(started, bank, shard, superlink, tls, worker, state_dir)
        print(f"fedfraud: bank {bank} serving {shard} via {superlink}", flush=True)
        while all(process.poll() is None for process in started.processes):
            time.sleep(1)
        failed = [p.args[0] for p in started.processes if p.poll() is not None]
        print(f"fedfraud: bank {bank}: {failed} stopped; see {started.log_dir}", flush=True)
        return 1


def report_outcome(run_id: int, status: str, runs_dir: Path) -> int:
    latest = runs_dir / "latest"
    if status != "finished:completed":
        print(f"fedfraud: run {run_id} ended as {status!r}", file=sys.stderr)
        return 1
    run_dir = latest.resolve()
    if not run_dir.name.endswith(f"-{run_id}"):
        print(f"fedfraud: run {run_id} completed but wrote no run folder", file=sys.stderr)
        return 1
    print(f"fedfraud: run {run_id} completed; results in {run_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedfraud", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--app-dir", type=Path, default=Path.cwd(),
                        help="folder with the app's pyproject.toml (default: here)")
    parser.add_argument("--flwr-home", type=Path, default=None,
                        help=f"Flower's home for this run (default: APP_DIR/{FLWR_HOME})")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override one [tool.flwr.app.config] key")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("prepare", help="write the banks' shards and the test set")
    commands.add_parser("simulate", help="run the federation in Flower's simulation")
    fetch = commands.add_parser("fetch-ulb", help="download the ULB credit-card CSV")
    fetch.add_argument("--out", type=Path, default=Path("data/raw/creditcard.csv"))
    certs = commands.add_parser("certs", help="write TLS certificates and bank keys")
    certs.add_argument("--out", type=Path, default=None,
                       help="output folder (default: APP_DIR/certs)")

    def transport(command: argparse.ArgumentParser) -> None:
        command.add_argument("--certs", type=Path, default=None,
                             help="TLS material (default: APP_DIR/certs)")
        command.add_argument("--insecure", action="store_true",
                             help="development only: no TLS, no bank authentication")

    deploy_cmd = commands.add_parser("deploy", help="run the federation as real processes")
    transport(deploy_cmd)
    deploy_cmd.add_argument("--cold", action="store_true",
                            help="no warm bank workers: every message loads torch and "
                                 "the bank's data anew (Flower's default; slow)")
    deploy_cmd.add_argument("--fleet-port", type=int, default=0,
                            help="the banks' gRPC port (default: a free one)")
    deploy_cmd.add_argument("--control-port", type=int, default=0,
                            help="the SuperLink's HTTP port for flwr (default: a free one)")
    bank = commands.add_parser("bank", help="run one bank: its SuperNode and warm worker")
    transport(bank)
    bank.add_argument("--bank-id", type=int, required=True)
    bank.add_argument("--shard", type=Path, required=True, help="the bank's transactions")
    bank.add_argument("--superlink", required=True, help="the Fleet API, HOST:PORT")
    bank.add_argument("--state", type=Path, default=None,
                      help="the bank's writable folder for its scaler (default: the "
                           "shard's folder)")
    register = commands.add_parser("register-banks", help="allow the banks' public keys")
    transport(register)
    register.add_argument("--control", required=True, help="the SuperLink's HOST:PORT")
    submit_cmd = commands.add_parser("submit", help="wait for the banks, run, check")
    transport(submit_cmd)
    submit_cmd.add_argument("--control", required=True, help="the SuperLink's HOST:PORT")
    worker = commands.add_parser("bank-worker", help="a bank's warm worker (used by bank)")
    worker.add_argument("--bank-id", type=int, required=True)
    worker.add_argument("--shard", type=Path, required=True)
    worker.add_argument("--socket", type=Path, required=True)
    worker.add_argument("--state", type=Path, default=None)
    score = commands.add_parser("score", help="score a bank's transactions (CSV/Parquet)")
    score.add_argument("--run", type=Path, default=Path("runs/latest"),
                       help="run folder with model.ts and model_card.json")
    score.add_argument("--scaler", type=Path, required=True,
                       help="the bank's own scaler (scaler.json in its folder)")
    score.add_argument("--input", type=Path, required=True)
    score.add_argument("--output", type=Path, required=True)
    score.add_argument("--threshold", type=float, default=None,
                       help="flag at this probability (default: the run's threshold)")
    score.add_argument("--id-column", default="id")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "score":
        from client.score import Scorer, score_file

        summary = score_file(Scorer.load(args.run, args.scaler), args.input, args.output,
                             args.threshold, args.id_column)
        print(f"fedfraud: scored {summary['rows']} rows, flagged {summary['flagged']} at "
              f"{summary['threshold']:.4f} -> {summary['output']}")
        return 0
    if args.command == "fetch-ulb":
        from common.data import fetch_ulb

        print(f"fedfraud: ULB credit-card data in {fetch_ulb(args.out)}")
        return 0
    if args.command == "bank-worker":
        from client.worker import serve

        serve(args.bank_id, args.shard.resolve(), args.socket, args.state)
        return 0
    app_dir = args.app_dir.resolve()
    config = settings(app_dir, args.overrides)
    flwr_home = (args.flwr_home or app_dir / FLWR_HOME).resolve()
    certs = None
    if not getattr(args, "insecure", True):
        certs = (args.certs or app_dir / "certs").resolve()
    if args.command == "prepare":
        from common.data import BankDataError

        try:
            print(f"fedfraud: banks' data in {ensure_prepared(config)}")
        except BankDataError as err:  # a data problem: one line, no traceback
            print(f"fedfraud: {err}", file=sys.stderr)
            return 1
        return 0
    if args.command == "certs":
        from server.certs import make_certificates

        out = make_certificates(args.out or app_dir / "certs", config.num_banks)
        print(f"fedfraud: certificates in {out}")
        return 0
    if args.command == "deploy":
        return deploy(app_dir, config, flwr_home, certs, args.fleet_port,
                      args.control_port, warm=not args.cold)
    if args.command == "bank":
        from server.launch import Tls

        return run_bank(args.bank_id, args.shard.resolve(), args.superlink,
                        Tls(certs) if certs else None, args.state, flwr_home)
    if args.command in ("register-banks", "submit"):
        from server.launch import Tls, flower_env

        tls = Tls(certs) if certs else None
        if args.command == "register-banks":
            register_banks(flower_env(flwr_home), flwr_home, args.control, tls,
                           config.num_banks)
            return 0
        return submit(app_dir, config, flower_env(flwr_home), flwr_home, args.control,
                      tls, config.num_banks)
    return simulate(app_dir, config, flwr_home)


if __name__ == "__main__":
    sys.exit(main())
