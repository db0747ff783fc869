"""Shared fixtures: the app's own config and a small prepared data set."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from common.config import Config, read_app_config
from common.data import data_settings, prepare

APP_DIR = Path(__file__).resolve().parents[1]


def fresh_python(code: str) -> str:
    """What ``code`` prints in a new interpreter in the app folder (what a fresh process
    imports, without this test session's modules)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=APP_DIR, timeout=300).stdout


def app_config(**overrides: object) -> Config:
    values = read_app_config(APP_DIR)
    values.update({key.replace("_", "-"): value for key, value in overrides.items()})
    return Config.from_run_config(values)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Config:
    """The default data set, written once per test session."""
    data_dir = tmp_path_factory.mktemp("data")
    config = app_config(data_dir=str(data_dir))
    prepare(data_dir, **data_settings(config))
    return config
