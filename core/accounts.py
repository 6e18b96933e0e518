"""Tenants, users and their API keys.

A key reads `mcpf_<prefix>_<secret>`. The prefix is stored in clear to find
the row; of the secret only a SHA-256 is kept (the secret is 256 random bits,
so a slow hash would add cost without adding safety) and it is compared in
constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg

from core import audit
from core.errors import FleetError

ROLES = ("admin", "publisher", "member", "auditor")
KEY_PREFIX = "mcpf_"


class AccountError(FleetError):
    """A request about accounts that cannot be honoured; the message says why."""


@dataclass(frozen=True, slots=True)
class Identity:
    user_id: int
    user: str
    tenant: str
    role: str
    # The tool set the identity's key is bound to (`keys create --set`): its clients see only those tools.
    tool_set: str | None = None

    @property
    def principal(self) -> str:
        return f"{self.tenant}/{self.user}"


def _sha256(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def split_key(key: str) -> tuple[str, str] | None:
    """(prefix, secret) of a well-formed key, else None."""
    if not key.startswith(KEY_PREFIX):
        return None
    prefix, sep, secret = key[len(KEY_PREFIX) :].partition("_")
    if not sep or len(prefix) != 12 or len(secret) < 32:
        return None
    if not (prefix.isascii() and prefix.isalnum() and secret.isascii() and secret.isprintable()):
        return None  # keys are made of these; anything else is never looked up (a NUL could not even be)
    return prefix, secret


async def add_tenant(conn: psycopg.AsyncConnection, name: str, *, conformance: bool = False) -> None:
    """`conformance`: the tenant's users also get the conformance fixture server (a test fixture)."""
    try:
        cur = await conn.execute(
            "INSERT INTO tenants (name, conformance) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING", (name, conformance)
        )
    except psycopg.errors.CheckViolation:
        raise AccountError(f"invalid tenant name {name!r}: use lower-case letters, digits, '.', '_' or '-'") from None
    if cur.rowcount == 0:
        raise AccountError(f"tenant {name!r} already exists")


async def list_tenants(conn: psycopg.AsyncConnection) -> list[dict[str, object]]:
    """Each tenant: its name, user count, and whether it runs the conformance fixture server."""
    cur = await conn.execute(
        "SELECT t.name, t.conformance, count(u.id) FROM tenants t LEFT JOIN users u ON u.tenant_id = t.id"
        " GROUP BY t.id ORDER BY t.name"
    )
    return [{"tenant": name, "users": users, "conformance": conformance} for name, conformance, users in await cur.fetchall()]


async def add_user(
    conn: psycopg.AsyncConnection, name: str, *, tenant: str = "default", role: str = "member", actor: str | None = None
) -> Identity:
    if role not in ROLES:
        raise AccountError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
    async with conn.transaction():
        try:
            await conn.execute("INSERT INTO tenants (name) VALUES (%s) ON CONFLICT (name) DO NOTHING", (tenant,))
        except psycopg.errors.CheckViolation:
            raise AccountError(f"invalid tenant name {tenant!r}: use lower-case letters, digits, '.', '_' or '-'") from None
    try:
        async with conn.transaction():
            row = await (
                await conn.execute(
                    "INSERT INTO users (tenant_id, name, role) SELECT id, %s, %s FROM tenants WHERE name = %s RETURNING id",
                    (name, role, tenant),
                )
            ).fetchone()
            assert row is not None
            await audit.append(
                conn, action="user.add", outcome="ok", tenant=tenant, actor=actor, target=f"{tenant}/{name}", detail={"role": role}
            )
    except psycopg.errors.UniqueViolation:
        raise AccountError(f"user {name!r} already exists in tenant {tenant!r}") from None
    except psycopg.errors.CheckViolation:
        raise AccountError(f"invalid user name {name!r}: use letters, digits, '.', '_', '@' or '-'") from None
    return Identity(user_id=row[0], user=name, tenant=tenant, role=role)


async def find_user(conn: psycopg.AsyncConnection, name: str, *, tenant: str = "default") -> Identity:
    row = await (
        await conn.execute(
            "SELECT u.id, u.role FROM users u JOIN tenants t ON t.id = u.tenant_id WHERE u.name = %s AND t.name = %s",
            (name, tenant),
        )
    ).fetchone()
    if row is None:
        raise AccountError(f"no user {name!r} in tenant {tenant!r}")
    return Identity(user_id=row[0], user=name, tenant=tenant, role=row[1])


