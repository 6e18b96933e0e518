"""Any replica serves any request of any 2025-11-25 session: the session id names its replica, sealed.

On Kubernetes (`MCPFLEET_REPLICA_ADDRESS` set) every gateway replica runs calls, and a 2025-11-25
session with its SSE streams lives in the memory of the replica that opened it (the SDK's session
manager). The Service spreads a client's requests over all replicas, so each request must reach the
one that holds its session:

| step                  | what happens                                                                  |
|-----------------------|-------------------------------------------------------------------------------|
| opening (no id)       | served here; the SDK's id is sent as `ID.ROUTE.MAC`: ROUTE is this replica's  |
|                       | address, MAC a keyed hash of id, route and the client's principal             |
| a request with an id  | MAC checked against the caller's principal: not theirs, or forged → 404       |
| the route is here     | the SDK's own id put back, served here                                        |
| the route is elsewhere| passed on to it (gateway/forward.py), with a hop header that the owner checks |
| the owner is gone     | no connection can be made → 404: the client opens a new session, as the spec  |
|                       | says after any expiry                                                         |
| 2026-07-28 (no id)    | served here: stateless, nothing to route...                                   |
| ...unless a retry     | its `requestState` (sealed by the fleet, gateway/input_required.py) names the |
|                       | replica holding the waiting call and its user: passed on there with the same  |
|                       | hop; its holder gone → the "no longer awaited" error (-32602)                 |
| ...or a tasks/update  | the task's row names the replica running it (looked up by its owner): the     |
|                       | same; a task id not the caller's has no route and is refused where it came    |

Why the route is in the id, not in Redis or PostgreSQL: nothing to look up per request, nothing to
expire or clean up, and sessions keep working while Redis or the database is away (the outage
promises of core/outage.py). The key is derived from the fleet's sandbox key, which every gateway
replica has and no client or sandbox pod has: a client cannot forge a route (make a replica forward
to an address of its choosing), nor use another user's session id through any replica (the MAC binds
the principal; the owner's SDK checks it again).

The hop header (`mcpfleet-replica-hop`) is the forwarding replica's word, keyed with the same key: it
carries the client's own address (so the owner audits and limits the client, not the other replica)
and marks the request as passed on once, so it is never passed on again. A client that sends one of
its own is refused (403) before anything else reads the request.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import principal_components
from mcp.server.streamable_http import MCP_SESSION_ID_HEADER
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.auth import identity_of
from gateway.forward import Forwarder, Unreachable, answer
from gateway.input_required import STALE_STATE
from gateway.refusals import jsonrpc_error
from gateway.sessions import session_id_of

log = logging.getLogger(__name__)

HOP_HEADER = b"mcpfleet-replica-hop"
_SESSION_HEADER = MCP_SESSION_ID_HEADER.lower().encode()
HOPPED = "mcpfleet.replica_hop"
"""Scope key: this request was passed on by another replica (its hop header checked)."""
HOP_FRESH_S = 60
"""A hop header older (or newer) than this is refused: a captured one cannot be replayed later."""
CONNECT_S = 5.0
"""How long a replica tries to reach a session's owner before taking it as gone (404)."""
_MAC_BYTES = 16
TASK_GONE = "This task's answers are no longer awaited: the gateway replica running it is gone (the task fails)"
Holder = Callable[[dict[str, Any], int], Awaitable[str | None]]
"""The address of the replica holding what a request (parsed) of this user answers, or None: serve it here."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def principal_of(user: AuthenticatedUser) -> str:
    """Who opened a session, as the SDK compares it (client id, issuer, subject)."""
    return json.dumps(principal_components(user.access_token))


class SessionSeal:
    """Seals session ids with their route and checks them; makes and checks hop headers."""

    def __init__(self, fleet_key: bytes, address: str):
        # A key of its own, derived: a session id's MAC is never a sandbox's token or anything else.
        self._key = hmac.new(fleet_key, b"mcpfleet replica session routes", hashlib.sha256).digest()
        self.address = reachable(address)

    def _mac(self, *parts: str) -> str:
        digest = hmac.new(self._key, "\n".join(parts).encode(), hashlib.sha256).digest()
        return _b64(digest[:_MAC_BYTES])

    def seal(self, session_id: str, principal: str) -> str:
        route = _b64(self.address.encode())
        return f"{session_id}.{route}.{self._mac('session', session_id, route, principal)}"

    def open(self, sealed: str, principal: str) -> tuple[str, str] | None:
        """(the SDK's id, its owner's address), or None if not sealed by the fleet for this principal."""
        parts = sealed.split(".")
        if len(parts) != 3:
            return None
        session_id, route, mac = parts
        if not hmac.compare_digest(mac.encode(), self._mac("session", session_id, route, principal).encode()):
            return None
        try:
            return session_id, _unb64(route).decode("ascii")
        except (binascii.Error, ValueError):
            return None

    def hop(self, scope: Scope, client: str, now: float | None = None) -> bytes:
        stamp = str(int(time.time() if now is None else now))
        route = _b64(client.encode())
        return f"{stamp}.{route}.{self._mac('hop', stamp, route, *_request_of(scope))}".encode()

    def check_hop(self, value: bytes, scope: Scope) -> str | None:
        """The client's address the hop carries, or None if no replica of this fleet made it just now."""
        parts = value.decode("latin-1").split(".")
        if len(parts) != 3 or not parts[0].isdigit():
            return None
        stamp, route, mac = parts
        if abs(time.time() - int(stamp)) > HOP_FRESH_S:
            return None
        if not hmac.compare_digest(mac.encode(), self._mac("hop", stamp, route, *_request_of(scope)).encode()):
            return None
        try:
            return _unb64(route).decode("ascii")
        except (binascii.Error, ValueError):
            return None


