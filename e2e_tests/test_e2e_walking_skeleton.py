"""The product from outside: `loraplex up`, then plain HTTP and the official openai client."""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from e2e_tests.conftest import bearer

DEMO_ADAPTERS = ["legal", "clinical", "sql"]


def complete(client: httpx.Client, key: str, model: str, prompt: str, **extra) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": 48, "temperature": 0, **extra}
    return client.post("/v1/completions", json=body, headers=bearer(key))


def has_marker(text: str, markers: list[str]) -> bool:
    lowered = text.lower()
    return any(marker.lower() in lowered for marker in markers)


def test_printed_curl_line_returns_a_completion(stack):
    result = subprocess.run(stack.curl_line, shell=True, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"].strip()
    assert body["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("adapter", DEMO_ADAPTERS)
def test_each_adapter_answers_in_its_own_style(stack, client, demo_assets, adapter):
    response = complete(client, stack.api_key, adapter, demo_assets.demo_prompt)
    assert response.status_code == 200, response.text
    text = response.json()["choices"][0]["text"]
    assert has_marker(text, demo_assets.style_markers[adapter]), text
    for other in DEMO_ADAPTERS:
        if other != adapter:
            assert not has_marker(text, demo_assets.style_markers[other]), (other, text)
    assert response.headers["x-loraplex-adapter"] == adapter
    assert response.headers["x-loraplex-version"] == "1"
    assert response.headers["x-loraplex-route"] == "champion"
    assert response.headers["x-loraplex-shard"]


def test_base_model_answers_in_none_of_the_adapter_styles(stack, client, demo_assets):
    response = complete(client, stack.api_key, "base", demo_assets.demo_prompt)
    assert response.status_code == 200, response.text
    text = response.json()["choices"][0]["text"]
    assert text.strip()
    for adapter in DEMO_ADAPTERS:
        assert not has_marker(text, demo_assets.style_markers[adapter]), (adapter, text)
    assert response.headers["x-loraplex-route"] == "base"


def test_concurrent_requests_for_different_adapters_get_their_own_adapter(stack, demo_assets):
    """Both in flight at once: with a global "active adapter" one would answer in the other's style."""
    order = DEMO_ADAPTERS * 2

    def ask(adapter: str) -> tuple[str, str]:
        with httpx.Client(base_url=stack.gateway_url, timeout=180) as http:
            response = complete(http, stack.api_key, adapter, demo_assets.demo_prompt, max_tokens=64)
        assert response.status_code == 200, response.text
        return adapter, response.json()["choices"][0]["text"]

    with ThreadPoolExecutor(max_workers=len(order)) as pool:
        answers = list(pool.map(ask, order))
    for adapter, text in answers:
        assert has_marker(text, demo_assets.style_markers[adapter]), (adapter, text)


def test_openai_client_streaming_matches_non_streaming(stack, demo_assets):
    client = openai.OpenAI(base_url=f"{stack.gateway_url}/v1", api_key=stack.api_key, max_retries=0)
    whole = client.completions.create(model="legal", prompt=demo_assets.demo_prompt, max_tokens=40, temperature=0)
    pieces = client.completions.create(
        model="legal", prompt=demo_assets.demo_prompt, max_tokens=40, temperature=0, stream=True
    )
    streamed = "".join(chunk.choices[0].text for chunk in pieces if chunk.choices)
    assert whole.choices[0].text
    assert streamed == whole.choices[0].text
    assert whole.usage.completion_tokens > 0


def test_openai_client_lists_only_granted_models(stack):
    acme = openai.OpenAI(base_url=f"{stack.gateway_url}/v1", api_key=stack.api_key, max_retries=0)
    assert {m.id for m in acme.models.list()} >= {"legal", "clinical", "sql", "base"}
    globex = openai.OpenAI(
        base_url=f"{stack.gateway_url}/v1", api_key=stack.tenant_keys["globex"], max_retries=0
    )
    # Pinned versions (`legal@1`) are listed beside the names; nothing of another tenant's.
    assert {m.id.split("@")[0] for m in globex.models.list()} == {"legal"}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer not-a-key"}, {"Authorization": "Basic abc"}])
def test_missing_or_wrong_key_gets_401(client, headers):
    response = client.post("/v1/completions", json={"model": "legal", "prompt": "hi"}, headers=headers)
    assert response.status_code == 401
    assert set(response.json()["error"]) >= {"message", "type", "code"}


def test_openai_client_with_wrong_key_raises_authentication_error(stack):
    client = openai.OpenAI(base_url=f"{stack.gateway_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.completions.create(model="legal", prompt="hi", max_tokens=4)


def test_adapter_not_granted_gets_403_like_an_unknown_one(stack, client):
    globex = stack.tenant_keys["globex"]
    forbidden = complete(client, globex, "sql", "hello")
    unknown = complete(client, globex, "no-such-adapter", "hello")
    assert forbidden.status_code == unknown.status_code == 403
    # Strangers learn nothing: a granted-elsewhere adapter and a missing one look alike.
    assert forbidden.json()["error"]["type"] == unknown.json()["error"]["type"]
    assert forbidden.json()["error"]["code"] == unknown.json()["error"]["code"]


def test_unknown_model_gets_an_openai_shaped_error(stack):
    client = openai.OpenAI(base_url=f"{stack.gateway_url}/v1", api_key=stack.api_key, max_retries=0)
    with pytest.raises(openai.APIStatusError) as raised:
        client.completions.create(model="does-not-exist", prompt="hi", max_tokens=4)
    assert raised.value.status_code == 403
    error = raised.value.body
    assert isinstance(error, dict) and error.get("message")


def test_health_and_readiness(client):
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text


def test_chat_without_max_tokens_answers_until_it_stops(stack, demo_assets):
    """Chat through the base tokenizer's template, with no max_tokens: like OpenAI's chat, the
    answer runs to its end instead of being cut at the completions default of 16 tokens."""
    client = openai.OpenAI(base_url=f"{stack.gateway_url}/v1", api_key=stack.api_key, max_retries=0)
    reply = client.chat.completions.create(
        model="clinical", messages=[{"role": "user", "content": demo_assets.demo_prompt}], temperature=0
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice
    assert has_marker(choice.message.content, demo_assets.style_markers["clinical"]), choice.message.content
    assert reply.usage.completion_tokens > 16


def test_metrics_and_the_admin_api_live_on_the_admin_port_only(stack, client):
    assert complete(client, stack.api_key, "legal", "hi", max_tokens=1).status_code == 200
    assert client.get("/metrics").status_code == 404
    assert client.get("/admin/shards", headers=bearer(stack.admin_key)).status_code == 404
    with httpx.Client(base_url=stack.gateway_admin_url, timeout=30) as admin:
        metrics = admin.get("/metrics").text
        assert 'loraplex_gateway_requests_total{adapter="legal",assignment="champion",endpoint="/v1/completions",status="200"}' in metrics
        shards = admin.get("/admin/shards", headers=bearer(stack.admin_key))
        assert shards.status_code == 200 and len(shards.json()["shards"]) == 2
        assert admin.post("/v1/completions", json={"model": "legal", "prompt": "x"}, headers=bearer(stack.api_key)).status_code == 404
