"""What the admin console shows, read from the database one page at a time, within one tenant.

Every query here is scoped to the signed-in admin's tenant and paged (`PAGE_SIZE` rows, one more
fetched to know whether a next page exists), so no view grows with the fleet. Values come back
as plain dicts for the templates, which escape them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import psycopg
from psycopg.rows import dict_row

from registry.changes import diff_offerings, diff_tools

PAGE_SIZE = 25
# A pending version's row carries its approve and reject forms: fewer to a page.
VERSIONS_PAGE_SIZE = 10
VersionStatus = Literal["pending", "approved", "rejected"]
VERSION_STATUSES: tuple[VersionStatus, ...] = ("pending", "approved", "rejected")

_LIVE_APPROVAL = "EXISTS (SELECT 1 FROM approvals a WHERE a.version_id = v.id AND a.revoked_at IS NULL)"
# The server's newest other version with a live approval: what a pending version is compared with.
_APPROVED_BEFORE = (
    "(SELECT jsonb_build_object('version', w.version, 'tools', w.tools, 'offerings', w.offerings) FROM registry_versions w"
    "  WHERE w.server_id = v.server_id AND w.id <> v.id"
    "    AND EXISTS (SELECT 1 FROM approvals a WHERE a.version_id = w.id AND a.revoked_at IS NULL)"
    "  ORDER BY w.published_at DESC, w.id DESC LIMIT 1)"
)
_VERSION_FILTER = {
    # Not yet decided: neither approved (a live approval) nor closed (rejected or withdrawn).
    "pending": f"v.status IN ('validating', 'passed', 'failed') AND NOT s.builtin AND NOT {_LIVE_APPROVAL}",
    "approved": _LIVE_APPROVAL,
    "rejected": "v.status IN ('rejected', 'withdrawn')",
}


@dataclass
class Page:
    rows: list[dict[str, Any]]
    number: int
    has_next: bool
    extra: dict[str, Any] = field(default_factory=dict)


def page_number(raw: str | None) -> int:
    """The `page` query parameter as a number from 1 (anything else is page 1)."""
    try:
        return max(1, min(int(raw or 1), 1_000_000))
    except ValueError:
        return 1


async def _paged(conn: psycopg.AsyncConnection, sql: str, params: tuple[Any, ...], number: int,
                 size: int = PAGE_SIZE) -> Page:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(f"{sql} LIMIT %s OFFSET %s", (*params, size + 1, (number - 1) * size))
        rows = await cur.fetchall()
    return Page(rows=rows[:size], number=number, has_next=len(rows) > size)


async def versions(conn: psycopg.AsyncConnection, tenant: str, status: VersionStatus, number: int) -> Page:
    sql = (
        "SELECT s.name, v.version, v.status, v.published_at, u.name AS published_by, v.decided_by,"
        "       v.decision_reason, v.tools, v.offerings, v.validation, s.builtin,"
        "       coalesce((SELECT array_agg(coalesce('group ' || a.group_name, 'tenant') || coalesce(', tier ' || a.tier, '')"
        "                               || coalesce(', tools ' || array_to_string(a.tools, ' '), '')"
        "                               || ' by ' || a.approved_by ORDER BY a.approved_at)"
        "                 FROM approvals a WHERE a.version_id = v.id AND a.revoked_at IS NULL), '{}') AS approvals,"
        f"      {_APPROVED_BEFORE if status == 'pending' else 'NULL'} AS approved_before"
        "  FROM registry_versions v JOIN registry_servers s ON s.id = v.server_id"
        "  JOIN tenants t ON t.id = s.tenant_id LEFT JOIN users u ON u.id = v.published_by"
        f" WHERE t.name = %s AND {_VERSION_FILTER[status]} ORDER BY v.published_at DESC, v.id DESC"
    )
    page = await _paged(conn, sql, (tenant,), number, VERSIONS_PAGE_SIZE)
    for row in page.rows:
        row["failed"] = [c["check"] for c in row["validation"] if not c.get("ok")]
        row["tool_names"] = [t["name"] for t in row["tools"]]
        before = row.pop("approved_before")
        # A pending version of a server with an approved one: what changed, tool by tool, then prompt,
        # resource, template and instructions (as the registry API's diff).
        row["diff"] = {"against": before["version"], "tools": diff_tools(before["tools"], row["tools"]),
                       "offerings": diff_offerings(before["offerings"], row["offerings"] or {})} if before else None
    return page


async def tiers(conn: psycopg.AsyncConnection) -> list[str]:
    return [r[0] for r in await (await conn.execute("SELECT name FROM tiers ORDER BY name")).fetchall()]


async def groups(conn: psycopg.AsyncConnection, tenant: str) -> list[str]:
    cur = await conn.execute(
        "SELECT DISTINCT g.name FROM user_groups g JOIN users u ON u.id = g.user_id"
        " JOIN tenants t ON t.id = u.tenant_id WHERE t.name = %s ORDER BY 1",
        (tenant,),
    )
    return [r[0] for r in await cur.fetchall()]


async def drift(conn: psycopg.AsyncConnection, tenant: str, number: int) -> Page:
    sql = (
        "SELECT d.id, s.name AS server, v.version, d.tool, d.pinned_sha256, d.live_sha256, d.first_seen_at,"
        "       d.last_seen_at, (SELECT count(*) FROM tool_drift_sightings g WHERE g.drift_id = d.id) AS sandboxes"
        "  FROM tool_drift d JOIN registry_versions v ON v.id = d.version_id JOIN registry_servers s ON s.id = v.server_id"
        "  JOIN tenants t ON t.id = s.tenant_id"
        " WHERE t.name = %s AND d.resolved_at IS NULL ORDER BY d.first_seen_at DESC, d.id DESC"
    )
    return await _paged(conn, sql, (tenant,), number)


_USERS = (
    "SELECT u.id, u.name, u.role, u.tier, u.created_at, u.subject_issuer,"
    "       (SELECT count(*) FROM api_keys k WHERE k.user_id = u.id AND k.revoked_at IS NULL"
    "          AND (k.expires_at IS NULL OR k.expires_at > now())) AS live_keys,"
    "       (SELECT max(k.last_used_at) FROM api_keys k WHERE k.user_id = u.id) AS last_key_use,"
    "       (SELECT b.state FROM sandboxes b WHERE b.user_id = u.id ORDER BY b.updated_at DESC LIMIT 1) AS sandbox"
    "  FROM users u JOIN tenants t ON t.id = u.tenant_id WHERE t.name = %s"
)


async def users(conn: psycopg.AsyncConnection, tenant: str, number: int) -> Page:
    return await _paged(conn, f"{_USERS} ORDER BY u.name", (tenant,), number)


async def user(conn: psycopg.AsyncConnection, tenant: str, name: str) -> dict[str, Any] | None:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(f"{_USERS} AND u.name = %s", (tenant, name))
        return await cur.fetchone()


async def keys(conn: psycopg.AsyncConnection, tenant: str, number: int, *, user_name: str | None = None,
               live_only: bool = False) -> Page:
    conditions = ["t.name = %s"]
    params: list[Any] = [tenant]
    if user_name is not None:
        conditions.append("u.name = %s")
        params.append(user_name)
    if live_only:
        conditions.append("k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > now())")
    sql = (
        "SELECT k.prefix, u.name AS user, k.created_at, k.expires_at, k.last_used_at, k.revoked_at, k.tool_set,"
        "       CASE WHEN k.revoked_at IS NOT NULL THEN 'revoked'"
        "            WHEN k.expires_at IS NOT NULL AND k.expires_at <= now() THEN 'expired' ELSE 'live' END AS standing"
        "  FROM api_keys k JOIN users u ON u.id = k.user_id JOIN tenants t ON t.id = u.tenant_id"
        f" WHERE {' AND '.join(conditions)} ORDER BY k.created_at DESC, k.id DESC"
    )
    return await _paged(conn, sql, tuple(params), number)


LIVE_STATES = ("Pending", "Starting", "Running", "Hibernating", "Hibernated", "Resuming")


async def sandboxes(conn: psycopg.AsyncConnection, tenant: str, number: int, *, live_only: bool) -> Page:
    sql = (
        "SELECT b.id, u.id AS user_id, u.name AS user, b.state, coalesce(b.tier, u.tier) AS tier, b.backend,"
        "       b.last_used_at, b.updated_at, b.hibernated_at, b.checkpoint_bytes, b.reason"
        "  FROM sandboxes b JOIN users u ON u.id = b.user_id JOIN tenants t ON t.id = u.tenant_id"
        f" WHERE t.name = %s {'AND b.state = ANY(%s)' if live_only else ''}"
        " ORDER BY b.updated_at DESC, b.id"
    )
    return await _paged(conn, sql, (tenant, list(LIVE_STATES)) if live_only else (tenant,), number)


async def sandbox_of(conn: psycopg.AsyncConnection, user_id: int) -> dict[str, Any] | None:
    """The user's latest sandbox (live or not)."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "SELECT state, last_used_at, coalesce(tier, '') AS tier FROM sandboxes WHERE user_id = %s"
            " ORDER BY updated_at DESC LIMIT 1",
            (user_id,),
        )
        return await cur.fetchone()


