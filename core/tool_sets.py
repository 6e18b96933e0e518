"""Named tool sets per user: the tools (or `server__*` patterns) a client connecting with
`/mcp?set=NAME`, or with a key bound to the set, is shown. A set only narrows what is approved
for the user; the gateway filters by it (`gateway.tool_sets`)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import psycopg

from core import audit
from core.accounts import AccountError, Identity

NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# A public tool name (`server__tool`, or bare), or every tool of a server (`server__*`).
TOOL = re.compile(r"^[A-Za-z0-9._-]+(__[A-Za-z0-9._-]+|__\*)?$")
MAX_TOOLS = 500


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise AccountError(f"tool set names are 1-64 lower-case letters, digits, '.', '_' and '-': {name!r}")
    return name


def allows(patterns: Iterable[str], tool: str) -> bool:
    """Whether a public tool name is in a set: named exactly, or its server's `server__*`."""
    for pattern in patterns:
        if pattern == tool or (pattern.endswith("__*") and tool.startswith(pattern[:-1])):
            return True
    return False


async def set_tool_set(
    conn: psycopg.AsyncConnection, user: Identity, name: str, tools: list[str], *, actor: str | None = None
) -> None:
    """Create or replace the user's set `name`; audited."""
    check_name(name)
    tools = list(dict.fromkeys(t.strip() for t in tools if t.strip()))
    if not tools:
        raise AccountError("a tool set names at least one tool (server__tool or server__*)")
    if len(tools) > MAX_TOOLS:
        raise AccountError(f"a tool set names at most {MAX_TOOLS} tools")
    bad = [t for t in tools if not TOOL.match(t)]
    if bad:
        raise AccountError(f"not a tool name or server__* pattern: {', '.join(map(repr, bad))}")
    async with conn.transaction():
        await conn.execute(
            """INSERT INTO tool_sets (user_id, name, tools) VALUES (%s, %s, %s)
               ON CONFLICT (user_id, name) DO UPDATE SET tools = EXCLUDED.tools, updated_at = now()""",
            (user.user_id, name, tools),
        )
        await audit.append(conn, action="toolset.set", outcome="ok", tenant=user.tenant, actor=actor,
                           target=user.principal, detail={"set": name, "tools": tools})


async def list_tool_sets(conn: psycopg.AsyncConnection, user: Identity) -> list[dict[str, Any]]:
    cur = await conn.execute(
        """SELECT s.name, s.tools, s.updated_at,
                  (SELECT count(*) FROM api_keys k WHERE k.user_id = s.user_id AND k.tool_set = s.name
                      AND k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > now()))
             FROM tool_sets s WHERE s.user_id = %s ORDER BY s.name""",
        (user.user_id,),
    )
    return [{"name": r[0], "tools": list(r[1]), "updated": r[2], "keys": r[3]} for r in await cur.fetchall()]


async def remove_tool_set(conn: psycopg.AsyncConnection, user: Identity, name: str, *, actor: str | None = None) -> None:
    """Remove the set; keys bound to it are refused at /mcp from then on (they never fall back to every tool)."""
    async with conn.transaction():
        cur = await conn.execute("DELETE FROM tool_sets WHERE user_id = %s AND name = %s", (user.user_id, name))
        if cur.rowcount == 0:
            raise AccountError(f"{user.principal} has no tool set {name!r} (see `mcpfleet toolsets list`)")
        await audit.append(conn, action="toolset.remove", outcome="ok", tenant=user.tenant, actor=actor,
                           target=user.principal, detail={"set": name})


async def tools_of(conn: psycopg.AsyncConnection, user_id: int, name: str) -> tuple[str, ...] | None:
    """The user's set `name`, or None when they have none of that name."""
    cur = await conn.execute("SELECT tools FROM tool_sets WHERE user_id = %s AND name = %s", (user_id, name))
    row = await cur.fetchone()
    return tuple(row[0]) if row else None
