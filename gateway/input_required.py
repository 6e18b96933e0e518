"""Server-to-client requests for 2026-07-28 clients: held here, asked as `input_required`.

A sandboxed server speaks 2025-11-25 to its supervisor, so it asks the client mid-call
(`sampling/createMessage`, `elicitation/create`, `roots/list`) by a request of its own and
waits. A 2026-07-28 client has no channel for such a request: the gateway holds the server's
request, answers the client's call with an `InputRequiredResult` naming what the server asked,
and when the client retries with `inputResponses` and the `requestState`, passes the answers to
the waiting server and goes on (more rounds if the server asks again).

`requestState` is sealed by the SDK's `RequestStateBoundary` (AES-256-GCM under a key derived
from the gateway's secret), bound to the user, the method, the tool/prompt/resource and its
arguments, and expires; inside it is only the id of the held exchange and its round, which
must also match what this gateway holds for that user. A server whose client never comes back
gets an error after `input_wait_s` and its exchange is forgotten. Held exchanges live in this
gateway's memory. With several replicas (Kubernetes, `route` set) the exchange's id also names
its user and the replica holding it, inside the sealed state, so no client can change either:
`HeldCallRoutes` reads it back for gateway/session_routes.py, which passes a retry that reached
another replica on to the holder.

A 2025-11-25 session keeps its back-channel: `relay_to_client` sends the server's request to the
client as it came.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextvars
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import mcp_types as types
from mcp.server.context import ServerRequestContext
from mcp.server.request_state import InvalidRequestState, RequestStateBoundary, RequestStateSecurity
from mcp.shared.exceptions import MCPError
from mcp.shared.message import ServerMessageMetadata
from pydantic import BaseModel, ConfigDict, TypeAdapter

from core.accounts import Identity
from core.text import bounded
from gateway.auth import identity_of
from sandbox.channel import RequestHandler
from sandbox.errors import SandboxRpcError
from sandbox.wire import INPUT_KEY_META, RELATED_REQUEST_META

log = logging.getLogger(__name__)

# Which client capability each server-to-client request needs.
CAPABILITY_OF = {"sampling/createMessage": "sampling", "elicitation/create": "elicitation", "roots/list": "roots"}
SETTLE_S = 0.3
"""Questions a server sends together (each its own request) arrive within this of each other: asked in one round."""
RELEASE_GRACE_S = 30.0
"""A released server has this long to end its call on its own before the gateway cancels it."""
# Set while a call runs as a task (gateway/tasks.py): no client request is open to take its
# notifications, and the task's cancellation ends the server's call too (a plain call whose client
# went away stays held for the retry instead).
RUNNING_AS_TASK: contextvars.ContextVar[bool] = contextvars.ContextVar("running_as_task", default=False)
STALE_STATE = "This requestState is no longer awaited (the call finished, timed out, or was answered already)"


def _security(secret: bytes, wait_s: float) -> RequestStateSecurity:
    key = hmac.new(secret, b"mcpfleet/request-state", hashlib.sha256).hexdigest()  # its own key, not the cookie key's
    return RequestStateSecurity(keys=[key], ttl=wait_s, bind_principal=_principal)


def boundary(secret: bytes, wait_s: float) -> RequestStateBoundary:
    """The SDK middleware that seals outgoing and verifies incoming `requestState`, bound to the user."""
    return RequestStateBoundary(_security(secret, wait_s), default_audience="mcpfleet")


_ROUTED = "~"
"""Separates an exchange's random part from its user and replica (none of them ever holds it)."""
_CARRIERS = frozenset({"tools/call", "prompts/get", "resources/read"})
"""The requests that may carry a `requestState` (the SDK's multi-round-trip methods)."""


def _exchange_id(user_id: int, route: str | None) -> str:
    token = secrets.token_urlsafe(16)
    if route is None:
        return token
    return f"{token}{_ROUTED}{user_id}{_ROUTED}{base64.urlsafe_b64encode(route.encode()).rstrip(b'=').decode()}"


