"""Header values as HTTP defines them: without the optional whitespace around them.

RFC 9110 makes the whitespace around a field value not part of it. h11 trims it;
httptools, which uvicorn prefers for speed, keeps trailing whitespace, and the MCP
SDK then compares e.g. `Mcp-Name` with the body's name byte for byte.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

_OWS = b" \t"


class TrimHeaderWhitespace:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = scope["headers"]
            if any(v[:1] in (b" ", b"\t") or v[-1:] in (b" ", b"\t") for _, v in headers):
                scope = {**scope, "headers": [(k, v.strip(_OWS)) for k, v in headers]}
        await self.app(scope, receive, send)