def reachable(address: str) -> str:
    """HOST:PORT as a URL takes it: an IPv6 pod IP (the downward API gives it bare) in brackets."""
    host, _, port = address.rpartition(":")
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else address


def _request_of(scope: Scope) -> tuple[str, str, str]:
    """What a hop header is bound to: it is good for this request only."""
    return scope["method"], scope["path"], session_id_of(scope) or ""


def fleet_key(key_file: Path | None) -> bytes:
    if key_file is None:
        raise SystemExit("MCPFLEET_REPLICA_ADDRESS needs MCPFLEET_SANDBOX_KEY_FILE: session ids are sealed with "
                         "the fleet's sandbox key, which every replica must share")
    from sandbox.kubernetes_objects import read_key

    return read_key(key_file)


async def _not_found(send: Send, why: str) -> None:
    # The SDK's words for an unknown session: a client that reads them opens a new session.
    await answer(send, 404, jsonrpc_error(f"Session not found: {why}"), content_type=b"application/json")


class SessionRouting:
    """`/mcp` on a replica of many: each request of a session is served by the replica that opened it."""

    def __init__(self, app: ASGIApp, seal: SessionSeal, forwarder: Forwarder, held: Holder | None = None):
        """`held`: which replica holds what a 2026-07-28 request answers (a held call, a task)."""
        self.app = app
        self.seal = seal
        self.forwarder = forwarder
        self.held = held

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        user = scope.get("user")
        if scope["type"] != "http" or not isinstance(user, AuthenticatedUser):
            await self.app(scope, receive, send)  # refused inside (no bearer): nothing is passed on unauthenticated
            return
        principal = principal_of(user)
        sealed = session_id_of(scope)
        if sealed is None:  # opens a session, or a stateless 2026-07-28 request
            if self.held is not None and scope["method"] == "POST" and not scope.get(HOPPED):
                await self._stateless(scope, receive, send, principal)
            else:
                await self.app(scope, receive, self._sealing(send, principal))
            return
        opened = self.seal.open(sealed, principal)
        if opened is None:
            await _not_found(send, "this id is not one of your sessions")
            return
        session_id, address = opened
        if address == self.seal.address:
            headers = [(k, session_id.encode() if k == _SESSION_HEADER else v) for k, v in scope["headers"]]
            await self.app({**scope, "headers": headers}, receive, self._sealing(send, principal))
            return
        if scope.get(HOPPED):  # the other replica took this one for the owner: never passed on twice
            await _not_found(send, f"this replica ({self.seal.address}) does not hold it")
            return
        body = await self.forwarder.read_body(receive, send)
        if body is None:
            return
        try:
            await self._pass_on(scope, body, receive, send, address)
        except Unreachable as exc:
            log.info("the replica holding a session of %s is gone (%s): 404, so the client opens a new one",
                     user.username, exc)
            await _not_found(send, "the gateway replica that held it is gone; open a new session")

    async def _pass_on(self, scope: Scope, body: bytes, receive: Receive, send: Send, address: str) -> None:
        client = scope["client"][0] if scope.get("client") else "unknown"
        await self.forwarder.pass_on(scope, body, receive, send, address,
                                     headers=[(HOP_HEADER, self.seal.hop(scope, client))])

    async def _stateless(self, scope: Scope, receive: Receive, send: Send, principal: str) -> None:
        """A POST without a session: a retry answering a call another replica holds goes there; the
        body, read once here, is handed on as it came either way."""
        body = await self.forwarder.read_body(receive, send)
        if body is None:
            return
        identity = identity_of(scope)
        try:
            message = json.loads(body)
        except ValueError:
            message = None  # refused where it is served
        address = None
        if identity is not None and self.held is not None and isinstance(message, dict):
            address = await self.held(message, identity.user_id)
        if address is None or address == self.seal.address:
            await self.app(scope, _replaying(body, receive), self._sealing(send, principal))
            return
        try:
            await self._pass_on(scope, body, receive, send, address)
        except Unreachable as exc:
            log.info("the replica holding a waiting call of %s is gone (%s)", identity and identity.principal, exc)
            await answer(send, 200, _stale(message or {}), content_type=b"application/json")

    def _sealing(self, send: Send, principal: str) -> Send:
        async def sealing(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, self.seal.seal(v.decode("latin-1"), principal).encode() if k.lower() == _SESSION_HEADER else v)
                           for k, v in message.get("headers") or ()]
                message = {**message, "headers": headers}
            await send(message)

        return sealing