class HeldCallRoutes:
    """Which replica holds the call a retry answers: read from the sealed `requestState` itself.

    The state is AES-GCM sealed with the fleet's secret (every replica has it, no client does), so the
    route in it is the fleet's word. Anything that is not such a state for this user (forged, expired,
    another user's, malformed) has no route: it is served where it arrived, whose boundary refuses it
    as usual; nothing a client writes makes a replica connect anywhere."""

    def __init__(self, secret: bytes, wait_s: float):
        self._codec = _security(secret, wait_s).codec

    def route_of(self, message: Any, user_id: int) -> str | None:
        """The holder's address, for a request (a parsed JSON-RPC message) that retries with a state."""
        params = message.get("params") if isinstance(message, dict) else None
        state = params.get("requestState") if isinstance(params, dict) else None
        if not isinstance(state, str) or message.get("method") not in _CARRIERS:
            return None
        try:
            claims = json.loads(self._codec.unseal(state))
        except (InvalidRequestState, ValueError):
            return None
        inner = claims.get("s") if isinstance(claims, dict) else None
        expires = claims.get("exp") if isinstance(claims, dict) else None
        if not isinstance(inner, str) or not isinstance(expires, int | float) or not time.time() < expires:
            return None
        parts = inner.rpartition(".")[0].split(_ROUTED)
        if len(parts) != 3 or parts[1] != str(user_id):
            return None
        try:
            return base64.urlsafe_b64decode(parts[2] + "=" * (-len(parts[2]) % 4)).decode("ascii")
        except (binascii.Error, ValueError):
            return None


def _principal(ctx: ServerRequestContext[Any, Any]) -> str | None:
    identity = identity_of(getattr(ctx.request, "scope", None))
    return None if identity is None else f"user:{identity.user_id}"


def client_capabilities(ctx: ServerRequestContext[Any, Any]) -> dict[str, Any]:
    """What the client behind this request declared (2026-07-28: in the request's envelope)."""
    declared = getattr(ctx.session, "client_capabilities", None)
    if declared is None:
        return {}
    return declared.model_dump(by_alias=True, mode="json", exclude_none=True)


class _Ask:
    __slots__ = ("key", "method", "params", "answer")

    def __init__(self, key: str, method: str, params: dict[str, Any] | None):
        self.key, self.method, self.params = key, method, params
        self.answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()


class Exchange:
    """One client call whose server asks the client for input, across the rounds it takes."""

    def __init__(self, user_id: int, capabilities: dict[str, Any], label: str = "", route: str | None = None):
        self.id = _exchange_id(user_id, route)
        self.user_id = user_id
        self.label = label  # what the call was and whose, for the log
        self.capabilities = capabilities
        self.round = 0
        self.task: asyncio.Task[dict[str, Any]] | None = None
        self.asks: dict[str, _Ask] = {}  # asked and not yet answered, by key
        self.refusal: MCPError | None = None
        self.changed = asyncio.Event()  # a new ask, or the call ended
        self.expiry: asyncio.TimerHandle | None = None
        self.ctx: ServerRequestContext[Any, Any] | None = None
        """The client request of the round under way."""
        self._numbers: dict[str, int] = {}

    async def on_request(self, method: str, params: dict[str, Any] | None) -> dict[str, Any]:
        """The server's request to the client: held until the client answers it in a later round."""
        if method == "ping":
            return {}
        capability = CAPABILITY_OF.get(method)
        if capability is None:
            raise SandboxRpcError(types.METHOD_NOT_FOUND, f"the client cannot be asked {method} through the gateway")
        if capability not in self.capabilities:
            message = f"this request needs the client capability {capability!r}, which the client did not declare"
            self.refusal = MCPError(
                code=types.MISSING_REQUIRED_CLIENT_CAPABILITY, message=message,
                data={"requiredCapabilities": {capability: {}}},
            )
            self.changed.set()
            raise SandboxRpcError(types.MISSING_REQUIRED_CLIENT_CAPABILITY, message, {"requiredCapabilities": {capability: {}}})
        ask = _Ask(self._key(method, params), method, params)
        self.asks[ask.key] = ask
        self.changed.set()
        try:
            return await ask.answer
        finally:
            self.asks.pop(ask.key, None)

    def _key(self, method: str, params: dict[str, Any] | None) -> str:
        named = ((params or {}).get("_meta") or {}).get(INPUT_KEY_META)
        if isinstance(named, str) and 0 < len(named) <= 100 and named not in self.asks:
            return named
        stem = CAPABILITY_OF[method]
        while True:
            self._numbers[stem] = number = self._numbers.get(stem, 0) + 1
            if f"{stem}-{number}" not in self.asks:
                return f"{stem}-{number}"

    def ended(self, task: asyncio.Task[dict[str, Any]]) -> None:
        self.changed.set()
        if not task.cancelled():
            task.exception()  # retrieved here: a call given up (refused, released) ends unread

    def deliver(self, responses: Any) -> None:
        """The client's answers, by key; keys nobody asked are ignored, unanswered asks are asked again."""
        if not isinstance(responses, dict):
            return
        for key, answer in responses.items():
            ask = self.asks.get(key)
            if ask is not None and isinstance(answer, dict) and not ask.answer.done():
                ask.answer.set_result(_without_result_type(answer))

    def release(self, reason: str) -> None:
        """Fail every waiting ask (the server gets `reason` as its error) and stop the call."""
        for ask in list(self.asks.values()):
            if not ask.answer.done():
                ask.answer.set_exception(SandboxRpcError(types.REQUEST_TIMEOUT, reason))
        if self.task is not None and not self.task.done():
            # The server gets its errors first, then the call is given up (told to cancel).
            asyncio.get_running_loop().call_later(RELEASE_GRACE_S, self.task.cancel)


