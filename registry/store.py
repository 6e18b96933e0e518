"""The registry's rows: servers, their immutable versions, approvals with pins, drift and usage.

Every change that matters to trust (publish, validation, approval, revocation, accepted drift)
is appended to the audit log in the transaction that makes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from core import audit
from core.accounts import Identity
from registry.definitions import PROMPTS, RESOURCES, TEMPLATES, offering_pins, pins_of, tool_pin_count


class RegistryError(Exception):
    """A registry request that cannot be honoured; `status` is the HTTP status that says so."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Approved:
    """A server version a user may run, as approved for them."""

    server: str
    prefix: str
    version: str
    version_id: int
    builtin: bool
    artifact_sha256: str | None
    pins: dict[str, str]
    tools: frozenset[str] | None = None
    """The tools of the version the approval allows (None: all)."""
    prompts: frozenset[str] | None = None
    """The prompts it allows (None: all); an approval of some tools allows no prompt it does not name."""
    resources: frozenset[str] | None = None
    """The resource URIs and URI templates it allows (None: all), as for prompts."""
    accepted: dict[str, frozenset[str]] = field(default_factory=dict)
    """Pin key (a tool's own name, `prompt:<name>`, …) -> definitions an admin accepted for the
    version after approving it."""
    layer_sha256: str | None = None
    """The dependency layer the approval approved (`registry.dependencies`); None: none."""

    def allows(self, key: str, sha256: str) -> bool:
        """Whether this definition may be offered: the pinned one, or one accepted since."""
        return self.pins.get(key) == sha256 or sha256 in self.accepted.get(key, ())


def allowed(listed: list[str] | None, tools: list[str] | None) -> frozenset[str] | None:
    """What an approval's `prompts` or `resources` column allows: the names it lists; when it lists
    none, everything for an approval of all tools and nothing for an approval of some."""
    if listed is not None:
        return frozenset(listed)
    return None if tools is None else frozenset()


async def _tenant_id(conn: psycopg.AsyncConnection, tenant: str) -> int:
    cur = await conn.execute("SELECT id FROM tenants WHERE name = %s", (tenant,))
    row = await cur.fetchone()
    if row is None:
        raise RegistryError(404, f"no tenant named {tenant!r}")
    return row[0]


async def publish(
    conn: psycopg.AsyncConnection,
    who: Identity,
    *,
    name: str,
    prefix: str,
    version: str,
    manifest: dict[str, Any],
    artifact_sha256: str,
    artifact_bytes: int,
) -> int:
    """A new version, status `validating`; a version that exists is refused (409), whatever its content."""
    async with conn.transaction():
        tenant_id = await _tenant_id(conn, who.tenant)
        cur = await conn.execute(
            "INSERT INTO registry_servers (tenant_id, name, prefix) VALUES (%s, %s, %s)"
            " ON CONFLICT (tenant_id, name) DO UPDATE SET prefix = registry_servers.prefix RETURNING id, prefix, builtin",
            (tenant_id, name, prefix),
        )
        server_id, known_prefix, builtin = await cur.fetchone()  # type: ignore[misc]
        if builtin:
            raise RegistryError(403, f"{name} is a built-in server; it ships with mcpfleet")
        if known_prefix != prefix:
            raise RegistryError(409, f"{name} has prefix {known_prefix!r}, not {prefix!r}")
        try:
            async with conn.transaction():
                cur = await conn.execute(
                    "INSERT INTO registry_versions (server_id, version, manifest, artifact_sha256, artifact_bytes, published_by)"
                    " VALUES (%s, %s, %s, %s, %s, %s) RETURNING id",
                    (server_id, version, Jsonb(manifest), artifact_sha256, artifact_bytes, who.user_id),
                )
        except psycopg.errors.UniqueViolation:
            raise RegistryError(409, f"{name} {version} is already published; versions are immutable, publish a new one") from None
        version_id = (await cur.fetchone())[0]  # type: ignore[index]
        await audit.append(
            conn,
            action="registry.publish",
            outcome="ok",
            tenant=who.tenant,
            actor=who.user,
            target=f"{name}@{version}",
            detail={"sha256": artifact_sha256, "bytes": artifact_bytes},
        )
    return version_id


async def record_layer(conn: psycopg.AsyncConnection, version_id: int, layer_sha256: str | None, layer: list[dict[str, Any]]) -> None:
    """The dependencies validation resolved for the version (kept once: versions are immutable)."""
    await conn.execute(
        "UPDATE registry_versions SET layer_sha256 = %s, layer = %s WHERE id = %s AND layer_sha256 IS NULL",
        (layer_sha256, Jsonb(layer), version_id),
    )


