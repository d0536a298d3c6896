"""Schema-driven fuzzing of the gateway (issue 5: "the OpenAPI schema complete, so that a
schema-driven fuzzer finds no undocumented status").

Schemathesis reads the schema the app itself serves at /schema/openapi.json and sends valid
(positive) and invalid (negative) requests to every operation, in-process over ASGI, against a
gateway in front of two scripted gRPC shards. Each answer must have a documented status, a
documented content type, a body matching the documented schema, no 5xx except the documented
503/504 for shards, and every error must be in OpenAI's shape with `Retry-After` where DESIGN.md
promises it, documented response headers present, and a stream ending in `[DONE]` or an error
event. Keys are drawn per example (tenant, admin, wrong role, unknown, none) so the 401/403
paths are fuzzed too; shard faults are drawn per example so the gRPC-to-HTTP mapping is as well.

The operations are driven through schemathesis's Hypothesis strategies rather than its pytest
loader (`schemathesis.pytest.from_fixture`), which sets `Node._nodeid`, gone in pytest 9.2.
"""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest
import schemathesis
from gateway_fixtures import ACME_KEY, ADMIN_KEY, ROUTES, WILDCARD_KEY, tenants_yaml
from gateway_scripted_shard import ScriptedShardServer
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.config._checks import NEGATIVE_DATA_REJECTION_EXPECTED_STATUSES, NegativeDataRejectionConfig
from schemathesis.core.failures import FailureGroup
from schemathesis.python import asgi as asgi_portal
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.app import create_apps
from gateway.routing_source import StaticRoutingSource
from gateway.settings import GatewaySettings

MAX_EXAMPLES = 60  # per operation and mode; 13 operations keep the whole run well under a minute
ERROR_FIELDS = {"message", "type", "param", "code"}
# 5xx statuses the gateway answers on purpose (shards unavailable / slow), documented as such.
INTENDED_SERVER_STATUSES = {503, 504}
RETRY_AFTER_STATUSES = {429, 503}

# Which key a fuzzed request carries: the right one for the route most of the time, so that
# bodies reach validation and the shards; wrong ones often enough to exercise 401/403.
KEY_CHOICES = st.sampled_from(["right", "right", "right", "right", "other", "unknown", "none"])


@pytest.fixture(scope="module")
def fuzz_shards():
    servers = [ScriptedShardServer(f"fuzz{i}").start() for i in range(2)]
    yield servers
    for server in servers:
        server.close()


@pytest.fixture(scope="module")
def fuzzed_gateway(tmp_path_factory, fuzz_shards):
    tmp = tmp_path_factory.mktemp("openapi-fuzz")
    tenants = tmp / "tenants.yaml"
    tenants.write_text(tenants_yaml())
    try:
        settings_ = GatewaySettings.from_mapping(
            {
                "tenants_file": str(tenants),
                "shard_addresses": [s.address for s in fuzz_shards],
                "health_interval_s": 0.2,
                "health_timeout_s": 0.5,
                "shadow_log_path": str(tmp / "shadow.jsonl"),
                "shadow_sample_share": 0.0,  # shadow copies are not what this fuzzes
                "admin_rate_per_minute": 1_000_000,  # the fuzzer's calls would use up the admin rate
                "max_body_bytes": 4096,
                "max_tokens_limit": 16,
                "max_prompt_chars": 1000,
                "request_timeout_s": 1.0,  # the "slow" shard examples answer 504
                "static_routes": ROUTES,
            }
        )
        yield create_apps(settings_, routing_source=StaticRoutingSource.from_mapping(ROUTES))
    finally:
        # Runs the app's on_shutdown (shard channels, background tasks) and closes schemathesis's
        # event-loop thread now, before the shards stop; left to atexit, grpc's poller would fire
        # on a closed loop. schemathesis 4.32 has no public call that also closes the loop.
        asgi_portal._shutdown()


@pytest.fixture(scope="module")
def gateway_schemas(fuzzed_gateway):
    """The public port's schema, then the admin port's (its app runs on the parts the first one started)."""
    return [_schema_of(fuzzed_gateway.api), _schema_of(fuzzed_gateway.admin)]


def _schema_of(app):
    schema = schemathesis.openapi.from_asgi("/schema/openapi.json", app)
    schema.config.generation.update(
        modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
        max_examples=MAX_EXAMPLES,
        deterministic=True,
        database="none",
    )
    # A body over the size limit is rejected before validation: 413 is a rejection too.
    schema.config.checks.negative_data_rejection = NegativeDataRejectionConfig(
        expected_statuses=[*NEGATIVE_DATA_REJECTION_EXPECTED_STATUSES, "413"]
    )
    return schema


