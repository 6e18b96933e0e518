"""A standby replica hands `/mcp` to the replica that runs the sandboxes (sandbox/lease.py).

Sessions of the 2025-11-25 revision, their SSE streams, and every user's sandbox live in the one
replica that holds the sandbox lock; a request reaching another replica (one port shared with
`SO_REUSEPORT`, or a load balancer) is passed on to it over loopback as it came, headers and body,
and its answer streamed back as it is made. So any replica serves any request of any session of
either revision, and no sandbox is started by two. The owner authenticates, limits and audits the
request itself; the standby adds nothing but the hop and who the client is: the address it took the
request from goes in `X-Forwarded-For` (appended to the one a trusted proxy sent, else in place of
whatever the client sent), with `X-Mcpfleet-Replica` carrying the replicas' shared secret. The owner
(`ReplicaClient`) takes the client's address from the header's last entry only when both hold and
the request came over loopback; from anyone else the two headers change nothing, so a client cannot
pick the address its calls are audited and limited under.

What a hop costs when a replica dies: the owner's death ends its sessions (clients open new ones,
as after any expiry) and the calls in flight; a standby takes the lock within seconds and adopts
the sandboxes. A standby's death costs only the requests it was passing on.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Callable

import httpx
from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger(__name__)

# Not passed on: they describe one hop, not the request (RFC 9110 §7.6.1), or httpx sets them.
_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
        b"host", b"content-length"}
REPLICA_HEADER = b"x-mcpfleet-replica"
FORWARDED_FOR = b"x-forwarded-for"
SECRET_ENV = "MCPFLEET_REPLICA_SECRET"
"""How `up --replicas` hands the shared secret to its replicas (each takes it out of its environment)."""


class ForwardToOwner:
    """`app` when this replica runs the sandboxes; otherwise the request goes to `owner()`'s address."""

    def __init__(self, app: ASGIApp, owner: Callable[[], str | None], max_body_bytes: int, *, secret: str | None = None,
                 behind_proxy: bool = False):
        """`secret`: the replicas' shared one; `behind_proxy`: trusted proxies are set (their
        X-Forwarded-For is kept and the client appended to it)."""
        self.app = app
        self.owner = owner
        self.max_body_bytes = max_body_bytes
        self.secret = secret
        self.behind_proxy = behind_proxy
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
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _HOP | {REPLICA_HEADER, FORWARDED_FOR}]
        headers += self._client_headers(scope)
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

    def _client_headers(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        client = scope.get("client")
        if client is None or self.secret is None:
            return []
        address = client[0].encode("latin-1")
        sent = [v for k, v in scope["headers"] if k.lower() == FORWARDED_FOR]
        chain = b", ".join([*sent, address]) if self.behind_proxy and sent else address
        return [(FORWARDED_FOR, chain), (REPLICA_HEADER, self.secret.encode())]

    async def aclose(self) -> None:
        await self.client.aclose()


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


async def _answer(send: Send, status: int, text: bytes, *, retry: bool = False) -> None:
    headers = [(b"content-type", b"text/plain; charset=utf-8")] + ([(b"retry-after", b"2")] if retry else [])
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": text})