async def record_validation(
    conn: psycopg.AsyncConnection,
    version_id: int,
    *,
    validation: list[dict[str, Any]],
    tools: list[dict[str, Any]],
    start_ms: int | None,
    memory_bytes: int | None,
    offerings: dict[str, Any] | None = None,
) -> str:
    status = "passed" if all(check["ok"] for check in validation) else "failed"
    async with conn.transaction():
        cur = await conn.execute(
            # A version rejected or withdrawn while it was validated keeps that status.
            "UPDATE registry_versions SET status = CASE WHEN status IN ('rejected', 'withdrawn') THEN status ELSE %s END,"
            " validation = %s, tools = %s, start_ms = %s, memory_bytes = %s,"
            " offerings = %s, validated_at = now() WHERE id = %s RETURNING (SELECT t.name FROM tenants t JOIN registry_servers s"
            " ON s.tenant_id = t.id WHERE s.id = server_id), (SELECT name FROM registry_servers WHERE id = server_id), version",
            (status, Jsonb(validation), Jsonb(tools), start_ms, memory_bytes, Jsonb(offerings or {}), version_id),
        )
        tenant, name, version = await cur.fetchone()  # type: ignore[misc]
        await audit.append(
            conn,
            action="registry.validate",
            outcome=status,
            tenant=tenant,
            actor="mcpfleet",
            target=f"{name}@{version}",
            detail={"failed": [c["check"] for c in validation if not c["ok"]]},
        )
    return status


_VERSION = """
SELECT v.id, s.id AS server_id, s.name, s.prefix, s.builtin, v.version, v.manifest, v.artifact_sha256,
       v.artifact_bytes, v.published_at, u.name AS published_by, v.status, v.validation, v.tools,
       v.start_ms, v.memory_bytes, v.validated_at, v.offerings, v.decided_by, v.decision_reason, v.layer_sha256, v.layer
  FROM registry_versions v JOIN registry_servers s ON s.id = v.server_id
  JOIN tenants t ON t.id = s.tenant_id LEFT JOIN users u ON u.id = v.published_by
"""


async def version(conn: psycopg.AsyncConnection, tenant: str, name: str, version: str) -> dict[str, Any]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(_VERSION + " WHERE t.name = %s AND s.name = %s AND v.version = %s", (tenant, name, version))
    row = await cur.fetchone()
    if row is None:
        raise RegistryError(404, f"no version {version} of {name} in tenant {tenant}")
    row["approvals"] = await approvals_of(conn, row["id"])
    return row


async def approvals_of(conn: psycopg.AsyncConnection, version_id: int, *, live_only: bool = True) -> list[dict[str, Any]]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        "SELECT group_name AS group, tier, tools, prompts, resources, approved_by, approved_at, override, revoked_by, revoked_at FROM approvals"
        f" WHERE version_id = %s {'AND revoked_at IS NULL' if live_only else ''} ORDER BY approved_at",
        (version_id,),
    )
    return await cur.fetchall()


async def servers(conn: psycopg.AsyncConnection, tenant: str) -> list[dict[str, Any]]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        "SELECT s.name, s.prefix, s.builtin, v.id, v.version, v.status, v.published_at, u.name AS published_by"
        "  FROM registry_servers s JOIN tenants t ON t.id = s.tenant_id"
        "  JOIN registry_versions v ON v.server_id = s.id LEFT JOIN users u ON u.id = v.published_by"
        " WHERE t.name = %s ORDER BY s.name, v.published_at",
        (tenant,),
    )
    rows = await cur.fetchall()
    await cur.execute(
        "SELECT a.version_id, a.group_name AS group, a.tier, a.tools, a.prompts, a.resources, a.approved_by, a.approved_at, a.override FROM approvals a"
        " JOIN registry_servers s ON s.id = a.server_id JOIN tenants t ON t.id = s.tenant_id"
        " WHERE t.name = %s AND a.revoked_at IS NULL",
        (tenant,),
    )
    by_version: dict[int, list[dict[str, Any]]] = {}
    for approval in await cur.fetchall():
        by_version.setdefault(approval.pop("version_id"), []).append(approval)
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = out.setdefault(row["name"], {"name": row["name"], "prefix": row["prefix"], "builtin": row["builtin"], "versions": []})
        entry["versions"].append(
            {
                "version": row["version"],
                "status": row["status"],
                "published_at": row["published_at"],
                "published_by": row["published_by"],
                "approvals": by_version.get(row["id"], []),
            }
        )
    return list(out.values())


