"""Registered mixes against a real MLflow server: `publish_mix` pins each component's version,
tags the version as a mix, refuses bad mixes with the reason (nothing published), and `fetch`
returns the manifest folder; `loraplex adapters mix` does the same from the command line."""

from __future__ import annotations

import pytest

from loraplex.adapter_mix import MANIFEST_FILE, MixComponent, read_manifest
from registry import AdapterNotFound, AdapterRejected, base_model_fingerprint
from loraplex.serving_status import TAG_STATUS
from registry.adapter_registry import TAG_MIX
from tests.registry.test_registry_cli import run_cli
from tests.registry.test_registry_publish_fetch import version_count


@pytest.fixture
def two_adapters(adapter_registry, make_adapter, tiny_base, adapter_name):
    """`<name>-a` v1 (champion) and v2 (no alias); `<name>-b` v1 with no alias."""
    a, b = f"{adapter_name}-a", f"{adapter_name}-b"
    adapter_registry.publish(make_adapter(rank=4), a, tiny_base, alias="champion")
    adapter_registry.publish(make_adapter(rank=8), a, tiny_base)
    adapter_registry.publish(make_adapter(rank=16, target_modules=["q_proj"]), b, tiny_base)
    return a, b


def test_a_mix_pins_its_components_and_is_tagged(adapter_registry, two_adapters, tiny_base, adapter_name, mlflow_server):
    a, b = two_adapters
    mix = adapter_registry.publish_mix(
        adapter_name, [MixComponent(a, "", 0.7), MixComponent(b, "", -0.3)], alias="champion"
    )
    # No version given: a's champion (v1, not its latest v2), b's latest (it has no champion).
    assert mix.mix == f"{a}@1=0.7 {b}@1=-0.3"
    assert (mix.version, mix.aliases, mix.rank) == ("1", ("champion",), 4 + 16)
    assert mix.base_fingerprint == base_model_fingerprint(tiny_base)
    folder = adapter_registry.fetch(adapter_name, "1", expected_base_fingerprint=mix.base_fingerprint)
    assert sorted(p.name for p in folder.iterdir()) == [MANIFEST_FILE]
    manifest = read_manifest(folder, max_components=4)
    assert manifest.components == (MixComponent(a, "1", 0.7), MixComponent(b, "1", -0.3))
    # A mix is an adapter version like any other: it routes, and it can be pinned explicitly.
    assert adapter_registry.routing_table().adapters[adapter_name].champion == "1"
    second = adapter_registry.publish_mix(adapter_name, [MixComponent(a, "2", 1.0), MixComponent(b, "1", 0.5)])
    assert second.version == "2" and second.mix == f"{a}@2=1 {b}@1=0.5"
    tags = adapter_registry.client.get_model_version(adapter_name, "2").tags
    assert tags[TAG_MIX] == second.mix


@pytest.mark.parametrize(
    "components, reason",
    [
        (lambda a, b: [(a, "", 0.5), (a, "1", 0.5)], "twice"),
        (lambda a, b: [(a, "", float("nan"))], "finite"),
        (lambda a, b: [(a, "", 0.0)], "weight 0"),
        (lambda a, b: [(a, "1", 0.1), (a, "2", 0.1), (b, "1", 0.1), (a, "champion", 0.1), (b, "", 0.1)], "at most 4"),
    ],
)
def test_bad_mixes_are_refused_and_nothing_is_published(adapter_registry, two_adapters, adapter_name, mlflow_server, components, reason):
    a, b = two_adapters
    with pytest.raises(AdapterRejected, match=reason):
        adapter_registry.publish_mix(adapter_name, [MixComponent(*c) for c in components(a, b)])
    assert version_count(mlflow_server.url, adapter_name) == 0


def test_mixes_do_not_nest_and_components_must_exist_and_not_be_refused(adapter_registry, two_adapters, adapter_name, mlflow_server):
    a, b = two_adapters
    adapter_registry.publish_mix(adapter_name, [MixComponent(a, "", 1.0)])
    with pytest.raises(AdapterRejected, match="do not nest"):
        adapter_registry.publish_mix(f"{adapter_name}-outer", [MixComponent(adapter_name, "1", 1.0), MixComponent(b, "", 1.0)])
    with pytest.raises(AdapterNotFound):
        adapter_registry.publish_mix(f"{adapter_name}-outer", [MixComponent(f"{a}-missing", "", 1.0)])
    with pytest.raises(AdapterNotFound):
        adapter_registry.publish_mix(f"{adapter_name}-outer", [MixComponent(a, "9", 1.0)])
    adapter_registry.client.set_model_version_tag(b, "1", TAG_STATUS, "refused: rank 16 exceeds max rank 8")
    with pytest.raises(AdapterRejected, match="refused by the shards"):
        adapter_registry.publish_mix(f"{adapter_name}-outer", [MixComponent(b, "1", 1.0)])
    assert version_count(mlflow_server.url, f"{adapter_name}-outer") == 0


def test_components_for_different_base_models_are_refused(adapter_registry, two_adapters, make_adapter, make_base, adapter_name, mlflow_server):
    a, _ = two_adapters
    other_base = make_base(hidden=128)
    adapter_registry.publish(make_adapter(base_dir=other_base), f"{adapter_name}-c", other_base)
    with pytest.raises(AdapterRejected, match="different base models"):
        adapter_registry.publish_mix(adapter_name, [MixComponent(a, "", 0.5), MixComponent(f"{adapter_name}-c", "", 0.5)])
    assert version_count(mlflow_server.url, adapter_name) == 0


def test_cli_mix(mlflow_server, two_adapters, adapter_name, tmp_path):
    a, b = two_adapters

    def cli(*argv):
        return run_cli(*argv, tracking_uri=mlflow_server.url, cache_dir=tmp_path / "cache")

    published = cli("mix", adapter_name, f"{a}=0.7", f"{b}@1=0.3", "--alias", "champion")
    assert published.returncode == 0, published.stderr
    assert published.stdout.strip().startswith(f"published {adapter_name} v1")
    assert f"mix of {a}@1=0.7 {b}@1=0.3" in published.stdout and published.stdout.strip().endswith("[champion]")
    versions = cli("versions", adapter_name)
    assert f"mix of {a}@1=0.7 {b}@1=0.3" in versions.stdout
    for argv, reason in (((f"{a}=heavy",), "not a number"), ((f"{a}",), "NAME=WEIGHT"),
                         ((f"{a}=1", f"{b}=1", f"{a}@2=1", f"{b}@1=2", f"{a}@1=3"), "at most 4")):
        refused = cli("mix", adapter_name, *argv)
        assert refused.returncode == 1 and reason in refused.stderr and refused.stderr.count("\n") == 1
    assert version_count(mlflow_server.url, adapter_name) == 1
    limited = cli("mix", adapter_name, f"{a}=1", f"{b}=1", "--max-components", "1")
    assert limited.returncode == 1 and "at most 1" in limited.stderr
