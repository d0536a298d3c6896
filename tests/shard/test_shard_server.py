"""The gRPC servicer in-process, over a real loopback channel: streaming, error statuses,
cancellation, adapter RPCs, stats and health."""

import asyncio
import gc

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.shard_server import generate_request, running_shard, shard_test_settings
from protos import shard_pb2, shard_pb2_grpc
from shard.server import serve


async def with_shard(settings, body):
    async with running_shard(settings) as address:
        async with grpc.aio.insecure_channel(address) as channel:
            await body(shard_pb2_grpc.ShardStub(channel), channel)


async def status_of(call):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            pass
    return info.value.code()


def test_generate_streams_and_maps_errors(tiny_model_dir, tiny_adapter_dirs):
    settings = shard_test_settings(tiny_model_dir, tiny_adapter_dirs)

    async def body(stub, channel):
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service="loraplex.shard.v1.Shard"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # What loading left alive is out of the collector's reach: no full collection walks it.
        assert gc.get_freeze_count() > len(gc.get_objects(generation=2))

        chunks = [c async for c in stub.Generate(generate_request(adapter="alpha"))]
        assert chunks[0].adapter.name == "alpha" and chunks[0].adapter.version == "local"
        assert chunks[-1].finish_reason == shard_pb2.FINISH_REASON_LENGTH
        assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].usage.prompt_tokens == 5
        assert all(c.finish_reason == shard_pb2.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
        whole = generate_request(adapter="alpha")
        whole.stream_interval = 6  # = max_tokens: the first text at once, the rest with the end
        grouped = [c async for c in stub.Generate(whole)]
        assert 1 <= len(grouped) <= 2 and grouped[0].adapter.name == "alpha"
        assert [t for c in grouped for t in c.token_ids] == [t for c in chunks for t in c.token_ids]
        assert "".join(c.text for c in grouped) == "".join(c.text for c in chunks)
        assert grouped[-1].usage == chunks[-1].usage and grouped[-1].finish_reason == chunks[-1].finish_reason

        assert await status_of(stub.Generate(generate_request(prompt="x" * 64))) == grpc.StatusCode.INVALID_ARGUMENT
        assert await status_of(stub.Generate(generate_request(temperature=-1))) == grpc.StatusCode.INVALID_ARGUMENT
        assert await status_of(stub.Generate(generate_request(adapter="missing"))) == grpc.StatusCode.NOT_FOUND
        both = generate_request()
        both.messages.add(role="user", content="hi")
        assert await status_of(stub.Generate(both)) == grpc.StatusCode.INVALID_ARGUMENT

        stats = await stub.Stats(shard_pb2.StatsRequest())
        assert stats.shard_id == "test-shard" and stats.quantization == "fp32"
        assert stats.max_batch_size == 2 and stats.queue_capacity == 4 and stats.max_context == 64
        assert stats.requests_completed >= 1 and stats.tokens_generated >= 6
        assert {t.tier for t in stats.tiers} == {"device", "host", "disk"}

    asyncio.run(with_shard(settings, body))


def test_client_cancel_frees_the_row(tiny_model_dir, tiny_adapter_dirs):
    settings = shard_test_settings(tiny_model_dir, tiny_adapter_dirs, max_batch_size=1, max_context=256)

    async def body(stub, channel):
        call = stub.Generate(generate_request(max_tokens=240))
        first = await call.read()
        assert first.adapter.name == ""
        call.cancel()
        for _ in range(200):
            stats = await stub.Stats(shard_pb2.StatsRequest())
            if stats.running == 0:
                break
            await asyncio.sleep(0.02)
        assert stats.running == 0
        # The only row is free again: a new request is served.
        chunks = [c async for c in stub.Generate(generate_request(max_tokens=3))]
        assert chunks[-1].usage.completion_tokens == 3

    asyncio.run(with_shard(settings, body))


def test_full_queue_is_resource_exhausted(tiny_model_dir, tiny_adapter_dirs):
    settings = shard_test_settings(tiny_model_dir, tiny_adapter_dirs, max_queue=0)

    async def body(stub, channel):
        assert await status_of(stub.Generate(generate_request())) == grpc.StatusCode.RESOURCE_EXHAUSTED

    asyncio.run(with_shard(settings, body))


def test_adapter_rpcs(tiny_model_dir, tiny_adapter_dirs):
    settings = shard_test_settings(tiny_model_dir, tiny_adapter_dirs)

    async def body(stub, channel):
        ref = shard_pb2.AdapterRef(name="beta", version="local")
        loaded = await stub.LoadAdapter(shard_pb2.LoadAdapterRequest(adapter=ref, pin=True))
        assert loaded.adapter.tier == "device" and loaded.adapter.pinned and loaded.adapter.rank == 16
        listed = await stub.ListAdapters(shard_pb2.ListAdaptersRequest())
        assert [a.adapter.name for a in listed.adapters] == ["beta"]
        await stub.UnloadAdapter(shard_pb2.UnloadAdapterRequest(adapter=ref, unpin_only=True))
        listed = await stub.ListAdapters(shard_pb2.ListAdaptersRequest())
        assert not listed.adapters[0].pinned
        unloaded = await stub.UnloadAdapter(shard_pb2.UnloadAdapterRequest(adapter=ref))
        assert unloaded.unloaded
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.LoadAdapter(shard_pb2.LoadAdapterRequest(adapter=shard_pb2.AdapterRef(name="nope", version="local")))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND

    asyncio.run(with_shard(settings, body))


def test_stop_drains_running_requests_and_refuses_new_ones(tiny_model_dir, tiny_adapter_dirs):
    settings = shard_test_settings(tiny_model_dir, tiny_adapter_dirs, max_context=256)
    stop = asyncio.Event()

    async def main():
        ready = asyncio.Event()
        task = asyncio.create_task(serve(settings, stop=stop, on_ready=lambda port: ready.set()))
        await asyncio.wait_for(ready.wait(), 120)
        async with grpc.aio.insecure_channel(settings.address) as channel:
            stub = shard_pb2_grpc.ShardStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            call = stub.Generate(generate_request(max_tokens=200))
            await call.read()
            stop.set()
            for _ in range(500):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
                if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                await asyncio.sleep(0.01)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert await status_of(stub.Generate(generate_request())) == grpc.StatusCode.UNAVAILABLE
            rest = []
            while (chunk := await call.read()) is not grpc.aio.EOF:
                rest.append(chunk)
            assert rest[-1].finish_reason == shard_pb2.FINISH_REASON_LENGTH
            assert rest[-1].usage.completion_tokens == 200
        await asyncio.wait_for(task, 60)

    asyncio.run(main())


def test_generate_with_an_ad_hoc_mix(tiny_model_dir, tiny_adapter_dirs):
    """The mix field serves a weighted sum (the first chunk says which components), and a bad mix
    is INVALID_ARGUMENT, or FAILED_PRECONDITION when a component cannot be served."""
    settings = shard_test_settings(tiny_model_dir, tiny_adapter_dirs, max_mix_components=2)

    def mixed(*components, adapter=""):
        request = generate_request(adapter=adapter)
        for name, weight in components:
            request.mix.add(adapter=shard_pb2.AdapterRef(name=name, version="local"), weight=weight)
        return request

    async def tokens(stub, request):
        chunks = [c async for c in stub.Generate(request)]
        return chunks, [t for c in chunks for t in c.token_ids]

    async def body(stub, channel):
        chunks, mix_tokens = await tokens(stub, mixed(("alpha", 0.7), ("beta", -0.4)))
        assert [(c.adapter.name, c.adapter.version, c.weight) for c in chunks[0].mix] == [
            ("alpha", "local", 0.7), ("beta", "local", -0.4)
        ]
        assert not chunks[0].adapter.name and chunks[-1].finish_reason == shard_pb2.FINISH_REASON_LENGTH
        _, alpha_tokens = await tokens(stub, generate_request(adapter="alpha"))
        _, scaled_tokens = await tokens(stub, mixed(("alpha", 1.0)))
        assert scaled_tokens == alpha_tokens  # a one-component mix at weight 1 is the adapter
        assert mix_tokens != alpha_tokens

        for bad in (
            mixed(("alpha", 1.0), ("beta", 1.0), ("gamma", 1.0)),  # over max_mix_components
            mixed(("alpha", float("nan"))),
            mixed(("alpha", 0.0)),
            mixed(("alpha", 0.5), ("alpha", 0.5)),
            mixed(("", 1.0)),
            mixed(("alpha", 1.0), adapter="beta"),
        ):
            assert await status_of(stub.Generate(bad)) == grpc.StatusCode.INVALID_ARGUMENT
        assert await status_of(stub.Generate(mixed(("alpha", 0.5), ("missing", 0.5)))) == grpc.StatusCode.FAILED_PRECONDITION

    asyncio.run(with_shard(settings, body))
