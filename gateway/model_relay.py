"""Models for tools: the gateway's answers to the model endpoint in each sandbox (the `ModelGate`).

A server whose manifest declares `"inference": true` asks its sandbox's loopback endpoint in the
Ollama or OpenAI API (`sandbox.supervisor.models`); the request arrives here whole over the
channel (`sandbox.model_asks`). Only a server this sandbox runs for its user with inference
declared is answered; the ask goes to the router as that user, tenant and server
(`Asker(purpose="tool")`), which counts its tokens, audits it and refuses it over quota. Every
translation between the APIs and the router's shapes is here (`model_shapes`), not in the
sandbox: the supervisor stays a small relay, and the translation can change with the gateway.
Errors come back in the asked API's own shape, with its status (503 not ready, 429 over quota,
404 unknown model, 400 invalid, 502 provider).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from core.models.api import Asker, ChatDelta, ModelError, Models
from gateway import model_shapes as shapes
from sandbox.model_asks import ModelAnswer
from sandbox.tunnels import Sandbox

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"


class SandboxModels:
    def __init__(self, models: Models):
        self.models = models

    async def answer(self, sandbox: Sandbox, server: str, method: str, path: str, body: str) -> ModelAnswer:
        openai = path.startswith("/v1/")
        try:
            asker = self._asker(sandbox, server)
            route = ROUTES.get(path)
            if route is None:
                raise _HttpError(404, "not_found", f"no such endpoint: {path}")
            want, handler = route
            if method != want:
                raise _HttpError(405, "invalid", f"{path} takes {want}")
            return await handler(self, asker, shapes.parse_body(body) if want == "POST" else {})
        except ModelError as exc:
            return _error(exc, shapes.status_of(exc), openai)
        except _HttpError as exc:
            return _error(ModelError(exc.reason, str(exc)), exc.status, openai)

    def _asker(self, sandbox: Sandbox, server: str) -> Asker:
        spec = next((s for s in sandbox.servers or () if s.name == server), None)
        if sandbox.user_id is None or spec is None or not spec.inference:
            raise _HttpError(403, "forbidden", f"server {server!r} does not declare inference in its manifest")
        return Asker(sandbox.user_id, sandbox.tenant or "", "tool", server=server)

    async def _label(self, model: str | None) -> str:
        """The model's name for the pieces of a stream (only its end says which model answered):
        the one asked for, else the router's default."""
        if model:
            return model
        return next((m.name for m in await self.models.list_models() if m.default), "default")

    # -- Ollama -------------------------------------------------------------------------------

    async def _ollama_chat(self, asker: Asker, body: dict[str, Any], generate: bool = False) -> ModelAnswer:
        ask = shapes.ollama_ask(body, generate=generate)
        started = time.monotonic_ns()
        if body.get("stream") is False:
            answer = await self.models.chat(asker, ask)
            done = shapes.ollama_done(answer, time.monotonic_ns() - started, generate=generate, content=answer.content)
            return _json(done)
        deltas = await _first_delta(self.models.chat_stream(asker, ask))
        label = await self._label(ask.model)

        async def lines() -> AsyncIterator[str]:
            try:
                async for delta in deltas:
                    if delta.answer is not None:
                        yield _line(shapes.ollama_done(delta.answer, time.monotonic_ns() - started, generate=generate))
                    elif delta.content:
                        yield _line(shapes.ollama_piece(label, delta.content, generate=generate))
            except ModelError as exc:  # after the status went out: Ollama says it in a line of its own
                yield _line(shapes.ollama_error(exc))

        return ModelAnswer(200, NDJSON, pieces=lines())

    async def _ollama_generate(self, asker: Asker, body: dict[str, Any]) -> ModelAnswer:
        return await self._ollama_chat(asker, body, generate=True)

    async def _ollama_embed(self, asker: Asker, body: dict[str, Any]) -> ModelAnswer:
        started = time.monotonic_ns()
        result = await self.models.embed(asker, shapes.ollama_embed_input(body), shapes.model_name(body))
        return _json(shapes.ollama_embed(result, time.monotonic_ns() - started))

    async def _ollama_embeddings(self, asker: Asker, body: dict[str, Any]) -> ModelAnswer:
        """The older, single-text endpoint some clients still call."""
        result = await self.models.embed(asker, shapes.ollama_embed_input(body, legacy=True), shapes.model_name(body))
        return _json({"embedding": result.vectors[0] if result.vectors else []})

    async def _ollama_tags(self, asker: Asker, body: dict[str, Any]) -> ModelAnswer:
        return _json(shapes.ollama_tags(await self.models.list_models()))

    async def _ollama_version(self, asker: Asker, body: dict[str, Any]) -> ModelAnswer:
        return _json({"version": shapes.OLLAMA_VERSION})

    # -- OpenAI -------------------------------------------------------------------------------

    async def _openai_chat(self, asker: Asker, body: dict[str, Any]) -> ModelAnswer:
        ask = shapes.openai_ask(body)
        ident = shapes.completion_id()
        if not body.get("stream"):
            return _json(shapes.openai_completion(await self.models.chat(asker, ask), ident))
        deltas = await _first_delta(self.models.chat_stream(asker, ask))
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        label = await self._label(ask.model)

        async def events() -> AsyncIterator[str]:
            role: dict[str, str] = {"role": "assistant"}  # in the first chunk only, as OpenAI sends it
            try:
                async for delta in deltas:
                    if delta.answer is not None:
                        yield shapes.sse(shapes.openai_chunk(ident, delta.answer.model, {}, delta.answer.finish_reason))
                        if usage:
                            yield shapes.sse(shapes.openai_usage_chunk(ident, delta.answer))
                    elif delta.content:
                        yield shapes.sse(shapes.openai_chunk(ident, label, {**role, "content": delta.content}))
                        role = {}
            except ModelError as exc:  # after the status went out: an error event, as OpenAI sends one
                yield shapes.sse(shapes.openai_error(exc))
            yield shapes.sse("[DONE]")

        return ModelAnswer(200, SSE, pieces=events())

    async def _openai_embeddings(self, asker: Asker, body: dict[str, Any]) -> ModelAnswer:
        texts, as_base64 = shapes.openai_embed_input(body)
        result = await self.models.embed(asker, texts, shapes.model_name(body))
        return _json(shapes.openai_embeddings(result, as_base64))

    async def _openai_models(self, asker: Asker, body: dict[str, Any]) -> ModelAnswer:
        return _json(shapes.openai_models(await self.models.list_models()))


