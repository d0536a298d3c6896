"""Shared pytest fixtures: one real MLflow server per test session, and a registry client on it.

The root conftest registers this module with `pytest_plugins`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from loraplex.stack.mlflow_server import MlflowServer


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def adapter_registry(mlflow_server: MlflowServer, tmp_path: Path):
    from registry import AdapterRegistry

    return AdapterRegistry(mlflow_server.url, cache_dir=tmp_path / "adapter-cache")
