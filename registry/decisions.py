"""Versions that will not be approved: rejected by an admin, or withdrawn by their publisher.

Either is for a version not approved (validating, passed or failed): it stays in the registry, its
number taken (versions are immutable), shown with its status, and approving it is refused. An
approved version is revoked first. Both are audited in the transaction that makes them.
"""

from __future__ import annotations

from typing import Literal

import psycopg

from core import audit
from core.accounts import Identity
from registry.store import RegistryError, version

Decision = Literal["rejected", "withdrawn"]
CLOSED = ("rejected", "withdrawn")


async def decide(
    conn: psycopg.AsyncConnection, who: Identity, name: str, version_: str, decision: Decision, reason: str | None = None
) -> dict[str, str | None]:
    """Reject (admins) or withdraw (admins, and the publisher of the version) a version not approved."""
    async with conn.transaction():
        row = await version(conn, who.tenant, name, version_)
        await conn.execute("SELECT 1 FROM registry_versions WHERE id = %s FOR UPDATE", (row["id"],))
        if row["builtin"]:
            raise RegistryError(409, f"{name} is built in: revoke its approval instead")
        if row["status"] in CLOSED:
            raise RegistryError(409, f"{name} {version_} is already {row['status']}")
        if row["approvals"]:
            raise RegistryError(
                409, f"{name} {version_} is approved: revoke it first (`mcpfleet registry revoke {name} {version_}`)"
            )
        if decision == "withdrawn" and who.role != "admin" and row["published_by"] != who.user:
            raise RegistryError(403, f"{name} {version_} was published by {row['published_by']}: only they or an admin may withdraw it")
        await conn.execute(
            "UPDATE registry_versions SET status = %s, decided_by = %s, decision_reason = %s WHERE id = %s",
            (decision, who.user, reason, row["id"]),
        )
        action = "registry.reject" if decision == "rejected" else "registry.withdraw"
        await audit.append(
            conn, action=action, outcome="ok", tenant=who.tenant, actor=who.user, target=f"{name}@{version_}",
            detail={"reason": reason, "status_before": row["status"]},
        )
    return {"name": name, "version": version_, "status": decision, "by": who.user, "reason": reason}
