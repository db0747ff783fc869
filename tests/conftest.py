"""Shared fixtures: the app's own config and a small prepared data set."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import Config, read_app_config
from common.data import data_settings, prepare

APP_DIR = Path(__file__).resolve().parents[1]


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