def headers_for(path: str, key_choice: str) -> dict[str, str]:
    admin_route = path.startswith("/admin/")
    key = {
        "right": ADMIN_KEY if admin_route else ACME_KEY,
        "other": WILDCARD_KEY if admin_route else ADMIN_KEY,  # a tenant on admin routes, the admin on tenant routes
        "unknown": "not-a-key",
        "none": None,
    }[key_choice]
    return {"authorization": f"Bearer {key}"} if key else {}


def header(response, name: str) -> str:
    values = response.headers.get(name) or [""]  # schemathesis keeps every value of a header
    return values[0]


def check_openai_error_shape(response) -> None:
    """DESIGN.md: errors are JSON in OpenAI's error shape; 429 and 503 carry Retry-After."""
    status = response.status_code
    if status < 400 or response.request.url.endswith("/readyz"):
        return  # /readyz's 503 is a readiness report, documented with its own body
    assert header(response, "content-type").startswith("application/json"), (status, response.headers)
    body = json.loads(response.content)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict) and set(error) == ERROR_FIELDS, body
    assert isinstance(error["message"], str) and error["message"], body
    assert isinstance(error["type"], str) and error["type"], body
    assert error["param"] is None or isinstance(error["param"], str), body
    assert error["code"] is None or isinstance(error["code"], str), body
    if status in RETRY_AFTER_STATUSES:
        assert header(response, "retry-after").isdigit(), (status, response.headers)


def check_stream_ends_with_done_or_error(response) -> None:
    """DESIGN.md: a stream cut midway ends with an error event, never silently truncated."""
    if response.status_code != 200 or not header(response, "content-type").startswith("text/event-stream"):
        return
    if response.stream_cut_short:
        return  # schemathesis stopped reading at its event limit; the end was not seen
    events = [line[len("data: ") :] for line in response.content.decode().splitlines() if line.startswith("data: ")]
    assert events, response.content
    last = events[-1]
    assert last == "[DONE]" or set(json.loads(last)) == {"error"}, events[-3:]
    assert events.count("[DONE]") == (last == "[DONE]"), events[-3:]


def server_error_unless_intended(ctx, response, case):
    if response.status_code in INTENDED_SERVER_STATUSES:
        return True
    return not_a_server_error(ctx, response, case)


