"""``fedfraud``: prepare the banks' data and run the federation.

    fedfraud prepare            write one shard per bank + the server's test set
    fedfraud simulate           the ten-bank network in Flower's simulation engine

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
from common.data import MANIFEST, data_settings, prepare_synthetic

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
    args = parser.parse_args(argv)
    app_dir = args.app_dir.resolve()
    config = settings(app_dir, args.overrides)
    if args.command == "prepare":
        print(f"fedfraud: banks' data in {ensure_prepared(config)}")
        return 0
    return simulate(app_dir, config, args.flwr_home or app_dir / FLWR_HOME)


if __name__ == "__main__":
    sys.exit(main())