def _replaying(body: bytes, receive: Receive) -> Receive:
    """The request's body as read already, then whatever else the client sends (its disconnect)."""
    sent = False

    async def replaying() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replaying


def _stale(message: dict[str, Any]) -> bytes:
    """The error a retry (or a task's answers) gets when nothing awaits it any more, under the request's own id."""
    text = STALE_STATE if message.get("method") != "tasks/update" else TASK_GONE
    return json.dumps({"jsonrpc": "2.0", "id": message.get("id"), "error": {
        "code": -32602, "message": text, "data": {"reason": "stale_request_state"}}}).encode()


class ReplicaHops:
    """Outermost: a hop header is checked and removed before anything reads the request; a good one
    puts the client's own address in the scope, a forged one is refused."""

    def __init__(self, app: ASGIApp, seal: SessionSeal):
        self.app = app
        self.seal = seal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        value = None
        if scope["type"] == "http":
            value = next((v for k, v in scope["headers"] if k == HOP_HEADER), None)
        if value is None:
            await self.app(scope, receive, send)
            return
        client = self.seal.check_hop(value, scope)
        if client is None:
            log.warning("refused a request from %s with a hop header no replica made", scope.get("client"))
            await answer(send, 403, json.dumps({"error": "forbidden", "error_description": "the replica hop header is "
                         "for the fleet's gateway replicas only"}).encode(), content_type=b"application/json")
            return
        headers = [(k, v) for k, v in scope["headers"] if k != HOP_HEADER]
        await self.app({**scope, "headers": headers, "client": (client, 0), HOPPED: True}, receive, send)
