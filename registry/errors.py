"""Errors the registry raises; callers catch `RegistryError` to handle them all."""

from __future__ import annotations


class RegistryError(Exception):
    pass


class AdapterNotFound(RegistryError):
    """No registered adapter, version or alias by that name."""


class AdapterRejected(RegistryError):
    """An adapter folder or stored version failed validation; the message says why."""


class RegistryUnavailable(RegistryError):
    """The MLflow server did not answer (down, unreachable or timing out)."""