CHECKS = [
    server_error_unless_intended,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


# Raw positive data rarely gets past the limits and unsupported-parameter checks (n, echo, tools,
# max_tokens over the limit) or names a real adapter/shard, so half of the positive examples are
# steered towards requests that reach the shards: streams, chat templates, admin calls that act.
MODELS = ["legal", "legal@1", "legal@2", "clinical", "base", "draft", "shadowed", "sql", "legal@99"]
ADAPTERS = ["legal", "clinical", "shadowed", "draft", "missing"]
UNSUPPORTED = ("n", "echo", "suffix", "presence_penalty", "frequency_penalty", "logprobs", "tools", "stop")


def steer(case, model: str, max_tokens: int, shard_id: str | None, adapter: str, stream: bool):
    if "shard_id" in (case.path_parameters or {}):
        case.path_parameters["shard_id"] = shard_id or "no-such-shard"
    if case.path == "/admin/shadow":
        case.query = {**(case.query or {}), "adapter": adapter}
    body = case.body
    if not isinstance(body, dict):
        return case
    if case.path.startswith("/v1/"):
        for name in UNSUPPORTED:
            body.pop(name, None)
        body.update(model=model, max_tokens=max_tokens, stream=stream)
        body.pop("max_completion_tokens", None)
        if isinstance(body.get("prompt"), list):
            body["prompt"] = "".join(body["prompt"][:1])
        if "messages" in body:
            messages = [m for m in body["messages"] if isinstance(m.get("content"), str)]
            body["messages"] = messages or [{"role": "user", "content": "hello"}]
    elif case.path.startswith("/admin/adapters/"):
        body.update(adapter=adapter, shards=[shard_id] if shard_id else None)
    return case


def cases_for(operation, mode: GenerationMode, shard_ids: list[str]):
    generated = operation.as_strategy(generation_mode=mode)
    if mode is not GenerationMode.POSITIVE:
        return generated
    steered = st.builds(
        steer,
        generated,
        st.sampled_from(MODELS),
        st.integers(1, 16),
        st.sampled_from([*shard_ids, None]),
        st.sampled_from(ADAPTERS),
        st.booleans(),
    )
    return st.one_of(generated, steered)


# How the scripted shards behave for one example: mostly well, sometimes failing in each way a
# real shard can (gateway/errors.py maps these to HTTP statuses; a stream cut becomes an event).
SHARD_FAULTS = ["fail_before_first", "cut_midway", "exhausted", "not_found", "invalid", "precondition", "eof"]
SHARD_MODES = st.sampled_from(["ok"] * 6 + SHARD_FAULTS)
SLOW_TOKEN_S = 0.8  # with 2 tokens, past the gateway's request timeout: the 504 path
GENERATION_BODIES = {
    "/v1/completions": {"model": "legal", "prompt": "hello", "max_tokens": 2},
    "/v1/chat/completions": {"model": "clinical", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2},
}


def request_component(raw_schema: dict, operation) -> dict:
    ref = raw_schema["paths"][operation.path][operation.method.lower()]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    return raw_schema["components"]["schemas"][ref.rsplit("/", 1)[-1]]


def integers_without_maximum(component: dict) -> list[str]:
    names = []
    for name, prop in component["properties"].items():
        types = {prop.get("type")} | {arm.get("type") for arm in prop.get("oneOf", [])}
        if "integer" in types and "maximum" not in prop:
            names.append(name)
    return names


def with_explicit_examples(test, operation, raw_schema: dict):
    """Random generation seldom pairs a request that reaches a shard with a failing shard, or
    draws integers past what the shard contract can carry, so both are tried on purpose: every
    shard fault (and a too-slow shard) on a valid request, streamed and not, and each integer
    the schema leaves unbounded at the largest value JSON decoding accepts (int64)."""
    body = GENERATION_BODIES.get(operation.path)
    if body is None:
        return test
    for shard_mode in ["ok", "slow", *SHARD_FAULTS]:
        for stream in (False, True):
            case = operation.Case(body={**body, "stream": stream})
            test = example(case=case, key_choice="right", shard_mode=shard_mode)(test)
    for name in integers_without_maximum(request_component(raw_schema, operation)):
        case = operation.Case(body={**body, name: 2**63 - 1})
        test = example(case=case, key_choice="right", shard_mode="ok")(test)
    return test


def wait_for_healthy_shards(parts, count: int, timeout_s: float = 2.0) -> None:
    """A shard that failed a call leaves the ring until its next health check; waiting for it lets
    the next example reach a shard rather than always meeting the 503 of an empty ring."""
    deadline = time.monotonic() + timeout_s
    while len(parts.pool.healthy_shards()) < count and time.monotonic() < deadline:
        time.sleep(0.02)


def fuzz_operation(operation, mode: GenerationMode, shards: list, parts, statuses: Counter) -> None:
    raw_schema = operation.schema.raw_schema
    shard_ids = [server.shard_id for server in shards]

    @given(case=cases_for(operation, mode, shard_ids), key_choice=KEY_CHOICES, shard_mode=SHARD_MODES)
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
    )
    def one_request(case, key_choice, shard_mode):
        for server in shards:
            server.servicer.mode = shard_mode
            server.servicer.slow_s = SLOW_TOKEN_S
        try:
            checks = CHECKS + [negative_data_rejection] if mode is GenerationMode.NEGATIVE else CHECKS
            response = case.call_and_validate(headers=headers_for(case.path, key_choice), checks=checks)
        finally:
            for server in shards:
                server.servicer.mode = "ok"
            wait_for_healthy_shards(parts, len(shards))
        statuses[response.status_code] += 1
        check_openai_error_shape(response)
        check_stream_ends_with_done_or_error(response)

    if mode is GenerationMode.POSITIVE:
        one_request = with_explicit_examples(one_request, operation, raw_schema)
    one_request()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_every_answer_is_documented_and_openai_shaped(gateway_schemas, fuzzed_gateway, fuzz_shards, mode):
    failures, seen = [], {}
    operations = [(port, result.ok()) for port, schema in zip(("api", "admin"), gateway_schemas) for result in schema.get_all_operations()]
    assert len(operations) >= 15, [op.label for _, op in operations]
    for port, operation in operations:
        label = f"{port} {operation.label}"
        statuses: Counter = Counter()
        try:
            fuzz_operation(operation, mode, fuzz_shards, fuzzed_gateway.parts, statuses)
        except Unsatisfiable:
            # Nothing in this operation can be made invalid (no body, no constrained parameter).
            assert mode is GenerationMode.NEGATIVE and not statuses, label
        except (Exception, FailureGroup) as exc:  # collected so one run reports every operation that fails
            failures.append(f"{label}: {exc}")
        seen[label] = dict(sorted(statuses.items()))
    print(json.dumps(seen, indent=1))
    assert not failures, "\n\n".join(failures)
    if mode is GenerationMode.POSITIVE:
        # The fuzzer reached past authentication and validation on every operation, and the
        # shard faults reached the client as their documented statuses.
        assert all(any(200 <= s < 300 for s in counts) for counts in seen.values()), seen
        generation = Counter()
        for label in ("api POST /v1/completions", "api POST /v1/chat/completions"):
            generation.update(seen[label])
        assert {200, 400, 401, 404, 503, 504} <= set(generation), generation
