"""The official openai client, unchanged, against `python -m gateway` served by uvicorn on 127.0.0.1."""

from __future__ import annotations

import openai
import pytest
from gateway_fixtures import ACME_KEY
from gateway_scripted_shard import expected_words

def test_openai_client_unchanged(gateway_process):
    client = openai.OpenAI(base_url=gateway_process.api + "/v1", api_key=ACME_KEY, max_retries=0)
    completion = client.completions.create(model="legal", prompt="hello", max_tokens=3)
    assert completion.choices[0].text == "".join(expected_words("legal", "1", 3))
    assert completion.usage.completion_tokens == 3

    raw = client.completions.with_raw_response.create(model="clinical", prompt="x", max_tokens=2)
    assert raw.headers["x-loraplex-adapter"] == "clinical" and raw.headers["x-loraplex-route"] == "champion"

    streamed = client.completions.create(model="legal", prompt="hello", max_tokens=3, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == completion.choices[0].text

    chat = client.chat.completions.create(model="legal", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert chat.choices[0].message.content == "".join(expected_words("legal", "1", 2))
    stream = client.chat.completions.create(
        model="legal", messages=[{"role": "user", "content": "hi"}], max_tokens=2, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 2

    assert {m.id for m in client.models.list()} >= {"legal", "clinical", "base"}

    with pytest.raises(openai.PermissionDeniedError):
        client.completions.create(model="sql", prompt="x")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gateway_process.api + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="legal", prompt="x", temperature=5)
