"""A real shard (gRPC on loopback) merges a hot adapter under concurrent load, on an admin call
and on its own when one adapter's share of the traffic stays high, and unmerges when it cools:
no request fails and no greedy answer changes."""

import asyncio
import urllib.request

import grpc
import pytest

from loraplex.stack.ports import free_port
from protos import shard_pb2, shard_pb2_grpc
from tests.support.shard_server import generate_request, running_shard, shard_test_settings

PROMPTS = ["hello there", "merge me", "a third prompt", "xyz"]
MODELS = ["alpha", "beta", "", "gamma"]


def settings_for(tiny_model_dir, tiny_adapter_dirs, **overrides):
    values = dict(max_batch_size=4, max_queue=64, device_slots=3, max_context=64, default_max_tokens=6, hot_merge=False)
    values.update(overrides)
    return shard_test_settings(tiny_model_dir, tiny_adapter_dirs, **values)


async def answer(stub, adapter, prompt):
    chunks = [c async for c in stub.Generate(generate_request(prompt=prompt, adapter=adapter, max_tokens=6))]
    return [t for c in chunks for t in c.token_ids]


async def references(stub):
    """Each (adapter, prompt)'s greedy tokens, asked alone before anything is merged."""
    return {(a, p): await answer(stub, a, p) for a in MODELS for p in PROMPTS}


class Load:
    """Workers sending greedy requests in a loop until stopped; every answer is checked."""

    def __init__(self, stub, expected, adapters):
        self.stub, self.expected, self.adapters = stub, expected, adapters
        self.done = 0
        self.failures: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    def start(self, workers):
        self._tasks = [asyncio.create_task(self._worker(i)) for i in range(workers)]
        return self

    async def _worker(self, i):
        n = i
        while not self._stop.is_set():
            adapter, prompt = self.adapters[n % len(self.adapters)], PROMPTS[n % len(PROMPTS)]
            n += 1
            try:
                tokens = await answer(self.stub, adapter, prompt)
            except grpc.aio.AioRpcError as error:
                self.failures.append(f"{adapter or 'base'}: {error.code().name} {error.details()}")
                continue
            if tokens != self.expected[(adapter, prompt)]:
                self.failures.append(f"{adapter or 'base'} / {prompt!r}: {tokens} != {self.expected[(adapter, prompt)]}")
            self.done += 1

    async def serve_more(self, count, timeout_s=60.0):
        """Wait until `count` more requests have been answered (bounded)."""
        target = self.done + count
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.done < target:
            assert asyncio.get_running_loop().time() < deadline, f"load stalled; failures: {self.failures[:3]}"
            await asyncio.sleep(0.1)

    async def stop(self):
        self._stop.set()
        await asyncio.gather(*self._tasks)


async def wait_for_merged(stub, name, timeout_s=60.0):
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        merged = (await stub.Stats(shard_pb2.StatsRequest())).merged_adapter.name
        if merged == name or asyncio.get_running_loop().time() > deadline:
            return merged
        await asyncio.sleep(0.1)


def metric(port, name, **labels):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return None


