"""A standby replica hands `/mcp` to the replica that runs the sandboxes (sandbox/lease.py).

Sessions of the 2025-11-25 revision, their SSE streams, and every user's sandbox live in the one
replica that holds the sandbox lock; a request reaching another replica (one port shared with
`SO_REUSEPORT`, or a load balancer) is passed on to it over loopback as it came, headers and body,
and its answer streamed back as it is made. So any replica serves any request of any session of
either revision, and no sandbox is started by two. The owner authenticates, limits and audits the
request itself; the standby adds nothing but the hop.

What a hop costs when a replica dies: the owner's death ends its sessions (clients open new ones,
as after any expiry) and the calls in flight; a standby takes the lock within seconds and adopts
the sandboxes. A standby's death costs only the requests it was passing on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import httpx
from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger(__name__)

# Not passed on: they describe one hop, not the request (RFC 9110 §7.6.1), or httpx sets them.
_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
        b"host", b"content-length"}


class ForwardToOwner:
    """`app` when this replica runs the sandboxes; otherwise the request goes to `owner()`'s address."""

    def __init__(self, app: ASGIApp, owner: Callable[[], str | None], max_body_bytes: int):
        self.app = app
        self.owner = owner
        self.max_body_bytes = max_body_bytes
        # No timeout on reading: an SSE stream stays open as long as the client keeps it.
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=None))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        address = self.owner() if scope["type"] == "http" else None
        if address is None:
            await self.app(scope, receive, send)
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:  # the owner would refuse it too: not carried over
                await _answer(send, 413, b"request body too large")
                return
        query = scope.get("query_string", b"").decode("latin-1")
        url = f"http://{address}{scope['path']}" + (f"?{query}" if query else "")
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _HOP]
        request = self.client.build_request(scope["method"], url, headers=headers, content=bytes(body))
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            log.warning("could not pass a request on to %s: %s", address, exc)
            await _answer(send, 503, b"the replica that runs the sandboxes cannot be reached; try again in a moment",
                          retry=True)
            return
        try:
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": [(k, v) for k, v in response.headers.raw if k.lower() not in _HOP]})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except httpx.HTTPError as exc:  # the owner died mid-answer: this request is lost, as with it
            log.warning("the answer from %s broke off: %s", address, exc)
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        await self.client.aclose()


async def _answer(send: Send, status: int, text: bytes, *, retry: bool = False) -> None:
    headers = [(b"content-type", b"text/plain; charset=utf-8")] + ([(b"retry-after", b"2")] if retry else [])
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": text})
