"""What an OAuth client learns from the gateway: RFC 9728 metadata, and RFC 6750 challenges.

A request without a usable token gets 401 with `resource_metadata` pointing
at the metadata, which names the issuers that may grant access; a token
lacking a required scope gets 403 `insufficient_scope` naming the scopes.
Required scopes are those of OAuth tokens: an API key stands for its user
whole and carries no scopes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from mcp.server.auth.json_response import PydanticJSONResponse
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.routes import build_resource_metadata_url
from mcp.shared.auth import ProtectedResourceMetadata
from pydantic import AnyHttpUrl
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.auth import is_api_key
from gateway.oauth import store
from gateway.refusals import jsonrpc_error

if TYPE_CHECKING:
    from gateway.fleet import Fleet

# The issuer list is read from the database at most this often for unauthenticated callers.
METADATA_CACHE_S = 5.0


def metadata_url(public_url: str) -> str:
    return str(build_resource_metadata_url(AnyHttpUrl(public_url)))


def metadata_routes(
    public_url: str, scopes: tuple[str, ...], fleet: Fleet
) -> list[Route]:
    """The metadata at the path RFC 9728 derives from `/mcp`, and at the bare well-known path
    for clients that look there first."""
    issuers: list[str] = []
    fresh_until = 0.0

    async def metadata(request: Request) -> Response:
        nonlocal issuers, fresh_until
        if time.monotonic() >= fresh_until:
            async with fleet.pool.connection() as conn:
                issuers = sorted({i.url for i in await store.list_issuers(conn)})
            fresh_until = time.monotonic() + METADATA_CACHE_S
        if not issuers:
            return JSONResponse({"error": "no authorization server is trusted here"}, status_code=404)
        # Validated from strings, so that an issuer without a path keeps none: clients compare
        # these with the `issuer` of the server's own metadata, character for character.
        document = ProtectedResourceMetadata.model_validate({
            "resource": public_url,
            "authorization_servers": issuers,
            "scopes_supported": list(scopes) or None,
            "bearer_methods_supported": ["header"],
            "resource_name": "mcpfleet",
        })
        return PydanticJSONResponse(content=document, headers={"Cache-Control": "public, max-age=60"})

    path = metadata_url(public_url).split("://", 1)[1].partition("/")[2]
    paths = dict.fromkeys([f"/{path}", "/.well-known/oauth-protected-resource"])
    return [Route(p, metadata, methods=["GET"]) for p in paths]


class RequireBearer:
    """In front of `/mcp`: only authenticated callers, with the required scopes, get through."""

    def __init__(self, app: ASGIApp, *, public_url: str, required_scopes: tuple[str, ...],
                 on_missing_scope: Callable[[Scope, AccessToken, list[str]], None] | None = None):
        self.app = app
        self.on_missing_scope = on_missing_scope
        self.required_scopes = required_scopes
        self.metadata_url = metadata_url(public_url)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        user = scope.get("user")
        if not isinstance(user, AuthenticatedUser):
            # RFC 6750 §3.1: no error code when the request carried no token at all.
            presented = any(name == b"authorization" for name, _ in scope.get("headers", ()))
            error = ("invalid_token", "The bearer token is not valid here") if presented else None
            await self._challenge(send, 401, error)
            return
        token = user.access_token
        if not is_api_key(token):
            missing = [s for s in self.required_scopes if s not in token.scopes]
            if missing:
                if self.on_missing_scope is not None:
                    self.on_missing_scope(scope, token, missing)
                await self._challenge(send, 403, ("insufficient_scope", f"Required scope: {' '.join(missing)}"))
                return
        await self.app(scope, receive, send)

    async def _challenge(self, send: Send, status: int, error: tuple[str, str] | None) -> None:
        params = []
        if error is not None:
            params += [f'error="{error[0]}"', f'error_description="{error[1]}"']
        if self.required_scopes:
            params.append(f'scope="{" ".join(self.required_scopes)}"')
        params.append(f'resource_metadata="{self.metadata_url}"')
        # The challenge is in WWW-Authenticate (RFC 6750); the body is a JSON-RPC error, which MCP
        # clients show, saying what to do about it.
        oauth_error = {"error": error[0] if error else "unauthorized",
                       "error_description": error[1] if error else "Authentication required"}
        body = jsonrpc_error(_advice(status, error), data=oauth_error)
        await send({
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", f"Bearer {', '.join(params)}".encode()),
            ],
        })
        await send({"type": "http.response.body", "body": body})



def _advice(status: int, error: tuple[str, str] | None) -> str:
    if status == 403 and error is not None:
        return f"the token lacks a scope this gateway requires ({error[1]}): ask your identity provider for it"
    if error is None:
        return ("no API key or token was sent: send the header `Authorization: Bearer <key>` "
                "(the mcpfleet CLI reads the key from MCPFLEET_KEY or --key)")
    return ("the API key or token was refused (mistyped, revoked or expired): check the key your client sends "
            "(the mcpfleet CLI reads it from MCPFLEET_KEY or --key); an admin makes a new one with "
            "`mcpfleet keys create USER`")
