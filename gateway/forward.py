"""One replica hands an `/mcp` request to another, as it came, and streams the answer back.

Two users of the hop (`Forwarder`): on one box (`mcpfleet up --replicas N`, sandbox/lease.py) a
standby replica passes every `/mcp` request to the replica that holds the sandbox lock over loopback
(`ForwardToOwner`): sessions of the 2025-11-25 revision, their SSE streams, and every user's sandbox
live in that one. On Kubernetes every replica runs sandboxes (the operator decides their lifecycle),
and a request of a session goes to the replica that opened it (gateway/session_routes.py).

The receiving replica passes headers and body on and streams the answer back as it is made; the
owner authenticates, limits and audits the request itself. On one box the standby also says who the
client is: the address it took the request from goes in `X-Forwarded-For` (appended to the one a
trusted proxy sent, else in place of whatever the client sent), with `X-Mcpfleet-Replica` carrying
the replicas' shared secret. The owner (`ReplicaClient`) takes the client's address from the
header's last entry only when both hold and the request came over loopback; from anyone else the two
headers change nothing, so a client cannot pick the address its calls are audited and limited under.
(On Kubernetes the keyed hop header of gateway/session_routes.py does the same job.) When the client goes away mid-answer (an
SSE stream it closes), the hop is closed too, so the owner frees the stream at once.

What a hop costs when a replica dies: the owner's death ends its sessions (clients open new ones,
as after any expiry) and the calls in flight; a standby takes the lock within seconds and adopts
the sandboxes. A forwarding replica's death costs only the requests it was passing on.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
from collections.abc import Callable

import httpx
from opentelemetry import propagate
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.refusals import body_too_large, jsonrpc_error

log = logging.getLogger(__name__)

# Not passed on: they describe one hop, not the request (RFC 9110 §7.6.1), or httpx sets them. The
# Host header is kept: the owner checks it (DNS-rebinding protection) as the client sent it.
_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
        b"content-length"}
REPLICA_HEADER = b"x-mcpfleet-replica"
FORWARDED_FOR = b"x-forwarded-for"
SECRET_ENV = "MCPFLEET_REPLICA_SECRET"
"""How `up --replicas` hands the shared secret to its replicas (each takes it out of its environment)."""


class Unreachable(Exception):
    """No connection to the other replica could be made: nothing of the request reached it."""


class Forwarder:
    """The hop itself: one HTTP client, reused for every request passed on."""

    def __init__(self, max_body_bytes: int, *, connect_timeout: float = 30.0):
        self.max_body_bytes = max_body_bytes
        # No timeout on reading: an SSE stream stays open as long as the client keeps it.
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=connect_timeout, read=None))

    async def read_body(self, receive: Receive, send: Send) -> bytes | None:
        """The whole request body, or None once answered (413) or the client is gone."""
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:  # the owner would refuse it too: not carried over
                # As the owner would say it: a JSON-RPC error that SDK clients show, naming the setting.
                await answer(send, 413, jsonrpc_error(body_too_large(self.max_body_bytes)),
                             content_type=b"application/json")
                return None
        return bytes(body)

    async def pass_on(self, scope: Scope, body: bytes, receive: Receive, send: Send, address: str,
                      *, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        """Send the request to `address` (with `headers` added) and stream its answer to `send`.
        Raises Unreachable when no connection could be made (nothing was sent to the client)."""
        query = scope.get("query_string", b"").decode("latin-1")
        url = f"http://{address}{scope['path']}" + (f"?{query}" if query else "")
        # The trace goes on through the hop: the owner's span is a child of this replica's, not a sibling.
        trace: dict[str, str] = {}
        propagate.inject(trace)
        # Headers this hop sets itself replace any the client sent under the same names.
        dropped = _HOP | {k.lower() for k, _ in headers or []} | ({b"traceparent", b"tracestate"} if trace else set())
        kept = [(k, v) for k, v in scope["headers"] if k.lower() not in dropped] + (headers or [])
        kept += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in trace.items()]
        request = self.client.build_request(scope["method"], url, headers=kept, content=body)
        try:
            response = await self.client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise Unreachable(f"{address}: {exc}") from exc
        except httpx.HTTPError as exc:
            log.warning("could not pass a request on to %s: %s", address, exc)
            await answer(send, 503, b"the replica that holds this request's state broke off; try again in a moment",
                         retry=True)
            return
        try:
            relay = asyncio.ensure_future(_relay(response, send))
            gone = asyncio.ensure_future(_disconnected(receive))
            try:
                await asyncio.wait({relay, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (relay, gone):
                    task.cancel()
            failed, _ = await asyncio.gather(relay, gone, return_exceptions=True)
            if isinstance(failed, httpx.HTTPError):  # the owner died mid-answer: this request is lost, as with it
                log.warning("the answer from %s broke off: %s", address, failed)
            elif isinstance(failed, Exception):
                raise failed
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        await self.client.aclose()


async def _relay(response: httpx.Response, send: Send) -> None:
    await send({"type": "http.response.start", "status": response.status_code,
                "headers": [(k, v) for k, v in response.headers.raw if k.lower() not in _HOP]})
    async for chunk in response.aiter_raw():
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _disconnected(receive: Receive) -> None:
    """Returns once the client is gone (the server says so too once the answer is complete)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class ForwardToOwner:
    """`app` when this replica runs the sandboxes; otherwise the request goes to `owner()`'s address."""

    def __init__(self, app: ASGIApp, owner: Callable[[], str | None], forwarder: Forwarder, *,
                 secret: str | None = None, behind_proxy: bool = False):
        """`secret`: the replicas' shared one; `behind_proxy`: trusted proxies are set (their
        X-Forwarded-For is kept and the client appended to it)."""
        self.app = app
        self.owner = owner
        self.forwarder = forwarder
        self.secret = secret
        self.behind_proxy = behind_proxy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        address = self.owner() if scope["type"] == "http" else None
        if address is None:
            await self.app(scope, receive, send)
            return
        body = await self.forwarder.read_body(receive, send)
        if body is None:
            return
        try:
            await self.forwarder.pass_on(scope, body, receive, send, address, headers=self._client_headers(scope))
        except Unreachable as exc:
            log.warning("could not pass a request on to the replica that runs the sandboxes: %s", exc)
            await answer(send, 503, b"the replica that runs the sandboxes cannot be reached; try again in a moment",
                         retry=True)

    def _client_headers(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        client = scope.get("client")
        if client is None or self.secret is None:
            return []
        address = client[0].encode("latin-1")
        sent = [v for k, v in scope["headers"] if k.lower() == FORWARDED_FOR]
        chain = b", ".join([*sent, address]) if self.behind_proxy and sent else address
        return [(FORWARDED_FOR, chain), (REPLICA_HEADER, self.secret.encode())]


class ReplicaClient:
    """Outermost on the owner: a request another replica passed on is taken as coming from the client
    that replica named (see the module's docstring). The replica header never goes further in."""

    def __init__(self, app: ASGIApp, secret: str | None):
        self.app = app
        self.secret = secret.encode() if secret else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            offered = [v for k, v in scope["headers"] if k == REPLICA_HEADER]
            if offered:
                scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != REPLICA_HEADER]}
                address = self._named(scope, offered)
                if address is not None:
                    scope["client"] = (address, 0)
        await self.app(scope, receive, send)

    def _named(self, scope: Scope, offered: list[bytes]) -> str | None:
        client = scope.get("client")
        if self.secret is None or len(offered) != 1 or not hmac.compare_digest(offered[0], self.secret):
            return None
        if client is None or not _loopback(client[0]):
            return None
        forwarded = [v for k, v in scope["headers"] if k == FORWARDED_FOR]
        if not forwarded:
            return None
        last = forwarded[-1].decode("latin-1").split(",")[-1].strip()
        try:
            return str(ipaddress.ip_address(last))
        except ValueError:
            return None


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def answer(send: Send, status: int, text: bytes, *, retry: bool = False,
                 content_type: bytes = b"text/plain; charset=utf-8") -> None:
    headers = [(b"content-type", content_type)] + ([(b"retry-after", b"2")] if retry else [])
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": text})