async def user_in_tenant(conn: psycopg.AsyncConnection, tenant: str, user_id: int) -> str | None:
    """The name of the user with this id if they are of `tenant` (an admin acts on their own tenant only)."""
    cur = await conn.execute(
        "SELECT u.name FROM users u JOIN tenants t ON t.id = u.tenant_id WHERE u.id = %s AND t.name = %s", (user_id, tenant)
    )
    row = await cur.fetchone()
    return row[0] if row else None


AUDIT_FILTERS = ("action", "actor", "target", "outcome")


async def audit(conn: psycopg.AsyncConnection, tenant: str, number: int, filters: dict[str, str]) -> Page:
    """Newest first. `action` matches a prefix (`registry.` finds every registry entry); `actor` and
    `target` match a part; `outcome` matches exactly."""
    conditions, params = ["tenant = %s"], [tenant]
    if filters.get("action"):
        conditions.append("starts_with(action, %s)")
        params.append(filters["action"])
    for name in ("actor", "target"):
        if filters.get(name):
            conditions.append(f"strpos({name}, %s) > 0")
            params.append(filters[name])
    if filters.get("outcome"):
        conditions.append("outcome = %s")
        params.append(filters["outcome"])
    sql = (
        "SELECT id, at, actor, action, target, outcome, detail::text AS detail FROM audit_entries"
        f" WHERE {' AND '.join(conditions)} ORDER BY id DESC"
    )
    return await _paged(conn, sql, tuple(params), number)