async def set_role(
    conn: psycopg.AsyncConnection, name: str, role: str, *, tenant: str = "default", actor: str | None = None
) -> Identity:
    """Change a user's role (e.g. promote a user an identity provider brought in as a member).
    Gateways drop their cached identities at once, so the old role stops working everywhere."""
    if role not in ROLES:
        raise AccountError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
    async with conn.transaction():
        user = await find_user(conn, name, tenant=tenant)
        await conn.execute("UPDATE users SET role = %s WHERE id = %s", (role, user.user_id))
        await conn.execute("NOTIFY api_keys_revoked")
        await audit.append(
            conn, action="user.role", outcome="ok", tenant=tenant, actor=actor, target=name,
            detail={"from": user.role, "to": role},
        )
    return Identity(user.user_id, user.user, user.tenant, role)


async def principal_of(conn: psycopg.AsyncConnection, user_id: int) -> tuple[str, str] | None:
    """(tenant, user) of a user id, or None if there is no such user (any more)."""
    cur = await conn.execute(
        "SELECT t.name, u.name FROM users u JOIN tenants t ON t.id = u.tenant_id WHERE u.id = %s", (user_id,)
    )
    return await cur.fetchone()


async def groups_of(conn: psycopg.AsyncConnection, user_id: int) -> list[str]:
    """The groups a user belongs to (approvals may be bound to one)."""
    cur = await conn.execute("SELECT name FROM user_groups WHERE user_id = %s ORDER BY name", (user_id,))
    return [name for (name,) in await cur.fetchall()]


async def set_groups(conn: psycopg.AsyncConnection, user: Identity, groups: list[str]) -> None:
    """Replace a user's groups."""
    try:
        async with conn.transaction():
            await conn.execute("DELETE FROM user_groups WHERE user_id = %s", (user.user_id,))
            for group in groups:
                await conn.execute("INSERT INTO user_groups (user_id, name) VALUES (%s, %s)", (user.user_id, group))
    except psycopg.errors.CheckViolation:
        raise AccountError("group names are lower-case letters, digits, '.', '_' and '-'") from None


async def list_users(conn: psycopg.AsyncConnection) -> list[Identity]:
    rows = await (
        await conn.execute(
            "SELECT u.id, u.name, t.name, u.role FROM users u JOIN tenants t ON t.id = u.tenant_id ORDER BY t.name, u.name"
        )
    ).fetchall()
    return [Identity(user_id=r[0], user=r[1], tenant=r[2], role=r[3]) for r in rows]


async def remove_user(conn: psycopg.AsyncConnection, user: Identity, *, actor: str | None = None) -> None:
    """Delete the user's row and, with it, their keys, groups, sessions and sandbox records; audited.
    Their running sandbox must be reclaimed first (the gateway does it: `sandbox.requests`)."""
    async with conn.transaction():
        cur = await conn.execute("DELETE FROM users WHERE id = %s", (user.user_id,))
        if cur.rowcount == 0:
            raise AccountError(f"no user {user.principal}")
        # Gateways drop their cache of verified keys on this: the user's keys stop working at once.
        await conn.execute("NOTIFY api_keys_revoked")
        await audit.append(conn, action="user.remove", outcome="ok", tenant=user.tenant, actor=actor, target=user.principal)


async def create_key(
    conn: psycopg.AsyncConnection, user: Identity, *, actor: str | None = None, expires_in: timedelta | None = None,
    tool_set: str | None = None,
) -> str:
    """A new key of `user`'s, shown only now; with `expires_in` it is refused from then on; with `tool_set`
    its clients see only the tools of that set of the user's (which must exist)."""
    prefix = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    async with conn.transaction():
        if tool_set is not None:
            found = await conn.execute("SELECT 1 FROM tool_sets WHERE user_id = %s AND name = %s", (user.user_id, tool_set))
            if await found.fetchone() is None:
                raise AccountError(f"{user.principal} has no tool set {tool_set!r} (see `mcpfleet toolsets list`)")
        cur = await conn.execute(
            "INSERT INTO api_keys (user_id, prefix, secret_sha256, expires_at, tool_set) VALUES (%s, %s, %s, now() + %s, %s)"
            " RETURNING expires_at",
            (user.user_id, prefix, _sha256(secret), expires_in, tool_set),
        )
        expires_at = (await cur.fetchone())[0]  # type: ignore[index]
        await audit.append(
            conn, action="key.create", outcome="ok", tenant=user.tenant, actor=actor, target=user.principal,
            # What is set only: a key without expiry or tool set is audited as before either came.
            detail={"prefix": prefix, **({"expires_at": expires_at.isoformat()} if expires_at else {}),
                    **({"tool_set": tool_set} if tool_set else {})},
        )
    return f"{KEY_PREFIX}{prefix}_{secret}"


