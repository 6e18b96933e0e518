"""Semantic search over the tools a caller may use: embeddings in tool_embeddings, ranked by
pgvector's cosine distance.

The embedding column is an untyped `vector` (models differ in dimensions), so it has no index:
search scans the embeddings of the caller's entitled versions, which are few.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from core import accounts
from core.accounts import Identity
from registry.embeddings import Embedder, tool_text

if TYPE_CHECKING:
    from registry.service import Registry


@dataclass(frozen=True)
class Hit:
    name: str  # public name, "<prefix>__<tool>"
    server: str  # registry server name, e.g. "io.example/weather"
    version: str
    description: str
    score: float  # cosine similarity: 1 is the same meaning

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def vector_literal(vector: Sequence[float]) -> str:
    """pgvector's text form, cast with ::vector in the query."""
    return "[" + ",".join(repr(float(x)) for x in vector) + "]"


async def index_version(
    conn: psycopg.AsyncConnection, embedder: Embedder, version_id: int, prefix: str, tools: list[dict]
) -> int:
    """(Re)writes the embeddings of a version's tools under the embedder's model; returns how many."""
    # Embed first: the transaction below must not wait on the model.
    vectors = await embedder.embed([tool_text(f"{prefix}__{tool['name']}", tool) for tool in tools])
    async with conn.transaction():
        await conn.execute(
            "DELETE FROM tool_embeddings WHERE version_id = %s AND model = %s", (version_id, embedder.model)
        )
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO tool_embeddings (version_id, tool, model, embedding) VALUES (%s, %s, %s, %s::vector)",
                [(version_id, tool["name"], embedder.model, vector_literal(v)) for tool, v in zip(tools, vectors)],
            )
    return len(tools)


# Per server, the version the caller runs: the approval for one of their groups if there is one
# (the more specific), else the tenant's, as registry.store.approved_for chooses. Only tools still
# among the version's definitions count, and only vectors of the query's model and dimensions.
SEARCH_SQL = """
WITH entitled AS (
    SELECT DISTINCT ON (s.id) s.name AS server, s.prefix, v.id AS version_id, v.version, v.tools
      FROM tenants t
      JOIN registry_servers s ON s.tenant_id = t.id
      JOIN approvals a ON a.server_id = s.id AND a.revoked_at IS NULL
      JOIN registry_versions v ON v.id = a.version_id
     WHERE t.name = %(tenant)s
       AND (a.group_name IS NULL OR a.group_name = ANY(%(groups)s::text[]))
     ORDER BY s.id, a.group_name IS NULL, a.approved_at DESC
), ranked AS (
    -- Two servers of a tenant may share a prefix: a public name is listed once, at its best.
    SELECT DISTINCT ON (name) name, server, version, description, distance
      FROM (
        SELECT en.prefix || '__' || e.tool AS name, en.server, en.version,
               coalesce(d.definition->>'description', '') AS description,
               e.embedding <=> %(query)s::vector AS distance
          FROM entitled en
          JOIN tool_embeddings e ON e.version_id = en.version_id
           AND e.model = %(model)s AND vector_dims(e.embedding) = %(dims)s
          JOIN LATERAL (
              SELECT definition FROM jsonb_array_elements(en.tools) AS definition
               WHERE definition->>'name' = e.tool LIMIT 1
          ) d ON true
      ) candidates
     ORDER BY name, distance
)
SELECT name, server, version, description, 1 - distance AS score
  FROM ranked
 ORDER BY distance, name
 LIMIT %(limit)s
"""


async def search(
    conn: psycopg.AsyncConnection,
    embedder: Embedder,
    query: str,
    *,
    tenant: str,
    groups: Sequence[str],
    limit: int = 10,
) -> list[Hit]:
    """The tools approved for `tenant` as a whole or for one of `groups`, nearest `query` in meaning first."""
    if limit <= 0 or not query.strip():
        return []
    [vector] = await embedder.embed([query])
    cur = await conn.execute(
        SEARCH_SQL,
        {
            "tenant": tenant,
            "groups": list(groups),
            "query": vector_literal(vector),
            "model": embedder.model,
            "dims": len(vector),
            "limit": limit,
        },
    )
    return [Hit(name, server, version, description, float(score)) for name, server, version, description, score
            in await cur.fetchall()]


async def unindexed_versions(conn: psycopg.AsyncConnection, model: str) -> list[tuple[int, str, list[dict]]]:
    """(version id, prefix, tools) of every version with tools but no embeddings under `model`."""
    cur = await conn.execute(
        "SELECT v.id, s.prefix, v.tools FROM registry_versions v JOIN registry_servers s ON s.id = v.server_id"
        " WHERE v.tools <> '[]'::jsonb AND NOT EXISTS"
        " (SELECT 1 FROM tool_embeddings e WHERE e.version_id = v.id AND e.model = %s)",
        (model,),
    )
    return await cur.fetchall()


class Index:
    """The embeddings of tool definitions, written through the fleet's pool with one embedder."""

    def __init__(self, pool: AsyncConnectionPool, embedder: Embedder):
        self.pool = pool
        self.embedder = embedder

    async def version(self, version_id: int, prefix: str, tools: list[dict[str, Any]]) -> None:
        """The registry's `indexer`: called with a version's tools once its trial run listed them."""
        async with self.pool.connection() as conn:
            await index_version(conn, self.embedder, version_id, prefix, tools)

    async def missing(self) -> None:
        async with self.pool.connection() as conn:
            for version_id, prefix, tools in await unindexed_versions(conn, self.embedder.model):
                await index_version(conn, self.embedder, version_id, prefix, tools)


class ToolSearch:
    """Search as the gateway offers it (`fleet__search_tools`, `/registry/v1/search`): the tools
    approved for the caller, nearest the query first. Definitions the registry recorded without
    embeddings (the built-ins') are indexed at the first search, not at start-up: the model is
    loaded only when someone searches."""

    def __init__(self, index: Index, registry: Registry):
        self.index = index
        self.registry = registry

    async def __call__(self, who: Identity, query: str, limit: int) -> list[Hit]:
        if self.registry.unindexed:
            self.registry.unindexed = False
            await self.index.missing()
        async with self.index.pool.connection() as conn:
            groups = await accounts.groups_of(conn, who.user_id)
            return await search(conn, self.index.embedder, query, tenant=who.tenant, groups=groups, limit=limit)
