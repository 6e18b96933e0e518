"""Model usage and quotas in PostgreSQL (migrations/0014_model_usage.sql): stateless functions over a connection.

Days are UTC days: a quota resets at 00:00 UTC. A quota counts tokens in and out together. It is
checked before an ask and the ask's tokens are added after it, so asks running at once may together
pass a quota by what they answer; the next ask is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import dict_row

from core.models.api import Asker, ModelError

_TODAY = "(now() AT TIME ZONE 'UTC')::date"


@dataclass(frozen=True)
class Quotas:
    """The fallbacks from the environment, where neither the user's tier nor the tenant sets one (None: none)."""

    user_tokens_per_day: int | None = None
    tenant_tokens_per_day: int | None = None


async def check_quota(conn: psycopg.AsyncConnection, asker: Asker, quotas: Quotas) -> None:
    """ModelError("over_quota") when the user or their tenant has used its tokens for today."""
    cur = await conn.execute(
        f"""SELECT (SELECT t.model_tokens_per_day FROM users u JOIN tiers t ON t.name = u.tier WHERE u.id = %(user)s),
                   (SELECT u.tier FROM users u WHERE u.id = %(user)s),
                   (SELECT model_tokens_per_day FROM tenants WHERE name = %(tenant)s),
                   (SELECT coalesce(sum(tokens_in + tokens_out), 0) FROM model_usage
                     WHERE day = {_TODAY} AND user_id = %(user)s),
                   (SELECT coalesce(sum(tokens_in + tokens_out), 0) FROM model_usage
                     WHERE day = {_TODAY} AND tenant = %(tenant)s)""",
        {"user": asker.user_id, "tenant": asker.tenant},
    )
    row = await cur.fetchone()
    assert row is not None
    tier_quota, tier, tenant_quota, user_used, tenant_used = row
    user_quota = tier_quota if tier_quota is not None else quotas.user_tokens_per_day
    tenant_quota = tenant_quota if tenant_quota is not None else quotas.tenant_tokens_per_day
    if user_quota is not None and user_used >= user_quota:
        source = f"tier {tier!r}" if tier_quota is not None else "MCPFLEET_MODEL_TOKENS_PER_DAY"
        raise ModelError("over_quota", f"over the model quota of {user_quota} tokens a day per user ({source}): "
                                       f"{user_used} used today; it resets at 00:00 UTC{_in_how_long()}")
    if tenant_quota is not None and tenant_used >= tenant_quota:
        source = f"tenant {asker.tenant!r}" if row[2] is not None else "MCPFLEET_MODEL_TENANT_TOKENS_PER_DAY"
        raise ModelError("over_quota", f"over the model quota of {tenant_quota} tokens a day for tenant {asker.tenant!r} "
                                       f"({source}): {tenant_used} used today; it resets at 00:00 UTC{_in_how_long()}")


def _in_how_long() -> str:
    now = datetime.now(UTC)
    left = datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1) - now
    minutes = int(left.total_seconds() // 60)
    return f" (in {minutes // 60} h {minutes % 60} min)"


async def record(conn: psycopg.AsyncConnection, asker: Asker, model: str, tokens_in: int, tokens_out: int,
                 latency_ms: int) -> None:
    await conn.execute(
        f"""INSERT INTO model_usage AS u (day, user_id, tenant, server, purpose, model, asks, tokens_in, tokens_out, latency_ms)
            VALUES ({_TODAY}, %s, %s, %s, %s, %s, 1, %s, %s, %s)
            ON CONFLICT (day, user_id, tenant, server, purpose, model) DO UPDATE SET
              asks = u.asks + 1, tokens_in = u.tokens_in + excluded.tokens_in,
              tokens_out = u.tokens_out + excluded.tokens_out, latency_ms = u.latency_ms + excluded.latency_ms""",
        (asker.user_id, asker.tenant, asker.server or "", asker.purpose, model, tokens_in, tokens_out, latency_ms),
    )


async def usage(conn: psycopg.AsyncConnection, *, days: int = 1, tenant: str | None = None,
                user_id: int | None = None) -> list[dict[str, Any]]:
    """Usage rows of the last `days` UTC days (today is 1), newest first, with the user's name where the user still exists."""
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        f"""SELECT m.day::text AS day, m.tenant, coalesce(u.name, '#' || m.user_id) AS user, m.user_id, m.server,
                   m.purpose, m.model, m.asks, m.tokens_in, m.tokens_out,
                   (m.latency_ms / greatest(m.asks, 1))::bigint AS mean_latency_ms
              FROM model_usage m LEFT JOIN users u ON u.id = m.user_id
             WHERE m.day > {_TODAY} - %(days)s::int
               AND (%(tenant)s::text IS NULL OR m.tenant = %(tenant)s)
               AND (%(user)s::bigint IS NULL OR m.user_id = %(user)s)
             ORDER BY m.day DESC, m.tenant, 3, m.server, m.purpose, m.model""",
        {"days": days, "tenant": tenant, "user": user_id},
    )
    return list(await cur.fetchall())
