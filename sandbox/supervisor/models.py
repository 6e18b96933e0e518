"""Models for tools: an HTTP endpoint on the sandbox's loopback, relayed to the gateway's model router.

A server whose manifest declares `"inference": true` is started with OLLAMA_HOST, OPENAI_BASE_URL
(and OPENAI_API_KEY, which the OpenAI client insists on) naming this endpoint under a path of its
own (`http://127.0.0.1:PORT/<token>`), and MCPFLEET_MODEL (`default`: whichever model the router
makes the default). The sandbox has no network and holds no provider key: each request is sent
whole to the gateway as a `model_ask`, which speaks the Ollama and OpenAI APIs, asks the router
as that server of that user, and answers with `model_reply` pieces (NDJSON lines, SSE events or
one JSON body) that are written back as they come.

This end stays small on purpose: it reads one request (head and a Content-Length body), decides
who is asking, and relays; what the request means, and every translation between the two APIs and
the router's shapes, is the gateway's (`gateway.model_relay`), where it can be changed without
rebuilding sandboxes. Who is asking is decided as the egress proxy decides it: the token in the
path names the server, and the kernel must agree that the connecting process is that server or
one of its descendants (`peers`), so a neighbour that read the token from /proc cannot use it.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
from collections.abc import Callable
from typing import Any

from sandbox import wire
from sandbox.supervisor.listener import Gateway, LoopbackListener, http_head
from sandbox.supervisor.peers import stranger

HEAD_TIMEOUT = 10.0
MAX_BODY = 8 * 1024 * 1024
"""Largest request body taken (a chat with its history, a batch of texts to embed)."""
PIECE_TIMEOUT = 600.0
"""Seconds the gateway may take for the next piece of an answer (a slow model's first token)."""
DEFAULT_MODEL = "default"


class ModelEndpoint(LoopbackListener):
    def __init__(self, send: Callable[[Any, Gateway], None], pid_of: Callable[[str], int | None],
                 newest: Callable[[], Gateway | None]):
        """As `LoopbackListener`."""
        super().__init__(send, pid_of, newest)
        self._ids = itertools.count(1)
        self.asks: dict[int, asyncio.Queue[dict[str, Any]]] = {}

    def credentials(self, server: str, env: dict[str, str]) -> tuple[str, dict[str, str]]:
        """A new token for `server` and the environment that names the endpoint to it (`env`: the
        server's own, whose OPENAI_API_KEY, if it has one, is left alone)."""
        token = self._new_token(server)
        base = f"http://127.0.0.1:{self.port}/{token}"
        given = {"OLLAMA_HOST": base, "OPENAI_BASE_URL": f"{base}/v1", "MCPFLEET_MODEL": DEFAULT_MODEL}
        if "OPENAI_API_KEY" not in env:
            given["OPENAI_API_KEY"] = token  # not a provider's key: the path's token is what counts here
        return token, given

    def on_message(self, message: dict[str, Any], gateway: Gateway) -> None:
        """A piece from `gateway`, for a request it relays (any other gateway's is ignored)."""
        queue = self.asks.get(message.get("ask"))  # type: ignore[arg-type]
        if queue is not None and self._relaying(message.get("ask"), gateway):
            queue.put_nowait(message)

    def _drop(self, requests: list[int], reason: str) -> None:
        for ask in requests:
            queue = self.asks.get(ask)
            if queue is not None:
                queue.put_nowait({"status": 503, "error": reason, "done": True})

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            return await _refuse(writer, "", 400, "not an HTTP request")
        method, target, _ = parts
        token, _, path = target.split("?", 1)[0].partition("/")[2].partition("/")
        path = "/" + path
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if ":" in line)}
        server = self._server_of(token)
        if server is None:
            return await _refuse(writer, path, 401, "this server declares no inference: no model endpoint of its own")
        why = stranger(server, self._pid_of(server), writer.get_extra_info("peername"), self.port or 0)
        if why is not None:
            return await _refuse(writer, path, 403, why)
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return await _refuse(writer, path, 411, "send the body with a Content-Length")
        length = headers.get("content-length", "0")
        if not length.isdigit() or int(length) > MAX_BODY:
            return await _refuse(writer, path, 413, f"a request body of at most {MAX_BODY} bytes is taken")
        body = await asyncio.wait_for(reader.readexactly(int(length)), HEAD_TIMEOUT) if int(length) else b""
        if len(self.asks) >= wire.MAX_MODEL_ASKS:
            return await _refuse(writer, path, 429, f"at most {wire.MAX_MODEL_ASKS} model requests at once per sandbox")
        ask = next(self._ids)
        if self._take_gateway(ask) is None:
            return await _refuse(writer, path, 503, "the gateway is not connected to this sandbox; try again")
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.asks[ask] = queue
        finished = False
        # A client that hangs up while the model thinks is heard at once, not at the next piece.
        watch = asyncio.ensure_future(_hangup(reader, queue))
        try:
            self._send(ask, {"type": "model_ask", "ask": ask, "server": server, "method": method, "path": path,
                             "body": body.decode("utf-8", "replace")})
            finished = await _relay(queue, writer, path)
        finally:
            watch.cancel()
            self.asks.pop(ask, None)
            if not finished:  # the server hung up (or we gave up): the gateway stops asking the model
                self._send(ask, {"type": "model_cancel", "ask": ask})
            self._release(ask)

    def _server_of(self, token: str) -> str | None:
        for known, server in self._servers_by_token.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                return server
        return None