async def approve(
    conn: psycopg.AsyncConnection,
    who: Identity,
    name: str,
    version_: str,
    *,
    group: str | None,
    override: bool,
    tier: str | None = None,
    tools: list[str] | None = None,
    prompts: list[str] | None = None,
    resources: list[str] | None = None,
) -> dict[str, Any]:
    """Bind the version to the tenant (or a group), pinning every definition validation recorded:
    tools, prompts, resources, resource templates, the server's instructions. `tools`, `prompts`
    and `resources` (URIs or URI templates) narrow what it allows (see `allowed`).
    Replaces the server's approval for the same scope. Refused (409) for a version that failed
    validation without `override`, or whose prefix another approved server of the tenant has."""
    async with conn.transaction():
        row = await version(conn, who.tenant, name, version_)
        if row["status"] == "validating":
            raise RegistryError(409, f"{name} {version_} is still being validated")
        if row["status"] in ("rejected", "withdrawn"):
            raise RegistryError(409, f"{name} {version_} was {row['status']}; publish a new version instead")
        failed = [c["check"] for c in row["validation"] if not c["ok"]]
        if failed and not override:
            raise RegistryError(
                409, f"{name} {version_} failed validation ({', '.join(failed)}); to run it anyway, approve it with "
                f"`mcpfleet registry approve {name} {version_} --override` (audited)"
            )
        cur = await conn.execute(
            "SELECT s.name FROM approvals a JOIN registry_servers s ON s.id = a.server_id"
            " WHERE a.revoked_at IS NULL AND s.prefix = %s AND s.id <> %s AND s.tenant_id ="
            " (SELECT tenant_id FROM registry_servers WHERE id = %s) LIMIT 1",
            (row["prefix"], row["server_id"], row["server_id"]),
        )
        clash = await cur.fetchone()
        if clash is not None:
            raise RegistryError(409, f"prefix {row['prefix']!r} of {name} is taken by the approved server {clash[0]}")
        if tools is not None:
            unknown = sorted(set(tools) - {t["name"] for t in row["tools"]})
            if unknown or not tools:
                raise RegistryError(400, f"{name} {version_} has no tool(s) {', '.join(unknown)}" if unknown else "name at least one tool")
        offerings = row["offerings"] or {}
        for kind, asked, known in (
            ("prompt", prompts, {p.get(PROMPTS.ident) for p in offerings.get(PROMPTS.listing) or []}),
            ("resource", resources, {r.get(RESOURCES.ident) for r in offerings.get(RESOURCES.listing) or []}
             | {t.get(TEMPLATES.ident) for t in offerings.get(TEMPLATES.listing) or []}),
        ):
            if unknown := sorted(set(asked or ()) - known):
                raise RegistryError(400, f"{name} {version_} has no {kind}(s) {', '.join(unknown)}")
        if tier is not None:
            cur = await conn.execute("SELECT 1 FROM tiers WHERE name = %s", (tier,))
            if await cur.fetchone() is None:
                raise RegistryError(400, f"no tier named {tier!r}")
        await conn.execute(
            "UPDATE approvals SET revoked_at = now(), revoked_by = %s WHERE server_id = %s"
            " AND coalesce(group_name, '') = coalesce(%s, '') AND coalesce(tier, '') = coalesce(%s, '') AND revoked_at IS NULL",
            (who.user, row["server_id"], group, tier),
        )
        # Offerings' pins after the tools': a tool named like one (against MCP's naming rules) stays withheld.
        pins = {**pins_of(row["tools"]), **offering_pins(offerings)} if not row["builtin"] else {}
        prompts = sorted(set(prompts)) if prompts is not None else None
        resources = sorted(set(resources)) if resources is not None else None
        await conn.execute(
            "INSERT INTO approvals (version_id, server_id, group_name, tier, tools, prompts, resources, pins, override, approved_by,"
            " layer_sha256) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (row["id"], row["server_id"], group, tier, sorted(tools) if tools else None, prompts, resources, Jsonb(pins),
             bool(failed) and override, who.user, row["layer_sha256"]),
        )
        await audit.append(
            conn,
            action="registry.approve",
            outcome="ok",
            tenant=who.tenant,
            actor=who.user,
            target=f"{name}@{version_}",
            detail={"group": group, "tier": tier, "tools": tools, "prompts": prompts, "resources": resources,
                    "override": bool(failed) and override, "failed_checks": failed, "pins": pins,
                    "layer_sha256": row["layer_sha256"]},
        )
    return {"name": name, "version": version_, "group": group, "tier": tier, "tools": tools, "prompts": prompts,
            "resources": resources, "pins": pins, "tool_pins": tool_pin_count(pins), "override": bool(failed) and override,
            "layer_sha256": row["layer_sha256"]}