def _without_result_type(answer: dict[str, Any]) -> dict[str, Any]:
    # A 2026-07-28 answer may carry resultType; the 2025-11-25 server reads the rest.
    return {k: v for k, v in answer.items() if k != "resultType"}


class InputExchanges:
    """The exchanges this gateway holds, by id; each belongs to one user."""

    def __init__(self, wait_s: float, held_per_user: int = 32, route: str | None = None):
        """`route`: this replica's address, when a retry may reach another replica (see HeldCallRoutes)."""
        self.wait_s = wait_s
        self.route = route
        self.held_per_user = held_per_user
        """Calls one user may have waiting for their input at once: each holds a server's call open."""
        self._held: dict[str, Exchange] = {}

    def __len__(self) -> int:
        return len(self._held)

    async def run(
        self, ctx: ServerRequestContext[Any, Any], identity: Identity, start: Callable[[Exchange], Awaitable[dict[str, Any]]]
    ) -> dict[str, Any]:
        """The call's result, or an `InputRequiredResult` for what its server asked (first round or a retry)."""
        state = (ctx.params or {}).get("requestState")
        if state is None:
            target = (ctx.params or {}).get("name") or (ctx.params or {}).get("uri") or ""
            exchange = Exchange(identity.user_id, client_capabilities(ctx), f"{ctx.method} {bounded(str(target), 200)} of {identity.principal}",
                                self.route)
            exchange.ctx = ctx
            exchange.task = asyncio.create_task(start(exchange))
            exchange.task.add_done_callback(exchange.ended)
            self._held[exchange.id] = exchange
        else:
            exchange = self._resume(state, identity)
            exchange.ctx = ctx
            exchange.capabilities = client_capabilities(ctx)
            exchange.changed.clear()
            exchange.deliver((ctx.params or {}).get("inputResponses"))
        try:
            return await self._outcome(exchange)
        except asyncio.CancelledError:
            if RUNNING_AS_TASK.get():
                self.drop(f"{exchange.id}.{exchange.round}")
            raise
        finally:
            exchange.ctx = None
            # Also when the client went away mid-round: the server is released if nobody comes back.
            if self._held.get(exchange.id) is exchange and exchange.expiry is None:
                exchange.expiry = asyncio.get_running_loop().call_later(self.wait_s, self._expire, exchange)

    def _resume(self, state: Any, identity: Identity) -> Exchange:
        exchange_id, _, round_text = str(state).rpartition(".")
        exchange = self._held.get(exchange_id)
        # The sealed state is bound to the user already; the id's owner is checked again, so a state
        # minted for one user can never reach another user's server.
        if exchange is None or exchange.user_id != identity.user_id or round_text != str(exchange.round):
            raise MCPError(code=types.INVALID_PARAMS, message=STALE_STATE, data={"reason": "stale_request_state"})
        if exchange.expiry is not None:
            exchange.expiry.cancel()
            exchange.expiry = None
        exchange.round += 1  # a state is good for one retry
        return exchange

    async def _outcome(self, exchange: Exchange) -> dict[str, Any]:
        task = exchange.task
        assert task is not None
        while not task.done() and exchange.refusal is None and not _unanswered(exchange):
            exchange.changed.clear()
            await exchange.changed.wait()
        # Questions sent together arrive one by one: wait until they stop coming.
        while not task.done() and exchange.refusal is None:
            before, exchange.changed = len(exchange.asks), asyncio.Event()
            try:
                await asyncio.wait_for(exchange.changed.wait(), SETTLE_S)
            except asyncio.TimeoutError:
                if len(exchange.asks) == before:
                    break
        if exchange.refusal is not None:
            self._forget(exchange)
            if not task.done():
                task.cancel()
            raise exchange.refusal
        if task.done():
            self._forget(exchange)
            return task.result()  # the call's own result or error
        if exchange.round == 0 and sum(1 for e in self._held.values() if e.user_id == exchange.user_id) > self.held_per_user:
            self._forget(exchange)
            exchange.release("the caller has too many calls waiting for input")
            raise MCPError(
                code=types.INVALID_REQUEST,
                message=f"You have {self.held_per_user} calls waiting for your input already: answer or drop those first",
            )
        exchange.round += 1
        pending = _unanswered(exchange)
        log.debug("exchange %s round %d asks the client for %s", exchange.id[:6], exchange.round, sorted(pending))
        return {
            "resultType": "input_required",
            "inputRequests": {
                key: {"method": ask.method, **({"params": _for_client(ask.params)} if ask.params is not None else {})}
                for key, ask in pending.items()
            },
            "requestState": f"{exchange.id}.{exchange.round}",
        }

    def _expire(self, exchange: Exchange) -> None:
        if self._held.get(exchange.id) is not exchange:
            return
        log.info("a server waited %.0f s for its client's input in vain (%s); releasing it", self.wait_s, exchange.label)
        self._forget(exchange)
        if exchange.task is not None:
            exchange.task.add_done_callback(lambda task: _log_released(task, exchange.label))
        exchange.release(f"the client did not answer within {self.wait_s:.0f} s (input_required was never retried)")

    def drop(self, state: Any) -> None:
        """Ends the server's call held under this requestState at once (its task was cancelled)."""
        exchange = self._held.get(str(state).rpartition(".")[0])
        if exchange is not None:
            self._forget(exchange)
            if exchange.task is not None:
                exchange.task.cancel()

    def _forget(self, exchange: Exchange) -> None:
        if exchange.expiry is not None:
            exchange.expiry.cancel()
        self._held.pop(exchange.id, None)

    def close(self) -> None:
        for exchange in list(self._held.values()):
            self._forget(exchange)
            exchange.release("the gateway is shutting down")


