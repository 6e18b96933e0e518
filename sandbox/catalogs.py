"""What each server in a sandbox offers (tools, resources, templates, prompts), fetched over the
channel on first use, all pages, and cached until the server says its lists changed or restarts.
Concurrent askers share one fetch; a fetch that an invalidation overtook is not cached."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from sandbox import wire
from sandbox.errors import SandboxRpcError

LISTS = (
    ("tools", "tools", "tools/list", "tools"),
    ("resources", "resources", "resources/list", "resources"),
    ("resourceTemplates", "resources", "resources/templates/list", "resourceTemplates"),
    ("prompts", "prompts", "prompts/list", "prompts"),
)
"""(catalog key, capability that announces it, list method, result key)."""
MAX_PAGES = 1000

Request = Callable[..., Awaitable[dict[str, Any]]]
"""`SupervisorClient.request`: (server, method, params) -> the result."""


class Catalogs:
    def __init__(self, request: Request, status_of: Callable[[str], dict[str, Any] | None]):
        self.request = request
        self.status_of = status_of
        self._catalog: dict[str, dict[str, Any]] = {}
        self._catalog_tasks: dict[str, asyncio.Task[dict[str, Any]]] = {}
        self._generation: dict[str, int] = {}

    async def of(self, names: Sequence[str]) -> dict[str, dict[str, Any]]:
        cached = self._catalog
        if all(name in cached for name in names):  # every call asks: no task per server when nothing is to fetch
            return {name: cached[name] for name in names}
        entries = await asyncio.gather(*(self._server_catalog(name) for name in names))
        return dict(zip(names, entries))

    def known(self) -> set[str]:
        """Servers whose lists were ever asked for or invalidated."""
        return set(self._generation)

    def invalidate(self, server: str) -> None:
        self._generation[server] = self._generation.get(server, 0) + 1
        self._catalog.pop(server, None)
        self._catalog_tasks.pop(server, None)

    async def _server_catalog(self, server: str) -> dict[str, Any]:
        cached = self._catalog.get(server)
        if cached is not None:
            return cached
        task = self._catalog_tasks.get(server)
        if task is None:
            task = asyncio.create_task(self._fetch_catalog(server, self._generation.get(server, 0)))
            self._catalog_tasks[server] = task
        try:
            return await asyncio.shield(task)
        finally:
            if task.done() and self._catalog_tasks.get(server) is task:
                del self._catalog_tasks[server]

    async def _fetch_catalog(self, server: str, generation: int) -> dict[str, Any]:
        status = self.status_of(server) or {"state": "failed", "error": "unknown server"}
        if status.get("state") in ("idle", "starting"):
            # Not up yet (servers start on first use, or it is restarting): its lists need it up,
            # so ask it something; the supervisor starts it, and tells its new status before the answer.
            status, generation = await self._started(server, status)
        initialize = status.get("initialize") or {}
        capabilities = initialize.get("capabilities") or {}
        entry: dict[str, Any] = {
            "state": status.get("state"),
            "error": status.get("error"),
            "serverInfo": initialize.get("serverInfo"),
            "capabilities": capabilities,
            "instructions": initialize.get("instructions"),
            "protocolVersion": initialize.get("protocolVersion"),
            **{key: [] for key, *_ in LISTS},
        }
        if status.get("state") != "ready":
            return entry
        wanted = [(key, method, field) for key, capability, method, field in LISTS if capability in capabilities]
        outcomes = await asyncio.gather(
            *(self._list_all(server, method, field) for _, method, field in wanted), return_exceptions=True
        )
        complete = True
        for (key, method, _), outcome in zip(wanted, outcomes):
            if isinstance(outcome, SandboxRpcError):
                entry["error"] = f"{method} failed: {outcome.message}"
                complete = False
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                entry[key] = outcome
        if complete and self._generation.get(server, 0) == generation:
            self._catalog[server] = entry
        return entry

    async def _started(self, server: str, status: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """`server`'s status once it started (or failed to), and the generation its lists are of then."""
        try:
            await self.request(server, "ping", None)
        except SandboxRpcError:
            pass  # a failed start says why in the status; a server without ping started all the same
        return self.status_of(server) or status, self._generation.get(server, 0)

    async def _list_all(self, server: str, method: str, field: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        cursor = None
        for _ in range(MAX_PAGES):
            result = await self.request(server, method, {"cursor": cursor} if cursor else None)
            items.extend(result.get(field) or [])
            cursor = result.get("nextCursor")
            if not cursor:
                return items
        raise SandboxRpcError(wire.INTERNAL_ERROR, f"{method} did not stop paginating after {MAX_PAGES} pages")
