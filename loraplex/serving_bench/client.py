"""One streamed completion against an OpenAI-compatible endpoint, timed from the client's side."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class RequestOutcome:
    adapter: str
    started_s: float  # seconds after the benchmark's start
    status: int  # HTTP status; 0 = no answer (connection error, timeout)
    error: str = ""
    ttft_s: float | None = None  # time to the first chunk with text
    e2e_s: float | None = None  # time to the end of the stream
    chunk_gaps_s: list[float] = field(default_factory=list)  # between text chunks after the first
    output_tokens: int = 0
    prompt_tokens: int = 0
    served_version: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error


async def stream_completion(
    client: httpx.AsyncClient, adapter: str, prompt: str, max_tokens: int, started_s: float, t0: float
) -> RequestOutcome:
    """POST /v1/completions with ``stream: true``; usage comes from the final chunk
    (``stream_options.include_usage``), so output tokens are the server's count."""
    outcome = RequestOutcome(adapter, started_s, 0)
    body = {
        "model": adapter,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    begin = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            outcome.status = response.status_code
            outcome.served_version = response.headers.get("x-loraplex-version", "")
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                outcome.error = _error_message(text) or f"HTTP {response.status_code}"
                return outcome
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    outcome.error = chunk["error"].get("message", "error event in the stream")
                    break
                if chunk.get("usage"):
                    outcome.output_tokens = chunk["usage"].get("completion_tokens", 0)
                    outcome.prompt_tokens = chunk["usage"].get("prompt_tokens", 0)
                if any(choice.get("text") for choice in chunk.get("choices") or []):
                    now = time.perf_counter()
                    if last is None:
                        outcome.ttft_s = now - begin
                    else:
                        outcome.chunk_gaps_s.append(now - last)
                    last = now
    except httpx.HTTPError as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    outcome.e2e_s = time.perf_counter() - begin
    return outcome


def _error_message(text: str) -> str:
    try:
        return json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return text[:200]
