"""Settings for a service from three layers: defaults, an optional YAML/TOML file, then
environment variables (`<PREFIX><FIELD>`, upper case), which win.

A service's settings class is a frozen dataclass that also derives from `LayeredSettings` and
names its env prefix and its section in a shared config file. List fields take comma-separated
env values, mapping fields JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Self

import yaml


class SettingsError(ValueError):
    """A setting is missing, unknown or has a value of the wrong kind."""


class LayeredSettings:
    ENV_PREFIX: ClassVar[str]
    # One config file may hold every service's settings, each under its own key.
    SECTION: ClassVar[str]

    @classmethod
    def load(cls, config_file: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Self:
        values: dict[str, Any] = {}
        if config_file:
            values.update(read_config_file(Path(config_file), cls.SECTION))
        env = os.environ if environ is None else environ
        for f in dataclasses.fields(cls):
            raw = env.get(cls.ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = raw
        return cls.from_mapping(values)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Self:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SettingsError(f"unknown {cls.SECTION} settings: {', '.join(unknown)}")
        defaults = cls()
        converted = {name: convert_setting(name, type(getattr(defaults, name)), v) for name, v in values.items()}
        settings = cls(**converted)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Cross-field checks; raises SettingsError."""


def read_config_file(path: Path, section: str) -> dict[str, Any]:
    if not path.is_file():
        raise SettingsError(f"config file not found: {path}")
    text = path.read_text()
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise SettingsError(f"config file {path} cannot be parsed: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path} must hold a mapping")
    if isinstance(data.get(section), dict):
        data = data[section]
    return data


def convert_setting(name: str, kind: type, value: Any) -> Any:
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
        if kind is int and isinstance(value, bool):
            raise TypeError("expected an integer")
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise TypeError("expected an integer")
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"setting {name}: cannot use {value!r} ({exc})") from exc
