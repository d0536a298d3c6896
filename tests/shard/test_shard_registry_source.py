"""A shard fetching adapters from a real MLflow registry: a published version answers like the same
adapter folder served locally; an unknown version is NOT_FOUND; an alias is refused (the gateway
resolves aliases, the shard caches by version); a version with NaN weights made behind the
registry's back is refused at load."""

import asyncio
import shutil
from pathlib import Path

import grpc
from safetensors.torch import load_file, save_file

from loraplex.adapter_format import folder_sha256
from registry.adapter_registry import ARTIFACT_SUBDIR, DEFAULT_EXPERIMENT, TAG_BASE_FINGERPRINT, TAG_FOLDER_SHA256
from registry.upload import upload_folder
from tests.support.shard_server import generate_request, running_shard, shard_test_settings
from protos import shard_pb2, shard_pb2_grpc


def nan_copy(folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "nan-copy"
    shutil.copytree(folder, copy)
    weights = load_file(copy / "adapter_model.safetensors")
    weights[sorted(weights)[0]][0, 0] = float("nan")
    save_file(weights, copy / "adapter_model.safetensors")
    return copy


def publish_around_validation(registry, folder: Path, name: str, base_fingerprint: str) -> str:
    """A version made with MLflow's own client, as someone bypassing `loraplex adapters publish`
    would: artifacts and tags are consistent, the weights were never checked."""
    run = registry.client.create_run(registry.client.get_experiment_by_name(DEFAULT_EXPERIMENT).experiment_id)
    upload_folder(registry.client, run.info.run_id, folder, ARTIFACT_SUBDIR, progress=False)
    registry.client.set_terminated(run.info.run_id)
    version = registry.client.create_model_version(
        name, source=f"{run.info.artifact_uri}/{ARTIFACT_SUBDIR}", run_id=run.info.run_id,
        tags={TAG_FOLDER_SHA256: folder_sha256(folder), TAG_BASE_FINGERPRINT: base_fingerprint},
    )
    return str(version.version)


def test_registry_backed_shard_serves_published_versions(tiny_model_dir, tiny_adapter_dirs, adapter_registry, tmp_path):
    published = adapter_registry.publish(tiny_adapter_dirs["alpha"], "alpha", tiny_model_dir, alias="champion")
    registry_settings = shard_test_settings(
        tiny_model_dir, {}, registry_tracking_uri=adapter_registry.tracking_uri,
        adapter_cache_dir=str(tmp_path / "shard-cache"),
    )
    local_settings = shard_test_settings(tiny_model_dir, tiny_adapter_dirs)

    async def run(settings, requests):
        results = []
        async with running_shard(settings) as address, grpc.aio.insecure_channel(address) as channel:
            stub = shard_pb2_grpc.ShardStub(channel)
            for request in requests:
                try:
                    results.append([c async for c in stub.Generate(request)])
                except grpc.aio.AioRpcError as error:
                    results.append(error.code())
            results.append((await stub.Stats(shard_pb2.StatsRequest())).base_fingerprint)
        return results

    behind_the_back = publish_around_validation(adapter_registry, nan_copy(tiny_adapter_dirs["alpha"], tmp_path),
                                                "alpha", published.base_fingerprint)
    by_version = generate_request(adapter="alpha", version=published.version, max_tokens=8)
    missing = generate_request(adapter="alpha", version="999")
    alias = generate_request(adapter="alpha", version="champion")
    poisoned = generate_request(adapter="alpha", version=behind_the_back)
    served, not_found, refused, nan_refused, fingerprint = asyncio.run(
        run(registry_settings, [by_version, missing, alias, poisoned])
    )
    local, _ = asyncio.run(run(local_settings, [generate_request(adapter="alpha", max_tokens=8)]))

    assert [t for c in served for t in c.token_ids] == [t for c in local for t in c.token_ids]
    assert served[0].adapter.version == published.version
    assert not_found == grpc.StatusCode.NOT_FOUND
    assert refused == grpc.StatusCode.INVALID_ARGUMENT
    # NaN weights that never went through publish are refused at load; the gateway keeps the
    # version that served before when a shard answers FAILED_PRECONDITION (test_gateway_version_fallback).
    assert nan_refused == grpc.StatusCode.FAILED_PRECONDITION
    assert fingerprint and fingerprint == published.base_fingerprint


def test_shard_keeps_its_host_and_disk_tiers_within_their_byte_bounds(tiny_model_dir, tiny_adapter_dirs, adapter_registry, tmp_path):
    from registry import AdapterRegistry

    names = ["alpha", "beta", "gamma"]
    versions = {n: adapter_registry.publish(tiny_adapter_dirs[n], f"bound-{n}-{tmp_path.name}"[-60:], tiny_model_dir) for n in names}
    disk_sizes = {n: sum(f.stat().st_size for f in tiny_adapter_dirs[n].rglob("*") if f.is_file()) for n in names}
    disk_bound = max(disk_sizes.values()) + 1  # one adapter folder at a time
    host_bound = 1  # smaller than any adapter: nothing idle stays parsed in memory
    cache_dir = tmp_path / "shard-cache"
    settings = shard_test_settings(
        tiny_model_dir, {}, registry_tracking_uri=adapter_registry.tracking_uri, adapter_cache_dir=str(cache_dir),
        host_cache_bytes=host_bound, disk_cache_bytes=disk_bound, device_slots=1,
    )
    order = names + ["alpha"]  # alpha comes back after its folder was pruned

    async def run():
        answers, tiers_after = [], []
        async with running_shard(settings) as address, grpc.aio.insecure_channel(address) as channel:
            stub = shard_pb2_grpc.ShardStub(channel)
            for n in order:
                v = versions[n]
                chunks = [c async for c in stub.Generate(generate_request(adapter=v.name, version=v.version, max_tokens=6))]
                answers.append([t for c in chunks for t in c.token_ids])
                tiers_after.append({t.tier: t for t in (await stub.Stats(shard_pb2.StatsRequest())).tiers})
        return answers, tiers_after

    answers, tiers_after = asyncio.run(run())
    for tiers in tiers_after:
        assert tiers["disk"].used_bytes <= disk_bound and tiers["disk"].capacity_bytes == disk_bound
        assert tiers["host"].used_bytes <= host_bound and tiers["host"].capacity_bytes == host_bound
    assert tiers_after[-1]["disk"].evictions >= 3 and tiers_after[-1]["host"].evictions >= 4
    held = AdapterRegistry(adapter_registry.tracking_uri, cache_dir).cached_folders()
    assert sum(size for _, size in held) <= disk_bound and len(held) == 1
    assert answers[0] == answers[-1]  # alpha, downloaded again after its eviction, answers the same