Handler = Callable[[SandboxModels, Asker, dict[str, Any]], Any]

ROUTES: dict[str, tuple[str, Handler]] = {
    "/api/chat": ("POST", SandboxModels._ollama_chat),
    "/api/generate": ("POST", SandboxModels._ollama_generate),
    "/api/embed": ("POST", SandboxModels._ollama_embed),
    "/api/embeddings": ("POST", SandboxModels._ollama_embeddings),
    "/api/tags": ("GET", SandboxModels._ollama_tags),
    "/api/version": ("GET", SandboxModels._ollama_version),
    "/v1/chat/completions": ("POST", SandboxModels._openai_chat),
    "/v1/embeddings": ("POST", SandboxModels._openai_embeddings),
    "/v1/models": ("GET", SandboxModels._openai_models),
}


class _HttpError(Exception):
    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason = status, reason


async def _first_delta(stream: AsyncIterator[ChatDelta]) -> AsyncIterator[ChatDelta]:
    """The stream, its first delta already asked for: an ask refused at once (over quota, not
    ready) is refused with its status rather than as a 200 whose body says so."""
    iterator = stream.__aiter__()
    try:
        first = await iterator.__anext__()
    except StopAsyncIteration:
        first = None

    async def rest() -> AsyncIterator[ChatDelta]:
        if first is None:
            return
        yield first
        async for delta in iterator:
            yield delta

    return rest()


def _json(document: dict[str, Any], status: int = 200) -> ModelAnswer:
    return ModelAnswer(status, "application/json", body=json.dumps(document))


def _line(document: dict[str, Any]) -> str:
    return json.dumps(document) + "\n"


def _error(error: ModelError, status: int, openai: bool) -> ModelAnswer:
    return _json(shapes.openai_error(error) if openai else shapes.ollama_error(error), status)
