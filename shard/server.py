"""The shard's gRPC transport: ``protos/shard.proto`` over the engine and its LoRA manager, plus the
standard ``grpc.health.v1`` service (SERVING once the model is loaded, NOT_SERVING while
draining). ``serve(settings)`` runs until SIGTERM/SIGINT, then drains and stops."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from opentelemetry.sdk.trace import TracerProvider

from loraplex.garbage_collection import freeze_startup_objects
from loraplex.grpc_tls import server_credentials
from loraplex.telemetry import tracer_provider
from protos import shard_pb2, shard_pb2_grpc
from shard.engine import (
    Engine,
    EngineClosedError,
    FinishReason,
    GenerationRequest,
    InvalidRequestError,
    QueueFullError,
    SamplingOptions,
)
from shard.intra_op_threads import run_in_ending_thread
from shard.metrics import ShardMetrics
from shard.settings import ShardSettings

if TYPE_CHECKING:
    from shard.lora import LoraManager

log = logging.getLogger("shard")

# An admin merge loads the adapter (registry, disk) before the engine merges it between two steps.
_MERGE_TIMEOUT_S = 120.0
_MERGE_ATTEMPTS = 3
SERVICE_NAME = shard_pb2.DESCRIPTOR.services_by_name["Shard"].full_name
_FINISH = {
    FinishReason.STOP: shard_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: shard_pb2.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: shard_pb2.FINISH_REASON_CANCELLED,
}


@dataclass
class ShardCore:
    """Everything the servicer serves from, built once per process by ``build_core``."""

    settings: ShardSettings
    engine: Engine
    lora: LoraManager | None  # None: this shard serves the base model only
    base_model: str
    base_fingerprint: str


def build_core(settings: ShardSettings, metrics: ShardMetrics | None = None) -> ShardCore:
    """Load the base model (quantized), install multi-adapter LoRA and start the engine."""
    from shard.adapter_sources import adapter_source_for, base_model_fingerprint
    from shard.model_loading import load_base_model
    from shard.packed_weights import pack_linear_weights

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    model_dir = Path(settings.model_dir)
    model, tokenizer = load_base_model(model_dir, settings.quantization, settings.device)
    if settings.packed_weights:
        packed = pack_linear_weights(model)
        if packed:
            log.info("%d projections compute through packed weights", packed)
    fingerprint = base_model_fingerprint(model_dir)
    source = adapter_source_for(settings, fingerprint)
    lora = None
    if source is not None:
        from shard.lora import LoraManager

        pool_dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
        lora = LoraManager.install(
            model,
            source,
            device_slots=settings.device_slots,
            max_rank=settings.max_rank,
            host_capacity=settings.host_capacity,
            host_bytes=settings.host_cache_bytes,
            pool_dtype=pool_dtype[settings.adapter_dtype],
            load_observer=metrics.observe_adapter_load if metrics is not None else None,
            max_mix_components=settings.max_mix_components,
        )
    engine = Engine(
        model,
        tokenizer,
        hot_merge_policy=_hot_merge_policy(settings, lora),
        max_batch_size=settings.max_batch_size,
        max_queue=settings.max_queue,
        max_context=settings.max_context,
        default_max_tokens=settings.default_max_tokens,
        prefill_chunk_tokens=settings.prefill_chunk_tokens,
        admission_window_s=settings.admission_window_ms / 1000,
        warm_up=settings.warm_up,
        prefix_cache_bytes=settings.prefix_cache_mb * 2**20,
        prefix_block_tokens=settings.prefix_block_tokens,
        decode_attention=settings.decode_attention,
        fused_forward=settings.fused_forward,
        lora=lora,
        metrics=metrics,
    ).start()
    name = getattr(model.config, "_name_or_path", "") or model_dir.name
    return ShardCore(settings, engine, lora, Path(name).name or model_dir.name, fingerprint)


def _hot_merge_policy(settings: ShardSettings, lora: LoraManager | None):
    """The automatic merge policy, or None where it is off or cannot act (no adapters, or a
    quantized base whose weights cannot hold a merge)."""
    if not settings.hot_merge or lora is None:
        return None
    refusal = lora.merge_refusal()
    if refusal is not None:
        log.info("hot adapter merging is off on this shard: %s", refusal)
        return None
    from shard.lora.hot_policy import HotAdapterPolicy

    return HotAdapterPolicy(
        share=settings.hot_merge_share,
        unmerge_share=settings.hot_unmerge_share,
        window_s=settings.hot_merge_window_s,
        cooldown_s=settings.hot_merge_cooldown_s,
        min_tokens=settings.hot_merge_min_tokens,
    )


def _adapter_status(error: BaseException) -> grpc.StatusCode:
    return _failure(error)[0]


def _failure(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status an error answers with, and its refusal reason (shard.metrics.REFUSAL_REASONS)."""
    from shard.adapter_sources import RegistryUnavailableError
    from shard.lora import AdapterInUseError, AdapterLoadTimeout, AdapterNotFoundError, AdapterRejectedError
    from shard.lora.errors import MergeRefusedError

    if isinstance(error, RegistryUnavailableError):
        # The version cannot be loaded here now (MLflow unreachable, not in the disk cache); the
        # shard itself is fine. UNAVAILABLE would make the gateway take the shard out of its ring.
        return grpc.StatusCode.FAILED_PRECONDITION, "registry_unavailable"
    if isinstance(error, AdapterNotFoundError):
        return grpc.StatusCode.NOT_FOUND, "adapter_not_found"
    if isinstance(error, AdapterRejectedError):
        return grpc.StatusCode.FAILED_PRECONDITION, "adapter_rejected"
    if isinstance(error, AdapterInUseError):
        return grpc.StatusCode.FAILED_PRECONDITION, "adapter_in_use"
    if isinstance(error, MergeRefusedError):
        return grpc.StatusCode.FAILED_PRECONDITION, "merge_refused"
    if isinstance(error, AdapterLoadTimeout):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "adapter_load_timeout"
    if isinstance(error, InvalidRequestError):
        return grpc.StatusCode.INVALID_ARGUMENT, "invalid_request"
    if isinstance(error, QueueFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "queue_full"
    if isinstance(error, EngineClosedError):
        return grpc.StatusCode.UNAVAILABLE, "shutting_down"
    return grpc.StatusCode.INTERNAL, "internal"


def _describe_span(adapter, shard_id: str) -> None:
    """What this Generate served, on its span (the gateway's trace continues here)."""
    from shard.lora import AdapterMix

    span = trace.get_current_span()
    if span.is_recording():
        if isinstance(adapter, AdapterMix):
            name, version = "mix", str(adapter)
        else:
            name, version = (adapter.name, adapter.version) if adapter is not None else ("base", "")
        span.set_attributes({"loraplex.adapter": name, "loraplex.version": version, "loraplex.shard": shard_id})


def _ref(key) -> shard_pb2.AdapterRef:
    if key is None:
        return shard_pb2.AdapterRef()
    return shard_pb2.AdapterRef(name=key.name, version=key.version)


def _served(message: shard_pb2.GenerateChunk, selection) -> None:
    """Record on the first chunk what serves the request: an adapter version, the base model, or a mix."""
    from shard.lora import AdapterMix

    if isinstance(selection, AdapterMix):
        message.mix.extend(shard_pb2.MixComponent(adapter=_ref(key), weight=weight) for key, weight in selection.components)
    else:
        message.adapter.CopyFrom(_ref(selection))


def _adapter_info(info, merged=None) -> shard_pb2.AdapterInfo:
    return shard_pb2.AdapterInfo(
        merged=info.adapter == merged,
        adapter=_ref(info.adapter),
        tier=info.tier,
        rank=info.rank,
        target_modules=list(info.target_modules),
        pinned=info.pinned,
        active_requests=info.active_requests,
        size_bytes=info.size_bytes,
        load_ms=info.load_ms,
        sha256=info.weights_sha256,
        last_used_unix_ms=info.last_used_unix_ms,
    )


def _tier_stats(stats) -> shard_pb2.TierStats:
    return shard_pb2.TierStats(
        tier=stats.tier,
        capacity=stats.capacity,
        used=stats.used,
        hits=stats.hits,
        misses=stats.misses,
        evictions=stats.evictions,
        load_ms_p50=stats.load_ms_p50,
        load_ms_p95=stats.load_ms_p95,
        capacity_bytes=stats.capacity_bytes,
        used_bytes=stats.used_bytes,
    )


def sampling_options(params: shard_pb2.SamplingParams) -> SamplingOptions:
    return SamplingOptions(
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p if 0 < params.top_p < 1 else 1.0,
        top_k=params.top_k,
        seed=params.seed if params.HasField("seed") else None,
        stop=tuple(params.stop),
    )


class ShardServicer(shard_pb2_grpc.ShardServicer):
    def __init__(self, settings: ShardSettings, metrics: ShardMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or ShardMetrics(settings.shard_id)
        self.core: ShardCore | None = None  # set once the model is loaded

    async def _core(self, context) -> ShardCore:
        if self.core is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the shard is still loading its model")
        return self.core

    async def _refuse(self, context, error: BaseException):
        status, reason = _failure(error)
        self.metrics.observe_refusal(reason)
        await context.abort(status, str(error))

    async def _lora(self, context) -> LoraManager:
        core = await self._core(context)
        if core.lora is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this shard serves the base model only")
        return core.lora

    def _key(self, ref: shard_pb2.AdapterRef):
        from shard.lora import LOCAL_VERSION, AdapterKey

        if not ref.name:
            return None
        version = ref.version or (LOCAL_VERSION if self.settings.adapter_dirs else "")
        if not version:
            raise InvalidRequestError(f"adapter {ref.name!r}: a version is required")
        if not self.settings.adapter_dirs and not version.isdigit():
            # Caching by alias would keep serving a version after the alias moved.
            raise InvalidRequestError(f"adapter {ref.name!r}: version must be a registry version number, not {version!r}")
        return AdapterKey(ref.name, version)

    def _selection(self, request: shard_pb2.GenerateRequest):
        """What a Generate asks for: an adapter version, an ad-hoc mix, or None (the base model)."""
        from loraplex.adapter_mix import MixComponent, MixError, check_components
        from shard.lora import AdapterMix

        if not request.mix:
            return self._key(request.adapter)
        if request.adapter.name:
            raise InvalidRequestError("give either an adapter or a mix, not both")
        keys = []
        for component in request.mix:
            key = self._key(component.adapter)
            if key is None:
                raise InvalidRequestError("every mix component names an adapter; the base model is not one")
            keys.append(key)
        try:
            check_components(
                [MixComponent(key.name, key.version, c.weight) for key, c in zip(keys, request.mix)],
                self.settings.max_mix_components,
            )
        except MixError as error:
            raise InvalidRequestError(str(error)) from None
        return AdapterMix(tuple((key, component.weight) for key, component in zip(keys, request.mix)))

    async def Generate(self, request: shard_pb2.GenerateRequest, context):
        received = time.monotonic()
        if self.core is None:
            self.metrics.observe_refusal("model_loading")
        core = await self._core(context)
        if request.prompt and request.messages:
            await self._refuse(context, InvalidRequestError("give either prompt or messages, not both"))
        try:
            generation = GenerationRequest(
                request_id=request.request_id or uuid.uuid4().hex,
                prompt=None if request.messages else request.prompt,
                messages=[{"role": m.role, "content": m.content} for m in request.messages] or None,
                adapter=self._selection(request),
                sampling=sampling_options(request.sampling),
                stream_interval=max(1, request.stream_interval),
            )
            _describe_span(generation.adapter, self.settings.shard_id)
            handle = core.engine.submit(generation)
        except (InvalidRequestError, QueueFullError, EngineClosedError) as exc:
            await self._refuse(context, exc)
        first = True
        try:
            async for chunk in handle:
                message = shard_pb2.GenerateChunk(text=chunk.text, token_ids=list(chunk.token_ids))
                if first:
                    _served(message, generation.adapter)
                    self.metrics.observe_first_token(time.monotonic() - received)
                    first = False
                if chunk.finish_reason is not None:
                    message.finish_reason = _FINISH[chunk.finish_reason]
                    message.usage.prompt_tokens = chunk.usage.prompt_tokens
                    message.usage.completion_tokens = chunk.usage.completion_tokens
                yield message
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the adapter could not be loaded, or the forward failed
            log.warning("request %s failed: %s", generation.request_id, exc)
            await self._refuse(context, exc)
        finally:
            # The client went away (or the call ended early): free the row at once.
            handle.cancel()

    async def LoadAdapter(self, request: shard_pb2.LoadAdapterRequest, context):
        lora = await self._lora(context)
        try:
            key = self._key(request.adapter)
            if key is None:
                raise InvalidRequestError("an adapter name is required")
            info = await asyncio.to_thread(lora.load, key, request.pin)
        except Exception as exc:
            await context.abort(_adapter_status(exc), str(exc))
        return shard_pb2.LoadAdapterResponse(adapter=_adapter_info(info))

    async def UnloadAdapter(self, request: shard_pb2.UnloadAdapterRequest, context):
        lora = await self._lora(context)
        try:
            key = self._key(request.adapter)
            if key is None:
                raise InvalidRequestError("an adapter name is required")
            if request.unpin_only:
                await asyncio.to_thread(lora.unpin, key)
                unloaded = False  # still cached; only eviction is allowed again
            else:
                unloaded = await asyncio.to_thread(lora.unload, key)
        except Exception as exc:
            await context.abort(_adapter_status(exc), str(exc))
        return shard_pb2.UnloadAdapterResponse(unloaded=bool(unloaded))

    async def ListAdapters(self, request, context):
        core = await self._core(context)
        if core.lora is None:
            return shard_pb2.ListAdaptersResponse()
        return shard_pb2.ListAdaptersResponse(
            adapters=[_adapter_info(i, core.lora.merged) for i in core.lora.adapters()],
            tiers=[_tier_stats(t) for t in core.lora.tier_stats()],
        )

    async def Stats(self, request, context):
        core = await self._core(context)
        stats = core.engine.stats()
        tiers = core.lora.tier_stats() if core.lora is not None else []
        return shard_pb2.StatsResponse(
            shard_id=self.settings.shard_id,
            base_model=core.base_model,
            base_fingerprint=core.base_fingerprint,
            quantization=self.settings.quantization,
            device=self.settings.device,
            running=stats.running,
            queued=stats.queued,
            queue_capacity=stats.queue_capacity,
            max_batch_size=stats.max_batch_size,
            requests_completed=stats.requests_completed,
            tokens_generated=stats.tokens_generated,
            decode_tokens_per_s=stats.decode_tokens_per_s,
            tiers=[_tier_stats(t) for t in tiers],
            max_context=stats.max_context,
            merged_adapter=_ref(stats.merged_adapter) if stats.merged_adapter is not None else None,
        )

    async def MergeAdapter(self, request: shard_pb2.MergeAdapterRequest, context):
        core = await self._core(context)
        lora = await self._lora(context)
        try:
            key = self._key(request.adapter)
            if key is None:
                raise InvalidRequestError("an adapter name is required")
            replaced = await self._merge(core.engine, lora, key)
        except Exception as exc:
            await context.abort(_adapter_status(exc), str(exc))
        return shard_pb2.MergeAdapterResponse(merged=_ref(key), replaced=_ref(replaced) if replaced else None)

    async def _merge(self, engine: Engine, lora: LoraManager, key):
        """Bring `key` onto a device slot, then have the engine merge it between two steps. The
        slot may be taken by another load in between (every slot busy): then load again."""
        from shard.lora.errors import AdapterNotResidentError

        for attempt in range(_MERGE_ATTEMPTS):
            await asyncio.to_thread(lora.load, key, False, _MERGE_TIMEOUT_S)
            try:
                return await asyncio.wait_for(asyncio.wrap_future(engine.request_merge(key)), _MERGE_TIMEOUT_S)
            except AdapterNotResidentError:
                if attempt == _MERGE_ATTEMPTS - 1:
                    raise

    async def UnmergeAdapter(self, request, context):
        core = await self._core(context)
        await self._lora(context)
        try:
            unmerged = await asyncio.wait_for(asyncio.wrap_future(core.engine.request_unmerge()), _MERGE_TIMEOUT_S)
        except Exception as exc:
            await context.abort(_adapter_status(exc), str(exc))
        return shard_pb2.UnmergeAdapterResponse(unmerged=_ref(unmerged) if unmerged else None)


async def serve(
    settings: ShardSettings,
    *,
    core: ShardCore | None = None,
    stop: asyncio.Event | None = None,
    on_ready=None,
    tracing: TracerProvider | None = None,
) -> None:
    """Run the shard until SIGTERM/SIGINT (or until ``stop`` is set, when given). The port is
    bound before the model loads, so health checks see NOT_SERVING until it is ready; on stop
    health turns NOT_SERVING, running requests drain, then the server stops. RPCs are traced
    (continuing the gateway's trace) when ``tracing`` is given or OTLP export is configured."""
    owns_tracing = tracing is None
    tracing = tracing or tracer_provider("loraplex-shard")
    interceptors = [aio_server_interceptor(tracer_provider=tracing)] if tracing else []
    server = grpc.aio.server(interceptors=interceptors)
    metrics = ShardMetrics(settings.shard_id)
    servicer = ShardServicer(settings, metrics)
    health = HealthServicer()
    shard_pb2_grpc.add_ShardServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if settings.tls_cert_file:
        credentials = server_credentials(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
        port = server.add_secure_port(settings.address, credentials)
    else:
        port = server.add_insecure_port(settings.address)
    if port == 0:
        raise RuntimeError(f"cannot bind {settings.address}")
    for service in ("", SERVICE_NAME):
        await health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    metrics_port = metrics.serve_http(settings.host, settings.metrics_port) if settings.metrics_port else None

    loop = asyncio.get_running_loop()
    handle_signals = stop is None
    stop = stop or asyncio.Event()
    if handle_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    try:
        started = time.monotonic()
        # The model loads in a thread that ends: see shard.intra_op_threads.
        loading = asyncio.ensure_future(
            asyncio.wrap_future(run_in_ending_thread("model-loader", build_core, settings, metrics))
            if core is None
            else _ready(core)
        )
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not loading.done():
            log.info("shard %s stopping before its model finished loading", settings.shard_id)
            servicer.core = await loading  # a loading thread cannot be interrupted
            return
        stopping.cancel()
        servicer.core = loading.result()
        freeze_startup_objects()
        metrics.serving(
            servicer.core.engine,
            servicer.core.lora,
            base_model=servicer.core.base_model,
            quantization=settings.quantization,
            device=settings.device,
        )
        for service in ("", SERVICE_NAME):
            await health.set(service, health_pb2.HealthCheckResponse.SERVING)
        message = f"shard {settings.shard_id} ready on {settings.host}:{port}"
        if metrics_port is not None:
            message += f" (metrics on http://{settings.host}:{metrics_port}/metrics)"
        log.info("%s (model loaded in %.1f s)", message, time.monotonic() - started)
        sys.stdout.write(message + "\n")  # one write, so no log line lands inside it
        sys.stdout.flush()
        if on_ready is not None:
            on_ready(port)
        await stop.wait()

        log.info("shard %s draining (up to %.0f s)", settings.shard_id, settings.drain_timeout())
        servicer.core.engine.close()  # before health flips, so NOT_SERVING implies refusing
        metrics.not_serving()
        await health.enter_graceful_shutdown()
        drained = await asyncio.to_thread(servicer.core.engine.drain, settings.drain_timeout())
        if not drained:
            log.warning("drain timed out; cancelling the requests still running")
    finally:
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        if servicer.core is not None:
            servicer.core.engine.stop(timeout=10)
        await server.stop(grace=2)
        metrics.stop_http()
        if servicer.core is not None and servicer.core.lora is not None:
            servicer.core.lora.close()
        if owns_tracing and tracing is not None:
            tracing.shutdown()  # flushes the spans still batched
        log.info("shard %s stopped", settings.shard_id)


async def _ready(core: ShardCore) -> ShardCore:
    return core
