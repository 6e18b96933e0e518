"""Rate limits and a concurrent-call limit on `/mcp`, per user, after authentication.

- Every MCP request a user makes takes a token from their bucket (capacity: the per-minute limit,
  refilled at limit/60 per second); `tools/call` also takes one from the user's bucket for that tool.
  The tool is the one the router will call: the name in the JSON-RPC body, never a header.
- POSTs in flight per user are counted; GET (a 2025-11-25 client's long-lived SSE stream) and
  DELETE are not, or an idle client would hold a slot for as long as it stays connected.
- GET streams open per user are counted on their own (`max_streams_per_user`), and so are a user's
  2025-11-25 sessions (`max_sessions_per_user`, gateway/sessions.py): over it the user's oldest idle
  session is closed, and the new one refused only when none is idle.

Refusals are HTTP 429 with `Retry-After` and a JSON-RPC error. Each is logged at INFO; the audit
log gets at most one `limit.refused` entry per user per limit per `AUDIT_EVERY_S`, the refusals in
between counted into the next entry's `detail.suppressed`, so a flood cannot fill the log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.settings import Settings
from gateway.auth import identity_of
from gateway.call_audit import CallAudit
from gateway.ratelimit_redis import Buckets, LocalBuckets, RedisBuckets
from gateway.sessions import SessionBook, opens_session, session_id_of

log = logging.getLogger(__name__)

# JSON-RPC's implementation-defined server range; -32001 is the routing layer's quota error.
RATE_LIMITED = -32029
AUDIT_EVERY_S = 10.0
SHOWN_NAME = 64
"""Characters of a tool's name that go into logs and the audit log: the name is the client's."""
PARSED_BODY = "mcpfleet.jsonrpc"
"""Where the JSON-RPC message read here waits in the ASGI scope, so the fast path (gateway/fast_call.py)
does not parse the body again."""


def buckets_for(settings: Settings) -> Buckets:
    return RedisBuckets(settings.redis_url) if settings.redis_url else LocalBuckets()


class LimitsMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        settings: Settings,
        buckets: Buckets,
        calls: CallAudit | None = None,
        sessions: SessionBook | None = None,
    ):
        self.app = app
        self.per_min = settings.rate_limit_per_min
        self.tool_per_min = settings.tool_rate_limit_per_min
        self.max_concurrent = settings.max_concurrent_calls
        self.max_streams = settings.max_streams_per_user
        self.max_body_bytes = settings.max_body_bytes
        self.buckets = buckets
        self.calls = calls
        self.sessions = sessions
        self._in_flight: dict[int, int] = {}
        self._streams: dict[int, int] = {}
        self._audited: dict[tuple[str, str], tuple[float, int]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        identity = identity_of(scope)
        if scope["type"] != "http" or identity is None:
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        request_id: Any = None
        tool: str | None = None
        if method == "POST":
            # Read up to the body limit, then hand every message on unchanged; a larger body is
            # not parsed here but left to the transport, which answers 413.
            body, receive = await _buffer(receive, self.max_body_bytes)
            if body is not None:
                payload = _parsed(body)
                scope[PARSED_BODY] = payload
                request_id, tool = _request_facts(payload)

        # Calls in flight first: a call refused for that spends none of the user's tokens.
        counted = method == "POST" and self.max_concurrent > 0
        uid = identity.user_id
        if counted and self._in_flight.get(uid, 0) >= self.max_concurrent:
            await self._refuse(send, identity, "concurrent", self.max_concurrent, request_id, 1)
            return
        if counted:
            self._in_flight[uid] = self._in_flight.get(uid, 0) + 1
        try:
            if await self._over_rate(send, identity, tool, request_id):
                return
            if method == "GET" and self.max_streams > 0:
                await self._stream(scope, receive, send, identity)
            elif self.sessions is not None and opens_session(scope):
                await self._open_session(scope, receive, send, identity, request_id)
            elif self.sessions is not None:
                with self.sessions.using(uid, session_id_of(scope)):
                    await self.app(scope, receive, send)
            else:
                await self.app(scope, receive, send)
        finally:
            if counted:
                _release(self._in_flight, uid)

    async def _stream(self, scope: Scope, receive: Receive, send: Send, identity: Any) -> None:
        """A GET holds its connection (an SSE stream) for as long as the client keeps it."""
        uid = identity.user_id
        if self._streams.get(uid, 0) >= self.max_streams:
            await self._refuse(send, identity, "streams", self.max_streams, None, 1)
            return
        self._streams[uid] = self._streams.get(uid, 0) + 1
        try:
            if self.sessions is None:
                await self.app(scope, receive, send)
            else:
                with self.sessions.using(uid, session_id_of(scope)):
                    await self.app(scope, receive, send)
        finally:
            _release(self._streams, uid)

    async def _open_session(self, scope: Scope, receive: Receive, send: Send, identity: Any, request_id: Any) -> None:
        assert self.sessions is not None
        uid = identity.user_id
        if not await self.sessions.make_room(uid):
            await self._refuse(send, identity, "sessions", self.sessions.per_user, request_id, 1)
            return
        try:
            await self.app(scope, receive, self.sessions.watch(uid, send))
        finally:
            self.sessions.done_opening(uid)

    async def _over_rate(self, send: Send, identity: Any, tool: str | None, request_id: Any) -> bool:
        if self.per_min > 0:
            wait = await self.buckets.take(f"user:{identity.user_id}", self.per_min)
            if wait > 0:
                await self._refuse(send, identity, "rate", self.per_min, request_id, wait)
                return True
        if tool is not None and self.tool_per_min > 0:
            # Hashed: the name is the client's, of any length; the key stays small.
            digest = hashlib.blake2b(tool.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
            wait = await self.buckets.take(f"tool:{identity.user_id}:{digest}", self.tool_per_min)
            if wait > 0:
                await self._refuse(send, identity, f"tool_rate:{_shown(tool)}", self.tool_per_min, request_id, wait)
                return True
        return False

    async def _refuse(self, send: Send, identity: Any, limit: str, value: int, request_id: Any, wait: float) -> None:
        retry_after = max(1, math.ceil(wait))
        if limit == "concurrent":
            message = f"too many calls in flight (limit {value}): retry after {retry_after} s"
        elif limit == "streams":
            message = f"too many open streams (limit {value}): close one, or retry after {retry_after} s"
        elif limit == "sessions":
            message = (
                f"too many open sessions, none of them idle (limit {value}): "
                f"end one (DELETE), or retry after {retry_after} s"
            )
        else:
            message = f"rate limit: {value} requests per minute exceeded, retry after {retry_after} s"
        log.info("limit refused: user %s, %s limit %d", identity.principal, limit, value)
        self._audit(identity, limit, value)
        body = json.dumps(
            {"jsonrpc": "2.0", "id": request_id, "error": {"code": RATE_LIMITED, "message": message}}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 429,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", str(retry_after).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def _audit(self, identity: Any, limit: str, value: int) -> None:
        if self.calls is None:
            return
        key = (identity.principal, limit)
        now = time.monotonic()
        last, suppressed = self._audited.get(key, (-math.inf, 0))
        if now - last < AUDIT_EVERY_S:
            self._audited[key] = (last, suppressed + 1)
            return
        self._audited[key] = (now, 0)
        if len(self._audited) > 10_000:  # forget the oldest users rather than grow without end
            for stale in list(self._audited)[:5_000]:
                del self._audited[stale]
        detail = {"limit": limit, "value": value, "suppressed": suppressed}
        self.calls.record("limit.refused", "refused", tenant=identity.tenant, actor=identity.principal, detail=detail)


def _release(counts: dict[int, int], uid: int) -> None:
    left = counts[uid] - 1
    if left:
        counts[uid] = left
    else:
        del counts[uid]


def _shown(name: str) -> str:
    return name if len(name) <= SHOWN_NAME else name[:SHOWN_NAME] + "..."


async def _buffer(receive: Receive, limit: int) -> tuple[bytes | None, Receive]:
    """The whole body (None beyond `limit` bytes), and a `receive` that replays what was read."""
    chunks: list[bytes] = []
    size = 0
    messages: list[Message] = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            chunks = []
            break
        if not message.get("more_body", False):
            break

    async def replay() -> Message:
        if messages:
            return messages.pop(0)
        return await receive()

    complete = messages and messages[-1]["type"] == "http.request" and not messages[-1].get("more_body", False)
    return (b"".join(chunks) if complete and size <= limit else None), replay


def _parsed(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # the transport answers it with a JSON-RPC parse error
        return None


def _request_facts(payload: Any) -> tuple[Any, str | None]:
    """The JSON-RPC id and, for `tools/call`, the tool's name as the router will read it: from the body.

    Not from `Mcp-Name`: a 2025-11-25 session ignores that header, so a client could name any tool there.
    """
    if not isinstance(payload, dict):
        return None, None
    request_id = payload.get("id")
    if not isinstance(request_id, (str, int)) or isinstance(request_id, bool):
        request_id = None
    if payload.get("method") != "tools/call":
        return request_id, None
    params = payload.get("params")
    name = params.get("name") if isinstance(params, dict) else None
    return request_id, name if isinstance(name, str) else None
