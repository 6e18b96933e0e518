"""Stands in for an Ollama server (none runs here): Ollama's HTTP API as its official client speaks it.

/api/tags, /api/chat (one JSON answer, or NDJSON lines when streaming) and /api/embed, with the fields
Ollama sends (`message`, `done`, `done_reason`, `prompt_eval_count`, `eval_count`, `embeddings`). The
answers are canned (words of the last message, echoed); every request body is kept in `requests` so a
test can check what the provider sent (the model, `format`, `options`). A model not in `MODELS` gets
Ollama's 404 `{"error": "model ... not found"}`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.conftest import free_port

MODELS = ["llama3.2:1b", "nomic-embed-text:latest"]
DIMS = 8


class OllamaStandIn:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.app = Starlette(routes=[
            Route("/api/tags", self.tags), Route("/api/chat", self.chat, methods=["POST"]),
            Route("/api/embed", self.embed, methods=["POST"]),
        ])

    async def tags(self, request: Request) -> Response:
        return JSONResponse({"models": [{"name": m, "model": m, "modified_at": "2026-01-01T00:00:00Z", "size": 1,
                                         "digest": "0" * 64, "details": {"format": "gguf"}} for m in MODELS]})

    async def _body(self, request: Request) -> dict[str, Any] | Response:
        body = await request.json()
        self.requests.append({"path": request.url.path, **body})
        if body.get("model") not in MODELS:
            return JSONResponse({"error": f"model '{body.get('model')}' not found"}, status_code=404)
        return body

    async def chat(self, request: Request) -> Response:
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        words = str(body["messages"][-1]["content"]).split() or ["-"]
        limit = (body.get("options") or {}).get("num_predict") or len(words)
        pieces = [w + " " for w in words[:limit]]
        reason = "length" if limit < len(words) else "stop"
        base = {"model": body["model"], "created_at": "2026-01-01T00:00:00Z"}
        last = {**base, "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": reason,
                "prompt_eval_count": sum(len(str(m["content"]).split()) for m in body["messages"]), "eval_count": len(pieces)}
        if not body.get("stream", True):
            return JSONResponse({**last, "message": {"role": "assistant", "content": "".join(pieces)}})

        async def lines() -> AsyncIterator[bytes]:
            for piece in pieces:
                yield (json.dumps({**base, "message": {"role": "assistant", "content": piece}, "done": False}) + "\n").encode()
            yield (json.dumps(last) + "\n").encode()

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def embed(self, request: Request) -> Response:
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        vectors = [[float((len(t) + i) % 5) for i in range(DIMS)] for t in texts]
        return JSONResponse({"model": body["model"], "embeddings": vectors,
                             "prompt_eval_count": sum(len(t.split()) for t in texts)})


@contextmanager
def ollama_standin() -> Iterator[tuple[str, OllamaStandIn]]:
    """(OLLAMA_HOST for it, the stand-in), served by uvicorn on loopback in a thread."""
    standin = OllamaStandIn()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(standin.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the Ollama stand-in did not start")
        time.sleep(0.05)
    try:
        yield f"127.0.0.1:{port}", standin
    finally:
        server.should_exit = True
        thread.join(10)
