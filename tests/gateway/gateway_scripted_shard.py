"""A small scripted shard: a real grpc.aio server implementing protos/shard.proto, whose answers and
faults the test decides (fail before the first token, cut mid-stream, RESOURCE_EXHAUSTED, slow, ...).

Its text is a pure function of the request, so tests can check which adapter version answered:
`<adapter or base>@<version>:<i>` words, one per token, max_tokens of them (default 4).
"""

from __future__ import annotations

import asyncio
import threading

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from protos import shard_pb2, shard_pb2_grpc


def expected_words(adapter: str, version: str, n: int) -> list[str]:
    return [f"{adapter or 'base'}@{version or 'base'}:{i} " for i in range(n)]


class ScriptedShard(shard_pb2_grpc.ShardServicer):
    def __init__(self, name: str):
        self.name = name
        self.mode = "ok"  # ok | fail_before_first | cut_midway | exhausted | slow | not_found | invalid | precondition | eof
        self.slow_s = 0.0
        self.requests: list[shard_pb2.GenerateRequest] = []
        self.loaded: dict[tuple[str, str], bool] = {}
        self.cancelled = 0
        # (adapter, version) -> the status this shard refuses it with (FAILED_PRECONDITION: corrupt artifacts).
        self.faults: dict[tuple[str, str], grpc.StatusCode] = {}
        self.merged: shard_pb2.AdapterRef | None = None
        self.quantized = False  # a quantized base refuses merges

    async def Generate(self, request, context):
        self.requests.append(request)
        fault = self.faults.get((request.adapter.name, request.adapter.version))
        if fault is not None:
            await context.abort(fault, f"scripted {fault.name} for {request.adapter.name} v{request.adapter.version} on {self.name}")
        mode = self.mode
        codes = {
            "fail_before_first": grpc.StatusCode.UNAVAILABLE,
            "exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
            "not_found": grpc.StatusCode.NOT_FOUND,
            "invalid": grpc.StatusCode.INVALID_ARGUMENT,
            "precondition": grpc.StatusCode.FAILED_PRECONDITION,
        }
        if mode in codes:
            await context.abort(codes[mode], f"scripted {mode} on {self.name}")
        if mode == "eof":
            return
        ref = request.adapter
        n = request.sampling.max_tokens or 4
        words = expected_words(ref.name, ref.version, n)
        yield shard_pb2.GenerateChunk(adapter=shard_pb2.AdapterRef(name=ref.name, version=ref.version))
        try:
            for i, word in enumerate(words):
                if mode == "slow":
                    await asyncio.sleep(self.slow_s)
                if mode == "cut_midway" and i == 2:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"scripted cut on {self.name}")
                last = i == len(words) - 1
                chunk = shard_pb2.GenerateChunk(text=word, token_ids=[1000 + i + 100 * sum(map(ord, ref.version))])
                if last:
                    chunk.finish_reason = shard_pb2.FINISH_REASON_LENGTH
                    chunk.usage.prompt_tokens = len((request.prompt or "").split()) + sum(len(m.content.split()) for m in request.messages)
                    chunk.usage.completion_tokens = n
                yield chunk
                await asyncio.sleep(0)
        except (asyncio.CancelledError, GeneratorExit):
            # Cancelled while sleeping, or closed while grpc waited to send a chunk (flow control).
            self.cancelled += 1
            raise

    async def LoadAdapter(self, request, context):
        key = (request.adapter.name, request.adapter.version)
        if request.adapter.name == "missing":
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such adapter")
        self.loaded[key] = request.pin
        return shard_pb2.LoadAdapterResponse(adapter=shard_pb2.AdapterInfo(adapter=request.adapter, tier="device", pinned=request.pin, rank=8))

    async def UnloadAdapter(self, request, context):
        key = (request.adapter.name, request.adapter.version)
        if key not in self.loaded:
            return shard_pb2.UnloadAdapterResponse(unloaded=False)
        if request.unpin_only:
            self.loaded[key] = False
        else:
            del self.loaded[key]
        return shard_pb2.UnloadAdapterResponse(unloaded=True)

    async def ListAdapters(self, request, context):
        infos = [
            shard_pb2.AdapterInfo(adapter=shard_pb2.AdapterRef(name=n, version=v), tier="device", pinned=p) for (n, v), p in sorted(self.loaded.items())
        ]
        return shard_pb2.ListAdaptersResponse(adapters=infos, tiers=[shard_pb2.TierStats(tier="device", capacity=4, used=len(infos))])

    async def Stats(self, request, context):
        return shard_pb2.StatsResponse(
            shard_id=self.name, base_model="scripted", quantization="nf4" if self.quantized else "fp32", device="cpu",
            merged_adapter=self.merged,
        )

    async def MergeAdapter(self, request, context):
        if self.quantized:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"scripted: the base weights of {self.name} are quantized")
        replaced, self.merged = self.merged, request.adapter
        return shard_pb2.MergeAdapterResponse(merged=request.adapter, replaced=replaced)

    async def UnmergeAdapter(self, request, context):
        unmerged, self.merged = self.merged, None
        return shard_pb2.UnmergeAdapterResponse(unmerged=unmerged)


class ScriptedShardServer:
    """Runs a ScriptedShard on 127.0.0.1:<free port> in a thread with its own event loop."""

    def __init__(self, name: str):
        self.servicer = ScriptedShard(name)
        self.health = health.HealthServicer()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"scripted-{name}", daemon=True)
        self._server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def shard_id(self) -> str:
        """The id it reports in Stats: the gateway's name for it."""
        return self.servicer.name

    def _run(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> ScriptedShardServer:
        self._thread.start()

        async def serve():
            server = grpc.aio.server()
            shard_pb2_grpc.add_ShardServicer_to_server(self.servicer, server)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
            self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
            await server.start()
            self._server = server

        self._run(serve())
        return self

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set("", status)

    def stop(self) -> None:
        if self._server is not None:
            self._run(self._server.stop(grace=None))
            self._server = None

    def restart(self) -> None:
        """Start again on the same port (a shard coming back)."""
        self.stop()

        async def serve():
            server = grpc.aio.server()
            shard_pb2_grpc.add_ShardServicer_to_server(self.servicer, server)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
            server.add_insecure_port(f"127.0.0.1:{self.port}")
            await server.start()
            self._server = server

        self._run(serve())

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
