"""Tracing over real processes: the stack exports its spans over OTLP/HTTP (the standard
OTEL_EXPORTER_OTLP_ENDPOINT) to a receiver on loopback (tests/support/otlp_receiver.py, started
by the fault_stack fixture), and one request is one trace from the gateway's HTTP span through
its gRPC call into the shard, with the adapter, version, tenant and shard as attributes."""

from __future__ import annotations

import uuid
from tests.support.waiting import wait_until


ADAPTER = "legal"


def test_one_request_is_one_trace_from_gateway_to_shard_with_its_attributes(fault_stack):
    fs = fault_stack
    request_id = f"trace-{uuid.uuid4().hex}"
    with fs.http() as client:
        reply = client.post(
            "/v1/completions",
            json={"model": ADAPTER, "prompt": fs.running.demo_prompt, "max_tokens": 3},
            headers={**fs.tenant_headers(), "x-request-id": request_id},
        )
    assert reply.status_code == 200, reply.text
    version, shard = reply.headers["x-loraplex-version"], reply.headers["x-loraplex-shard"]

    def request_span():
        found = [s for s in fs.traces.spans() if s.attributes.get("loraplex.request_id") == request_id]
        return found[0] if found else None

    http_span = wait_until(request_span, 15, 0.2)
    assert http_span, "the gateway's span for the request never reached the OTLP receiver"
    assert http_span.service == "loraplex-gateway" and http_span.kind == "SERVER"
    assert {k: http_span.attributes.get(k) for k in ("loraplex.tenant", "loraplex.adapter", "loraplex.version", "loraplex.shard", "loraplex.assignment")} == {
        "loraplex.tenant": "acme", "loraplex.adapter": ADAPTER, "loraplex.version": version,
        "loraplex.shard": shard, "loraplex.assignment": "champion",
    }

    def shard_generate():
        """The trace once the shard's Generate span and its parent have both arrived."""
        trace = [s for s in fs.traces.spans() if s.trace_id == http_span.trace_id]
        found = [s for s in trace if s.service == "loraplex-shard" and s.kind == "SERVER" and s.name.endswith("/Generate")]
        parents = {s.span_id for s in trace}
        return (trace, found[0]) if found and found[0].parent_span_id in parents else None

    found = wait_until(shard_generate, 15, 0.2)
    assert found, "\n".join(
        f"{s.service} {s.kind} {s.name} trace={s.trace_id} span={s.span_id} parent={s.parent_span_id}"
        for s in fs.traces.spans()
        if s.trace_id == http_span.trace_id or "Generate" in s.name
    )
    trace, generate = found
    by_id = {s.span_id: s for s in trace}
    # The shard's span is a child of the gateway's gRPC client span, itself under the HTTP span.
    client_span = by_id[generate.parent_span_id]
    assert client_span.service == "loraplex-gateway" and client_span.kind == "CLIENT" and client_span.name.endswith("/Generate")
    ancestor = client_span
    while ancestor.parent_span_id and ancestor.span_id != http_span.span_id:
        ancestor = by_id[ancestor.parent_span_id]
    assert ancestor.span_id == http_span.span_id
    assert generate.attributes["loraplex.adapter"] == ADAPTER
    assert generate.attributes["loraplex.version"] == version
    assert generate.attributes["loraplex.shard"] == shard
