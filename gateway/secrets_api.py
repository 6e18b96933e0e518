"""Secrets over HTTP, under /api: a user sets their own, admins their tenant's.

    GET    /api/secrets                                  the caller's secrets and the tenant's (names, never values)
    PUT    /api/secrets/{namespace}/{server}/{NAME}      set or rotate the caller's own: {"value": "..."}
                                                   (?force=1: even if no approved server declares NAME)
    DELETE /api/secrets/{namespace}/{server}/{NAME}
    PUT    /api/tenant-secrets/{namespace}/{server}/{NAME}   admins: the tenant-wide value (every user's fallback)
    DELETE /api/tenant-secrets/{namespace}/{server}/{NAME}

A user's key (or token) reaches only that user's secrets: the path holds no user, the caller's
identity decides. Values go in and never come out; changes are audited with names only. A PUT of a
name that no approved server of the tenant declares for that server is refused (409, naming what is
declared) unless it says `?force=1`: setting ahead of an approval is a choice, a typo is not.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from core.accounts import Identity
from core.vault import SecretError, VaultUnavailable, remove_secret, set_secret
from gateway.admin.session import session_identity
from gateway.auth import identity_of
from registry.secret_names import UndeclaredSecret, check_declared

if TYPE_CHECKING:
    from gateway.fleet import Fleet

Handler = Callable[[Request, Identity, "str | None"], Awaitable[Response]]
MAX_BODY = 128 * 1024


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def routes(fleet: Fleet) -> list[Route]:
    def guarded(handler: Handler, *, tenant_wide: bool = False) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            identity = identity_of(request.scope) or await session_identity(request)
            if identity is None:
                return _error(401, "authenticate with an API key or token (Authorization: Bearer ...)")
            if tenant_wide and identity.role != "admin":
                ip = request.client.host if request.client else "unknown"
                fleet.calls.role_refused(identity, f"{request.method} {request.url.path}", ("admin",), ip)
                return _error(403, f"role {identity.role!r} may not set tenant-wide secrets (needs admin)")
            try:
                return await handler(request, identity, None if tenant_wide else identity.user)
            except SecretError as exc:  # Vault down included: its message names no value
                return _error(503 if isinstance(exc, VaultUnavailable) else 400, str(exc))

        return endpoint

    def where(request: Request) -> tuple[str, str]:
        p = request.path_params
        return f"{p['namespace']}/{p['server']}", p["name"]

    async def list_(request: Request, who: Identity, user: str | None) -> Response:
        own = await fleet.secrets.list_secrets(who.tenant, who.user)
        shared = await fleet.secrets.list_secrets(who.tenant, None)
        return JSONResponse({"secrets": [s.as_dict() for s in own], "tenant": [s.as_dict() for s in shared]})

    async def put(request: Request, who: Identity, user: str | None) -> Response:
        body = await request.body()
        if len(body) > MAX_BODY:
            return _error(413, f"at most {MAX_BODY} bytes")
        try:
            value = json.loads(body).get("value")
        except (ValueError, AttributeError):
            value = None
        if not isinstance(value, str):
            return _error(400, 'send {"value": "..."} as JSON')
        server, name = where(request)
        async with fleet.pool.connection() as conn:
            if request.query_params.get("force", "").lower() not in ("1", "true", "yes"):
                try:
                    await check_declared(conn, who.tenant, server, name)
                except UndeclaredSecret as exc:
                    return _error(409, str(exc).replace("use --force (API: ?force=1)", "add ?force=1"))
            version = await set_secret(fleet.secrets, conn, actor=who.principal, tenant=who.tenant, user=user,
                                       server=server, name=name, value=value)
        return JSONResponse({"server": server, "name": name, "version": version, "user": user, "tenant": who.tenant})

    async def delete(request: Request, who: Identity, user: str | None) -> Response:
        server, name = where(request)
        async with fleet.pool.connection() as conn:
            removed = await remove_secret(fleet.secrets, conn, actor=who.principal, tenant=who.tenant, user=user,
                                          server=server, name=name)
        if not removed:
            return _error(404, f"no secret {name} for {server}")
        return Response(status_code=204)

    own = "/api/secrets/{namespace}/{server}/{name}"
    shared = "/api/tenant-secrets/{namespace}/{server}/{name}"
    return [
        Route("/api/secrets", guarded(list_), methods=["GET"]),
        Route(own, guarded(put), methods=["PUT"]),
        Route(own, guarded(delete), methods=["DELETE"]),
        Route(shared, guarded(put, tenant_wide=True), methods=["PUT"]),
        Route(shared, guarded(delete, tenant_wide=True), methods=["DELETE"]),
    ]