async def _hangup(reader: asyncio.StreamReader, queue: asyncio.Queue[dict[str, Any]]) -> None:
    """Tell `_relay` when the client's end closes (one request per connection: nothing more is read)."""
    try:
        while await reader.read(4096):
            pass
    except (OSError, ConnectionError):
        pass
    queue.put_nowait({"hangup": True})


async def _relay(queue: asyncio.Queue[dict[str, Any]], writer: asyncio.StreamWriter, path: str) -> bool:
    """Write the gateway's pieces as the answer; True once the last was written."""
    try:
        first = await asyncio.wait_for(queue.get(), PIECE_TIMEOUT)
    except asyncio.TimeoutError:
        await _refuse(writer, path, 504, "the gateway did not answer in time")
        return False
    if first.get("hangup"):
        return False
    if first.get("error") is not None and first.get("done"):
        await _refuse(writer, path, int(first.get("status") or 502), str(first["error"]))
        return True
    status, content_type = int(first.get("status") or 200), str(first.get("content_type") or "application/json")
    data = str(first.get("data") or "").encode()
    if first.get("done"):
        writer.write(http_head(status, content_type, len(data)) + data)
        await writer.drain()
        return True
    # Streamed: chunked, each piece flushed as it comes (a token at a time).
    writer.write(http_head(status, content_type, None) + _chunk(data))
    await writer.drain()
    while True:
        try:
            piece = await asyncio.wait_for(queue.get(), PIECE_TIMEOUT)
        except asyncio.TimeoutError:
            return False  # the client sees the answer cut short
        if piece.get("hangup"):
            return False
        writer.write(_chunk(str(piece.get("data") or "").encode()))
        if piece.get("done"):
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return True
        await writer.drain()


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n" if data else b""


async def _refuse(writer: asyncio.StreamWriter, path: str, status: int, message: str) -> None:
    """A refusal in the shape of the API asked (OpenAI's under /v1/, Ollama's elsewhere)."""
    message = f"mcpfleet: {message}"
    if path.startswith("/v1/"):
        error: dict[str, Any] = {"error": {"message": message, "type": "mcpfleet_error", "param": None, "code": status}}
    else:
        error = {"error": message}
    body = json.dumps(error).encode()
    writer.write(http_head(status, "application/json", len(body)) + body)
    await writer.drain()