async def revoke(
    conn: psycopg.AsyncConnection, who: Identity, name: str, version_: str, *, group: str | None, tier: str | None = None
) -> int:
    async with conn.transaction():
        row = await version(conn, who.tenant, name, version_)
        cur = await conn.execute(
            "UPDATE approvals SET revoked_at = now(), revoked_by = %s"
            " WHERE version_id = %s AND coalesce(group_name, '') = coalesce(%s, '') AND coalesce(tier, '') = coalesce(%s, '')"
            " AND revoked_at IS NULL",
            (who.user, row["id"], group, tier),
        )
        if cur.rowcount == 0:
            scope = ("group " + group if group else "the tenant") + (f" on tier {tier}" if tier else "")
            raise RegistryError(404, f"{name} {version_} has no approval for {scope}")
        await audit.append(
            conn, action="registry.revoke", outcome="ok", tenant=who.tenant, actor=who.user, target=f"{name}@{version_}",
            detail={"group": group, "tier": tier},
        )
    return cur.rowcount


async def approved_for(conn: psycopg.AsyncConnection, user_id: int) -> list[Approved]:
    """What the user may run: per server, the most specific of its approvals that match the user's
    attributes (one of their groups before the whole tenant, their tier before any tier)."""
    cur = await conn.execute(
        """
        SELECT DISTINCT ON (s.id) s.name, s.prefix, v.version, v.id, s.builtin, v.artifact_sha256, a.pins, a.tools,
               a.prompts, a.resources, a.layer_sha256
          FROM users u
          JOIN registry_servers s ON s.tenant_id = u.tenant_id
          JOIN approvals a ON a.server_id = s.id AND a.revoked_at IS NULL
          JOIN registry_versions v ON v.id = a.version_id
         WHERE u.id = %s
           AND (a.group_name IS NULL OR a.group_name IN (SELECT name FROM user_groups WHERE user_id = u.id))
           AND (a.tier IS NULL OR a.tier = u.tier)
         ORDER BY s.id, a.group_name IS NULL, a.tier IS NULL, a.approved_at DESC
        """,
        (user_id,),
    )
    rows = await cur.fetchall()
    cur = await conn.execute(
        "SELECT version_id, tool, sha256 FROM accepted_definitions WHERE version_id = ANY(%s)", ([row[3] for row in rows],)
    )
    accepted: dict[int, dict[str, set[str]]] = {}
    for version_id, tool, sha256 in await cur.fetchall():
        accepted.setdefault(version_id, {}).setdefault(tool, set()).add(sha256)
    return [
        Approved(
            n, p, ver, vid, b, sha, pins, frozenset(tools) if tools is not None else None,
            allowed(prompts, tools), allowed(resources, tools),
            {key: frozenset(hashes) for key, hashes in accepted.get(vid, {}).items()}, layer,
        )
        for n, p, ver, vid, b, sha, pins, tools, prompts, resources, layer in rows
    ]


async def ensure_builtins(conn: psycopg.AsyncConnection, tenant_id: int, builtins: list[tuple[str, str, str]]) -> None:
    """The built-in servers as registry entries of a tenant, approved for it the first time they are
    entered (an admin's later revocation stays)."""
    for name, prefix, product_version in builtins:
        async with conn.transaction():
            cur = await conn.execute(
                "INSERT INTO registry_servers (tenant_id, name, prefix, builtin) VALUES (%s, %s, %s, true)"
                " ON CONFLICT (tenant_id, name) DO NOTHING RETURNING id",
                (tenant_id, name, prefix),
            )
            created = await cur.fetchone()
            cur = await conn.execute(
                "INSERT INTO registry_versions (server_id, version, manifest, status, validated_at)"
                " SELECT id, %s, %s, 'passed', now() FROM registry_servers WHERE tenant_id = %s AND name = %s"
                " ON CONFLICT (server_id, version) DO NOTHING RETURNING id, server_id",
                (product_version, Jsonb({"name": name, "version": product_version, "builtin": True}), tenant_id, name),
            )
            new_version = await cur.fetchone()
            if created is not None and new_version is not None:
                await conn.execute(
                    "INSERT INTO approvals (version_id, server_id, pins, approved_by) VALUES (%s, %s, '{}', 'mcpfleet')",
                    new_version,
                )
            elif new_version is not None:
                # The product was upgraded: the approvals of its built-in server follow it.
                await conn.execute(
                    "UPDATE approvals SET version_id = %s WHERE server_id = %s AND revoked_at IS NULL", new_version
                )


