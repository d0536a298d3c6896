"""MLflow's REST API with bounded retries, for the calls that must fail fast.

`MlflowClient` retries a refused connection for about four minutes (7 retries, exponential
backoff, configurable only through process-wide environment variables). A watcher polling every
second, or a CLI user waiting for an answer, needs an error within seconds instead, so
model-registry reads and alias/tag writes go through MLflow's own `http_request` with explicit
retry and timeout settings; auth comes from the usual MLFLOW_TRACKING_* variables.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from mlflow.exceptions import MlflowException
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.rest_utils import http_request

from registry.errors import AdapterNotFound, RegistryError, RegistryUnavailable

API = "/api/2.0/mlflow"


@dataclass(frozen=True)
class RestPolicy:
    timeout_s: float = 10.0
    max_retries: int = 1
    backoff_factor: float = 0.5


class MlflowRest:
    def __init__(self, tracking_uri: str, policy: RestPolicy | None = None) -> None:
        self.tracking_uri = tracking_uri.rstrip("/")
        self.policy = policy or RestPolicy()

    def call(self, method: str, endpoint: str, body: dict | None = None, *, retry: bool = True) -> dict:
        """One REST call; returns the JSON body, or raises a RegistryError subclass."""
        kwargs = {"params": body} if method == "GET" else {"json": body or {}}
        try:
            response = http_request(
                get_default_host_creds(self.tracking_uri),
                f"{API}/{endpoint}",
                method,
                max_retries=self.policy.max_retries if retry else 0,
                backoff_factor=self.policy.backoff_factor,
                backoff_jitter=0.0,
                timeout=self.policy.timeout_s,
                raise_on_status=False,
                **kwargs,
            )
        except MlflowException as error:
            raise RegistryUnavailable(f"MLflow at {self.tracking_uri} did not answer: {_first_line(error)}") from None
        if response.status_code == 200:
            return response.json() if response.content else {}
        try:
            payload = response.json()
        except json.JSONDecodeError:
            payload = {"message": response.text[:300]}
        message = payload.get("message") or response.reason
        if payload.get("error_code") == "RESOURCE_DOES_NOT_EXIST" or response.status_code == 404:
            raise AdapterNotFound(message)
        if response.status_code >= 500:
            raise RegistryUnavailable(f"MLflow at {self.tracking_uri} answered {response.status_code}: {message}")
        raise RegistryError(f"MLflow refused {endpoint}: {message}")

    def get(self, endpoint: str, params: dict | None = None) -> dict:
        return self.call("GET", endpoint, params)

    def post(self, endpoint: str, body: dict) -> dict:
        return self.call("POST", endpoint, body)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    for symptom, short in (
        ("Connection refused", "connection refused"),
        ("Name or service not known", "unknown host"),
        ("timed out", "timed out"),
        ("Read timeout", "timed out"),
    ):
        if symptom in text:
            return short
    return text.splitlines()[0][:200] if text else type(error).__name__
