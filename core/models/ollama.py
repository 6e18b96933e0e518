"""Ollama through its official client (`OLLAMA_HOST`, read as the client reads it).

Ollama speaks its own API (/api/chat, /api/embed, /api/tags); the client translates, and this module
maps its answers to the router's shapes: `prompt_eval_count` and `eval_count` are the tokens in and
out, `done_reason` the finish reason, a JSON schema goes in `format`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import httpx

from core.models.api import ChatAnswer, ChatAsk, ChatDelta, Embeddings, ModelError
from core.models.provider import HostedProvider
from core.optional import require


def _options(ask: ChatAsk) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if ask.max_tokens is not None:
        options["num_predict"] = ask.max_tokens
    if ask.temperature is not None:
        options["temperature"] = ask.temperature
    if ask.stop:
        options["stop"] = ask.stop
    return options


class OllamaProvider(HostedProvider):
    name = "ollama"

    def __init__(self, host: str, *, timeout: float = 300.0):
        ollama = require("ollama", extra="ollama", feature="models from Ollama (OLLAMA_HOST)")
        self.host = host
        self._errors: tuple[type[BaseException], ...] = (ollama.ResponseError, ollama.RequestError, httpx.HTTPError, ConnectionError)
        self._response_error = ollama.ResponseError
        self._client = ollama.AsyncClient(host=host, timeout=timeout)
        self._detail = ""

    async def close(self) -> None:
        await self._client._client.aclose()  # the client has no close of its own; its httpx client does

    async def models(self) -> list[str]:
        try:
            listed = await self._client.list()
            self._detail = ""
            return [str(m.model) for m in listed.models if m.model]
        except self._errors as exc:
            self._detail = f"cannot list models at {self.host}: {exc}"
            return []

    async def chat(self, ask: ChatAsk, model: str) -> ChatAnswer:
        try:
            response = await self._client.chat(model=model, messages=ask.messages, format=ask.json_schema,
                                                options=_options(ask) or None)
        except self._errors as exc:
            raise self._error(exc) from None
        return ChatAnswer(
            model=response.model or model, content=response.message.content or "",
            finish_reason=_finish(response.done_reason),
            tokens_in=response.prompt_eval_count or 0, tokens_out=response.eval_count or 0,
        )

    async def chat_stream(self, ask: ChatAsk, model: str) -> AsyncGenerator[ChatDelta, None]:
        pieces: list[str] = []
        try:
            stream = await self._client.chat(model=model, messages=ask.messages, format=ask.json_schema,
                                              options=_options(ask) or None, stream=True)
            async for part in stream:
                if part.message.content:
                    pieces.append(part.message.content)
                    yield ChatDelta(part.message.content)
                if part.done:
                    yield ChatDelta("", ChatAnswer(
                        model=part.model or model, content="".join(pieces), finish_reason=_finish(part.done_reason),
                        tokens_in=part.prompt_eval_count or 0, tokens_out=part.eval_count or 0,
                    ))
                    return
        except self._errors as exc:
            raise self._error(exc) from None
        raise ModelError("provider", f"ollama at {self.host}: the stream ended without its last part")

    async def embed(self, texts: list[str], model: str) -> Embeddings:
        try:
            response = await self._client.embed(model=model, input=texts)
        except self._errors as exc:
            raise self._error(exc) from None
        return Embeddings(model=response.model or model, vectors=[list(map(float, v)) for v in response.embeddings],
                          tokens_in=response.prompt_eval_count or 0)

    def _error(self, exc: BaseException) -> ModelError:
        if isinstance(exc, self._response_error) and getattr(exc, "status_code", 0) == 404:
            return ModelError("unknown_model", f"ollama at {self.host}: {exc} (`ollama pull` it first)")
        return ModelError("provider", f"ollama at {self.host}: {exc}")


def _finish(done_reason: str | None) -> str:
    return "length" if done_reason == "length" else "stop"