def _log_released(task: asyncio.Task[dict[str, Any]], label: str) -> None:
    if task.cancelled():
        outcome = "cancelled by the gateway"
    elif (error := task.exception()) is not None:
        outcome = f"error: {error}"
    else:
        outcome = bounded(str(task.result()), 500)
    log.info("a call released for want of input (%s) ended: %s", label, outcome)


def _unanswered(exchange: Exchange) -> dict[str, _Ask]:
    return {key: ask for key, ask in exchange.asks.items() if not ask.answer.done()}


def _for_client(params: dict[str, Any]) -> dict[str, Any]:
    # The fleet's own ties (see sandbox/wire.py) are not the client's business.
    meta = params.get("_meta")
    if not isinstance(meta, dict) or not meta.keys() & {INPUT_KEY_META, RELATED_REQUEST_META}:
        return params
    rest = {k: v for k, v in meta.items() if k not in (INPUT_KEY_META, RELATED_REQUEST_META)}
    return {**{k: v for k, v in params.items() if k != "_meta"}, **({"_meta": rest} if rest else {})}


class _AnyResult(BaseModel):
    """A client's answer to a relayed request, kept as it came."""

    model_config = ConfigDict(extra="allow")


_request_adapter: TypeAdapter[Any] = TypeAdapter(types.ServerRequest)


def relay_to_client(ctx: ServerRequestContext[Any, Any]) -> RequestHandler:
    """A 2025-11-25 session's back-channel: the server's request goes to the client as it came."""

    async def relay(r_method: str, r_params: dict[str, Any] | None) -> dict[str, Any]:
        request = _request_adapter.validate_python(
            {"method": r_method, **({"params": r_params} if r_params is not None else {})}
        )
        result = await ctx.session.send_request(
            request, _AnyResult, metadata=ServerMessageMetadata(related_request_id=ctx.request_id)
        )
        return result.model_dump(by_alias=True, mode="json", exclude_none=True)

    return relay


def with_client_capabilities(params: dict[str, Any], capabilities: dict[str, Any]) -> dict[str, Any]:
    """The server sees what the client behind this request declared (and sampling where the fleet
    answers it), not what its supervisor declared once at the server's start: a server that reads
    it asks only for what can be answered."""
    meta = {**(params.get("_meta") or {}), types.CLIENT_CAPABILITIES_META_KEY: capabilities}
    return {**params, "_meta": meta}
