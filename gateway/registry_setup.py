"""The registry as the gateway opens it: the sandbox manager's server source, the scanner,
search over embeddings, and the router told when what users may use changes."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from psycopg_pool import AsyncConnectionPool

from core.accounts import Identity
from core.settings import Settings
from gateway.routing import Router
from registry.embeddings import embedder_from_env
from registry.scan import scan_tools
from registry.search import Hit, index_version, search
from registry.service import Registry
from sandbox.factory import sandbox_python

log = logging.getLogger(__name__)

SearchFunction = Callable[[Identity, str, int], Awaitable[list[Hit]]]


async def open_registry(
    settings: Settings, pool: AsyncConnectionPool, database_url: str | None, manager: Any, router: Router
) -> tuple[Registry, SearchFunction]:
    """Made before the manager starts, so its first sandboxes already run what the registry approves."""
    embedder = embedder_from_env()

    async def index(version_id: int, prefix: str, tools: list[dict[str, Any]]) -> None:
        async with pool.connection() as conn:
            await index_version(conn, embedder, version_id, prefix, tools)

    async def index_missing() -> None:
        async with pool.connection() as conn:
            cur = await conn.execute(
                "SELECT v.id, s.prefix, v.tools FROM registry_versions v JOIN registry_servers s ON s.id = v.server_id"
                " WHERE v.tools <> '[]'::jsonb AND NOT EXISTS"
                " (SELECT 1 FROM tool_embeddings e WHERE e.version_id = v.id AND e.model = %s)",
                (embedder.model,),
            )
            for version_id, prefix, tools in await cur.fetchall():
                await index_version(conn, embedder, version_id, prefix, tools)

    async def search_tools(who: Identity, query: str, limit: int) -> list[Hit]:
        if registry.unindexed:
            registry.unindexed = False
            await index_missing()
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT name FROM user_groups WHERE user_id = %s", (who.user_id,))
            groups = [name for (name,) in await cur.fetchall()]
            return await search(conn, embedder, query, tenant=who.tenant, groups=groups, limit=limit)

    registry = Registry(
        settings.home, pool, manager.backend, sandbox_python(), scan=scan_tools, indexer=index,
        artifacts_s3_url=settings.artifacts_s3_url,
    )
    registry.on_change.append(router.tools_changed)
    await registry.start(database_url)
    manager.servers = registry
    return registry, search_tools
