"""A shard fetching adapters from a real MLflow registry: a published version answers like the same
adapter folder served locally; an unknown version is NOT_FOUND; an alias is refused (the gateway
resolves aliases, the shard caches by version)."""

import asyncio

import grpc

from tests.support.shard_server import generate_request, running_shard, shard_test_settings
from protos import shard_pb2, shard_pb2_grpc


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

    by_version = generate_request(adapter="alpha", version=published.version, max_tokens=8)
    missing = generate_request(adapter="alpha", version="999")
    alias = generate_request(adapter="alpha", version="champion")
    served, not_found, refused, fingerprint = asyncio.run(run(registry_settings, [by_version, missing, alias]))
    local, _ = asyncio.run(run(local_settings, [generate_request(adapter="alpha", max_tokens=8)]))

    assert [t for c in served for t in c.token_ids] == [t for c in local for t in c.token_ids]
    assert served[0].adapter.version == published.version
    assert not_found == grpc.StatusCode.NOT_FOUND
    assert refused == grpc.StatusCode.INVALID_ARGUMENT
    assert fingerprint and fingerprint == published.base_fingerprint
