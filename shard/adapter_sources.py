"""Where the shard's adapter cache gets adapter folders: the MLflow registry, or local folders.

The registry package is imported only when a registry is configured, so a shard serving local
adapters (tests, single-host demos) does not need MLflow at all."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from loraplex.adapter_mix import DEFAULT_MAX_COMPONENTS
from shard.lora import AdapterError, AdapterKey, AdapterNotFoundError, AdapterRejectedError, LocalAdapterSource


class RegistryUnavailableError(AdapterError):
    """The registry did not answer; the next request for the adapter tries again."""


class RegistryAdapterSource:
    """Downloads an adapter version through ``registry.AdapterRegistry.fetch`` (sha256-verified,
    content-addressed cache) and refuses versions published for another base model."""

    def __init__(
        self, tracking_uri: str, cache_dir: Path, base_fingerprint: str | None, max_rank: int = 64, max_bytes: int = 0,
        max_mix_components: int = DEFAULT_MAX_COMPONENTS,
    ) -> None:
        from registry import AdapterRegistry

        self._registry = AdapterRegistry(tracking_uri, Path(cache_dir), max_rank, max_mix_components=max_mix_components)
        self._base_fingerprint = base_fingerprint or None
        self.max_bytes = max_bytes
        # A restart with a smaller bound shrinks what earlier runs left; nothing serves yet.
        self.trim(())

    def trim(self, keep: Collection[Path]) -> tuple[list[Path], int]:
        """The download cache brought within `max_bytes` (see `registry.AdapterRegistry.prune_cache`)."""
        return self._registry.prune_cache(self.max_bytes, keep)

    def fetch(self, key: AdapterKey) -> Path:
        import registry

        if not key.version:
            raise AdapterNotFoundError(f"adapter {key.name!r}: a registry version is required")
        try:
            return Path(
                self._registry.fetch(key.name, key.version, expected_base_fingerprint=self._base_fingerprint)
            )
        except registry.AdapterNotFound as exc:
            raise AdapterNotFoundError(f"adapter {key}: {exc}") from exc
        except registry.AdapterRejected as exc:
            raise AdapterRejectedError(f"adapter {key}: {exc}") from exc
        except registry.RegistryError as exc:  # unavailable, or any other registry failure
            raise RegistryUnavailableError(f"adapter {key}: registry error: {exc}") from exc


def base_model_fingerprint(model_dir: Path) -> str:
    """The registry's fingerprint of the base model, or "" when the registry package is absent
    (a shard on local adapters only)."""
    try:
        from registry import base_model_fingerprint as fingerprint
    except ImportError:
        return ""
    return fingerprint(Path(model_dir))


def adapter_source_for(settings, base_fingerprint: str):
    """The source the settings ask for, or None when the shard serves the base model only."""
    if settings.adapter_dirs:
        return LocalAdapterSource({name: Path(path) for name, path in settings.adapter_dirs.items()})
    if settings.registry_tracking_uri:
        return RegistryAdapterSource(
            settings.registry_tracking_uri,
            Path(settings.adapter_cache_dir),
            base_fingerprint,
            settings.max_rank,
            settings.disk_cache_bytes,
            settings.max_mix_components,
        )
    return None
