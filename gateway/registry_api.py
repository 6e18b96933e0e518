"""The registry's HTTP API under /registry/v1: publish, add (an existing server from PyPI), read, approve, revoke,
reject, withdraw, drift, usage, search, whoami.

Callers authenticate like MCP clients (an API key or an OAuth token as a bearer) or, from the
admin page, with its session (CSRF-checked). Publishers and admins publish; only admins approve,
revoke and accept drift; auditors read. Everything is scoped to the caller's tenant.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import psycopg
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from core.accounts import Identity
from core.text import storable
from gateway.admin.session import session_identity
from gateway.auth import identity_of
from registry import decisions, onboarding, store
from registry.changes import diff_offerings, diff_tools
from registry.decisions import Decision
from registry.service import MAX_WHEEL_BYTES
from registry.store import RegistryError

if TYPE_CHECKING:
    from gateway.fleet import Fleet

PUBLISHERS = ("admin", "publisher")
READERS = ("admin", "publisher", "auditor")
ADMINS = ("admin",)

Handler = Callable[[Request, Identity], Awaitable[Response]]


def _json(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(json.loads(json.dumps(data, default=_encode)), status_code=status)


def _encode(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON")


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def _guarded(fleet: Fleet, roles: tuple[str, ...], handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        identity = identity_of(request.scope) or await session_identity(request)
        if identity is None:
            return _error(401, "authenticate with an API key or token (Authorization: Bearer ...)")
        if identity.role not in roles:
            ip = request.client.host if request.client else "unknown"  # audited, bounded like other refusals
            fleet.calls.role_refused(identity, f"{request.method} {request.url.path}", roles, ip)
            return _error(403, f"role {identity.role!r} may not do this (needs {' or '.join(roles)})")
        if not all(storable(v) for v in request.path_params.values() if isinstance(v, str)):
            return _error(400, "the path holds a character no name or version may hold (NUL)")
        try:
            return await handler(request, identity)
        except RegistryError as exc:
            return _error(exc.status, exc.message)
        except psycopg.DataError as exc:  # text from the request that PostgreSQL cannot hold, wherever it was
            return _error(400, f"the request holds text that cannot be stored: {exc.diag.message_primary or exc}")

    return endpoint


def _name(request: Request) -> str:
    return f"{request.path_params['namespace']}/{request.path_params['server']}"


async def _body(request: Request) -> dict[str, Any]:
    if not (await request.body()).strip():
        return {}
    try:
        body = await request.json()
    except ValueError:
        raise RegistryError(400, "the body is not JSON") from None
    if not isinstance(body, dict):
        raise RegistryError(400, "the body must be a JSON object")
    return body


def _group(body: dict[str, Any], field: str = "group") -> str | None:
    value = body.get(field)
    if value is not None and not isinstance(value, str):
        raise RegistryError(400, f"{field} must be a string or null")
    return value or None


def _tools(body: dict[str, Any], field: str = "tools") -> list[str] | None:
    tools = body.get(field)
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, str) for t in tools)):
        raise RegistryError(400, f"{field} must be a list of the version's {field[:-1]} names, or null")
    return tools


def routes(fleet: Fleet) -> list[Route]:
    """The API over the fleet's registry, database and search (open while the app serves)."""

    async def publish(request: Request, who: Identity) -> Response:
        length = int(request.headers.get("content-length") or 0)
        if length > MAX_WHEEL_BYTES + 1024 * 1024:
            return _error(413, f"the upload is {length} bytes; at most {MAX_WHEEL_BYTES} are taken")
        try:
            form = await request.form(max_files=2, max_fields=4, max_part_size=MAX_WHEEL_BYTES)
        except Exception as exc:
            return _error(400, f"expected multipart/form-data with fields manifest and wheel ({exc})")
        manifest_text, wheel = form.get("manifest"), form.get("wheel")
        if manifest_text is not None and not isinstance(manifest_text, str):  # sent as a file part
            try:
                manifest_text = (await manifest_text.read()).decode()
            except UnicodeDecodeError:
                return _error(400, "the manifest is not UTF-8 text")
        if not manifest_text or wheel is None or isinstance(wheel, str):
            return _error(400, "expected multipart/form-data with the fields manifest (server.json) and wheel (a file)")
        try:
            document = json.loads(manifest_text)
        except ValueError as exc:
            return _error(400, f"the manifest is not JSON: {exc}")
        if not isinstance(document, dict):
            return _error(400, "the manifest must be a JSON object")
        data = await wheel.read()
        result = await fleet.registry.publish(who, document, data)
        result["url"] = f"/registry/v1/servers/{result['name']}/versions/{result['version']}"
        return _json(result, 202)

    async def add(request: Request, who: Identity) -> Response:
        """An existing MCP server from an index, by name (`registry.onboard`), published as an upload is."""
        body = await _body(request)
        source, name, command = body.get("source"), body.get("name"), body.get("command")
        if not isinstance(source, str) or not all(v is None or isinstance(v, str) for v in (name, command)):
            return _error(400, "expected a JSON object with source (pypi:NAME[==VERSION] or npm:NAME[@VERSION]) and optional name and command")
        result = await onboarding.add(fleet.registry, who, source, name=name, command=command)
        result["url"] = f"/registry/v1/servers/{result['name']}/versions/{result['version']}"
        return _json(result, 202)

    async def list_servers(request: Request, who: Identity) -> Response:
        async with fleet.pool.connection() as conn:
            return _json({"servers": await store.servers(conn, who.tenant)})

    async def show_version(request: Request, who: Identity) -> Response:
        async with fleet.pool.connection() as conn:
            row = await store.version(conn, who.tenant, _name(request), request.path_params["version"])
            servers = await store.servers(conn, who.tenant)
            approved = next(
                (v["version"] for s in servers if s["name"] == row["name"] for v in reversed(s["versions"])
                 if v["approvals"] and v["version"] != row["version"]),
                None,
            )
            before = await store.version(conn, who.tenant, row["name"], approved) if approved else None
        row.pop("id"), row.pop("server_id")
        row["diff"] = {
            "against": approved,
            "tools": diff_tools(before["tools"] if before else None, row["tools"]),
            "offerings": diff_offerings(before["offerings"] if before else None, row["offerings"]),
        }
        return _json(row)

    async def approve(request: Request, who: Identity) -> Response:
        body = await _body(request)
        async with fleet.pool.connection() as conn:
            result = await store.approve(
                conn, who, _name(request), request.path_params["version"], group=_group(body),
                override=bool(body.get("override")), tier=_group(body, "tier"), tools=_tools(body),
                prompts=_tools(body, "prompts"), resources=_tools(body, "resources"),
            )
        return _json({"approved": result})

    async def revoke(request: Request, who: Identity) -> Response:
        body = await _body(request)
        async with fleet.pool.connection() as conn:
            await store.revoke(conn, who, _name(request), request.path_params["version"], group=_group(body), tier=_group(body, "tier"))
        return _json({"revoked": {"name": _name(request), "version": request.path_params["version"], "group": _group(body)}})

    def decide(decision: Decision) -> Handler:
        async def handler(request: Request, who: Identity) -> Response:
            body = await _body(request)
            reason = body.get("reason")
            if reason is not None and not isinstance(reason, str):
                raise RegistryError(400, "reason must be a string")
            async with fleet.pool.connection() as conn:
                result = await decisions.decide(conn, who, _name(request), request.path_params["version"], decision, reason)
            return _json({decision: result})

        return handler

    async def list_drift(request: Request, who: Identity) -> Response:
        async with fleet.pool.connection() as conn:
            return _json({"drift": await store.drift(conn, who.tenant, open_only=request.query_params.get("all") is None)})

    async def accept_drift(request: Request, who: Identity) -> Response:
        async with fleet.pool.connection() as conn:
            return _json({"accepted": await store.accept_drift(conn, who, int(request.path_params["drift_id"]))})

    async def usage(request: Request, who: Identity) -> Response:
        async with fleet.pool.connection() as conn:
            return _json({"usage": await store.usage(conn, who.tenant)})

    async def search(request: Request, who: Identity) -> Response:
        query = request.query_params.get("q", "").strip()
        if not query:
            return _error(400, "give a query: ?q=...")
        try:
            limit = max(1, min(50, int(request.query_params.get("limit", "10"))))
        except ValueError:
            return _error(400, "limit must be a number")
        hits = await fleet.search(who, query, limit)
        return _json({"tools": [hit.as_dict() for hit in hits]})

    async def whoami(request: Request, who: Identity) -> Response:
        # Lets a command check its key (and the role it needs) before doing slow work.
        return _json({"user": who.user, "tenant": who.tenant, "role": who.role})

    version_path = "/registry/v1/servers/{namespace}/{server}/versions/{version}"
    return [
        Route("/registry/v1/whoami", _guarded(fleet, ("admin", "publisher", "member", "auditor"), whoami), methods=["GET"]),
        Route("/registry/v1/publish", _guarded(fleet, PUBLISHERS, publish), methods=["POST"]),
        Route("/registry/v1/add", _guarded(fleet, PUBLISHERS, add), methods=["POST"]),
        Route("/registry/v1/servers", _guarded(fleet, READERS, list_servers), methods=["GET"]),
        Route(version_path, _guarded(fleet, READERS, show_version), methods=["GET"]),
        Route(version_path + "/approve", _guarded(fleet, ADMINS, approve), methods=["POST"]),
        Route(version_path + "/revoke", _guarded(fleet, ADMINS, revoke), methods=["POST"]),
        Route(version_path + "/reject", _guarded(fleet, ADMINS, decide("rejected")), methods=["POST"]),
        Route(version_path + "/withdraw", _guarded(fleet, PUBLISHERS, decide("withdrawn")), methods=["POST"]),
        Route("/registry/v1/drift", _guarded(fleet, READERS, list_drift), methods=["GET"]),
        Route("/registry/v1/drift/{drift_id:int}/accept", _guarded(fleet, ADMINS, accept_drift), methods=["POST"]),
        Route("/registry/v1/usage", _guarded(fleet, READERS, usage), methods=["GET"]),
        Route("/registry/v1/search", _guarded(fleet, ("admin", "publisher", "member", "auditor"), search), methods=["GET"]),
    ]