async def list_keys(
    conn: psycopg.AsyncConnection, *, user: Identity | None = None, tenant: str | None = None, include_ended: bool = False
) -> list[dict[str, Any]]:
    """Keys as rows (prefix, tenant, user, created, expires, last used, state); never a secret or its hash."""
    conditions: list[str] = []
    params: list[object] = []
    if user is not None:
        conditions.append("k.user_id = %s")
        params.append(user.user_id)
    if tenant is not None:
        conditions.append("t.name = %s")
        params.append(tenant)
    if not include_ended:
        conditions.append("k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > now())")
    where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
    cur = await conn.execute(
        f"""SELECT k.prefix, t.name, u.name, k.created_at, k.expires_at, k.last_used_at,
                   CASE WHEN k.revoked_at IS NOT NULL THEN 'revoked'
                        WHEN k.expires_at <= now() THEN 'expired' ELSE 'active' END
              FROM api_keys k JOIN users u ON u.id = k.user_id JOIN tenants t ON t.id = u.tenant_id
              {where} ORDER BY t.name, u.name, k.created_at""",
        params,
    )
    names = ("prefix", "tenant", "user", "created", "expires", "last_used", "state")
    return [dict(zip(names, row, strict=True)) for row in await cur.fetchall()]


_REVOKE = """UPDATE api_keys k SET revoked_at = now() FROM users u JOIN tenants t ON t.id = u.tenant_id
               WHERE u.id = k.user_id AND k.revoked_at IS NULL AND {which}
           RETURNING k.prefix, t.name, u.name"""


async def revoke_keys(
    conn: psycopg.AsyncConnection, *, key_or_prefix: str | None = None, user: Identity | None = None, actor: str | None = None
) -> int:
    """Revoke one key (given whole or by its prefix) or every key of a user; returns how many."""
    param: str | int
    if key_or_prefix is not None:
        parts = split_key(key_or_prefix)
        which, param = "k.prefix = %s", parts[0] if parts else key_or_prefix.removeprefix(KEY_PREFIX)
    elif user is not None:
        which, param = "k.user_id = %s", user.user_id
    else:
        raise AccountError("name a key or a user")
    async with conn.transaction():
        revoked = await (await conn.execute(_REVOKE.format(which=which), (param,))).fetchall()
        if revoked:
            # Gateways drop their cache of verified keys on this, so a revocation takes effect at once.
            await conn.execute("NOTIFY api_keys_revoked")
            tenant, name = revoked[0][1], revoked[0][2]
            await audit.append(
                conn, action="key.revoke", outcome="ok", tenant=tenant, actor=actor, target=f"{tenant}/{name}",
                detail={"prefixes": sorted(r[0] for r in revoked)},
            )
    return len(revoked)


async def verify_key(conn: psycopg.AsyncConnection, key: str) -> Identity | None:
    verified = await verify_key_until(conn, key)
    return verified[0] if verified is not None else None


async def verify_key_until(conn: psycopg.AsyncConnection, key: str) -> tuple[Identity, datetime | None] | None:
    """The key's identity and when the key expires (None: never), or None for a key not (or no longer) valid.

    Also notes the key's use (to the minute: a key is checked on every cache miss of a gateway)."""
    parts = split_key(key)
    if parts is None:
        return None
    prefix, secret = parts
    row = await (
        await conn.execute(
            """SELECT k.secret_sha256, u.id, u.name, t.name, u.role, k.expires_at, k.tool_set
                 FROM api_keys k JOIN users u ON u.id = k.user_id JOIN tenants t ON t.id = u.tenant_id
                WHERE k.prefix = %s AND k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > now())""",
            (prefix,),
        )
    ).fetchone()
    if row is None:
        # Same work as a hit, so timing does not tell which prefixes exist.
        hmac.compare_digest(_sha256(secret), b"\0" * 32)
        return None
    if not hmac.compare_digest(bytes(row[0]), _sha256(secret)):
        return None
    await conn.execute(
        "UPDATE api_keys SET last_used_at = now() WHERE prefix = %s"
        " AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')",
        (prefix,),
    )
    return Identity(user_id=row[1], user=row[2], tenant=row[3], role=row[4], tool_set=row[6]), row[5]