def test_admin_merge_and_unmerge_under_load_change_no_answer(tiny_model_dir, tiny_adapter_dirs):
    metrics_port = free_port()
    settings = settings_for(tiny_model_dir, tiny_adapter_dirs, metrics_port=metrics_port)

    async def body():
        async with running_shard(settings) as address, grpc.aio.insecure_channel(address) as channel:
            stub = shard_pb2_grpc.ShardStub(channel)
            expected = await references(stub)
            load = Load(stub, expected, MODELS).start(workers=6)
            await load.serve_more(4)
            reply = await stub.MergeAdapter(shard_pb2.MergeAdapterRequest(adapter=shard_pb2.AdapterRef(name="alpha", version="local")))
            assert reply.merged.name == "alpha" and not reply.HasField("replaced")
            stats = await stub.Stats(shard_pb2.StatsRequest())
            assert stats.merged_adapter.name == "alpha" and stats.merged_adapter.version == "local"
            listed = await stub.ListAdapters(shard_pb2.ListAdaptersRequest())
            assert {a.adapter.name for a in listed.adapters if a.merged} == {"alpha"}
            await load.serve_more(12)
            # Replacing the merged adapter with another one, still under load.
            reply = await stub.MergeAdapter(shard_pb2.MergeAdapterRequest(adapter=shard_pb2.AdapterRef(name="gamma", version="local")))
            assert reply.merged.name == "gamma" and reply.replaced.name == "alpha"
            await load.serve_more(12)
            reply = await stub.UnmergeAdapter(shard_pb2.UnmergeAdapterRequest())
            assert reply.unmerged.name == "gamma"
            assert not (await stub.Stats(shard_pb2.StatsRequest())).HasField("merged_adapter")
            await load.serve_more(8)
            await load.stop()
            assert load.failures == []
            assert load.done >= 32
            assert metric(metrics_port, "loraplex_shard_adapter_merge_changes_total", action="merge", trigger="admin") == 2
            assert metric(metrics_port, "loraplex_shard_adapter_merge_changes_total", action="unmerge", trigger="admin") == 1
            # A merge of an adapter that does not exist is refused; nothing changes.
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.MergeAdapter(shard_pb2.MergeAdapterRequest(adapter=shard_pb2.AdapterRef(name="missing", version="local")))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            assert not (await stub.Stats(shard_pb2.StatsRequest())).HasField("merged_adapter")

    asyncio.run(body())


def test_the_shard_merges_a_hot_adapter_on_its_own_and_unmerges_it_when_it_cools(tiny_model_dir, tiny_adapter_dirs):
    metrics_port = free_port()
    settings = settings_for(
        tiny_model_dir, tiny_adapter_dirs, metrics_port=metrics_port, hot_merge=True, hot_merge_share=0.6,
        hot_unmerge_share=0.3, hot_merge_window_s=1.5, hot_merge_cooldown_s=0.5, hot_merge_min_tokens=30,
    )

    async def body():
        async with running_shard(settings) as address, grpc.aio.insecure_channel(address) as channel:
            stub = shard_pb2_grpc.ShardStub(channel)
            expected = await references(stub)
            # alpha is hot: 5 of every 6 requests.
            load = Load(stub, expected, ["alpha"] * 5 + ["beta"]).start(workers=4)
            assert await wait_for_merged(stub, "alpha") == "alpha"
            await load.serve_more(12)
            await load.stop()
            # alpha cools: only beta and base now.
            cooled = Load(stub, expected, ["beta", ""]).start(workers=4)
            assert await wait_for_merged(stub, "") == ""
            await cooled.stop()
            assert load.failures == [] and cooled.failures == []
            assert metric(metrics_port, "loraplex_shard_adapter_merge_changes_total", action="merge", trigger="auto") >= 1
            assert metric(metrics_port, "loraplex_shard_adapter_merge_changes_total", action="unmerge", trigger="auto") >= 1

    asyncio.run(body())


def test_a_quantized_shard_refuses_a_merge_and_keeps_serving(tiny_model_dir, tiny_adapter_dirs):
    settings = settings_for(tiny_model_dir, tiny_adapter_dirs, quantization="nf4", hot_merge=True)

    async def body():
        async with running_shard(settings) as address, grpc.aio.insecure_channel(address) as channel:
            stub = shard_pb2_grpc.ShardStub(channel)
            before = await answer(stub, "alpha", PROMPTS[0])
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.MergeAdapter(shard_pb2.MergeAdapterRequest(adapter=shard_pb2.AdapterRef(name="alpha", version="local")))
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "quantized" in info.value.details()
            assert not (await stub.Stats(shard_pb2.StatsRequest())).HasField("merged_adapter")
            assert await answer(stub, "alpha", PROMPTS[0]) == before

    asyncio.run(body())
