"""Which secret names the approved servers declare (their manifests' `_meta.io.mcpfleet.secrets`, a
built-in server's own list), so a secret is set only where a server will read it.

A name no approved server declares is almost always a typo or the wrong server (`GITHUB_TOKEN`
for `io.example/gitlab`), and a tool call then fails for a missing secret long after the set
"worked". Setting one ahead of an approval is still possible, on purpose (`force`).
"""

from __future__ import annotations

from collections.abc import Iterable

import psycopg

from registry import store
from registry.manifest import ManifestError, parse_manifest
from sandbox.servers import BUILTIN_SERVERS


class UndeclaredSecret(ValueError):
    """A secret name that no approved server of the tenant declares for that server."""


async def _names(conn: psycopg.AsyncConnection, rows: Iterable[tuple[str, str, int, bool]]) -> dict[str, tuple[str, ...]]:
    """Server -> declared names, from (server, prefix, version id, builtin) rows."""
    builtins = {spec.name: spec.secret_names for spec in BUILTIN_SERVERS}
    found: dict[str, tuple[str, ...]] = {}
    for server, prefix, version_id, builtin in rows:
        if builtin:
            names = builtins.get(prefix, ())
        else:
            row = await (await conn.execute("SELECT manifest FROM registry_versions WHERE id = %s", (version_id,))).fetchone()
            try:
                names = parse_manifest(row[0]).fleet.secrets if row else ()
            except ManifestError:  # a version that cannot run declares nothing usable
                names = ()
        if names:
            found[server] = tuple(sorted({*found.get(server, ()), *names}))
    return found


async def declared_for_user(conn: psycopg.AsyncConnection, user_id: int) -> dict[str, tuple[str, ...]]:
    """Server -> the secret names it declares, for each server version approved for the user."""
    approved = await store.approved_for(conn, user_id)
    return await _names(conn, ((a.server, a.prefix, a.version_id, a.builtin) for a in approved))


async def declared_in_tenant(conn: psycopg.AsyncConnection, tenant: str) -> dict[str, tuple[str, ...]]:
    """Server -> the secret names declared by any of the tenant's live approvals (any group or tier:
    a tenant-wide secret, or a user's, is for whichever of them the user gets)."""
    cur = await conn.execute(
        "SELECT DISTINCT s.name, s.prefix, v.id, s.builtin FROM approvals a"
        "  JOIN registry_servers s ON s.id = a.server_id JOIN registry_versions v ON v.id = a.version_id"
        "  JOIN tenants t ON t.id = s.tenant_id WHERE t.name = %s AND a.revoked_at IS NULL ORDER BY 1, 3",
        (tenant,),
    )
    return await _names(conn, await cur.fetchall())


async def check_declared(conn: psycopg.AsyncConnection, tenant: str, server: str, name: str) -> None:
    """Raise UndeclaredSecret, naming what is declared, unless an approved server of `tenant` called
    `server` declares `name`."""
    declares = await declared_in_tenant(conn, tenant)
    if name in declares.get(server, ()):
        return
    if server in declares:
        where = f"{server} declares {', '.join(declares[server])}"
    else:
        where = f"no approved server of tenant {tenant} is called {server}"
    others = [f"{s}: {', '.join(n)}" for s, n in sorted(declares.items()) if s != server and name in n]
    hint = f"; {name} is declared by {'; '.join(others)}" if others else ""
    listing = "; ".join(f"{s}: {', '.join(n)}" for s, n in sorted(declares.items())) or "none"
    raise UndeclaredSecret(
        f"no approved server of tenant {tenant} declares a secret {name} for {server} ({where}{hint})."
        f" Declared secrets: {listing}. To set it ahead of an approval, use --force (API: ?force=1)."
    )
