"""``fedfraud``: prepare the banks' data and run the federation.

    fedfraud prepare            write one shard per bank + the server's test set
    fedfraud simulate           the ten-bank network in Flower's simulation engine
    fedfraud certs              a CA, the SuperLink's certificate, one key per bank
    fedfraud deploy             a SuperLink and one SuperNode (+ warm worker) per bank
                                as real processes on this machine, gRPC + TLS + auth
    fedfraud bank-worker        one bank's warm worker (deploy starts these)
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

from common.config import Config, read_app_config
from common.data import MANIFEST, bank_file, data_settings, prepare_synthetic

FLWR_HOME = ".flwr"  # project-local Flower home: config, logs, nothing global


def settings(app_dir: Path, overrides: list[str]) -> Config:
    values = read_app_config(app_dir)
    for item in overrides:
        values.update(tomllib.loads(item))
    config = Config.from_run_config(values)
    # Runs may start from any working directory: make paths absolute once, here.
    return Config.from_run_config({
        **config.as_run_config(),
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
    prepare_synthetic(data_dir, **data_settings(config))
    return data_dir


def simulate(app_dir: Path, config: Config, flwr_home: Path) -> int:
    from server.launch import (
        services, start_simulation_superlink, submit_and_wait, write_connection,
    )

    ensure_prepared(config)
    with services(flwr_home) as started:
        address = start_simulation_superlink(started)
        write_connection(flwr_home, "fedfraud-simulation", address)
        run_id, status = submit_and_wait(
            app_dir, "fedfraud-simulation", started.env, config.as_run_config(),
            federation_config={"num-supernodes": config.num_banks},
        )
    return report_outcome(run_id, status, Path(config.runs_dir))


def deploy(app_dir: Path, config: Config, flwr_home: Path, certs: Path | None,
           fleet_port: int, control_port: int, warm: bool) -> int:
    import tempfile

    from server.certs import CA_CERT, make_certificates
    from server.launch import (
        Tls, free_port, register_bank, services, start_bank, start_deployment_superlink,
        start_worker, submit_and_wait, wait_for_banks, write_connection,
    )

    data_dir = ensure_prepared(config)
    tls = None
    if certs is not None:
        if not (certs / CA_CERT).exists():
            print(f"fedfraud: writing certificates and bank keys to {certs}", flush=True)
            make_certificates(certs, config.num_banks)
        tls = Tls(certs)
    connection = "fedfraud-deployment"
    # Unix socket paths must stay short (108 bytes): a fresh folder under /tmp.
    with services(flwr_home) as started, tempfile.TemporaryDirectory(
        prefix="fedfraud-") as socket_dir:
        fleet_port, control_port = fleet_port or free_port(), control_port or free_port()
        start_deployment_superlink(started, tls, fleet_port, control_port)
        write_connection(flwr_home, connection, f"127.0.0.1:{control_port}", tls)
        print(f"fedfraud: SuperLink up (Fleet gRPC on 127.0.0.1:{fleet_port}, "
              f"{'TLS + bank authentication' if tls else 'INSECURE'})", flush=True)
        banks = []
        for bank in range(config.num_banks):
            if tls is not None:
                register_bank(started.env, connection, tls, bank)
            shard = data_dir / bank_file(bank)
            worker = start_worker(started, bank, shard, Path(socket_dir)) if warm else None
            banks.append(start_bank(started, bank, shard, fleet_port, tls, worker))
        wait_for_banks(started.env, connection, config.num_banks, 120.0, banks)
        print(f"fedfraud: {config.num_banks} banks online; submitting the run", flush=True)
        run_id, status = submit_and_wait(app_dir, connection, started.env,
                                         config.as_run_config())
    return report_outcome(run_id, status, Path(config.runs_dir))


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


def main(argv: list[str] | None = None) -> int:
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
    certs = commands.add_parser("certs", help="write TLS certificates and bank keys")
    certs.add_argument("--out", type=Path, default=None,
                       help="output folder (default: APP_DIR/certs)")
    deploy_cmd = commands.add_parser("deploy", help="run the federation as real processes")
    deploy_cmd.add_argument("--certs", type=Path, default=None,
                            help="TLS material, written here if missing "
                                 "(default: APP_DIR/certs)")
    deploy_cmd.add_argument("--insecure", action="store_true",
                            help="development only: no TLS, no bank authentication")
    deploy_cmd.add_argument("--cold", action="store_true",
                            help="no warm bank workers: every message loads torch and "
                                 "the bank's data anew (Flower's default; slow)")
    deploy_cmd.add_argument("--fleet-port", type=int, default=0,
                            help="the banks' gRPC port (default: a free one)")
    deploy_cmd.add_argument("--control-port", type=int, default=0,
                            help="the SuperLink's HTTP port for flwr (default: a free one)")
    worker = commands.add_parser("bank-worker", help="a bank's warm worker (used by deploy)")
    worker.add_argument("--bank-id", type=int, required=True)
    worker.add_argument("--shard", type=Path, required=True)
    worker.add_argument("--socket", type=Path, required=True)
    score = commands.add_parser("score", help="score a bank's transactions (CSV/Parquet)")
    score.add_argument("--run", type=Path, default=Path("runs/latest"),
                       help="run folder with model.ts and model_card.json")
    score.add_argument("--scaler", type=Path, required=True,
                       help="the bank's own scaler (bank_XX.scaler.json beside its shard)")
    score.add_argument("--input", type=Path, required=True)
    score.add_argument("--output", type=Path, required=True)
    score.add_argument("--threshold", type=float, default=None,
                       help="flag at this probability (default: the run's threshold)")
    score.add_argument("--id-column", default="id")
    args = parser.parse_args(argv)
    if args.command == "score":
        from client.score import Scorer, score_file

        summary = score_file(Scorer.load(args.run, args.scaler), args.input, args.output,
                             args.threshold, args.id_column)
        print(f"fedfraud: scored {summary['rows']} rows, flagged {summary['flagged']} at "
              f"{summary['threshold']:.4f} -> {summary['output']}")
        return 0
    if args.command == "bank-worker":
        from client.worker import serve

        serve(args.bank_id, args.shard.resolve(), args.socket)
        return 0
    app_dir = args.app_dir.resolve()
    config = settings(app_dir, args.overrides)
    flwr_home = (args.flwr_home or app_dir / FLWR_HOME).resolve()
    if args.command == "prepare":
        print(f"fedfraud: banks' data in {ensure_prepared(config)}")
        return 0
    if args.command == "certs":
        from server.certs import make_certificates

        out = make_certificates(args.out or app_dir / "certs", config.num_banks)
        print(f"fedfraud: certificates in {out}")
        return 0
    if args.command == "deploy":
        certs_dir = None if args.insecure else (args.certs or app_dir / "certs").resolve()
        return deploy(app_dir, config, flwr_home, certs_dir, args.fleet_port,
                      args.control_port, warm=not args.cold)
    return simulate(app_dir, config, flwr_home)


if __name__ == "__main__":
    sys.exit(main())