async def record_builtin_tools(conn: psycopg.AsyncConnection, version_id: int, tools: list[dict[str, Any]]) -> bool:
    """A built-in version's definitions, recorded the first time a sandbox lists them (for search and the admin page)."""
    cur = await conn.execute(
        "UPDATE registry_versions SET tools = %s WHERE id = %s AND tools = '[]'::jsonb", (Jsonb(tools), version_id)
    )
    return cur.rowcount > 0


DriftRecorded = Literal["new", "seen", "capped"]


async def record_drift(
    conn: psycopg.AsyncConnection,
    approved: Approved,
    tool: str,
    live_sha256: str,
    definition: dict[str, Any],
    user_id: int,
    *,
    per_sandbox: int,
) -> DriftRecorded:
    """A live definition that differs from its pin, as the sandbox of `user_id` listed it.

    One drift per version, tool and definition, and one sighting of it per user; a sighting new
    for this user is audited, in that user's name. A sandbox that has had `per_sandbox` distinct
    definitions of this version recorded gets no more ("capped"): what it lists is still withheld.
    """
    async with conn.transaction():
        cur = await conn.execute(
            "UPDATE tool_drift_sightings g SET last_seen_at = now() FROM tool_drift d WHERE g.drift_id = d.id"
            " AND g.user_id = %s AND d.version_id = %s AND d.tool = %s AND d.live_sha256 = %s",
            (user_id, approved.version_id, tool, live_sha256),
        )
        if cur.rowcount:
            return "seen"
        cur = await conn.execute(
            "SELECT count(*) FROM tool_drift_sightings WHERE user_id = %s AND version_id = %s", (user_id, approved.version_id)
        )
        if (await cur.fetchone())[0] >= per_sandbox:  # type: ignore[index]
            return "capped"
        cur = await conn.execute(
            "INSERT INTO tool_drift (version_id, tool, pinned_sha256, live_sha256, live_definition, seen_by)"
            " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (version_id, tool, live_sha256)"
            " DO UPDATE SET last_seen_at = now() RETURNING id, (xmax = 0)",
            (approved.version_id, tool, approved.pins.get(tool), live_sha256, Jsonb(definition), user_id),
        )
        drift_id, new_drift = await cur.fetchone()  # type: ignore[misc]
        await conn.execute(
            "INSERT INTO tool_drift_sightings (drift_id, user_id, version_id) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
            (drift_id, user_id, approved.version_id),
        )
        tenant_cur = await conn.execute(
            "SELECT t.name, u.name FROM users u JOIN tenants t ON t.id = u.tenant_id WHERE u.id = %s", (user_id,)
        )
        tenant, user = await tenant_cur.fetchone()  # type: ignore[misc]
        await audit.append(
            conn,
            action="registry.drift",
            outcome="withheld",
            tenant=tenant,
            actor=user,  # what one sandbox listed: its user's, not the publisher's, until more report it
            target=f"{approved.server}@{approved.version}",
            detail={"drift": drift_id, "tool": tool, "pinned": approved.pins.get(tool), "live": live_sha256,
                    "seen_in_sandbox_of": user, "first_report": bool(new_drift)},
        )
    return "new"


async def drift(conn: psycopg.AsyncConnection, tenant: str, *, open_only: bool = True) -> list[dict[str, Any]]:
    """Drifted definitions, each with the users whose sandboxes listed it (first seen first)."""
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        "SELECT d.id, s.name AS server, v.version, d.tool, d.pinned_sha256, d.live_sha256, d.live_definition,"
        "       d.first_seen_at, d.last_seen_at, d.resolved_by, d.resolved_at,"
        "       coalesce((SELECT array_agg(u.name ORDER BY g.first_seen_at, u.name) FROM tool_drift_sightings g"
        "                 JOIN users u ON u.id = g.user_id WHERE g.drift_id = d.id), '{}') AS seen_in_sandboxes_of"
        "  FROM tool_drift d JOIN registry_versions v ON v.id = d.version_id JOIN registry_servers s ON s.id = v.server_id"
        "  JOIN tenants t ON t.id = s.tenant_id"
        f" WHERE t.name = %s {'AND d.resolved_at IS NULL' if open_only else ''} ORDER BY d.first_seen_at",
        (tenant,),
    )
    return await cur.fetchall()


