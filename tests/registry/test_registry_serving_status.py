"""Serving status tags written onto model versions in a real MLflow: only tags whose value changed
are written (a cycle with no change leaves the version untouched), and versions whose status says
something other than `not loaded` are found again to be revisited."""

from __future__ import annotations

from loraplex.serving_status import NOT_LOADED, SERVING, TAG_RESIDENT, TAG_SHADOW, TAG_STATUS, VersionStatus
from registry.serving_status import ServingStatusWriter


def _version_page(registry, name: str, version: str) -> dict:
    return registry.rest.get("model-versions/get", {"name": name, "version": version})["model_version"]


def test_only_changed_tags_are_written_and_an_unchanged_cycle_writes_nothing(adapter_registry, make_adapter, tiny_base, adapter_name):
    version = adapter_registry.publish(make_adapter(), adapter_name, tiny_base).version
    writer = ServingStatusWriter(adapter_registry)
    serving = VersionStatus(adapter_name, version, SERVING, "shard-0:device", "12 pairs vs champion: 100% same text")

    first = writer.write([serving])
    assert (first.checked, first.written, first.missing, first.failed) == (1, 3, 0, "")
    tags = adapter_registry.version_tags(adapter_name, version)
    assert {k: tags[k] for k in (TAG_STATUS, TAG_RESIDENT, TAG_SHADOW)} == serving.tags()
    assert tags["loraplex.sha256"]  # the version's own tags stay
    touched = _version_page(adapter_registry, adapter_name, version)["last_updated_timestamp"]

    again = writer.write([serving])
    assert (again.checked, again.written) == (1, 0)
    assert _version_page(adapter_registry, adapter_name, version)["last_updated_timestamp"] == touched

    # It moved to another shard's host tier: one tag changes, one is written. No shadow summary
    # now: the one written before stays.
    moved = VersionStatus(adapter_name, version, SERVING, "shard-1:host")
    assert writer.write([moved]).written == 1
    tags = adapter_registry.version_tags(adapter_name, version)
    assert (tags[TAG_STATUS], tags[TAG_RESIDENT], tags[TAG_SHADOW]) == (SERVING, "shard-1:host", serving.shadow)


def test_versions_whose_status_is_not_not_loaded_are_found_to_be_revisited(adapter_registry, make_adapter, tiny_base, adapter_name):
    serving = adapter_registry.publish(make_adapter(), adapter_name, tiny_base).version
    refused = adapter_registry.publish(make_adapter(), adapter_name, tiny_base).version
    idle = adapter_registry.publish(make_adapter(), adapter_name, tiny_base).version
    writer = ServingStatusWriter(adapter_registry)
    writer.write([
        VersionStatus(adapter_name, serving, SERVING, "shard-0:device"),
        VersionStatus(adapter_name, refused, "refused: corrupt", "none"),
        VersionStatus(adapter_name, idle, NOT_LOADED, "none"),
    ])
    found = {key for key in writer.tagged_versions() if key[0] == adapter_name}
    assert found == {(adapter_name, serving), (adapter_name, refused)}


def test_a_version_deleted_since_it_was_seen_is_counted_missing_and_the_rest_written(adapter_registry, make_adapter, tiny_base, adapter_name):
    version = adapter_registry.publish(make_adapter(), adapter_name, tiny_base).version
    report = ServingStatusWriter(adapter_registry).write([
        VersionStatus(adapter_name, "999", SERVING, "shard-0:device"),
        VersionStatus(adapter_name, version, NOT_LOADED, "none"),
    ])
    assert (report.checked, report.written, report.missing) == (1, 2, 1)


def test_an_unreachable_mlflow_stops_the_batch_with_the_reason(tmp_path):
    from loraplex.stack.ports import free_port
    from registry import AdapterRegistry
    from registry.mlflow_rest import RestPolicy

    registry = AdapterRegistry(f"http://127.0.0.1:{free_port()}", tmp_path, rest_policy=RestPolicy(timeout_s=1.0, max_retries=0))
    writer = ServingStatusWriter(registry)
    report = writer.write([VersionStatus("legal", "1", SERVING, "s:device"), VersionStatus("legal", "2", SERVING, "s:device")])
    assert (report.checked, report.written) == (0, 0)
    assert "did not answer" in report.failed
    assert writer.tagged_versions() is None
