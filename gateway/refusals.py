"""Every refusal on `/mcp` as a JSON-RPC error, so that MCP clients show its words.

The SDK's client surfaces the error of a non-2xx answer only when the body is a JSON-RPC error
(`application/json`); anything else becomes "Server returned an error response". The transport
refuses some requests in plain text (413 over the body limit, 421 for a foreign Host, 403 for a
foreign Origin, 400 for a wrong Content-Type): this wrapper turns those into JSON-RPC errors with
the same status and headers, and says what to change where the fix is ours to name.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

INVALID_REQUEST = -32600
SHOWN_TEXT = 200
"""Characters of the transport's own text that go into the message."""


def jsonrpc_error(message: str, code: int = INVALID_REQUEST, data: Any = None) -> bytes:
    """A JSON-RPC error answering a request whose id is not known (the client puts in its own)."""
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return json.dumps({"jsonrpc": "2.0", "id": None, "error": error}).encode()


def body_too_large(limit: int) -> str:
    return (
        f"the request is larger than this gateway accepts ({limit} bytes, {limit / 2**20:.1f} MiB; "
        f"the operator sets it with MCPFLEET_MAX_BODY_BYTES): send less, e.g. write a large file in parts"
    )


class JsonRpcRefusals:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: dict[str, Any] = {}

        async def send_jsonrpc(message: Message) -> None:
            if message["type"] == "http.response.start":
                if message["status"] >= 400 and not _is_json(message.get("headers", [])):
                    held.update(start=message, body=b"")  # rewritten once its (short) text is in
                    return
            elif message["type"] == "http.response.body" and "start" in held:
                held["body"] += message.get("body", b"")
                if message.get("more_body", False):
                    return
                await self._rewrite(send, held.pop("start"), held.pop("body"))
                return
            await send(message)

        await self.app(scope, receive, send_jsonrpc)

    async def _rewrite(self, send: Send, start: Message, text: bytes) -> None:
        status = start["status"]
        if status == 413:
            message = body_too_large(self.max_body_bytes)
        else:
            said = text.decode("utf-8", "replace").strip()[:SHOWN_TEXT] or "refused"
            message = f"HTTP {status}: {said}"
        body = jsonrpc_error(message)
        kept = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-type", b"content-length")]
        headers = [*kept, (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _is_json(headers: Any) -> bool:
    return any(k.lower() == b"content-type" and v.lower().startswith(b"application/json") for k, v in headers)
