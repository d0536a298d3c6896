"""Fixtures of the deployment-file tests: compose/ as `docker compose config` resolves it and
compose/k8s as `kubectl kustomize` builds it (helpers in deploy_files.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from deploy_files import COMPOSE_DIR, OVERLAY, SECRET_VALUES, k8s_tree_with_secrets, kustomize_build, read_env_file, run_compose_config


@pytest.fixture(scope="session")
def compose_env(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The variables a user gets from .env.example, with its empty secrets filled in."""
    env = read_env_file(COMPOSE_DIR / ".env.example")
    for name, value in SECRET_VALUES.items():
        assert env.get(name) == "", f".env.example must name {name} and leave it empty"
        env[name] = value
    path = tmp_path_factory.mktemp("compose") / "env"
    path.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    return path, env


@pytest.fixture(scope="session")
def compose(compose_env) -> dict:
    """docker-compose.yml as `docker compose config` resolves it (interpolated, anchors merged)."""
    result = run_compose_config(compose_env[0], "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="session")
def k8s_tree(tmp_path_factory) -> Path:
    return k8s_tree_with_secrets(tmp_path_factory.mktemp("kustomize"))


@pytest.fixture(scope="session")
def k8s_docs(k8s_tree) -> list[dict]:
    """The production overlay (base + every component), as `kubectl kustomize` renders it."""
    return kustomize_build(k8s_tree / OVERLAY)


@pytest.fixture(scope="session")
def is_allowed_host_header():
    """MLflow's own Host-header check (it answers 403 to a Host it does not allow), imported once:
    importing mlflow.server takes seconds."""
    from mlflow.server.security_utils import is_allowed_host_header

    return is_allowed_host_header
