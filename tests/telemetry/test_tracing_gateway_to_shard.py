"""One trace from the HTTP request through the gateway into the shard's gRPC handler."""

from __future__ import annotations

import asyncio
import threading

from litestar.testing import TestClient
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from gateway.app import create_apps
from gateway.settings import GatewaySettings
from gateway.tenants import sha256_hex
from loraplex.telemetry import exporting_is_configured, tracer_provider
from tests.support.shard_server import running_shard, shard_test_settings
from tests.support.waiting import wait_until

KEY = "trace-tenant-key"


class ShardThread:
    """A real shard on its own event loop, so the gateway's test client can call it."""

    def __init__(self, settings, tracing) -> None:
        self.settings, self.tracing = settings, tracing
        self.ready, self.stop = threading.Event(), threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            async with running_shard(self.settings, tracing=self.tracing):
                self.ready.set()
                while not self.stop.is_set():
                    await asyncio.sleep(0.05)

        try:
            asyncio.run(main())
        except BaseException as error:  # surfaced to the test below
            self.error = error
            self.ready.set()

    def __enter__(self) -> ShardThread:
        self.thread.start()
        assert self.ready.wait(120), "shard did not start"
        if self.error:
            raise self.error
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(60)


def test_no_exporter_unless_an_otlp_endpoint_is_configured():
    assert not exporting_is_configured({})
    assert tracer_provider("svc", environ={}) is None
    provider = tracer_provider("svc", environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert provider is not None and provider.resource.attributes["service.name"] == "svc"
    provider.shutdown()


def test_a_completion_is_one_trace_across_gateway_and_shard(tmp_path, tiny_model_dir, tiny_adapter_dirs):
    gateway_spans, shard_spans = InMemorySpanExporter(), InMemorySpanExporter()
    gateway_tracing = tracer_provider("loraplex-gateway", span_processor=SimpleSpanProcessor(gateway_spans))
    shard_tracing = tracer_provider("loraplex-shard", span_processor=SimpleSpanProcessor(shard_spans))
    adapter = sorted(tiny_adapter_dirs)[0]
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(
        f"admin_key_sha256: {sha256_hex('admin')}\n"
        f"tenants:\n  - name: t\n    key_sha256: [{sha256_hex(KEY)}]\n    adapters: ['*']\n"
    )
    with ShardThread(shard_test_settings(tiny_model_dir, tiny_adapter_dirs), shard_tracing) as shard:
        settings = GatewaySettings.from_mapping(
            {
                "tenants_file": str(tenants),
                "shard_addresses": [shard.settings.address],
                "static_routes": {adapter: {"champion": "local"}},
                "health_interval_s": 0.1,
                "health_timeout_s": 2.0,  # a loaded CI machine must not drop the only shard mid-test
            }
        )
        with TestClient(create_apps(settings, tracing=gateway_tracing).by_port()) as client:
            # On a loaded machine the start-up health check can time out; the next round joins it.
            assert wait_until(lambda: client.get("/readyz").status_code == 200, timeout_s=10.0)
            response = client.post(
                "/v1/completions",
                json={"model": adapter, "prompt": "hello", "max_tokens": 3},
                headers={"Authorization": f"Bearer {KEY}"},
            )
    assert response.status_code == 200, response.text

    server_http = [s for s in gateway_spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    client_grpc = [
        s for s in gateway_spans.get_finished_spans() if s.kind == SpanKind.CLIENT and "Generate" in s.name
    ]
    shard_generate = [s for s in shard_spans.get_finished_spans() if "Generate" in s.name]
    assert server_http and client_grpc and shard_generate, (
        [s.name for s in gateway_spans.get_finished_spans()],
        [s.name for s in shard_spans.get_finished_spans()],
    )
    trace_id = server_http[0].context.trace_id
    # The gRPC call is a child of the HTTP request, and the shard continues the same trace.
    assert client_grpc[0].context.trace_id == trace_id
    assert shard_generate[0].context.trace_id == trace_id
    assert shard_generate[0].parent is not None
    assert shard_generate[0].parent.span_id == client_grpc[0].context.span_id
    assert shard_generate[0].resource.attributes["service.name"] == "loraplex-shard"


def test_the_otlp_receiver_decodes_what_the_otlp_http_exporter_sends():
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    from tests.support.otlp_receiver import OtlpReceiver

    with OtlpReceiver() as receiver:
        for compression in (Compression.NoCompression, Compression.Gzip):
            exporter = OTLPSpanExporter(endpoint=f"{receiver.endpoint}/v1/traces", compression=compression)
            provider = tracer_provider("receiver-test", span_processor=SimpleSpanProcessor(exporter))
            with provider.get_tracer("t").start_as_current_span("outer", kind=SpanKind.SERVER) as outer:
                outer.set_attributes({"loraplex.adapter": "legal", "n": 3})
                with provider.get_tracer("t").start_as_current_span("inner"):
                    pass
            provider.shutdown()
        spans = receiver.spans()
    assert receiver.requests >= 4 and len(spans) == 4
    outer, inner = next(s for s in spans if s.name == "outer"), next(s for s in spans if s.name == "inner")
    assert outer.service == "receiver-test" and outer.kind == "SERVER" and outer.parent_span_id == ""
    assert outer.attributes == {"loraplex.adapter": "legal", "n": 3}
    assert inner.trace_id == outer.trace_id and inner.parent_span_id == outer.span_id and inner.kind == "INTERNAL"
