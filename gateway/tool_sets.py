"""Which tool set a request is under, and the catalog narrowed to it.

The set comes from the key (`keys create --set`) or from `/mcp?set=NAME`; a key bound to a set cannot
be widened (or switched) by the query. A set only narrows the catalog the registry already guarded,
so it never grants a tool the user may not use. Unknown names are refused, never ignored: a client
that asked for a set must not silently see every tool.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace
from typing import Protocol

import mcp_types as types
from mcp.shared.exceptions import MCPError
from psycopg_pool import AsyncConnectionPool
from starlette.datastructures import QueryParams

from core import tool_sets
from core.accounts import Identity
from core.outage import OUTAGE_S, OutageCache
from gateway.catalog import Catalog

# A set's tools are read again after this long; `toolsets set`/`rm` reach connected clients within it.
CACHE_SECONDS = 5.0
QUERY_PARAM = "set"


@dataclass(frozen=True)
class ActiveSet:
    name: str
    tools: tuple[str, ...]

    def allows(self, public_name: str) -> bool:
        return tool_sets.allows(self.tools, public_name)

    def refusal(self, public_name: str) -> MCPError:
        return MCPError(
            code=types.INVALID_PARAMS,
            message=f"Tool {public_name!r} is not in tool set {self.name!r} this client connected with",
        )


class HasPool(Protocol):
    """`gateway.fleet.Fleet`: its pool exists once the app serves."""

    @property
    def pool(self) -> AsyncConnectionPool: ...


class ToolSets:
    def __init__(self, fleet: HasPool, outage_s: float = OUTAGE_S):
        self._fleet = fleet
        # Through a brief outage of the database, a set read in the last OUTAGE_S still narrows (core.outage).
        self.cache: OutageCache[tuple[int, str], ActiveSet] = OutageCache("Finding your tool set", fresh_s=CACHE_SECONDS,
                                                                           outage_s=outage_s)
        # catalog -> set name -> (the set as it was, the catalog narrowed to it)
        self._narrowed: weakref.WeakKeyDictionary[Catalog, dict[str, tuple[ActiveSet, Catalog]]] = (
            weakref.WeakKeyDictionary()
        )

    async def resolve(self, identity: Identity, requested: str | None) -> ActiveSet | None:
        """The set this request is under (None: every approved tool), or an MCPError saying why not."""
        if identity.tool_set is not None and requested not in (None, identity.tool_set):
            raise MCPError(
                code=types.INVALID_PARAMS,
                message=f"This key is bound to tool set {identity.tool_set!r}; connect without ?set= or with ?set={identity.tool_set}",
            )
        name = identity.tool_set or requested
        if name is None:
            return None
        async def load() -> tuple[ActiveSet, float | None] | None:
            async with self._fleet.pool.connection() as conn:
                tools = await tool_sets.tools_of(conn, identity.user_id, name)
            return None if tools is None else (ActiveSet(name, tools), None)

        active = await self.cache.get((identity.user_id, name), load)
        if active is None:  # not cached: a set defined a moment later works at once
            raise MCPError(
                code=types.INVALID_PARAMS,
                message=f"No tool set {name!r} for {identity.principal} (see `mcpfleet toolsets list {identity.user}`)",
            )
        return active

    def narrow(self, catalog: Catalog, active: ActiveSet | None) -> Catalog:
        """The catalog with only the set's tools (the same object while neither changes)."""
        if active is None:
            return catalog
        per_set = self._narrowed.setdefault(catalog, {})
        known = per_set.get(active.name)
        if known is None or known[0] != active:
            known = per_set[active.name] = (active, replace(
                catalog,
                tools=[tool for tool in catalog.tools if active.allows(tool["name"])],
                tool_owner={name: owner for name, owner in catalog.tool_owner.items() if active.allows(name)},
            ))
        return known[1]


def requested_set(request: object) -> str | None:
    """The set a client asked for in its URL (`/mcp?set=NAME`), from the HTTP request behind an MCP one."""
    scope = getattr(request, "scope", None) or {}
    return QueryParams(scope.get("query_string", b"")).get(QUERY_PARAM)
