"""Trusted issuers per tenant, and the users their tokens provision.

A user brought in by a token is found again by (issuer, `sub`) within the
issuer's tenant only. Its name is derived from the token but never matched
against existing users: whatever an issuer writes in `preferred_username`
must not claim someone else's account.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import psycopg

from core.accounts import AccountError, Identity
from core.text import storable

# Changes to trusted issuers reach every gateway at once (their token caches are dropped).
CHANNEL = "issuers_changed"
NAME_MAX = 100


@dataclass(frozen=True, slots=True)
class Issuer:
    url: str
    tenant: str
    tenant_id: int
    jwks_url: str | None = None
    audience: str | None = None


async def add_issuer(
    conn: psycopg.AsyncConnection, url: str, *, tenant: str, jwks_url: str | None = None, audience: str | None = None
) -> Issuer:
    for what, value in (("issuer", url), ("JWKS URL", jwks_url), ("audience", audience)):
        if value is not None and not (storable(value) and value.isprintable()):
            raise AccountError(f"the {what} {value!r} holds control characters")
    row = await (await conn.execute("SELECT id FROM tenants WHERE name = %s", (tenant,))).fetchone()
    if row is None:
        raise AccountError(f"no tenant {tenant!r} (add it with `mcpfleet tenants add {tenant}`)")
    try:
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO issuers (tenant_id, url, jwks_url, audience) VALUES (%s, %s, %s, %s)",
                (row[0], url, jwks_url, audience),
            )
            await conn.execute(f"NOTIFY {CHANNEL}")
    except psycopg.errors.UniqueViolation:
        raise AccountError(f"issuer {url!r} is already trusted (an issuer belongs to one tenant)") from None
    except psycopg.errors.CheckViolation:
        raise AccountError("issuer and JWKS URLs must be http(s) URLs") from None
    return Issuer(url=url, tenant=tenant, tenant_id=row[0], jwks_url=jwks_url, audience=audience)


async def remove_issuer(conn: psycopg.AsyncConnection, url: str) -> bool:
    if not storable(url):
        return False
    async with conn.transaction():
        cur = await conn.execute("DELETE FROM issuers WHERE url = %s", (url,))
        if cur.rowcount:
            await conn.execute(f"NOTIFY {CHANNEL}")
    return bool(cur.rowcount)


async def list_issuers(conn: psycopg.AsyncConnection) -> list[Issuer]:
    rows = await (
        await conn.execute(
            """SELECT i.url, t.name, t.id, i.jwks_url, i.audience
                 FROM issuers i JOIN tenants t ON t.id = i.tenant_id ORDER BY t.name, i.url"""
        )
    ).fetchall()
    return [Issuer(*r) for r in rows]


async def find_issuer(conn: psycopg.AsyncConnection, url: str) -> Issuer | None:
    """The trusted issuer of this URL; None for any other, such as a URL from a token that holds a NUL
    (which no stored issuer does, and which PostgreSQL would not even take as a parameter)."""
    if not storable(url):
        return None
    row = await (
        await conn.execute(
            """SELECT i.url, t.name, t.id, i.jwks_url, i.audience
                 FROM issuers i JOIN tenants t ON t.id = i.tenant_id WHERE i.url = %s""",
            (url,),
        )
    ).fetchone()
    return Issuer(*row) if row else None


async def user_for_subject(conn: psycopg.AsyncConnection, issuer: Issuer, sub: str, claims: dict) -> Identity:
    """The user `sub` of `issuer` is, provisioned as a member of the issuer's tenant on first sight."""
    found = await _find_subject(conn, issuer, sub)
    if found is not None:
        return found
    base = user_name(claims, sub)
    for n in range(1, 1000):
        name = base if n == 1 else f"{base[: NAME_MAX - 6]}-{n}"
        try:
            async with conn.transaction():
                row = await (
                    await conn.execute(
                        """INSERT INTO users (tenant_id, name, role, subject_issuer, subject)
                           VALUES (%s, %s, 'member', %s, %s)
                           ON CONFLICT (tenant_id, subject_issuer, subject) WHERE subject IS NOT NULL DO NOTHING
                           RETURNING id""",
                        (issuer.tenant_id, name, issuer.url, sub),
                    )
                ).fetchone()
        except psycopg.errors.UniqueViolation:
            continue  # the name is taken: try the next one
        if row is None:  # a concurrent first request provisioned the same subject
            found = await _find_subject(conn, issuer, sub)
            assert found is not None
            return found
        return Identity(user_id=row[0], user=name, tenant=issuer.tenant, role="member")
    raise AccountError(f"no free user name for {base!r} in tenant {issuer.tenant!r}")


async def _find_subject(conn: psycopg.AsyncConnection, issuer: Issuer, sub: str) -> Identity | None:
    row = await (
        await conn.execute(
            "SELECT id, name, role FROM users WHERE tenant_id = %s AND subject_issuer = %s AND subject = %s",
            (issuer.tenant_id, issuer.url, sub),
        )
    ).fetchone()
    return Identity(user_id=row[0], user=row[1], tenant=issuer.tenant, role=row[2]) if row else None


def user_name(claims: dict, sub: str) -> str:
    """A valid user name from what the token offers, best first."""
    for candidate in (claims.get("preferred_username"), claims.get("email"), sub):
        if not isinstance(candidate, str):
            continue
        name = re.sub(r"[^A-Za-z0-9._@-]+", "-", candidate)
        name = re.sub(r"^[^A-Za-z0-9]+", "", name)[:NAME_MAX]
        if name:
            return name
    return "user"