async def tool_call_usage(conn: psycopg.AsyncConnection, tenant: str, number: int) -> Page:
    """Tool calls per user per day, with errors, from the audit log's `tool.call` entries (what exists
    today; model usage has a table of its own)."""
    sql = (
        "SELECT date_trunc('day', at AT TIME ZONE 'UTC')::date AS day, actor AS user, count(*) AS calls,"
        "       count(*) FILTER (WHERE outcome <> 'ok') AS errors, count(DISTINCT target) AS tools"
        "  FROM audit_entries WHERE tenant = %s AND action = 'tool.call'"
        " GROUP BY 1, 2 ORDER BY 1 DESC, 3 DESC, 2"
    )
    return await _paged(conn, sql, (tenant,), number)


async def tenants(conn: psycopg.AsyncConnection, tenant: str) -> list[dict[str, Any]]:
    """The admin's own tenant: an admin is an admin of one tenant and sees nothing of the others."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "SELECT t.name, t.created_at, t.max_running, t.conformance,"
            "       (SELECT count(*) FROM users u WHERE u.tenant_id = t.id) AS users,"
            "       (SELECT count(*) FROM users u WHERE u.tenant_id = t.id AND u.role = 'admin') AS admins,"
            "       (SELECT count(*) FROM sandboxes b JOIN users u ON u.id = b.user_id"
            "         WHERE u.tenant_id = t.id AND b.state = 'Running') AS running,"
            "       (SELECT count(*) FROM sandboxes b JOIN users u ON u.id = b.user_id"
            "         WHERE u.tenant_id = t.id AND b.state = 'Hibernated') AS hibernated,"
            "       (SELECT count(*) FROM registry_servers s WHERE s.tenant_id = t.id AND NOT s.builtin) AS servers,"
            "       (SELECT count(*) FROM issuers i WHERE i.tenant_id = t.id) AS issuers"
            "  FROM tenants t WHERE t.name = %s",
            (tenant,),
        )
        return await cur.fetchall()
