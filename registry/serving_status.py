"""Writes versions' serving status (the tags of `loraplex/serving_status.py`) onto their MLflow model versions.

Idempotent: each version's tags are read first and only a tag whose value differs is written, so a
cycle in which nothing changed writes nothing (MLflow's `last_updated_timestamp` stays put). The
gateway calls it from one process per cluster (`gateway/serving_status.py` holds the lease) and
bounds each call to a batch of versions; here every call is synchronous (run it off the event loop).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from loraplex.serving_status import NOT_LOADED, TAG_STATUS, VersionKey, VersionStatus
from registry.adapter_registry import AdapterRegistry
from registry.errors import AdapterNotFound, RegistryError, RegistryUnavailable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StatusWriteReport:
    checked: int  # versions whose tags were read
    written: int  # tags set
    missing: int  # versions deleted from the registry since they were seen
    failed: str = ""  # why the batch stopped early (MLflow unreachable), or ""


class ServingStatusWriter:
    def __init__(self, registry: AdapterRegistry) -> None:
        self.registry = registry

    def tagged_versions(self) -> list[VersionKey] | None:
        """Versions whose status tag says anything but `not loaded` (revisited until it does); None
        while MLflow cannot be searched."""
        try:
            found = self.registry.search_versions(f"tags.`{TAG_STATUS}` != '{NOT_LOADED}'")
        except RegistryError as error:
            logger.info("serving status: versions tagged before not read: %s", error)
            return None
        return [(v.name, v.version) for v in found]

    def write(self, statuses: Sequence[VersionStatus]) -> StatusWriteReport:
        checked = written = missing = 0
        for status in statuses:
            try:
                current = self.registry.version_tags(status.adapter, status.version)
                checked += 1
                for key, value in status.tags().items():
                    if current.get(key) != value:
                        self.registry.set_version_tag(status.adapter, status.version, key, value)
                        written += 1
            except AdapterNotFound:
                missing += 1
            except RegistryUnavailable as error:
                # The next cycle is the retry; the rest of this batch would fail the same way.
                return StatusWriteReport(checked, written, missing, str(error))
            except RegistryError as error:
                logger.warning("serving status of %s v%s not written: %s", status.adapter, status.version, error)
        return StatusWriteReport(checked, written, missing)
