"""The gateway's one settings object: defaults, then an optional YAML/TOML file, then env vars.

Env vars are `LORAPLEX_GATEWAY_<FIELD>` (upper case); list fields take comma-separated values,
mapping fields (`static_routes`) take JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ENV_PREFIX = "LORAPLEX_GATEWAY_"


class SettingsError(ValueError):
    """A setting is missing, unknown or has a value of the wrong kind."""


@dataclass(frozen=True)
class GatewaySettings:
    host: str = "127.0.0.1"
    port: int = 8000
    # Shards: a static list of host:port, or a DNS name whose A records are re-resolved
    # (a Kubernetes headless service) - `shard_dns` wins when set.
    shard_addresses: tuple[str, ...] = ()
    shard_dns: str = ""
    shard_dns_port: int = 50051
    shard_dns_interval_s: float = 5.0
    health_interval_s: float = 0.5
    health_timeout_s: float = 0.4
    tenants_file: str = ""
    tenants_reload_interval_s: float = 1.0
    # Registry: with a tracking URI the routing table follows MLflow; without one it comes
    # from `static_routes` ({adapter: {champion, canary, shadow, canary_percent}}).
    registry_tracking_uri: str = ""
    registry_cache_dir: str = ""
    registry_poll_interval_s: float = 2.0
    static_routes: Mapping[str, Any] = field(default_factory=dict)
    base_model_id: str = "base"
    # Limits.
    max_body_bytes: int = 1_048_576
    max_prompt_chars: int = 32_768
    max_prompt_tokens: int = 0  # 0 = not checked here (needs `tokenizer_dir`); the shard caps by context
    tokenizer_dir: str = ""
    max_tokens_limit: int = 1024
    default_max_tokens: int = 16
    request_timeout_s: float = 120.0
    # Placement.
    ring_virtual_nodes: int = 128
    ring_load_epsilon: float = 0.25
    hot_adapter_inflight: int = 8  # in-flight requests per replica before an adapter spreads further
    # Shadow mode.
    shadow_sample_share: float = 1.0
    shadow_log_path: str = ""
    shadow_max_concurrency: int = 4
    shadow_recent_pairs: int = 100
    shadow_aggregate_every: int = 10  # pairs of one (adapter, shadow version) between MLflow metric logs
    # A version the shards refused (corrupt, wrong base) is not tried again for this long; meanwhile
    # the adapter's last version that served keeps serving.
    refused_version_retry_s: float = 30.0

    @classmethod
    def load(cls, config_file: str | Path | None = None, environ: Mapping[str, str] | None = None) -> GatewaySettings:
        values: dict[str, Any] = {}
        if config_file:
            values.update(_read_config_file(Path(config_file)))
        env = os.environ if environ is None else environ
        for f in dataclasses.fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = raw
        return cls.from_mapping(values)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> GatewaySettings:
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise SettingsError(f"unknown gateway settings: {', '.join(unknown)}")
        defaults = cls()
        converted = {name: _convert(name, type(getattr(defaults, name)), value) for name, value in values.items()}
        settings = cls(**converted)
        settings.validate()
        return settings

    def validate(self) -> None:
        if not (0 < self.port < 65536) and self.port != 0:
            raise SettingsError(f"port must be 0..65535, got {self.port}")
        if not 0.0 <= self.shadow_sample_share <= 1.0:
            raise SettingsError("shadow_sample_share must be within [0, 1]")
        for name in ("max_body_bytes", "max_prompt_chars", "max_tokens_limit", "default_max_tokens", "shadow_aggregate_every"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name} must be positive")
        if self.ring_load_epsilon <= 0:
            raise SettingsError("ring_load_epsilon must be positive")
        if self.health_interval_s <= 0 or self.request_timeout_s <= 0:
            raise SettingsError("intervals and timeouts must be positive")


def _read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SettingsError(f"config file not found: {path}")
    text = path.read_text()
    data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path} must hold a mapping")
    # A shared config file may hold every service's settings under its own key.
    if isinstance(data.get("gateway"), dict):
        data = data["gateway"]
    return data


def _convert(name: str, kind: type, value: Any) -> Any:
    try:
        if kind is tuple:
            if isinstance(value, str):
                return tuple(part.strip() for part in value.split(",") if part.strip())
            return tuple(str(v) for v in value)
        if kind is dict:
            if isinstance(value, str):
                value = json.loads(value) if value.strip() else {}
            if not isinstance(value, Mapping):
                raise TypeError("expected a mapping")
            return dict(value)
        if kind is bool:
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes", "on")
            return bool(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise TypeError("expected an integer")
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"setting {name}: cannot use {value!r} ({exc})") from exc
