"""OpenTelemetry tracing shared by the gateway and the shards.

Spans are exported over OTLP/HTTP when the standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) variable is set — compose/ points it at the collector —
and not at all otherwise, so a laptop run pays nothing for tracing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def exporting_is_configured(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return any(env.get(name) for name in ENDPOINT_VARIABLES)


def tracer_provider(
    default_service_name: str,
    *,
    span_processor: SpanProcessor | None = None,
    environ: Mapping[str, str] | None = None,
) -> TracerProvider | None:
    """A provider exporting to the OTLP endpoint (or to `span_processor`), or None when neither."""
    env = os.environ if environ is None else environ
    if span_processor is None:
        if not exporting_is_configured(env):
            return None
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        span_processor = BatchSpanProcessor(OTLPSpanExporter())
    service_name = env.get("OTEL_SERVICE_NAME") or default_service_name
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(span_processor)
    return provider
