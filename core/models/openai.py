"""Any OpenAI-compatible API over httpx: a hosted one (`MCPFLEET_MODEL_URL`) or the local llama-server.

`base_url` ends where the API's paths begin (`https://api.example.com/v1`, `http://127.0.0.1:PORT/v1`):
`/chat/completions`, `/embeddings` and `/models` are appended. Streams are server-sent events,
`data: {chunk}` lines ending with `data: [DONE]`; the usage comes in the last chunk when asked for
with `stream_options.include_usage`, which both llama-server and the hosted APIs honour.

The key is sent as a bearer token and appears in no error, log line or `detail`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

import httpx

from core.models.api import ChatAnswer, ChatAsk, ChatDelta, Embeddings, ModelError
from core.models.provider import HostedProvider

# Generation on two CPU threads is slow; a long answer may take minutes. The connect timeout stays short
# so a provider that is down fails fast.
TIMEOUT = httpx.Timeout(300.0, connect=5.0)


def request_body(ask: ChatAsk, model: str) -> dict[str, Any]:
    """The chat-completions body for `ask`: only what it sets, so the provider's defaults hold otherwise."""
    body: dict[str, Any] = {"model": model, "messages": ask.messages}
    if ask.max_tokens is not None:
        body["max_tokens"] = ask.max_tokens
    if ask.temperature is not None:
        body["temperature"] = ask.temperature
    if ask.stop:
        body["stop"] = ask.stop
    if ask.json_schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ask.json_schema, "strict": True}}
    return body


class OpenAIProvider(HostedProvider):
    def __init__(self, base_url: str, key: str | None = None, *, name: str = "openai", timeout: httpx.Timeout = TIMEOUT):
        self.name = name
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout)
        self._detail = ""

    async def close(self) -> None:
        await self._client.aclose()

    async def models(self) -> list[str]:
        try:
            response = await self._client.get("/models")
            response.raise_for_status()
            self._detail = ""
            return [str(m["id"]) for m in response.json().get("data", [])]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            self._detail = f"cannot list models at {self.base_url}: {_describe(exc)}"
            return []

    async def chat(self, ask: ChatAsk, model: str) -> ChatAnswer:
        data = await self._post("/chat/completions", request_body(ask, model))
        try:
            choice = data["choices"][0]
            usage = data.get("usage") or {}
            return ChatAnswer(
                model=str(data.get("model") or model),
                content=choice["message"].get("content") or "",
                finish_reason=choice.get("finish_reason") or "stop",
                tokens_in=int(usage.get("prompt_tokens") or 0),
                tokens_out=int(usage.get("completion_tokens") or 0),
            )
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise ModelError("provider", f"{self.name}: an answer not in the chat-completions shape ({exc!r})") from None

    async def chat_stream(self, ask: ChatAsk, model: str) -> AsyncGenerator[ChatDelta, None]:
        body = {**request_body(ask, model), "stream": True, "stream_options": {"include_usage": True}}
        pieces: list[str] = []
        usage: dict[str, Any] = {}
        finish, answered_model, chunks = "stop", model, 0
        try:
            async with self._client.stream("POST", "/chat/completions", json=body) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise _status_error(self.name, response)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, comments, `event:` lines
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        break
                    chunk = json.loads(payload)
                    answered_model = chunk.get("model") or answered_model
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        finish = choice.get("finish_reason") or finish
                        content = (choice.get("delta") or {}).get("content")
                        if content:
                            chunks += 1
                            pieces.append(content)
                            yield ChatDelta(content)
        except httpx.HTTPError as exc:
            raise ModelError("provider", f"{self.name} at {self.base_url}: {_describe(exc)}") from None
        except (ValueError, AttributeError, TypeError) as exc:
            raise ModelError("provider", f"{self.name}: a stream not in the chat-completions shape ({exc!r})") from None
        yield ChatDelta("", ChatAnswer(
            model=str(answered_model), content="".join(pieces), finish_reason=finish,
            tokens_in=int(usage.get("prompt_tokens") or 0),
            # Without usage in the stream, each content chunk is one token, as OpenAI's and llama-server's streams send them.
            tokens_out=int(usage.get("completion_tokens") or chunks),
        ))

    async def embed(self, texts: list[str], model: str) -> Embeddings:
        data = await self._post("/embeddings", {"model": model, "input": texts})
        try:
            rows = sorted(data["data"], key=lambda row: row.get("index", 0))
            return Embeddings(
                model=str(data.get("model") or model),
                vectors=[[float(x) for x in row["embedding"]] for row in rows],
                tokens_in=int((data.get("usage") or {}).get("prompt_tokens") or 0),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ModelError("provider", f"{self.name}: embeddings not in the OpenAI shape ({exc!r})") from None

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = await self._client.post(path, json=body)
        except httpx.HTTPError as exc:
            raise ModelError("provider", f"{self.name} at {self.base_url}: {_describe(exc)}") from None
        if response.status_code >= 400:
            raise _status_error(self.name, response)
        try:
            data = response.json()
        except ValueError:
            raise ModelError("provider", f"{self.name}: an answer that is not JSON") from None
        if not isinstance(data, dict):
            raise ModelError("provider", f"{self.name}: an answer that is not a JSON object")
        return data


def _status_error(name: str, response: httpx.Response) -> ModelError:
    """The provider's own message where it gives one (OpenAI's `{"error": {"message": ...}}`)."""
    try:
        error = response.json().get("error")
        message = error.get("message") if isinstance(error, dict) else str(error)
    except (ValueError, AttributeError):
        message = response.text[:200]
    reason = "unknown_model" if response.status_code == 404 else "invalid" if response.status_code == 400 else "provider"
    return ModelError(reason, f"{name} answered HTTP {response.status_code}: {message}")


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