async def accept_drift(conn: psycopg.AsyncConnection, who: Identity, drift_id: int) -> dict[str, Any]:
    """An admin accepts a drifted definition for its version: it joins the definitions the
    version's tool may offer. The pin stays: servers still offering the approved definition
    (the other users' sandboxes, as a rule) keep it, and other drifted definitions stay withheld."""
    async with conn.transaction():
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(
            "SELECT d.id, d.version_id, d.tool, d.live_sha256, s.name AS server, v.version FROM tool_drift d"
            " JOIN registry_versions v ON v.id = d.version_id JOIN registry_servers s ON s.id = v.server_id"
            " JOIN tenants t ON t.id = s.tenant_id WHERE d.id = %s AND t.name = %s AND d.resolved_at IS NULL FOR UPDATE OF d",
            (drift_id, who.tenant),
        )
        row = await cur.fetchone()
        if row is None:
            raise RegistryError(404, f"no open drift {drift_id} in tenant {who.tenant}")
        await cur.execute(
            "SELECT coalesce(array_agg(u.name ORDER BY g.first_seen_at, u.name), '{}') AS users FROM tool_drift_sightings g"
            " JOIN users u ON u.id = g.user_id WHERE g.drift_id = %s",
            (drift_id,),
        )
        seen_by = (await cur.fetchone())["users"]  # type: ignore[index]
        await conn.execute(
            "INSERT INTO accepted_definitions (version_id, tool, sha256, drift_id, accepted_by) VALUES (%s, %s, %s, %s, %s)"
            " ON CONFLICT DO NOTHING",
            (row["version_id"], row["tool"], row["live_sha256"], drift_id, who.user),
        )
        await conn.execute("UPDATE tool_drift SET resolved_at = now(), resolved_by = %s WHERE id = %s", (who.user, drift_id))
        await audit.append(
            conn, action="registry.accept_drift", outcome="ok", tenant=who.tenant, actor=who.user,
            target=f"{row['server']}@{row['version']}",
            detail={"drift": drift_id, "tool": row["tool"], "accepted": row["live_sha256"], "seen_in_sandboxes_of": seen_by},
        )
    return {"server": row["server"], "version": row["version"], "tool": row["tool"], "accepted": row["live_sha256"],
            "seen_in_sandboxes_of": seen_by}


async def record_usage(conn: psycopg.AsyncConnection, rows: list[tuple[int, str, int, int, float, float]]) -> None:
    """(version_id, tool, calls, errors, total_ms, max_ms) added to this hour's counters."""
    async with conn.cursor() as cur:
        await cur.executemany(
            "INSERT INTO tool_usage (version_id, tool, hour, calls, errors, total_ms, max_ms)"
            " VALUES (%s, %s, date_trunc('hour', now()), %s, %s, %s, %s)"
            " ON CONFLICT (version_id, tool, hour) DO UPDATE SET calls = tool_usage.calls + excluded.calls,"
            " errors = tool_usage.errors + excluded.errors, total_ms = tool_usage.total_ms + excluded.total_ms,"
            " max_ms = greatest(tool_usage.max_ms, excluded.max_ms)",
            rows,
        )


async def usage(conn: psycopg.AsyncConnection, tenant: str) -> list[dict[str, Any]]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        "SELECT s.name AS server, v.version, u.tool, sum(u.calls)::bigint AS calls, sum(u.errors)::bigint AS errors,"
        "       round((sum(u.total_ms) / nullif(sum(u.calls), 0))::numeric, 2)::float AS avg_ms, max(u.max_ms) AS max_ms"
        "  FROM tool_usage u JOIN registry_versions v ON v.id = u.version_id JOIN registry_servers s ON s.id = v.server_id"
        "  JOIN tenants t ON t.id = s.tenant_id WHERE t.name = %s GROUP BY s.name, v.version, u.tool ORDER BY 1, 2, 3",
        (tenant,),
    )
    return await cur.fetchall()
