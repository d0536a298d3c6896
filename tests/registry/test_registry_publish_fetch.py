"""Publish, resolve, promote, fetch against a real MLflow server (session fixture)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from registry import AdapterNotFound, AdapterRejected, RegistryError, base_model_fingerprint
from loraplex.demo.publish import publish_demo_adapters
from loraplex.adapter_format import folder_sha256


def registered_model_exists(server_url: str, name: str) -> bool:
    reply = httpx.get(f"{server_url}/api/2.0/mlflow/registered-models/get", params={"name": name})
    return reply.status_code == 200


def version_count(server_url: str, name: str) -> int:
    reply = httpx.get(
        f"{server_url}/api/2.0/mlflow/model-versions/search", params={"filter": f"name='{name}'"}
    )
    reply.raise_for_status()
    return len(reply.json().get("model_versions", []))


def test_publish_records_tags_and_alias(adapter_registry, make_adapter, tiny_base, adapter_name):
    folder = make_adapter(rank=4, target_modules=["q_proj", "o_proj"])
    published = adapter_registry.publish(folder, adapter_name, tiny_base, alias="champion", description="first")
    assert published.version == "1"
    assert published.aliases == ("champion",)
    assert published.folder_sha256 == folder_sha256(folder)
    assert published.base_fingerprint == base_model_fingerprint(tiny_base)
    assert published.rank == 4
    assert published.target_modules == ("q_proj", "o_proj")
    assert published.size_bytes == sum(p.stat().st_size for p in folder.iterdir())
    assert published.source.startswith("mlflow-artifacts:/") and published.source.endswith("/adapter")
    assert published.run_id

    resolved = adapter_registry.resolve(adapter_name, "champion")
    assert resolved == published
    assert adapter_registry.resolve(adapter_name, "1") == published
    route = adapter_registry.routing_table().adapters[adapter_name]
    assert (route.champion, route.canary, route.shadow, route.canary_percent, route.tenants) == (
        "1", None, None, 0.0, None,
    )


def test_unknown_adapter_alias_and_version(adapter_registry, make_adapter, tiny_base, adapter_name):
    with pytest.raises(AdapterNotFound):
        adapter_registry.resolve(adapter_name, "champion")
    adapter_registry.publish(make_adapter(), adapter_name, tiny_base)
    with pytest.raises(AdapterNotFound):
        adapter_registry.resolve(adapter_name, "champion")
    with pytest.raises(AdapterNotFound):
        adapter_registry.resolve(adapter_name, "7")
    with pytest.raises(AdapterNotFound):
        adapter_registry.versions(adapter_name + "-missing")


@pytest.mark.parametrize("defect", ["pickle", "shapes", "rank", "trained_on_other_base"])
def test_refused_adapter_leaves_nothing_behind(
    adapter_registry, make_adapter, make_base, tiny_base, adapter_name, mlflow_server, defect
):
    good = make_adapter()
    adapter_registry.publish(good, adapter_name, tiny_base, alias="champion")
    if defect == "pickle":
        bad = make_adapter()
        (bad / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    elif defect == "shapes":
        bad = make_adapter(base_dir=make_base(hidden=128))
    elif defect == "rank":
        bad = make_adapter(rank=128)
    else:
        # Same shapes, another vocabulary: only the fingerprint tells them apart.
        other = make_base(vocab_words=[f"x{i}" for i in range(127)])
        bad = make_adapter(base_dir=other)
    with pytest.raises(AdapterRejected):
        adapter_registry.publish(bad, adapter_name, tiny_base, alias="champion")
    with pytest.raises(AdapterRejected):
        adapter_registry.publish(bad, adapter_name + "-new", tiny_base)
    assert version_count(mlflow_server.url, adapter_name) == 1
    assert adapter_registry.resolve(adapter_name, "champion").version == "1"
    assert not registered_model_exists(mlflow_server.url, adapter_name + "-new")


def test_bad_names_and_aliases_refused(adapter_registry, make_adapter, tiny_base, adapter_name):
    folder = make_adapter()
    for name in ("base", "legal@3", "has space", ""):
        with pytest.raises(RegistryError, match="adapter name"):
            adapter_registry.publish(folder, name, tiny_base)
    with pytest.raises(RegistryError, match="alias"):
        adapter_registry.publish(folder, adapter_name, tiny_base, alias="production")
    assert adapter_registry.routing_table().route(adapter_name) is None


def test_promote_canary_and_rollback(adapter_registry, make_adapter, tiny_base, adapter_name, mlflow_server):
    for _ in range(3):
        adapter_registry.publish(make_adapter(), adapter_name, tiny_base)
    adapter_registry.promote(adapter_name, "1", "champion")
    adapter_registry.promote(adapter_name, "2", "champion")
    adapter_registry.promote(adapter_name, "3", "champion")
    adapter_registry.promote(adapter_name, "2", "canary")
    adapter_registry.promote(adapter_name, "1", "shadow")
    adapter_registry.set_canary_percent(adapter_name, 25)
    route = adapter_registry.routing_table().adapters[adapter_name]
    assert (route.champion, route.canary, route.shadow, route.canary_percent) == ("3", "2", "1", 25.0)
    assert [v.aliases for v in adapter_registry.versions(adapter_name)] == [("shadow",), ("canary",), ("champion",)]

    assert adapter_registry.rollback(adapter_name).version == "2"
    assert adapter_registry.rollback(adapter_name).version == "1"
    assert adapter_registry.resolve(adapter_name, "champion").version == "1"
    with pytest.raises(RegistryError, match="no earlier champion"):
        adapter_registry.rollback(adapter_name)
    assert adapter_registry.resolve(adapter_name, "champion").version == "1"

    # A champion moved in the MLflow UI (no loraplex involved) is still rolled back correctly.
    httpx.post(
        f"{mlflow_server.url}/api/2.0/mlflow/registered-models/alias",
        json={"name": adapter_name, "alias": "champion", "version": "3"},
    ).raise_for_status()
    assert adapter_registry.rollback(adapter_name).version == "1"

    with pytest.raises(RegistryError, match="0 to 100"):
        adapter_registry.set_canary_percent(adapter_name, 101)
    with pytest.raises(AdapterNotFound):
        adapter_registry.promote(adapter_name, "9", "champion")
    assert adapter_registry.routing_table().adapters[adapter_name].canary_percent == 25.0


def artifact_file(mlflow_server, run_id: str, name: str) -> Path:
    matches = list(mlflow_server.artifacts_dir.rglob(f"{run_id}/artifacts/adapter/{name}"))
    assert len(matches) == 1, matches
    return matches[0]


def test_fetch_caches_by_content_and_refuses_corruption(
    adapter_registry, make_adapter, tiny_base, adapter_name, mlflow_server
):
    first = make_adapter()
    v1 = adapter_registry.publish(first, adapter_name, tiny_base, alias="champion")
    cached = adapter_registry.fetch(adapter_name, "1", expected_base_fingerprint=base_model_fingerprint(tiny_base))
    assert cached == adapter_registry.cache_dir / v1.folder_sha256
    assert folder_sha256(cached) == v1.folder_sha256
    assert sorted(p.name for p in cached.iterdir()) == sorted(p.name for p in first.iterdir())
    before = folder_sha256(cached)
    # A second fetch is served from the cache: it works even with the artifact gone.
    artifact_file(mlflow_server, v1.run_id, "README.md").unlink()
    assert adapter_registry.fetch(adapter_name, "champion") == cached

    v2 = adapter_registry.publish(make_adapter(), adapter_name, tiny_base)
    weights = artifact_file(mlflow_server, v2.run_id, "adapter_model.safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    adapter_registry.promote(adapter_name, v2.version, "champion")
    with pytest.raises(AdapterRejected, match="corrupt"):
        adapter_registry.fetch(adapter_name, "champion")
    entries = sorted(p.name for p in adapter_registry.cache_dir.iterdir())
    assert entries == [".versions", v1.folder_sha256]  # no half-downloaded folder left behind
    assert [p.name for p in (adapter_registry.cache_dir / ".versions" / adapter_name).iterdir()] == ["1.json"]
    assert folder_sha256(cached) == before


def test_fetch_refuses_other_base(adapter_registry, make_adapter, make_base, tiny_base, adapter_name):
    adapter_registry.publish(make_adapter(), adapter_name, tiny_base, alias="champion")
    other = base_model_fingerprint(make_base(vocab_words=[f"y{i}" for i in range(127)]))
    with pytest.raises(AdapterRejected, match="published for base model"):
        adapter_registry.fetch(adapter_name, "1", expected_base_fingerprint=other)
    assert not adapter_registry.cache_dir.exists() or not any(adapter_registry.cache_dir.iterdir())


def test_version_created_outside_loraplex_is_refused(adapter_registry, adapter_name, mlflow_server):
    api = f"{mlflow_server.url}/api/2.0/mlflow"
    httpx.post(f"{api}/registered-models/create", json={"name": adapter_name}).raise_for_status()
    # As someone clicking "register model" on an arbitrary run would do: no loraplex tags.
    experiment = httpx.post(f"{api}/experiments/create", json={"name": f"foreign-{adapter_name}"}).json()
    run = httpx.post(f"{api}/runs/create", json={"experiment_id": experiment["experiment_id"]}).json()["run"]
    created = httpx.post(
        f"{api}/model-versions/create",
        json={"name": adapter_name, "source": f"{run['info']['artifact_uri']}/model", "run_id": run["info"]["run_id"]},
    )
    assert created.status_code == 200, created.text
    with pytest.raises(AdapterRejected, match="not published through loraplex"):
        adapter_registry.fetch(adapter_name, "1")
    with pytest.raises(AdapterRejected, match="not published through loraplex"):
        adapter_registry.promote(adapter_name, "1", "champion")


def test_demo_publish_is_idempotent(adapter_registry, make_adapter, tiny_base, adapter_name, mlflow_server):
    adapters = {f"{adapter_name}-a": make_adapter(), f"{adapter_name}-b": make_adapter(rank=4)}
    first = publish_demo_adapters(adapter_registry, tiny_base, adapters)
    second = publish_demo_adapters(adapter_registry, tiny_base, adapters)
    assert first == second
    for name in adapters:
        assert first[name].version == "1" and first[name].aliases == ("champion",)
        assert version_count(mlflow_server.url, name) == 1
    # Changed content is a new version and becomes champion.
    changed = adapters[f"{adapter_name}-a"]
    config = json.loads((changed / "adapter_config.json").read_text())
    config["lora_alpha"] = 3
    (changed / "adapter_config.json").write_text(json.dumps(config))
    third = publish_demo_adapters(adapter_registry, tiny_base, adapters)
    assert third[f"{adapter_name}-a"].version == "2"
    assert third[f"{adapter_name}-b"] == first[f"{adapter_name}-b"]


def test_concurrent_fetches_share_one_cache_entry(adapter_registry, make_adapter, tiny_base, adapter_name):
    from concurrent.futures import ThreadPoolExecutor

    published = adapter_registry.publish(make_adapter(), adapter_name, tiny_base, alias="champion")
    with ThreadPoolExecutor(max_workers=4) as pool:
        paths = list(pool.map(lambda _: adapter_registry.fetch(adapter_name, "champion"), range(4)))
    assert set(paths) == {adapter_registry.cache_dir / published.folder_sha256}
    assert folder_sha256(paths[0]) == published.folder_sha256
    assert not [p for p in adapter_registry.cache_dir.iterdir() if p.name.startswith(".incoming")]


def test_download_cache_is_bounded_by_bytes_least_recently_used_first(adapter_registry, make_adapter, tiny_base, adapter_name):
    versions = [adapter_registry.publish(make_adapter(rank=4), adapter_name, tiny_base).version for _ in range(3)]
    folders = [adapter_registry.fetch(adapter_name, v) for v in versions]
    sizes = dict(adapter_registry.cached_folders())
    assert len(sizes) == 3
    adapter_registry.fetch(adapter_name, versions[0])  # a cache hit: v1 is now the most recently used
    bound = sizes[folders[0]] + sizes[folders[2]]
    removed, held = adapter_registry.prune_cache(bound, keep=())
    assert removed == [folders[1]] and held == bound  # v2, the least recently used, went
    assert [p for p, _ in adapter_registry.cached_folders()] == [folders[2], folders[0]]
    assert not (adapter_registry.cache_dir / ".versions" / adapter_name / f"{versions[1]}.json").exists()
    # What is kept (serving) stays even over the bound; the rest goes oldest first.
    removed, held = adapter_registry.prune_cache(1, keep={folders[2]})
    assert removed == [folders[0]] and held == sizes[folders[2]]
    assert adapter_registry.prune_cache(0, keep=()) == ([], held)  # 0 = no bound
    # A removed version is simply downloaded again.
    assert adapter_registry.fetch(adapter_name, versions[1]) == folders[1] and folders[1].is_dir()


def test_cached_folder_is_checked_against_its_content_address_online_and_offline(
    adapter_registry, make_adapter, tiny_base, adapter_name
):
    from registry import AdapterRegistry, RegistryUnavailable, RestPolicy
    from loraplex.stack.ports import free_port

    good, damaged = (adapter_registry.publish(make_adapter(), adapter_name, tiny_base).version for _ in range(2))
    good_folder, damaged_folder = adapter_registry.fetch(adapter_name, good), adapter_registry.fetch(adapter_name, damaged)
    # MLflow gone (nothing listens on the port), the same cache on disk: a restarted shard.
    offline = AdapterRegistry(f"http://127.0.0.1:{free_port()}", adapter_registry.cache_dir,
                              rest_policy=RestPolicy(timeout_s=2, max_retries=0))
    assert offline.fetch(adapter_name, good) == good_folder
    weights = damaged_folder / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(RegistryUnavailable):
        offline.fetch(adapter_name, damaged)  # never served damaged: refused while offline
    assert not damaged_folder.exists()
    # Online again, the damaged copy is replaced by a verified download.
    assert adapter_registry.fetch(adapter_name, damaged) == damaged_folder
    assert folder_sha256(damaged_folder) == damaged_folder.name
